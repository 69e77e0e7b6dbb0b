"""Planning one rank under FSDP2 (``world_size``), checked against FSDP2 itself on gloo processes.

The runs are benchmarks/fsdp.py's: ``fully_shard`` on every block and on the root, AdamW, each rank on its
share of the batch, and the same training unsharded on the whole batch from the same weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch

import memopt
from benchmarks import fsdp
from memopt.measure import measure_steady_peak
from memopt.passes.sharding import default_sharding

# AdamW divides by the gradients' own scale, so an element whose gradient is near zero moves by up to the learning
# rate whatever the reduction order (the measured differences: benchmarks/FSDP.md)
PARAM_ATOL = 1e-4
LOSS_ATOL = 1e-5


def _check_run(name: str, world: int, budget: int | None = None, step_in_backward: bool = False
               ) -> tuple[list[dict], dict[str, torch.Tensor]]:
    results, params = fsdp.run_sharded(name, world, budget=budget, step_in_backward=step_in_backward)
    if fsdp.WORKLOADS[name].policy is None:  # (in another precision, the training is another one)
        reference_losses, reference = fsdp.run_unsharded(name)
        # what the ranks trained is the unsharded training: the mean of the ranks' losses and the parameters
        for i, expected in enumerate(reference_losses):
            assert sum(r["losses"][i] for r in results) / world == pytest.approx(expected, abs=LOSS_ATOL)
        assert params.keys() == reference.keys()
        for n, value in reference.items():
            torch.testing.assert_close(params[n], value, atol=PARAM_ATOL, rtol=0)
    single = _single_device_error(name, world)
    for rank, result in enumerate(results):
        predicted = result["plan"]["peak_bytes"]  # the rank's plan of the wrapped model, or memopt.compile's
        assert result["measured_peak_bytes"] is not None, f"rank {rank}: no measurement reconciled: {result['tries']}"
        error = (predicted - result["measured_peak_bytes"]) / result["measured_peak_bytes"]
        assert abs(error - single) <= SHARDING_ERROR, (rank, predicted, result["measured_peak_bytes"], single)
        if budget is not None:
            assert result["measured_peak_bytes"] <= budget
    return results, params


# what the sharding model may add to memopt's error on one device: memopt predicts its own graph of the step, and
# a Hugging Face loss head runs eagerly with other temporaries than memopt's graph of it has, which FSDP2 does
# not change
SHARDING_ERROR = 0.015


def _single_device_error(name: str, world: int) -> float:
    """memopt's error on one process, unsharded, on one rank's batch: its plan against the eager step measured."""
    workload = fsdp.WORKLOADS[name]
    torch.manual_seed(0)
    model = workload.build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=fsdp.LR)
    batch = fsdp.share(workload.batch(0), 0, world)

    def step() -> None:
        fsdp.call(model, batch).backward()
        optimizer.step()

    step()
    optimizer.zero_grad(set_to_none=True)
    measured = measure_steady_peak(step, between=lambda: optimizer.zero_grad(set_to_none=True))
    plan = memopt.plan(model, batch[0] if isinstance(batch[0], dict) else batch, optimizer=optimizer)
    # the test process holds more than this step (other tests' tensors): the step's own peak is what it adds to
    # what it starts with, which the plan predicts (parameters, optimizer state, the batch)
    peak = measured.peak_bytes - measured.baseline_bytes + plan.timeline.totals[0]
    return (plan.peak_bytes - peak) / peak


def _between_eager_and_every_block(name: str, world: int) -> int:
    """A budget the eager step does not fit, which some blocks recomputed, not all, do."""
    every_block = fsdp.predicted(name, world, solver="blocks", budget=10**12).peak_bytes
    return (fsdp.predicted(name, world).peak_bytes + every_block) // 2


@pytest.mark.parametrize("name, step_in_backward", [
    # the shards updated inside the backward, each after its unit's reduce-scatter: bitwise FSDP2's own training
    ("mlp-batch", True),
    pytest.param("mlp-batch", False, marks=pytest.mark.slow),
    # FSDP2's MixedPrecisionPolicy: bf16 gathered parameters, activations and unsharded gradients, fp32 reduction
    pytest.param("mlp-batch-bf16", False, marks=pytest.mark.slow),
])
def test_memopt_compile_on_two_gloo_ranks_checkpoints_blocks_to_fit_the_rank_budget_and_trains_as_fsdp2(
        name: str, step_in_backward: bool) -> None:
    results, params = _check_run(name, 2, _between_eager_and_every_block(name, 2), step_in_backward)
    for result in results:
        checkpointed, selective = result["plan"]["checkpointed"], result["plan"]["selective"]
        whole = set(checkpointed) - set(selective)
        assert 0 < len(checkpointed) and len(whole) < 4 and set(checkpointed) <= {f"blocks.{i}" for i in range(4)}
    # recomputing whole blocks (and updating each shard once its gradient is reduced) changes no arithmetic
    eager_results, eager_params = fsdp.run_sharded(name, 2, measure=False)
    assert [r["losses"] for r in results] == [r["losses"] for r in eager_results]
    for n, value in eager_params.items():
        assert torch.equal(params[n], value), n


@pytest.mark.slow
@pytest.mark.parametrize("name, world", [("mlp", 2), ("mlp", 4), ("llama", 2)])
def test_more_ranks_and_a_llama_train_as_unsharded_and_peak_as_predicted(name: str, world: int) -> None:
    _check_run(name, world)


def _meta_llama(layers: int = 4) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.config.use_cache = False
    model.loss_type = "ForCausalLM"
    return model


def _batch(seq: int = 128) -> dict:
    ids = torch.zeros(2, seq, dtype=torch.long, device="meta")
    return {"input_ids": ids, "labels": ids}


def test_a_meta_model_is_planned_per_rank_from_shapes_with_sharded_state_and_what_fsdp_gathers() -> None:
    model = _meta_llama()
    one = memopt.plan(model, _batch(), optimizer=torch.optim.AdamW)
    eight = memopt.plan(model, _batch(), optimizer=torch.optim.AdamW, world_size=8)
    sharding = eight.sharding
    assert sharding is not None and sharding.world_size == 8
    # the blocks of model.layers, then the root (embeddings, final norm, head)
    assert [u.name for u in sharding.units] == [f"model.layers.{i}" for i in range(4)] + [""]
    assert "lm_head.weight" in sharding.root.params and "model.embed_tokens.weight" in sharding.root.params
    named = dict(model.named_parameters())
    # every parameter held as rank 0's dim-0 shard: ceil(rows / 8) rows (1000 rows -> 125; 688 -> 86)
    shards = {n: math.ceil(p.shape[0] / 8) * math.prod(p.shape[1:]) * p.element_size() for n, p in named.items()}
    assert eight.static_ledger["parameters"] == sum(shards.values())
    assert eight.static_ledger["gradients"] == sum(shards.values())
    assert eight.optimizer.state_bytes == sum(2 * b + 4 for b in shards.values())  # two moments and a step count
    # what the engine holds beyond the shards: at most two blocks' and the root's parameters gathered, and their
    # all-gather and reduce-scatter buffers
    gathered = eight.timeline.by_category["gathered"]
    block = sharding.gathered_bytes(sharding.units[0])
    assert 0 < max(gathered) <= sharding.gathered_bytes(sharding.root) * 2 + 4 * block
    assert gathered[0] == 2 * sharding.gathered_bytes(sharding.root)  # the root's, and its all-gather output
    assert eight.peak_bytes < one.peak_bytes
    data = eight.to_dict()
    assert data["sharding"]["world_size"] == 8 and len(data["sharding"]["units"]) == 5
    assert "per rank of 8" in str(eight)


def test_the_smallest_per_rank_budget_is_named_and_falls_with_more_ranks() -> None:
    model = fsdp.ResidualMLP(width=64, depth=4)
    batch = (torch.randn(32, 64), torch.zeros(32, dtype=torch.long))
    minimum = {}
    for world in (2, 8):
        with pytest.raises(memopt.BudgetInfeasibleError) as raised:
            memopt.plan(model, batch, optimizer=torch.optim.AdamW, world_size=world, budget=1)
        minimum[world] = raised.value.minimum
    assert minimum[8] < minimum[2]
    plan = memopt.plan(model, batch, optimizer=torch.optim.AdamW, world_size=8, budget=minimum[8])
    assert plan.peak_bytes <= minimum[8] and plan.sharding is not None


def test_default_units_are_the_blocks_of_every_layer_list_and_the_root() -> None:
    model = fsdp.ResidualMLP(width=8, depth=3)
    sharding = default_sharding(model, 2)
    assert [u.name for u in sharding.units] == ["blocks.0", "blocks.1", "blocks.2", ""]
    assert sharding.root.params == ("head.weight", "head.bias")
    assert not sharding.root.reshard_after_forward and sharding.units[0].reshard_after_forward
    # 4 x 8 rows over 3 ranks: ceil(32 / 3) = 11 rows of 8 floats each; the all-gather returns 33 rows
    wide = default_sharding(fsdp.ResidualMLP(width=8, depth=1), 3)
    assert wide.shard_bytes("blocks.0.up.weight") == 11 * 8 * 4
    assert wide.padded_bytes("blocks.0.up.weight") == 33 * 8 * 4


@pytest.mark.parametrize("world_size", [0, -2, "2", True, 1.5])
def test_a_bad_world_size_is_refused_by_name(world_size) -> None:
    with pytest.raises(memopt.MemoptError, match="world_size"):
        memopt.plan(fsdp.ResidualMLP(width=8, depth=1), (torch.randn(4, 8), torch.zeros(4, dtype=torch.long)),
                    world_size=world_size)


def test_what_is_not_planned_under_fsdp2_yet_is_refused_with_the_way_out() -> None:
    model = fsdp.ResidualMLP(width=8, depth=1)
    batch = (torch.randn(4, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(memopt.MemoptError, match="layout=True is not planned under FSDP2"):
        memopt.plan(model, batch, world_size=2, layout=True)


@contextlib.contextmanager
def _fake_ranks(world: int) -> Iterator[None]:
    """A fake process group of ``world`` ranks in this process (this one rank 0): fully_shard wraps, nothing is
    sent."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_model_wrapped_with_fully_shard_is_planned_as_its_units_shard_it() -> None:
    batch = (torch.randn(32, 64), torch.zeros(32, dtype=torch.long))
    torch.manual_seed(0)
    plain = fsdp.ResidualMLP(width=64, depth=3)
    expected = memopt.plan(plain, batch, optimizer=torch.optim.AdamW, world_size=4)
    with _fake_ranks(4):
        torch.manual_seed(0)
        wrapped = fsdp._shard(fsdp.ResidualMLP(width=64, depth=3))
        hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in wrapped.modules()]
        plan = memopt.plan(wrapped, batch, optimizer=torch.optim.AdamW)
        assert plan.sharding == expected.sharding
        assert plan.peak_bytes == expected.peak_bytes and plan.ledger == expected.ledger
        # FSDP2's hooks are back where they were
        assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in wrapped.modules()] == hooks
        with pytest.raises(memopt.MemoptError, match="sharded over 4 ranks"):
            memopt.plan(wrapped, batch, world_size=8)
        with pytest.raises(memopt.MemoptError, match="not backend='inductor', layout=True"):
            memopt.compile(wrapped, budget="1GB", backend="inductor", layout=True)


def _planned_on_fake_ranks(world: int, policy=None, rows: int = 32, **options) -> memopt.MemoryPlan:
    """The residual MLP wrapped with fully_shard (each block and the root under ``policy``) on a fake process group
    of ``world`` ranks, planned by memopt for a batch of ``rows``."""
    with _fake_ranks(world):
        torch.manual_seed(0)
        model = fsdp._shard(fsdp.ResidualMLP(width=64, depth=3), policy)
        parameters = {n: p.to_local().clone() for n, p in model.named_parameters()}
        plan = memopt.plan(model, (torch.randn(rows, 64), torch.zeros(rows, dtype=torch.long)),
                           optimizer=torch.optim.AdamW, **options)
        # planning changed nothing of the model
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(torch.equal(p.to_local(), parameters[n]) for n, p in model.named_parameters())
        return plan


def test_a_mixed_precision_policy_is_planned_as_fsdp2_casts_gathers_and_reduces() -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    full = _planned_on_fake_ranks(4)
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mixed = _planned_on_fake_ranks(4, bf16)
    # what the optimizer holds stays fp32 shards: parameters, reduced gradients, AdamW's state
    for category in ("parameters", "gradients"):
        assert mixed.static_ledger[category] == full.static_ledger[category]
    assert mixed.optimizer.state_bytes == full.optimizer.state_bytes
    # what is gathered is bf16: the root's parameters and their all-gather output, at the first op, half as large,
    # beside the all-gather's input: the root's fp32 shards cast to bf16 (a quarter of the gathered rows)
    root = mixed.sharding.root
    cast = mixed.sharding.cast_bytes(root)
    assert cast == mixed.sharding.gathered_bytes(root) // 4 and full.sharding.cast_bytes(full.sharding.root) == 0
    assert mixed.timeline.by_category["gathered"][0] == full.timeline.by_category["gathered"][0] // 2 + cast
    # the step computes in bf16: the input cast at the root's entry, parameters read in bf16
    placeholders = [n for n in mixed.program.graph.graph.nodes if n.op == "placeholder"]
    assert {p.meta["val"].dtype for p, role in zip(placeholders, mixed.program.placeholders)
            if role.role == "parameter"} == {torch.bfloat16}
    # (about half: the bf16 saved activations, beside what keeps its dtype: the labels, a scalar or two)
    assert 0.5 <= max(mixed.timeline.by_category["activations"]) / max(full.timeline.by_category["activations"]) < 0.55
    assert mixed.peak_bytes < full.peak_bytes
    unit = mixed.sharding.units[0]
    numel = sum(mixed.sharding.padded_bytes(p) for p in unit.params) // 2
    assert unit.param_dtype == torch.bfloat16 and mixed.sharding.reduced_bytes(unit) == (4 * numel, 0)
    # reduced in bf16 (reduce_dtype None): a bf16 reduce-scatter input, and its output cast to fp32 beside it
    low = _planned_on_fake_ranks(4, MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    assert low.sharding.reduced_bytes(low.sharding.units[0]) == (2 * numel, 2 * numel // 4)
    # a unit whose outputs are cast back to fp32 (output_dtype): the next unit casts them to bf16 again
    casts = MixedPrecisionPolicy(param_dtype=torch.bfloat16, output_dtype=torch.float32)
    back = _planned_on_fake_ranks(4, casts)

    def forward_casts(plan: memopt.MemoryPlan) -> list[torch.dtype]:
        casts = []
        for node in plan.program.graph.graph.nodes:
            if node.name == plan.program.backward_start:
                return casts
            if node.target == torch.ops.aten._to_copy.default:
                casts.append(node.kwargs["dtype"])
        raise AssertionError("no backward")

    # the input to bf16 at the root; then each block's output to fp32, and to bf16 again at the next block (the
    # root's head is no unit's entry: no cast)
    assert forward_casts(mixed) == [torch.bfloat16]
    assert forward_casts(back) == [torch.bfloat16] + [torch.float32, torch.bfloat16] * 2 + [torch.float32]


def test_blocks_are_kept_checkpointed_selectively_or_whole_the_least_costly_that_fits() -> None:
    eager = _planned_on_fake_ranks(2, rows=1024)
    every_block = _planned_on_fake_ranks(2, rows=1024, solver="blocks", budget=10**12)
    plans = [_planned_on_fake_ranks(2, rows=1024, solver="checkpoint", budget=budget)
             for budget in (eager.peak_bytes * 95 // 100, (eager.peak_bytes + every_block.peak_bytes) // 2)]
    for plan in plans:
        assert plan.peak_bytes <= plan.budget_bytes and plan.checkpointed
        for path, policy in plan.selective.items():
            # the block's two matmuls: the up projection's result kept (GELU's backward reads it), the down
            # projection's not (the residual add's backward reads nothing)
            assert path in plan.checkpointed and policy == (("aten.addmm", True), ("aten.addmm", False))
    # a smaller budget recomputes more: more blocks, or more of them whole; and costs more
    assert plans[1].solver.objective > plans[0].solver.objective
    assert "keeping what the backward reads of their matmuls" in str(plans[0]) and plans[0].selective
    assert plans[0].to_dict()["selective"] == {k: [list(op) for op in v] for k, v in plans[0].selective.items()}


def test_the_backend_refuses_a_model_fsdp2_shards_and_names_memopt_compile() -> None:
    with _fake_ranks(2):
        torch.manual_seed(0)
        model = fsdp._shard(fsdp.ResidualMLP(width=16, depth=2))
        compiled = torch.compile(model, backend="memopt", options={"budget": "1GB"})
        try:
            with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as raised:
                compiled(torch.randn(8, 16), torch.zeros(8, dtype=torch.long))
        finally:
            torch._dynamo.reset()
        error = raised.value.inner_exception
        assert isinstance(error, memopt.MemoptError) and "memopt.compile(model, budget=" in str(error)
        assert "wrapped with fully_shard" in str(error)


def test_updates_inside_the_backward_free_each_unit_s_gradient_shards_as_it_is_reduced() -> None:
    model = fsdp.ResidualMLP(width=64, depth=4)
    batch = (torch.randn(32, 64), torch.zeros(32, dtype=torch.long))
    optimizer = torch.optim.AdamW(model.parameters())
    after = memopt.plan(model, batch, optimizer=optimizer, world_size=4)
    inside = memopt.plan(model, batch, optimizer=optimizer, world_size=4, step_in_backward=True)
    assert set(inside.stepped) == set(dict(model.named_parameters()))
    gradients = inside.timeline.by_category["gradients"]
    assert gradients[-1] == 0 and after.timeline.by_category["gradients"][-1] == after.static_ledger["gradients"]
    assert inside.optimizer_peak_bytes == 0 < after.optimizer_peak_bytes  # no step after the backward
    # the shards of the units reduced before do not pile up
    assert max(gradients) < max(after.timeline.by_category["gradients"])
    assert inside.peak_bytes <= after.peak_bytes
