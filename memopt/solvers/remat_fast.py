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
    replay = _replay(problem, chosen)
    return Simulation(replay.peak_bytes, replay.peak_time, replay.cost_s)


@dataclass(frozen=True, slots=True)
class _Replay:
    """A simulation with its timeline: bytes live at every event, and when each original node runs."""

    peak_bytes: int
    peak_time: int
    cost_s: float
    profile: list[int]  # per event time
    time_of: list[int]  # per original node: its event time
    copy_time: dict[int, int]  # per copied node: the event time of its copy


def _replay(problem: RecomputeProblem, chosen: Collection[int]) -> _Replay:
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
    profile = [0] * (horizon + 1)
    for t in range(horizon + 1):
        running += delta[t]
        profile[t] = running
        if running > peak:
            peak, peak_time = running, t
    cost = sum(problem.node_costs[node] for node in copy_time)
    return _Replay(max(peak, problem.floor_bytes), peak_time, cost, profile, time_of, copy_time)


@dataclass(frozen=True)
class Spans:
    """Per candidate, where its storage lives kept and recomputed, in original node positions.

    What bounds need: recomputed, the storage lives to ``forward_end``, and its
    copy at least from ``copy_start`` to ``copy_end`` (empty when start > end);
    the copy certainly runs the ``copied`` nodes. ``extensions``: inputs of
    those copies that live on past their own end when nothing recomputes them:
    (storage, first, last position it is then live at least, candidates that
    must all be kept for that).
    """

    kept_end: tuple[int, ...]  # last position the storage lives when kept (n: to the end of the graph)
    forward_end: tuple[int, ...]
    copy_start: tuple[int, ...]
    copy_end: tuple[int, ...]
    copied: tuple[frozenset[int], ...]
    extensions: tuple[tuple[tuple[int, int, int, tuple[int, ...]], ...], ...]
    kept_profile: tuple[int, ...]  # bytes live at each node with nothing recomputed


def spans(problem: RecomputeProblem) -> Spans:
    """The candidates' life spans (computed once per problem)."""
    cached = problem.__dict__.get("_spans")
    if cached is not None:
        return cached
    bs, n = problem.backward_start, len(problem.inputs)
    users: tuple[tuple[int, ...], ...] = problem.users  # type: ignore[attr-defined]
    outputs = _outputs(problem)
    kept_end = [n if out else max(readers, default=first)
                for out, readers, first in zip(outputs, problem.readers, problem.start)]
    # the first backward node reading each forward node or one of its forward descendants: no copy of
    # the node is made before it
    first_need = [n] * n
    for node in range(bs - 1, -1, -1):
        first_need[node] = min((u if u >= bs else first_need[u] for u in users[node]), default=n)
    holders: dict[int, list[int]] = {}
    for i, c in enumerate(problem.candidates):
        for node in c.nodes:
            holders.setdefault(node, []).append(i)
    forward_end, copy_start, copy_end, copied, extensions = [], [], [], [], []
    for c in problem.candidates:
        s, own = c.storage, set(c.nodes)
        forward_end.append(max((r for r in problem.readers[s] if r < bs), default=problem.start[s]))
        read = {node for node in c.nodes if any(u >= bs for u in users[node])}
        closure, stack = set(), list(read)
        while stack:
            node = stack.pop()
            if node not in closure:
                closure.add(node)
                stack.extend(a for a in problem.inputs[node] if a in own)
        direct = [r for r in problem.readers[s] if r >= bs and own.intersection(problem.inputs[r])]
        made = c.nodes[0] in closure  # else (no backward reader of its nodes) no copy is made
        copy_start.append(min(direct, default=n + 1) if made else n + 1)
        copy_end.append(max((r for r in problem.readers[s] if r >= bs), default=-1) if made else -1)
        copied.append(frozenset(closure))
        items = []
        for node in closure:
            for arg in problem.inputs[node]:
                if arg in own or arg >= bs:
                    continue
                needs = tuple(holders.get(arg, ()))
                for t in problem.values[arg]:
                    owner = [d for d in needs if problem.candidates[d].storage == t]
                    if outputs[t] or (t in _candidate_storages(problem) and not owner):
                        continue
                    first, last = kept_end[t] + 1, first_need[node] - 1
                    if first <= last:
                        items.append((t, first, last, needs))
        extensions.append(tuple(items))
    replay = _replay(problem, ())
    result = Spans(
        tuple(kept_end[c.storage] for c in problem.candidates), tuple(forward_end), tuple(copy_start),
        tuple(copy_end), tuple(copied), tuple(extensions), tuple(replay.profile[:n]),
    )
    object.__setattr__(problem, "_spans", result)
    return result


def lower_bound(problem: RecomputeProblem, budget_bytes: int, *, allowed: Collection[int] | None = None) -> float:
    """Seconds of recomputation every plan with peak <= ``budget_bytes`` needs (covering knapsack).

    At every node over budget with nothing recomputed, the excess must be freed
    by candidates that free bytes there: recomputed, a storage is gone from
    after its last forward reader to its kept end, except while its copy lives
    (at least from its first to its last backward reader). Each candidate costs
    at least its certainly copied nodes, a node shared by several candidates
    split among them; the cheapest bytes per second are taken first, fractionally.
    Only ``allowed`` candidates (all by default) may be recomputed.
    """
    if problem.floor_bytes > budget_bytes:
        return INFINITY
    sp = spans(problem)
    n = len(problem.inputs)
    if max(sp.kept_profile, default=problem.constant_bytes) <= budget_bytes:
        return 0.0
    pool = range(len(problem.candidates)) if allowed is None else sorted(set(allowed))
    share: dict[int, int] = {}
    for i in pool:
        for node in sp.copied[i]:
            share[node] = share.get(node, 0) + 1
    items = []  # (seconds per byte, candidate)
    for i in pool:
        size = problem.sizes[problem.candidates[i].storage]
        if size > 0:
            items.append((sum(problem.node_costs[v] / share[v] for v in sp.copied[i]) / size, i))
    items.sort()
    rank = {i: k + 1 for k, (_, i) in enumerate(items)}
    enter: list[list[int]] = [[] for _ in range(n + 1)]
    leave: list[list[int]] = [[] for _ in range(n + 1)]
    for _, i in items:
        last = min(sp.kept_end[i], n - 1)
        for first, end in ((sp.forward_end[i] + 1, min(last, sp.copy_start[i] - 1)),
                           (max(sp.forward_end[i] + 1, sp.copy_end[i] + 1), last)):
            if first <= end:
                enter[first].append(i)
                leave[end + 1].append(i)
    sizes, seconds = _Fenwick(len(items)), _Fenwick(len(items))
    ratios = [0.0] + [r for r, _ in items]
    best = 0.0
    for x in range(n):
        for i in leave[x]:
            size = problem.sizes[problem.candidates[i].storage]
            sizes.add(rank[i], -size)
            seconds.add(rank[i], -size * ratios[rank[i]])
        for i in enter[x]:
            size = problem.sizes[problem.candidates[i].storage]
            sizes.add(rank[i], size)
            seconds.add(rank[i], size * ratios[rank[i]])
        excess = sp.kept_profile[x] - budget_bytes
        if excess <= 0:
            continue
        below = sizes.last_below(excess)  # the longest prefix of items (cheapest first) freeing less
        if below >= len(items):
            return INFINITY
        freed = sizes.prefix(below)
        best = max(best, seconds.prefix(below) + (excess - freed) * ratios[below + 1])
    return best


class _Fenwick:
    """Prefix sums over positions 1..n, and the longest prefix whose sum stays below a value."""

    def __init__(self, n: int) -> None:
        self.n, self.tree = n, [0] * (n + 1)

    def add(self, k: int, value: float) -> None:
        while k <= self.n:
            self.tree[k] += value
            k += k & -k

    def prefix(self, k: int) -> float:
        total = 0
        while k > 0:
            total += self.tree[k]
            k -= k & -k
        return total

    def last_below(self, value: int) -> int:
        k, total, step = 0, 0, 1 << self.n.bit_length()
        while step:
            if k + step <= self.n and total + self.tree[k + step] < value:
                k += step
                total += self.tree[k]
            step >>= 1
        return k


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


def _candidate_storages(problem: RecomputeProblem) -> frozenset[int]:
    cached = problem.__dict__.get("_candidate_storage_set")
    if cached is None:
        cached = frozenset(c.storage for c in problem.candidates)
        object.__setattr__(problem, "_candidate_storage_set", cached)
    return cached


def _makes(start: Sequence[int], n: int) -> dict[int, tuple[int, ...]]:
    makes: dict[int, list[int]] = {}
    for storage, node in enumerate(start):
        if node >= 0:
            makes.setdefault(node, []).append(storage)
    return {node: tuple(storages) for node, storages in makes.items()}
