"""Which activations go to host memory: the graph turned into an offload problem, and the solver's choice.

Items are the activations (forward results the backward reads) held whole by
one forward node, not written by the backward, whose backward readers read
that node or views of it that can be made again from a reload; the largest
``max_items`` of them. The keep/recompute plan the remat pass chose is the
starting point: the solver offloads items, and may offload or keep an item
that plan recomputes, when that is cheaper under the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from memopt.lower.offload_ops import ALIGNMENT, host_bytes
from memopt.device import DeviceSpec
from memopt.passes.offload import OffloadSpec
from memopt.passes.op_kinds import written_inputs
from memopt.passes.recompute import Candidate
from memopt.passes.remat_plan import ActivationDecision, RecomputePlan
from memopt.passes.storage import ACTIVATIONS, StorageTable, shares_storage
from memopt.solvers.offload import OffloadItem, OffloadProblem, OffloadSolution, solve_offload

NO_CAP = 2**62


@dataclass(frozen=True)
class OffloadPlan:
    solution: OffloadSolution
    problem: OffloadProblem
    specs: tuple[OffloadSpec, ...]  # in the order the rewrite applies them
    recomputed: tuple[Candidate, ...]  # what the recompute rewrite still recomputes
    decisions: tuple[ActivationDecision, ...]
    bytes_to_host: int
    bytes_to_device: int
    host_peak_bytes: int  # the host pool
    predicted_stall_s: float


def offload_items(graph: fx.GraphModule, table: StorageTable, remat: RecomputePlan,
                  max_items: int) -> list[OffloadItem]:
    """The activations that can go to host memory and come back whole, the largest first."""
    nodes = list(graph.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    bs = table.backward_start
    written = {key for node in nodes[bs:] for arg in written_inputs(node) for key in table.values[position[arg]]}
    candidate_of = {c.storage: i for i, c in enumerate(remat.problem.candidates)}
    items = []
    for storage in table.storages:
        if storage.category != ACTIVATIONS or storage.index in written or storage.nbytes == 0:
            continue
        holders = [i for i in range(bs) if storage.index in table.values[i]]
        base = next((i for i in holders if _whole(nodes[i], storage.nbytes)), None)
        if base is None or not _remakeable(nodes, holders, base, bs, position):
            continue
        value = nodes[base].meta["val"]
        items.append(OffloadItem(storage.index, base, storage.nbytes, max(host_bytes(value), ALIGNMENT),
                                 candidate_of.get(storage.index, -1)))
    items.sort(key=lambda item: (-item.nbytes, item.node))
    return items[:max_items]


def _whole(node: fx.Node, nbytes: int) -> bool:
    value = node.meta.get("val")
    return (node.op == "call_function" and isinstance(value, torch.Tensor) and value.storage_offset() == 0
            and host_bytes(value) >= nbytes >= value.numel() * value.element_size() > 0)


def _remakeable(nodes: list[fx.Node], holders: list[int], base: int, bs: int, position: dict[fx.Node, int]) -> bool:
    """Every holder the backward reads is the base, an alias of its shape, or a view made from holders."""
    value = nodes[base].meta["val"]
    inside = {nodes[i] for i in holders}
    needed = {nodes[i] for i in holders if any(position[u] > bs for u in nodes[i].users)}
    stack = list(needed)
    while stack:  # and the holders those are views of: made again from the reload first
        for arg in stack.pop().all_input_nodes:
            if arg in inside and arg not in needed:
                needed.add(arg)
                stack.append(arg)
    for i in holders:
        node = nodes[i]
        if node not in needed or i == base:
            continue
        other = node.meta.get("val")
        if not isinstance(other, torch.Tensor):
            return False
        same = (other.shape == value.shape and other.stride() == value.stride()
                and other.storage_offset() == value.storage_offset() and other.dtype == value.dtype)
        if same:
            continue
        # a view: its tensor inputs must be holders made before it (re-made from the reload in order)
        if node.op != "call_function" or not all(arg in inside and position[arg] < i for arg in node.all_input_nodes):
            return False
        if not shares_storage(other, value):
            return False
    return True


def plan_offload(
    graph: fx.GraphModule,
    table: StorageTable,
    remat: RecomputePlan,
    device: DeviceSpec,
    budget_bytes: int,
    *,
    host_capacity_bytes: int | None = None,
    time_limit_s: float = 5.0,
    max_items: int = 64,
) -> OffloadPlan:
    """Offload, keep or recompute each activation so that the peak fits ``budget_bytes`` at the least cost."""
    items = offload_items(graph, table, remat, max_items)
    problem = OffloadProblem(
        remat=remat.problem,
        recomputed=tuple(remat.solution.chosen),
        items=tuple(items),
        budget_bytes=budget_bytes,
        host_capacity_bytes=NO_CAP if host_capacity_bytes is None else host_capacity_bytes,
        host_bandwidth=device.host_link_bandwidth,
    )
    solution = solve_offload(problem, time_limit_s=time_limit_s)
    names = table.node_names
    specs, offset = [], 0
    for transfer in solution.transfers:
        item = items[transfer.item]
        specs.append(OffloadSpec(names[item.node], names[transfer.prefetch], offset, item.slot_bytes))
        offset += item.slot_bytes
    recomputed = tuple(remat.candidates[i] for i in solution.recomputed)
    moved = sum(items[t.item].nbytes for t in solution.transfers)
    return OffloadPlan(solution, problem, tuple(specs), recomputed, _decisions(remat, table, items, solution),
                       moved, moved, offset, solution.stall_s)


def _decisions(remat: RecomputePlan, table: StorageTable, items: list[OffloadItem],
               solution: OffloadSolution) -> tuple[ActivationDecision, ...]:
    """The remat plan's decisions (one per activation, in table order), with the offloads and the keeps."""
    names = table.node_names
    offloaded = {}
    for t in solution.transfers:
        hidden = "hidden" if t.stall_s <= 0 else f"{t.stall_s:.3g} s exposed"
        why = (f"to host after {names[t.after]}, back from {names[t.prefetch]} for {names[t.first_use]}: "
               f"{t.transfer_s:.3g} s each way behind {t.hidden_s:.3g} s of compute ({hidden})")
        offloaded[items[t.item].storage] = (t.stall_s, why)
    kept = {items[i].storage for i in solution.kept_instead}
    activations = [s for s in table.storages if s.category == ACTIVATIONS]
    decisions = []
    for storage, d in zip(activations, remat.decisions):
        if storage.index in offloaded:
            stall, why = offloaded[storage.index]
            decisions.append(ActivationDecision(d.node, d.nbytes, "offload", stall, why))
        elif storage.index in kept:
            decisions.append(ActivationDecision(d.node, d.nbytes, "keep", d.cost_s,
                                                "kept: offloading others made room for it"))
        else:
            decisions.append(d)
    return tuple(decisions)
