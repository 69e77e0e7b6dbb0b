"""`memopt plan` / `memopt explain` / `memopt pareto` from a shell, on the built-in workloads and each example."""

import io
import json
import logging
import re
import shutil
import subprocess
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

import memopt
from memopt.cli import main
from memopt.config import PlanConfig
from memopt.pipeline import _History
from memopt.progress import show_progress, timed

ROOT = Path(__file__).resolve().parents[1]

SMALL = ["--arg", "layers=1", "--arg", "seq=32", "--arg", "batch=2", "--arg", "vocab=256", "--arg", "width=64",
         "--arg", "heads=2"]


def assert_real_plot(path):
    """The PNG decodes, is picture-sized and is not blank: many distinct colors, visible contrast."""
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500, image.shape
    colors = np.unique((image[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colors) > 50 and np.std(image[..., :3]) > 0.05


def tiny_pair():
    """A factory returning (model, example_inputs, loss_fn)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    return model, (torch.randn(4, 8),), lambda out: out.sum()


def test_plan_prints_the_ledger_and_writes_a_png(tmp_path, capsys):
    png = tmp_path / "t.png"
    assert main(["plan", "memopt.examples:gpt2", *SMALL, "--device", "h100", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "memopt plan for h100" in out and "optimizer_state" in out and "timeline:" in out
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 100 and np.std(image[..., :3]) > 0.05


def test_json_parses_and_explain_lists_tensors(capsys):
    assert main(["plan", "memopt.examples:gpt2", *SMALL, "--json", "--layout"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["peak_bytes"] > 0 and "layout" in data and data["optimizer"]["name"] == "AdamW"
    assert main(["explain", "tests.test_cli:tiny_pair"]) == 0
    assert "largest storages live at the peak" in capsys.readouterr().out


def test_errors_exit_2_with_the_reason(capsys):
    assert main(["plan", "memopt.examples:gpt2", *SMALL, "--budget", "1MB"]) == 2
    assert "raise the budget to at least" in capsys.readouterr().err
    assert main(["plan", "memopt.examples:no_such_factory"]) == 2
    assert "cannot load" in capsys.readouterr().err
    assert main(["plan", "memopt.examples"]) == 2
    assert "MODULE:FACTORY" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = shutil.which("memopt")
    assert exe is not None
    done = subprocess.run([exe, "plan", "memopt.examples:mlp", "--arg", "depth=2", "--arg", "width=64",
                           "--arg", "batch=16", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["device"] == "cpu"


# -- each example's factory through the CLI: exit 0, a real PNG, JSON that parses -------------------------
EXAMPLES = {
    "finetune_gpt2": ["--arg", "layers=2", "--budget", "34MiB", "--time-limit", "1"],
    "vision_bn": ["--arg", "blocks=2", "--budget", "48MiB", "--time-limit", "1"],
    "plan_llama7b": ["--arg", "seq=512", "--device", "h100", "--budget", "140GB"],
}


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_cli_plans_each_example(example, tmp_path, capsys):
    png = tmp_path / f"{example}.png"
    args = [f"{ROOT}/examples/{example}.py:workload", *EXAMPLES[example], "--png", str(png)]
    assert main(["plan", *args, "--json"]) == 0, capsys.readouterr().err
    data = json.loads(capsys.readouterr().out)
    assert 0 < data["peak_bytes"] <= data["budget_bytes"]
    if example != "plan_llama7b":  # the budget binds: something is recomputed (llama7b's peak is the optimizer's)
        assert any(d["action"] == "recompute" for d in data["decisions"])
    assert_real_plot(png)


def test_cli_finds_an_example_by_module_name_from_the_current_directory(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(ROOT)
    png = tmp_path / "t.png"
    assert main(["plan", "examples.vision_bn:workload", "--arg", "blocks=1", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "memopt plan for cpu" in out and f"timeline: {png}" in out
    assert_real_plot(png)
    assert main(["plan", "examples/no_such_file.py:workload"]) == 2
    assert "cannot load" in capsys.readouterr().err
    assert main(["plan", "examples/vision_bn.py:workload", "--arg", "depth=3"]) == 2
    assert "its signature is workload(blocks: int = 6, batch: int = 32)" in capsys.readouterr().err


# -- the budget-to-overhead curve -----------------------------------------------------------------------------
def test_pareto_curve_falls_with_the_budget_and_beats_the_baselines():
    workload = memopt.examples.mlp(depth=4, width=256, batch=512)
    curve = memopt.pareto(workload.build(), workload.inputs(), loss_fn=workload.loss_fn,
                          optimizer=torch.optim.AdamW, points=4, config=PlanConfig(remat_time_limit_s=0.5))
    budgets = [p.budget_bytes for p in curve.points]
    assert len(budgets) == 4 and budgets == sorted(budgets) and budgets[0] == curve.minimum_bytes
    assert curve.proven_minimum_bytes <= curve.minimum_bytes and budgets[-1] > curve.eager_peak_bytes
    overheads = [p.overhead_s for p in curve.points]
    assert all(p.peak_bytes <= p.budget_bytes and p.status != "infeasible" for p in curve.points)
    assert overheads[0] > 0 and overheads[-1] == 0 and curve.points[-1].recomputed == 0
    assert all(a >= b for a, b in zip(overheads, overheads[1:])), overheads  # more memory never costs more
    assert all(p.overhead_fraction == pytest.approx(p.overhead_s / curve.step_seconds) for p in curve.points)
    assert [b.solver for b in curve.baselines] == ["blocks", "sqrt"]
    for baseline in curve.baselines:  # memopt at the baseline's budget (or the next one up) costs no more
        assert baseline.peak_bytes <= baseline.budget_bytes
        mine = next(p for p in curve.points if p.budget_bytes >= baseline.budget_bytes)
        assert mine.overhead_s <= baseline.overhead_s + 1e-12
    assert json.loads(curve.to_json())["points"][0]["solver"] == "memopt"
    assert "overhead s" in str(curve)


def test_pareto_cli_writes_the_curve_and_keeps_progress_off_stdout(tmp_path, capsys):
    png = tmp_path / "pareto.png"
    args = ["memopt.examples:mlp", "--arg", "depth=4", "--arg", "width=256", "--arg", "batch=512",
            "--time-limit", "0.5", "--png", str(png)]
    assert main(["pareto", *args, "--budgets", "1MiB,11.5MiB,13MiB", "--baselines", "blocks", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # stdout holds the JSON alone
    assert "pareto point 3/3" in captured.err
    assert [p["status"] for p in data["points"]][0] == "infeasible"  # 1 MiB is below memopt's minimum
    assert all(p["overhead_s"] > 0 for p in data["points"][1:]) and len(data["baselines"]) == 1
    assert_real_plot(png)
    assert main(["pareto", *args, "--points", "2", "--baselines", "", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "budget-to-overhead" in captured.out and f"curve: {png}" in captured.out and captured.err == ""
    assert main(["pareto", *args, "--baselines", "nonsense"]) == 2
    assert "unknown baseline" in capsys.readouterr().err


# -- progress while a pass runs longer than a threshold ---------------------------------------------------
def test_progress_names_slow_passes_while_they_run_and_says_nothing_of_fast_ones():
    stream = io.StringIO()
    history = _History()
    with show_progress(stream, after_s=0.1):
        history.run("slow-solver", time.sleep, 0.4)
        history.run("fast", lambda: None)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("slow-solver running ...") and re.search(r"slow-solver done in 0\.[4-9] s$", lines[1])
    assert [r.name for r in history.records] == ["slow-solver", "fast"]
    history.run("after", time.sleep, 0.2)  # outside the block: nothing more is written
    assert len(stream.getvalue().splitlines()) == 2
    stream = io.StringIO()
    with show_progress(stream, after_s=0.1), timed("plan", logging.getLogger("memopt.cli")):
        time.sleep(0.3)  # the CLI times the whole plan (the trace included) the same way
    lines = [line.split("] ")[1] for line in stream.getvalue().splitlines()]
    assert lines[0] == "plan running ..." and re.fullmatch(r"plan done in 0\.[3-9] s", lines[1]), lines
