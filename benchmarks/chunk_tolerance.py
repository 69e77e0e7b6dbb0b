"""How far the token-chunked steps are from eager: loss and gradients, measured.

    python -m benchmarks.chunk_tolerance [--workloads gpt2,llama,bert_mlm] [--chunks 2,8]

Chunking the loss head (`chunk_loss`) or the MLP blocks (`chunk_mlp`) runs the same kernels on slices of the
tokens, so every row is computed from the same values, but a matrix product over fewer rows may add in another
order, and the sums over the tokens (the loss, the weights' gradients) add the slices' partial sums. This
measures the difference on the benchmark's models: one step of `memopt.compile` (FX, a budget that does not
bind, so nothing else changes) against the eager step from the same weights and batch, per setting: the loss's
absolute difference, and over all gradients the largest absolute difference and the largest difference relative
to the gradient's largest magnitude. Writes benchmarks/chunk_tolerance.json and benchmarks/CHUNK_TOLERANCE.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import memopt
from memopt.examples import BENCHMARK_WORKLOADS

HERE = Path(__file__).resolve().parent


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def eager_step(workload) -> tuple[float, dict[str, torch.Tensor]]:
    model = workload.build()
    torch.manual_seed(0)  # the same dropout noise on both sides
    loss = model(**workload.inputs()).loss
    loss.backward()
    return loss.item(), gradients(model)


def chunked_step(workload, **chunks: Any) -> tuple[float, dict[str, torch.Tensor], memopt.MemoryPlan]:
    model = workload.build()
    compiled = memopt.compile(model, budget="64GB", optimizer=workload.optimizer(model), **chunks)
    inputs = workload.inputs()
    torch.manual_seed(0)
    loss = compiled(**inputs)
    loss.backward()
    return loss.item(), gradients(model), compiled.plan


def compare(workload_name: str, setting: dict[str, Any], reference: tuple[float, dict[str, torch.Tensor]]
            ) -> dict[str, Any]:
    workload = BENCHMARK_WORKLOADS[workload_name]()
    start = time.perf_counter()
    loss, grads, plan = chunked_step(workload, **setting)
    eager_loss, eager_grads = reference
    assert grads.keys() == eager_grads.keys()
    differences = {n: float((grads[n] - eager_grads[n]).abs().max()) for n in grads}
    worst = max(differences, key=differences.__getitem__)
    absolute = differences[worst]
    relative = max(d / max(float(eager_grads[n].abs().max()), 1e-30) for n, d in differences.items())
    return {"workload": workload_name, "setting": setting, "loss": loss, "eager_loss": eager_loss,
            "loss_abs_diff": abs(loss - eager_loss), "grad_max_abs_diff": absolute,
            "grad_max_rel_diff": relative, "worst_gradient": worst,
            "heads": [h.chunks for h in plan.chunked], "mlp_blocks": [b.chunks for b in plan.chunked_mlp],
            "seconds": time.perf_counter() - start}


def render(results: dict[str, Any]) -> str:
    lines = ["# Token chunking against eager, measured", "",
             (f"Written by `python -m benchmarks.chunk_tolerance` on {results['date']} (memopt "
             f"{results['memopt']}, torch {torch.__version__}, one thread, fp32). One training step of "
             "`memopt.compile` (FX lowering, a budget that does not bind) against eager from the same weights and "
             "batch. relative: the largest |difference| in a gradient divided by that gradient's largest |value|, "
             "the largest over all gradients."), "",
             ("| workload | setting | chunked (heads / MLP blocks) | |loss − eager| | max |grad − eager| | "
             "max relative | worst gradient |"), "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        setting = ", ".join(f"{k}={v}" for k, v in row["setting"].items())
        chunked = f"{row['heads'] or '—'} / {len(row['mlp_blocks'])} × {row['mlp_blocks'][0] if row['mlp_blocks'] else '—'}"
        lines.append(f"| {row['workload']} | {setting} | {chunked} | {row['loss_abs_diff']:.1e} | "
                     f"{row['grad_max_abs_diff']:.1e} | {row['grad_max_rel_diff']:.1e} | {row['worst_gradient']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="gpt2,llama,bert_mlm")
    parser.add_argument("--chunks", default="2,8")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from benchmarks.run import memopt_revision

    rows = []
    for name in args.workloads.split(","):
        reference = eager_step(BENCHMARK_WORKLOADS[name]())
        for count in (int(c) for c in args.chunks.split(",")):
            for setting in ({"chunk_loss": count}, {"chunk_mlp": count}):
                rows.append(compare(name, setting, reference))
                print(json.dumps(rows[-1]), flush=True)
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "memopt": memopt_revision(), "rows": rows}
    (HERE / "chunk_tolerance.json").write_text(json.dumps(results, indent=1) + "\n")
    (HERE / "CHUNK_TOLERANCE.md").write_text(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
