"""Plan a Llama-7B-shaped training step from shapes alone (no weights, no GPU needed).

    python examples/plan_llama7b.py [--budget 80GB] [--device h100] [--seq 4096]

The model is built on the meta device, so planning allocates nothing; the
printout is the ledger of an eager step with AdamW, and whether it fits.
"""

import argparse
import resource
import time

import torch

import memopt
from memopt import examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default=None, help="e.g. 80GB; none: describe the eager step")
    parser.add_argument("--device", default="h100")
    parser.add_argument("--seq", type=int, default=4096)
    args = parser.parse_args()

    workload = examples.llama7b(seq=args.seq)
    model = workload.build()
    started = time.perf_counter()
    try:
        plan = memopt.plan(model, workload.inputs(), optimizer=torch.optim.AdamW, budget=args.budget,
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
