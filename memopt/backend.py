"""The torch.compile door: ``torch.compile(model, backend="memopt", options={"budget": "24GB"})``.

Dynamo hands the backend each graph of the user's code; AOTAutograd traces its
joint forward/backward graph and calls memopt's partition function, which plans
the graph (ledger, remat under the budget), rewrites it (recomputations placed
before their first backward reader) and cuts it into the forward and backward
that AOTAutograd runs. Those run as generated Python (``compiler="eager"``: eager's
kernels) or through Inductor (``compiler="inductor"``).

``memopt_backend`` is registered through the ``torch_dynamo_backends`` entry point,
so ``backend="memopt"`` works in a fresh process. The plans of one
``torch.compile`` call (one ``options`` object) form a session
(``memopt.backend.plans(options)``): with graph breaks each graph plans for what the
budget leaves after the rest of the model (its parameters, gradients, optimizer
state) and what the graphs compiled before it keep, and the user is told; a
recompile for new shapes re-plans that graph. Graphs with dynamic shapes are
specialized: each distinct shape is traced and planned on its first call.

With ``compiler="eager"`` the arena (``layout``) and the optimizer step inside the
backward (``step_in_backward``) run as they do under ``memopt.compile``: the arena is
allocated by the forward and handed to the backward as a saved tensor, so one
layout spans both programs; each ``step_parameter`` node of the backward is bound
to the optimizer's update of its parameter, and AOTAutograd returns no gradient
for it.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from unittest import mock

import torch
from torch import fx
from torch.fx.graph import _BoxedCodeGen
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

from memopt.budget import CODE_SLACK, Budget, format_bytes, parse_budget
from memopt.capture import CapturedStep
from memopt.capture.aot import GraphInput, graph_inputs, joint_step, partition
from memopt.config import PlanConfig, check_lowering, slicing_nothing_by_choice
from memopt.device import DeviceSpec, get_device
from memopt.errors import BudgetInfeasibleError, MemoptError, MemoptWarning
from memopt.fit import fit
from memopt.lower.fusion import inductor_patches
from memopt.lower.inductor import WrapperMemory
from memopt.lower.kernels.compress import with_errors
from memopt.lower.lowering import FXLowering, Lowered, predicted_infeasible
from memopt.lower.optimizer_step import InBackwardSteps
from memopt.passes.optimizer_memory import ParamInfo, optimizer_groups, optimizer_memory
from memopt.passes.order_plan import copy_graph
from memopt.passes.remat_plan import SOLVERS
from memopt.passes.step_in_backward import step_parameter
from memopt.passes.storage import BUFFERS, GRADIENTS, OPTIMIZER_STATE, PARAMETERS
from memopt.pipeline import run_pipeline
from memopt.report.plan import CompileAttempt, MemoryPlan, UpdatePlan
from memopt.sparse_update import check_update

KNOWN_OPTIONS: dict[str, str] = {
    "budget": "the step's byte budget: an int or a string such as '24GB' or '512MiB' (required)",
    "optimizer": "the optimizer that steps these parameters: an instance, a class or (class, kwargs); "
                 "sizes optimizer state (default: none)",
    "device": "a DeviceSpec or preset name for the cost model (default: the graph's device)",
    "solver": f"the remat solver: one of {', '.join(SOLVERS)} (default: memopt)",
    "compiler": "how the planned forward and backward run: 'eager' (generated Python, eager's kernels; "
                "default) or 'inductor'",
    "inductor_options": "Inductor config entries, with compiler='inductor'",
    "offload": "True: activations may go to a host pool when recomputation alone does not fit (as "
               "memopt.compile(..., offload=True)); False or None (default): what the config says (off)",
    "hold_outputs": "True (default): the training loop keeps the model's outputs (logits next to the loss) "
                    "alive through the backward, as `out = model(x); out.loss.backward()` does; False: only the "
                    "loss is kept (`loss = model(x).loss`): outputs other than a scalar come back detached (no "
                    "gradient flows through them, so the backward holds no zero gradient for them), which lets "
                    "memopt plan for less",
    "cache": "True (default): keep remat plans on disk and reuse them for the same graph, shapes, budget and "
             "options (under torch's Inductor cache folder); False: plan every compile; or a folder",
    "chunk_loss": "1 (default): the loss head as traced, bitwise eager; 'kernel': memopt's fused linear + "
                  "cross-entropy; 'auto': over slices of the tokens where "
                  "that fits a budget the traced head cannot, or costs less (exact up to the order of the sums over "
                  "the tokens); a number: that many slices (as memopt.plan(..., chunk_loss=...))",
    "compress": "None (default): exact; 'int8' or 'fp8': saved activations packed between forward and backward "
                "where that fits a budget the exact plan cannot or costs less (as memopt.plan(..., compress=...))",
    "chunk_mlp": "1 (default): the MLP blocks as traced; 'auto' or a number: the up projection, activation and "
                 "down projection over slices of the tokens, as chunk_loss (as memopt.plan(..., chunk_mlp=...))",
    "layout": "True: the graph's intermediates run in one arena, the forward's and the backward's alike (as "
              "memopt.compile(..., layout=True)); compiler='eager' only",
    "update": "'full' (default): train every parameter that requires grad; 'sparse' (with 'calibration'): train "
              "the tensors of the largest summed contribution that fit the budget, chosen on the first compile from "
              "the compiled module and the calibration batches, and freeze the rest in the model (as "
              "memopt.compile(..., update='sparse'); whole tensors, no row slices)",
    "calibration": "update='sparse': a few batches of the fine-tuning data, each as the compiled module takes its "
                   "inputs (a tuple of positional arguments or a dict of keyword arguments); its output is the loss "
                   "or has a .loss",
    "step_in_backward": "True: each parameter is updated inside the backward as soon as its gradient is final, by "
                        "the optimizer instance given as 'optimizer' (as memopt.compile(..., step_in_backward=True)); "
                        "call optimizer.step() after each backward as usual; compiler='eager' only",
    "config": "a memopt.config.PlanConfig with every other knob (time limits, headroom)",
}


@dataclass(frozen=True)
class BackendOptions:
    budget_bytes: int
    optimizer_given: Any = None  # as given; an optimizer instance through a weak reference (see ``session``)
    device: str | DeviceSpec | None = None
    compiler: str = "eager"
    inductor_options: dict[str, Any] = field(default_factory=dict)
    config: PlanConfig = PlanConfig()
    hold_outputs: bool = True
    update: str = "full"
    calibration: tuple = ()  # update="sparse": the batches that score what to train

    @property
    def optimizer(self) -> Any:
        """The optimizer: an instance (None once the caller let go of it), a class, or (class, kwargs)."""
        given = self.optimizer_given
        return given() if isinstance(given, weakref.ref) else given

    @property
    def optimizer_gone(self) -> bool:
        return isinstance(self.optimizer_given, weakref.ref) and self.optimizer_given() is None

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> BackendOptions:
        """Checked options; unknown keys and bad values raise MemoptError naming what is accepted."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(KNOWN_OPTIONS))
        if unknown:
            known = "\n".join(f"  {name}: {what}" for name, what in KNOWN_OPTIONS.items())
            raise MemoptError(f"unknown memopt backend option(s) {', '.join(map(repr, unknown))}; known:\n{known}")
        if options.get("budget") is None:
            raise MemoptError("the memopt backend needs a budget: torch.compile(model, backend='memopt', "
                              "options={'budget': '24GB'})")
        compiler = options.get("compiler", "eager")
        if compiler not in ("eager", "inductor"):
            raise MemoptError(f"unknown compiler {compiler!r}; choose 'eager' or 'inductor'")
        config = options.get("config") or PlanConfig()
        offload = options.get("offload")
        if offload is not None:
            if not isinstance(offload, bool):
                raise MemoptError(f"offload must be True, False or None, got {offload!r}")
            config = dataclasses.replace(config, offload=offload)
        for knob in ("layout", "step_in_backward"):
            if options.get(knob) is not None:
                if not isinstance(options[knob], bool):
                    raise MemoptError(f"{knob} must be True or False, got {options[knob]!r}")
                config = dataclasses.replace(config, **{knob: options[knob]})
        check_lowering(config, inductor=compiler == "inductor", offload=config.offload,
                       optimizer=options.get("optimizer"), fx_name="compiler='eager'",
                       inductor_name="compiler='inductor'")
        config = dataclasses.replace(config, fused_recompute=compiler == "inductor")
        cache = options.get("cache", True)
        if cache is True:
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            cache = os.path.join(cache_dir(), "memopt")
        config = dataclasses.replace(config, cache_dir=cache or None)
        for knob in ("chunk_loss", "chunk_mlp", "compress"):
            if options.get(knob) is not None:
                config = dataclasses.replace(config, **{knob: options[knob]})
        solver = options.get("solver")
        if solver is not None:
            if solver not in SOLVERS:
                raise MemoptError(f"unknown remat solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
            config = dataclasses.replace(config, solver=solver)
        update, calibration = options.get("update", "full"), options.get("calibration")
        check_update(update, calibration)
        optimizer = options.get("optimizer")
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer = weakref.ref(optimizer)
        return cls(parse_budget(options["budget"]), optimizer, options.get("device"), compiler,
                   dict(options.get("inductor_options") or {}), config, bool(options.get("hold_outputs", True)),
                   update, tuple(calibration or ()) if update == "sparse" else ())


@dataclass(frozen=True)
class GraphPlan:
    """One graph the backend planned."""

    frame: tuple  # Dynamo's frame id and the graph's parameters: graphs with one key replace each other
    budget_bytes: int  # the part of the budget this graph planned for
    carried_bytes: int  # what it leaves on the device for later graphs: activations, inputs, outputs
    plan: MemoryPlan
    shapes: tuple[tuple[int, ...], ...]  # of its tensor inputs other than parameters and buffers
    compiled_peak_bytes: int | None = None  # the peak of Inductor's code for it (compiler="inductor")
    code: str = ""  # the joint graph's code: the same graph compiled again is known by it
    options: dict[str, Any] = field(default_factory=dict)  # the compile options of the step that runs


class Session:
    """The graphs one ``torch.compile`` call planned, and the budget they share."""

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        self.graphs: list[GraphPlan] = []
        self.update: UpdatePlan | None = None  # update="sparse": what the first compile chose to train

    def carried_before(self, frame: tuple) -> int:
        """What the graphs that run before a graph of ``frame`` leave on the device while it runs.

        Graphs run in the order they were first compiled; each earlier one holds its
        saved activations, inputs and outputs until its backward (which runs after).
        """
        order = list(dict.fromkeys(g.frame for g in self.graphs))
        before = order[: order.index(frame)] if frame in order else order
        return sum(max(g.carried_bytes for g in self.graphs if g.frame == f) for f in before)

    def same_graph(self, frame: tuple, shapes: tuple, code: str) -> GraphPlan | None:
        """The graph planned before with the same parameters, input shapes and joint graph, if any.

        Dynamo's frame id is left out: a recompile after a guard failed can carry another one.
        """
        key = (frame[1:], shapes, code)
        return next((g for g in reversed(self.graphs) if (g.frame[1:], g.shapes, g.code) == key), None)

    def add(self, graph: GraphPlan) -> None:
        frames = list(dict.fromkeys(g.frame for g in self.graphs))
        same_frame = [g for g in self.graphs if g.frame == graph.frame]
        self.graphs.append(graph)
        total = self.options.budget_bytes
        if same_frame:
            before = same_frame[-1].shapes
            why = (f"for new input shapes {list(graph.shapes)} (planned before for {list(before)})"
                   if graph.shapes != before else "that Dynamo traced again into another graph, same input shapes")
            warnings.warn(f"memopt: re-planned a graph {why}; predicted peak {format_bytes(graph.plan.peak_bytes)}"
                          f" within its {format_bytes(graph.budget_bytes)}", MemoptWarning, stacklevel=2)
        elif frames:
            warnings.warn(f"memopt: the model compiled into {len(frames) + 1} graphs (graph breaks); graph "
                          f"{len(frames) + 1} planned for {format_bytes(graph.budget_bytes)} of the "
                          f"{format_bytes(total)} budget: the rest of the model (parameters, gradients, optimizer "
                          f"state) and what the graphs before it keep hold {format_bytes(total - graph.budget_bytes)} "
                          "while it runs. "
                          "torch.compile(..., fullgraph=True) plans the whole step as one graph", MemoptWarning,
                          stacklevel=2)

    @property
    def plans(self) -> list[MemoryPlan]:
        return [graph.plan for graph in self.graphs]


@dataclass(frozen=True)
class _Entry:
    held: tuple[tuple[str, int], ...]  # what the options dict held, by identity
    session: Session
    options: Any = None  # the dict itself when it holds no optimizer instance: its id is not reused


# One session per options object a torch.compile call was given (it passes the same dict to every graph),
# found by the dict's id and what it holds. The registry holds no optimizer instance (it would keep the
# parameters and optimizer state of every model compiled in the process): only a weak reference, and a
# session whose optimizer is gone goes too.
_SESSIONS: dict[int, _Entry] = {}


def session(options: dict[str, Any] | None) -> Session:
    """The session of the ``torch.compile`` call that was given ``options``."""
    for key in [key for key, entry in _SESSIONS.items() if entry.session.options.optimizer_gone]:
        del _SESSIONS[key]
    held = tuple((name, id(value)) for name, value in (options or {}).items())
    entry = _SESSIONS.get(id(options))
    if entry is None or entry.held != held:
        keep = None if isinstance((options or {}).get("optimizer"), torch.optim.Optimizer) else options
        entry = _SESSIONS[id(options)] = _Entry(held, Session(BackendOptions.parse(options)), keep)
    return entry.session


def plans(options: dict[str, Any]) -> list[MemoryPlan]:
    """The plans memopt made for the ``torch.compile`` call given ``options``, in compile order."""
    return session(options).plans


def memopt_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None
                   ) -> Callable[..., Any]:
    """The torch.compile backend (``backend="memopt"``); ``options`` as ``KNOWN_OPTIONS`` lists them."""
    state = session(options)
    _refuse_fsdp(gm)
    if state.options.update == "sparse" and state.update is None:
        state.update = _choose_update(gm, state.options)
    # a recompile of one frame for other shapes replaces its graph; another graph (a graph break, or the
    # same code run on other parameters) adds one
    frame = (_frame_id(gm), tuple(id(v) for v in example_inputs if isinstance(v, torch.nn.Parameter)))
    # the parts of the model this graph does not hold stay on the device while it runs
    rest = _rest_of_model_bytes(gm, example_inputs, state.options)
    inputs = graph_inputs(gm, example_inputs)  # now: Dynamo drops the sources it names them from after this call
    if any(_is_symbolic(value) for value in example_inputs) or _has_symbolic_shapes(gm):
        return _PerShape(gm, inputs, state, frame, rest)
    return _compile_graph(gm, inputs, list(example_inputs), state, frame, rest)


def _refuse_fsdp(gm: fx.GraphModule) -> None:
    """A graph of a model FSDP2 shards is refused: under ``fully_shard`` Dynamo compiles each unit's forward as a
    graph of its own (one graph for all the blocks alike, run once per block) and can run the root's own layers
    outside any graph, while the parameters it sees are the ones FSDP2 gathered for the moment; no graph the
    backend is handed holds the rank's step, so a per-rank budget could not be kept."""
    from torch.distributed.fsdp import FSDPModule

    for root in _root_modules(gm):
        wrapped = next((name for name, module in root.named_modules() if isinstance(module, FSDPModule)), None)
        if wrapped is not None:
            raise MemoptError(
                f"the memopt backend does not plan a model sharded by FSDP2 ({type(root).__name__}"
                f"{'.' + wrapped if wrapped else ''} is wrapped with fully_shard): Dynamo compiles each unit's "
                "forward as a graph of its own, so no graph the backend sees holds the rank's step. Use "
                "memopt.compile(model, budget=..., optimizer=...) on the fully_shard model: it plans the rank's "
                "whole step and FSDP2 runs it")


def _choose_update(gm: fx.GraphModule, options: BackendOptions) -> UpdatePlan:
    """update="sparse": the tensors the compiled module trains under the budget, chosen as ``memopt.compile``
    chooses them (whole tensors) on its calibration batches; the rest is frozen in the module before AOTAutograd
    traces, so no graph of this compile computes their gradients (where Dynamo's guards on their ``requires_grad``
    compile the frame again, the joint graph is the same and its plan is reused: ``Session.same_graph``)."""
    from memopt.api import _sparse_plan

    roots = _root_modules(gm)
    if len(roots) != 1:
        raise MemoptError("update='sparse' through the backend chooses what to train from the module "
                          "torch.compile compiled, and this graph's parameters come from "
                          f"{len(roots) or 'no'} module(s) of the compiled frame: compile the model itself "
                          "(torch.compile(model, backend='memopt', options=...)), or use "
                          "memopt.compile(model, update='sparse', calibration=[...])")
    model = roots[0]
    plan = _sparse_plan(model, options.calibration[0], list(options.calibration), loss_fn=None,
                        optimizer=options.optimizer, device=options.device, offload=options.config.offload,
                        fake=None, config=options.config, budget_bytes=options.budget_bytes, slices=False)
    assert plan.update is not None
    named = dict(model.named_parameters())
    for tensor in plan.update.tensors:
        if tensor.option == "frozen":
            named[tensor.name].requires_grad_(False)
    return plan.update


def _compile_graph(gm: fx.GraphModule, inputs: list[GraphInput], example_inputs: list[Any], state: Session,
                   frame: tuple, rest: int) -> Callable[..., Any]:
    """Plan one graph and compile it through the fit loop, so that what runs fits the graph's share."""
    options = state.options
    if not options.hold_outputs:
        _detach_outputs(gm)
    traced = _trace_joint(gm, example_inputs, options)
    if not isinstance(traced, _Joint):
        return traced  # without a backward (no_grad, eval), nothing was planned: it runs as traced
    lifted = len(inputs) - len(example_inputs)
    shapes = tuple(tuple(v.shape) for info, v in zip(inputs[lifted:], example_inputs)
                   if info.role == "input" and isinstance(v, torch.Tensor))
    steps = None
    if options.config.step_in_backward:
        values = _lifted(traced.graph, inputs, example_inputs)
        steps = InBackwardSteps(options.optimizer, {i.name: v for i, v in zip(inputs, values)
                                                     if i.role == "parameter" and i.requires_grad})
    lowering = _AOTLowering(gm, example_inputs, options, steps)
    # Dynamo can compile the same graph again for the same shapes (a guard on something else failed): the plan
    # that runs is the same, so it is compiled again as it is, without planning
    again = state.same_graph(frame, shapes, traced.code)
    if again is not None:
        lowered = lowering.lower(again.plan, again.options, reuse=None, limit=0)
        return lowered.executor
    budget = Budget(options.budget_bytes, options.config.headroom, rest + state.carried_before(frame))
    plan_at = _planner(traced, inputs, example_inputs, options, budget)
    if budget.available_bytes <= 0:
        plan_at(1)  # raises the BudgetInfeasibleError of the whole step: this graph's smallest plus what is held
        raise MemoptError(f"the rest of the model and the graphs compiled before this one hold "
                          f"{format_bytes(budget.held_elsewhere_bytes)}, all of the "
                          f"{format_bytes(options.budget_bytes)} budget; compile with fullgraph=True so that memopt "
                          "plans the whole step, or raise the budget")
    fitted = fit(plan_at, budget, lowering)
    chosen = next(a for a in fitted.attempts if a.chosen)
    plan = fitted.plan if state.update is None else dataclasses.replace(fitted.plan, update=state.update)
    state.add(GraphPlan(frame, budget.available_bytes, _carried_bytes(plan), plan, shapes,
                        plan.compiled_peak_bytes, traced.code, chosen.options))
    return fitted.lowered.executor


@dataclass(frozen=True)
class _Joint:
    """The joint forward/backward graph AOTAutograd traced for a Dynamo graph."""

    graph: fx.GraphModule
    num_fwd_outputs: int

    @property
    def code(self) -> str:
        return self.graph.code


class _Traced(Exception):
    """Stops AOTAutograd once it has traced the joint graph, so that memopt plans before anything compiles."""

    def __init__(self, joint: _Joint) -> None:
        super().__init__("memopt: joint graph traced")
        self.joint = joint


def _trace_joint(gm: fx.GraphModule, example_inputs: list[Any], options: BackendOptions
                 ) -> _Joint | Callable[..., Any]:
    """The graph's joint forward/backward, or, when AOTAutograd finds no backward, the graph compiled as it is."""
    def stop(joint: fx.GraphModule, _joint_inputs: Any, *, num_fwd_outputs: int, **_: Any) -> Any:
        raise _Traced(_Joint(joint, num_fwd_outputs))

    try:
        return _aot_compile(gm, example_inputs, options, stop, dict(options.inductor_options), _Memories())
    except _Traced as traced:
        return traced.joint


def _planner(joint: _Joint, inputs: list[GraphInput], example_inputs: list[Any], options: BackendOptions,
             budget: Budget) -> Callable[[int], MemoryPlan]:
    """The joint graph as a step, once, and the function that plans it for ``target`` bytes (an infeasible
    budget named for the whole step)."""
    step = joint_step(joint.graph, joint.num_fwd_outputs, inputs, hold_outputs=options.hold_outputs)
    trained = {i.name: value for i, value in zip(inputs, _lifted(joint.graph, inputs, example_inputs))
               if i.role == "parameter" and i.requires_grad}
    params = [ParamInfo(name, tuple(trained[name].shape), trained[name].element_size()) for name in step.gradients
              if name in trained]
    groups_of = optimizer_groups(options.optimizer, trained)
    spec = get_device(options.device, default="h100" if step.device.type == "cuda" else "cpu")
    held = budget.held_elsewhere_bytes

    errors: dict[str, tuple[float, float]] = {}  # of each tensor a plan packs, on the example inputs

    def plan_at(target: int, *, sliced: bool = True) -> MemoryPlan:
        config = options.config if sliced else slicing_nothing_by_choice(options.config)
        try:
            plan = run_pipeline(step, params=params, optimizer=options.optimizer, groups_of=groups_of, device=spec,
                                budget_bytes=target, config=config)
            # (the joint graph's tangents are read by the backward only, which the measurement does not run)
            values = [*_lifted(joint.graph, inputs, example_inputs), *([None] * (len(step.placeholders) - len(inputs)))]
            return with_errors(plan, values, errors)
        except BudgetInfeasibleError as error:
            if not held:
                raise
            # name the budget the whole step needs: this graph's smallest, plus what it shares the device with
            raise BudgetInfeasibleError(
                options.budget_bytes, error.minimum + held, f"a graph of the compiled model ({error.where})",
                f"this graph needs {format_bytes(error.minimum)} by itself, and the rest of the model and the "
                f"graphs before it hold {format_bytes(held)} while it runs. With graph breaks memopt plans each "
                "graph as it is compiled; torch.compile(..., fullgraph=True) plans the whole step at once and may "
                "need less", proven=error.proven_minimum + held,
                chunked_minimum=None if error.chunked_minimum is None else error.chunked_minimum + held,
                chunk_options=error.chunk_options) from error

    return plan_at


@dataclass(frozen=True)
class _AOTLowering:
    """A plan's joint graph cut into the forward and backward that AOTAutograd runs, compiled by the
    backend's compiler: eager's kernels (the plan's peak), or Inductor (its code's peak, read back)."""

    gm: fx.GraphModule
    example_inputs: list[Any]
    options: BackendOptions
    steps: InBackwardSteps | None = None  # binds the updates of a plan that steps parameters in the backward
    name: str = "aot"

    @property
    def reads_code(self) -> bool:
        return self.options.compiler == "inductor"

    @property
    def code_slack(self) -> float:
        return CODE_SLACK if self.reads_code else 0.0

    @property
    def replans(self) -> int:
        # Inductor compiles are slow: two; eager's kernels compile at once: as many as the FX lowering, which the
        # arena's span needs to come back to the smallest plan it reported
        return 2 if self.reads_code else FXLowering.replans

    @property
    def reclaims(self) -> bool:
        return self.reads_code  # Inductor's code can hold less than its plan; eager's kernels hold the plan

    @property
    def variants(self) -> tuple[dict[str, Any], ...]:
        if not self.reads_code:
            return ({},)
        from memopt.lower.inductor import InductorLowering

        return InductorLowering(self.options.inductor_options).variants

    def lower(self, plan: MemoryPlan, options: dict[str, Any], *, reuse: Lowered | None, limit: int) -> Lowered:
        started = time.perf_counter()
        memories = _Memories()

        def cut(_joint: fx.GraphModule, _joint_inputs: Any, *, num_fwd_outputs: int, **_: Any) -> Any:
            # AOTAutograd traced the same joint graph again: the plan's rewrite of the first is cut instead
            program = plan.program
            assert program is not None
            graph = _with_steps_as_gradients(program.graph, num_fwd_outputs) if program.stepped else program.graph
            forward, backward = partition(graph, program.backward_start, num_fwd_outputs)
            memories.dropped_bytes = _dropped_output_bytes(forward, num_fwd_outputs, program)
            if program.stepped:
                assert self.steps is not None
                _bind_steps(backward, program, self.steps)
            return forward, backward

        check = None if self.steps is None else self.steps.check_before_forward
        compiled = _aot_compile(self.gm, self.example_inputs, self.options, cut, options, memories, check)
        if self.reads_code:
            forward, backward = memories.peaks(plan)
            peak = max(forward, backward, plan.optimizer_peak_bytes)
        else:
            (forward, backward), peak = plan.phase_peaks, plan.peak_bytes
        return Lowered(plan, None, compiled, forward, backward, peak, dict(options), time.perf_counter() - started)

    def infeasible(self, budget: Budget, lowest: int, attempts: tuple[CompileAttempt, ...],
                   below: BudgetInfeasibleError | None) -> BudgetInfeasibleError:
        if not self.reads_code:
            return predicted_infeasible(budget, lowest, attempts, below, "the planned graph")
        from memopt.lower.inductor import InductorBudgetError

        return InductorBudgetError(budget, lowest, attempts, below, self.code_slack)


def _aot_compile(gm: fx.GraphModule, example_inputs: list[Any], options: BackendOptions, partition_fn: Any,
                 inductor: dict[str, Any], memories: _Memories, before_forward: Callable[[], None] | None = None
                 ) -> Callable[..., Any]:
    """``gm`` through AOTAutograd with ``partition_fn`` and memopt's compilers for the forward and backward;
    ``before_forward`` runs before each forward."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch import config as functorch_config

    decompositions = {}
    if options.compiler == "inductor":  # Inductor lowers the graph its own decompositions make
        from torch._inductor.decomposition import select_decomp_table

        from memopt.lower.inductor import DEFAULT_OPTIONS

        with inductor_patches({**DEFAULT_OPTIONS, **inductor}) as patches, torch._inductor.config.patch(patches):
            decompositions = select_decomp_table()  # without the random ops' with fallback_random
    reentry = _Reentry(before_forward)
    forward = partial(_compile_program, compiler=options.compiler, inductor=inductor, memories=memories,
                      part="forward")
    backward = partial(_compile_program, compiler=options.compiler, inductor=inductor, memories=memories,
                       part="backward")
    # AOTAutograd's own cache keys on the joint graph, not on memopt's budget: off, so that a cached
    # compile never reuses a partition planned for another budget. The backward compiles now, not at its
    # first call, so that its code is checked against the budget before anything runs.
    with functorch_config.patch(enable_autograd_cache=False, force_non_lazy_backward_lowering=True):
        return aot_autograd(fw_compiler=lambda g, e: reentry.forward(forward(g, e)),
                            bw_compiler=lambda g, e: reentry.backward(backward(g, e)),
                            inference_compiler=partial(forward, part="inference"), partition_fn=partition_fn,
                            decompositions=decompositions)(gm, example_inputs)


@dataclass
class _Memories:
    """What the compiled forward and backward allocate, read from Inductor's wrapper code."""

    forward: WrapperMemory | None = None
    backward: WrapperMemory | None = None
    tangent_bytes: int = 0
    dropped_bytes: int = 0  # outputs the caller drops after the forward (hold_outputs=False), not saved
    # the forward's outputs that are views of its inputs (a parameter's transpose saved for the backward): the
    # backward deleting them frees nothing, since the caller holds what they view
    input_views: frozenset[str] = frozenset()

    def peaks(self, plan: MemoryPlan) -> tuple[int, int]:
        """The forward's and the backward's peaks with the plan's entry bytes live as the step starts."""
        assert self.forward is not None and self.backward is not None
        entry = plan.entry_bytes
        forward = entry + self.forward.peak_bytes
        backward = entry + self.forward.end_bytes - self.dropped_bytes + self.tangent_bytes + self.backward.peak_bytes
        return forward, backward


class _Reentry:
    """Counts a graph's forwards whose backward has not run yet.

    More than one means the graph runs several times in one step (Dynamo compiles a
    layer once when a graph break sits in the loop over layers), while memopt planned
    it, and the budget around it, as running once: the user is told.
    """

    def __init__(self, before_forward: Callable[[], None] | None = None) -> None:
        self.live = 0
        self.told = False
        self.before_forward = before_forward

    def forward(self, program: Callable[[list], Any]) -> Callable[[list], Any]:
        def run(args: list) -> Any:
            if self.before_forward is not None:
                self.before_forward()
            self.live += 1
            if self.live > 1 and not self.told:
                self.told = True
                warnings.warn("memopt: a compiled graph ran again before its backward (a graph break inside a loop "
                              "over layers makes Dynamo compile one layer and run it for each); memopt planned "
                              "each graph as running once per step, so this step may exceed the budget. Remove the "
                              "graph break (torch.compile(..., fullgraph=True) shows where it is) or use "
                              "memopt.compile", MemoptWarning, stacklevel=2)
            return program(args)

        run._boxed_call = True  # type: ignore[attr-defined]
        return run

    def backward(self, program: Callable[[list], Any]) -> Callable[[list], Any]:
        def run(args: list) -> Any:
            self.live = max(0, self.live - 1)
            return program(args)

        run._boxed_call = True  # type: ignore[attr-defined]
        return run


def _with_steps_as_gradients(joint: fx.GraphModule, num_fwd_outputs: int) -> fx.GraphModule:
    """A copy of ``joint`` whose output returns each ``step_parameter`` node (None when it runs) as its
    parameter's gradient: the partition keeps only what reaches the output, and autograd gets no gradient
    for a parameter the backward has updated."""
    graph = copy_graph(joint.graph)
    primals = graph.find_nodes(op="placeholder")
    output = graph.output_node()
    outputs = list(output.args[0])
    for node in graph.find_nodes(op="call_function", target=step_parameter):
        slot = num_fwd_outputs + primals.index(node.args[0])
        assert outputs[slot] is None, f"the gradient of {node.args[0].name} is still an output"
        outputs[slot] = node
    output.args = (outputs,)
    return fx.GraphModule(joint, graph)


def _bind_steps(backward: fx.GraphModule, program: CapturedStep, steps: InBackwardSteps) -> None:
    """Each ``step_parameter`` node of the backward calls the optimizer's update of its parameter (the saved
    primal keeps the joint graph's placeholder name)."""
    parameter_of = {p.node: p.name for p in program.placeholders if p.role == "parameter"}
    for node in backward.graph.find_nodes(op="call_function", target=step_parameter):
        node.target = steps.update_of(parameter_of[node.args[0].name])
    backward.recompile()


def _dropped_output_bytes(forward: fx.GraphModule, num_fwd_outputs: int, step: CapturedStep) -> int:
    """Bytes of the forward's outputs that the caller drops before the backward and the backward does not read."""
    outputs = pytree.arg_tree_leaves(*forward.graph.output_node().args)
    kept = {step.loss_node, *step.outputs, *(o.name for o in outputs[num_fwd_outputs:] if isinstance(o, fx.Node))}
    dropped = {}
    for node in outputs[:num_fwd_outputs]:
        value = node.meta.get("val") if isinstance(node, fx.Node) else None
        if isinstance(value, torch.Tensor) and node.name not in kept:
            dropped[StorageWeakRef(value.untyped_storage())] = value.untyped_storage().nbytes()
    return sum(dropped.values())


def _detach_outputs(gm: fx.GraphModule) -> None:
    """Outputs of ``gm`` other than scalars come back detached (``hold_outputs=False``).

    AOTAutograd gives every output that requires grad a tangent, and autograd fills
    the tangent of an output the loss does not reach with zeros: logits beside a loss
    would cost a zero tensor of their size in the backward. Detached, they have none.
    """
    output = gm.graph.output_node()
    with gm.graph.inserting_before(output):
        def detach(node: Any) -> Any:
            value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
            if not isinstance(value, torch.Tensor) or not value.requires_grad or value.numel() == 1:
                return node
            detached = gm.graph.call_method("detach", (node,))
            detached.meta["example_value"] = value.detach()
            return detached

        output.args = pytree.tree_map_only(fx.Node, detach, output.args)
    gm.recompile()


def _lifted(joint: fx.GraphModule, inputs: list[GraphInput], example_inputs: list[Any]) -> list[Any]:
    """The values of the primals: lifted parameters and buffers of the Dynamo graph, then its inputs."""
    lifted = len(inputs) - len(example_inputs)
    primals = joint.graph.find_nodes(op="placeholder")[:lifted]
    return [node.meta.get("val") for node in primals] + list(example_inputs)


def _carried_bytes(plan: MemoryPlan) -> int:
    """What a graph leaves for later graphs: all it holds when its forward ends, but the model's own state."""
    timeline = plan.timeline
    last_forward = max((i for i, phase in enumerate(timeline.phases) if phase == "forward"), default=0)
    state = sum(timeline.by_category[c][last_forward] for c in (PARAMETERS, BUFFERS, OPTIMIZER_STATE, GRADIENTS))
    return timeline.totals[last_forward] - state


def _rest_of_model_bytes(gm: fx.GraphModule, example_inputs: Sequence[Any], options: BackendOptions) -> int:
    """Parameters, buffers, gradients and optimizer state of the model that this graph does not hold.

    The model is the module whose attributes the graph's inputs come from (Dynamo's
    frame local, ``self`` of the compiled forward); 0 when there is none to see.
    """
    mine = {id(v) for v in example_inputs if isinstance(v, torch.Tensor)}
    mine |= {id(t) for t in [*gm.parameters(), *gm.buffers()]}
    others: dict[int, torch.Tensor] = {}
    for root in _root_modules(gm):
        for name, tensor in [*root.named_parameters(), *root.named_buffers()]:
            if id(tensor) not in mine:
                others.setdefault(id(tensor), tensor)
    total = 0
    trained = []
    for tensor in others.values():
        total += tensor.untyped_storage().nbytes()
        if isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad:
            total += tensor.nbytes  # its gradient
            trained.append(ParamInfo(str(len(trained)), tuple(tensor.shape), tensor.element_size()))
    if trained and options.optimizer is not None:
        groups = {p.name: 0 for p in trained} if isinstance(options.optimizer, torch.optim.Optimizer) else None
        on_cuda = any(t.device.type == "cuda" for t in others.values())  # the implementation that will run
        total += optimizer_memory(options.optimizer, trained, device_is_cuda=on_cuda, groups_of=groups).state_bytes
    return total


def _root_modules(gm: fx.GraphModule) -> list[torch.nn.Module]:
    """The modules, among the compiled frame's locals, that the graph's inputs are attributes of."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    if tx is None:
        return []
    f_locals = tx.output.root_tx.f_locals
    roots: dict[int, torch.nn.Module] = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        source = getattr(node.meta.get("grapharg"), "source", None)
        while getattr(source, "base", None) is not None:
            source = source.base
        value = f_locals.get(getattr(source, "local_name", None))
        if isinstance(value, torch.nn.Module):
            roots[id(value)] = value
    return list(roots.values())


def _compile_program(gm: fx.GraphModule, example_inputs: Sequence[Any], *, compiler: str,
                     inductor: dict[str, Any], memories: _Memories, part: str) -> Any:
    """A planned forward or backward as the boxed callable AOTAutograd runs (it clears its input list)."""
    if compiler == "inductor":
        from torch._inductor.compile_fx import compile_fx_inner
        from torch._inductor.graph import GraphLowering

        from memopt.lower.inductor import DEFAULT_OPTIONS, wrapper_memory
        from memopt.passes.scratch import measure_calls

        sources: list[str] = []
        # the wrapper code Inductor writes (its hook for reading the code it produced, on a cache hit too)
        with inductor_patches({**DEFAULT_OPTIONS, **inductor}) as patches, torch._inductor.config.patch(patches), \
                mock.patch.object(GraphLowering, "save_output_code", sources.append):
            compiled = compile_fx_inner(gm, example_inputs)
        if part != "inference" and len(sources) == 1:
            # the caller holds the forward's inputs, and so the backward's primals and views of the forward's
            # inputs; the rest die in the program
            placeholders = gm.graph.find_nodes(op="placeholder")
            if part == "forward":
                memories.input_views = _input_views(gm)
            held = [part == "forward" or node.name.startswith("primals") or node.name in memories.input_views
                    for node in placeholders]
            device = next((v.device for v in example_inputs if isinstance(v, torch.Tensor)), torch.device("cpu"))
            setattr(memories, part, wrapper_memory(sources[0], list(example_inputs), held,
                                                   scratch=partial(measure_calls, device=device)))
            if part == "backward":
                memories.tangent_bytes = sum(v.untyped_storage().nbytes() for node, v in zip(placeholders,
                                             example_inputs) if node.name.startswith("tangents")
                                             and isinstance(v, torch.Tensor))
        elif part != "inference":
            raise MemoptError(f"Inductor compiled one program into {len(sources)} graphs; memopt expects one")
        return compiled
    gm.graph.set_codegen(_BoxedCodeGen())  # the generated code drops each input after its last reader
    gm.recompile()
    return gm


def _input_views(forward: fx.GraphModule) -> frozenset[str]:
    """The names of ``forward``'s outputs whose storage is one of its inputs' (their fake values share it)."""
    def storage(node: Any) -> StorageWeakRef | None:
        value = node.meta.get("val") if isinstance(node, fx.Node) else None
        return StorageWeakRef(value.untyped_storage()) if isinstance(value, torch.Tensor) else None

    inputs = {storage(node) for node in forward.graph.find_nodes(op="placeholder")} - {None}
    outputs = pytree.arg_tree_leaves(*forward.graph.output_node().args)
    return frozenset(node.name for node in outputs if storage(node) in inputs)


def _frame_id(gm: fx.GraphModule) -> str:
    compile_id = gm.meta.get("dynamo_compile_id")
    return str(getattr(compile_id, "frame_id", compile_id))


def _is_symbolic(value: Any) -> bool:
    return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool))


def _has_symbolic_shapes(gm: fx.GraphModule) -> bool:
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        if isinstance(value, (torch.SymInt, torch.SymFloat)):
            return True
        if isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape):
            return True
    return False


class _PerShape:
    """A graph with dynamic shapes, planned anew for each distinct shape on its first call."""

    def __init__(self, gm: fx.GraphModule, inputs: list[GraphInput], state: Session, frame: tuple, rest: int
                 ) -> None:
        self.gm, self.inputs, self.state, self.frame, self.rest = gm, inputs, state, frame, rest
        self.compiled: dict[tuple, Callable[..., Any]] = {}

    def __call__(self, *args: Any) -> Any:
        key = tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
        if key not in self.compiled:
            self.compiled[key] = _compile_graph(self.gm, self.inputs, list(args), self.state, self.frame,
                                                self.rest)
        return self.compiled[key](*args)
