"""Tensor reuse as dynamic storage allocation: one arena, an offset per buffer.

Buffers live on inclusive step intervals; two buffers live at the same step
must not overlap in bytes. A portfolio of greedy best-fit placements handles
any size; on small problems an iterated greedy and then CP-SAT (NoOverlap2D,
warm-started from the best so far) polish and prove. Plain data in and out.
"""

from __future__ import annotations

import logging
import math
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

log = logging.getLogger(__name__)

ORDERINGS = ("size", "conflict", "area", "lifetime", "start")
_BIG = np.iinfo(np.int64).max // 4


@dataclass(frozen=True, slots=True)
class LayoutProblem:
    """Buffers by index. Steps are inclusive; sizes are bytes (0 is allowed and gets offset 0).

    A same_buffer group shares one offset and occupies its largest aligned size
    from its first member's start to its last member's end."""

    sizes: tuple[int, ...]
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    alignment: int = 64
    same_buffer: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        def ints(name: str, values: Sequence[int]) -> tuple[int, ...]:
            try:
                return tuple(operator.index(v) for v in values)
            except TypeError:
                raise ValueError(f"LayoutProblem.{name} must hold integers, got {values!r:.80}") from None

        sizes, starts, ends = ints("sizes", self.sizes), ints("starts", self.starts), ints("ends", self.ends)
        if not len(sizes) == len(starts) == len(ends):
            raise ValueError(
                f"LayoutProblem: sizes, starts and ends must have one entry per buffer, "
                f"got {len(sizes)}, {len(starts)} and {len(ends)}"
            )
        for i, (size, start, end) in enumerate(zip(sizes, starts, ends)):
            if size < 0:
                raise ValueError(f"LayoutProblem: buffer {i} has negative size {size}")
            if start > end:
                raise ValueError(f"LayoutProblem: buffer {i} starts at step {start} after it ends at step {end}")
        alignment = ints("alignment", (self.alignment,))[0]
        if alignment <= 0:
            raise ValueError(f"LayoutProblem: alignment must be a positive integer, got {alignment!r}")
        groups = tuple(ints("same_buffer", g) for g in self.same_buffer)
        for g, group in enumerate(groups):
            for b in group:
                if not 0 <= b < len(sizes):
                    raise ValueError(
                        f"LayoutProblem: same_buffer group {g} names buffer {b}, but buffers are 0..{len(sizes) - 1}"
                    )
        fields = dict(sizes=sizes, starts=starts, ends=ends, alignment=alignment, same_buffer=groups)
        for name, value in fields.items():
            object.__setattr__(self, name, value)


@dataclass(frozen=True, slots=True)
class LayoutSolution:
    offsets: tuple[int, ...]
    arena_bytes: int
    lower_bound_bytes: int
    fragmentation: float
    status: str  # "optimal" (arena equals a proven bound) | "feasible"
    method: str  # the greedy ordering ("greedy-size", ...) or "cp-sat" that produced the offsets
    seconds: float


@dataclass(frozen=True, slots=True)
class _Items:
    """Buffers merged by same_buffer group, sizes in alignment units; zero-size items are left out."""

    units: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    item_of: np.ndarray  # buffer -> item, -1 for a zero-size buffer (offset 0)


def _merge(problem: LayoutProblem) -> _Items:
    n = len(problem.sizes)
    parent = list(range(n))

    def root(b: int) -> int:
        while parent[b] != b:
            parent[b] = parent[parent[b]]
            b = parent[b]
        return b

    for group in problem.same_buffer:
        for b in group[1:]:
            parent[root(b)] = root(group[0])
    align = problem.alignment
    units: dict[int, int] = {}
    span: dict[int, tuple[int, int]] = {}
    for b in range(n):
        r = root(b)
        units[r] = max(units.get(r, 0), -(-problem.sizes[b] // align))
        lo, hi = span.get(r, (problem.starts[b], problem.ends[b]))
        span[r] = (min(lo, problem.starts[b]), max(hi, problem.ends[b]))
    roots = [r for r in units if units[r] > 0]  # first-seen order: deterministic
    index = {r: i for i, r in enumerate(roots)}
    item_of = np.array([index.get(root(b), -1) for b in range(n)], dtype=np.int64)
    return _Items(
        np.array([units[r] for r in roots], dtype=np.int64),
        np.array([span[r][0] for r in roots], dtype=np.int64),
        np.array([span[r][1] for r in roots], dtype=np.int64),
        item_of,
    )


def _peak(items: _Items) -> int:
    """Max over steps of the live units: a sweep over interval endpoints, frees before allocations."""
    if len(items.units) == 0:
        return 0
    steps = np.concatenate((items.starts, items.ends + 1))
    deltas = np.concatenate((items.units, -items.units))
    order = np.lexsort((deltas, steps))
    return int(np.cumsum(deltas[order]).max())


def lower_bound(problem: LayoutProblem) -> int:
    """Bytes no layout can beat: the largest sum of aligned live sizes at one step (groups counted once)."""
    return _peak(_merge(problem)) * problem.alignment


def _ordering(items: _Items, name: str) -> np.ndarray:
    """Item indices in placement order (np.lexsort: the last key leads); ties go to lower indices."""
    u, s, e = items.units, items.starts, items.ends
    life = e - s + 1
    if name == "size":
        keys = (-life, -u)
    elif name == "lifetime":
        keys = (-u, -life)
    elif name == "start":
        keys = (-u, s)
    elif name == "area":
        keys = (-u, -(u * life))
    elif name == "conflict":  # bytes live alongside the item at some step: the pressure it sits under
        by_end, by_start = np.sort(e), np.sort(s)
        end_cum = np.concatenate(([0], np.cumsum(u[np.argsort(e, kind="stable")])))
        start_cum = np.concatenate(([0], np.cumsum(u[np.argsort(s, kind="stable")])))
        ended_before = end_cum[np.searchsorted(by_end, s, side="left")]
        started_after = start_cum[-1] - start_cum[np.searchsorted(by_start, e, side="right")]
        keys = (-u, -(end_cum[-1] - ended_before - started_after))
    else:
        raise ValueError(f"unknown layout ordering {name!r}; use one of {', '.join(ORDERINGS)}")
    return np.lexsort((np.arange(len(u)),) + keys)


def _place(items: _Items, order: np.ndarray) -> np.ndarray:
    """Best-fit into gaps: each item takes the tightest gap among placed items live at one of its steps.

    Placed items are kept sorted by offset, so the gaps fall out of one masked scan, with no sort."""
    u, s, e = items.units, items.starts, items.ends
    table = np.zeros((5, len(u)), dtype=np.int64)  # rows: offset, top, start, end, item; sorted by offset
    for k, i in enumerate(order.tolist()):
        low, high, start, end = table[:4, :k]
        near = (start <= e[i]) & (end >= s[i])
        offset = 0
        if near.any():
            gap_lo = np.concatenate(([0], np.maximum.accumulate(high[near])))
            room = np.append(low[near], _BIG) - gap_lo
            room[room < u[i]] = _BIG + 1
            offset = int(gap_lo[int(np.argmin(room))])
        pos = int(np.searchsorted(low, offset, side="right"))
        table[:, pos + 1 : k + 1] = table[:, pos:k]
        table[:, pos] = (offset, offset + u[i], s[i], e[i], i)
    offsets = np.empty(len(u), dtype=np.int64)
    offsets[table[4]] = table[0]
    return offsets


def _swaps(
    items: _Items, order: np.ndarray, placed: np.ndarray, bound: int, rounds: int, seed: int
) -> tuple[np.ndarray, bool]:
    """Iterated greedy: swap one to three pairs in the placement order and keep the result
    when the arena does not grow. A fixed number of rounds, so the result is reproducible."""
    rng = np.random.default_rng(seed)
    arena = int((placed + items.units).max())
    improved = False
    for _ in range(rounds):
        if arena == bound:
            break
        trial = order.copy()
        for _ in range(int(rng.integers(1, 4))):
            i, j = rng.integers(0, len(order), 2)
            trial[i], trial[j] = trial[j], trial[i]
        moved = _place(items, trial)
        height = int((moved + items.units).max())
        if height <= arena:
            improved |= height < arena
            order, placed, arena = trial, moved, height
    return placed, improved


def _exact(
    items: _Items, hint: np.ndarray, bound: int, time_limit_s: float, seed: int
) -> tuple[np.ndarray | None, int]:
    """CP-SAT over offsets (in units) below the hint's arena; returns a better layout or None, and a bound."""
    u, s, e = items.units.tolist(), items.starts.tolist(), items.ends.tolist()
    best = int((hint + items.units).max())
    model = cp_model.CpModel()
    arena = model.new_int_var(bound, best, "arena")
    hint = hint.copy()
    twins: dict[tuple[int, int, int], list[int]] = {}
    for i, key in enumerate(zip(u, s, e)):
        twins.setdefault(key, []).append(i)
    for same in twins.values():  # identical items are interchangeable: order them, hint included
        hint[same] = np.sort(hint[same])
    xs, x_iv, t_iv = [], [], []
    for i in range(len(u)):
        x = model.new_int_var(0, best - u[i], f"x{i}")
        xs.append(x)
        x_iv.append(model.new_fixed_size_interval_var(x, u[i], f"x_iv{i}"))
        t_iv.append(model.new_fixed_size_interval_var(s[i], e[i] + 1 - s[i], f"t_iv{i}"))
        model.add(x + u[i] <= arena)
        model.add_hint(x, int(hint[i]))
    for same in twins.values():
        for a, b in zip(same, same[1:]):
            model.add(xs[a] < xs[b])
    model.add_no_overlap_2d(x_iv, t_iv)
    model.add_hint(arena, best)
    model.minimize(arena)
    solver = cp_model.CpSolver()
    solver.parameters.random_seed = seed
    solver.parameters.num_workers = 1  # one worker searches the same path every run
    solver.parameters.max_time_in_seconds = time_limit_s
    status = solver.solve(model)
    log.debug("layout cp-sat: %s in %.3fs, %d items", solver.status_name(status), solver.wall_time, len(u))
    if status == cp_model.OPTIMAL:
        bound = max(bound, round(solver.objective_value))
    elif status == cp_model.FEASIBLE:
        bound = max(bound, math.ceil(solver.best_objective_bound - 1e-6))
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE) and solver.objective_value < best:
        return np.array([solver.value(x) for x in xs], dtype=np.int64), min(bound, best)
    return None, min(bound, best)


def _solution(
    problem: LayoutProblem, items: _Items, placed: np.ndarray, bound: int, method: str, began: float
) -> LayoutSolution:
    align = problem.alignment
    arena = int((placed + items.units).max()) * align if len(placed) else 0
    bound *= align
    full = np.append(placed * align, 0)[items.item_of]  # item -1 (zero-size buffer) -> offset 0
    return LayoutSolution(
        offsets=tuple(full.tolist()),
        arena_bytes=arena,
        lower_bound_bytes=bound,
        fragmentation=(arena - bound) / arena if arena else 0.0,
        status="optimal" if arena == bound else "feasible",
        method=method,
        seconds=time.perf_counter() - began,
    )


def greedy_layout(problem: LayoutProblem, ordering: str = "size") -> LayoutSolution:
    """One greedy best-fit placement under one of ORDERINGS (no early stop, no CP-SAT)."""
    began = time.perf_counter()
    items = _merge(problem)
    placed = _place(items, _ordering(items, ordering))
    return _solution(problem, items, placed, _peak(items), f"greedy-{ordering}", began)


def solve_layout(
    problem: LayoutProblem,
    *,
    time_limit_s: float = 5.0,
    exact_max_buffers: int = 150,
    seed: int = 0,
    swap_rounds: int = 300,
) -> LayoutSolution:
    """Offsets for every buffer: the greedy portfolio (stopping once one meets the bound); then, with
    at most exact_max_buffers buffers (after merging groups), swap_rounds of iterated greedy and
    CP-SAT warm-started from the best, for what is left of time_limit_s (the greedy steps always run).

    Reproducible: the greedy steps are counted, not timed, and CP-SAT runs one worker with a fixed
    seed; only a CP-SAT run cut by the time limit can end on a different (never worse) layout."""
    began = time.perf_counter()
    items = _merge(problem)
    bound = _peak(items)
    if len(items.units) == 0:
        return _solution(problem, items, np.zeros(0, dtype=np.int64), 0, "empty", began)
    best, best_order, best_arena, method = None, None, _BIG, ""
    for name in ORDERINGS:
        order = _ordering(items, name)
        placed = _place(items, order)
        arena = int((placed + items.units).max())
        if arena < best_arena:
            best, best_order, best_arena, method = placed, order, arena, f"greedy-{name}"
        if best_arena == bound:
            break
    log.debug("layout greedy: %s arena %d units, bound %d", method, best_arena, bound)
    if best_arena > bound and len(items.units) <= exact_max_buffers:
        best, improved = _swaps(items, best_order, best, bound, swap_rounds, seed)
        method += "+swaps" if improved else ""
        best_arena = int((best + items.units).max())
    left = time_limit_s - (time.perf_counter() - began)
    if best_arena > bound and len(items.units) <= exact_max_buffers and left > 0:
        exact, bound = _exact(items, best, bound, left, seed)
        if exact is not None:
            best, method = exact, "cp-sat"
    return _solution(problem, items, best, bound, method, began)


def check_layout(problem: LayoutProblem, offsets: Sequence[int]) -> None:
    """Raise ValueError unless every offset is aligned, groups share offsets, and no two
    buffers live at one step overlap in bytes (sizes rounded up to the alignment)."""
    n, align = len(problem.sizes), problem.alignment
    if len(offsets) != n:
        raise ValueError(f"layout has {len(offsets)} offsets for {n} buffers")
    off = np.array([int(o) for o in offsets], dtype=np.int64)
    for b, o in enumerate(off.tolist()):
        if o < 0 or o % align:
            raise ValueError(f"buffer {b} has offset {o}, which is not a non-negative multiple of {align}")
    for g, members in enumerate(problem.same_buffer):
        for b in members:
            if off[b] != off[members[0]]:
                raise ValueError(
                    f"same_buffer group {g} is broken: buffer {members[0]} at offset {off[members[0]]}, "
                    f"buffer {b} at offset {off[b]}"
                )
    items = _merge(problem)  # buffers in one group may overlap each other: they alias on purpose
    group = np.where(items.item_of >= 0, items.item_of, -1 - np.arange(n))
    size = -(-np.array(problem.sizes, dtype=np.int64) // align) * align
    s, e = np.array(problem.starts, dtype=np.int64), np.array(problem.ends, dtype=np.int64)
    by_start = np.lexsort((np.arange(n), s))
    s_sorted = s[by_start]
    for p, a in enumerate(by_start.tolist()):  # pairs (a, b): b starts within a's interval, after a
        if size[a] == 0:
            continue
        cand = by_start[p + 1 : np.searchsorted(s_sorted, e[a], side="right")]
        apart = (off[cand] >= off[a] + size[a]) | (off[a] >= off[cand] + size[cand]) | (size[cand] == 0)
        hit = cand[~apart & (group[cand] != group[a])]
        if hit.size:
            b = int(hit[0])
            raise ValueError(
                f"buffers {a} and {b} overlap: buffer {a} bytes [{off[a]}, {off[a] + size[a]}) live at steps "
                f"[{s[a]}, {e[a]}], buffer {b} bytes [{off[b]}, {off[b] + size[b]}) live at steps [{s[b]}, {e[b]}]"
            )
