"""Which activations the backward recomputes: blocks of the forward, options per block, a solver's choice.

Blocks are found from parameter names: the repeated layers of a ModuleList
(``transformer.h.3.attn...``, ``model.layers.7...``) each start where the
forward first reads one of their parameters. Each block (and the stretches
before and after them) offers up to four options: keep everything; recompute
the cheap results (everything but matmuls, convolutions and attention, as
selective activation checkpointing does); recompute everything but the
residual stream (the sums each sub-layer adds its result to: checkpointing
each sub-layer rather than the block, so the backward of one sub-layer does
not hold the recomputed values of the others); recompute everything but what
later blocks read (what ``torch.utils.checkpoint`` around the block does).
Baselines by name: ``none``, ``blocks`` (every block checkpointed) and
``sqrt`` (Chen et al.: segments of about sqrt(n) blocks checkpointed).
``checkpoint`` offers the blocks only, each kept, checkpointed selectively or
whole, for a lowering that runs them under ``torch.utils.checkpoint``
(``memopt.fsdp``: what composes with FSDP2).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils.flop_counter import flop_registry

from memopt.capture import CapturedStep
from memopt.device import DeviceSpec
from memopt.lower.rng_ops import RNG_STATE_BYTES
from memopt.passes import plan_cache, recompute
from memopt.passes.costs import node_flops, recompute_seconds
from memopt.passes.op_kinds import is_random, written_inputs
from memopt.passes.storage import ACTIVATIONS, StorageTable
from memopt.solvers import remat_fast
from memopt.solvers.remat_fast import RecomputeProblem, RecomputeSolution

SOLVERS = ("memopt", "none", "blocks", "sqrt", "checkpoint")
KEPT_RANDOM = "made by a random op: kept, so the backward sees the numbers the forward drew"
REPLAYED_RANDOM = "replayed from the saved generator state: the forward keeps the state, the backward draws again"
KEPT_EXACT = "written in place, or made from data written in place: recomputing it could differ from eager"
KEEP, CHEAP, FULL = "keep everything", "recompute all but matmuls and attention", "recompute all but its outputs"
SUBLAYERS = "recompute all but the residual stream"


@dataclass(frozen=True, slots=True)
class Segment:
    """A stretch of the forward: a repeated block, or what comes before or after the blocks."""

    name: str
    start: int  # first node position
    end: int  # one past the last
    module: str | None = None  # a repeated block's module path ("model.layers.3"); None for the other stretches


@dataclass(frozen=True, slots=True)
class ActivationDecision:
    node: str
    nbytes: int
    action: str  # "keep" | "recompute" | "replay" (a random op drawn again from the generator state saved for it)
    cost_s: float  # seconds its recomputation takes (or would take)
    reason: str


@dataclass(frozen=True)
class RecomputePlan:
    solver: str
    solution: RecomputeSolution
    chosen: tuple[recompute.Candidate, ...]
    segments: tuple[Segment, ...]
    options: tuple[tuple[str, ...], ...]  # per segment: the names of its options, by level
    decisions: tuple[ActivationDecision, ...]
    problem: RecomputeProblem  # what the solver saw: candidate i of the problem is candidates[i]
    candidates: tuple[recompute.Candidate, ...]
    cached: bool = False  # reused from the plan cache, not solved now


def find_segments(step: CapturedStep, table: StorageTable) -> tuple[Segment, ...]:
    """The forward cut at the repeated layers of the model's ModuleLists (the outermost ones: an encoder's and a
    decoder's blocks, each block one segment)."""
    nodes = list(step.graph.graph.nodes)
    bs = table.backward_start
    qualified = {p.node: p.name for p in step.placeholders if p.role != "input"}
    first_use: dict[str, int] = {}
    for i, node in enumerate(nodes[:bs]):
        for arg in node.all_input_nodes:
            if arg.name in qualified:
                first_use.setdefault(qualified[arg.name], i)
    layers: dict[str, dict[int, int]] = {}  # container -> layer index -> first forward use
    owns: dict[tuple[str, int], set[str]] = {}  # (container, layer index) -> its parameters' names inside it
    for name, pos in first_use.items():
        parts = name.split(".")
        for k, part in enumerate(parts[:-1]):
            if part.isdigit():
                container = ".".join(parts[:k])
                layer = layers.setdefault(container, {})
                layer[int(part)] = min(layer.get(int(part), pos), pos)
                owns.setdefault((container, int(part)), set()).add(".".join(parts[k + 1:]))
    loss = next(i for i, node in enumerate(nodes) if node.name == step.loss_node)
    # a container is repeated when two of its layers hold mostly parameters of the same names (a T5's first
    # block holds the position bias as well; a stem's conv and norm are not repeats)
    repeated = [c for c in layers if any(2 * len(owns[c, a] & owns[c, b]) > len(owns[c, a] | owns[c, b])
                                         for a, b in itertools.combinations(layers[c], 2))]
    if not repeated:
        # no repeated layers: about sqrt(n) even stretches of the forward
        count = max(1, math.isqrt(loss + 1))
        cuts = [round(k * (loss + 1) / count) for k in range(count + 1)]
        return tuple(Segment(f"stretch {k}", cuts[k], cuts[k + 1]) for k in range(count) if cuts[k] < cuts[k + 1])
    # every repeated container that is not inside a layer of another (an encoder's and a decoder's blocks, not
    # the sublayers of each block)
    top = [c for c in repeated if not any(_inside_layer(c, other) for other in repeated if other != c)]
    bounds: list[tuple[int, str | None]] = []  # (position, the block starting there; None: outside the blocks)
    for container in top:
        starts = sorted(set(layers[container].values()))
        outside = [pos for name, pos in first_use.items()
                   if not name.startswith(container + ".") and pos > starts[-1]]
        prefix = container or "layers"
        index_at = {pos: index for index, pos in sorted(layers[container].items(), reverse=True)}
        bounds += [(start, f"{prefix}[{k}]", f"{container}.{index_at[start]}" if container else str(index_at[start]))
                   for k, start in enumerate(starts)]
        bounds.append((min(outside, default=loss + 1), None, None))
    bounds.sort(key=lambda bound: (bound[0], bound[1] is not None))  # a block starting where another ends wins
    first, last = bounds[0][0], max(bound[0] for bound in bounds if bound[1] is not None)
    segments = [Segment("before the blocks", 0, first)] if first > 0 else []
    for (start, name, module), (end, *_) in zip(bounds, [*bounds[1:], (loss + 1, None, None)]):
        if start < end:
            where = "after the blocks" if start > last else "between the blocks"
            segments.append(Segment(name or where, start, end, module))
    return tuple(segments)


def _inside_layer(container: str, other: str) -> bool:
    """Whether ``container`` lies inside one layer of the repeated container ``other``."""
    rest = container[len(other) + 1:] if other else container
    return (not other or container.startswith(other + ".")) and rest.split(".")[0].isdigit()


def plan_recompute(
    step: CapturedStep,
    table: StorageTable,
    device: DeviceSpec,
    budget_bytes: int,
    *,
    constant_bytes: int,
    floor_bytes: int,
    scratch: Sequence[int] = (),
    solver: str = "memopt",
    time_limit_s: float = 5.0,
    cache_dir: str | None = None,
    fused: bool = False,
) -> RecomputePlan:
    """Choose the activations to recompute so that the step's peak is at most ``budget_bytes``.

    With ``cache_dir``, a plan made before for the same problem, budget and solver is reused. ``fused``: the
    lowering fuses recomputed pointwise ops into the backward's kernels (``recompute_seconds``).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown remat solver {solver!r}; known: {', '.join(SOLVERS)}")
    graph = step.graph
    nodes: list[fx.Node] = list(graph.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    by_name = {node.name: node for node in nodes}
    bs = table.backward_start
    # every forward result that can replay, the backward's activations and the forward's temporaries alike:
    # recomputing an activation may need a temporary it was made from (a matmul before its ReLU)
    candidates = recompute.recompute_candidates(graph, table, step.mutated_inputs)
    problem = RecomputeProblem(
        backward_start=bs,
        inputs=tuple(tuple(position[a] for a in node.all_input_nodes) for node in nodes),
        values=table.values,
        node_costs=tuple(recompute_seconds(node, device, fused=fused) for node in nodes),
        sizes=tuple(s.nbytes for s in table.storages),
        start=tuple(s.defined_at for s in table.storages),
        end=tuple(s.last_use for s in table.storages),
        readers=table.readers,
        candidates=tuple(
            remat_fast.Candidate(c.storage, tuple(position[by_name[n]] for n in c.nodes),
                                 RNG_STATE_BYTES * len(c.replays)) for c in candidates
        ),
        constant_bytes=constant_bytes,
        node_scratch=tuple(scratch),
        floor_bytes=floor_bytes,
    )
    # the layers first (the solver upgrades in this order), then what comes before and after them
    segments = tuple(sorted(find_segments(step, table), key=lambda s: not s.name.endswith("]")))
    key = None
    if cache_dir is not None:  # hashing the whole problem costs time on large graphs: only with a cache
        key = plan_cache.cache_key("remat", problem, budget_bytes, solver, time_limit_s, segments,
                                   [c.nodes for c in candidates], [(n.name, str(n.target)) for n in nodes])
        cached = plan_cache.load(cache_dir, key)
        if isinstance(cached, RecomputePlan):
            return dataclasses.replace(cached, cached=True)
    segments, options, names = _options(problem, nodes, segments, solver)
    if solver in ("memopt", "checkpoint"):
        solution = remat_fast.solve_blocks(problem, options, budget_bytes, time_limit_s=time_limit_s)
        # never worse than a baseline: one that fits for less, or reaches lower when nothing fits, wins
        for baseline in ("blocks", "sqrt") if solver == "memopt" else ():
            other = _options(problem, nodes, segments, baseline)
            fixed = _fixed(problem, other[1], budget_bytes)
            if (fixed.status != "infeasible" and (solution.status == "infeasible" or fixed.cost_s < solution.cost_s)) \
                    or (fixed.status == solution.status == "infeasible" and fixed.peak_bytes < solution.peak_bytes):
                solution = dataclasses.replace(fixed, lower_bound_s=min(solution.lower_bound_s, fixed.cost_s),
                                               seconds=solution.seconds)
                segments, options, names = other
        if solution.status == "infeasible":  # nothing fits: the smallest budget is as low as the search can take it
            solution = remat_fast.lowest_peak(problem, options, solution, time_limit_s=time_limit_s)
            if solution.peak_bytes <= budget_bytes:  # and low enough for this budget
                solution = dataclasses.replace(solution, status="feasible")
    else:  # a baseline: its one option per segment, whatever the budget
        solution = _fixed(problem, options, budget_bytes)
    chosen = tuple(candidates[i] for i in solution.chosen)
    decisions = _decisions(table, nodes, problem.node_costs, candidates, solution, segments, options, names)
    remat = RecomputePlan(solver, solution, chosen, segments, names, decisions, problem, tuple(candidates))
    if key is not None:
        plan_cache.store(cache_dir, key, remat)
    return remat


def _options(
    problem: RecomputeProblem, nodes: list[fx.Node], segments: tuple[Segment, ...], solver: str
) -> tuple[tuple[Segment, ...], list[list[frozenset[int]]], tuple[tuple[str, ...], ...]]:
    """The segments as the solver sees them, each one's options (candidate sets) and their names."""
    bs = problem.backward_start
    per_segment: list[list[frozenset[int]]] = []
    names: list[tuple[str, ...]] = []
    if solver == "sqrt":  # Chen's segments: about sqrt(n) blocks each, checkpointed as one
        blocks = [s for s in segments if s.name.endswith("]")]
        size = max(1, math.isqrt(len(blocks))) if blocks else 1
        merged = [Segment(f"{blocks[k].name}..", blocks[k].start, blocks[min(k + size, len(blocks)) - 1].end)
                  for k in range(0, len(blocks), size)]
        segments = tuple(merged)
    residual = _residual_sums(problem, nodes)
    for segment in segments:
        inside = [i for i, c in enumerate(problem.candidates) if segment.start <= c.nodes[0] < segment.end]
        # what the forward reads after the segment stays: recomputing it would chain into later blocks
        free = [i for i in inside
                if not any(segment.end <= r < bs for r in problem.readers[problem.candidates[i].storage])]
        cheap = frozenset(i for i in free if node_flops(nodes[problem.candidates[i].nodes[0]]) == 0)
        full = frozenset(free)
        sublayers = full - residual
        if solver == "none" or (solver in ("blocks", "checkpoint") and not segment.name.endswith("]")):
            per_segment.append([frozenset()])
            names.append((KEEP,))
        elif solver in ("blocks", "sqrt"):
            per_segment.append([full])
            names.append((FULL,))
        else:
            levels, level_names = [frozenset()], [KEEP]
            # (the residual sums are cheap: the sub-layer level keeps some of what the one before recomputes;
            # torch's checkpoint, which the "checkpoint" solver's lowering runs, has no such level)
            for option, name in ((cheap, CHEAP), (sublayers, SUBLAYERS), (full, FULL)):
                if option != levels[-1] and not (name == SUBLAYERS and solver == "checkpoint"):
                    levels.append(option)
                    level_names.append(name)
            per_segment.append(levels)
            names.append(tuple(level_names))
    return segments, per_segment, tuple(names)


def _residual_sums(problem: RecomputeProblem, nodes: list[fx.Node]) -> frozenset[int]:
    """The candidates that are the residual stream: sums that a later sum of the same size reads, or that read
    one (the last of a stack, which the final norm reads), found from the ops, not from module names."""
    def sums(a: fx.Node, b: fx.Node) -> bool:
        return (a.target is b.target is _ADD
                and problem.sizes[problem.values[position[a]][0]] == problem.sizes[problem.values[position[b]][0]])

    position = {node: i for i, node in enumerate(nodes)}
    found = set()
    for i, candidate in enumerate(problem.candidates):
        node = nodes[candidate.nodes[0]]
        if any(sums(node, other) for other in (*node.all_input_nodes, *node.users)
               if position[other] < problem.backward_start):
            found.add(i)
    return frozenset(found)


_ADD = torch.ops.aten.add.Tensor


def saved_by_policy(step: CapturedStep, table: StorageTable, segment: Segment) -> tuple[tuple[str, bool], ...]:
    """The policy of a block checkpointed selectively (torch's selective activation checkpointing): the ops of its
    forward that have FLOPs (torch's flop counter's), in order, each with whether the checkpoint keeps its result,
    as the "recompute all but matmuls and attention" option has it: kept where the backward reads it, else not
    (torch's early stop then recomputes it only if an op the backward needs comes after it)."""
    nodes = list(step.graph.graph.nodes)
    ops = []
    for i in range(segment.start, segment.end):
        packet = getattr(nodes[i].target, "overloadpacket", None)
        if nodes[i].op == "call_function" and packet in flop_registry:
            read_in_backward = any(r >= table.backward_start for key in table.values[i] for r in table.readers[key])
            ops.append((str(packet), read_in_backward))
    return tuple(ops)


def _fixed(problem: RecomputeProblem, options: list[list[frozenset[int]]], budget_bytes: int) -> RecomputeSolution:
    chosen = tuple(sorted({i for block in options for i in block[0]}))
    sim = remat_fast.simulate(problem, chosen)
    status = "feasible" if sim.peak_bytes <= budget_bytes else "infeasible"
    return RecomputeSolution(status, chosen, (0,) * len(options), sim.peak_bytes, sim.cost_s, 0.0, 0.0, 1)


def _decisions(
    table: StorageTable,
    nodes: list[fx.Node],
    node_costs: Sequence[float],
    candidates: list[recompute.Candidate],
    solution: RecomputeSolution,
    segments: tuple[Segment, ...],
    options: list[list[frozenset[int]]],
    names: tuple[tuple[str, ...], ...],
) -> tuple[ActivationDecision, ...]:
    by_storage = {c.storage: (i, c) for i, c in enumerate(candidates)}
    chosen = set(solution.chosen)
    by_name = {node.name: node for node in nodes}
    position = {node: i for i, node in enumerate(nodes)}
    # storages a random op fills in place (dropout's mask: empty_like, then bernoulli_)
    drawn = {key for node in nodes if is_random(node) for arg in written_inputs(node)
             for key in table.values[position[arg]]}
    level_of = {}
    if len(solution.levels) == len(options):
        for j, level in enumerate(solution.levels):
            for i in options[j][level]:
                level_of[i] = f"{segments[j].name if j < len(segments) else j}: {names[j][level]}"
    decisions = []
    for storage in table.storages:
        if storage.category != ACTIVATIONS:
            continue
        entry = by_storage.get(storage.index)
        if entry is None:
            cost = node_costs[position[by_name[storage.node]]]
            why = KEPT_RANDOM if is_random(by_name[storage.node]) or storage.index in drawn else KEPT_EXACT
            decisions.append(ActivationDecision(storage.node, storage.nbytes, "keep", cost, why))
            continue
        i, candidate = entry
        cost = sum(node_costs[position[by_name[n]]] for n in candidate.nodes)
        if i in chosen:
            level = level_of.get(i, "chosen by the solver")
            if candidate.replays:
                decisions.append(ActivationDecision(storage.node, storage.nbytes, "replay", cost,
                                                    f"{level}; {REPLAYED_RANDOM}"))
            else:
                decisions.append(ActivationDecision(storage.node, storage.nbytes, "recompute", cost, level))
        else:
            decisions.append(ActivationDecision(storage.node, storage.nbytes, "keep", cost,
                                                "the budget is met without recomputing it"))
    return tuple(decisions)
