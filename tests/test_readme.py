"""The README's first command ends in `python -m memopt.demo`: it must keep working."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_opens_with_the_two_commands():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert "pip install torch==2.13.0" in blocks[0] and "python -m memopt.demo" in blocks[0]
    assert "python -m pytest" in blocks[1]
    assert "python -m pytest" in (ROOT / ".ci/run").read_text()


def test_demo_plans_runs_and_plots(tmp_path):
    png = tmp_path / "demo.png"
    done = subprocess.run([sys.executable, "-m", "memopt.demo", "--png", str(png)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "predicted peak" in done.stdout and "measured peak" in done.stdout
    errors = [float(e) for e in re.findall(r"prediction off by ([+-][0-9.]+)%", done.stdout)]
    assert len(errors) == 2 and all(abs(e) < 5 for e in errors)  # eager, then the compiled step
    assert re.search(r"measured peak .* is under the budget", done.stdout)
    assert re.search(r"recompute \d+ of \d+ activations", done.stdout)
    assert png.stat().st_size > 10_000


def test_llama7b_example_runs(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples/plan_llama7b.py"), "--seq", "512"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "16.00 bytes per parameter" in done.stdout
