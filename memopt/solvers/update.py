"""Which parameter tensors a sparse update trains: a multiple-choice knapsack (CP-SAT), plain data in and out.

Each tensor offers options, each with the bytes it adds to the step and the contribution it is scored with;
exactly one option per tensor is taken, the bytes taken stay within a capacity, and the summed contribution is
as large as the solver can prove. Option 0 of every tensor is expected to cost nothing (frozen), so that every
capacity has a solution.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

_SCORE_UNITS = 10**6  # the largest option's score, in the integer units CP-SAT maximizes


@dataclass(frozen=True, slots=True)
class UpdateOption:
    name: str  # "frozen", "whole", ...
    nbytes: int  # what taking it adds to the step (gradient and optimizer state of what it updates)
    score: float  # its contribution (the proxy the caller names)


@dataclass(frozen=True)
class UpdateProblem:
    tensors: tuple[str, ...]
    options: tuple[tuple[UpdateOption, ...], ...]  # per tensor
    capacity: int  # bytes the options taken may add, in all


@dataclass(frozen=True)
class UpdateSolution:
    status: str  # "optimal" | "feasible" | "infeasible"
    chosen: tuple[int, ...]  # per tensor: the option taken
    score: float
    bound: float  # no choice within the capacity scores more (CP-SAT's bound, in the caller's units)
    nbytes: int
    seconds: float

    @property
    def gap(self) -> float:
        return 0.0 if self.bound <= 0 else max(0.0, (self.bound - self.score) / self.bound)


def solve_update(problem: UpdateProblem, *, time_limit_s: float = 5.0) -> UpdateSolution:
    """The options that maximize the summed score with their bytes within ``problem.capacity``."""
    from ortools.sat.python import cp_model

    started = time.perf_counter()
    largest = max((option.score for options in problem.options for option in options), default=0.0)
    unit = largest / _SCORE_UNITS if largest > 0 else 1.0
    model = cp_model.CpModel()
    picks = []
    for k, options in enumerate(problem.options):
        row = [model.NewBoolVar(f"t{k}o{j}") for j in range(len(options))]
        model.AddExactlyOne(row)
        picks.append(row)
    model.Add(sum(option.nbytes * var for options, row in zip(problem.options, picks)
                  for option, var in zip(options, row)) <= problem.capacity)
    model.Maximize(sum(round(option.score / unit) * var for options, row in zip(problem.options, picks)
                       for option, var in zip(options, row)))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = 1  # (the same answer on any machine)
    status = solver.Solve(model)
    seconds = time.perf_counter() - started
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return UpdateSolution("infeasible", (), 0.0, 0.0, 0, seconds)
    chosen = tuple(next(j for j, var in enumerate(row) if solver.Value(var)) for row in picks)
    taken = [options[j] for options, j in zip(problem.options, chosen)]
    score = sum(option.score for option in taken)
    bound = solver.BestObjectiveBound() * unit if status == cp_model.FEASIBLE else score
    return UpdateSolution("optimal" if status == cp_model.OPTIMAL else "feasible", chosen, score, max(bound, score),
                          sum(option.nbytes for option in taken), seconds)
