"""Offload and reload as custom ops (``memopt::offload``, ``memopt::reload``, ``memopt::reload_wait``).

``offload(x, pool, offset)`` copies ``x`` into a preallocated host pool at
``offset`` and returns the host copy (a view of the pool, ``x``'s shape and
strides); the graph then drops ``x``, so its device bytes are freed after its
last forward use. ``reload(h, pool, offset, device)`` makes a fresh device
tensor from the host copy, placed in the backward ahead of the first use
(prefetch); ``reload_wait(y, pool, offset)``, right before the first use,
makes the compute wait for that copy.

On CPU every copy is synchronous (the pool is a plain CPU tensor that
``memopt.measure`` counts apart from device memory) and ``reload_wait`` does
nothing, so plans are testable end to end without a GPU. On CUDA the pool is
pinned, offloads run on a device-to-host copy stream and reloads on a
host-to-device one, ordered by events; that path is written but has not run
here (no GPU in this project's test machines).

The ops have fake kernels, so graphs holding them trace, run as FX graphs and
compile with Inductor, which keeps them as extern kernels (never fused). The
host copy's fake is a CPU tensor (a meta one would be "computed" by Inductor
from its meta kernel, dropping the copy). On a CPU step a host copy must not
share a compiled program with its reload: Inductor would reuse the dead host
buffer for a result of its own; memopt's forward/backward cut keeps offloads
in the forward program and reloads in the backward one.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from memopt.measure import mark_host_memory

ALIGNMENT = 64  # bytes; every slot of a pool starts at a multiple of it


@dataclass
class HostPool:
    """One preallocated host buffer; slots at planned offsets hold the offloaded tensors."""

    nbytes: int
    device: torch.device  # the device the tensors come from and return to
    _buffer: torch.Tensor | None = field(default=None, init=False, repr=False)
    _offloaded: dict[int, Any] = field(default_factory=dict, repr=False)  # offset -> CUDA event of the offload
    _reloaded: dict[int, Any] = field(default_factory=dict, repr=False)  # offset -> CUDA event of the reload

    def __post_init__(self) -> None:
        self._streams = _copy_streams(self.device) if self.device.type == "cuda" else None

    @property
    def buffer(self) -> torch.Tensor:
        """The pool's bytes, allocated at the first offload (planning alone allocates nothing)."""
        if self._buffer is None:
            self._buffer = torch.empty(max(self.nbytes, 1), dtype=torch.uint8, pin_memory=self._streams is not None)
            mark_host_memory(self._buffer)
        return self._buffer

    def slot(self, like: torch.Tensor, offset: int) -> torch.Tensor:
        """The pool's bytes at ``offset`` seen as a tensor of ``like``'s shape, strides and dtype."""
        span = _span_bytes(like)
        if offset % ALIGNMENT or offset + span > self.nbytes:
            raise ValueError(f"slot [{offset}, {offset + span}) is outside the {self.nbytes}-byte host pool")
        # (as_strided's offset counts from the pool's first byte, in elements of the dtype)
        return self.buffer.view(like.dtype).as_strided(like.size(), like.stride(), offset // like.element_size())

    def store(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        host = self.slot(x, offset)
        if self._streams is None:
            host.copy_(x)
            return host
        d2h, _ = self._streams
        d2h.wait_stream(torch.cuda.current_stream(x.device))  # x is ready
        previous = self._reloaded.pop(offset, None)
        if previous is not None:  # the last step's reload of this slot has read it
            d2h.wait_event(previous)
        with torch.cuda.stream(d2h):
            host.copy_(x, non_blocking=True)
            event = torch.cuda.Event()
            event.record(d2h)
        x.record_stream(d2h)  # the allocator keeps x's block until the copy is done
        self._offloaded[offset] = event
        return host

    def load(self, host: torch.Tensor, offset: int) -> torch.Tensor:
        y = torch.empty_strided(host.size(), host.stride(), dtype=host.dtype, device=self.device)
        if self._streams is None:
            y.copy_(host)
            return y
        _, h2d = self._streams
        h2d.wait_stream(torch.cuda.current_stream(self.device))  # y's block is free to write
        event = self._offloaded.pop(offset, None)
        if event is not None:
            h2d.wait_event(event)
        with torch.cuda.stream(h2d):
            y.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(h2d)
        y.record_stream(h2d)
        self._reloaded[offset] = done
        return y

    def wait(self, y: torch.Tensor, offset: int) -> None:
        if self._streams is None:
            return
        event = self._reloaded.get(offset)
        if event is not None:
            torch.cuda.current_stream(y.device).wait_event(event)


_POOLS: dict[int, HostPool] = {}
_NEXT = itertools.count(1)
_LOCK = threading.Lock()
_STREAMS: dict[torch.device, tuple[Any, Any]] = {}


def new_pool(nbytes: int, device: torch.device) -> tuple[int, HostPool]:
    """A host pool of ``nbytes`` for tensors of ``device``, and the id the ops name it by."""
    pool = HostPool(nbytes, torch.device(device))
    with _LOCK:
        key = next(_NEXT)
        _POOLS[key] = pool
    return key, pool


def release_pool(key: int) -> None:
    """Forget pool ``key`` (its buffer is freed once nothing else holds it)."""
    with _LOCK:
        _POOLS.pop(key, None)


def _pool(key: int) -> HostPool:
    try:
        return _POOLS[key]
    except KeyError:
        raise RuntimeError(f"memopt host pool {key} does not exist (released, or made in another process)") from None


def _copy_streams(device: torch.device) -> tuple[Any, Any]:
    if device not in _STREAMS:
        _STREAMS[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
    return _STREAMS[device]


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes from element 0 to the last element ``t``'s strides reach."""
    if t.numel() == 0:
        return 0
    last = sum((size - 1) * stride for size, stride in zip(t.size(), t.stride()))
    return (last + 1) * t.element_size()


def host_bytes(t: torch.Tensor) -> int:
    """Bytes a slot for ``t`` takes in a pool, rounded up to the pool's alignment."""
    return -(-_span_bytes(t) // ALIGNMENT) * ALIGNMENT


@torch.library.custom_op("memopt::offload", mutates_args=())
def offload(x: torch.Tensor, pool: int, offset: int) -> torch.Tensor:
    """Copy ``x`` into host pool ``pool`` at ``offset``; the host copy."""
    return _pool(pool).store(x, offset)


@offload.register_fake
def _offload_fake(x: torch.Tensor, pool: int, offset: int) -> torch.Tensor:
    # host memory is the CPU's; on a CPU step the planner counts these apart (they are the pool's, not the device's)
    return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device="cpu")


@torch.library.custom_op("memopt::reload", mutates_args=())
def reload(h: torch.Tensor, pool: int, offset: int, device: torch.device) -> torch.Tensor:
    """A fresh tensor on ``device`` holding the host copy ``h`` (started, on CUDA; see ``reload_wait``)."""
    return _pool(pool).load(h, offset)


@reload.register_fake
def _reload_fake(h: torch.Tensor, pool: int, offset: int, device: torch.device) -> torch.Tensor:
    return torch.empty_strided(h.size(), h.stride(), dtype=h.dtype, device=device)


@torch.library.custom_op("memopt::reload_wait", mutates_args=("y",))
def reload_wait(y: torch.Tensor, pool: int, offset: int) -> None:
    """Make the compute wait for the reload of ``y`` (CUDA); nothing on CPU, where the copy is done."""
    _pool(pool).wait(y, offset)


@reload_wait.register_fake
def _reload_wait_fake(y: torch.Tensor, pool: int, offset: int) -> None:
    return None


OPS = (torch.ops.memopt.offload.default, torch.ops.memopt.reload.default, torch.ops.memopt.reload_wait.default)
HOST_RESULT_OPS = (torch.ops.memopt.offload.default,)  # ops whose result is in a host pool, not device memory
