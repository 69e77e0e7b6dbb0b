"""The smallest budget any keep/recompute plan of this step can meet, and where it binds.

Whatever is recomputed, at every op the step holds: parameters, buffers, the
batch and optimizer state; the gradients produced so far (they wait for the
optimizer); and the op's own inputs and outputs. The optimizer step holds all
gradients plus its own temporaries. The largest of these is a proven minimum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from memopt.passes.liveness import Liveness, MemoryTimeline
from memopt.passes.storage import BUFFERS, GATHERED, GRADIENTS, INPUTS, OPTIMIZER_STATE, PARAMETERS, StorageTable


@dataclass(frozen=True, slots=True)
class LowerBound:
    bytes: int
    where: str  # the node (or optimizer phase) where the bound binds
    why: str


def minimum_budget(
    table: StorageTable, live: Liveness, timeline: MemoryTimeline, scratch: Sequence[int] = ()
) -> LowerBound:
    """A lower bound on the peak of every rematerialization plan of this step (``scratch``: per node)."""
    best = LowerBound(0, "", "")
    # (and what FSDP2 holds gathered: the engine's, whatever is recomputed)
    held = (PARAMETERS, BUFFERS, INPUTS, OPTIMIZER_STATE, GRADIENTS, GATHERED)
    for pos, node in enumerate(live.order):
        resident = sum(timeline.by_category[c][pos] for c in held)
        operands = sum(
            table.storages[k].nbytes for k in table.touched[node] if table.storages[k].category != GRADIENTS
        ) + (scratch[node] if scratch else 0)
        if resident + operands > best.bytes:
            best = LowerBound(
                resident + operands,
                table.node_names[node],
                "parameters, buffers, inputs, optimizer state and the gradients so far, plus this op's "
                "own inputs, outputs and scratch",
            )
    for index, phase in enumerate(timeline.phases):
        if phase == "optimizer" and timeline.totals[index] > best.bytes:
            best = LowerBound(
                timeline.totals[index],
                timeline.labels[index],
                "the optimizer step holds every gradient, its state and its own temporaries, whatever is "
                "recomputed; what needs less: a fused optimizer (no temporaries), one with less state "
                "(SGD, Adafactor), lower-precision parameters, or sharding them across devices (FSDP2)",
            )
    return best
