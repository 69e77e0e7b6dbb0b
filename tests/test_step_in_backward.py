"""The optimizer step inside the backward: each parameter updated once its gradient is final, bitwise eager's
update, the gradient freed, the user's optimizer.step() applying nothing twice, and what cannot compose refused."""

import copy

import pytest
import torch
from conftest import (
    assert_steps_in_backward_like_eager,
    measured_step_peak,
    steady_step,
)

import memopt
from memopt import examples
from memopt.config import PlanConfig
from memopt.errors import BudgetInfeasibleError, MemoptError

OPTIMIZERS = [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    (torch.optim.Adam, {"lr": 1e-3, "weight_decay": 0.01}),
    (torch.optim.AdamW, {"lr": 1e-3}),
]


def _smallest(model, inputs, **kwargs):
    with pytest.raises(BudgetInfeasibleError) as raised:
        memopt.plan(model, inputs, budget=1, **kwargs)
    return raised.value.minimum


@pytest.mark.parametrize("optimizer_class, settings", OPTIMIZERS, ids=lambda v: getattr(v, "__name__", ""))
def test_parameters_and_state_after_each_step_equal_eagers_bitwise(optimizer_class, settings):
    workload = examples.mlp(width=64, depth=3, batch=32)
    torch.manual_seed(0)
    eager = workload.build()
    model = copy.deepcopy(eager)
    eager_optimizer, optimizer = optimizer_class(eager.parameters(), **settings), optimizer_class(
        model.parameters(), **settings)
    inputs = workload.inputs()
    compiled = memopt.compile(model, budget="1GB", loss_fn=workload.loss_fn, optimizer=optimizer,
                              step_in_backward=True)
    assert_steps_in_backward_like_eager(compiled, model, optimizer, eager, eager_optimizer, inputs, workload.loss_fn)
    for p, q in zip(model.parameters(), eager.parameters()):
        for key, value in eager_optimizer.state[q].items():
            assert torch.equal(optimizer.state[p][key], value), key
    assert len(compiled.plan.stepped) == len(list(model.parameters()))


def test_updating_inside_the_backward_lowers_the_smallest_budget_and_the_step_measures_under_it():
    # a wide MLP on a small batch: the optimizer step, with every gradient held, is where the step peaks
    workload = examples.mlp(width=256, depth=6, batch=16)
    torch.manual_seed(0)
    model = workload.build()
    optimizer = torch.optim.AdamW(model.parameters())
    inputs = workload.inputs()
    after = _smallest(model, inputs, loss_fn=workload.loss_fn, optimizer=optimizer)
    inside = _smallest(model, inputs, loss_fn=workload.loss_fn, optimizer=optimizer, step_in_backward=True)
    gradient_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert inside <= after - gradient_bytes // 2, (inside, after)
    compiled = memopt.compile(model, budget=inside, loss_fn=workload.loss_fn, optimizer=optimizer,
                              step_in_backward=True)
    step = steady_step(compiled, inputs, optimizer)
    plan = compiled.plan
    assert "optimizer" not in plan.timeline.phases  # no step after the backward: every parameter is stepped inside
    assert "updated inside the backward" in str(plan)
    assert plan.to_dict()["optimizer"]["in_backward"] == [name for name, _ in model.named_parameters()]
    peak = measured_step_peak(plan, memopt.measure_peak(step))
    assert peak <= inside, f"measured {peak:,} B over the budget {inside:,} B"


def test_a_tied_weight_is_updated_after_its_last_reader_and_a_language_model_trains_like_eager():
    # GPT-2's embedding is its LM head: read again by the embedding's backward after the head's gradient
    workload = examples.gpt2(layers=2, width=64, heads=2, seq=32, batch=2, vocab=512)
    torch.manual_seed(0)
    eager = workload.build()
    model = copy.deepcopy(eager)
    eager_optimizer, optimizer = torch.optim.AdamW(eager.parameters()), torch.optim.AdamW(model.parameters())
    batch = workload.inputs()
    minimum = _smallest(model, batch, optimizer=optimizer, step_in_backward=True)
    compiled = memopt.compile(model, budget=minimum, optimizer=optimizer, step_in_backward=True)
    for _ in range(2):
        eager(**batch).loss.backward()
        eager_optimizer.step()
        eager_optimizer.zero_grad()
        compiled(**batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert any(d.action == "recompute" for d in compiled.plan.decisions)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert torch.equal(p, q), name


def test_a_forward_after_a_backward_without_optimizer_step_is_refused():
    workload = examples.mlp(width=32, depth=2, batch=8)
    model = workload.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled = memopt.compile(model, budget="1GB", loss_fn=workload.loss_fn, optimizer=optimizer,
                              step_in_backward=True)
    inputs = workload.inputs()
    compiled(*inputs).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(MemoptError, match="accumulation"):
        compiled(*inputs)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    optimizer.step()  # finds no gradient: applies nothing, and the loop may go on
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    compiled(*inputs).backward()


def test_what_cannot_update_inside_the_backward_is_refused_with_the_way_out():
    workload = examples.mlp(width=32, depth=2, batch=8)
    model = workload.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cases = [
        ({"backend": "inductor", "optimizer": optimizer}, "backend='fx'"),
        ({"layout": True, "optimizer": optimizer}, "layout=False"),
        ({"optimizer": torch.optim.SGD}, "optimizer instance"),
        ({"optimizer": torch.optim.SGD(workload.build().parameters(), lr=0.1)}, "holds none"),
    ]
    for kwargs, way_out in cases:
        with pytest.raises(MemoptError, match=way_out):
            memopt.compile(model, budget="1GB", loss_fn=workload.loss_fn, step_in_backward=True, **kwargs)
    with pytest.raises(MemoptError, match="compiler='eager'"):
        memopt.backend.BackendOptions.parse({"budget": "1GB", "compiler": "inductor", "step_in_backward": True,
                                             "optimizer": optimizer})
    with pytest.raises(MemoptError, match="optimizer instance"):
        memopt.backend.BackendOptions.parse({"budget": "1GB", "config": PlanConfig(step_in_backward=True)})
    with pytest.raises(MemoptError, match="True or False"):
        memopt.plan(model, workload.inputs(), loss_fn=workload.loss_fn, step_in_backward="yes")
