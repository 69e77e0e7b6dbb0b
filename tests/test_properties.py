"""Tier (b): invariants on random models (hypothesis)."""

import torch
from conftest import measured_step_peak, square_mean, steady_step
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import memopt

LAYERS = ("linear", "relu", "gelu", "tanh", "layernorm", "residual")


@st.composite
def random_models(draw):
    width = draw(st.sampled_from([32, 64, 128]))
    kinds = draw(st.lists(st.sampled_from(LAYERS), min_size=1, max_size=8))
    batch = draw(st.sampled_from([16, 32, 64]))
    return kinds, width, batch


class RandomNet(nn.Module):
    def __init__(self, kinds, width):
        super().__init__()
        self.kinds = kinds
        self.layers = nn.ModuleList(
            nn.Linear(width, width) if k in ("linear", "residual") else nn.LayerNorm(width) if k == "layernorm"
            else nn.Identity()
            for k in kinds
        )
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        for kind, layer in zip(self.kinds, self.layers):
            if kind == "residual":
                x = x + torch.tanh(layer(x))
            elif kind in ("relu", "gelu", "tanh"):
                x = getattr(torch, kind)(x) if kind != "gelu" else nn.functional.gelu(x)
            else:
                x = layer(x)
        return self.head(x)


def _plan_and_step(kinds, width, batch, optimizer_cls):
    torch.manual_seed(0)
    model = RandomNet(kinds, width)
    x = torch.randn(batch, width)
    optimizer = optimizer_cls(model.parameters(), lr=1e-3)
    plan = memopt.plan(model, (x,), loss_fn=square_mean, optimizer=optimizer)
    return plan, steady_step(model, (x,), optimizer, square_mean)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_models(), st.sampled_from([torch.optim.SGD, torch.optim.AdamW]))
def test_plan_invariants(model_spec, optimizer_cls):
    plan, _ = _plan_and_step(*model_spec, optimizer_cls)
    table, live, timeline = plan.storages, plan.live, plan.timeline
    # every step's categories add up to its total; the peak is the largest total
    for i, total in enumerate(timeline.totals):
        assert total == sum(v[i] for v in timeline.by_category.values())
        assert all(v[i] >= 0 for v in timeline.by_category.values())
    assert plan.peak_bytes == max(timeline.totals) == sum(plan.ledger.values())
    # whatever an op reads or makes is live while it runs
    for pos, node in enumerate(live.order):
        for key in table.touched[node]:
            assert live.start[key] <= pos <= live.end[key]
    # the proven minimum is below the eager peak and above what a step must always hold
    static = plan.static_ledger
    assert sum(static.values()) <= plan.minimum.bytes <= plan.peak_bytes


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_models(), st.sampled_from([torch.optim.SGD, torch.optim.AdamW]))
def test_prediction_matches_measurement(model_spec, optimizer_cls):
    plan, step = _plan_and_step(*model_spec, optimizer_cls)
    measured = memopt.measure_peak(step)
    assert measured.unaccounted_bytes == 0
    # within 5%, or 128 bytes: a few 0-dim scalars and small kernel workspaces
    actual = measured_step_peak(plan, measured)
    assert abs(plan.peak_bytes - actual) <= max(0.05 * actual, 128)
