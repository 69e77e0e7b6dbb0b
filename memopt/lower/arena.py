"""Run an FX graph with its intermediates placed in one preallocated arena.

Each planned node writes its result into a view of the arena at its planned
offset, through the op's ``out=`` overload; a node with no such overload (or
with several outputs) allocates as usual and is reported. Views and in-place
ops need nothing: they act on whatever their input is, arena view or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a node's result lives in the arena."""

    offset: int
    nbytes: int


def out_variant(op: object) -> torch._ops.OpOverload | None:
    """The ``out=`` overload of an ATen op: the same arguments, one out argument per tensor result."""
    if not isinstance(op, torch._ops.OpOverload):
        return None
    returns = op._schema.returns
    if not returns or any(str(r.type) != "Tensor" for r in returns):
        return None
    signature = [(a.name, str(a.type)) for a in op._schema.arguments]
    packet = op.overloadpacket
    for overload in packet.overloads():
        candidate = getattr(packet, overload)
        arguments = candidate._schema.arguments
        outs = [a for a in arguments if a.is_out]
        if len(outs) == len(returns) and [(a.name, str(a.type)) for a in arguments if not a.is_out] == signature:
            return candidate
    return None


def out_arguments(out_op: torch._ops.OpOverload) -> list[str]:
    return [a.name for a in out_op._schema.arguments if a.is_out]


class ArenaInterpreter(fx.Interpreter):
    """Runs ``graph`` writing each placed node's results into ``arena`` at their offsets."""

    def __init__(
        self, graph: fx.GraphModule, placements: dict[str, tuple[Placement, ...]], arena: torch.Tensor
    ) -> None:
        super().__init__(graph, garbage_collect_values=True)
        self.placements = placements
        self.arena = arena  # 1-D uint8
        self.out_ops: dict[str, torch._ops.OpOverload] = {}  # looked up once, not at every run of the node
        for node in graph.graph.nodes:
            if node.name in placements:
                out_op = out_variant(node.target)
                assert out_op is not None, f"{node.format_node()} was placed in the arena but has no out= overload"
                self.out_ops[node.name] = out_op

    def run_node(self, node: fx.Node) -> Any:
        placements = self.placements.get(node.name)
        if placements is None:
            return super().run_node(node)
        values = node.meta["val"]
        values = list(values) if isinstance(values, (tuple, list)) else [values]
        out_op = self.out_ops[node.name]
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        outs = {
            name: torch.as_strided(
                self.arena[p.offset : p.offset + p.nbytes].view(val.dtype), tuple(val.shape), tuple(val.stride())
            )
            for name, p, val in zip(out_arguments(out_op), placements, values)
        }
        return out_op(*args, **kwargs, **outs)


def run_in_arena(
    graph: fx.GraphModule, placements: dict[str, tuple[Placement, ...]], arena_bytes: int, *args: Any,
    device: str = "cpu",
) -> Any:
    """Allocate one arena of ``arena_bytes`` and run ``graph(*args)`` with the placed results inside it."""
    arena = torch.empty(arena_bytes, dtype=torch.uint8, device=device)
    with torch.no_grad():  # the graph is the whole step, backward included: autograd has nothing to do
        # the interpreter flattens the arguments and rebuilds the outputs as the traced function had them
        return ArenaInterpreter(graph, placements, arena).run(*args)
