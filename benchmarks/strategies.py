"""What a user would pick instead of memopt: each strategy turns a fresh model into what the step calls.

A strategy is a function `(model) -> Setup`. It may change the model in place (checkpointing wraps
its blocks) but never the workload's code in `memopt/examples.py`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class Setup:
    """What a strategy hands to the runner."""

    forward: Callable[..., Any]  # what the training step calls: the model, possibly wrapped or compiled
    context: Callable[[], ContextManager] = contextlib.nullcontext  # held for the whole run (config patches)
    compiled: bool = False
    settings: dict[str, Any] = field(default_factory=dict)  # what the report should say about it


class CheckpointedBlock(nn.Module):
    """One block whose activations are recomputed in the backward (non-reentrant checkpoint)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, x, use_reentrant=False)


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Per-block activation checkpointing, the way a user would switch it on for this model."""
    if hasattr(model, "gradient_checkpointing_enable"):  # Hugging Face: its own per-layer switch
        # `activation_checkpointing_enable` is the new name; the old one warns of its deprecation.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    if isinstance(getattr(model, "blocks", None), nn.ModuleList):  # memopt.examples.ResidualMLP
        model.blocks = nn.ModuleList(CheckpointedBlock(block) for block in model.blocks)
        return model
    raise TypeError(f"don't know the blocks of {type(model).__name__} to checkpoint")


def eager(model: nn.Module) -> Setup:
    return Setup(model)


def per_block_checkpoint(model: nn.Module) -> Setup:
    return Setup(checkpoint_blocks(model), settings={"checkpoint": "per block"})


def compile_with_budget(budget: float) -> Callable[[nn.Module], Setup]:
    """torch.compile with the partitioner's activation memory budget (read at compile time, so the
    patch is held around every call that may compile, not only around `torch.compile`)."""

    def prepare(model: nn.Module) -> Setup:
        import torch._functorch.config as functorch_config

        return Setup(
            torch.compile(model),
            context=lambda: functorch_config.patch(activation_memory_budget=budget),
            compiled=True,
            settings={"activation_memory_budget": budget},
        )

    return prepare


def compile_checkpointed(model: nn.Module) -> Setup:
    return Setup(torch.compile(checkpoint_blocks(model)), compiled=True, settings={"checkpoint": "per block"})


STRATEGIES: dict[str, Callable[[nn.Module], Setup]] = {
    "eager": eager,
    "checkpoint": per_block_checkpoint,
    **{f"compile-amb-{budget}": compile_with_budget(budget) for budget in (1.0, 0.5, 0.2, 0.0)},
    "compile-checkpoint": compile_checkpointed,
}


@contextlib.contextmanager
def partitioner_probe() -> Iterator[list[dict[str, Any]]]:
    """Record, for every joint graph the min-cut partitioner splits, the activation memory budget it
    actually used and the bytes it chose to save for the backward: proof that a setting got through."""
    from torch._functorch import partitioners

    calls: list[dict[str, Any]] = []
    original = partitioners.choose_saved_values_set

    def recording(joint_graph, node_info, memory_budget=1, *args, **kwargs):
        saved = original(joint_graph, node_info, memory_budget, *args, **kwargs)
        calls.append({
            "memory_budget": memory_budget,
            "saved_values": len(saved),
            # inputs (parameters, the batch) live anyway; what the budget trades is the rest
            "saved_activation_bytes": sum(partitioners._size_of(n) for n in saved if n.op != "placeholder"),
        })
        return saved

    partitioners.choose_saved_values_set = recording
    try:
        yield calls
    finally:
        partitioners.choose_saved_values_set = original


def dynamo_graph_summary() -> dict[str, Any]:
    """How many graphs Dynamo compiled in this process and why it broke graphs, if it did."""
    from torch._dynamo.utils import counters

    breaks = dict(counters["graph_break"])
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(breaks.values()),
        "graph_break_reasons": sorted(breaks, key=breaks.get, reverse=True)[:5],
    }
