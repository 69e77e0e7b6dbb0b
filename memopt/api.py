"""The user's door: memopt.plan()."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from memopt.budget import parse_budget
from memopt.capture import capture
from memopt.config import PlanConfig
from memopt.device import DeviceSpec, get_device
from memopt.errors import MemoptError
from memopt.passes.optimizer_memory import ParamInfo
from memopt.pipeline import run_pipeline
from memopt.plan import MemoryPlan


def plan(
    model: nn.Module,
    example_inputs: tuple | list | dict | torch.Tensor,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: Any = None,
    budget: int | str | None = None,
    device: str | DeviceSpec | None = None,
    offload: bool | None = None,
    fake: bool | None = None,
    layout: bool = False,
    config: PlanConfig | None = None,
) -> MemoryPlan:
    """The memory plan of one steady-state training step of ``model`` on ``example_inputs``.

    The step is: forward, loss, backward, ``optimizer.step()`` with optimizer state
    present and gradients set to None beforehand. The model's output is dropped
    once the loss is taken (``loss = model(**batch).loss``); a training loop that
    keeps the whole output alive through the backward holds more. ``optimizer`` is an optimizer
    instance, a class, or ``(class, kwargs)``; None leaves optimizer state out.
    ``budget`` is bytes or a string such as "24GB" / "512MiB". ``device`` is a
    preset name ("h100", "a100-80gb", "a100-40gb", "rtx4090", "cpu") or a
    DeviceSpec; by default the device the model is on. ``layout=True`` also plans
    offsets in one arena for the step's intermediates (the ``layout`` key);
    ``config`` sets every other knob (solver time limits). Nothing is run: the
    step is traced on fake tensors, and the model is left as it was.
    """
    config = config or PlanConfig()
    if layout:
        config = dataclasses.replace(config, layout=True)
    budget_bytes = parse_budget(budget)
    spec = get_device(device, default=_device_of(model))
    if offload:
        raise MemoptError("offload planning is not available in this version of memopt; use offload=None")
    step = capture(model, example_inputs, loss_fn=loss_fn, fake=fake)
    named = dict(model.named_parameters())
    params = [ParamInfo(name, tuple(named[name].shape), named[name].element_size()) for name in step.gradients]
    groups_of = None
    if isinstance(optimizer, torch.optim.Optimizer):
        index_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        groups_of = {name: index_of[id(p)] for name, p in named.items() if id(p) in index_of}
    return run_pipeline(step, params=params, optimizer=optimizer, groups_of=groups_of, device=spec,
                        budget_bytes=budget_bytes, config=config)


def _device_of(model: nn.Module) -> str:
    for tensor in model.parameters():
        return "h100" if tensor.device.type == "cuda" else "cpu"
    return "cpu"
