"""What an op does to memory and randomness, read from its schema and tags (never from name lists)."""

from __future__ import annotations

import torch
from torch import fx
from torch.utils import _pytree as pytree


# Batch-norm ops whose schemas do not mark the running statistics they update in training as written
_aten = torch.ops.aten
_UNMARKED_RUNNING_STATS = {
    _aten.native_batch_norm.default, _aten.cudnn_batch_norm.default, _aten.miopen_batch_norm.default,
    _aten._batch_norm_impl_index.default, _aten.batch_norm.default,
}


def mutates(node: fx.Node) -> bool:
    """The op writes one of its inputs in place (its schema marks an argument as written)."""
    schema = getattr(node.target, "_schema", None)
    return (schema is not None and schema.is_mutable) or bool(_running_stats(node))


def _running_stats(node: fx.Node) -> list[fx.Node]:
    """The running mean and variance a batch norm op updates without its schema saying so (training)."""
    return running_stats_read_to_update(node) if node.target in _UNMARKED_RUNNING_STATS else []


# Batch-norm ops that take running statistics: in training their results come from the batch alone
_BATCH_NORMS = _UNMARKED_RUNNING_STATS | {_aten._native_batch_norm_legit.default,
                                          _aten._native_batch_norm_legit_functional.default}


def running_stats_read_to_update(node: fx.Node) -> list[fx.Node]:
    """The running statistics a batch norm in training reads only to update them.

    Its output and saved batch statistics do not depend on them, so the op replays
    without them (``without_running_stats``) and the statistics update once, in the forward.
    """
    if node.target not in _BATCH_NORMS:
        return []
    names = [a.name for a in node.target._schema.arguments]
    value = dict(zip(names, node.args)) | dict(node.kwargs)
    if not value.get("training"):
        return []
    return [v for v in (value.get("running_mean"), value.get("running_var")) if isinstance(v, fx.Node)]


def without_running_stats(node: fx.Node) -> tuple[object, tuple, dict]:
    """The op, args and kwargs that compute a training batch norm's results without touching its running
    statistics: the same kernel with none given (on CPU bitwise the same results), its update results dropped."""
    arguments = node.target._schema.arguments
    value = dict(zip([a.name for a in arguments], node.args)) | dict(node.kwargs)
    stats = ("running_mean", "running_var")
    if all(isinstance(a.type, torch.OptionalType) for a in arguments if a.name in stats):
        return node.target, tuple(None if a.name in stats else value[a.name] for a in arguments), {}
    # _native_batch_norm_legit(_functional) takes them as tensors: its no_stats overload is the same kernel
    no_stats = _aten._native_batch_norm_legit.no_stats
    return no_stats, tuple(value[a.name] for a in no_stats._schema.arguments), {}


def is_random(node: fx.Node) -> bool:
    """The op draws from a random generator: running it again gives other values.

    Attention ops carry the random tag for their dropout; with ``dropout_p`` 0 their kernels
    never touch the generator (the CPU flash kernel refuses any other value), so they replay exactly."""
    if torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ()):
        return False
    return _argument(node, "dropout_p", default=None) != 0


def replays_from_generator_state(node: fx.Node) -> bool:
    """A random op that draws the same numbers when run again from the generator state saved before it.

    An aten op on the CPU default generator (no generator passed), with a tensor input to order the
    saved state after; in-place random fills qualify only as ``fresh_random_fill`` says. Other devices'
    generators and explicit generators are not replayed (their draws are kept)."""
    if not is_random(node) or not isinstance(node.target, torch._ops.OpOverload) or node.target.namespace != "aten":
        return False
    if _argument(node, "generator", default=None) is not None or not node.all_input_nodes:
        return False
    values = [arg.meta.get("val") for arg in node.all_input_nodes] + [node.meta.get("val")]
    tensors = [t for t in pytree.tree_leaves(values) if isinstance(t, torch.Tensor)]
    return bool(tensors) and all(t.device.type == "cpu" for t in tensors)


def fresh_random_fill(node: fx.Node) -> tuple[object, tuple] | None:
    """For ``bernoulli_(empty_like(x), p)`` (dropout's noise on CPU), the functional op and args that draw the
    same numbers from the same state, ``bernoulli.p(x, p)``; None for anything else.

    ``bernoulli.p`` fills a new contiguous tensor the way the pair does, so the values match where the
    buffer is contiguous."""
    empty = node.args[0] if node.target is _aten.bernoulli_.float and node.args else None
    p = _argument(node, "p", default=None)  # (left out of the node when it is the schema's default, 0.5)
    if (not isinstance(empty, fx.Node) or empty.target is not _aten.empty_like.default or empty.kwargs
            or len(empty.args) != 1 or not isinstance(p, float) or not replays_from_generator_state(node)):
        return None
    value = empty.meta.get("val")
    if not isinstance(value, torch.Tensor) or not value.is_contiguous():
        return None
    return _aten.bernoulli.p, (empty.args[0], p)


def _argument(node: fx.Node, name: str, default: object) -> object:
    """The value ``node`` passes for its schema's argument ``name`` (``default`` if none)."""
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    if name not in names:
        return default
    index = names.index(name)
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, schema.arguments[index].default_value)


def written_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs the op writes in place (its schema marks them ``Tensor(a!)``)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.is_mutable:
        return _running_stats(node)
    written = []
    for i, argument in enumerate(schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(argument.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        written.extend(v for v in values if isinstance(v, fx.Node))
    return written
