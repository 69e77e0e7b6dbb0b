"""PlanConfig: every knob of a plan, in one frozen object passed down the pipeline."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from memopt.errors import MemoptError


@dataclass(frozen=True, slots=True)
class PlanConfig:
    order: bool = True  # search a topological order with a lower peak
    order_time_limit_s: float = 1.0  # CP-SAT windows around the peak after the heuristics
    layout: bool = False  # plan offsets in one arena for the step's intermediates
    layout_time_limit_s: float = 5.0
    solver: str = "memopt"  # remat: "memopt" (fast block solver), or a baseline: "none", "blocks", "sqrt"
    remat_time_limit_s: float = 5.0
    # a folder where remat plans are kept and reused for the same graph, shapes, budget and options; None: off
    cache_dir: str | None = None
    # run each distinct op once on the real device to measure the workspace it allocates (real models only)
    measure_scratch: bool = True
    # part of the budget left for what the prediction does not see (kernel scratch, allocator rounding)
    headroom: float = 0.02
    # offload activations to host memory (memopt.plan's offload= sets it; None there: on for CUDA devices)
    offload: bool = False
    offload_host_bytes: int | None = None  # host (pinned) memory the offload pool may take; None: no cap
    offload_time_limit_s: float = 5.0
    offload_max_items: int = 64  # the largest activations the offload solver considers
    # the loss head (linear, log-softmax, NLL) over this many slices of the tokens: 1, never (bitwise eager);
    # "auto", as many as the recompute plan is cheapest with, and only when that beats the traced head (on a CUDA
    # device, or memopt's fused kernel where its plan scores better); n: always n; "kernel": memopt's fused
    # linear + cross-entropy (memopt.lower.kernels), no logits in the graph. Exact up to the order of the sums over
    # the tokens (the loss, the head's weight and bias gradients; the kernel's over the classes too)
    chunk_loss: int | str = 1
    # the feed-forward blocks (up projection, activation, down projection) over this many slices of the tokens,
    # as chunk_loss: 1, never; "auto", when the recompute plan of the chunked step is cheaper or fits where the
    # traced one does not; n: always n. Exact up to the order of the sums over the tokens (the weights' gradients)
    chunk_mlp: int | str = 1
    # the optimizer updates each parameter inside the backward, as soon as its gradient is final (memopt.compile's
    # step_in_backward: the user's optimizer.step() then finds no gradient and does nothing)
    step_in_backward: bool = False
    # saved activations packed to "int8" or "fp8" (one fp32 scale per 256 values) between their last forward use
    # and their first backward use, where that plan fits a budget the exact one cannot or costs less: approximate,
    # so off (None) unless asked for
    compress: str | None = None
    # the lowering fuses a recomputed pointwise op into the backward kernel that reads it (Inductor): the recompute
    # plan prices such an op at its arithmetic, not its memory traffic (set by the entry points, from the lowering)
    fused_recompute: bool = False

    def __post_init__(self) -> None:
        if self.compress not in (None, "int8", "fp8"):
            raise MemoptError(f"compress must be None (exact), 'int8' or 'fp8', got {self.compress!r}")
        for name in ("chunk_loss", "chunk_mlp"):
            chunks = getattr(self, name)
            if chunks == "kernel" and name == "chunk_loss":
                continue
            if chunks != "auto" and (not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1):
                kernel = ", 'kernel' (memopt's fused linear + cross-entropy)" if name == "chunk_loss" else ""
                raise MemoptError(f"{name} must be 1 (off), 'auto'{kernel} or a number of chunks >= 2, got {chunks!r}")


def slicing_nothing_by_choice(config: PlanConfig) -> PlanConfig:
    """``config`` with the regions left to memopt's choice (``"auto"``) run whole: the plans ``fit`` also searches
    under a lowering whose code holds less than its plans count, and less for a whole region than a sliced one."""
    return dataclasses.replace(config, chunk_loss=1 if config.chunk_loss == "auto" else config.chunk_loss,
                               chunk_mlp=1 if config.chunk_mlp == "auto" else config.chunk_mlp)


def check_lowering(config: PlanConfig, *, inductor: bool, offload: bool, optimizer: object, fx_name: str,
                   inductor_name: str) -> None:
    """Refuses knobs the chosen lowering cannot run, naming the way out.

    ``fx_name`` and ``inductor_name`` are how the caller's own argument picks the FX
    lowering and Inductor (``backend='fx'`` on ``memopt.compile``, ``compiler='eager'``
    on the torch.compile backend).
    """
    if config.layout and inductor:
        raise MemoptError(f"layout=True runs the arena with {fx_name} only: Inductor plans its own buffers (and "
                          f"reuses them) inside the code it writes; use {fx_name} with layout=True, or layout=False "
                          f"with {inductor_name}")
    if config.layout and offload:
        raise MemoptError("layout=True with offload=True is not supported in this version (host copies would have "
                          "to stay outside the arena); choose one, or offload=False")
    if not config.step_in_backward:
        return
    if inductor or config.layout:
        raise MemoptError(f"step_in_backward=True runs with {fx_name} and layout=False in this version (Inductor "
                          "would have to call the optimizer from its compiled backward, and the arena's order pass "
                          f"does not keep a parameter's readers before its update); use {fx_name}, or "
                          "step_in_backward=False")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise MemoptError(f"step_in_backward=True updates parameters with the optimizer itself: pass the optimizer "
                          f"instance (optimizer=opt), not {optimizer!r}")
