"""Recompute rewrite: drop chosen activations after the forward and recompute them in the backward.

Works on the captured joint graph. For each storage chosen for recomputation,
the forward node that makes it (and the views of it that the backward reads)
is copied right before the first backward node that needs it, and the backward
reads the copy. A copy's own inputs are copies too when they are recomputed,
else the originals, which the backward then keeps (saves).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils import _pytree as pytree

from memopt.passes.op_kinds import (
    is_random,
    mutates,
    running_stats_read_to_update,
    without_running_stats,
    written_inputs,
)
from memopt.passes.order_plan import copy_graph
from memopt.passes.storage import StorageTable, shares_storage


@dataclass(frozen=True, slots=True)
class Candidate:
    """An activation that may be recomputed instead of kept."""

    storage: int
    nodes: tuple[str, ...]  # forward nodes to copy into the backward: the maker, then views the backward reads
    nbytes: int


def recompute_candidates(graph: fx.GraphModule, table: StorageTable,
                         mutated_inputs: Collection[str] = ()) -> list[Candidate]:
    """Forward results whose recomputation replays exactly what eager computed.

    Left out: results of random ops (the generator has moved on), storages an op
    writes in place, and results of ops that read a storage written in place later
    in the step (its value at recompute time would differ), including the
    placeholders in ``mutated_inputs`` (written outside the graph, after the forward).
    An op with several results is recomputed whole. A batch norm in training is
    recomputed from the batch alone: its running statistics update once, in the forward.
    """
    nodes = list(graph.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    # storages written in place in the step (running statistics, dropout's noise, an input changed in
    # place, ...), and the position of the last write to each (inputs the step writes after the forward: never
    # final while the graph runs)
    last_write: dict[int, int] = {}
    for i, node in enumerate(nodes):
        for arg in written_inputs(node):
            for key in table.values[position[arg]]:
                last_write[key] = i
        if node.name in mutated_inputs:
            last_write.update(dict.fromkeys(table.values[i], len(nodes)))
    mutated = set(last_write)
    # ops that cannot replay: random ones, ones that write in place (running statistics would update
    # twice), and readers of a storage written in place after them (a recompute would read another value;
    # dropout's result reads its noise after the noise's last write, and replays). Their consumers can: a
    # recompute reads a kept input, not a recomputed one.
    # A batch norm in training reads and writes its running statistics only to update them: it replays
    # without them (``apply_recompute``), so neither counts.
    tainted = set()
    for i, node in enumerate(nodes):
        stats = running_stats_read_to_update(node)
        writes_more = mutates(node) and not set(written_inputs(node)) <= set(stats)
        reads = [key for arg in node.all_input_nodes if arg not in stats for key in table.values[position[arg]]]
        if is_random(node) or writes_more or any(last_write.get(key, -1) > i for key in reads):
            tainted.add(i)
    makers = {storage.node for storage in table.storages}
    by_name = {node.name: i for i, node in enumerate(nodes)}
    candidates = []
    forward_made = [s for s in table.storages if 0 <= s.defined_at < table.backward_start]
    for storage in forward_made:
        maker = by_name[storage.node]
        if storage.is_output or storage.index in mutated or maker in tainted or nodes[maker].op != "call_function":
            continue
        # forward nodes whose result lives in this storage and makes none (views, views of views, the
        # getitem that picks it from an op's several results): copied when the backward needs them
        views = [
            nodes[r] for r in table.readers[storage.index]
            if maker < r < table.backward_start and nodes[r].name not in makers
            and set(table.values[r]) <= {storage.index}
        ]
        if any(position[view] in tainted for view in views):
            continue
        candidates.append(Candidate(storage.index, (storage.node, *(v.name for v in views)), storage.nbytes))
    return candidates


def apply_recompute(graph: fx.GraphModule, backward_start: str, chosen: list[Candidate]) -> fx.GraphModule:
    """A copy of ``graph`` in which the chosen activations are recomputed in the backward."""
    new = fx.GraphModule(graph, copy_graph(graph.graph))
    recompute = {name for candidate in chosen for name in candidate.nodes}
    copies: dict[str, fx.Node] = {}
    original_val: dict[fx.Node, object] = {}  # what a copied or re-valued node held before

    def copy_of(node: fx.Node, before: fx.Node) -> fx.Node:
        if node.name not in copies:
            with new.graph.inserting_before(before):
                copy = new.graph.node_copy(node, lambda arg: copy_of(arg, before) if arg.name in recompute else arg)
            if running_stats_read_to_update(copy):  # the running statistics update once, in the forward
                copy.target, copy.args, copy.kwargs = without_running_stats(copy)
            original_val[copy] = copy.meta["val"]
            copy.meta["val"] = fake_result(copy)  # a new storage, not the original's
            copies[node.name] = copy
        return copies[node.name]

    in_backward = False
    for node in list(new.graph.nodes):
        in_backward = in_backward or node.name == backward_start
        if not in_backward:  # (the copies inserted below are not in this snapshot of the nodes)
            continue
        for arg in list(node.all_input_nodes):
            if arg.name in recompute:
                node.replace_input_with(arg, copy_of(arg, node))
        changed = [arg for arg in node.all_input_nodes if arg in original_val]
        if changed and node.op == "call_function" and any(
            shares_storage(node.meta.get("val"), original_val[arg]) for arg in changed
        ):
            original_val[node] = node.meta["val"]
            node.meta["val"] = fake_result(node)  # a view of a recomputed value aliases the copy
    new.graph.lint()
    new.recompile()
    return new


def fake_result(node: fx.Node) -> object:
    """Run ``node``'s op on its inputs' fake values, in their fake mode."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda arg: arg.meta["val"])
    leaves = pytree.tree_leaves((args, kwargs))
    # getitem of a tuple and the like have no fake input and run as they are
    mode = next((leaf.fake_mode for leaf in leaves if hasattr(leaf, "fake_mode")), None)
    if mode is None:
        return node.target(*args, **kwargs)
    # a constant of the graph (AOTAutograd's lifted scalar tensors) holds a real tensor: it enters the fake mode
    args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t if hasattr(t, "fake_mode") else mode.from_tensor(t),
                                        (args, kwargs))
    with mode:
        return node.target(*args, **kwargs)
