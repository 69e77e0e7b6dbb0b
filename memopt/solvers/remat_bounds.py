"""Lower bounds for keep/recompute plans: a covering knapsack at every node over budget.

The bytes above budget must be freed there, by candidates whose storage is gone
then (after its last forward reader, outside its copy's life), each at least at
the cost of the nodes its copy certainly runs. No torch.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass


from memopt.solvers.remat_sim import INFINITY, RecomputeProblem, _outputs, _replay


@dataclass(frozen=True)
class Spans:
    """Per candidate, where its storage lives kept and recomputed, in original node positions.

    What bounds need: recomputed, the storage lives to ``forward_end``, and its
    copy at least from ``copy_start`` to ``copy_end`` (empty when start > end);
    the copy certainly runs the ``copied`` nodes. ``extensions``: inputs of
    those copies that outlive their own end when nothing recomputes them:
    (storage, first position past its end, the copied node that reads it,
    candidates that must all be kept for that); the storage then lives until
    the copy, which comes no earlier than the first backward node reading the copied node or a node
    it feeds through recomputed nodes.
    """

    kept_end: tuple[int, ...]  # last position the storage lives when kept (n: to the end of the graph)
    forward_end: tuple[int, ...]
    copy_start: tuple[int, ...]
    copy_end: tuple[int, ...]
    copied: tuple[frozenset[int], ...]
    extensions: tuple[tuple[tuple[int, int, int, tuple[int, ...]], ...], ...]
    kept_profile: tuple[int, ...]  # bytes live at each node with nothing recomputed
    holders: dict[int, tuple[int, ...]]  # per forward node in some candidate: the candidates holding it


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
    holders: dict[int, list[int]] = {}
    for i, c in enumerate(problem.candidates):
        for node in c.nodes:
            holders.setdefault(node, []).append(i)
    storages = {c.storage for c in problem.candidates}
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
                    if outputs[t] or (t in storages and not any(problem.candidates[d].storage == t for d in needs)):
                        continue
                    items.append((t, kept_end[t] + 1, node, needs))
        extensions.append(tuple(items))
    replay = _replay(problem, ())
    result = Spans(
        tuple(kept_end[c.storage] for c in problem.candidates), tuple(forward_end), tuple(copy_start),
        tuple(copy_end), tuple(copied), tuple(extensions), tuple(int(v) for v in replay.profile[:n]),
        {node: tuple(h) for node, h in holders.items()},
    )
    object.__setattr__(problem, "_spans", result)
    return result


def lower_bound(problem: RecomputeProblem, budget_bytes: int, *, allowed: Collection[int] | None = None) -> float:
    """Seconds of recomputation every plan of ``allowed`` candidates (all by default) with peak <= budget needs.

    A covering knapsack at every node (see the module's doc): a node shared by
    several candidates' copies is split among them; the cheapest bytes per
    second are taken first, fractionally.
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
