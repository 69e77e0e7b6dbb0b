"""Keep, recompute or offload, as plain data: the remat problem plus what may go to host memory.

Starts from a keep/recompute plan (``recomputed``: the remat solver's choice)
and decides, for each item (a storage crossing from forward to backward that
may be copied to host memory), whether to offload it, and for each recomputed
item whether to offload or keep it instead. An offloaded storage leaves the
device after its last forward reader and comes back at a prefetch point: the
latest backward node whose compute up to the first backward use hides the
transfer (bytes / host bandwidth). The copy engine is one resource per
direction (transfers queue); host memory has a cap (one slot per offloaded
item, no reuse: the pool is what the step holds on the host).

A CP-SAT model over linearised effects chooses (memory at every segment
between window boundaries, recompute seconds saved, exposed stall with the
copy engine's windows); ``evaluate`` then replays the choice exactly (the
remat simulation, the offload windows cut out of its profile, the two copy
queues run against the compute clock). A choice over budget tightens the
model and solves again; with none in time the best plan that fits is
returned, never one over budget. No torch.
"""

from __future__ import annotations

import time
from typing import Any
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from memopt.solvers.remat_sim import RecomputeProblem, _replay, _Replay

PICOSECONDS = 1e12  # the CP-SAT model counts time in integer picoseconds


@dataclass(frozen=True, slots=True)
class OffloadItem:
    """A storage that may be offloaded: the node that holds it, its readers, and the bytes each way."""

    storage: int
    node: int  # the node whose result is the whole storage (the offload reads it)
    nbytes: int  # bytes moved each way (and device bytes freed)
    slot_bytes: int  # host bytes its pool slot takes (nbytes aligned)
    candidate: int = -1  # its index in the remat problem's candidates; -1: not recomputable


@dataclass(frozen=True)
class OffloadProblem:
    remat: RecomputeProblem
    recomputed: tuple[int, ...]  # remat candidates recomputed by the keep/recompute plan
    items: tuple[OffloadItem, ...]
    budget_bytes: int
    host_capacity_bytes: int
    host_bandwidth: float  # bytes/s, each direction

    def __post_init__(self) -> None:
        if self.host_bandwidth <= 0:
            raise ValueError("host_bandwidth must be positive (bytes/s)")
        if self.host_capacity_bytes < 0:
            raise ValueError("host_capacity_bytes must be >= 0")
        n = len(self.remat.inputs)
        for item in self.items:
            if not 0 <= item.node < self.remat.backward_start or item.storage not in self.remat.values[item.node]:
                raise ValueError(f"item {item} must be a forward node holding its storage")
            if item.node >= n or item.nbytes < 0 or item.slot_bytes < item.nbytes:
                raise ValueError(f"item {item}: bad sizes")


@dataclass(frozen=True, slots=True)
class Transfer:
    """One offloaded item as planned: where it leaves, where its reload starts, what it costs."""

    item: int  # index into problem.items
    after: int  # node position: the offload runs right after it (its last forward reader)
    prefetch: int  # node position: the reload runs right before it
    first_use: int  # node position of its first backward reader (or of the copy that reads it first)
    transfer_s: float  # seconds one way
    hidden_s: float  # compute between the prefetch and the first use
    stall_s: float  # exposed wait at the first use, copy queues included


@dataclass(frozen=True)
class OffloadSolution:
    status: str  # "optimal" | "feasible" | "infeasible"
    recomputed: tuple[int, ...]  # remat candidates still recomputed
    transfers: tuple[Transfer, ...]
    kept_instead: tuple[int, ...]  # items the keep/recompute plan recomputed that are now kept
    peak_bytes: int
    recompute_s: float
    stall_s: float
    host_bytes: int  # the host pool: slots of every offloaded item
    objective: float  # recompute_s + stall_s
    lower_bound: float  # CP-SAT's bound on its (linearised) model
    seconds: float
    rounds: int


@dataclass(frozen=True, slots=True)
class _Windows:
    """Per item, on the event clock of a replay."""

    after: int  # forward node position
    prefetch: int  # node position
    first_use: int  # event time
    cut_from: int  # first event time with the device copy gone
    cut_to: int  # first event time with the reload present
    recompute_at: int  # event time of the remat copy of its node (-1: not recomputed)
    transfer_s: float
    hidden_s: float


def evaluate(problem: OffloadProblem, recomputed: Collection[int],
             offloaded: Sequence[int] | Mapping[int, int | None]) -> OffloadSolution:
    """The exact peak, recompute seconds and stall of a choice.

    ``offloaded``: item indices (each reloaded at the prefetch that hides its transfer), or item
    index -> prefetch node (None: that default).
    """
    replay = _replay(problem.remat, sorted(recomputed))
    clock = _clock(problem.remat, replay)
    prefetch = offloaded if isinstance(offloaded, Mapping) else dict.fromkeys(offloaded)
    windows = {i: _windows(problem, i, replay, clock, at) for i, at in prefetch.items()}
    profile = replay.profile.copy()
    for i, w in windows.items():
        profile[w.cut_from:w.cut_to] -= problem.items[i].nbytes
    peak = max(int(profile.max()), problem.remat.floor_bytes)
    stalls = _stalls(problem, windows, replay, clock)
    transfers = tuple(
        Transfer(i, w.after, w.prefetch, _node_at(problem, replay, w.first_use), w.transfer_s, w.hidden_s, stalls[i])
        for i, w in sorted(windows.items(), key=lambda kv: kv[1].cut_to)
    )
    stall = sum(stalls.values())
    status = "feasible" if peak <= problem.budget_bytes else "infeasible"
    host = sum(problem.items[i].slot_bytes for i in offloaded)
    return OffloadSolution(status, tuple(sorted(recomputed)), transfers, (), peak, replay.cost_s, stall, host,
                           replay.cost_s + stall, 0.0, 0.0, 0)


def solve_offload(problem: OffloadProblem, *, time_limit_s: float = 5.0, seed: int = 0,
                  max_rounds: int = 4) -> OffloadSolution:
    """Choose offloads (and recomputes) under the budget at every step; never returns a plan over it.

    Returns the keep/recompute plan itself when it fits and nothing beats it, and status
    "infeasible" with the lowest peak seen when no choice fits.
    """
    started = time.perf_counter()
    base = evaluate(problem, problem.recomputed, ())
    best = base if base.status == "feasible" else None
    closest, rounds, bound, tighten = base, 0, 0.0, 0
    model = _Model(problem)
    while rounds < max_rounds:
        rounds += 1
        left = time_limit_s - (time.perf_counter() - started)
        if left <= 0.05:
            break
        choice = model.solve(problem.budget_bytes - tighten, left, seed)
        if choice is None:
            break
        offloaded, recomputed_items, model_bound = choice  # offloaded: item -> prefetch node
        recomputed = sorted({*model.others, *(problem.items[i].candidate for i in recomputed_items)})
        tried = evaluate(problem, recomputed, offloaded)
        was = {problem.items[i].candidate for i in range(len(problem.items))} & set(problem.recomputed)
        kept = tuple(i for i, item in enumerate(problem.items)
                     if item.candidate in was and item.candidate not in recomputed and i not in offloaded)
        tried = _with(tried, kept_instead=kept)
        if tried.peak_bytes < closest.peak_bytes:
            closest = tried
        if tried.status == "feasible":
            bound = model_bound if tighten == 0 else 0.0  # a tightened model bounds nothing
            if best is None or tried.objective < best.objective - 1e-15:
                best = tried
            break
        tighten += tried.peak_bytes - problem.budget_bytes
    seconds = time.perf_counter() - started
    if best is None:
        return _with(closest, status="infeasible", seconds=seconds, rounds=rounds)
    status = "optimal" if bound >= best.objective - 1e-12 else "feasible"
    return _with(best, status=status, lower_bound=min(bound, best.objective), seconds=seconds, rounds=rounds)


def _with(solution: OffloadSolution, **changes: object) -> OffloadSolution:
    import dataclasses

    return dataclasses.replace(solution, **changes)  # type: ignore[arg-type]


class _Model:
    """The linearised problem: each item's effect on memory per node, measured one item at a time.

    The base is the keep/recompute plan with every item kept (``others``: its recomputed
    candidates that are no item). Recomputing item i changes the memory at node n by what the
    simulation with i recomputed on top of the base says; offloading it removes its bytes from
    after its last forward reader to its prefetch node. Effects add up only approximately (two
    recomputations may share inputs): ``evaluate`` is the judge.
    """

    def __init__(self, problem: OffloadProblem) -> None:
        remat = problem.remat
        self.problem = problem
        item_candidates = {item.candidate for item in problem.items if item.candidate >= 0}
        self.others = tuple(c for c in problem.recomputed if c not in item_candidates)
        self.replay = replay = _replay(remat, self.others)
        self.clock = _clock(remat, replay)
        self.base = _per_node(replay)
        self.base_cost = replay.cost_s
        self.recompute: dict[int, tuple[np.ndarray, float]] = {}  # item -> (memory change per node, seconds)
        for i, item in enumerate(problem.items):
            if item.candidate >= 0:
                other = _replay(remat, sorted({*self.others, item.candidate}))
                self.recompute[i] = (_per_node(other) - self.base, other.cost_s - replay.cost_s)
        self.windows = {i: _windows(problem, i, replay, self.clock) for i in range(len(problem.items))}
        # per item, prefetch options: the one that hides the transfer, then later ones that hold less memory
        self.options: dict[int, list[_Windows]] = {}
        for i, w in self.windows.items():
            last = _node_at(problem, replay, w.first_use)
            nodes = sorted({w.prefetch, (w.prefetch + last) // 2, last})
            self.options[i] = [w] + [_windows(problem, i, replay, self.clock, p) for p in nodes if p > w.prefetch]

    def solve(self, budget: int, time_limit_s: float,
              seed: int) -> tuple[dict[int, int], list[int], float] | None:
        """Offloaded items (item -> prefetch node), items recomputed, and a bound on the model's objective."""
        problem, base = self.problem, self.base
        n = len(base)
        model = cp_model.CpModel()
        offload, recompute, option = {}, {}, {}
        for i, item in enumerate(problem.items):
            if item.slot_bytes <= problem.host_capacity_bytes:
                for k, w in enumerate(self.options[i]):
                    if w.cut_to > w.cut_from:
                        option[i, k] = model.new_bool_var(f"offload{i}_{k}")
                if any(key[0] == i for key in option):
                    offload[i] = sum(v for key, v in option.items() if key[0] == i)
                    model.add(offload[i] <= 1)
            if i in self.recompute:
                recompute[i] = model.new_bool_var(f"recompute{i}")
                if i in offload:
                    model.add(offload[i] + recompute[i] <= 1)
                if item.candidate in problem.recomputed:
                    model.add_hint(recompute[i], 1)
        if not offload and not recompute:
            return None
        # memory at every node: runs of nodes with the same terms share one constraint (their worst node)
        columns: list[tuple[np.ndarray, cp_model.IntVar]] = []
        for i, var in recompute.items():
            columns.append((self.recompute[i][0].astype(np.int64), var))
        for (i, k), var in option.items():
            w = self.options[i][k]
            change = np.zeros(n, dtype=np.int64)
            change[w.after + 1:w.prefetch] = -problem.items[i].nbytes
            columns.append((change, var))
        matrix = np.stack([c for c, _ in columns]) if columns else np.zeros((0, n), dtype=np.int64)
        start = 0
        for node in range(1, n + 1):
            if node < n and np.array_equal(matrix[:, node], matrix[:, start]):
                continue
            worst = int(base[start:node].max())
            coefficients = matrix[:, start]
            if worst + int(coefficients[coefficients > 0].sum()) > budget:
                terms = [(int(c), columns[k][1]) for k, c in enumerate(coefficients) if c]
                model.add(sum(c * v for c, v in terms) <= budget - worst)
            start = node
        if offload:  # host memory: one slot per offloaded item
            model.add(sum(problem.items[i].slot_bytes * v for i, v in offload.items())
                      <= problem.host_capacity_bytes)
        stall = self._stall_terms(model, offload, option)
        cost = {i: int(round(self.recompute[i][1] * PICOSECONDS)) for i in recompute}
        model.minimize(sum(cost[i] * v for i, v in recompute.items()) + stall + sum(option.values()))
        solver = cp_model.CpSolver()
        solver.parameters.random_seed = seed
        solver.parameters.num_workers = 1
        solver.parameters.max_time_in_seconds = max(0.05, time_limit_s)
        status = solver.solve(model)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return None
        chosen = {i: self.options[i][k].prefetch for (i, k), v in option.items() if solver.value(v)}
        again = [i for i, v in recompute.items() if solver.value(v)]
        return chosen, again, max(0.0, self.base_cost + solver.best_objective_bound / PICOSECONDS)

    def _stall_terms(self, model: cp_model.CpModel, offload: dict[int, Any],
                     option: dict[tuple[int, int], cp_model.IntVar]) -> cp_model.LinearExpr:
        """Exposed seconds: what a window cannot hide, and the copy queue's windows in each direction."""
        windows, clock = self.windows, self.clock
        stall = {}
        for i in offload:
            w = windows[i]
            stall[i] = model.new_int_var(0, int(round(w.transfer_s * 2 * PICOSECONDS)) + 1, f"stall{i}")
            exposed = [(int(round(max(0.0, o.transfer_s - o.hidden_s) * PICOSECONDS)), option[i, k])
                       for k, o in enumerate(self.options[i]) if (i, k) in option]
            model.add(stall[i] >= sum(e * v for e, v in exposed))
        times = {i: (float(clock[windows[i].cut_to]), float(clock[windows[i].first_use])) for i in offload}
        ordered = sorted(offload, key=lambda i: times[i])
        ps = {i: int(round(windows[i].transfer_s * PICOSECONDS)) for i in offload}
        for x in ordered:  # host-to-device: reloads whose windows lie inside [prefetch of x, first use of y]
            for y in ordered:
                begin, end = times[x][0], times[y][1]
                inside = [k for k in ordered if times[k][0] >= begin and times[k][1] <= end]
                if end > begin and len(inside) >= 2:
                    model.add(sum(ps[k] * offload[k] for k in inside)
                              <= int(round((end - begin) * PICOSECONDS)) + sum(stall[k] for k in inside))
        d2h = model.new_int_var(0, 2 * sum(ps.values()) + 1, "d2h_stall") if offload else 0
        first_reload = min((times[i][0] for i in offload), default=0.0)
        for x in offload:  # device-to-host: what leaves after x must land before the first reload
            later = [k for k in offload if windows[k].after >= windows[x].after]
            room = int(round(max(0.0, first_reload - float(clock[windows[x].cut_from])) * PICOSECONDS))
            model.add(d2h >= sum(ps[k] * offload[k] for k in later) - room)
        return sum(stall.values()) + d2h


def _per_node(replay: _Replay) -> np.ndarray:
    """Peak bytes per original node: the worst event among the node and the remat copies made right before it."""
    times = np.asarray(replay.time_of, dtype=np.int64)
    starts = np.concatenate([[0], times[:-1] + 1])
    return np.maximum.reduceat(replay.profile[:times[-1] + 1], starts) if len(times) else np.zeros(0, np.int64)


def _clock(problem: RecomputeProblem, replay: _Replay) -> np.ndarray:
    """Compute seconds before each event time (the events of ``replay``: nodes and remat copies)."""
    horizon = len(replay.profile)
    cost = np.zeros(horizon + 1)
    for node, at in enumerate(replay.time_of):
        cost[at] += problem.node_costs[node]
    for node, at in replay.copy_time.items():
        cost[at] += problem.node_costs[node]
    return np.concatenate([[0.0], np.cumsum(cost)])


def _time(replay: _Replay, node: int) -> int:
    return replay.time_of[node]


def _windows(problem: OffloadProblem, i: int, replay: _Replay, clock: np.ndarray,
             at: int | None = None) -> _Windows:
    """Where item ``i`` would leave, come back and be needed, on ``replay``'s event clock."""
    remat = problem.remat
    item = problem.items[i]
    bs = remat.backward_start
    readers = remat.readers[item.storage]
    after = max((r for r in readers if r < bs), default=item.node)
    horizon = len(replay.profile)
    # its first backward reader, or the first remat copy that reads it
    uses = [replay.time_of[r] for r in readers if r >= bs]
    node_values = set(_nodes_of(remat, item.storage))
    uses += [at for node, at in replay.copy_time.items()
             if any(a in node_values for a in remat.inputs[node])]
    recompute_at = min((at for node, at in replay.copy_time.items() if node in node_values), default=-1)
    if recompute_at >= 0:
        uses.append(recompute_at)
    first_use = min(uses, default=horizon)
    transfer = item.nbytes / problem.host_bandwidth
    # the prefetch: the latest backward node (after the seed) whose compute up to the first use hides the transfer
    prefetch = bs + 1 if bs + 1 < len(remat.inputs) else bs
    for node in range(bs + 1, len(remat.inputs)):
        when = replay.time_of[node]
        if when > first_use:
            break
        if clock[first_use] - clock[when] >= transfer:
            prefetch = node
    if at is not None:  # a later prefetch, chosen: less memory held, more of the transfer exposed
        prefetch = at
    cut_to = min(replay.time_of[prefetch], first_use) if first_use < horizon else horizon
    cut_from = replay.time_of[after] + 1
    hidden = float(clock[min(first_use, horizon)] - clock[cut_to])
    return _Windows(after, prefetch, first_use, cut_from, max(cut_from, cut_to), recompute_at, transfer, hidden)


def _nodes_of(problem: RecomputeProblem, storage: int) -> list[int]:
    return [node for node, values in enumerate(problem.values) if storage in values]


def _node_at(problem: OffloadProblem, replay: _Replay, time_: int) -> int:
    """The original node running at event time ``time_``, or the first one after it (a copy's)."""
    for node in range(problem.remat.backward_start, len(replay.time_of)):
        if replay.time_of[node] >= time_:
            return node
    return len(replay.time_of) - 1


def _stalls(problem: OffloadProblem, windows: dict[int, _Windows], replay: _Replay,
            clock: np.ndarray) -> dict[int, float]:
    """Exposed seconds per offloaded item: both copy queues run in issue order against the compute clock.

    Events in time order: an offload queues on the device-to-host engine after its last forward
    reader; a reload queues on the host-to-device engine at its prefetch (not before its offload
    has landed); at a first use the compute waits for the reload, and every later event shifts by
    the wait.
    """
    d2h_free, landed = 0.0, {}
    for i in sorted(windows, key=lambda k: (windows[k].cut_from, k)):  # the forward never waits
        start = max(float(clock[windows[i].cut_from]), d2h_free)
        d2h_free = landed[i] = start + windows[i].transfer_s
    events = sorted([(w.cut_to, 0, i) for i, w in windows.items()] + [(w.first_use, 1, i) for i, w in windows.items()])
    shift, h2d_free = 0.0, 0.0
    done: dict[int, float] = {}
    stalls: dict[int, float] = {}
    for at, kind, i in events:
        now = float(clock[at]) + shift
        if kind == 0:
            start = max(now, h2d_free, landed[i])
            h2d_free = done[i] = start + windows[i].transfer_s
        else:
            stalls[i] = max(0.0, done[i] - now)
            shift += stalls[i]
    return stalls
