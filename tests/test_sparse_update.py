"""Sparse update: the knapsack against brute force, the scores leave the model as it was, the plan says what it
trains and fits budgets below full fine-tuning's smallest, and the compiled step trains like eager frozen the
same way."""

import copy
import itertools
import random

import pytest
import torch
from conftest import LossOnly, measured_step_peak, steady_step

import memopt
from memopt import examples
from memopt.backend import BackendOptions
from memopt.capture import capture
from memopt.config import PlanConfig
from memopt.errors import MemoptError
from memopt.lower.runner import StepRunner, run_step
from memopt.passes.row_slices import rows_name, slice_rows
from memopt.passes.storage import shares_storage
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
    trained = {rows_name(t.name, t.rows) if t.option == "rows" else t.name for t in update.updated}
    assert 0 < len(trained) < len(update.tensors)
    # the traced step computes gradients for what it trains (a row slice's for its rows), and nothing for the rest
    assert set(plan.program.gradients) == trained
    assert update.backward_nodes < update.full_backward_nodes
    assert sum(t.nbytes for t in update.updated) <= update.capacity_bytes
    assert update.score <= update.bound + 1e-12
    data = plan.to_dict()["update"]
    assert {rows_name(t["name"], t["rows"]) if t["rows"] else t["name"] for t in data["tensors"]
            if t["option"] in ("whole", "rows")} == trained
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
    budget = full.value.minimum * 6 // 10  # (where a row slice is worth its bytes)
    compiled = memopt.compile(model, budget=budget, loss_fn=workload.loss_fn, optimizer=optimizer,
                              update="sparse", calibration=calibration, config=FAST)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    step = steady_step(compiled, inputs, optimizer)  # two steps: the first chooses and plans
    peak = measured_step_peak(compiled.plan, memopt.measure_peak(step))
    assert peak <= budget, f"measured {peak:,} B over the budget {budget:,} B"
    trained = {t.name: t.rows for t in compiled.update.updated}  # rows 0: the whole tensor
    assert trained and not set(trained) & user_frozen
    assert any(trained.values()), "the budget should make a row slice worth training"
    for name, p in model.named_parameters():
        rows = trained.get(name)
        if rows is None:
            assert torch.equal(p, before[name]), name
        elif rows:  # its first rows train, the rest stays bitwise
            assert not torch.equal(p[:rows], before[name][:rows]) and torch.equal(p[rows:], before[name][rows:])
        else:
            assert not torch.equal(p, before[name]), name
    assert {t.name for t in compiled.update.tensors if t.option == "frozen by the user"} == user_frozen
    assert {key.replace("/", ".") for key in compiled.rows} == {rows_name(n, k) for n, k in trained.items() if k}
    # eager from the same weights, trained the same way (a row slice: its tensor's eager gradient cut to the
    # rows, stepped as a parameter of its own): the same parameters after the same steps
    named = dict(reference.named_parameters())
    for name, p in named.items():
        p.requires_grad_(name in trained)
    views = {name: torch.nn.Parameter(named[name].detach()[:rows]) for name, rows in trained.items() if rows}
    eager_optimizer = torch.optim.AdamW([*(named[n] for n, k in trained.items() if not k), *views.values()], lr=1e-3)

    def eager():
        workload.loss_fn(reference(*inputs)).backward()
        for name, view in views.items():
            view.grad, named[name].grad = named[name].grad[: len(view)].clone(), None
        eager_optimizer.step()
        eager_optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # as the compiled model's: two warm-up steps and the measured one
        eager()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


def test_the_backend_trains_what_the_sparse_update_chose_frozen_in_the_model_like_eager_under_the_budget():
    workload, model, calibration = _workload()
    inputs = workload.inputs()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(memopt.BudgetInfeasibleError) as full:
        memopt.plan(model, inputs, loss_fn=workload.loss_fn, optimizer=optimizer, budget=1, config=FAST)
    budget = full.value.minimum * 6 // 10
    with pytest.raises(MemoptError, match="calibration"):
        BackendOptions.parse({"budget": budget, "update": "sparse"})
    options = {"budget": budget, "optimizer": optimizer, "update": "sparse", "calibration": calibration,
               "config": FAST, "cache": False}
    compiled = torch.compile(LossOnly(model, workload.loss_fn), backend="memopt", options=options)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        step = steady_step(compiled, inputs, optimizer)  # two steps: the first chooses, freezes and plans
        measured = memopt.measure_peak(step)
    finally:
        torch._dynamo.reset()
    plan = memopt.backend.plans(options)[-1]
    assert plan.update is not None and all(t.option != "rows" for t in plan.update.tensors)  # whole tensors
    assert measured_step_peak(plan, measured) <= budget
    trained = {t.name.removeprefix("model.") for t in plan.update.updated}
    assert 0 < len(trained) < len(before)
    assert len(plan.program.gradients) == len(trained)  # the graph computes no gradient for a frozen tensor
    for name, p in model.named_parameters():
        assert p.requires_grad == (name in trained), name  # frozen in the model
        assert torch.equal(p, before[name]) != (name in trained), name
    # eager from the same weights, with the same tensors trained, after the same three steps
    for name, p in reference.named_parameters():
        p.requires_grad_(name in trained)
    eager_optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        workload.loss_fn(reference(*inputs)).backward()
        eager_optimizer.step()
        eager_optimizer.zero_grad(set_to_none=True)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_a_row_slice_computes_only_its_rows_gradient_equal_to_eagers_rows():
    """Linear layers on 2-D and 3-D inputs, a convolution and a weight read twice: each sliced gradient is
    computed from the rows' part of the incoming gradient (no node of the backward holds a whole weight's
    gradient) and equals eager's rows: bitwise for the linear layers on these shapes (the matmul library may pick
    another kernel for a narrower slice), within float tolerance for the convolution."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(32, 64), torch.nn.Linear(64, 48)
            self.conv, self.head = torch.nn.Conv2d(3, 16, 3), torch.nn.Linear(16 * 6 * 6, 64)

        def forward(self, x, image):
            tokens = self.b(torch.relu(self.a(x)))  # (4, 5, 48): linear layers over 3-D inputs
            features = self.head(torch.relu(self.conv(image)).flatten(1))  # (4, 64)
            twice = torch.nn.functional.linear(features, self.a.weight.t())  # a.weight read a second time
            return tokens.square().mean() + twice.square().mean()

    torch.manual_seed(0)
    model = Net()
    inputs = (torch.randn(4, 5, 32), torch.randn(4, 3, 8, 8))
    rows = {"a.weight": 16, "b.weight": 24, "conv.weight": 8, "head.weight": 32}
    step = slice_rows(capture(model, inputs), rows)
    whole = {name: tuple(p.shape) for name, p in model.named_parameters() if name in rows}
    nodes = list(step.graph.graph.nodes)
    backward = nodes[[n.name for n in nodes].index(step.backward_start):]
    inputs_of = [n.meta["val"] for n in nodes if n.op == "placeholder"]
    made = {tuple(n.meta["val"].shape) for n in backward  # (views of the weights themselves left out)
            if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)
            and not any(shares_storage(n.meta["val"], value) for value in inputs_of)}
    assert not made & set(whole.values()), "a whole weight's gradient was computed"
    assert set(step.gradients) == {rows_name(n, k) for n, k in rows.items()} | {
        name for name, _ in model.named_parameters() if name.endswith("bias")}
    named = dict(model.named_parameters())
    views = [named[name].detach()[:k].requires_grad_() for name, k in rows.items()]
    for name in rows:
        named[name].requires_grad_(False)
    loss = run_step(StepRunner(step), [*model.parameters(), *inputs, *views])
    loss.backward()
    for name in rows:
        named[name].requires_grad_(True)
    expected = torch.autograd.grad(model(*inputs), [named[name] for name in rows])
    assert loss.item() == model(*inputs).item()
    for (name, k), view, grad in zip(rows.items(), views, expected):
        if name == "conv.weight":  # oneDNN's convolution backward sums 8 channels in another order than 16
            torch.testing.assert_close(view.grad, grad[:k], rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(view.grad, grad[:k]), name


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
