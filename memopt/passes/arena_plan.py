"""Arena planning: which storages go into one preallocated arena, and at which offsets.

A storage is planned when the op that makes it has an ``out=`` overload taking
all its results, and none of them leaves the step (loss and gradients are
handed to the caller, so they are allocated as usual). Everything else is an
unplanned allocation, counted and reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from memopt.codegen.arena import Placement, out_variant
from memopt.passes.liveness import Liveness
from memopt.passes.storage import Storage, StorageTable
from memopt.solvers.layout import LayoutProblem, LayoutSolution, solve_layout


@dataclass(frozen=True)
class ArenaPlan:
    placements: dict[str, tuple[Placement, ...]]  # node name -> where its results live
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
    made_by: dict[str, list[Storage]] = {}
    for storage in table.storages:
        if storage.defined_at >= 0:
            made_by.setdefault(storage.node, []).append(storage)
    planned: list[int] = []
    unplanned: dict[str, int] = {}
    outside = [0] * (len(live.order) + 1)  # difference array of bytes live outside the arena
    for name, storages in made_by.items():
        if _plannable(nodes[name], storages):
            planned.extend(s.index for s in storages)
            continue
        for storage in storages:
            if not storage.is_output:
                unplanned[name] = unplanned.get(name, 0) + storage.nbytes
            outside[live.start[storage.index]] += storage.nbytes
            outside[live.end[storage.index] + 1] -= storage.nbytes
    problem = LayoutProblem(
        sizes=tuple(table.storages[k].nbytes for k in planned),
        starts=tuple(live.start[k] for k in planned),
        ends=tuple(live.end[k] for k in planned),
    )
    solution = solve_layout(problem, time_limit_s=time_limit_s)
    placements: dict[str, tuple[Placement, ...]] = {}
    for k, offset in zip(planned, solution.offsets):
        storage = table.storages[k]
        placements[storage.node] = (*placements.get(storage.node, ()), Placement(offset, storage.nbytes))
    running, peak = 0, 0
    for change in outside:
        running += change
        peak = max(peak, running)
    return ArenaPlan(placements, solution, tuple(planned), unplanned, peak)


def _plannable(node: fx.Node, storages: list[Storage]) -> bool:
    """Every result is a new strided tensor filling its own storage, none leaves the step, and the op
    has an out= overload taking them all."""
    if node.op != "call_function" or out_variant(node.target) is None or any(s.is_output for s in storages):
        return False
    values = node.meta.get("val")
    values = list(values) if isinstance(values, (tuple, list)) else [values]
    return len(values) == len(storages) and all(
        isinstance(val, torch.Tensor)
        and val.layout == torch.strided
        and val.storage_offset() == 0
        and val.untyped_storage().nbytes() == storage.nbytes
        for val, storage in zip(values, storages)
    )
