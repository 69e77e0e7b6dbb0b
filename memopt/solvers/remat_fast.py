"""Keep or recompute, fast: choose per block which forward results the backward recomputes, under a byte peak.

Plain data in, a ``RecomputeSolution`` out; no torch. The problem is the joint
forward/backward graph as it runs: nodes in order, the storages they make and
read, and candidates (forward results the backward reads and may recompute).
Recomputing a candidate ends its forward life at its last forward reader and
makes a copy right before the first backward node that needs it (directly, or
through another copy); what a copy reads and is not recomputed is kept until
then. ``simulate`` prices a choice in one pass over the graph.

The solver works on blocks (repeated layers): each block offers options that
recompute more and cost more. A chain of plans upgrades one block at a time,
in forward order, one level at a time; every plan on the chain is simulated
and the cheapest that fits is taken, then upgrades that are not needed are
undone one by one (repair). The lower bound is a covering knapsack at every
time the keep-everything plan is over budget: the bytes above budget must be
recomputed away, by candidates live then, each at least at its own cost.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

INFINITY = float("inf")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A forward result that may be recomputed: the storage and the nodes that would be copied."""

    storage: int
    nodes: tuple[int, ...]  # the node making the storage, then forward nodes whose result lives in it


@dataclass(frozen=True)
class RecomputeProblem:
    """The joint graph as plain data. Positions index ``inputs``/``values``/``node_costs``."""

    backward_start: int  # position of the first backward node
    inputs: tuple[tuple[int, ...], ...]  # per node: the nodes whose results it reads
    values: tuple[tuple[int, ...], ...]  # per node: the storages its result lives in
    node_costs: tuple[float, ...]  # per node: seconds to run it once
    sizes: tuple[int, ...]  # per storage: bytes
    start: tuple[int, ...]  # per storage: the node that makes it; -1 for graph inputs
    end: tuple[int, ...]  # per storage: the last node that reads it (the last node for outputs)
    readers: tuple[tuple[int, ...], ...]  # per storage: nodes that read it, through any alias
    candidates: tuple[Candidate, ...]
    constant_bytes: int = 0  # resident during the whole graph outside the storages (optimizer state)
    floor_bytes: int = 0  # a peak outside the graph no choice changes (the optimizer step)

    def __post_init__(self) -> None:
        n = len(self.inputs)
        if not (len(self.values) == len(self.node_costs) == n):
            raise ValueError("inputs, values and node_costs need one entry per node")
        if not (len(self.start) == len(self.end) == len(self.readers) == len(self.sizes)):
            raise ValueError("sizes, start, end and readers need one entry per storage")
        if not 0 <= self.backward_start <= n:
            raise ValueError("backward_start must be a node position")
        for c in self.candidates:
            if not c.nodes or max(c.nodes) >= self.backward_start or self.start[c.storage] != c.nodes[0]:
                raise ValueError(f"candidate {c} must be made by its first node, in the forward")
        object.__setattr__(self, "users", _users(self.inputs))
        object.__setattr__(self, "makes", _makes(self.start, n))


@dataclass(frozen=True, slots=True)
class Simulation:
    peak_bytes: int
    peak_time: int  # event index: forward nodes, then backward nodes with the copies made before them
    cost_s: float  # seconds of recomputation


@dataclass(frozen=True)
class RecomputeSolution:
    status: str  # "optimal" | "feasible" | "infeasible"
    chosen: tuple[int, ...]  # candidate indices recomputed
    levels: tuple[int, ...]  # per block: the option taken
    peak_bytes: int
    cost_s: float
    lower_bound_s: float
    seconds: float
    simulations: int

    @property
    def gap(self) -> float:
        if self.cost_s <= 0:
            return 0.0
        return max(0.0, (self.cost_s - self.lower_bound_s) / self.cost_s)


def simulate(problem: RecomputeProblem, chosen: Collection[int]) -> Simulation:
    """Peak bytes and recompute seconds when the ``chosen`` candidates are recomputed.

    Replays the rewrite: before each backward node, copies of the recomputed
    nodes it reads are made (what a copy reads and is recomputed first, in
    argument order), then the node runs; every event gets its own time.
    """
    bs = problem.backward_start
    cands = [problem.candidates[i] for i in chosen]
    recompute = {node for c in cands for node in c.nodes}
    chosen_storages = {c.storage for c in cands}
    makes: dict[int, tuple[int, ...]] = problem.makes  # type: ignore[attr-defined]
    n = len(problem.inputs)
    time_of = list(range(n))  # event time of each original node
    copy_time: dict[int, int] = {}  # recomputed node -> time of its copy
    clock = bs

    def copy(node: int) -> None:
        nonlocal clock
        for arg in problem.inputs[node]:
            if arg in recompute and arg not in copy_time:
                copy(arg)
        copy_time[node] = clock
        clock += 1

    if recompute:
        for node in range(bs, n):
            for arg in problem.inputs[node]:
                if arg in recompute and arg not in copy_time:
                    copy(arg)
            time_of[node] = clock
            clock += 1
    else:
        clock = n
    horizon = clock + 1
    start = [time_of[s] if s >= 0 else 0 for s in problem.start]
    end = [
        max((time_of[r] for r in readers), default=time_of[s]) if s >= 0 and not out else horizon
        for s, readers, out in zip(problem.start, problem.readers, _outputs(problem))
    ]
    sizes = list(problem.sizes)
    for storage in chosen_storages:  # the forward one dies at its last forward reader
        end[storage] = max((r for r in problem.readers[storage] if r < bs), default=problem.start[storage])
    for node, at in copy_time.items():
        for storage in makes.get(node, ()):  # the copy's results; read by the backward if chosen
            last = at
            if storage in chosen_storages:
                for r in problem.readers[storage]:
                    last = max(last, time_of[r] if r >= bs else copy_time.get(r, -1))
            start.append(at)
            end.append(last)
            sizes.append(problem.sizes[storage])
        for arg in problem.inputs[node]:  # a kept input lives until the copy reads it
            if arg not in recompute:
                for storage in problem.values[arg]:
                    end[storage] = max(end[storage], at)
    delta = [0] * (horizon + 2)
    for s, e, size in zip(start, end, sizes):
        delta[s] += size
        delta[min(e, horizon) + 1] -= size
    running, peak, peak_time = problem.constant_bytes, -1, 0
    for t in range(horizon + 1):
        running += delta[t]
        if running > peak:
            peak, peak_time = running, t
    cost = sum(problem.node_costs[node] for node in copy_time)
    return Simulation(max(peak, problem.floor_bytes), peak_time, cost)


def lower_bound(problem: RecomputeProblem, budget_bytes: int) -> float:
    """Seconds of recomputation every plan with peak <= ``budget_bytes`` needs (covering knapsack)."""
    base = simulate(problem, ())
    if base.peak_bytes <= budget_bytes:
        return 0.0
    if problem.floor_bytes > budget_bytes:
        return INFINITY
    # live bytes per time without recomputation, and each maker's candidate storages
    horizon = 2 * len(problem.inputs) + 2
    delta = [0] * (horizon + 1)
    for s, e, size in zip(problem.start, problem.end, problem.sizes):
        delta[2 * s + 1 if s >= 0 else 0] += size
        delta[2 * e + 2 if s >= 0 else horizon] -= size
    by_maker: dict[int, list[int]] = {}
    for c in problem.candidates:
        by_maker.setdefault(c.nodes[0], []).append(c.storage)
    # recomputing a storage frees it only after its last forward reader
    freeable_from = {
        c.storage: 2 * max((r for r in problem.readers[c.storage] if r < problem.backward_start),
                           default=problem.start[c.storage]) + 1
        for c in problem.candidates
    }
    best, running = 0.0, problem.constant_bytes
    for t in range(horizon):
        running += delta[t]
        excess = running - budget_bytes
        if excess <= 0:
            continue
        items = []
        for maker, storages in by_maker.items():
            freed = sum(problem.sizes[s] for s in storages if freeable_from[s] < t <= 2 * problem.end[s] + 1)
            if freed:
                items.append((problem.node_costs[maker] / freed, freed, problem.node_costs[maker]))
        items.sort()
        cost = 0.0
        for ratio, freed, item_cost in items:
            take = min(freed, excess)
            cost += ratio * take
            excess -= take
            if excess <= 0:
                break
        best = max(best, INFINITY if excess > 0 else cost)
    return best


def solve_blocks(
    problem: RecomputeProblem,
    options: Sequence[Sequence[Collection[int]]],
    budget_bytes: int,
    *,
    time_limit_s: float = 5.0,
) -> RecomputeSolution:
    """The cheapest plan found with peak <= ``budget_bytes``, choosing one option per block.

    ``options[j]`` lists block j's options as candidate index sets, each recomputing
    at least what the one before it does; option 0 is usually "keep everything".
    """
    started = time.perf_counter()
    levels = [0] * len(options)
    evaluated = 0

    def run(levels: Sequence[int]) -> tuple[Simulation, tuple[int, ...]]:
        nonlocal evaluated
        evaluated += 1
        chosen = tuple(sorted({i for j, level in enumerate(levels) for i in options[j][level]}))
        return simulate(problem, chosen), chosen

    # the chain: every block one level up, in forward order, then the next level
    chain = [tuple(levels)]
    depth = max((len(o) for o in options), default=1)
    for level in range(1, depth):
        for j, block in enumerate(options):
            if level < len(block):
                levels[j] = level
                chain.append(tuple(levels))
    sims = [run(point) for point in chain]
    fitting = [i for i, (sim, _) in enumerate(sims) if sim.peak_bytes <= budget_bytes]
    bound = lower_bound(problem, budget_bytes)
    if not fitting:
        i = min(range(len(sims)), key=lambda k: sims[k][0].peak_bytes)
        sim, chosen = sims[i]
        return RecomputeSolution("infeasible", chosen, chain[i], sim.peak_bytes, sim.cost_s, bound,
                                 time.perf_counter() - started, evaluated)
    best_index = min(fitting, key=lambda k: (sims[k][0].cost_s, k))
    best_levels = list(chain[best_index])
    best_sim, best_chosen = sims[best_index]
    # repair: undo upgrades that the budget does not need, the costliest first
    undo = sorted(
        (j for j, level in enumerate(best_levels) if level > 0),
        key=lambda j: -_option_cost(problem, options[j][best_levels[j]]),
    )
    for j in undo:
        while best_levels[j] > 0 and time.perf_counter() - started < time_limit_s:
            trial = list(best_levels)
            trial[j] -= 1
            sim, chosen = run(trial)
            if sim.peak_bytes > budget_bytes or sim.cost_s >= best_sim.cost_s:
                break
            best_levels, best_sim, best_chosen = trial, sim, chosen
    status = "optimal" if best_sim.cost_s <= bound * (1 + 1e-9) else "feasible"
    return RecomputeSolution(status, best_chosen, tuple(best_levels), best_sim.peak_bytes, best_sim.cost_s,
                             min(bound, best_sim.cost_s), time.perf_counter() - started, evaluated)


def _option_cost(problem: RecomputeProblem, option: Collection[int]) -> float:
    return sum(problem.node_costs[n] for i in option for n in problem.candidates[i].nodes)


def _users(inputs: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    users: list[list[int]] = [[] for _ in inputs]
    for node, args in enumerate(inputs):
        for arg in args:
            users[arg].append(node)
    return tuple(tuple(u) for u in users)


def _outputs(problem: RecomputeProblem) -> list[bool]:
    """Storages live to the end of the graph: outputs, and graph inputs."""
    last = len(problem.inputs) - 1
    return [s < 0 or e >= last for s, e in zip(problem.start, problem.end)]


def _makes(start: Sequence[int], n: int) -> dict[int, tuple[int, ...]]:
    makes: dict[int, list[int]] = {}
    for storage, node in enumerate(start):
        if node >= 0:
            makes.setdefault(node, []).append(storage)
    return {node: tuple(storages) for node, storages in makes.items()}
