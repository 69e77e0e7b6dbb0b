"""Kernel scratch: bytes an op allocates while it runs beyond its inputs and outputs, measured.

Some kernels allocate workspace through PyTorch's allocator and free it before
they return: CPU convolutions copy their input into another layout (an extra
activation-sized buffer), convolution's weight gradient more. No schema says
so, so it is measured: every distinct op signature of the graph (op, shapes,
strides, dtypes, other arguments) runs once on random tensors of its shapes on
the step's device, under one profiler session, and the scratch is the highest
the op's own allocations went minus what it still held when it returned.

Only ops whose tensor arguments are all floating point are run (random
integers could index out of range); the others count no scratch. Fake plans
(a meta-device model) have no real device to measure on and count none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable

import torch
from torch import fx
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils import _pytree as pytree

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
    calls: dict[Hashable, fx.Node] = {}
    skipped: set[Hashable] = set()
    for node in graph.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        key = _signature(node)
        if key in calls or key in skipped:
            continue
        tensors = [v for v in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(v, fx.Node)]
        values = [t.meta.get("val") for t in tensors]
        if all(isinstance(v, torch.Tensor) and v.is_floating_point() for v in values):
            calls[key] = node
        else:
            skipped.add(key)
    keys = list(calls)
    # random ops run here too: the caller's generators must not move (dropout masks of the real step)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), \
            profile(activities=_activities(device), profile_memory=True) as prof:
        for k, key in enumerate(keys):
            node = calls[key]
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda arg: _random_like(arg.meta["val"], device))
            with record_function(f"{_LABEL}{k}"):
                result = node.target(*args, **kwargs)
            del result, args, kwargs
    scratch = _scratch_per_label(prof, device)
    by_signature = {key: scratch.get(k, 0) for k, key in enumerate(keys)}
    return ScratchModel(by_signature, len(keys), len(skipped))


def _signature(node: fx.Node) -> Hashable:
    def describe(value: Any) -> Any:
        if isinstance(value, fx.Node):
            val = value.meta.get("val")
            if isinstance(val, torch.Tensor):
                return ("T", tuple(val.shape), tuple(val.stride()), val.dtype)
            return ("N", str(val))
        if isinstance(value, (list, tuple)):
            return tuple(describe(v) for v in value)
        return repr(value)

    return (str(node.target), describe(tuple(node.args)), describe(tuple(sorted(node.kwargs.items()))))


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
