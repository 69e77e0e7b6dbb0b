"""Recompute rewrite: drop chosen activations after the forward and recompute them in the backward.

Works on the captured joint graph. For each storage chosen for recomputation,
the forward node that makes it (and the views of it that the backward reads)
is copied right before the first backward node that needs it, and the backward
reads the copy. A copy's own inputs are copies too when they are recomputed,
else the originals, which the backward then keeps (saves).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils import _pytree as pytree

from memopt.lower.rng_ops import RNG_STATE, RUN_WITH_RNG_STATE
from memopt.passes.op_kinds import (
    fresh_random_fill,
    is_random,
    mutates,
    replays_from_generator_state,
    running_stats_read_to_update,
    without_running_stats,
    written_inputs,
)
from memopt.passes.order_plan import copy_graph
from memopt.passes.storage import GATHERED, StorageTable, shares_storage


@dataclass(frozen=True, slots=True)
class Candidate:
    """An activation that may be recomputed instead of kept."""

    storage: int
    nodes: tuple[str, ...]  # forward nodes to copy into the backward: the maker, then views the backward reads
    nbytes: int
    # random ops among ``nodes``: their copies run from the generator state saved right before them in the forward
    replays: tuple[str, ...] = ()


def recompute_candidates(graph: fx.GraphModule, table: StorageTable,
                         mutated_inputs: Collection[str] = ()) -> list[Candidate]:
    """Forward results whose recomputation replays exactly what eager computed.

    Random ops on the CPU default generator replay: the forward saves the generator's state
    right before them and their copies draw from it (``replays``), so dropout's noise, made
    by ``empty_like`` and filled in place by ``bernoulli_`` then ``div_``, is recomputed
    whole, its fill and scaling included. Left out: other random ops (the generator has
    moved on), storages written in place other than by such a fill in the forward, and
    results of ops that read a storage written in place later in the step (its value at
    recompute time would differ), including the placeholders in ``mutated_inputs``
    (written outside the graph, after the forward). An op with several results is
    recomputed whole. A batch norm in training is recomputed from the batch alone: its
    running statistics update once, in the forward.
    """
    nodes = list(graph.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    # storages written in place in the step (running statistics, dropout's noise, an input changed in
    # place, ...), and the position of the last write to each (inputs the step writes after the forward: never
    # final while the graph runs)
    last_write: dict[int, int] = {}
    writes: dict[int, list[int]] = {}  # per storage written in place: the positions of the nodes writing it
    for i, node in enumerate(nodes):
        for arg in written_inputs(node):
            for key in table.values[position[arg]]:
                last_write[key] = i
                writes.setdefault(key, []).append(i)
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
        random = is_random(node) and not (replays_from_generator_state(node) and not mutates(node))
        if random or writes_more or any(last_write.get(key, -1) > i for key in reads):
            tainted.add(i)
    makers = {storage.node for storage in table.storages}
    by_name = {node.name: i for i, node in enumerate(nodes)}
    candidates = []
    # (what FSDP2 gathers is the engine's, made by no node of the graph)
    forward_made = [s for s in table.storages if 0 <= s.defined_at < table.backward_start and s.category != GATHERED]
    for storage in forward_made:
        maker = by_name[storage.node]
        if storage.is_output or maker in tainted or nodes[maker].op != "call_function" \
                or (storage.index in mutated and storage.index not in writes):  # an input written outside
            continue
        # forward nodes whose result lives in this storage and makes none (views, views of views, the
        # getitem that picks it from an op's several results, in-place writes): copied when the backward needs them
        views = [
            nodes[r] for r in table.readers[storage.index]
            if maker < r < table.backward_start and nodes[r].name not in makers
            and set(table.values[r]) <= {storage.index}
        ]
        writers = writes.get(storage.index, [])
        if writers and not _filled_in_forward(nodes[maker], views, writers, table, position, last_write):
            continue
        if any(position[view] in tainted and position[view] not in writers for view in views):
            continue
        group = (nodes[maker], *views)
        candidates.append(Candidate(storage.index, tuple(n.name for n in group), storage.nbytes,
                                    tuple(n.name for n in group if is_random(n))))
    return candidates


def _filled_in_forward(maker: fx.Node, views: list[fx.Node], writers: list[int], table: StorageTable,
                       position: dict[fx.Node, int], last_write: dict[int, int]) -> bool:
    """The storage ``maker`` makes is filled by a random op (a ``fresh_random_fill`` of the maker's buffer,
    dropout's ``bernoulli_``) and written in place only in the forward, by a chain that replays: each writer
    writes this storage alone, from values final by then; each link is read only by the next, so a copy of
    the last writer (or of a view of it) replays every write."""
    storage = table.values[position[maker]][0]
    if not set(writers) <= {position[v] for v in views}:
        return False  # written in the backward, outside the graph, or through another storage
    last = max(writers)
    chain = [maker, *(v for v in views if position[v] <= last)]
    if len(chain) < 2 or fresh_random_fill(chain[1]) is None:
        return False  # only a random fill replays here; a storage written in place otherwise is kept, as before
    for before, node in itertools.pairwise(chain):
        if set(before.users) != {node} or before not in node.all_input_nodes:
            return False
    for node in chain[1:]:
        i = position[node]
        if any(set(table.values[position[arg]]) != {storage} for arg in written_inputs(node)):
            return False
        reads = [key for arg in node.all_input_nodes for key in table.values[position[arg]] if key != storage]
        if any(last_write.get(key, -1) > i for key in reads) or (mutates(node) and not written_inputs(node)):
            return False
        if is_random(node) and (fresh_random_fill(node) is None or node.args[0] is not maker):
            return False
    return True


RECOMPUTE_OF = "memopt_recompute_of"  # a copy's meta key: the forward node it recomputes


def apply_recompute(graph: fx.GraphModule, backward_start: str, chosen: list[Candidate]) -> fx.GraphModule:
    """A copy of ``graph`` in which the chosen activations are recomputed in the backward."""
    new = fx.GraphModule(graph, copy_graph(graph.graph))
    recompute = {name for candidate in chosen for name in candidate.nodes}
    replayed = {name for candidate in chosen for name in candidate.replays}
    copies: dict[str, fx.Node] = {}
    original_val: dict[fx.Node, object] = {}  # what a copied or re-valued node held before

    def copy_of(node: fx.Node, before: fx.Node) -> fx.Node:
        if node.name not in copies:
            def inputs(arg: fx.Node) -> fx.Node:
                return copy_of(arg, before) if arg.name in recompute else arg

            if node.name in replayed:
                copy = _replay(new.graph, node, before, inputs)
                if fresh_random_fill(node) is not None:  # the fill's empty buffer is part of its one replayed op
                    copies[node.args[0].name] = copy
            else:
                with new.graph.inserting_before(before):
                    copy = new.graph.node_copy(node, inputs)
            if running_stats_read_to_update(copy):  # the running statistics update once, in the forward
                copy.target, copy.args, copy.kwargs = without_running_stats(copy)
            original_val[copy] = node.meta["val"]
            copy.meta["val"] = fake_result(copy)  # a new storage, not the original's
            copy.meta[RECOMPUTE_OF] = node.name
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


def _replay(graph: fx.Graph, node: fx.Node, before: fx.Node, inputs) -> fx.Node:
    """Before ``before``, ``node``'s random op run from the generator state saved in the forward right before
    ``node`` (the state op is added there); a fill of a fresh buffer replays as its functional op."""
    fill = fresh_random_fill(node)
    target, args = fill if fill is not None else (node.target, node.args)
    anchor = next((arg for arg in args if isinstance(arg, fx.Node)), node.all_input_nodes[0])
    with graph.inserting_before(node):
        state = graph.call_function(RNG_STATE, (anchor,))
    state.meta["val"] = fake_result(state)
    with graph.inserting_before(before):
        copy = graph.call_function(RUN_WITH_RNG_STATE, (state, target, *fx.node.map_arg(args, inputs)),
                                   fx.node.map_arg(node.kwargs, inputs))
    copy.meta = dict(node.meta)
    return copy


def fake_result(node: fx.Node) -> object:
    """Run ``node``'s op on its inputs' fake values, in their fake mode (the graph's, for an op that takes no
    tensor: a ``zeros`` run outside it would make a real tensor, which the graph's metadata then holds as long
    as the graph lives, memory no plan counts)."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda arg: arg.meta["val"])
    leaves = pytree.tree_leaves((args, kwargs))
    mode = next((leaf.fake_mode for leaf in leaves if hasattr(leaf, "fake_mode")), None) or _graph_fake_mode(node.graph)
    if mode is None:  # a graph of real values (none is traced so): the op runs as it is
        return node.target(*args, **kwargs)
    # a constant of the graph (AOTAutograd's lifted scalar tensors) holds a real tensor: it enters the fake mode
    args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t if hasattr(t, "fake_mode") else mode.from_tensor(t),
                                        (args, kwargs))
    with mode:
        return node.target(*args, **kwargs)


def _graph_fake_mode(graph: fx.Graph) -> object | None:
    """The fake mode of the first fake value in ``graph``, if any."""
    for other in graph.nodes:
        for leaf in pytree.tree_leaves(other.meta.get("val")):
            if hasattr(leaf, "fake_mode"):
                return leaf.fake_mode
    return None
