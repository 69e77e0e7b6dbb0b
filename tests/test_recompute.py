"""The recompute rewrite and the op cost model (the building blocks of rematerialization)."""

import dataclasses

import pytest
import torch
from conftest import LossOnly, assert_runs_like_eager, infeasible_behind, square_mean
from torch import nn

from memopt import examples
from memopt.capture import capture
from memopt.device import get_device
from memopt.passes.costs import node_flops, node_seconds, recompute_seconds
from memopt.passes.liveness import liveness
from memopt.passes.recompute import apply_recompute, recompute_candidates
from memopt.passes.storage import ACTIVATIONS, storage_table


def _dropout_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 128), nn.Tanh(),
                         nn.Linear(128, 1))


def test_recomputing_every_candidate_is_bitwise_eager_and_frees_them_after_the_forward():
    model, x = _dropout_mlp(), torch.randn(32, 64)
    step = capture(model, (x,), loss_fn=square_mean)
    table = storage_table(step)
    candidates = recompute_candidates(step.graph, table)
    makers = {c.nodes[0] for c in candidates}
    assert {"relu", "tanh"} <= makers
    assert not any("dropout" in name or "bernoulli" in name for name in makers)  # the noise by its buffer, empty_like
    rewritten = dataclasses.replace(step, graph=apply_recompute(step.graph, step.backward_start, candidates))
    new_table = storage_table(rewritten)
    live = liveness(new_table)
    names = new_table.node_names
    for storage in new_table.storages:
        if storage.node in ("relu", "tanh"):  # the originals now die in the forward
            assert names[live.end[storage.index]] in names[: new_table.backward_start]
            assert storage.category != ACTIVATIONS
    assert_runs_like_eager(rewritten.graph, model, (x,), square_mean, seed=3)


class _MadeFromNothing(nn.Module):
    """Multiplies by a tensor made from no input (T5's zero position bias of its cross-attention is one)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(x) * torch.ones(x.shape[0], 16)


def test_a_recomputed_tensor_made_from_no_input_is_a_fake_value_in_the_plan_not_a_real_one():
    """The copy's value is made in the graph's fake mode: a real one would live in the graph's metadata for as
    long as the compiled step, memory the plan never counts (the benchmark T5 measured 0.7 MiB over its plan)."""
    from torch._subclasses.fake_tensor import FakeTensor

    model, x = _MadeFromNothing(), torch.randn(8, 16)
    step = capture(model, (x,), loss_fn=square_mean)
    candidates = recompute_candidates(step.graph, storage_table(step))
    nodes = {node.name: node for node in step.graph.graph.nodes}
    assert any(not nodes[c.nodes[0]].all_input_nodes for c in candidates)  # the ones, recomputed from nothing
    graph = apply_recompute(step.graph, step.backward_start, candidates)
    values = [leaf for node in graph.graph.nodes for leaf in torch.utils._pytree.tree_leaves(node.meta.get("val"))
              if isinstance(leaf, torch.Tensor)]
    assert values and all(isinstance(value, FakeTensor) for value in values)


class _Attention(nn.Module):
    def __init__(self, dropout_p: float):
        super().__init__()
        self.qkv, self.dropout_p = nn.Linear(32, 96), dropout_p

    def forward(self, x):
        q, k, v = self.qkv(x).view(2, 16, 3, 4, 8).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p, is_causal=True)
        return out.square().mean()


def test_attention_without_dropout_is_recomputed_and_with_dropout_is_not():
    """Attention ops carry the random tag for their dropout; with dropout_p 0 they draw nothing and replay."""
    torch.manual_seed(0)
    model, x = _Attention(0.0), torch.randn(2, 16, 32)
    step = capture(model, (x,))
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    attention = [n for n in step.graph.graph.nodes if n.target is flash]
    assert attention and all(torch.Tag.nondeterministic_seeded in n.target.tags for n in attention)
    candidates = recompute_candidates(step.graph, storage_table(step))
    assert {n.name for n in attention} <= {c.nodes[0] for c in candidates}
    # the kernel at dropout_p 0 leaves the generator where it was, so running it again changes nothing
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    state = torch.get_rng_state()
    for node in attention:
        node.target(q, k, v, *node.args[3:], **node.kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    rewritten = apply_recompute(step.graph, step.backward_start, candidates)
    assert_runs_like_eager(rewritten, model, (x,), lambda out: out, seed=1)

    dropped = capture(_Attention(0.5), (x,))
    randoms = {n.name for n in dropped.graph.graph.nodes
               if torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())}
    assert randoms
    assert not randoms & {c.nodes[0] for c in recompute_candidates(dropped.graph, storage_table(dropped))}


def test_in_place_writes_are_not_recomputed():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x):
            y = torch.tanh(self.lin(x))
            z = y * 2
            z.add_(1.0)  # written in place after it was made: its maker cannot replay it
            return (z * z).sum()

    step = capture(InPlace(), (torch.randn(4, 16),))
    table = storage_table(step)
    makers = {c.nodes[0] for c in recompute_candidates(step.graph, table)}
    assert "mul" not in makers and "tanh" in makers


def test_costs_follow_the_roofline():
    workload = examples.mlp(width=128, depth=1, batch=256)
    step = capture(workload.build(), workload.inputs(), loss_fn=workload.loss_fn)
    nodes = {n.name: n for n in step.graph.graph.nodes}
    assert node_flops(nodes["addmm"]) == 2 * 256 * 128 * 128
    h100, cpu = get_device("h100"), get_device("cpu")
    assert node_seconds(nodes["addmm"], cpu) > node_seconds(nodes["addmm"], h100) > 0
    assert node_seconds(nodes["t"], h100) == 0.0  # a view moves nothing
    relu_bytes = 2 * 256 * 128 * 4
    assert node_seconds(nodes["relu"], h100) == relu_bytes / h100.memory_bandwidth


def test_a_lowering_that_fuses_prices_a_recomputed_pointwise_op_at_its_arithmetic_and_what_it_must_write():
    """Inductor recomputes a pointwise op inside the backward kernels that read it: no memory traffic, one
    operation per element, unless a matmul reads the result, which the recomputation then writes. A matmul is
    priced as before; without fusion so is every op."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 128))
    step = capture(model, (torch.randn(256, 128),), loss_fn=lambda out: (out.sigmoid() * 2).sum())
    nodes = {n.name: n for n in step.graph.graph.nodes}
    h100 = get_device("h100")
    arithmetic = 256 * 128 / h100.fp32_flops_per_s
    # the tanh is read by the second linear's matmul (forward and backward): recomputed, it is written again
    assert recompute_seconds(nodes["tanh"], h100, fused=True) == arithmetic + 256 * 128 * 4 / h100.memory_bandwidth
    # the sigmoid is read by a product and, in the backward, by sigmoid_backward: both pointwise
    sigmoid = nodes["sigmoid"]
    assert recompute_seconds(sigmoid, h100, fused=True) == arithmetic
    for node in (nodes["tanh"], sigmoid, nodes["addmm"]):
        assert recompute_seconds(node, h100) == node_seconds(node, h100)
    assert recompute_seconds(nodes["addmm"], h100, fused=True) == node_seconds(nodes["addmm"], h100)


@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_ops_with_several_results_are_recomputed_whole_and_exactly(name):
    workload = {"mlp": lambda: examples.mlp(width=128, depth=3, batch=64),
                "gpt2": lambda: examples.gpt2(layers=2, width=128, heads=4, seq=64, batch=2, vocab=512)}[name]()
    model, inputs = workload.build(), workload.inputs()
    step = capture(model, inputs, loss_fn=workload.loss_fn)
    candidates = recompute_candidates(step.graph, storage_table(step))
    assert any(c.nodes[0].startswith("native_layer_norm") for c in candidates)
    graph = apply_recompute(step.graph, step.backward_start, candidates)
    assert_runs_like_eager(graph, model, inputs, workload.loss_fn)


def _bn_net():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()) for _ in range(4)]
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10))


def _cross_entropy(labels):
    return lambda out: nn.functional.cross_entropy(out, labels)


@pytest.mark.parametrize("entry", ["compile", "backend"])
def test_batch_norm_is_recomputed_from_the_batch_and_its_running_statistics_update_once(entry):
    """At the smallest budget the batch norms' outputs are recomputed, their statistics are not updated again:
    loss, gradients and running statistics (num_batches_tracked too) equal eager's bitwise, over two steps."""
    import copy

    import memopt

    model = _bn_net()
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    loss_fn = _cross_entropy(labels)
    step = capture(model, (images,), loss_fn=loss_fn)
    batch_norms = {n.name for n in step.graph.graph.nodes if "batch_norm" in str(n.target) and "backward"
                   not in str(n.target)}
    assert batch_norms <= {c.nodes[0] for c in recompute_candidates(step.graph, storage_table(step))}
    with pytest.raises(memopt.BudgetInfeasibleError) as smallest:
        memopt.plan(model, (images,), loss_fn=loss_fn, optimizer=torch.optim.SGD, budget=1)
    twin = copy.deepcopy(model)
    if entry == "compile":
        compiled = memopt.compile(twin, budget=smallest.value.minimum, loss_fn=loss_fn, optimizer=torch.optim.SGD)
    else:
        def compiled_at(budget):
            torch._dynamo.reset()
            options = {"budget": budget, "optimizer": torch.optim.SGD, "cache": False}
            return torch.compile(LossOnly(twin, loss_fn), backend="memopt", options=options), options

        compiled, options = compiled_at(1)
        with pytest.raises(Exception) as raised:  # the backend's own smallest (AOTAutograd's joint graph)
            compiled(images)
        compiled, options = compiled_at(infeasible_behind(raised.value).minimum)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        loss = compiled(images)
        loss.backward()
        expected = loss_fn(model(images))
        expected.backward()
        assert torch.equal(loss.detach(), expected.detach())
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p.grad, q.grad), name
        for (name, b), c in zip(model.named_buffers(), twin.buffers()):
            assert torch.equal(b, c), name
    plan = compiled.plan if entry == "compile" else memopt.backend.plans(options)[-1]
    recomputed = {d.name for d in plan.decisions if d.action == "recompute"}
    assert any("batch_norm" in name for name in recomputed), recomputed


def test_a_result_read_from_storage_written_in_place_before_it_replays_and_one_written_after_does_not():
    """Dropout's result reads its noise after the noise's last in-place write (bernoulli_, div_): it replays from
    the kept noise. A result read from a storage that is written in place after it would not."""

    class Later(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64)

        def forward(self, x):
            y = self.lin(x) + 1.0
            before = y.exp()  # reads y before y is written in place
            y.mul_(2.0)
            return (before * y).sum()

    model, x = _dropout_mlp(), torch.randn(32, 64)
    step = capture(model, (x,), loss_fn=square_mean)
    table = storage_table(step)
    nodes = {n.name: n for n in step.graph.graph.nodes}
    noise = next(n for n in nodes.values() if n.target is torch.ops.aten.div_.Tensor
                 or n.target is torch.ops.aten.div_.Scalar)
    dropped = next(n for n in noise.users if n.target is torch.ops.aten.mul.Tensor)
    candidates = recompute_candidates(step.graph, table)
    assert dropped.name in {c.nodes[0] for c in candidates}
    rewritten = apply_recompute(step.graph, step.backward_start, candidates)
    assert_runs_like_eager(rewritten, model, (x,), square_mean, seed=3)

    later = capture(Later(), (torch.randn(8, 64),))
    exp = next(n.name for n in later.graph.graph.nodes if n.target is torch.ops.aten.exp.default)
    assert exp not in {c.nodes[0] for c in recompute_candidates(later.graph, storage_table(later))}


def _dropout_heavy(p: float):
    """Dropout after every block: its noise, the size of each activation, is most of what the backward reads."""
    torch.manual_seed(0)
    layers = [nn.Linear(64, 128)]
    for _ in range(3):
        layers += [nn.ReLU(), nn.Dropout(p), nn.Linear(128, 128)]
    return nn.Sequential(*layers, nn.Tanh(), nn.Dropout(p), nn.Linear(128, 1))


def _smallest_budget(model, inputs, loss_fn):
    import memopt

    with pytest.raises(memopt.BudgetInfeasibleError) as smallest:
        memopt.plan(model, inputs, loss_fn=loss_fn, optimizer=torch.optim.SGD, budget=1)
    return smallest.value.minimum


def test_dropouts_noise_is_a_candidate_that_replays_from_the_generator_state_saved_before_its_draw():
    from memopt.lower.rng_ops import RNG_STATE, RUN_WITH_RNG_STATE

    model, x = _dropout_mlp(), torch.randn(32, 64)
    step = capture(model, (x,), loss_fn=square_mean)
    candidates = recompute_candidates(step.graph, storage_table(step))
    noise = next(c for c in candidates if c.replays)
    targets = {n.name: n.target for n in step.graph.graph.nodes}
    assert [targets[n] for n in noise.nodes] == [torch.ops.aten.empty_like.default, torch.ops.aten.bernoulli_.float,
                                                 torch.ops.aten.div_.Scalar]
    assert noise.replays == (noise.nodes[1],)
    graph = apply_recompute(step.graph, step.backward_start, [noise])
    nodes = list(graph.graph.nodes)
    names = [n.name for n in nodes]
    state = next(n for n in nodes if n.target is RNG_STATE)
    assert names.index(state.name) == names.index(noise.nodes[1]) - 1  # saved right before the draw
    replay = next(n for n in nodes if n.target is RUN_WITH_RNG_STATE)
    assert replay.args[0] is state and names.index(replay.name) > names.index(step.backward_start)
    state_before = torch.get_rng_state()
    torch.manual_seed(5)
    assert_runs_like_eager(graph, model, (x,), square_mean, seed=3)
    torch.set_rng_state(state_before)


@pytest.mark.parametrize("backend", ["fx", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_at_its_smallest_budget_a_dropout_model_replays_its_noise_and_leaves_the_generator_as_eager(p, backend):
    """memopt.compile at the smallest budget: the noise is recomputed from the generator state saved in the
    forward, and the generator's state after each step equals eager's from the same seed (with Inductor, the
    first step compiles: that moves it no more than eager's step does). FX: loss and gradients bitwise eager's;
    Inductor (the replay is a fallback kernel, so the noise is eager's bit for bit): within its float tolerance."""
    import copy

    import memopt
    from memopt.passes.remat_plan import REPLAYED_RANDOM

    def same(actual, expected, name=""):
        if backend == "fx":
            assert torch.equal(actual, expected), name
        else:
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6, msg=name)

    model, x = _dropout_heavy(p), torch.randn(512, 64)
    twin = copy.deepcopy(model)
    budget = _smallest_budget(model, (x,), square_mean)
    compiled = memopt.compile(twin, budget=budget, loss_fn=square_mean, optimizer=torch.optim.SGD, backend=backend)
    torch.manual_seed(11)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        state = torch.get_rng_state()
        loss = compiled(x)
        loss.backward()
        after = torch.get_rng_state()
        torch.set_rng_state(state)
        expected = square_mean(model(x))
        expected.backward()
        assert torch.equal(torch.get_rng_state(), after)
        same(loss.detach(), expected.detach())
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            same(b.grad, a.grad, name)
    replayed = [d for d in compiled.plan.decisions if REPLAYED_RANDOM in d.reason]
    assert replayed and all(d.action == "replay" and d.name.startswith("empty_like") for d in replayed)
    if backend == "inductor":
        assert "run_with_rng_state" in compiled.executor.backward.source  # Inductor calls the replay as it is


def test_replaying_dropouts_noise_lowers_the_smallest_budget():
    """The noise no longer has to be kept: the smallest budget drops by more than the generator states cost."""
    from memopt.passes import recompute

    model, x = _dropout_heavy(0.1), torch.randn(512, 64)
    with_replay = _smallest_budget(model, (x,), square_mean)

    def without_random(*args, **kwargs):  # the candidates as they were: no random op replays
        return [c for c in candidates(*args, **kwargs) if not getattr(c, "replays", ())]

    candidates = recompute.recompute_candidates
    patched = pytest.MonkeyPatch()
    patched.setattr(recompute, "recompute_candidates", without_random)
    try:
        kept = _smallest_budget(model, (x,), square_mean)
    finally:
        patched.undo()
    noise_bytes = 512 * 128 * 4
    assert with_replay <= kept - noise_bytes, (with_replay, kept)

