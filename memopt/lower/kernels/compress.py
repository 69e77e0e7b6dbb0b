"""Compressed tensors: a saved activation packed to int8 or fp8 with one fp32 scale per block of values, and
unpacked back to its dtype before the backward reads it.

Each block of ``block`` consecutive values (the last one possibly shorter) is divided by its scale, its largest
magnitude over the format's largest value (127 for int8, 448 for fp8 e4m3), and rounded: to the nearest
integer for int8 (an error of at most half a scale per value), to the nearest e4m3 value for fp8 (a relative
error of at most 2^-4 for values above e4m3's smallest normal, times the scale). A block of zeros has scale 0 and
unpacks to zeros. The payload is one byte per value, the scales 4 bytes per block: ``packed_bytes``.

Triton packs and unpacks int8 on CUDA (and under ``TRITON_INTERPRET=1``); elsewhere, and for fp8 everywhere
(torch's own cast to e4m3 is one fused kernel on CUDA, and Triton's interpreter does not cast to fp8 as CUDA
does), the torch reference of the same math runs. Both are torch custom ops (``memopt::pack``,
``memopt::unpack``), so a graph can hold them.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from memopt.errors import MemoptError
from memopt.lower.kernels.cross_entropy import triton_runs

FORMATS = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}
BLOCK = 256  # values per scale
_SLICE = 1 << 16  # values the torch path works on at a time


def packed_bytes(numel: int, format: str, block: int = BLOCK) -> int:
    """Bytes of a packed tensor of ``numel`` values: its payload and its scales."""
    return numel + 4 * -(-numel // block)


def pack(x: torch.Tensor, format: str, *, block: int = BLOCK, use_triton: bool | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as (payload, scales): one byte per value and one fp32 scale per block of ``block`` values."""
    _check(format, block)
    if not x.is_floating_point():
        raise MemoptError(f"only floating-point tensors are packed, got {x.dtype}")
    use_triton = triton_runs(x) if use_triton is None else use_triton
    return torch.ops.memopt.pack(x, format, block, use_triton)


def unpack(payload: torch.Tensor, scales: torch.Tensor, shape: list[int] | torch.Size, dtype: torch.dtype,
           format: str, *, block: int = BLOCK, use_triton: bool | None = None) -> torch.Tensor:
    """The tensor ``pack`` packed, of ``shape`` and ``dtype`` (within the format's error)."""
    _check(format, block)
    use_triton = triton_runs(payload) if use_triton is None else use_triton
    return torch.ops.memopt.unpack(payload, scales, list(shape), dtype, format, block, use_triton)


def pack_reference(x: torch.Tensor, format: str, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The packing in torch, the math the Triton kernel computes: ``_SLICE`` values at a time, so that what it
    holds beside its input and results is two fp32 copies of one slice (``torch_scratch_bytes``)."""
    kind, largest = FORMATS[format]
    flat = x.detach().reshape(-1)
    count = -(-flat.numel() // block)
    payload = torch.empty(flat.numel(), dtype=kind, device=x.device)
    scales = torch.empty(count, dtype=torch.float32, device=x.device)
    step = max(_SLICE // block, 1) * block
    for start in range(0, flat.numel(), step):
        values = flat[start:start + step].to(torch.float32, copy=True)  # worked on in place
        if values.numel() % block:  # the last block, shorter: padded with zeros
            values = torch.nn.functional.pad(values, (0, block - values.numel() % block))
        rows = values.view(-1, block)
        first = start // block
        scale = scales[first:first + rows.shape[0]]
        torch.amax(rows.abs(), 1, out=scale)
        scale.div_(largest)
        scaled = rows.div_(torch.where(scale > 0, scale, 1.0)[:, None])
        if kind is torch.int8:
            scaled.round_().clamp_(-largest, largest)
        end = min(start + step, flat.numel())
        payload[start:end] = scaled.view(-1)[: end - start]
        del values, rows, scaled  # before the next slice's are made
    return payload, scales


def unpack_reference(payload: torch.Tensor, scales: torch.Tensor, shape: list[int], dtype: torch.dtype,
                     block: int = BLOCK) -> torch.Tensor:
    """The unpacking in torch, ``_SLICE`` values at a time."""
    out = torch.empty(payload.numel(), dtype=dtype, device=payload.device)
    step = max(_SLICE // block, 1) * block
    for start in range(0, payload.numel(), step):
        values = payload[start:start + step].float()
        first = start // block
        rows = -(-values.numel() // block)
        factors = scales[first:first + rows].repeat_interleave(block)[: values.numel()]
        out[start:start + values.numel()] = values.mul_(factors)
        del values, factors
    return out.view(shape)


def torch_scratch_bytes(numel: int) -> int:
    """What the torch path of packing or unpacking holds beside its input and results: one slice's fp32 values
    and one more of its size (the magnitudes, or the scales spread over the values)."""
    return 8 * min(numel, max(_SLICE // BLOCK, 1) * BLOCK) + 4 * BLOCK


def kernel_scratch(node: object) -> int:
    """What a pack or unpack node allocates inside itself (0 for any other node, and for Triton's int8 path)."""
    target = getattr(node, "target", None)
    if target not in (torch.ops.memopt.pack.default, torch.ops.memopt.unpack.default):
        return 0
    format, use_triton = node.args[1 if target is torch.ops.memopt.pack.default else 4], node.args[-1]
    if use_triton and format == "int8":
        return 0
    return torch_scratch_bytes(node.args[0].meta["val"].numel())


# Bytes per value each path moves through memory, for its time: the kernels read the value and write its byte
# (pack), or read the byte and write the value (unpack); the torch path copies a slice to fp32, takes its
# magnitudes, their maxima, divides, rounds and clamps in place, and writes the payload (pack), or widens the
# payload, spreads the scales over the values, multiplies and writes the output (unpack).
_KERNEL_BYTES = 4 + 1
_TORCH_BYTES = {"pack": (4 + 4) + (4 + 4) + 4 + (4 + 4) + (4 + 4) + (4 + 4) + (4 + 1),
                "unpack": (1 + 4) + 4 + (4 + 4 + 4) + (4 + 4)}


def time_factor(node: object) -> float:
    """A pack or unpack node's time over that of one pass over its inputs and results (what a cost model of the
    node prices): 1 for Triton's int8 kernels; for the torch path, the bytes it moves over the kernel's."""
    target = getattr(node, "target", None)
    if target not in (torch.ops.memopt.pack.default, torch.ops.memopt.unpack.default):
        return 1.0
    which = "pack" if target is torch.ops.memopt.pack.default else "unpack"
    format, use_triton = node.args[1 if which == "pack" else 4], node.args[-1]
    return 1.0 if use_triton and format == "int8" else _TORCH_BYTES[which] / _KERNEL_BYTES


def _check(format: str, block: int) -> None:
    if format not in FORMATS:
        raise MemoptError(f"compression format must be one of {', '.join(FORMATS)}, got {format!r}")
    if block < 16 or block & (block - 1):
        raise MemoptError(f"a block of values per scale must be a power of two of at least 16, got {block}")


@torch.library.custom_op("memopt::pack", mutates_args=())
def _pack_op(x: torch.Tensor, format: str, block: int, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not use_triton or format != "int8":
        return pack_reference(x, format, block)
    flat = x.detach().contiguous().reshape(-1)
    blocks = -(-flat.numel() // block)
    payload = torch.empty(flat.numel(), dtype=torch.int8, device=x.device)
    scales = torch.empty(blocks, dtype=torch.float32, device=x.device)
    _triton().pack_int8[(blocks,)](flat, payload, scales, flat.numel(), BLOCK=block)
    return payload, scales


@_pack_op.register_fake
def _(x, format, block, use_triton):
    return (x.new_empty(x.numel(), dtype=FORMATS[format][0]),
            x.new_empty(-(-x.numel() // block), dtype=torch.float32))


@torch.library.custom_op("memopt::unpack", mutates_args=())
def _unpack_op(payload: torch.Tensor, scales: torch.Tensor, shape: list[int], dtype: torch.dtype, format: str,
               block: int, use_triton: bool) -> torch.Tensor:
    if not use_triton or format != "int8":
        return unpack_reference(payload, scales, shape, dtype, block)
    out = torch.empty(payload.numel(), dtype=dtype, device=payload.device)
    _triton().unpack_int8[(scales.numel(),)](payload, scales, out, payload.numel(), BLOCK=block)
    return out.view(shape)


@_unpack_op.register_fake
def _(payload, scales, shape, dtype, format, block, use_triton):
    return payload.new_empty(shape, dtype=dtype)


@functools.cache
def _triton():
    """The module of Triton kernels (imported once, when first needed)."""
    from memopt.lower.kernels import _compress_triton

    return _compress_triton


class _Stop(Exception):
    """The backward's first node: the forward has run."""


def measure_errors(graph: torch.fx.GraphModule, backward_start: str, values: list[torch.Tensor]
                   ) -> dict[str, tuple[float, float]]:
    """Per tensor a step's graph packs (by the node that makes it): the largest absolute error of packing and
    unpacking it on ``values`` (the graph's inputs, in placeholder order), and that over its largest magnitude.
    The forward alone runs, without gradients and with random ops drawing from a forked generator; the caller
    passes copies of what the forward writes in place (batch norms' running statistics)."""
    errors: dict[str, tuple[float, float]] = {}

    class Forward(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node):
            if node.name == backward_start:
                raise _Stop
            if node.target is not torch.ops.memopt.pack.default:
                return super().run_node(node)
            original = self.env[node.args[0]]
            _, format, block, use_triton = node.args
            # (a plan for a CUDA preset, measured on host values: the torch path, the same math)
            use_triton = use_triton and triton_runs(original)
            payload, scales = result = torch.ops.memopt.pack(original, format, block, use_triton)
            again = torch.ops.memopt.unpack(payload, scales, list(original.shape), original.dtype, format, block,
                                            use_triton)
            error = float((again.float() - original.float()).abs().max())
            largest = float(original.float().abs().max())
            errors[node.args[0].name] = (error, error / largest if largest > 0 else 0.0)
            return result

    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        try:
            Forward(graph).run(*values)
        except _Stop:
            pass
    return errors


def with_errors(plan, values: list[torch.Tensor | None], known: dict[str, tuple[float, float]]):
    """``plan`` (a MemoryPlan) with each packed tensor's error on ``values`` (its program's inputs), measured
    once per tensor into ``known``."""
    if not plan.compressed or any(isinstance(v, torch._subclasses.FakeTensor) for v in values):
        return plan  # (nothing packed, or no real value to pack: the errors stay unmeasured)
    if any(c.node not in known for c in plan.compressed):
        known.update(measure_errors(plan.program.graph, plan.program.backward_start, values))
    return dataclasses.replace(plan, compressed=tuple(
        dataclasses.replace(c, max_abs_error=known[c.node][0], max_rel_error=known[c.node][1])
        for c in plan.compressed))
