"""A plan's predicted step as a snapshot that PyTorch's memory_viz page opens.

The file is what ``torch.cuda.memory._dump_snapshot`` writes: a pickled dict with
"segments" (the allocator's state when the snapshot is taken) and
"device_traces" (one list of events per device). Drop it on
https://pytorch.org/memory_viz, or make HTML of it with
``torch.cuda._memory_viz.trace_plot``.

The trace replays the plan's liveness on device 0:
- optimizer state and the graph's inputs (parameters, buffers, the batch) are
  allocated first, then each storage where it becomes live;
- a storage is freed right after its last use; at each position allocations
  come before frees, so the live bytes after a position's allocations are the
  plan's timeline there;
- what is live when the graph ends is held through the optimizer step, which
  allocates and frees each phase's temporaries, and is never freed: the
  snapshot is taken at the end of the step, and those are the active blocks of
  its one segment.
Addresses come from a first-fit allocator, so blocks live together never
overlap. Each event has one frame that reads "category:position:node".
"time_us" holds the position in the step, not microseconds: a plan has no clock.
Events carry no "category" key: the page's loader then expects a category
named "unknown" and fails without one.
"""

from __future__ import annotations

import bisect
import pickle
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from memopt.passes.storage import OPTIMIZER_STATE, TEMPORARIES, Storage

if TYPE_CHECKING:
    from memopt.report.plan import MemoryPlan

PICKLE_PROTOCOL = 4  # the page's unpickler reads protocols 2 to 4


def to_memory_viz(plan: MemoryPlan, path: str) -> str:
    """Write ``plan``'s predicted step as a memory_viz snapshot (pickle) to ``path`` and return the path."""
    with open(path, "wb") as file:
        pickle.dump(memory_viz_snapshot(plan), file, protocol=PICKLE_PROTOCOL)
    return path


def memory_viz_snapshot(plan: MemoryPlan) -> dict[str, Any]:
    """The snapshot dict (keys "segments" and "device_traces") of ``plan``'s predicted step."""
    live, last = plan.live, len(plan.live.order) - 1
    heap = _FirstFit()
    events: list[dict[str, Any]] = []
    alloc_of: dict[int, dict[str, Any]] = {}  # addr -> the alloc event of the block there

    def alloc(nbytes: int, position: int, category: str, name: str) -> int:
        addr = heap.alloc(nbytes)
        alloc_of[addr] = {"action": "alloc", "addr": addr, "size": nbytes, "stream": 0, "time_us": position,
                          "frames": [{"filename": category, "line": position, "name": name}]}
        events.append(alloc_of[addr])
        return addr

    def free(addr: int, position: int) -> None:
        heap.free(addr)
        for action in ("free_requested", "free_completed"):
            events.append({**alloc_of[addr], "action": action, "time_us": position})

    for name, nbytes in plan.optimizer.state_by_param.items():
        if nbytes:
            alloc(nbytes, 0, OPTIMIZER_STATE, name)
    made_at: dict[int, list[Storage]] = defaultdict(list)
    freed_at: dict[int, list[Storage]] = defaultdict(list)
    for s in plan.storages.storages:
        if s.nbytes:
            made_at[max(live.start[s.index], 0)].append(s)
            if live.end[s.index] < last:  # live when the graph ends: held to the end of the step
                freed_at[live.end[s.index]].append(s)
    addr_of: dict[int, int] = {}  # storage index -> addr
    for position in range(last + 1):
        for s in made_at[position]:
            addr_of[s.index] = alloc(s.nbytes, position, s.category, s.node)
        node = live.order[position]
        if plan.scratch and plan.scratch[node]:  # the kernel's own workspace, freed before it returns
            free(alloc(plan.scratch[node], position, TEMPORARIES, f"scratch of {plan.storages.node_names[node]}"),
                 position)
        for s in freed_at[position]:
            free(addr_of[s.index], position)
    for k, phase in enumerate(plan.optimizer.phases):
        if phase.extra_bytes:
            position = last + 1 + k
            free(alloc(phase.extra_bytes, position, TEMPORARIES, phase.label), position)
    segments = [_segment(heap, alloc_of)] if heap.high else []
    return {"segments": segments, "device_traces": [events]}


def _segment(heap: _FirstFit, alloc_of: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The one segment as the step ends: held blocks, with the gaps between them inactive."""
    blocks: list[dict[str, Any]] = []
    cursor = 0
    for addr in heap.starts:
        if addr > cursor:
            blocks.append({"address": cursor, "size": addr - cursor, "requested_size": 0, "state": "inactive",
                           "frames": []})
        size = heap.sizes[addr]
        blocks.append({"address": addr, "size": size, "requested_size": size, "state": "active_allocated",
                       "frames": alloc_of[addr]["frames"]})
        cursor = addr + size
    if heap.high > cursor:
        blocks.append({"address": cursor, "size": heap.high - cursor, "requested_size": 0, "state": "inactive",
                       "frames": []})
    active = sum(heap.sizes.values())
    return {"device": 0, "address": 0, "total_size": heap.high, "allocated_size": active, "active_size": active,
            "requested_size": active, "stream": 0, "blocks": blocks}


class _FirstFit:
    """Addresses for blocks: the lowest gap that fits; ``high`` is the highest end ever used."""

    def __init__(self) -> None:
        self.starts: list[int] = []  # sorted addresses of the live blocks
        self.sizes: dict[int, int] = {}
        self.high = 0

    def alloc(self, size: int) -> int:
        addr = 0
        for start in self.starts:
            if start - addr >= size:
                break
            addr = start + self.sizes[start]
        bisect.insort(self.starts, addr)
        self.sizes[addr] = size
        self.high = max(self.high, addr + size)
        return addr

    def free(self, addr: int) -> None:
        self.starts.remove(addr)
        del self.sizes[addr]
