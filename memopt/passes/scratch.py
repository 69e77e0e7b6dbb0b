"""Kernel scratch: bytes an op allocates while it runs beyond its inputs and outputs, measured.

Some kernels allocate workspace through PyTorch's allocator and free it before
they return: CPU convolutions copy their input into another layout (an extra
activation-sized buffer), convolution's weight gradient more. No schema says
so, so it is measured: every distinct op signature of the graph (op, shapes,
strides, dtypes, other arguments) runs once on random tensors of its shapes on
the step's device, under one profiler session, and the scratch is the highest
the op's own allocations went minus what it still held when it returned.

Only ops whose tensor arguments are all floating point or boolean are run
(random integers could index out of range; a boolean mask runs all false:
dropout's backward converts its mask to the gradient's dtype, a gradient-sized
temporary); the others count no scratch. Fake plans
(a meta-device model) have no real device to measure on and count none.

``measure_calls`` measures any list of op calls the same way: the replay of
Inductor's wrapper code (``memopt.lower.inductor.wrapper_memory``) hands it
the fallback kernels the compiled code calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Hashable

import torch
from torch import fx
from torch._C._profiler import _EventType
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils import _pytree as pytree

from memopt.measure.profiler import memory_profile

log = logging.getLogger(__name__)

_LABEL = "memopt-scratch-"


@dataclass(frozen=True)
class ScratchModel:
    """Measured scratch bytes per op signature; ``per_node`` applies it to any graph of the same ops."""

    by_signature: dict[Hashable, int]
    measured: int  # signatures run
    skipped: int  # signatures not run (integer tensor arguments)

    def per_node(self, graph: fx.GraphModule) -> tuple[int, ...]:
        return tuple(self.by_signature.get(_signature(node), 0) for node in graph.graph.nodes)


def measure_scratch(graph: fx.GraphModule, device: torch.device) -> ScratchModel:
    """Run each distinct op of ``graph`` once on random tensors and measure its scratch."""
    calls: dict[Hashable, tuple[Any, tuple, dict]] = {}
    skipped: set[Hashable] = set()
    for node in graph.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        key = _signature(node)
        if key in calls or key in skipped:
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda arg: arg.meta.get("val"))
        if measurable(args, kwargs):
            calls[key] = (node.target, args, kwargs)
        else:
            skipped.add(key)
    scratch = measure_calls(list(calls.values()), device)
    return ScratchModel(dict(zip(calls, scratch)), len(calls), len(skipped))


def measurable(args: Any, kwargs: Any) -> bool:
    """Whether a call can run on random tensors like its own: it takes tensors, all floating point or boolean
    (random integers could index out of range)."""
    tensors = [v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
    return bool(tensors) and all(t.is_floating_point() or t.dtype == torch.bool for t in tensors)


def measure_calls(calls: list[tuple[Any, tuple, dict]], device: torch.device) -> list[int]:
    """The scratch of each ``(op, args, kwargs)``: run once on random tensors of the arguments' shapes,
    strides and dtypes (real, fake or meta tensors) on ``device``, under one profiler session.

    Inside another profiler session (which a nested one would switch off) nothing is run: all 0; so
    for a device the profiler cannot see, and for a call that fails on random values.
    """
    if not calls or device.type not in ("cpu", "cuda"):
        return [0] * len(calls)
    if torch.autograd._profiler_enabled():
        log.warning("a profiler is running (memopt.measure_peak, or your own): %d kernels' scratch is not measured "
                    "and counts 0 bytes, so the plan may break its budget by that much; let the first call, "
                    "which plans, run outside the profiler", len(calls))
        return [0] * len(calls)
    # random ops run here too: the caller's generators must not move (dropout masks of the real step)
    devices = [device] if device.type == "cuda" else []
    failed: set[int] = set()
    with torch.random.fork_rng(devices=devices), torch.no_grad(), unset_fake_temporarily(), \
            memory_profile(_activities(device)) as prof:
        for k, (target, args, kwargs) in enumerate(calls):
            args, kwargs = pytree.tree_map(lambda value: _random_like(value, device), (args, kwargs))
            with record_function(f"{_LABEL}{k}"):
                try:
                    result = target(*args, **kwargs)
                except (RuntimeError, ValueError, IndexError) as error:  # the values matter to this op
                    log.debug("scratch of %s not measured: %s", target, error)
                    failed.add(k)
                    result = None
            del result, args, kwargs
    scratch = _scratch_per_label(prof, device)
    return [0 if k in failed else scratch.get(k, 0) for k in range(len(calls))]


def call_signature(target: Any, args: Any, kwargs: dict[str, Any]) -> Hashable:
    """What a call's scratch depends on: the op, its tensors' shapes, strides and dtypes, its other arguments."""
    def describe(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("T", tuple(value.shape), tuple(value.stride()), value.dtype)
        if isinstance(value, (list, tuple)):
            return tuple(describe(v) for v in value)
        return repr(value)

    return (str(target), describe(tuple(args)), describe(tuple(sorted(kwargs.items()))))


def _signature(node: fx.Node) -> Hashable:
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda arg: arg.meta.get("val"))
    return call_signature(node.target, args, kwargs)


def _random_like(value: Any, device: torch.device) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    span = 1 + sum((size - 1) * stride for size, stride in zip(value.shape, value.stride()) if size > 0)
    if value.numel() == 0:
        span = 0
    base = torch.empty(span, dtype=value.dtype, device=device)
    base = base.normal_() if value.is_floating_point() else base.zero_()
    return base.as_strided(tuple(value.shape), tuple(value.stride()))  # expanded strides kept


def _activities(device: torch.device) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def _scratch_per_label(prof: profile, device: torch.device) -> dict[int, int]:
    """For each labelled call: peak of its own allocations minus what it still held at its end."""
    results = prof.profiler.kineto_results
    scratch: dict[int, int] = {}
    stack = list(results.experimental_event_tree()) if results is not None else []
    while stack:
        event = stack.pop()
        if event.tag == _EventType.TorchOp and event.name.startswith(_LABEL):
            scratch[int(event.name[len(_LABEL):])] = _extra(event, device)
            continue
        stack.extend(event.children)
    return scratch


def _extra(event: Any, device: torch.device) -> int:
    allocations = []
    stack = list(event.children)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == device.type:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
    running = highest = 0
    for _, nbytes in sorted(allocations, key=lambda a: a[0]):
        running += nbytes
        highest = max(highest, running)
    return max(0, highest - running)
