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

from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from memopt.capture import CapturedStep


class _Program:
    """Straight-line code over a list of FX nodes: run them, drop each value after its last reader."""

    def __init__(self, nodes: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]) -> None:
        self.nodes, self.inputs, self.outputs = nodes, inputs, outputs
        last_use: dict[fx.Node, int] = {}
        for i, node in enumerate(nodes):
            for arg in node.all_input_nodes:
                last_use[arg] = i
        kept = set(outputs)
        self.free_after: list[list[fx.Node]] = [[] for _ in nodes]
        for value, i in last_use.items():
            if value not in kept:
                self.free_after[i].append(value)
        # a value nobody reads is dropped at once (eager frees an unused result right away)
        for i, node in enumerate(nodes):
            if node not in last_use and node not in kept:
                self.free_after[i].append(node)

    def run(self, env: dict[fx.Node, Any]) -> list[Any]:
        """Run with ``env`` holding the inputs; ``env`` is emptied of everything but what was returned."""
        for node, dead in zip(self.nodes, self.free_after):
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
            env[node] = node.target(*args, **kwargs)
            for value in dead:
                env.pop(value, None)
        return [env.pop(node) for node in self.outputs]


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
        in_forward = set(self.placeholders) | set(forward)
        # what the backward reads from before the cut (parameters and inputs included): the saved set
        self.saved = [n for n in in_forward if n is not loss and any(u in backward for u in n.users)]
        self.saved_forward = [n for n in self.saved if n.op != "placeholder"]
        self.saved_inputs = [n for n in self.saved if n.op == "placeholder"]
        self.loss = loss
        self.seed = seed
        self.gradients = {name: by_name[node] for name, node in step.gradients.items()}
        grad_nodes = list(dict.fromkeys(self.gradients.values()))
        self.forward = _Program(forward, self.placeholders, [loss, *self.saved_forward])
        self.backward = _Program(backward, [seed, *self.saved], grad_nodes)
        self.grad_nodes = grad_nodes
        grad_of = {p.node: step.gradients.get(p.name) for p in step.placeholders if p.role == "parameter"}
        self.placeholder_grads = [by_name.get(grad_of.get(node.name) or "") for node in self.placeholders]
        self.loss_read_by_backward = any(u in backward for u in loss.users if u is not seed)

    @property
    def saved_bytes(self) -> int:
        """Bytes of the saved set as the fake values say (views of one storage counted once)."""
        seen: dict[int, int] = {}
        for node in self.saved_forward:
            for tensor in pytree.tree_leaves(node.meta.get("val")):
                if isinstance(tensor, torch.Tensor):
                    seen[id(tensor.untyped_storage())] = tensor.untyped_storage().nbytes()
        return sum(seen.values())


class _TrainingStep(torch.autograd.Function):
    """Forward part in ``forward``, backward part in ``backward``; the gradients go to the parameters."""

    @staticmethod
    def forward(ctx: Any, runner: StepRunner, grad_mask: tuple[bool, ...], *values: torch.Tensor) -> torch.Tensor:
        env: dict[fx.Node, Any] = dict(zip(runner.placeholders, values))
        inputs = {node: env[node] for node in runner.saved_inputs}
        loss, *saved = runner.forward.run(env)
        env.clear()
        ctx.runner, ctx.grad_mask = runner, grad_mask
        ctx.stash = {**inputs, **dict(zip(runner.saved_forward, saved))}
        if runner.loss_read_by_backward:
            ctx.stash[runner.loss] = loss
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        runner: StepRunner = ctx.runner
        env, ctx.stash = ctx.stash, None  # the backward frees saved values as it goes: nobody else holds them
        env[runner.seed] = grad_loss
        grads = dict(zip(runner.grad_nodes, runner.backward.run(env)))
        by_placeholder = [grads.get(node) for node in runner.placeholder_grads]
        return (None, None, *[g if want else None for g, want in zip(by_placeholder, ctx.grad_mask)])


def run_step(runner: StepRunner, values: list[torch.Tensor]) -> torch.Tensor:
    """The loss of the planned step on ``values`` (parameters, buffers, inputs, in placeholder order)."""
    mask = tuple(isinstance(v, torch.Tensor) and v.requires_grad for v in values)
    return _TrainingStep.apply(runner, mask, *values)
