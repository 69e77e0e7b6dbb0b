"""The offload ops survive Inductor: kept, in order, not fused away, and the step still trains like eager."""

import copy
import re

import pytest
import torch

import memopt
from memopt import examples
from memopt.codegen.inductor import InductorStep
from memopt.codegen.runner import StepRunner, run_step


@pytest.mark.slow
def test_offload_ops_survive_inductor_in_order():
    torch.manual_seed(0)
    w = examples.mlp(width=64, depth=4, batch=1024)
    model = w.build()
    twin = copy.deepcopy(model)
    inputs = w.inputs()
    with pytest.raises(memopt.BudgetInfeasibleError) as info:
        memopt.plan(model, inputs, loss_fn=w.loss_fn, budget=1, offload=False)
    budget = int(info.value.minimum * 0.85)
    plan = memopt.plan(twin, inputs, loss_fn=w.loss_fn, budget=budget, offload=True)
    assert plan.offload is not None and plan.offload.tensors > 0
    # the planned programs compiled by Inductor as they are (memopt.compile's budget loop reads the wrapper's
    # memory, where host copies still count as device bytes)
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
