"""The user's door: memopt.plan() and memopt.compile()."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from memopt.budget import Budget, parse_budget
from memopt.capture import CapturedStep, capture
from memopt.capture.trace import _split_inputs
from memopt.config import PlanConfig, check_lowering, slicing_nothing_by_choice
from memopt.device import DeviceSpec, get_device
from memopt.errors import BudgetInfeasibleError, MemoptError
from memopt.fit import fit
from memopt.fsdp import ShardedModule
from memopt.lower.kernels.compress import with_errors
from memopt.lower.lowering import FXLowering, Lowering
from memopt.lower.optimizer_step import InBackwardSteps
from memopt.lower.runner import Executor, StepRunner, run_step
from memopt.passes.optimizer_memory import ParamInfo, optimizer_groups
from memopt.passes.remat_plan import SOLVERS
from memopt.passes.row_slices import rows_name, slice_rows, split_rows
from memopt.passes.sharding import default_sharding, sharding_of, traced_as_fsdp_computes
from memopt.pipeline import run_pipeline
from memopt.report.plan import MemoryPlan, UpdatePlan
from memopt.sparse_update import (
    backward_nodes,
    check_update,
    choose_update,
    forward_uses,
)


def plan(
    model: nn.Module,
    example_inputs: tuple | list | dict | torch.Tensor,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: Any = None,
    budget: int | str | None = None,
    device: str | DeviceSpec | None = None,
    offload: bool | None = None,
    fake: bool | None = None,
    layout: bool = False,
    solver: str | None = None,
    chunk_loss: int | str | None = None,
    chunk_mlp: int | str | None = None,
    step_in_backward: bool | None = None,
    update: str = "full",
    calibration: list | tuple | None = None,
    compress: str | None = None,
    world_size: int | None = None,
    config: PlanConfig | None = None,
) -> MemoryPlan:
    """The memory plan of one steady-state training step of ``model`` on ``example_inputs``.

    The step is: forward, loss, backward, ``optimizer.step()`` with optimizer state
    present and gradients set to None beforehand. The model's output is dropped
    once the loss is taken (``loss = model(**batch).loss``); a training loop that
    keeps the whole output alive through the backward holds more. ``optimizer`` is an optimizer
    instance, a class, or ``(class, kwargs)``; None leaves optimizer state out.
    ``budget`` is bytes or a string such as "24GB" / "512MiB". ``device`` is a
    preset name ("h100", "a100-80gb", "a100-40gb", "rtx4090", "cpu") or a
    DeviceSpec; by default the device the model is on. ``layout=True`` also plans
    offsets in one arena for the step's intermediates (the ``layout`` key).
    With a budget, memopt chooses activations to recompute in the backward so
    that the step fits (``decisions``, ``solver``); ``solver`` names the remat
    solver: "memopt" (default) or a baseline, "none", "blocks" (every layer
    checkpointed), "sqrt" (Chen's segments). ``chunk_loss="auto"`` lets the plan run
    the loss head (linear, log-softmax, NLL loss, found in the graph) over slices of
    the tokens, so that the logits never exist whole, where that fits a budget the
    traced step cannot or costs less (``chunked``); a number forces that many slices,
    and 1 (the default) keeps the step bitwise eager: chunking changes the order of
    the sums over the tokens. ``chunk_mlp`` does the same for the feed-forward blocks
    (up projections, activation, down projection, found in the graph): their wide
    tensors exist one slice of the tokens at a time, forward and backward
    (``chunked_mlp``). ``step_in_backward=True`` plans the optimizer's update
    of each parameter inside the backward, right after its gradient is final, which
    frees that gradient (``memopt.compile``'s option of the same name runs it).
    ``update="sparse"`` (with a budget and ``calibration``, a few batches of the fine-tuning data) trains only the
    parameter tensors whose contribution, scored on those batches, is the largest a step within the budget can
    hold; the others are frozen, so the backward computes no gradient for them and nothing below the deepest
    tensor trained (``memopt.sparse_update``; the plan's ``update``). Parameters the user froze stay frozen.
    ``world_size=N`` plans one rank of N under FSDP2 (``fully_shard`` on every block of the model's layer
    lists, then on the root, as torchtitan wraps): parameters, gradients and optimizer state as dim-0 shards, plus
    what the engine gathers (each unit's parameters for its forward and backward, the all-gather outputs it
    prefetches, the reduce-scatter inputs), in the ledger as ``gathered``; ``example_inputs`` is one rank's
    batch and ``budget`` one rank's (``memopt.passes.sharding``).
    The calibration batches run eagerly, through the model, to score; ``config`` sets every other knob
    (solver time limits, headroom). Otherwise nothing is run: the
    step is traced on fake tensors, and the model is left as it was.
    """
    config = _config(config, layout=layout, solver=solver, chunk_loss=chunk_loss, chunk_mlp=chunk_mlp,
                     step_in_backward=step_in_backward, compress=compress)
    budget_bytes = parse_budget(budget)
    check_update(update, calibration)
    if world_size is not None or sharding_of(model) is not None:
        _check_sharded(world_size, config, update)
    if update == "sparse":
        if budget_bytes is None:
            raise MemoptError("update='sparse' chooses what to train under a budget: pass budget=...")
        return _sparse_plan(model, example_inputs, calibration, loss_fn=loss_fn, optimizer=optimizer,
                            device=device, offload=offload, fake=fake, config=config, budget_bytes=budget_bytes)
    plan_at = _planner(model, example_inputs, loss_fn=loss_fn, optimizer=optimizer, device=device,
                       offload=offload, fake=fake, config=config, world_size=world_size)
    if budget_bytes is None:
        return plan_at(None)
    # the plan of the step as the FX lowering runs it (a rewrite over its target is planned again for less)
    return fit(plan_at, Budget(budget_bytes, config.headroom), FXLowering(arena=config.layout)).plan


def _sparse_plan(model: nn.Module, example_inputs: tuple | list | dict | torch.Tensor, calibration: Any, *,
                 loss_fn: Callable[[Any], torch.Tensor] | None, optimizer: Any, device: str | DeviceSpec | None,
                 offload: bool | None, fake: bool | None, config: PlanConfig, budget_bytes: int,
                 slices: bool = True) -> MemoryPlan:
    """The plan of the sparse update that fits ``budget_bytes`` (the FX lowering's, as ``plan`` makes);
    ``slices=False`` trains whole tensors only."""
    if fake or any(t.device.type == "meta" for t in model.parameters()):
        raise MemoptError("update='sparse' scores each tensor by running the calibration batches through the "
                          "model's weights, which a model planned from shapes alone (fake=True, or on the meta "
                          "device) does not have: load the weights, or plan with update='full'")
    spec = get_device(device, default=_device_of(model))

    def plan_for(trainable: frozenset[str]) -> MemoryPlan:
        plan_at = _planner(model, example_inputs, loss_fn=loss_fn, optimizer=optimizer, device=spec,
                           offload=offload, fake=fake, config=config, trainable=trainable)
        return fit(plan_at, Budget(budget_bytes, config.headroom), FXLowering(arena=config.layout)).plan

    full = capture(model, example_inputs, loss_fn=loss_fn, fake=fake)

    def backward_of(trainable: frozenset[str] | None) -> int:
        if trainable is None:
            return backward_nodes(full)
        names, rows = split_rows(trainable)
        return backward_nodes(slice_rows(capture(model, example_inputs, loss_fn=loss_fn, fake=fake,
                                                 trainable=names), rows))

    def minimum_for(trainable: frozenset[str]) -> int:
        plan_at = _planner(model, example_inputs, loss_fn=loss_fn, optimizer=optimizer, device=spec,
                           offload=offload, fake=fake, config=config, trainable=trainable)
        try:
            fit(plan_at, Budget(1, config.headroom), FXLowering(arena=config.layout))
        except BudgetInfeasibleError as error:
            return error.minimum
        raise AssertionError("a step met a budget of one byte")

    uses = forward_uses(full)
    # (an update inside the backward steps whole parameters only)
    return choose_update(model, calibration, loss_fn=loss_fn, optimizer=optimizer, budget_bytes=budget_bytes,
                         device_is_cuda=spec.is_cuda, uses=uses, minimum_for=minimum_for, plan_for=plan_for,
                         backward_of=backward_of, slices=slices and not config.step_in_backward)


def _planner(model: nn.Module, example_inputs: tuple | list | dict | torch.Tensor, *,
             loss_fn: Callable[[Any], torch.Tensor] | None, optimizer: Any, device: str | DeviceSpec | None,
             offload: bool | None, fake: bool | None, config: PlanConfig,
             trainable: frozenset[str] | None = None, world_size: int | None = None
             ) -> Callable[[int | None], MemoryPlan]:
    """The step traced once (training ``trainable``, by default what requires grad; a name may be a row slice,
    ``rows_name``), and the function that plans it for a target number of bytes (None: no budget);
    ``world_size``: one rank's, sharded by FSDP2."""
    spec = get_device(device, default=_device_of(model))
    config = _with_offload(config, offload, spec)
    names, rows = split_rows(trainable) if trainable is not None else (None, {})
    # a model wrapped with fully_shard is planned as its units shard it, traced as the computation they gather for
    sharding = sharding_of(model)
    if sharding is not None and world_size not in (None, sharding.world_size):
        raise MemoptError(f"the model is sharded over {sharding.world_size} ranks by fully_shard, not world_size="
                          f"{world_size}: leave world_size out, or plan the unwrapped model")
    with traced_as_fsdp_computes(model) if sharding is not None else contextlib.nullcontext():
        step = slice_rows(capture(model, example_inputs, loss_fn=loss_fn, fake=fake, trainable=names,
                                  compute_dtypes=sharding.compute_dtypes() if sharding else None), rows)
    if sharding is None and world_size is not None:
        sharding = default_sharding(model, world_size)
    named = dict(model.named_parameters())
    by_node = {node.name: node for node in step.graph.graph.nodes}
    gradient = {name: by_node[node].meta["val"] for name, node in step.gradients.items()}
    params = [ParamInfo(name, tuple(gradient[name].shape), gradient[name].element_size()) for name in step.gradients]
    if sharding is not None:
        # each rank's optimizer updates its shards only
        step = dataclasses.replace(step, sharding=sharding)
        params = [ParamInfo(p.name, sharding.shard_shape(p.name), sharding.dtypes[p.name].itemsize) for p in params]
    groups_of = optimizer_groups(optimizer, named)
    if groups_of is not None:  # a row slice is in its tensor's group
        groups_of = {**groups_of, **{rows_name(name, k): groups_of[name] for name, k in rows.items()
                                     if name in groups_of}}

    errors: dict[str, tuple[float, float]] = {}  # of each tensor a plan packs, on the example inputs

    def plan_at(target: int | None, *, sliced: bool = True) -> MemoryPlan:
        plan = run_pipeline(step, params=params, optimizer=optimizer, groups_of=groups_of, device=spec,
                            budget_bytes=target, config=config if sliced else slicing_nothing_by_choice(config))
        if not plan.compressed or step.fake:
            return plan
        return with_errors(plan, _values(model, plan.program, example_inputs), errors)

    return plan_at


def _values(model: nn.Module, step: CapturedStep, example_inputs: tuple | list | dict | torch.Tensor
            ) -> list[torch.Tensor]:
    """The inputs of ``step``'s graph from ``model`` and ``example_inputs``: parameters (a row slice as a view),
    copies of the buffers (the forward may write them), the inputs."""
    named = dict(model.named_parameters())
    buffers = iter([b.detach().clone() for b in model.buffers()])
    inputs = iter(pytree.tree_leaves(_split_inputs(example_inputs)))
    values = []
    for placeholder in step.placeholders:
        if placeholder.role == "parameter":
            names, rows = split_rows({placeholder.name})
            (name,) = names
            values.append(named[name].detach()[: rows[name]] if rows else named[name].detach())
        elif placeholder.role == "buffer":
            values.append(next(buffers))
        else:
            values.append(next(inputs))
    return values


def _check_sharded(world_size: int | None, config: PlanConfig, update: str) -> None:
    """What a plan under FSDP2 does not model yet, refused with the way out."""
    if world_size is not None and (not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1):
        raise MemoptError(f"world_size must be a positive int (the ranks FSDP2 shards over), got {world_size!r}")
    for wanted, what in ((config.layout, "layout=True"), (update != "full", f"update={update!r}")):
        if wanted:
            raise MemoptError(f"{what} is not planned under FSDP2 yet (world_size={world_size}): plan one device "
                              "without world_size, or the sharded step without it")


def _device_of(model: nn.Module) -> str:
    for tensor in model.parameters():
        return "h100" if tensor.device.type == "cuda" else "cpu"
    return "cpu"


def _with_offload(config: PlanConfig, offload: bool | None, spec: DeviceSpec) -> PlanConfig:
    """``offload=None``: what ``config`` says, else on where the device has a host link worth using (CUDA)."""
    if offload is None:
        offload = config.offload or spec.is_cuda
    if not isinstance(offload, bool):
        raise MemoptError(f"offload must be True, False or None, got {offload!r}")
    if config.offload_host_bytes is not None and config.offload_host_bytes < 0:
        raise MemoptError(f"offload_host_bytes must be >= 0 bytes (or None: no cap), got {config.offload_host_bytes}")
    return dataclasses.replace(config, offload=offload)


def _config(config: PlanConfig | None, *, layout: bool, solver: str | None, chunk_loss: int | str | None,
            chunk_mlp: int | str | None, step_in_backward: bool | None, compress: str | None = None) -> PlanConfig:
    config = config or PlanConfig()
    if compress is not None:
        config = dataclasses.replace(config, compress=compress)
    if chunk_loss is not None:
        config = dataclasses.replace(config, chunk_loss=chunk_loss)
    if chunk_mlp is not None:
        config = dataclasses.replace(config, chunk_mlp=chunk_mlp)
    if step_in_backward is not None:
        if not isinstance(step_in_backward, bool):
            raise MemoptError(f"step_in_backward must be True or False, got {step_in_backward!r}")
        config = dataclasses.replace(config, step_in_backward=step_in_backward)
    if layout:
        config = dataclasses.replace(config, layout=True)
    if solver is not None:
        config = dataclasses.replace(config, solver=solver)
    if config.solver not in SOLVERS:
        raise MemoptError(f"unknown remat solver {config.solver!r}; choose one of: {', '.join(SOLVERS)}")
    return config


def compile(
    model: nn.Module,
    *,
    budget: int | str,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: Any = None,
    device: str | DeviceSpec | None = None,
    offload: bool | None = None,
    solver: str | None = None,
    backend: str = "fx",
    inductor_options: dict[str, Any] | None = None,
    config: PlanConfig | None = None,
    layout: bool = False,
    chunk_loss: int | str | None = None,
    chunk_mlp: int | str | None = None,
    step_in_backward: bool | None = None,
    update: str = "full",
    calibration: list | tuple | None = None,
    compress: str | None = None,
) -> CompiledModule | ShardedModule:
    """``model`` as a module whose training step runs memopt's plan for ``budget``.

    A model wrapped with FSDP2's ``fully_shard`` (each rank calls this with its own batch and a budget per rank)
    stays FSDP2's to run: memopt plans the rank and runs the blocks its plan chooses under
    ``torch.utils.checkpoint`` (``memopt.fsdp.ShardedModule``: the model's output as it returns it).

    Calling the returned module in training mode with grad enabled runs the
    forward and returns the loss (``loss_fn(output)``, the output itself, or its
    ``.loss``); ``loss.backward()`` runs the planned backward, recomputing what
    the plan says, and fills the parameters' ``.grad`` as eager does. The first
    call with a new input shape plans the step (``.plan``); a budget no plan
    can meet raises ``BudgetInfeasibleError`` before anything runs. In eval
    mode or under ``torch.no_grad()`` the model runs as it is.

    ``backend="fx"`` runs the planned graphs as generated Python (bitwise eager);
    ``backend="inductor"`` compiles them with Inductor (fused, within float
    tolerance of eager), reads the peak of the code Inductor wrote, and when it
    is over the budget turns off the offending Inductor passes or re-plans
    (``memopt.fit``). Inductor's fused kernels hold less than the plans count, so
    with Inductor a budget below every plan is tried too: the code of the smallest
    plan, and of a few just above it, runs if it fits. When nothing fits,
    ``InductorBudgetError`` (a ``BudgetInfeasibleError``) names as ``minimum``
    the lowest peak Inductor's code reached, the lowering's own minimum. When the
    code leaves budget unused, plans for larger budgets are compiled and the
    largest whose code fits runs (``plan.compiles`` lists every compile tried).
    ``inductor_options`` are Inductor config entries on top of memopt's
    (``memopt.lower.inductor.DEFAULT_OPTIONS``).
    ``offload=True`` sends activations to a host pool when recomputation alone does not
    fit (``memopt.plan``); with Inductor, the host copies are counted apart from device
    memory when its code is checked against the budget. ``offload=None`` is
    ``config.offload``, and on for CUDA devices with the FX backend (not with Inductor).

    ``chunk_loss`` is ``memopt.plan``'s: "auto" or a number runs the loss head over
    slices of the tokens (the plan's ``chunked``), within float tolerance of eager;
    ``chunk_mlp`` likewise the feed-forward blocks (the plan's ``chunked_mlp``).

    ``step_in_backward=True`` (FX backend, an optimizer instance) updates each parameter
    inside the backward as soon as its gradient is final, with the optimizer's own
    code, and frees the gradient (``memopt.lower.optimizer_step``): call
    ``optimizer.step()`` after each backward as usual; it finds no gradient and does
    nothing. Gradient accumulation and clipping by the global norm cannot compose with
    it (a forward after a backward with no ``optimizer.step()`` between is refused).

    ``update="sparse"`` with ``calibration`` batches is ``memopt.plan``'s: on the first call the tensors to train
    are chosen under the budget (with the FX lowering's plans) and the others frozen in ``model``
    (``requires_grad_(False)``, as a user freezes by hand), so the optimizer holds no state for them and
    leaves them unchanged; ``.plan.update`` says what was chosen. A weight trained on its first rows gets no
    gradient itself: those rows become a parameter of their own (a view of them, in ``.rows`` and added to the
    optimizer instance's group of the weight), so the optimizer updates them alone.

    ``layout=True`` (FX backend) runs the step's intermediates in one arena allocated
    at the first planned op and freed after the last one: each planned op writes
    through its ``out=`` overload into a view at its planned offset, in the order the
    order pass found. ``.plan``'s timeline then counts the arena as one tensor live
    for that whole span (not the tensors inside it), and its ``layout`` key is the
    arena that runs. When the arena and what stays outside it exceed the budget,
    memopt plans more recomputation (``memopt.fit``, down to the smallest plan).
    """
    layout = layout or (config is not None and config.layout)
    if backend not in ("fx", "inductor"):
        raise MemoptError(f"unknown backend {backend!r}; choose 'fx' (plain FX graphs) or 'inductor'")
    if offload is not None and not isinstance(offload, bool):
        raise MemoptError(f"offload must be True, False or None, got {offload!r}")
    if backend == "inductor" and offload is None:
        # Inductor offloads only when asked to (offload=True or config.offload), not by default on CUDA:
        # that path has not run on a GPU in this project
        offload = config is not None and config.offload
    if budget is None:
        raise MemoptError("memopt.compile needs a budget, e.g. budget='24GB'")
    config = _config(config, layout=layout, solver=solver, chunk_loss=chunk_loss, chunk_mlp=chunk_mlp,
                     step_in_backward=step_in_backward, compress=compress)
    if sharding_of(model) is not None:
        # FSDP2 runs the step; memopt chooses the blocks it runs under torch.utils.checkpoint, each selectively or
        # whole (memopt.fsdp)
        wanted = {"backend='inductor'": backend != "fx", "offload=True": bool(offload), "layout=True": layout,
                  f"update={update!r}": update != "full",
                  f"compress={config.compress!r}": config.compress is not None,
                  f"solver={solver!r}": solver not in (None, "checkpoint"),
                  "chunk_loss/chunk_mlp": config.chunk_loss != 1 or config.chunk_mlp != 1}
        refused = [name for name, asked in wanted.items() if asked]
        if refused:
            raise MemoptError(f"a model wrapped with fully_shard is compiled with blocks checkpointed only, "
                              f"not {', '.join(refused)}: leave {'them' if len(refused) > 1 else 'it'} out, or "
                              "memopt.plan(model, batch, ...) to see what the rank would hold")
        if config.step_in_backward:
            check_lowering(config, inductor=False, offload=False, optimizer=optimizer, fx_name="fully_shard",
                           inductor_name="")
            _check_optimizer_holds(optimizer, model)
        return ShardedModule(model, budget=parse_budget(budget), loss_fn=loss_fn, optimizer=optimizer,
                             device=device, config=config, planner=plan)
    check_lowering(config, inductor=backend == "inductor", offload=bool(offload), optimizer=optimizer,
                   fx_name="backend='fx'", inductor_name="backend='inductor'")
    config = dataclasses.replace(config, fused_recompute=backend == "inductor")
    if layout:
        offload = False  # offload=None would turn it on for CUDA devices
    if config.step_in_backward:
        _check_optimizer_holds(optimizer, model)
    check_update(update, calibration)
    return CompiledModule(model, budget=parse_budget(budget), loss_fn=loss_fn, optimizer=optimizer,
                          device=device, config=config, backend=backend,
                          inductor_options=inductor_options, offload=offload, layout=layout,
                          calibration=calibration if update == "sparse" else None)


def _check_optimizer_holds(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not trained & held:
        raise MemoptError("step_in_backward=True: the optimizer holds none of the model's trainable parameters")


class CompiledModule(nn.Module):
    """A model that trains with memopt's plan; ``.plan`` is the plan of the last input shape seen."""

    def __init__(self, model: nn.Module, *, budget: int, loss_fn: Callable[[Any], torch.Tensor] | None,
                 optimizer: Any, device: str | DeviceSpec | None, config: PlanConfig, backend: str = "fx",
                 inductor_options: dict[str, Any] | None = None, offload: bool | None = None,
                 layout: bool = False, calibration: list | tuple | None = None) -> None:
        super().__init__()
        self._calibration = calibration  # update="sparse": the batches that score what to train
        self.update: UpdatePlan | None = None  # the sparse update chosen on the first call
        self._trainable: frozenset[str] | None = None  # what it trains (tensor names and row slices)
        # the row slices it trains: parameters of their own, views of their tensors' first rows
        self.rows = nn.ParameterDict()
        self._offload = offload
        self.layout = layout
        self.model = model
        self.budget_bytes = budget
        self.backend = backend
        self._loss_fn, self._optimizer, self._device, self._config = loss_fn, optimizer, device, config
        self._inductor_options = inductor_options
        self._steps: dict[tuple, tuple[MemoryPlan, StepRunner, Executor]] = {}
        self._last: tuple[MemoryPlan, StepRunner, Executor] | None = None
        self._in_backward = (InBackwardSteps(optimizer, dict(model.named_parameters()))
                             if config.step_in_backward else None)

    @property
    def plan(self) -> MemoryPlan | None:
        return None if self._last is None else self._last[0]

    @property
    def executor(self) -> Executor | None:
        """What ran the last step's programs: the plan's FX graphs (a ``StepRunner``) or Inductor's code
        for them (an ``InductorStep``, whose ``peaks`` and program options show what it compiled)."""
        return None if self._last is None else self._last[2]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not (self.training and torch.is_grad_enabled()):
            return self.model(*args, **kwargs)
        inputs: tuple | dict = kwargs if kwargs and not args else args
        if args and kwargs:
            raise MemoptError("call a memopt-compiled module with positional or keyword arguments, not both")
        leaves = pytree.tree_leaves(_split(inputs))
        if any(isinstance(leaf, torch.Tensor) and leaf.requires_grad for leaf in leaves):
            raise MemoptError("memopt.compile trains the model's parameters; an input that requires grad would need "
                              "its own gradient, which memopt does not plan: pass it detached, or make it a parameter")
        if self._in_backward is not None:
            self._in_backward.check_before_forward()
        if self._calibration is not None and self.update is None:
            self._choose_update(inputs)
        key = _signature(self.model, inputs)
        if key not in self._steps:
            self._steps[key] = self._lower(inputs)
        self._last = self._steps[key]
        _, runner, executor = self._last
        values = [*self.model.parameters(), *self.model.buffers(), *leaves]
        values += [self.rows[_key(runner.parameter_of[node.name])] for node in runner.placeholders[len(values):]]
        return run_step(runner, values, executor)

    def _choose_update(self, inputs: tuple | dict) -> None:
        """The sparse update for this budget; what it does not train is frozen in the model."""
        plan = _sparse_plan(self.model, inputs, self._calibration, loss_fn=self._loss_fn, optimizer=self._optimizer,
                            device=self._device, offload=self._offload, fake=None, config=self._config,
                            budget_bytes=self.budget_bytes)
        assert plan.update is not None
        frozen = {t.name for t in plan.update.tensors if t.option == "frozen"}
        named = dict(self.model.named_parameters())
        for name in frozen:
            named[name].requires_grad_(False)
        for tensor in plan.update.updated:
            if tensor.option == "rows":
                self._add_rows(named[tensor.name], rows_name(tensor.name, tensor.rows), tensor.rows)
        self._trainable = frozenset(rows_name(t.name, t.rows) if t.option == "rows" else t.name
                                    for t in plan.update.updated)
        self.update = plan.update

    def _add_rows(self, tensor: nn.Parameter, name: str, rows: int) -> None:
        """Trains the first ``rows`` rows of ``tensor`` as a parameter of their own (a view: what the optimizer
        writes to it lands in ``tensor``), in ``self.rows`` and in the optimizer's group of ``tensor``; the step
        computes no gradient for ``tensor`` itself, so the optimizer leaves the rest of it as it is."""
        self.rows[_key(name)] = view = nn.Parameter(tensor.detach()[:rows])
        if isinstance(self._optimizer, torch.optim.Optimizer):
            for group in self._optimizer.param_groups:
                if any(p is tensor for p in group["params"]):
                    self._optimizer.add_param_group(
                        {**{key: value for key, value in group.items() if key != "params"}, "params": [view]})
                    break

    def _lower(self, inputs: tuple | dict) -> tuple[MemoryPlan, StepRunner, Executor]:
        if self.backend == "inductor":
            from memopt.lower.inductor import InductorLowering

            lowering: Lowering = InductorLowering(dict(self._inductor_options or {}))
        else:
            lowering = FXLowering(arena=self.layout)  # config.layout: plans are of the step as it runs in the arena
        plan_at = _planner(self.model, inputs, loss_fn=self._loss_fn, optimizer=self._optimizer, device=self._device,
                           offload=self._offload, fake=None, config=self._config, trainable=self._trainable)
        fitted = fit(plan_at, Budget(self.budget_bytes, self._config.headroom), lowering)
        runner = fitted.lowered.runner
        if runner.stepped:
            runner.bind_steps(self._in_backward.update_of)
        plan = fitted.plan if self.update is None else dataclasses.replace(fitted.plan, update=self.update)
        return plan, runner, fitted.lowered.executor


def _key(name: str) -> str:
    """``CompiledModule.rows``'s key of a row slice (a module's names hold no dots)."""
    return name.replace(".", "/")


def _split(inputs: tuple | dict) -> tuple[tuple, dict]:
    return ((), dict(inputs)) if isinstance(inputs, dict) else (tuple(inputs), {})


def _signature(model: nn.Module, inputs: tuple | dict) -> tuple:
    """What a plan depends on: shapes, dtypes and devices of the inputs and the model's tensors, and the mode."""
    def describe(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return (tuple(value.shape), value.dtype, value.device.type, value.requires_grad)
        return value if isinstance(value, (int, float, bool, str, type(None))) else type(value).__name__

    leaves, spec = pytree.tree_flatten(_split(inputs))
    state = [describe(t) for t in (*model.parameters(), *model.buffers())]
    return (str(spec), tuple(describe(v) for v in leaves), tuple(state), model.training)
