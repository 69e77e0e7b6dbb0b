"""Fine-tune a GPT-2-style model under a memory budget on CPU, and print the measured peak of each step.

    python examples/finetune_gpt2.py [--budget 60MiB] [--steps 4] [--layers 4]
    memopt plan examples/finetune_gpt2.py:workload --arg layers=4 --budget 60MiB --png plan.png

The model is built from a config (random weights: nothing is downloaded) and
trained on random tokens. Without --budget, the budget is set halfway between
the smallest memopt can meet and the eager peak, so that memopt has to
recompute; the eager step is measured too, for comparison.
"""

import argparse
import dataclasses

import torch

import memopt
from memopt import examples


def workload(layers: int = 4) -> examples.Workload:
    """The model this script fine-tunes (with dropout), its batch and its optimizer: the CLI's FACTORY."""
    made = examples.gpt2(layers=layers, width=128, heads=4, seq=128, batch=4, vocab=2048, dropout=0.1)
    return dataclasses.replace(made, optimizer_kwargs={"lr": 1e-3})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default=None, help="e.g. 60MiB; default: halfway from memopt's minimum to eager")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)

    made = workload(args.layers)
    model, batch = made.build(), made.inputs()
    optimizer = made.optimizer(model)
    eager = memopt.plan(model, batch, optimizer=optimizer)
    if args.budget is None:
        try:
            memopt.plan(model, batch, optimizer=optimizer, budget=1)
        except memopt.BudgetInfeasibleError as error:
            budget = (error.minimum + eager.peak_bytes) // 2
    else:
        budget = memopt.parse_budget(args.budget)
    print(f"{made.description}; AdamW; eager step predicted at {memopt.format_bytes(eager.peak_bytes)}, "
          f"budget {memopt.format_bytes(budget)}")

    trained = memopt.compile(model, budget=budget, optimizer=optimizer)

    def step() -> torch.Tensor:
        loss = trained(**batch)
        loss.backward()
        optimizer.step()
        return loss.detach()

    # The first call plans the step, measuring kernels' scratch under a profiler of its own: measure_peak
    # measures a warm call
    step()
    over = 0
    for number in range(1, args.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        measured = memopt.measure_peak(step)
        over += measured.peak_bytes > budget
        print(f"step {number}: loss {measured.result.item():.4f}, measured peak "
              f"{memopt.format_bytes(measured.peak_bytes)} ({'under' if measured.peak_bytes <= budget else 'OVER'} "
              f"budget), predicted {memopt.format_bytes(trained.plan.peak_bytes)}")
    recomputed = [d for d in trained.plan.decisions if d.action == "recompute"]
    print(f"\nmemopt recomputes {len(recomputed)} of {len(trained.plan.decisions)} activations "
          f"({memopt.format_bytes(sum(d.bytes for d in recomputed))}); solver {trained.plan.solver.name}: "
          f"{trained.plan.solver.status}")
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
