"""Every example script runs as documented: exit 0, and what it promises in its output."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_finetune_gpt2_stays_under_its_budget(tmp_path):
    out = run("finetune_gpt2.py", "--steps", "3", "--layers", "2", cwd=tmp_path)
    steps = re.findall(r"step \d+: loss [0-9.]+, measured peak .* \((under|OVER) budget\)", out)
    assert steps == ["under"] * 3, out
    assert re.search(r"memopt recomputes [1-9]\d* of \d+ activations", out)


def test_vision_model_with_batchnorm_equals_eager_under_its_budget(tmp_path):
    out = run("vision_bn.py", "--steps", "2", "--blocks", "3", cwd=tmp_path)
    assert out.count("equal to eager") == 2 and "OVER" not in out and "DIFFERS" not in out, out
    assert re.search(r"memopt recomputes [1-9]\d* of \d+ activations", out)
