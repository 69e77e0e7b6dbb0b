"""The budget-to-overhead curve of a model: what each budget costs in recompute time, and the baselines.

    curve = memopt.pareto(model, example_inputs, optimizer=torch.optim.AdamW, device="h100")
    print(curve); curve.plot("pareto.png"); curve.to_json()

The step is planned (``memopt.plan``) at each budget from the smallest memopt
can meet to the eager peak (plus headroom). The overhead is the remat solver's
objective: the predicted seconds of the forward ops the backward replays
(roofline on the device; plus the unhidden transfer time when the plan
offloads), also as a fraction of the predicted forward+backward time of the
eager step. Baselines ("blocks": every layer checkpointed, "sqrt": Chen's
segments) recompute the same whatever the budget: each is one point at the
smallest budget it fits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from memopt.api import _device_of, plan
from memopt.budget import budget_for_peak, format_bytes, parse_budget
from memopt.config import PlanConfig
from memopt.device import DeviceSpec, get_device
from memopt.errors import BudgetInfeasibleError, MemoptError
from memopt.passes.costs import node_seconds
from memopt.passes.remat_plan import SOLVERS
from memopt.report.plan import MemoryPlan

_log = logging.getLogger(__name__)
BASELINES = ("blocks", "sqrt")


@dataclass(frozen=True, slots=True)
class ParetoPoint:
    """One plan: its budget, predicted peak and predicted recompute overhead."""

    solver: str  # "memopt" on the curve, or a baseline's name
    budget_bytes: int
    peak_bytes: int | None  # predicted; None when no plan fits the budget
    overhead_s: float | None  # predicted seconds per step of recomputation (the solver's objective), plus the
    # transfer stall the compute cannot hide when the plan offloads
    overhead_fraction: float | None  # overhead_s / the eager step's predicted forward+backward seconds
    recomputed: int  # activations recomputed
    recomputed_bytes: int
    offloaded_bytes: int  # sent to host memory and back (offload plans only)
    status: str  # the solver's status, or "infeasible"
    gap: float | None  # the solver's gap to its lower bound on the overhead
    plan_seconds: float  # time to plan this point (the trace excluded)


@dataclass(frozen=True, slots=True)
class ParetoCurve:
    """memopt's overhead at a range of budgets (``points``, budgets ascending) and the baselines beside it."""

    device: str
    eager_peak_bytes: int  # the predicted peak with nothing recomputed
    minimum_bytes: int  # the smallest budget memopt can meet (headroom included)
    proven_minimum_bytes: int  # no keep/recompute plan of the traced ops fits below this
    step_seconds: float  # the eager step's predicted forward+backward seconds (roofline, optimizer step excluded)
    headroom: float  # the part of each budget memopt leaves unplanned
    points: tuple[ParetoPoint, ...]
    baselines: tuple[ParetoPoint, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def plot(self, path: str) -> str:
        """A PNG of overhead against budget: memopt's curve, the baselines as points."""
        from memopt.report.plot import plot_pareto

        return plot_pareto(self, path)

    def __str__(self) -> str:
        lines = [f"memopt budget-to-overhead curve on {self.device}: eager step peaks at "
                 f"{format_bytes(self.eager_peak_bytes)}, predicted forward+backward {self.step_seconds:.4g} s; "
                 f"smallest budget memopt meets {format_bytes(self.minimum_bytes)} (proven minimum "
                 f"{format_bytes(self.proven_minimum_bytes)})",
                 "",
                 f"{'solver':<8}{'budget':>14}{'peak':>14}{'overhead s':>13}{'of step':>9}{'recomputed':>12}"
                 f"  status"]
        for point in (*self.points, *self.baselines):
            peak = "-" if point.peak_bytes is None else format_bytes(point.peak_bytes)
            overhead = "-" if point.overhead_s is None else f"{point.overhead_s:.4g}"
            fraction = "-" if point.overhead_fraction is None else f"{point.overhead_fraction:.1%}"
            lines.append(f"{point.solver:<8}{format_bytes(point.budget_bytes):>14}{peak:>14}{overhead:>13}"
                         f"{fraction:>9}{point.recomputed:>12}  {point.status}")
        return "\n".join(lines)


def pareto(
    model: nn.Module,
    example_inputs: tuple | list | dict | torch.Tensor,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: Any = None,
    device: str | DeviceSpec | None = None,
    offload: bool | None = None,
    budgets: Sequence[int | str] | None = None,
    points: int = 8,
    baselines: Sequence[str] = BASELINES,
    fake: bool | None = None,
    config: PlanConfig | None = None,
) -> ParetoCurve:
    """memopt's predicted recompute overhead at each of ``budgets``, and the ``baselines``' points.

    ``budgets`` default: ``points`` budgets evenly spaced from the smallest
    memopt can meet to the smallest that holds the eager step's predicted
    peak (the peak plus memopt's headroom), where nothing is recomputed. Arguments as
    ``memopt.plan``; ``config`` sets the solver's time limit per point
    (``remat_time_limit_s``). A budget below the smallest memopt can meet
    gives a point with status "infeasible". The model is left as it was.
    """
    if points < 1:
        raise MemoptError(f"a Pareto curve needs at least one point; got points={points}")
    unknown = [name for name in baselines if name not in SOLVERS or name == "memopt"]
    if unknown:
        raise MemoptError(f"unknown baseline {unknown[0]!r}; choose from: {', '.join(BASELINES)}, none")
    planner = _Planner(model, example_inputs, loss_fn=loss_fn, optimizer=optimizer, device=device, offload=offload,
                       fake=fake, config=config)
    eager = planner.plan(None, "none")
    assert eager.eager_peak_bytes is not None
    assert eager.program is not None
    step_seconds = sum(node_seconds(node, planner.device) for node in eager.program.graph.graph.nodes)
    try:
        planner.plan(1, "memopt")
        raise AssertionError("a 1-byte budget was met")
    except BudgetInfeasibleError as error:
        minimum, proven = error.minimum, error.proven_minimum
    if budgets is None:
        top = max(budget_for_peak(eager.eager_peak_bytes, planner.headroom), minimum)  # nothing recomputed
        chosen = sorted({round(minimum + (top - minimum) * i / max(points - 1, 1)) for i in range(points)})
    else:
        chosen = sorted({parse_budget(b) for b in budgets})
    curve = []
    for number, budget in enumerate(chosen, 1):
        curve.append(_point(planner, budget, "memopt", step_seconds))
        _log.info("pareto point %d/%d: budget %s, overhead %s", number, len(chosen), format_bytes(budget),
                  "-" if curve[-1].overhead_s is None else f"{curve[-1].overhead_s:.4g} s")
    others = []
    for name in baselines:
        # a baseline recomputes the same at any budget: plan it where the budget does not bind, then place it
        # at the smallest budget that holds its peak
        loose = _point(planner, 2 * eager.eager_peak_bytes + 1, name, step_seconds)
        assert loose.peak_bytes is not None
        others.append(dataclasses.replace(loose, budget_bytes=budget_for_peak(loose.peak_bytes, planner.headroom)))
    return ParetoCurve(planner.device.name, eager.eager_peak_bytes, minimum, proven, step_seconds, planner.headroom,
                       tuple(curve), tuple(others))


def _point(planner: _Planner, budget: int, solver: str, step_seconds: float) -> ParetoPoint:
    started = time.perf_counter()
    try:
        planned = planner.plan(budget, solver)
    except BudgetInfeasibleError:
        return ParetoPoint(solver, budget, None, None, None, 0, 0, 0, "infeasible", None,
                           time.perf_counter() - started)
    overhead = planned.solver.objective or 0.0
    offloaded = 0
    if planned.offload is not None:  # offload replaces some recomputation; its stall is overhead too
        overhead = planned.offload.recompute_s + planned.offload.predicted_stall_s
        offloaded = planned.offload.bytes_to_host
    recomputed = [d for d in planned.decisions if d.recomputed]
    return ParetoPoint(solver, budget, planned.peak_bytes, overhead, overhead / step_seconds if step_seconds else None,
                       len(recomputed), sum(d.bytes for d in recomputed), offloaded, planned.solver.status,
                       planned.solver.gap, time.perf_counter() - started)


class _Planner:
    """Plans the step at any budget with any remat solver: ``memopt.plan`` with the sweep's arguments."""

    def __init__(self, model: nn.Module, example_inputs: Any, *, loss_fn: Any, optimizer: Any,
                 device: str | DeviceSpec | None, offload: bool | None, fake: bool | None,
                 config: PlanConfig | None) -> None:
        # the order pass only records an order (the timeline keeps the traced one): not needed here
        self.config = dataclasses.replace(config or PlanConfig(), order=False, layout=False)
        self.headroom = self.config.headroom
        self.device = get_device(device, default=_device_of(model))
        self.model, self.example_inputs = model, example_inputs
        self.kwargs = {"loss_fn": loss_fn, "optimizer": optimizer, "device": self.device, "offload": offload,
                       "fake": fake}

    def plan(self, budget: int | None, solver: str) -> MemoryPlan:
        # each plan traces the step again (a second or two; memopt.plan keeps no trace between calls)
        return plan(self.model, self.example_inputs, budget=budget, solver=solver, config=self.config, **self.kwargs)
