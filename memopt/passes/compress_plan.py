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
aten = torch.ops.aten
# Packing errs by up to half a step of its block's scale: an absolute error, small beside the block's largest
# value but not beside its smallest. A backward that divides by the value, or takes its exponential, logarithm or
# a negative power, turns that into a large relative error of small values (log-probabilities: their backward
# exponentiates them, so every probability would be off), so such a value is not packed.
_AMPLIFIES = {aten.exp.default, aten.log.default, aten.reciprocal.default, aten.rsqrt.default}
# ops through which the backward reads the same numbers (views, copies, scaling by a number)
_SAME_NUMBERS = {aten.detach.default, aten.alias.default, aten.view.default, aten._unsafe_view.default,
                 aten.reshape.default, aten.expand.default, aten.permute.default, aten.transpose.int, aten.t.default,
                 aten.clone.default, aten.mul.Scalar, aten.div.Scalar, aten.add.Scalar, aten.sub.Scalar}


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
    own, made in the forward and read in the backward, of at least ``LEAST_PACKED`` bytes, whose error the
    backward does not amplify."""
    nodes = list(graph.graph.nodes)
    forward = list(zip(nodes, table.values))[:table.backward_start]  # (node, its storages)
    saved = {s.index for s in table.by_category(ACTIVATIONS) if s.nbytes >= LEAST_PACKED and 0 <= s.defined_at}
    saved -= _amplified(nodes, table, saved)
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


def _amplified(nodes: list[fx.Node], table: StorageTable, saved: set[int]) -> set[int]:
    """The ``saved`` storages the backward reads, directly or through ``_SAME_NUMBERS``, in an op that amplifies
    an absolute error (``_AMPLIFIES``, a divisor, a negative power, the log-probabilities of log-softmax's
    backward)."""
    position = {node: i for i, node in enumerate(nodes)}
    holders: dict[int, list[fx.Node]] = {}  # per saved storage, the nodes whose result lives in it
    for node, indices in zip(nodes, table.values):
        for index in set(indices) & saved:
            holders.setdefault(index, []).append(node)
    amplified = set()
    for index, reached in holders.items():
        seen = set(reached)
        while reached and index not in amplified:
            node = reached.pop()
            for user in node.users:
                if position[user] < table.backward_start or user in seen:
                    continue
                if _amplifies(user, node):
                    amplified.add(index)
                elif user.target in _SAME_NUMBERS:
                    seen.add(user)
                    reached.append(user)
    return amplified


def _amplifies(user: fx.Node, value: fx.Node) -> bool:
    """``user`` turns an absolute error of ``value`` into a large relative one."""
    args = user.args
    return (user.target in _AMPLIFIES
            or (user.target == aten.div.Tensor and len(args) > 1 and args[1] is value)
            or (user.target == aten.pow.Tensor_Scalar and args[0] is value and args[1] < 0)
            or (user.target == aten._log_softmax_backward_data.default and args[1] is value))


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
