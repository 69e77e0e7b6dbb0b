"""Fused linear + cross-entropy: ``F.cross_entropy(F.linear(x, weight, bias), target)`` and its gradients, with
the logits never held beyond one tile of tokens by classes.

The forward keeps two numbers per token: the log-sum-exp of its logits (an online maximum and sum over tiles of
the classes) and its target's logit; its loss is their difference. The backward makes each tile of logits again,
turns it into the tile of the loss's gradient with respect to them (the softmax less the one-hot target, times
the token's share of the loss's gradient), and multiplies it into the gradient of ``x`` (one program per tile of
tokens, over the classes) and into those of ``weight`` and ``bias`` (one program per tile of classes, over the
tokens). Two backward kernels, so that no program adds into another's output: no atomics, and every run sums in
the same order.

What it holds beyond its inputs and their gradients: 8 bytes per token (``LSE_BYTES_PER_TOKEN``), where the
graph it replaces holds the logits, or a slice of the tokens' logits when chunked, and their gradient. The price
is the logits' matmul twice more in the backward (three in all, against two).

Triton runs it on CUDA, or on CPU under ``TRITON_INTERPRET=1``; elsewhere the same math runs in torch over
slices of the tokens (``linear_cross_entropy``'s CPU path: one slice's logits at a time).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torch.utils.flop_counter import register_flop_formula

from memopt.errors import MemoptError

LSE_BYTES_PER_TOKEN = 8  # the log-sum-exp and the target's logit, fp32
# the torch path's slice of the tokens: its fp32 logits within this many bytes
_TORCH_SLICE_BYTES = 1 << 19
_REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True, slots=True)
class LinearCrossEntropyBlocks:
    """Tile sizes of one launch: tokens, classes and hidden features per tile; warps per program."""

    block_m: int
    block_v: int
    block_k: int
    num_warps: int


def linear_cross_entropy_blocks(tokens: int, classes: int, hidden: int) -> LinearCrossEntropyBlocks:
    """Tiles for a shape: powers of two at least 16 (``tl.dot``'s least), at most 64 tokens by 128 classes by 64
    features (a tile of fp32 logits and its operands in a program's registers and shared memory)."""

    def power(n: int, most: int) -> int:
        return max(16, min(most, 1 << max(n - 1, 0).bit_length()))

    block_m, block_v = power(tokens, 64), power(classes, 128)
    return LinearCrossEntropyBlocks(block_m, block_v, power(hidden, 64), 8 if block_m * block_v >= 64 * 128 else 4)


def linear_cross_entropy_reference(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                   bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                                   reduction: str = "mean") -> torch.Tensor:
    """The math the kernel computes, as eager torch writes it (the logits whole, in fp32; the loss in fp32)."""
    logits = F.linear(x, weight, bias).float()
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)


def torch_chunk_tokens(classes: int) -> int:
    """Tokens per slice of the torch path: their fp32 logits within ``_TORCH_SLICE_BYTES``."""
    return max(1, _TORCH_SLICE_BYTES // (4 * classes))


def torch_scratch_bytes(tokens: int, classes: int, hidden: int, chunk_tokens: int, itemsize: int = 4) -> int:
    """What the torch path allocates inside one op beyond its inputs and outputs: a slice's fp32 logits (worked
    on in place; first in the inputs' dtype where that is narrower), its small per-token vectors and its sum over
    the tokens (the bias's share), and for
    narrower inputs their fp32 copies (the weight's, and the slice's)."""
    rows = min(tokens, chunk_tokens)
    narrower = itemsize < 4
    return rows * classes * (4 + (itemsize if narrower else 0)) + 16 * rows + 4 * classes + (
        4 * (classes + rows) * hidden if narrower else 0)


def kernel_scratch(node: object) -> int:
    """What the fused op of a graph node allocates inside itself beyond its inputs and results (0 for any other
    node): the torch path's slice of logits (``torch_scratch_bytes``); the target logits of the forward; the
    backward's fp32 gradients where they are cast to a narrower dtype."""
    target = getattr(node, "target", None)
    if target not in (torch.ops.memopt.linear_cross_entropy_forward.default,
                      torch.ops.memopt.linear_cross_entropy_backward.default):
        return 0
    x, weight = (arg.meta["val"] for arg in node.args[:2])
    use_triton, chunk_tokens = node.args[-2:]
    (tokens, hidden), classes = x.shape, weight.shape[0]
    inside = 0 if use_triton else torch_scratch_bytes(tokens, classes, hidden, chunk_tokens, x.element_size())
    if target is torch.ops.memopt.linear_cross_entropy_forward.default:
        return inside + 12 * tokens  # the target logits, and the loss's difference and mask before its select
    return inside + (0 if x.dtype == torch.float32 else 4 * (tokens * hidden + classes * hidden + classes))


def triton_runs(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels run on ``tensor``: Triton is installed and the tensor is on CUDA, or Triton's
    interpreter is on (``TRITON_INTERPRET=1``)."""
    if not (tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return _triton() is not None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: torch.Tensor | None = None, *, ignore_index: int = -100, reduction: str = "mean",
                         use_triton: bool | None = None, chunk_tokens: int = 1024) -> torch.Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias), target, ignore_index=..., reduction=...)`` without the logits.

    ``x`` is (tokens, hidden), ``weight`` (classes, hidden), ``target`` (tokens,) of class indices;
    ``use_triton`` None: the Triton kernels where they run (``triton_runs``), else torch over slices of
    ``chunk_tokens`` tokens. Gradients flow to ``x``, ``weight`` and ``bias``."""
    if reduction not in _REDUCTIONS:
        raise MemoptError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    if x.dim() != 2 or weight.dim() != 2 or target.dim() != 1 or x.shape[1] != weight.shape[1] \
            or target.shape[0] != x.shape[0] or (bias is not None and bias.shape != (weight.shape[0],)):
        raise MemoptError(f"linear_cross_entropy takes x (tokens, hidden), weight (classes, hidden), target (tokens,) "
                         f"and bias (classes,); got {tuple(x.shape)}, {tuple(weight.shape)}, {tuple(target.shape)}"
                         f"{'' if bias is None else f', {tuple(bias.shape)}'}: flatten the tokens first")
    use_triton = triton_runs(x) if use_triton is None else use_triton
    if use_triton and _triton() is None:
        raise MemoptError("use_triton=True needs Triton: pip install 'memopt[triton]'")
    return _LinearCrossEntropy.apply(x, weight, bias, target, ignore_index, reduction, use_triton, chunk_tokens)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, ignore_index, reduction, use_triton, chunk_tokens):
        losses, lse = torch.ops.memopt.linear_cross_entropy_forward(x, weight, bias, target, ignore_index, use_triton,
                                                                    chunk_tokens)
        valid = target != ignore_index
        ctx.save_for_backward(x, weight, bias, target, lse, valid)
        ctx.reduction, ctx.use_triton, ctx.chunk_tokens = reduction, use_triton, chunk_tokens
        if reduction == "none":
            return losses
        total = losses.sum()
        return total / valid.sum() if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, target, lse, valid = ctx.saved_tensors
        # each token's share of the loss's gradient (none for an ignored one)
        scale = grad.float() * valid / valid.sum() if ctx.reduction == "mean" else grad.float() * valid
        grad_x, grad_weight, grad_bias = torch.ops.memopt.linear_cross_entropy_backward(
            x, weight, bias, target, lse, scale.contiguous(), ctx.use_triton,
            ctx.chunk_tokens)
        return grad_x, grad_weight, None if bias is None else grad_bias, None, None, None, None, None


@torch.library.custom_op("memopt::linear_cross_entropy_forward", mutates_args=())
def _forward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                ignore_index: int, use_triton: bool, chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (fp32): its loss (0 where ``target`` is ``ignore_index``), and the log-sum-exp of its logits,
    which the backward reads."""
    x, weight, target = x.contiguous(), weight.contiguous(), target.contiguous()
    bias = None if bias is None else bias.contiguous()
    if use_triton:
        lse, picked = _triton_forward(x, weight, bias, target)
    else:
        lse, picked = _torch_forward(x, weight, bias, target, chunk_tokens)
    return torch.where(target != ignore_index, lse - picked, 0.0), lse


@_forward_op.register_fake
def _(x, weight, bias, target, ignore_index, use_triton, chunk_tokens):
    return x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("memopt::linear_cross_entropy_backward", mutates_args=())
def _backward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                 lse: torch.Tensor, scale: torch.Tensor, use_triton: bool, chunk_tokens: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``x``, ``weight`` and the bias (of ``weight``'s rows: made whether or not there is one)
    in their dtypes, given each token's share ``scale`` of the loss's gradient (0 for an ignored token)."""
    x, weight = x.contiguous(), weight.contiguous()
    target = target.clamp(0, weight.shape[0] - 1).contiguous()  # (an ignored token's scale is 0)
    bias = None if bias is None else bias.contiguous()
    run = _triton_backward if use_triton else functools.partial(_torch_backward, chunk=chunk_tokens)
    grad_x, grad_weight, grad_bias = run(x, weight, bias, target, lse, scale.float().contiguous())
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


@_backward_op.register_fake
def _(x, weight, bias, target, lse, scale, use_triton, chunk_tokens):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0])


# FLOPs, for torch's flop counter and memopt's cost model: the logits' matmul once forward; again, and the two
# gradients' matmuls, backward
@register_flop_formula(torch.ops.memopt.linear_cross_entropy_forward)
def _forward_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * weight_shape[0]


@register_flop_formula(torch.ops.memopt.linear_cross_entropy_backward)
def _backward_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    return 6 * x_shape[0] * x_shape[1] * weight_shape[0]


def _torch_forward(x, weight, bias, target, chunk):
    """The log-sum-exp and target logit per token, a slice of the tokens' logits at a time, worked on in place."""
    lse = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    picked = torch.empty_like(lse)
    for start in range(0, x.shape[0], chunk):
        part = slice(start, start + chunk)
        logits = F.linear(x[part], weight, bias).float()
        picked[part] = logits.gather(1, target[part].clamp(0, weight.shape[0] - 1)[:, None])[:, 0]
        high = logits.amax(1)
        lse[part] = logits.sub_(high[:, None]).exp_().sum(1).log_().add_(high)
        del logits  # before the next slice's are made
    return lse, picked


def _torch_backward(x, weight, bias, target, lse, scale, *, chunk):
    """The gradients (fp32), a slice of the tokens' logits at a time: each turned in place into its gradient,
    then multiplied into the gradients' slices (``out=`` and in place: no other temporary of their size)."""
    grad_x = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
    grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device)
    weight32 = weight.float()
    for start in range(0, x.shape[0], chunk):
        part = slice(start, start + chunk)
        dlogits = F.linear(x[part], weight, bias).float().sub_(lse[part, None]).exp_()
        dlogits.scatter_add_(1, target[part, None], torch.full_like(lse[part, None], -1.0)).mul_(scale[part, None])
        torch.mm(dlogits, weight32, out=grad_x[part])
        grad_weight.addmm_(dlogits.t(), x[part].float())
        grad_bias.add_(dlogits.sum(0))
        del dlogits  # before the next slice's are made
    return grad_x, grad_weight, grad_bias


@functools.cache
def _triton():
    """The module of Triton kernels, or None without Triton (imported once, when first needed)."""
    try:
        from memopt.lower.kernels import _cross_entropy_triton
    except ImportError:
        return None
    return _cross_entropy_triton


def _triton_forward(x, weight, bias, target):
    kernels = _triton()
    tokens, hidden = x.shape
    classes = weight.shape[0]
    blocks = linear_cross_entropy_blocks(tokens, classes, hidden)
    lse = torch.empty(tokens, dtype=torch.float32, device=x.device)
    picked = torch.empty_like(lse)
    grid = (-(-tokens // blocks.block_m),)
    kernels.forward[grid](x, weight, x if bias is None else bias, target, lse, picked, tokens, classes, hidden,
                          HAS_BIAS=bias is not None, BLOCK_M=blocks.block_m, BLOCK_V=blocks.block_v,
                          BLOCK_K=blocks.block_k, num_warps=blocks.num_warps)
    return lse, picked


def _triton_backward(x, weight, bias, target, lse, scale):
    kernels = _triton()
    tokens, hidden = x.shape
    classes = weight.shape[0]
    blocks = linear_cross_entropy_blocks(tokens, classes, hidden)
    grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
    grad_bias = torch.zeros(classes, dtype=torch.float32, device=x.device)
    common = {"HAS_BIAS": bias is not None, "BLOCK_M": blocks.block_m, "BLOCK_V": blocks.block_v,
              "BLOCK_K": blocks.block_k, "num_warps": blocks.num_warps}
    b = x if bias is None else bias
    kernels.grad_input[(-(-tokens // blocks.block_m),)](x, weight, b, target, lse, scale, grad_x, tokens, classes,
                                                         hidden, **common)
    kernels.grad_weight[(-(-classes // blocks.block_v),)](x, weight, b, target, lse, scale, grad_weight, grad_bias,
                                                          tokens, classes, hidden, **common)
    return grad_x, grad_weight, grad_bias
