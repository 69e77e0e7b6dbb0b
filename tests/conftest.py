import os

# memopt's Triton kernels run on CPU through Triton's interpreter, which Triton reads when it is first imported
os.environ.setdefault("TRITON_INTERPRET", "1")
if "PYTEST_XDIST_WORKER" in os.environ:
    # one test per core (pytest -n 2): each worker's torch, and the subprocesses its tests start, on one thread,
    # so that OpenMP threads of two workers do not contend for the same cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from torch import nn


class Scale(nn.Module):
    """loss = relu(x * w).sum(): small enough to know every byte of its step."""

    def __init__(self, n: int = 1000) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).relu().sum()


def square_mean(output: torch.Tensor) -> torch.Tensor:
    return output.square().mean()


class LossOnly(nn.Module):
    """``model`` returning only its loss (``loss_fn(output)``, or the output's ``.loss``): how a careful user
    compiles with torch.compile, so that no output but the loss gets a gradient."""

    def __init__(self, model: nn.Module, loss_fn=None) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *args, **kwargs):
        output = self.model(*args, **kwargs)
        return self.loss_fn(output) if self.loss_fn else output.loss


def steady_step(model, inputs, optimizer, loss_fn=None):
    """A training step function, warmed up so that optimizer state exists, with gradients set to None.

    Gradients are cleared outside the measured call: freeing blocks allocated
    before the profiler started emits no event."""

    def forward_loss():
        # the output is dropped once the loss is taken, as `loss = model(**batch).loss` does; a step
        # that holds it (logits, say) through the backward holds more than the plan
        output = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
        return loss_fn(output) if loss_fn else (output if isinstance(output, torch.Tensor) else output.loss)

    def step():
        loss = forward_loss()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return loss.detach()

    for _ in range(2):
        step()
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
    return step


@pytest.fixture
def mlp_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))


def measured_step_peak(plan, measured):
    """The measured peak restated from the plan's own entry state.

    measure_peak counts every live tensor of the process at entry (other tests'
    leftovers too); what the step adds on top of that is what the plan predicts
    on top of its entry bytes."""
    return plan.entry_bytes + measured.peak_bytes - measured.baseline_bytes


def assert_runs_like_eager(graph, model, inputs, loss_fn=None, placements=None, arena_bytes=0, seed=0):
    """Run the captured ``graph`` (in an arena when placed) and eager from the same seed: loss and
    gradients must be bitwise equal."""
    from memopt.lower.arena import run_in_arena

    args, kwargs = (tuple(inputs), {}) if isinstance(inputs, (tuple, list)) else ((), inputs)
    torch.manual_seed(seed)
    loss, grads = run_in_arena(graph, placements or {}, arena_bytes, list(model.parameters()),
                               list(model.buffers()), (args, kwargs))
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    output = model(*args, **kwargs)
    expected = loss_fn(output) if loss_fn else (output if isinstance(output, torch.Tensor) else output.loss)
    expected.backward()
    assert torch.equal(loss, expected.detach())
    for grad, param in zip(grads, [p for p in model.parameters() if p.requires_grad]):
        assert torch.equal(grad, param.grad)


def infeasible_behind(error):
    """The BudgetInfeasibleError behind what Dynamo raised (it wraps a backend's errors)."""
    import memopt

    while error is not None and not isinstance(error, memopt.BudgetInfeasibleError):
        error = error.__cause__ or error.__context__
    assert error is not None, "no BudgetInfeasibleError behind the error"
    return error


def assert_steps_in_backward_like_eager(compiled, model, optimizer, eager, eager_optimizer, inputs, loss_fn,
                                        steps: int = 3) -> None:
    """``compiled`` (updating ``model`` inside its backward) trains like ``eager`` with its own optimizer step:
    bitwise the same loss and parameters after each backward, no gradient left for the user's
    ``optimizer.step()``, which then changes nothing."""
    for _ in range(steps):
        expected = loss_fn(eager(*inputs))
        expected.backward()
        eager_optimizer.step()
        eager_optimizer.zero_grad()
        loss = compiled(*inputs)
        loss.backward()
        assert torch.equal(loss.detach(), expected.detach())
        # the backward updated every parameter and left no gradient: the user's step has nothing to apply
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), eager.parameters()))
        optimizer.step()
        optimizer.zero_grad()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), eager.parameters()))
