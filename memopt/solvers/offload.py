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

Two searches. The joint one: a CP-SAT model over linearised effects chooses
offloads and recomputes together (memory at every node, recompute seconds
saved, exposed stall with the copy engine's windows); ``evaluate`` then replays
the choice exactly (the remat simulation, the offload windows cut out of its
profile, the two copy queues run against the compute clock). Recomputations
do not add up exactly (two may share inputs), so a joint choice can land over
budget. The exact one: with the recompute set held (the joint choice's, then
the keep/recompute plan's), memory is linear in the offloads, event by event:
a greedy pass adds the offload that covers the peak at the least exposed stall
per byte until the profile fits (then drops what is no longer needed), and
CP-SAT, warm-started from it, lowers the stall. The best plan that fits is
returned, never one over budget; with none, the lowest peak found (the greedy
stops only where no offload covers the peak: a floor for that recompute set).
No torch.
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
    peak_node: int = -1  # node position at the peak (a remat copy's: the node it is made before)


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
    at = int(np.argmax(profile)) if len(profile) else 0
    peak_node = next((n for n, when in enumerate(replay.time_of) if when >= at), len(replay.time_of) - 1)
    stalls = _stalls(problem, windows, replay, clock)
    transfers = tuple(
        Transfer(i, w.after, w.prefetch, _node_at(problem, replay, w.first_use), w.transfer_s, w.hidden_s, stalls[i])
        for i, w in sorted(windows.items(), key=lambda kv: kv[1].cut_to)
    )
    stall = sum(stalls.values())
    status = "feasible" if peak <= problem.budget_bytes else "infeasible"
    host = sum(problem.items[i].slot_bytes for i in offloaded)
    return OffloadSolution(status, tuple(sorted(recomputed)), transfers, (), peak, replay.cost_s, stall, host,
                           replay.cost_s + stall, 0.0, 0.0, 0, peak_node)


def solve_offload(problem: OffloadProblem, *, time_limit_s: float = 5.0, seed: int = 0) -> OffloadSolution:
    """Choose offloads (and recomputes) under the budget at every step; never returns a plan over it.

    Returns the keep/recompute plan itself when it fits and nothing beats it, and status
    "infeasible" with the lowest peak seen (``peak_node``: where) when no choice fits.
    """
    started = time.perf_counter()

    def left() -> float:
        return time_limit_s - (time.perf_counter() - started)

    base = evaluate(problem, problem.recomputed, ())
    found = _Found(problem, base)
    rounds, bound, joint_best = 0, 0.0, None
    starts: list[tuple[list[int], dict[int, int]]] = []  # (recompute set, offloads to start from)
    joint = _Model(problem)
    choice = joint.solve(problem.budget_bytes, left() * 0.4, seed) if left() > 0.05 else None
    if choice is not None:
        rounds += 1
        offloaded, again, model_bound = choice  # offloaded: item -> prefetch node
        recomputed = sorted({*joint.others, *(problem.items[i].candidate for i in again)})
        if found.add(evaluate(problem, recomputed, offloaded)):
            bound, joint_best = model_bound, found.best
        starts.append((recomputed, offloaded))
    starts.append((sorted(problem.recomputed), {}))
    peak, recomputed, offloaded = base.peak_bytes, sorted(problem.recomputed), {}
    for recomputed, offloaded in starts:
        if found.best is not None:
            break  # the keep/recompute plan or the joint choice fits
        peak, recomputed, offloaded = _exact(problem, recomputed, offloaded, found)
    # still over: an item the held set recomputes is offloaded instead when that lowers the peak the greedy
    # reaches (a layer recomputed at once in the backward can be the peak no offload covers)
    while found.best is None and left() > 0.2:
        swapped = None
        for i, item in enumerate(problem.items):
            if item.candidate not in recomputed or left() <= 0.2:
                continue
            fewer = [c for c in recomputed if c != item.candidate]
            exact = _Model(problem, fixed=fewer)
            reached = _greedy(exact, problem.budget_bytes, exact.start_from(offloaded))[2]
            if reached < peak and (swapped is None or reached < swapped[0]):
                swapped = (reached, fewer)
        if swapped is None:
            break
        peak, recomputed, offloaded = _exact(problem, swapped[1], offloaded, found)
    if found.best not in (None, base, joint_best) and left() > 0.1:  # lower the stall of the fit
        recomputed = list(found.best.recomputed)
        exact = _Model(problem, fixed=recomputed)
        hint = exact.start_from({t.item: t.prefetch for t in found.best.transfers})
        choice = exact.solve(problem.budget_bytes, left() * 0.8, seed, hint=hint)
        if choice is not None:
            rounds += 1
            found.add(evaluate(problem, recomputed, choice[0]))
    seconds = time.perf_counter() - started
    if found.best is None:
        return _with(found.closest, status="infeasible", seconds=seconds, rounds=rounds)
    best = found.best
    if best is not joint_best:
        bound = 0.0  # the joint model's bound is on its own choice's objective
    status = "optimal" if bound >= best.objective - 1e-12 else "feasible"
    return _with(best, status=status, lower_bound=min(bound, best.objective), seconds=seconds, rounds=rounds)


def _exact(problem: OffloadProblem, recomputed: list[int], offloaded: Mapping[int, int],
           found: _Found) -> tuple[int, list[int], dict[int, int]]:
    """The greedy's offloads with ``recomputed`` held, judged into ``found``: the peak reached, the set, offloads."""
    exact = _Model(problem, fixed=recomputed)
    chosen, _, peak = _greedy(exact, problem.budget_bytes, exact.start_from(offloaded))
    prefetches = exact.prefetches(chosen)
    found.add(evaluate(problem, recomputed, prefetches))
    return peak, recomputed, prefetches


class _Found:
    """The best choice that fits, and the one with the lowest peak, over every choice judged."""

    def __init__(self, problem: OffloadProblem, base: OffloadSolution) -> None:
        self.problem = problem
        self.best = base if base.status == "feasible" else None
        self.closest = base

    def add(self, tried: OffloadSolution) -> bool:
        """Keep ``tried`` if it beats what is held; True when it is the new best that fits."""
        items, was = self.problem.items, set(self.problem.recomputed)
        offloaded = {t.item for t in tried.transfers}
        kept = tuple(i for i, item in enumerate(items) if item.candidate in was
                     and item.candidate not in tried.recomputed and i not in offloaded)
        tried = _with(tried, kept_instead=kept)
        if tried.peak_bytes < self.closest.peak_bytes:
            self.closest = tried
        if tried.status == "feasible" and (self.best is None or tried.objective < self.best.objective - 1e-15):
            self.best = tried
            return True
        return False


def _with(solution: OffloadSolution, **changes: object) -> OffloadSolution:
    import dataclasses

    return dataclasses.replace(solution, **changes)  # type: ignore[arg-type]


class _Model:
    """The problem as CP-SAT sees it: each item's effect on memory, measured one item at a time.

    Joint (``fixed`` None): the base is the keep/recompute plan with every item kept (``others``:
    its recomputed candidates that are no item); recomputing item i changes the memory at node n
    by what the simulation with i recomputed on top of the base says; offloading it removes its
    bytes from after its last forward reader to its prefetch node. Effects add up only
    approximately (two recomputations may share inputs): ``evaluate`` is the judge.

    Exact (``fixed``: the recompute set, held): only offloads are chosen, items recomputed there
    are not offered, and memory is the replay's profile less each offload's window, event by
    event, which is what ``evaluate`` computes.
    """

    def __init__(self, problem: OffloadProblem, fixed: Collection[int] | None = None) -> None:
        remat = problem.remat
        self.problem = problem
        self.exact = fixed is not None
        item_candidates = {item.candidate for item in problem.items if item.candidate >= 0}
        if fixed is None:
            self.others = tuple(c for c in problem.recomputed if c not in item_candidates)
        else:
            self.others = tuple(sorted(fixed))
        self.replay = replay = _replay(remat, self.others)
        self.clock = _clock(remat, replay)
        self.base = replay.profile.astype(np.int64) if self.exact else _per_node(replay)
        self.base_cost = replay.cost_s
        self.recompute: dict[int, tuple[np.ndarray, float]] = {}  # item -> (memory change per node, seconds)
        if not self.exact:
            for i, item in enumerate(problem.items):
                if item.candidate >= 0:
                    other = _replay(remat, sorted({*self.others, item.candidate}))
                    self.recompute[i] = (_per_node(other) - self.base, other.cost_s - replay.cost_s)
        held = set(self.others) if self.exact else set()
        self.windows = {i: _windows(problem, i, replay, self.clock) for i, item in enumerate(problem.items)
                        if item.candidate not in held or item.candidate < 0}
        # per item, prefetch options: the one that hides the transfer, then later ones that hold less memory
        self.options: dict[int, list[_Windows]] = {}
        for i, w in self.windows.items():
            if problem.items[i].slot_bytes > problem.host_capacity_bytes:
                continue
            last = _node_at(problem, replay, w.first_use)
            nodes = sorted({w.prefetch, (w.prefetch + last) // 2, last})
            options = [w] + [_windows(problem, i, replay, self.clock, p) for p in nodes if p > w.prefetch]
            options = [o for o in options if self.span(o)[1] > self.span(o)[0]]
            if options:
                self.options[i] = options

    def span(self, w: _Windows) -> tuple[int, int]:
        """The positions (events when exact, else nodes) an offload with windows ``w`` frees."""
        return (w.cut_from, w.cut_to) if self.exact else (w.after + 1, w.prefetch)

    def prefetches(self, chosen: Mapping[int, int]) -> dict[int, int]:
        """Item -> option index, as item -> prefetch node."""
        return {i: self.options[i][k].prefetch for i, k in chosen.items()}

    def start_from(self, offloaded: Mapping[int, int]) -> dict[int, int]:
        """Item -> prefetch node (another recompute set's choice), as this model's options."""
        chosen = {}
        for i, prefetch in offloaded.items():
            if i in self.options:
                options = self.options[i]
                chosen[i] = next((k for k, o in enumerate(options) if o.prefetch >= prefetch), len(options) - 1)
        return chosen

    def solve(self, budget: int, time_limit_s: float, seed: int,
              hint: Mapping[int, int] | None = None) -> tuple[dict[int, int], list[int], float] | None:
        """Offloaded items (item -> prefetch node), items recomputed, and a bound on the model's objective.

        ``hint``: item -> option index, a choice to start from.
        """
        problem, base = self.problem, self.base
        n = len(base)
        model = cp_model.CpModel()
        offload, recompute, option = {}, {}, {}
        for i, item in enumerate(problem.items):
            for k, w in enumerate(self.options.get(i, ())):
                option[i, k] = model.new_bool_var(f"offload{i}_{k}")
                if hint is not None:
                    model.add_hint(option[i, k], hint.get(i) == k)
            if i in self.options:
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
            lo, hi = self.span(self.options[i][k])
            change = np.zeros(n, dtype=np.int64)
            change[lo:hi] = -problem.items[i].nbytes
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


def _greedy(model: _Model, budget: int, start: Mapping[int, int]) -> tuple[dict[int, int], bool, int]:
    """Offloads (item -> option index) that bring an exact model's profile under ``budget``, whether they do,
    and the peak they reach.

    From ``start``, while the profile is over budget: at its peak, the option covering it with the
    least added exposed stall per byte (the largest first among those that hide their transfer)
    is taken, a new offload or a later prefetch of one taken; then offloads no longer needed are
    dropped, the most exposed first. Stops, not fitting, when at some peak no option is left that
    covers it: that peak is a floor for this recompute set.
    """
    problem, items = model.problem, model.problem.items
    if not model.exact:
        return {}, False, max(int(model.base.max(initial=0)), problem.remat.floor_bytes)
    floor, wanted = problem.remat.floor_bytes, budget  # the floor: the optimizer step, which no offload lowers
    budget = max(budget, floor)
    level = model.base.copy()
    chosen: dict[int, int] = {}
    host = 0

    def exposed(i: int, k: int) -> float:
        o = model.options[i][k]
        return max(0.0, o.transfer_s - o.hidden_s)

    def take(i: int, k: int, sign: int) -> None:
        lo, hi = model.span(model.options[i][k])
        level[lo:hi] -= sign * items[i].nbytes

    for i, k in start.items():
        if host + items[i].slot_bytes <= problem.host_capacity_bytes:
            chosen[i], host = k, host + items[i].slot_bytes
            take(i, k, 1)
    while len(level):
        t = int(np.argmax(level))
        if level[t] <= budget:
            break
        best: tuple[tuple[float, int], int, int] | None = None
        for i, options in model.options.items():
            was = chosen.get(i)
            if was is None and host + items[i].slot_bytes > problem.host_capacity_bytes:
                continue
            if was is not None and model.span(options[was])[0] <= t < model.span(options[was])[1]:
                continue
            for k in range(0 if was is None else was + 1, len(options)):
                lo, hi = model.span(options[k])
                if lo <= t < hi:  # the earliest prefetch that covers t: the least exposed of this item's
                    added = exposed(i, k) - (exposed(i, was) if was is not None else -1e-3 * options[k].transfer_s)
                    key = (added / items[i].nbytes, -items[i].nbytes)
                    if best is None or key < best[0]:
                        best = (key, i, k)
                    break
        if best is None:
            return chosen, False, max(int(level[t]), floor)
        _, i, k = best
        if i in chosen:
            take(i, chosen[i], -1)
        else:
            host += items[i].slot_bytes
        chosen[i] = k
        take(i, k, 1)
    for i in sorted(chosen, key=lambda i: (-exposed(i, chosen[i]), items[i].nbytes)):  # drop what is not needed
        lo, hi = model.span(model.options[i][chosen[i]])
        if hi > lo and int(level[lo:hi].max()) + items[i].nbytes <= budget:
            take(i, chosen.pop(i), -1)
    peak = max(int(level.max(initial=0)), floor)
    return chosen, peak <= wanted, peak


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
