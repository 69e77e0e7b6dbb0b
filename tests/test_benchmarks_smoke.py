"""Smoke test of the benchmark harness (benchmarks/run.py) on the --quick residual MLP.

No torch.compile here: one cold compile takes half a minute on a CPU. `python benchmarks/run.py
--quick` exercises those strategies end to end. memopt.compile at the tightest budget (memopt@0)
runs here; its Inductor twin (memopt-inductor@0) only in the slow tier.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import report, run
from benchmarks.strategies import (
    STRATEGIES,
    CheckpointedBlock,
    LinearCrossEntropyLM,
    Training,
    checkpoint_blocks,
    compile_with_budget,
)
from memopt.budget import CODE_SLACK, budget_for_peak
from memopt.config import PlanConfig
from memopt.examples import ResidualMLP


def test_eager_checkpoint_and_memopt_rows_measure_plan_and_agree_on_the_loss():
    leftover = torch.ones(2**18)  # 1 MiB alive in this process but not the workload's, as an earlier test might leave
    rows = [run.run_one("mlp", strategy, repeats=1, quick=True) for strategy in ("eager", "checkpoint", "memopt@0")]
    assert all(row["foreign_bytes"] >= leftover.nbytes for row in rows)
    for row in rows:
        assert "error" not in row, row.get("traceback")
        assert row["measured"]["peak_bytes"] > row["measured"]["baseline_bytes"] > 0
        assert row["static"]["parameters"] == 4 * row["parameters"]
    eager, checkpointed, planned = rows
    assert eager["plan"]["peak_bytes"] > 0 and "error" not in eager["plan"]
    assert checkpointed["loss"] == pytest.approx(eager["loss"], rel=1e-6)

    # memopt@0: the smallest budget memopt can meet, derived in the run from memopt's own plans
    settings, summary = planned["settings"], planned["memopt"]
    assert settings["budget_bytes"] == settings["minimum_bytes"] == summary["budget_bytes"]
    assert settings["proven_minimum_bytes"] <= settings["minimum_bytes"] < settings["eager_predicted_bytes"]
    assert settings["eager_predicted_bytes"] == pytest.approx(eager["plan"]["peak_bytes"], rel=0.01)  # order search
    assert summary["predicted_peak_bytes"] <= settings["budget_bytes"] and summary["recomputed"] > 0
    # the peak counts what this process held before the row (earlier tests' leftovers); the budget does not
    assert summary["fits"] and planned["measured"]["peak_bytes"] - planned["foreign_bytes"] <= settings["budget_bytes"]
    assert planned["loss"] == eager["loss"]  # same seed, same weights: the planned step computes the same loss
    # the budget comes from memopt.plan(..., chunk_loss="auto", chunk_mlp="auto"); this MLP has no language-model
    # head and no block wider than its input to chunk
    assert settings["chunk_loss"] == settings["chunk_mlp"] == "auto"
    assert summary["chunked"] == summary["chunked_mlp"] == []

    results = {"date": "today", "machine": run.machine(), "versions": run.versions(), "total_wall_s": 1.0,
               "settings": {"repeats": 1, "quick": True}, "rows": rows}
    text = report.render_markdown(results)
    assert "| eager |" in text and "| checkpoint |" in text and "predicted at peak" in text
    assert "### memopt under a budget" in text and "| memopt@0 |" in text
    assert "measured ≤ budget: 1 of 1 memopt rows" in text


def test_the_int8_row_trains_at_the_smallest_budget_it_plans_with_compress_allowed():
    eager, packed = (run.run_one("mlp", strategy, repeats=1, quick=True) for strategy in ("eager", "memopt-int8@0"))
    assert "error" not in packed, packed.get("traceback")
    settings, summary = packed["settings"], packed["memopt"]
    assert settings["compress"] == "int8" and settings["budget_bytes"] == settings["minimum_bytes"]
    assert summary["fits"] and summary["predicted_peak_bytes"] <= settings["budget_bytes"]
    # the quick MLP's saved activations are under the 16 KiB memopt packs at least: its plan is the exact one
    assert summary["compressed"] == [] and packed["loss"] == eager["loss"]


@pytest.mark.slow
def test_the_memopt_inductor_row_compiles_fits_and_records_the_compiled_peak():
    eager, compiled = (run.run_one("mlp", strategy, repeats=1, quick=True)
                       for strategy in ("eager", "memopt-inductor@0"))
    assert "error" not in compiled, compiled.get("traceback")
    settings, summary = compiled["settings"], compiled["memopt"]
    assert settings["backend"] == "inductor" and settings["budget_bytes"] == settings["minimum_bytes"]
    inductor = summary["inductor"]
    assert "error" not in inductor and inductor["compile_seconds"] > 0
    assert inductor["predicted_peak_bytes"] <= settings["budget_bytes"]  # memopt.compile's own check
    own_peak = compiled["measured"]["peak_bytes"] - compiled["foreign_bytes"]  # less what the process held before
    assert summary["fits"] and own_peak <= settings["budget_bytes"]
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-5)  # Inductor reorders float sums
    text = "\n".join(report.memopt_section([eager, compiled], eager))
    assert "| memopt-inductor@0 |" in text and "monotone, memopt-inductor@k: not checked" in text


def fake_row(strategy: str, peak_mib: float, step_s: float, budget_mib: float | None = None) -> dict:
    """A measured row as run.measure_config writes it, with only what the memopt report reads."""
    row = {"workload": "mlp", "strategy": strategy, "loss": 1.0, "step_median_s": step_s, "step_min_s": step_s,
           "step_cpu_median_s": step_s, "step_cpu_s": [step_s], "measured": {"peak_bytes": int(peak_mib * 2**20)},
           "settings": {}}
    if budget_mib is not None:
        budget = int(budget_mib * 2**20)
        row["settings"] = {"budget_bytes": budget, "plan_seconds": 0.1}
        row["memopt"] = {"budget_bytes": budget, "fits": row["measured"]["peak_bytes"] <= budget,
                         "predicted_peak_bytes": budget, "decisions": 4, "recomputed": 2, "recomputed_bytes": 0,
                         "solver": {"name": "memopt", "status": "feasible", "objective_s": 0.001,
                                    "lower_bound_s": 0.0, "gap": 0.5, "seconds": 0.0}}
    return row


def test_the_memopt_section_flags_a_peak_over_budget_and_a_broken_monotone_order():
    rows = [fake_row("eager", 400, 1.0), fake_row("compile-amb-0.5", 350, 1.2), fake_row("checkpoint", 250, 1.5),
            fake_row("memopt@0", 300, 1.1, budget_mib=300), fake_row("memopt@1", 340, 1.0, budget_mib=320),
            fake_row("memopt@2", 330, 0.9, budget_mib=340)]
    text = "\n".join(report.memopt_section(rows, rows[0]))
    assert "measured ≤ budget: 2 of 3 memopt rows (**not all**" in text and "| **NO** |" in text
    assert "monotone, memopt@k: **no**: memopt@1 340.0 MiB > memopt@2 330.0 MiB" in text
    # amb-0.5 peaks at 350: memopt@1 (340) is the closest at or below it; nothing memopt ran fits under 250
    assert ("| compile-amb-0.5 | 350.0 | 1200 (1200) / 1200 (1200) | memopt@1 | 340.0 | 1000 (1000) / 1000 (1000) "
            "| 0.83 (0.83) | yes |") in text
    assert "| checkpoint | 250.0 | 1500 (1500) / 1500 (1500) | none: the lowest, memopt@0, peaks at 300.0 |" in text
    summary = "\n".join(report.summary_lines({"mlp": rows}))
    assert "| mlp | 2 of 3 | no | 1 memopt faster, 1 no memopt row peaks that low |" in summary


def test_the_inductor_rows_sit_beside_the_fx_rows_at_the_same_peak():
    rows = [fake_row("eager", 400, 1.0), fake_row("compile-amb-0.5", 350, 1.2), fake_row("checkpoint", 250, 1.5),
            fake_row("memopt@0", 300, 1.1, budget_mib=300), fake_row("memopt@1", 340, 1.0, budget_mib=340),
            fake_row("memopt-inductor@0", 240, 1.4, budget_mib=300),
            fake_row("memopt-inductor@1", 345, 1.3, budget_mib=340)]
    text = "\n".join(report.memopt_section(rows, rows[0]))
    assert "measured ≤ budget: 3 of 4 memopt rows (**not all**" in text  # inductor@1: 345 over 340
    assert "monotone, memopt@k: **yes**" in text and "monotone, memopt-inductor@k: **yes**" in text
    # each torch row, then the FX row and the Inductor row at or below its peak
    assert ("| compile-amb-0.5 | 350.0 | 1200 (1200) / 1200 (1200) | memopt@1 | 340.0 | 1000 (1000) / 1000 (1000) "
            "| 0.83 (0.83) | yes | memopt-inductor@1 | 345.0 | 1300 (1300) / 1300 (1300) | 1.08 (1.08) | no |") in text
    assert ("| checkpoint | 250.0 | 1500 (1500) / 1500 (1500) | none: the lowest, memopt@0, peaks at 300.0 "
            "| — | — | — | — | memopt-inductor@0 | 240.0 | 1400 (1400) / 1400 (1400) | 0.93 (0.93) | yes |") in text
    assert "@0: peak 240.0 vs 300.0 MiB (-20.0%), step 1.27 (1.27)" in text
    backend = rows + [fake_row("memopt-backend@0", 303, 1.2, budget_mib=300)]
    text = "\n".join(report.memopt_section(backend, rows[0]))
    assert ("memopt-backend@k against memopt@k (same budget; step ratio backend ÷ FX, wall median (CPU min)): "
            "@0: peak 303.0 vs 300.0 MiB (+1.0%), step 1.09 (1.09)") in text
    summary = "\n".join(report.summary_lines({"mlp": rows}))
    assert ("| mlp | 3 of 4 | yes | 1 memopt faster, 1 no memopt row peaks that low | yes | 1 memopt faster, "
            "1 memopt slower |") in summary


def test_checkpoint_blocks_wraps_every_block_and_keeps_the_parameters():
    model = ResidualMLP(width=8, depth=3)
    before = [p.data_ptr() for p in model.parameters()]
    checkpoint_blocks(model)
    assert all(isinstance(block, CheckpointedBlock) for block in model.blocks)
    assert [p.data_ptr() for p in model.parameters()] == before


def test_the_budget_patch_is_what_the_partitioner_reads():
    import torch._functorch.config as functorch_config

    from memopt.examples import mlp

    setup = compile_with_budget(0.2)(torch.nn.Linear(2, 2), Training(mlp(), (), None))
    assert setup.compiled and setup.settings == {"activation_memory_budget": 0.2}
    with setup.context():
        assert functorch_config.activation_memory_budget == 0.2
    assert functorch_config.activation_memory_budget == 1.0


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(SystemExit):
        run.parse_args(["--strategies", "eager,nonsense"])
    assert run.parse_args([]).strategies == list(STRATEGIES)


def test_a_same_peak_row_without_its_torch_rows_peak_says_what_to_run_first():
    row = run.run_one("mlp", "memopt-inductor=checkpoint", repeats=1, quick=True)
    assert "no measured peak of 'checkpoint'" in row["error"] and "--strategies checkpoint," in row["error"]


@pytest.mark.slow
def test_the_same_peak_row_plans_for_the_torch_rows_measured_peak_and_pairs_with_it():
    checkpointed = run.run_one("mlp", "checkpoint", repeats=1, quick=True)
    peak = checkpointed["measured"]["peak_bytes"]
    matched = run.run_one("mlp", "memopt-inductor=checkpoint", repeats=1, quick=True, peaks={"checkpoint": peak})
    assert "error" not in matched, matched.get("traceback")
    settings = matched["settings"]
    assert settings["peak_of"] == "checkpoint" and settings["peak_of_bytes"] == peak
    # the budget whose code limit (Inductor's code may take the headroom) is that peak
    assert settings["budget_bytes"] == budget_for_peak(peak, CODE_SLACK)
    assert matched["memopt"]["inductor"]["predicted_peak_bytes"] <= peak
    assert matched["measured"]["peak_bytes"] <= peak  # at or below the torch row's own peak
    pairs = report.same_peak_pairs([checkpointed, matched], "memopt-inductor=")
    assert pairs == [(checkpointed, matched)]
    text = "\n".join(report.memopt_section([checkpointed, matched], None))
    assert "peak of checkpoint" in text and "memopt-inductor=row" in text


@pytest.mark.slow
def test_a_pair_times_both_rows_alternately_in_one_process_and_reports_them(tmp_path):
    from benchmarks import pairs

    checkpointed = run.run_one("mlp", "checkpoint", repeats=1, quick=True)
    peak = checkpointed["measured"]["peak_bytes"]
    pair = pairs.measure_pair("mlp", "checkpoint", {"checkpoint": peak}, rounds=3, threads=1, quick=True)
    assert len(pair["torch_cpu_s"]) == len(pair["memopt_cpu_s"]) == len(pair["ratios"]) == 3
    assert pair["ratio_median"] == sorted(m / t for t, m in zip(pair["torch_cpu_s"], pair["memopt_cpu_s"]))[1]
    for side in ("torch", "memopt"):  # the optimizer step is timed inside each step, apart
        assert all(0 < o < s for o, s in zip(pair[f"{side}_optimizer_cpu_s"], pair[f"{side}_cpu_s"]))
    assert pair["forward_backward_ratio_median"] == sorted(
        (m - mo) / (t - to) for t, m, to, mo in zip(pair["torch_cpu_s"], pair["memopt_cpu_s"],
                                                    pair["torch_optimizer_cpu_s"], pair["memopt_optimizer_cpu_s"]))[1]
    assert pair["memopt_budget_bytes"] == budget_for_peak(peak, CODE_SLACK)
    assert pair["first_losses"][0] == pytest.approx(pair["first_losses"][1], rel=1e-5)  # one seed, one model
    matched = {**checkpointed, "strategy": "memopt-inductor=checkpoint", "step_cpu_s": [0.5],
               "memopt": {"recomputed": pair["memopt_plan"]["recomputed"]}}
    rows = {("mlp", "checkpoint"): {**checkpointed, "step_cpu_s": [1.0]}, ("mlp", matched["strategy"]): matched}
    results = {"date": "today", "memopt": "abc", "rounds": 3, "results": "results.json", "total_wall_s": 60,
               "pairs": [pair, {"workload": "mlp", "torch": "compile-amb-0.5", "error": "boom"}]}
    text = pairs.write_pairs_md(tmp_path, results, rows).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| mlp | checkpoint |"))
    assert f"| {pair['ratio_median']:.3f} |" in row and "| 0.50 | yes |" in row
    assert f"| {pair['forward_backward_ratio_median']:.3f} | {pair['optimizer_ratio_median']:.3f} |" in row
    assert "error: boom" in text and "(1 failed)" in text

    # RESULTS.md carries the pairs timed at its own run's peaks, and not those of another run
    measured = {"date": "run-1", "machine": run.machine(), "versions": run.versions(), "total_wall_s": 1.0,
                "settings": {"repeats": 1, "quick": True}, "rows": [checkpointed]}
    (tmp_path / "results.json").write_text(json.dumps(measured))
    section = "## Same measured peak, timed in one process"
    for results_date, shown in (("run-1", True), ("run-0", False)):
        (tmp_path / "pairs.json").write_text(json.dumps({**results, "results_date": results_date}))
        text = report.write_results_md(tmp_path).read_text()
        assert (section in text) == shown and (f"| {pair['ratio_median']:.3f} |" in text) == shown


def test_a_pair_with_memopts_fx_programs_times_memopt_at_the_torch_rows_peak(tmp_path):
    """pairs.py --memopt fx: memopt's side is memopt=<row>, its programs run as FX graphs (its default lowering)."""
    from benchmarks import pairs

    checkpointed = run.run_one("mlp", "checkpoint", repeats=1, quick=True)
    peak = checkpointed["measured"]["peak_bytes"]
    pair = pairs.measure_pair("mlp", "checkpoint", {"checkpoint": peak}, rounds=3, threads=1, quick=True,
                              lowering="fx")
    assert pair["memopt"] == "memopt=checkpoint" and len(pair["ratios"]) == 3
    assert pair["memopt_budget_bytes"] == budget_for_peak(peak, PlanConfig().headroom)
    assert "inductor" not in pair["memopt_plan"] and pair["memopt_plan"]["predicted_peak_bytes"] <= peak
    assert pair["first_losses"][0] == pair["first_losses"][1]  # FX graphs of the eager step: the same loss
    results = {"date": "today", "memopt": "abc", "rounds": 3, "results": "results.json", "total_wall_s": 60,
               "lowering": "fx", "pairs": [pair]}
    text = pairs.write_pairs_md(tmp_path, results, {("mlp", "checkpoint"): checkpointed}, "PAIRS-fx.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| mlp | checkpoint |"))
    assert f"— / {pair['memopt_plan']['predicted_peak_bytes'] / 2**20:.1f}" in row and "no run.py row" in row
    assert "--memopt fx" in text and "run as FX graphs" in text


def test_a_run_times_again_the_torch_rows_whose_same_peak_row_it_ran():
    from benchmarks.pairs import pairs_of_run

    rows = [{"workload": "mlp", "strategy": "checkpoint", "measured": {}},
            {"workload": "mlp", "strategy": "memopt-inductor=checkpoint"},
            {"workload": "mlp", "strategy": "compile-amb-0.5", "measured": {}},  # no memopt row at its peak
            {"workload": "mlp", "strategy": "eager", "measured": {}},
            {"workload": "gpt2", "strategy": "checkpoint", "error": "boom"},  # no peak measured
            {"workload": "gpt2", "strategy": "memopt-inductor=checkpoint"}]
    assert pairs_of_run(rows) == [("mlp", "checkpoint")]
    assert run.parse_args([]).pairs_rounds == 7 and run.parse_args(["--quick"]).pairs_rounds == 0


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert_mlm", "t5"])
def test_linear_cross_entropy_on_the_final_hidden_states_is_the_models_own_loss(name):
    workload = run.make_workload(name, quick=True)
    model = workload.build().train()  # dropout on (bert_mlm, t5): both losses draw the same noise from one seed
    inputs = workload.inputs()
    torch.manual_seed(3)
    expected = model(**inputs).loss
    torch.manual_seed(3)
    fused = LinearCrossEntropyLM(model)(**inputs)
    assert fused.item() == pytest.approx(expected.item(), abs=1e-5)


def test_the_linear_cross_entropy_rows_skip_a_model_without_a_language_model_head_and_say_why():
    row = run.run_one("resnet_bn", "linear-ce-checkpoint", repeats=1, quick=True)
    assert "error" not in row and "no linear language-model head" in row["skipped"]
    assert run.one_line(row).startswith("skipped: ResNet")
    line = report.strategy_row(row, None)
    assert line[:2] == ["linear-ce-checkpoint", f"skipped: {row['skipped']}"]


@pytest.mark.parametrize("name", ["resnet_bn", "bert_mlm", "t5"])
def test_the_new_workloads_train_eagerly_with_memopts_prediction_and_checkpointed_per_block(name):
    eager, checkpointed = (run.run_one(name, strategy, repeats=1, quick=True) for strategy in ("eager", "checkpoint"))
    for row in (eager, checkpointed):
        assert "error" not in row, row.get("traceback")
        assert row["measured"]["peak_bytes"] > row["measured"]["baseline_bytes"] > 0
    assert "error" not in eager["plan"] and eager["plan"]["peak_bytes"] > 0
    assert checkpointed["measured"]["peak_bytes"] < eager["measured"]["peak_bytes"]
    # one generator state before every row's first step: checkpointing redraws dropout's noise as eager drew it
    assert checkpointed["loss"] == pytest.approx(eager["loss"], rel=1e-6)


def test_the_report_sets_the_lowest_torch_peak_beside_memopts_lowest_within_budget():
    rows = [fake_row("eager", 400, 1.0), fake_row("compile-amb-0.5", 350, 1.2), fake_row("checkpoint", 250, 1.5),
            fake_row("memopt@0", 200, 1.1, budget_mib=190), fake_row("memopt@1", 225, 1.0, budget_mib=230),
            fake_row("memopt@2", 330, 0.9, budget_mib=340)]
    # memopt@0 measured under torch's lowest but over its budget: memopt's lowest within budget is memopt@1
    assert report.lowest_peak_cells(rows) == ["250.0", "checkpoint", "225.0", "memopt@1", "-10.0"]
    text = "\n".join(report.lowest_peak_lines({"mlp": rows, "gpt2": rows[:3]}))
    assert "| mlp | 250.0 | checkpoint | 225.0 | memopt@1 | -10.0 |" in text and "| gpt2 |" not in text
    assert "| 250.0 | checkpoint | 225.0 | memopt@1 | -10.0 |" in "\n".join(report.workload_section("mlp", rows))


@pytest.mark.slow
def test_the_whole_model_linear_cross_entropy_and_auto_chunker_rows_compile_and_count_their_graphs(monkeypatch,
                                                                                                   tmp_path):
    # a cold Inductor cache, as run.py gives each configuration: a graph found in the cache is not partitioned again,
    # and the partitioner's record that this test reads stays empty
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    eager = run.run_one("gpt2", "eager", repeats=1, quick=True)
    rows = {strategy: run.run_one("gpt2", strategy, repeats=1, quick=True)
            for strategy in ("whole-compile-amb-0.5", "compile-linear-ce-checkpoint", "compile-autochunker")}
    for strategy, row in rows.items():
        assert "error" not in row, (strategy, row.get("traceback"))
        assert row["dynamo"]["graphs"] >= 1 and not row["dynamo"]["recompiled_after_warmup"]
        assert row["loss"] == pytest.approx(eager["loss"], rel=1e-5)
    whole = rows["whole-compile-amb-0.5"]
    assert "the model" in whole["settings"]["compiled"] and whole["partitions"][0]["memory_budget"] == 0.5
    assert rows["compile-autochunker"]["settings"]["auto_chunker"]  # what the chunker did with each joint graph


def test_results_md_carries_the_fused_loss_kernels_predicted_table(tmp_path):
    """The issue asks for the kernel's memory model against the chunked graph's, and its predicted step, in
    RESULTS.md: write_results_md adds benchmarks/loss_kernel.json's table when it is there."""
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    (tmp_path / "results.json").write_text((root / "results.json").read_text())
    assert "fused loss kernel" not in report.write_results_md(tmp_path).read_text()
    kernel = json.loads((root / "loss_kernel.json").read_text())
    (tmp_path / "loss_kernel.json").write_text(json.dumps(kernel))
    text = report.write_results_md(tmp_path).read_text()
    section = text[text.index("## The fused loss kernel against the chunked graph"):]
    for name, row in kernel["rows"].items():
        assert f"| {name} | {row['peak_bytes'] / 2**20:.1f} |" in section
