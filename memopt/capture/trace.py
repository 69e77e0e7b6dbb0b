"""Capture: module + example inputs + loss -> one joint forward/backward ATen graph.

The training step's forward, loss and backward (``torch.autograd.grad`` of the loss
with respect to every trainable parameter) are traced with ``make_fx`` over fake
tensors, so nothing is computed and no real memory is allocated: a model whose
parameters live on the meta device (a 7B model on a laptop) is captured the same
way. Every node carries its fake tensor in ``node.meta["val"]``.

The graph is traced in eager's own execution order (the autograd engine runs
inside the trace), and in-place ATen ops stay in place, so liveness over it
models the eager step.
"""

from __future__ import annotations

import time
from functools import partial
from dataclasses import dataclass, field
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import DTensor
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from memopt.errors import CaptureError, LossNotScalarError, ModelForwardError

if TYPE_CHECKING:
    from memopt.passes.sharding import Sharding

InputRole = Literal["parameter", "buffer", "input", "tangent"]  # tangent: a gradient fed to the backward


@dataclass(frozen=True, slots=True)
class Placeholder:
    """What a graph input is: a parameter or buffer (by its qualified name) or a user input."""

    node: str
    role: InputRole
    name: str  # qualified parameter/buffer name, or the input's pytree path
    requires_grad: bool = False


@dataclass(frozen=True)
class CapturedStep:
    """The joint graph of one training step and what its inputs and outputs are."""

    graph: fx.GraphModule
    placeholders: tuple[Placeholder, ...]
    loss_node: str
    gradients: dict[str, str]  # parameter name -> the graph node holding its gradient
    backward_start: str  # first node of the backward (everything before it is the forward and loss)
    device: torch.device
    fake: bool  # planned from shapes alone (meta-device model or fake=True)
    seconds: float
    outputs: tuple[str, ...] = ()  # other nodes the step returns (live to its end), besides loss and gradients
    mutated_inputs: tuple[str, ...] = ()  # placeholders written after the forward (AOTAutograd's input mutations)
    # parameters the optimizer updates inside the backward -> their gradient's node (freed there, not returned)
    stepped: dict[str, str] = field(default_factory=dict)
    # FSDP2 runs the step sharded over ranks: the storages are planned as one rank holds them (memopt.passes.sharding)
    sharding: Sharding | None = None



def capture(
    model: nn.Module,
    example_inputs: tuple | list | dict | torch.Tensor,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    fake: bool | None = None,
    trainable: Collection[str] | None = None,
    compute_dtypes: Mapping[str, torch.dtype] | None = None,
) -> CapturedStep:
    """Trace the training step of ``model`` on ``example_inputs`` into a joint ATen graph.

    ``example_inputs`` is a tuple of positional arguments or a dict of keyword
    arguments. Without ``loss_fn`` the model's output must be a scalar loss or have
    a ``.loss`` (Hugging Face outputs). ``trainable`` names the parameters the step
    trains (a sparse update's choice; by default every one that requires grad): the
    others are traced frozen, so the backward computes no gradient for them and
    nothing that only they need. ``compute_dtypes``: parameters the step reads in
    another dtype than they are held in (FSDP2's ``MixedPrecisionPolicy.param_dtype``),
    traced in that dtype. The model is never modified.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"memopt plans an nn.Module; got {type(model).__name__}")
    args, kwargs = _split_inputs(example_inputs)
    on_meta = any(t.device.type == "meta" for t in _module_tensors(model))
    if fake is False and on_meta:
        raise CaptureError(
            "the model has parameters on the meta device, so it can only be planned from shapes; "
            "pass fake=True (or leave fake unset)"
        )
    # The trace always runs on fake tensors (a real model's are made from its own, sharing no
    # storage), so planning never computes or allocates; `fake` records that no real data exists.
    fake = bool(fake) or on_meta

    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    wanted_names = set(params) if trainable is None else set(trainable)
    trainable = [name for name, p in params.items() if p.requires_grad and name in wanted_names]
    trained = set(trainable)
    if not trainable:
        raise CaptureError("the model has no parameter that requires grad, so there is no training step to plan")

    def joint(param_values: list[torch.Tensor], buffer_values: list[torch.Tensor], inputs: tuple):
        state = {**dict(zip(params, param_values)), **dict(zip(buffers, buffer_values))}
        call_args, call_kwargs = inputs
        try:
            output = torch.func.functional_call(model, state, tuple(call_args), call_kwargs, strict=False)
            loss = _loss_of(output, loss_fn)
        except (LossNotScalarError, CaptureError):
            raise
        except Exception as exc:  # the user's code failed: say where and what to change
            raise ModelForwardError(
                f"the model's forward{' or loss_fn' if loss_fn else ''} raised {type(exc).__name__}: {exc}\n"
                "check that example_inputs match what model.forward expects (shapes, dtypes, argument "
                "names) and that the model runs eagerly on them"
            ) from exc
        wanted = [state[name] for name in trainable]
        grads = torch.autograd.grad(loss, wanted, allow_unused=True)
        return loss, list(grads)

    started = time.perf_counter()
    # Meta tensors become fake CPU tensors, so that the kernels chosen (attention above all) are
    # the ones a real step runs, not the meta device's reference decompositions.
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_of = partial(_fake, mode)
    dtypes = compute_dtypes or {}
    param_inputs = [fake_of(p, dtypes.get(name)).requires_grad_(name in trained) for name, p in params.items()]
    buffer_inputs = [fake_of(b) for b in buffers.values()]
    inputs = pytree.tree_map_only(torch.Tensor, fake_of, (args, kwargs))
    was_training = model.training
    try:
        with _tracing_context():
            graph = make_fx(joint, tracing_mode="fake")(param_inputs, buffer_inputs, inputs)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - started

    placeholder_nodes = [n for n in graph.graph.nodes if n.op == "placeholder"]
    roles: list[tuple[InputRole, str, bool]] = (
        [("parameter", name, name in trained) for name in params]
        + [("buffer", name, False) for name in buffers]
        + [("input", pytree.keystr(path), False) for path, _ in pytree.tree_flatten_with_path((args, kwargs))[0]]
    )
    if len(roles) != len(placeholder_nodes):
        raise CaptureError(f"traced {len(placeholder_nodes)} graph inputs, expected {len(roles)}")
    placeholders = tuple(
        Placeholder(node.name, role, name, grad) for node, (role, name, grad) in zip(placeholder_nodes, roles)
    )
    output_node = graph.graph.output_node()
    # (from the graph's code generator: under a torch.compile backend make_fx returns a lazy GraphModule, whose
    # _out_spec is set only when its code is first generated)
    out_spec = graph.graph._codegen.pytree_info.out_spec  # type: ignore[attr-defined]
    loss_node, grad_nodes = pytree.tree_unflatten(list(output_node.args[0]), out_spec)
    gradients = {name: node.name for name, node in zip(trainable, grad_nodes) if node is not None}
    device = _step_device(param_inputs + buffer_inputs + pytree.tree_leaves(inputs))
    return CapturedStep(
        graph=graph,
        placeholders=placeholders,
        loss_node=loss_node.name,
        gradients=gradients,
        backward_start=_first_backward_node(graph, loss_node),
        device=device,
        fake=fake,
        seconds=seconds,
    )


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(
        f"example_inputs must be a tuple of positional arguments or a dict of keyword arguments; "
        f"got {type(example_inputs).__name__}"
    )


def _loss_of(output: Any, loss_fn: Callable[[Any], torch.Tensor] | None) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(output)
        source = "loss_fn(output)"
    elif isinstance(output, torch.Tensor):
        loss, source = output, "the model's output"
    elif getattr(output, "loss", None) is not None:
        loss, source = output.loss, "the model's output.loss"
    else:
        raise LossNotScalarError(
            f"the model returned {type(output).__name__} with no .loss; pass loss_fn=... that turns the "
            "output into a scalar loss (or, for a Hugging Face model, pass labels in example_inputs)"
        )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise LossNotScalarError(
            f"{source} must be a scalar tensor to train on, got shape {shape}; reduce it "
            "(e.g. .mean()) or pass loss_fn=... that does"
        )
    if not loss.requires_grad:
        raise LossNotScalarError(f"{source} does not depend on any trainable parameter, so there is no backward")
    return loss


def _tracing_context():
    # Trace as a torch.compile session does (the compiling flag, not the exporting one): library
    # code that skips data-dependent checks while compiling (Hugging Face's packed-sequence and
    # mask checks) skips them here too, and still picks the kernels eager picks (is_causal SDPA).
    return torch.compiler._compile_session_context()


def _module_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def _fake(mode: FakeTensorMode, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fake tensor like ``tensor`` (in ``dtype``, if given); one on the meta device becomes a fake CPU tensor, and
    a sharded one (FSDP2's DTensor parameters) the whole tensor it stands for, which the computation reads once
    gathered."""
    detached = tensor.detach()
    if isinstance(tensor, DTensor) or (dtype is not None and dtype != tensor.dtype):
        with mode:
            return torch.empty(tensor.shape, dtype=dtype or tensor.dtype,
                               device="cpu" if tensor.device.type == "meta" else tensor.device)
    if tensor.device.type != "meta":
        return mode.from_tensor(detached)
    with mode:
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu")


def _step_device(tensors: list) -> torch.device:
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            return tensor.device
    return torch.device("cpu")


def _first_backward_node(graph: fx.GraphModule, loss: fx.Node) -> str:
    """Where autograd starts: the loss's ones_like seed (else the first op after the loss)."""
    nodes = list(graph.graph.nodes)
    for user in loss.users:
        if user.target is torch.ops.aten.ones_like.default:
            return user.name
    index = nodes.index(loss)
    for node in nodes[index + 1 :]:
        if node.op == "call_function":
            return node.name
    return nodes[-1].name
