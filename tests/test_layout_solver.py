"""The layout solver: exact offsets on tiny cases, invariants on random interval sets."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memopt.solvers.layout import (
    ORDERINGS,
    LayoutProblem,
    check_layout,
    greedy_layout,
    lower_bound,
    solve_layout,
)


def problem(*buffers: tuple[int, int, int], alignment: int = 64, same_buffer=()) -> LayoutProblem:
    """Buffers as (size, start, end)."""
    sizes, starts, ends = zip(*buffers) if buffers else ((), (), ())
    return LayoutProblem(sizes, starts, ends, alignment, same_buffer)


# --- tiny hand-built cases -------------------------------------------------------------------------


def test_empty_problem():
    solution = solve_layout(problem())
    assert solution.offsets == () and solution.arena_bytes == 0 and solution.lower_bound_bytes == 0
    assert solution.fragmentation == 0.0 and solution.status == "optimal"


def test_single_buffer_is_rounded_up_to_the_alignment():
    solution = solve_layout(problem((100, 3, 3)))
    assert solution.offsets == (0,) and solution.arena_bytes == 128 == solution.lower_bound_bytes
    assert solution.status == "optimal" and solution.fragmentation == 0.0


def test_buffers_disjoint_in_time_share_offset_zero():
    solution = solve_layout(problem((256, 0, 1), (512, 2, 3)))
    assert solution.offsets == (0, 0) and solution.arena_bytes == 512 and solution.status == "optimal"


def test_buffers_live_only_at_one_shared_step_do_not_share():
    p = problem((64, 2, 2), (64, 2, 2))  # start == end, identical intervals
    solution = solve_layout(p)
    assert sorted(solution.offsets) == [0, 64] and solution.arena_bytes == 128


def test_three_mutually_overlapping_buffers_are_stacked_largest_first():
    p = problem((100, 0, 5), (300, 1, 4), (200, 2, 3))  # aligned: 128, 320, 256
    solution = solve_layout(p)
    assert solution.offsets == (576, 0, 320)
    assert solution.arena_bytes == 704 == solution.lower_bound_bytes == lower_bound(p)
    assert solution.method == "greedy-size" and solution.status == "optimal"


def test_cp_sat_finds_the_optimum_where_every_greedy_falls_short():
    # Two big buffers (A at step 1, B at step 3) and two small ones chained across them (D over
    # steps 0..2, C over 2..3). Size order puts A and B at 0 and D on top of A; C, live with both
    # B and D at step 2, then lands above D. The optimum lifts A above D so that C sits on B.
    p = problem((192, 1, 1), (192, 3, 3), (64, 2, 3), (64, 0, 2))
    assert lower_bound(p) == 256
    assert greedy_layout(p, "size").offsets == (0, 0, 256, 192)
    assert all(greedy_layout(p, name).arena_bytes == 320 for name in ORDERINGS)
    solution = solve_layout(p, swap_rounds=0)
    check_layout(p, solution.offsets)
    assert solution.arena_bytes == 256 == solution.lower_bound_bytes
    assert solution.method == "cp-sat" and solution.status == "optimal"
    swapped = solve_layout(p, time_limit_s=0.0)  # iterated greedy finds it too, before CP-SAT
    assert swapped.arena_bytes == 256 and swapped.method.endswith("+swaps")
    greedy_only = solve_layout(p, exact_max_buffers=0)
    assert greedy_only.arena_bytes == 320 and greedy_only.status == "feasible"
    assert greedy_only.fragmentation == pytest.approx(64 / 320)


def test_same_buffer_group_shares_one_offset_and_spans_its_members():
    # an in-place chain x -> relu_(x) -> add_(x): three names, one storage, live over steps 0..6
    p = problem((256, 0, 2), (256, 2, 4), (128, 4, 6), (512, 3, 3), (64, 7, 8), same_buffer=((0, 1), (1, 2)))
    solution = solve_layout(p)
    check_layout(p, solution.offsets)
    assert solution.offsets[0] == solution.offsets[1] == solution.offsets[2]
    assert lower_bound(p) == 256 + 512 == solution.arena_bytes
    assert solution.offsets[4] == 0


def test_zero_size_buffers_get_offset_zero():
    solution = solve_layout(problem((0, 0, 3), (64, 0, 3)))
    assert solution.offsets == (0, 0) and solution.arena_bytes == 64


def test_lower_bound_frees_before_it_allocates():
    assert lower_bound(problem((64, 0, 1), (64, 2, 3), (64, 1, 2))) == 128
    assert lower_bound(problem((100, 0, 0), alignment=1)) == 100


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sizes": (-1,), "starts": (0,), "ends": (0,)}, "negative size"),
        ({"sizes": (64,), "starts": (3,), "ends": (2,)}, "starts at step 3 after it ends at step 2"),
        ({"sizes": (64, 64), "starts": (0,), "ends": (0, 1)}, "one entry per buffer"),
        ({"sizes": (64,), "starts": (0,), "ends": (0,), "alignment": 0}, "alignment"),
        ({"sizes": (64,), "starts": (0,), "ends": (0,), "same_buffer": ((0, 4),)}, "names buffer 4"),
        ({"sizes": (6.5,), "starts": (0,), "ends": (0,)}, "integers"),
    ],
)
def test_invalid_problems_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayoutProblem(**kwargs)


def test_check_layout_names_what_is_wrong():
    p = problem((128, 0, 2), (64, 2, 4), (64, 5, 6), same_buffer=((1, 2),))
    check_layout(p, (0, 128, 128))
    with pytest.raises(ValueError, match="buffers 0 and 1 overlap"):
        check_layout(p, (0, 64, 64))
    with pytest.raises(ValueError, match="buffer 1 has offset 100"):
        check_layout(p, (0, 100, 100))
    with pytest.raises(ValueError, match="same_buffer group 0 is broken"):
        check_layout(p, (0, 128, 192))
    with pytest.raises(ValueError, match="2 offsets for 3 buffers"):
        check_layout(p, (0, 128))


def test_two_thousand_random_buffers_place_validly():
    rng = random.Random(0)
    n, steps = 2000, 4000
    sizes = [int(64 * 2 ** rng.uniform(0, 20)) for _ in range(n)]
    starts = [rng.randrange(steps) for _ in range(n)]
    ends = [min(steps - 1, s + int(2 ** rng.uniform(0, 12))) for s in starts]
    p = LayoutProblem(tuple(sizes), tuple(starts), tuple(ends))
    solution = solve_layout(p)
    check_layout(p, solution.offsets)
    assert solution.lower_bound_bytes == lower_bound(p) <= solution.arena_bytes
    assert solution.method.startswith("greedy-") and 0.0 <= solution.fragmentation < 0.5


# --- properties on random interval sets ----------------------------------------------------------


@st.composite
def problems(draw, max_buffers: int = 10) -> LayoutProblem:
    n = draw(st.integers(0, max_buffers))
    sizes = draw(st.lists(st.integers(0, 600), min_size=n, max_size=n))
    starts = draw(st.lists(st.integers(0, 8), min_size=n, max_size=n))
    ends = [s + draw(st.integers(0, 4)) for s in starts]
    groups = []
    if n >= 2 and draw(st.booleans()):
        members = draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=3, unique=True))
        groups.append(tuple(members))
    alignment = draw(st.sampled_from([1, 64, 256]))
    return LayoutProblem(tuple(sizes), tuple(starts), tuple(ends), alignment, tuple(groups))


@settings(max_examples=50, deadline=None)
@given(problems())
def test_solutions_are_valid_and_no_worse_than_any_greedy(p):
    solution = solve_layout(p, time_limit_s=2.0)
    check_layout(p, solution.offsets)
    assert lower_bound(p) <= solution.lower_bound_bytes <= solution.arena_bytes
    assert (solution.status == "optimal") == (solution.arena_bytes == solution.lower_bound_bytes)
    assert all(o % p.alignment == 0 for o in solution.offsets)
    for group in p.same_buffer:
        assert len({solution.offsets[b] for b in group}) == 1
    for name in ORDERINGS:
        greedy = greedy_layout(p, name)
        check_layout(p, greedy.offsets)
        assert solution.arena_bytes <= greedy.arena_bytes


def overlapping_pair(p: LayoutProblem, offsets) -> bool:
    """Brute force: two buffers of different groups, live at one step, sharing a byte."""
    align, group = p.alignment, list(range(len(p.sizes)))
    for members in p.same_buffer:
        for b in members:
            old = group[b]
            group = [group[members[0]] if g == old else g for g in group]
    size = [-(-s // align) * align for s in p.sizes]
    return any(
        group[a] != group[b]
        and max(p.starts[a], p.starts[b]) <= min(p.ends[a], p.ends[b])
        and max(offsets[a], offsets[b]) < min(offsets[a] + size[a], offsets[b] + size[b])
        for a in range(len(size))
        for b in range(a)
    )


@settings(max_examples=50, deadline=None)
@given(problems(), st.data())
def test_check_layout_agrees_with_brute_force(p, data):
    offsets = [p.alignment * data.draw(st.integers(0, 6)) for _ in p.sizes]
    for members in p.same_buffer:
        for b in members:
            offsets[b] = offsets[members[0]]
    if overlapping_pair(p, offsets):
        with pytest.raises(ValueError, match="overlap"):
            check_layout(p, offsets)
    else:
        check_layout(p, offsets)


@settings(max_examples=30, deadline=None)
@given(problems(max_buffers=14))
def test_same_input_gives_the_same_layout(p):
    first, second = solve_layout(p, time_limit_s=2.0, seed=3), solve_layout(p, time_limit_s=2.0, seed=3)
    assert (first.offsets, first.arena_bytes, first.lower_bound_bytes, first.status, first.method) == (
        second.offsets,
        second.arena_bytes,
        second.lower_bound_bytes,
        second.status,
        second.method,
    )
