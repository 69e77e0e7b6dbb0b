"""results.json -> RESULTS.md: one table per workload, the plan's ledger against what was measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MiB = 2**20
GiB = 2**30
STATIC = ("parameters", "gradients", "optimizer_state")
DASH = "—"


def mib(nbytes: float | None, digits: int = 1) -> str:
    return DASH if nbytes is None else f"{nbytes / MiB:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def predicted_peak(row: dict[str, Any]) -> int | None:
    return row.get("plan", {}).get("peak_bytes")


def error_percent(predicted: float | None, measured: float | None) -> str:
    if predicted is None or not measured:
        return DASH
    return f"{(predicted - measured) / measured * 100:+.1f}"


def compile_or_plan_time(row: dict[str, Any]) -> str:
    if "plan" in row:
        seconds = row["plan"].get("seconds")
        return DASH if seconds is None else f"plan {seconds:.1f}"
    if "dynamo" in row:  # the first step compiles; what it took beyond a steady step is the compile
        return f"compile {row['first_step_s'] - row['step_median_s']:.1f}"
    return DASH


def graphs(row: dict[str, Any]) -> str:
    dynamo = row.get("dynamo")
    if not dynamo:
        return DASH
    text = str(dynamo["graphs"])
    if dynamo["graph_breaks"]:
        text += f" ({dynamo['graph_breaks']} breaks)"
    if dynamo.get("recompiled_after_warmup"):
        text += ", recompiled later"
    return text


def saved_activations(row: dict[str, Any]) -> str:
    """What the min-cut partitioner saved for the backward, and the budget it saw."""
    partitions = row.get("partitions")
    if not partitions:
        return DASH
    budgets = sorted({p["memory_budget"] for p in partitions})
    saved = sum(p["saved_activation_bytes"] for p in partitions)
    return f"{mib(saved)} @ {', '.join(f'{b:g}' for b in budgets)}"


def strategy_row(row: dict[str, Any], eager: dict[str, Any] | None) -> list[str]:
    if "error" in row:
        return [row["strategy"], f"error: {row['error'][:120]}"] + [""] * 9
    peak = row["measured"]["peak_bytes"]
    eager_ok = eager is not None and "error" not in eager
    ratio = f"{row['step_median_s'] / eager['step_median_s']:.2f}" if eager_ok else DASH
    loss_diff = f"{abs(row['loss'] - eager['loss']):.1e}" if eager_ok else DASH
    return [
        row["strategy"], mib(peak), mib(predicted_peak(row)), error_percent(predicted_peak(row), peak),
        f"{row['step_median_s'] * 1e3:.0f} ({row['step_min_s'] * 1e3:.0f})", ratio, compile_or_plan_time(row),
        f"{row['loss']:.6f}",        loss_diff, graphs(row), saved_activations(row),
    ]


def ledger_lines(eager: dict[str, Any]) -> list[str]:
    """memopt's ledger at its predicted peak against the static bytes measured after warm-up."""
    plan = eager.get("plan", {})
    if "error" in plan:
        return [f"memopt.plan failed: `{plan['error'][:300]}`", ""]
    if "ledger" not in plan or "measured" not in eager:
        return []
    ledger, static, measured = plan["ledger"], eager["static"], eager["measured"]["peak_bytes"]
    planned_static = plan.get("static") or {}
    rows = [[name, mib(ledger.get(name)), mib(planned_static.get(name)), mib(static.get(name))] for name in STATIC]
    rows += [[name, mib(ledger[name]), DASH, DASH] for name in ledger if name not in STATIC and ledger[name]]
    always_live = ("parameters", "optimizer_state")  # live for the whole step, so at either peak
    rows.append(["peak − parameters − optimizer state",
                 mib(plan["peak_bytes"] - sum(ledger.get(n, 0) for n in always_live)), DASH,
                 mib(measured - sum(static[n] for n in always_live))])
    rows.append(["**peak**", mib(plan["peak_bytes"]), DASH, mib(measured)])
    lines = [f"memopt's ledger at its predicted peak (node `{plan.get('peak_node')}`, plan time "
             f"{plan['seconds']:.1f} s) and its static ledger (whole step, all gradients), against the eager "
             "step: tensors held after warm-up (parameters, all gradients, optimizer state) and the measured peak.",
             ""]
    header = ["category", "predicted at peak (MiB)", "predicted static (MiB)", "measured (MiB)"]
    return lines + table(header, rows) + [""]


def workload_section(name: str, rows: list[dict[str, Any]]) -> list[str]:
    eager = next((r for r in rows if r["strategy"] == "eager"), None)
    described = next((r for r in rows if "description" in r), rows[0])
    params = described.get("parameters")
    title = f"## {name}: {described.get('description', '')}"
    lines = [title + (f", {params / 1e6:.1f} M parameters" if params else ""), ""]
    header = ["strategy", "measured peak (MiB)", "predicted peak (MiB, memopt)", "error %", "step median (min) (ms)",
              "× eager", "compile/plan (s)", "loss (step 1)", "|loss − eager|", "graphs",
              "saved activations (MiB) @ budget"]
    lines += table(header, [strategy_row(row, eager) for row in rows]) + [""]
    if eager is not None:
        lines += ledger_lines(eager)
    lines += [f"- {row['strategy']}: unaccounted bytes {mib(row['measured']['unaccounted_bytes'], 3)} MiB"
              for row in rows if row.get("measured", {}).get("unaccounted_bytes")]
    lines += [f"- {row['strategy']}: graph breaks: {'; '.join(row['dynamo']['graph_break_reasons'])}"
              for row in rows if row.get("dynamo", {}).get("graph_breaks")]
    return lines + [""]


def plan_only_section(row: dict[str, Any]) -> list[str]:
    lines = [f"## {row['workload']}: {row.get('description', '')} (planned only, fake mode)", ""]
    plan = row.get("plan", {})
    if "error" in row or "error" in plan:
        return lines + [f"error: `{(row.get('error') or plan['error'])[:500]}`", ""]
    ledger, static, expected = plan["ledger"], plan.get("static") or {}, row["expected_static"]

    def gib(nbytes: int | None) -> str:
        return DASH if nbytes is None else f"{nbytes / GiB:.3f}"

    rows = [[name, gib(ledger.get(name)), gib(static.get(name)), gib(expected[name]),
             f"{static.get(name, 0) - expected[name]:+,}"] for name in STATIC]
    rows += [[name, gib(ledger[name]), DASH, DASH, ""] for name in ledger if name not in STATIC and ledger[name]]
    rows.append(["**peak**", gib(plan["peak_bytes"]), DASH, DASH, ""])
    lines += [f"{row['parameters'] / 1e9:.3f} B parameters. Plan time {plan['seconds']:.1f} s; peak RSS of the "
              f"planning process {row['peak_rss_bytes'] / GiB:.2f} GiB ({row['rss_before_plan_bytes'] / GiB:.2f} GiB "
              f"before planning). Peak node `{plan.get('peak_node')}`. Expected optimizer state includes AdamW's "
              "4-byte `step` tensor per parameter tensor (CPU, not capturable).", ""]
    header = ["category", "at the peak (GiB)", "static (GiB)", "parameters × 4 / 4 / 8 bytes (GiB)",
              "static − expected (bytes)"]
    return lines + table(header, rows) + [""]


def render_markdown(results: dict[str, Any], layout_rows: list[dict[str, Any]] | None = None) -> str:
    machine, versions = results["machine"], results["versions"]
    loads = [row["load_average"] for row in results["rows"] if "load_average" in row]
    lines = [
        "# Benchmark results", "",
        f"Written by `python benchmarks/run.py` on {results['date']}, in {results['total_wall_s'] / 60:.1f} min "
        f"({results['settings']['repeats']} timed steps per configuration, "
        f"{results['settings'].get('threads') or 'default'} torch thread(s)"
        + (", **--quick sizes**" if results["settings"]["quick"] else "") + ").", "",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, "
        f"{(machine['ram_bytes'] or 0) / GiB:.1f} GiB RAM, {machine['platform']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- 1-minute load average when each configuration started: {min(loads):.2f} to {max(loads):.2f}"
        if loads else "- load average: not recorded",
        "",
        "Each configuration ran in its own process with an empty Inductor cache (compile times are cold). "
        "Peaks are absolute live CPU bytes (parameters, optimizer state and inputs included) of one "
        "steady-state step (gradients set to None, optimizer state present), from `memopt.measure_peak`; "
        "the prediction is `memopt.plan` of the eager step, made before training. error % = "
        "(predicted − measured) / measured. Step time: median (minimum) of the timed steps, never profiled; "
        "the machine is shared with other work, so the minimum is the steadier figure. "
        "compile = first step − median step. loss is the first step's; same seed and weights everywhere. "
        "graphs: Dynamo graphs compiled (breaks in brackets). saved activations: bytes the min-cut "
        "partitioner kept for the backward, excluding inputs and parameters, with the "
        "`activation_memory_budget` it actually read.",
        "",
    ]
    by_workload: dict[str, list[dict[str, Any]]] = {}
    for row in results["rows"]:
        by_workload.setdefault(row["workload"], []).append(row)
    for name, rows in by_workload.items():
        planned_only = all(row["strategy"] == "plan" for row in rows)
        lines += plan_only_section(rows[0]) if planned_only else workload_section(name, rows)
    text = "\n".join(lines).rstrip() + "\n"
    if layout_rows:  # benchmarks/layout_order.py's section
        from benchmarks.layout_order import markdown

        text += "\n" + markdown(layout_rows)
    return text


def write_results_md(directory: Path) -> Path:
    """RESULTS.md from results.json (benchmarks/run.py) and, when present, layout_order.json."""
    results = json.loads((directory / "results.json").read_text())
    layout = directory / "layout_order.json"
    layout_rows = json.loads(layout.read_text()) if layout.exists() else None
    path = directory / "RESULTS.md"
    path.write_text(render_markdown(results, layout_rows))
    return path
