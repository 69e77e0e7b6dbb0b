"""Arena planning: which storages go into one preallocated arena, and at which offsets.

A storage is planned when the op that makes it has an ``out=`` overload taking
all its results, implemented by the device's own kernel (not a generated
wrapper that computes the result elsewhere and copies it), and none of them
leaves the step (loss and gradients are handed to the caller, so they are
allocated as usual). Everything else is an unplanned allocation, counted and
reported.

``apply_arena`` writes the plan into the graph, so that the runner (and the
ledger) see what runs: one ``empty`` node makes the arena, each planned op
becomes its ``out=`` overload writing into an ``as_strided`` view of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

from memopt.capture import CapturedStep
from memopt.lower.arena import Placement, out_arguments, out_variant
from memopt.passes.liveness import Liveness, MemoryTimeline, liveness, memory_timeline
from memopt.passes.optimizer_memory import OptimizerMemory
from memopt.passes.order_plan import copy_graph, reorder
from memopt.passes.recompute import fake_result
from memopt.passes.storage import Storage, StorageTable, storage_table
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


def plan_arena(graph: fx.GraphModule, table: StorageTable, live: Liveness, *, time_limit_s: float = 5.0,
               window: tuple[int, int] | None = None) -> ArenaPlan:
    """Offsets in one arena for every plannable intermediate of the step.

    ``window`` (first, last position in ``live.order``, inclusive) plans one program of the step on
    its own, as a graph cut there would run: only what it makes, live to its end at most (what leaves
    it, the forward's saved set say, is held to its end).
    """
    nodes = {node.name: node for node in graph.graph.nodes}
    if window is not None:
        live = Liveness(live.order, live.start, tuple(min(e, window[1]) for e in live.end))
    made_by: dict[str, list[Storage]] = {}
    for storage in table.storages:
        if storage.defined_at >= 0 and (window is None or window[0] <= live.start[storage.index] <= window[1]):
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
    has an out= overload taking them all, run by the device's own kernel."""
    if node.op != "call_function" or any(s.is_output for s in storages):
        return False
    out_op = out_variant(node.target)
    values = node.meta.get("val")
    values = list(values) if isinstance(values, (tuple, list)) else [values]
    if out_op is None or not values or not isinstance(values[0], torch.Tensor):
        return False
    if not _device_kernel(out_op, values[0].device):
        return False
    return len(values) == len(storages) and all(
        isinstance(val, torch.Tensor)
        and val.layout == torch.strided
        and val.storage_offset() == 0
        and val.untyped_storage().nbytes() == storage.nbytes
        for val, storage in zip(values, storages)
    )


_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


def _device_kernel(out_op: torch._ops.OpOverload, device: torch.device) -> bool:
    """The out= overload has a kernel of the device's own: it writes into ``out``.

    Generated out= wrappers (CompositeExplicitAutograd: ``relu.out``, ``native_layer_norm.out``,
    ``native_dropout.out``, ...) compute the result in a fresh allocation and copy it over, which
    would cost the arena slot and the allocation both.
    """
    key = _DISPATCH_KEY.get(device.type)
    name = out_op._schema.name + (f".{out_op._schema.overload_name}" if out_op._schema.overload_name else "")
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(name, key)


ARENA_NODE = "memopt_arena"


def run_order(step: CapturedStep, order: tuple[int, ...]) -> tuple[int, ...]:
    """``order`` with every node traced before the backward's seed kept before it (in ``order``'s
    relative order), so a runner that cuts the step at the seed runs the forward ops in the forward.

    Still topological: forward nodes read only forward nodes, and the order's other constraints
    (writes between their reads, random ops in sequence) go from earlier to later traced positions.
    """
    names = [node.name for node in step.graph.graph.nodes]
    cut = names.index(step.backward_start)
    return (*[i for i in order if i < cut], cut, *[i for i in order if i > cut])


def apply_arena(step: CapturedStep, arena: ArenaPlan) -> CapturedStep:
    """``step`` with the arena in its graph: one ``empty`` of ``arena.arena_bytes`` bytes before the
    first planned op, and each planned op as its ``out=`` overload writing into a view at its offset.

    Fake values follow: the views (and every alias of a planned result: views, in-place results,
    getitems) share the arena's storage, so the ledger of the new graph counts the arena once, live
    from its ``empty`` to the last reader of anything placed in it, and no planned tensor on its own.
    """
    graph = fx.GraphModule(step.graph, copy_graph(step.graph.graph))
    placed = [node for node in graph.graph.nodes if node.name in arena.placements]
    if not placed:
        return dataclasses.replace(step, graph=graph)
    first = _values(placed[0])[0]
    mode = getattr(first, "fake_mode", None) or contextlib.nullcontext()
    device = first.device
    aten = torch.ops.aten
    with graph.graph.inserting_before(placed[0]):
        base = graph.graph.create_node("call_function", aten.empty.memory_format, ([arena.arena_bytes],),
                                       {"dtype": torch.uint8, "device": device}, name=ARENA_NODE)
    with mode:
        base.meta["val"] = torch.empty(arena.arena_bytes, dtype=torch.uint8, device=device)
    typed: dict[torch.dtype, fx.Node] = {}
    replaced: set[StorageWeakRef] = set()
    for node in graph.graph.nodes:
        if node.name in arena.placements:
            values = _values(node)
            replaced.update(StorageWeakRef(v.untyped_storage()) for v in values)
            out_op = out_variant(node.target)
            assert out_op is not None
            views = []
            for value, place in zip(values, arena.placements[node.name]):
                if value.dtype not in typed:  # one typed view of the whole arena per dtype, made once
                    with graph.graph.inserting_after(base):
                        typed[value.dtype] = graph.graph.call_function(aten.view.dtype, (base, value.dtype))
                    with mode:
                        typed[value.dtype].meta["val"] = base.meta["val"].view(value.dtype)
                assert place.offset % value.element_size() == 0, "arena offsets are aligned"
                with graph.graph.inserting_before(node):
                    view = graph.graph.call_function(aten.as_strided.default, (
                        typed[value.dtype], list(value.shape), list(value.stride()),
                        place.offset // value.element_size()))
                with mode:
                    view.meta["val"] = typed[value.dtype].meta["val"].as_strided(
                        value.shape, value.stride(), place.offset // value.element_size())
                views.append(view)
            node.target = out_op
            node.kwargs = {**node.kwargs, **dict(zip(out_arguments(out_op), views))}
            new = [view.meta["val"] for view in views]
            node.meta["val"] = tuple(new) if isinstance(node.meta["val"], (tuple, list)) else new[0]
        elif node.op == "call_function" and any(
            StorageWeakRef(t.untyped_storage()) in replaced
            for t in pytree.tree_leaves(node.meta.get("val")) if isinstance(t, torch.Tensor)
        ):
            node.meta["val"] = fake_result(node)  # a view or in-place result of a placed tensor: in the arena
    graph.graph.lint()
    graph.recompile()
    return dataclasses.replace(step, graph=graph)


def _values(node: fx.Node) -> list[torch.Tensor]:
    values = node.meta["val"]
    return list(values) if isinstance(values, (tuple, list)) else [values]


@dataclass(frozen=True)
class ArenaStep:
    """The step that runs in the arena, and its ledger."""

    step: CapturedStep
    table: StorageTable
    live: Liveness
    timeline: MemoryTimeline
    scratch: tuple[int, ...]
    arena: ArenaPlan
    records: tuple[tuple[str, float, bool, int | None, int | None], ...]  # (pass, seconds, changed, before, after)


def arena_step(step: CapturedStep, table: StorageTable, live: Liveness, timeline: MemoryTimeline,
               order: tuple[int, ...] | None, optimizer: OptimizerMemory, scratch_of: dict[str, int], *,
               time_limit_s: float) -> ArenaStep:
    """``step`` run in one arena, in ``order`` (kept to the runner's forward and backward halves, and only
    when that peaks no higher than the traced order), with its ledger recomputed on the graph that runs:
    the arena one storage, live from its ``empty`` to the last reader of anything in it.

    ``scratch_of`` is the kernel scratch measured per node name (planned ops keep their names).
    """
    records = []
    started = time.perf_counter()
    before = timeline.peak_bytes
    moved_any = False
    if order is not None:
        moved = dataclasses.replace(step, graph=reorder(step.graph, run_order(step, order)))
        moved_table = storage_table(moved)
        moved_live = liveness(moved_table)
        moved_timeline = memory_timeline(moved_table, moved_live, optimizer, _scratch(moved, scratch_of))
        if moved_timeline.peak_bytes <= timeline.peak_bytes:
            step, table, live, timeline, moved_any = moved, moved_table, moved_live, moved_timeline, True
    records.append(("run-order", time.perf_counter() - started, moved_any, before, timeline.peak_bytes))
    started = time.perf_counter()
    arena = plan_arena(step.graph, table, live, time_limit_s=time_limit_s)
    records.append(("layout", time.perf_counter() - started, False, None, None))
    started = time.perf_counter()
    step = apply_arena(step, arena)
    table = storage_table(step)
    live = liveness(table)
    scratch = _scratch(step, scratch_of)
    after = memory_timeline(table, live, optimizer, scratch)
    records.append(("rewrite-arena", time.perf_counter() - started, True, timeline.peak_bytes, after.peak_bytes))
    return ArenaStep(step, table, live, after, scratch, arena, tuple(records))


def _scratch(step: CapturedStep, scratch_of: dict[str, int]) -> tuple[int, ...]:
    """Kernel scratch per node of ``step``, by node name (the arena's own nodes have none)."""
    return tuple(scratch_of.get(node.name, 0) for node in step.graph.graph.nodes)
