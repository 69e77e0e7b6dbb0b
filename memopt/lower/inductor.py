"""Run a planned step's two programs as Inductor-compiled code: the Inductor path.

``InductorStep(runner)`` compiles the forward and the backward of a
``StepRunner`` separately with ``torch._inductor.compile_fx.compile_fx``. Each
program becomes a GraphModule whose one placeholder is the list of its inputs;
AOTAutograd functionalizes it in inference mode (``bernoulli_``, BatchNorm's
running statistics and ``num_batches_tracked``, an input changed in place: all
written back once, in the graph) and Inductor fuses it, recomputation included.
The list is the boxed calling convention: the compiled code clears it and drops
each input after its last reader, so the backward frees the saved set as it
goes, as the FX path does, and may write a result into a saved tensor's buffer
after its last reader, as AOTAutograd lets a training backward (``_donations``).
An input the code never reads (Inductor's decompositions leave some unread)
would stay bound to its name until the code returns: it goes in as an empty
tensor (``CompiledProgram.run``). The forward returns the saved set in the
layouts its kernels made, as AOTAutograd leaves a training forward's saved
tensors, and the backward is compiled for them: in the traced layouts, a
channels-last convolution output would be copied back in the forward and again
for each of its readers in the backward.

Three Inductor settings differ from its defaults (``DEFAULT_OPTIONS``):
``fallback_random`` (dropout draws from aten's generator in eager's order, so
masks equal eager's), and both reordering passes off, because memopt's order is
the plan: ``reorder_for_locality`` moves a producer next to its first reader,
so the saved tensors it reads live longer (the MLP example's step peaked 50%
over its budget with it), and ``reorder_for_peak_memory`` picks an order by its
own estimate (Llama's, 10% over at the smallest budget). That pass still runs,
with no order to try, since Inductor's buffer reuse reads the sizes it sets
(``memopt.lower.fusion.inductor_patches``).

What the compiled code allocates is read back from its wrapper code (the
``call`` function Inductor writes): ``wrapper_memory`` replays its allocations,
reuses and ``del``s on fake tensors and gives the program's peak above its
entry, so ``InductorStep.predicted_peak_bytes`` is the step's peak as Inductor
runs it, not as the plan's FX graph would. Host copies (``memopt::offload``'s
results, in the host pool) are not device memory: the replay counts them apart
(``WrapperMemory.host_bytes``), as ``memopt.measure_peak`` and the plan do.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
import re
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any
from unittest import mock

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from memopt.budget import CODE_SLACK, Budget, budget_for_peak
from memopt.errors import BudgetInfeasibleError, MemoptError
from memopt.lower.fusion import FUSION_WINDOW, inductor_patches
from memopt.lower.lowering import Lowered
from memopt.lower.offload_ops import HOST_RESULT_OPS
from memopt.lower.rng_ops import RUN_WITH_RNG_STATE
from memopt.lower.runner import StepRunner, run_step
from memopt.passes.op_kinds import written_inputs
from memopt.passes.scratch import call_signature, measurable, measure_calls
from memopt.report.plan import CompileAttempt

log = logging.getLogger(__name__)

DEFAULT_OPTIONS: dict[str, Any] = {
    "fallback_random": True,  # aten's RNG, in eager's order: dropout masks equal eager's
    "reorder_for_locality": False,  # memopt's order is the plan (see the module's docstring)
    "reorder_for_peak_memory": False,
}


@dataclass(frozen=True, slots=True)
class WrapperMemory:
    """Bytes a compiled program's wrapper code allocates and frees, relative to what was live at its entry."""

    peak_bytes: int  # highest live bytes above the entry (inputs freed on the way count negative)
    end_bytes: int  # live bytes above the entry after it returned: its outputs, less the inputs it freed
    timeline: tuple[int, ...]  # live bytes above the entry after each statement that changed them
    peak_statement: str  # the statement after which the peak is reached
    unsized: tuple[str, ...]  # assignments whose result could not be sized (counted as no bytes)
    host_bytes: int = 0  # bytes of host copies (memopt::offload's results) the program made: not in the above
    returned: tuple[Any, ...] = ()  # what the code returns, as fake tensors: its layouts and shared storages


@dataclass(frozen=True, slots=True)
class CompiledProgram:
    """One program as Inductor compiled it."""

    fn: Callable[[list], Sequence[torch.Tensor]]  # boxed: clears the list it is given
    source: str  # the wrapper code Inductor wrote
    memory: WrapperMemory
    options: dict[str, Any]  # the Inductor config it was compiled under
    seconds: float
    unread: tuple[int, ...] = ()  # inputs its code never reads (``unread_inputs``)
    examples: tuple[Any, ...] = ()  # the inputs it was compiled for (fake): its code asserts their layouts

    def run(self, values: list) -> list[torch.Tensor]:
        """The program's outputs from ``values`` (emptied). The unread inputs go in as empty tensors: the
        code's names would hold them to its end, where the list was their last holder."""
        for index in self.unread:
            if isinstance(values[index], torch.Tensor):
                values[index] = values[index].new_empty(0)
        return list(self.fn(values))


class InductorStep:
    """A StepRunner's forward and backward compiled by Inductor, for ``run_inductor_step``.

    ``options`` are Inductor config entries on top of ``DEFAULT_OPTIONS``. A program
    given (``forward``, ``backward``: compiled before, for the same runner) is used as
    it is. Compiling takes seconds to a minute per program on CPU; the examples are
    the nodes' fake values, so nothing runs until the step does.
    """

    def __init__(self, runner: StepRunner, options: dict[str, Any] | None = None, *,
                 forward: CompiledProgram | None = None, backward: CompiledProgram | None = None) -> None:
        self.runner = runner
        options = dict(options or {})
        self.forward_inputs = list(runner.placeholders)
        self.backward_inputs = runner.backward_inputs
        # the caller keeps the placeholders alive (parameters, buffers, inputs), and so every view of them
        outside = {_storage_key(node.meta["val"]) for node in runner.placeholders
                   if isinstance(node.meta.get("val"), torch.Tensor)}
        saved_forward = set(runner.saved_forward)
        held = [node not in saved_forward or not isinstance(node.meta.get("val"), torch.Tensor)
                or _storage_key(node.meta["val"]) in outside for node in self.backward_inputs]
        # the backward's inputs in the host pool (the forward's offloads): no device bytes when they go
        pooled = {_storage_key(node.meta["val"]) for node in runner.forward.nodes if node.target in HOST_RESULT_OPS}
        host = [isinstance(node.meta.get("val"), torch.Tensor) and _storage_key(node.meta["val"]) in pooled
                for node in self.backward_inputs]
        compile_forward = partial(compile_program, runner.forward.nodes, self.forward_inputs, runner.forward.outputs,
                                  held=[True] * len(self.forward_inputs), options=options)
        self.forward = forward or compile_forward(free_layouts=True)
        examples = self._backward_examples()
        if examples is None:  # a layout the replay could not read: the forward returns the traced ones
            self.forward = compile_forward()
            examples = [_example(node) for node in self.backward_inputs]
        if backward is not None and not _same_layouts(backward.examples, examples):
            backward = None  # compiled for the saved set as another forward laid it out
        self.backward = backward or compile_program(runner.backward.nodes, self.backward_inputs,
                                                    runner.backward.outputs, held=held, options=options, host=host,
                                                    examples=examples)

    def _backward_examples(self) -> list[Any] | None:
        """The backward's inputs as the forward's code returns them: the saved set in the layouts its kernels
        made (a convolution's channels-last output stays channels-last, where the trace's layout would cost a
        copy in the forward and one per reader in the backward), the rest as traced. None where the replay
        of the forward's code returned something else than the trace says."""
        runner, returned = self.runner, self.forward.memory.returned
        if len(returned) != 1 + len(runner.saved_forward):
            return None
        made = dict(zip([runner.loss, *runner.saved_forward], returned))
        examples = []
        for node in self.backward_inputs:
            traced = _example(node)
            if node not in made:
                examples.append(traced)
                continue
            value = made[node]
            if isinstance(traced, torch.Tensor) != isinstance(value, torch.Tensor) or (
                    isinstance(traced, torch.Tensor) and (value.shape, value.dtype) != (traced.shape, traced.dtype)):
                return None
            examples.append(value if isinstance(value, torch.Tensor) else traced)
        return examples

    @property
    def compile_seconds(self) -> float:
        return self.forward.seconds + self.backward.seconds

    def run_forward(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """The loss and the saved set from the placeholders' ``values`` (the list is emptied)."""
        return self.forward.run(values)

    def run_backward(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """The gradients (``runner.grad_nodes`` order) from ``values`` in ``backward_inputs`` order (emptied)."""
        return self.backward.run(values)

    def peaks(self, entry_bytes: int) -> tuple[int, int]:
        """The forward's and the backward's peaks, with ``entry_bytes`` live when the forward starts."""
        forward = entry_bytes + self.forward.memory.peak_bytes
        # autograd makes the loss's gradient (the seed) before the backward starts
        seed = self.runner.seed.meta["val"].untyped_storage().nbytes()
        backward = entry_bytes + self.forward.memory.end_bytes + seed + self.backward.memory.peak_bytes
        return forward, backward

    def predicted_peak_bytes(self, entry_bytes: int, after_bytes: int = 0) -> int:
        """The step's peak as the compiled code runs it.

        ``entry_bytes`` is what is live when the forward starts (parameters, buffers,
        inputs, optimizer state: ``plan.entry_bytes``); ``after_bytes`` the peak after
        the backward (the optimizer step's, from the plan's timeline).
        """
        return max(*self.peaks(entry_bytes), after_bytes)


# ---------------------------------------------------------------------------------------------------
# Keeping the compiled step under the budget

# Inductor passes that can lengthen what the plan keeps alive, turned off in this order when the
# compiled code would break the budget (each rung a whole set of options, cheapest first):
# - a kernel fusing nodes far apart runs where the first was, and what the others read is made before it:
#   fusions at most 4 nodes apart keep Llama's LM-head gradient ahead of the recomputed last block
#   (``memopt.lower.fusion``; it costs few fusions);
# - post-grad pattern matching rewrites add(mm(a, b), c) into addmm(c, a, b) at the add: on GPT-2
#   with tied embeddings that kept the logits' gradient alive through the whole backward;
# - a fused kernel allocates all its outputs before it runs, where eager frees one temporary
#   before making the next: smaller kernels bring Llama's MLP backward back to the plan.
FALLBACK_OPTIONS: tuple[dict[str, Any], ...] = (
    {FUSION_WINDOW: 4},
    {"pattern_matcher": False},
    {"pattern_matcher": False, FUSION_WINDOW: 4},
    {"pattern_matcher": False, FUSION_WINDOW: 4, "max_fusion_size": 4},
)


class InductorBudgetError(BudgetInfeasibleError):
    """Inductor's code for the step breaks the budget, whatever memopt turned off or re-planned.

    ``minimum`` is the smallest budget Inductor's code was seen to meet (its lowest peak and the
    lowering's ``slack`` beside it, plus what is held beside the step), not the plans' own.
    """

    def __init__(self, budget: Budget, predicted: int, attempts: tuple[CompileAttempt, ...],
                 below: BudgetInfeasibleError | None = None, slack: float = 0.0) -> None:
        self.predicted, self.attempts = predicted, attempts
        targets = [a.target_bytes for a in attempts]
        why = (f"Inductor's code for this step peaks at {predicted:,} B at best after {len(attempts)} compile(s) "
               f"(passes off: {', '.join(map(str, FALLBACK_OPTIONS))}; plans made for {min(targets):,} B to "
               f"{max(targets):,} B)")
        if below is not None:
            why += f"; no keep/recompute plan of the traced ops goes below {below.proven_minimum:,} B"
        why += ". Or run the planned FX graphs instead (backend='fx')"
        super().__init__(budget.total_bytes, budget_for_peak(predicted, slack) + budget.held_elsewhere_bytes,
                         "Inductor's code for the step",
                         why, proven=None if below is None else below.proven_minimum)


@dataclass(frozen=True)
class InductorLowering:
    """The plan's two programs compiled by Inductor; the step's peak is read from the code it wrote.

    ``options`` are Inductor config entries on top of ``DEFAULT_OPTIONS``; the variants turn off, in
    order, the passes of ``FALLBACK_OPTIONS``. ``compile_step`` compiles a runner (``InductorStep``'s
    signature).
    """

    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    compile_step: Callable[..., InductorStep] = InductorStep
    name: str = "inductor"
    reads_code: bool = True
    code_slack: float = CODE_SLACK
    reclaims: bool = True
    replans: int = 2

    @property
    def variants(self) -> tuple[dict[str, Any], ...]:
        return (dict(self.options), *({**self.options, **extra} for extra in FALLBACK_OPTIONS))

    def lower(self, plan: Any, options: dict[str, Any], *, reuse: Lowered | None, limit: int) -> Lowered:
        started = time.perf_counter()
        runner = reuse.runner if reuse is not None else StepRunner(plan.program)
        # the programs of the same plan compiled before that fit are kept; the one over is compiled again
        programs = {}
        if reuse is not None and reuse.forward_peak_bytes <= limit:
            programs["forward"] = reuse.executor.forward
        if reuse is not None and reuse.backward_peak_bytes <= limit:
            programs["backward"] = reuse.executor.backward
        step = self.compile_step(runner, options, **programs)
        forward, backward = step.peaks(plan.entry_bytes)
        peak = max(forward, backward, plan.optimizer_peak_bytes)
        return Lowered(plan, runner, step, forward, backward, peak, dict(options), time.perf_counter() - started)

    def infeasible(self, budget: Budget, lowest: int, attempts: tuple[CompileAttempt, ...],
                   below: BudgetInfeasibleError | None) -> BudgetInfeasibleError:
        return InductorBudgetError(budget, lowest, attempts, below, self.code_slack)


def compile_program(nodes: Sequence[fx.Node], inputs: Sequence[fx.Node], outputs: Sequence[fx.Node], *,
                    held: Sequence[bool], options: dict[str, Any], host: Sequence[bool] | None = None,
                    examples: Sequence[Any] | None = None, free_layouts: bool = False) -> CompiledProgram:
    """Compile one program with Inductor and read what its code allocates.

    ``held[i]`` says whether something outside the program keeps input ``i`` alive
    (a parameter, the forward's inputs); the others die with the program's last reader,
    and the code may write its own results into their buffers once it has read them
    (``_donations``).
    ``host[i]``: input ``i`` is in the host pool (a host copy), not device memory.
    ``examples``: the inputs as they will come (fake tensors; by default the nodes' traced values).
    ``free_layouts``: the outputs take the layouts Inductor's kernels make, not the trace's
    (``keep_output_stride`` off, as AOTAutograd leaves a training forward's saved tensors);
    ``memory.returned`` gives them.
    """
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.graph import GraphLowering

    examples = [_example(node) for node in inputs] if examples is None else [
        value.detach() if isinstance(value, torch.Tensor) else value for value in examples]
    host = [False] * len(inputs) if host is None else list(host)
    donated, views = _donations(nodes, inputs, outputs, examples, held, host)
    module = program_module(nodes, inputs, outputs, views=views)
    sources: list[str] = []
    started = time.perf_counter()
    # AOTAutograd lifts the module's tensors (the constants the get_attr nodes read) into the wrapper's
    # inputs, ahead of the program's; the module holds them, so they are never freed
    lifted = _lifted_examples(module, examples)
    # the wrapper code, on a cache hit too (Inductor's hook for reading the code it produced)
    chosen = {**DEFAULT_OPTIONS, **options}
    layouts = {"keep_output_stride": False} if free_layouts else {}
    with (torch.no_grad(), mock.patch.object(GraphLowering, "save_output_code", sources.append),
          inductor_patches({**chosen, **layouts}, [len(lifted) + index for index in donated]) as patches):
        compiled = compile_fx(module, [examples], config_patches=patches)
    seconds = time.perf_counter() - started
    if len(sources) != 1:
        raise MemoptError(f"Inductor compiled one program into {len(sources)} graphs; memopt expects one")
    unread = unread_inputs(sources[0])
    device = next((t.device for t in examples if isinstance(t, torch.Tensor)), torch.device("cpu"))
    memory = wrapper_memory(sources[0], [*lifted, *examples], [True] * len(lifted) + list(held),
                            host=[False] * len(lifted) + host, unread=unread,
                            scratch=partial(measure_calls, device=device))
    if memory.unsized:
        log.warning("could not size %d allocation(s) of the compiled code: %s", len(memory.unsized),
                    "; ".join(memory.unsized[:3]))
    unread_of_program = tuple(index - len(lifted) for index in unread if index >= len(lifted))
    return CompiledProgram(compiled, sources[0], memory, chosen, seconds, unread_of_program, tuple(examples))


def _donations(nodes: Sequence[fx.Node], inputs: Sequence[fx.Node], outputs: Sequence[fx.Node],
               examples: Sequence[Any], held: Sequence[bool],
               host: Sequence[bool]) -> tuple[tuple[int, ...], dict[int, tuple[int, Any]]]:
    """The inputs whose buffers the code may reuse, and the inputs it reads as views of another.

    An input is donated, as AOTAutograd donates a backward's saved tensors, where nothing outside
    holds its storage (no input on it is ``held``), it is device memory, and neither an output nor a
    write of the program's is on it. Inductor then writes a result into it after its last reader:
    Llama's backward puts the logits' gradient in the saved log-probabilities' buffer, where a fresh
    one would live beside them. Inductor tracks each input's readers alone, so of the inputs on one
    donated storage the first is donated, and each other is made from it in the program
    (``as_strided``: the same elements) and goes in unread.
    """
    def storage(value: Any) -> int | None:
        return _storage_key(value) if isinstance(value, torch.Tensor) else None

    def traced(node: Any) -> int | None:
        return storage(node.meta.get("val")) if isinstance(node, fx.Node) else None

    written = {traced(node) for node in [*outputs, *(w for node in nodes for w in written_inputs(node))]}
    written.discard(None)
    on_storage: dict[int, list[int]] = {}
    for index, example in enumerate(examples):
        if storage(example) is not None:
            on_storage.setdefault(storage(example), []).append(index)
    donated, views = [], {}
    for indices in on_storage.values():
        if any(held[i] or host[i] or traced(inputs[i]) in written for i in indices):
            continue
        first, *others = indices
        donated.append(first)
        for index in others:
            value = examples[index]
            views[index] = (first, (tuple(value.shape), value.stride(), value.storage_offset()))
    return tuple(sorted(donated)), views


def _same_layouts(compiled_for: Sequence[Any], given: Sequence[Any]) -> bool:
    """Whether inputs laid out as ``given`` pass the layout checks of code compiled for ``compiled_for``."""
    def layout(value: Any) -> Any:
        return (tuple(value.shape), value.stride(), value.storage_offset()) if isinstance(value, torch.Tensor) else None

    return len(compiled_for) == len(given) and all(layout(a) == layout(b) for a, b in zip(compiled_for, given))


def _lifted_examples(module: fx.GraphModule, examples: Sequence[Any]) -> list[torch.Tensor]:
    """Fake copies of the tensors AOTAutograd lifts from ``module`` into the compiled code's inputs, in its
    order (``aot_module_simplified``: parameters, then buffers)."""
    tensors = [*dict(module.named_parameters(remove_duplicate=False)).values(),
               *dict(module.named_buffers(remove_duplicate=False)).values()]
    if not tensors:
        return []
    mode = _fake_mode(examples)
    return [mode.from_tensor(tensor.detach()) for tensor in tensors]


@torch.library.custom_op("memopt::bernoulli_like", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def bernoulli_like(like: torch.Tensor, p: float) -> torch.Tensor:
    """``torch.empty_like(like).bernoulli_(p)``, eager's dropout mask drawn as eager draws it, as one op."""
    return torch.empty_like(like).bernoulli_(p)


@bernoulli_like.register_fake
def _bernoulli_like_fake(like: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty_like(like)


def _opaque_random_fills(graph: fx.Graph) -> None:
    """Replace ``empty_like(x)`` then ``bernoulli_(p)`` by ``memopt::bernoulli_like(x, p)``.

    Inductor, given the pair, may fuse a reader of the mask into the kernel that makes the empty
    buffer, ahead of the in-place draw: the reader sees no mask (NaN, measured on the tests' GPT-2
    at its smallest budget). One op with a fresh result leaves nothing to misorder."""
    for node in list(graph.nodes):
        empty = node.args[0] if node.target is torch.ops.aten.bernoulli_.float and not node.kwargs else None
        if (not isinstance(empty, fx.Node) or empty.target is not torch.ops.aten.empty_like.default
                or empty.kwargs or len(empty.args) != 1 or len(node.args) > 2):
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        if any(order[user] < order[node] for user in empty.users):
            continue  # the empty buffer is read before the draw fills it: leave it as it is
        p = node.args[1] if len(node.args) == 2 else 0.5  # (the trace leaves out p at the schema's default)
        with graph.inserting_before(node):
            fill = graph.call_function(torch.ops.memopt.bernoulli_like.default, (empty.args[0], p))
        fill.meta = dict(node.meta)
        node.replace_all_uses_with(fill)
        empty.replace_all_uses_with(fill)
        graph.erase_node(node)
        graph.erase_node(empty)


def _contiguous_lone_cats(graph: fx.Graph) -> None:
    """Replace a ``cat`` of one tensor and empty ones by a clone in the layout the trace gave the cat.

    Inductor's decomposition drops the empty inputs and clones the one left, which keeps its
    strides, where eager's ``cat`` returns a new contiguous tensor. A ``view`` the trace recorded
    of the cat's result then cannot be made: T5's attention views keys concatenated onto an
    empty cache, transposed."""
    for node in list(graph.nodes):
        if node.target is not torch.ops.aten.cat.default or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        values = [tensor.meta.get("val") if isinstance(tensor, fx.Node) else None for tensor in tensors]
        if not all(isinstance(value, torch.Tensor) for value in values):
            continue
        # the inputs the decomposition drops, by its own test
        kept = [tensor for tensor, value in zip(tensors, values)
                if not (value.dim() == 1 and value.shape[0] == 0)
                and not (-value.dim() <= dim < value.dim() and value.shape[dim] == 0)]
        result = node.meta["val"]
        if len(kept) != 1 or kept[0].meta["val"].dtype != result.dtype:
            continue
        if result.is_contiguous():
            layout = torch.contiguous_format
        elif result.is_contiguous(memory_format=torch.channels_last):
            layout = torch.channels_last
        else:
            continue
        with graph.inserting_before(node):
            clone = graph.call_function(torch.ops.aten.clone.default, (kept[0],), {"memory_format": layout})
        clone.meta = dict(node.meta)
        node.replace_all_uses_with(clone)
        graph.erase_node(node)


def program_module(nodes: Sequence[fx.Node], inputs: Sequence[fx.Node], outputs: Sequence[fx.Node], *,
                   root: torch.nn.Module | None = None,
                   views: dict[int, tuple[int, Any]] | None = None) -> fx.GraphModule:
    """A GraphModule of ``nodes`` whose one placeholder is the list of ``inputs``, returning ``outputs``.

    The placeholder is marked ``steal_arg``: Inductor's wrapper clears the caller's
    list, so the compiled code alone holds the inputs and frees each after its last reader.
    Dropout's random fill becomes one op (``_opaque_random_fills``), and a ``cat`` of one
    non-empty tensor a contiguous clone (``_contiguous_lone_cats``).

    ``views[i] = (j, (size, stride, offset))``: input ``i`` is read as that view of input ``j``
    (on the same storage), and not from the list.

    ``root`` holds what the ``get_attr`` nodes read (the constants tracing made of tensors
    the model created, such as T5's); by default, the module that owns the nodes' graph.
    """
    if root is None:
        root = next((node.graph.owning_module for node in nodes if node.graph.owning_module is not None), None)
    reads = [node for node in nodes if node.op == "get_attr"]
    if reads and root is None:
        raise MemoptError(f"{reads[0].format_node()} reads an attribute, but no module owns its graph; "
                          "pass the module that holds it as program_module's root")
    graph = fx.Graph()
    boxed = graph.placeholder("inputs")
    boxed.meta["steal_arg"] = True
    env: dict[fx.Node, fx.Node] = {}
    views = views or {}
    for i, node in enumerate(inputs):
        if i not in views:
            env[node] = graph.call_function(operator.getitem, (boxed, i))
            env[node].meta = dict(node.meta)
    for i, (base, layout) in views.items():
        env[inputs[i]] = graph.call_function(torch.ops.aten.as_strided.default, (env[inputs[base]], *layout))
        env[inputs[i]].meta = dict(inputs[i].meta)
    for node in nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(tuple(env[node] for node in outputs))
    _opaque_random_fills(graph)
    _contiguous_lone_cats(graph)
    graph.lint()
    # GraphModule copies from root only the attributes the get_attr nodes name
    return fx.GraphModule(root if reads else torch.nn.Module(), graph)


def _example(node: fx.Node) -> Any:
    """The node's fake value, detached: the programs run without autograd (inside an autograd.Function)."""
    value = node.meta["val"]
    return value.detach() if isinstance(value, torch.Tensor) else value


# ---------------------------------------------------------------------------------------------------
# What the compiled code allocates, read from its wrapper


_COMMENT = re.compile(r"\s+#\s*(reuse|alias)\s*$")
_ASSIGN = re.compile(r"^([A-Za-z_]\w*)\s*=\s*(.+)$")
_UNPACK = re.compile(r"^([\w\s,]+)=\s*args$")


def wrapper_memory(source: str, inputs: Sequence[Any], held: Sequence[bool], *,
                   host: Sequence[bool] | None = None, unread: Sequence[int] = (),
                   scratch: Callable[[list[tuple[Any, tuple, dict]]], list[int]] | None = None) -> WrapperMemory:
    """Replay the ``call`` function of Inductor's wrapper code on fake tensors and count the bytes it holds.

    Every assignment is evaluated on fake tensors (allocations, reinterpretations,
    fallback kernels); a result on a storage not seen before is an allocation of the
    storage's bytes, and a storage is freed when no name holds it, nor the argument
    list (until ``args.clear()``), nor the caller (``held``), nor the returned tuple.
    Kernel calls write into buffers already counted, so they are skipped. Bytes are
    storage nbytes, the units the CPU profiler counts in.

    Host copies are not device memory: the results of ``HOST_RESULT_OPS``
    (``memopt::offload``, a view of the host pool) and the inputs ``host`` marks
    count no bytes; the bytes the program's offloads copy out are ``host_bytes``.
    The inputs ``unread`` lists are not bound to their names (``CompiledProgram.run``
    passes empty tensors for them): they go with the argument list.

    A fallback kernel can allocate workspace and free it before it returns (the CPU
    attention backward does). ``scratch`` (``memopt.passes.scratch.measure_calls``)
    gives each op call's such bytes; they count on top of what is live once the
    call's results are held.
    """
    lines = _call_body(source)
    mode = _fake_mode(inputs)
    host_results = _HostResults()
    names: dict[str, Any] = {}
    refs: dict[int, int] = {}  # storage -> how many holders (names, the args list, the caller)
    size: dict[int, int] = {}
    keep: list[Any] = []  # every value made, so that no storage key is reused while replaying
    live = peak = 0
    peak_statement = ""
    timeline: list[int] = []
    unsized: list[str] = []
    calls: list[tuple[int, str, list[Hashable]]] = []  # live after, statement, its op calls' signatures
    returned: tuple[Any, ...] = ()
    distinct: dict[Hashable, tuple[Any, tuple, dict]] = {}  # the op calls by signature

    def storages(value: Any) -> set[int]:
        return {_storage_key(t) for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)}

    def hold(value: Any) -> None:
        nonlocal live, peak
        keep.append(value)
        for tensor in pytree.tree_leaves(value):
            if isinstance(tensor, torch.Tensor) and _storage_key(tensor) not in size:
                in_pool = _storage_key(tensor) in host_results.storages
                size[_storage_key(tensor)] = 0 if in_pool else tensor.untyped_storage().nbytes()
                live += size[_storage_key(tensor)]
        for key in storages(value):
            refs[key] = refs.get(key, 0) + 1
        peak = max(peak, live)

    def release(value: Any) -> None:
        nonlocal live
        for key in storages(value):
            refs[key] -= 1
            if refs[key] == 0:
                live -= size[key]

    for tensor, in_pool in zip(inputs, host or [False] * len(inputs)):
        if in_pool and isinstance(tensor, torch.Tensor):
            host_results.storages.add(_storage_key(tensor))
    for tensor, is_held in zip(inputs, held):
        hold(tensor)  # the args list
        if is_held:
            hold(tensor)
    live = peak = 0  # the inputs were live before the call: bytes are counted above the entry
    namespace = _namespace()
    with mode, host_results:
        for line in lines:
            for statement in (s.strip() for s in _COMMENT.sub("", line).split(";")):
                before = live
                if statement == "args.clear()":
                    for tensor in inputs:
                        release(tensor)
                elif unpack := _UNPACK.match(statement):
                    targets = [t.strip() for t in unpack.group(1).split(",") if t.strip()]
                    if len(targets) != len(inputs):
                        raise MemoptError(f"the compiled code takes {len(targets)} inputs, the program "
                                          f"{len(inputs)}; memopt cannot read its memory")
                    for index, (target, tensor) in enumerate(zip(targets, inputs)):
                        if index not in unread:
                            names[target] = tensor
                            hold(tensor)
                elif statement.startswith("del "):
                    for target in (t.strip() for t in statement[4:].split(",")):
                        if target not in names:
                            unsized.append(f"del {target}: a name the replay never bound")
                        release(names.pop(target, None))
                elif statement.startswith("return "):
                    result = _evaluate(statement[len("return "):], namespace, names)
                    returned = tuple(result)
                    hold(result)
                    for value in list(names.values()):
                        release(value)
                    names.clear()
                elif assign := _ASSIGN.match(statement):
                    target, expression = assign.groups()
                    try:
                        value = _evaluate(expression, namespace, names)
                    # an op with no fake kernel, a name the replay does not know: say which, count nothing
                    except (RuntimeError, NotImplementedError, NameError, TypeError) as error:
                        unsized.append(f"{statement[:120]} ({type(error).__name__})")
                        value = None
                    if target in names:
                        release(names.pop(target))
                    names[target] = value
                    hold(value)
                    if host_results.calls:
                        signatures = [call_signature(*call) for call in host_results.calls]
                        distinct.update(zip(signatures, host_results.calls))
                        calls.append((live, statement, signatures))
                if live != before:
                    timeline.append(live)
                    if live == peak and live > before:
                        peak_statement = statement
                host_results.calls = []
    if scratch is not None and calls:
        measured = dict(zip(distinct, scratch(list(distinct.values()))))
        for live_after, statement, signatures in calls:
            extra = max(measured[signature] for signature in signatures)
            if live_after + extra > peak:
                peak, peak_statement = live_after + extra, f"{statement} (with {extra} bytes of its scratch)"
    return WrapperMemory(peak, live, tuple(timeline), peak_statement, tuple(unsized), host_results.nbytes, returned)


class _HostResults(TorchDispatchMode):
    """Sees every op the replay runs, and keeps the storages of ``HOST_RESULT_OPS``' results: host copies.

    ``calls``: the calls that compute tensors and could have scratch (``measurable``) since the replay
    last emptied it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.storages: set[int] = set()
        self.nbytes = 0  # bytes of the host copies made
        self.calls: list[tuple[Any, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        computes = any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(result)) and not func.is_view
        if computes and func not in HOST_RESULT_OPS and measurable(args, kwargs or {}):
            self.calls.append((func, args, kwargs or {}))
        if func in HOST_RESULT_OPS:
            for tensor in pytree.tree_leaves(result):
                if isinstance(tensor, torch.Tensor) and _storage_key(tensor) not in self.storages:
                    self.storages.add(_storage_key(tensor))
                    self.nbytes += tensor.untyped_storage().nbytes()
        return result


@RUN_WITH_RNG_STATE.py_impl(_HostResults)
def _replay_seen(mode: _HostResults, rng_state: torch.Tensor, op: Any, *args: Any, **kwargs: Any) -> Any:
    """A random op replayed from a saved generator state (``memopt.lower.rng_ops``) is sized as the op itself:
    the state only picks the numbers."""
    return mode.__torch_dispatch__(op, (), args, kwargs)


def unread_inputs(source: str) -> tuple[int, ...]:
    """The inputs the ``call`` of Inductor's wrapper code unpacks and never names again (but to ``del`` them).

    Inductor's decompositions can leave an input unread (``nll_loss_backward`` reads only the
    shape of the log-probabilities it is given), and the name it was unpacked to holds it until
    ``call`` returns: on Llama's backward, a logits-sized tensor through the whole backward.
    """
    lines = _call_body(source)
    for at, line in enumerate(lines):
        if unpack := _UNPACK.match(line):
            targets = [t.strip() for t in unpack.group(1).split(",") if t.strip()]
            read = set(re.findall(r"[A-Za-z_]\w*", " ".join(text for text in lines[at + 1:]
                                                             if not text.startswith("del "))))
            return tuple(index for index, target in enumerate(targets) if target not in read)
    return ()


def _call_body(source: str) -> list[str]:
    """The statements of ``def call(self, args)`` (or ``def call(args)``), one per line."""
    lines = source.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s*def call\((self, )?args\):", line):
            indent = len(line) - len(line.lstrip()) + 4
            body = []
            for text in lines[i + 1:]:
                if text.strip() and len(text) - len(text.lstrip()) < indent:
                    break
                stripped = text.strip()
                if stripped and not stripped.startswith("#"):
                    body.append(stripped)
            return body
    raise MemoptError("no `def call(args)` in the compiled code; memopt cannot read its memory")


def _namespace() -> dict[str, Any]:
    from torch._inductor.select_algorithm import extern_kernels

    def empty_strided(size: Sequence[int], stride: Sequence[int], dtype: torch.dtype, device: str = "cpu"):
        return torch.empty_strided(tuple(size), tuple(stride), dtype=dtype, device=device)

    def reinterpret_tensor(base: torch.Tensor, size: Sequence[int], stride: Sequence[int], offset: int = 0):
        try:
            return base.as_strided(tuple(size), tuple(stride), base.storage_offset() + offset)
        except RuntimeError:  # out of the fake storage's bounds: the storage is what counts
            return base

    return {
        "torch": torch, "aten": torch.ops.aten, "math": math, "inf": math.inf, "nan": math.nan,
        "device": torch.device, "extern_kernels": extern_kernels, "reinterpret_tensor": reinterpret_tensor,
        "empty_strided_cpu": empty_strided, "empty_strided": empty_strided,
        "empty_strided_cuda": partial(empty_strided, device="cuda"),
    }


def _evaluate(expression: str, namespace: dict[str, Any], names: dict[str, Any]) -> Any:
    return eval(expression, namespace, names)  # code Inductor just wrote, run on fake tensors


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _fake_mode(inputs: Sequence[Any]) -> FakeTensorMode:
    from torch._guards import detect_fake_mode

    return detect_fake_mode(list(inputs)) or FakeTensorMode(allow_non_fake_inputs=True)


# ---------------------------------------------------------------------------------------------------
# The training step, autograd-driven


def run_inductor_step(step: InductorStep, values: list[torch.Tensor]) -> torch.Tensor:
    """The loss of the compiled step on ``values`` (parameters, buffers, inputs, in placeholder order)."""
    return run_step(step.runner, values, executor=step)
