#!/usr/bin/env python
"""Step times side by side in one process: each torch row against memopt at that row's measured peak.

    python benchmarks/pairs.py [--workloads gpt2,llama,mlp] [--torch checkpoint,compile-amb-0.5,...]
                               [--rounds 7] [--results benchmarks/results.json]

`run.py` times every configuration in its own process, at its own moment of the run. On this machine
one process runs the same code up to ~13% slower than another (CPU frequency, page placement, the
neighbours of the moment): in two runs of `run.py`, gpt2's `memopt-inductor=compile-amb-1.0` ran the
same plan (17 recomputed, 646.0 MiB) at a CPU-time minimum of 2335 ms, then 2522 ms, while the torch row
beside it went from 2506 to 2387 ms. That is more than the differences compared.

Here a pair shares a process (its own subprocess, one torch thread): the torch row and
`memopt-inductor=<row>`, each built from the same seed, set up as `run.py` sets them up, compiled and
warmed, then timed alternately, A B B A ..., `--rounds` steps each. memopt's budget comes from the torch
row's measured peak in `--results` (the budget `run.py` gave it, so the plan is the one whose peak it
measured; the JSON says what was recomputed and what Inductor's code peaks at, to check). The figure is
the median, over rounds, of memopt's CPU time over the torch step's next to it, with the rounds memopt
was faster. Peaks are not measured here: two models share the process.

Writes `pairs.json` and `PAIRS.md` next to `--results`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.run import WARMUP_STEPS, make_workload, memopt_revision, timed, training_step  # noqa: E402
from benchmarks.strategies import SAME_PEAK_ROWS, STRATEGIES, Training, memopt_summary  # noqa: E402

# the torch rows that have a memopt-inductor=<row> to pair with (the whole-model, linear-ce and auto-chunker rows
# have none yet)
PAIRED = SAME_PEAK_ROWS


def measure_pair(workload_name: str, torch_row: str, peaks: dict[str, int], *, rounds: int, threads: int,
                 quick: bool = False, lowering: str = "inductor") -> dict[str, Any]:
    """Both rows of a pair set up, warmed and timed alternately in this process: the torch row, and memopt's
    programs at its peak compiled by Inductor (`lowering` "inductor") or run as FX graphs ("fx")."""
    import torch

    torch.set_num_threads(threads)
    workload = make_workload(workload_name, quick)
    names = (torch_row, memopt_row(torch_row, lowering))
    sides = []
    for name in names:
        torch.manual_seed(0)
        model = workload.build().train()
        inputs = workload.inputs()
        optimizer = workload.optimizer(model)
        setup = STRATEGIES[name](model, Training(workload, inputs, optimizer, peaks))
        step = training_step(setup.forward, workload, inputs, optimizer, returns_loss=setup.returns_loss)
        with setup.context():
            losses = [step() for _ in range(WARMUP_STEPS)]
        sides.append((setup, step, optimizer, losses[0]))
    cpu: tuple[list[float], list[float]] = ([], [])
    optimizer_cpu: tuple[list[float], list[float]] = ([], [])
    for index in range(2 * rounds):
        side = (index + index // 2) % 2  # A B B A A B B A ...: neither goes first more often
        setup, step, optimizer, _ = sides[side]
        with setup.context(), optimizer_timed(optimizer) as optimizer_seconds:
            cpu[side].append(timed(step)[2])
        optimizer_cpu[side].append(optimizer_seconds[0])
    ratios = [m / t for t, m in zip(*cpu)]
    memopt_setup = sides[1][0]
    return {
        "workload": workload_name, "torch": torch_row, "memopt": names[1],
        "torch_cpu_s": cpu[0], "memopt_cpu_s": cpu[1], "ratios": ratios,
        "ratio_median": statistics.median(ratios), "memopt_faster_rounds": sum(r < 1 for r in ratios),
        # the same eager optimizer step on both sides: its ratio shows how far the moment favoured one side
        "torch_optimizer_cpu_s": optimizer_cpu[0], "memopt_optimizer_cpu_s": optimizer_cpu[1],
        "optimizer_ratio_median": statistics.median(m / t for t, m in zip(*optimizer_cpu)),
        "forward_backward_ratio_median": statistics.median(
            (m - mo) / (t - to) for t, m, to, mo in zip(*cpu, *optimizer_cpu)),
        "first_losses": [first_loss for *_, first_loss in sides],
        "memopt_budget_bytes": memopt_setup.settings["budget_bytes"],
        "memopt_plan": memopt_summary(memopt_setup.plan(), memopt_setup.forward),
    }


def memopt_row(torch_row: str, lowering: str) -> str:
    """The memopt row paired with `torch_row`: memopt-inductor=<row>, or memopt=<row> (FX graphs)."""
    return f"memopt-inductor={torch_row}" if lowering == "inductor" else f"memopt={torch_row}"


@contextlib.contextmanager
def optimizer_timed(optimizer) -> Iterator[list[float]]:
    """The CPU seconds of `optimizer.step()` calls while held, summed into the one-element list it yields."""
    seconds = [0.0]

    def start(optimizer, args, kwargs) -> None:
        seconds.append(time.process_time())

    def stop(optimizer, args, kwargs) -> None:
        seconds[0] += time.process_time() - seconds.pop()

    handles = (optimizer.register_step_pre_hook(start), optimizer.register_step_post_hook(stop))
    try:
        yield seconds
    finally:
        for handle in handles:
            handle.remove()


def summary_row(pair: dict[str, Any], rows: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    """A pair beside what `run.py` measured of its two rows: peaks, and their CPU-time minima's ratio."""
    torch_row, memopt_row = rows.get((pair["workload"], pair["torch"]), {}), rows.get((pair["workload"],
                                                                                      pair["memopt"]), {})

    def peak(row: dict[str, Any]) -> int | None:
        return row.get("measured", {}).get("peak_bytes")

    apart = (min(memopt_row["step_cpu_s"]) / min(torch_row["step_cpu_s"])
             if "step_cpu_s" in torch_row and "step_cpu_s" in memopt_row else None)
    same = (None if not memopt_row else
            memopt_row.get("memopt", {}).get("recomputed") == pair["memopt_plan"]["recomputed"])
    return {"torch_peak_bytes": peak(torch_row), "memopt_peak_bytes": peak(memopt_row), "apart_ratio": apart,
            "same_recomputed": same}


def pairs_markdown(results: dict[str, Any], rows: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """What pairs.json says, beside run.py's rows: how it was timed, a table, and the count below 1."""
    mib = 2 ** 20
    fx = results.get("lowering") == "fx"
    lines = [
        f"Written by `python benchmarks/pairs.py{' --memopt fx' if fx else ''}` on {results['date']}, in "
        f"{results['total_wall_s'] / 60:.1f} min (memopt {results['memopt']}, {results['rounds']} rounds, 1 torch "
        "thread). memopt's side: "
        + ("`memopt=<row>`, its programs run as FX graphs (eager kernels), memopt.compile's default lowering"
           if fx else "`memopt-inductor=<row>`, its programs compiled by Inductor") + ". Peaks are from "
        f"`{results['results']}` (run.py, each row in its own process); the steps were timed here, both rows of "
        "a pair in one process, alternately (A B B A ...). ratio: memopt's CPU time ÷ the torch step's beside it, "
        "median over rounds; forward and backward only: the same without the optimizer step, which both sides run "
        "as the same eager code and which is timed apart as a control (its ratio far from 1 says the moment favoured "
        "one side); apart: the ratio of the CPU-time minima run.py measured in separate processes. "
        + ("memopt's peak is its plan's: the FX graphs run as planned (the tests hold the prediction to the measured "
           "peak). A memopt=<row> row has no run.py row, so no peak measured apart." if fx else
           "Where the plan differs from run.py's (memopt changed since), its peak is the code's as memopt predicts it "
           "from Inductor's wrapper (within 0.5% of the measured peak in the slow tests)."), "",
        "| workload | torch row | its peak (MiB) | memopt peak (MiB): run.py measured / this plan's code, predicted | "
        "memopt ÷ torch, median of rounds | rounds memopt faster | torch CPU median (ms) | "
        "memopt CPU median (ms) | forward and backward only, memopt ÷ torch | "
        "control: the optimizer step (the same eager code), memopt ÷ torch | apart (run.py) | "
        "same recomputed count as run.py |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value: int | None) -> str:
        return "—" if value is None else f"{value / mib:.1f}"

    def ratio(pair: dict[str, Any], part: str) -> str:  # pairs.json files from before the split have none
        value = pair.get(f"{part}_ratio_median")
        return "—" if value is None else f"{value:.3f}"

    for pair in results["pairs"]:
        if "error" in pair:
            lines.append(f"| {pair['workload']} | {pair['torch']} | error: {pair['error'][:200]} |||||||||")
            continue
        extra = summary_row(pair, rows)
        apart = "—" if extra["apart_ratio"] is None else f"{extra['apart_ratio']:.2f}"
        plan = pair["memopt_plan"]  # (FX graphs: the plan's peak is the code's)
        code_peak = plan.get("inductor", {}).get("predicted_peak_bytes", plan["predicted_peak_bytes"])
        lines.append(
            f"| {pair['workload']} | {pair['torch']} | {fmt(extra['torch_peak_bytes'])} | "
            f"{fmt(extra['memopt_peak_bytes'])} / {fmt(code_peak)}"
            f" | {pair['ratio_median']:.3f} | "
            f"{pair['memopt_faster_rounds']} of {len(pair['ratios'])} | "
            f"{statistics.median(pair['torch_cpu_s']) * 1000:.0f} | "
            f"{statistics.median(pair['memopt_cpu_s']) * 1000:.0f} | {ratio(pair, 'forward_backward')} | "
            f"{ratio(pair, 'optimizer')} | {apart} | "
            f"{({True: 'yes', False: 'no'}).get(extra['same_recomputed'], '— (no run.py row)')} |")
    done = [p for p in results["pairs"] if "error" not in p]
    faster = sum(p["ratio_median"] < 1 for p in done)
    split = [p for p in done if "forward_backward_ratio_median" in p]
    lines += ["", f"memopt's median ratio is below 1 on {faster} of {len(done)} pairs "
              f"({len(results['pairs']) - len(done)} failed)"
              + (f"; forward and backward only, on {sum(p['forward_backward_ratio_median'] < 1 for p in split)} "
                 f"of {len(split)}." if split else ".")]
    return lines


def write_pairs_md(out_dir: Path, results: dict[str, Any], rows: dict[tuple[str, str], dict[str, Any]],
                   name: str = "PAIRS.md") -> Path:
    path = out_dir / name
    lines = ["# Step times in one process: torch rows against memopt at their measured peak", ""]
    path.write_text("\n".join(lines + pairs_markdown(results, rows)) + "\n")
    return path


def run_pair_in_subprocess(workload: str, torch_row: str, peaks: dict[str, int], *, rounds: int, timeout: int,
                           lowering: str = "inductor") -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="memopt-pairs-") as scratch:
        out = Path(scratch) / "pair.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--one", workload, torch_row, "--json-out",
                   str(out), "--rounds", str(rounds), "--peaks", json.dumps(peaks), "--memopt", lowering]
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(scratch) / "inductor")}
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"workload": workload, "torch": torch_row, "error": f"timed out after {timeout} s"}
        if not out.exists():
            return {"workload": workload, "torch": torch_row, "error": (done.stdout + done.stderr)[-2000:]}
        return json.loads(out.read_text())


def time_pairs(source: Path, todo: list[tuple[str, str]], *, rounds: int = 7, timeout: int = 1200,
               lowering: str = "inductor") -> dict[str, Any]:
    """Each (workload, torch row) of `todo` timed against memopt at the peak `source` (results.json) measured for
    it; writes pairs.json and PAIRS.md beside `source`, and RESULTS.md again with the pairs in it (with `lowering`
    "fx": pairs-fx.json and PAIRS-fx.md, RESULTS.md left as it is)."""
    from benchmarks.report import write_results_md

    measured = json.loads(source.read_text())
    rows = {(r["workload"], r["strategy"]): r for r in measured["rows"]}
    start, pairs = time.perf_counter(), []
    for workload, torch_row in todo:
        peaks = {s: r["measured"]["peak_bytes"] for (w, s), r in rows.items() if w == workload and "measured" in r}
        print(f"pair: {workload} {torch_row} ...", flush=True)
        pairs.append(run_pair_in_subprocess(workload, torch_row, peaks, rounds=rounds, timeout=timeout,
                                            lowering=lowering))
        pair = pairs[-1]
        print(f"    {pair.get('error') or 'median ratio %.3f' % pair['ratio_median']}", flush=True)
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "memopt": memopt_revision(),
               "rounds": rounds, "results": source.name, "results_date": measured["date"],
               "total_wall_s": time.perf_counter() - start, "lowering": lowering, "pairs": pairs}
    if lowering == "fx":
        (source.parent / "pairs-fx.json").write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {write_pairs_md(source.parent, results, rows, 'PAIRS-fx.md')}")
        return results
    (source.parent / "pairs.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {write_pairs_md(source.parent, results, rows)} and {write_results_md(source.parent)}")
    return results


def pairs_of_run(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The pairs a run.py run asked for: each torch row that measured a peak, with its memopt-inductor= row run."""
    ran = {(r["workload"], r["strategy"]) for r in rows}
    return [(r["workload"], r["strategy"]) for r in rows if r["strategy"] in PAIRED and "measured" in r
            and (r["workload"], f"memopt-inductor={r['strategy']}") in ran]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="gpt2,llama,mlp")
    parser.add_argument("--torch", default=",".join(PAIRED), help=f"torch rows, from {', '.join(PAIRED)}")
    parser.add_argument("--rounds", type=int, default=7, help="timed steps of each row, alternating")
    parser.add_argument("--results", default=str(HERE / "results.json"), help="run.py's results (the peaks)")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per pair")
    parser.add_argument("--memopt", choices=("inductor", "fx"), default="inductor",
                        help="memopt's side: its programs compiled by Inductor, or run as FX graphs (memopt=<row>)")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    parser.add_argument("--peaks", type=json.loads, default={}, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        Path(args.json_out).write_text(json.dumps(measure_pair(*args.one, args.peaks, rounds=args.rounds,
                                                               threads=1, lowering=args.memopt), indent=1) + "\n")
        return 0
    unknown = sorted(set(args.torch.split(",")) - set(PAIRED))
    if unknown:
        parser.error(f"unknown torch rows {unknown}; choose from {list(PAIRED)}")
    todo = [(w, t) for w in args.workloads.split(",") for t in args.torch.split(",")]
    results = time_pairs(Path(args.results), todo, rounds=args.rounds, timeout=args.timeout, lowering=args.memopt)
    return 1 if any("error" in p for p in results["pairs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
