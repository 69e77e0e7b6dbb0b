"""The default passes, in order. One function, read top to bottom."""

from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

from memopt.capture import CapturedStep
from memopt.config import PlanConfig
from memopt.device import DeviceSpec
from memopt.errors import BudgetInfeasibleError
from memopt.passes.arena_plan import plan_arena
from memopt.passes.bounds import minimum_budget
from memopt.passes.liveness import liveness, memory_timeline
from memopt.passes.optimizer_memory import ParamInfo, optimizer_memory
from memopt.passes.order_plan import plan_order
from memopt.passes.storage import storage_table
from memopt.plan import MemoryPlan, PassRecord, SolverReport

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
    # the timeline of the whole step and its peak
    timeline = history.run("timeline", memory_timeline, table, live, opt)
    # the smallest budget any recompute plan could meet
    minimum = history.run("lower-bound", minimum_budget, table, live, timeline)
    if budget_bytes is not None and budget_bytes < minimum.bytes:
        raise BudgetInfeasibleError(budget_bytes, minimum.bytes, minimum.where, minimum.why)
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
        decisions=(),
        solver=SolverReport("none", "not-run", None, None, None, 0.0),
        history=tuple(history.records),
        fake=step.fake,
        graph_nodes=len(table.node_names),
        order=order,
        arena=arena,
    )
