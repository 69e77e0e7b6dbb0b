"""The default passes, in order. One function, read top to bottom."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from memopt.budget import budget_for_peak, format_bytes, planned_part
from memopt.capture import CapturedStep
from memopt.config import PlanConfig
from memopt.device import DeviceSpec
from memopt.errors import BudgetInfeasibleError, MemoptWarning
from memopt.lower.kernels import LSE_BYTES_PER_TOKEN, kernel_scratch
from memopt.passes.arena_plan import arena_step
from memopt.passes.bounds import LowerBound, minimum_budget
from memopt.passes.chunk_loss import (
    LossHead,
    chunk_step,
    find_loss_heads,
    fuse_step,
    fused_heads,
    logits_seconds,
)
from memopt.passes.chunk_mlp import MLPRegion, chunk_mlp_step, find_mlp_regions
from memopt.passes.compress_plan import needed_packs, packable, packs_in
from memopt.passes.costs import graph_seconds, node_seconds
from memopt.passes.liveness import Liveness, MemoryTimeline, liveness, memory_timeline
from memopt.passes.offload import apply_compress, apply_offload
from memopt.passes.offload_plan import OffloadPlan, plan_offload
from memopt.passes.optimizer_memory import OptimizerMemory, ParamInfo, optimizer_memory
from memopt.passes.order_plan import plan_order
from memopt.passes.recompute import RECOMPUTE_OF, apply_recompute
from memopt.passes.remat_plan import CHEAP, RecomputePlan, plan_recompute, saved_by_policy
from memopt.passes.scratch import ScratchModel, measure_scratch
from memopt.passes.sharding import shard_table
from memopt.passes.step_in_backward import (
    sink_steps,
    step_temporaries,
    steps_in_backward,
)
from memopt.passes.storage import StorageTable, storage_table
from memopt.report.plan import (
    ChunkedHead,
    ChunkedMLP,
    CompressedTensor,
    Decision,
    MemoryPlan,
    OffloadSummary,
    PassRecord,
    SolverReport,
)

T = TypeVar("T")
_OFFLOAD, _RELOAD = torch.ops.memopt.offload.default, torch.ops.memopt.reload.default
_log = logging.getLogger(__name__)


class _History:
    """Times each pass and keeps the record that ``plan.explain()`` prints."""

    def __init__(self) -> None:
        self.records: list[PassRecord] = []

    def run(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # progress for whoever listens (the CLI's memopt.progress): a record as a pass starts, and one as it
        # ends, at INFO when it took a second or more
        _log.debug("pass %s started", name, extra={"memopt_pass": name, "memopt_seconds": None})
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - started
        _log.log(logging.INFO if seconds >= 1.0 else logging.DEBUG, "pass %s took %.1f s", name, seconds,
                 extra={"memopt_pass": name, "memopt_seconds": seconds})
        self.records.append(PassRecord(name, seconds, False, None, None))
        return result

    def peaks(self, name: str, before: int, after: int, changed: bool = True) -> None:
        """The last ``name`` pass's effect: the step's predicted peak before and after it, whether it changed
        the step (a rewrite's peak after is read from the timeline that follows it)."""
        index = max(i for i, record in enumerate(self.records) if record.name == name)
        self.records[index] = dataclasses.replace(self.records[index], changed=changed, peak_before=before,
                                                  peak_after=after)


def run_pipeline(
    step: CapturedStep,
    *,
    params: list[ParamInfo],
    optimizer: Any,
    groups_of: dict[str, int] | None,
    device: DeviceSpec,
    budget_bytes: int | None,
    config: PlanConfig,
) -> MemoryPlan:
    history = _History()
    history.records.append(PassRecord("capture", step.seconds, False, None, None))
    # optimizer state and the step's own temporaries, for the implementation that will run
    if optimizer is None and budget_bytes is not None and params:
        _warn_no_optimizer(params)
    opt = history.run("optimizer-memory", optimizer_memory, optimizer, params,
                      device_is_cuda=device.is_cuda, groups_of=groups_of)
    # the optimizer step inside the backward: each parameter updated once its gradient is final, which frees it
    if config.step_in_backward and step.sharding is not None:
        # under FSDP2 each shard is updated once its unit's reduce-scatter made its gradient (memopt.fsdp)
        step = dataclasses.replace(step, sharding=dataclasses.replace(step.sharding, step_in_backward=True))
        opt = opt.without(opt.temporaries_by_param)
    elif config.step_in_backward:
        step = history.run("step-in-backward", steps_in_backward, step, opt.temporaries_by_param)
        opt = opt.without(step.stepped)
    # workspace kernels allocate inside themselves, measured per distinct op on the real device
    scratch_model = None
    if config.measure_scratch and not step.fake:
        scratch_model = history.run("scratch", measure_scratch, step.graph, step.device)
    # bytes per storage, live ranges in the traced order, the timeline of the whole step, and the smallest
    # budget any recompute plan could meet
    table, live, scratch, timeline, minimum = _analysed(history, step, opt, scratch_model)
    eager_peak = timeline.peak_bytes
    traced, traced_graph_s = step, graph_seconds(step.graph, device)  # the traced step's ops, each run once
    # loss heads (linear, log-softmax, NLL) that can run over slices of the tokens
    # and feed-forward blocks (up projections, activation, down projection) that can too
    chunkable = _Chunkable(history.run("loss-heads", find_loss_heads, step.graph),
                           history.run("mlp-blocks", find_mlp_regions, step),
                           frozenset(head.loss for head in fused_heads(step.graph)))
    chunked: tuple[ChunkedHead, ...] = ()
    chunked_mlp: tuple[ChunkedMLP, ...] = ()
    compressed: tuple[CompressedTensor, ...] = ()
    pack_nodes: dict[str, CompressedTensor] = {}  # per pack node of the step, the tensor it packs
    exact = None  # the step and its recompute plan before packing, when packing was chosen
    decisions: tuple[Decision, ...] = ()
    checkpointed: tuple[str, ...] = ()
    selective: dict[str, tuple[tuple[str, bool], ...]] = {}
    solver = SolverReport("none", "not-run", None, None, None, 0.0)
    offload: OffloadSummary | None = None
    if budget_bytes is not None:
        # which activations the backward recomputes, so that the peak stays under the budget (less headroom)
        target = planned_part(budget_bytes, config.headroom)
        floor = max((t for t, phase in zip(timeline.totals, timeline.phases) if phase == "optimizer"), default=0)

        def recompute_plan(step: CapturedStep, table: StorageTable, scratch: Any, target: int = target
                           ) -> RecomputePlan:
            return history.run("remat", plan_recompute, step, table, device, target, constant_bytes=opt.state_bytes,
                               floor_bytes=floor, scratch=scratch, solver=config.solver,
                               time_limit_s=config.remat_time_limit_s, cache_dir=config.cache_dir,
                               fused=config.fused_recompute)

        remat = recompute_plan(step, table, scratch)
        infeasible = budget_bytes < minimum.bytes or remat.solution.status == "infeasible"
        alternative = None
        if chunkable.wanted(config) and (chunkable.forced(config) or infeasible or remat.solution.cost_s > 0):
            # the loss heads and MLP blocks over slices of the tokens, when that step with its recompute plan
            # takes less time by the cost model or fits where the traced step's does not
            alternative = _chunked(history, step, chunkable, opt, scratch_model, config, device, recompute_plan)
            traced_smallest = max(minimum.bytes, budget_for_peak(remat.solution.peak_bytes, config.headroom))
            if alternative.chosen_over(remat, infeasible, traced_smallest, config.headroom,
                                       traced_graph_s):
                step, table, live, scratch, timeline, minimum = alternative.analysed
                remat, chunked, chunked_mlp = alternative.remat, alternative.heads, alternative.mlps
        exact_infeasible = budget_bytes < minimum.bytes or remat.solution.status == "infeasible"
        if config.compress is not None and (exact_infeasible or remat.solution.cost_s > 0):
            # saved activations packed to int8/fp8 between forward and backward, where that plan fits a budget
            # the exact one cannot, or costs less (the packing included)
            packed = _compressed(history, step, table, opt, scratch_model, config, device, target, recompute_plan)
            if packed is not None and packed.chosen_over(remat, exact_infeasible, minimum.bytes, config.headroom):
                exact = (step, table, live, scratch, timeline, minimum, remat)
                step, table, live, scratch, timeline, minimum = packed.analysed
                remat, compressed = packed.remat, packed.tensors
                pack_nodes = {packed.made[t.node][0]: t for t in compressed}
                infeasible = budget_bytes < minimum.bytes or remat.solution.status == "infeasible"
        if infeasible and not (chunked or chunked_mlp) and chunkable.off(config) and config.solver != "checkpoint":
            # what the knobs left off would reach, for the error's way out: the lowest-peak plans of that step
            alternative = _chunked(history, step, chunkable, opt, scratch_model, chunkable.auto(config), device,
                                   lambda *analysed: recompute_plan(*analysed, target=1), hint=chunkable.off(config))
        solution = remat.solution
        history.peaks("remat", eager_peak, solution.peak_bytes, changed=False)  # a decision; the rewrite changes the step
        # which activations go to host memory instead, after their last forward use and back before the backward's
        offloaded = None
        if config.offload:
            try:
                offloaded = _offload(history, step, table, live, opt, scratch_model, remat, device, target, config,
                                     budget_bytes, minimum, eager_peak)
            except BudgetInfeasibleError as packed_error:
                if exact is None:
                    raise
                # the packed step leaves less to offload: the exact one, offloaded, may fit where it does not
                step, table, live, scratch, timeline, minimum, remat = exact
                solution, compressed, pack_nodes = remat.solution, (), {}
                try:
                    offloaded = _offload(history, step, table, live, opt, scratch_model, remat, device, target,
                                         config, budget_bytes, minimum, eager_peak)
                except BudgetInfeasibleError as exact_error:
                    raise min(packed_error, exact_error, key=lambda error: error.minimum) from None
        # the step chosen (traced, chunked or packed), before its recomputations and transfers
        planned_graph_s = traced_graph_s if step is traced else graph_seconds(step.graph, device)
        if offloaded is not None:
            plan, step, table, live, timeline = offloaded
            scratch = _scratch(step, scratch_model, opt)
            found = plan.solution
            solver = SolverReport(f"{remat.solver}+offload", found.status, found.objective, found.lower_bound,
                                  _gap(found.objective, found.lower_bound), solution.seconds + found.seconds)
            decisions = tuple(Decision(d.node, d.nbytes, d.action, d.cost_s, d.reason) for d in plan.decisions)
            offload = OffloadSummary(len(plan.specs), plan.bytes_to_host, plan.bytes_to_device, plan.host_peak_bytes,
                                     plan.predicted_stall_s, found.recompute_s,
                                     _host_timeline(timeline, plan, step), found.status)
        else:
            if budget_bytes < minimum.bytes or solution.status == "infeasible":
                error = _infeasible(budget_bytes, config.headroom, solution.peak_bytes, minimum, remat.solver)
                if alternative is not None and alternative.hint:
                    error = _with_chunking_hint(error, alternative, config.headroom)
                raise error
            solver = SolverReport(remat.solver + (" (cached)" if remat.cached else ""), solution.status,
                                  solution.cost_s, solution.lower_bound_s, solution.gap, solution.seconds)
            decisions = _with_packs(tuple(Decision(d.node, d.nbytes, d.action, d.cost_s, d.reason)
                                          for d in remat.decisions), pack_nodes)
            if remat.solver == "checkpoint":  # blocks, for a lowering that runs them under torch's checkpoint
                checkpointed = tuple(segment.module for segment, level in zip(remat.segments, solution.levels)
                                     if level and segment.module)
                selective = {segment.module: saved_by_policy(step, table, segment)
                             for segment, level, names in zip(remat.segments, solution.levels, remat.options)
                             if segment.module and names[level] == CHEAP}
            if remat.chosen:
                # the step as it will run: chosen activations dropped after the forward, recomputed in the backward
                graph = history.run("rewrite", apply_recompute, step.graph, step.backward_start, list(remat.chosen))
                step = _steps_sunk(dataclasses.replace(step, graph=graph))
                table, live, scratch, timeline, _ = _analysed(history, step, opt, scratch_model)
                history.peaks("rewrite", eager_peak, timeline.peak_bytes)
                if timeline.peak_bytes > target:  # the solver's simulation replays the rewrite: never expected
                    raise AssertionError(f"rewritten step peaks at {timeline.peak_bytes} B, "
                                         f"planned {solution.peak_bytes}")
            if config.offload:
                offload = OffloadSummary(0, 0, 0, 0, 0.0, solution.cost_s, (0,) * len(timeline.totals),
                                         "not needed" if solution.status != "infeasible" else "infeasible")
    else:
        planned_graph_s = traced_graph_s
    # a topological order with a lower peak (recorded; the eager timeline above keeps the traced order)
    order = None
    if config.order:
        order = history.run("order", plan_order, step.graph, table, time_limit_s=config.order_time_limit_s)
        # recorded, not applied (see layout); the order solver prices the graph alone, the history the whole step
        history.peaks("order", order.peak_before + opt.state_bytes, order.peak_after + opt.state_bytes, changed=False)
    # the step as it runs in one arena: the order (where it peaks no higher), offsets for the intermediates,
    # the graph rewritten into out= ops on views of the arena, and the ledger of that graph
    arena = None
    if config.layout:
        ran = arena_step(step, table, live, timeline, order.order if order is not None and order.changed else None,
                         opt, dict(zip(table.node_names, scratch)), time_limit_s=config.layout_time_limit_s)
        history.records.extend(PassRecord(*record) for record in ran.records)
        step, table, live, timeline, arena = ran.step, ran.table, ran.live, ran.timeline, ran.arena
        scratch = ran.scratch if scratch else ()
    return MemoryPlan(
        device=device,
        budget_bytes=budget_bytes,
        timeline=timeline,
        storages=table,
        live=live,
        optimizer=opt,
        minimum=minimum,
        decisions=decisions,
        solver=solver,
        history=tuple(history.records),
        fake=step.fake,
        graph_nodes=len(table.node_names),
        sharding=step.sharding,
        checkpointed=checkpointed,
        selective=selective,
        order=order,
        arena=arena,
        eager_peak_bytes=eager_peak,
        scratch=tuple(scratch),
        offload=offload,
        program=step,
        chunked=chunked,
        chunked_mlp=chunked_mlp,
        modelled_seconds=planned_graph_s + (solver.objective or 0.0),
        compressed=compressed,
        stepped=tuple(opt.temporaries_by_param) if step.sharding and step.sharding.step_in_backward else
        tuple(step.stepped),
    )


def _analysed(history: _History, step: CapturedStep, opt: OptimizerMemory, scratch_model: ScratchModel | None
              ) -> tuple[StorageTable, Liveness, tuple[int, ...], MemoryTimeline, LowerBound]:
    """The step's storages, their live ranges, each node's scratch, the timeline and the smallest budget."""
    table = history.run("storages", storage_table, step)
    if step.sharding is not None:
        # (a unit's spans from the traced ops: its recomputations run inside its backward, where FSDP2 gathers)
        copies = frozenset(i for i, node in enumerate(step.graph.graph.nodes) if RECOMPUTE_OF in node.meta)
        table = history.run("sharding", shard_table, table, step.gradients, step.sharding, opt.temporaries_by_param,
                            copies)
    live = history.run("liveness", liveness, table)
    scratch = _scratch(step, scratch_model, opt)
    timeline = history.run("timeline", memory_timeline, table, live, opt, scratch)
    minimum = history.run("lower-bound", minimum_budget, table, live, timeline, scratch)
    return table, live, scratch, timeline, minimum


def _scratch(step: CapturedStep, scratch_model: ScratchModel | None, opt: OptimizerMemory) -> tuple[int, ...]:
    """Per node: the workspace its kernel allocates inside itself (measured), and a parameter update's
    temporaries where the optimizer steps inside the backward."""
    measured = scratch_model.per_node(step.graph) if scratch_model else ()
    # memopt's own kernels say what they allocate inside themselves (their integer arguments keep them from
    # being measured)
    declared = tuple(kernel_scratch(node) for node in step.graph.graph.nodes)
    if any(declared):
        measured = tuple(a + b for a, b in zip(measured or (0,) * len(declared), declared))
    if not step.stepped:
        return measured
    updates = step_temporaries(step.graph, step, opt)
    return tuple(a + b for a, b in zip(measured or (0,) * len(updates), updates))


def _steps_sunk(step: CapturedStep) -> CapturedStep:
    """After a rewrite that added readers of parameters: each in-backward update after its parameter's last reader."""
    if step.stepped:
        sink_steps(step.graph)
    return step


@dataclasses.dataclass(frozen=True)
class _Chunkable:
    """What can run over slices of the tokens: loss heads and MLP blocks, found in the traced step."""

    heads: list[LossHead]
    mlps: list[MLPRegion]
    fusable: frozenset[str] = frozenset()  # the heads the fused kernel can run (by their loss)

    def _knobs(self, config: PlanConfig) -> list[tuple[str, int | str]]:
        return [(name, getattr(config, name)) for name, found in (("chunk_loss", self.heads), ("chunk_mlp", self.mlps))
                if found]

    def wanted(self, config: PlanConfig) -> bool:
        return any(setting != 1 for _, setting in self._knobs(config))

    def forced(self, config: PlanConfig) -> bool:
        """The config names a chunk count for something found: the chunked step runs."""
        return any((isinstance(setting, int) and setting > 1) or setting == "kernel"
                   for _, setting in self._knobs(config))

    def off(self, config: PlanConfig) -> str:
        """The knobs left off for what was found, as the user would pass them "auto" ("" when none)."""
        return " and ".join(f"{name}='auto'" for name, setting in self._knobs(config) if setting == 1)

    def auto(self, config: PlanConfig) -> PlanConfig:
        """``config`` with the knobs left off for what was found set to "auto"."""
        return dataclasses.replace(config, **{name: "auto" for name, setting in self._knobs(config) if setting == 1})


@dataclasses.dataclass(frozen=True)
class _Chunked:
    """The step with its loss heads and MLP blocks over slices of the tokens: its analyses, its recompute plan,
    what was chunked."""

    analysed: tuple[CapturedStep, StorageTable, Liveness, tuple[int, ...], MemoryTimeline, LowerBound]
    remat: RecomputePlan
    heads: tuple[ChunkedHead, ...]
    mlps: tuple[ChunkedMLP, ...]
    forced: bool  # the config names a chunk count
    hint: str  # the knobs, as the user would pass them, when this step was made for an error's way out only
    graph_s: float  # the chunked step's ops, each run once (``graph_seconds``)

    def chosen_over(self, remat: RecomputePlan, infeasible: bool, traced_smallest: int, headroom: float,
                    traced_graph_s: float) -> bool:
        """This plan runs instead of ``remat`` (of the traced step, whose ops take ``traced_graph_s``): the config
        says so, the traced step does not fit (``infeasible``) and this one meets a smaller budget than its
        ``traced_smallest``, or this step, its recomputation included, takes less time by the cost model (the
        slices re-read the weights and add up their gradients; a head's logits may be computed twice)."""
        if self.forced:
            return True
        if infeasible:
            return self.smallest_budget(headroom) < traced_smallest
        return (self.remat.solution.status != "infeasible"
                and self.remat.solution.cost_s + self.graph_s < remat.solution.cost_s + traced_graph_s)

    def smallest_budget(self, headroom: float) -> int:
        """The smallest budget this step meets: its proven minimum, or what its best recompute plan needs."""
        return max(self.analysed[-1].bytes, budget_for_peak(self.remat.solution.peak_bytes, headroom))


def _chunked(history: _History, step: CapturedStep, chunkable: _Chunkable, opt: OptimizerMemory,
             scratch_model: ScratchModel | None, config: PlanConfig, device: DeviceSpec,
             recompute_plan: Callable[[CapturedStep, StorageTable, tuple[int, ...]], RecomputePlan],
             hint: str = "") -> _Chunked:
    """The step with its loss heads over ``config.chunk_loss`` slices and its MLP blocks over
    ``config.chunk_mlp`` ("auto": as many as bring its smallest budget to the lowest the chunk counts tried
    reach; the heads' count first), and the recompute plan of that step."""
    heads = chunkable.heads if config.chunk_loss != 1 else []
    mlps = chunkable.mlps if config.chunk_mlp != 1 else []
    if heads and config.chunk_loss == "kernel":
        heads = [head for head in heads if head.loss in chunkable.fusable]
    head_count = mlp_count = 1
    found = head_why = mlp_why = None

    def analyse(head_count: int, mlp_count: int) -> tuple[CapturedStep, tuple]:
        return _chunked_step(history, step, heads, head_count, mlps, mlp_count, opt, scratch_model,
                             use_triton=device.is_cuda)

    kernel = f"memopt::linear_cross_entropy ({'Triton' if device.is_cuda else 'its torch path on the CPU'})"
    if heads and config.chunk_loss == "kernel":
        head_count, found = _KERNEL, analyse(_KERNEL, 1)
        head_why = f"chunk_loss='kernel': {kernel}"
    elif heads:
        # the heads' logits are the step's floor: the proven minimum measures them
        head_count, found, head_why = _chunk_count(
            config.chunk_loss, "chunk_loss", min(head.rows for head in heads), lambda k: analyse(k, 1),
            lambda candidate: candidate[1][-1].bytes, "the smallest budget falls")
    remats: list[tuple[CapturedStep, RecomputePlan]] = []  # each step tried, its plan

    def planned(candidate: tuple[CapturedStep, tuple]) -> tuple[bool, float]:
        remat = next((plan for tried, plan in remats if tried is candidate[0]), None)
        if remat is None:
            remat = recompute_plan(candidate[0], candidate[1][0], candidate[1][2])
            remats.append((candidate[0], remat))
        if remat.solution.status == "infeasible":
            return True, budget_for_peak(remat.solution.peak_bytes, config.headroom)
        return False, remat.solution.cost_s + graph_seconds(candidate[0].graph, device)

    if mlps:
        # an MLP's wide tensors are transient, mostly above the proven minimum: the recompute plan measures them
        mlp_count, found, mlp_why = _chunk_count(
            config.chunk_mlp, "chunk_mlp", min(mlp.rows for mlp in mlps), lambda k: analyse(head_count, k),
            planned, "the step's modelled time (its ops and the recompute plan's; where none fits, its peak) falls",
            most=_MOST_MLP_CHUNKS)
    if heads and config.chunk_loss == "auto":
        # past the count where the proven minimum stops falling, the heads' slices may still be at the plan's
        # peak (the proven minimum's floor moved elsewhere, the plan's did not): more while the plan's score falls
        more, found, _ = _chunk_count(
            "auto", "chunk_loss", min(head.rows for head in heads), lambda k: analyse(k, mlp_count),
            planned, "", start=(head_count, found))
        if more != head_count:
            head_count, head_why = more, (f"{head_why}, then more while the step's modelled time (or, where none "
                                          "fits, its peak) falls by 1% or more")
            if mlps and config.chunk_mlp == "auto":  # and the MLP blocks' count again, with the heads' new one
                mlp_count, found, _ = _chunk_count(
                    "auto", "chunk_mlp", min(mlp.rows for mlp in mlps), lambda k: analyse(head_count, k),
                    planned, "", most=_MOST_MLP_CHUNKS, start=(mlp_count, found))
        if device.is_cuda and all(head.loss in chunkable.fusable for head in heads):
            # the fused kernel instead of the chunked graph unless the chunked graph's plan scores better: the
            # kernel holds no slice of logits, and reads its tiles of them from on-chip memory
            fused = analyse(_KERNEL, mlp_count)
            if not _better(planned(found), planned(fused)):
                head_count, found, head_why = _KERNEL, fused, (f"chunk_loss='auto': {kernel}, whose recompute plan "
                                                               f"scores no worse than {head_count} chunks'")
    chunked, analysed = found or analyse(1, 1)  # ("kernel" with no head it can run, and no MLP block)
    remat = next((plan for tried, plan in remats if tried is chunked), None) or \
        recompute_plan(chunked, analysed[0], analysed[2])
    # the kernel, and slices whose gradients the forward cannot take, compute the logits again in the backward
    once = {head.loss: head_count != _KERNEL and head.gradients_in_forward for head in heads}
    described = tuple(ChunkedHead(head.loss, head.rows, head.vocab, max(head_count, 1), head.logits_bytes,
                                  head.rows * LSE_BYTES_PER_TOKEN if head_count == _KERNEL
                                  else head.chunk_bytes(head_count),
                                  0.0 if once[head.loss] else logits_seconds(step.graph, head, device),
                                  head_why, kernel if head_count == _KERNEL else "", once[head.loss])
                      for head in heads)
    described_mlps = tuple(ChunkedMLP(mlp.down, mlp.rows, mlp.width, mlp_count, mlp.wide_bytes,
                                      mlp.chunk_bytes(mlp_count), mlp_why) for mlp in mlps)
    return _Chunked((chunked, *analysed), remat, described, described_mlps, chunkable.forced(config), hint,
                    graph_seconds(chunked.graph, device))


@dataclasses.dataclass(frozen=True)
class _Compressed:
    """The step with its larger saved activations packed between forward and backward: its analyses, its
    recompute plan, what was packed."""

    analysed: tuple[CapturedStep, StorageTable, Liveness, tuple[int, ...], MemoryTimeline, LowerBound]
    remat: RecomputePlan
    tensors: tuple[CompressedTensor, ...]
    made: dict[str, tuple[str, str]]  # per packed tensor, its pack and unpack nodes

    @property
    def seconds(self) -> float:
        """Recomputation, packing and unpacking."""
        return self.remat.solution.cost_s + sum(t.seconds for t in self.tensors)

    def chosen_over(self, remat: RecomputePlan, infeasible: bool, exact_smallest: int, headroom: float) -> bool:
        """This plan runs instead of the exact ``remat``: that one does not fit and this one meets a smaller
        budget, or this one costs less, its packing included."""
        fits = self.remat.solution.status != "infeasible"
        if infeasible:
            smallest = max(self.analysed[-1].bytes, budget_for_peak(self.remat.solution.peak_bytes, headroom))
            return fits or smallest < max(exact_smallest, budget_for_peak(remat.solution.peak_bytes, headroom))
        return fits and self.seconds < remat.solution.cost_s


def _compressed(history: _History, step: CapturedStep, table: StorageTable, opt: OptimizerMemory,
                scratch_model: ScratchModel | None, config: PlanConfig, device: DeviceSpec, target: int,
                recompute_plan: Callable[[CapturedStep, StorageTable, tuple[int, ...]], RecomputePlan]
                ) -> _Compressed | None:
    """The step with the saved activations it needs packed to ``config.compress`` (what is still kept whole then
    is the recompute plan's choice), or None when it needs none: every one that may be packed is, the recompute
    plan is made on that step, and the packs it does not need to stay under ``target`` (or, where nothing fits,
    under its peak) are left out, when the step so packed plans no worse."""
    bases = packable(step.graph, table)
    if not bases:
        return None
    every = _packed(history, step, [node.name for node in bases.values()], opt, scratch_model, config, device,
                    recompute_plan)
    solution = every.remat.solution
    limit = target if solution.status != "infeasible" else solution.peak_bytes
    packed_step, packed_table = every.analysed[0], every.analysed[1]
    seconds = {t.node: t.seconds for t in every.tensors}
    needed = needed_packs(every.remat.problem, solution.chosen,
                          packs_in(packed_step.graph, packed_table, every.made, seconds), limit)
    if not needed or len(needed) == len(every.tensors):
        return every if needed else None
    fewer = _packed(history, step, [pack.base for pack in needed], opt, scratch_model, config, device,
                    recompute_plan)
    if fewer.remat.solution.status == "infeasible":
        return fewer if solution.status == "infeasible" and fewer.remat.solution.peak_bytes <= limit else every
    return fewer if fewer.seconds <= every.seconds or solution.status == "infeasible" else every


def _with_packs(decisions: tuple[Decision, ...], pack_nodes: dict[str, CompressedTensor]) -> tuple[Decision, ...]:
    """The decisions with each packed tensor's payload and scales (made by its pack node) read as one decision
    about the tensor: packed."""
    out, seen = [], set()
    for d in decisions:
        packed = pack_nodes.get(d.name)
        if packed is None:
            out.append(d)
        elif d.name not in seen:
            seen.add(d.name)
            out.append(Decision(packed.node, packed.nbytes, "pack", packed.seconds,
                                f"packed to {packed.format} after its last forward reader and unpacked before its "
                                f"first backward reader: {packed.packed_bytes:,} B kept instead (compress=; "
                                f"approximate)"))
    return tuple(out)


def _packed(history: _History, step: CapturedStep, names: list[str], opt: OptimizerMemory,
            scratch_model: ScratchModel | None, config: PlanConfig, device: DeviceSpec,
            recompute_plan: Callable[[CapturedStep, StorageTable, tuple[int, ...]], RecomputePlan]) -> _Compressed:
    """The step with ``names`` packed to ``config.compress``, analysed, and its recompute plan."""
    from memopt.lower.kernels.compress import packed_bytes, time_factor

    graph, made = history.run("compress", apply_compress, step.graph, step.backward_start, names, config.compress,
                              use_triton=device.is_cuda)
    packed = _steps_sunk(dataclasses.replace(step, graph=graph))
    analysed = _analysed(history, packed, opt, scratch_model)
    by_name = {node.name: node for node in graph.graph.nodes}
    values = {name: by_name[name].meta["val"] for name in names}  # (each the whole of its storage)
    tensors = tuple(CompressedTensor(name, value.numel() * value.element_size(),
                                     packed_bytes(value.numel(), config.compress), config.compress,
                                     sum(node_seconds(by_name[op], device) * time_factor(by_name[op])
                                         for op in made[name]))
                    for name, value in values.items())
    return _Compressed((packed, *analysed), recompute_plan(packed, analysed[0], analysed[2]), tensors, made)


def _chunk_count(setting: int | str, name: str, rows: int, analyse: Callable[[int], tuple[CapturedStep, tuple]],
                 score: Callable[[tuple[CapturedStep, tuple]], float | tuple[bool, float]], what: str,
                 most: int | None = None, start: tuple[int, tuple[CapturedStep, tuple]] | None = None
                 ) -> tuple[int, tuple[CapturedStep, tuple], str]:
    """The number of slices ``setting`` asks for ("auto": doubling from 2, or from ``start``'s count and step, up
    to ``most``, until ``score``, ``what`` it measures, stops falling by 1% or more; a score may be (worse kind,
    value)), the step analysed with it, and why."""
    if setting != "auto":
        return int(setting), analyse(int(setting)), f"{name}={setting}"

    count, best = start or (2, analyse(2))
    best_score = score(best)
    while rows // (2 * count) >= _FEWEST_TOKENS and (most is None or 2 * count <= most):
        more = analyse(2 * count)
        more_score = score(more)
        if not _better(more_score, best_score):
            break
        count, best, best_score = 2 * count, more, more_score
    return count, best, f"{name}='auto': the fewest chunks (a power of two) past which {what} by less than 1%"


def _better(more: float | tuple[bool, float], best: float | tuple[bool, float]) -> bool:
    """A score (or (worse kind, value)) 1% or more below another."""
    (more_kind, more_value), (best_kind, best_value) = (x if isinstance(x, tuple) else (False, x) for x in (more, best))
    return more_kind < best_kind or (more_kind == best_kind and more_value < 0.99 * best_value)


_FEWEST_TOKENS = 16  # "auto" never slices the tokens finer
_KERNEL = 0  # a head count: the heads run by the fused kernel
# "auto" tries an MLP in 2, 4 and 8 slices: at 8, a 4x-wide block's slice is half its input, and each count
# tried costs a recompute plan
_MOST_MLP_CHUNKS = 8


def _with_chunking_hint(error: BudgetInfeasibleError, alternative: _Chunked, headroom: float
                        ) -> BudgetInfeasibleError:
    """``error`` with the smallest budget the step meets with its loss heads and MLP blocks over slices of the
    tokens."""
    smallest = alternative.smallest_budget(headroom)
    if smallest >= error.minimum:
        return error
    return BudgetInfeasibleError(error.budget, error.minimum, error.where, error.why, proven=error.proven_minimum,
                                 chunked_minimum=smallest, chunk_options=alternative.hint)


def _chunked_step(history: _History, step: CapturedStep, heads: list[LossHead], head_count: int,
                  mlps: list[MLPRegion], mlp_count: int, opt: OptimizerMemory, scratch_model: ScratchModel | None,
                  *, use_triton: bool) -> tuple[CapturedStep, tuple]:
    """The step with its heads over ``head_count`` slices (``_KERNEL``: by the fused kernel, its Triton code
    where ``use_triton``) and its MLP blocks over ``mlp_count``, analysed."""
    if heads and head_count == _KERNEL:
        step = history.run("fuse-loss", fuse_step, step, {head.loss for head in heads}, use_triton=use_triton)
    elif heads and head_count > 1:
        step = history.run("chunk-loss", chunk_step, step, {head.loss: head_count for head in heads})
    if mlps and mlp_count > 1:
        step = history.run("chunk-mlp", chunk_mlp_step, step, {mlp.down: mlp_count for mlp in mlps})
    step = _steps_sunk(step)
    return step, _analysed(history, step, opt, scratch_model)


def _warn_no_optimizer(params: list[ParamInfo]) -> None:
    """A plan under a budget without an optimizer holds no optimizer state: say what a usual one would add."""
    count = sum(math.prod(p.shape) for p in params)
    adam = 2 * sum(p.nbytes for p in params)
    warnings.warn(f"memopt: no optimizer given, so this plan holds no optimizer state; with Adam or AdamW the step "
                  f"also holds two copies of the {count:,} trainable parameters ({format_bytes(adam)}) and can go "
                  f"over the budget by that much. Pass the optimizer (optimizer=opt, a class, or (class, kwargs); "
                  f"for the backend, options={{'optimizer': opt}}); optimizer=torch.optim.SGD plans a step "
                  f"without state", MemoptWarning, stacklevel=2)


def _offload(history: _History, step: CapturedStep, table: Any, live: Any, opt: Any, scratch_model: Any,
             remat: Any, device: DeviceSpec, target: int, config: PlanConfig, budget: int,
             minimum: LowerBound, eager_peak: int) -> tuple | None:
    """Offload (with what is still recomputed) rewritten into the step; None when the keep/recompute plan stands.

    The rewritten step's own timeline is the plan's: the solver's model of a transfer's window is one
    event coarser than the graph, so it can peak over ``target``, and the fit loop then plans again for
    a target lower by the overshoot. Raises ``BudgetInfeasibleError`` when the keep/recompute plan does
    not fit and no offload plan does either, naming the lowest peak the search reached, where, and what
    is live there.
    """
    plan = history.run("offload", plan_offload, step.graph, table, remat, device, target,
                       host_capacity_bytes=config.offload_host_bytes, time_limit_s=config.offload_time_limit_s,
                       max_items=config.offload_max_items)
    infeasible = plan.solution.status == "infeasible"
    if not plan.specs and not infeasible and remat.solution.status != "infeasible":
        return None  # nothing to offload: the keep/recompute plan fits as it is
    new_step, new_table, new_live, timeline = _rewritten(history, step, plan, opt, scratch_model, eager_peak)
    if infeasible:
        raise _offload_infeasible(budget, config.headroom, plan, timeline, minimum)
    return plan, new_step, new_table, new_live, timeline


def _rewritten(history: _History, step: CapturedStep, plan: OffloadPlan, opt: Any,
               scratch_model: Any, before: int) -> tuple[CapturedStep, StorageTable, Any, MemoryTimeline]:
    """The step with the plan's recomputes and offloads, its storages (host copies apart), liveness and timeline."""
    graph = step.graph
    if plan.recomputed:
        graph = history.run("rewrite", apply_recompute, graph, step.backward_start, list(plan.recomputed))
    rewrite = history.run("rewrite-offload", apply_offload, graph, step.backward_start, list(plan.specs),
                          step.device)
    new_step = _steps_sunk(dataclasses.replace(step, graph=rewrite.graph))
    new_table = _host_apart(history.run("storages", storage_table, new_step), rewrite.offload_nodes)
    new_live = history.run("liveness", liveness, new_table)
    timeline = history.run("timeline", memory_timeline, new_table, new_live, opt, _scratch(new_step, scratch_model, opt))
    history.peaks("rewrite-offload", before, timeline.peak_bytes)
    return new_step, new_table, new_live, timeline


def _offload_infeasible(budget: int, headroom: float, plan: OffloadPlan, timeline: MemoryTimeline,
                        minimum: LowerBound) -> BudgetInfeasibleError:
    """No keep/recompute/offload plan found under the budget: the lowest peak reached, where, and what is live."""
    best = timeline.peak_bytes
    needed = max(budget_for_peak(best, headroom), minimum.bytes)
    index = timeline.peak_index
    ledger = {c: b for c, b in timeline.ledger_at(index).items() if b}
    live = ", ".join(f"{c.replace('_', ' ')} {format_bytes(b)}"
                     for c, b in sorted(ledger.items(), key=lambda kv: -kv[1]))
    found = plan.solution
    why = (f"with offload, the lowest peak memopt finds is {format_bytes(best)}, at {timeline.labels[index]} "
           f"({timeline.phases[index]}), with {len(plan.specs)} activations offloaded and {len(plan.recomputed)} "
           f"recomputed (their copies count as temporaries); live there: {live}; no activation left to offload "
           f"is live across that point, and "
           f"memopt keeps {headroom:.0%} of the budget as headroom. No plan that keeps parameters, gradients and "
           f"optimizer state on the device can go below {format_bytes(minimum.bytes)} (at {minimum.where}: "
           f"{minimum.why}). What else lowers the peak: a smaller batch or sequence, or a cheaper optimizer")
    _log.debug("offload search: %s, %d rounds, %.1f s", found.status, found.rounds, found.seconds)
    return BudgetInfeasibleError(budget, needed, f"{timeline.labels[index]} with offload", why,
                                 proven=minimum.bytes)


def _host_apart(table: StorageTable, offload_nodes: tuple[str, ...]) -> StorageTable:
    """The table with the host copies (the offload ops' results, in the host pool) at no device bytes."""
    host = set(offload_nodes)
    storages = tuple(dataclasses.replace(s, nbytes=0) if s.node in host else s for s in table.storages)
    return dataclasses.replace(table, storages=storages)


def _host_timeline(timeline: MemoryTimeline, plan: OffloadPlan, step: CapturedStep) -> tuple[int, ...]:
    """Host bytes in use at each step of the timeline: a slot from its offload to its reload."""
    index = {label: i for i, label in enumerate(timeline.labels)}
    offloads = [n for n in step.graph.graph.nodes if n.target is _OFFLOAD]
    delta = [0] * (len(timeline.totals) + 1)
    for node in offloads:
        reload = next(u for u in node.users if u.target is _RELOAD)
        nbytes = next(s.nbytes for s in plan.specs if s.offset == node.args[2])
        delta[index[node.name]] += nbytes
        delta[index[reload.name] + 1] -= nbytes
    running, values = 0, []
    for change in delta[:-1]:
        running += change
        values.append(running)
    return tuple(values)


def _gap(objective: float, bound: float) -> float:
    return 0.0 if objective <= 0 else max(0.0, (objective - bound) / objective)


def _infeasible(budget: int, headroom: float, best: int, minimum: LowerBound, solver: str) -> BudgetInfeasibleError:
    """No plan fits: name the smallest budget memopt can meet, and the proven minimum below it."""
    needed = max(minimum.bytes, budget_for_peak(best, headroom))
    if needed == minimum.bytes:
        return BudgetInfeasibleError(budget, minimum.bytes, minimum.where, minimum.why, proven=minimum.bytes)
    # (the 'checkpoint' solver's plans run under FSDP2, which memopt neither offloads nor chunks under)
    others = ("a smaller batch or sequence per rank, more ranks, or a cheaper optimizer" if solver == "checkpoint"
              else "a smaller batch or sequence, offloading, or a cheaper optimizer")
    why = (f"the '{solver}' remat plans peak at {format_bytes(best)} at best, and memopt keeps {headroom:.0%} of the "
           f"budget as headroom for what the prediction does not see. No keep/recompute plan of these ops can "
           f"go below {format_bytes(minimum.bytes)} (at {minimum.where}: {minimum.why}). What else lowers the "
           f"peak: {others}")
    return BudgetInfeasibleError(budget, needed, "the lowest-peak recompute plan found", why, proven=minimum.bytes)
