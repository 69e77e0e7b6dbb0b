"""Sparse update: which parameter tensors a fine-tuning step trains under a byte budget.

Each trainable tensor is trained whole, on its first half, quarter or eighth of rows (a weight's first output
channels: ``memopt.passes.row_slices``, which computes only those rows' gradient), or not at all. Each option is
scored from a few calibration batches by the first-order loss decrease of one optimizer step on that tensor (or
those rows) alone (``PROXY``), and costs its gradient and its optimizer state. The step that trains a set
of tensors is traced with the others frozen, so its backward computes no gradient for a frozen tensor and runs
no deeper than the deepest layer it trains, and is planned under the budget with recomputation like any step.
What such a step needs beside the gradients and state is set mostly by that depth, so it is measured per depth
(the smallest budget of training one cheap tensor of the layer), and for each depth a multiple-choice knapsack
(``memopt.solvers.update``) picks the tensors at or above it of the largest summed score within what the budget
leaves. The best choice over all depths is planned; one that does not fit lowers its depth's capacity by the
shortfall and the choice is made again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn

from memopt.capture.trace import CapturedStep, _loss_of, _split_inputs
from memopt.errors import BudgetInfeasibleError, MemoptError
from memopt.passes.optimizer_memory import (
    ParamInfo,
    normalize_optimizer,
    optimizer_groups,
    optimizer_memory,
)
from memopt.passes.row_slices import rows_name, split_rows
from memopt.report.plan import MemoryPlan, TensorUpdate, UpdatePlan
from memopt.solvers.update import (
    UpdateOption,
    UpdateProblem,
    UpdateSolution,
    solve_update,
)

PROXY = ("first-order loss decrease of one optimizer step on the tensor alone: lr x |g|_2^2 for SGD, lr x |g|_1 "
         "for Adam and AdamW (their first step moves each element by lr), mean over the calibration batches")
_ROUNDS = 6  # choices planned until one fits
_DEPTHS = 8  # layers at which the backward's own need is measured (a plan each)
_FROZEN = UpdateOption("frozen", 0, 0.0)
_ROW_PARTS = (2, 4, 8)  # a weight may train its first half, quarter or eighth of rows


def check_update(update: str, calibration: Any) -> None:
    if update not in ("full", "sparse"):
        raise MemoptError(f"update must be 'full' (train every trainable parameter) or 'sparse', got {update!r}")
    if update == "sparse" and (not isinstance(calibration, (list, tuple)) or not calibration):
        raise MemoptError("update='sparse' scores each parameter tensor on calibration batches: pass "
                          "calibration=[batch, ...], a few batches of the fine-tuning data, each as the model takes "
                          "its inputs (a tuple of positional arguments or a dict of keyword arguments)")


def contribution_scores(model: nn.Module, calibration: Sequence[Any], *, loss_fn: Callable[[Any], torch.Tensor] | None,
                        optimizer: Any, names: Sequence[str]) -> dict[str, float]:
    """Each named tensor's score (``PROXY``) on the calibration batches, in training mode; a name may be a row
    slice (``rows_name``), scored on those rows of its tensor's gradient.

    The model is left as it was: gradients come from ``torch.autograd.grad`` (no ``.grad`` is written), buffers
    (batch norms' running statistics) are restored, and random ops draw from a forked generator."""
    named = dict(model.named_parameters())
    tensor_names, _ = split_rows(set(names))
    tensor_names = sorted(tensor_names)
    rows = {name: split_rows({name}) for name in names}
    cls, settings = normalize_optimizer(optimizer)
    if isinstance(settings, dict):
        rates = {name: settings.get("lr", 1.0) for name in tensor_names}
    else:
        group_of = optimizer_groups(optimizer, named) or {}
        rates = {name: settings[group_of[name]]["lr"] if name in group_of else 0.0 for name in tensor_names}
    first_norm = cls is not None and cls.__name__ in ("Adam", "AdamW")
    tensors = [named[name] for name in tensor_names]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    totals = dict.fromkeys(names, 0.0)
    was_training = model.training
    try:
        model.train()
        with torch.random.fork_rng(devices=[]):
            for batch in calibration:
                args, kwargs = _split_inputs(batch)
                loss = _loss_of(model(*args, **kwargs), loss_fn)
                grads = dict(zip(tensor_names, torch.autograd.grad(loss, tensors, allow_unused=True)))
                for name in names:
                    (tensor_name,), cut = rows[name]
                    grad = grads[tensor_name]
                    if grad is not None:
                        grad = grad[:cut[tensor_name]] if cut else grad
                        norm = grad.abs().sum() if first_norm else grad.pow(2).sum()
                        totals[name] += float(norm) * float(rates[tensor_name])
    finally:
        model.train(was_training)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return {name: total / len(calibration) for name, total in totals.items()}


def row_options(shape: Sequence[int]) -> list[int]:
    """The row counts a tensor of ``shape`` may be trained on: 1/2, 1/4 and 1/8 of its rows (a weight's first
    output channels), for a tensor of two or more dimensions."""
    if len(shape) < 2:
        return []
    return sorted({shape[0] // part for part in _ROW_PARTS if 0 < shape[0] // part < shape[0]}, reverse=True)


def choose_update(model: nn.Module, calibration: Sequence[Any], *, loss_fn: Callable[[Any], torch.Tensor] | None,
                  optimizer: Any, budget_bytes: int, device_is_cuda: bool, uses: dict[str, tuple[int, int]],
                  minimum_for: Callable[[frozenset[str]], int], plan_for: Callable[[frozenset[str]], MemoryPlan],
                  backward_of: Callable[[frozenset[str] | None], int], slices: bool = True) -> MemoryPlan:
    """The plan of the step that trains the tensors of the largest summed score whose step fits ``budget_bytes``.

    ``uses`` gives each parameter's first use in the forward and the bytes of what that use reads beside it
    (``forward_uses``); ``minimum_for(trainable)`` is the smallest budget of the step training ``trainable``
    (tensor names, and row slices named by ``rows_name``); ``plan_for(trainable)`` plans it under the budget
    (raising ``BudgetInfeasibleError`` when it cannot); ``backward_of(trainable)`` counts the nodes of its traced
    backward (None: training every trainable tensor). ``slices=False`` offers whole tensors only."""
    # (a parameter the forward never reads has no gradient to train: it stays as it is)
    names = [name for name, p in model.named_parameters() if p.requires_grad and name in uses]
    user_frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    unread = [name for name, p in model.named_parameters() if p.requires_grad and name not in uses]
    named = dict(model.named_parameters())
    # per tensor, what training it adds: the whole of it, then its row slices (largest first)
    variants = {name: [(name, tuple(named[name].shape))] + ([
        (rows_name(name, k), (k, *named[name].shape[1:])) for k in row_options(named[name].shape)] if slices else [])
        for name in names}
    keys = [key for name in names for key, _ in variants[name]]
    scores = contribution_scores(model, calibration, loss_fn=loss_fn, optimizer=optimizer, names=keys)
    infos = [ParamInfo(key, shape, named[name].element_size()) for name in names for key, shape in variants[name]]
    groups = optimizer_groups(optimizer, named)
    state = optimizer_memory(optimizer, infos, device_is_cuda=device_is_cuda,
                             groups_of=None if groups is None else {
                                 key: groups[name] for name in names if name in groups for key, _ in variants[name]}
                             ).state_by_param
    # a tensor's gradient and optimizer state, and for a weight the activation its gradient reads (kept, or
    # recomputed, for the backward; a bias's gradient reads none); a row slice's gradient reads all of it
    costs = {p.name: p.nbytes + state.get(p.name, 0) for p in infos}
    for name in names:
        for key, _ in variants[name]:
            costs[key] += uses[name][1] if named[name].dim() > 1 else 0
    depth = {name: uses[name][0] for name in names}
    # the layers (a tensor's module), the one the forward reaches last first: training down to layer i runs
    # the backward down to it, whatever is trained above
    layer_of = {name: name.rsplit(".", 1)[0] for name in names}
    layers = sorted(set(layer_of.values()), key=lambda layer: -min(depth[n] for n in names if layer_of[n] == layer))
    index_of = {layer: i for i, layer in enumerate(layers)}
    # what a step training down to layer i needs beside the gradients and state of what it trains: the
    # smallest budget of training the layer's cheapest tensor alone, less that tensor's own bytes; measured at a
    # few layers, and taken from the next one measured below for the layers between
    probed: dict[int, int] = {}
    for i in _spread(len(layers), _DEPTHS):
        cheapest = min((n for n in names if layer_of[n] == layers[i]), key=costs.__getitem__)
        probed[i] = minimum_for(frozenset({cheapest})) - costs[cheapest]
    base = [probed[min(j for j in probed if j >= i)] for i in range(len(layers))]

    def option(key: str) -> UpdateOption:
        return UpdateOption(key, costs[key], scores[key])

    def solved(i: int, capacity: int) -> UpdateSolution:
        options = tuple((_FROZEN, *(option(key) for key, _ in variants[n])) if index_of[layer_of[n]] <= i
                        else (_FROZEN,) for n in names)
        return solve_update(UpdateProblem(tuple(names), options, max(capacity, 0)))

    capacity = {i: budget_bytes - base[i] for i in range(len(layers)) if budget_bytes > base[i]}
    solutions = {i: solved(i, room) for i, room in capacity.items()}
    rounds = 0
    while solutions and rounds < _ROUNDS:
        i = max(solutions, key=lambda k: (solutions[k].score, -k))  # the best score, the shallowest backward
        solution = solutions.pop(i)
        taken = {name: variants[name][j - 1][0] for name, j in zip(names, solution.chosen) if j > 0}
        if not taken:
            continue
        rounds += 1
        trained = frozenset(taken.values())
        try:
            plan = plan_for(trained)
        except BudgetInfeasibleError as error:  # what the estimate missed: that much less for this depth
            capacity[i] -= max(error.minimum - budget_bytes, 1)
            if capacity[i] > 0:
                solutions[i] = solved(i, capacity[i])
            continue
        tensors = [_chosen(name, taken.get(name), scores, costs) for name in names]
        tensors += [TensorUpdate(name, "frozen by the user", 0.0, 0) for name in user_frozen]
        tensors += [TensorUpdate(name, "frozen", 0.0, 0) for name in unread]
        # no choice within any depth's capacity scores more
        bound = max([solution.bound, *(other.bound for other in solutions.values())])
        report = UpdatePlan(PROXY, tuple(tensors), solution.score, bound, solution.status, capacity[i],
                            rounds, backward_of(trained), backward_of(None))
        return dataclasses.replace(plan, update=report)
    smallest = min(base[i] + min(costs[n] for n in names if layer_of[n] == layers[i]) for i in probed)
    raise BudgetInfeasibleError(
        budget_bytes, max(smallest, budget_bytes + 1), "sparse update",
        "no sparse update fits: training even the cheapest tensor of the last layer needs more (its gradient, "
        "its optimizer state and the backward down to it)")


def _chosen(name: str, key: str | None, scores: dict[str, float], costs: dict[str, int]) -> TensorUpdate:
    """What the update does with tensor ``name``, trained as ``key`` (itself, or a row slice of it; None: not)."""
    if key is None:
        return TensorUpdate(name, "frozen", scores[name], costs[name])
    _, rows = split_rows({key})
    return TensorUpdate(name, "rows" if rows else "whole", scores[key], costs[key], rows.get(name, 0))


def _spread(count: int, most: int) -> list[int]:
    """Up to ``most`` indices of ``range(count)`` spread evenly, the first and the last among them."""
    if count <= most:
        return list(range(count))
    return sorted({round(k * (count - 1) / (most - 1)) for k in range(most)})


def backward_nodes(step: CapturedStep) -> int:
    """Nodes of a captured step's backward."""
    nodes = [node.name for node in step.graph.graph.nodes]
    return len(nodes) - nodes.index(step.backward_start)


def forward_uses(step: CapturedStep) -> dict[str, tuple[int, int]]:
    """Per parameter the step reads: its first use (a position among the graph's nodes), and the bytes of the
    activations that use reads beside it, which its gradient needs (a linear layer's input; through views and
    casts of the parameter, to the first op that reads something else as well)."""
    nodes = list(step.graph.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    by_name = {node.name: node for node in nodes}
    parameters = {by_name[p.node] for p in step.placeholders if p.role == "parameter"}
    uses = {}
    for p in step.placeholders:
        if p.role != "parameter" or not by_name[p.node].users:
            continue
        node, seen = by_name[p.node], []
        while node.users:
            user = min(node.users, key=position.__getitem__)
            seen.append(user)
            if len(user.all_input_nodes) > 1:
                break
            node = user
        read = sum(_nbytes(arg) for arg in seen[-1].all_input_nodes if not _from_parameters(arg, parameters))
        uses[p.name] = (position[seen[0]], read)
    return uses


def _from_parameters(node: fx.Node, parameters: set[fx.Node]) -> bool:
    """Whether ``node`` is a parameter, or made from one alone through ops of one input (a view, a cast)."""
    while node not in parameters and len(node.all_input_nodes) == 1:
        node = node.all_input_nodes[0]
    return node in parameters


def _nbytes(node: fx.Node) -> int:
    value = node.meta.get("val")
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0
