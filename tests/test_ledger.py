"""Tier (a): tiny steps whose every byte is known, and the optimizer model against the real optimizers."""

import pytest
import torch
from conftest import measured_step_peak, Scale, square_mean, steady_step
from torch import nn

import memopt
from memopt.passes.storage import ACTIVATIONS, GRADIENTS, PARAMETERS, TEMPORARIES


def test_scale_step_byte_exact():
    model, x = Scale(1000), torch.randn(1000)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = memopt.plan(model, (x,), optimizer=optimizer)
    kinds = {s.node: s.category for s in plan.storages.storages}
    assert kinds["w"] == PARAMETERS and kinds["relu"] == ACTIVATIONS and kinds["mul"] == TEMPORARIES
    assert kinds["mul_1"] == GRADIENTS  # d(loss)/dw = mask * x, made in the backward
    # by hand, at threshold_backward: w and x (2 x 4000), the saved relu and its gradient
    # (2 x 4000), the loss and the backward's seed (2 x 4 bytes)
    assert plan.peak_bytes == 8000 + 8000 + 8
    assert plan.peak_node == "threshold_backward"
    assert plan.static_ledger == {"parameters": 4000, "buffers": 0, "gradients": 4000, "optimizer_state": 0}
    assert sum(plan.ledger.values()) == plan.peak_bytes
    step = steady_step(model, (x,), optimizer)
    measured = memopt.measure_peak(step)
    assert measured.unaccounted_bytes == 0
    assert measured_step_peak(plan, measured) == plan.peak_bytes


def test_static_ledger_by_hand(mlp_model):
    n_params = 64 * 128 + 128 + 128 * 32 + 32
    optimizer = torch.optim.AdamW(mlp_model.parameters())
    plan = memopt.plan(mlp_model, (torch.randn(16, 64),), loss_fn=square_mean, optimizer=optimizer)
    assert plan.static_ledger == {
        "parameters": 4 * n_params,
        "buffers": 0,
        "gradients": 4 * n_params,
        "optimizer_state": 8 * n_params + 4 * 4,  # exp_avg, exp_avg_sq; a 4-byte step counter per tensor
    }


def _state_bytes_after_warmup(model, x, optimizer) -> int:
    steady_step(model, (x,), optimizer, square_mean)
    return sum(t.untyped_storage().nbytes() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def _step_extra_bytes(model, x, optimizer) -> int:
    """What optimizer.step() allocates beyond what it starts with (gradients present)."""
    square_mean(model(x)).backward()
    measured = memopt.measure_peak(optimizer.step)
    return measured.peak_bytes - measured.baseline_bytes


OPTIMIZERS = [
    (torch.optim.AdamW, {}),
    (torch.optim.AdamW, {"foreach": True}),
    (torch.optim.AdamW, {"fused": True}),
    (torch.optim.Adam, {"weight_decay": 0.1}),
    (torch.optim.Adam, {"weight_decay": 0.1, "foreach": True}),
    (torch.optim.Adam, {"amsgrad": True, "maximize": True}),
    (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.01, "nesterov": True}),
    (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.01, "foreach": True}),
    (torch.optim.SGD, {}),
]


@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_optimizer_state_and_step_match_the_real_optimizer(mlp_model, cls, kwargs):
    x = torch.randn(16, 64)
    optimizer = cls(mlp_model.parameters(), lr=1e-3, **kwargs)
    plan = memopt.plan(mlp_model, (x,), loss_fn=square_mean, optimizer=optimizer)
    assert plan.optimizer.state_bytes == _state_bytes_after_warmup(mlp_model, x, optimizer)
    extra = _step_extra_bytes(mlp_model, x, optimizer)
    # the model covers every parameter-sized buffer; the step also makes up to three 0-dim scalars
    assert 0 <= extra - plan.optimizer.step_peak_extra <= 12


@pytest.mark.parametrize("kwargs", [{}, {"foreach": True}])
def test_adafactor_state_exact_and_step_estimated(mlp_model, kwargs):
    x = torch.randn(16, 64)
    optimizer = torch.optim.Adafactor(mlp_model.parameters(), **kwargs)
    plan = memopt.plan(mlp_model, (x,), loss_fn=square_mean, optimizer=optimizer)
    assert plan.optimizer.state_bytes == _state_bytes_after_warmup(mlp_model, x, optimizer)
    extra = _step_extra_bytes(mlp_model, x, optimizer)
    assert abs(extra - plan.optimizer.step_peak_extra) <= 0.1 * extra


def test_optimizer_given_as_class_or_pair_or_none(mlp_model):
    x = (torch.randn(16, 64),)
    as_instance = memopt.plan(mlp_model, x, loss_fn=square_mean, optimizer=torch.optim.Adam(mlp_model.parameters()))
    as_class = memopt.plan(mlp_model, x, loss_fn=square_mean, optimizer=torch.optim.Adam)
    as_pair = memopt.plan(mlp_model, x, loss_fn=square_mean, optimizer=(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}))
    none = memopt.plan(mlp_model, x, loss_fn=square_mean)
    assert as_instance.optimizer.state_bytes == as_class.optimizer.state_bytes
    assert as_pair.optimizer.state_bytes == as_instance.static_ledger["parameters"]
    assert none.optimizer.state_bytes == 0 and none.optimizer.phases == ()


def test_only_the_parameters_an_optimizer_holds_get_state(mlp_model):
    first = mlp_model[0]
    optimizer = torch.optim.AdamW(first.parameters())
    plan = memopt.plan(mlp_model, (torch.randn(16, 64),), loss_fn=square_mean, optimizer=optimizer)
    assert plan.optimizer.state_bytes == 2 * 4 * (64 * 128 + 128) + 2 * 4


def test_cuda_device_plans_foreach_and_host_step_counters(mlp_model):
    plan = memopt.plan(mlp_model, (torch.randn(16, 64),), loss_fn=square_mean, optimizer=torch.optim.AdamW,
                       device="h100")
    n_bytes = 4 * (64 * 128 + 128 + 128 * 32 + 32)
    assert plan.optimizer.implementation == "foreach"
    assert plan.optimizer.state_bytes == 2 * n_bytes  # step counters stay on the host
    assert plan.optimizer.step_peak_extra == n_bytes  # one list-wide sqrt


def test_unsupported_optimizer_is_a_typed_error(mlp_model):
    with pytest.raises(memopt.UnsupportedOptimizerError, match="supported: .*AdamW"):
        memopt.plan(mlp_model, (torch.randn(16, 64),), loss_fn=square_mean,
                    optimizer=torch.optim.RMSprop(mlp_model.parameters()))


def test_views_and_inplace_ops_add_no_bytes():
    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(256))

        def forward(self, x):
            y = x * self.w  # 1 KiB
            z = y.view(16, 16).t().reshape(256)  # t() + reshape of a non-contiguous view copies: 1 KiB
            z.add_(1.0)  # in place: nothing new
            return z.sum()

    plan = memopt.plan(Views(), (torch.randn(256),))
    made = {s.node: s.nbytes for s in plan.storages.storages if s.defined_at >= 0}
    forward_end = plan.storages.backward_start
    forward_made = [s for s in plan.storages.storages if 0 <= s.defined_at < forward_end]
    assert sorted(s.nbytes for s in forward_made) == [4, 1024, 1024]
    assert "add_" not in made and "view" not in made and "t" not in made
