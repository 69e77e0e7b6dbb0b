"""Optimizer memory: the state a steady-state step holds, and what the step itself allocates.

Modelled on PyTorch's own implementations (torch/optim/adam.py, sgd.py,
_adafactor.py), because the step's temporaries depend on which one runs:
the per-parameter loop (CPU default) allocates a few parameter-sized buffers
per parameter, one at a time; the multi-tensor ``foreach`` path (CUDA default)
allocates them for all parameters of a device/dtype group at once; the fused
kernels allocate none. Checked against the profiler in tests/test_ledger.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch

from memopt.errors import UnsupportedOptimizerError

SCALAR_STEP_BYTES = 4  # optimizer `step` counters: 0-dim float32 tensors

SUPPORTED = ("SGD", "Adam", "AdamW", "Adafactor")


@dataclass(frozen=True, slots=True)
class ParamInfo:
    """What the optimizer model needs to know about one trainable parameter."""

    name: str
    shape: tuple[int, ...]
    itemsize: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


@dataclass(frozen=True, slots=True)
class StepPhase:
    """A moment of the optimizer step: bytes it holds beyond parameters, gradients and state."""

    label: str
    extra_bytes: int


@dataclass(frozen=True)
class OptimizerMemory:
    """Device bytes of optimizer state (steady state) and the step's own temporaries over time."""

    name: str  # "AdamW", "SGD", ... or "none"
    implementation: str  # "single_tensor" | "foreach" | "fused" | "none"
    state_bytes: int
    state_by_param: dict[str, int]
    phases: tuple[StepPhase, ...]  # in execution order
    # what one parameter's update allocates alone (the per-parameter loop's; none when fused): an update
    # inside the backward (step_in_backward) runs one parameter at a time
    temporaries_by_param: dict[str, int] = dataclasses.field(default_factory=dict)

    def without(self, stepped: Collection[str]) -> OptimizerMemory:
        """The step after the backward once the ``stepped`` parameters were updated inside it: the others'."""
        if not stepped:
            return self
        left = [p for p in self.temporaries_by_param if p not in stepped]
        if self.implementation == "fused" or not left:
            phases: tuple[StepPhase, ...] = ()
        elif self.implementation == "foreach":
            phases = (StepPhase(f"{self.name}.step (foreach)", sum(self.temporaries_by_param[p] for p in left)),)
        else:
            phases = tuple(StepPhase(f"{self.name}.step: {p}", self.temporaries_by_param[p]) for p in left)
        return dataclasses.replace(self, phases=phases)

    @property
    def step_peak_extra(self) -> int:
        return max((p.extra_bytes for p in self.phases), default=0)


def normalize_optimizer(optimizer: Any) -> tuple[type | None, list[dict[str, Any]] | dict[str, Any]]:
    """(class, per-group settings) from an instance, a class, (class, kwargs), or None."""
    if optimizer is None:
        return None, {}
    if isinstance(optimizer, torch.optim.Optimizer):
        return type(optimizer), [dict(group) for group in optimizer.param_groups]
    if isinstance(optimizer, tuple) and len(optimizer) == 2 and isinstance(optimizer[0], type):
        return optimizer[0], dict(optimizer[1])
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer, {}
    raise UnsupportedOptimizerError(
        f"optimizer must be an optimizer instance, an optimizer class, or (class, kwargs); got {optimizer!r}"
    )


def optimizer_groups(optimizer: Any, named: dict[str, torch.Tensor]) -> dict[str, int] | None:
    """Each named parameter's group in an optimizer instance (None for a class or (class, kwargs))."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return None
    index_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
    return {name: index_of[id(p)] for name, p in named.items() if id(p) in index_of}


def optimizer_memory(
    optimizer: Any,
    params: list[ParamInfo],
    *,
    device_is_cuda: bool,
    groups_of: dict[str, int] | None = None,
) -> OptimizerMemory:
    """The optimizer's state and step temporaries for ``params``.

    ``optimizer`` is an instance, a class, (class, kwargs) or None (no optimizer:
    gradients only). ``groups_of`` maps a parameter name to its param group index
    for an instance; parameters an instance does not hold get no state and no step.
    """
    cls, settings = normalize_optimizer(optimizer)
    if cls is None:
        return OptimizerMemory("none", "none", 0, {}, ())
    name = cls.__name__
    if name not in SUPPORTED or cls.__module__.split(".")[0] != "torch":
        raise UnsupportedOptimizerError(
            f"memopt cannot yet account for the memory of {cls.__module__}.{name}; supported: "
            f"{', '.join('torch.optim.' + s for s in SUPPORTED)}. Plan with one of those of the same "
            "state size, or optimizer=None to leave optimizer state out of the ledger"
        )
    if isinstance(settings, dict):
        defaults = {**_defaults(cls), **settings}
        per_param = {p.name: defaults for p in params}
    else:
        assert groups_of is not None, "an optimizer instance needs the parameter -> group map"
        per_param = {p.name: settings[groups_of[p.name]] for p in params if p.name in groups_of}
    held = [p for p in params if p.name in per_param]
    if not held:
        return OptimizerMemory(name, "none", 0, {}, ())

    implementation = _implementation(next(iter(per_param.values())), device_is_cuda)
    state_by_param = {p.name: _state_bytes(name, p, per_param[p.name], device_is_cuda, implementation) for p in held}
    foreach = implementation == "foreach"
    temporaries = [(p, _step_temporaries(name, p, per_param[p.name], foreach)) for p in held]
    if implementation == "fused":
        phases: tuple[StepPhase, ...] = (StepPhase(f"{name}.step (fused)", 0),)
    elif implementation == "foreach":
        # one list-wide op at a time: every parameter's temporary is live at once
        phases = (StepPhase(f"{name}.step (foreach)", sum(extra for _, extra in temporaries)),)
    else:
        phases = tuple(StepPhase(f"{name}.step: {p.name}", extra) for p, extra in temporaries)
    alone = {p.name: 0 if implementation == "fused" else _step_temporaries(name, p, per_param[p.name], False)
             for p in held}
    return OptimizerMemory(name, implementation, sum(state_by_param.values()), state_by_param, phases, alone)


def _defaults(cls: type) -> dict[str, Any]:
    # the constructor's defaults, read without building an optimizer
    import inspect

    signature = inspect.signature(cls.__init__)
    return {k: v.default for k, v in signature.parameters.items() if v.default is not inspect.Parameter.empty}


def _implementation(group: dict[str, Any], device_is_cuda: bool) -> str:
    if group.get("fused"):
        return "fused"
    if group.get("differentiable"):
        return "single_tensor"
    foreach = group.get("foreach")
    if foreach is None:  # torch's default: foreach on CUDA, the per-parameter loop elsewhere
        return "foreach" if device_is_cuda else "single_tensor"
    return "foreach" if foreach else "single_tensor"


def _state_bytes(name: str, p: ParamInfo, group: dict[str, Any], device_is_cuda: bool, impl: str) -> int:
    # `step` lives on the host for CUDA unless capturable or fused; on CPU it is device memory
    step_on_device = not device_is_cuda or bool(group.get("capturable")) or impl == "fused"
    step = SCALAR_STEP_BYTES if step_on_device else 0
    if name in ("Adam", "AdamW"):
        moments = 3 if group.get("amsgrad") else 2
        return moments * p.nbytes + step
    if name == "SGD":
        return p.nbytes if group.get("momentum", 0) else 0
    if name == "Adafactor":
        if len(p.shape) > 1:
            row = math.prod(p.shape[:-1]) * p.itemsize
            col = math.prod(p.shape[:-2] + p.shape[-1:]) * p.itemsize
            return row + col + step
        return p.nbytes + step
    raise AssertionError(name)


def _step_temporaries(name: str, p: ParamInfo, group: dict[str, Any], foreach: bool) -> int:
    """Peak bytes one parameter's update allocates (torch/optim's code, line by line).

    The foreach path runs the same arithmetic list-wide, with some ops in place
    where the per-parameter loop allocates."""
    n = p.nbytes
    negated = n if group.get("maximize") else 0  # grad = -grad
    if name in ("Adam", "AdamW"):
        if foreach:
            # a new grad list for maximize / coupled decay is deleted before _foreach_sqrt; the rest is in place
            return n
        coupled_decay = name == "Adam" and group.get("weight_decay", 0) != 0
        decayed = n if coupled_decay else 0  # grad = grad.add(param, alpha=wd)
        return negated + decayed + 2 * n  # denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    if name == "SGD":
        decayed = n if group.get("weight_decay", 0) != 0 else 0
        nesterov = n if group.get("nesterov") and not foreach else 0  # foreach adds into the grads in place
        return negated + decayed + nesterov
    if name == "Adafactor":
        # matrices: var_estimate = row_var @ col_var (full size); vectors: grad * grad and a clone
        return n if len(p.shape) > 1 else 2 * n
    raise AssertionError(name)
