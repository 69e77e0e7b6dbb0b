"""Sparse update: the knapsack against brute force, the scores leave the model as it was, the plan says what it
trains and fits budgets below full fine-tuning's smallest, and the compiled step trains like eager frozen the
same way."""

import copy
import itertools
import random

import pytest
import torch
from conftest import measured_step_peak, steady_step

import memopt
from memopt import examples
from memopt.capture import capture
from memopt.config import PlanConfig
from memopt.errors import MemoptError
from memopt.solvers.update import UpdateOption, UpdateProblem, solve_update
from memopt.sparse_update import contribution_scores, forward_uses


@pytest.mark.parametrize("seed", range(8))
def test_the_knapsack_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    options = tuple(
        (UpdateOption("frozen", 0, 0.0),
         *(UpdateOption(f"option {j}", rng.randrange(1, 100), rng.random()) for j in range(rng.randrange(1, 4))))
        for _ in range(rng.randrange(2, 7)))
    capacity = rng.randrange(0, 200)
    solution = solve_update(UpdateProblem(tuple(f"t{k}" for k in range(len(options))), options, capacity))
    best = max(sum(o.score for o in pick) for pick in itertools.product(*options)
               if sum(o.nbytes for o in pick) <= capacity)
    assert solution.status == "optimal"
    assert solution.nbytes <= capacity
    assert solution.score == pytest.approx(best, rel=1e-4)  # (scores are rounded to a millionth of the largest)
    assert solution.bound >= solution.score


FAST = PlanConfig(remat_time_limit_s=1.0)  # each sparse update plans the step several times


def _workload():
    workload = examples.mlp(width=64, depth=4, batch=128)
    torch.manual_seed(0)
    model = workload.build()
    calibration = [workload.inputs() for _ in range(2)]
    return workload, model, calibration


def test_scoring_leaves_the_model_its_gradients_buffers_and_generator_as_they_were():
    workload = examples.resnet_bn(batch=4, image=16, widths=(8, 16), blocks_per_stage=1)
    torch.manual_seed(0)
    model = workload.build().eval()
    state = copy.deepcopy(model.state_dict())
    generator = torch.get_rng_state()
    names = [name for name, _ in model.named_parameters()]
    scores = contribution_scores(model, [workload.inputs()], loss_fn=workload.loss_fn,
                                 optimizer=(torch.optim.SGD, {"lr": 0.1}), names=names)
    assert set(scores) == set(names) and all(score > 0 for score in scores.values())
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())  # running statistics
    assert torch.equal(torch.get_rng_state(), generator)


def test_the_plan_trains_what_fits_below_full_fine_tunings_smallest_budget():
    workload, model, calibration = _workload()
    inputs = workload.inputs()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(memopt.BudgetInfeasibleError) as full:
        memopt.plan(model, inputs, loss_fn=workload.loss_fn, optimizer=optimizer, budget=1, config=FAST)
    budget = full.value.minimum * 3 // 4
    plan = memopt.plan(model, inputs, loss_fn=workload.loss_fn, optimizer=optimizer, budget=budget,
                       update="sparse", calibration=calibration, config=FAST)
    update = plan.update
    assert plan.peak_bytes <= budget
    trained = {t.name for t in update.updated}
    assert 0 < len(trained) < len(update.tensors)
    # the traced step computes gradients for what it trains, and nothing for the rest
    assert set(plan.program.gradients) == trained
    assert update.backward_nodes < update.full_backward_nodes
    assert sum(t.nbytes for t in update.updated) <= update.capacity_bytes
    assert update.score <= update.bound + 1e-12
    data = plan.to_dict()["update"]
    assert {t["name"] for t in data["tensors"] if t["option"] == "whole"} == trained
    assert "sparse update:" in str(plan) and "sparse update (" in str(plan.explain())
    assert all(p.requires_grad for p in model.parameters())  # planning froze nothing


def test_compiled_sparse_update_trains_like_eager_frozen_the_same_way_under_the_budget():
    workload, model, calibration = _workload()
    inputs = workload.inputs()
    model.blocks[0][1].bias.requires_grad_(False)  # frozen by the user: stays frozen
    user_frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    reference = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(MemoptError, match="calibration"):
        memopt.compile(model, budget="1GB", loss_fn=workload.loss_fn, optimizer=optimizer, update="sparse")
    with pytest.raises(MemoptError, match="shapes alone"):
        memopt.plan(model, inputs, loss_fn=workload.loss_fn, optimizer=optimizer, budget="1GB", update="sparse",
                    calibration=calibration, fake=True)
    with pytest.raises(memopt.BudgetInfeasibleError) as full:
        memopt.plan(model, inputs, loss_fn=workload.loss_fn, optimizer=optimizer, budget=1, config=FAST)
    budget = full.value.minimum * 3 // 4
    compiled = memopt.compile(model, budget=budget, loss_fn=workload.loss_fn, optimizer=optimizer,
                              update="sparse", calibration=calibration, config=FAST)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    step = steady_step(compiled, inputs, optimizer)  # two steps: the first chooses and plans
    peak = measured_step_peak(compiled.plan, memopt.measure_peak(step))
    assert peak <= budget, f"measured {peak:,} B over the budget {budget:,} B"
    trained = {t.name for t in compiled.update.updated}
    assert trained and not trained & user_frozen
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (name not in trained), name
    assert {t.name for t in compiled.update.tensors if t.option == "frozen by the user"} == user_frozen
    # eager, frozen the same way, from the same weights: the same parameters after the same steps
    for name, p in reference.named_parameters():
        p.requires_grad_(name in trained)
    eager_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    eager = steady_step(lambda *a, **k: workload.loss_fn(reference(*a, **k)), inputs, eager_optimizer)
    eager()  # as the compiled model's measured step
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


def test_each_weight_costs_the_activation_its_gradient_reads():
    """A linear layer's weight is first read with the layer's input, which its gradient needs; a parameter the
    forward never reads is not listed (nothing to train)."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    model.unused = torch.nn.Parameter(torch.zeros(3))
    x = torch.randn(8, 16)
    uses = forward_uses(capture(model, (x,), loss_fn=lambda out: out.sum()))
    assert set(uses) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert uses["0.weight"][1] == 8 * 16 * 4 and uses["2.weight"][1] == 8 * 32 * 4
    assert uses["0.weight"][0] < uses["2.weight"][0]
