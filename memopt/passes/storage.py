"""Storages of a captured step: bytes counted once per storage, a category for each.

A pure analysis: it reads ``node.meta["val"]`` (fake tensors) and the capture's
signature, and returns a frozen table. Views and in-place results share their
base's storage, so they add no bytes; every tensor an op returns (used or not)
is a storage allocated at that op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

from memopt.capture import CapturedStep

# Categories of the ledger, in the order a table prints them.
PARAMETERS = "parameters"
BUFFERS = "buffers"
INPUTS = "inputs"
GRADIENTS = "gradients"
OPTIMIZER_STATE = "optimizer_state"
ACTIVATIONS = "activations"  # produced by the forward and read by the backward (saved tensors)
TEMPORARIES = "temporaries"  # everything else that lives between two ops
OFFLOADED = "offloaded"  # host side; no bytes on the device
GATHERED = "gathered"  # FSDP2's: parameters gathered whole, all-gather outputs, reduce-scatter inputs (one rank's)
CATEGORIES = (PARAMETERS, BUFFERS, INPUTS, GRADIENTS, OPTIMIZER_STATE, ACTIVATIONS, TEMPORARIES, GATHERED)


@dataclass(frozen=True, slots=True)
class Storage:
    """One allocation: who makes it, who reads it last, and what it is."""

    index: int
    nbytes: int
    defined_at: int  # position in the graph's node list; -1 for graph inputs (live before the step)
    last_use: int  # position of the last node that reads it (or an alias of it), in the traced order
    category: str
    node: str  # the node that allocates it (for graph inputs: the parameter, buffer or input name)
    is_output: bool  # returned by the step (loss, gradients): live to the end of the graph


@dataclass(frozen=True)
class StorageTable:
    """Every storage of the step, and for each node which storages it reads and makes."""

    storages: tuple[Storage, ...]
    node_names: tuple[str, ...]
    backward_start: int  # index of the first backward node
    touched: tuple[tuple[int, ...], ...]  # per node: the storages it reads or makes (graph inputs left out)
    readers: tuple[tuple[int, ...], ...]  # per storage: the nodes that read it (through any alias)
    values: tuple[tuple[int, ...], ...] = ()  # per node: the storages its result lives in (graph inputs included)

    def by_category(self, category: str) -> Iterator[Storage]:
        return (s for s in self.storages if s.category == category)

    def bytes_of(self, category: str) -> int:
        return sum(s.nbytes for s in self.by_category(category))


def shares_storage(a: object, b: object) -> bool:
    """Both are tensors over the same storage (a view, an alias or an in-place result of the other)."""
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and StorageWeakRef(a.untyped_storage()) == StorageWeakRef(b.untyped_storage())
    )


def _tensors(value: object) -> list[torch.Tensor]:
    return [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


def storage_table(step: CapturedStep) -> StorageTable:
    """Bytes per storage and a category for each, for the captured step."""
    nodes: list[fx.Node] = list(step.graph.graph.nodes)
    device = step.device
    backward_start = next(i for i, n in enumerate(nodes) if n.name == step.backward_start)
    roles = {p.node: p.role for p in step.placeholders}
    input_names = {p.node: p.name for p in step.placeholders}  # "transformer.h.0.attn.c_attn.weight", ...
    output_names = {step.loss_node, *step.gradients.values(), *step.outputs}
    gradient_names = {*step.gradients.values(), *step.stepped.values()}  # a stepped one frees after its update

    key_of: dict[StorageWeakRef, int] = {}
    nbytes: list[int] = []
    defined: list[int] = []
    last: list[int] = []
    maker: list[str] = []
    category: list[str] = []
    is_output: list[bool] = []
    node_storages: dict[fx.Node, list[int]] = {}
    touched: list[tuple[int, ...]] = []
    readers: list[list[int]] = []

    for i, node in enumerate(nodes):
        if node.op == "output":
            touched.append(())
            continue
        keys: list[int] = []
        for tensor in _tensors(node.meta.get("val")):
            if tensor.device != device:
                continue  # host scalars and the like are not device memory
            ref = StorageWeakRef(tensor.untyped_storage())
            key = key_of.get(ref)
            if key is None:
                key = key_of[ref] = len(nbytes)
                nbytes.append(tensor.untyped_storage().nbytes())
                placeholder = node.op == "placeholder"
                # graph inputs exist before the step; a tangent (the gradient of an output) arrives
                # when the backward starts
                tangent = placeholder and roles[node.name] == "tangent"
                defined.append(backward_start if tangent else -1 if placeholder else i)
                last.append(max(i, defined[-1]))
                maker.append(input_names.get(node.name, node.name) if placeholder else node.name)
                category.append(_PLACEHOLDER_CATEGORY[roles[node.name]] if placeholder else TEMPORARIES)
                is_output.append(False)
                readers.append([])
            keys.append(key)
        node_storages[node] = keys
        # reading an input keeps its storage alive up to here
        reads = {key for arg in node.all_input_nodes for key in node_storages.get(arg, ())}
        for key in reads:
            last[key] = max(last[key], i)
            readers[key].append(i)
        made = keys if node.op != "placeholder" else []
        touched.append(tuple(k for k in sorted(reads.union(made)) if defined[k] >= 0))
        if node.name in output_names or node.name in gradient_names:
            for key in keys:
                is_output[key] = is_output[key] or node.name in output_names
                if node.name in gradient_names and category[key] == TEMPORARIES:
                    category[key] = GRADIENTS

    end = len(nodes) - 1
    for key in range(len(nbytes)):
        if is_output[key]:
            last[key] = end
        elif category[key] == TEMPORARIES and defined[key] < backward_start <= last[key]:
            category[key] = ACTIVATIONS
    storages = tuple(
        Storage(k, nbytes[k], defined[k], last[k], category[k], maker[k], is_output[k]) for k in range(len(nbytes))
    )
    return StorageTable(
        storages, tuple(n.name for n in nodes), backward_start, tuple(touched), tuple(tuple(r) for r in readers),
        tuple(tuple(node_storages.get(node, ())) for node in nodes),
    )


_PLACEHOLDER_CATEGORY = {"parameter": PARAMETERS, "buffer": BUFFERS, "input": INPUTS, "tangent": INPUTS}
