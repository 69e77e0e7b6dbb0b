"""Chunked MLP: the wide tensors of a feed-forward block exist one slice of the tokens at a time.

Between a block's up projection(s) and its down projection every tensor is a (tokens x intermediate) one,
several times wider than the block's input and output, and its backward holds several of them at once (an
activation's decomposed derivative above all). The region is found from the graph's ops, not from module
names: a matrix product of a weight (the down projection) whose rows come, through pointwise ops and views of
tensors wider than its result, from matrix products of weights (the up projections), with nothing else in the
forward reading what lies between.

The rewrite runs that forward over ``k`` slices of the tokens and concatenates the down projection's rows. Its
backward (the ops that read the region's values, the wide tensors they lead to, and the matrix products and
sums that end them) runs slice by slice too: each slice reads its own slice's saved values, adds its share of
each weight's and bias's gradient to a running sum, and the rows of the gradient handed on are concatenated.
What each slice keeps for the backward is then the recompute planner's choice, slice by slice: the
Mini-Sequence Transformer's chunked MLP, planned with the rest of the step.

Each row is computed by the same kernels on the same values, but a matrix product over fewer rows may add in
another order, and the weights' gradients add the slices' partial sums: exact up to the order of the
floating-point additions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from memopt.capture import CapturedStep
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

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_SAME = {aten.alias.default, aten.detach.default, aten.clone.default}  # row-local ops that are not tagged pointwise
_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default}
_PRODUCTS = {aten.mm.default, aten.addmm.default}


@dataclass(frozen=True, slots=True)
class MLPRegion:
    """A feed-forward block found in a joint graph: its down projection (a node name) and its sizes."""

    down: str  # the down projection's matrix product
    rows: int  # tokens
    width: int  # elements per token of its widest tensor (the intermediate size)
    wide_bytes: int  # one whole (tokens x width) tensor of that dtype
    forward_nodes: int  # what the rewrite runs slice by slice, in the forward
    backward_nodes: int  # and in the backward

    def chunk_bytes(self, chunks: int) -> int:
        return math.ceil(self.rows / chunks) * self.wide_bytes // self.rows


@dataclass(frozen=True, slots=True)
class _Match:
    region: MLPRegion
    down: fx.Node
    forward: tuple[fx.Node, ...]  # graph order
    backward: tuple[fx.Node, ...]  # graph order
    kinds: dict[fx.Node, str]  # how each runs on a slice (``_kind``)
    graph: _Graph


def find_mlp_regions(step: CapturedStep) -> list[MLPRegion]:
    """The feed-forward blocks of ``step`` that ``chunk_mlp_step`` can rewrite."""
    return [match.region for match in _matches(step.graph.graph, _static_names(step), step.backward_start)]


def chunk_mlp_step(step: CapturedStep, chunks: dict[str, int]) -> CapturedStep:
    """``step`` with the blocks named in ``chunks`` (by their ``MLPRegion.down``) run over that many slices of
    the tokens (a block given 1 chunk, or not named, is left as it is)."""
    static, start = _static_names(step), step.backward_start
    return chunked_step(step, lambda graph: _matches(graph, static, start),
                        lambda match: min(chunks.get(match.region.down, 1), match.region.rows), _rewrite)


def _static_names(step: CapturedStep) -> frozenset[str]:
    """Placeholders that hold the same values on every token: parameters and buffers."""
    return frozenset(p.node for p in step.placeholders if p.role in ("parameter", "buffer"))


# ------------------------------------------------------------------ what a node is

class _Graph:
    """Questions about the nodes of one graph, for a region of ``rows`` tokens."""

    def __init__(self, graph: fx.Graph, static_names: frozenset[str], backward_start: str) -> None:
        self.order = {node: index for index, node in enumerate(graph.nodes)}
        self.backward_from = next(index for node, index in self.order.items() if node.name == backward_start)
        self.static_names = static_names
        self._static: dict[fx.Node, bool] = {}

    def backward(self, node: fx.Node) -> bool:
        return self.order[node] >= self.backward_from

    def static(self, node: fx.Node) -> bool:
        """Computed from parameters and buffers alone (a weight, its transpose): the same for every token."""
        if node not in self._static:
            if node.op == "placeholder":
                self._static[node] = node.name in self.static_names
            elif node.op == "get_attr":
                self._static[node] = True
            else:
                self._static[node] = node.op == "call_function" and all(map(self.static, node.all_input_nodes))
        return self._static[node]


def _lead(node: object, rows: int) -> int | None:
    """How many leading dimensions of ``node``'s tensor make up the ``rows`` tokens (the fewest whose product
    is ``rows``), or None when none do."""
    value = tensor_of(node)
    if value is None:
        return None
    product = 1
    for index, size in enumerate(value.shape):
        product *= int(size)
        if product == rows:
            return index + 1
        if product > rows or product == 0:
            return None
    return None


def _per_token(node: object, rows: int, graph: _Graph) -> bool:
    return isinstance(node, fx.Node) and not graph.static(node) and _lead(node, rows) is not None


def _columns(node: object, rows: int, graph: _Graph) -> bool:
    """A 2-D per-token tensor transposed: (features x tokens)."""
    return (isinstance(node, fx.Node) and node.target in _TRANSPOSES and transposes_2d(node)
            and _per_token(node.args[0], rows, graph) and tensor_of(node.args[0]).dim() == 2)


def _width(node: fx.Node, rows: int) -> int:
    value = tensor_of(node)
    return value.numel() // rows if value is not None else 0


def _kind(node: fx.Node, rows: int, graph: _Graph) -> str | None:
    """How ``node`` runs on a slice of the tokens: "view" (a reshape keeping the tokens leading), "same" (the
    same op on the slices: pointwise ops, aliases, copies, casts), "transpose" (of a 2-D per-token tensor),
    "project" (rows times a matrix that is not per-token), "sum-mm" (columns times rows: a sum over the tokens),
    "sum" (over the tokens' dimensions); None when it cannot."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    target = node.target
    if torch.Tag.nondeterministic_seeded in target.tags:
        return None
    if _columns(node, rows, graph):
        return "transpose"
    if target is aten.mm.default:
        left, right = node.args
        if _columns(left, rows, graph) and _per_token(right, rows, graph) and tensor_of(right).dim() == 2:
            return "sum-mm"
        if _per_token(left, rows, graph) and tensor_of(left).dim() == 2 and not _per_token(right, rows, graph) \
                and not _columns(right, rows, graph):
            return "project"
        return None
    if target is aten.addmm.default:
        bias, left, right = node.args[:3]
        if _per_token(left, rows, graph) and tensor_of(left).dim() == 2 and graph.static(right) and graph.static(bias):
            return "project"
        return None
    if target is aten.sum.dim_IntList:
        source = node.args[0]
        if not _per_token(source, rows, graph) or "dtype" in node.kwargs:
            return None
        dims = sorted(int(d) % tensor_of(source).dim() for d in node.args[1])
        return "sum" if dims == list(range(_lead(source, rows))) else None
    if not _per_token(node, rows, graph):
        return None
    if target in _VIEWS:
        return "view" if _per_token(node.args[0], rows, graph) else None
    if target in _SAME or torch.Tag.pointwise in target.tags or (target is CAST and set(node.kwargs) <= {"dtype"}):
        return "same" if all(_broadcasts(arg, node, rows, graph) for arg in node.all_input_nodes) else None
    return None


def _broadcasts(arg: fx.Node, node: fx.Node, rows: int, graph: _Graph) -> bool:
    """An input of a pointwise op that slices with the tokens or broadcasts over them (its leading dimensions,
    those the tokens take in the result, are ones or absent)."""
    if _per_token(arg, rows, graph):
        return True
    value, result = tensor_of(arg), tensor_of(node)
    if value is None:
        return True
    lead = _lead(node, rows)
    rest = result.dim() - lead
    return value.dim() <= rest or all(size == 1 for size in value.shape[:value.dim() - rest])


# ------------------------------------------------------------------ finding the regions

def _matches(graph: fx.Graph, static_names: frozenset[str], backward_start: str) -> list[_Match]:
    info = _Graph(graph, static_names, backward_start)
    found: list[_Match] = []
    taken: set[fx.Node] = set()
    for node in graph.nodes:
        if node.target in _PRODUCTS and not info.backward(node) and node not in taken:
            match = _match(node, info)
            if match is not None and not taken & (set(match.forward) | set(match.backward)):
                found.append(match)
                taken |= set(match.forward) | set(match.backward)
    return found


def _match(down: fx.Node, graph: _Graph) -> _Match | None:
    value = tensor_of(down)
    if value is None or value.dim() != 2:
        return None
    rows = value.shape[0]
    if _kind(down, rows, graph) != "project":
        return None
    narrow = _width(down, rows)
    forward = _forward_region(down, rows, narrow, graph)
    if forward is None:
        return None
    backward = _backward_region(forward, rows, narrow, graph)
    if backward is None:
        return None
    if not all(_sliceable(arg, rows, graph) for node in forward | backward for arg in node.all_input_nodes
               if arg not in forward and arg not in backward):
        return None
    widest = max(forward, key=lambda node: _width(node, rows))
    wide = tensor_of(widest)
    region = MLPRegion(down.name, rows, _width(widest, rows), wide.numel() * wide.element_size(), len(forward),
                       len(backward))
    kinds = {node: _kind(node, rows, graph) for node in forward | backward}
    return _Match(region, down, tuple(sorted(forward, key=graph.order.__getitem__)),
                  tuple(sorted(backward, key=graph.order.__getitem__)), kinds, graph)


def _sliceable(node: fx.Node, rows: int, graph: _Graph) -> bool:
    """A value from outside the region that its slices can read without a copy: not per-token, columns, or
    tokens first as (tokens x features) or contiguous (a view makes it so)."""
    if not _per_token(node, rows, graph) or _columns(node, rows, graph):
        return True
    value = tensor_of(node)
    return value.shape[0] == rows or value.is_contiguous()


def _forward_region(down: fx.Node, rows: int, narrow: int, graph: _Graph) -> set[fx.Node] | None:
    """``down`` and what lies between it and the up projections: tensors wider than ``down``'s, read by nothing
    else in the forward; None when some op on the way cannot run on slices, or no up projection is reached."""
    region, stack, projections = {down}, [down.args[-2] if down.target is aten.addmm.default else down.args[0]], 0
    while stack:
        node = stack.pop()
        if node in region:
            continue
        if graph.backward(node) or _width(node, rows) <= narrow:
            return None  # a narrow tensor before any up projection: not a feed-forward block
        kind = _kind(node, rows, graph)
        if kind == "project":
            region.add(node)
            projections += 1
            continue
        if kind not in ("view", "same"):
            return None
        region.add(node)
        stack.extend(arg for arg in node.all_input_nodes if _per_token(arg, rows, graph))
    if not projections:
        return None
    # forward values only the backward reads (a saved detach): they run on the slices too
    grown = True
    while grown:
        grown = False
        for node in list(region):  # noqa: PERF101 (the loop adds to the region)
            for user in node.users:
                if user not in region and not graph.backward(user) and user.users \
                        and all(graph.backward(u) for u in user.users) \
                        and _kind(user, rows, graph) in ("view", "same") \
                        and all(arg in region or not _per_token(arg, rows, graph) for arg in user.all_input_nodes):
                    region.add(user)
                    grown = True
    for node in region - {down}:
        if any(user not in region and not graph.backward(user) for user in node.users):
            return None  # the forward reads it whole elsewhere
    return region


def _backward_region(forward: set[fx.Node], rows: int, narrow: int, graph: _Graph) -> set[fx.Node] | None:
    """The backward's ops that read the forward region, the wide tensors they lead to and the sums over the
    tokens that end them, and what only they read; None when one of them cannot run on slices, the region would
    read what it computes through an op outside it, or it hands on columns."""
    kinds: dict[fx.Node, str | None] = {}  # the loop below asks again for the same nodes

    def kind_of(node: fx.Node) -> str | None:
        if node not in kinds:
            kinds[node] = _kind(node, rows, graph)
        return kinds[node]

    region: set[fx.Node] = set()
    for node in forward:
        for user in node.users:
            if graph.backward(user):
                if kind_of(user) is None:
                    return None
                region.add(user)

    def wide(node: fx.Node) -> bool:
        return _width(node, rows) > narrow

    grown = True
    while grown:
        grown = False
        for node in list(region):
            # the inputs only the region reads, when wide or a view
            for arg in node.all_input_nodes:
                if arg in region or arg in forward or not graph.backward(arg):
                    continue
                kind = kind_of(arg)
                if kind in ("view", "transpose", "same", "project") and (wide(arg) or kind in ("view", "transpose")) \
                        and all(user in region for user in arg.users):
                    region.add(arg)
                    grown = True
            # the readers of its wide tensors, and the sums over the tokens that end it
            if kind_of(node) in ("sum", "sum-mm"):
                continue
            for user in node.users:
                if user in region:
                    continue
                kind = kind_of(user)
                if kind is not None and (wide(node) or kind in ("sum", "sum-mm")):
                    region.add(user)
                    grown = True
    if not region:
        return None
    for node in region:
        if kind_of(node) == "transpose" and any(user not in region for user in node.users):
            return None
    # convex: nothing outside the region reads a value of it and feeds it back
    inputs = {arg for node in region for arg in node.all_input_nodes if arg not in region and arg not in forward}
    seen, stack = set(), [user for node in region for user in node.users if user not in region]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        if node in inputs:
            return None
        seen.add(node)
        stack.extend(user for user in node.users if user not in region)
    return region


# ------------------------------------------------------------------ the rewrite

class _Slices:
    """The nodes of one slice of the tokens: a region node's copy, or a slice of a value from outside."""

    def __init__(self, build: Builder, rows: int, graph: _Graph, start: int, stop: int,
                 copies: dict[fx.Node, fx.Node]) -> None:
        self.build, self.rows, self.graph, self.start, self.stop = build, rows, graph, start, stop
        self.copies = copies

    def __getitem__(self, node: object) -> object:
        if not isinstance(node, fx.Node):
            return node
        if node in self.copies:
            return self.copies[node]
        if _columns(node, self.rows, self.graph):
            piece = self.build(aten.slice.Tensor, node, 1, self.start, self.stop)
        elif _per_token(node, self.rows, self.graph):
            value = tensor_of(node)
            rest = list(value.shape[_lead(node, self.rows):])
            whole = node if list(value.shape) == [self.rows, *rest] else self.build(aten.view.default, node,
                                                                                    [self.rows, *rest])
            piece = self.build(aten.slice.Tensor, whole, 0, self.start, self.stop)
        else:
            return node
        self.copies[node] = piece
        return piece

    def broadcast(self, arg: object, node: fx.Node) -> object:
        """A pointwise op's input on the slice; one that broadcasts over the tokens loses their dimensions."""
        if not isinstance(arg, fx.Node) or _per_token(arg, self.rows, self.graph) or arg in self.copies:
            return self[arg]
        value, result = tensor_of(arg), tensor_of(node)
        rest = result.dim() - _lead(node, self.rows)
        if value is None or value.dim() <= rest:
            return arg
        return self.build(aten.view.default, arg, list(value.shape[value.dim() - rest:]))


def _copy(node: fx.Node, kind: str, piece: _Slices) -> fx.Node:
    """``node`` on one slice of the tokens (tokens flattened into the first dimension)."""
    build, rows = piece.build, piece.rows
    if kind == "view":
        source = piece[node.args[0]]
        shape = [piece.stop - piece.start, *tensor_of(node).shape[_lead(node, rows):]]
        return source if list(tensor_of(source).shape) == shape else build(aten.view.default, source, shape)
    if kind == "same":
        args = [piece.broadcast(arg, node) for arg in node.args]
        return build(node.target, *args, **node.kwargs)
    if kind == "transpose":
        return build(aten.t.default, piece[node.args[0]])
    if kind == "sum":
        return build(aten.sum.dim_IntList, piece[node.args[0]], [0], _keepdim(node))
    if node.target is aten.addmm.default:
        bias, left, right = node.args[:3]
        return build(aten.addmm.default, bias, piece[left], right, **node.kwargs)
    return build(aten.mm.default, piece[node.args[0]], piece[node.args[1]])


def _keepdim(node: fx.Node) -> bool:
    return bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))


def _rewrite(graph: fx.Graph, match: _Match, k: int) -> tuple[dict[str, str], set[str]]:
    rows, info, kinds = match.region.rows, match.graph, match.kinds
    bounds = token_bounds(rows, k)
    # the forward, slice by slice, then the down projection's rows joined
    forward_build = Builder(graph, match.down)
    forward_copies: list[dict[fx.Node, fx.Node]] = []
    for start, stop in bounds:
        piece = _Slices(forward_build, rows, info, start, stop, {})
        for node in match.forward:
            piece.copies[node] = _copy(node, kinds[node], piece)
        forward_copies.append({node: piece.copies[node] for node in match.forward})
    joined = forward_build(aten.cat.default, [copies[match.down] for copies in forward_copies], 0)
    # the backward, slice by slice, each reading its own slice's forward values; the sums over the tokens kept
    # as running sums, the rows handed on joined at the end
    inside = set(match.backward)
    exits = [node for node in match.backward if any(user not in inside for user in node.users)]
    build = Builder(graph, max(match.backward, key=position))
    sums: dict[fx.Node, fx.Node] = {}
    rows_of: dict[fx.Node, list[fx.Node]] = {node: [] for node in exits}
    for (start, stop), copies in zip(bounds, forward_copies):
        piece = _Slices(build, rows, info, start, stop, dict(copies))
        for node in match.backward:
            copy = piece.copies[node] = _copy(node, kinds[node], piece)
            if node not in rows_of:
                continue
            if kinds[node] in ("sum", "sum-mm"):
                sums[node] = build(aten.add.Tensor, sums[node], copy) if node in sums else copy
            else:
                rows_of[node].append(copy)
    renamed = {match.down.name: joined.name}
    results = {node: sums[node] if node in sums else build(aten.cat.default, rows_of[node], 0) for node in exits}
    for node, result in results.items():
        shape = list(tensor_of(node).shape)
        if list(tensor_of(result).shape) != shape:
            result = build(aten.view.default, result, shape)
        node.replace_all_uses_with(result)
        renamed[node.name] = result.name
    match.down.replace_all_uses_with(joined)
    erase_unused(set(match.forward) | inside)
    sort_topologically(graph)
    return renamed, {node.name for node in build.added}
