"""Keep or recompute, fast: choose which forward results the backward recomputes, under a byte peak.

Plain data in, a ``RecomputeSolution`` out; no torch. The problem is the joint
forward/backward graph as it runs: nodes in order, the storages they make and
read, and candidates (forward results the backward reads and may recompute).
Recomputing a candidate ends its forward life at its last forward reader and
makes a copy right before the first backward node that needs it (directly, or
through another copy); what a copy reads and is not recomputed is kept until
then. ``simulate`` prices a choice in one pass over the graph.

``solve_blocks`` starts from blocks (repeated layers), each offering options
that recompute more and cost more: a chain of plans upgrades one block at a
time, the first that fits is taken and upgrades it does not need are undone.
Then it works candidate by candidate, every plan simulated: drop what the plan
does not need; cover the bytes over budget from scratch, the most bytes per
second first; re-choose all as one covering problem on a linear model (CP-SAT),
corrected by simulation; local moves (one or two out and the excess re-covered,
one in and what it makes unneeded dropped) and random restarts while they pay.
Large graphs (thousands of nodes, a simulation each ~10 ms) take candidates in
batches the model predicts, each batch simulated once.

The problem and its simulation are in ``remat_sim``, the lower bound (a covering
knapsack) in ``remat_bounds``; their names are re-exported here.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import random
import time
from collections.abc import Collection, Sequence

import numpy as np

from memopt.solvers.remat_bounds import Spans, lower_bound, spans
from memopt.solvers.remat_sim import (
    INFINITY, Candidate, RecomputeProblem, RecomputeSolution, Simulation, _Replay, _replay, simulate,
)

__all__ = ["Candidate", "RecomputeProblem", "RecomputeSolution", "Simulation", "Spans", "lower_bound", "simulate",
           "solve_blocks", "spans", "INFINITY"]


def solve_blocks(
    problem: RecomputeProblem,
    options: Sequence[Sequence[Collection[int]]],
    budget_bytes: int,
    *,
    time_limit_s: float = 5.0,
) -> RecomputeSolution:
    """The cheapest plan found with peak <= ``budget_bytes``: the blocks' options first, then any candidate.

    ``options[j]`` lists block j's options as candidate index sets, each recomputing
    at least what the one before it does; option 0 is usually "keep everything".
    The chain of options gives a first plan; on graphs up to ``_EXACT_FEEDBACK_NODES``
    nodes the search after it may take any of the problem's candidates, not only
    those the options name (a block's output that is cheap to recompute, say); on
    larger ones it keeps to the options' candidates (measured on an 80-layer GPT-2:
    the wider search, without exact feedback, ended 7% dearer). ``levels``
    reports, per block, the least option that holds what the plan recomputes
    there. The lower bound and "optimal" are over the candidates searched.
    """
    started = time.perf_counter()
    if len(problem.inputs) <= _EXACT_FEEDBACK_NODES:
        pool = list(range(len(problem.candidates)))
    else:
        pool = sorted({i for block in options for option in block for i in option})
    # the bound first: it is quick, and a plan that meets it ends the search
    bound = lower_bound(problem, budget_bytes, allowed=pool)
    search = _Search(problem, budget_bytes, pool, started + time_limit_s * _SEARCH_SHARE, bound)
    # the chain: every block one level up, in forward order, then the next level; the sets grow along it,
    # so the first point that fits is the cheapest; points the bound rules out are not simulated
    levels = [0] * len(options)
    chain = [tuple(levels)]
    for level in range(1, max((len(o) for o in options), default=1)):
        for j, block in enumerate(options):
            if level < len(block):
                levels[j] = level
                chain.append(tuple(levels))
    points = [frozenset(i for j, level in enumerate(point) for i in options[j][level]) for point in chain]
    if bound == INFINITY:  # the covering knapsack says no plan of these candidates fits: nothing to search
        # (the lower peak of two plans that recompute much, for a search of the lowest peak to start from)
        for chosen in (points[-1], frozenset(pool)):
            search.evaluate(chosen)
    if bound == INFINITY and search.best is None:
        sim, chosen = search.least  # type: ignore[misc]
        return RecomputeSolution("infeasible", tuple(sorted(chosen)), _levels(options, chosen), sim.peak_bytes,
                                 sim.cost_s, bound, time.perf_counter() - started, search.simulations)
    fit_levels = None
    for point, chosen in zip(chain, points):
        if search.may_fit(chosen) and search.evaluate(chosen).peak_bytes <= budget_bytes:
            fit_levels = list(point)
            break
    if fit_levels is not None:
        # repair: undo upgrades that the budget does not need, the costliest first, until a quarter of the time
        repair_until = started + time_limit_s / 4
        undo = sorted((j for j, level in enumerate(fit_levels) if level > 0),
                      key=lambda j: -_option_cost(problem, options[j][fit_levels[j]]))
        for j in undo:
            while fit_levels[j] > 0 and time.perf_counter() < repair_until:
                trial = list(fit_levels)
                trial[j] -= 1
                chosen = frozenset(i for k, level in enumerate(trial) for i in options[k][level])
                if search.evaluate(chosen).peak_bytes > budget_bytes:
                    break
                fit_levels = trial
    # candidate by candidate: drop what the chain's plan does not need; cover the excess from scratch, the
    # cheapest bytes first; re-choose all as one covering problem (small graphs); then local moves and
    # random restarts while they pay
    if search.best is not None:
        search.descend(search.best[1])
    search.descend(search.cover(frozenset(), frozenset()))
    if search.best is not None and search.exact_feedback:
        search.repack(search.best[1])
    if search.best is not None:
        search.local_moves()
        if search.exact_feedback:
            search.perturb(_PATIENCE)
    # small graphs: the exact branch and bound over every candidate, from the plan found, in the time left
    if len(problem.inputs) <= _EXACT_FINISH_NODES and (search.best is None
                                                      or search.best[0].cost_s > bound * (1 + 1e-9)):
        from memopt.solvers.remat_exact import solve_exact

        left = started + time_limit_s * _SEARCH_SHARE - time.perf_counter()
        if left > 0:
            exact = solve_exact(problem, budget_bytes, time_limit_s=left,
                                incumbent=search.best[1] if search.best is not None else None)
            if exact.status in ("optimal", "feasible"):
                search.evaluate(frozenset(exact.chosen))  # becomes the best if it is cheaper
            if exact.status == "optimal":
                bound = exact.cost_s
    seconds = time.perf_counter() - started
    if search.best is None:
        if search.least is None:
            search.evaluate(points[-1])
        sim, chosen = search.least  # type: ignore[misc]
        return RecomputeSolution("infeasible", tuple(sorted(chosen)), _levels(options, chosen), sim.peak_bytes,
                                 sim.cost_s, bound, seconds, search.simulations)
    sim, chosen = search.best
    status = "optimal" if sim.cost_s <= bound * (1 + 1e-9) else "feasible"
    return RecomputeSolution(status, tuple(sorted(chosen)), _levels(options, chosen), sim.peak_bytes, sim.cost_s,
                             min(bound, sim.cost_s), seconds, search.simulations)


def lower_peak(problem: RecomputeProblem, options: Sequence[Sequence[Collection[int]]], start: RecomputeSolution,
               *, time_limit_s: float, groups: Sequence[tuple[int, ...]] | None = None) -> RecomputeSolution:
    """No plan fits the budget: from ``start`` (the lowest peak found), take one candidate in or out (or the
    same one of every repeated block) while that lowers the peak, so the smallest budget memopt reports is as low
    as its search reaches (a prologue's result every block reads, say, that no block's option recomputes)."""
    started = time.perf_counter()
    search = _Search(problem, 0, range(len(problem.candidates)), started + time_limit_s)
    search.evaluate(frozenset(start.chosen))
    search.lower_peak(groups if groups is not None else mirrors(problem, options))
    sim, chosen = search.least  # type: ignore[misc]
    if sim.peak_bytes >= start.peak_bytes:
        return start
    return RecomputeSolution("infeasible", tuple(sorted(chosen)), _levels(options, chosen), sim.peak_bytes,
                             sim.cost_s, start.lower_bound_s, start.seconds + time.perf_counter() - started,
                             start.simulations + search.simulations)


def lowest_peak(problem: RecomputeProblem, options: Sequence[Sequence[Collection[int]]], start: RecomputeSolution,
                *, time_limit_s: float) -> RecomputeSolution:
    """No plan fits the budget: the lowest peak the search reaches. From ``start``, flips (``lower_peak``); then
    budgets between the problem's floor and the peak found, halving the gap, each searched as a budget (covering
    only what is over a budget finds plans that flips from a plan recomputing everything do not reach); then
    flips again from the lowest."""
    groups = mirrors(problem, options)
    best = lower_peak(problem, options, start, time_limit_s=time_limit_s / 4, groups=groups)
    low = problem.floor_bytes
    for _ in range(_HALVINGS):
        if best.peak_bytes - low <= _CLOSE_ENOUGH * best.peak_bytes:
            break
        target = (low + best.peak_bytes) // 2
        found = solve_blocks(problem, options, target, time_limit_s=time_limit_s / 2 / _HALVINGS)
        if found.status == "infeasible":
            low = target  # (as far as this search goes)
        else:
            best = dataclasses.replace(found, status="infeasible", lower_bound_s=best.lower_bound_s,
                                       seconds=best.seconds + found.seconds,
                                       simulations=best.simulations + found.simulations)
    return lower_peak(problem, options, best, time_limit_s=time_limit_s / 4, groups=groups)


_HALVINGS = 5  # budgets searched below the lowest peak the flips reach
_CLOSE_ENOUGH = 0.005  # of the peak: a gap to the floor this small is not searched


def mirrors(problem: RecomputeProblem, options: Sequence[Sequence[Collection[int]]]) -> list[tuple[int, ...]]:
    """Candidates that play the same part in repeated blocks: per family of blocks alike (their candidates, those
    of the last option, mostly of the same sizes and costs in the same order: a first block that also makes a
    position bias is one of the family), the candidates each block aligns with the family's first."""
    def key(i: int) -> tuple[int, float]:
        candidate = problem.candidates[i]
        return problem.sizes[candidate.storage], problem.node_costs[candidate.nodes[0]]

    families: list[tuple[list[int], list[dict[int, int]]]] = []  # first block's candidates, each other's alignment
    for block in options:
        inside = sorted(block[-1], key=lambda i: problem.candidates[i].nodes[0]) if block else []
        if not inside:
            continue
        for first, aligned in families:
            matcher = difflib.SequenceMatcher(None, [key(i) for i in first], [key(i) for i in inside], autojunk=False)
            if matcher.ratio() >= _ALIKE:
                aligned.append({first[a + k]: inside[b + k] for a, b, size in matcher.get_matching_blocks()
                                for k in range(size)})
                break
        else:
            families.append((inside, []))
    return [(i, *(each[i] for each in aligned if i in each)) for first, aligned in families if aligned
            for i in first if any(i in each for each in aligned)]


_ALIKE = 0.8  # blocks whose candidates align this well (difflib's ratio) are repeats of one another


def _levels(options: Sequence[Sequence[Collection[int]]], chosen: Collection[int]) -> tuple[int, ...]:
    """Per block, the least option that holds all the plan recomputes there (the last if none does)."""
    chosen = set(chosen)
    levels = []
    for block in options:
        inside = chosen & set().union(*block)
        levels.append(next((level for level, option in enumerate(block) if inside <= set(option)), len(block) - 1))
    return tuple(max(level, 0) for level in levels)


_EXACT_FEEDBACK_NODES = 2000  # below this many nodes, every addition and removal is simulated on its own
_SENTINEL = -(1 << 62)  # a slot with no event
_LIKELY = 4  # additions simulated per step of a cover, the model's best
_REPACK_ROUNDS, _REPACK_SECONDS = 4, 0.5  # covering problems per repack, and each one's deterministic time
_COST_RESOLUTION = 1_000_000  # cost units per largest node cost, in the covering problem
_PAIRS_FROM = 6  # two out at once: pairs of the costliest this many
_PATIENCE = 20  # random restarts in a row without a gain before the search stops
_LARGE_PASS = 32  # on large problems, a pass of local moves takes out each of the costliest this many
_STALL_MIN, _STALL_FACTOR = 1500, 4  # the search stops after max(these) x simulations without a gain
_SEARCH_SHARE = 0.95  # of the time limit; the rest covers one simulation past the deadline
_EXACT_FINISH_NODES = 400  # graphs up to this many nodes end with the exact search over every candidate


class _Search:
    """Plans priced by simulation, and a model that predicts what one candidate more or less changes.

    The model works in slots: slot 2x holds the copies made right before node x
    (their largest total), slot 2x+1 node x. Recomputing candidate c frees its
    bytes from after its last forward reader to before its first backward reader,
    and after its last backward reader to its kept end; its copy's inputs that
    stay kept live on until the copy.
    """

    def __init__(self, problem: RecomputeProblem, budget: int, pool: Sequence[int], deadline: float,
                 bound: float = 0.0) -> None:
        self.problem, self.budget, self.deadline = problem, budget, deadline
        self.bound = bound  # a plan that costs no more is optimal: the search stops
        self.pool = list(pool)
        self.index = {i: k for k, i in enumerate(self.pool)}
        sp = self.spans = spans(problem)
        n = self.n = len(problem.inputs)
        self.exact_feedback = n <= _EXACT_FEEDBACK_NODES
        self.simulations = 0
        self.found_at = 0  # simulations when the best plan was found
        self.stalling = False  # whether a long run of simulations without a gain ends the search
        self.best: tuple[Simulation, frozenset[int]] | None = None
        self.least: tuple[Simulation, frozenset[int]] | None = None
        self.seen: dict[frozenset[int], Simulation] = {}
        self.profiles: dict[frozenset[int], tuple[Simulation, object]] = {}
        self.m = len(self.pool)
        self.size = np.array([problem.sizes[problem.candidates[i].storage] for i in self.pool], dtype=np.int64)
        fe = np.array([sp.forward_end[i] for i in self.pool], dtype=np.int64)
        cs = np.array([sp.copy_start[i] for i in self.pool], dtype=np.int64)
        ce = np.array([sp.copy_end[i] for i in self.pool], dtype=np.int64)
        ke = np.minimum(np.array([sp.kept_end[i] for i in self.pool], dtype=np.int64), n - 1)
        copy = cs <= ce
        self.w1 = (2 * (fe + 1), np.where(copy, 2 * np.minimum(cs, ke + 1) - 1, 2 * ke + 1))
        self.w2 = (np.where(copy & (ce < ke), 2 * (ce + 1), 2 * n + 2), np.where(copy, 2 * ke + 1, -1))
        self.copy_start = cs
        self.own_cost = np.array([sum(problem.node_costs[v] for v in sp.copied[i]) for i in self.pool])
        self.reads_from = {  # per candidate: the candidates whose nodes its copies read
            i: frozenset(d for v in sp.copied[i] for a in problem.inputs[v] for d in sp.holders.get(a, ()) if d != i)
            for i in self.pool}
        self.copiers: dict[int, list[int]] = {}  # node -> pool positions whose copies certainly run it
        for k, i in enumerate(self.pool):
            for v in sp.copied[i]:
                self.copiers.setdefault(v, []).append(k)
        # the peak's lower bound with nothing recomputed, per slot (a slot of copies has none)
        self.kept = np.full(2 * n + 2, _SENTINEL, dtype=np.int64)
        self.kept[1:2 * n:2] = sp.kept_profile

    # pricing
    def evaluate(self, chosen: frozenset[int]) -> Simulation:
        sim = self.seen.get(chosen)
        if sim is None:
            sim = self.seen[chosen] = self._replay(chosen)[0]
        return sim

    def _replay(self, chosen: frozenset[int]) -> tuple[Simulation, _Replay]:
        self.simulations += 1
        replay = _replay(self.problem, chosen)
        sim = Simulation(replay.peak_bytes, replay.peak_time, replay.cost_s)
        self.seen[chosen] = sim
        if sim.peak_bytes <= self.budget:
            if self.best is None or sim.cost_s < self.best[0].cost_s:
                self.best = (sim, chosen)
                self.found_at = self.simulations
        elif self.least is None or sim.peak_bytes < self.least[0].peak_bytes:
            self.least = (sim, chosen)
        return sim, replay

    def fits(self, chosen: frozenset[int]) -> bool:
        return self.evaluate(chosen).peak_bytes <= self.budget

    def may_fit(self, chosen: frozenset[int]) -> bool:
        """False when the lower bound on the peak (savings only; no copies, no kept inputs) is over budget."""
        slots = self.kept.copy()
        for i in chosen:
            self._free(slots, self.index[i], -1)
        return bool(slots.max() <= self.budget)

    def out_of_time(self) -> bool:
        """Time is up, the best plan meets the lower bound, or the search has stalled: many simulations
        (more than it took to find the best plan, several times over) without a better plan."""
        if self.best is not None and self.best[0].cost_s <= self.bound * (1 + 1e-9):
            return True
        if self.stalling and self.simulations - self.found_at > max(_STALL_MIN, _STALL_FACTOR * self.found_at):
            return True
        return time.perf_counter() > self.deadline

    # the model
    def slots(self, replay: _Replay) -> object:
        profile = replay.profile
        out = np.full(2 * self.n + 2, _SENTINEL, dtype=np.int64)
        out[1:2 * self.n:2] = profile[np.array(replay.time_of, dtype=np.int64)]
        bs = self.problem.backward_start
        for node in range(bs, self.n):  # copies made right before node: between its time and the one before
            first = replay.time_of[node - 1] + 1 if node > 0 else 0
            if first < replay.time_of[node]:
                out[2 * node] = profile[first:replay.time_of[node]].max()
        return out

    def _free(self, slots, k: int, sign: int) -> None:
        """Apply (sign -1) or undo (sign +1) candidate k's saving in the predicted slots."""
        for a, b in (self.w1, self.w2):
            if a[k] <= b[k]:
                slots[a[k]:b[k] + 1] += sign * self.size[k]

    def _extend(self, slots, k: int, chosen: Collection[int], extended: dict[int, int]) -> None:
        """The inputs of k's copies that nothing recomputes live until its copy."""
        until = 2 * int(self.copy_start[k])
        for storage, first, _node, needs in self.spans.extensions[self.pool[k]]:
            if any(d in chosen for d in needs):
                continue
            start = max(2 * first, extended.get(storage, -1) + 1)
            if start <= until:
                slots[start:until + 1] += self.problem.sizes[storage]
                extended[storage] = until

    # moves
    def profile(self, chosen: frozenset[int]) -> tuple[Simulation, object]:
        """The simulation and its slots (kept for small problems)."""
        cached = self.profiles.get(chosen)
        if cached is None:
            sim, replay = self._replay(chosen)
            cached = (sim, self.slots(replay))
            if self.exact_feedback:
                self.profiles[chosen] = cached
        return cached

    def cover(self, chosen: frozenset[int], banned: frozenset[int]) -> frozenset[int] | None:
        """Add candidates until the plan fits; None when stuck or out of time."""
        if self.exact_feedback:
            return self._cover_simulated(chosen, banned)
        return self._cover_predicted(chosen, banned)

    def _cover_simulated(self, chosen: frozenset[int], banned: frozenset[int]) -> frozenset[int] | None:
        """Take the move that lowers the bytes over budget (summed over slots) the most per second it adds,
        every move simulated: adding one of the candidates the model ranks best; failing that, adding any,
        or taking one out (a recomputation that keeps its inputs alive or makes other copies early can be
        what holds the bytes). What comes out stays out."""
        banned = set(banned)
        while not self.out_of_time():
            sim, slots = self.profile(chosen)
            if sim.peak_bytes <= self.budget:
                return chosen
            likely = self._likely(chosen, banned, slots)
            over = np.concatenate([[0], np.cumsum(slots > self.budget)])  # prefix counts
            outs = [chosen - {i} for i in sorted(chosen) if not self._frees_in(i, over)] + self._groups_out(chosen)
            best = self._best_move(chosen, sim, slots, [chosen | {i} for i in likely] + outs)
            if best is None:
                others = [chosen | {i} for i in self.pool if i not in chosen and i not in banned and i not in likely]
                best = self._best_move(chosen, sim, slots, others)
            if best is None:  # one in and one out at once
                swaps = [(chosen | {i}) - {j} for i in likely for j in sorted(chosen)]
                best = self._best_move(chosen, sim, slots, swaps)
            if best is None:
                return None
            banned.update(chosen - best)
            chosen = best
        return None

    def repack(self, chosen: frozenset[int]) -> None:
        """Re-choose the candidates as one covering problem, solved exactly (CP-SAT) on the model linearized
        at ``chosen``: at every slot over budget without any recomputation, the bytes freed there must cover
        the excess; bytes the model does not see (inputs kept for copies, early copies, copies' own
        events) are taken as they are in ``chosen``. What the solver picks is simulated; where it does not
        fit, the model learns the error and is solved again; what fits is descended from."""
        from ortools.sat.python import cp_model

        sim, slots = self.profile(chosen)
        member = np.zeros(self.m, dtype=bool)
        member[[self.index[i] for i in chosen]] = True
        saving = np.zeros((self.m, len(slots)), dtype=np.int64)
        for k in range(self.m):
            for a, b in (self.w1, self.w2):
                if a[k] <= b[k]:
                    saving[k, a[k]:b[k] + 1] = self.size[k]
        base = slots + saving[member].sum(axis=0)  # the bytes with nothing recomputed, as the model sees them
        node_cost = self.problem.node_costs
        top = max((node_cost[v] for k in range(self.m) for v in self.spans.copied[self.pool[k]]), default=0.0)
        unit = top / _COST_RESOLUTION if top > 0 else 1.0
        for _ in range(_REPACK_ROUNDS):
            if self.out_of_time():
                return
            need = base - self.budget
            rows = np.flatnonzero(need > 0)
            # one constraint per distinct set of savers, the largest need
            by_savers: dict[bytes, int] = {}
            for x in rows:
                key = (saving[:, x] > 0).tobytes()
                if need[x] > by_savers.get(key, 0):
                    by_savers[key] = int(need[x])
            model = cp_model.CpModel()
            pick = [model.NewBoolVar(f"x{k}") for k in range(self.m)]
            for key, excess in by_savers.items():
                savers = np.flatnonzero(np.frombuffer(key, dtype=bool))
                if int(self.size[savers].sum()) < excess:
                    return  # the model says nothing fits
                model.Add(sum(int(self.size[k]) * pick[k] for k in savers) >= excess)
            runs: dict[int, object] = {}
            for k in range(self.m):
                for v in self.spans.copied[self.pool[k]]:
                    if v not in runs:
                        runs[v] = model.NewBoolVar(f"v{v}")
                    model.AddImplication(pick[k], runs[v])
                model.AddHint(pick[k], bool(member[k]))
            model.Minimize(sum(int(round(node_cost[v] / unit)) * var for v, var in runs.items()))
            solver = cp_model.CpSolver()
            solver.parameters.max_deterministic_time = _REPACK_SECONDS  # (the same answer on any machine)
            solver.parameters.max_time_in_seconds = max(0.01, self.deadline - time.perf_counter())
            solver.parameters.num_workers = 1
            solver.parameters.random_seed = 0
            if solver.Solve(model) not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
                return
            plan = frozenset(self.pool[k] for k in range(self.m) if solver.Value(pick[k]))
            after, plan_slots = self.profile(plan)
            if after.peak_bytes <= self.budget:
                self.descend(plan)
                return
            model_slots = base - saving[[self.index[i] for i in plan]].sum(axis=0)
            missed = plan_slots - model_slots
            over = plan_slots > self.budget
            base = base + np.where(over & (missed > 0), missed, 0)

    def _frees_in(self, i: int, prefix) -> bool:
        """Whether the model says candidate i frees bytes at a slot counted in ``prefix`` (prefix counts)."""
        k, last = self.index[i], len(prefix) - 2
        return any(a[k] <= b[k] and prefix[min(int(b[k]), last) + 1] > prefix[int(a[k])] for a, b in (self.w1, self.w2))

    def _groups_out(self, chosen: frozenset[int]) -> list[frozenset[int]]:
        """Plans without a group of recomputations that together hold bytes no single one does: those
        whose copies read another chosen candidate's nodes (that copy then comes early), and those whose
        copies read the same kept storage (it lives until the last of them)."""
        groups: dict[tuple[str, int], set[int]] = {}
        for i in chosen:
            for d in self.reads_from[i]:
                if d in chosen:
                    groups.setdefault(("copy", d), set()).add(i)
            for storage, _first, _node, needs in self.spans.extensions[i]:
                if not any(d in chosen for d in needs):
                    groups.setdefault(("kept", storage), set()).add(i)
        unique = {frozenset(g) for g in groups.values() if len(g) > 1}
        return [chosen - g for g in sorted(unique, key=sorted)]

    def _likely(self, chosen: frozenset[int], banned: Collection[int], slots) -> list[int]:
        """The few candidates the model says free the most bytes over budget per second, and the cheapest
        two it says free them all (a covering knapsack's greedy needs both)."""
        excess = np.maximum(slots - self.budget, 0)
        total = int(excess.sum())
        covered = {v for i in chosen for v in self.spans.copied[i]}
        ranked, completing = [], []
        for k, i in enumerate(self.pool):
            if i in chosen or i in banned:
                continue
            size = int(self.size[k])
            freed = sum(int(np.minimum(excess[a[k]:b[k] + 1], size).sum())
                        for a, b in (self.w1, self.w2) if a[k] <= b[k])
            if freed > 0:
                cost = sum(self.problem.node_costs[v] for v in self.spans.copied[i] if v not in covered)
                ranked.append((cost / freed, -freed, i))
                if freed >= total:
                    completing.append((cost, i))
        ranked.sort()
        completing.sort()
        likely = [i for _, _, i in ranked[:_LIKELY]]
        return likely + [i for _, i in completing[:2] if i not in likely]

    def _over(self, slots) -> int:
        return int(np.maximum(slots - self.budget, 0).sum())

    def _best_move(self, chosen, sim, slots, trials) -> frozenset[int] | None:
        best = None
        over = self._over(slots)
        for trial in trials:
            if self.out_of_time():
                return None
            after, trial_slots = self.profile(trial)
            freed = over - self._over(trial_slots)
            if freed <= 0:
                continue
            added = after.cost_s - sim.cost_s  # (a move that saves both: the one freeing the most)
            key = ((0, -freed, added) if added <= 0 else (1, added / freed, -freed)) + (sorted(trial ^ chosen),)
            if best is None or key < best[0]:
                best = (key, trial)
        return None if best is None else best[1]

    def _cover_predicted(self, chosen: frozenset[int], banned: frozenset[int]) -> frozenset[int] | None:
        """Add, by the model, at the slot most over budget the candidate freeing bytes there at the least
        cost per byte (bytes counted up to the excess), until the model says the plan fits; simulate; repeat."""
        budget = self.budget
        while not self.out_of_time():
            seen = self.seen.get(chosen)
            if seen is not None and seen.peak_bytes <= budget:
                return chosen
            sim, replay = self._replay(chosen)
            if sim.peak_bytes <= budget:
                return chosen
            slots = self.slots(replay)
            extended: dict[int, int] = {}  # kept storages the plan's copies read: the last slot they live
            for i in chosen:
                self._extend(np.zeros_like(slots), self.index[i], chosen, extended)
            covered = {v for i in chosen for v in self.spans.copied[i]}
            marginal = self.own_cost.copy()
            for v in covered:
                for k in self.copiers.get(v, ()):
                    marginal[k] -= self.problem.node_costs[v]
            open_ = np.ones(self.m, dtype=bool)
            open_[[self.index[i] for i in chosen | banned if i in self.index]] = False
            added = set(chosen)
            picks = 0
            while True:
                x = int(slots.argmax())
                excess = int(slots[x]) - budget
                if excess <= 0:
                    break
                live = open_ & (((self.w1[0] <= x) & (x <= self.w1[1])) | ((self.w2[0] <= x) & (x <= self.w2[1])))
                if not live.any():
                    break
                ratio = np.where(live, np.maximum(marginal, 0.0) / np.minimum(self.size, excess).clip(min=1), np.inf)
                k = int(ratio.argmin())
                open_[k] = False
                added.add(self.pool[k])
                picks += 1
                self._free(slots, k, -1)
                self._extend(slots, k, added, extended)
                for v in self.spans.copied[self.pool[k]]:
                    if v not in covered:
                        covered.add(v)
                        for d in self.copiers[v]:
                            marginal[d] -= self.problem.node_costs[v]
            if picks == 0:
                return None
            chosen = frozenset(added)
        return None

    def drop(self, chosen: frozenset[int], keep: Collection[int] = ()) -> frozenset[int]:
        """Remove candidates the plan does not need, the costliest first (but those in ``keep``)."""
        if not self.fits(chosen):
            return chosen
        order = sorted((i for i in chosen if i not in keep), key=lambda i: (-self.own_cost[self.index[i]], i))
        if self.exact_feedback:  # the costliest first, and the costliest per byte first: the cheaper result
            per_byte = self.own_cost / np.maximum(self.size, 1)
            by_byte = sorted(order, key=lambda i: (-per_byte[self.index[i]], i))
            results = []
            for sequence in (order, by_byte):
                current = chosen
                for i in sequence:
                    if self.out_of_time():
                        break
                    trial = current - {i}
                    if self.fits(trial):
                        current = trial
                results.append(current)
            return min(results, key=lambda plan: (self.evaluate(plan).cost_s, sorted(plan)))
        # predicted: drop all that the model says fit, then halve the batch until the simulation agrees
        _, slots = self.profile(chosen)
        batch = []
        for i in order:
            k = self.index[i]
            self._free(slots, k, +1)
            if slots.max() <= self.budget:
                batch.append(i)
            else:
                self._free(slots, k, -1)
        while batch and not self.out_of_time():
            trial = chosen - set(batch)
            if self.fits(trial):
                chosen = trial
                break
            batch = batch[:len(batch) // 2]
        return chosen

    def descend(self, chosen: frozenset[int] | None) -> None:
        """From a plan that fits: drop what is unneeded, then while one candidate in lets costlier ones out,
        take it (the cheapest first)."""
        if chosen is None or not self.fits(chosen):
            return
        chosen = self.drop(chosen)
        improved = self.exact_feedback
        while improved and not self.out_of_time():
            improved = False
            cost = self.evaluate(chosen).cost_s
            for i in self._helpful(chosen):
                if self.out_of_time():
                    return
                trial = self.drop(chosen | {i}, keep=(i,))
                if self.evaluate(trial).cost_s < cost:
                    chosen, improved = trial, True
                    break

    def lower_peak(self, mirrors: Sequence[tuple[int, ...]] = ()) -> None:
        """From the lowest peak found (no plan fits), one candidate in (the largest first) or out, or one group of
        ``mirrors`` all in or all out, while that lowers it. Repeated blocks make plateaus that only a group
        crosses: a block's input kept for its own backward lowers that block's peak, not the step's while the
        other blocks reach it (and adds to theirs)."""
        improved = True
        while improved and not self.out_of_time():
            improved = False
            sim, chosen = self.least  # type: ignore[misc]
            ins = sorted((i for i in self.pool if i not in chosen), key=lambda i: (-self.size[self.index[i]], i))
            flips = itertools.chain((chosen | {i} for i in ins), (chosen - {i} for i in sorted(chosen)),
                                    (trial for group in mirrors for trial in (chosen | set(group), chosen - set(group))
                                     if trial != chosen))  # made one at a time: the first that pays is taken
            for trial in flips:
                if self.out_of_time():
                    return
                if self.evaluate(trial).peak_bytes < sim.peak_bytes:
                    improved = True
                    break

    def _helpful(self, chosen: frozenset[int]) -> list[int]:
        """Candidates outside the plan that free bytes where it is tight (within the largest chosen storage
        of the budget): only those can let a chosen one out. The cheapest first."""
        _, slots = self.profile(chosen)
        largest = max((int(self.size[self.index[i]]) for i in chosen), default=0)
        tight = np.concatenate([[0], np.cumsum(slots >= self.budget - largest)])
        return sorted((i for i in self.pool if i not in chosen and self._frees_in(i, tight)),
                      key=lambda i: (self.own_cost[self.index[i]], i))

    def local_moves(self) -> None:
        """From the best plan: one out (then two of the costliest), the excess re-covered without them, and
        descent from there; until none pays. On large problems, one pass over the costliest, repeated
        while a pass gains more than a thousandth."""
        if not self.exact_feedback:
            while not self.out_of_time():
                before = self.best[0].cost_s  # type: ignore[index]
                ranked = sorted(self.best[1], key=lambda i: (-self.own_cost[self.index[i]], i))  # type: ignore[index]
                for i in ranked[:_LARGE_PASS]:
                    if self.out_of_time():
                        return
                    _, chosen = self.best  # type: ignore[misc]
                    if i in chosen:
                        self.descend(self.cover(chosen - {i}, frozenset((i,))))
                if self.best[0].cost_s > before * (1 - 1e-3):  # type: ignore[index]
                    return
            return
        improved = True
        while improved and not self.out_of_time():
            _, chosen = self.best  # type: ignore[misc]
            ranked = sorted(chosen, key=lambda i: (-self.own_cost[self.index[i]], i))
            top = ranked[:_PAIRS_FROM]
            outs = [frozenset((i,)) for i in ranked]
            outs += [frozenset((a, b)) for k, a in enumerate(top) for b in top[k + 1:]]
            improved = False
            for out in outs:
                if self.out_of_time():
                    return
                self.descend(self.cover(chosen - out, out))
                if self.best[1] != chosen:  # type: ignore[index]
                    improved = True
                    break

    def perturb(self, patience: int) -> None:
        """Take out a few of the best plan's candidates at random (the costlier, the likelier), keep them out
        while the excess is re-covered, descend; after a gain, local moves again. Stops after ``patience``
        tries in a row without a gain."""
        rng = random.Random(0)
        stale = 0
        self.stalling = True
        while stale < patience and not self.out_of_time():
            _, chosen = self.best  # type: ignore[misc]
            items = sorted(chosen)
            if not items:
                return
            weights = [float(self.own_cost[self.index[i]]) + 1e-30 for i in items]
            out: set[int] = set()
            for _ in range(min(rng.choice((1, 2, 3)), len(items))):
                out.add(rng.choices(items, weights)[0])
            self.descend(self.cover(chosen - out, frozenset(out)))
            if self.best[1] != chosen:  # type: ignore[index]
                stale = 0
                self.local_moves()
            else:
                stale += 1


def _option_cost(problem: RecomputeProblem, option: Collection[int]) -> float:
    return sum(problem.node_costs[n] for i in option for n in problem.candidates[i].nodes)
