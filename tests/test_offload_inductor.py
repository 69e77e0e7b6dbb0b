"""The offload ops survive Inductor: kept, in order, not fused away, and the step still trains like eager;
the replay of Inductor's code counts the host copies apart from device memory, as the measurement does, so
memopt.compile(backend="inductor", offload=True) fits budgets remat alone cannot meet."""

import copy
import dataclasses
import re

import pytest
import torch
from conftest import measured_step_peak, steady_step
from torch._subclasses.fake_tensor import FakeTensorMode

import memopt
from memopt import examples
from memopt.config import PlanConfig
from memopt.lower import offload_ops
from memopt.lower.inductor import InductorStep, wrapper_memory
from memopt.lower.runner import StepRunner, run_step


def remat_smallest(model, inputs, loss_fn):
    with pytest.raises(memopt.BudgetInfeasibleError) as info:
        memopt.plan(model, inputs, loss_fn=loss_fn, budget=1, offload=False)
    return info.value.minimum


# what Inductor writes around the offload ops (the forward offloads buf1 and returns the host copy; the
# backward reloads a host copy it is given and frees it)
FORWARD = """
def call(args):
    arg0_1, = args
    args.clear()
    buf0 = empty_strided_cpu((16, 16), (16, 1), torch.float32)
    cpp_fused_0(arg0_1, buf0)
    buf1 = empty_strided_cpu((16, 16), (16, 1), torch.float32)
    cpp_fused_1(buf0, buf1)
    buf2 = torch.ops.memopt.offload.default(buf1, {pool}, 0)
    del buf1
    buf3 = buf2
    del buf2
    return (buf0, buf3, )
"""

BACKWARD = """
def call(args):
    arg0_1, arg1_1 = args
    args.clear()
    buf0 = torch.ops.memopt.reload.default(arg1_1, {pool}, 0, device(type='cpu'))
    del arg1_1
    buf1 = buf0
    del buf0
    torch.ops.memopt.reload_wait.default(buf1, {pool}, 0)
    buf2 = empty_strided_cpu((16, 16), (16, 1), torch.float32)
    cpp_fused_0(arg0_1, buf1, buf2)
    del arg0_1
    del buf1
    return (buf2, )
"""


def test_wrapper_memory_counts_host_copies_apart_from_device_bytes():
    key, _ = offload_ops.new_pool(4096, torch.device("cpu"))
    try:
        with FakeTensorMode():
            x, saved, host = torch.empty(16, 16), torch.empty(16, 16), torch.empty(16, 16)
        forward = wrapper_memory(FORWARD.format(pool=key), [x], held=[True])
        # buf0 (+1024), buf1 (+1024), its host copy (no device bytes), buf1 freed (-1024)
        assert forward.timeline == (1024, 2048, 1024)
        assert forward.peak_bytes == 2048 and forward.end_bytes == 1024 and forward.host_bytes == 1024
        backward = wrapper_memory(BACKWARD.format(pool=key), [saved, host], held=[False, False], host=[False, True])
        # the reload (+1024), the host copy freed (no device bytes), buf2 (+1024), the saved input and the reload
        # freed (-1024 each)
        assert backward.timeline == (1024, 2048, 1024, 0)
        assert backward.peak_bytes == 2048 and backward.end_bytes == 0 and backward.host_bytes == 0
        # unmarked, the host copy is read as device bytes: the replay over-counts by its size
        as_device = wrapper_memory(BACKWARD.format(pool=key), [saved, host], held=[False, False])
        assert as_device.timeline == (1024, 0, 1024, 0, -1024)
    finally:
        offload_ops.release_pool(key)


@pytest.mark.slow
def test_offload_ops_survive_inductor_in_order():
    torch.manual_seed(0)
    w = examples.mlp(width=64, depth=4, batch=1024)
    model = w.build()
    twin = copy.deepcopy(model)
    inputs = w.inputs()
    budget = int(remat_smallest(model, inputs, w.loss_fn) * 0.85)
    plan = memopt.plan(twin, inputs, loss_fn=w.loss_fn, budget=budget, offload=True)
    assert plan.offload is not None and plan.offload.tensors > 0
    # the planned programs compiled by Inductor as they are (memopt.compile's budget loop aside)
    step = InductorStep(StepRunner(plan.program))
    loss = run_step(step.runner, [*twin.parameters(), *twin.buffers(), *inputs], step)
    loss.backward()
    expected = w.loss_fn(model(*inputs))
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach())
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    graph = plan.program.graph.graph
    offloads = [n for n in graph.nodes if n.target is torch.ops.memopt.offload.default]
    reloads = [n for n in graph.nodes if n.target is torch.ops.memopt.reload.default]
    assert len(offloads) == len(reloads) == plan.offload.tensors
    forward, backward = step.forward.source, step.backward.source
    # every offload is its own call in the forward's code, in the graph's order of pool offsets
    calls = [int(m) for m in re.findall(r"torch\.ops\.memopt\.offload\.default\(\w+, \d+, (\d+)\)", forward)]
    assert calls == [n.args[2] for n in offloads]
    reload_calls = [int(m) for m in re.findall(r"torch\.ops\.memopt\.reload\.default\(\w+, \d+, (\d+),", backward)]
    assert reload_calls == [n.args[2] for n in reloads]
    waits = [int(m) for m in re.findall(r"torch\.ops\.memopt\.reload_wait\.default\(\w+, \d+, (\d+)\)", backward)]
    assert waits == reload_calls
    # each wait comes after its reload and before the first kernel reading the reloaded buffer
    for offset in reload_calls:
        reload_at = re.search(rf"(\w+) = torch\.ops\.memopt\.reload\.default\(\w+, \d+, {offset},", backward)
        wait_at = re.search(rf"torch\.ops\.memopt\.reload_wait\.default\(\w+, \d+, {offset}\)", backward)
        assert reload_at.start() < wait_at.start()


def test_compile_with_inductor_and_offload_fits_below_remat_and_peaks_where_its_code_says():
    torch.manual_seed(0)
    w = examples.mlp(width=64, depth=4, batch=1024)
    model = w.build()
    twin = copy.deepcopy(model)
    inputs = w.inputs()
    smallest = remat_smallest(model, inputs, w.loss_fn)
    budget = int(smallest * 0.85)
    cap = 4 * 2**20
    config = dataclasses.replace(PlanConfig(), offload_host_bytes=cap)
    compiled = memopt.compile(model, budget=budget, loss_fn=w.loss_fn, backend="inductor", offload=True,
                              config=config)
    loss = compiled(*inputs)
    loss.backward()
    expected = w.loss_fn(twin(*inputs))
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(twin.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    plan = compiled.plan
    assert budget < smallest and plan.budget_bytes == budget
    assert plan.offload is not None and plan.offload.tensors > 0
    assert 0 < plan.offload.host_peak_bytes <= cap
    model.zero_grad(set_to_none=True)
    measured = memopt.measure_peak(steady_step(compiled, inputs, None))
    peak = measured_step_peak(plan, measured)
    assert peak <= budget, f"measured {peak:,} B over the budget {budget:,} B"
    # the peak read from Inductor's code is the device's: the host copies are not in it
    assert plan.compiled_peak_bytes is not None
    assert abs(peak - plan.compiled_peak_bytes) <= 0.01 * peak, (peak, plan.compiled_peak_bytes)
    assert 0 < plan.offload.host_peak_bytes <= measured.host_bytes <= cap
