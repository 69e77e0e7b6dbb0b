"""The largest value of a workload's argument that fits a budget: the search, and the CLI's --largest."""

from __future__ import annotations

import pytest
import torch

import memopt
from memopt.cli import main


def _fits_up_to(limit: int, planned: list[int]):
    def plan_at(value: int) -> str:
        planned.append(value)
        if value > limit:
            raise memopt.BudgetInfeasibleError(1, value, "the test")
        return f"plan at {value}"

    return plan_at


@pytest.mark.parametrize("limit, start, step", [(1000, 64, 1), (1000, 4096, 1), (37, 1, 1), (5000, 256, 256),
                                                (255, 256, 256), (1, 1, 1), (0, 8, 1)])
def test_the_search_finds_the_largest_multiple_of_step_that_fits(limit, start, step) -> None:
    planned: list[int] = []
    found = memopt.largest_fitting(_fits_up_to(limit, planned), name="batch", start=start, step=step)
    expected = limit // step * step
    assert found.value == expected
    assert found.plan == (f"plan at {expected}" if expected else None)
    assert all(value % step == 0 for value in planned) and len(planned) == len(set(planned))
    assert [v for v, _ in found.tried] == planned
    assert len(planned) <= 2 * (max(limit, start) // step).bit_length() + 2  # doubling or halving, then bisecting


def test_the_search_stops_at_its_limit_and_refuses_a_bad_start() -> None:
    found = memopt.largest_fitting(_fits_up_to(10**9, []), name="seq", start=100, step=10, limit=1234)
    assert found.value == 1230
    with pytest.raises(memopt.MemoptError, match="start >= 1"):
        memopt.largest_fitting(_fits_up_to(10, []), name="seq", start=0)


def tiny(batch: int = 8):
    """A factory whose batch grows the activations."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    return model, (torch.randn(batch, 64),), lambda out: out.sum()


def test_the_cli_finds_the_largest_batch_under_a_budget_and_plans_it(capsys) -> None:
    target = f"{__file__}:tiny"
    budget = int(memopt.plan(*tiny(16)[:2], loss_fn=tiny()[2]).peak_bytes * 1.1)  # batch 16 fits, as traced
    assert main(["plan", target, "--budget", str(budget), "--largest", "batch", "--quiet", "--json"]) == 0
    out = capsys.readouterr().out
    first, _, rest = out.partition("\n")
    assert first.startswith("largest batch that fits: ")
    value = int(first.split(": ")[1].split()[0])
    assert value >= 16
    # one more row does not fit that budget (the search's answer is a plan's, checked here by planning)
    memopt.plan(*tiny(value)[:2], loss_fn=tiny()[2], budget=budget)
    with pytest.raises(memopt.BudgetInfeasibleError):
        memopt.plan(*tiny(value + 1)[:2], loss_fn=tiny()[2], budget=budget)
    assert '"budget_bytes"' in rest
    assert main(["plan", target, "--largest", "batch", "--quiet"]) == 2
    assert "give --budget too" in capsys.readouterr().err
