"""The plan as text, JSON and picture."""

import json

import numpy as np
import pytest
import torch
from conftest import Scale, square_mean

import memopt
from memopt import examples

DESIGN_KEYS = {"budget_bytes", "peak_bytes", "device", "ledger", "peak_node", "decisions", "solver"}
LEDGER_KEYS = {"parameters", "buffers", "gradients", "optimizer_state", "activations", "temporaries", "offloaded"}


@pytest.fixture(scope="module")
def gpt2_plan():
    workload = examples.tiny_gpt2()
    model = workload.build()
    return memopt.plan(model, workload.inputs(), optimizer=workload.optimizer(model), budget="1GB")


def test_json_has_the_design_keys(gpt2_plan):
    data = json.loads(gpt2_plan.to_json())
    assert DESIGN_KEYS <= data.keys()
    assert LEDGER_KEYS <= data["ledger"].keys()
    assert data["peak_bytes"] == gpt2_plan.peak_bytes == sum(data["ledger"].values())
    assert data["budget_bytes"] == 10**9 and data["device"] == "cpu"
    assert set(data["solver"]) == {"name", "status", "objective", "lower_bound", "gap", "seconds"}
    # no budget pressure: every activation decided, all kept, at no cost
    decisions = data["decisions"]
    assert decisions and {d["action"] for d in decisions} == {"keep"}
    assert set(decisions[0]) == {"name", "bytes", "action", "cost_s", "reason"}
    assert sum(d["bytes"] for d in decisions) == gpt2_plan.storages.bytes_of("activations")
    assert data["solver"]["objective"] == 0 and data["solver"]["status"] == "optimal"
    assert "measured" not in data
    assert gpt2_plan.choices == ()  # all kept: nothing that would make other programs
    measured = json.loads(gpt2_plan.with_measurement(gpt2_plan.peak_bytes // 2).to_json())["measured"]
    assert measured == {"peak_bytes": gpt2_plan.peak_bytes // 2, "error": pytest.approx(1.0, abs=1e-6)}


def test_the_choices_are_what_a_tight_plan_does_not_keep():
    workload = examples.tiny_gpt2()
    model = workload.build()
    with pytest.raises(memopt.BudgetInfeasibleError) as error:
        memopt.plan(model, workload.inputs(), budget=1)
    tight = memopt.plan(model, workload.inputs(), budget=error.value.minimum)
    assert tight.choices and {action for _, action in tight.choices} <= {"recompute", "offload"}
    assert tight.choices == tuple((d.name, d.action) for d in tight.decisions if d.action in {"recompute", "offload"})


def test_text_shows_the_ledger_and_the_peak(gpt2_plan):
    text = str(gpt2_plan)
    assert f"{gpt2_plan.peak_bytes:,}" in text and gpt2_plan.peak_node in text
    for key in LEDGER_KEYS:
        assert key in text
    assert "fits the budget" in text
    explained = gpt2_plan.explain()
    assert "largest storages live at the peak" in explained and "passes:" in explained
    assert "capture" in explained and "lower-bound" in explained
    assert repr(explained) == str(explained)
    # the largest storage at the peak of GPT-2's step is a logits-sized one
    logits_bytes = 4 * 128 * 2048 * 4
    assert f"{logits_bytes:,}" in explained


def test_the_inductor_compiles_tried_show_in_the_json_and_the_explanation(gpt2_plan):
    import dataclasses

    from memopt.report.plan import CompileAttempt

    assert "compiles" not in json.loads(gpt2_plan.to_json())  # not compiled
    tried = (CompileAttempt(900_000_000, {}, 500, 700_000_000, 700_000_000, 12.5, modelled_seconds=0.25,
                            sliced="loss head x8"),
             CompileAttempt(1_200_000_000, {"pattern_matcher": False}, 500, 960_000_000, 960_000_000, 11.0, True,
                            modelled_seconds=0.125))
    compiled = dataclasses.replace(gpt2_plan, compiled_peak_bytes=960_000_000, compiles=tried)
    data = json.loads(compiled.to_json())
    assert [(c["target_bytes"], c["options"], c["predicted_peak_bytes"], c["chosen"]) for c in data["compiles"]] == [
        (900_000_000, {}, 700_000_000, False), (1_200_000_000, {"pattern_matcher": False}, 960_000_000, True)]
    lines = compiled.explain().splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith("Inductor compiles (plan made for"))
    rows = lines[title + 1:][:2]
    assert "defaults" in rows[0] and "0.25 s  loss head x8" in rows[0] and not rows[0].endswith("runs")
    assert "'pattern_matcher': False" in rows[1] and rows[1].endswith("0.125 s  nothing  runs")


def test_plot_is_a_real_picture(gpt2_plan, tmp_path):
    import matplotlib.image

    path = gpt2_plan.plot(str(tmp_path / "plan.png"))
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 400
    assert np.std(image[..., :3]) > 0.05  # not blank
    distinct = np.unique((image[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(distinct) > 20


def test_plot_with_a_measured_timeline(tmp_path):
    model, x = Scale(1000), torch.randn(1000)
    plan = memopt.plan(model, (x,), loss_fn=None, budget=10**6)
    path = plan.plot(str(tmp_path / "p.png"), measured_timeline=[(0.0, 8000), (0.5, 16000), (1.0, 12000)])
    assert (tmp_path / "p.png").stat().st_size > 10_000 and path.endswith("p.png")


def test_bytes_are_drawn_in_the_largest_unit_the_largest_value_reaches():
    from memopt.report.plot import byte_unit

    assert byte_unit(30 * 2**20) == ("MiB", 2**20)  # not 0.029 GiB
    assert byte_unit(2**30) == ("GiB", 2**30) and byte_unit(2**20 - 1) == ("KiB", 2**10)
    assert byte_unit(1023) == ("B", 1) and byte_unit(0) == ("B", 1)


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures saved while the test runs, read back from the figure objects (not from the pixels)."""
    from matplotlib.figure import Figure

    saved, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: saved.append(self) or save(self, *args,
                                                                                                        **kwargs))
    return saved


def test_a_step_of_a_few_mib_is_plotted_in_mib(tmp_path, saved_figures):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
    plan = memopt.plan(model, (torch.randn(1024, 256),), loss_fn=square_mean)
    assert 2**20 <= plan.peak_bytes < 2**30
    measured = [(0.0, plan.entry_bytes), (1.0, plan.peak_bytes)]
    assert plan.plot(str(tmp_path / "plan.png"), measured_timeline=measured) == str(tmp_path / "plan.png")
    assert (tmp_path / "plan.png").stat().st_size > 10_000
    (axes, *_), = [figure.axes for figure in saved_figures]
    assert axes.get_ylabel() == "live device memory (MiB)"
    assert 1 <= axes.get_ylim()[1] < 1024  # the peak reads in MiB, between 1 and 1024


def test_a_pareto_curve_of_kib_budgets_is_plotted_in_kib(tmp_path, saved_figures):
    from memopt.report.pareto import ParetoCurve, ParetoPoint

    def point(solver, kib, overhead):
        return ParetoPoint(solver, kib * 2**10, kib * 2**10, overhead, overhead, 1, 0, 0, "optimal", 0.0, 0.1)

    curve = ParetoCurve("cpu", 300 * 2**10, 120 * 2**10, 100 * 2**10, 1.0, 0.02,
                        (point("memopt", 120, 0.3), point("memopt", 200, 0.1)), (point("sqrt", 160, 0.4),))
    assert curve.plot(str(tmp_path / "pareto.png")) == str(tmp_path / "pareto.png")
    (axes, *_), = [figure.axes for figure in saved_figures]
    assert axes.get_xlabel() == "budget (KiB)"
    assert 50 <= axes.get_xlim()[0] and axes.get_xlim()[1] <= 400  # budgets of 120 to 300 KiB read as such


def test_history_records_every_pass(gpt2_plan):
    names = [record.name for record in gpt2_plan.history]
    assert names == ["capture", "optimizer-memory", "scratch", "storages", "liveness", "timeline", "lower-bound",
                     "loss-heads", "mlp-blocks", "remat", "order"]
    assert all(record.seconds >= 0 for record in gpt2_plan.history)
    remat = next(r for r in gpt2_plan.history if r.name == "remat")
    assert not remat.changed and remat.peak_before == remat.peak_after == gpt2_plan.eager_peak_bytes
    # every pass is priced as the whole step, optimizer state included: the order pass as the plan prints it
    order = next(r for r in gpt2_plan.history if r.name == "order")
    printed = gpt2_plan.to_dict()["order"]
    assert (order.peak_before, order.peak_after) == (printed["peak_before_bytes"], printed["peak_after_bytes"])
    assert gpt2_plan.optimizer.state_bytes > 0 and order.peak_before == gpt2_plan.peak_bytes


def test_a_rewrite_is_recorded_with_the_peak_before_and_after_it():
    workload = examples.mlp(width=64, depth=4, batch=256)
    model, inputs = workload.build(), workload.inputs()
    eager = memopt.plan(model, inputs, loss_fn=workload.loss_fn, optimizer=torch.optim.SGD)
    plan = memopt.plan(model, inputs, loss_fn=workload.loss_fn, optimizer=torch.optim.SGD,
                       budget=int(eager.peak_bytes * 0.9))
    rewrite = next(r for r in plan.history if r.name == "rewrite")
    assert rewrite.changed and rewrite.peak_before == eager.peak_bytes and rewrite.peak_after == plan.peak_bytes
    assert rewrite.peak_after < rewrite.peak_before
    assert f"peak {memopt.format_bytes(eager.peak_bytes)} -> {memopt.format_bytes(plan.peak_bytes)}  changed" \
        in str(plan.explain())


def test_loss_fn_receives_the_output():
    seen = []

    def loss_fn(output):
        seen.append(tuple(output.shape))
        return square_mean(output)

    model = torch.nn.Linear(4, 3)
    memopt.plan(model, {"input": torch.randn(5, 4)}, loss_fn=loss_fn)
    assert seen == [(5, 3)]


def test_replayed_random_ops_and_updates_inside_the_backward_show_in_text_json_and_plot(tmp_path, saved_figures):
    """At its smallest budget a dropout MLP replays its noise; with step_in_backward each parameter updates in
    the backward. Those decisions' action is "replay" (text and JSON), and the plot ticks both along its floor
    at the nodes where they run."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(256, 1))
    inputs = (torch.randn(512, 64),)
    options = {"loss_fn": square_mean, "optimizer": torch.optim.SGD, "step_in_backward": True}
    with pytest.raises(memopt.BudgetInfeasibleError) as smallest:
        memopt.plan(model, inputs, budget=1, **options)
    plan = memopt.plan(model, inputs, budget=smallest.value.minimum, **options)
    replayed = [d for d in plan.decisions if d.action == "replay"]
    assert replayed and all(d.recomputed and "generator state" in d.reason for d in replayed)
    assert f"{len(replayed)} of them replayed from the generator state" in str(plan)
    assert any(line.lstrip().startswith("replay ") for line in str(plan.explain()).splitlines())
    data = json.loads(plan.to_json())
    assert sum(d["action"] == "replay" for d in data["decisions"]) == len(replayed)
    plan.plot(str(tmp_path / "plan.png"))
    (axes, *_), = [figure.axes for figure in saved_figures]
    labels = axes.get_legend_handles_labels()[1]
    assert f"random op replayed ({len(replayed)})" in labels
    assert f"parameter updated in the backward ({len(plan.stepped)})" in labels and len(plan.stepped) == 6
