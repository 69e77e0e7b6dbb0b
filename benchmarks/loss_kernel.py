"""The fused linear + cross-entropy kernel against the chunked loss-head graph, as planned for an H100.

GPT-2 with its real vocabulary (50257), planned from shapes (``fake=True``) on the ``h100`` preset: the traced
head, the head over 8 and 32 slices of the tokens (the chunked graph), and memopt's fused kernel
(``chunk_loss="kernel"``, its Triton code). Per variant: the step's own peak (no recomputation), the smallest
budget memopt can meet, the bytes the head holds at once, and the step's time predicted by memopt's roofline
cost model (the sum of its ops' ``node_seconds`` on the preset; the kernel's by its FLOPs). Predicted, not
measured: no GPU here. The kernel's correctness and its CPU path's measured memory are in tests/test_kernels.py.

    python benchmarks/loss_kernel.py           # ~5 min on 2 cores; writes loss_kernel.json, LOSS_KERNEL.md
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import memopt
from memopt import examples
from memopt.passes.costs import node_seconds

HERE = Path(__file__).parent
VARIANTS: dict[str, int | str] = {"traced head": 1, "chunked graph, 8 slices": 8, "chunked graph, 32 slices": 32,
                                  "fused kernel": "kernel"}


def measure(model: torch.nn.Module, inputs: dict, chunk_loss: int | str) -> dict:
    optimizer = (torch.optim.AdamW, {"lr": 1e-4})
    started = time.perf_counter()
    # a budget nothing needs: the variant's step as it is, recomputing nothing
    plan = memopt.plan(model, inputs, optimizer=optimizer, device="h100", fake=True, budget=10**12,
                       chunk_loss=chunk_loss)
    try:
        memopt.plan(model, inputs, optimizer=optimizer, device="h100", fake=True, budget=1, chunk_loss=chunk_loss)
    except memopt.BudgetInfeasibleError as error:
        smallest = error.minimum
    device = plan.device
    seconds = sum(node_seconds(node, device) for node in plan.program.graph.graph.nodes)
    head = plan.chunked[0] if plan.chunked else None
    return {"peak_bytes": plan.peak_bytes, "smallest_budget_bytes": smallest, "predicted_step_s": seconds,
            "head_bytes_at_once": head.chunk_bytes if head else None, "kernel": head.kernel if head else "",
            "logits_bytes": head.logits_bytes if head else None, "plan_seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    workload = examples.gpt2(layers=2, width=768, heads=12, seq=512, batch=4, vocab=50257)
    torch.manual_seed(0)
    model, inputs = workload.build(), workload.inputs()
    rows = {}
    for name, chunk_loss in VARIANTS.items():
        rows[name] = measure(model, inputs, chunk_loss)
        print(name, rows[name], flush=True)
    results = {"workload": workload.description, "device": "h100 (preset, planned from shapes)", "rows": rows,
               "machine": platform.platform(), "versions": {"torch": torch.__version__}}
    out = Path(args.out)
    (out / "loss_kernel.json").write_text(json.dumps(results, indent=2))
    (out / "LOSS_KERNEL.md").write_text(report(results))


def report(results: dict) -> str:
    mib = 2**20
    traced = results["rows"]["traced head"]
    lines = ["# The fused loss kernel against the chunked graph (predicted, H100 preset)", "",
             (f"Written by `python benchmarks/loss_kernel.py`. {results['workload']}, AdamW, planned from shapes on "
              "the h100 preset. Peaks and budgets are memopt's plans (the CPU path of the kernel is measured against "
              "its plan in tests/test_kernels.py); step times are memopt's roofline model of the preset, not "
              "measurements: no GPU was used."), "",
             ("| variant | step's own peak (MiB) | smallest budget (MiB) | head holds at once (MiB) | predicted step "
              "(ms) | vs traced |"), "|---|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        held = row["head_bytes_at_once"] if row["head_bytes_at_once"] is not None else None
        lines.append(f"| {name} | {row['peak_bytes'] / mib:.1f} | {row['smallest_budget_bytes'] / mib:.1f} | "
                     f"{'whole logits' if held is None else f'{held / mib:.3f}'} | "
                     f"{row['predicted_step_s'] * 1e3:.2f} | {row['predicted_step_s'] / traced['predicted_step_s']:.2f}x |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
