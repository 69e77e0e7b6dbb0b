"""The loss head over slices of the tokens: found from the graph's ops, the logits never whole, eager's values
up to the order of the sums over the tokens, and through every entry point."""

import pytest
import torch
import torch.nn.functional as F
from conftest import LossOnly, measured_step_peak, steady_step
from torch import nn

import memopt
from memopt import examples
from memopt.capture.trace import capture
from memopt.config import PlanConfig
from memopt.device import get_device
from memopt.errors import BudgetInfeasibleError, MemoptError
from memopt.passes.chunk_loss import chunk_step, find_loss_heads
from memopt.passes.costs import graph_seconds

TOKENS, VOCAB = 4 * 32, 1000


class TinyLM(nn.Module):
    """Embedding, one hidden layer, a linear head; loss: cross-entropy over the tokens (labels -100 ignored)."""

    def __init__(self, bias: bool = False, reduction: str = "mean", extra: bool = False) -> None:
        super().__init__()
        self.embed, self.hidden = nn.Embedding(VOCAB, 32), nn.Linear(32, 32)
        self.head = nn.Linear(32, VOCAB, bias=bias)
        self.reduction, self.extra = reduction, extra

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.tanh(self.hidden(self.embed(tokens))))
        loss = F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1), reduction=self.reduction)
        return loss + logits.square().mean() if self.extra else loss  # extra: the logits are read elsewhere too


def _batch():
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (4, 32))
    labels = torch.randint(0, VOCAB, (4, 32))
    labels[:, :5] = -100  # ignored positions, in the first chunk only
    return tokens, labels


def _run(graph, model, batch):
    """The captured step's graph on the model's tensors: (loss, gradients)."""
    params, buffers = [p.detach() for p in model.parameters()], list(model.buffers())
    return graph(params, buffers, (batch, {}))


@pytest.mark.parametrize("bias, reduction", [(False, "mean"), (True, "mean"), (True, "sum")])
def test_a_head_found_from_its_ops_runs_over_slices_and_keeps_eagers_values_up_to_the_sums(bias, reduction):
    torch.manual_seed(0)
    model, batch = TinyLM(bias, reduction), _batch()
    step = capture(model, batch)
    (head,) = find_loss_heads(step.graph)
    assert (head.rows, head.vocab, head.logits_bytes) == (TOKENS, VOCAB, TOKENS * VOCAB * 4)
    chunked = chunk_step(step, {head.loss: 4})
    # no value of the chunked step is as large as the logits: a quarter of them at most
    largest = max(n.meta["val"].numel() for n in chunked.graph.graph.nodes
                  if isinstance(n.meta.get("val"), torch.Tensor))
    assert largest == TOKENS * VOCAB // 4
    assert max(n.meta["val"].numel() for n in step.graph.graph.nodes
               if isinstance(n.meta.get("val"), torch.Tensor)) == TOKENS * VOCAB
    loss, grads = _run(step.graph, model, batch)
    chunked_loss, chunked_grads = _run(chunked.graph, model, batch)
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-6, atol=0)
    assert len(chunked_grads) == len(grads)
    for got, want in zip(chunked_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # one chunk is the traced step
    assert chunk_step(step, {head.loss: 1}).graph.code == step.graph.code


def test_the_forward_takes_each_slices_gradients_so_the_logits_are_computed_once_and_scaled_in_the_backward():
    """As Liger-Kernel's fused linear cross-entropy: each slice's logits are made once, in the forward, which takes
    their gradient for a unit loss gradient and its shares of the input's and weight's gradients; the backward
    multiplies those by the loss's gradient, so a loss scaled before backward() still gets eager's gradients."""
    torch.manual_seed(0)
    model, batch = TinyLM(bias=True), _batch()
    step = capture(model, batch)
    (head,) = find_loss_heads(step.graph)
    assert head.gradients_in_forward
    chunked = chunk_step(step, {head.loss: 4})
    nodes = list(chunked.graph.graph.nodes)
    backward_start = [node.name for node in nodes].index(chunked.backward_start)
    products = [i for i, node in enumerate(nodes) if node.target in (torch.ops.aten.mm.default,
                                                                       torch.ops.aten.addmm.default)
                and tuple(node.meta["val"].shape) == (TOKENS // 4, VOCAB)]
    assert len(products) == 4 and max(products) < backward_start
    assert not any(node.target is torch.ops.aten._log_softmax.default for node in nodes[backward_start:])

    twin = TinyLM(bias=True)
    twin.load_state_dict(model.state_dict())
    compiled = memopt.compile(model, budget="1GB", optimizer=torch.optim.SGD, chunk_loss=4)
    (compiled(*batch) * 3).backward()
    (twin(*batch) * 3).backward()
    assert compiled.plan.chunked[0].gradients_in_forward
    assert "computed once: the forward takes each chunk's gradients" in str(compiled.plan)
    for (name, want), got in zip(twin.named_parameters(), model.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_where_the_forward_cannot_take_the_gradients_the_backward_computes_each_slices_logits_again(monkeypatch):
    from memopt.passes import chunk_loss

    monkeypatch.setattr(chunk_loss, "_gradients_in_forward", lambda *args: False)
    torch.manual_seed(0)
    model, batch = TinyLM(bias=True), _batch()
    step = capture(model, batch)
    (head,) = find_loss_heads(step.graph)
    assert not head.gradients_in_forward
    chunked = chunk_step(step, {head.loss: 4})
    nodes = list(chunked.graph.graph.nodes)
    backward_start = [node.name for node in nodes].index(chunked.backward_start)
    products = [i for i, node in enumerate(nodes) if node.target is torch.ops.aten.addmm.default
                and tuple(node.meta["val"].shape) == (TOKENS // 4, VOCAB)]
    assert len(products) == 8 and sum(i >= backward_start for i in products) == 4
    # the cost model, which chooses whether to chunk, sees the logits made twice, and the slices' extra work
    monkeypatch.undo()
    once = chunk_step(step, {head.loss: 4})
    cpu = get_device("cpu")
    assert graph_seconds(step.graph, cpu) < graph_seconds(once.graph, cpu) < graph_seconds(chunked.graph, cpu)
    loss, grads = _run(step.graph, model, batch)
    chunked_loss, chunked_grads = _run(chunked.graph, model, batch)
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-6, atol=0)
    for got, want in zip(chunked_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_logits_read_by_more_than_the_loss_leave_the_head_as_traced():
    torch.manual_seed(0)
    assert find_loss_heads(capture(TinyLM(extra=True), _batch()).graph) == []


def test_chunk_loss_takes_one_auto_or_a_count_and_refuses_the_rest():
    for value in (1, "auto", 8):
        assert PlanConfig(chunk_loss=value).chunk_loss == value
    for value in (0, -2, True, "yes", 2.0):
        with pytest.raises(MemoptError, match="chunk_loss must be 1"):
            PlanConfig(chunk_loss=value)
    with pytest.raises(MemoptError, match="chunk_loss must be 1"):
        memopt.plan(TinyLM(), _batch(), chunk_loss="yes")


def _language_model():
    workload = examples.gpt2(layers=2, width=64, heads=2, seq=64, batch=4, vocab=4096)
    model = workload.build()
    return workload, model, workload.inputs(), workload.optimizer(model)


def test_below_the_traced_heads_minimum_the_error_names_chunk_loss_and_the_fx_step_fits_what_it_names():
    workload, model, batch, optimizer = _language_model()
    with pytest.raises(BudgetInfeasibleError) as traced:
        memopt.plan(model, batch, optimizer=optimizer, budget=1)
    error = traced.value
    assert error.chunked_minimum is not None and error.chunked_minimum < 0.9 * error.minimum
    assert "chunk_loss='auto'" in str(error)
    with pytest.raises(BudgetInfeasibleError) as auto:
        memopt.plan(model, batch, optimizer=optimizer, budget=1, chunk_loss="auto")
    assert auto.value.minimum == error.chunked_minimum
    budget = error.chunked_minimum
    compiled = memopt.compile(model, budget=budget, optimizer=optimizer, chunk_loss="auto")
    loss = compiled(**batch)
    eager = workload.build()
    torch.testing.assert_close(loss, eager(**batch).loss, rtol=1e-6, atol=0)
    loss.backward()
    eager(**batch).loss.backward()
    for (name, param), reference in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(param.grad, reference.grad, rtol=1e-4, atol=1e-6, msg=name)
    optimizer.zero_grad(set_to_none=True)
    plan = compiled.plan
    (head,) = plan.chunked
    assert head.chunks >= 2 and head.chunk_bytes * head.chunks >= head.logits_bytes
    assert f"loss head {head.loss}: {head.chunks} chunks" in str(plan) and "chunked loss heads" in plan.explain()
    assert plan.to_dict()["chunked"][0]["chunks"] == head.chunks
    peak = measured_step_peak(plan, memopt.measure_peak(steady_step(compiled, batch, optimizer)))
    assert peak <= budget, f"measured {peak:,} B over the budget {budget:,} B"


def test_the_default_keeps_the_head_as_traced_and_a_count_forces_it():
    _, model, batch, optimizer = _language_model()
    budget = 64 * 2**20
    whole = memopt.plan(model, batch, optimizer=optimizer, budget=budget)
    assert whole.chunked == () and whole.sliced == ""
    sliced = memopt.plan(model, batch, optimizer=optimizer, budget=budget, chunk_loss=8)
    (head,) = sliced.chunked
    assert head.chunks == 8 and head.reason == "chunk_loss=8" and sliced.sliced == "loss head x8"
    # the slices re-read the head's weight and add up its gradient: by the cost model the step takes longer
    assert sliced.modelled_seconds > whole.modelled_seconds > 0
    assert ("nll_loss_forward", "chunked x8") in sliced.choices and not whole.choices


def test_the_backend_chunks_the_head_of_a_module_that_returns_the_loss():
    workload, model, batch, optimizer = _language_model()
    with pytest.raises(BudgetInfeasibleError) as traced:
        memopt.plan(model, batch, optimizer=optimizer, budget=1)
    budget = traced.value.chunked_minimum

    options = {"budget": budget, "optimizer": optimizer, "chunk_loss": "auto", "cache": False}
    compiled = torch.compile(LossOnly(model), backend="memopt", options=options)
    torch.testing.assert_close(compiled(**batch), workload.build()(**batch).loss, rtol=1e-6, atol=0)
    (plan,) = memopt.backend.plans(options)
    assert plan.chunked and plan.chunked[0].chunks >= 2


@pytest.mark.slow
def test_inductor_runs_the_chunked_head_within_float_tolerance():
    workload, model, batch, optimizer = _language_model()
    compiled = memopt.compile(model, budget="1GB", optimizer=optimizer, backend="inductor", chunk_loss=4)
    loss = compiled(**batch)
    torch.testing.assert_close(loss, workload.build()(**batch).loss, rtol=1e-5, atol=1e-6)
    assert compiled.plan.chunked[0].chunks == 4
