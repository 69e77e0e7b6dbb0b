"""``memopt.compile`` on a model FSDP2 shards: memopt plans one rank, FSDP2 runs the step.

FSDP2 stays the engine: it gathers, reshards and reduces around each unit as it would without memopt, and none
of its collectives change. What memopt changes is what the forward keeps for the backward, at the granularity
FSDP2 composes with: blocks run under ``torch.utils.checkpoint`` (non-reentrant, the generator state restored,
so dropout draws the same noise), chosen by the "checkpoint" solver on the rank's plan, each kept, checkpointed
whole, or checkpointed selectively (torch's selective activation checkpointing: the results of its matmuls and
attention that the backward reads are kept, the rest recomputed), the least costly choice whose predicted peak
fits the budget. A block recomputed in its backward runs no collective: FSDP2's pre-backward has gathered its
parameters already.

With ``step_in_backward=True`` the optimizer updates each shard as soon as FSDP2's reduce-scatter has made its
gradient (a post-accumulate-grad hook on the sharded parameter, which FSDP2 calls after the reduce-scatter), one
parameter at a time with the optimizer's own code, and frees the gradient; ``optimizer.step()`` after the backward
then finds no gradient and does nothing (``memopt.lower.optimizer_step``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)
from torch.utils.flop_counter import flop_registry

from memopt.config import PlanConfig
from memopt.device import DeviceSpec
from memopt.errors import MemoptError, MemoptWarning
from memopt.lower.optimizer_step import InBackwardSteps
from memopt.report.plan import MemoryPlan


class ShardedModule(nn.Module):
    """A model wrapped with ``fully_shard`` whose chosen blocks run under ``torch.utils.checkpoint``; ``.plan`` is
    the rank's plan for the input shapes of the first training call (planned again when they change)."""

    def __init__(self, model: nn.Module, *, budget: int, loss_fn: Callable[[Any], torch.Tensor] | None,
                 optimizer: Any, device: str | DeviceSpec | None, config: PlanConfig,
                 planner: Callable[..., MemoryPlan]) -> None:
        super().__init__()
        self.model = model
        self.budget_bytes = budget
        self._loss_fn, self._optimizer, self._device = loss_fn, optimizer, device
        self._config = dataclasses.replace(config, solver="checkpoint")
        self._planner = planner
        self.plan: MemoryPlan | None = None
        self._shapes: tuple | None = None
        self._wrapped: dict[str, Any] = {}  # module path -> the forward it had before memopt wrapped it
        self._in_backward = None
        if config.step_in_backward:
            parameters = dict(model.named_parameters())
            self._in_backward = InBackwardSteps(optimizer, parameters)
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            for name, parameter in parameters.items():
                if parameter.requires_grad and id(parameter) in held:
                    update = self._in_backward.update_of(name)
                    parameter.register_post_accumulate_grad_hook(
                        lambda sharded, update=update: update(None, sharded.grad))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._in_backward is not None:
            self._in_backward.check_before_forward()
        if self.training and torch.is_grad_enabled():
            shapes = tuple(tuple(t.shape) for t in torch.utils._pytree.tree_leaves((args, kwargs))
                           if isinstance(t, torch.Tensor))
            if shapes != self._shapes:
                self._replan(args, kwargs)
                self._shapes = shapes
        return self.model(*args, **kwargs)

    def _replan(self, args: tuple, kwargs: dict) -> None:
        if args and kwargs:
            raise MemoptError("memopt.compile on a sharded model plans from positional or keyword inputs, not both: "
                              "call it with one kind")
        self._unwrap()
        self.plan = self._planner(self.model, kwargs if kwargs else args, loss_fn=self._loss_fn,
                                  optimizer=self._optimizer, budget=self.budget_bytes, device=self._device,
                                  config=self._config)
        for path in self.plan.checkpointed:
            module = self.model.get_submodule(path)
            self._wrapped[path] = module.__dict__.get("forward")
            module.forward = _checkpointed(module.forward, self.plan.selective.get(path), path)

    def _unwrap(self) -> None:
        for path, forward in self._wrapped.items():
            module = self.model.get_submodule(path)
            if forward is None:
                del module.forward  # the class's forward again
            else:
                module.forward = forward
        self._wrapped.clear()


def _checkpointed(forward: Callable[..., Any], policy: tuple[tuple[str, bool], ...] | None = None, path: str = ""
                  ) -> Callable[..., Any]:
    """``forward`` under torch's non-reentrant checkpoint: whole, or selectively with ``policy`` (the ops with FLOPs
    of the block's forward in order, each with whether its result is kept)."""
    options: dict[str, Any] = {}
    if policy is not None:
        options["context_fn"] = partial(_selective_contexts, policy, path)

    def run(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **options, **kwargs)

    return run


def _selective_contexts(policy: tuple[tuple[str, bool], ...], path: str) -> Any:
    """The contexts of one checkpointed call: the k-th op with FLOPs the forward (and, apart, the recomputation)
    runs is kept as ``policy``'s k-th says; an op the plan did not trace there is kept, and the user told."""
    seen = {False: 0, True: 0}  # ops with FLOPs so far, in the forward and in the recomputation

    def decide(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if op.overloadpacket not in flop_registry:
            return CheckpointPolicy.PREFER_RECOMPUTE
        k = seen[ctx.is_recompute]
        seen[ctx.is_recompute] += 1
        name, kept = policy[k] if k < len(policy) else (None, True)
        if name != str(op.overloadpacket):
            if not ctx.is_recompute:
                warnings.warn(f"memopt: {path} ran {op} as its op with FLOPs number {k + 1}, where the plan traced "
                              f"{name or 'none'}; the checkpoint keeps its result, which the plan did not count",
                              MemoptWarning, stacklevel=2)
            kept = True
        return CheckpointPolicy.MUST_SAVE if kept else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(decide)
