"""The optimizer step inside the backward: each parameter updated as soon as its gradient is final.

Without it the step holds every gradient until ``optimizer.step()``, with the
optimizer state and the step's temporaries on top. With it, a ``step_parameter``
node reads a parameter and its gradient right after the last node that reads
either (so nothing reads the parameter once it has changed, and the gradient is
final), and the gradient is freed there. The graph no longer returns those
gradients; the lowering binds each node to the user's optimizer
(``memopt.lower.runner.StepRunner.bind_steps``), which updates that parameter
alone, with eager's own code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

from torch import fx

from memopt.capture import CapturedStep
from memopt.errors import MemoptError
from memopt.passes.optimizer_memory import OptimizerMemory
from memopt.passes.order_plan import copy_graph
from memopt.passes.storage import shares_storage


def step_parameter(parameter: object, gradient: object) -> None:
    """Marks where the optimizer updates ``parameter`` from ``gradient``; the lowering binds it to the optimizer."""
    raise MemoptError("a step_parameter node ran unbound: the graph of a plan with step_in_backward=True runs "
                      "through memopt.compile, which binds it to the optimizer")


def steps_in_backward(step: CapturedStep, parameters: Collection[str]) -> CapturedStep:
    """``step`` with the named parameters (those the optimizer holds) updated in its backward."""
    graph = fx.GraphModule(step.graph, copy_graph(step.graph.graph))
    by_name = {node.name: node for node in graph.graph.nodes}
    placeholder = {p.name: by_name[p.node] for p in step.placeholders if p.role == "parameter"}
    stepped = [name for name in step.gradients if name in parameters]
    output = graph.graph.output_node()
    for name in stepped:
        gradient = by_name[step.gradients[name]]
        with graph.graph.inserting_before(output):
            node = graph.graph.call_function(step_parameter, (placeholder[name], gradient))
        node.meta["val"] = None
        output.args = fx.node.map_arg(output.args, lambda arg, gradient=gradient: None if arg is gradient else arg)
    sink_steps(graph)
    return dataclasses.replace(step, graph=graph, stepped={**step.stepped, **{n: step.gradients[n] for n in stepped}},
                               gradients={n: g for n, g in step.gradients.items() if n not in stepped})


def sink_steps(graph: fx.GraphModule) -> None:
    """Moves each ``step_parameter`` node to right after the last node that reads its parameter (or a view of
    it) or its gradient: nothing reads a parameter once it has changed. Call again after a rewrite adds readers."""
    nodes = list(graph.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    steps = [node for node in nodes if node.target is step_parameter]
    for node in steps:
        parameter, gradient = node.args
        value = parameter.meta.get("val")
        views = [n for n in nodes if n is parameter or (n.op == "call_function" and n.target is not step_parameter
                                                         and shares_storage(n.meta.get("val"), value))]
        readers = [user for view in (*views, gradient) for user in view.users
                   if user.op != "output" and user.target is not step_parameter]
        last = max([*readers, gradient], key=position.__getitem__)
        last.append(node)
    graph.graph.lint()
    graph.recompile()


def step_temporaries(graph: fx.GraphModule, step: CapturedStep, optimizer: OptimizerMemory) -> tuple[int, ...]:
    """Per node: the bytes a ``step_parameter`` node's update allocates and frees inside itself."""
    name_of = {p.node: p.name for p in step.placeholders}
    return tuple(optimizer.temporaries_by_param.get(name_of.get(node.args[0].name, ""), 0)
                 if node.target is step_parameter else 0 for node in graph.graph.nodes)
