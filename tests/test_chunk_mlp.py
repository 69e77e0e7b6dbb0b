"""The MLP blocks over slices of the tokens: found from the graph's ops, their wide tensors a slice at a time in
the forward and the backward, eager's values up to the order of the sums over the tokens, and through the entry
points."""

import pytest
import torch
from conftest import LossOnly, measured_step_peak, steady_step
from torch import nn

import memopt
from memopt import examples
from memopt.capture.trace import capture
from memopt.config import PlanConfig
from memopt.errors import BudgetInfeasibleError, MemoptError
from memopt.passes.chunk_mlp import chunk_mlp_step, find_mlp_regions

LAYERS, WIDTH, TOKENS, VOCAB = 2, 64, 4 * 64, 512


def _workload(name: str):
    factory = {"gpt2": examples.gpt2, "llama": examples.llama}[name]
    workload = factory(layers=LAYERS, width=WIDTH, heads=2, seq=64, batch=4, vocab=VOCAB)
    model = workload.build()
    return workload, model, workload.inputs(), workload.optimizer(model)


def _run(step, model, batch):
    """The captured step's graph on the model's tensors: (loss, gradients)."""
    params, buffers = [p.detach() for p in model.parameters()], list(model.buffers())
    return step.graph(params, buffers, ((), batch))


def _widest(step) -> int:
    """Elements per token of the step's widest (tokens x features) tensor, the loss head's logits left out."""
    values = [node.meta.get("val") for node in step.graph.graph.nodes]
    return max(value.numel() // TOKENS for value in values if isinstance(value, torch.Tensor) and value.dim() >= 2
               and TOKENS in (value.shape[0], value.shape[0] * value.shape[1]) and value.shape[-1] != VOCAB)


@pytest.mark.parametrize("name, width", [("gpt2", 4 * WIDTH), ("llama", WIDTH * 8 // 3)])
def test_each_block_found_from_its_ops_runs_over_slices_and_keeps_eagers_values_up_to_the_sums(name, width):
    _, model, batch, _ = _workload(name)
    step = capture(model, batch)
    regions = find_mlp_regions(step)
    # one per layer: not the attention's projections, not the loss head
    assert len(regions) == LAYERS
    assert {(r.rows, r.width, r.wide_bytes) for r in regions} == {(TOKENS, width, TOKENS * width * 4)}
    chunked = chunk_mlp_step(step, {r.down: 4 for r in regions})
    assert _widest(step) == width
    assert _widest(chunked) < width  # no (tokens x intermediate) tensor is whole any more
    loss, grads = _run(step, model, batch)
    chunked_loss, chunked_grads = _run(chunked, model, batch)
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-6, atol=0)
    assert len(chunked_grads) == len(grads)
    for got, want in zip(chunked_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # one chunk is the traced step
    assert chunk_mlp_step(step, {r.down: 1 for r in regions}).graph.code == step.graph.code


class NarrowMLP(nn.Module):
    """A block whose hidden layer is no wider than its input: nothing to gain by slicing it."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x))).square().mean()


class ReadTwice(nn.Module):
    """The hidden activation is read by the forward outside the block too."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(32, 128), nn.Linear(128, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.up(x))
        return self.down(hidden).square().mean() + hidden.mean()


@pytest.mark.parametrize("module", [NarrowMLP, ReadTwice])
def test_a_block_that_is_not_wider_or_whose_hidden_tensors_are_read_elsewhere_is_left_as_traced(module):
    torch.manual_seed(0)
    assert find_mlp_regions(capture(module(), (torch.randn(64, 32),))) == []


def test_chunk_mlp_takes_one_auto_or_a_count_and_refuses_the_rest():
    for value in (1, "auto", 4):
        assert PlanConfig(chunk_mlp=value).chunk_mlp == value
    for value in (0, True, "yes", 2.5):
        with pytest.raises(MemoptError, match="chunk_mlp must be 1"):
            PlanConfig(chunk_mlp=value)


def test_below_the_traced_minimum_the_error_names_chunk_mlp_and_the_fx_step_trains_under_what_it_names():
    workload, model, batch, optimizer = _workload("gpt2")
    with pytest.raises(BudgetInfeasibleError) as traced:
        memopt.plan(model, batch, optimizer=optimizer, budget=1)
    error = traced.value
    assert "chunk_mlp='auto'" in str(error) and error.chunked_minimum < 0.9 * error.minimum
    with pytest.raises(BudgetInfeasibleError) as chunked:
        memopt.plan(model, batch, optimizer=optimizer, budget=1, chunk_mlp=4)
    budget = chunked.value.minimum
    assert budget < error.minimum  # a budget no plan of the traced step meets
    compiled = memopt.compile(model, budget=budget, optimizer=optimizer, chunk_mlp=4)
    loss = compiled(**batch)
    eager = workload.build()
    torch.testing.assert_close(loss, eager(**batch).loss, rtol=1e-6, atol=0)
    loss.backward()
    eager(**batch).loss.backward()
    for (name, param), reference in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(param.grad, reference.grad, rtol=1e-4, atol=1e-6, msg=name)
    optimizer.zero_grad(set_to_none=True)
    plan = compiled.plan
    assert len(plan.chunked_mlp) == LAYERS and {c.chunks for c in plan.chunked_mlp} == {4}
    block = plan.chunked_mlp[0]
    assert block.chunk_bytes * 4 == block.wide_bytes and block.reason == "chunk_mlp=4"
    assert f"{LAYERS} MLP blocks: 4 chunks" in str(plan) and "chunked MLP blocks" in plan.explain()
    assert [c["region"] for c in plan.to_dict()["chunks"]] == ["mlp"] * LAYERS
    peak = measured_step_peak(plan, memopt.measure_peak(steady_step(compiled, batch, optimizer)))
    assert peak <= budget, f"measured {peak:,} B over the budget {budget:,} B"


def test_the_backend_chunks_the_blocks_of_a_module_that_returns_the_loss():
    workload, model, batch, optimizer = _workload("llama")

    options = {"budget": "1GB", "optimizer": optimizer, "chunk_mlp": 2, "cache": False}
    compiled = torch.compile(LossOnly(model), backend="memopt", options=options)
    torch.testing.assert_close(compiled(**batch), workload.build()(**batch).loss, rtol=1e-6, atol=0)
    (plan,) = memopt.backend.plans(options)
    assert len(plan.chunked_mlp) == LAYERS and plan.chunked_mlp[0].chunks == 2


@pytest.mark.slow
def test_inductor_runs_the_chunked_blocks_within_float_tolerance():
    workload, model, batch, optimizer = _workload("llama")
    compiled = memopt.compile(model, budget="1GB", optimizer=optimizer, backend="inductor", chunk_mlp=4)
    loss = compiled(**batch)
    torch.testing.assert_close(loss, workload.build()(**batch).loss, rtol=1e-5, atol=1e-6)
    assert compiled.plan.chunked_mlp[0].chunks == 4
