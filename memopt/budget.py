"""Byte budgets: parsing ("24GB", "512MiB", 10**9), printing, the part of a budget memopt plans for, and
the one typed budget the fit loop carries."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from memopt.errors import BudgetParseError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_budget(value: int | str | None) -> int | None:
    """Bytes from a budget: an int, or a string with a Hugging Face style unit.

    "GB"/"MB" are powers of ten, "GiB"/"MiB" powers of two, a bare number is bytes.
    None stays None (no budget). Anything else raises BudgetParseError.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise BudgetParseError(value)
    if isinstance(value, int):
        if value <= 0:
            raise BudgetParseError(value)
        return value
    if not isinstance(value, str):
        raise BudgetParseError(value)
    match = _PATTERN.match(value)
    if match is None or match.group(2).lower() not in _UNITS:
        raise BudgetParseError(value)
    number, unit = match.groups()
    scale = _UNITS[unit.lower()]
    if "." in number:
        whole, _, frac = number.partition(".")
        # exact decimal arithmetic: "1.5GB" is 1_500_000_000 bytes, not a float rounding of it
        nbytes = (int(whole or 0) * 10 ** len(frac) + int(frac or 0)) * scale // 10 ** len(frac)
    else:
        nbytes = int(number) * scale
    if nbytes <= 0:
        raise BudgetParseError(value)
    return nbytes


def format_bytes(nbytes: int | float) -> str:
    """'1.50 GiB', '512.00 MiB', '100 B': powers of two, for people."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def planned_part(budget: int, headroom: float) -> int:
    """The peak memopt plans for under ``budget``: the budget less its headroom (or, for a peak read from code, less
    ``CODE_SLACK``)."""
    return budget - math.ceil(budget * headroom)


# the share of the budget a peak read from Inductor's code leaves free (its limit is ``planned_part(budget,
# CODE_SLACK)``): the replay of its wrapper does not see what the allocator adds around the buffers (the slow test
# of tests/test_inductor.py measures it)
CODE_SLACK = 0.002


def budget_for_peak(peak: int, headroom: float) -> int:
    """The smallest budget whose planned part holds ``peak`` (exact in integers, whatever the float rounding)."""
    budget = math.ceil(peak / (1 - headroom))
    while planned_part(budget, headroom) < peak:
        budget += 1
    while budget > 1 and planned_part(budget - 1, headroom) >= peak:
        budget -= 1
    return budget


@dataclass(frozen=True, slots=True)
class Budget:
    """The one budget value the loop carries.

    ``total_bytes`` is the user's; ``held_elsewhere_bytes`` what stays on the device
    beside this step while it runs (the rest of the model and the graphs compiled
    before it, under the backend); ``headroom`` the share of what is left that plans
    keep free for what a prediction does not see.
    """

    total_bytes: int
    headroom: float
    held_elsewhere_bytes: int = 0

    @property
    def available_bytes(self) -> int:
        """What this step may peak at: the limit for a step whose peak is read from its code."""
        return self.total_bytes - self.held_elsewhere_bytes

    @property
    def planned_bytes(self) -> int:
        """What a plan of this step aims at, and the limit for a step whose peak is the plan's prediction."""
        return planned_part(self.available_bytes, self.headroom)
