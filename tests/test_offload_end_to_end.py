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


# the benchmark workloads at a small size, and a budget below remat's smallest that offload reaches there
# (the lowest peak memopt's offload search finds: gpt2 0.82x, llama 0.75x remat's smallest at these sizes)
TRANSFORMERS = {
    "gpt2": (lambda: examples.gpt2(layers=2, width=128, heads=2, seq=128, batch=8, vocab=512), 0.88),
    "llama": (lambda: examples.llama(layers=2, width=128, heads=2, seq=128, batch=8, vocab=512), 0.85),
}


@pytest.mark.parametrize("name", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_transformer_fits_below_remat_with_offload_and_trains_like_eager(name):
    make, fraction = TRANSFORMERS[name]
    w = make()
    torch.manual_seed(0)
    model, inputs = w.build(), w.inputs()
    eager = copy.deepcopy(model)
    optimizer = w.optimizer(model)
    budget = int(remat_smallest(model, inputs, w.loss_fn, optimizer) * fraction)
    cap = 64 * 2**20
    config = dataclasses.replace(PlanConfig(), offload_host_bytes=cap)
    compiled = memopt.compile(model, budget=budget, loss_fn=w.loss_fn, optimizer=optimizer, offload=True,
                              config=config)
    # one step from the same weights: loss and gradients equal eager bit for bit
    loss = compiled(**inputs)
    loss.backward()
    expected = eager(**inputs).loss
    expected.backward()
    assert torch.equal(loss.detach(), expected.detach())
    for (param_name, p), q in zip(eager.named_parameters(), model.parameters()):
        assert torch.equal(p.grad, q.grad), param_name
    plan = compiled.plan
    assert plan.offload is not None and plan.offload.tensors > 0
    # a steady step (optimizer state present): the device peak, measured apart from the host pool, fits
    model.zero_grad(set_to_none=True)
    step = steady_step(compiled, inputs, optimizer)
    measured = memopt.measure_peak(step)
    peak = measured_step_peak(plan, measured)
    assert peak <= budget, f"measured {peak:,} B over the budget {budget:,} B"
    assert abs(peak - plan.peak_bytes) <= max(4096, 0.005 * peak)
    assert 0 < plan.offload.host_peak_bytes <= cap and measured.host_bytes >= plan.offload.host_peak_bytes


def test_below_what_offload_reaches_the_error_names_the_peak_and_what_is_live():
    w = examples.llama(layers=2, width=64, heads=2, seq=64, batch=4, vocab=512)
    model, inputs = w.build(), w.inputs()
    optimizer = w.optimizer(model)
    smallest = remat_smallest(model, inputs, w.loss_fn, optimizer)
    with pytest.raises(memopt.BudgetInfeasibleError) as info:
        memopt.plan(model, inputs, loss_fn=w.loss_fn, optimizer=optimizer, budget=smallest // 2, offload=True)
    error = info.value
    assert smallest // 2 < error.proven_minimum <= error.minimum < smallest  # offload reaches below remat
    message = str(error)
    assert "with offload, the lowest peak memopt finds is" in message and "live there:" in message
    assert "optimizer state" in message and "_log_softmax_backward_data" in message


def test_plot_shows_the_offload_band(tmp_path):
    import matplotlib.image
    import numpy as np

    w = workload()
    model, inputs = w.build(), w.inputs()
    budget = int(remat_smallest(model, inputs, w.loss_fn, None) * 0.8)
    plan = memopt.plan(model, inputs, loss_fn=w.loss_fn, budget=budget, offload=True)
    assert plan.offload.tensors > 0 and max(plan.offload.host_timeline) == plan.offload.host_peak_bytes

    def band_pixels(p, name):
        image = matplotlib.image.imread(p.plot(str(tmp_path / name)))
        assert image.shape[0] > 200 and image.shape[1] > 400 and np.std(image[..., :3]) > 0.05
        rgb = (image[..., :3] * 255).astype(int)
        # the band's colour (#17becf at alpha 0.6) over the white or the grey backward shading
        return int(sum((np.abs(rgb - c).max(axis=-1) <= 12).sum() for c in ((116, 216, 226), (110, 210, 220))))

    assert band_pixels(plan, "offload.png") > 2000
    without = memopt.plan(model, inputs, loss_fn=w.loss_fn, budget=None)
    assert band_pixels(without, "plain.png") < 50
