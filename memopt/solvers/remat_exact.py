"""Keep or recompute, exactly: the cheapest set of candidates whose simulated peak fits, by branch and bound.

The yardstick for ``remat_fast.solve_blocks`` on small problems: the same
decision space (a subset of the candidates), the same simulation. Plain data
in, a ``RecomputeSolution`` out; no torch.

The search decides candidates one at a time, the largest first, keep before
recompute, and prunes a branch with two valid bounds on every plan below it,
from ``remat_fast.spans``: (1) memory at each forward and backward node is at
least what the decided candidates hold there (kept: the original; recomputed:
the forward life, and the copy's life from its first to its last backward
reader, or from earlier when a chain of recomputed copies needs it; inputs of
a copy that nothing recomputes live until the copy, which comes no earlier
than the first backward node reading the copied node or what it feeds through
nodes that may be recomputed), plus the least each undecided candidate holds;
(2) the cost is at least what the recomputed ones' copies run (recomputing
more never runs fewer), plus a fractional covering knapsack of what the
undecided ones must still free at the nodes most over budget. Once the
recomputed set alone fits (simulated), nothing below it is cheaper. A
candidate the backward never reads (an input of other copies, such as a
matmul under an activation) recomputed while all that read it are kept is the
same plan as keeping it, and is not searched twice.

Peak bytes are not monotone in the set (a recomputation keeps its inputs
longer, and its copies add events), so there is no pruning by peak beyond (1):
every plan is priced by ``remat_fast.simulate``. It proves optima in well under
a second on most graphs of a few hundred nodes and up to ~80 candidates; with
a hundred candidates and long chains (a two-layer llama) it may run out of time.
"""

from __future__ import annotations

import time
from collections.abc import Collection

import numpy as np

from memopt.solvers.remat_fast import (
    INFINITY,
    RecomputeProblem,
    RecomputeSolution,
    lower_bound,
    simulate,
    spans,
)

_TOP_EVENTS = 4  # events over budget the cost bound looks at per branch


def solve_exact(
    problem: RecomputeProblem,
    budget_bytes: int,
    *,
    time_limit_s: float = 10.0,
    allowed: Collection[int] | None = None,
    incumbent: Collection[int] | None = None,
) -> RecomputeSolution:
    """The cheapest subset of ``allowed`` candidates (all by default) whose simulated peak is <= ``budget_bytes``.

    ``incumbent``: a plan known to fit (a heuristic's), to prune with from the start.
    Status "optimal" when the search finished, "feasible" when it ran out of time
    with a plan, "infeasible" when it proved none fits, "unknown" when it ran out
    of time without one. ``levels`` is empty: there are no blocks.
    """
    started = time.perf_counter()
    order = sorted(set(range(len(problem.candidates)) if allowed is None else allowed),
                   key=lambda i: (-problem.sizes[problem.candidates[i].storage], i))  # the largest first
    search = _Search(problem, order, budget_bytes, started + time_limit_s)
    root_bound = lower_bound(problem, budget_bytes, allowed=order)
    if incumbent is not None:
        search.offer(tuple(sorted(incumbent)))
    if problem.floor_bytes <= budget_bytes and root_bound < INFINITY:
        search.run()
    best = search.best
    seconds = time.perf_counter() - started
    if best is None:
        status = "unknown" if search.timed_out else "infeasible"
        return RecomputeSolution(status, (), (), -1, INFINITY, root_bound, seconds, search.simulations)
    sim, chosen = best
    if search.timed_out:
        return RecomputeSolution("feasible", chosen, (), sim.peak_bytes, sim.cost_s, min(root_bound, sim.cost_s),
                                 seconds, search.simulations)
    return RecomputeSolution("optimal", chosen, (), sim.peak_bytes, sim.cost_s, sim.cost_s, seconds,
                             search.simulations)


class _Search:
    """Depth-first branch and bound over ``order``: keep first, then recompute."""

    def __init__(self, problem: RecomputeProblem, order: list[int], budget: int, deadline: float) -> None:
        self.problem, self.order, self.budget, self.deadline = problem, order, budget, deadline
        self.best = None
        self.simulations = 0
        self.timed_out = False
        sp = spans(problem)
        n = len(problem.inputs)
        positions = np.arange(n)
        k = len(order)
        self.kept = np.zeros((k, n), dtype=np.int64)  # bytes the candidate holds at each node when kept
        self.recomputed = np.zeros((k, n), dtype=np.int64)  # ... and the least it holds when recomputed
        for row, i in enumerate(order):
            c = problem.candidates[i]
            size, first = problem.sizes[c.storage], max(problem.start[c.storage], 0)
            self.kept[row] = size * ((positions >= first) & (positions <= sp.kept_end[i]))
            self.recomputed[row] = size * (((positions >= first) & (positions <= sp.forward_end[i]))
                                           | ((positions >= sp.copy_start[i]) & (positions <= sp.copy_end[i])))
        self.base = sp.kept_profile - self.kept.sum(axis=0)  # memory of everything else, all kept
        self.saving = self.kept - self.recomputed
        self.spans = sp
        self.row_of = {i: row for row, i in enumerate(order)}  # (candidates not allowed are always kept)
        self.rows = range(k)
        self.copied = [sp.copied[i] for i in order]
        self.share: dict[int, int] = {}  # per node: how many candidates certainly copy it
        for nodes in self.copied:
            for v in nodes:
                self.share[v] = self.share.get(v, 0) + 1
        self.state = [0] * k  # 0 undecided, 1 kept, 2 recomputed
        bs = problem.backward_start
        self.read_by_backward = {v for c in problem.candidates for v in c.nodes
                                 if any(u >= bs for u in problem.users[v])}  # type: ignore[attr-defined]
        # candidates that matter only as inputs of other copies, and the rows whose nodes read theirs: such a
        # candidate recomputed while all of those are kept is the same plan as keeping it, searched already
        self.chained = []
        for row, i in enumerate(order):
            if _chain_only(problem, i):
                nodes = set(problem.candidates[i].nodes)
                readers = [r for r, j in enumerate(order) if r != row and any(
                    nodes.intersection(problem.inputs[v]) for v in problem.candidates[j].nodes)]
                self.chained.append((row, readers))

    def offer(self, chosen: tuple[int, ...]) -> bool:
        self.simulations += 1
        sim = simulate(self.problem, chosen)
        if sim.peak_bytes <= self.budget and (self.best is None or sim.cost_s < self.best[0].cost_s):
            self.best = (sim, chosen)
            return True
        return sim.peak_bytes <= self.budget

    def run(self) -> None:
        k = len(self.order)
        self._branch(0, self.base + self.kept.sum(axis=0), self.saving.sum(axis=0), frozenset(), k)

    def _dynamic(self) -> np.ndarray | None:
        """Bytes the decided candidates surely hold beyond their rows: copies made early for another
        copy, and inputs of copies kept alive past their own end."""
        problem, sp, state = self.problem, self.spans, self.state
        recomputed = [self.order[r] for r in self.rows if state[r] == 2]
        if not recomputed:
            return None
        certain = {v for i in recomputed for v in problem.candidates[i].nodes}
        possible = certain | {v for r in self.rows if state[r] == 0 for v in problem.candidates[self.order[r]].nodes}
        need_certain = first_need(problem, certain)
        need_possible = first_need(problem, possible)
        live: list[tuple[int, int, int]] = []  # (first, last, bytes)
        for i in recomputed:  # the copy is made no later than any chain of copies within the recomputed needs it
            early = need_certain[problem.candidates[i].nodes[0]]
            if early < sp.copy_start[i] <= sp.copy_end[i]:
                live.append((early, sp.copy_start[i] - 1, problem.sizes[problem.candidates[i].storage]))
        last: dict[int, tuple[int, int]] = {}
        for i in recomputed:
            for storage, first, node, needs in sp.extensions[i]:
                if all(state[self.row_of[d]] == 1 for d in needs if d in self.row_of):
                    end = need_possible[node] - 1
                    if first <= end and end > last.get(storage, (0, -1))[1]:
                        last[storage] = (first, end)
        live.extend((first, end, problem.sizes[storage]) for storage, (first, end) in last.items())
        if not live:
            return None
        delta = np.zeros(len(problem.inputs) + 2, dtype=np.int64)
        for first, end, size in live:
            delta[first] += size
            delta[end + 1] -= size
        return np.cumsum(delta[:len(problem.inputs)])

    def _branch(self, depth: int, memory: np.ndarray, max_saving: np.ndarray, copied: frozenset, left: int) -> None:
        """``memory``: the lower bound with every undecided candidate kept; ``max_saving``: what they can free."""
        if time.perf_counter() > self.deadline:
            self.timed_out = True
            return
        for row, readers in self.chained:
            if self.state[row] == 2 and all(self.state[r] == 1 for r in readers):
                return  # the same plans as with it kept
        extension = self._dynamic()
        need = (memory if extension is None else memory + extension) - self.budget
        if (need > max_saving).any():
            return  # no way to fit below this branch
        copied = self._copied()
        cost = sum(self.problem.node_costs[v] for v in copied)
        best_cost = self.best[0].cost_s if self.best is not None else INFINITY
        if cost >= best_cost:
            return
        over = np.flatnonzero(need > 0)
        if over.size == 0:
            # the recomputed set alone may fit: if it does, nothing below is cheaper
            chosen = tuple(sorted(self.order[r] for r in range(len(self.order)) if self.state[r] == 2))
            if self.offer(chosen):
                return
        if left == 0:
            return
        if cost + self._knapsack(depth, need, over, copied) >= best_cost:
            return
        row = depth
        self.state[row] = 1
        self._branch(depth + 1, memory, max_saving - self.saving[row], copied, left - 1)
        self.state[row] = 2
        self._branch(depth + 1, memory - self.saving[row], max_saving - self.saving[row],
                     copied | self.copied[row], left - 1)
        self.state[row] = 0

    def _copied(self) -> frozenset:
        """The nodes the recomputed candidates' copies run: from those the backward reads, through the inputs
        that are recomputed too. This is what ``simulate`` charges; recomputing more never runs fewer."""
        inputs = self.problem.inputs
        recomputed = {v for r in self.rows if self.state[r] == 2 for v in self.problem.candidates[self.order[r]].nodes}
        copied: set[int] = set()
        stack = [v for v in recomputed if v in self.read_by_backward]
        while stack:
            v = stack.pop()
            if v not in copied:
                copied.add(v)
                stack.extend(a for a in inputs[v] if a in recomputed)
        return frozenset(copied)

    def _knapsack(self, depth: int, need: np.ndarray, over: np.ndarray, copied: frozenset) -> float:
        """Least cost of freeing ``need`` with undecided candidates, at the few events most over budget."""
        if over.size == 0 or depth >= len(self.order):
            return 0.0
        top = over[np.argsort(-need[over], kind="stable")[:_TOP_EVENTS]]
        rows = range(depth, len(self.order))
        node_costs = self.problem.node_costs
        costs = [sum(node_costs[v] / self.share[v] for v in self.copied[r] - copied) for r in rows]
        best = 0.0
        for x in top:
            items = sorted((costs[j] / s, s) for j, r in enumerate(rows) if (s := int(self.saving[r, x])) > 0)
            excess, total = int(need[x]), 0.0
            for ratio, freed in items:
                take = min(freed, excess)
                total += ratio * take
                excess -= take
                if excess <= 0:
                    break
            best = max(best, total)
        return best


def _chain_only(problem: RecomputeProblem, i: int) -> bool:
    """The backward reads neither the candidate's storage nor its nodes: recomputing it matters only when a
    recomputed candidate's copy reads it (then it is copied too, instead of kept until that copy)."""
    c = problem.candidates[i]
    bs = problem.backward_start
    users: tuple[tuple[int, ...], ...] = problem.users  # type: ignore[attr-defined]
    return all(r < bs for r in problem.readers[c.storage]) and all(u < bs for v in c.nodes for u in users[v])


def first_need(problem: RecomputeProblem, recomputed: Collection[int]) -> dict[int, int]:
    """Per node of ``recomputed``: the first backward node that reads it or a node it feeds within the set.

    With exactly these forward nodes recomputed, a node's copy comes right before
    that backward node; with more, no later; with fewer, no earlier.
    """
    bs, n = problem.backward_start, len(problem.inputs)
    users: tuple[tuple[int, ...], ...] = problem.users  # type: ignore[attr-defined]
    need: dict[int, int] = {}
    for node in sorted(recomputed, reverse=True):
        need[node] = min((u if u >= bs else need.get(u, n) for u in users[node]), default=n)
    return need
