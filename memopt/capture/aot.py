"""AOTAutograd's joint graph as memopt's captured step, and memopt's partition of it.

Inside the torch.compile backend, Dynamo hands memopt one graph of the user's
code and AOTAutograd traces its forward and backward into one functionalized
joint graph: placeholders ``primals_*`` (the graph's inputs, in Dynamo's order)
and ``tangents_*`` (the gradients of its outputs), the forward's nodes, then
the backward's, and the outputs: the forward's, then a gradient per primal.
``joint_step`` describes that graph as a ``CapturedStep`` so that memopt's
passes (ledger, liveness, remat) read it as they read their own capture;
``partition`` cuts the rewritten joint graph (recomputations placed before
their first backward reader) into the forward and backward modules AOTAutograd
runs, saving what the backward reads from the forward and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch._functorch.partitioners import _extract_fwd_bwd_modules, is_sym_node
from torch.utils import _pytree as pytree

from memopt.capture.trace import CapturedStep, InputRole, Placeholder
from memopt.errors import CaptureError


@dataclass(frozen=True, slots=True)
class GraphInput:
    """What one input of a Dynamo graph is: a parameter, a buffer or a plain input."""

    role: InputRole
    name: str  # qualified name for parameters and buffers ("layers.0.attn.weight"), else the source's name
    requires_grad: bool


_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]")


def graph_inputs(gm: fx.GraphModule, example_inputs: Sequence[object]) -> list[GraphInput]:
    """The roles and names of the primals AOTAutograd makes from ``gm`` and its example inputs.

    Parameters and buffers Dynamo kept as attributes of ``gm`` are lifted first, as
    ``aot_module_simplified`` does; then one input per placeholder, named from its
    Dynamo source (``L['self']._modules['layers']._modules['0']._parameters['weight']``
    becomes ``layers.0.weight``).
    """
    lifted = [GraphInput("parameter", name, p.requires_grad) for name, p in gm.named_parameters(remove_duplicate=False)]
    lifted += [GraphInput("buffer", name, False) for name, _ in gm.named_buffers(remove_duplicate=False)]
    placeholders = gm.graph.find_nodes(op="placeholder")
    inputs = []
    for node, value in zip(placeholders, example_inputs):
        source = getattr(node.meta.get("grapharg"), "source", None)
        source_name = source.name if isinstance(getattr(source, "name", None), str) else node.name
        requires_grad = isinstance(value, torch.Tensor) and value.requires_grad
        if isinstance(value, nn.Parameter):
            role: InputRole = "parameter"
        elif "._buffers[" in source_name:
            role = "buffer"
        else:
            role = "input"
        name = _qualified(source_name) if role != "input" else source_name
        inputs.append(GraphInput(role, name, requires_grad))
    return lifted + inputs


def _qualified(source_name: str) -> str:
    """``L['self']._modules['h']._modules['0']._parameters['w']`` -> ``h.0.w``."""
    rest = source_name.split("]", 1)[1] if source_name.startswith("L[") else source_name
    parts = [next(g for g in match.groups() if g) for match in _SOURCE_PART.finditer(rest)]
    return ".".join(parts) or source_name


def joint_step(joint: fx.GraphModule, num_fwd_outputs: int, inputs: Sequence[GraphInput], *,
               hold_outputs: bool = True) -> CapturedStep:
    """The joint graph as a CapturedStep: roles of its placeholders, its gradients, where the backward starts.

    ``hold_outputs``: the caller keeps the graph's outputs (the logits next to a loss)
    alive through the backward, as ``out = model(x); out.loss.backward()`` does; else
    an output other than a scalar (the loss) is dropped once the forward no longer reads it.
    """
    placeholders = joint.graph.find_nodes(op="placeholder")
    primals = [n for n in placeholders if n.name.startswith("primals")]
    tangents = [n for n in placeholders if n.name.startswith("tangents")]
    if len(primals) != len(inputs):
        raise CaptureError(f"AOTAutograd's joint graph has {len(primals)} primals for {len(inputs)} graph inputs; "
                           "memopt cannot tell parameters from inputs in it (tensor subclasses and functionalized "
                           "RNG are not supported by the memopt backend)")
    roles = [Placeholder(n.name, i.role, i.name, i.requires_grad) for n, i in zip(primals, inputs)]
    roles += [Placeholder(n.name, "tangent", n.name) for n in tangents]
    output_node = joint.graph.output_node()
    outputs = pytree.arg_tree_leaves(*output_node.args)
    # inputs the user's code changes in place: AOTAutograd returns their new values and writes them back
    # after the forward, so the backward (and a recomputation) would read the new value
    descs = pytree.arg_tree_leaves(output_node.meta.get("desc", [None] * len(outputs)))
    mutated = {getattr(getattr(d, "mutated_input", None), "idx", None) for d in descs[:num_fwd_outputs]}
    mutation_outputs = {i for i, d in enumerate(descs[:num_fwd_outputs]) if hasattr(d, "mutated_input")}
    mutated_inputs = tuple(n.name for i, n in enumerate(primals) if i in mutated)
    forward_outputs = [o for o in outputs[:num_fwd_outputs] if isinstance(o, fx.Node)]
    backward_outputs = outputs[num_fwd_outputs:]
    gradients: dict[str, str] = {}
    other: list[str] = [o.name for i, o in enumerate(outputs[:num_fwd_outputs]) if isinstance(o, fx.Node)
                        and (hold_outputs or i in mutation_outputs or _numel(o) == 1)]
    for info, grad in zip(inputs, backward_outputs):
        if not isinstance(grad, fx.Node):
            continue
        if info.role == "parameter":
            gradients[info.name] = grad.name
        else:
            other.append(grad.name)  # the gradient of an input (an activation from an earlier graph)
    nodes = list(joint.graph.nodes)
    start = next((n for n in nodes if n.op == "call_function" and n.meta.get("partitioner_tag") == "is_backward"),
                 None)
    if start is None:
        raise CaptureError("the joint graph has no backward node; nothing to plan")
    position = {node: i for i, node in enumerate(nodes)}
    forward_tensors = [o for o in forward_outputs if position[o] < position[start] and o.op != "placeholder"
                       and o.name in other]
    loss = max(forward_tensors, key=position.__getitem__, default=nodes[position[start] - 1])
    device = next((v.device for n in placeholders if isinstance(v := n.meta.get("val"), torch.Tensor)),
                  torch.device("cpu"))
    return CapturedStep(
        graph=joint,
        placeholders=tuple(roles),
        loss_node=loss.name,
        gradients=gradients,
        backward_start=start.name,
        device=device,
        fake=False,
        seconds=0.0,
        outputs=tuple(name for name in other if name != loss.name),
        mutated_inputs=mutated_inputs,
    )


def _numel(node: fx.Node) -> int:
    value = node.meta.get("val")
    return value.numel() if isinstance(value, torch.Tensor) else 1


def partition(program: fx.GraphModule, backward_start: str, num_fwd_outputs: int
              ) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The forward and backward modules of a (rewritten) joint graph, cut at ``backward_start``.

    The saved set is every forward value a backward node reads: after the recompute
    rewrite, the inputs of the recomputations instead of the values they recompute.
    """
    nodes = list(program.graph.nodes)
    cut = next(i for i, node in enumerate(nodes) if node.name == backward_start)
    backward = set(nodes[cut:])
    for node in nodes[cut:]:
        if node.op == "call_function":  # recomputations are copies of forward nodes: they run in the backward
            node.meta["partitioner_tag"] = "is_backward"
    saved_values: list[fx.Node] = []
    saved_sym_nodes: list[fx.Node] = []
    for node in nodes[:cut]:
        if node.name.startswith("tangents") or not any(user in backward for user in node.users):
            continue
        if is_sym_node(node):
            saved_sym_nodes.append(node)
        elif isinstance(node.meta.get("val"), torch.Tensor):
            saved_values.append(node)
        else:
            raise CaptureError(f"the backward reads {node.format_node()}, which memopt cannot save")
    forward, backward_module = _extract_fwd_bwd_modules(program, saved_values, saved_sym_nodes,
                                                        num_fwd_outputs=num_fwd_outputs)
    forward.graph.eliminate_dead_code()
    backward_module.graph.eliminate_dead_code()
    forward.recompile()
    backward_module.recompile()
    return forward, backward_module
