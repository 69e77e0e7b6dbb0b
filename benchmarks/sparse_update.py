"""Fine-tuning under a budget: memopt's sparse update against the last k layers, biases only and full fine-tuning.

A classifier (an MLP) is first trained here on task A, labels from a random two-layer teacher network; then fine-tuned on
task B, the same teacher reading distorted inputs (x -> x (I + D), D random), which the early layers must adapt to.
The budgets are inference's peak plus 10%, 25% and 50% of what full fine-tuning adds over it (both measured). At
each budget every method trains with ``memopt.compile`` at that budget (recomputation available to all), for the
same number of steps from the same pretrained weights; the table gives its measured peak and its accuracy on
held-out task-B data. A GPT-2 from a config is planned with ``update="sparse"`` as well (planned, not trained).

    python benchmarks/sparse_update.py            # ~10 min on 2 cores; writes sparse_update.json, SPARSE_UPDATE.md
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import memopt
from memopt import examples
from memopt.report.plan import TensorUpdate
from memopt.sparse_update import contribution_scores

HERE = Path(__file__).parent
WIDTH, DEPTH, INPUTS, CLASSES, BATCH = 256, 6, 64, 10, 256
PRETRAIN_STEPS, FINETUNE_STEPS, LR = 1000, 150, 1e-3
SHARES = (0.10, 0.25, 0.50)


def classifier() -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(INPUTS, WIDTH), nn.ReLU()]
    for _ in range(DEPTH - 2):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    layers.append(nn.Linear(WIDTH, CLASSES))
    return nn.Sequential(*layers)


class Task:
    """Inputs and labels: a fixed random teacher, reading the inputs through ``distortion``."""

    def __init__(self, teacher: nn.Module, distortion: torch.Tensor, seed: int) -> None:
        self.teacher, self.distortion, self.seed = teacher, distortion, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.held_out = self.batch(4096)  # the same test set whatever was drawn before
        self.generator = torch.Generator().manual_seed(seed + 1)

    def again(self) -> Task:
        """The same task from its first batch: every method trains on the same batches, in the same order."""
        return Task(self.teacher, self.distortion, self.seed)

    def batch(self, size: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(size, INPUTS, generator=self.generator)
        with torch.no_grad():
            return x, self.teacher(x @ self.distortion).argmax(-1)


class WithLoss(nn.Module):
    """The classifier and its cross-entropy: what memopt.compile trains (it returns the loss)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)


def accuracy(model: nn.Module, task: Task) -> float:
    x, y = task.held_out
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def pretrained(task: Task) -> nn.Sequential:
    torch.manual_seed(0)
    model = classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    for _ in range(PRETRAIN_STEPS):
        x, y = task.batch()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def trainable_sets(model: WithLoss) -> dict[str, list[str]]:
    """The hand-made choices: biases only, the last k linear layers for every k, everything."""
    names = [name for name, _ in model.named_parameters()]
    linears = sorted({name.rsplit(".", 1)[0] for name in names}, key=lambda n: int(n.split(".")[-1]))
    sets = {"biases only": [n for n in names if n.endswith("bias")], "full": names}
    for k in range(1, len(linears)):
        sets[f"last {k}"] = [n for n in names if n.rsplit(".", 1)[0] in linears[-k:]]
    return sets


def run(base: nn.Sequential, task: Task, budget: int, trainable: list[str] | None) -> dict:
    """Fine-tune a copy of ``base`` under ``budget`` with memopt.compile: the tensors ``trainable``, or memopt's
    sparse update (None). Raises BudgetInfeasibleError where the step cannot fit."""
    task = task.again()
    model = WithLoss(copy.deepcopy(base))
    for name, p in model.named_parameters():
        p.requires_grad_(trainable is None or name in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    probe = task.again()  # the calibration batches: the first two the step trains on
    calibration = [probe.batch() for _ in range(2)] if trainable is None else None
    started = time.perf_counter()
    compiled = memopt.compile(model, budget=budget, optimizer=optimizer, update="sparse" if trainable is None
                              else "full", calibration=calibration)
    measured = None
    for step in range(FINETUNE_STEPS):
        x, y = task.batch()

        def train_step() -> None:
            compiled(x, y).backward()
            optimizer.step()

        if step == 2:  # a steady step (optimizer state present), measured from the step's own entry state
            measured = step_peak(memopt.measure_peak(train_step), model, optimizer, (x, y))
        else:
            train_step()
        optimizer.zero_grad(set_to_none=True)
    # (a weight trained on its first rows keeps requires_grad; its rows are a parameter of their own)
    named = dict(model.named_parameters())
    elements = {name: p.numel() for name, p in named.items() if p.requires_grad}
    if compiled.update is not None:
        elements = {t.name: t.rows * named[t.name][0].numel() if t.rows else named[t.name].numel()
                    for t in compiled.update.updated}
    row = {"measured_peak_bytes": measured, "predicted_peak_bytes": compiled.plan.peak_bytes,
           "accuracy": accuracy(model.model, task), "trained_tensors": len(elements),
           "trained_elements": sum(elements.values()), "seconds": time.perf_counter() - started}
    if compiled.update is not None:
        row["update"] = {"score": compiled.update.score, "bound": compiled.update.bound,
                         "rounds": compiled.update.rounds, "trained": [label(t) for t in compiled.update.updated],
                         "backward_nodes": compiled.update.backward_nodes,
                         "full_backward_nodes": compiled.update.full_backward_nodes}
    return row


def step_peak(measured: memopt.MeasuredPeak, model: nn.Module, optimizer: torch.optim.Optimizer | None,
              inputs: tuple[torch.Tensor, ...]) -> int:
    """The peak of a measured call as the step itself holds it: its parameters, optimizer state and inputs at entry,
    plus what the call added (the process's other tensors, the pretrained copy and the teacher, left out)."""
    state = [] if optimizer is None else [value for per in optimizer.state.values() for value in per.values()
                                          if isinstance(value, torch.Tensor)]
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers(), *state, *inputs))
    return held + measured.peak_bytes - measured.baseline_bytes


def inference_peak(model: nn.Module, task: Task) -> int:
    x, _ = task.batch()
    with torch.no_grad():
        return step_peak(memopt.measure_peak(lambda: model(x)), model, None, (x,))


def full_peak(base: nn.Module, task: Task) -> int:
    """Eager full fine-tuning's steady step."""
    model = copy.deepcopy(base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    x, y = task.batch()

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()
    optimizer.zero_grad(set_to_none=True)
    return step_peak(memopt.measure_peak(step), model, optimizer, (x, y))


def label(tensor: TensorUpdate) -> str:
    """A trained tensor's name, with the rows trained where only its first rows are."""
    return f"{tensor.name}[:{tensor.rows}]" if tensor.option == "rows" else tensor.name


def proxy_check(base: nn.Sequential, task: Task) -> list[dict]:
    """The proxy against accuracy: each tensor's score (as the sparse update computes it) and the task-B accuracy of
    training that tensor alone for the same steps (eager, no budget)."""
    model = WithLoss(base)
    names = [name for name, _ in model.named_parameters()]
    scores = contribution_scores(model, [task.batch() for _ in range(2)], loss_fn=None,
                                 optimizer=(torch.optim.AdamW, {"lr": LR}), names=names)
    rows = []
    for name in names:
        task = task.again()
        trained = WithLoss(copy.deepcopy(base))
        tensor = dict(trained.named_parameters())[name]
        optimizer = torch.optim.AdamW([tensor], lr=LR)
        for _ in range(FINETUNE_STEPS):
            optimizer.zero_grad(set_to_none=True)
            trained(*task.batch()).backward()
            optimizer.step()
        rows.append({"tensor": name, "score": scores[name], "accuracy": accuracy(trained.model, task)})
    return rows


def gpt2_sparse_plan() -> dict:
    """GPT-2 (from a config) planned with update='sparse' at three quarters of full fine-tuning's smallest budget."""
    workload = examples.gpt2(layers=4, width=256, heads=4, seq=128, batch=4, vocab=4096)
    torch.manual_seed(0)
    model = workload.build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    inputs = workload.inputs()
    try:
        memopt.plan(model, inputs, optimizer=optimizer, budget=1)
    except memopt.BudgetInfeasibleError as error:
        minimum = error.minimum
    budget = minimum * 3 // 4
    started = time.perf_counter()
    plan = memopt.plan(model, inputs, optimizer=optimizer, budget=budget, update="sparse",
                       calibration=[workload.inputs() for _ in range(2)])
    update = plan.update
    return {"workload": workload.description, "full_minimum_bytes": minimum, "budget_bytes": budget,
            "predicted_peak_bytes": plan.peak_bytes, "plan_seconds": time.perf_counter() - started,
            "trained": [label(t) for t in update.updated], "tensors": len(update.tensors), "score": update.score,
            "bound": update.bound, "backward_nodes": update.backward_nodes,
            "full_backward_nodes": update.full_backward_nodes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(INPUTS, 64), nn.Tanh(), nn.Linear(64, CLASSES))
    task_a = Task(teacher, torch.eye(INPUTS), seed=2)
    distortion = torch.eye(INPUTS) + torch.randn(INPUTS, INPUTS, generator=torch.Generator().manual_seed(3)) / 8
    task_b = Task(teacher, distortion, seed=4)
    base = pretrained(task_a)
    inference, full = inference_peak(base, task_b), full_peak(base, task_b)
    results = {"settings": {"width": WIDTH, "depth": DEPTH, "batch": BATCH, "pretrain_steps": PRETRAIN_STEPS,
                            "finetune_steps": FINETUNE_STEPS, "lr": LR, "optimizer": "AdamW"},
               "accuracy_before": {"task A": accuracy(base, task_a), "task B": accuracy(base, task_b)},
               "inference_peak_bytes": inference, "full_peak_bytes": full, "budgets": []}
    sets = trainable_sets(WithLoss(base))
    for share in SHARES:
        budget = inference + int(share * (full - inference))
        rows = {}
        for method, trainable in [("memopt sparse", None), *sets.items()]:
            try:
                rows[method] = run(base, task_b, budget, trainable)
            except memopt.BudgetInfeasibleError as error:
                rows[method] = {"infeasible": str(error).split(";")[0], "minimum_bytes": error.minimum}
            print(share, method, {k: v for k, v in rows[method].items() if k != "update"}, flush=True)
        results["budgets"].append({"share": share, "budget_bytes": budget, "rows": rows})
    results["proxy_check"] = proxy_check(base, task_b)
    results["gpt2"] = gpt2_sparse_plan()
    results["seconds"] = time.perf_counter() - started
    results["machine"] = platform.platform()
    results["versions"] = {"torch": torch.__version__}
    out = Path(args.out)
    (out / "sparse_update.json").write_text(json.dumps(results, indent=2))
    (out / "SPARSE_UPDATE.md").write_text(report(results))


def report(results: dict) -> str:
    mib = 2**20
    lines = ["# Sparse update: fine-tuning under a budget", "",
             "Written by `python benchmarks/sparse_update.py` (see its docstring for the task). Peaks are measured "
             "(`memopt.measure_peak`, one steady step, absolute live CPU bytes); accuracy is on 4096 held-out "
             f"task-B inputs after {results['settings']['finetune_steps']} AdamW steps from the same pretrained "
             "weights; every method trains with `memopt.compile` at the row's budget.", "",
             f"Before fine-tuning: task A accuracy {results['accuracy_before']['task A']:.3f}, task B "
             f"{results['accuracy_before']['task B']:.3f}. Inference peak {results['inference_peak_bytes'] / mib:.2f} "
             f"MiB, full fine-tuning (eager) {results['full_peak_bytes'] / mib:.2f} MiB.", ""]
    for entry in results["budgets"]:
        lines += [f"## Budget {entry['budget_bytes'] / mib:.2f} MiB: inference + {entry['share']:.0%} of what full "
                  "fine-tuning adds", "",
                  "| method | measured peak (MiB) | within budget | task-B accuracy | tensors trained | elements "
                  "trained |", "|---|---|---|---|---|---|"]
        for method, row in entry["rows"].items():
            if "infeasible" in row:
                lines.append(f"| {method} | does not fit (needs {row['minimum_bytes'] / mib:.2f} MiB) | — | — | — "
                             "| — |")
                continue
            fits = "yes" if row["measured_peak_bytes"] <= entry["budget_bytes"] else "**no**"
            lines.append(f"| {method} | {row['measured_peak_bytes'] / mib:.2f} | {fits} | {row['accuracy']:.3f} | "
                         f"{row['trained_tensors']} | {row['trained_elements']:,} |")
        sparse = entry["rows"].get("memopt sparse", {})
        if "update" in sparse:
            lines += ["", f"memopt sparse trained: {', '.join(sparse['update']['trained'])} (backward "
                          f"{sparse['update']['full_backward_nodes']} -> {sparse['update']['backward_nodes']} nodes, "
                          f"{sparse['update']['rounds']} rounds)"]
        lines.append("")
    lines += ["## The proxy against accuracy", "",
              "Each tensor trained alone for the same steps (eager, no budget): its score as the sparse update "
              "computes it on two calibration batches, and the task-B accuracy it reaches.", "",
              "| tensor | score | accuracy trained alone |", "|---|---|---|"]
    lines += [f"| {row['tensor']} | {row['score']:.4g} | {row['accuracy']:.3f} |" for row in results["proxy_check"]]
    lines.append("")
    gpt2 = results["gpt2"]
    lines += ["## GPT-2 planned with update='sparse'", "",
              f"{gpt2['workload']}: full fine-tuning's smallest budget {gpt2['full_minimum_bytes'] / mib:.1f} MiB; "
              f"at {gpt2['budget_bytes'] / mib:.1f} MiB the sparse update trains {len(gpt2['trained'])} of "
              f"{gpt2['tensors']} tensors, predicted peak {gpt2['predicted_peak_bytes'] / mib:.1f} MiB, backward "
              f"{gpt2['full_backward_nodes']} -> {gpt2['backward_nodes']} nodes, planned in "
              f"{gpt2['plan_seconds']:.0f} s. Trained: {', '.join(gpt2['trained'])}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
