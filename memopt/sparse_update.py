"""Sparse update: which parameter tensors a fine-tuning step trains under a byte budget.

Each trainable tensor is scored from a few calibration batches by the first-order loss decrease of one optimizer
step on that tensor alone (``PROXY``), and costs its gradient and its optimizer state. A multiple-choice
knapsack (``memopt.solvers.update``) picks the tensors of the largest summed score within a capacity; the step
that trains them is traced with the others frozen, so its backward computes no gradient for a frozen tensor and
nothing below the deepest tensor it trains, and is planned under the budget with recomputation like any step.
What that plan needs beyond the gradients and state is not additive per tensor (activations kept for weight
gradients, the backward's depth), so the capacity is found by planning: the first capacity is what the budget
leaves beside the parameters and buffers; a step that does not fit lowers it by its shortfall, one that fits
raises it halfway to the last that did not, for a few rounds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from memopt.capture.trace import CapturedStep, _loss_of, _split_inputs
from memopt.errors import BudgetInfeasibleError, MemoptError
from memopt.passes.optimizer_memory import (
    ParamInfo,
    normalize_optimizer,
    optimizer_groups,
    optimizer_memory,
)
from memopt.report.plan import MemoryPlan, TensorUpdate, UpdatePlan
from memopt.solvers.update import UpdateOption, UpdateProblem, solve_update

PROXY = ("first-order loss decrease of one optimizer step on the tensor alone: lr x |g|_2^2 for SGD, lr x |g|_1 "
         "for Adam and AdamW (their first step moves each element by lr), mean over the calibration batches")
_ROUNDS = 6  # plans made while the capacity is searched
_CLOSE = 0.02  # of the budget: a capacity search that brackets the best this closely stops


def check_update(update: str, calibration: Any) -> None:
    if update not in ("full", "sparse"):
        raise MemoptError(f"update must be 'full' (train every trainable parameter) or 'sparse', got {update!r}")
    if update == "sparse" and (not isinstance(calibration, (list, tuple)) or not calibration):
        raise MemoptError("update='sparse' scores each parameter tensor on calibration batches: pass "
                          "calibration=[batch, ...], a few batches of the fine-tuning data, each as the model takes "
                          "its inputs (a tuple of positional arguments or a dict of keyword arguments)")


def contribution_scores(model: nn.Module, calibration: Sequence[Any], *, loss_fn: Callable[[Any], torch.Tensor] | None,
                        optimizer: Any, names: Sequence[str]) -> dict[str, float]:
    """Each named tensor's score (``PROXY``) on the calibration batches, in training mode.

    The model is left as it was: gradients come from ``torch.autograd.grad`` (no ``.grad`` is written), buffers
    (batch norms' running statistics) are restored, and random ops draw from a forked generator."""
    named = dict(model.named_parameters())
    cls, settings = normalize_optimizer(optimizer)
    if isinstance(settings, dict):
        rates = {name: settings.get("lr", 1.0) for name in names}
    else:
        group_of = optimizer_groups(optimizer, named) or {}
        rates = {name: settings[group_of[name]]["lr"] if name in group_of else 0.0 for name in names}
    first_norm = cls is not None and cls.__name__ in ("Adam", "AdamW")
    tensors = [named[name] for name in names]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    totals = dict.fromkeys(names, 0.0)
    was_training = model.training
    try:
        model.train()
        with torch.random.fork_rng(devices=[]):
            for batch in calibration:
                args, kwargs = _split_inputs(batch)
                loss = _loss_of(model(*args, **kwargs), loss_fn)
                for name, grad in zip(names, torch.autograd.grad(loss, tensors, allow_unused=True)):
                    if grad is not None:
                        norm = grad.abs().sum() if first_norm else grad.pow(2).sum()
                        totals[name] += float(norm) * float(rates[name])
    finally:
        model.train(was_training)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return {name: total / len(calibration) for name, total in totals.items()}


def choose_update(model: nn.Module, calibration: Sequence[Any], *, loss_fn: Callable[[Any], torch.Tensor] | None,
                  optimizer: Any, budget_bytes: int, static_bytes: int, device_is_cuda: bool,
                  plan_for: Callable[[frozenset[str]], MemoryPlan],
                  backward_of: Callable[[frozenset[str] | None], int]) -> MemoryPlan:
    """The plan of the step that trains the tensors of the largest summed score whose step fits ``budget_bytes``.

    ``plan_for(trainable)`` plans the step training ``trainable`` under the budget (raising
    ``BudgetInfeasibleError`` when it cannot); ``backward_of(trainable)`` counts the nodes of the traced
    backward (None: training every trainable tensor); ``static_bytes`` is what the step holds whatever it trains
    (the parameters, buffers and inputs)."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    user_frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    scores = contribution_scores(model, calibration, loss_fn=loss_fn, optimizer=optimizer, names=names)
    named = dict(model.named_parameters())
    infos = [ParamInfo(name, tuple(named[name].shape), named[name].element_size()) for name in names]
    state = optimizer_memory(optimizer, infos, device_is_cuda=device_is_cuda,
                             groups_of=optimizer_groups(optimizer, named)).state_by_param
    costs = {p.name: p.nbytes + state.get(p.name, 0) for p in infos}
    options = tuple((UpdateOption("frozen", 0, 0.0), UpdateOption("whole", costs[name], scores[name]))
                    for name in names)
    capacity, fits, fails = budget_bytes - static_bytes, None, None
    best: tuple[MemoryPlan, Any, int] | None = None
    shortfall: BudgetInfeasibleError | None = None
    for rounds in range(1, _ROUNDS + 1):
        solution = solve_update(UpdateProblem(tuple(names), options, max(capacity, 0)))
        trained = frozenset(name for name, j in zip(names, solution.chosen) if j == 1)
        if trained:
            try:
                plan = plan_for(trained)
            except BudgetInfeasibleError as error:
                shortfall, fails = error, capacity
            else:
                if best is None or solution.score > best[1].score:
                    best = (plan, solution, capacity)
                fits = capacity
        else:
            fails = capacity
        if fails is None:  # every tensor fits
            break
        if fits is None:  # lower by the shortfall, at least a tenth
            over = shortfall.minimum - budget_bytes if shortfall is not None and trained else 0
            capacity = min(capacity - max(over, 1), capacity * 9 // 10)
        elif fails - fits <= _CLOSE * budget_bytes:
            break
        else:
            capacity = (fits + fails) // 2
        if capacity <= 0 and fits is None:
            break
    if best is None:
        cheapest = min(costs.values(), default=0)
        minimum = shortfall.minimum if shortfall is not None else budget_bytes + cheapest
        raise BudgetInfeasibleError(
            budget_bytes, minimum, "sparse update",
            f"no sparse update fits: the cheapest tensor alone adds {cheapest:,} bytes of gradient and optimizer "
            "state, and no step training the tensors chosen fits; raise the budget")
    plan, solution, capacity = best
    tensors = [TensorUpdate(name, "whole" if j == 1 else "frozen", scores[name], costs[name])
               for name, j in zip(names, solution.chosen)]
    tensors += [TensorUpdate(name, "frozen by the user", 0.0, 0) for name in user_frozen]
    trained = frozenset(t.name for t in tensors if t.option == "whole")
    report = UpdatePlan(PROXY, tuple(tensors), solution.score, solution.bound, solution.status, capacity, rounds,
                        backward_of(trained), backward_of(None))
    return _with_update(plan, report)


def _with_update(plan: MemoryPlan, report: UpdatePlan) -> MemoryPlan:
    return dataclasses.replace(plan, update=report)


def backward_nodes(step: CapturedStep) -> int:
    """Nodes of a captured step's backward."""
    nodes = [node.name for node in step.graph.graph.nodes]
    return len(nodes) - nodes.index(step.backward_start)

