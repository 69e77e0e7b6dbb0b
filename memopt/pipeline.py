"""The default passes, in order. One function, read top to bottom."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, TypeVar

from memopt.capture import CapturedStep
from memopt.config import PlanConfig
from memopt.device import DeviceSpec
from memopt.errors import BudgetInfeasibleError
from memopt.passes.arena_plan import plan_arena
from memopt.budget import format_bytes
from memopt.passes.bounds import LowerBound, minimum_budget
from memopt.passes.liveness import liveness, memory_timeline
from memopt.passes.optimizer_memory import ParamInfo, optimizer_memory
from memopt.passes.order_plan import plan_order
from memopt.passes.recompute import apply_recompute
from memopt.passes.remat_plan import plan_recompute
from memopt.passes.scratch import measure_scratch
from memopt.passes.storage import storage_table
from memopt.plan import Decision, MemoryPlan, PassRecord, SolverReport

T = TypeVar("T")


class _History:
    """Times each pass and keeps the record that ``plan.explain()`` prints."""

    def __init__(self) -> None:
        self.records: list[PassRecord] = []

    def run(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        self.records.append(PassRecord(name, time.perf_counter() - started, False, None, None))
        return result


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
    # bytes per storage (views and in-place results counted once) and a category for each
    table = history.run("storages", storage_table, step)
    # live ranges in the traced (eager) order
    live = history.run("liveness", liveness, table)
    # optimizer state and the step's own temporaries, for the implementation that will run
    opt = history.run("optimizer-memory", optimizer_memory, optimizer, params,
                      device_is_cuda=device.is_cuda, groups_of=groups_of)
    # workspace kernels allocate inside themselves, measured per distinct op on the real device
    scratch_model = None
    if config.measure_scratch and not step.fake:
        scratch_model = history.run("scratch", measure_scratch, step.graph, step.device)
    scratch = scratch_model.per_node(step.graph) if scratch_model else ()
    # the timeline of the whole step and its peak
    timeline = history.run("timeline", memory_timeline, table, live, opt, scratch)
    # the smallest budget any recompute plan could meet
    minimum = history.run("lower-bound", minimum_budget, table, live, timeline, scratch)
    eager_peak = timeline.peak_bytes
    decisions: tuple[Decision, ...] = ()
    solver = SolverReport("none", "not-run", None, None, None, 0.0)
    if budget_bytes is not None:
        # which activations the backward recomputes, so that the peak stays under the budget (less headroom)
        target = _target(budget_bytes, config.headroom)
        floor = max((t for t, phase in zip(timeline.totals, timeline.phases) if phase == "optimizer"), default=0)
        remat = history.run("remat", plan_recompute, step, table, device, target, constant_bytes=opt.state_bytes,
                            floor_bytes=floor, scratch=scratch, solver=config.solver,
                            time_limit_s=config.remat_time_limit_s)
        solution = remat.solution
        if budget_bytes < minimum.bytes or solution.status == "infeasible":
            raise _infeasible(budget_bytes, config.headroom, solution.peak_bytes, minimum, remat.solver)
        solver = SolverReport(remat.solver, solution.status, solution.cost_s, solution.lower_bound_s, solution.gap,
                              solution.seconds)
        decisions = tuple(Decision(d.node, d.nbytes, d.action, d.cost_s, d.reason) for d in remat.decisions)
        if remat.chosen:
            # the step as it will run: chosen activations dropped after the forward, recomputed in the backward
            graph = history.run("rewrite", apply_recompute, step.graph, step.backward_start, list(remat.chosen))
            step = dataclasses.replace(step, graph=graph)
            table = history.run("storages", storage_table, step)
            live = history.run("liveness", liveness, table)
            scratch = scratch_model.per_node(step.graph) if scratch_model else ()
            timeline = history.run("timeline", memory_timeline, table, live, opt, scratch)
            if timeline.peak_bytes > target:  # the solver's simulation replays the rewrite: never expected
                raise AssertionError(f"rewritten step peaks at {timeline.peak_bytes} B, planned {solution.peak_bytes}")
    # a topological order with a lower peak (recorded; the eager timeline above keeps the traced order)
    order = None
    if config.order:
        order = history.run("order", plan_order, step.graph, table, time_limit_s=config.order_time_limit_s)
    # offsets in one arena for the intermediates, over the chosen order's liveness
    arena = None
    if config.layout:
        arena_live = live if order is None else liveness(table, order.order)
        arena = history.run("layout", plan_arena, step.graph, table, arena_live,
                            time_limit_s=config.layout_time_limit_s)
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
        order=order,
        arena=arena,
        eager_peak_bytes=eager_peak,
        scratch=tuple(scratch),
        program=step,
    )


def _infeasible(budget: int, headroom: float, best: int, minimum: LowerBound, solver: str) -> BudgetInfeasibleError:
    """No plan fits: name the smallest budget memopt can meet, and the proven minimum below it."""
    needed = math.ceil(best / (1 - headroom))
    while _target(needed, headroom) < best:  # float rounding: the smallest budget whose target holds `best`
        needed += 1
    needed = max(minimum.bytes, needed)
    if needed == minimum.bytes:
        return BudgetInfeasibleError(budget, minimum.bytes, minimum.where, minimum.why, proven=minimum.bytes)
    why = (f"the '{solver}' remat plans peak at {format_bytes(best)} at best, and memopt keeps {headroom:.0%} of the "
           f"budget as headroom for what the prediction does not see. No keep/recompute plan of these ops can "
           f"go below {format_bytes(minimum.bytes)} (at {minimum.where}: {minimum.why}). What else lowers the "
           f"peak: a smaller batch or sequence, offloading, or a cheaper optimizer")
    return BudgetInfeasibleError(budget, needed, "the step with every layer recomputed", why, proven=minimum.bytes)


def _target(budget: int, headroom: float) -> int:
    """The peak memopt plans for under ``budget``: the budget less its headroom."""
    return budget - math.ceil(budget * headroom)
