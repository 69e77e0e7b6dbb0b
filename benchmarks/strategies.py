"""How a model trains: eager, what a user would pick instead of memopt, and memopt under a budget.

A strategy is a function `(model, training) -> Setup`, where `training` holds the workload, its batch
and its optimizer (memopt plans the whole step with them). It may change the model in place
(checkpointing wraps its blocks) but never the workload's code in `memopt/examples.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Mapping

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import memopt
from memopt.budget import CODE_SLACK, budget_for_peak
from memopt.config import PlanConfig
from memopt.examples import Workload

MEMOPT_BUDGETS = 5  # memopt@0 (the smallest budget memopt can meet) .. memopt@4 (4/5 of the way to eager's peak)
# memopt@k runs the planned programs as FX graphs (eager kernels), memopt-inductor@k compiles them with Inductor;
# memopt-inductor=<torch row> compiles with Inductor at the peak that torch row measured earlier in the run


# every budgeted memopt row may run a language model's loss head and its MLP blocks over slices of the tokens
CHUNKS = {"chunk_loss": "auto", "chunk_mlp": "auto"}


class NotApplicable(Exception):
    """The strategy does not apply to this workload (the message says why): the row is recorded as skipped."""


@dataclass(frozen=True)
class Training:
    """What a strategy may need besides the model: the workload, the batch and the optimizer of the step."""

    workload: Workload
    inputs: tuple | dict
    optimizer: torch.optim.Optimizer
    # measured peaks of the rows this run already finished for the workload, by strategy (memopt-inductor=<row>)
    peaks: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Setup:
    """What a strategy hands to the runner."""

    forward: Callable[..., Any]  # what the training step calls: the model, possibly wrapped or compiled
    context: Callable[[], ContextManager] = contextlib.nullcontext  # held for the whole run (config patches)
    compiled: bool = False
    returns_loss: bool = False  # the forward returns the loss itself (memopt.compile), not the model's output
    settings: dict[str, Any] = field(default_factory=dict)  # what the report should say about it
    plan: Callable[[], memopt.MemoryPlan] | None = None  # memopt's plan that ran (after the first step)


class LossOnly(nn.Module):
    """The model and its loss as one module that returns only the loss: what a careful user hands torch.compile
    (a compiled module that also returns the logits gives them a tangent, a logits-sized zero gradient)."""

    def __init__(self, model: nn.Module, workload: Workload) -> None:
        super().__init__()
        self.model, self.loss_fn = model, workload.loss_fn

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        output = self.model(*args, **kwargs)
        return self.loss_fn(output) if self.loss_fn is not None else output.loss


class LinearCrossEntropyLM(nn.Module):
    """A language model whose loss is torch's fused `linear_cross_entropy` over its final hidden states and its
    head's weight: what a user who knows the logits are the step's largest tensor writes by hand. The hidden states
    are those the model's own head reads (BERT's prediction transform runs first, T5's decoder output is scaled as
    the model scales it), and the targets are shifted for a causal model as Hugging Face's loss shifts them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.kind = model, linear_head_kind(model)
        if self.kind is None:
            raise NotApplicable(f"{type(model).__name__} has no linear language-model head for linear_cross_entropy")

    def head(self) -> nn.Linear:
        return self.model.cls.predictions.decoder if self.kind == "masked" else self.model.lm_head

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden, targets = self.hidden_and_targets(input_ids, labels)
        head = self.head()
        return F.linear_cross_entropy(hidden.flatten(0, -2), head.weight, targets.flatten(), linear_bias=head.bias,
                                      ignore_index=-100)

    def hidden_and_targets(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        if self.kind == "masked":  # BertForMaskedLM: the encoder, then the head's transform before its decoder linear
            hidden = model.bert(input_ids=input_ids).last_hidden_state
            return model.cls.predictions.transform(hidden), labels
        if self.kind == "seq2seq":  # T5ForConditionalGeneration, as its forward runs it with labels
            encoded = model.encoder(input_ids=input_ids).last_hidden_state
            hidden = model.decoder(input_ids=model._shift_right(labels), encoder_hidden_states=encoded).last_hidden_state
            if model.config.scale_decoder_outputs:
                hidden = hidden * (model.model_dim ** -0.5)
            return hidden, labels
        # a causal LM: position i predicts token i + 1, the last position nothing (Hugging Face's ForCausalLMLoss)
        hidden = model.base_model(input_ids=input_ids).last_hidden_state
        return hidden, F.pad(labels, (0, 1), value=-100)[:, 1:]


def linear_head_kind(model: nn.Module) -> str | None:
    """How the model's language-model head is reached: "masked" (BERT), "seq2seq" (T5), "causal", or None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    predictions = getattr(getattr(model, "cls", None), "predictions", None)
    if predictions is not None and isinstance(getattr(predictions, "decoder", None), nn.Linear):
        return "masked"
    if not isinstance(getattr(model, "lm_head", None), nn.Linear):
        return None
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    return "causal" if model.base_model is not model else None


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


def eager(model: nn.Module, training: Training | None = None) -> Setup:
    return Setup(model)


def per_block_checkpoint(model: nn.Module, training: Training | None = None) -> Setup:
    return Setup(checkpoint_blocks(model), settings={"checkpoint": "per block"})


def compile_with_budget(budget: float) -> Callable[[nn.Module], Setup]:
    """torch.compile with the partitioner's activation memory budget (read at compile time, so the
    patch is held around every call that may compile, not only around `torch.compile`)."""

    def prepare(model: nn.Module, training: Training) -> Setup:
        import torch._functorch.config as functorch_config

        return Setup(
            torch.compile(LossOnly(model, training.workload)),
            context=lambda: functorch_config.patch(activation_memory_budget=budget),
            compiled=True,
            returns_loss=True,
            settings={"activation_memory_budget": budget},
        )

    return prepare


def compile_checkpointed(model: nn.Module, training: Training) -> Setup:
    return Setup(torch.compile(LossOnly(checkpoint_blocks(model), training.workload)), compiled=True,
                 returns_loss=True, settings={"checkpoint": "per block"})


WHOLE_MODEL = "the model (its output holds the logits; the loss is taken outside)"


def compile_whole_with_budget(budget: float) -> Callable[[nn.Module, Training], Setup]:
    """torch.compile over the model itself, as most code calls it: the compiled output holds the logits, and
    the training step takes the loss from it outside the compiled graph."""

    def prepare(model: nn.Module, training: Training) -> Setup:
        import torch._functorch.config as functorch_config

        return Setup(torch.compile(model), context=lambda: functorch_config.patch(activation_memory_budget=budget),
                     compiled=True, settings={"activation_memory_budget": budget, "compiled": WHOLE_MODEL})

    return prepare


def compile_whole_checkpointed(model: nn.Module, training: Training) -> Setup:
    return Setup(torch.compile(checkpoint_blocks(model)), compiled=True,
                 settings={"checkpoint": "per block", "compiled": WHOLE_MODEL})


def linear_ce_checkpointed(model: nn.Module, training: Training) -> Setup:
    """Per-block checkpointing and the loss by linear_cross_entropy (no logits tensor), eager."""
    return Setup(LinearCrossEntropyLM(checkpoint_blocks(model)), returns_loss=True,
                 settings={"checkpoint": "per block", "loss": "torch.nn.functional.linear_cross_entropy"})


def compile_linear_ce_checkpointed(model: nn.Module, training: Training) -> Setup:
    return Setup(torch.compile(LinearCrossEntropyLM(checkpoint_blocks(model))), compiled=True, returns_loss=True,
                 settings={"checkpoint": "per block", "loss": "torch.nn.functional.linear_cross_entropy"})


def compile_auto_chunker(model: nn.Module, training: Training) -> Setup:
    """torch.compile with Inductor's auto-chunker on (it looks in the joint graph for a large tensor that a small
    one amplifies, a loss head's logits, and computes it in chunks). `settings["auto_chunker"]` records each
    joint graph it saw: chunked, or the reason it could not."""
    import torch._inductor.config as inductor_config

    seen: list[str] = []

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        with inductor_config.patch({"auto_chunker.enable": True}), auto_chunker_probe(seen):
            yield

    return Setup(torch.compile(LossOnly(model, training.workload)), context=context, compiled=True, returns_loss=True,
                 settings={"auto_chunker": seen})


@contextlib.contextmanager
def auto_chunker_probe(seen: list[str]) -> Iterator[None]:
    """Record what Inductor's auto-chunker did to each joint graph: "chunked", or why it could not."""
    from torch._inductor.fx_passes import auto_chunker

    original = auto_chunker.chunk

    def recording(graph):
        try:
            result = original(graph)
        except auto_chunker.CantChunk as error:
            seen.append(f"not chunked: {error}"[:200])
            raise
        seen.append("chunked")
        return result

    auto_chunker.chunk = recording
    try:
        yield
    finally:
        auto_chunker.chunk = original


def plan_step(model: nn.Module, training: Training, **options: Any) -> memopt.MemoryPlan:
    """memopt.plan of the workload's whole step (forward, loss, backward, optimizer step) on the CPU."""
    return memopt.plan(model, training.inputs, loss_fn=training.workload.loss_fn, optimizer=training.optimizer,
                       device="cpu", **options)


def smallest_budget(model: nn.Module, training: Training, **options: Any) -> tuple[int, int]:
    """The smallest budget memopt meets with `options`, and the proven minimum below it."""
    try:
        plan_step(model, training, budget=1, **options)
    except memopt.BudgetInfeasibleError as error:
        return error.minimum, error.proven_minimum
    raise AssertionError("memopt.plan met a budget of one byte")


def budget_range(model: nn.Module, training: Training) -> dict[str, Any]:
    """The smallest budget memopt can meet (and the proven minimum below it), with the loss head and the MLP blocks
    over slices of the tokens where that helps (`CHUNKS`), and eager's predicted peak.

    The same model build and batch give the same numbers in every process that asks, so each memopt@k
    row computes its own budget and the report checks that the rows agree."""
    start = time.perf_counter()
    minimum, proven = smallest_budget(model, training, **CHUNKS)
    eager_peak = plan_step(model, training).peak_bytes
    return {"minimum_bytes": minimum, "proven_minimum_bytes": proven, "eager_predicted_bytes": eager_peak,
            "range_seconds": time.perf_counter() - start}


def budget_at(model: nn.Module, training: Training, index: int, count: int) -> tuple[int, dict[str, Any]]:
    """memopt@k's budget, minimum + index/count × (eager peak − minimum), and the range it came from."""
    found = budget_range(model, training)
    low, high = found["minimum_bytes"], found["eager_predicted_bytes"]
    return low + (high - low) * index // count, found


def memopt_budget(index: int, count: int = MEMOPT_BUDGETS, *, backend: str = "fx",
                  **levers: Any) -> Callable[[nn.Module, Training], Setup]:
    """memopt.compile at budget minimum + index/count × (eager peak − minimum), all predicted by memopt (exactly,
    whatever the `levers`), its planned programs run as FX graphs (eager kernels) or compiled by Inductor
    (`backend`), with `CHUNKS` and the `levers` (compress="int8")."""

    def prepare(model: nn.Module, training: Training) -> Setup:
        budget, found = budget_at(model, training, index, count)
        return memopt_setup(model, training, budget, solver=None, backend=backend, options={**CHUNKS, **levers},
                            budget_index=index, budget_count=count, **found)

    return prepare


def memopt_backend_budget(index: int, count: int = MEMOPT_BUDGETS) -> Callable[[nn.Module, Training], Setup]:
    """torch.compile(backend="memopt") at memopt@k's budget, over the module that returns only the loss: the
    joint graph AOTAutograd traces, planned and cut by memopt, run on eager's kernels (compiler="eager")."""

    def prepare(model: nn.Module, training: Training) -> Setup:
        budget, found = budget_at(model, training, index, count)
        options = {"budget": budget, "optimizer": training.optimizer, "device": "cpu", "cache": False,
                   **CHUNKS}
        compiled = torch.compile(LossOnly(model, training.workload), backend="memopt", options=options)
        return Setup(compiled, compiled=True, returns_loss=True, plan=lambda: memopt.backend.plans(options)[-1],
                     settings={"budget_bytes": budget, "solver": "memopt", "backend": "torch.compile(memopt)",
                               "plan_seconds": None, **CHUNKS, "budget_index": index, "budget_count": count,
                               **found})

    return prepare


def memopt_smallest(**levers: Any) -> Callable[[nn.Module, Training], Setup]:
    """memopt.compile (FX) at the smallest budget it meets with `levers` on as well as `CHUNKS`:
    `step_in_backward=True` (each parameter updated as soon as its gradient is final) or `compress="int8"` (the
    larger saved activations packed between forward and backward: approximate)."""

    def prepare(model: nn.Module, training: Training) -> Setup:
        options = {**CHUNKS, **levers}
        start = time.perf_counter()
        minimum, proven = smallest_budget(model, training, **options)
        range_seconds = time.perf_counter() - start
        compiled = memopt.compile(model, budget=minimum, loss_fn=training.workload.loss_fn,
                                  optimizer=training.optimizer, device="cpu", **options)
        return Setup(compiled, returns_loss=True, plan=lambda: compiled.plan, settings={
            "budget_bytes": minimum, "solver": "memopt", "backend": "fx", "plan_seconds": None, **options,
            "minimum_bytes": minimum, "proven_minimum_bytes": proven, "range_seconds": range_seconds})

    return prepare


def memopt_at_peak_of(other: str, backend: str = "inductor") -> Callable[[nn.Module, Training], Setup]:
    """memopt.compile(backend=`backend`) asked to peak no higher than the torch row `other` measured in this run,
    so both rows are compared at the same peak (the report still pairs them by measured peaks): its budget is the
    smallest whose planned part is that peak, the budget less memopt's headroom for the FX lowering, less the
    slack Inductor's code may take beyond the plan for Inductor (whose code's peak is read from the code)."""

    def prepare(model: nn.Module, training: Training) -> Setup:
        if other not in training.peaks:
            raise ValueError(f"no measured peak of {other!r} for this workload in this run: run {other!r} first "
                             f"(python benchmarks/run.py --strategies {other},memopt-inductor={other})")
        peak = training.peaks[other]
        budget = budget_for_peak(peak, CODE_SLACK if backend == "inductor" else PlanConfig().headroom)
        return memopt_setup(model, training, budget, solver=None, backend=backend, options=CHUNKS,
                            peak_of=other, peak_of_bytes=peak)

    return prepare


def memopt_blocks(model: nn.Module, training: Training) -> Setup:
    """memopt's own per-block checkpointing (solver "blocks"), under a budget that does not bind."""
    found = budget_range(model, training)
    return memopt_setup(model, training, 2 * found["eager_predicted_bytes"], solver="blocks", **found)


def memopt_setup(model: nn.Module, training: Training, budget: int, *, solver: str | None, backend: str = "fx",
                 options: dict[str, int | str] | None = None, **settings: Any) -> Setup:
    """memopt.compile(model) at `budget`, with the time memopt.plan takes for that budget measured apart
    (the compiled module plans again on its first call, and with backend="inductor" compiles there too:
    the first step's extra time says so). With Inductor the budget may be below every plan: memopt.compile
    then runs the code of a plan just above it that fits (the time is then that of the refused plan).
    `options`: memopt's chunk_loss and chunk_mlp, and any other lever (compress)."""
    options = options or {}
    start = time.perf_counter()
    try:
        planned_peak = plan_step(model, training, budget=budget, solver=solver, **options).peak_bytes
    except memopt.BudgetInfeasibleError:
        if backend != "inductor":
            raise
        planned_peak = None
    plan_seconds = time.perf_counter() - start
    compiled = memopt.compile(model, budget=budget, loss_fn=training.workload.loss_fn,
                              optimizer=training.optimizer, device="cpu", solver=solver, backend=backend,
                              **options)
    return Setup(compiled, returns_loss=True, plan=lambda: compiled.plan, settings={
        "budget_bytes": budget, "solver": solver or "memopt", "backend": backend, "plan_seconds": plan_seconds,
        "planned_apart_peak_bytes": planned_peak, **options, **settings})


# what a PyTorch user would run: eager, and the torch rows memopt is compared with at the same peak
TORCH_STRATEGIES: dict[str, Callable[[nn.Module, Training], Setup]] = {
    "eager": eager,
    "checkpoint": per_block_checkpoint,
    **{f"compile-amb-{budget}": compile_with_budget(budget) for budget in (1.0, 0.5, 0.2, 0.0)},
    "compile-checkpoint": compile_checkpointed,
    "whole-compile-amb-0.5": compile_whole_with_budget(0.5),
    "whole-compile-checkpoint": compile_whole_checkpointed,
    "linear-ce-checkpoint": linear_ce_checkpointed,
    "compile-linear-ce-checkpoint": compile_linear_ce_checkpointed,
    "compile-autochunker": compile_auto_chunker,
}
# the torch rows that memopt-inductor=<row> meets at their measured peak (and benchmarks/pairs.py times beside it)
SAME_PEAK_ROWS = ("checkpoint", *(f"compile-amb-{budget}" for budget in (1.0, 0.5, 0.2, 0.0)), "compile-checkpoint")
STRATEGIES: dict[str, Callable[[nn.Module, Training], Setup]] = {
    **TORCH_STRATEGIES,
    **{f"memopt@{index}": memopt_budget(index) for index in range(MEMOPT_BUDGETS)},
    "memopt-blocks": memopt_blocks,
    **{f"memopt-inductor@{index}": memopt_budget(index, backend="inductor") for index in range(MEMOPT_BUDGETS)},
    **{f"memopt-inductor={name}": memopt_at_peak_of(name) for name in SAME_PEAK_ROWS},
    # the same with memopt's default lowering, the planned programs run as FX graphs (benchmarks/pairs.py --memopt fx)
    **{f"memopt={name}": memopt_at_peak_of(name, backend="fx") for name in SAME_PEAK_ROWS},
    **{f"memopt-backend@{index}": memopt_backend_budget(index) for index in range(MEMOPT_BUDGETS)},
    "memopt-stepped@0": memopt_smallest(step_in_backward=True),
    "memopt-int8@0": memopt_smallest(compress="int8"),
    # memopt@k's budgets with compress="int8": packing where it costs less than recomputing
    **{f"memopt-int8@{index}": memopt_budget(index, compress="int8") for index in range(1, MEMOPT_BUDGETS)},
}


def memopt_summary(plan: memopt.MemoryPlan, compiled: Any = None) -> dict[str, Any]:
    """What the plan that ran says: predicted peak, what it recomputes, how the solver did (and, for a module
    memopt.compile compiled with Inductor, what Inductor compiled)."""
    recomputed = [d for d in plan.decisions if d.recomputed]
    solver = plan.solver
    summary = {
        "predicted_peak_bytes": plan.peak_bytes,
        "eager_peak_bytes": plan.eager_peak_bytes,
        "decisions": len(plan.decisions),
        "recomputed": len(recomputed),
        "recomputed_bytes": sum(d.bytes for d in recomputed),
        "solver": {"name": solver.name, "status": solver.status, "objective_s": solver.objective,
                   "lower_bound_s": solver.lower_bound, "gap": solver.gap, "seconds": solver.seconds},
        "chunked": [dataclasses.asdict(head) for head in plan.chunked],  # loss heads run over slices of the tokens
        "chunked_mlp": [dataclasses.asdict(block) for block in plan.chunked_mlp],  # and MLP blocks
        "compressed": [dataclasses.asdict(tensor) for tensor in plan.compressed],  # saved activations packed
    }
    if isinstance(compiled, memopt.CompiledModule) and compiled.backend == "inductor":
        summary["inductor"] = inductor_summary(compiled)
    return summary


def inductor_summary(compiled: memopt.CompiledModule) -> dict[str, Any]:
    """What Inductor compiled for the last step: its peak as memopt reads it from the wrapper code (the budget
    check memopt.compile made), the Inductor options each program was compiled under, the compile time, and
    every compile memopt tried for it (the plan's target, options and code peak)."""
    from memopt.lower.inductor import DEFAULT_OPTIONS, InductorStep

    plan = compiled.plan
    step = compiled.executor
    if not isinstance(step, InductorStep):
        return {"error": f"no InductorStep for the last plan (found {type(step).__name__})"}
    # the optimizer step's peak, as memopt.compile counts it (api.CompiledModule._lower)
    after = max((total for total, phase in zip(plan.timeline.totals, plan.timeline.phases) if phase == "optimizer"),
                default=0)
    forward_peak, backward_peak = step.peaks(plan.entry_bytes)

    def extra(options: dict[str, Any]) -> dict[str, Any]:  # what memopt turned off on top of its defaults
        return {k: v for k, v in options.items() if k not in DEFAULT_OPTIONS or DEFAULT_OPTIONS[k] != v}

    return {"predicted_peak_bytes": step.predicted_peak_bytes(plan.entry_bytes, after),
            "forward_peak_bytes": forward_peak, "backward_peak_bytes": backward_peak, "optimizer_peak_bytes": after,
            "forward_options": extra(step.forward.options), "backward_options": extra(step.backward.options),
            "compile_seconds": step.compile_seconds,
            "compiles": [{"target_bytes": c.target_bytes, "options": c.options, "peak_bytes": c.predicted_peak_bytes,
                          "seconds": round(c.seconds, 1), "chosen": c.chosen} for c in plan.compiles]}


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
