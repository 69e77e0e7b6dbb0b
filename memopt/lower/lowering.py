"""What a lowering is: one way to compile a planned step, and the peak of what it compiled.

``memopt.fit.fit`` is the one loop over lowerings; each lowering here or beside it
(``memopt.lower.inductor.InductorLowering``, the backend's AOT partition) says
how it compiles a plan under some options, and what the compiled step holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from memopt.budget import Budget, budget_for_peak, format_bytes
from memopt.errors import BudgetInfeasibleError
from memopt.lower.runner import StepRunner

if TYPE_CHECKING:
    from memopt.report.plan import CompileAttempt


@dataclass(frozen=True)
class Lowered:
    """One compile of one plan: what runs it and what it holds at its peaks."""

    plan: Any  # the MemoryPlan it was compiled from, handed back untouched
    runner: StepRunner | None  # the plan's two programs (None where AOTAutograd runs them)
    executor: Any  # what runs the compiled programs: the runner itself, Inductor's code, or the backend's callable
    forward_peak_bytes: int
    backward_peak_bytes: int
    peak_bytes: int  # the step's: the larger of both and the optimizer step's
    options: dict[str, Any]  # the variant it was compiled under
    seconds: float


class Lowering(Protocol):
    """How ``fit`` compiles a plan and reads the peak of what it compiled."""

    name: str
    # options to compile under, the caller's first, then what to turn on (or off) when the step is over
    variants: tuple[dict[str, Any], ...]
    # the peak is read from the compiled code (the limit is the budget less code_slack), not predicted by the
    # plan (the limit is the budget less its headroom)
    reads_code: bool
    code_slack: float  # with reads_code: the share of the budget the code's peak leaves free (CODE_SLACK)
    # the code can hold less than its plan: below every plan, try the smallest; with budget to spare,
    # compile plans made for more
    reclaims: bool
    replans: int  # plans made again for a lower target when every variant is over

    def lower(self, plan: Any, options: dict[str, Any], *, reuse: Lowered | None, limit: int) -> Lowered:
        """``plan`` compiled under ``options``; ``reuse``, the same plan compiled before, may lend the
        programs of it that peaked within ``limit``."""
        ...

    def infeasible(self, budget: Budget, lowest: int, attempts: tuple[CompileAttempt, ...],
                   below: BudgetInfeasibleError | None) -> BudgetInfeasibleError:
        """The error when no compile fits: ``lowest`` is the lowest peak they reached."""
        ...


@dataclass(frozen=True)
class FXLowering:
    """The plan's own FX programs over eager's kernels: the step holds what the plan predicts.

    ``arena``: the plan runs its intermediates in one arena (``layout=True``), whose span can leave the
    step over the plan's target, so the loop plans again for less.
    """

    arena: bool = False
    name: str = "fx"
    variants: tuple[dict[str, Any], ...] = ({},)
    reads_code: bool = False
    code_slack: float = 0.0
    reclaims: bool = False
    replans: int = 4

    def lower(self, plan: Any, options: dict[str, Any], *, reuse: Lowered | None, limit: int) -> Lowered:
        started = time.perf_counter()
        runner = StepRunner(plan.program)
        forward, backward = plan.phase_peaks
        return Lowered(plan, runner, runner, forward, backward, plan.peak_bytes, dict(options),
                       time.perf_counter() - started)

    def infeasible(self, budget: Budget, lowest: int, attempts: tuple[CompileAttempt, ...],
                   below: BudgetInfeasibleError | None) -> BudgetInfeasibleError:
        if not self.arena:
            return predicted_infeasible(budget, lowest, attempts, below, "the planned step")
        return predicted_infeasible(budget, lowest, attempts, below, "the step in one arena",
                                    "the arena is allocated for the whole span of the tensors planned in it, so "
                                    "tensors outside it (gradients, ops with no out= kernel) add to its full size; "
                                    "or use layout=False")


def predicted_infeasible(budget: Budget, lowest: int, attempts: tuple[CompileAttempt, ...],
                         below: BudgetInfeasibleError | None, where: str, why: str = "") -> BudgetInfeasibleError:
    """No step fits whose peak is the plan's prediction: the budget the lowest peak found needs (with its
    headroom), or, when the smallest plan runs as planned, the plans' own error."""
    needed = budget_for_peak(lowest, budget.headroom) + budget.held_elsewhere_bytes
    if below is not None and needed <= below.minimum:
        return below
    tried = "; ".join(f"planned for {format_bytes(a.target_bytes)}: peak {format_bytes(a.predicted_peak_bytes)}"
                      for a in attempts)
    return BudgetInfeasibleError(budget.total_bytes, max(needed, below.minimum if below else 0), where,
                                 f"{why + '. ' if why else ''}Tried: {tried}",
                                 proven=None if below is None else below.proven_minimum)
