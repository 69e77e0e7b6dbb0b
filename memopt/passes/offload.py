"""Offload rewrite: chosen storages go to a host pool after their last forward use and come back before the backward's.

Works on the joint graph (after the recompute rewrite). For each offloaded
storage, ``memopt::offload(base, pool, offset)`` runs right after the last
forward node reading it (through any alias), so the device copy dies there;
``memopt::reload`` runs before the prefetch node the plan chose (or before
the first backward reader, if that comes first), ``memopt::reload_wait`` right
before the first backward reader; backward readers of the base, and of its
aliases of the same shape, read the reload, and views of it that the backward
reads are made again from the reload.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass

import torch
from torch import fx

from memopt.lower import offload_ops
from memopt.passes.order_plan import copy_graph
from memopt.passes.recompute import fake_result
from memopt.passes.storage import shares_storage


@dataclass(frozen=True, slots=True)
class OffloadSpec:
    """One storage to offload: the node holding it whole, where its reload starts, its pool slot."""

    base: str
    prefetch: str  # the reload runs right before this node (or the first backward reader, if earlier)
    offset: int  # bytes into the host pool
    nbytes: int  # bytes of its slot


@dataclass(frozen=True)
class OffloadRewrite:
    graph: fx.GraphModule
    pool: int  # the host pool's id (``memopt.lower.offload_ops``)
    pool_bytes: int
    offload_nodes: tuple[str, ...]  # per spec: the offload node's name
    reload_nodes: tuple[str, ...]


def apply_offload(graph: fx.GraphModule, backward_start: str, specs: list[OffloadSpec],
                  device: torch.device) -> OffloadRewrite:
    """A copy of ``graph`` in which the ``specs`` storages live on the host between forward and backward."""
    pool_bytes = max((s.offset + s.nbytes for s in specs), default=0)
    key, _ = offload_ops.new_pool(pool_bytes, device)
    new = fx.GraphModule(graph, copy_graph(graph.graph))
    weakref.finalize(new, offload_ops.release_pool, key)
    by_name = {node.name: node for node in new.graph.nodes}
    offloads, reloads = [], []
    for spec in specs:
        base, value, holders, last, first, bs, position = _window(new.graph, by_name[spec.base], by_name[backward_start])
        with new.graph.inserting_after(last):
            host = new.graph.call_function(torch.ops.memopt.offload.default, (base, key, spec.offset))
        host.meta["val"] = fake_result(host)
        prefetch = by_name[spec.prefetch]
        at = prefetch if bs < position[prefetch] < position[first] else first
        with new.graph.inserting_before(at):
            reload = new.graph.call_function(torch.ops.memopt.reload.default, (host, key, spec.offset, device))
        reload.meta["val"] = fake_result(reload)
        with new.graph.inserting_before(first):
            new.graph.call_function(torch.ops.memopt.reload_wait.default, (reload, key, spec.offset))
        _reroute(new.graph, holders, value, reload, first, bs, position, inserted={host, reload})
        offloads.append(host.name)
        reloads.append(reload.name)
    new.graph.lint()
    new.recompile()
    return OffloadRewrite(new, key, pool_bytes, tuple(offloads), tuple(reloads))


def _needed(holders: list[fx.Node], bs: int, position: dict[fx.Node, int]) -> list[fx.Node]:
    """Holders the backward reads, and the holders they are views of (made again first), in graph order."""
    inside = set(holders)
    needed = {h for h in holders if any(position.get(u, 0) > bs for u in h.users)}
    stack = list(needed)
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg in inside and arg not in needed:
                needed.add(arg)
                stack.append(arg)
    return [h for h in holders if h in needed]


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape == b.shape and a.stride() == b.stride() and a.storage_offset() == b.storage_offset()
            and a.dtype == b.dtype)


def _window(graph: fx.Graph, base: fx.Node, backward_start: fx.Node):
    """Where a storage (made by ``base``) is between the passes: its value, the forward nodes holding it, its last
    forward reader, its first backward reader, the backward's first position, and every node's position."""
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    bs = position[backward_start]
    value = base.meta["val"]
    holders = [n for n in nodes[:bs] if shares_storage(n.meta.get("val"), value)]
    last = max((position[u] for h in holders for u in h.users if position[u] < bs), default=position[base])
    users = sorted({u for h in holders for u in h.users if position[u] > bs}, key=position.__getitem__)
    if not users:
        raise ValueError(f"{base.name} has no backward reader: nothing to move out of the way")
    return base, value, holders, nodes[last], users[0], bs, position


def _reroute(graph: fx.Graph, holders: list[fx.Node], value: torch.Tensor, source: fx.Node, first: fx.Node, bs: int,
             position: dict[fx.Node, int], inserted: set[fx.Node]) -> None:
    """Backward readers of the base (``value``, held by ``holders``) or of a same-shaped alias read ``source``
    instead; views of it the backward reads are made again from ``source``, before ``first``."""
    replacement: dict[fx.Node, fx.Node] = {}
    for holder in _needed(holders, bs, position):
        if _same_view(holder.meta["val"], value):
            replacement[holder] = source
            continue
        with graph.inserting_before(first):
            copy = graph.node_copy(holder, lambda arg: replacement.get(arg, arg))
        if any(arg in holders and arg not in replacement for arg in copy.all_input_nodes):
            raise ValueError(f"cannot remake the view {holder.format_node()} from {source.name}")
        copy.meta["val"] = fake_result(copy)
        replacement[holder] = copy
    inserted = inserted | set(replacement.values())
    old_val: dict[fx.Node, object] = {}  # backward views re-made over the source: what they held
    for node in list(graph.nodes):
        if node.op != "call_function" or node in inserted or position.get(node, 0) <= bs:
            continue
        changed = []
        for arg in list(node.all_input_nodes):
            if arg in replacement:
                node.replace_input_with(arg, replacement[arg])
                changed.append(arg.meta["val"])
            elif arg in old_val:
                changed.append(old_val[arg])
        if changed and any(shares_storage(node.meta.get("val"), v) for v in changed):
            old_val[node] = node.meta["val"]
            node.meta["val"] = fake_result(node)


def apply_compress(graph: fx.GraphModule, backward_start: str, bases: list[str], format: str, *,
                   use_triton: bool) -> tuple[fx.GraphModule, dict[str, tuple[str, str]]]:
    """A copy of ``graph`` in which each of ``bases`` (saved for the backward) is packed to ``format`` after its
    last forward reader and unpacked before its first backward reader (``memopt.lower.kernels.compress``), so
    that only the packed bytes live between; and per base, its pack and unpack nodes."""
    from memopt.lower.kernels import compress

    new = fx.GraphModule(graph, copy_graph(graph.graph))
    by_name = {node.name: node for node in new.graph.nodes}
    made = {}
    for name in bases:
        base, value, holders, last, first, bs, position = _window(new.graph, by_name[name], by_name[backward_start])
        with new.graph.inserting_after(last):
            packed = new.graph.call_function(torch.ops.memopt.pack.default, (base, format, compress.BLOCK,
                                                                               use_triton))
        packed.meta["val"] = fake_result(packed)
        with new.graph.inserting_after(packed):
            payload = new.graph.call_function(operator.getitem, (packed, 0))
            payload.meta["val"] = fake_result(payload)
        with new.graph.inserting_after(payload):
            scales = new.graph.call_function(operator.getitem, (packed, 1))
            scales.meta["val"] = fake_result(scales)
        with new.graph.inserting_before(first):
            unpacked = new.graph.call_function(torch.ops.memopt.unpack.default, (
                payload, scales, list(value.shape), value.dtype, format, compress.BLOCK, use_triton))
        unpacked.meta["val"] = fake_result(unpacked)
        if not _same_view(unpacked.meta["val"], value):
            raise ValueError(f"{name} is not a contiguous tensor of its own: it cannot be packed and made again")
        _reroute(new.graph, holders, value, unpacked, first, bs, position, inserted={packed, payload, scales, unpacked})
        made[name] = (packed.name, unpacked.name)
    new.graph.lint()
    new.recompile()
    return new, made
