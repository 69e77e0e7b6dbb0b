"""Tier (c): real models, predicted against measured; fake mode; bad input."""

import copy
import time

import pytest
import torch
from conftest import measured_step_peak, Scale, square_mean, steady_step
from torch import nn

import memopt
from memopt import examples

SMALL_WORKLOADS = {
    "gpt2": lambda: examples.gpt2(layers=2, width=128, heads=4, seq=128, batch=4, vocab=2048),
    "llama": lambda: examples.llama(layers=2, width=128, heads=4, seq=128, batch=4, vocab=2048),
    "mlp": lambda: examples.mlp(width=256, depth=8, batch=512),
}


@pytest.mark.parametrize("name", SMALL_WORKLOADS)
def test_predicted_peak_within_5_percent_of_measured(name):
    workload = SMALL_WORKLOADS[name]()
    model, inputs = workload.build(), workload.inputs()
    optimizer = workload.optimizer(model)
    plan = memopt.plan(model, inputs, loss_fn=workload.loss_fn, optimizer=optimizer)
    step = steady_step(model, inputs, optimizer, workload.loss_fn)
    measured = memopt.measure_peak(step)
    assert measured.unaccounted_bytes == 0
    actual = measured_step_peak(plan, measured)
    assert abs(plan.peak_bytes - actual) <= 0.05 * actual
    assert sum(plan.ledger.values()) == plan.peak_bytes
    for category in ("parameters", "optimizer_state", "activations"):
        assert plan.ledger[category] > 0
    # every step of the timeline adds up, not only the peak
    for i, total in enumerate(plan.timeline.totals):
        assert total == sum(values[i] for values in plan.timeline.by_category.values())


def test_fake_flag_gives_the_same_plan_as_a_real_trace():
    workload = SMALL_WORKLOADS["mlp"]()
    model, inputs = workload.build(), workload.inputs()
    real = memopt.plan(model, inputs, loss_fn=workload.loss_fn, optimizer=torch.optim.AdamW)
    fake = memopt.plan(model, inputs, loss_fn=workload.loss_fn, optimizer=torch.optim.AdamW, fake=True)
    assert fake.fake and not real.fake
    assert fake.peak_bytes == real.peak_bytes and fake.ledger == real.ledger


def test_meta_model_plans_from_shapes_without_memory():
    wide = examples.llama7b(seq=512)
    # two layers of the 7B shape: the full model is the test below
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=2, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
                         intermediate_size=11008, vocab_size=32000, max_position_embeddings=512, use_cache=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.loss_type = "ForCausalLM"
    measured = memopt.measure_peak(memopt.plan, model, wide.inputs(), optimizer=torch.optim.AdamW, device="cpu")
    assert measured.peak_bytes - measured.baseline_bytes < 2**20  # planning a multi-GiB step allocates ~nothing
    plan = memopt.plan(model, wide.inputs(), optimizer=torch.optim.AdamW, device="h100")
    assert plan.peak_bytes > 10 * 2**30 and plan.fake
    n = sum(p.numel() for p in model.parameters())
    # meta tensors are traced as fake CPU tensors: attention is the fused kernel a real step runs
    assert any(name.startswith("_scaled_dot_product_flash_attention_for_cpu") for name in plan.storages.node_names)
    static = plan.static_ledger
    assert static["parameters"] == 4 * n and static["gradients"] == 4 * n
    assert static["optimizer_state"] == 8 * n  # on CUDA the step counters stay on the host
    with pytest.raises(memopt.CaptureError, match="meta device"):
        memopt.plan(model, wide.inputs(), fake=False)


def test_llama7b_shape_plans_in_fake_mode():  # about 15 s and 0.6 GiB here
    workload = examples.llama7b()
    model = workload.build()
    started = time.perf_counter()
    plan = memopt.plan(model, workload.inputs(), optimizer=torch.optim.AdamW, device="h100")
    n = sum(p.numel() for p in model.parameters())
    assert 6.5e9 < n < 7e9
    assert plan.static_ledger["parameters"] + plan.static_ledger["gradients"] + plan.static_ledger[
        "optimizer_state"] == n * (4 + 4 + 8)
    assert plan.graph_nodes > 5000 and time.perf_counter() - started < 300


def _snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {k: id(v) for k, v in model.named_parameters()},
        model.training,
        [dict(m._forward_hooks) for m in model.modules()],
        [dict(m._forward_pre_hooks) for m in model.modules()],
        {k: p.requires_grad for k, p in model.named_parameters()},
        {k: p.grad for k, p in model.named_parameters()},
    )


def _assert_unchanged(model: nn.Module, before) -> None:
    after = _snapshot(model)
    state_before, state_after = before[0], after[0]
    assert state_before.keys() == state_after.keys()
    for key in state_before:
        assert torch.equal(state_before[key], state_after[key]), key
    assert before[1:] == after[1:]


class Fails(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        raise RuntimeError("boom in forward")


@pytest.fixture
def bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    model.register_forward_hook(lambda module, args, out: None)
    return model


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: memopt.plan(m, (torch.randn(4, 8),), loss_fn=square_mean, budget="lots"),
         memopt.BudgetParseError, "GiB"),
        (lambda m: memopt.plan(m, (torch.randn(4, 9),), loss_fn=square_mean),
         memopt.ModelForwardError, "example_inputs"),
        (lambda m: memopt.plan(m, (torch.randn(4, 8),)), memopt.LossNotScalarError, "loss_fn"),
        (lambda m: memopt.plan(m, (torch.randn(4, 8),), loss_fn=lambda out: out * 2),
         memopt.LossNotScalarError, r"shape \(4, 1\)"),
        (lambda m: memopt.plan(m, torch.randn(4, 8).tolist(), loss_fn=square_mean),
         memopt.ModelForwardError, "example_inputs"),
        (lambda m: memopt.plan(m, "not inputs", loss_fn=square_mean), memopt.CaptureError, "tuple"),
        (lambda m: memopt.plan(m, (torch.randn(4, 8),), loss_fn=square_mean, budget=1000),
         memopt.BudgetInfeasibleError, "raise the budget to at least"),
        (lambda m: memopt.plan(m, (torch.randn(4, 8),), loss_fn=square_mean, device="tpu"),
         memopt.MemoptError, "h100"),
    ],
    ids=["budget", "wrong-shape", "no-loss", "loss-not-scalar", "bad-input-type", "inputs-not-tuple",
         "budget-below-minimum", "unknown-device"],
)
def test_bad_input_is_a_typed_error_and_the_model_is_untouched(bn_model, call, error, message):
    bn_model.train()
    before = _snapshot(bn_model)
    with pytest.raises(error, match=message):
        call(bn_model)
    _assert_unchanged(bn_model, before)


def test_forward_that_raises_names_the_cause():
    model = Fails()
    before = _snapshot(model)
    with pytest.raises(memopt.ModelForwardError, match="boom in forward") as info:
        memopt.plan(model, (torch.randn(2, 4),), loss_fn=square_mean)
    assert isinstance(info.value.__cause__, RuntimeError)
    _assert_unchanged(model, before)


def test_planning_leaves_a_model_untouched_in_eval_mode_too(bn_model):
    bn_model.eval()
    before = _snapshot(bn_model)
    plan = memopt.plan(bn_model, (torch.randn(4, 8),), loss_fn=square_mean, optimizer=torch.optim.SGD)
    assert plan.static_ledger["buffers"] == 2 * 16 * 4 + 8  # running mean and var, num_batches_tracked
    _assert_unchanged(bn_model, before)


def test_budget_verdicts():
    model, x = Scale(1000), torch.randn(1000)
    roomy = memopt.plan(model, (x,), budget="1MB")
    assert roomy.fits and roomy.budget_bytes == 10**6
    with pytest.raises(memopt.BudgetInfeasibleError) as info:
        memopt.plan(model, (x,), budget=roomy.minimum.bytes - 1)
    # below the proven minimum: the error names it, and the smallest budget memopt can meet (headroom included)
    error = info.value
    assert error.proven_minimum == roomy.minimum.bytes <= error.minimum
    tight = memopt.plan(model, (x,), budget=error.minimum)  # the budget the error names works
    assert tight.fits and tight.peak_bytes <= error.minimum
    with pytest.raises(memopt.BudgetInfeasibleError) as info:
        memopt.plan(model, (x,), budget=error.minimum - 1)
    assert info.value.minimum == error.minimum


def test_model_with_unused_and_frozen_parameters():
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(8, 8)
            self.unused = nn.Linear(8, 8)
            self.frozen = nn.Linear(8, 8).requires_grad_(False)

        def forward(self, x):
            return self.used(self.frozen(x)).sum()

    model = Partial()
    plan = memopt.plan(model, (torch.randn(2, 8),), optimizer=torch.optim.AdamW)
    assert plan.static_ledger["gradients"] == 4 * (64 + 8)  # only the used, trainable layer
    assert plan.static_ledger["parameters"] == 3 * 4 * (64 + 8)
    x = copy.deepcopy(model)
    assert x is not model


class Autocast(nn.Module):
    """fp32 parameters, bf16 compute: the usual mixed-precision training."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(256, 512), nn.Linear(512, 256)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.l2(torch.relu(self.l1(x))).float()


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10),
    )
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(0))
    return model, (torch.randn(16, 3, 32, 32),), lambda out: nn.functional.cross_entropy(out, labels)


def _bf16():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).to(torch.bfloat16)
    return model, (torch.randn(64, 256, dtype=torch.bfloat16),), square_mean


def _autocast():
    torch.manual_seed(0)
    return Autocast(), (torch.randn(64, 256),), square_mean


@pytest.mark.parametrize("build", [_cnn, _bf16, _autocast], ids=["cnn-batchnorm", "bf16-params", "autocast-bf16"])
def test_other_models_predicted_within_1_percent(build):
    model, inputs, loss_fn = build()
    optimizer = torch.optim.AdamW(model.parameters())
    plan = memopt.plan(model, inputs, loss_fn=loss_fn, optimizer=optimizer)
    itemsize = next(model.parameters()).element_size()
    n = sum(p.numel() for p in model.parameters())
    assert plan.static_ledger["optimizer_state"] == 2 * itemsize * n + 4 * len(list(model.parameters()))
    measured = memopt.measure_peak(steady_step(model, inputs, optimizer, loss_fn))
    actual = measured_step_peak(plan, measured)
    assert abs(plan.peak_bytes - actual) <= 0.01 * actual


class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class WithCustomFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(256, 256)

    def forward(self, x):
        return Square.apply(self.lin(x)).sum()


def _custom_function():
    torch.manual_seed(0)
    return WithCustomFunction(), (torch.randn(64, 256),), None


def _user_checkpointed_gpt2():
    workload = examples.gpt2(layers=4, width=128, heads=4, seq=128, batch=8, vocab=2048)
    model = workload.build()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, workload.inputs(), None


@pytest.mark.parametrize("build", [_custom_function, _user_checkpointed_gpt2],
                         ids=["custom-function", "user-checkpoint"])
def test_custom_functions_and_the_users_own_checkpointing_are_planned(build):
    model, inputs, loss_fn = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = memopt.plan(model, inputs, loss_fn=loss_fn, optimizer=optimizer)
    measured = memopt.measure_peak(steady_step(model, inputs, optimizer, loss_fn))
    actual = measured_step_peak(plan, measured)
    assert abs(plan.peak_bytes - actual) <= 0.01 * actual
