"""The order solver: hand-built graphs with known best orders, and invariants on random DAGs."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memopt.solvers.order import (
    OrderProblem,
    _Graph,
    _heuristics,
    _positions,
    _solve_window,
    check_order,
    peak,
    simulate,
    solve_order,
)


def problem(num_nodes, storages, edges=(), static_bytes=0):
    """storages: (size, producer, users, is_output) tuples."""
    sizes, producers, users, outputs = zip(*storages) if storages else ((), (), (), ())
    users = tuple(tuple(u) for u in users)
    return OrderProblem(num_nodes, sizes, producers, users, outputs, tuple(edges), static_bytes)


# x (input, 10 B) feeds two branches a1 -> a2 and b1 -> b2 (100 B then 1 B); c = a2 + b2 is the output.
# The traced order 0..4 runs a1, b1, a2, b2, c: both 100 B intermediates are live at once.
TWO_BRANCHES = problem(
    5,
    [
        (10, -1, (0, 1), False),  # x
        (100, 0, (2,), False),  # a1
        (100, 1, (3,), False),  # b1
        (1, 2, (4,), False),  # a2
        (1, 3, (4,), False),  # b2
        (1, 4, (), True),  # c
    ],
)


def test_simulate_counts_inputs_outputs_and_unread_storages():
    p = problem(
        3,
        [
            (7, -1, (), False),  # graph input, read by nobody: live throughout all the same
            (100, 0, (2,), False),
            (5, 0, (), False),  # never read: live only at its producer
            (3, 1, (), True),  # output: live from its producer to the end
        ],
        static_bytes=1000,
    )
    assert simulate(p, [0, 1, 2]) == (1112, 1110, 1110)
    assert peak(p, [0, 1, 2]) == 1112
    assert simulate(p, [1, 0, 2]) == (1010, 1115, 1110)


def test_two_branches_finish_one_branch_before_starting_the_other():
    assert simulate(TWO_BRANCHES, range(5)) == (110, 210, 211, 112, 13)
    sol = solve_order(TWO_BRANCHES)
    assert sol.order in {(0, 2, 1, 3, 4), (1, 3, 0, 2, 4)}
    assert simulate(TWO_BRANCHES, sol.order) == (110, 111, 111, 112, 13)
    assert (sol.peak_before, sol.peak_after, sol.changed, sol.status) == (211, 112, True, "optimal")
    assert sol.lower_bound == 112


def test_free_the_big_one_early():
    # 0 makes big (100), 1 makes y (50), 2 reads big last and makes b (1), 3 reads y and b.
    # Traced: y is made while big is still live; running 2 before 1 frees big first.
    p = problem(4, [(100, 0, (2,), False), (50, 1, (3,), False), (1, 2, (3,), False), (1, 3, (), True)])
    assert simulate(p, range(4)) == (100, 150, 151, 52)
    sol = solve_order(p)
    assert sol.order == (0, 2, 1, 3)
    assert (sol.peak_before, sol.peak_after, sol.status) == (151, 101, "optimal")


def test_extra_edges_are_respected():
    def with_edges(*edges):
        t = TWO_BRANCHES
        return OrderProblem(5, t.sizes, t.producers, t.users, t.is_output, edges, t.static_bytes)

    b1_before_a2 = with_edges((1, 2))  # only the b branch can go first now
    sol = solve_order(b1_before_a2)
    assert (sol.order, sol.peak_after) == ((1, 3, 0, 2, 4), 112)
    interleaved = with_edges((1, 2), (2, 3))  # b1, a2, b2: both 100 B intermediates meet at a2
    assert solve_order(interleaved).status == "unchanged"


def test_an_order_that_cannot_improve_is_returned_unchanged():
    chain = problem(3, [(10, 0, (1,), False), (20, 1, (2,), False), (5, 2, (), True)])
    sol = solve_order(chain)
    assert sol.order == (0, 1, 2)
    assert (sol.changed, sol.status, sol.method, sol.peak_after) == (False, "unchanged", "identity", 30)


def test_invalid_problems_and_orders_are_named():
    with pytest.raises(ValueError, match="users has 1 entries but sizes has 2"):
        solve_order(OrderProblem(2, (1, 1), (0, 1), ((1,),), (False, False)))
    with pytest.raises(ValueError, match="storage 0 has producer 5"):
        solve_order(problem(2, [(1, 5, (), False)]))
    with pytest.raises(ValueError, match="negative size"):
        solve_order(problem(2, [(-1, 0, (1,), False)]))
    with pytest.raises(ValueError, match=r"edge \(1, 1\)"):
        solve_order(problem(2, [(1, 0, (1,), False)], edges=[(1, 1)]))
    with pytest.raises(ValueError, match="traced order 0..1 is not: .*node 0 reads storage 0 made by node 1"):
        solve_order(problem(2, [(1, 1, (0,), False)]))
    with pytest.raises(ValueError, match=r"but edge \(1, 0\)"):
        solve_order(problem(2, [(1, 0, (1,), False)], edges=[(1, 0)]))  # a cycle
    message = r"node 2 \(position 0\) before node 0 \(position 1\), but node 2 reads storage 1 made by node 0"
    with pytest.raises(ValueError, match=message):
        check_order(TWO_BRANCHES, [2, 0, 1, 3, 4])
    with pytest.raises(ValueError, match="not a permutation"):
        check_order(TWO_BRANCHES, [0, 0, 1, 2, 3])
    with pytest.raises(ValueError, match="order has 4 nodes"):
        simulate(TWO_BRANCHES, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="window must be >= 0"):
        solve_order(TWO_BRANCHES, window=-1)


def test_empty_graph():
    sol = solve_order(problem(0, [(4, -1, (), False)], static_bytes=1))
    assert (sol.order, sol.peak_before, sol.peak_after, sol.status) == ((), 5, 5, "unchanged")


@st.composite
def dags(draw, max_nodes=7, max_storages_per_node=2):
    """Random DAGs in a topological order 0..n-1: each node makes storages read by later nodes."""
    n = draw(st.integers(0, max_nodes))
    storages = [(draw(st.integers(0, 50)), -1, draw(st.sets(st.integers(0, n - 1))) if n else (), False)]
    for v in range(n):
        for _ in range(draw(st.integers(0, max_storages_per_node))):
            readers = draw(st.sets(st.integers(v + 1, n - 1))) if v + 1 < n else set()
            storages.append((draw(st.integers(0, 100)), v, tuple(sorted(readers)), draw(st.booleans())))
    edges = [e for e in draw(st.lists(st.tuples(st.integers(0, n), st.integers(0, n)), max_size=2)) if e[0] < e[1] < n]
    return problem(n, storages, edges, draw(st.integers(0, 5)))


def brute_force_peak(p: OrderProblem) -> int:
    g = _Graph(p)
    best = None
    for order in itertools.permutations(range(p.num_nodes)):
        pos = _positions(order)
        if all(pos[a] < pos[b] for b in range(g.n) for a in g.preds[b]):
            m = max(g.profile(pos)[0], default=g.static)
            best = m if best is None else min(best, m)
    return best


FAST = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(dags())
def test_tiny_dags_reach_the_brute_force_optimum(p):
    sol = solve_order(p)
    check_order(p, sol.order)
    optimum = brute_force_peak(p)
    assert max(simulate(p, sol.order), default=peak(p, sol.order)) == sol.peak_after == peak(p, sol.order)
    assert sol.peak_before == peak(p, range(p.num_nodes))
    assert sol.lower_bound <= optimum == sol.peak_after  # the window covers the whole graph
    assert sol.changed == (sol.peak_after < sol.peak_before)
    assert sol.status == ("optimal" if sol.changed else "unchanged")
    if not sol.changed:
        assert sol.order == tuple(range(p.num_nodes))


@FAST
@given(dags())
def test_every_heuristic_is_a_topological_order(p):
    g = _Graph(p)
    for name, order in _heuristics(g):
        assert sorted(order) == list(range(p.num_nodes)), name
        check_order(p, order)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(dags(max_nodes=24, max_storages_per_node=2), st.data())
def test_window_model_is_exact(p, data):
    """A window's claimed max equals the simulated one; positions outside it keep their bytes."""
    if p.num_nodes < 2:
        return
    g = _Graph(p)
    heuristic = data.draw(st.sampled_from([order for _, order in _heuristics(g)]))
    w = data.draw(st.integers(2, min(8, p.num_nodes)))
    a = data.draw(st.integers(0, p.num_nodes - w))
    before = g.profile(_positions(heuristic))
    window, claimed, proved = _solve_window(g, list(heuristic), before, a, w, 5.0, 0)
    order = list(heuristic[:a]) + window + list(heuristic[a + w :])
    check_order(p, order)
    after = simulate(p, order)
    assert proved and claimed == max(after[a : a + w]) <= max(before[0][a : a + w])
    assert after[:a] == tuple(before[0][:a]) and after[a + w :] == tuple(before[0][a + w :])


def random_dag(rng: random.Random, n: int, density: float) -> OrderProblem:
    storages = []
    for v in range(n):
        for _ in range(rng.choice((1, 1, 2))):
            readers = [u for u in range(v + 1, min(n, v + 30)) if rng.random() < density]
            storages.append((rng.randint(1, 1000), v, readers, rng.random() < 0.05))
    return problem(n, storages)


@pytest.mark.parametrize("seed", range(4))
def test_windows_around_the_peak_on_larger_dags(seed):
    p = random_dag(random.Random(seed), 120, 0.08)
    sol = solve_order(p, time_limit_s=2.0, window=10, seed=seed)
    check_order(p, sol.order)
    assert sol.peak_after == max(simulate(p, sol.order)) <= sol.peak_before
    assert sol.lower_bound <= sol.peak_after
    assert sol.status in {"feasible", "optimal", "unchanged"}


def test_deterministic():
    p = random_dag(random.Random(7), 60, 0.1)
    first, second = (solve_order(p, time_limit_s=2.0, window=8) for _ in range(2))
    assert (first.order, first.method, first.status) == (second.order, second.method, second.status)


def test_large_layered_graph_heuristics_only():
    rng = random.Random(0)
    layers, width = 40, 50
    storages = []
    for v in range(layers * width):
        layer = v // width
        nxt = range((layer + 1) * width, (layer + 2) * width) if layer + 1 < layers else range(0)
        readers = sorted({rng.choice(nxt) for _ in range(2)}) if nxt else []
        storages.append((rng.randint(1, 1000), v, readers, layer == layers - 1))
    p = problem(layers * width, storages)
    sol = solve_order(p, time_limit_s=0.0)
    check_order(p, sol.order)
    assert sol.peak_after == peak(p, sol.order) < sol.peak_before
    assert "cp-sat" not in sol.method


class _BadlyTracedBranches(torch.nn.Module):
    """Both big branch results are made before either is reduced: finishing one branch first saves one."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        a, b = torch.exp(x), torch.sin(x)  # 256 KiB each, traced back to back
        return (a.sum() + b.sum()) * self.w


def test_order_pass_finds_the_known_better_order_of_a_captured_graph():
    from memopt.capture import capture
    from memopt.passes.order_plan import plan_order
    from memopt.passes.storage import storage_table

    step = capture(_BadlyTracedBranches(), (torch.randn(256, 256),), loss_fn=lambda out: out)
    table = storage_table(step)
    sol = plan_order(step.graph, table, time_limit_s=1.0)
    big = 256 * 256 * 4
    assert sol.changed and sol.peak_before - sol.peak_after == big - 4  # b now meets a's 4-byte sum, not a
    names = [table.node_names[i] for i in sol.order]
    exp, sin = names.index("exp"), names.index("sin")
    reduce_a = next(i for i, n in enumerate(names) if n.startswith("sum") and i > exp)
    assert exp < reduce_a < sin or sin < names.index("sum_1") < exp
