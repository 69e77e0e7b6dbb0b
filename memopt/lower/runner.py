"""Run a planned joint graph as a training step that autograd drives: the FX path.

The joint graph (forward, loss, backward) is cut at the backward's seed, the
``ones_like`` of the loss. The forward part returns the loss and what the
backward reads (the saved set, after recomputation); the backward part takes
those and the incoming gradient of the loss (in place of the seed) and returns
the parameters' gradients. An ``autograd.Function`` runs the two, so
``loss.backward()`` and optimizers work as they do in eager. Each part frees a
value right after its last reader, as eager's autograd does, so the measured
peak is the planned one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import fx
from torch.fx.graph import _BoxedCodeGen

from memopt.capture import CapturedStep
from memopt.passes.step_in_backward import step_parameter


class _Program:
    """Straight-line code over some nodes of a graph, generated as Python by FX.

    The code takes its inputs boxed (one list, which it clears) and drops each
    value right after its last reader, so nothing outside holds what the
    program frees; a result nobody reads is dropped at once, as eager does.
    """

    def __init__(self, root: fx.GraphModule, nodes: list[fx.Node], inputs: list[fx.Node],
                 outputs: list[fx.Node]) -> None:
        self.nodes, self.inputs, self.outputs = nodes, inputs, outputs
        graph = fx.Graph()
        copies: dict[fx.Node, fx.Node] = {}
        for node in inputs:
            copies[node] = graph.placeholder(node.name)
            copies[node].meta = dict(node.meta)
        for node in nodes:
            copies[node] = graph.node_copy(node, copies.__getitem__)
        graph.output(tuple(copies[node] for node in outputs))
        graph.set_codegen(_BoxedCodeGen())
        self.module = fx.GraphModule(root, graph)

    def __call__(self, values: list[Any]) -> list[Any]:
        """Run on ``values`` (the inputs in order; the list is emptied); returns the outputs in order."""
        return list(self.module(values))


class StepRunner:
    """The planned step of ``step`` as two programs, forward (to the loss) and backward (to the gradients)."""

    def __init__(self, step: CapturedStep) -> None:
        graph = step.graph.graph
        nodes = list(graph.nodes)
        by_name = {node.name: node for node in nodes}
        self.placeholders = [node for node in nodes if node.op == "placeholder"]
        seed = by_name[step.backward_start]
        if seed.target is not torch.ops.aten.ones_like.default:
            raise ValueError(f"the backward of this graph does not start at the loss's seed ({seed.format_node()})")
        cut = nodes.index(seed)
        forward = [node for node in nodes[:cut] if node.op != "placeholder"]
        backward = [node for node in nodes[cut + 1 :] if node.op != "output"]
        loss = by_name[step.loss_node]
        in_backward = set(backward)
        # what the backward reads from before the cut (parameters and inputs included): the saved set
        self.saved = [n for n in [*self.placeholders, *forward]
                      if n is not loss and any(u in in_backward for u in n.users)]
        self.saved_forward = [n for n in self.saved if n.op != "placeholder"]
        self.saved_inputs = [n for n in self.saved if n.op == "placeholder"]
        self.loss = loss
        self.seed = seed
        grad_nodes = list(dict.fromkeys(by_name[node] for node in step.gradients.values()))
        self.grad_nodes = grad_nodes
        grad_of = {p.node: step.gradients.get(p.name) for p in step.placeholders if p.role == "parameter"}
        self.placeholder_grads = [by_name.get(grad_of.get(node.name) or "") for node in self.placeholders]
        self.loss_read_by_backward = any(u in in_backward for u in loss.users)
        # what the backward program takes: the loss's gradient, the saved set, and the loss if it reads it
        self.backward_inputs = [seed, *self.saved, *([loss] if self.loss_read_by_backward else [])]
        self.forward = _Program(step.graph, forward, self.placeholders, [loss, *self.saved_forward])
        self.backward = _Program(step.graph, backward, self.backward_inputs, grad_nodes)
        self.parameter_of = {p.node: p.name for p in step.placeholders if p.role == "parameter"}
        self.stepped = tuple(step.stepped)  # parameters the backward updates (unbound until bind_steps)

    def bind_steps(self, update_of: Callable[[str], Callable[[Any, Any], None]]) -> None:
        """Each in-backward update (a ``step_parameter`` node) calls ``update_of(parameter name)`` with the
        parameter and its gradient."""
        graph = self.backward.module.graph
        for node in graph.nodes:
            if node.target is step_parameter:
                node.target = update_of(self.parameter_of[node.args[0].name])
        self.backward.module.recompile()

    def run_forward(self, values: list[Any]) -> list[Any]:
        """The loss and the saved set, from the placeholders' ``values`` (the list is emptied)."""
        return self.forward(values)

    def run_backward(self, values: list[Any]) -> list[Any]:
        """The gradients (``grad_nodes`` order) from ``values`` in ``backward_inputs`` order (emptied)."""
        return self.backward(values)


class Executor(Protocol):
    """Runs a StepRunner's two programs: the runner itself (FX), or their compiled code (Inductor)."""

    def run_forward(self, values: list[Any]) -> list[Any]: ...

    def run_backward(self, values: list[Any]) -> list[Any]: ...


class _TrainingStep(torch.autograd.Function):
    """Forward program in ``forward``, backward program in ``backward``; the gradients go to the parameters."""

    @staticmethod
    def forward(ctx: Any, runner: StepRunner, executor: Executor, grad_mask: tuple[bool, ...],
                *values: torch.Tensor) -> torch.Tensor:
        wanted = set(runner.saved_inputs)
        inputs = {node: value for node, value in zip(runner.placeholders, values) if node in wanted}
        loss, *saved = executor.run_forward(list(values))
        ctx.runner, ctx.executor, ctx.grad_mask = runner, executor, grad_mask
        ctx.stash = {**inputs, **dict(zip(runner.saved_forward, saved))}
        if runner.loss_read_by_backward:
            ctx.stash[runner.loss] = loss
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        runner: StepRunner = ctx.runner
        stash, ctx.stash = ctx.stash, None
        # the backward program alone holds the saved set, and frees it as it goes
        values = [grad_loss, *(stash.pop(node) for node in runner.backward_inputs[1:])]
        del stash, grad_loss
        grads = dict(zip(runner.grad_nodes, ctx.executor.run_backward(values)))
        by_placeholder = [grads.get(node) for node in runner.placeholder_grads]
        return (None, None, None, *[g if want else None for g, want in zip(by_placeholder, ctx.grad_mask)])


def run_step(runner: StepRunner, values: list[torch.Tensor], executor: Executor | None = None) -> torch.Tensor:
    """The loss of the planned step on ``values`` (parameters, buffers, inputs, in placeholder order).

    ``executor`` runs the programs: the runner's FX code by default, or Inductor's (``InductorStep``).
    """
    mask = tuple(isinstance(v, torch.Tensor) and v.requires_grad for v in values)
    return _TrainingStep.apply(runner, executor or runner, mask, *values)
