"""The one loop from plan to running step: plan, lower, read the lowered step's peak, re-plan or reclaim.

Every entry point (``memopt.compile`` with any lowering, the torch.compile
backend) builds a ``plan_at(target)`` (the step planned for a target number
of bytes) and a lowering, and calls ``fit``; nothing else re-plans for a
lowering. A lowering (``memopt.lower.lowering.Lowering``) compiles a plan
under some options and says what the compiled step holds at its peak.

The loop, top to bottom:
1. plan for what the budget leaves this step; below every plan, the smallest
   plan, whose lowered step says what this lowering needs;
2. lower it; over the limit, the lowering's variants (Inductor passes off) are
   tried in order, then the plan is made again for a target lower by the
   excess (down to the smallest plan), ``lowering.replans`` times;
3. still over, with a lowering whose code can hold less than its plan
   (Inductor's fused kernels): plans a little above the smallest;
4. under, with budget to spare (and the code's peak read from the code):
   plans for larger targets, less recomputation, while their code fits; where
   the plan slices a loss head or an MLP by choice, the same for the plans
   that slice nothing, and the faster of both by the cost model runs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memopt.budget import Budget, planned_part
from memopt.errors import BudgetInfeasibleError
from memopt.lower.lowering import Lowered, Lowering
from memopt.report.plan import CompileAttempt, MemoryPlan

log = logging.getLogger(__name__)

RECLAIM_FRACTION = 0.01  # of the budget: the smallest step between two plan targets worth a plan and a compile
RECLAIM_COMPILES = 6  # compiles spent looking for the plan that uses what the code left unused
ABOVE_FACTORS = (1.05, 1.1, 1.2)  # plans for targets this much above the smallest, tried when nothing lower fits


@dataclass(frozen=True)
class Fitted:
    """The step that runs, and the plan that says so (the user's budget, the lowered peak, every compile tried)."""

    plan: MemoryPlan
    lowered: Lowered
    attempts: tuple[CompileAttempt, ...]


def fit(plan_at: Callable[[int], Any], budget: Budget, lowering: Lowering) -> Fitted:
    """The lowered step for ``budget``: planned by ``plan_at(target)``, compiled by ``lowering``.

    ``plan_at(target)`` plans this step to peak within ``target`` less the headroom and
    returns a ``MemoryPlan`` (the loop reads ``choices`` and hands it to the lowering),
    or raises ``BudgetInfeasibleError`` naming the smallest whole budget (what is held
    elsewhere included). Raises ``BudgetInfeasibleError`` whose ``minimum`` is the
    smallest budget this lowering was seen to meet (``lowering.infeasible`` words it).
    """
    search = _Search(plan_at, budget, lowering)
    target = budget.available_bytes
    try:
        planned = plan_at(target)
    except BudgetInfeasibleError as error:
        # below every plan: the smallest plan's lowered step says what this lowering needs (and the code of
        # a reclaiming lowering, for the smallest plan or one a little above it, can still fit)
        search.below = error
        target = error.minimum - budget.held_elsewhere_bytes
        planned = plan_at(target)
    planned_targets = [target]
    first_variant = 0
    for replan in range(lowering.replans + 1 if search.below is None else 1):
        if replan:
            try:
                planned = plan_at(target)
            except BudgetInfeasibleError as error:
                # no plan that low: the smallest is the last one left to try
                target = error.minimum - budget.held_elsewhere_bytes
                if target in planned_targets:
                    break
                planned = plan_at(target)
            planned_targets.append(target)
        found = search.variants(planned, target, first_variant)
        if found is not None:
            if replan == 0 and search.below is None and lowering.reclaims:
                best = search.reclaimed(found, planned, target, plan_at)
                if best.plan.chunked or best.plan.chunked_mlp:
                    # the code of a whole loss head or MLP can hold far less than its plan counts (Inductor fuses
                    # the head's log-softmax into its backward and writes the logits' gradient over a saved
                    # tensor), so the plans slicing nothing are searched too; the faster by the cost model runs
                    whole = search.whole(best, target)
                    if whole is not None and whole.plan.modelled_seconds < best.plan.modelled_seconds:
                        best = whole
                return search.done(best)
            return search.done(found)
        best_peak, first_variant = search.best_over
        target -= best_peak - search.limit
    if lowering.reclaims:
        # no plan lower fits: the code of a plan that recomputes less can still peak lower
        smallest = min(planned_targets)
        for factor in ABOVE_FACTORS:
            above = math.ceil(smallest * factor)
            try:
                planned = plan_at(above)
            except BudgetInfeasibleError:
                continue
            found = search.variants(planned, above, 0, only=dict.fromkeys((0, first_variant)))
            if found is not None:
                return search.done(found)
    raise search.infeasible()


class _Search:
    """The attempts of one ``fit`` call and the steps it takes over them."""

    def __init__(self, plan_at: Callable[[int], Any], budget: Budget, lowering: Lowering) -> None:
        self.plan_at, self.budget, self.lowering = plan_at, budget, lowering
        # what a lowered step must not exceed: the budget less the lowering's slack when its peak is read from
        # its code, else the planned part (the headroom covers what the prediction does not see)
        self.limit = (planned_part(budget.available_bytes, lowering.code_slack) if lowering.reads_code
                      else budget.planned_bytes)
        self.attempts: list[CompileAttempt] = []
        self.lowered: list[tuple[Lowered, int]] = []  # each compile and the variant it was made with
        self.below: BudgetInfeasibleError | None = None
        self.best_over = (0, 0)  # the lowest peak over the limit at the last plan, and its variant

    def compile(self, planned: Any, target: int, variant: int, reuse: Lowered | None = None) -> Lowered:
        lowered = self.lowering.lower(planned, self.lowering.variants[variant], reuse=reuse, limit=self.limit)
        self.lowered.append((lowered, variant))
        plan = lowered.plan
        modelled, sliced = (plan.modelled_seconds, plan.sliced) if isinstance(plan, MemoryPlan) else (None, "")
        self.attempts.append(CompileAttempt(target, dict(lowered.options), lowered.forward_peak_bytes,
                                            lowered.backward_peak_bytes, lowered.peak_bytes, lowered.seconds,
                                            modelled_seconds=modelled, sliced=sliced))
        log.info("%s: plan for %d B, options %s: peak %d B (limit %d B)", self.lowering.name, target,
                 lowered.options, lowered.peak_bytes, self.limit)
        return lowered

    def variants(self, planned: Any, target: int, first: int, only: Any = None) -> Lowered | None:
        """The first variant whose step fits, each compiled reusing the programs of the last that fit."""
        reuse, best = None, None
        for variant in only or range(first, len(self.lowering.variants)):
            lowered = self.compile(planned, target, variant, reuse)
            if lowered.peak_bytes <= self.limit:
                return lowered
            if best is None or lowered.peak_bytes < best[0]:
                best = (lowered.peak_bytes, variant)
            reuse = lowered
        assert best is not None
        self.best_over = best
        return None

    def done(self, lowered: Lowered) -> Fitted:
        chosen = max(i for i, (candidate, _) in enumerate(self.lowered) if candidate is lowered)
        attempts = list(self.attempts)
        attempts[chosen] = dataclasses.replace(attempts[chosen], chosen=True)
        plan = lowered.plan
        if isinstance(plan, MemoryPlan):
            # the plan may have been made for more or less than the budget: the budget is the user's, and
            # the peak that holds it the lowered step's
            reads_code = self.lowering.reads_code
            plan = dataclasses.replace(plan, budget_bytes=self.budget.total_bytes,
                                       compiled_peak_bytes=lowered.peak_bytes if reads_code else None,
                                       compiles=tuple(attempts) if reads_code else ())
        return Fitted(plan, lowered, tuple(attempts))

    def whole(self, sliced: Lowered, target: int) -> Lowered | None:
        """Of the plans that slice nothing ``sliced`` sliced by choice, from ``target`` up, the one ``reclaimed``
        finds (None: none differs from ``sliced``, or the first one's code is over the limit)."""

        def plan_at(target: int) -> Any:
            return self.plan_at(target, sliced=False)

        try:
            planned = plan_at(target)
        except BudgetInfeasibleError:
            return None
        if planned.choices == sliced.plan.choices:
            return None
        lowered = self.compile(planned, target, self.variant_of(sliced))
        if lowered.peak_bytes > self.budget.planned_bytes:
            return None
        return self.reclaimed(lowered, planned, target, plan_at)

    def reclaimed(self, lowered: Lowered, planned: Any, target: int, plan_at: Callable[[int], Any]) -> Lowered:
        """The step planned by ``plan_at`` for the largest target found whose code still peaks under the planned
        part.

        The code of a plan peaks below it by an amount that varies from plan to plan (the code's peak is
        not even monotone in the plan's target), so the plan is searched for, one compile a step. ``low``
        is the largest target whose code fit, ``high`` the smallest whose code did not. Next is ``low``
        plus what its code left unused while no plan has been over; then the target where the line through
        the two codes' peaks meets the limit (halfway, after two plans over in a row), kept
        ``RECLAIM_FRACTION`` of the budget inside both ends. It stops at ``RECLAIM_COMPILES`` compiles, at
        a step smaller than that fraction, or at a plan that recomputes, offloads and slices nothing. A plan
        with the choices of the last that fit is that step (no compile).
        """
        limit = self.budget.planned_bytes
        resolution = math.ceil(RECLAIM_FRACTION * self.budget.available_bytes)
        best, best_plan = lowered, planned
        low, high = target, None
        compiles = plans = overs = 0  # overs: plans over the limit in a row
        while compiles < RECLAIM_COMPILES and plans < 2 * RECLAIM_COMPILES and best_plan.choices != ():
            low_peak = best.peak_bytes
            if high is None:
                following = low + (limit - low_peak)
            else:
                high_target, high_peak = high
                slope = (high_peak - low_peak) / (high_target - low)
                secant = overs < 2 and slope > 0
                guess = low + (limit - low_peak) / slope if secant else (low + high_target) / 2
                following = min(max(math.floor(guess), low + resolution), high_target - resolution)
            if following - low < resolution:
                break
            try:
                candidate = plan_at(following)
            except BudgetInfeasibleError:
                break
            plans += 1
            if candidate.choices is not None and candidate.choices == best_plan.choices:
                low = following  # the same plan: the same code, which fits
                continue
            compiled = self.compile(candidate, following, self.variant_of(best))
            compiles += 1
            if compiled.peak_bytes <= limit:
                best, best_plan, low, overs = compiled, candidate, following, 0
            else:
                high, overs = (following, compiled.peak_bytes), overs + 1
        return best

    def variant_of(self, lowered: Lowered) -> int:
        return next(variant for candidate, variant in self.lowered if candidate is lowered)

    def infeasible(self) -> BudgetInfeasibleError:
        """Nothing fits: the lowering's own smallest budget, from the lowest peak its steps reached."""
        lowest = min(a.predicted_peak_bytes for a in self.attempts)
        return self.lowering.infeasible(self.budget, lowest, tuple(self.attempts), self.below)
