"""The offload solver on hand-built problems with known answers (plain data, no torch)."""

import pytest

from memopt.solvers.offload import OffloadItem, OffloadProblem, evaluate, solve_offload
from memopt.solvers.remat_sim import Candidate, RecomputeProblem

BIG = 1_000_000  # bytes of the activation that crosses from forward to backward
SMALL = 1_000
BANDWIDTH = 1e9  # bytes/s: one transfer of BIG takes 1 ms


def chain(*, big_cost, forward_cost, backward_cost, recomputable=True, forward=4, backward=6, two=False):
    """Node 0 makes BIG, read by node 1 and by the last node; a chain of fillers between them.

    The backward's third node makes a BIG temporary: holding both is over the budget, so BIG
    must leave the device over that node (offloaded or recomputed).
    """
    n = 1 + forward + 1 + backward + 1
    bs = 1 + forward
    last = n - 1
    inputs = [()] + [(k - 1,) for k in range(1, n)]
    inputs[last] = (last - 1, 0, 1) if two else (last - 1, 0)
    sizes = [BIG] + [SMALL] * (n - 1)
    if two:  # node 1 makes a second BIG one, read by the last node too
        sizes[1] = BIG
    spike = bs + 3
    sizes[spike] = BIG
    costs = [big_cost] + [forward_cost] * forward + [0.0] + [backward_cost] * backward + [backward_cost]
    readers = [tuple(u for u in range(n) if k in inputs[u]) for k in range(n)]
    end = [max(r, default=k) if k != last else last for k, r in enumerate(readers)]
    problem = RecomputeProblem(
        backward_start=bs, inputs=tuple(inputs), values=tuple((k,) for k in range(n)), node_costs=tuple(costs),
        sizes=tuple(sizes), start=tuple(range(n)), end=tuple(end), readers=tuple(readers),
        candidates=(Candidate(0, (0,)),) if recomputable else (),
    )
    return problem


def offload_problem(remat, *, host_cap=10**12, budget=BIG + 3 * SMALL + 10):
    item = OffloadItem(0, 0, BIG, BIG, candidate=0 if remat.candidates else -1)
    return OffloadProblem(remat, (), (item,), budget, host_cap, BANDWIDTH)


def test_keeping_everything_is_over_the_budget():
    remat = chain(big_cost=1e-3, forward_cost=1e-3, backward_cost=1e-3)
    assert evaluate(offload_problem(remat), (), ()).status == "infeasible"


def test_long_lived_large_activation_with_a_window_that_hides_it_is_offloaded():
    # not recomputable (a random op's result, say): offloading is the only way under the budget
    remat = chain(big_cost=1e-3, forward_cost=1e-3, backward_cost=1e-3, recomputable=False)
    solution = solve_offload(offload_problem(remat), time_limit_s=5)
    assert solution.status == "optimal"
    assert [t.item for t in solution.transfers] == [0]
    assert solution.stall_s == 0 and solution.recomputed == ()
    assert solution.peak_bytes <= BIG + 3 * SMALL + 10
    assert solution.host_bytes == BIG
    t = solution.transfers[0]
    assert t.after == 1 and t.hidden_s >= t.transfer_s == pytest.approx(1e-3)


def test_expensive_to_recompute_activation_with_overlap_is_offloaded_rather_than_recomputed():
    remat = chain(big_cost=10e-3, forward_cost=1e-3, backward_cost=1e-3)
    solution = solve_offload(offload_problem(remat), time_limit_s=5)
    assert solution.status in ("optimal", "feasible")
    assert [t.item for t in solution.transfers] == [0] and solution.recomputed == ()
    assert solution.objective == pytest.approx(0.0) and solution.stall_s == 0


def test_cheap_op_is_recomputed_rather_than_offloaded():
    # recomputing costs 1 us; the backward's window is 6 us of compute, far from hiding a 1 ms transfer
    remat = chain(big_cost=1e-6, forward_cost=1e-6, backward_cost=1e-6)
    solution = solve_offload(offload_problem(remat), time_limit_s=5)
    assert solution.status in ("optimal", "feasible")
    assert solution.transfers == () and solution.recomputed == (0,)
    assert solution.recompute_s == pytest.approx(1e-6)
    # offloading it instead would have stalled the backward
    assert evaluate(offload_problem(remat), (), (0,)).stall_s > 0.5e-3


def test_host_cap_zero_offloads_nothing():
    remat = chain(big_cost=10e-3, forward_cost=1e-3, backward_cost=1e-3)
    solution = solve_offload(offload_problem(remat, host_cap=0), time_limit_s=5)
    assert solution.transfers == () and solution.host_bytes == 0
    assert solution.recomputed == (0,) and solution.status != "infeasible"
    # and with nothing else to do, no plan: infeasible, never a plan over the budget
    stuck = chain(big_cost=1e-3, forward_cost=1e-3, backward_cost=1e-3, recomputable=False)
    solution = solve_offload(offload_problem(stuck, host_cap=0), time_limit_s=5)
    assert solution.status == "infeasible" and solution.transfers == ()


def test_copy_engine_is_shared_two_reloads_queue():
    # the window before the last node is 1.2 ms of compute: it hides one 1 ms reload, not two in a row
    remat = chain(big_cost=1e-3, forward_cost=1e-3, backward_cost=0.3e-3, recomputable=False, two=True)
    items = (OffloadItem(0, 0, BIG, BIG), OffloadItem(1, 1, BIG, BIG))
    problem = OffloadProblem(remat, (), items, 2 * BIG + 3 * SMALL, 10**12, BANDWIDTH)
    alone = evaluate(problem, (), (0,))
    assert alone.stall_s == pytest.approx(0.0, abs=1e-12)
    both = evaluate(problem, (), (0, 1))
    assert both.stall_s == pytest.approx(1e-3 - (both.transfers[0].hidden_s - 1e-3), rel=1e-6)
    assert both.stall_s > 0.5e-3
    # the budget needs one of them off the device over the spike: the solver offloads one, and its reload
    # starts after the spike (the prefetch that hides it all would bring it back before): 0.4 ms exposed
    solution = solve_offload(problem, time_limit_s=5)
    assert solution.status == "optimal" and len(solution.transfers) == 1
    (t,) = solution.transfers
    assert t.prefetch == 10 and solution.stall_s == pytest.approx(1e-3 - 0.6e-3)
    assert solution.peak_bytes <= problem.budget_bytes


def test_bad_problems_are_rejected():
    remat = chain(big_cost=1e-3, forward_cost=1e-3, backward_cost=1e-3)
    with pytest.raises(ValueError, match="bandwidth"):
        OffloadProblem(remat, (), (), 1, 1, 0.0)
    with pytest.raises(ValueError, match="forward node"):
        OffloadProblem(remat, (), (OffloadItem(0, 8, BIG, BIG),), 1, 1, 1e9)


def test_below_what_any_offload_reaches_the_lowest_peak_and_where_are_returned():
    # the backward's BIG temporary alone is over this budget: offloading BIG lowers the peak, never enough
    remat = chain(big_cost=1e-3, forward_cost=1e-3, backward_cost=1e-3, recomputable=False)
    problem = offload_problem(remat, budget=BIG // 2)
    kept = evaluate(problem, (), ())
    solution = solve_offload(problem, time_limit_s=5)
    assert solution.status == "infeasible"
    assert [t.item for t in solution.transfers] == [0]  # the closest choice: BIG is away over the spike
    assert solution.peak_bytes == evaluate(problem, (), (0,)).peak_bytes < kept.peak_bytes
    assert remat.backward_start < solution.peak_node  # in the backward, where BIG or the BIG temporary is held


def test_the_exact_phase_is_exact_on_memory():
    # with the recompute set held, the greedy's profile is the one evaluate replays
    from memopt.solvers.offload import _greedy, _Model

    remat = chain(big_cost=1e-3, forward_cost=1e-3, backward_cost=0.3e-3, recomputable=False, two=True)
    items = (OffloadItem(0, 0, BIG, BIG), OffloadItem(1, 1, BIG, BIG))
    for budget in (3 * BIG, 2 * BIG + 3 * SMALL, BIG + 3 * SMALL, BIG):
        problem = OffloadProblem(remat, (), items, budget, 10**12, BANDWIDTH)
        model = _Model(problem, fixed=())
        chosen, fits, peak = _greedy(model, budget, {})
        judged = evaluate(problem, (), model.prefetches(chosen))
        assert judged.peak_bytes == peak and fits == (peak <= budget) == (judged.status == "feasible")
        solution = solve_offload(problem, time_limit_s=5)
        assert solution.status == "infeasible" or solution.peak_bytes <= budget
        assert (solution.status == "infeasible") == (not fits)
