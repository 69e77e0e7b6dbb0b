"""Arena layout and peak-lowering order on the benchmark workloads' joint graphs.

    python benchmarks/layout_order.py   # writes benchmarks/layout_order.json and its section of RESULTS.md

For each workload: the joint forward/backward graph (as memopt captures it), the
order pass (heuristics, then CP-SAT windows for 1 s), and the arena layout over
the new order's liveness. The Llama-7B shape (fake mode) is the large case:
about 7k nodes and 10k tensors.
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
from memopt.passes.arena_plan import plan_arena  # noqa: E402
from memopt.passes.liveness import liveness  # noqa: E402
from memopt.passes.order_plan import plan_order  # noqa: E402
from memopt.passes.storage import storage_table  # noqa: E402

WORKLOADS = {**{name: build for name, build in examples.BENCHMARK_WORKLOADS.items()}, "llama7b": examples.llama7b}


def measure(name: str) -> dict:
    workload = WORKLOADS[name]()
    model = workload.build()
    step = capture(model, workload.inputs(), loss_fn=workload.loss_fn)
    table = storage_table(step)
    started = time.perf_counter()
    order = plan_order(step.graph, table, time_limit_s=1.0)
    order_s = time.perf_counter() - started
    started = time.perf_counter()
    arena = plan_arena(step.graph, table, liveness(table, order.order), time_limit_s=5.0)
    layout_s = time.perf_counter() - started
    solution = arena.solution
    return {
        "workload": name,
        "description": workload.description,
        "nodes": len(table.node_names),
        "tensors": sum(1 for s in table.storages if s.defined_at >= 0),
        "order": {"peak_before": order.peak_before, "peak_after": order.peak_after, "method": order.method,
                  "status": order.status, "seconds": order_s},
        "layout": {"arena_bytes": solution.arena_bytes, "lower_bound_bytes": solution.lower_bound_bytes,
                   "fragmentation": solution.fragmentation, "planned": len(arena.planned_storages),
                   "unplanned": len(arena.unplanned), "unplanned_bytes": sum(arena.unplanned.values()),
                   "method": solution.method, "status": solution.status, "seconds": layout_s},
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "## Arena layout and order (joint forward/backward graph)",
        "",
        "`python benchmarks/layout_order.py`. The order pass runs first (1 s of CP-SAT windows after the "
        "heuristics); the arena is planned over the new order. Peaks of the graph (parameters and the batch "
        "included, optimizer state not). Tensors: intermediates the step allocates; planned: those whose op "
        "has an `out=` overload taking all its results and that do not leave the step (the rest are allocated "
        "as usual and reported: loss, gradients, ops without out=).",
        "",
        "| workload | nodes | tensors | graph peak traced (MiB) | after order (MiB) | order method | order (s) "
        "| arena (MiB) | lower bound (MiB) | fragmentation | planned tensors / ops outside | layout method "
        "| layout (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for r in rows:
        o, a = r["order"], r["layout"]
        lines.append(
            f"| {r['workload']} | {r['nodes']} | {r['tensors']} | {o['peak_before'] / mib:.1f} | "
            f"{o['peak_after'] / mib:.1f} | {o['method']} | {o['seconds']:.2f} | {a['arena_bytes'] / mib:.1f} | "
            f"{a['lower_bound_bytes'] / mib:.1f} | {a['fragmentation']:.2%} | {a['planned']} / {a['unplanned']} | "
            f"{a['method']} | {a['seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    rows = [measure(name) for name in (sys.argv[1:] or WORKLOADS)]
    (HERE / "layout_order.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown(rows))
    if (HERE / "results.json").exists():
        from benchmarks.report import write_results_md

        print(f"updated {write_results_md(HERE)}")


if __name__ == "__main__":
    main()
