"""compress=: saved activations packed to int8 or fp8 between forward and backward, planned like the other
levers, measured against the plan, and reported as approximate with each tensor's error on the first step."""

import copy

import pytest
import torch
from conftest import measured_step_peak, steady_step

import memopt
from memopt import examples
from memopt.errors import MemoptError
from memopt.passes.compress_plan import Pack, needed_packs, packable
from memopt.report.plot import plan_figure
from memopt.solvers.remat_sim import RecomputeProblem


def _workload():
    """An MLP whose saved activations outweigh its weights: what packing them can lower."""
    workload = examples.mlp(width=256, depth=4, batch=1024)
    torch.manual_seed(0)
    return workload, workload.build(), workload.inputs()


def _smallest(model, inputs, workload, optimizer, **options) -> int:
    with pytest.raises(memopt.BudgetInfeasibleError) as error:
        memopt.plan(model, inputs, loss_fn=workload.loss_fn, optimizer=optimizer, budget=1, **options)
    return error.value.minimum


def test_int8_packing_meets_a_budget_below_the_exact_minimum_and_measures_as_planned():
    workload, model, inputs = _workload()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    exact = _smallest(model, inputs, workload, optimizer)
    budget = _smallest(model, inputs, workload, optimizer, compress="int8")
    assert budget < exact
    compiled = memopt.compile(model, budget=budget, loss_fn=workload.loss_fn, optimizer=optimizer, compress="int8")
    loss = compiled(*inputs)
    expected = workload.loss_fn(reference(*inputs))
    loss.backward()
    expected.backward()
    assert loss.item() == expected.item()  # the forward is exact: only the backward reads packed values
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0.05, atol=1e-3)  # approximate: int8 saved inputs
    optimizer.zero_grad(set_to_none=True)
    plan = compiled.plan
    assert plan.compressed and all(c.format == "int8" and c.packed_bytes < c.nbytes / 3 for c in plan.compressed)
    # each tensor's error on the first step: at most half a step of its block's scale, so under 1/254 of its
    # largest magnitude
    assert all(0 < c.max_rel_error <= 1 / 254 + 1e-6 and c.max_abs_error > 0 for c in plan.compressed)
    assert "approximate" in str(plan) and "compressed saved activations" in str(plan.explain())
    assert {c["node"] for c in plan.to_dict()["compressed"]} == {c.node for c in plan.compressed}
    step = steady_step(compiled, inputs, optimizer)
    peak = measured_step_peak(plan, memopt.measure_peak(step))
    assert peak <= budget, f"measured {peak:,} B over the budget {budget:,} B"
    # below the exact minimum by at least 80% of what the plan predicts packing saves
    assert exact - peak >= 0.8 * (exact - plan.peak_bytes), (exact, plan.peak_bytes, peak)


def test_without_compress_nothing_is_packed_and_bad_formats_are_refused():
    workload, model, inputs = _workload()
    plan = memopt.plan(model, inputs, loss_fn=workload.loss_fn, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       budget=_smallest(model, inputs, workload, None) + 1)
    assert not plan.compressed
    assert not any("memopt.pack" in str(node.target) for node in plan.program.graph.graph.nodes)
    with pytest.raises(MemoptError, match="compress must be None"):
        memopt.plan(model, inputs, loss_fn=workload.loss_fn, budget="1GB", compress="int4")


def test_the_backend_packs_with_the_same_option_and_measures_each_tensors_error():
    workload, model, inputs = _workload()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    budget = _smallest(model, inputs, workload, optimizer, compress="int8")

    class WithLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            return workload.loss_fn(self.model(*args))

    options = {"budget": budget, "optimizer": optimizer, "compress": "int8"}
    loss = torch.compile(WithLoss(), backend="memopt", options=options)(*inputs)
    loss.backward()
    (plan,) = memopt.backend.plans(options)
    assert plan.compressed and all(0 < c.max_rel_error <= 1 / 254 + 1e-6 for c in plan.compressed)
    assert plan.peak_bytes <= budget


def test_log_probabilities_are_never_packed():
    """Their backward exponentiates them, so an absolute packing error becomes a relative error of every
    probability."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 100))
    inputs = (torch.randn(1024, 64), torch.randint(0, 100, (1024,)))

    def loss_fn(logits):
        return torch.nn.functional.cross_entropy(logits, inputs[1])

    with pytest.raises(memopt.BudgetInfeasibleError) as error:
        memopt.plan(model, inputs[:1], loss_fn=loss_fn, budget=1, compress="int8")
    plan = memopt.plan(model, inputs[:1], loss_fn=loss_fn, budget=error.value.minimum, compress="int8")
    packed = [node.args[0] for node in plan.program.graph.graph.nodes if node.target is torch.ops.memopt.pack.default]
    assert packed  # the ReLUs' outputs are
    for node in packed:
        while node.target in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            node = node.args[0]
        assert node.target is not torch.ops.aten._log_softmax.default, node


def test_a_pack_stays_only_where_the_step_needs_it():
    """With the recomputations held, leaving a tensor whole adds its bytes less its payload's between its pack and
    its unpack: the costliest packs are left out first, while the step stays under the limit."""
    # per node: the bytes of the storage it makes, the nodes it reads; the backward starts at node 5
    nodes = [(100, ()), (30, (0,)), (100, ()), (30, (2,)), (300, ()), (100, (3,)), (1, (5,)), (100, (1,)), (1, (7,))]
    readers = tuple(tuple(j for j, (_, reads) in enumerate(nodes) if i in reads) for i in range(len(nodes)))
    problem = RecomputeProblem(
        backward_start=5, inputs=tuple(reads for _, reads in nodes), values=tuple((i,) for i in range(len(nodes))),
        node_costs=(0.0,) * len(nodes), sizes=tuple(size for size, _ in nodes), start=tuple(range(len(nodes))),
        end=tuple(max(r, default=i) for i, r in enumerate(readers)), readers=readers, candidates=())
    # the forward peaks at node 4 (360 B with both packed); "a" is packed from node 1 to 7, "b" from 3 to 5
    a, b = Pack("a", 1, 7, 70, seconds=2.0), Pack("b", 3, 5, 70, seconds=1.0)

    def needed(limit: int) -> list[str]:
        return [pack.base for pack in needed_packs(problem, (), [a, b], limit)]

    assert needed(500) == []  # 360 + 70 + 70: both whole fit
    assert needed(450) == ["b"]  # "a" whole (430 B at node 4) leaves no room for "b" whole
    assert needed(429) == ["a", "b"]


def test_packing_replaces_recomputation_where_it_costs_less_and_packs_only_what_that_needs():
    """Above the exact minimum a pack is taken only where it costs less than the recomputation it saves: with
    Triton's one-pass kernels (planned for the h100 preset), not with the torch path this CPU runs, whose
    packing makes several passes over the values."""
    workload, model, inputs = _workload()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for device in ("cpu", "h100"):
        options = {"loss_fn": workload.loss_fn, "optimizer": optimizer, "device": device, "offload": False}
        budget = int(0.85 * memopt.plan(model, inputs, **options).peak_bytes)  # above the exact minimum
        exact = memopt.plan(model, inputs, budget=budget, **options)
        assert any(d.recomputed for d in exact.decisions)
        plan = memopt.plan(model, inputs, budget=budget, compress="int8", **options)
        packed = {c.node for c in plan.compressed}
        if device == "cpu":
            assert not packed and plan.choices == exact.choices
            continue
        assert packed and {d.name for d in plan.decisions if d.action == "pack"} == packed
        packing = sum(c.seconds for c in plan.compressed)
        assert packing + (plan.solver.objective or 0.0) < exact.solver.objective  # why it was chosen
        assert f"pack {len(packed)} of" in str(plan)
        labels = plan_figure(plan).axes[0].get_legend_handles_labels()[1]  # the plot ticks each pack and unpack
        assert f"activation packed to int8 ({len(packed)})" in labels
        assert f"activation unpacked ({len(packed)})" in labels
        # the packs the budget needs, not every one that may be: the plan at the smallest budget packs more
        tightest = memopt.plan(model, inputs, budget=_smallest(model, inputs, workload, optimizer, compress="int8",
                                                               device=device, offload=False),
                               compress="int8", **options)
        assert len(plan.compressed) < len(tightest.compressed)


def test_a_value_the_backward_divides_by_is_never_packed():
    """Packing errs by up to half a step of its block's scale: small beside the block's largest value, not beside
    its smallest, so a divisor (here a sigmoid's output, read as one by the division's backward) stays whole."""

    class Gated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.gate = torch.nn.Linear(64, 512), torch.nn.Linear(64, 512)
            self.down = torch.nn.Linear(512, 64)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)) / torch.sigmoid(self.gate(x)))

    torch.manual_seed(0)
    model, x = Gated(), torch.randn(1024, 64)

    def loss_fn(out):
        return out.square().mean()

    step = memopt.plan(model, (x,), loss_fn=loss_fn, optimizer=torch.optim.SGD)
    packed = {node.target for node in packable(step.program.graph, step.storages).values()}
    assert torch.ops.aten.relu.default in packed  # the numerator may be packed
    assert torch.ops.aten.sigmoid.default not in packed


def test_with_offload_packing_never_raises_the_smallest_budget():
    """On a CUDA preset offload is on: a packed step leaves less to offload, so where the exact step, offloaded,
    fits lower than the packed one, the exact plan is taken."""
    workload, model, inputs = _workload()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    exact = _smallest(model, inputs, workload, optimizer, device="h100")
    smallest = _smallest(model, inputs, workload, optimizer, device="h100", compress="int8")
    assert smallest <= exact
    plan = memopt.plan(model, inputs, loss_fn=workload.loss_fn, optimizer=optimizer, budget=smallest,
                       device="h100", compress="int8")
    assert plan.offload is not None and plan.peak_bytes <= smallest
