"""The largest value of one workload argument (the batch, the sequence length) whose step fits a budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from memopt.errors import BudgetInfeasibleError, MemoptError
from memopt.report.plan import MemoryPlan


@dataclass(frozen=True)
class Largest:
    """What the search found: the value (0: not even ``step`` fits), its plan, and every value it planned."""

    name: str
    value: int
    plan: MemoryPlan | None
    tried: tuple[tuple[int, bool], ...]  # (value, fits) in the order planned

    def __str__(self) -> str:
        tried = ", ".join(f"{v}{'' if fits else ' (no)'}" for v, fits in self.tried)
        if self.plan is None:
            return f"no {self.name} fits: tried {tried}"
        return f"largest {self.name} that fits: {self.value} (tried {tried})"


def largest_fitting(plan_at: Callable[[int], MemoryPlan], *, name: str, start: int, step: int = 1,
                    limit: int | None = None) -> Largest:
    """The largest multiple of ``step`` (up to ``limit``) at which ``plan_at`` plans the step: from ``start``,
    doubling while it fits or halving while it does not, then bisecting between the last two values.

    ``plan_at(value)`` plans under the budget and raises ``BudgetInfeasibleError`` where no plan fits; a plan is
    a prediction, so the value found is the largest memopt can plan, not a measurement.
    """
    if step < 1 or start < 1 or (limit is not None and limit < step):
        raise MemoptError(f"the search for the largest {name} needs start >= 1, step >= 1 and limit >= step; got "
                          f"start={start}, step={step}, limit={limit}")
    plans: dict[int, MemoryPlan | None] = {}
    tried: list[tuple[int, bool]] = []

    def fits(value: int) -> bool:
        if value not in plans:
            try:
                plans[value] = plan_at(value)
            except BudgetInfeasibleError:
                plans[value] = None
            tried.append((value, plans[value] is not None))
        return plans[value] is not None

    def capped(value: int) -> int:
        return value if limit is None else min(value, limit // step * step)

    value = capped(max(step, start // step * step))
    if fits(value):
        low = value
        high = None
        while high is None and capped(2 * low) > low:
            if fits(capped(2 * low)):
                low = capped(2 * low)
            else:
                high = capped(2 * low)
        if high is None:  # the limit fits
            return Largest(name, low, plans[low], tuple(tried))
    else:
        high = value
        low = 0
        while high > step:
            candidate = max(step, high // 2 // step * step)
            if fits(candidate):
                low = candidate
                break
            high = candidate
        if low == 0:
            return Largest(name, 0, None, tuple(tried))
    while high - low > step:  # fits(low), not fits(high)
        middle = (low + high) // 2 // step * step
        if middle <= low:
            break
        low, high = (middle, high) if fits(middle) else (low, middle)
    return Largest(name, low, plans[low], tuple(tried))
