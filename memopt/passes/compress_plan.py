"""Which saved activations ``compress=`` packs: each one that may be, then only those the plan needs.

Packing every saved activation that may be packed gives the recompute plan the
most room: it is planned on that step. Each pack then costs its pack and unpack
time and an approximation, so a pack stays only where the plan needs it. With
the recomputations held, leaving a tensor whole adds its bytes, less its
payload and scales, at every event between its pack and its unpack; the packs
that cost the most are left out first, while the step stays under the limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from memopt.passes.storage import ACTIVATIONS, StorageTable
from memopt.solvers.remat_sim import RecomputeProblem, _replay

LEAST_PACKED = 16 * 1024  # bytes: a smaller saved activation is not worth two more ops
# log-probabilities: their backward exponentiates them, so a packing's absolute error becomes a relative error of
# every probability
NOT_PACKED = {torch.ops.aten._log_softmax.default}


@dataclass(frozen=True, slots=True)
class Pack:
    """A saved activation packed in a step: where its pack and unpack run, what leaving it whole adds."""

    base: str  # the node that makes it
    pack: int  # the pack node's position
    unpack: int  # the unpack node's position
    extra_bytes: int  # its bytes less its payload's and scales': what the step holds between when it is whole
    seconds: float  # packing and unpacking


def packable(graph: fx.GraphModule, table: StorageTable) -> dict[int, fx.Node]:
    """Per storage that may be packed, the node holding it whole: a floating-point, contiguous activation of its
    own, made in the forward and read in the backward, of at least ``LEAST_PACKED`` bytes, and not
    log-probabilities."""
    forward = list(zip(graph.graph.nodes, table.values))[:table.backward_start]  # (node, its storages)
    saved = {s.index for s in table.by_category(ACTIVATIONS) if s.nbytes >= LEAST_PACKED and 0 <= s.defined_at}
    saved -= {index for node, indices in forward if node.target in NOT_PACKED for index in indices}
    bases: dict[int, fx.Node] = {}
    for node, indices in forward:
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or not value.is_contiguous():
            continue
        for index in indices:
            if index in saved and index not in bases and value.storage_offset() == 0 \
                    and value.numel() * value.element_size() == table.storages[index].nbytes:
                bases[index] = node
    return bases


def packs_in(graph: fx.GraphModule, table: StorageTable, made: Mapping[str, tuple[str, str]],
             seconds: Mapping[str, float]) -> list[Pack]:
    """The packs ``apply_compress`` made (``made``: per base, its pack and unpack nodes) in ``graph``."""
    position = {node.name: i for i, node in enumerate(graph.graph.nodes)}
    nodes = list(graph.graph.nodes)
    packs = []
    for base, (pack, unpack) in made.items():
        payload = {key for user in nodes[position[pack]].users for key in table.values[position[user.name]]}
        whole = sum(table.storages[key].nbytes for key in table.values[position[base]])
        kept = sum(table.storages[key].nbytes for key in payload)
        packs.append(Pack(base, position[pack], position[unpack], whole - kept, seconds[base]))
    return packs


def needed_packs(problem: RecomputeProblem, recomputed: tuple[int, ...], packs: list[Pack], limit: int
                 ) -> tuple[Pack, ...]:
    """The packs the step needs to stay at or under ``limit`` bytes with the ``recomputed`` candidates of
    ``problem`` (the packed step's) held: the others are left out, the costliest first."""
    replay = _replay(problem, recomputed)
    profile = np.array(replay.profile, dtype=np.int64)
    needed = []
    for pack in sorted(packs, key=lambda p: -p.seconds):
        # events after the pack and before the unpack: where the payload lives instead of the tensor
        first, last = replay.time_of[pack.pack] + 1, replay.time_of[pack.unpack]
        if first < last and profile[first:last].max() + pack.extra_bytes > limit:
            needed.append(pack)
        else:
            profile[first:last] += pack.extra_bytes
    return tuple(needed)
