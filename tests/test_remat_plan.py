"""The remat pass: segments from the model's layers, a simulation that is the rewrite, baselines by name."""

import dataclasses
import json
import random
import re

import pytest
import torch

import memopt
from memopt import examples
from memopt.capture import capture
from memopt.device import get_device
from memopt.passes import remat_plan
from memopt.passes.liveness import liveness, memory_timeline
from memopt.passes.optimizer_memory import optimizer_memory
from memopt.passes.recompute import apply_recompute
from memopt.passes.storage import storage_table
from memopt.solvers import remat_fast

SMALL = {
    "gpt2": lambda: examples.gpt2(layers=3, width=64, heads=2, seq=32, batch=2, vocab=256, dropout=0.1),
    "llama": lambda: examples.llama(layers=3, width=64, heads=2, seq=32, batch=2, vocab=256),
    "mlp": lambda: examples.mlp(width=64, depth=5, batch=512),
}


def captured(name):
    workload = SMALL[name]()
    step = capture(workload.build(), workload.inputs(), loss_fn=workload.loss_fn)
    return step, storage_table(step)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_segments_are_the_model_layers(name):
    step, table = captured(name)
    segments = remat_plan.find_segments(step, table)
    layers = [s for s in segments if s.name.endswith("]")]
    assert len(layers) == (5 if name == "mlp" else 3)
    assert all(a.end == b.start for a, b in zip(segments, segments[1:]))  # back to back, in order
    assert segments[0].start == 0 and segments[-1].end <= table.backward_start


def test_segments_of_an_encoder_decoder_and_of_a_network_with_a_stem():
    """Every outermost repeated ModuleList is cut into its blocks: T5's encoder and decoder (its first blocks also
    hold the position bias), not the sublayers inside each block; a stem's conv and norm are no blocks."""
    t5 = examples.t5(layers=2, width=64, d_ff=256, heads=2, seq=64, target_seq=16, batch=2, vocab=256)
    step = capture(t5.build(), t5.inputs())
    segments = remat_plan.find_segments(step, storage_table(step))
    assert [s.name for s in segments] == ["before the blocks", "encoder.block[0]", "encoder.block[1]",
                                          "between the blocks", "decoder.block[0]", "decoder.block[1]",
                                          "after the blocks"]
    assert all(a.end == b.start for a, b in zip(segments, segments[1:]))
    resnet = examples.resnet_bn(batch=4, image=16, widths=(8, 16), blocks_per_stage=2)
    step = capture(resnet.build(), resnet.inputs(), loss_fn=resnet.loss_fn)
    names = [s.name for s in remat_plan.find_segments(step, storage_table(step))]
    assert names == ["before the blocks", *(f"blocks[{k}]" for k in range(4)), "after the blocks"]


def test_the_smallest_peak_crosses_the_plateau_of_repeated_blocks(monkeypatch):
    """Keeping one BERT layer's MLP input lowers that layer's peak but not the step's while the other layers
    reach it: no single flip pays, the same flip in every layer at once does. Without those moves the search
    stops higher."""
    bert = examples.bert_mlm(layers=3, width=64, heads=2, intermediate=256, seq=64, batch=2, vocab=256)
    step = capture(bert.build(), bert.inputs(), loss_fn=bert.loss_fn)
    table = storage_table(step)

    def smallest():
        plan = remat_plan.plan_recompute(step, table, get_device("cpu"), 1, constant_bytes=0, floor_bytes=0)
        assert remat_fast.simulate(plan.problem, plan.solution.chosen).peak_bytes == plan.solution.peak_bytes
        return plan

    plan = smallest()
    groups = remat_fast.mirrors(plan.problem, remat_plan._options(
        plan.problem, list(step.graph.graph.nodes), plan.segments, "memopt")[1])
    assert groups and all(len(group) == 3 for group in groups)  # one candidate of each layer
    chosen = set(plan.solution.chosen)
    for group in groups:  # no group in or out lowers it further
        for trial in (chosen | set(group), chosen - set(group)):
            assert remat_fast.simulate(plan.problem, sorted(trial)).peak_bytes >= plan.solution.peak_bytes
    monkeypatch.setattr(remat_fast, "mirrors", lambda problem, options: [])
    assert plan.solution.peak_bytes < smallest().solution.peak_bytes


def test_the_sublayer_level_keeps_the_residual_stream_and_lowers_the_smallest_peak(monkeypatch):
    """A T5 block's backward runs its feed-forward sub-layer, then its attention: checkpointed whole, the block's
    recomputed attention waits through the feed-forward's backward. Keeping the residual sums between the
    sub-layers lets each one be recomputed when its own backward starts, which the search without that level
    does not reach."""
    t5 = examples.t5(layers=2, width=64, d_ff=256, heads=2, seq=64, target_seq=16, batch=2, vocab=256)
    step = capture(t5.build(), t5.inputs())
    table = storage_table(step)
    nodes = list(step.graph.graph.nodes)

    def smallest():
        return remat_plan.plan_recompute(step, table, get_device("cpu"), 1, constant_bytes=0, floor_bytes=0)

    plan = smallest()
    segments, options, names = remat_plan._options(plan.problem, nodes, plan.segments, "memopt")
    for segment, levels, level_names in zip(segments, options, names):
        if not segment.name.endswith("]"):
            continue
        assert level_names == (remat_plan.KEEP, remat_plan.CHEAP, remat_plan.SUBLAYERS, remat_plan.FULL)
        kept = [nodes[plan.problem.candidates[i].nodes[0]] for i in levels[-1] - levels[2]]
        assert kept and all(node.target is torch.ops.aten.add.Tensor for node in kept)
        for node in kept:  # each is one link of a chain of sums of one size
            size = node.meta["val"].numel()
            assert any(other.target is torch.ops.aten.add.Tensor and other.meta["val"].numel() == size
                       for other in (*node.all_input_nodes, *node.users))
    # torch's checkpoint, which runs the "checkpoint" solver's blocks, has no sub-layer level
    checkpoint_names = remat_plan._options(plan.problem, nodes, plan.segments, "checkpoint")[2]
    assert all(remat_plan.SUBLAYERS not in level_names for level_names in checkpoint_names)
    monkeypatch.setattr(remat_plan, "_residual_sums", lambda problem, nodes: frozenset())
    assert plan.solution.peak_bytes < smallest().solution.peak_bytes


@pytest.mark.parametrize("name", sorted(SMALL))
def test_simulated_peak_is_the_rewritten_graphs_peak(name):
    """The solver prices a choice without rewriting; the rewrite must agree to the byte."""
    step, table = captured(name)
    plan = remat_plan.plan_recompute(step, table, get_device("cpu"), 10**12, constant_bytes=0, floor_bytes=0)
    problem = plan.problem
    none = optimizer_memory(None, [], device_is_cuda=False)
    rng = random.Random(0)
    count = len(problem.candidates)
    for trial in range(8):
        chosen = sorted(rng.sample(range(count), rng.randrange(count + 1))) if trial else list(range(count))
        simulated = remat_fast.simulate(problem, chosen)
        graph = apply_recompute(step.graph, step.backward_start, [plan.candidates[i] for i in chosen])
        rewritten = storage_table(dataclasses.replace(step, graph=graph))
        real = memory_timeline(rewritten, liveness(rewritten), none).peak_bytes
        assert simulated.peak_bytes == real, (trial, len(chosen))


def test_baselines_by_name():
    workload = SMALL["gpt2"]()
    model, inputs = workload.build(), workload.inputs()
    eager = memopt.plan(model, inputs).peak_bytes
    plans = {name: memopt.plan(model, inputs, budget=2 * eager, solver=name) for name in ("none", "blocks", "sqrt")}
    assert plans["none"].peak_bytes == eager and plans["none"].solver.objective == 0
    assert plans["blocks"].peak_bytes < eager and plans["sqrt"].peak_bytes < eager
    # per-layer checkpointing recomputes everything but each layer's outputs: more than memopt needs
    # for a budget at its peak, and memopt's plan costs no more
    mine = memopt.plan(model, inputs, budget=plans["blocks"].peak_bytes * 100 // 98 + 1)
    assert mine.peak_bytes <= mine.budget_bytes
    assert mine.solver.objective <= plans["blocks"].solver.objective
    for name, plan in plans.items():
        assert plan.solver.name == name
    with pytest.raises(memopt.MemoptError, match="unknown remat solver"):
        memopt.plan(model, inputs, budget=eager, solver="checkmate-hours")


def test_decisions_in_the_json_say_what_and_why():
    workload = SMALL["gpt2"]()
    model, inputs = workload.build(), workload.inputs()
    eager = memopt.plan(model, inputs).peak_bytes
    with pytest.raises(memopt.BudgetInfeasibleError) as info:
        memopt.plan(model, inputs, budget=1)
    budget = (info.value.minimum + eager) // 2
    plan = memopt.plan(model, inputs, budget=budget)
    data = json.loads(plan.to_json())
    recomputed = [d for d in data["decisions"] if d["action"] == "recompute"]
    # each names the stretch of the model it is in (a block, or what comes before or after the blocks) and why
    where = re.compile(r"^(transformer\.h\[\d+\]|before the blocks|after the blocks): recompute ")
    assert recomputed and all(where.match(d["reason"]) for d in recomputed), [d["reason"] for d in recomputed]
    assert any(d["reason"].startswith("transformer.h[") for d in recomputed)
    assert data["eager_peak_bytes"] == eager > data["peak_bytes"]
    assert data["solver"]["name"] == "memopt" and data["solver"]["status"] in ("optimal", "feasible")
    assert 0 <= data["solver"]["lower_bound"] <= data["solver"]["objective"]
    assert data["peak_bytes"] <= budget
    text = str(plan)
    made_again = sum(d["action"] in ("recompute", "replay") for d in data["decisions"])  # replay: dropout's noise
    assert f"recompute {made_again} of {len(data['decisions'])} activations" in text
    explained = plan.explain()
    assert "decisions:" in explained and "recompute" in explained


def test_the_plan_describes_the_rewritten_step():
    torch.manual_seed(0)
    workload = SMALL["mlp"]()
    model, inputs = workload.build(), workload.inputs()
    eager = memopt.plan(model, inputs, loss_fn=workload.loss_fn)
    with pytest.raises(memopt.BudgetInfeasibleError) as info:
        memopt.plan(model, inputs, loss_fn=workload.loss_fn, budget=1)
    plan = memopt.plan(model, inputs, loss_fn=workload.loss_fn, budget=info.value.minimum)
    assert plan.program is not None and plan.graph_nodes == len(plan.program.graph.graph.nodes)
    assert plan.graph_nodes > eager.graph_nodes  # the recomputed copies are in the graph
    assert plan.timeline.peak_bytes == plan.peak_bytes < eager.peak_bytes


@pytest.mark.parametrize("name", sorted(SMALL))
def test_when_nothing_fits_the_search_goes_below_every_baselines_lowest_peak_or_matches_it(name):
    """Budget 1: the plan reported is the lowest peak found; single flips from the best of the chain and the
    baselines take it lower where one can (gpt2's causal mask, read by every layer, is recomputed too)."""
    step, table = captured(name)
    plan = remat_plan.plan_recompute(step, table, get_device("cpu"), 1, constant_bytes=0, floor_bytes=0)
    solution, problem = plan.solution, plan.problem
    assert solution.status == "infeasible"
    assert remat_fast.simulate(problem, solution.chosen).peak_bytes == solution.peak_bytes
    segments = remat_plan.find_segments(step, table)
    for baseline in ("blocks", "sqrt"):
        _, options, _ = remat_plan._options(problem, list(step.graph.graph.nodes), segments, baseline)
        chosen = sorted({i for block in options for i in block[0]})
        assert solution.peak_bytes <= remat_fast.simulate(problem, chosen).peak_bytes
    # no single flip from the reported plan lowers the peak further (where the search stopped in time)
    chosen = set(solution.chosen)
    flips = [remat_fast.simulate(problem, sorted(chosen ^ {i})).peak_bytes for i in range(len(problem.candidates))]
    assert min(flips) >= solution.peak_bytes
