"""How long planning takes on a ~10k-node joint graph: an 80-layer GPT-2-shaped model, fake mode.

    python -m benchmarks.plan_speed [--layers 80] [--repeats 3]

Builds the model on the meta device (shapes only), plans the eager step, then
plans under a budget halfway between the smallest memopt can meet and the eager
peak, and reports each pass's seconds (medians over repeats). Writes
benchmarks/plan_speed.json and benchmarks/PLAN_SPEED.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import memopt
from memopt import examples

HERE = Path(__file__).resolve().parent


def plan_once(layers: int) -> dict:
    workload = examples.gpt2(layers=layers)
    with torch.device("meta"):
        model = workload.build()
    inputs = {k: v.to("meta") for k, v in workload.inputs().items()}
    eager = memopt.plan(model, inputs, optimizer=torch.optim.AdamW, fake=True)
    try:
        memopt.plan(model, inputs, optimizer=torch.optim.AdamW, fake=True, budget=1)
    except memopt.BudgetInfeasibleError as error:
        smallest = error.minimum
    budget = (smallest + eager.peak_bytes) // 2
    started = time.perf_counter()
    plan = memopt.plan(model, inputs, optimizer=torch.optim.AdamW, fake=True, budget=budget)
    total = time.perf_counter() - started
    passes: dict[str, float] = {}
    for record in plan.history:
        passes[record.name] = passes.get(record.name, 0.0) + record.seconds
    return {
        "nodes_traced": eager.graph_nodes, "nodes_planned": plan.graph_nodes, "budget_bytes": budget,
        "eager_peak_bytes": eager.peak_bytes, "peak_bytes": plan.peak_bytes, "total_s": total,
        "capture_s": passes.get("capture", 0.0), "planning_s": total - passes.get("capture", 0.0),
        "passes_s": passes, "solver": plan.solver.name, "status": plan.solver.status, "gap": plan.solver.gap,
        "recomputed": sum(d.recomputed for d in plan.decisions), "decisions": len(plan.decisions),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args(argv)
    runs = [plan_once(args.layers) for _ in range(args.repeats)]
    median = {key: statistics.median(run[key] for run in runs) for key in ("total_s", "capture_s", "planning_s")}
    passes = {name: statistics.median(run["passes_s"][name] for run in runs) for name in runs[0]["passes_s"]}
    result = {"layers": args.layers, "runs": runs, "median": median, "median_passes_s": passes}
    out = Path(args.out)
    (out / "plan_speed.json").write_text(json.dumps(result, indent=2))
    first = runs[0]
    lines = [
        "# Planning speed on a ~10k-node joint graph",
        "",
        f"GPT-2-shaped, {args.layers} layers, built on the meta device (fake mode), AdamW; budget halfway between "
        f"the smallest memopt can meet and the eager peak. `python -m benchmarks.plan_speed`; medians of "
        f"{args.repeats} runs on this machine (2 cores, shared).",
        "",
        f"- joint graph: {first['nodes_traced']:,} ATen nodes traced, {first['nodes_planned']:,} after the rewrite "
        f"({first['recomputed']} of {first['decisions']} activations recomputed)",
        f"- peak {first['eager_peak_bytes'] / 2**30:.2f} GiB eager -> {first['peak_bytes'] / 2**30:.2f} GiB planned, "
        f"solver {first['solver']} ({first['status']}, gap to its lower bound {first['gap']:.1%})",
        f"- capture (make_fx on fake tensors): {median['capture_s']:.2f} s",
        f"- planning after capture: {median['planning_s']:.2f} s; in all {median['total_s']:.2f} s",
        "",
        "| pass | seconds (median) |",
        "|---|---|",
        *[f"| {name} | {seconds:.2f} |" for name, seconds in passes.items()],
        "",
    ]
    (out / "PLAN_SPEED.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
