"""Offload end to end on CPU: the device peak (measured apart from the host pool) fits budgets remat cannot meet,
loss and gradients equal eager bit for bit, and the host pool stays within its cap."""

import copy
import dataclasses

import pytest
import torch

import memopt
from memopt import examples
from memopt.config import PlanConfig
from conftest import measured_step_peak, steady_step


def workload():
    return examples.mlp(width=128, depth=8, batch=2048)


def remat_smallest(model, inputs, loss_fn, optimizer):
    with pytest.raises(memopt.BudgetInfeasibleError) as info:
        memopt.plan(model, inputs, loss_fn=loss_fn, optimizer=optimizer, budget=1, offload=False)
    return info.value.minimum


def test_offload_fits_below_what_remat_alone_reaches_measured_apart_from_the_host_pool():
    torch.manual_seed(0)
    w = workload()
    model, inputs = w.build(), w.inputs()
    optimizer = w.optimizer(model)
    smallest = remat_smallest(model, inputs, w.loss_fn, optimizer)
    budget = int(smallest * 0.8)
    with pytest.raises(memopt.BudgetInfeasibleError):  # remat alone cannot
        memopt.plan(model, inputs, loss_fn=w.loss_fn, optimizer=optimizer, budget=budget, offload=False)
    cap = 32 * 2**20
    config = dataclasses.replace(PlanConfig(), offload_host_bytes=cap)
    compiled = memopt.compile(model, budget=budget, loss_fn=w.loss_fn, optimizer=optimizer, offload=True,
                              config=config)
    step = steady_step(compiled, inputs, optimizer)
    plan = compiled.plan
    assert plan.offload is not None and plan.offload.tensors > 0
    assert any(d.action == "offload" for d in plan.decisions)
    measured = memopt.measure_peak(step)
    peak = measured_step_peak(plan, measured)
    assert peak <= budget, f"measured {peak:,} B over the budget {budget:,} B"
    assert abs(peak - plan.peak_bytes) <= max(4096, 0.005 * peak)
    # the pool is host memory, counted apart, within its cap
    assert 0 < plan.offload.host_peak_bytes <= cap
    assert measured.host_bytes >= plan.offload.host_peak_bytes
    data = plan.to_dict()["offload"]
    assert data["bytes_to_host"] == data["bytes_to_device"] > 0
    assert data["host_peak_bytes"] == plan.offload.host_peak_bytes and data["predicted_stall_s"] >= 0


def test_loss_and_gradients_equal_eager_bitwise_with_offload():
    torch.manual_seed(0)
    w = workload()
    model = w.build()
    twin = copy.deepcopy(model)
    inputs = w.inputs()
    budget = int(remat_smallest(model, inputs, w.loss_fn, None) * 0.8)
    compiled = memopt.compile(twin, budget=budget, loss_fn=w.loss_fn, offload=True)
    for seed in (1, 2):
        torch.manual_seed(seed)
        expected = w.loss_fn(model(*inputs))
        expected.backward()
        torch.manual_seed(seed)
        loss = compiled(*inputs)
        loss.backward()
        assert torch.equal(loss.detach(), expected.detach())
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p.grad, q.grad), name
    assert compiled.plan.offload.tensors > 0


def test_offload_off_by_default_on_cpu_and_on_for_cuda_specs():
    w = examples.mlp(width=64, depth=2, batch=64)
    model, inputs = w.build(), w.inputs()
    assert memopt.plan(model, inputs, loss_fn=w.loss_fn, budget=10**12).offload is None
    on = memopt.plan(model, inputs, loss_fn=w.loss_fn, budget=10**12, device="h100")
    assert on.offload is not None and on.offload.tensors == 0  # on, and nothing to gain
    assert "offload" in on.to_dict()


def test_bad_offload_arguments_raise_typed_errors():
    w = examples.mlp(width=64, depth=2, batch=64)
    model, inputs = w.build(), w.inputs()
    with pytest.raises(memopt.MemoptError, match="offload"):
        memopt.plan(model, inputs, loss_fn=w.loss_fn, offload="yes")
    with pytest.raises(memopt.MemoptError, match="offload_host_bytes"):
        memopt.plan(model, inputs, loss_fn=w.loss_fn, offload=True,
                    config=dataclasses.replace(PlanConfig(), offload_host_bytes=-1))
