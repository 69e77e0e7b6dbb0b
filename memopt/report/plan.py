"""MemoryPlan: what a training step holds, where it peaks, what memopt decided, as data and as text."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from memopt.budget import format_bytes
from memopt.capture import CapturedStep
from memopt.device import DeviceSpec
from memopt.passes.arena_plan import ArenaPlan
from memopt.passes.bounds import LowerBound
from memopt.passes.liveness import Liveness, MemoryTimeline
from memopt.passes.optimizer_memory import OptimizerMemory
from memopt.passes.sharding import Sharding
from memopt.passes.storage import (
    ACTIVATIONS,
    BUFFERS,
    CATEGORIES,
    GRADIENTS,
    INPUTS,
    OFFLOADED,
    OPTIMIZER_STATE,
    PARAMETERS,
    StorageTable,
)
from memopt.solvers.order import OrderSolution

LEDGER_KEYS = (*CATEGORIES, OFFLOADED)


@dataclass(frozen=True, slots=True)
class Decision:
    """What was done with one tensor that crosses from forward to backward, and why."""

    name: str
    bytes: int
    # "keep" | "recompute" | "replay" (recomputed from the generator state saved for it) | "offload" | "pack" (to
    # int8 or fp8 between forward and backward: approximate, compress=)
    action: str
    cost_s: float
    reason: str

    @property
    def recomputed(self) -> bool:
        """Made again in the backward: recomputed, or a random op replayed."""
        return self.action in ("recompute", "replay")


@dataclass(frozen=True, slots=True)
class ChunkedHead:
    """A loss head (linear, log-softmax, NLL) that runs over slices of the tokens, and why."""

    loss: str  # the traced nll_loss_forward it replaces
    rows: int  # tokens
    vocab: int
    chunks: int
    logits_bytes: int  # one whole (tokens x vocabulary) tensor: none exists in the chunked step
    chunk_bytes: int  # one slice's (the fused kernel's: its 8 bytes per token)
    cost_s: float  # the backward computes the head's logits again, slice by slice (0 with gradients_in_forward)
    reason: str
    kernel: str = ""  # the fused kernel that runs the head instead (no logits in the graph), if one does
    gradients_in_forward: bool = False  # the forward takes each slice's gradients: the logits are computed once


@dataclass(frozen=True, slots=True)
class CompressedTensor:
    """A saved activation packed between its last forward use and its first backward use: approximate."""

    node: str  # the node that makes it
    nbytes: int  # its bytes
    packed_bytes: int  # the payload and scales kept instead
    format: str  # "int8" | "fp8"
    seconds: float  # packing and unpacking, on the plan's device
    max_abs_error: float | None = None  # on the first step (None: not measured, a plan from shapes alone)
    max_rel_error: float | None = None  # largest |error| / largest |value|


@dataclass(frozen=True, slots=True)
class ChunkedMLP:
    """A feed-forward block (up projections, activation, down projection) that runs over slices of the tokens."""

    down: str  # the traced down projection whose rows are joined
    rows: int  # tokens
    width: int  # elements per token of its widest tensor
    chunks: int
    wide_bytes: int  # one whole (tokens x width) tensor: the block's forward and backward make them a slice at a time
    chunk_bytes: int  # one slice's
    reason: str


@dataclass(frozen=True, slots=True)
class TensorUpdate:
    """What a sparse update does with one parameter tensor."""

    name: str
    option: str  # "whole" | "rows" (its first ``rows`` rows) | "frozen" | "frozen by the user"
    score: float  # its contribution (``UpdatePlan.proxy``), from the calibration batches
    nbytes: int  # what updating it adds to the step: gradient, optimizer state, the activation its gradient reads
    rows: int = 0  # option "rows": how many of the tensor's first rows (output channels) are trained

    @property
    def label(self) -> str:
        return f"rows [:{self.rows}]" if self.option == "rows" else self.option


@dataclass(frozen=True)
class UpdatePlan:
    """A sparse update: which tensors train, chosen under the budget by their contribution, and what the
    backward no longer computes."""

    proxy: str  # how a tensor's contribution is scored
    tensors: tuple[TensorUpdate, ...]
    score: float  # of the tensors updated
    bound: float  # no choice within the same capacity scores more
    status: str  # the knapsack's: "optimal" | "feasible"
    capacity_bytes: int  # gradient and optimizer-state bytes the choice was allowed at its depth
    rounds: int  # choices planned until one fit
    backward_nodes: int  # the pruned step's backward
    full_backward_nodes: int  # the backward when every trainable tensor is updated

    @property
    def updated(self) -> tuple[TensorUpdate, ...]:
        return tuple(t for t in self.tensors if t.option in ("whole", "rows"))

    @property
    def gap(self) -> float:
        return 0.0 if self.bound <= 0 else max(0.0, (self.bound - self.score) / self.bound)

    def summary(self) -> str:
        updated = self.updated
        frozen = len(self.tensors) - len(updated)
        sliced = sum(t.option == "rows" for t in updated)
        return (f"sparse update: {len(updated)} of {len(self.tensors)} parameter tensors trained "
                f"{f'({sliced} of them on their first rows only) ' if sliced else ''}"
                f"({format_bytes(sum(t.nbytes for t in updated))} of gradients and optimizer state), {frozen} "
                f"frozen; score {self.score:.4g} of at most {self.bound:.4g} ({self.status}, {self.proxy}); "
                f"backward {self.full_backward_nodes} -> {self.backward_nodes} nodes")


@dataclass(frozen=True, slots=True)
class SolverReport:
    name: str
    status: str  # "optimal" | "feasible" | "infeasible" | "not-run"
    objective: float | None
    lower_bound: float | None
    gap: float | None
    seconds: float


@dataclass(frozen=True, slots=True)
class PassRecord:
    """One pass of the pipeline: how long it took, whether it changed the step, the peak around it."""

    name: str
    seconds: float
    changed: bool
    peak_before: int | None
    peak_after: int | None


@dataclass(frozen=True, slots=True)
class OffloadSummary:
    """What goes to host memory and back in one step, and what it is predicted to cost."""

    tensors: int
    bytes_to_host: int
    bytes_to_device: int
    host_peak_bytes: int  # the host pool, preallocated: one slot per offloaded tensor
    predicted_stall_s: float  # transfer time the compute cannot hide, on the plan's device
    recompute_s: float  # recomputation the plan still runs
    host_timeline: tuple[int, ...] = ()  # per timeline step: host bytes in use (slots between offload and reload)
    status: str = "feasible"


@dataclass(frozen=True, slots=True)
class CompileAttempt:
    """One Inductor compile of a plan, tried to keep the compiled step under the budget."""

    target_bytes: int  # the budget the plan was made for
    options: dict[str, Any]  # Inductor options on top of memopt's defaults
    forward_peak_bytes: int  # the code's peaks, read from its wrapper
    backward_peak_bytes: int
    predicted_peak_bytes: int  # the step's: the larger of both and the optimizer step's
    seconds: float
    chosen: bool = False  # the step that runs
    modelled_seconds: float | None = None  # the plan's step by the cost model: what decides between codes that fit
    sliced: str = ""  # the regions the plan runs over slices of the tokens ("" : none)


@dataclass(frozen=True, slots=True)
class Measured:
    peak_bytes: int
    error: float  # (predicted - measured) / measured


class Report(str):
    """Text that shows as itself in a REPL (``plan.explain()``) and prints as itself."""

    def __repr__(self) -> str:
        return str(self)


@dataclass(frozen=True)
class MemoryPlan:
    """The memory plan of one training step (forward, backward, optimizer step).

    ``print(plan)`` shows the ledger at the peak; ``plan.explain()`` the tensors
    and passes behind it; ``plan.to_json()`` the stable machine-readable form.
    """

    device: DeviceSpec
    budget_bytes: int | None
    timeline: MemoryTimeline
    storages: StorageTable
    live: Liveness
    optimizer: OptimizerMemory
    minimum: LowerBound
    decisions: tuple[Decision, ...]
    solver: SolverReport
    history: tuple[PassRecord, ...]
    fake: bool
    graph_nodes: int
    order: OrderSolution | None = None  # the peak-lowering order the order pass found
    arena: ArenaPlan | None = None  # offsets in one arena (layout=True)
    measured: Measured | None = None
    eager_peak_bytes: int | None = None  # the step's peak before recomputation (None: not planned)
    scratch: tuple[int, ...] = ()  # per graph node: workspace its kernel allocates and frees inside (measured)
    offload: OffloadSummary | None = None  # host offload (offload=True and a budget)
    compiled_peak_bytes: int | None = None  # Inductor's code for the step, read from its wrapper (what runs)
    compiles: tuple[CompileAttempt, ...] = ()  # the Inductor compiles tried for it, in order
    # the step's time by the cost model: each op of the planned step once, plus what the plan recomputes (and
    # the offload's stalls); what ``fit`` compares plans whose code meets the budget by
    modelled_seconds: float | None = None
    chunked: tuple[ChunkedHead, ...] = ()  # loss heads run over slices of the tokens
    chunked_mlp: tuple[ChunkedMLP, ...] = ()  # feed-forward blocks run over slices of the tokens
    compressed: tuple[CompressedTensor, ...] = ()  # saved activations packed to int8 or fp8 (compress=): approximate
    stepped: tuple[str, ...] = ()  # parameters the optimizer updates inside the backward (step_in_backward)
    update: UpdatePlan | None = None  # the sparse update the step trains (update="sparse")
    sharding: Sharding | None = None  # FSDP2's units and world size: the figures are one rank's (world_size=)
    checkpointed: tuple[str, ...] = ()  # blocks run under torch's checkpoint (solver="checkpoint"), by module path
    # of those, the ones checkpointed selectively: the ops with FLOPs of the block's forward, in order, each with
    # whether the checkpoint keeps its result (memopt.passes.remat_plan.saved_by_policy); the others recompute whole
    selective: dict[str, tuple[tuple[str, bool], ...]] = dataclasses.field(default_factory=dict)
    program: CapturedStep | None = dataclasses.field(default=None, compare=False, repr=False)  # what runs

    # -- the numbers --------------------------------------------------------
    @property
    def peak_bytes(self) -> int:
        """Predicted peak of live device bytes during the step."""
        return self.timeline.peak_bytes

    @property
    def peak(self) -> int:
        return self.peak_bytes

    @property
    def choices(self) -> tuple[tuple[str, str], ...]:
        """What the plan does not keep, (name, action) each, and the regions it runs over slices of the tokens:
        two plans with equal choices make the same programs."""
        sliced = tuple((head.loss, f"{head.kernel or 'chunked'} x{head.chunks}") for head in self.chunked)
        sliced += tuple((mlp.down, f"chunked x{mlp.chunks}") for mlp in self.chunked_mlp)
        return tuple((d.name, d.action) for d in self.decisions if d.action != "keep") + sliced

    @property
    def sliced(self) -> str:
        """The regions run over slices of the tokens, in words ("" : none)."""
        heads = [f"loss head x{head.chunks}" if not head.kernel else f"loss head: {head.kernel}"
                 for head in self.chunked]
        mlps = Counter(mlp.chunks for mlp in self.chunked_mlp)
        return ", ".join([*heads, *(f"{count} MLP{'s' if count > 1 else ''} x{k}" for k, count in mlps.items())])

    @property
    def peak_node(self) -> str:
        return self.timeline.peak_label

    @property
    def ledger(self) -> dict[str, int]:
        """Bytes per category at the peak; the device categories sum to the peak.

        ``offloaded`` is host memory in use at the peak (not device bytes, not part of the peak).
        """
        at_peak = self.timeline.ledger_at(self.timeline.peak_index)
        ledger = {key: at_peak.get(key, 0) for key in LEDGER_KEYS}
        if self.offload is not None and self.offload.host_timeline:
            ledger[OFFLOADED] = self.offload.host_timeline[self.timeline.peak_index]
        return ledger

    @property
    def static_ledger(self) -> dict[str, int]:
        """What a step holds whatever is recomputed: parameters, buffers, all gradients, optimizer state."""
        # sharded (FSDP2), a gradient is held whole only until its unit's reduce-scatter: its shard stays
        gradients = (self.storages.bytes_of(GRADIENTS) if self.sharding is None else
                     sum(s.nbytes for s in self.storages.by_category(GRADIENTS) if s.is_output))
        return {
            PARAMETERS: self.storages.bytes_of(PARAMETERS),
            BUFFERS: self.storages.bytes_of(BUFFERS),
            GRADIENTS: gradients,
            OPTIMIZER_STATE: self.optimizer.state_bytes,
        }

    @property
    def entry_bytes(self) -> int:
        """Live bytes as the step starts: parameters, buffers, the batch and optimizer state."""
        return sum(self.timeline.by_category[c][0] for c in (PARAMETERS, BUFFERS, INPUTS, OPTIMIZER_STATE))

    @property
    def phase_peaks(self) -> tuple[int, int]:
        """The predicted peaks of the forward (to the loss) and of the backward."""
        timeline = self.timeline
        return tuple(max((t for t, phase in zip(timeline.totals, timeline.phases) if phase == name), default=0)
                     for name in ("forward", "backward"))  # type: ignore[return-value]

    @property
    def optimizer_peak_bytes(self) -> int:
        """The predicted peak after the backward: the optimizer step's (0 with no optimizer step)."""
        timeline = self.timeline
        return max((t for t, phase in zip(timeline.totals, timeline.phases) if phase == "optimizer"), default=0)

    @property
    def fits(self) -> bool | None:
        """The step that runs peaks within the budget: Inductor's code when compiled, else the plan's graph."""
        peak = self.peak_bytes if self.compiled_peak_bytes is None else self.compiled_peak_bytes
        return None if self.budget_bytes is None else peak <= self.budget_bytes

    def with_measurement(self, measured_peak_bytes: int) -> MemoryPlan:
        """This plan with a measured peak attached (for the JSON, the text and the plot)."""
        error = (self.peak_bytes - measured_peak_bytes) / measured_peak_bytes
        return dataclasses.replace(self, measured=Measured(measured_peak_bytes, error))

    # -- as data --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "budget_bytes": self.budget_bytes,
            "peak_bytes": self.peak_bytes,
            "compiled_peak_bytes": self.compiled_peak_bytes,
            "device": self.device.name,
            "ledger": self.ledger,
            "peak_node": self.peak_node,
            "static": self.static_ledger,
            "minimum_budget": {"bytes": self.minimum.bytes, "where": self.minimum.where, "why": self.minimum.why},
            "optimizer": {
                "name": self.optimizer.name,
                "implementation": self.optimizer.implementation,
                "state_bytes": self.optimizer.state_bytes,
                "step_peak_extra_bytes": self.optimizer.step_peak_extra,
                "in_backward": list(self.stepped),
            },
            "decisions": [dataclasses.asdict(d) for d in self.decisions],
            "solver": dataclasses.asdict(self.solver),
            "passes": [dataclasses.asdict(p) for p in self.history],
            "eager_peak_bytes": self.eager_peak_bytes,
            "fake": self.fake,
            "graph_nodes": self.graph_nodes,
        }
        if self.order is not None:
            data["order"] = self._order_dict()
        if self.arena is not None:
            data["layout"] = self._layout_dict()
        if self.measured is not None:
            data["measured"] = dataclasses.asdict(self.measured)
        if self.offload is not None:
            data["offload"] = self._offload_dict()
        if self.compiles:
            data["compiles"] = [dataclasses.asdict(c) for c in self.compiles]
        data["chunked"] = [dataclasses.asdict(c) for c in self.chunked]
        data["compressed"] = [dataclasses.asdict(c) for c in self.compressed]
        # the design's key: per chunked region, its kind, its ops and the number of chunks
        data["chunked_mlp"] = [dataclasses.asdict(c) for c in self.chunked_mlp]
        data["chunks"] = [{"region": "loss head", "ops": [c.loss], "chunks": c.chunks, "kernel": c.kernel}
                          for c in self.chunked]
        data["chunks"] += [{"region": "mlp", "ops": [c.down], "chunks": c.chunks} for c in self.chunked_mlp]
        if self.sharding is not None:
            data["sharding"] = self.sharding.describe()
        data["checkpointed"] = list(self.checkpointed)
        data["selective"] = {path: [list(op) for op in ops] for path, ops in self.selective.items()}
        if self.update is not None:
            data["update"] = {**{key: value for key, value in dataclasses.asdict(self.update).items()
                                 if key != "tensors"},
                              "gap": self.update.gap,
                              "tensors": [dataclasses.asdict(t) for t in self.update.tensors]}
        return data

    def _offload_dict(self) -> dict[str, Any]:
        offload = self.offload
        assert offload is not None
        return {
            "tensors": offload.tensors,
            "bytes_to_host": offload.bytes_to_host,
            "bytes_to_device": offload.bytes_to_device,
            "host_peak_bytes": offload.host_peak_bytes,
            "predicted_stall_s": offload.predicted_stall_s,
            "recompute_s": offload.recompute_s,
            "status": offload.status,
        }

    def _order_dict(self) -> dict[str, Any]:
        order = self.order
        assert order is not None
        # the solver counts the graph (forward and backward); optimizer state is live throughout
        return {
            "changed": order.changed,
            "peak_before_bytes": order.peak_before + self.optimizer.state_bytes,
            "peak_after_bytes": order.peak_after + self.optimizer.state_bytes,
            "lower_bound_bytes": order.lower_bound + self.optimizer.state_bytes,
            "scope": "forward and backward graph",
            "method": order.method,
            "status": order.status,
            "seconds": order.seconds,
        }

    def _layout_dict(self) -> dict[str, Any]:
        arena = self.arena
        assert arena is not None
        solution = arena.solution
        return {
            "arena_bytes": solution.arena_bytes,
            "lower_bound_bytes": solution.lower_bound_bytes,
            "fragmentation": solution.fragmentation,
            "planned": len(arena.planned_storages),
            "unplanned": dict(arena.unplanned),
            "unplanned_peak_bytes": arena.unplanned_peak_bytes,
            "method": solution.method,
            "status": solution.status,
            "seconds": solution.seconds,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    # -- as text ---------------------------------------------------------------
    def __str__(self) -> str:
        lines = [f"memopt plan for {self.device.name}: {self.graph_nodes} graph nodes"
                 f"{' (planned from shapes only)' if self.fake else ''}"]
        budget = "none" if self.budget_bytes is None else _both(self.budget_bytes)
        lines.append(f"budget: {budget}")
        lines.append(f"predicted peak: {_both(self.peak_bytes)} at {self.peak_node}")
        if self.sharding is not None:
            units = len(self.sharding.units) - 1
            lines.append(f"per rank of {self.sharding.world_size} (FSDP2: {units} unit{'s' * (units != 1)} and the "
                         "root; 'gathered' is what the engine gathers and reduces)")
        if self.compiled_peak_bytes is not None:
            lines.append(f"Inductor's code: {_both(self.compiled_peak_bytes)} (the step that runs; fused kernels "
                         "skip intermediates the graph above counts)")
        if self.measured is not None:
            lines.append(f"measured peak:  {_both(self.measured.peak_bytes)} "
                         f"(prediction off by {self.measured.error:+.2%})")
        lines.append("")
        lines.append(f"{'category':<18}{'bytes':>16}{'GiB':>10}{'share':>8}")
        for key, value in self.ledger.items():
            share = value / self.peak_bytes if self.peak_bytes else 0.0
            lines.append(f"{key:<18}{value:>16,}{value / 2**30:>10.3f}{share:>8.1%}")
        lines.append(f"{'total':<18}{self.peak_bytes:>16,}{self.peak_bytes / 2**30:>10.3f}"
                     f"{'  (offloaded: host side, not in the total)' if self.ledger[OFFLOADED] else ''}")
        lines.append("")
        lines.append(f"optimizer: {self.optimizer.name} ({self.optimizer.implementation}), state "
                     f"{format_bytes(self.optimizer.state_bytes)}, step temporaries up to "
                     f"{format_bytes(self.optimizer.step_peak_extra)}"
                     + (f"; {len(self.stepped)} parameters updated inside the backward, each as soon as its gradient "
                        f"is final (step_in_backward)" if self.stepped else ""))
        lines.append(f"smallest budget any recompute plan can meet: {format_bytes(self.minimum.bytes)} "
                     f"(at {self.minimum.where})")
        if self.update is not None:
            lines.append(self.update.summary())
        if self.compressed:
            kept = sum(c.packed_bytes for c in self.compressed)
            lines.append(f"approximate: {len(self.compressed)} saved activations packed to "
                         f"{self.compressed[0].format} between forward and backward "
                         f"({format_bytes(sum(c.nbytes for c in self.compressed))} -> {format_bytes(kept)}, "
                         f"compress=)")
        if self.order is not None:
            order = self._order_dict()
            lines.append(f"order: {'changed' if order['changed'] else 'unchanged'} ({order['method']}), graph peak "
                         f"{format_bytes(order['peak_before_bytes'])} -> {format_bytes(order['peak_after_bytes'])}")
        if self.arena is not None:
            layout = self._layout_dict()
            lines.append(f"arena: {format_bytes(layout['arena_bytes'])} for {layout['planned']} tensors, lower bound "
                         f"{format_bytes(layout['lower_bound_bytes'])}, fragmentation {layout['fragmentation']:.2%}; "
                         f"{len(layout['unplanned'])} ops allocate outside it (no out= overload)")
        lines.extend(f"loss head {c.loss}: {c.kernel}, logits {format_bytes(c.logits_bytes)} -> "
                     f"{format_bytes(c.chunk_bytes)} (the log-sum-exp per token), computed again in the backward "
                     f"(about {c.cost_s:.3g} s on {self.device.name})" if c.kernel else
                     f"loss head {c.loss}: {c.chunks} chunks of {math.ceil(c.rows / c.chunks)} of its {c.rows} "
                     f"tokens, logits {format_bytes(c.logits_bytes)} -> {format_bytes(c.chunk_bytes)} at a time, "
                     + ("computed once: the forward takes each chunk's gradients" if c.gradients_in_forward else
                        f"computed again in the backward (about {c.cost_s:.3g} s on {self.device.name})")
                     for c in self.chunked)
        if self.chunked_mlp:
            c = self.chunked_mlp[0]
            lines.append(f"{len(self.chunked_mlp)} MLP blocks: {c.chunks} chunks of {math.ceil(c.rows / c.chunks)} of "
                         f"their {c.rows} tokens, (tokens x {c.width}) tensors {format_bytes(c.wide_bytes)} -> "
                         f"{format_bytes(c.chunk_bytes)} at a time")
        if self.offload is not None:
            o = self.offload
            lines.append(f"offload: {o.tensors} tensors, {format_bytes(o.bytes_to_host)} to host and "
                         f"{format_bytes(o.bytes_to_device)} back per step, "
                         f"host pool {format_bytes(o.host_peak_bytes)}, "
                         f"predicted stall {o.predicted_stall_s:.3g} s on {self.device.name}")
        lines.append(self._verdict())
        return "\n".join(lines)

    def _verdict(self) -> str:
        if self.budget_bytes is None:
            return "no budget: this describes the eager step"
        spare = format_bytes(self.budget_bytes - self.peak_bytes)
        recomputed = [d for d in self.decisions if d.recomputed]
        offloaded = [d for d in self.decisions if d.action == "offload"]
        if offloaded:
            return (f"offload {len(offloaded)} and recompute {len(recomputed)} of {len(self.decisions)} activations "
                    f"(about {self.solver.objective or 0.0:.3g} s of recompute and stall on {self.device.name}): "
                    f"eager peak {format_bytes(self.eager_peak_bytes or 0)} -> {format_bytes(self.peak_bytes)}, "
                    f"{spare} to spare ({self.solver.name}: {self.solver.status})")
        packed = [d for d in self.decisions if d.action == "pack"]
        packing = (f"pack {len(packed)} of {len(self.decisions)} activations to {self.compressed[0].format} "
                   f"(approximate; about {sum(d.cost_s for d in packed):.3g} s of packing on {self.device.name})"
                   if packed else "")
        if not recomputed:
            if packed:
                return (f"{packing}: eager peak {format_bytes(self.eager_peak_bytes or 0)} -> "
                        f"{format_bytes(self.peak_bytes)}, {spare} to spare")
            return f"the eager step fits the budget with {spare} to spare"
        solver = self.solver
        gap = "" if solver.gap is None else f", gap to the lower bound {solver.gap:.1%}"
        replayed = sum(d.action == "replay" for d in recomputed)
        whole = [path for path in self.checkpointed if path not in self.selective]
        blocks = "".join(f"blocks run under torch.utils.checkpoint{how}: {', '.join(paths)}; "
                         for how, paths in ((" whole", whole), (" keeping what the backward reads of their matmuls",
                                                                list(self.selective))) if paths)
        return (blocks + (f"{packing}; " if packing else "")
                + f"recompute {len(recomputed)} of {len(self.decisions)} activations "
                f"({format_bytes(sum(d.bytes for d in recomputed))}, "
                + (f"{replayed} of them replayed from the generator state, " if replayed else "")
                + f"about {solver.objective or 0.0:.3g} s on {self.device.name}): "
                f"eager peak {format_bytes(self.eager_peak_bytes or 0)} -> {format_bytes(self.peak_bytes)}, "
                f"{spare} to spare ({solver.name}: {solver.status}{gap})")

    def explain(self, top: int = 15) -> Report:
        """The largest tensors behind the peak, the optimizer's part, and the passes that ran."""
        names = self.storages.node_names
        peak = self.timeline.peak_index
        lines = [str(self), "", f"largest storages live at the peak ({self.peak_node}):"]
        live = [s for s in self.storages.storages if _live_at(self, s.index, peak)]
        live.sort(key=lambda s: -s.nbytes)
        lines.append(f"  {'storage made by':<36} {'category':<16}{'bytes':>14}  lifetime")
        for s in live[:top]:
            span = "whole step" if s.defined_at < 0 else f"{names[s.defined_at]} -> {names[s.last_use]}"
            lines.append(f"  {s.node:<36} {s.category:<16}{s.nbytes:>14,}  {span}")
        if len(live) > top:
            rest = sum(s.nbytes for s in live[top:])
            lines.append(f"  ... {len(live) - top} more, {rest:,} bytes")
        saved = self.storages.bytes_of(ACTIVATIONS)
        lines.append(f"\nsaved for backward over the whole step: {format_bytes(saved)} in "
                     f"{sum(1 for _ in self.storages.by_category(ACTIVATIONS))} storages")
        if self.arena is not None and self.arena.unplanned:
            lines.append("\nallocations outside the arena:")
            unplanned = sorted(self.arena.unplanned.items(), key=lambda item: -item[1])
            lines.extend(f"  {name:<52}{nbytes:>14,}" for name, nbytes in unplanned[:top])
        if self.chunked:
            lines.append("\nchunked loss heads:")
            lines.extend(f"  {c.loss:<36}{'kernel' if c.kernel else f'{c.chunks:>4} chunks'}  {c.reason}"
                         for c in self.chunked)
        if self.chunked_mlp:
            lines.append("\nchunked MLP blocks (by their down projection):")
            lines.extend(f"  {c.down:<36}{c.chunks:>4} chunks  {c.reason}" for c in self.chunked_mlp)
        if self.update is not None:
            lines.append(f"\nsparse update ({self.update.proxy}):")
            lines.append(f"  {'parameter':<44}{'update':<20}{'score':>12}{'bytes':>14}")
            lines.extend(f"  {t.name:<44}{t.label:<20}{t.score:>12.4g}{t.nbytes:>14,}" for t in self.update.tensors)
        if self.compressed:
            lines.append("\ncompressed saved activations (approximate; error on the first step):")
            lines.append(f"  {'node':<36}{'bytes':>12}{'kept':>12}{'max |error|':>14}{'relative':>10}")
            lines.extend(f"  {c.node:<36}{c.nbytes:>12,}{c.packed_bytes:>12,}"
                         f"{'-' if c.max_abs_error is None else f'{c.max_abs_error:.3g}':>14}"
                         f"{'-' if c.max_rel_error is None else f'{c.max_rel_error:.3g}':>10}"
                         for c in self.compressed)
        if self.decisions:
            lines.append("\ndecisions:")
            lines.extend(f"  {d.action:<10}{d.name:<36}{d.bytes:>14,}  {d.reason}" for d in self.decisions)
        if self.compiles:
            lines.append("\nInductor compiles (plan made for, options, the code's peak, the step by the cost model, "
                         "what it slices):")
            lines.extend(f"  {format_bytes(c.target_bytes):>12}  {str(c.options or 'defaults'):<60}"
                         f"{format_bytes(c.predicted_peak_bytes):>12}"
                         f"{'' if c.modelled_seconds is None else f'{c.modelled_seconds:.4g} s':>12}"
                         f"  {c.sliced or 'nothing'}{'  runs' if c.chosen else ''}"
                         for c in self.compiles)
        lines.append("\npasses:")
        for record in self.history:
            peaks = ("" if record.peak_before is None else
                     f"  peak {format_bytes(record.peak_before)} -> {format_bytes(record.peak_after)}")
            lines.append(f"  {record.name:<20}{record.seconds * 1000:>9.1f} ms{peaks}"
                         f"{'  changed' if record.changed else ''}")
        return Report("\n".join(lines))

    def plot(self, path: str, *, measured_timeline: list[tuple[float, int]] | None = None) -> str:
        """A PNG of the predicted timeline, categories stacked, budget and peak marked."""
        from memopt.report.plot import plot_plan

        return plot_plan(self, path, measured_timeline=measured_timeline)

    def to_memory_viz(self, path: str) -> str:
        """A pickled snapshot of the predicted step that PyTorch's memory_viz page opens."""
        from memopt.report.memory_viz import to_memory_viz

        return to_memory_viz(self, path)


def _live_at(plan: MemoryPlan, storage: int, position: int) -> bool:
    if position >= len(plan.live.order):  # the optimizer step: graph inputs and what the graph returned
        s = plan.storages.storages[storage]
        return s.defined_at < 0 or s.is_output
    return plan.live.start[storage] <= position <= plan.live.end[storage]


def _both(nbytes: int) -> str:
    return f"{nbytes:,} bytes ({nbytes / 2**30:.3f} GiB)"
