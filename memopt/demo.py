"""The README's first command: plan a small GPT-2's training step, fit it under a budget, run and measure.

    python -m memopt.demo [--png plan.png]
"""

from __future__ import annotations

import argparse
import sys

import memopt
from memopt import examples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memopt.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--png", default="memopt-demo-plan.png", help="where to write the timeline plot")
    args = parser.parse_args(argv)

    workload = examples.tiny_gpt2()
    model, inputs = workload.build(), workload.inputs()
    optimizer = workload.optimizer(model)
    print(f"workload: {workload.description}, {type(optimizer).__name__}\n")

    plan = memopt.plan(model, inputs, optimizer=optimizer)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    for _ in range(2):  # the first step creates the optimizer state: measure a steady-state step
        train_step()
    optimizer.zero_grad(set_to_none=True)
    measured = memopt.measure_peak(train_step)
    eager = plan.with_measurement(measured.peak_bytes)
    print(eager)

    # a budget two thirds of the way from the smallest memopt can meet to the eager peak
    try:
        memopt.plan(model, inputs, optimizer=optimizer, budget=1)
    except memopt.BudgetInfeasibleError as error:
        smallest = error.minimum
    budget = smallest + (eager.peak_bytes - smallest) * 2 // 3
    print(f"\n--- memopt.compile(model, budget={budget:,}) ({memopt.format_bytes(budget)}; the smallest memopt "
          f"can meet is {memopt.format_bytes(smallest)}) ---\n")
    compiled = memopt.compile(model, budget=budget, optimizer=optimizer)

    def compiled_step():
        optimizer.zero_grad(set_to_none=True)
        loss = compiled(**inputs)  # the compiled module returns the loss
        loss.backward()  # the planned backward: recomputes what the plan says
        optimizer.step()
        return loss.detach()

    compiled_step()
    optimizer.zero_grad(set_to_none=True)
    measured = memopt.measure_peak(compiled_step)
    planned = compiled.plan.with_measurement(measured.peak_bytes)
    print(planned)
    verdict = "under" if measured.peak_bytes <= budget else "OVER"
    print(f"\nmeasured peak {memopt.format_bytes(measured.peak_bytes)} is {verdict} the budget "
          f"{memopt.format_bytes(budget)}; eager measured {memopt.format_bytes(eager.measured.peak_bytes)}")
    print(f"plot: {planned.plot(args.png)}")
    return 0 if measured.peak_bytes <= budget else 1


if __name__ == "__main__":
    sys.exit(main())
