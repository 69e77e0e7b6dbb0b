"""Liveness over an order, and the memory timeline of a whole training step.

Pure analyses: a storage is live from the op that allocates it through the last
op that reads it (in the given order); graph inputs (parameters, buffers, the
batch) are live throughout; the step's outputs (loss, gradients) stay live to
the end of the graph, and gradients through the optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from memopt.passes.optimizer_memory import OptimizerMemory
from memopt.passes.storage import (
    CATEGORIES,
    OPTIMIZER_STATE,
    TEMPORARIES,
    StorageTable,
)


@dataclass(frozen=True)
class Liveness:
    """For each storage, the first and last position (in ``order``) at which it is live."""

    order: tuple[int, ...]
    start: tuple[int, ...]  # -1: live before the step (graph input)
    end: tuple[int, ...]


def liveness(table: StorageTable, order: Sequence[int] | None = None) -> Liveness:
    """Live ranges of every storage when the graph's nodes run in ``order`` (default: as traced)."""
    n = len(table.node_names)
    order = tuple(range(n)) if order is None else tuple(order)
    if sorted(order) != list(range(n)):
        raise ValueError(f"order must be a permutation of the graph's {n} node positions")
    position = [0] * n
    for pos, node in enumerate(order):
        position[node] = pos
    last = n - 1
    start, end = [], []
    for s, readers in zip(table.storages, table.readers):
        if s.defined_at < 0:
            start.append(-1)
            end.append(last)
        else:
            start.append(position[s.defined_at])
            # an unread result still exists at the op that made it; outputs live to the end
            end.append(last if s.is_output else max([position[r] for r in readers], default=position[s.defined_at]))
    return Liveness(order, tuple(start), tuple(end))


@dataclass(frozen=True)
class MemoryTimeline:
    """Live bytes per category at every step of the training step: graph nodes, then the optimizer."""

    labels: tuple[str, ...]
    phases: tuple[str, ...]  # "forward" | "backward" | "optimizer"
    by_category: dict[str, tuple[int, ...]]
    totals: tuple[int, ...]

    @property
    def peak_index(self) -> int:
        return max(range(len(self.totals)), key=self.totals.__getitem__)

    @property
    def peak_bytes(self) -> int:
        return self.totals[self.peak_index]

    @property
    def peak_label(self) -> str:
        return self.labels[self.peak_index]

    def ledger_at(self, index: int) -> dict[str, int]:
        return {category: values[index] for category, values in self.by_category.items()}


def memory_timeline(
    table: StorageTable, live: Liveness, optimizer: OptimizerMemory, scratch: Sequence[int] = ()
) -> MemoryTimeline:
    """The step's timeline: liveness of the graph, then the optimizer step with gradients held.

    ``scratch`` (per node, in graph order) is what an op allocates and frees inside itself: a
    temporary at that op only.
    """
    n = len(live.order)
    delta = {category: [0] * (n + 1) for category in CATEGORIES}
    for storage, start, end in zip(table.storages, live.start, live.end):
        row = delta[storage.category]
        row[max(start, 0)] += storage.nbytes
        row[end + 1] -= storage.nbytes
    if scratch:
        for pos, node in enumerate(live.order):
            delta[TEMPORARIES][pos] += scratch[node]
            delta[TEMPORARIES][pos + 1] -= scratch[node]
    by_category: dict[str, list[int]] = {}
    for category, row in delta.items():
        running, values = 0, []
        for change in row[:n]:
            running += change
            values.append(running)
        by_category[category] = values
    by_category[OPTIMIZER_STATE] = [optimizer.state_bytes] * n

    labels = [table.node_names[i] for i in live.order]
    phases = ["forward" if i < table.backward_start else "backward" for i in live.order]
    # the optimizer step: what the graph returns stays (gradients, the loss), plus the step's temporaries
    held_after_graph = {category: values[-1] if values else 0 for category, values in by_category.items()}
    for phase in optimizer.phases:
        labels.append(phase.label)
        phases.append("optimizer")
        for category, values in by_category.items():
            values.append(held_after_graph[category] + (phase.extra_bytes if category == TEMPORARIES else 0))
    totals = tuple(sum(values[i] for values in by_category.values()) for i in range(len(labels)))
    return MemoryTimeline(tuple(labels), tuple(phases), {c: tuple(v) for c, v in by_category.items()}, totals)

