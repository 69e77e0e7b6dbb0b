"""Op cost model: seconds an op takes on a DeviceSpec, from FLOPs and bytes moved (a roofline)."""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import flop_registry

from memopt.device import DeviceSpec
from memopt.passes.storage import shares_storage


def node_flops(node: fx.Node) -> int:
    """FLOPs of ``node`` by torch's own flop counter formulas (0 for ops it has none for)."""
    packet = getattr(node.target, "overloadpacket", None)
    formula = flop_registry.get(packet)
    if formula is None:
        return 0
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda arg: arg.meta.get("val"))
    return int(formula(*args, **kwargs, out_val=node.meta.get("val")))


def node_bytes(node: fx.Node) -> int:
    """Bytes an op reads and writes: its tensor inputs and results."""
    values = [arg.meta.get("val") for arg in node.all_input_nodes] + [node.meta.get("val")]
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(values) if isinstance(t, torch.Tensor))


def node_seconds(node: fx.Node, device: DeviceSpec) -> float:
    """max(compute time, memory time): the roofline estimate of one run of the op."""
    val = node.meta.get("val")
    if node.op != "call_function" or any(shares_storage(val, arg.meta.get("val")) for arg in node.all_input_nodes):
        # a view moves nothing
        return 0.0
    return max(node_flops(node) / device.fp32_flops_per_s, node_bytes(node) / device.memory_bandwidth)


def recompute_seconds(node: fx.Node, device: DeviceSpec, *, fused: bool = False) -> float:
    """Seconds one recomputation of ``node`` in the backward takes.

    ``fused``: the lowering fuses a recomputed pointwise op into the kernels that read its result (Inductor
    does), which read the op's inputs where they would have read its result: the recomputation costs its
    arithmetic, one operation per element, and not the memory traffic ``node_seconds`` prices, unless a reader
    (a matmul, attention) needs the result in memory, which the recomputation then writes. Keeping a result
    that only fused kernels read costs a write in the forward and a read in the backward, which is why torch's
    partitioner recomputes such ops rather than save them."""
    val = node.meta.get("val")
    if not (fused and node.op == "call_function" and torch.Tag.pointwise in getattr(node.target, "tags", ())
            and isinstance(val, torch.Tensor)):
        return node_seconds(node, device)
    written = val.numel() * val.element_size() / device.memory_bandwidth if _read_from_memory(node) else 0.0
    return val.numel() / device.fp32_flops_per_s + written


def _read_from_memory(node: fx.Node) -> bool:
    """Whether a reader of ``node``'s result, through its views, is an op other than a pointwise one (which a
    fusing lowering computes the result inside of)."""
    val = node.meta.get("val")
    for user in node.users:
        if user.op != "call_function":
            return True
        if shares_storage(user.meta.get("val"), val):  # a view: what reads it reads the result
            if _read_from_memory(user):
                return True
        elif torch.Tag.pointwise not in getattr(user.target, "tags", ()):
            return True
    return False


def graph_seconds(graph: fx.GraphModule, device: DeviceSpec) -> float:
    """The roofline seconds of every op of ``graph``, each run once: what a rewrite of the step adds or saves
    (the slices of a chunked region re-read their weights, and add up the weights' gradients)."""
    return sum(node_seconds(node, device) for node in graph.graph.nodes if node.target is not operator.getitem)
