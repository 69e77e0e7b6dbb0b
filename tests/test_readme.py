"""Every command and Python snippet in the docs runs as written, so the docs cannot rot.

The docs: README.md (its ```bash and ```python blocks), the usage lines in the
docstrings of examples/*.py, and benchmarks/README.md's commands. Each command
found is in HOW: run here (in the default tier or the slow one), or run
elsewhere, and where. A command added to the docs without an entry in HOW
fails `test_every_documented_command_is_accounted_for`.
"""

import ast
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from memopt.cli import main
from test_cli import assert_real_plot

ROOT = Path(__file__).resolve().parents[1]
RUN, SLOW = "run", "slow"  # run here, in the default tier / only with -m slow

HOW = {
    # README.md
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[dev]" && '
    'python -m memopt.demo': ".ci/run installs the same way from scratch; test_demo_plans_runs_and_plots runs the demo",
    ". .venv/bin/activate && python -m pytest -n 2 && python -m pytest -m slow -n 2": "the suite itself (.ci/run runs it)",
    "memopt plan memopt.examples:gpt2 --arg layers=12 --budget 24GB --device h100 --png plan.png": RUN,
    "memopt explain memopt.examples:llama7b --json": RUN,
    "memopt plan examples/vision_bn.py:workload --arg blocks=6 --budget 90MiB --png plan.png": RUN,
    "memopt pareto examples/finetune_gpt2.py:workload --arg layers=2 --points 5 --png pareto.png": SLOW,  # ~25 s
    # examples/*.py docstrings (the [optional] arguments given); smaller runs in tests/test_examples.py
    "python examples/finetune_gpt2.py [--budget 60MiB] [--steps 4] [--layers 4]": SLOW,
    "memopt plan examples/finetune_gpt2.py:workload --arg layers=4 --budget 60MiB --png plan.png": RUN,
    "python examples/plan_llama7b.py [--budget 24GB] [--device rtx4090] [--seq 4096] [--train-last 4]":
        "test_llama7b_example_runs runs it as written and checks what it prints",
    "memopt plan examples/plan_llama7b.py:workload --arg seq=4096 --device h100 --png plan.png": SLOW,  # ~18 s
    "python examples/vision_bn.py [--budget 90MiB] [--blocks 6]": SLOW,
    "memopt plan examples/vision_bn.py:workload --arg blocks=6 --budget 90MiB --png plan.png (docstring)":
        "the README's command, run there",
    # benchmarks/README.md: they write results.json and RESULTS.md, so the tests add --out to a temporary folder
    "python benchmarks/run.py": "not run by the tests (~77 min, then ~35 min of pairs); "
                                "test_benchmarks_smoke runs its rows' code",
    "python benchmarks/pairs.py": "not run by the tests (~35 min); test_benchmarks_smoke times one pair (slow tier)",
    "python benchmarks/run.py --quick --workloads mlp --strategies eager,checkpoint,compile-amb-0.5,memopt@0,"
    "memopt-inductor@0,memopt-inductor=compile-amb-0.5,memopt-backend@0": SLOW,  # ~2 min
    "python benchmarks/run.py --workloads resnet_bn,bert_mlm,t5,gpt2,llama --pairs-rounds 0 --out benchmarks/issue17 "
    "--strategies eager,checkpoint,compile-amb-1.0,compile-amb-0.5,compile-amb-0.2,compile-amb-0.0,compile-checkpoint,"
    "whole-compile-amb-0.5,whole-compile-checkpoint,linear-ce-checkpoint,compile-linear-ce-checkpoint,"
    "compile-autochunker,memopt@0,memopt-inductor@0,memopt-backend@0,memopt-stepped@0":
        "not run by the tests (~2 h); test_benchmarks_smoke runs each of its rows' code",
    "python benchmarks/run.py --workloads mlp --strategies eager,checkpoint --repeats 3": SLOW,
    "python benchmarks/sparse_update.py": "not run by the tests (~10 min); test_sparse_update plans, compiles and "
                                          "trains with update='sparse' as it does",
    "python benchmarks/run.py --workloads mlp,gpt2,llama --strategies eager,memopt@0,memopt-int8@0,memopt@1,"
    "memopt-int8@1 --pairs-rounds 0 --out benchmarks/compress_rows": "not run by the tests (~30 min); "
                                                                     "test_benchmarks_smoke runs the memopt-int8@0 "
                                                                     "row's code, test_compress the plans at a budget "
                                                                     "above the smallest",
    "python benchmarks/pairs.py --workloads resnet_bn,bert_mlm,t5 --torch checkpoint,compile-checkpoint --results "
    "benchmarks/issue17/results.json --memopt fx": "not run by the tests (~30 min); test_benchmarks_smoke times an "
                                                   "FX pair",
    "python benchmarks/compress.py": "not run by the tests (~3 min); test_compress plans, compiles, measures and "
                                     "trains with compress='int8' as it does",
    "python benchmarks/loss_kernel.py": "not run by the tests (~5 min); test_kernels plans the fused kernel on the "
                                        "h100 preset and runs it as it does",
    "python benchmarks/fsdp.py": "not run by the tests (~25 min); test_sharding runs its gloo runs (two ranks in the "
                                 "default tier, four and the Llama in the slow one)",
    "memopt plan memopt.examples:llama70b --device h100 --world-size 16 --budget 80GB --largest seq --step 256":
        "not run by the tests (~10 min: each try plans a 19k-node graph); test_largest runs --largest on a small "
        "factory and test_sharding plans world_size on a meta Llama",
}


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def documented_commands() -> list[str]:
    """Every shell command in the docs, in order; a repeat gets its source named after it."""
    found = [line.strip() for block in readme_blocks("bash") for line in block.splitlines() if line.strip()]
    for script in sorted((ROOT / "examples").glob("*.py")):
        docstring = ast.get_docstring(ast.parse(script.read_text())) or ""
        found += [line.strip() for line in docstring.splitlines() if re.match(r"\s*(python|memopt) ", line)]
    text = (ROOT / "benchmarks" / "README.md").read_text()
    for block in re.findall(r"```\n(.*?)```", text, re.S):
        found += [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    seen: set[str] = set()
    commands = []
    for command in found:
        commands.append(command if command not in seen else f"{command} (docstring)")
        seen.add(command)
    return commands


def test_every_documented_command_is_accounted_for():
    assert sorted(documented_commands()) == sorted(HOW)


def test_readme_opens_with_the_two_commands():
    blocks = readme_blocks("bash")
    assert "pip install torch==2.13.0" in blocks[0] and "python -m memopt.demo" in blocks[0]
    assert "python -m pytest" in blocks[1]
    assert "python -m pytest" in (ROOT / ".ci/run").read_text()


def _cases():
    for command, how in HOW.items():
        if how in (RUN, SLOW):
            yield pytest.param(command, marks=[pytest.mark.slow] if how == SLOW else [], id=command)


@pytest.mark.parametrize("command", list(_cases()))
def test_documented_command_runs(command, tmp_path, monkeypatch, capsys):
    argv = shlex.split(re.sub(r"\[(.*?)\]", r"\1", command.removesuffix(" (docstring)")))
    if argv[0] == "memopt":  # in this process, from the repository root; pictures go to tmp_path
        monkeypatch.chdir(ROOT)
        png = None
        if "--png" in argv:
            at = argv.index("--png") + 1
            png = argv[at] = str(tmp_path / argv[at])
        assert main(argv[1:]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        if "--json" in argv:
            assert json.loads(out)["peak_bytes"] > 0
        else:
            assert "memopt" in out
        if png is not None:
            assert_real_plot(png)
        return
    assert argv[0] == "python"
    if argv[1] == "benchmarks/run.py":
        argv += ["--out", str(tmp_path)]
    done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=3600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def readme_snippet_namespace():
    """What the README's Python snippets take as given: a model, its batch, an optimizer, a step function."""
    import torch

    import memopt
    from memopt import examples

    workload = examples.tiny_gpt2()
    model = workload.build()
    batch = workload.inputs()
    optimizer = torch.optim.AdamW(model.parameters())

    def train_step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_step()  # optimizer state exists: a steady-state step
    return {"memopt": memopt, "torch": torch, "model": model, "example_inputs": batch, "batch": batch,
            "rank_batch": batch,
            "optimizer": optimizer, "train_step": train_step}


@pytest.mark.parametrize("number", [
    # the Pareto curve plans the step at several budgets, the sparse update at several depths: the slow tier
    pytest.param(n, marks=[pytest.mark.slow] if "memopt.pareto" in block or 'update="sparse"' in block else [],
                 id=f"python-block-{n}")
    for n, block in enumerate(readme_blocks("python"))
])
def test_readme_python_snippet_runs(number, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = readme_snippet_namespace()
    try:
        exec(compile(readme_blocks("python")[number], f"README.md python block {number}", "exec"), namespace)
    finally:
        import torch

        torch._dynamo.reset()  # the backend snippet's compiled model stays in Dynamo's cache: drop it with the test
    assert list(tmp_path.glob("*.png")), "each README snippet draws a picture"
    for png in tmp_path.glob("*.png"):
        assert_real_plot(png)


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


@pytest.mark.slow  # about four minutes on 2 cores: the 7B-shaped plans of the batch search
def test_llama7b_example_runs(tmp_path):
    command = next(c for c in HOW if c.startswith("python examples/plan_llama7b.py"))
    argv = shlex.split(re.sub(r"\[(.*?)\]", r"\1", command))
    done = subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:]], capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # the full fine-tune does not fit 24 GB and says what would; the bf16 partial one does, with its largest batch
    assert "does not fit" in done.stdout and "raise the budget to at least" in done.stdout
    largest = re.search(r"largest batch that fits: (\d+): peak ([\d.]+) GiB of 22.35 GiB", done.stdout)
    assert largest and int(largest.group(1)) >= 1 and float(largest.group(2)) <= 22.35, done.stdout
