#!/usr/bin/env python
"""Benchmark harness: measured peak, step time and plan accuracy, strategy by strategy.

    python benchmarks/run.py [--workloads gpt2,llama,mlp,llama7b] [--strategies eager,checkpoint,...]
                             [--repeats 5] [--threads 1] [--quick] [--out DIR] [--pairs-rounds 7]

Every (workload, strategy) pair runs in a fresh subprocess (`--one WORKLOAD STRATEGY --json-out FILE`)
with an empty Inductor cache, so one configuration cannot disturb another's memory or compiled code
and every compile time is a cold one. In that subprocess: two warm-up steps (the first creates the
optimizer state and compiles), one steady-state step measured with `memopt.measure_peak`, then
`--repeats` timed steps (never while profiling). For `eager`, `memopt.plan` predicts the peak
before training. The memopt strategies (`memopt@0` .. `memopt@4`, `memopt-blocks`, and
`memopt-inductor@0` .. `memopt-inductor@4`, the same budgets compiled by Inductor) train with
`memopt.compile` at a budget the subprocess derives from memopt's own plans of the step (the smallest
budget memopt can meet, eager's predicted peak), and record the plan the module ran and whether the
measured peak stayed within the budget; `memopt-backend@0` .. `@4` train at the same budgets through
`torch.compile(backend="memopt")`. Every compiled row (torch's and the backend's) compiles the model
and its loss as one module that returns only the loss. `memopt-inductor=<torch row>` (checkpoint, compile-amb-*,
compile-checkpoint) is asked to peak no higher than that torch row measured earlier in the same run
(the parent passes the peaks on), so the two are compared at the same peak. `llama7b` is planned only
(fake mode, meta device): plan time, peak RSS, ledger.

The parent writes `results.json` and `RESULTS.md` (into benchmarks/, or benchmarks/_runs/quick
with --quick); per-configuration JSON and logs go to benchmarks/_runs/. Then, unless `--pairs-rounds 0`
(the default with --quick), it times each torch row that has a `memopt-inductor=<row>` again beside
it, both in one process (`benchmarks/pairs.py`: separate processes run the same code up to ~13% apart),
and writes `pairs.json`, `PAIRS.md` and RESULTS.md again with those pairs in it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # memopt and benchmarks, without installing

from benchmarks.report import write_results_md  # noqa: E402
from benchmarks.strategies import (  # noqa: E402
    STRATEGIES,
    NotApplicable,
    Training,
    dynamo_graph_summary,
    memopt_summary,
    partitioner_probe,
)

PLAN_ONLY_WORKLOADS = ("llama7b",)  # too big to run here: planned in fake mode only
DEFAULT_WORKLOADS = ("gpt2", "llama", "mlp", "resnet_bn", "bert_mlm", "t5", "llama7b")
QUICK_SIZES: dict[str, dict[str, Any]] = {  # --quick: the same models, small enough for a smoke test
    "gpt2": {"layers": 2, "width": 64, "heads": 2, "seq": 32, "batch": 2, "vocab": 512},
    "llama": {"layers": 2, "width": 64, "heads": 4, "seq": 32, "batch": 2, "vocab": 512},
    "mlp": {"width": 64, "depth": 4, "batch": 64},
    "resnet_bn": {"batch": 8, "image": 16, "widths": (8, 16, 32)},
    "bert_mlm": {"layers": 2, "width": 64, "heads": 2, "intermediate": 128, "seq": 32, "batch": 2, "vocab": 512},
    "t5": {"layers": 2, "width": 64, "d_ff": 128, "heads": 2, "seq": 32, "target_seq": 16, "batch": 2, "vocab": 512},
    "llama7b": {"seq": 256},
}
WARMUP_STEPS = 2


# ---------------------------------------------------------------- one configuration (subprocess)

def make_workload(name: str, quick: bool):
    from memopt.examples import BENCHMARK_WORKLOADS, llama7b

    factories = {**BENCHMARK_WORKLOADS, "llama7b": llama7b}
    return factories[name](**(QUICK_SIZES[name] if quick else {}))


def call_model(forward: Callable[..., Any], inputs: tuple | dict) -> Any:
    return forward(**inputs) if isinstance(inputs, dict) else forward(*inputs)


def loss_of(output: Any, workload):
    """As memopt.plan reads it: loss_fn(output), else the output's `.loss`, else the output itself."""
    if workload.loss_fn is not None:
        return workload.loss_fn(output)
    return output.loss if hasattr(output, "loss") else output


def training_step(forward: Callable[..., Any], workload, inputs: tuple | dict, optimizer, *,
                  returns_loss: bool = False) -> Callable[[], float]:
    """One eager-style training step; gradients are set to None first, as memopt plans it.
    `returns_loss`: the forward returns the loss itself (memopt.compile)."""

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        # the output is dropped once the loss is taken (as memopt plans it): a name for it would keep the logits
        loss = call_model(forward, inputs) if returns_loss else loss_of(call_model(forward, inputs), workload)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def timed(step: Callable[[], float]) -> tuple[float, float, float]:
    """(wall seconds, loss, CPU seconds of this process). With one torch thread, waiting for a core while other
    processes hold it stretches the wall time only; a busy sibling core or shared cache still slows both."""
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = step()
    return time.perf_counter() - start, loss, time.process_time() - cpu_start


def storage_bytes(tensors: Iterable) -> int:
    """Bytes of the distinct storages behind `tensors` (views and aliases counted once)."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def static_bytes(model, optimizer) -> dict[str, int]:
    import torch

    state = [v for per_param in optimizer.state.values() for v in per_param.values() if isinstance(v, torch.Tensor)]
    return {
        "parameters": storage_bytes(model.parameters()),
        "gradients": storage_bytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer_state": storage_bytes(state),
    }


def plan_summary(model, inputs, workload, optimizer, device: str | None) -> dict[str, Any]:
    """memopt's prediction for the steady-state eager step, and how long planning took."""
    import memopt

    start = time.perf_counter()
    try:
        plan = memopt.plan(model, inputs, loss_fn=workload.loss_fn, optimizer=optimizer, device=device)
    except Exception as error:  # a benchmark reports a failing planner; it does not stop the run
        return {"error": f"{type(error).__name__}: {error}", "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    data = json.loads(plan.to_json())
    return {
        "seconds": seconds,
        "peak_bytes": plan.peak_bytes,
        "ledger": {k: int(v) for k, v in plan.ledger.items()},
        "static": data.get("static"),  # what the step holds whatever the order: all gradients included
        **{key: data.get(key) for key in ("peak_node", "device", "optimizer", "fake", "graph_nodes")},
    }


def measure_config(workload_name: str, strategy_name: str, *, repeats: int, quick: bool,
                   threads: int, peaks: dict[str, int]) -> dict[str, Any]:
    import memopt
    import torch

    from memopt.measure import live_tensor_bytes

    if threads:
        torch.set_num_threads(threads)  # before any compile: Inductor's C++ kernels bake the count in
    gc.collect()
    # CPU tensors this process held before the workload: 0 in run.py's own processes; in a test, what earlier
    # tests left alive (Dynamo's cache keeps compiled models). The measured peak counts them; the budget does not.
    foreign = live_tensor_bytes("cpu")
    workload = make_workload(workload_name, quick)
    model = workload.build().train()
    inputs = workload.inputs()
    row: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
                           "foreign_bytes": foreign}
    optimizer = workload.optimizer(model)  # strategies keep the parameters, so it can come first
    setup = STRATEGIES[strategy_name](model, Training(workload, inputs, optimizer, peaks))
    if strategy_name == "eager":
        row["plan"] = plan_summary(model, inputs, workload, optimizer, device="cpu")
    step = training_step(setup.forward, workload, inputs, optimizer, returns_loss=setup.returns_loss)
    with setup.context(), partitioner_probe() as partitions:
        # one generator state for every row's first step, whatever the setup drew (plans, model wrappers): dropout's
        # noise is then the same, and so is the first loss, in eager, checkpointed and memopt's FX rows
        torch.manual_seed(0)
        warmup = [timed(step) for _ in range(WARMUP_STEPS)]
        row["static"] = static_bytes(model, optimizer)
        graphs_after_warmup = dynamo_graph_summary()["graphs"] if setup.compiled else None
        optimizer.zero_grad(set_to_none=True)  # the measured step starts without gradients, as planned
        gc.collect()
        measured = memopt.measure_peak(step)
        steps = [timed(step) for _ in range(repeats)]
    step_seconds, cpu_seconds = [wall for wall, _, _ in steps], [cpu for _, _, cpu in steps]
    row.update(
        settings=setup.settings,
        first_step_s=warmup[0][0],
        second_step_s=warmup[1][0],
        loss=warmup[0][1],
        step_s=step_seconds,
        step_median_s=statistics.median(step_seconds),
        step_min_s=min(step_seconds),
        step_cpu_s=cpu_seconds,
        step_cpu_median_s=statistics.median(cpu_seconds),
        measured={
            "peak_bytes": measured.peak_bytes,
            "baseline_bytes": measured.baseline_bytes,
            "unaccounted_bytes": measured.unaccounted_bytes,
        },
    )
    if setup.plan is not None:
        budget = setup.settings["budget_bytes"]
        row["memopt"] = {**memopt_summary(setup.plan(), setup.forward), "budget_bytes": budget,
                         "fits": measured.peak_bytes - foreign <= budget}
    if setup.compiled:
        summary = dynamo_graph_summary()
        summary["recompiled_after_warmup"] = summary["graphs"] != graphs_after_warmup
        row.update(dynamo=summary, partitions=partitions)
    return row


def plan_only(workload_name: str, quick: bool) -> dict[str, Any]:
    """Plan a model that cannot run here (meta device): plan time, peak RSS and the static ledger."""
    workload = make_workload(workload_name, quick)
    model = workload.build()
    tensors = list(model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in tensors)
    rss_before = peak_rss_bytes()
    optimizer = (workload.optimizer_cls, workload.optimizer_kwargs)
    return {
        "parameters": sum(p.numel() for p in tensors),
        "plan": plan_summary(model, workload.inputs(), workload, optimizer, device=None),
        "rss_before_plan_bytes": rss_before,
        "peak_rss_bytes": peak_rss_bytes(),
        # fp32 weights and gradients; AdamW's two fp32 moments plus its fp32 scalar `step` per parameter (CPU)
        "expected_static": {"parameters": param_bytes, "gradients": param_bytes,
                            "optimizer_state": 2 * param_bytes + 4 * len(tensors)},
    }


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_one(workload: str, strategy: str, *, repeats: int, quick: bool, threads: int = 1,
            peaks: dict[str, int] | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"workload": workload, "strategy": strategy, "load_average": os.getloadavg()[0]}
    start = time.perf_counter()
    try:
        if workload in PLAN_ONLY_WORKLOADS:
            row.update(plan_only(workload, quick))
        else:
            row.update(measure_config(workload, strategy, repeats=repeats, quick=quick, threads=threads,
                                      peaks=peaks or {}))
        row["description"] = make_workload(workload, quick).description
    except NotApplicable as reason:  # the strategy does not apply to this workload: recorded, not an error
        row["skipped"] = str(reason)
        row["description"] = make_workload(workload, quick).description
    except Exception as error:  # recorded in the results, next to the configurations that worked
        row["error"] = f"{type(error).__name__}: {error}"
        row["traceback"] = traceback.format_exc()[-4000:]
    row["wall_s"] = time.perf_counter() - start
    return row


# ---------------------------------------------------------------- the whole run (parent)

def run_in_subprocess(workload: str, strategy: str, args: argparse.Namespace, run_dir: Path,
                      peaks: dict[str, int]) -> dict[str, Any]:
    """One configuration in its own process; `peaks`: the measured peaks of the workload's rows done so far."""
    stem = f"{workload}-{strategy}"
    out, log = run_dir / f"{stem}.json", run_dir / f"{stem}.log"
    out.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--one", workload, strategy,
               "--json-out", str(out), "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--peaks", json.dumps(peaks)]
    command += ["--quick"] if args.quick else []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memopt-bench-inductor-") as cache, log.open("w") as log_file:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}  # cold compile, nothing shared between runs
        child = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                 start_new_session=True)  # its own group: a timeout ends its compile workers too
        try:
            status = child.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            status = f"timed out after {args.timeout} s"
    if out.exists():
        row = json.loads(out.read_text())
    else:
        tail = log.read_text()[-2000:]
        row = {"workload": workload, "strategy": strategy, "error": f"subprocess: {status}", "traceback": tail}
    row["subprocess_wall_s"] = time.perf_counter() - start
    return row


def configurations(workloads: list[str], strategies: list[str]) -> list[tuple[str, str]]:
    return [(w, s) for w in workloads for s in (["plan"] if w in PLAN_ONLY_WORKLOADS else strategies)]


def one_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"ERROR {row['error']}"
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    if "measured" in row:
        peak = row["measured"]["peak_bytes"] / 2**20
        line = f"peak {peak:.1f} MiB, step {row['step_median_s'] * 1e3:.0f} ms, first step {row['first_step_s']:.1f} s"
        if "memopt" in row:
            planned = row["memopt"]
            line += (f", budget {planned['budget_bytes'] / 2**20:.1f} MiB ({'fits' if planned['fits'] else 'OVER'}), "
                     f"predicted {planned['predicted_peak_bytes'] / 2**20:.1f} MiB, {planned['recomputed']} recomputed")
        return line
    return f"plan {row['plan'].get('seconds', 0):.1f} s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB"


def machine() -> dict[str, Any]:
    def first_line_with(path: str, key: str) -> str | None:
        try:
            return next((line.split(":", 1)[1].strip() for line in open(path) if line.startswith(key)), None)
        except OSError:
            return None

    mem_kib = first_line_with("/proc/meminfo", "MemTotal")
    return {
        "cpu": first_line_with("/proc/cpuinfo", "model name") or platform.processor(),
        "cores": os.cpu_count(),
        "ram_bytes": int(mem_kib.split()[0]) * 1024 if mem_kib else None,
        "platform": platform.platform(),
    }


def memopt_revision() -> str:
    """The commit of the memopt that ran, and whether memopt/ differed from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(HERE.parent), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "memopt")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" + uncommitted changes to memopt/" if changed else "")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "memopt": memopt_revision()}
    for package in ("torch", "transformers", "ortools"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def output_dir(args: argparse.Namespace) -> Path:
    """Where results.json and RESULTS.md go."""
    return Path(args.out) if args.out else (HERE / "_runs" / "quick" if args.quick else HERE)


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    out_dir = output_dir(args)
    run_dir = HERE / "_runs" / ("quick" if args.quick else "full")
    run_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = configurations(args.workloads, args.strategies)
    start = time.perf_counter()
    rows = []
    for index, (workload, strategy) in enumerate(todo, 1):
        print(f"[{index}/{len(todo)}] {workload} {strategy} ...", flush=True)
        peaks = {r["strategy"]: r["measured"]["peak_bytes"] for r in rows
                 if r["workload"] == workload and "measured" in r and "error" not in r}
        rows.append(run_in_subprocess(workload, strategy, args, run_dir, peaks))
        print(f"    {one_line(rows[-1])} ({rows[-1]['subprocess_wall_s']:.0f} s)", flush=True)
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "settings": {"repeats": args.repeats, "warmup_steps": WARMUP_STEPS, "quick": args.quick,
                     "threads": args.threads, "workloads": args.workloads, "strategies": args.strategies},
        "total_wall_s": time.perf_counter() - start,
        "rows": rows,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_results_md(out_dir)
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'RESULTS.md'} in {results['total_wall_s']:.0f} s")
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def names(known: Iterable[str]) -> Callable[[str], list[str]]:
        def parse(text: str) -> list[str]:
            chosen = [name.strip() for name in text.split(",") if name.strip()]
            unknown = sorted(set(chosen) - set(known))
            if unknown:
                raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {sorted(known)}")
            return chosen
        return parse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", type=names(QUICK_SIZES), default=list(DEFAULT_WORKLOADS),
                        help=f"comma-separated, from {', '.join(QUICK_SIZES)}")
    parser.add_argument("--strategies", type=names(STRATEGIES), default=list(STRATEGIES),
                        help=f"comma-separated, from {', '.join(STRATEGIES)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed steady-state steps (median reported)")
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke test of the harness")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads per run (0: torch's default). 1 by default: on a shared "
                             "machine, two OpenMP threads slow a step down up to 9x whenever another process "
                             "holds a core, which buries the differences between strategies")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    parser.add_argument("--out", help="where results.json and RESULTS.md go")
    parser.add_argument("--pairs-rounds", type=int, default=None,
                        help="after the rows, time each torch row and its memopt-inductor= row again in one process "
                             "(benchmarks/pairs.py), this many rounds each; 0: not at all (default 7, 0 with --quick)")
    parser.add_argument("--one", nargs=2, metavar=("WORKLOAD", "STRATEGY"), help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    parser.add_argument("--peaks", type=json.loads, default={}, help=argparse.SUPPRESS)  # {strategy: bytes}
    args = parser.parse_args(argv)
    if args.pairs_rounds is None:
        args.pairs_rounds = 0 if args.quick else 7
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        row = run_one(*args.one, repeats=args.repeats, quick=args.quick, threads=args.threads, peaks=args.peaks)
        Path(args.json_out).write_text(json.dumps(row, indent=1) + "\n")
        return 1 if "error" in row else 0
    results = run_all(args)
    failed = any("error" in row for row in results["rows"])
    if args.pairs_rounds:  # the same-peak pairs again, both rows in one process (benchmarks/pairs.py)
        from benchmarks.pairs import pairs_of_run, time_pairs

        todo = pairs_of_run(results["rows"])
        if todo:
            timed = time_pairs(output_dir(args) / "results.json", todo, rounds=args.pairs_rounds)
            failed = failed or any("error" in pair for pair in timed["pairs"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
