"""Arena layout and peak-lowering order on the benchmark workloads' graphs.

    python benchmarks/layout_order.py [WORKLOAD ...]   # writes layout_order.json and its section of RESULTS.md

For each workload: the joint forward/backward graph (as memopt captures it), the
order pass (heuristics, then CP-SAT windows for 1 s), and the arena layout over
the new order's liveness: for the joint graph as one program, and for the
forward and backward programs on their own (cut at the loss's seed, as
``memopt.compile`` runs them: the forward's saved set is held to its end, the
backward plans only what it makes). The Llama-7B shape (fake mode, 32 layers)
and a 96-layer version of it (about 10k tensors) are the large cases.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


from memopt import examples  # noqa: E402
from memopt.capture import capture  # noqa: E402
from memopt.passes.arena_plan import plan_arena, run_order  # noqa: E402
from memopt.passes.liveness import liveness  # noqa: E402
from memopt.passes.order_plan import plan_order  # noqa: E402
from memopt.passes.storage import storage_table  # noqa: E402


def llama_deep(layers: int = 96, seq: int = 1024) -> examples.Workload:
    """The Llama-7B shape with ``layers`` layers on the meta device: ~108 tensors a layer."""
    return examples.llama7b(seq=seq, layers=layers)


WORKLOADS = {**examples.BENCHMARK_WORKLOADS, "llama7b": examples.llama7b, "llama7b-96L": llama_deep}


def measure(name: str) -> dict:
    workload = WORKLOADS[name]()
    model = workload.build()
    started = time.perf_counter()
    step = capture(model, workload.inputs(), loss_fn=workload.loss_fn)
    capture_s = time.perf_counter() - started
    table = storage_table(step)
    started = time.perf_counter()
    order = plan_order(step.graph, table, time_limit_s=1.0)
    order_s = time.perf_counter() - started
    row = {
        "workload": name,
        "description": workload.description,
        "nodes": len(table.node_names),
        "tensors": sum(1 for s in table.storages if s.defined_at >= 0),
        "capture_seconds": capture_s,
        "order": {"peak_before": order.peak_before, "peak_after": order.peak_after, "method": order.method,
                  "status": order.status, "seconds": order_s},
        "layout": _layout(step.graph, table, liveness(table, order.order)),
    }
    # the two programs memopt.compile runs: forward ops before the seed, in the order found
    ran = run_order(step, order.order)
    live = liveness(table, ran)
    cut = ran.index(_seed_position(step))
    row["forward"] = _layout(step.graph, table, live, window=(0, cut - 1))
    row["backward"] = _layout(step.graph, table, live, window=(cut + 1, len(ran) - 1))
    return row


def _seed_position(step) -> int:
    return [node.name for node in step.graph.graph.nodes].index(step.backward_start)


def _layout(graph, table, live, window=None) -> dict:
    started = time.perf_counter()
    arena = plan_arena(graph, table, live, time_limit_s=5.0, window=window)
    seconds = time.perf_counter() - started
    solution = arena.solution
    return {"arena_bytes": solution.arena_bytes, "lower_bound_bytes": solution.lower_bound_bytes,
            "fragmentation": solution.fragmentation, "planned": len(arena.planned_storages),
            "unplanned": len(arena.unplanned), "unplanned_bytes": sum(arena.unplanned.values()),
            "method": solution.method, "status": solution.status, "seconds": seconds}


def markdown(rows: list[dict]) -> str:
    mib = 2**20
    lines = [
        "## Arena layout and order",
        "",
        "`python benchmarks/layout_order.py`. The order pass runs first (1 s of CP-SAT windows after the "
        "heuristics); the arena is planned over the new order. Peaks of the graph (parameters and the batch "
        "included, optimizer state not). Tensors: intermediates the step allocates; planned: those whose op "
        "has an `out=` overload run by the device's own kernel, taking all its results, and that do not leave "
        "the step (the rest are allocated as usual and reported: loss, gradients, ops without such an `out=`).",
        "",
        "### Joint forward/backward graph",
        "",
        "| workload | nodes | tensors | graph peak traced (MiB) | after order (MiB) | order method | order (s) "
        "| arena (MiB) | lower bound (MiB) | fragmentation | planned tensors / ops outside | layout method "
        "| layout (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, a = r["order"], r["layout"]
        lines.append(
            f"| {r['workload']} | {r['nodes']} | {r['tensors']} | {o['peak_before'] / mib:.1f} | "
            f"{o['peak_after'] / mib:.1f} | {o['method']} | {o['seconds']:.2f} | {a['arena_bytes'] / mib:.1f} | "
            f"{a['lower_bound_bytes'] / mib:.1f} | {a['fragmentation']:.2%} | {a['planned']} / {a['unplanned']} | "
            f"{a['method']} | {a['seconds']:.2f} |"
        )
    if any("forward" in r for r in rows):
        lines += [
            "",
            "### Forward and backward programs on their own",
            "",
            "The step cut at the loss's seed as `memopt.compile` runs it. Forward: what the forward makes, the "
            "saved set held to its end; backward: what the backward makes (the saved set is its input).",
            "",
            "| workload | program | planned tensors | arena (MiB) | lower bound (MiB) | fragmentation | method "
            "| layout (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            for program in ("forward", "backward"):
                if program in r:
                    a = r[program]
                    lines.append(
                        f"| {r['workload']} | {program} | {a['planned']} | {a['arena_bytes'] / mib:.1f} | "
                        f"{a['lower_bound_bytes'] / mib:.1f} | {a['fragmentation']:.2%} | {a['method']} | "
                        f"{a['seconds']:.2f} |")
    note = next((r.get("note") for r in rows if r.get("note")), None)
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main() -> None:
    names = sys.argv[1:] or list(WORKLOADS)
    rows = [measure(name) for name in names]
    path = HERE / "layout_order.json"
    if path.exists() and sys.argv[1:]:  # a partial run keeps the other workloads' rows
        kept = [r for r in json.loads(path.read_text()) if r["workload"] not in names]
        rows = kept + rows
    (HERE / "layout_order.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown(rows))
    if (HERE / "results.json").exists():
        from benchmarks.report import write_results_md

        print(f"updated {write_results_md(HERE)}")


if __name__ == "__main__":
    main()
