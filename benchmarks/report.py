"""results.json -> RESULTS.md: one table per workload, the plan's ledger against what was measured."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

MiB = 2**20
GiB = 2**30
STATIC = ("parameters", "gradients", "optimizer_state")
DASH = "—"
STEP_HEADER = "step (ms): wall median (min) / CPU median (min)"


def mib(nbytes: float | None, digits: int = 1) -> str:
    return DASH if nbytes is None else f"{nbytes / MiB:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def predicted_peak(row: dict[str, Any]) -> int | None:
    """memopt's prediction: of the eager step (eager row), of the plan a memopt row ran, or, for a memopt-inductor
    row, of the code Inductor wrote for that plan (memopt reads its allocations back from the wrapper)."""
    compiled = row.get("memopt", {}).get("inductor", {}).get("predicted_peak_bytes")
    return compiled or row.get("plan", {}).get("peak_bytes") or row.get("memopt", {}).get("predicted_peak_bytes")


def error_percent(predicted: float | None, measured: float | None) -> str:
    if predicted is None or not measured:
        return DASH
    return f"{(predicted - measured) / measured * 100:+.1f}"


def compile_or_plan_time(row: dict[str, Any]) -> str:
    if "plan" in row:
        seconds = row["plan"].get("seconds")
        return DASH if seconds is None else f"plan {seconds:.1f}"
    if "memopt" in row and row["settings"].get("plan_seconds") is not None:
        # memopt.plan at the row's budget, timed apart from the module's own first call
        text = f"plan {row['settings']['plan_seconds']:.1f}"
        if "inductor" in row["memopt"]:  # the first step plans and compiles: what it took beyond a steady step
            text += f", compile {row['first_step_s'] - row['step_median_s']:.1f}"
        return text
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


def cpu_min(row: dict[str, Any]) -> float | None:
    """The fastest timed step by CPU time: other processes can only add to a step's time, never take from it."""
    return min(row["step_cpu_s"]) if row.get("step_cpu_s") else None


def ms(row: dict[str, Any]) -> str:
    """Step time in ms: wall median (wall minimum) / CPU-time median (CPU-time minimum)."""
    wall = f"{row['step_median_s'] * 1e3:.0f} ({row['step_min_s'] * 1e3:.0f})"
    if cpu_min(row) is None:
        return wall + f" / {DASH}"
    return wall + f" / {row['step_cpu_median_s'] * 1e3:.0f} ({cpu_min(row) * 1e3:.0f})"


def time_ratio(row: dict[str, Any], base: dict[str, Any]) -> str:
    """row ÷ base: wall median (CPU-time minimum)."""
    wall = f"{row['step_median_s'] / base['step_median_s']:.2f}"
    cpu, base_cpu = cpu_min(row), cpu_min(base)
    return wall + (f" ({cpu / base_cpu:.2f})" if cpu and base_cpu else "")


def strategy_row(row: dict[str, Any], eager: dict[str, Any] | None) -> list[str]:
    if "error" in row:
        return [row["strategy"], f"error: {' '.join(row['error'].split())[:120]}"] + [""] * 9  # one table line
    if "skipped" in row:
        return [row["strategy"], f"skipped: {row['skipped'][:120]}"] + [""] * 9
    peak = row["measured"]["peak_bytes"]
    eager_ok = eager is not None and "error" not in eager
    ratio = time_ratio(row, eager) if eager_ok else DASH
    loss_diff = f"{abs(row['loss'] - eager['loss']):.1e}" if eager_ok else DASH
    return [
        row["strategy"], mib(peak), mib(predicted_peak(row)), error_percent(predicted_peak(row), peak),
        ms(row), ratio, compile_or_plan_time(row),
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
    header = ["strategy", "measured peak (MiB)", "predicted peak (MiB, memopt)", "error %", STEP_HEADER,
              "× eager, wall median (CPU min)", "compile/plan (s)", "loss (step 1)", "|loss − eager|", "graphs",
              "saved activations (MiB) @ budget"]
    lines += table(header, [strategy_row(row, eager) for row in rows]) + [""]
    if eager is not None:
        lines += ledger_lines(eager)
    lines += [f"- {row['strategy']}: unaccounted bytes {mib(row['measured']['unaccounted_bytes'], 3)} MiB"
              for row in rows if row.get("measured", {}).get("unaccounted_bytes")]
    lines += [f"- {row['strategy']}: graph breaks: {'; '.join(row['dynamo']['graph_break_reasons'])}"
              for row in rows if row.get("dynamo", {}).get("graph_breaks")]
    found = lowest_peak_cells(rows)
    if found is not None and any(is_memopt(r) for r in rows):
        lines += ["", "The least memory each side reached (memopt: its rows within budget):", ""]
        lines += table(LOWEST_PEAK_HEADER, [found])
    lines += [""] + memopt_section(rows, eager)
    return lines + [""]


def is_memopt(row: dict[str, Any]) -> bool:
    return row["strategy"].startswith("memopt")


# the budgeted memopt rows, by how the planned programs run: strategy-name prefix and label
FAMILIES = (("memopt@", "memopt@k (FX, eager kernels)"), ("memopt-inductor@", "memopt-inductor@k (Inductor)"),
            ("memopt-inductor=", "memopt-inductor=<torch row> (Inductor, at that row's measured peak)"),
            ("memopt-backend@", "memopt-backend@k (torch.compile(backend=\"memopt\"), eager kernels)"))


def family_name(prefix: str) -> str:
    """memopt@k, memopt-inductor@k, memopt-inductor=row: how the tables name a family."""
    return prefix + ("row" if prefix.endswith("=") else "k")


def family_rows(rows: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["strategy"].startswith(prefix)]


def present_families(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(prefix, label) for prefix, label in FAMILIES if family_rows(rows, prefix)]


def ran(row: dict[str, Any]) -> bool:
    return "error" not in row and "measured" in row


def same_loss(row: dict[str, Any], eager: dict[str, Any] | None) -> str:
    if eager is None or not ran(eager):
        return DASH
    return "yes" if row["loss"] == eager["loss"] else f"no ({row['loss'] - eager['loss']:+.1e})"


def budget_position(row: dict[str, Any]) -> str:
    settings = row.get("settings", {})
    if "budget_index" in settings:
        return f"{settings['budget_index']}/{settings['budget_count']}"
    if "peak_of" in settings:
        return f"peak of {settings['peak_of']} ({mib(settings['peak_of_bytes'])})"
    return "2 × eager (not binding)"


def memopt_row(row: dict[str, Any], eager: dict[str, Any] | None) -> list[str]:
    if not ran(row):
        budget = row.get("settings", {}).get("budget_bytes")
        return [row["strategy"], mib(budget), "", "", f"**error**: {row.get('error', '')[:160]}"] + [""] * 8
    planned, solver = row["memopt"], row["memopt"]["solver"]
    eager_ok = eager is not None and ran(eager)
    gap = DASH if solver["gap"] is None else f"{solver['gap']:.2f}"
    objective = DASH if solver["objective_s"] is None else f"{solver['objective_s'] * 1e3:.1f}"
    predicted = mib(planned["predicted_peak_bytes"])
    compiled = planned.get("inductor")
    if compiled:  # the compiled code's peak, then the plan's, and what memopt turned off to fit
        predicted = (f"{mib(compiled.get('predicted_peak_bytes'))} (plan {predicted})"
                     + inductor_passes_off(compiled))
    return [
        row["strategy"], mib(planned["budget_bytes"]), budget_position(row), predicted,
        mib(row["measured"]["peak_bytes"]), "yes" if planned["fits"] else "**NO**",
        f"{planned['recomputed']} / {planned['decisions']} ({mib(planned['recomputed_bytes'])})", objective,
        f"{solver['name']} {solver['status']} ({gap})", plan_seconds(row), ms(row),
        time_ratio(row, eager) if eager_ok else DASH, same_loss(row, eager),
    ]


def plan_seconds(row: dict[str, Any]) -> str:
    """memopt.plan's time at the row's budget, timed apart (the backend plans inside its first compile)."""
    seconds = row["settings"].get("plan_seconds")
    return DASH if seconds is None else f"{seconds:.1f}"


def inductor_passes_off(compiled: dict[str, Any]) -> str:
    """The Inductor options memopt.compile set beyond its defaults to bring the compiled code under the budget."""
    if "error" in compiled:
        return f"; {compiled['error']}"
    off = {**compiled.get("forward_options", {}), **compiled.get("backward_options", {})}
    return "; " + ", ".join(f"{k}={v}" for k, v in off.items()) if off else ""


def monotone_breaks(budgeted: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Pairs of rows that ran where the lower budget gave the higher measured peak."""
    done = sorted((r for r in budgeted if ran(r)), key=lambda r: r["memopt"]["budget_bytes"])
    return [(low, high) for i, low in enumerate(done) for high in done[i + 1:]
            if low["measured"]["peak_bytes"] > high["measured"]["peak_bytes"]]


def monotone_lines(budgeted: list[dict[str, Any]], label: str = "") -> list[str]:
    """Lower budget never gives a higher measured peak: checked over every pair of rows that ran."""
    done = sorted((r for r in budgeted if ran(r)), key=lambda r: r["memopt"]["budget_bytes"])
    name = f"monotone, {label}" if label else "monotone"
    if len(done) < 2:
        return [f"- {name}: not checked ({len(done)} budgeted row(s) ran)"]
    broken = monotone_breaks(budgeted)
    peaks = " ≤ ".join(mib(r["measured"]["peak_bytes"]) for r in done)
    missing = f" (only the {len(done)} of {len(budgeted)} rows that ran)" if len(done) < len(budgeted) else ""
    if not broken:
        return [f"- {name}{missing}: **yes**, measured peaks in budget order: {peaks} MiB"]
    pairs = "; ".join(f"{low['strategy']} {mib(low['measured']['peak_bytes'])} MiB > {high['strategy']} "
                      f"{mib(high['measured']['peak_bytes'])} MiB" for low, high in broken)
    return [f"- {name}{missing}: **no**: {pairs}"]


def chunked_lines(mine: list[dict[str, Any]]) -> list[str]:
    """What each memopt row ran over slices of the tokens (chunk_loss / chunk_mlp), as its plan says."""
    parts = []
    for row in mine:
        if not ran(row):
            continue
        heads, blocks = row["memopt"].get("chunked", []), row["memopt"].get("chunked_mlp", [])
        said = [f"loss head in {head['chunks']}" for head in heads]
        said += [f"{len(blocks)} MLP blocks in {blocks[0]['chunks']}"] if blocks else []
        parts.append(f"{row['strategy']}: {', '.join(said) or 'nothing'}")
    return [f"- over slices of the tokens (chunks): {'; '.join(parts)}"] if parts else []


def budget_range_lines(budgeted: list[dict[str, Any]]) -> list[str]:
    """The numbers each memopt@k row derived its budget from; every row computed them in its own process."""
    keys = ("minimum_bytes", "proven_minimum_bytes", "eager_predicted_bytes")
    seen = {tuple(r["settings"][k] for k in keys) for r in budgeted if all(k in r.get("settings", {}) for k in keys)}
    if not seen:
        return []
    minimum, proven, eager_peak = min(seen)
    triples = "; ".join(" / ".join(mib(v, 3) for v in triple) for triple in sorted(seen))
    agree = ("every row computed the same three numbers" if len(seen) == 1 else
             f"**the rows disagree on them** ({len(seen)} different triples: {triples} MiB)")
    return [(f"Budgets: memopt@k = m + k/5 × (e − m), with m = {mib(minimum)} MiB the smallest budget memopt can "
             f"meet (`BudgetInfeasibleError.minimum` of `memopt.plan(..., budget=1)`; no plan of any kind fits below "
             f"{mib(proven)} MiB, `.proven_minimum`) and e = {mib(eager_peak)} MiB memopt's predicted eager peak, "
             f"both of the whole step with the workload's optimizer; {agree}."), ""]


def faster(mine: dict[str, Any], other: dict[str, Any]) -> str:
    """"yes" when every timed step of `mine` took less CPU time than every step of `other`, "no" for the
    reverse, "overlap" otherwise (wall times where CPU times are missing)."""
    key = "step_cpu_s" if mine.get("step_cpu_s") and other.get("step_cpu_s") else "step_s"
    if max(mine[key]) < min(other[key]):
        return "yes"
    return "no" if min(mine[key]) > max(other[key]) else "overlap"


def same_peak_pairs(rows: list[dict[str, Any]], prefix: str = "memopt@"
                    ) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """Each torch row but eager that ran (torch.compile budgets, per-block checkpointing, linear_cross_entropy,
    the auto-chunker), with the row of the memopt family `prefix` ("memopt@" or "memopt-inductor@") whose
    measured peak is the highest at or below its own (None: every row of that family peaks higher)."""
    budgeted = [r for r in family_rows(rows, prefix) if ran(r)]
    others = [r for r in rows if ran(r) and not is_memopt(r) and r["strategy"] != "eager"]
    if not budgeted:
        return []
    pairs = []
    for other in others:
        fitting = [r for r in budgeted if r["measured"]["peak_bytes"] <= other["measured"]["peak_bytes"]]
        pairs.append((other, max(fitting, key=lambda r: r["measured"]["peak_bytes"]) if fitting else None))
    return pairs


def same_peak_cells(other: dict[str, Any], best: dict[str, Any] | None, lowest: dict[str, Any]) -> list[str]:
    """One memopt family's five cells beside a torch row: its row, peak, step, ratio and verdict."""
    if best is None:
        return [f"none: the lowest, {lowest['strategy']}, peaks at {mib(lowest['measured']['peak_bytes'])}",
                DASH, DASH, DASH, DASH]
    return [best["strategy"], mib(best["measured"]["peak_bytes"]), ms(best), time_ratio(best, other),
            faster(best, other)]


def same_peak_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The same-peak pairs, step times side by side: the torch row, then each memopt family that ran."""
    families = [(prefix, label) for prefix, label in present_families(rows)
                if any(ran(r) for r in family_rows(rows, prefix))]
    if not families or not same_peak_pairs(rows, families[0][0]):
        return []
    torch_rows = [other for other, _ in same_peak_pairs(rows, families[0][0])]
    cells: dict[str, list[str]] = {other["strategy"]: [other["strategy"], mib(other["measured"]["peak_bytes"]),
                                                       ms(other)] for other in torch_rows}
    header = ["torch strategy", "its measured peak (MiB)", f"its {STEP_HEADER}"]
    for prefix, _ in families:
        lowest = min((r for r in family_rows(rows, prefix) if ran(r)), key=lambda r: r["measured"]["peak_bytes"])
        for other, best in same_peak_pairs(rows, prefix):
            cells[other["strategy"]] += same_peak_cells(other, best, lowest)
        name = family_name(prefix)
        header += [f"{name} row at or below", f"{name} measured peak (MiB)", f"{name} {STEP_HEADER}",
                   f"{name} ÷ torch, wall median (CPU min)", f"{name} faster (CPU ranges)"]
    names = " and ".join(f"{label} row" for _, label in families)
    lines = [(f"Same measured peak: for each torch row but eager, the {names} with the highest measured peak at or below its measured peak "
              "(so memopt uses no more memory), step times side by side. faster: \"yes\" when each of "
              "memopt's timed steps took less CPU time than each of the torch row's, \"no\" for the reverse, "
              "\"overlap\" when their ranges overlap (then the ratio of minima is all there is, and it is "
              "within this run's noise)."), ""]
    return lines + table(header, list(cells.values())) + [""]


def against_fx_lines(rows: list[dict[str, Any]], prefix: str, what: str) -> list[str]:
    """A family against memopt@k at the same budget: memopt-inductor@k (the same plan's programs, fused or not),
    memopt-backend@k (the same step planned from AOTAutograd's joint graph)."""
    fx = {r["strategy"].split("@")[1]: r for r in family_rows(rows, "memopt@") if ran(r)}
    pairs = [(fx[r["strategy"].split("@")[1]], r) for r in family_rows(rows, prefix)
             if ran(r) and r["strategy"].split("@")[1] in fx]
    if not pairs:
        return []

    def apart(mine: dict[str, Any], base: dict[str, Any]) -> str:
        return f"{mine['measured']['peak_bytes'] / base['measured']['peak_bytes'] - 1:+.1%}"

    text = "; ".join(f"@{i['strategy'].split('@')[1]}: peak {mib(i['measured']['peak_bytes'])} vs "
                     f"{mib(f['measured']['peak_bytes'])} MiB ({apart(i, f)}), step {time_ratio(i, f)}"
                     for f, i in pairs)
    return [f"- {family_name(prefix)} against memopt@k (same budget; step ratio {what} ÷ FX, wall median (CPU min)): "
            f"{text}"]


def memopt_section(rows: list[dict[str, Any]], eager: dict[str, Any] | None) -> list[str]:
    """memopt.compile under five budgets between its minimum and eager's peak (FX and Inductor programs), and
    memopt's per-block baseline."""
    mine = [r for r in rows if is_memopt(r)]
    if not mine:
        return []
    budgeted = [r for prefix, _ in FAMILIES for r in family_rows(mine, prefix)]
    header = ["strategy", "budget (MiB)", "k/5, or the peak it matches", "predicted peak (MiB)", "measured peak (MiB)",
              "measured ≤ budget",
              "recomputed / candidates (MiB)", "predicted recompute (ms)", "solver status (gap)", "plan (s)",
              STEP_HEADER, "× eager, wall median (CPU min)", "loss = eager (bitwise)"]
    fits = [r for r in mine if ran(r) and r["memopt"]["fits"]]
    lines = ["### memopt under a budget", ""] + budget_range_lines(budgeted)
    if family_rows(mine, "memopt-inductor@"):
        lines += [("memopt-inductor@k: the same budgets, `memopt.compile(..., backend=\"inductor\")`: the planned "
                   "forward and backward compiled by Inductor on the first step (compile time in the workload's "
                   "table). Its predicted peak is the compiled code's, read from Inductor's wrapper, with the plan's "
                   "in brackets and any Inductor pass memopt turned off to fit. Its loss equals eager's within "
                   "Inductor's float reordering, not bitwise."), ""]
    if family_rows(mine, "memopt-inductor="):
        lines += [("memopt-inductor=<torch row>: Inductor as above, asked to peak no higher than that torch row "
                   "measured earlier in this run: the budget is the smallest whose planned part (the budget less "
                   "memopt's 2% headroom) is that peak. Below memopt's smallest plan, memopt compiles that plan "
                   "and a few just above it and runs one whose code fits (its plan then peaks above the budget); "
                   "an error row means none did."), ""]
    lines += table(header, [memopt_row(r, eager) for r in mine]) + [""]
    lines += [f"- measured ≤ budget: {len(fits)} of {len(mine)} memopt rows"
              + ("" if len(fits) == len(mine) else " (**not all**: see the rows marked NO or error)")]
    lines += chunked_lines(mine)
    for prefix, _ in present_families(mine):
        lines += monotone_lines(family_rows(mine, prefix), family_name(prefix))
    lines += against_fx_lines(mine, "memopt-inductor@", "Inductor")
    lines += against_fx_lines(mine, "memopt-backend@", "backend")
    blocks = next((r for r in mine if r["strategy"] == "memopt-blocks" and ran(r)), None)
    checkpointed = next((r for r in rows if r["strategy"] == "checkpoint" and ran(r)), None)
    if blocks and checkpointed:
        lines.append(f"- memopt-blocks (memopt recomputes all but each block's outputs) against torch.utils.checkpoint "
                     f"per block: measured peak {mib(blocks['measured']['peak_bytes'])} vs "
                     f"{mib(checkpointed['measured']['peak_bytes'])} MiB, step {ms(blocks)} vs {ms(checkpointed)} ms")
    return lines + [""] + same_peak_lines(rows)


def lowest_peaks(rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The torch row with the lowest measured peak, and the memopt row with the lowest measured peak among those
    that stayed within their budget (None where no such row ran)."""
    def lowest(candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
        return min(candidates, key=lambda r: r["measured"]["peak_bytes"], default=None)

    torch_rows = [r for r in rows if ran(r) and not is_memopt(r)]
    fitting = [r for r in rows if ran(r) and is_memopt(r) and r.get("memopt", {}).get("fits")]
    return lowest(torch_rows), lowest(fitting)


def lowest_peak_cells(rows: list[dict[str, Any]]) -> list[str] | None:
    """The lowest torch peak (its row), memopt's smallest measured peak within budget (its row), and memopt's
    difference from torch's in %: None where neither side ran."""
    best_torch, best_memopt = lowest_peaks(rows)
    if best_torch is None and best_memopt is None:
        return None

    def cells(row: dict[str, Any] | None) -> list[str]:
        return [DASH, DASH] if row is None else [mib(row["measured"]["peak_bytes"]), row["strategy"]]

    difference = DASH
    if best_torch is not None and best_memopt is not None:
        torch_peak, memopt_peak = best_torch["measured"]["peak_bytes"], best_memopt["measured"]["peak_bytes"]
        difference = f"{(memopt_peak - torch_peak) / torch_peak * 100:+.1f}"
    return cells(best_torch) + cells(best_memopt) + [difference]


LOWEST_PEAK_HEADER = ["lowest torch peak (MiB)", "torch row", "memopt's lowest peak within budget (MiB)",
                      "memopt row", "memopt − torch (%)"]


def lowest_peak_lines(by_workload: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Per workload, the least memory each side reached: torch's lowest measured peak over all its rows, memopt's
    over its rows that stayed within their budget."""
    out = []
    for name, rows in by_workload.items():
        found = lowest_peak_cells(rows)
        if found is not None and any(is_memopt(r) for r in rows):
            out.append([name] + found)
    if not out:
        return []
    return ["## The least memory each side reached", "",
            ("Per workload: the lowest measured peak among all torch rows (eager, checkpointing, torch.compile, "
             "linear_cross_entropy, the auto-chunker), and the lowest among memopt's rows that measured at or under "
             "their budget; memopt − torch = (memopt − torch) / torch."), "",
            *table(["workload", *LOWEST_PEAK_HEADER], out), ""]


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


def summary_lines(by_workload: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One line per workload: memopt rows within budget and, per memopt family (FX, Inductor), monotone or not and
    how the same-peak pairs came out."""
    families = [f for f in FAMILIES if any(family_rows(rows, f[0]) for rows in by_workload.values())]
    out = []
    for name, rows in by_workload.items():
        mine = [r for r in rows if is_memopt(r)]
        if not mine:
            continue
        fits = sum(1 for r in mine if ran(r) and r["memopt"]["fits"])
        line = [name, f"{fits} of {len(mine)}"]
        for prefix, _ in families:
            budgeted = family_rows(mine, prefix)
            checked = sum(1 for r in budgeted if ran(r)) >= 2
            monotone = DASH if not checked else "no" if monotone_breaks(budgeted) else "yes"
            outcomes = [DASH if best is None else faster(best, other) for other, best in same_peak_pairs(rows, prefix)]
            labels = (("yes", "memopt faster"), ("overlap", "overlap"), ("no", "memopt slower"),
                      (DASH, "no memopt row peaks that low"))
            counts = ", ".join(f"{outcomes.count(o)} {label}" for o, label in labels if outcomes.count(o))
            line += [monotone, counts or DASH]
        out.append(line)
    if not out:
        return []
    header = ["workload", "memopt rows with measured ≤ budget"]
    for prefix, _ in families:
        name = family_name(prefix)
        header += [f"monotone, {name}" if len(families) > 1 else "monotone",
                   f"same measured peak, {name} against each torch row (CPU-time ranges)"]
    return ["## memopt under a budget: summary", ""] + table(header, out) + [
        "", "Budgets, plans and the pairs: the section \"memopt under a budget\" of each workload.", ""]


def spread_lines(rows: list[dict[str, Any]]) -> list[str]:
    """How far the timed steps of one configuration spread (slowest ÷ fastest): the noise of this run."""
    def spread(key: str) -> list[float]:
        return [max(r[key]) / min(r[key]) for r in rows if len(r.get(key) or ()) > 1]

    wall, cpu = spread("step_s"), spread("step_cpu_s")
    if not wall:
        return []
    line = f"- spread of the timed steps within one configuration (slowest ÷ fastest): wall up to {max(wall):.2f}"
    line += f" (median {statistics.median(wall):.2f})"
    if cpu:
        line += f", CPU time up to {max(cpu):.2f} (median {statistics.median(cpu):.2f})"
    return [line + "; step-time differences smaller than that are noise."]


def render_markdown(results: dict[str, Any], layout_rows: list[dict[str, Any]] | None = None,
                    offload_rows: list[dict[str, Any]] | None = None, pairs: dict[str, Any] | None = None,
                    loss_kernel: dict[str, Any] | None = None) -> str:
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
        *spread_lines(results["rows"]),
        "",
        "Each configuration ran in its own process with an empty Inductor cache (compile times are cold). "
        "Peaks are absolute live CPU bytes (parameters, optimizer state and inputs included) of one "
        "steady-state step (gradients set to None, optimizer state present), from `memopt.measure_peak`; "
        "the prediction is `memopt.plan` of the eager step, made before training. error % = "
        "(predicted − measured) / measured. Step time: wall median (wall minimum) / CPU-time median (CPU-time "
        "minimum) of the timed steps, never profiled. The machine is shared with other work: wall time "
        "stretches whenever another process holds a core, while the CPU time of this one-thread process counts "
        "only the step's own work (a busy sibling core and shared caches still slow it, so it varies too); the "
        "CPU-time minimum is the steadiest figure. "
        "compile = first step − median step. loss is the first step's; same seed and weights everywhere. "
        "graphs: Dynamo graphs compiled (breaks in brackets). saved activations: bytes the min-cut "
        "partitioner kept for the backward, excluding inputs and parameters, with the "
        "`activation_memory_budget` it actually read. "
        "memopt rows train with `memopt.compile(model, budget=..., optimizer=...)` (the module returns the loss; "
        "its backward recomputes what the plan chose); their predicted peak is the plan they ran, and plan time "
        "is one `memopt.plan` at that budget timed on its own (the module plans again on its first step). "
        "memopt@k and memopt-blocks run the planned programs as FX graphs (eager's kernels, one by one); "
        "memopt-inductor@k compiles the same plans with Inductor (`backend=\"inductor\"`), as the "
        "torch.compile rows are compiled, and its predicted peak is that of the code Inductor wrote. "
        "memopt-backend@k trains at memopt@k's budget through `torch.compile(backend=\"memopt\")` (eager "
        "kernels); it plans inside its first compile, so its plan time is in the compile time. Every compiled "
        "row, torch's and the backend's, compiles the model and its loss as one module that returns only the "
        "loss, as a careful user would. "
        "× eager divides this row's median wall step by the eager row's (the CPU-time minima in brackets), "
        "each measured in its own process at its own moment of the run, so the load differed between them.",
        "",
    ]
    by_workload: dict[str, list[dict[str, Any]]] = {}
    for row in results["rows"]:
        by_workload.setdefault(row["workload"], []).append(row)
    lines += summary_lines(by_workload)
    lines += lowest_peak_lines(by_workload)
    if pairs:  # benchmarks/pairs.py's timing of this run's same-peak pairs in one process
        from benchmarks.pairs import pairs_markdown

        rows = {(row["workload"], row["strategy"]): row for row in results["rows"]}
        lines += ["## Same measured peak, timed in one process", "",
                  "Each process of this run runs the same code up to ~13% faster or slower than another, more than "
                  "the strategies differ; so after the rows, each torch row was timed again beside "
                  "`memopt-inductor=<row>`, both in one process (`benchmarks/pairs.py`, also in PAIRS.md).", "",
                  *pairs_markdown(pairs, rows), ""]
    for name, rows in by_workload.items():
        planned_only = all(row["strategy"] == "plan" for row in rows)
        lines += plan_only_section(rows[0]) if planned_only else workload_section(name, rows)
    text = "\n".join(lines).rstrip() + "\n"
    if layout_rows:  # benchmarks/layout_order.py's section
        from benchmarks.layout_order import markdown

        text += "\n" + markdown(layout_rows)
    if offload_rows:  # benchmarks/offload.py's table: the predicted h100 stall beside remat alone
        from benchmarks.offload import NOTES, table

        text += ("\n## Offload beside remat alone (h100 spec, predicted)\n\n"
                 "From `benchmarks/offload.json` (`python -m benchmarks.offload`; details in OFFLOAD.md): plans on "
                 "fake tensors for the h100 spec, so recompute and stall seconds are predictions, not "
                 "measurements.\n\n" + table(offload_rows) + "\n\n" + NOTES)
    if loss_kernel:  # benchmarks/loss_kernel.py's table: the fused kernel's memory model against the chunked graph's
        from benchmarks.loss_kernel import report

        text += "\n" + report(loss_kernel).replace("# ", "## ", 1)
    return text


def write_results_md(directory: Path) -> Path:
    """RESULTS.md from results.json (benchmarks/run.py) and, when present, layout_order.json, offload.json,
    loss_kernel.json and pairs.json (the last only when its pairs were timed at the peaks of this results.json)."""
    results = json.loads((directory / "results.json").read_text())
    layout, offload, pairs = directory / "layout_order.json", directory / "offload.json", directory / "pairs.json"
    layout_rows = json.loads(layout.read_text()) if layout.exists() else None
    offload_rows = json.loads(offload.read_text()) if offload.exists() else None
    timed = json.loads(pairs.read_text()) if pairs.exists() else None
    kernel = directory / "loss_kernel.json"
    loss_kernel = json.loads(kernel.read_text()) if kernel.exists() else None
    if timed is not None and timed.get("results_date") != results["date"]:
        timed = None  # timed against another run's peaks
    path = directory / "RESULTS.md"
    path.write_text(render_markdown(results, layout_rows, offload_rows, timed, loss_kernel))
    return path
