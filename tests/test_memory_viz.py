"""Pictures: a plan as a snapshot for PyTorch's memory_viz, and predicted and measured timelines on one plot."""

from __future__ import annotations

import base64
import copy
import json
import pickle
import pickletools
import re
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.cuda._memory_viz as memory_viz
from conftest import square_mean, steady_step
from torch import nn

import memopt

# the opcodes the page's unpickler (torch/utils/viz/MemoryViz.js) reads; any other one stops it
JS_OPCODES = {
    "PROTO", "FRAME", "STOP", "MARK", "MEMOIZE", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET",
    "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_LIST", "LIST", "APPEND", "APPENDS",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "NONE", "NEWTRUE", "NEWFALSE",
    "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "SHORT_BINUNICODE", "BINUNICODE",
}


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    return model, torch.randn(16, 64), torch.optim.AdamW(model.parameters())


@pytest.fixture(scope="module")
def plan(model_and_batch):
    model, batch, optimizer = model_and_batch
    return memopt.plan(model, (batch,), loss_fn=square_mean, optimizer=optimizer)


@pytest.fixture
def snapshot_path(plan, tmp_path):
    path = str(tmp_path / "plan.pickle")
    assert plan.to_memory_viz(path) == path
    return path


@pytest.fixture
def snapshot(snapshot_path):
    with open(snapshot_path, "rb") as file:
        return pickle.load(file)


def replay(events: list[dict]) -> tuple[list[int], dict[int, int]]:
    """Peak live bytes at each position ("time_us") and the blocks left at the end, checking every event."""
    live: dict[int, int] = {}  # addr -> size
    peak_at = [0]
    total = 0
    for e in events:
        assert e["stream"] == 0 and e["frames"] and e["time_us"] >= len(peak_at) - 1
        while len(peak_at) <= e["time_us"]:  # positions without events hold what was live
            peak_at.append(total)
        if e["action"] == "alloc":
            assert e["size"] > 0
            for addr, size in live.items():  # no overlap with any block live now
                assert e["addr"] + e["size"] <= addr or addr + size <= e["addr"], (e, addr, size)
            live[e["addr"]] = e["size"]
            total += e["size"]
        elif e["action"] == "free_completed":
            assert live.pop(e["addr"]) == e["size"]  # a free names its alloc's address and size
            total -= e["size"]
        else:
            assert e["action"] == "free_requested" and live[e["addr"]] == e["size"]
        peak_at[-1] = max(peak_at[-1], total)
    return peak_at, live


def test_the_trace_replays_to_the_plans_timeline(plan, snapshot):
    assert set(snapshot) == {"segments", "device_traces"}
    (events,) = snapshot["device_traces"]
    peak_at, left = replay(events)

    # the graph's timeline from liveness alone: storages live at each position, plus optimizer state
    live, storages = plan.live, plan.storages.storages
    scratch = plan.scratch or (0,) * len(live.order)  # what a kernel allocates inside itself, at its node
    graph = [
        plan.optimizer.state_bytes + scratch[live.order[position]]
        + sum(s.nbytes for s in storages if live.start[s.index] <= position <= live.end[s.index])
        for position in range(len(live.order))
    ]
    assert peak_at[: len(graph)] == graph
    # then the optimizer step, phase by phase (each phase here allocates, so each has events)
    assert all(phase.extra_bytes for phase in plan.optimizer.phases)
    assert peak_at == list(plan.timeline.totals)
    assert max(peak_at) == plan.peak_bytes

    # what is held at the end (parameters, batch, gradients, loss, optimizer state) is the segment's active blocks
    held = plan.timeline.totals[len(graph) - 1]
    assert sum(left.values()) == held
    (segment,) = snapshot["segments"]
    active = {b["address"]: b["size"] for b in segment["blocks"] if b["state"] == "active_allocated"}
    assert active == left
    addresses = [b["address"] for b in segment["blocks"]]
    assert addresses == [0, *np.cumsum([b["size"] for b in segment["blocks"]])[:-1]]  # the blocks tile the segment
    assert sum(b["size"] for b in segment["blocks"]) == segment["total_size"]
    assert segment["total_size"] >= plan.peak_bytes  # first fit needs at least the peak, maybe more


def test_frames_name_the_node_and_its_category(plan, snapshot):
    (events,) = snapshot["device_traces"]
    allocs = [e for e in events if e["action"] == "alloc"]
    named = {(e["frames"][0]["filename"], e["frames"][0]["name"]) for e in allocs}
    for s in plan.storages.storages:
        assert (s.category, s.node) in named
    assert ("optimizer_state", "0.weight") in named
    assert ("temporaries", "AdamW.step: 0.weight") in named
    # the page's loader expects a category "unknown" once any event has a "category" (and fails without one)
    assert not any("category" in e for e in events)


def test_pytorchs_memory_viz_helpers_accept_it(snapshot, snapshot_path, capsys):
    (events,) = snapshot["device_traces"]
    # what the page gets: trace_plot's HTML embeds the pickle, base64, as the one local file
    html = memory_viz.trace_plot(snapshot)
    files = json.loads(re.search(r"const local_files = (.*)\n", html).group(1))
    assert [f["name"] for f in files] == ["snapshot.pickle"]
    assert pickle.loads(base64.b64decode(files[0]["base64"])) == snapshot
    assert "Allocator State History" in memory_viz.segment_plot(snapshot)

    # filter_freed pairs each free_requested/free_completed with its alloc: only the held blocks stay
    filtered = memory_viz.trace_plot(copy.deepcopy(snapshot), filter_freed=True)
    assert "free_completed without free_requested" not in capsys.readouterr().out and filtered
    frees = sum(e["action"] == "free_completed" for e in events)
    assert len(memory_viz.filter_alloc_free_pairs(copy.deepcopy(snapshot))["device_traces"][0]) == (
        len(events) - 3 * frees
    )

    (segment,) = snapshot["segments"]
    active = sum(b["size"] for b in segment["blocks"] if b["state"] == "active_allocated")
    assert f"total_allocated: {memory_viz.Bytes(active)}" in memory_viz.segsum(snapshot)  # segsum checks the sums
    assert memory_viz.trace(snapshot).startswith(f"Device 0 ----------------\n{len(events)} entries\n")
    for flame in (memory_viz.memory, memory_viz.segments):
        lines = flame(snapshot, format_flamegraph=lambda text: text).splitlines()
        per_state = defaultdict(int)
        for line in lines:
            stack, nbytes = line.rsplit(" ", 1)
            per_state[stack.split(";")[-2]] += int(nbytes)
        assert per_state["active_allocated"] == active
        assert sum(per_state.values()) == segment["total_size"]

    # written with opcodes the page's own unpickler reads
    with open(snapshot_path, "rb") as file:
        used = {op.name for op, _, _ in pickletools.genops(file.read())}
    assert used <= JS_OPCODES, used - JS_OPCODES


def test_measured_and_predicted_timelines_on_one_plot(plan, model_and_batch, tmp_path):
    import matplotlib.image

    model, batch, optimizer = model_and_batch
    step = steady_step(model, (batch,), optimizer, loss_fn=square_mean)
    measured = memopt.measure_peak(step)
    fractions = measured.timeline_fractions
    # the same samples as the timeline in ns, time rescaled to [0, 1] by the call's length
    assert [live for _, live in fractions] == [live for _, live in measured.timeline]
    assert fractions[0] == (0.0, measured.baseline_bytes)
    at = [f for f, _ in fractions]
    assert at == sorted(at) and 0.0 <= at[-1] <= 1.0
    assert measured.duration_ns >= measured.timeline[-1][0] > 0
    assert max(live for _, live in fractions) == measured.peak_bytes

    # restated from the plan's entry: the process holds other tests' tensors too
    curve = [(f, plan.entry_bytes + live - measured.baseline_bytes) for f, live in fractions]
    with_measured = matplotlib.image.imread(plan.plot(str(tmp_path / "both.png"), measured_timeline=curve))
    alone = matplotlib.image.imread(plan.plot(str(tmp_path / "plan.png")))
    assert with_measured.shape == alone.shape and with_measured.shape[0] > 200
    assert np.std(with_measured[..., :3]) > 0.05  # not blank
    assert not np.array_equal(with_measured, alone)  # the measured curve is drawn
