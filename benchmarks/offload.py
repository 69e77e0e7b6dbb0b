"""Offload beside remat alone on the h100 spec: predicted recompute time and stall at the same budgets.

Plans only (fake tensors, nothing runs), so it runs on a laptop: for each workload, the smallest
budget remat alone can meet, then that budget and lower ones with offload on. Writes
``benchmarks/offload.json`` and the table in ``benchmarks/OFFLOAD.md``.

    python -m benchmarks.offload
"""

from __future__ import annotations

import json
import pathlib
import time

import memopt
from memopt import examples

HERE = pathlib.Path(__file__).parent
WORKLOADS = {
    "mlp": lambda: examples.mlp(width=512, depth=8, batch=4096),
    "gpt2": lambda: examples.gpt2(layers=4, width=256, heads=4, seq=256, batch=8, vocab=2048, dropout=0.1),
}
FRACTIONS = (1.0, 0.9, 0.8, 0.7)  # of the smallest budget remat alone can meet


def _plan(workload, model, inputs, budget, offload):
    started = time.perf_counter()
    try:
        plan = memopt.plan(model, inputs, loss_fn=workload.loss_fn, optimizer=workload.optimizer(model),
                           budget=budget, device="h100", offload=offload)
    except memopt.BudgetInfeasibleError as error:
        return {"fits": False, "minimum": error.minimum, "seconds": time.perf_counter() - started}
    o = plan.to_dict().get("offload") or {}
    return {
        "fits": True,
        "peak_bytes": plan.peak_bytes,
        "recompute_s": o.get("recompute_s", plan.solver.objective or 0.0),
        "predicted_stall_s": o.get("predicted_stall_s", 0.0),
        "offloaded": o.get("tensors", 0),
        "bytes_to_host": o.get("bytes_to_host", 0),
        "host_peak_bytes": o.get("host_peak_bytes", 0),
        "recomputed": sum(d.action == "recompute" for d in plan.decisions),
        "seconds": time.perf_counter() - started,
    }


def run() -> list[dict]:
    rows = []
    for name, make in WORKLOADS.items():
        workload = make()
        model, inputs = workload.build(), workload.inputs()
        smallest = _plan(workload, model, inputs, 1, False)["minimum"]
        for fraction in FRACTIONS:
            budget = int(smallest * fraction)
            rows.append({"workload": name, "budget_bytes": budget, "fraction_of_remat_smallest": fraction,
                         "remat": _plan(workload, model, inputs, budget, False),
                         "offload": _plan(workload, model, inputs, budget, True)})
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| workload | budget MiB (x remat's smallest) | remat: recompute s | offload: recompute s | "
             "offload: stall s | offloaded (MiB each way) | host pool MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        remat, off = r["remat"], r["offload"]
        rm = f"{remat['recompute_s']:.3g}" if remat["fits"] else "does not fit"
        if off["fits"]:
            cells = [f"{off['recompute_s']:.3g}", f"{off['predicted_stall_s']:.3g}",
                     f"{off['offloaded']} ({_mib(off['bytes_to_host'])})", _mib(off["host_peak_bytes"])]
        else:
            cells = ["does not fit"] * 4
        lines.append(f"| {r['workload']} | {_mib(r['budget_bytes'])} ({r['fraction_of_remat_smallest']:.1f}) | "
                     f"{rm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    rows = run()
    (HERE / "offload.json").write_text(json.dumps(rows, indent=2))
    text = table(rows)
    print(text)
    (HERE / "OFFLOAD.md").write_text(
        "# Offload beside remat alone (h100 spec, predicted)\n\n"
        "Made by `python -m benchmarks.offload`: plans on fake tensors with `device=\"h100\"` (55 GB/s host "
        "link each way), budgets from the smallest that remat alone can meet down to 70% of it. Times are the "
        "plan's predictions (roofline recompute seconds, exposed transfer seconds), not measurements: no GPU "
        "was available. \"does not fit\": no plan under that budget.\n\n" + text + "\n")


if __name__ == "__main__":
    main()
