"""What the token-chunking rewrites share: adding nodes with their fake values, slicing the tokens, putting
the graph back in a topological order, and naming the rewritten step's loss, gradients and backward."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import fx

from memopt.capture import CapturedStep
from memopt.passes.order_plan import copy_graph
from memopt.passes.recompute import fake_result

aten = torch.ops.aten
CAST = aten._to_copy.default


def tensor_of(node: object) -> torch.Tensor | None:
    """The (fake) tensor a node holds, if it holds one."""
    found = node.meta.get("val") if isinstance(node, fx.Node) else None
    return found if isinstance(found, torch.Tensor) else None


def transposes_2d(node: fx.Node) -> bool:
    """A t, transpose or permute that swaps the two dimensions of a 2-D tensor."""
    found = tensor_of(node)
    if found is None or found.dim() != 2:
        return False
    if node.target is aten.t.default:
        return True
    if node.target is aten.permute.default:
        return list(node.args[1]) == [1, 0]
    return node.target is aten.transpose.int and sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1]


class Builder:
    """Adds call_function nodes before ``anchor``, each with its fake value."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node) -> None:
        self.graph, self.anchor = graph, anchor
        self.added: list[fx.Node] = []

    def __call__(self, target, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, tuple(args), kwargs)
        node.meta["val"] = fake_result(node)
        self.added.append(node)
        return node

    def cast(self, node: fx.Node, dtype: torch.dtype | None) -> fx.Node:
        return node if dtype is None else self(CAST, node, dtype=dtype)


def token_bounds(rows: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` slices of ``rows`` tokens, the last possibly shorter."""
    size = math.ceil(rows / chunks)
    return [(start, min(start + size, rows)) for start in range(0, rows, size)]


def position(node: fx.Node) -> int:
    """A node's place in its graph (fx keeps no index)."""
    for index, other in enumerate(node.graph.nodes):
        if other is node:
            return index
    raise ValueError(node)


def erase_unused(nodes: set[fx.Node] | frozenset[fx.Node]) -> None:
    """Erases those of ``nodes`` that nothing reads any more, readers before what they read."""
    if not nodes:
        return
    order = {node: index for index, node in enumerate(next(iter(nodes)).graph.nodes)}
    for node in sorted(nodes, key=lambda node: -order[node]):
        if not node.users:
            node.graph.erase_node(node)


def sort_topologically(graph: fx.Graph) -> None:
    """Moves each node that reads a later one to just after the last node it reads, keeping the rest in order
    (a rewritten region's results replace readers that came earlier)."""
    placed: set[fx.Node] = set()
    waiting: dict[fx.Node, list[fx.Node]] = {}  # node -> nodes blocked on it
    order: list[fx.Node] = []

    def place(node: fx.Node) -> None:
        stack = [node]
        while stack:
            current = stack.pop()
            order.append(current)
            placed.add(current)
            for blocked in waiting.pop(current, []):
                if all(arg in placed for arg in blocked.all_input_nodes) and blocked not in placed:
                    stack.append(blocked)

    for node in list(graph.nodes):
        missing = [arg for arg in node.all_input_nodes if arg not in placed]
        if missing:
            for arg in missing:
                waiting.setdefault(arg, []).append(node)
        else:
            place(node)
    if len(order) != len(graph.nodes):
        raise AssertionError("token chunking: the rewritten graph has a cycle")
    previous = None
    for node in order:
        if previous is not None and previous.next is not node:
            previous.append(node)
        previous = node


Match = TypeVar("Match")


def chunked_step(step: CapturedStep, matches: Callable[[fx.Graph], list[Match]], chunks: Callable[[Match], int],
                 rewrite: Callable[[fx.Graph, Match, int], tuple[dict[str, str], set[str]]]) -> CapturedStep:
    """``step`` with a copy of its graph in which each region ``matches`` finds and ``chunks`` gives more than one
    slice is changed by ``rewrite`` (which returns the names of the nodes whose values new nodes now hold, and
    the names of its new nodes of the backward); its loss, gradients, outputs and backward's first node named
    anew."""
    new = fx.GraphModule(step.graph, copy_graph(step.graph.graph))
    renamed: dict[str, str] = {}
    new_backward: set[str] = set()
    for match in matches(new.graph):
        if chunks(match) > 1:
            more, added = rewrite(new.graph, match, chunks(match))
            renamed |= more
            new_backward |= added
    new.graph.lint()
    new.recompile()
    nodes = [node.name for node in step.graph.graph.nodes]
    old_backward = set(nodes[nodes.index(step.backward_start):])
    start = next(node.name for node in new.graph.nodes if node.name in old_backward | new_backward)

    def name(old: str) -> str:
        return renamed.get(old, old)

    return dataclasses.replace(step, graph=new, loss_node=name(step.loss_node), backward_start=start,
                               gradients={p: name(g) for p, g in step.gradients.items()},
                               stepped={p: name(g) for p, g in step.stepped.items()},
                               outputs=tuple(map(name, step.outputs)))
