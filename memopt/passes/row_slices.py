"""Row slices: a sparse update that trains only the first rows of a weight computes only those rows' gradient.

A weight trained on its first ``k`` rows (for ``nn.Linear`` and convolutions, its first ``k`` output channels)
becomes a parameter of its own in the step: a new graph input, a view of the weight's rows (it shares the
weight's storage, so it adds no bytes), whose gradient is the weight's gradient cut to those rows. The cut is
pushed down the ops that make the gradient, to the matmul or convolution that computes it, so that only the
rows trained are computed (an ``mm`` over a slice of the incoming gradient), never the whole gradient and then
a slice of it. Where the push stops at an op it does not know, the whole gradient is computed and its rows
copied out at once, so the rest is freed there. The weight itself is read as before and gets no gradient.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Mapping

import torch
from torch import fx

from memopt.capture import CapturedStep, Placeholder
from memopt.passes.graph_edit import Builder, erase_unused, tensor_of
from memopt.passes.order_plan import copy_graph

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_ROWS = re.compile(r"^(?P<name>.+)\[:(?P<rows>\d+)\]$")


def rows_name(name: str, rows: int) -> str:
    """The name of the first ``rows`` rows of parameter ``name`` as a tensor of their own: ``"fc.weight[:64]"``."""
    return f"{name}[:{rows}]"


def split_rows(names: frozenset[str] | set[str]) -> tuple[frozenset[str], dict[str, int]]:
    """Parameter names, some of them row slices (``rows_name``): the parameters, and the rows of each sliced one."""
    rows = {found["name"]: int(found["rows"]) for found in map(_ROWS.match, names) if found}
    return frozenset(_ROWS.sub(r"\g<name>", name) for name in names), rows


def slice_rows(step: CapturedStep, rows: Mapping[str, int]) -> CapturedStep:
    """``step`` training, of each parameter in ``rows``, only its first ``rows[name]`` rows (see the module)."""
    if not rows:
        return step
    new = fx.GraphModule(step.graph, copy_graph(step.graph.graph))
    graph = new.graph
    by_name = {node.name: node for node in graph.nodes}
    node_of = {p.name: by_name[p.node] for p in step.placeholders if p.role == "parameter"}
    output = graph.output_node()
    placeholders = list(step.placeholders)
    gradients = dict(step.gradients)
    last_input = [node for node in graph.nodes if node.op == "placeholder"][-1]
    for name, k in rows.items():
        weight = tensor_of(node_of.get(name))
        if name not in gradients or weight is None or weight.dim() < 2 or not 0 < k < weight.shape[0]:
            raise ValueError(f"cannot train the first {k} rows of {name!r}: it is not a trained tensor of 2 or more "
                             "dimensions with more rows than that")
        with graph.inserting_after(last_input):
            view = graph.placeholder(f"{node_of[name].name}_rows")
        with weight.fake_mode:
            view.meta["val"] = aten.slice.Tensor(weight, 0, 0, k)
        last_input = view
        gradient = by_name[gradients.pop(name)]
        pushed, passed = _Push(graph, k).rows_of(gradient, 0)
        output.replace_input_with(gradient, pushed)
        erase_unused({gradient, *passed})
        placeholders = [dataclasses.replace(p, requires_grad=False) if p.name == name and p.role == "parameter"
                        else p for p in placeholders]
        placeholders.append(Placeholder(view.name, "parameter", rows_name(name, k), True))
        gradients[rows_name(name, k)] = pushed.name
    graph.lint()
    new.recompile()
    return dataclasses.replace(step, graph=new, placeholders=tuple(placeholders), gradients=gradients)


class _Push:
    """Rewrites a gradient into the computation of its first ``k`` rows along a dimension."""

    def __init__(self, graph: fx.Graph, k: int) -> None:
        self.graph, self.k = graph, k
        self.passed: list[fx.Node] = []  # the nodes replaced (erased once nothing reads them)

    def rows_of(self, node: fx.Node, dim: int) -> tuple[fx.Node, list[fx.Node]]:
        """A node holding ``node[..., :k, ...]`` (along ``dim``) in storage of its own, and the nodes replaced."""
        result, fresh = self._push(node, dim)
        if not fresh:  # a view of the whole gradient would keep it alive: copy the rows out
            result = Builder(self.graph, result.next)(aten.clone.default, result,
                                                      memory_format=torch.contiguous_format)
        return result, self.passed

    def _push(self, node: fx.Node, dim: int) -> tuple[fx.Node, bool]:
        """The rows of ``node`` along ``dim``, and whether they are computed into storage of their own."""
        value = tensor_of(node)
        alone = len(node.users) == 1 and node.op == "call_function"
        target, args = node.target, node.args
        build = Builder(self.graph, node)
        if value is not None and node.op == "call_function":
            ndim = value.dim()
            # views: the same view of the rows (whatever else reads the node)
            if target is aten.t.default:
                return self._view(node, build, target, (1 - dim,), lambda inner: (inner,))
            if target is aten.transpose.int:
                a, b = args[1] % ndim, args[2] % ndim
                source = b if dim == a else a if dim == b else dim
                return self._view(node, build, target, (source,), lambda inner: (inner, *args[1:]))
            if target is aten.permute.default:
                return self._view(node, build, target, (args[1][dim] % ndim,), lambda inner: (inner, args[1]))
            if target in _VIEWS:
                return self._reshaped(node, build, dim)
            # computations: only one whose sole reader is this gradient is replaced by its rows
            if alone and target is aten.mm.default:
                self.passed.append(node)
                if dim == 0:
                    return build(target, self._push(args[0], 0)[0], args[1]), True
                return build(target, args[0], self._push(args[1], 1)[0]), True
            if alone and target is aten.add.Tensor and all(
                    isinstance(arg, fx.Node) and tensor_of(arg) is not None
                    and tensor_of(arg).shape == value.shape for arg in args[:2]):
                self.passed.append(node)
                return build(target, self._rows(args[0], dim), self._rows(args[1], dim), **node.kwargs), True
            if alone and target in (aten._to_copy.default, aten.mul.Tensor, aten.div.Tensor) and (
                    target is aten._to_copy.default or not isinstance(args[1], fx.Node)):
                self.passed.append(node)
                return build(target, self._rows(args[0], dim), *args[1:], **node.kwargs), True
            if alone and target is operator.getitem and args[1] == 1 and dim == 0 and isinstance(args[0], fx.Node) \
                    and args[0].target is aten.convolution_backward.default and args[0].args[9] == 1:
                return self._weight_of_convolution(node, build), True
        return self._sliced(node, dim), False

    def _sliced(self, node: fx.Node, dim: int) -> fx.Node:
        """A view of ``node``'s rows, right after it."""
        return Builder(self.graph, node.next)(aten.slice.Tensor, node, dim, 0, self.k)

    def _rows(self, node: fx.Node, dim: int) -> fx.Node:
        return self._push(node, dim)[0]

    def _view(self, node: fx.Node, build: Builder, target, dims: tuple[int], args_of) -> tuple[fx.Node, bool]:
        inner, fresh = self._push(node.args[0], dims[0])
        if len(node.users) == 1:
            self.passed.append(node)
        return build(target, *args_of(inner)), fresh

    def _reshaped(self, node: fx.Node, build: Builder, dim: int) -> tuple[fx.Node, bool]:
        """Through a reshape that keeps ``dim`` whole: the first dimension when the leading sizes agree, the last
        when the trailing ones do."""
        value, source = tensor_of(node), tensor_of(node.args[0])
        if source is None or source.dim() == 0:
            return self._sliced(node, dim), False
        if dim == 0 and source.shape[0] == value.shape[0]:
            inner_dim = 0
        elif dim == value.dim() - 1 and source.shape[-1] == value.shape[-1]:
            inner_dim = source.dim() - 1
        else:
            return self._sliced(node, dim), False
        inner, fresh = self._push(node.args[0], inner_dim)
        if len(node.users) == 1:
            self.passed.append(node)
        shape = list(node.args[1])
        shape[dim] = self.k
        try:
            return build(node.target, inner, shape), fresh
        except RuntimeError:  # the rows' strides do not allow a view: the reshape copies them
            self.graph.erase_node(build.added.pop())
            return build(aten.reshape.default, inner, shape), True

    def _weight_of_convolution(self, node: fx.Node, build: Builder) -> fx.Node:
        """A convolution's weight gradient for its first ``k`` output channels: a second convolution backward over
        those channels' incoming gradient, the first one no longer computing the weight's."""
        backward = node.args[0]
        grad_output, source, weight, bias_sizes, *rest, mask = backward.args
        self.passed.append(node)
        rows = build(backward.target, build(aten.slice.Tensor, grad_output, 1, 0, self.k), source,
                     build(aten.slice.Tensor, weight, 0, 0, self.k), bias_sizes, *rest, [False, True, False])
        backward.update_arg(len(backward.args) - 1, [mask[0], False, mask[2]])
        if mask[0] or mask[2]:
            backward.meta["val"] = tuple(
                value if keep else None for value, keep in zip(backward.meta["val"], (mask[0], False, mask[2])))
        else:
            self.passed.append(backward)
        return build(operator.getitem, rows, 1)
