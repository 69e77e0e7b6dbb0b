"""The real peak of one call: what the allocator saw, not what a plan predicts.

On CPU the peak comes from the profiler's memory events: c10's CPU allocator
reports every allocation (+bytes) and free (-bytes) below the dispatcher, so
eager ops, temporaries inside a kernel, autograd's gradient buffers, optimizer
state and Inductor's buffers are all seen. On CUDA it comes from the caching
allocator's own counters (`max_memory_allocated`).

Bytes on CPU are "sum of storage nbytes" (what was requested); bytes on CUDA
are the caching allocator's block sizes (rounded up to 512 bytes), so the two
are not in the same units to the byte.

Host memory that a plan offloads to (``mark_host_memory``: memopt's host pools) is
not device memory: on CPU, where both live in the same allocator, its blocks are
left out of the peak, the baseline and the scans, and reported as `host_bytes`.

What the CPU events cannot tell, the scans of live tensors before and after
the call check: a free of a block allocated outside any profiler session emits
no event (it shows as `unaccounted_bytes`), or one sized from a stale entry of
the profiler's ptr -> size map (it is resized from the scan at entry).

Kineto, under torch.profiler, writes a trace marker to stderr as each session
starts and stops ("USDT: ... profiler_start"). Its log level cannot mute the
markers alone (they rank above its errors), and it is read once per process, so
``memory_profile`` takes what is written to stderr while a session starts and
stops into the log instead: the markers at DEBUG, anything else at WARNING.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import re
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile
from torch.utils import _pytree as pytree

from memopt.errors import MeasurementError

log = logging.getLogger(__name__)

_MEASURABLE = ("cpu", "cuda")


@dataclass(frozen=True, slots=True)
class MeasuredPeak:
    """The peak of one call on one device, with the timeline that led to it."""

    peak_bytes: int  # baseline_bytes + the highest running sum of alloc/free events (absolute live bytes)
    baseline_bytes: int  # live bytes on the device at entry
    end_bytes: int  # live bytes after the call, counted independently of the events (CPU: a scan of live tensors)
    timeline: tuple[tuple[int, int], ...]  # (ns since the start, live bytes): the start, then after each event
    unaccounted_bytes: int  # end_bytes - (baseline_bytes + net of the events); nonzero: the events missed something
    device: str  # "cpu" or "cuda"
    result: Any = field(default=None, repr=False, compare=False)  # what step_fn returned
    duration_ns: int = 0  # the call's length on the timeline's clock (CPU: to the end of the last op profiled)
    host_bytes: int = 0  # bytes of host pools (mark_host_memory) live after the call: counted apart, not in the peak

    @property
    def timeline_fractions(self) -> tuple[tuple[float, int], ...]:
        """The timeline with time as a fraction of the call in [0, 1], to draw over a plan's steps."""
        span = max(self.duration_ns, self.timeline[-1][0], 1)
        return tuple((at / span, live) for at, live in self.timeline)


def measure_peak(
    step_fn: Callable[..., Any], *args: Any, device: str | torch.device | None = None, **kwargs: Any
) -> MeasuredPeak:
    """Call `step_fn(*args, **kwargs)` once and measure its peak memory on `device`.

    `device` defaults to the device of the first tensor (or module parameter or
    buffer) found in the arguments, else "cpu". A `device=` keyword is taken by
    measure_peak itself; to hand one to step_fn, wrap it in a lambda.

    Measure a warm call: a first call may compile, and the first optimizer step
    allocates optimizer state. Exceptions from step_fn propagate unchanged.

    CPU: runs under `torch.profiler.profile(profile_memory=True)`, so it raises
    MeasurementError if a profiler is already running on this thread (nested
    profilers switch each other off). Only this thread's allocations are seen
    (the allocator's reporter is thread-local), plus those of threads torch
    hands the profiler to (autograd engine, `torch.jit.fork`). A cyclic garbage
    collection runs at entry, so that no tensor allocated before the call is
    freed by the collector during it.

    CUDA: synchronizes, resets the device's peak counter (so a later
    `max_memory_allocated` starts from this call), and counts every stream and
    thread on that device. The timeline is the start and the end only; the time
    of the peak is not known.
    """
    if not callable(step_fn):
        raise MeasurementError(
            f"measure_peak needs a callable step function as its first argument, got "
            f"{type(step_fn).__name__} {step_fn!r}; pass the function itself, e.g. measure_peak(train_step, batch)"
        )
    dev = _resolve_device(device if device is not None else _infer_device(args, kwargs))
    if dev.type == "cuda":
        return _measure_cuda(step_fn, args, kwargs, dev)
    return _measure_cpu(step_fn, args, kwargs)


_HOST_BLOCKS: dict[int, int] = {}  # data_ptr -> nbytes of host memory (offload pools), counted apart


def mark_host_memory(tensor: torch.Tensor) -> None:
    """Count ``tensor``'s storage as host memory (an offload pool): left out of CPU device peaks.

    The mark lasts as long as the tensor does.
    """
    storage = tensor.untyped_storage()
    ptr = storage.data_ptr()
    if ptr == 0:
        return
    _HOST_BLOCKS[ptr] = storage.nbytes()
    weakref.finalize(tensor, _HOST_BLOCKS.pop, ptr, None)


def host_memory_bytes() -> int:
    """Bytes of the host memory marked by ``mark_host_memory`` that is still alive."""
    return sum(_HOST_BLOCKS.values())


def live_tensor_bytes(device: str | torch.device = "cpu") -> int:
    """Bytes of the distinct live tensor storages on `device`, found by scanning Python's objects.

    Each storage counts once (views and aliases share it), keyed by its data
    pointer. Counts nn.Parameters, buffers and the `.grad` of every live leaf
    tensor; skips fake and meta tensors. A device without an index ("cuda")
    matches every index of its type. Tensors held only by C++ (autograd's saved
    tensors, say) are not Python objects and are not seen.
    """
    return sum(_live_storage_sizes(_resolve_device(device, require_available=False)).values())


def _live_storage_sizes(want: torch.device) -> dict[int, int]:
    """data_ptr -> nbytes of every live, non-empty storage on `want` that Python can reach."""
    nbytes_by_ptr: dict[int, int] = {}
    for obj in gc.get_objects():
        # type() rather than isinstance(): isinstance would read `__class__` of every object in the process.
        if not issubclass(type(obj), torch.Tensor):
            continue
        for storage in _storages(obj):
            where = storage.device
            if where.type == want.type and (want.index is None or where.index == want.index):
                try:
                    ptr = storage.data_ptr()
                except RuntimeError:  # a wrapper subclass's (DTensor's) placeholder; its local tensor is scanned
                    continue
                nbytes_by_ptr[ptr] = max(nbytes_by_ptr.get(ptr, 0), storage.nbytes())
    nbytes_by_ptr.pop(0, None)  # empty storages
    for ptr in _HOST_BLOCKS:
        nbytes_by_ptr.pop(ptr, None)
    return nbytes_by_ptr


_SECOND_CALL = "memopt::second_call"


def measure_steady_peak(step_fn: Callable[[], Any], between: Callable[[], Any] | None = None) -> MeasuredPeak:
    """The peak of ``step_fn``'s second call of two made in one profiler session (CPU).

    A block allocated before a session and freed in it emits no free event, and a training step frees what
    the step before it left (a sharded engine keeps communication buffers from one step into the next), so a
    single measured call would count such a block as live to its end. Here the first call frees what came
    before; ``between`` runs after it (``optimizer.zero_grad``, say); a scan of the live tensors then gives the
    true bytes as the second call starts, and its events count from there. The timeline is the second call's.
    """
    scanned: dict[str, int] = {}

    def twice() -> Any:
        step_fn()
        if between is not None:
            between()
        gc.collect()
        scanned["live"] = sum(_live_storage_sizes(torch.device("cpu")).values())
        with torch.profiler.record_function(_SECOND_CALL):
            return step_fn()

    return _measure_cpu(twice, (), {}, second_call=scanned)


def _measure_cpu(step_fn: Callable[..., Any], args: tuple, kwargs: dict,
                 second_call: dict[str, int] | None = None) -> MeasuredPeak:
    if torch.autograd._profiler_enabled():
        raise MeasurementError(
            "measure_peak on CPU starts its own torch.profiler session, but a profiler is already running on this "
            "thread (a nested session would switch the outer one off); call measure_peak outside the other profiler"
        )
    gc.collect()
    live_at_entry = _live_storage_sizes(torch.device("cpu"))
    baseline = sum(live_at_entry.values())
    with memory_profile([ProfilerActivity.CPU]) as prof:
        result = step_fn(*args, **kwargs)
    end = live_tensor_bytes("cpu")

    results = prof.profiler.kineto_results
    if results is None:
        raise MeasurementError("the profiler returned no results, so the call's memory could not be measured")
    start_ns = results.trace_start_ns()
    roots = results.experimental_event_tree()
    end_ns = max((node.end_time_ns for node in roots), default=start_ns)
    if second_call is not None:
        return _second_call(roots, live_at_entry, end, second_call["live"], result)
    live, highest = baseline, baseline
    timeline = [(0, baseline)]
    allocated_here: set[int] = set()
    for at_ns, ptr, nbytes in _cpu_allocation_events(roots):
        if ptr in _HOST_BLOCKS:  # an offload pool: host memory, not the device's
            continue
        if nbytes > 0:
            allocated_here.add(ptr)
        elif ptr in allocated_here:
            allocated_here.discard(ptr)
        elif ptr in live_at_entry:
            # The profiler sizes a free by a process-wide ptr -> size map that it updates only while profiling,
            # so for a block allocated outside a session the size can be that of an older block at the same
            # address. The scan at entry knows the true size.
            nbytes = -live_at_entry.pop(ptr)
        live += nbytes
        highest = max(highest, live)
        timeline.append((max(at_ns - start_ns, 0), live))
    unaccounted = end - live
    log.debug(
        "cpu: %d memory events, baseline %d, peak %d, end %d, unaccounted %d",
        len(timeline) - 1, baseline, highest, end, unaccounted,
    )
    return MeasuredPeak(highest, baseline, end, tuple(timeline), unaccounted, "cpu", result, max(end_ns - start_ns, 0),
                        host_memory_bytes())


def _second_call(roots: list[Any], live_at_entry: dict[int, int], end: int, live_at_start: int, result: Any
                 ) -> MeasuredPeak:
    """The second call's peak (measure_steady_peak): its events, counted from the bytes scanned at its start (the
    events before it miss the frees of blocks older than the session)."""
    (mark,) = [node for node in _walk(roots) if node.name == _SECOND_CALL]
    live = highest = live_at_start
    timeline = [(0, live)]
    allocated_here: set[int] = set()
    for at_ns, ptr, nbytes in _closed_collective_blocks(roots):
        if ptr in _HOST_BLOCKS:
            continue
        if nbytes > 0:
            allocated_here.add(ptr)
        elif ptr in allocated_here:
            allocated_here.discard(ptr)
        elif ptr in live_at_entry:  # (sized from the scan at entry, as _measure_cpu does)
            nbytes = -live_at_entry.pop(ptr)
        if at_ns >= mark.start_time_ns:
            live += nbytes
            highest = max(highest, live)
            timeline.append((at_ns - mark.start_time_ns, live))
    return MeasuredPeak(highest, live_at_start, end, tuple(timeline), end - live, "cpu", result,
                        max(mark.end_time_ns - mark.start_time_ns, 0), host_memory_bytes())


_COLLECTIVE_SCOPES = ("c10d::", "gloo:", "nccl:")


def _closed_collective_blocks(roots: list[Any]) -> list[tuple[int, int, int]]:
    """The session's events, plus a free for each block a collective allocated whose free reached no profiler.

    gloo runs each collective on a worker thread, which drops the collective's temporaries (the copy of a
    reduce-scatter's input, say) once the work completes, and that thread reports to no profiler; a block
    allocated inside a collective is freed when the collective ends, if no free of it is seen before then: the
    next allocation at its address, or the end of the session.
    """
    events = _cpu_allocation_events(roots)
    scope_end = {}
    for node in _walk(roots):
        if node.tag == _EventType.Allocation and node.extra_fields.alloc_size > 0:
            scope = node.parent
            while scope is not None and not scope.name.startswith(_COLLECTIVE_SCOPES):
                scope = scope.parent
            if scope is not None:
                scope_end[(node.start_time_ns, node.extra_fields.ptr)] = scope.end_time_ns
    closed: list[tuple[int, int, int]] = []
    open_blocks: dict[int, tuple[int, int]] = {}  # ptr -> (bytes, when its collective ended) of collective blocks
    for at_ns, ptr, nbytes in events:
        if nbytes > 0:
            if ptr in open_blocks:  # the address came back: its block was freed unseen
                size, ended = open_blocks.pop(ptr)
                closed.append((min(ended, at_ns), ptr, -size))
            if (at_ns, ptr) in scope_end:
                open_blocks[ptr] = (nbytes, scope_end[(at_ns, ptr)])
        else:
            open_blocks.pop(ptr, None)
    closed.extend((ended, ptr, -size) for ptr, (size, ended) in open_blocks.items())
    return sorted(events + closed, key=lambda event: event[0])


def _walk(roots: list[Any]) -> Iterator[Any]:
    stack = list(roots)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        yield node


@contextmanager
def memory_profile(activities: Iterable[ProfilerActivity]) -> Iterator[profile]:
    """A ``torch.profiler.profile(profile_memory=True)`` session whose start and stop write nothing to stderr.

    What is written to stderr while it starts and stops goes to the log (``_stderr_to_log``): Kineto's trace
    markers at DEBUG, anything else (a Kineto error) at WARNING, so nothing but the markers is muted.
    """
    session = profile(activities=list(activities), profile_memory=True)
    with _stderr_to_log():
        session.__enter__()
    try:
        yield session
    finally:
        with _stderr_to_log():
            session.__exit__(None, None, None)


_KINETO_TRACE_MARKER = re.compile(r"^USDT:")  # Kineto's logger prefixes each line with its severity


@contextmanager
def _stderr_to_log() -> Iterator[None]:
    """What is written to file descriptor 2 in the block (by C++ code too) is logged instead of printed.

    Kineto writes to ``std::cerr`` and reads its log level from the environment once per process, so no
    setting can mute its markers for one session alone without muting its errors as well."""
    sys.stderr.flush()  # what Python wrote before the block is not the block's
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to take over: nothing would be printed anyway
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        written = sink.read().decode(errors="replace")
    for line in written.splitlines():
        if line.strip():
            log.log(logging.DEBUG if _KINETO_TRACE_MARKER.match(line) else logging.WARNING, "%s", line)


def _cpu_allocation_events(roots: list[Any]) -> list[tuple[int, int, int]]:
    """(time ns, ptr, +-nbytes) of every CPU allocation and free the profiler saw, sorted by time.

    Read from the event tree, not from FunctionEvents: those fold each allocation made inside an op into the
    op's cpu_memory_usage, list as "[memory]" only those made outside any op, and carry no pointer. Every
    event belongs to this session: a thread that does not carry this profiler's thread-local state reports
    nothing.
    """
    events = []
    for node in _walk(roots):
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            fields = node.extra_fields
            events.append((node.start_time_ns, fields.ptr, fields.alloc_size))
    events.sort(key=lambda event: event[0])
    return events


def _measure_cuda(step_fn: Callable[..., Any], args: tuple, kwargs: dict, dev: torch.device) -> MeasuredPeak:
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    baseline = torch.cuda.memory_allocated(dev)
    start_ns = time.perf_counter_ns()
    result = step_fn(*args, **kwargs)
    torch.cuda.synchronize(dev)
    elapsed_ns = time.perf_counter_ns() - start_ns
    peak = torch.cuda.max_memory_allocated(dev)
    end = torch.cuda.memory_allocated(dev)
    # end is read from the same counter as the peak, so nothing can be unaccounted here.
    return MeasuredPeak(peak, baseline, end, ((0, baseline), (elapsed_ns, end)), 0, "cuda", result, elapsed_ns)


def _resolve_device(device: str | torch.device, require_available: bool = True) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise MeasurementError(
            f"cannot read {device!r} as a torch device; measure on 'cpu' or 'cuda' (or 'cuda:N')"
        ) from error
    if dev.type not in _MEASURABLE:
        raise MeasurementError(
            f"memopt measures memory on 'cpu' or 'cuda', not on {str(dev)!r}; pass device='cpu' or device='cuda'"
        )
    if require_available and dev.type == "cuda" and not torch.cuda.is_available():
        raise MeasurementError(
            f"cannot measure on {str(dev)!r}: torch.cuda.is_available() is False in this process; "
            "measure on device='cpu' or run where a CUDA device is visible"
        )
    return dev


def _infer_device(args: tuple, kwargs: dict) -> torch.device:
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor):
            return leaf.device
        if isinstance(leaf, torch.nn.Module):
            tensor = next(itertools.chain(leaf.parameters(), leaf.buffers()), None)
            if tensor is not None:
                return tensor.device
    return torch.device("cpu")


def _storages(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages a tensor holds on a real device: its own (or its sparse parts') and its gradient's."""
    layout = tensor.layout
    if layout == torch.sparse_coo:
        parts = [tensor._indices(), tensor._values()]
    elif layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = [tensor.crow_indices(), tensor.col_indices(), tensor.values()]
    elif layout in (torch.sparse_csc, torch.sparse_bsc):
        parts = [tensor.ccol_indices(), tensor.row_indices(), tensor.values()]
    else:
        parts = [tensor]
    storages = []
    for part in parts:
        try:
            storage = part.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue  # a wrapper subclass with no storage of its own; the scan finds its inner tensors
        if storage.device.type != "meta":  # fake tensors keep meta storage (and say "cpu" as their device)
            storages.append(storage)
    if storages and (tensor.is_leaf or tensor.retains_grad) and tensor.grad is not None:
        storages.extend(_storages(tensor.grad))
    return storages
