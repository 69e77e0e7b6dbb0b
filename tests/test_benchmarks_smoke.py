"""Smoke test of the benchmark harness (benchmarks/run.py) on the --quick residual MLP.

No torch.compile here: one cold compile takes half a minute on a CPU. `python benchmarks/run.py
--quick` exercises those strategies end to end.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import report, run
from benchmarks.strategies import STRATEGIES, CheckpointedBlock, checkpoint_blocks, compile_with_budget
from memopt.examples import ResidualMLP


def test_eager_and_checkpoint_rows_measure_plan_and_agree_on_the_loss():
    rows = [run.run_one("mlp", strategy, repeats=1, quick=True) for strategy in ("eager", "checkpoint")]
    for row in rows:
        assert "error" not in row, row.get("traceback")
        assert row["measured"]["peak_bytes"] > row["measured"]["baseline_bytes"] > 0
        assert row["static"]["parameters"] == 4 * row["parameters"]
    eager, checkpointed = rows
    assert eager["plan"]["peak_bytes"] > 0 and "error" not in eager["plan"]
    assert checkpointed["loss"] == pytest.approx(eager["loss"], rel=1e-6)

    results = {"date": "today", "machine": run.machine(), "versions": run.versions(), "total_wall_s": 1.0,
               "settings": {"repeats": 1, "quick": True}, "rows": rows}
    text = report.render_markdown(results)
    assert "| eager |" in text and "| checkpoint |" in text and "predicted at peak" in text


def test_checkpoint_blocks_wraps_every_block_and_keeps_the_parameters():
    model = ResidualMLP(width=8, depth=3)
    before = [p.data_ptr() for p in model.parameters()]
    checkpoint_blocks(model)
    assert all(isinstance(block, CheckpointedBlock) for block in model.blocks)
    assert [p.data_ptr() for p in model.parameters()] == before


def test_the_budget_patch_is_what_the_partitioner_reads():
    import torch._functorch.config as functorch_config

    setup = compile_with_budget(0.2)(torch.nn.Linear(2, 2))
    assert setup.compiled and setup.settings == {"activation_memory_budget": 0.2}
    with setup.context():
        assert functorch_config.activation_memory_budget == 0.2
    assert functorch_config.activation_memory_budget == 1.0


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(SystemExit):
        run.parse_args(["--strategies", "eager,nonsense"])
    assert run.parse_args([]).strategies == list(STRATEGIES)
