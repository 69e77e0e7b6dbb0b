"""Arena planning: which storages go into one preallocated arena, and at which offsets.

A storage is planned when the op that makes it has an ``out=`` overload and a
single tensor result, and it does not leave the step (loss and gradients are
handed to the caller, so they are allocated as usual). Everything else is an
unplanned allocation, counted and reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from memopt.codegen.arena import Placement, out_variant
from memopt.passes.liveness import Liveness
from memopt.passes.storage import StorageTable
from memopt.solvers.layout import LayoutProblem, LayoutSolution, solve_layout


@dataclass(frozen=True)
class ArenaPlan:
    placements: dict[str, Placement]  # node name -> where its result lives
    solution: LayoutSolution
    planned_storages: tuple[int, ...]
    unplanned: dict[str, int]  # node -> bytes, for storages allocated outside the arena (outputs excluded)
    unplanned_peak_bytes: int  # the most bytes live outside the arena (unplanned + outputs) at any step

    @property
    def arena_bytes(self) -> int:
        return self.solution.arena_bytes


def plan_arena(graph: fx.GraphModule, table: StorageTable, live: Liveness, *, time_limit_s: float = 5.0) -> ArenaPlan:
    """Offsets in one arena for every plannable intermediate of the step."""
    nodes = {node.name: node for node in graph.graph.nodes}
    planned, unplanned = [], {}
    outside = [0] * (len(live.order) + 1)  # difference array of bytes live outside the arena
    for storage in table.storages:
        if storage.defined_at < 0:
            continue
        node = nodes[storage.node]
        if not storage.is_output and _plannable(node, storage.nbytes):
            planned.append(storage.index)
            continue
        if not storage.is_output:
            unplanned[storage.node] = unplanned.get(storage.node, 0) + storage.nbytes
        outside[live.start[storage.index]] += storage.nbytes
        outside[live.end[storage.index] + 1] -= storage.nbytes
    problem = LayoutProblem(
        sizes=tuple(table.storages[k].nbytes for k in planned),
        starts=tuple(live.start[k] for k in planned),
        ends=tuple(live.end[k] for k in planned),
    )
    solution = solve_layout(problem, time_limit_s=time_limit_s)
    placements = {
        table.storages[k].node: Placement(offset, table.storages[k].nbytes)
        for k, offset in zip(planned, solution.offsets)
    }
    running, peak = 0, 0
    for change in outside:
        running += change
        peak = max(peak, running)
    return ArenaPlan(placements, solution, tuple(planned), unplanned, peak)


def _plannable(node: fx.Node, nbytes: int) -> bool:
    val = node.meta.get("val")
    if node.op != "call_function" or out_variant(node.target) is None:
        return False
    # the result must be one strided tensor that fills its storage (no view into a larger allocation)
    return (
        isinstance(val, torch.Tensor)
        and val.layout == torch.strided
        and val.storage_offset() == 0
        and val.untyped_storage().nbytes() == nbytes
    )
