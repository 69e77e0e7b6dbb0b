"""Operator order: a topological order of a graph's nodes with a lower peak of live bytes.

Plain data in, an ``OrderSolution`` out; no torch. A storage is live from the
position of its producer through the position of its last user (only at its
producer's position if nobody reads it); outputs stay live to the last
position; graph inputs (producer -1) are live throughout. List-scheduling
heuristics in the spirit of Inductor's memory-aware reordering
(torch/_inductor/memory.py: least peak memory first, BFS, DFS) give a start,
then CP-SAT reorders windows of consecutive positions around the peak exactly,
the prefix and suffix held fixed. The result is never worse than the traced
order 0..n-1.
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable, Sequence

from ortools.sat.python import cp_model

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OrderProblem:
    """Nodes 0..num_nodes-1 in a topological order, and the storages they make and read.

    Graph inputs' storages (producer -1) are live throughout: their sizes are
    added to `static_bytes`, so leave them out of it."""

    num_nodes: int
    sizes: tuple[int, ...]  # per storage, bytes
    producers: tuple[int, ...]  # per storage: producing node, or -1 for graph inputs
    users: tuple[tuple[int, ...], ...]  # per storage: nodes that read it
    is_output: tuple[bool, ...]  # per storage: live from its producer to the end
    edges: tuple[tuple[int, int], ...] = ()  # extra (before, after) constraints
    static_bytes: int = 0  # live throughout, on top of the graph inputs' storages


@dataclass(frozen=True, slots=True)
class OrderSolution:
    order: tuple[int, ...]  # a topological permutation of range(num_nodes)
    peak_before: int  # peak of the identity order (the traced order)
    peak_after: int  # peak of `order`, <= peak_before
    changed: bool
    status: str  # "optimal" | "feasible" | "unchanged"
    method: str  # the heuristic that won, "+cp-sat-window" when windows improved on it
    seconds: float
    lower_bound: int = 0  # no order of the problem peaks below this


class _Graph:
    """The problem validated and indexed: dependencies, and per node the storages it makes and reads."""

    def __init__(self, p: OrderProblem) -> None:
        n, m = p.num_nodes, len(p.sizes)
        if n < 0:
            raise ValueError(f"num_nodes must be >= 0, got {n}")
        for name in ("producers", "users", "is_output"):
            if len(getattr(p, name)) != m:
                raise ValueError(f"{name} has {len(getattr(p, name))} entries but sizes has {m}; give one per storage")
        self.n, self.sizes, self.producers, self.is_output = n, p.sizes, p.producers, p.is_output
        self.static = p.static_bytes
        self.produced: list[list[int]] = [[] for _ in range(n)]
        self.used: list[list[int]] = [[] for _ in range(n)]
        self.users: list[tuple[int, ...]] = []
        preds: list[set[int]] = [set() for _ in range(n)]
        for s, (size, pr, us) in enumerate(zip(p.sizes, p.producers, p.users)):
            if size < 0:
                raise ValueError(f"storage {s} has negative size {size}")
            if not -1 <= pr < n:
                raise ValueError(f"storage {s} has producer {pr}, outside -1..{n - 1}")
            bad = [u for u in us if not 0 <= u < n]
            if bad:
                raise ValueError(f"storage {s} has user {bad[0]}, outside 0..{n - 1}")
            distinct = tuple(sorted(set(us) - {pr}))
            self.users.append(distinct)
            if pr < 0:
                self.static += size
                continue
            self.produced[pr].append(s)
            for u in distinct:
                self.used[u].append(s)
                preds[u].add(pr)
        for a, b in p.edges:
            if not (0 <= a < n and 0 <= b < n) or a == b:
                raise ValueError(f"edge ({a}, {b}) must join two different nodes in 0..{n - 1}")
            preds[b].add(a)
        self.preds = [sorted(ps) for ps in preds]
        self.succs: list[list[int]] = [[] for _ in range(n)]
        for b, ps in enumerate(self.preds):
            for a in ps:
                self.succs[a].append(b)
        self.alloc = [sum(p.sizes[s] for s in made) for made in self.produced]
        self.footprint = [a + sum(p.sizes[s] for s in read) for a, read in zip(self.alloc, self.used)]  # live as v runs

    def why(self, a: int, b: int) -> str:
        for s in self.produced[a]:
            if b in self.users[s]:
                return f"node {b} reads storage {s} made by node {a}"
        return f"edge ({a}, {b})"

    def check(self, order: Sequence[int]) -> list[int]:
        """Positions of the nodes in `order`; ValueError if it is not a topological permutation."""
        pos = [-1] * self.n
        if len(order) != self.n:
            raise ValueError(f"order has {len(order)} nodes; the problem has {self.n}")
        for i, v in enumerate(order):
            if not 0 <= v < self.n or pos[v] >= 0:
                raise ValueError(f"order is not a permutation of range({self.n}): node {v} at position {i}")
            pos[v] = i
        for b in range(self.n):
            for a in self.preds[b]:
                if pos[a] > pos[b]:
                    raise ValueError(
                        f"order runs node {b} (position {pos[b]}) before node {a} (position {pos[a]}), "
                        f"but {self.why(a, b)}"
                    )
        return pos

    def profile(self, pos: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
        """Live bytes at each position, and each storage's first and last live position (-1: input)."""
        n, last = self.n, self.n - 1
        diff = [0] * (n + 1)
        start, end = [-1] * len(self.sizes), [last] * len(self.sizes)
        for s, pr in enumerate(self.producers):
            if pr < 0:
                continue
            a = pos[pr]
            e = last if self.is_output[s] else max([a] + [pos[u] for u in self.users[s]])
            start[s], end[s] = a, e
            diff[a] += self.sizes[s]
            diff[e + 1] -= self.sizes[s]
        return list(accumulate(diff[:n], initial=self.static))[1:], start, end

    def lower_bound(self) -> int:
        """Bytes some position must hold in any order: a node's reads and writes, or every output at the end."""
        outputs = sum(size for size, pr, out in zip(self.sizes, self.producers, self.is_output) if out and pr >= 0)
        return self.static + max(self.footprint + [outputs])


def simulate(problem: OrderProblem, order: Sequence[int]) -> tuple[int, ...]:
    """Live bytes (static and graph inputs included) at each position of `order`."""
    g = _Graph(problem)
    return tuple(g.profile(g.check(order))[0])


def peak(problem: OrderProblem, order: Sequence[int]) -> int:
    g = _Graph(problem)
    return max(g.profile(g.check(order))[0], default=g.static)


def check_order(problem: OrderProblem, order: Sequence[int]) -> None:
    """ValueError, naming the violated dependency, unless `order` is a topological permutation."""
    _Graph(problem).check(order)


def _kahn(g: _Graph, key: Sequence) -> list[int]:
    """Kahn's algorithm, the ready node with the smallest (key, index) first."""
    indeg = [len(ps) for ps in g.preds]
    heap = [(key[v], v) for v in range(g.n) if indeg[v] == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        _, v = heapq.heappop(heap)
        order.append(v)
        for w in g.succs[v]:
            indeg[w] -= 1
            if indeg[w] == 0:
                heapq.heappush(heap, (key[w], w))
    return order


def _lpmf(g: _Graph, rank: Callable[[int, int], tuple]) -> list[int]:
    """List scheduling on the bytes a node leaves live after it runs (allocated - freed as last reader).

    The ready node with the smallest rank(net bytes, index) runs next; a node's
    net drops when it becomes the last reader of a storage."""
    remaining = [len(us) for us in g.users]
    free = [0] * g.n
    for s, pr in enumerate(g.producers):
        if pr >= 0 and not g.is_output[s] and remaining[s] <= 1:
            free[g.users[s][0] if remaining[s] else pr] += g.sizes[s]
    net = [a - f for a, f in zip(g.alloc, free)]
    indeg = [len(ps) for ps in g.preds]
    done = [False] * g.n
    heap = [(rank(net[v], v), net[v], v) for v in range(g.n) if indeg[v] == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        _, k, v = heapq.heappop(heap)
        if done[v] or k != net[v]:
            continue  # stale entry: the node's net dropped since it was pushed
        done[v] = True
        order.append(v)
        for s in g.used[v]:
            remaining[s] -= 1
            if remaining[s] == 1 and not g.is_output[s]:
                w = next(u for u in g.users[s] if not done[u])  # now the last reader: it frees s
                net[w] -= g.sizes[s]
                if indeg[w] == 0:
                    heapq.heappush(heap, (rank(net[w], w), net[w], w))
        for w in g.succs[v]:
            indeg[w] -= 1
            if indeg[w] == 0:
                heapq.heappush(heap, (rank(net[w], w), net[w], w))
    return order


def _dfs(g: _Graph, pred_key: Sequence) -> list[int]:
    """Post-order DFS from the sinks: each node's inputs are finished one subtree at a time."""
    preds = [sorted(ps, key=lambda p: (pred_key[p], p)) for ps in g.preds]
    seen, order = [False] * g.n, []
    for root in (v for v in range(g.n) if not g.succs[v]):
        seen[root] = True
        stack = [(root, iter(preds[root]))]
        while stack:
            v, it = stack[-1]
            for p in it:
                if not seen[p]:
                    seen[p] = True
                    stack.append((p, iter(preds[p])))
                    break
            else:
                stack.pop()
                order.append(v)
    return order


def _levels(g: _Graph, topo: Sequence[int]) -> tuple[list[int], list[int]]:
    """Earliest level (longest path from a source) and latest level (depth minus longest path to a sink)."""
    early, height = [0] * g.n, [0] * g.n
    for v in topo:
        early[v] = max((early[p] + 1 for p in g.preds[v]), default=0)
    for v in reversed(topo):
        height[v] = max((height[w] + 1 for w in g.succs[v]), default=0)
    depth = max(early, default=0)
    return early, [depth - h for h in height]


def _heuristics(g: _Graph) -> list[tuple[str, list[int]]]:
    identity = list(range(g.n))
    early, late = _levels(g, identity)
    return [
        ("identity", identity),
        ("lpmf", _lpmf(g, lambda net, v: (net, v))),  # least memory after, Inductor's lpmf
        ("lpmf-traced", _lpmf(g, lambda net, v: (min(net, 0), v))),  # the most freeing first, else as traced
        ("nogrow-traced", _lpmf(g, lambda net, v: (net > 0, v))),  # as traced, what does not grow first
        ("bfs", _kahn(g, early)),
        ("alap", _kahn(g, late)),
        ("dfs", _dfs(g, range(g.n))),
        ("dfs-size", _dfs(g, g.footprint)),
    ]


def _solve_window(g: _Graph, order: list[int], profile: tuple, a: int, w: int, seconds: float, seed: int, work=None):
    """Reorder positions a..a+w-1 exactly, the rest fixed: (new window, its max live bytes, proved optimal).

    `work` caps CP-SAT's deterministic time (same answer on any machine), `seconds` its wall time."""
    mem, start, end = profile
    b = a + w
    nodes = order[a:b]
    local = {v: i for i, v in enumerate(nodes)}
    local_preds = [sorted({local[p] for p in g.preds[v] if p in local}) for v in nodes]
    anc, desc = [0] * w, [0] * w
    for i in range(w):  # nodes are in a topological order within the window
        for j in local_preds[i]:
            anc[i] |= anc[j] | (1 << j)
    for i in reversed(range(w)):
        for j in local_preds[i]:
            desc[j] |= desc[i] | (1 << i)
    lo = [anc[i].bit_count() for i in range(w)]
    hi = [w - 1 - desc[i].bit_count() for i in range(w)]
    model = cp_model.CpModel()
    x = [{t: model.new_bool_var(f"x{i}_{t}") for t in range(lo[i], hi[i] + 1)} for i in range(w)]
    done = []  # done[i][t]: node i runs at slot t or earlier (a constant outside its slots)
    for i in range(w):
        model.add_exactly_one(x[i].values())
        d = {}
        for t in range(lo[i], hi[i]):
            d[t] = model.new_bool_var(f"d{i}_{t}")
            model.add(d[t] == (d[t - 1] if t > lo[i] else 0) + x[i][t])
            model.add_hint(d[t], t >= i)  # the hints spell out the current order: node i at slot i
        done.append(d)
        for t, var in x[i].items():
            model.add_hint(var, t == i)

    def finished(i: int, t: int):
        return 0 if t < lo[i] else 1 if t >= hi[i] else done[i][t]

    for t in range(w):
        model.add_exactly_one(x[i][t] for i in range(w) if t in x[i])
    for i in range(w):
        for j in local_preds[i]:
            for t in range(lo[i], hi[i]):
                if t - 1 >= lo[j] and t - 1 < hi[j]:
                    model.add_implication(done[i][t], done[j][t - 1])
    touching = sorted({s for v in nodes for s in g.produced[v] + g.used[v]})
    terms: list[list] = [[] for _ in range(w)]
    base = [mem[a + t] for t in range(w)]
    for s in touching:
        size, pr = g.sizes[s], g.producers[s]
        for t in range(max(start[s], a), min(end[s], b - 1) + 1):
            base[t - a] -= size
        readers = [local[u] for u in g.users[s] if u in local]
        lasts = g.is_output[s] or end[s] >= b  # live past the window whatever its order
        for t in range(w):
            made = finished(local[pr], t) if pr in local else 1
            if lasts:
                live = made
            elif not readers:
                live = x[local[pr]].get(t, 0)
            else:  # live once made until every reader in the window has run
                bounds = [e for r in readers if not isinstance(e := made - finished(r, t - 1), int) or e > 0]
                if not bounds or any(isinstance(e, int) for e in bounds):
                    live = 1 if bounds else 0
                else:
                    live = model.new_bool_var(f"l{s}_{t}")
                    model.add_hint(live, start[s] <= a + t <= end[s])
                    for e in bounds:
                        model.add(live >= e)
            if not isinstance(live, int) or live:
                terms[t].append(size * live)
    offset = min(base)
    cap = max(mem[a:b]) - offset + sum(g.sizes[s] for s in touching)
    z = model.new_int_var(0, cap, "peak")
    model.add_hint(z, max(mem[a:b]) - offset)
    for t in range(w):
        model.add(z >= base[t] - offset + sum(terms[t]))
    model.minimize(z)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(seconds, 0.01)
    if work is not None:
        solver.parameters.max_deterministic_time = work
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = seed
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    slot = {i: next(t for t, var in x[i].items() if solver.value(var)) for i in range(w)}
    window = [nodes[i] for i in sorted(range(w), key=slot.__getitem__)]
    return window, round(solver.objective_value) + offset, status == cp_model.OPTIMAL


def _positions(order: Sequence[int]) -> list[int]:
    pos = [0] * len(order)
    for i, v in enumerate(order):
        pos[v] = i
    return pos


def solve_order(problem: OrderProblem, *, time_limit_s: float = 5.0, window: int = 40, seed: int = 0) -> OrderSolution:
    """A topological order with a peak no higher than the traced order's, lower where the search finds one.

    Heuristics first (always run), then CP-SAT on windows of `window` positions
    around the peak while `time_limit_s` lasts. Each window solve is
    single-threaded with `seed` and capped in deterministic time, so results
    repeat unless the wall clock runs out first."""
    began = time.perf_counter()
    if time_limit_s < 0 or window < 0:
        raise ValueError(f"time_limit_s and window must be >= 0, got {time_limit_s} and {window}")
    g = _Graph(problem)
    identity = list(range(g.n))
    try:
        g.check(identity)
    except ValueError as e:
        raise ValueError(f"number nodes in a topological order; the traced order 0..{g.n - 1} is not: {e}") from None
    peak_before = max(g.profile(identity)[0], default=g.static)
    lower = g.lower_bound()
    method, order, best = "identity", identity, peak_before
    for name, candidate in _heuristics(g):
        p = max(g.profile(_positions(candidate))[0], default=g.static)
        if p < best:
            method, order, best = name, candidate, p
    w = min(window, g.n)
    tried: set[tuple[int, int]] = set()
    improved = proved = False
    deadline = began + time_limit_s
    while w >= 2 and best > lower and not proved:
        profile = g.profile(_positions(order))
        at_peak = [i for i, m in enumerate(profile[0]) if m == best]
        starts = (min(max(i + shift, 0), g.n - w) for i in at_peak for shift in (-(w // 2), 0, 1 - w))
        a = next((a for a in starts if (a, w) not in tried), None)
        left = deadline - time.perf_counter()
        if a is None or left <= 0:
            break
        result = _solve_window(g, order, profile, a, w, left, seed, work=max(0.1, time_limit_s / 10))
        b, window_max = a + w, max(profile[0][a : a + w])
        tried.add((a, w))
        proved = result is not None and result[2] and w == g.n
        if result is None or not result[2]:  # out of time: smaller windows from now on
            w = max(w // 2, min(w, 8))
        if result is None or result[1] >= window_max:
            continue
        candidate = order[:a] + result[0] + order[b:]
        p = max(g.profile(_positions(candidate))[0])
        if p > best:  # cannot happen while the window model is exact; never accept a worse order
            log.warning("order window %d..%d claimed %d bytes but peaks at %d", a, b - 1, result[1], p)
            continue
        order, best, improved = candidate, p, True
        tried.clear()
    if best >= peak_before:
        status = "unchanged"
        order, best, method = identity, peak_before, "identity"
    else:
        status = "optimal" if proved or best <= lower else "feasible"
        method += "+cp-sat-window" if improved else ""
    if proved:
        lower = max(lower, best)
    return OrderSolution(
        order=tuple(order),
        peak_before=peak_before,
        peak_after=best,
        changed=best < peak_before,
        status=status,
        method=method,
        seconds=time.perf_counter() - began,
        lower_bound=min(lower, best),
    )
