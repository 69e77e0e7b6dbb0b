"""Plan a Llama-7B-shaped training step from shapes alone (no weights, no GPU needed).

    python examples/plan_llama7b.py [--budget 24GB] [--device rtx4090] [--seq 4096] [--train-last 4]
    memopt plan examples/plan_llama7b.py:workload --arg seq=4096 --device h100 --png plan.png

The model is built on the meta device, so planning allocates nothing. First the
full fine-tune (fp32 weights, AdamW): does it fit the budget, and if not, the
smallest budget that would and why. Then what does fit a 24 GB card: bf16
weights with only the last ``--train-last`` layers trained; how much memopt
recomputes at batch 1, and the largest batch that fits, found by doubling and
bisecting over plans.
"""

import argparse
import dataclasses
import resource
import time

import torch

import memopt
from memopt import examples


def workload(seq: int = 4096, batch: int = 1, dtype: str = "float32", train_last: int | None = None
             ) -> examples.Workload:
    """Llama-7B's shape on the meta device with AdamW: the CLI's FACTORY.

    ``dtype`` is the weights' dtype; ``train_last`` trains only the last that many layers
    (the rest frozen: no gradients, no optimizer state, no saved activations for them).
    """
    base = examples.llama7b(seq=seq, batch=batch)

    def build() -> torch.nn.Module:
        model = base.build().to(getattr(torch, dtype))
        if train_last is not None:
            model.requires_grad_(False)
            model.model.layers[-train_last:].requires_grad_(True)
        return model

    return dataclasses.replace(base, build=build)


def plan_or_none(made: examples.Workload, model: torch.nn.Module, budget: str, device: str):
    try:
        return memopt.plan(model, made.inputs(), optimizer=torch.optim.AdamW, budget=budget, device=device)
    except memopt.BudgetInfeasibleError:
        return None


def largest_batch(seq: int, dtype: str, train_last: int, budget: str, device: str, limit: int = 256):
    """The largest batch whose step memopt can plan under ``budget``, and its plan (0 and None: not even one)."""
    found = {}

    def fits(batch: int) -> bool:
        made = workload(seq, batch, dtype, train_last)
        found[batch] = plan_or_none(made, made.build(), budget, device)
        return found[batch] is not None

    if not fits(1):
        return 0, None
    low = 1
    while low < limit and fits(2 * low):
        low *= 2
    high = min(2 * low, limit + 1)  # fits(low), not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low, found[low]  # (the plan the search made: planned again, a time-limited search may land elsewhere)


def describe(plan: memopt.MemoryPlan, device: str) -> str:
    recomputed = [d for d in plan.decisions if d.action == "recompute"]
    offloaded = [d for d in plan.decisions if d.action == "offload"]
    seconds = sum(d.cost_s for d in recomputed)
    text = (f"peak {memopt.format_bytes(plan.peak_bytes)} of {memopt.format_bytes(plan.budget_bytes)}; "
            f"recomputes {len(recomputed)} of {len(plan.decisions)} activations "
            f"({memopt.format_bytes(sum(d.bytes for d in recomputed))}), about {seconds * 1e3:.1f} ms per step "
            f"on {device}")
    if offloaded:
        text += (f"; offloads {len(offloaded)} ({memopt.format_bytes(sum(d.bytes for d in offloaded))}), "
                 f"predicted stall {plan.offload.predicted_stall_s * 1e3:.1f} ms")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="24GB")
    parser.add_argument("--device", default="rtx4090")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--train-last", type=int, default=4, help="layers trained in the bf16 plan")
    args = parser.parse_args()

    started = time.perf_counter()
    made = workload(args.seq)
    model = made.build()
    n = sum(p.numel() for p in model.parameters())
    print(f"Full fine-tune, fp32 weights, AdamW, batch 1, seq {args.seq}, {n:,} parameters:")
    try:
        plan = memopt.plan(model, made.inputs(), optimizer=torch.optim.AdamW, budget=args.budget,
                           device=args.device)
        print(f"  fits: {describe(plan, args.device)}")
    except memopt.BudgetInfeasibleError as error:
        print(f"  does not fit: {error}")

    print(f"\nbf16 weights, the last {args.train_last} layers trained, AdamW, seq {args.seq}:")
    made = workload(args.seq, 1, "bfloat16", args.train_last)
    plan = plan_or_none(made, made.build(), args.budget, args.device)
    if plan is None:
        print("  batch 1 does not fit either")
        return
    print(f"  batch 1: {describe(plan, args.device)}")
    best, plan = largest_batch(args.seq, "bfloat16", args.train_last, args.budget, args.device)
    print(f"  largest batch that fits: {best}: {describe(plan, args.device)}")
    print(f"\nplanned in {time.perf_counter() - started:.1f} s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
