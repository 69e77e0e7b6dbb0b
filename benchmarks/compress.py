"""compress=: the budget packing saved activations reaches, its measured peak, and training with it.

An MLP whose saved activations outweigh its weights learns a fixed random teacher's labels for a few hundred
AdamW steps twice from the same weights and batches: exact at memopt's exact minimum, and with
``compress="int8"`` (then ``"fp8"``) at its own, lower, minimum. The table gives each run's budget, measured
peak (one steady step) and final loss; the loss curves are plotted side by side (compress.png).

    python benchmarks/compress.py            # ~3 min on 2 cores; writes compress.json, COMPRESS.md, compress.png
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import sparse_update
import torch
from sparse_update import (  # the same network (benchmarks/ is on the path)
    CLASSES,
    INPUTS,
    WithLoss,
    classifier,
)
from torch import nn

import memopt

HERE = Path(__file__).parent
BATCH, STEPS, LR = 2048, 300, 1e-3


def batches(teacher: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(BATCH, INPUTS, generator=generator)
        with torch.no_grad():
            out.append((x, teacher(x).argmax(-1)))
    return out


def smallest(model: nn.Module, example: tuple, compress: str | None) -> int:
    try:
        memopt.plan(model, example, optimizer=torch.optim.AdamW(model.parameters(), lr=LR), budget=1,
                    compress=compress)
    except memopt.BudgetInfeasibleError as error:
        return error.minimum
    raise AssertionError("a step met a budget of one byte")


def train(base: nn.Module, data: list, compress: str | None) -> dict:
    """AdamW on ``data`` at the smallest budget memopt meets with ``compress``; a steady step measured."""
    model = WithLoss(copy.deepcopy(base))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    budget = smallest(model, data[0], compress)
    compiled = memopt.compile(model, budget=budget, optimizer=optimizer, compress=compress)
    losses: list[float] = []
    measured = None
    started = time.perf_counter()
    for step, (x, y) in enumerate(data):
        def train_step(x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            loss = compiled(x, y)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))

        if step == 2:  # a steady step, from its own entry state (the plan's)
            result = memopt.measure_peak(train_step)
            measured = compiled.plan.entry_bytes + result.peak_bytes - result.baseline_bytes
        else:
            train_step()
        optimizer.zero_grad(set_to_none=True)
    plan = compiled.plan
    return {"budget_bytes": budget, "predicted_peak_bytes": plan.peak_bytes, "measured_peak_bytes": measured,
            "losses": losses, "final_loss": sum(losses[-20:]) / 20, "seconds": time.perf_counter() - started,
            "compressed": [{"node": c.node, "bytes": c.nbytes, "kept": c.packed_bytes,
                            "max_abs_error": c.max_abs_error, "max_rel_error": c.max_rel_error}
                           for c in plan.compressed]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(INPUTS, 64), nn.Tanh(), nn.Linear(64, CLASSES))
    base = classifier()
    data = batches(teacher)
    runs = {}
    for compress in (None, "int8", "fp8"):
        runs[compress or "exact"] = train(base, data, compress)
        print(compress, {k: v for k, v in runs[compress or "exact"].items() if k not in ("losses", "compressed")},
              flush=True)
    results = {"settings": {"width": sparse_update.WIDTH, "depth": sparse_update.DEPTH, "batch": BATCH, "steps": STEPS, "lr": LR,
                            "optimizer": "AdamW"}, "runs": runs, "machine": platform.platform(),
               "versions": {"torch": torch.__version__}}
    out = Path(args.out)
    (out / "compress.json").write_text(json.dumps(results, indent=2))
    (out / "COMPRESS.md").write_text(report(results))
    plot(results, out / "compress.png")


def report(results: dict) -> str:
    mib = 2**20
    exact = results["runs"]["exact"]
    lines = ["# compress=: packed saved activations, measured and trained", "",
             (f"Written by `python benchmarks/compress.py`: an MLP ({results['settings']['depth']} layers, width "
              f"{results['settings']['width']}, batch {results['settings']['batch']}) learns a random teacher's "
              f"labels for {results['settings']['steps']} AdamW steps from the same weights and batches, each run at "
              "the smallest budget memopt meets with its setting. Peaks are measured (one steady step, from the "
              "plan's entry state); the final loss is the mean of the last 20 steps. Loss curves: compress.png."), "",
             ("| run | budget (MiB) | predicted peak (MiB) | measured peak (MiB) | below exact's minimum, measured / "
              "predicted | final loss | vs exact | tensors packed | largest relative error |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for name, run in results["runs"].items():
        saved = exact["budget_bytes"] - run["measured_peak_bytes"]
        predicted = exact["budget_bytes"] - run["predicted_peak_bytes"]
        ratio = f"{saved / predicted:.0%}" if name != "exact" and predicted > 0 else "—"
        worst = max((c["max_rel_error"] or 0 for c in run["compressed"]), default=0)
        lines.append(f"| {name} | {run['budget_bytes'] / mib:.2f} | {run['predicted_peak_bytes'] / mib:.2f} | "
                     f"{run['measured_peak_bytes'] / mib:.2f} | {ratio} | {run['final_loss']:.4f} | "
                     f"{run['final_loss'] - exact['final_loss']:+.4f} | {len(run['compressed'])} | "
                     f"{worst:.2e} |")
    lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for name, run in results["runs"].items():
        axes.plot(run["losses"], label=f"{name} ({run['budget_bytes'] / 2**20:.1f} MiB)", linewidth=1)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_yscale("log")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
