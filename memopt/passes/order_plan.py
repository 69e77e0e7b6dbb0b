"""Turn a captured step into an order problem, and a solved order back into a graph.

Dependencies are the graph's own edges, plus the orders a reordering must not
change: every op that writes a storage stays between the reads before and after
it, and random ops keep their relative order (each draws from the generator).
"""

from __future__ import annotations

from torch import fx

from memopt.passes.op_kinds import is_random, mutates
from memopt.passes.storage import StorageTable
from memopt.solvers.order import OrderProblem, OrderSolution, solve_order


def order_problem(graph: fx.GraphModule, table: StorageTable) -> OrderProblem:
    nodes = list(graph.graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    edges: set[tuple[int, int]] = set()
    last = len(nodes) - 1  # the output node comes last
    for i, node in enumerate(nodes):
        edges.update((index[arg], i) for arg in node.all_input_nodes)
        if i != last:
            edges.add((i, last))
    for i, node in enumerate(nodes):
        if mutates(node):
            for key in table.touched[i]:
                edges.update((r, i) for r in table.readers[key] if r < i)
                edges.update((i, r) for r in table.readers[key] if r > i)
    random_ops = [i for i, node in enumerate(nodes) if is_random(node)]
    edges.update(zip(random_ops, random_ops[1:]))
    storages = table.storages
    return OrderProblem(
        num_nodes=len(nodes),
        sizes=tuple(s.nbytes for s in storages),
        producers=tuple(s.defined_at for s in storages),
        users=table.readers,
        is_output=tuple(s.is_output for s in storages),
        edges=tuple(sorted(edges)),
    )


def plan_order(graph: fx.GraphModule, table: StorageTable, *, time_limit_s: float) -> OrderSolution:
    """A topological order of the step with a peak no higher than the traced one."""
    return solve_order(order_problem(graph, table), time_limit_s=time_limit_s)


def reorder(graph: fx.GraphModule, order: tuple[int, ...]) -> fx.GraphModule:
    """A copy of ``graph`` whose nodes run in ``order`` (placeholders first, the output last)."""
    nodes = list(graph.graph.nodes)
    ordered = [nodes[i] for i in order]
    ordered = [n for n in ordered if n.op == "placeholder"] + [
        n for n in ordered if n.op not in ("placeholder", "output")
    ] + [n for n in ordered if n.op == "output"]
    return fx.GraphModule(graph, copy_graph(graph.graph, ordered))


def copy_graph(graph: fx.Graph, nodes: list[fx.Node] | None = None) -> fx.Graph:
    """A new graph with copies of ``nodes`` (default: all, in order), names and metadata kept."""
    copy = fx.Graph()
    copy._codegen = graph._codegen
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes if nodes is None else nodes:
        env[node] = copy.node_copy(node, lambda arg: env[arg])
    copy.lint()
    return copy
