"""`memopt plan` / `memopt explain` from a shell."""

import json
import shutil
import subprocess

import matplotlib.image
import numpy as np
import torch

from memopt.cli import main

SMALL = ["--arg", "layers=1", "--arg", "seq=32", "--arg", "batch=2", "--arg", "vocab=256", "--arg", "width=64",
         "--arg", "heads=2"]


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
