"""Plan a Llama-7B-shaped training step from shapes alone (no weights, no GPU needed).

    python examples/plan_llama7b.py [--budget 80GB] [--device h100] [--seq 4096]
    memopt plan examples/plan_llama7b.py:workload --arg seq=4096 --device h100 --png plan.png

The model is built on the meta device, so planning allocates nothing; the
printout is the ledger of an eager step with AdamW, and whether it fits.
"""

import argparse
import resource
import time

import torch

import memopt
from memopt import examples


def workload(seq: int = 4096, batch: int = 1) -> examples.Workload:
    """Llama-7B's shape on the meta device with AdamW: the CLI's FACTORY."""
    return examples.llama7b(seq=seq, batch=batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default=None, help="e.g. 80GB; none: describe the eager step")
    parser.add_argument("--device", default="h100")
    parser.add_argument("--seq", type=int, default=4096)
    args = parser.parse_args()

    made = workload(args.seq)
    model = made.build()
    started = time.perf_counter()
    try:
        plan = memopt.plan(model, made.inputs(), optimizer=torch.optim.AdamW, budget=args.budget,
                           device=args.device)
    except memopt.BudgetInfeasibleError as error:
        print(f"does not fit: {error}")
        return
    print(plan)
    n = sum(p.numel() for p in model.parameters())
    static = sum(plan.static_ledger.values())
    print(f"\n{n:,} parameters; static ledger {static:,} bytes = {static / n:.2f} bytes per parameter")
    print(f"planned in {time.perf_counter() - started:.1f} s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
