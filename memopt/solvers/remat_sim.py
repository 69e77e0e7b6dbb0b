"""Keep or recompute, as plain data: the joint graph, the candidates, and a simulation of a choice.

The problem is the joint forward/backward graph as it runs: nodes in order, the
storages they make and read, and candidates (forward results the backward reads
and may recompute). Recomputing a candidate ends its forward life at its last
forward reader and makes a copy right before the first backward node that needs
it (directly, or through another copy); what a copy reads and is not recomputed
is kept until then. ``simulate`` prices a choice in one pass over the graph. No torch.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


INFINITY = float("inf")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A forward result that may be recomputed: the storage and the nodes that would be copied."""

    storage: int
    nodes: tuple[int, ...]  # the node making the storage, then forward nodes whose result lives in it
    # bytes the forward keeps for its recomputation (a random op's generator state), from its first node to its copy
    kept_bytes: int = 0


@dataclass(frozen=True)
class RecomputeProblem:
    """The joint graph as plain data. Positions index ``inputs``/``values``/``node_costs``."""

    backward_start: int  # position of the first backward node
    inputs: tuple[tuple[int, ...], ...]  # per node: the nodes whose results it reads
    values: tuple[tuple[int, ...], ...]  # per node: the storages its result lives in
    node_costs: tuple[float, ...]  # per node: seconds to run it once
    sizes: tuple[int, ...]  # per storage: bytes
    start: tuple[int, ...]  # per storage: the node that makes it; -1 for graph inputs
    end: tuple[int, ...]  # per storage: the last node that reads it (the last node for outputs)
    readers: tuple[tuple[int, ...], ...]  # per storage: nodes that read it, through any alias
    candidates: tuple[Candidate, ...]
    constant_bytes: int = 0  # resident during the whole graph outside the storages (optimizer state)
    floor_bytes: int = 0  # a peak outside the graph no choice changes (the optimizer step)
    node_scratch: tuple[int, ...] = ()  # per node: bytes it allocates and frees inside itself (a copy too)

    def __post_init__(self) -> None:
        n = len(self.inputs)
        if not (len(self.values) == len(self.node_costs) == n):
            raise ValueError("inputs, values and node_costs need one entry per node")
        if not (len(self.start) == len(self.end) == len(self.readers) == len(self.sizes)):
            raise ValueError("sizes, start, end and readers need one entry per storage")
        if not 0 <= self.backward_start <= n:
            raise ValueError("backward_start must be a node position")
        for c in self.candidates:
            if not c.nodes or max(c.nodes) >= self.backward_start or self.start[c.storage] != c.nodes[0]:
                raise ValueError(f"candidate {c} must be made by its first node, in the forward")
        object.__setattr__(self, "users", _users(self.inputs))
        object.__setattr__(self, "makes", _makes(self.start, n))


@dataclass(frozen=True, slots=True)
class Simulation:
    peak_bytes: int
    peak_time: int  # event index: forward nodes, then backward nodes with the copies made before them
    cost_s: float  # seconds of recomputation


@dataclass(frozen=True)
class RecomputeSolution:
    status: str  # "optimal" | "feasible" | "infeasible" ("unknown": an exact search out of time, no plan)
    chosen: tuple[int, ...]  # candidate indices recomputed
    levels: tuple[int, ...]  # per block: the least option that holds what the plan recomputes there
    peak_bytes: int
    cost_s: float
    lower_bound_s: float
    seconds: float
    simulations: int

    @property
    def gap(self) -> float:
        if self.cost_s <= 0:
            return 0.0
        return max(0.0, (self.cost_s - self.lower_bound_s) / self.cost_s)


def simulate(problem: RecomputeProblem, chosen: Collection[int]) -> Simulation:
    """Peak bytes and recompute seconds when the ``chosen`` candidates are recomputed.

    Replays the rewrite: before each backward node, copies of the recomputed
    nodes it reads are made (what a copy reads and is recomputed first, in
    argument order), then the node runs; every event gets its own time.
    """
    replay = _replay(problem, chosen)
    return Simulation(replay.peak_bytes, replay.peak_time, replay.cost_s)


@dataclass(frozen=True, slots=True)
class _Replay:
    """A simulation with its timeline: bytes live at every event, and when each original node runs."""

    peak_bytes: int
    peak_time: int
    cost_s: float
    profile: Any  # numpy int64, per event time
    time_of: list[int]  # per original node: its event time (shared: read only)
    copy_time: dict[int, int]  # per copied node: the event time of its copy


@dataclass(frozen=True)
class _Prepared:
    """Per-problem arrays the replay reads (numpy)."""

    start: Any  # per storage: the making node, -1 for graph inputs
    last_reader: Any  # per storage: the last node reading it, else its maker
    forward_end: Any  # per storage: the last forward node reading it, else its maker
    last_backward: tuple[int, ...]  # per storage: the last backward reader, -1 if none
    copyable_readers: tuple[tuple[int, ...], ...]  # per storage: its forward readers in some candidate
    copyable_users: dict[int, tuple[int, ...]]  # per node in some candidate: its users in some candidate
    to_end: Any  # per storage: lives to the end of the graph (outputs, graph inputs)
    sizes: Any
    identity: list[int]
    identity_times: Any  # the same, numpy, with a 0 appended (index -1: a graph input's maker)
    reads_candidates: tuple[tuple[int, tuple[int, ...]], ...]  # backward nodes reading candidates' nodes


def _prepared(problem: RecomputeProblem) -> _Prepared:
    cached = problem.__dict__.get("_prepared")
    if cached is None:
        bs = problem.backward_start
        readers = problem.readers
        in_candidates = {node for c in problem.candidates for node in c.nodes}
        cached = _Prepared(
            start=np.array(problem.start, dtype=np.int64),
            last_reader=np.array([max(r, default=s) for r, s in zip(readers, problem.start)], dtype=np.int64),
            forward_end=np.array([max((x for x in r if x < bs), default=s) for r, s in zip(readers, problem.start)],
                                 dtype=np.int64),
            last_backward=tuple(max((x for x in r if x >= bs), default=-1) for r in readers),
            copyable_readers=tuple(tuple(x for x in r if x < bs and x in in_candidates) for r in readers),
            copyable_users={node: tuple(u for u in problem.users[node] if u in in_candidates)  # type: ignore
                            for node in in_candidates},
            to_end=np.array(_outputs(problem), dtype=bool),
            sizes=np.array(problem.sizes, dtype=np.float64),
            identity=list(range(len(problem.inputs))),
            identity_times=np.array([*range(len(problem.inputs)), 0], dtype=np.int64),
            reads_candidates=tuple(
                (node, tuple(a for a in problem.inputs[node] if a in in_candidates))
                for node in range(bs, len(problem.inputs))
                if any(a in in_candidates for a in problem.inputs[node])
            ),
        )
        object.__setattr__(problem, "_prepared", cached)
    return cached


def _replay(problem: RecomputeProblem, chosen: Collection[int]) -> _Replay:
    pre = _prepared(problem)
    bs = problem.backward_start
    cands = [problem.candidates[i] for i in chosen]
    recompute = {node for c in cands for node in c.nodes}
    chosen_storages = {c.storage for c in cands}
    makes: dict[int, tuple[int, ...]] = problem.makes  # type: ignore[attr-defined]
    inputs = problem.inputs
    n = len(inputs)
    copy_time: dict[int, int] = {}  # recomputed node -> time of its copy
    if recompute:
        made = 0  # copies so far: node b runs at time b + the copies made before it

        def copy(node: int, before: int) -> None:
            nonlocal made
            for arg in inputs[node]:
                if arg in recompute and arg not in copy_time:
                    copy(arg, before)
            copy_time[node] = before + made
            made += 1

        groups = [0] * (n + 1)  # copies made right before each node
        for node, args in pre.reads_candidates:  # (backward nodes reading no candidate's node copy nothing)
            before = made
            for arg in args:
                if arg in recompute and arg not in copy_time:
                    copy(arg, node)
            groups[node] = made - before
        times = np.arange(n + 1, dtype=np.int64)
        times[bs:n] += np.cumsum(np.array(groups[bs:n], dtype=np.int64))
        times[n] = 0  # (index -1, a graph input's maker: time 0)
        time_of = times[:n].tolist()
        clock = n + made
    else:
        time_of, clock = pre.identity, n
        times = pre.identity_times
    horizon = clock + 1
    start = times[pre.start]
    # time_of grows with position, so a storage's last reader is also its last to run
    end = np.where(pre.to_end, horizon, times[pre.last_reader])
    if chosen_storages:  # the forward one dies at its last forward reader
        index = np.fromiter(chosen_storages, dtype=np.int64, count=len(chosen_storages))
        end[index] = pre.forward_end[index]
    extra_start: list[int] = []
    extra_end: list[int] = []
    extra_size: list[int] = []
    kept_until: dict[int, int] = {}
    for node, at in copy_time.items():
        # the copy's results: all live while the copy's own getitems read it; the chosen ones until the
        # backward is done with them
        held = max((copy_time[u] for u in pre.copyable_users[node] if u in copy_time), default=at)
        for storage in makes.get(node, ()):
            last = held
            if storage in chosen_storages:
                if pre.last_backward[storage] >= 0:
                    last = max(last, time_of[pre.last_backward[storage]])
                for r in pre.copyable_readers[storage]:
                    if r in copy_time and copy_time[r] > last:
                        last = copy_time[r]
            extra_start.append(at)
            extra_end.append(last)
            extra_size.append(problem.sizes[storage])
        for arg in inputs[node]:  # a kept input lives until the copy reads it
            if arg not in recompute:
                for storage in problem.values[arg]:
                    if kept_until.get(storage, -1) < at:
                        kept_until[storage] = at
    for c in cands:  # what a recomputation keeps from the forward (a generator state) lives until its copy runs
        copied = [copy_time[node] for node in c.nodes if node in copy_time]
        if c.kept_bytes and copied:
            extra_start.append(time_of[c.nodes[0]])
            extra_end.append(max(copied))
            extra_size.append(c.kept_bytes)
    if kept_until:
        index = np.fromiter(kept_until, dtype=np.int64, count=len(kept_until))
        end[index] = np.maximum(end[index], np.fromiter(kept_until.values(), dtype=np.int64, count=len(index)))
    sizes = pre.sizes
    if extra_start:
        start = np.concatenate([start, np.array(extra_start, dtype=np.int64)])
        end = np.concatenate([end, np.array(extra_end, dtype=np.int64)])
        sizes = np.concatenate([sizes, np.array(extra_size, dtype=np.float64)])
    # (sums of whole numbers below 2**53 are exact in float64)
    delta = np.bincount(start, weights=sizes, minlength=horizon + 2)
    delta -= np.bincount(np.minimum(end, horizon) + 1, weights=sizes, minlength=horizon + 2)
    profile = np.rint(np.cumsum(delta[:horizon + 1])).astype(np.int64) + problem.constant_bytes
    if problem.node_scratch:  # workspace at the op that allocates it, and at its copy
        scratch = np.asarray(problem.node_scratch, dtype=np.int64)
        np.add.at(profile, np.asarray(time_of, dtype=np.int64), scratch)
        for node, at in copy_time.items():
            profile[at] += scratch[node]
    peak_time = int(profile.argmax())
    peak = int(profile[peak_time])
    cost = sum(problem.node_costs[node] for node in copy_time)
    return _Replay(max(peak, problem.floor_bytes), peak_time, cost, profile, time_of, copy_time)


def _users(inputs: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    users: list[list[int]] = [[] for _ in inputs]
    for node, args in enumerate(inputs):
        for arg in args:
            users[arg].append(node)
    return tuple(tuple(u) for u in users)


def _outputs(problem: RecomputeProblem) -> list[bool]:
    """Storages live to the end of the graph: outputs, and graph inputs."""
    last = len(problem.inputs) - 1
    return [s < 0 or e >= last for s, e in zip(problem.start, problem.end)]


def _makes(start: Sequence[int], n: int) -> dict[int, tuple[int, ...]]:
    makes: dict[int, list[int]] = {}
    for storage, node in enumerate(start):
        if node >= 0:
            makes.setdefault(node, []).append(storage)
    return {node: tuple(storages) for node, storages in makes.items()}
