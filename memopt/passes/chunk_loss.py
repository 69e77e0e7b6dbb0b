"""Chunked loss head: the logits of a linear + log-softmax + NLL loss never exist whole.

A language model's step peaks at its loss head: the logits, their log-softmax and
the gradient of each are (tokens x vocabulary) tensors, and the backward holds
several of them at once. Found from the graph's ops (an ``mm``/``addmm`` whose
rows reach ``_log_softmax`` and ``nll_loss_forward`` through views and casts, the
matching ``nll_loss_backward`` and ``_log_softmax_backward_data``, and the
matrix products that read the logits' gradient), the head is rewritten to run
over ``k`` slices of the tokens: the forward sums each slice's loss and keeps
none of its logits. Where every other operand of the products that read the
logits' gradient exists in the forward (the head's weight and input), the forward
also takes each slice's gradient for a unit loss gradient and its share of the
input's and the weight's gradients, as Liger-Kernel's fused linear cross-entropy
does, and the backward scales those sums by the loss's gradient: the logits are
computed once, as unchunked. Elsewhere the backward computes each slice's logits
again, its gradient, and that slice's shares.

The same kernels run on each slice, so each row's values are eager's; the sums
over the tokens (the loss, the weight's and bias's gradients) add the slices'
partial sums, which changes only the order of the floating-point additions.
Scaling after the sums, not before, changes nothing where the loss's gradient
is one (``loss.backward()``) or a power of two (a gradient scaler's).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

from memopt.capture import CapturedStep
from memopt.device import DeviceSpec
from memopt.passes.costs import node_seconds
from memopt.passes.graph_edit import (
    CAST,
    Builder,
    chunked_step,
    erase_unused,
    position,
    sort_topologically,
    tensor_of,
    token_bounds,
    transposes_2d,
)
from memopt.passes.storage import shares_storage

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.alias.default,
          aten.detach.default}
_TRANSPOSES = {aten.t.default, aten.permute.default, aten.transpose.int}
MEAN, SUM = 1, 2  # nll_loss's reduction codes


@dataclass(frozen=True, slots=True)
class LossHead:
    """A linear layer feeding log-softmax and an NLL loss, as found in a joint graph (node names)."""

    loss: str  # the nll_loss_forward node
    rows: int  # tokens (the rows of the logits)
    vocab: int  # classes (the logits' columns)
    logits_bytes: int  # one (rows x vocab) tensor of the log-softmax's dtype
    logits_nodes: tuple[str, ...]  # the matrix product and log-softmax: what the backward may compute again
    gradients_in_forward: bool = False  # chunked, the forward takes its gradients and computes them once

    def chunk_bytes(self, chunks: int) -> int:
        return math.ceil(self.rows / chunks) * self.logits_bytes // self.rows


@dataclass(frozen=True, slots=True)
class _Match:
    head: LossHead
    forward: fx.Node  # nll_loss_forward
    inputs: fx.Node  # (rows x features), the linear layer's input
    weight_t: fx.Node  # (features x vocab)
    bias: fx.Node | None
    cast: torch.dtype | None  # the dtype the logits are cast to before log-softmax
    target: fx.Node
    backward: fx.Node | None  # nll_loss_backward
    gradient: fx.Node | None  # _log_softmax_backward_data
    readers: tuple[tuple[fx.Node, str, torch.dtype | None, fx.Node | None], ...]  # (node, how, cast, other operand)
    region: frozenset[fx.Node]  # nodes the rewrite replaces


def find_loss_heads(graph: fx.GraphModule) -> list[LossHead]:
    """The loss heads of ``graph`` that ``chunk_loss_heads`` can rewrite."""
    return [match.head for match in _matches(graph.graph)]


def chunk_step(step: CapturedStep, chunks: dict[str, int]) -> CapturedStep:
    """``step`` with its loss heads named in ``chunks`` (by their ``LossHead.loss``) run over that many slices of
    the tokens (a head given 1 chunk, or not named, is left as it is)."""

    return chunked_step(step, _matches, lambda match: min(chunks.get(match.head.loss, 1), match.head.rows), _rewrite)


def fuse_step(step: CapturedStep, losses: set[str], *, use_triton: bool) -> CapturedStep:
    """``step`` with its loss heads named in ``losses`` run by memopt's fused linear + cross-entropy kernel
    (``memopt.lower.kernels``): the graph holds no logits at all, the kernel 8 bytes per token; ``use_triton``:
    its Triton code (CUDA), else its torch path over slices of the tokens (``torch_chunk_tokens``)."""
    def matches(graph: fx.Graph) -> list[_Match]:
        return [match for match in _matches(graph) if match.head.loss in losses and _fusable(match)]

    def rewrite(graph: fx.Graph, match: _Match, _: int) -> tuple[dict[str, str], set[str]]:
        return _fuse(graph, match, use_triton)

    # (chunked_step rewrites the matches given more than one slice)
    return chunked_step(step, matches, lambda match: 2, rewrite)


def fused_heads(graph: fx.GraphModule) -> list[LossHead]:
    """The loss heads of ``graph`` that ``fuse_step`` can rewrite."""
    return [match.head for match in _matches(graph.graph) if _fusable(match)]


def logits_seconds(graph: fx.GraphModule, head: LossHead, device: DeviceSpec) -> float:
    """The head's logits and log-softmax computed again in the backward: what the fused kernel adds to the step,
    and chunking where the forward cannot take the head's gradients."""
    return sum(node_seconds(node, device) for node in graph.graph.nodes if node.name in head.logits_nodes)


# ------------------------------------------------------------------ finding the head

def _matches(graph: fx.Graph) -> list[_Match]:
    found = []
    for node in graph.nodes:
        if node.target is aten.nll_loss_forward.default:
            match = _match(node)
            if match is not None:
                found.append(match)
    return found


def _row_preserving(node: fx.Node, vocab: int) -> bool:
    """A view or dtype cast after which row r of the logits is still row r (last dimension ``vocab``, rows in
    order): a reshape of the leading dimensions of a contiguous tensor."""
    value = tensor_of(node)
    if value is None or value.shape[-1] != vocab or not value.is_contiguous():
        return False
    if node.target in _VIEWS:
        return True
    return node.target is CAST and set(node.kwargs) <= {"dtype"} and len(node.args) == 1


def _match(forward: fx.Node) -> _Match | None:
    log_probs, target, weight, reduction, ignore_index = (list(forward.args) + [None] * 5)[:5]
    if weight is not None or reduction not in (MEAN, SUM) or not isinstance(log_probs, fx.Node):
        return None
    if log_probs.target is not aten._log_softmax.default or log_probs.args[1] not in (1, -1) or log_probs.args[2]:
        return None
    logits = log_probs.args[0]
    value = tensor_of(logits)
    if value is None or value.dim() != 2:
        return None
    rows, vocab = value.shape
    # back from the logits to the matrix product through row-preserving views and at most one cast
    chain, node, cast = [], logits, None
    while isinstance(node, fx.Node) and node.target not in (aten.mm.default, aten.addmm.default):
        if not _row_preserving(node, vocab) or len(node.users) != 1:
            return None
        if node.target is CAST:
            if cast is not None:
                return None
            cast = node.kwargs["dtype"]
        chain.append(node)
        node = node.args[0]
    if not isinstance(node, fx.Node) or len(node.users) != 1 or node.kwargs:
        return None
    product = node
    bias, inputs, weight_t = (None, *product.args) if product.target is aten.mm.default else product.args[:3]
    if len(product.args) > 3 or tensor_of(inputs) is None or tensor_of(inputs).dim() != 2 or tensor_of(inputs).shape[0] != rows:
        return None
    # the forward's results go to getitem nodes only; the log-probabilities to the loss's backward only
    if any(user.target is not operator.getitem for user in forward.users):
        return None
    backward, gradient = _backward_of(log_probs, forward, target, reduction, ignore_index)
    if backward is None and any(user is not forward for user in _through_views(log_probs)):
        return None
    readers, between = _gradient_readers(gradient, rows, vocab) if gradient is not None else ((), set())
    if readers is None:
        return None
    region = {forward, log_probs, product, *chain, *forward.users}
    if backward is not None:
        region |= {backward, gradient, *_views_between(log_probs), *between}
        region |= {reader for reader, *_ in readers}
    in_forward = backward is not None and _gradients_in_forward(forward, backward, readers)
    head = LossHead(forward.name, rows, vocab, rows * vocab * tensor_of(log_probs).element_size(),
                    (product.name, log_probs.name), in_forward)
    return _Match(head, forward, inputs, weight_t, bias, cast, target, backward, gradient, tuple(readers),
                  frozenset(region))


def _gradients_in_forward(forward: fx.Node, backward: fx.Node, readers) -> bool:
    """Whether the forward can take the head's gradients for a unit loss gradient: the loss's gradient is a scalar
    and every other operand of the gradient's readers is defined before the loss, or is a view of what is."""
    at = position(forward)
    grad_output = tensor_of(backward.args[0])
    return (grad_output is not None and grad_output.dim() == 0
            and all(other is None or _early(other, at) for *_, other in readers))


def _early(node: fx.Node, at: int) -> bool:
    """``node`` comes before position ``at``, or is a view or transpose of nodes that do."""
    if position(node) < at:
        return True
    return (node.op == "call_function" and node.target in _VIEWS | _TRANSPOSES
            and all(_early(arg, at) for arg in node.all_input_nodes))


def _copied_early(build: Builder, node: fx.Node, at: int) -> fx.Node:
    """``node``, or where it comes at or after position ``at``, a copy of its views made by ``build``."""
    if position(node) < at:
        return node
    return build(node.target, *fx.node.map_arg(node.args, lambda arg: _copied_early(build, arg, at)),
                 **node.kwargs)


def _backward_of(log_probs: fx.Node, forward: fx.Node, target: fx.Node, reduction: int,
                 ignore_index: int) -> tuple[fx.Node | None, fx.Node | None]:
    """The loss's ``nll_loss_backward`` and the ``_log_softmax_backward_data`` it feeds, when the
    log-probabilities reach nothing else."""
    backward = gradient = None
    for user in _through_views(log_probs):
        if user is forward:
            continue
        if user.target is aten.nll_loss_backward.default and backward is None and user.args[1] is log_probs \
                and user.args[2] is target and user.args[3] is None and user.args[4:6] == (reduction, ignore_index):
            backward = user
        elif user.target is aten._log_softmax_backward_data.default and gradient is None \
                and user.args[2] in (1, -1):
            gradient = user
        else:
            return None, None
    if backward is None or gradient is None or gradient.args[0] is not backward or len(backward.users) != 1:
        return None, None
    return backward, gradient


def _through_views(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` and of its detach/alias views, the views left out."""
    found = []
    for user in node.users:
        if user.target in (aten.detach.default, aten.alias.default):
            found.extend(_through_views(user))
        else:
            found.append(user)
    return found


def _views_between(start: fx.Node) -> set[fx.Node]:
    """The detach/alias views of ``start``, and theirs."""
    views = set()
    for user in start.users:
        if user.target in (aten.detach.default, aten.alias.default):
            views |= {user} | _views_between(user)
    return views


def _gradient_readers(gradient: fx.Node, rows: int, vocab: int):
    """How the backward reads the logits' gradient: a list of (node, how, cast, other operand), ``how`` one of
    "rows" (mm(g, W): a result row per token), "tokens-left" (mm(g.T, X): a sum over the tokens), "tokens-right"
    (mm(X, g): a sum over the tokens), "sum" (g summed over the tokens: a bias's gradient); None when some
    reader is none of these; and the views, casts and transposes between the gradient and its readers."""
    readers, between = [], set()
    stack = [(gradient, None, False)]  # (node, cast so far, transposed)
    while stack:
        node, cast, transposed = stack.pop()
        between.add(node)
        for user in node.users:
            value = tensor_of(user)
            if value is None:
                return None, between
            if not transposed and _row_preserving(user, vocab):
                if user.target is CAST:
                    if cast is not None:
                        return None, between
                    stack.append((user, user.kwargs["dtype"], False))
                else:
                    stack.append((user, cast, False))
            elif user.target in _TRANSPOSES and not transposed and value.dim() == 2 and tensor_of(node).dim() == 2 \
                    and transposes_2d(user):
                stack.append((user, cast, True))
            elif user.target is aten.mm.default and tensor_of(node).dim() == 2:
                left, right = user.args
                if left is node and right is not node:
                    readers.append((user, "tokens-left" if transposed else "rows", cast, right))
                elif right is node and left is not node and not transposed:
                    readers.append((user, "tokens-right", cast, left))
                else:
                    return None, between
            elif (user.target is aten.sum.dim_IntList and not transposed and tensor_of(node).dim() == 2
                  and list(user.args[1]) in ([0], [-2]) and not user.kwargs.get("dtype")):
                readers.append((user, "sum", cast, None))
            else:
                return None, between
    return readers, between


# ------------------------------------------------------------------ the rewrite

def _rewrite(graph: fx.Graph, match: _Match, k: int) -> tuple[dict[str, str], set[str]]:
    forward = match.forward
    reduction, ignore_index = forward.args[3], forward.args[4]
    bounds = token_bounds(match.head.rows, k)

    def logits(build: Builder, start: int, stop: int) -> tuple[fx.Node, fx.Node]:
        rows = build(aten.slice.Tensor, match.inputs, 0, start, stop)
        product = (build(aten.mm.default, rows, match.weight_t) if match.bias is None
                   else build(aten.addmm.default, match.bias, rows, match.weight_t))
        log_probs = build(aten._log_softmax.default, build.cast(product, match.cast), 1, False)
        return log_probs, build(aten.slice.Tensor, match.target, 0, start, stop)

    # the forward: each slice's summed loss and its count of counted tokens, then the step's loss
    build = Builder(graph, forward)
    in_forward = match.head.gradients_in_forward
    if in_forward:
        # each slice's gradient divides by the count of every slice's counted tokens: counted first
        at = position(forward)
        others = [None if other is None else _copied_early(build, other, at) for *_, other in match.readers]
        dtype = tensor_of(match.forward.args[0]).dtype
        counted = build(aten.sum.default, build(aten.ne.Scalar, match.target, ignore_index))
        total_weight = build(CAST, counted, dtype=dtype)
        one = build(aten.scalar_tensor.default, 1.0, dtype=dtype, device=tensor_of(match.target).device)
        parts: list[list[fx.Node]] = [[] for _ in match.readers]
    total = count = None
    for start, stop in bounds:
        log_probs, target = logits(build, start, stop)
        pair = build(aten.nll_loss_forward.default, log_probs, target, None, SUM, ignore_index)
        part, weight = build(operator.getitem, pair, 0), build(operator.getitem, pair, 1)
        total = part if total is None else build(aten.add.Tensor, total, part)
        count = weight if count is None else build(aten.add.Tensor, count, weight)
        if in_forward:
            _gradient_shares(build, match, log_probs, target, one, total_weight, others, parts, start, stop)
    loss = build(aten.div.Tensor, total, count) if reduction == MEAN else total
    renamed = _replace_results(forward, loss, count)
    backward = set()
    if match.backward is not None:
        backward_build = Builder(graph, _last_reader(match))
        if in_forward:  # the forward's results, times the loss's gradient
            renamed |= _replace_readers(backward_build, match, _joined(build, match, parts), match.backward.args[0])
        else:
            renamed |= _rewrite_backward(backward_build, match, bounds, logits)
        backward = {node.name for node in backward_build.added}
    erase_unused(match.region)
    sort_topologically(graph)
    return renamed, backward


def _replace_results(forward: fx.Node, loss: fx.Node, count: fx.Node) -> dict[str, str]:
    """``nll_loss_forward``'s readers read ``loss`` and ``count`` instead; the names of what they held -> now."""
    results, renamed = {0: loss, 1: count}, {}
    for user in list(forward.users):
        user.replace_all_uses_with(results[user.args[1]])
        renamed[user.name] = results[user.args[1]].name
    return renamed


def _last_reader(match: _Match) -> fx.Node:
    """Where the backward's slices go: after the last reader of the logits' gradient (and so after their other
    operands), so that everything they read is defined."""
    return max((reader for reader, *_ in match.readers), key=position, default=match.gradient)


def _rewrite_backward(build: Builder, match: _Match, bounds, logits) -> dict[str, str]:
    """Each slice's logits again, their gradient, and the slice's share of what the backward read from it."""
    grad_output, total_weight = match.backward.args[0], match.backward.args[6]
    parts: list[list[fx.Node]] = [[] for _ in match.readers]
    for start, stop in bounds:
        log_probs, target = logits(build, start, stop)
        _gradient_shares(build, match, log_probs, target, grad_output, total_weight,
                         [other for *_, other in match.readers], parts, start, stop)
    return _replace_readers(build, match, _joined(build, match, parts))


def _gradient_shares(build: Builder, match: _Match, log_probs: fx.Node, target: fx.Node, grad_output: fx.Node,
                     total_weight: fx.Node, others: list[fx.Node | None], parts: list[list[fx.Node]], start: int,
                     stop: int) -> None:
    """One slice's gradient of the logits for ``grad_output``, and its share of each reader's result appended to
    ``parts`` (the sums over the tokens added as the slices come: one partial sum held)."""
    backward, gradient = match.backward, match.gradient
    grad_log_probs = build(aten.nll_loss_backward.default, grad_output, log_probs, target, None, backward.args[4],
                           backward.args[5], total_weight)
    grad_logits = build(aten._log_softmax_backward_data.default, grad_log_probs, log_probs, 1, gradient.args[3])
    for index, ((reader, how, cast, _), other) in enumerate(zip(match.readers, others)):
        piece = build.cast(grad_logits, cast)
        if how == "rows":
            parts[index].append(build(aten.mm.default, piece, other))
        elif how == "tokens-left":
            rows = build(aten.slice.Tensor, other, 0, start, stop)
            parts[index].append(build(aten.mm.default, build(aten.t.default, piece), rows))
        elif how == "tokens-right":
            columns = build(aten.slice.Tensor, other, 1, start, stop)
            parts[index].append(build(aten.mm.default, columns, piece))
        else:
            parts[index].append(build(aten.sum.dim_IntList, piece, [0], reader.args[2] if len(reader.args) > 2
                                      else reader.kwargs.get("keepdim", False)))
        if how != "rows" and len(parts[index]) > 1:
            parts[index][-2:] = [build(aten.add.Tensor, *parts[index][-2:])]


def _joined(build: Builder, match: _Match, parts: list[list[fx.Node]]) -> list[fx.Node]:
    """Each reader's result from its slices' shares: joined along the tokens, or their sum."""
    return [build(aten.cat.default, pieces, 0) if how == "rows" else pieces[0]
            for (_, how, *_), pieces in zip(match.readers, parts)]


def _replace_readers(build: Builder, match: _Match, results: list[fx.Node],
                     scale: fx.Node | None = None) -> dict[str, str]:
    """Each reader of the logits' gradient replaced by its result, times ``scale`` if given; the readers' names ->
    their replacements'."""
    renamed = {}
    for (reader, *_), result in zip(match.readers, results):
        if scale is not None:
            result = build(aten.mul.Tensor, result, scale)
        reader.replace_all_uses_with(result)
        renamed[reader.name] = result.name
    return renamed


# ------------------------------------------------------------------ the fused kernel

def _fusable(match: _Match) -> bool:
    """The backward reads the logits' gradient only with the head's own input and weight (the kernel makes
    the gradients of those two and of the bias, nothing else)."""
    inputs, weight_t = tensor_of(match.inputs), tensor_of(match.weight_t)
    for _, how, _, other in match.readers:
        value = tensor_of(other) if isinstance(other, fx.Node) else None
        if how == "sum":
            continue
        if value is None:
            return False
        ours = weight_t if how == "rows" else inputs
        if not shares_storage(value, ours) or sorted(value.shape) != sorted(ours.shape):
            return False
    return match.backward is not None or not match.readers


def _fuse(graph: fx.Graph, match: _Match, use_triton: bool) -> tuple[dict[str, str], set[str]]:
    from memopt.lower.kernels.cross_entropy import torch_chunk_tokens

    forward = match.forward
    reduction, ignore_index = forward.args[3], forward.args[4]
    chunk = torch_chunk_tokens(match.head.vocab)
    dtype = tensor_of(match.forward.args[0]).dtype  # the loss's, as nll_loss gives it
    build = Builder(graph, forward)
    weight = build(aten.t.default, match.weight_t)  # (classes, features), as the kernel takes it
    pair = build(torch.ops.memopt.linear_cross_entropy_forward.default, match.inputs, weight, match.bias,
                 match.target, ignore_index, use_triton, chunk)
    losses, lse = build(operator.getitem, pair, 0), build(operator.getitem, pair, 1)
    valid = build(aten.ne.Scalar, match.target, ignore_index)
    count = build(aten.sum.default, valid, dtype=dtype)
    total = build.cast(build(aten.sum.default, losses), dtype)
    loss = build(aten.div.Tensor, total, count) if reduction == MEAN else total
    renamed = _replace_results(forward, loss, count)
    added: set[str] = set()
    if match.backward is not None:
        build = Builder(graph, _last_reader(match))
        grad_output, total_weight = match.backward.args[0], match.backward.args[6]
        share = build(aten.div.Tensor, grad_output, total_weight) if reduction == MEAN else grad_output
        scale = build(aten.mul.Tensor, build(CAST, valid, dtype=torch.float32), build.cast(share, torch.float32))
        grads = build(torch.ops.memopt.linear_cross_entropy_backward.default, match.inputs, weight, match.bias,
                      match.target, lse, scale, use_triton, chunk)
        grad_x, grad_weight, grad_bias = (build(operator.getitem, grads, i) for i in range(3))
        for reader, how, _, _ in match.readers:
            if how == "rows":
                result = grad_x
            elif how == "tokens-left":
                result = grad_weight
            elif how == "tokens-right":
                result = build(aten.t.default, grad_weight)
            else:
                keep = reader.args[2] if len(reader.args) > 2 else reader.kwargs.get("keepdim", False)
                result = build(aten.unsqueeze.default, grad_bias, 0) if keep else grad_bias
            result = build.cast(result, tensor_of(reader).dtype) if tensor_of(result).dtype != \
                tensor_of(reader).dtype else result
            reader.replace_all_uses_with(result)
            renamed[reader.name] = result.name
        added = {node.name for node in build.added}
    erase_unused(match.region)
    sort_topologically(graph)
    return renamed, added
