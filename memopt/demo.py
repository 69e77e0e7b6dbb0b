"""The README's first command: plan a small GPT-2's training step, run it, and compare.

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
    plan = plan.with_measurement(measured.peak_bytes)
    print(plan)
    print(f"\nplot: {plan.plot(args.png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
