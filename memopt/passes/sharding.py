"""Per-rank memory under FSDP2 (``fully_shard``): what each rank holds as the engine runs the step.

memopt plans around FSDP2 and changes none of its collectives. The step is traced
unsharded (the computation is the same on every rank, on its own part of the batch);
this pass turns its storage table into one rank's, as FSDP2 holds memory
(torch/distributed/fsdp/_fully_shard, read for torch 2.13, and checked against the
profiler on two gloo processes in tests/test_sharding.py):

- every parameter of a unit lives as its dim-0 shard, padded to a multiple of the
  world size (``ceil(rows / world) * row bytes``), and so does its gradient once the
  unit's reduce-scatter ran; optimizer state is on the shards (the planner gives the
  optimizer model the shards' shapes);
- a unit's parameters are gathered whole (the all-gather's output, then the
  unsharded parameters copied out of it) for its forward and again for its backward;
  the root unit's stay gathered from the first forward to the end of the backward;
- in the forward the all-gather output of a unit is held until the next unit's
  copy-out (implicit prefetch); in the backward, each unit's pre-backward prefetches
  the next unit's all-gather;
- a unit's gradients exist whole until its post-backward, whose reduce-scatter input
  (the gradients copied into one flat buffer) is held until the next unit's
  post-backward frees it (``reduce_scatter_max_input_buffers`` = 1);
- under a ``MixedPrecisionPolicy`` the shards, their gradients and the optimizer state
  keep the parameters' dtype; what is gathered, computed and saved is in
  ``param_dtype``, the reduce-scatter runs in ``reduce_dtype`` (by default the
  compute dtype), and its output is cast to the parameters' dtype beside itself.

A unit's forward and backward spans are the graph's nodes that read its parameters
(and, in the backward, make its gradients), so a recompute rewrite that moves a
forward op into the backward keeps it inside its unit's backward span, where FSDP2
gathers the parameters anyway: a recomputation never gathers twice.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.utils import _pytree as pytree

from memopt.errors import MemoptError
from memopt.passes.storage import (
    GATHERED,
    GRADIENTS,
    PARAMETERS,
    TEMPORARIES,
    Storage,
    StorageTable,
)


@dataclass(frozen=True, slots=True)
class Unit:
    """One ``fully_shard`` unit: the parameters it gathers together."""

    name: str  # the module's path ("" for the root)
    params: tuple[str, ...]  # names as ``model.named_parameters()`` gives them
    reshard_after_forward: bool = True
    param_dtype: torch.dtype | None = None  # MixedPrecisionPolicy: gathered and computed in (None: as held)
    reduce_dtype: torch.dtype | None = None  # the reduce-scatter's (None: the gradients')


@dataclass(frozen=True)
class Sharding:
    """How FSDP2 shards the model: the world size and the units, the root last."""

    world_size: int
    units: tuple[Unit, ...]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # parameter -> its unsharded shape
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # parameter -> the dtype it is held in
    # the optimizer updates each shard as soon as its unit's reduce-scatter made its gradient, which it then frees
    step_in_backward: bool = False

    @cached_property
    def unit_of(self) -> dict[str, Unit]:
        return {param: unit for unit in self.units for param in unit.params}

    def padded_bytes(self, name: str) -> int:
        """What the all-gather of ``name`` returns: its rows padded to a multiple of the world size, in the dtype
        the step computes in."""
        dtype = self.unit_of[name].param_dtype
        return self._padded_numel(name) * (dtype or self.dtypes[name]).itemsize

    def cast_bytes(self, unit: Unit) -> int:
        """The all-gather's input when ``unit`` gathers in another dtype than it holds (0 when not): its shards cast
        to ``param_dtype``, copied into the all-gather's buffer and then freed."""
        dtype = unit.param_dtype
        if dtype is None or all(self.dtypes[p] == dtype for p in unit.params):
            return 0
        return sum(self._padded_numel(p) // self.world_size for p in unit.params) * dtype.itemsize

    def reduced_bytes(self, unit: Unit) -> tuple[int, int]:
        """The reduce-scatter input of ``unit``'s gradients (padded rows, in the reduce dtype), and, when that
        dtype is not the parameters', its output, cast to theirs beside itself (else 0)."""
        dtype = unit.reduce_dtype or unit.param_dtype
        if dtype is None:  # the gradients reduced in the parameters' dtype, into their shards
            return sum(self._padded_numel(p) * self.dtypes[p].itemsize for p in unit.params), 0
        numel = sum(self._padded_numel(p) for p in unit.params)
        cast = any(self.dtypes[p] != dtype for p in unit.params)
        return numel * dtype.itemsize, numel // self.world_size * dtype.itemsize if cast else 0

    def compute_dtypes(self) -> dict[str, torch.dtype]:
        """The parameters the step computes in another dtype than they are held in, and that dtype."""
        return {p: u.param_dtype for u in self.units if u.param_dtype is not None for p in u.params}

    def _padded_numel(self, name: str) -> int:
        shape = self.shapes[name] or (1,)
        return math.ceil(shape[0] / self.world_size) * self.world_size * math.prod(shape[1:])

    def shard_bytes(self, name: str) -> int:
        """One rank's part of ``name`` (rank 0's, the largest): ``ceil(rows / world)`` rows."""
        shape = self.shapes[name] or (1,)
        return math.ceil(shape[0] / self.world_size) * math.prod(shape[1:]) * self.dtypes[name].itemsize

    def shard_shape(self, name: str) -> tuple[int, ...]:
        shape = self.shapes[name] or (1,)
        return (math.ceil(shape[0] / self.world_size), *shape[1:])

    def gathered_bytes(self, unit: Unit) -> int:
        return sum(self.padded_bytes(p) for p in unit.params)

    @property
    def root(self) -> Unit:
        return self.units[-1]

    def describe(self) -> dict[str, object]:
        return {
            "world_size": self.world_size,
            "units": [{"name": u.name or "(root)", "params": len(u.params), "gathered_bytes": self.gathered_bytes(u),
                       "reshard_after_forward": u.reshard_after_forward} for u in self.units],
        }


def default_sharding(model: nn.Module, world_size: int) -> Sharding:
    """The wrapping torchtitan and FSDP2's examples apply: ``fully_shard`` on every block of a layer list
    (the children of an ``nn.ModuleList`` that hold parameters), then on the root, which takes the rest."""
    blocks = [f"{path}.{child}" if path else child for path, module in model.named_modules()
              if isinstance(module, nn.ModuleList)
              for child, block in module.named_children() if any(True for _ in block.parameters())]
    return _sharding(model, world_size, [(name, True) for name in blocks])


def sharding_of(model: nn.Module) -> Sharding | None:
    """The units of a model already wrapped with ``fully_shard`` (None: not wrapped), as FSDP2 holds them."""
    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    if not wrapped:
        return None
    if wrapped[0][0] != "":
        raise MemoptError(f"the model's blocks are wrapped with fully_shard ({wrapped[0][0]}, ...) but the model "
                          "itself is not: wrap it too (fully_shard(model)), as FSDP2 expects of the root")
    worlds, units, policies = set(), [], {}
    for name, module in wrapped:
        state = module._get_fsdp_state()
        group = state._fsdp_param_group
        if group is None:
            continue
        if len(group.modules) > 1:
            raise MemoptError(f"fully_shard over several modules at once ({name}) is not planned yet: wrap each "
                              "module on its own")
        if type(group.mesh_info).__name__ != "FSDPMeshInfo":
            raise MemoptError(f"{name or 'the root'} is sharded on a {type(group.mesh_info).__name__} (HSDP or "
                              "replicate), which memopt does not plan yet; plan one shard group with world_size=N")
        worlds.add(group.mesh_info.shard_mesh_size)
        units.append((name, group.post_forward_mesh_info is not None))
        policies[name] = group.mp_policy
    if len(worlds) > 1:
        raise MemoptError(f"the units are sharded over meshes of different sizes {sorted(worlds)}: plan one")
    return _sharding(model, worlds.pop() if worlds else 1, [u for u in units if u[0]], policies)


@contextmanager
def traced_as_fsdp_computes(model: nn.Module) -> Iterator[None]:
    """FSDP2's forward hooks (gather, reshard) off while memopt traces the computation they wrap, with the casts
    of each unit's ``MixedPrecisionPolicy`` in their place (floating-point inputs to ``param_dtype`` where it casts
    forward inputs, outputs to ``output_dtype``), as FSDP2's hooks make them; the user's own hooks stay, and every
    hook is back, in its place, afterwards."""
    saved = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            engine = {state._pre_forward_hook_handle.id: partial(_cast_inputs, state._mp_policy),
                      state._post_forward_hook_handle.id: partial(_cast_output, state._mp_policy)}
            for attribute in ("_forward_pre_hooks", "_forward_hooks"):
                hooks = getattr(module, attribute)
                saved.append((module, attribute, hooks))
                setattr(module, attribute, OrderedDict((k, engine.get(k, v)) for k, v in hooks.items()))
    try:
        yield
    finally:
        for module, attribute, hooks in saved:
            setattr(module, attribute, hooks)


def _cast_inputs(policy: MixedPrecisionPolicy, module: nn.Module, args: tuple, kwargs: dict
                 ) -> tuple[tuple, dict]:
    if not (policy.cast_forward_inputs and policy.param_dtype):
        return args, kwargs
    return _cast_floating(policy.param_dtype, (args, kwargs))


def _cast_output(policy: MixedPrecisionPolicy, module: nn.Module, args: tuple, output: Any) -> Any:
    return output if policy.output_dtype is None else _cast_floating(policy.output_dtype, output)


def _cast_floating(dtype: torch.dtype, values: Any) -> Any:
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, values)


def _sharding(model: nn.Module, world_size: int, wrapped: Sequence[tuple[str, bool]],
              policies: dict[str, MixedPrecisionPolicy] | None = None) -> Sharding:
    """Units from module paths (each with its reshard_after_forward, and its policy by path, the root's at "");
    the root holds what no unit does."""
    named = dict(model.named_parameters())
    owner: dict[str, str] = {}
    for name, _ in sorted(wrapped, key=lambda w: len(w[0])):  # the deepest unit that holds a parameter owns it
        prefix = name + "."
        for param in named:
            if param.startswith(prefix):
                owner[param] = name
    policies = policies or {}

    def unit(name: str, params: tuple[str, ...], reshard: bool) -> Unit:
        policy = policies.get(name) or MixedPrecisionPolicy()
        return Unit(name, params, reshard, policy.param_dtype, policy.reduce_dtype)

    units = [unit(name, tuple(p for p in named if owner.get(p) == name), reshard) for name, reshard in wrapped]
    root = unit("", tuple(p for p in named if p not in owner), False)  # FSDP2 never reshards the root after forward
    return Sharding(world_size, (*[u for u in units if u.params], root),
                    {n: tuple(p.shape) for n, p in named.items()}, {n: p.dtype for n, p in named.items()})


def shard_table(table: StorageTable, gradients: dict[str, str], sharding: Sharding,
                step_temporaries: dict[str, int] | None = None, copies: frozenset[int] = frozenset()) -> StorageTable:
    """One rank's storages of the step: parameters and reduced gradients as shards, and FSDP2's gathered
    parameters and communication buffers as storages of their own (category ``gathered``) over the nodes
    where the engine holds them. With ``sharding.step_in_backward``, each unit's gradient shards (one buffer, the
    reduce-scatter's output) live only while its parameters are updated, one at a time (``step_temporaries``:
    what one update allocates). ``copies``: the positions of recomputed ops, which do not move a unit's spans (they
    run inside its backward, as the plan that chose them simulated)."""
    storages = list(table.storages)
    readers = [list(r) for r in table.readers]
    end = len(table.node_names) - 1
    bs = table.backward_start
    index_of = {s.node: s.index for s in storages if s.category == PARAMETERS}
    position = {name: i for i, name in enumerate(table.node_names)}
    gradient_storage = {param: table.values[position[node]] for param, node in gradients.items() if node in position}

    def add(nbytes: int, first: int, last: int, category: str, label: str, output: bool = False) -> None:
        if nbytes <= 0 or last < first:
            return
        storages.append(Storage(len(storages), nbytes, first, last, category, label, output))
        readers.append([last])

    spans: list[tuple[Unit, tuple[int, int] | None, tuple[int, int] | None]] = []
    for unit in sharding.units:
        forward, backward = [], []
        for param in unit.params:
            if param in index_of:
                for r in table.readers[index_of[param]]:
                    if r not in copies:
                        (forward if r < bs else backward).append(r)
            if param in gradients and gradients[param] in position:  # the gradient node (often a view of it)
                backward.append(position[gradients[param]])
            for key in gradient_storage.get(param, ()):
                backward.append(storages[key].defined_at)
        spans.append((unit, (min(forward), max(forward)) if forward else None,
                      (min(backward), max(backward)) if backward else None))

    blocks = [(u, f, b) for u, f, b in spans[:-1] if f is not None]
    blocks.sort(key=lambda s: s[1][0])  # forward order
    root = sharding.root
    root_bytes = sharding.gathered_bytes(root)
    first_block = blocks[0][1][0] if blocks else end
    # the root's parameters, gathered before the first op and kept to the end of the backward; its all-gather
    # output until the first block's copy-out
    add(root_bytes, 0, end, GATHERED, "(root) unsharded parameters")
    add(root_bytes, 0, first_block, GATHERED, "(root) all-gather output")
    add(sharding.cast_bytes(root), 0, 0, GATHERED, "(root) all-gather input (cast)")
    for k, (unit, (f0, f1), backward) in enumerate(blocks):
        size = sharding.gathered_bytes(unit)
        # (the last one's: until the backward starts, when the root's pre-backward drops it)
        next_copy_out = blocks[k + 1][1][0] if k + 1 < len(blocks) else max(f1, bs)
        add(size, f0, next_copy_out, GATHERED, f"{unit.name} all-gather output (forward)")
        # (counted over the unit's first op: the engine frees it just before)
        add(sharding.cast_bytes(unit), f0, f0, GATHERED, f"{unit.name} all-gather input (cast)")
        if backward is None or not unit.reshard_after_forward:
            add(size, f0, backward[1] if backward else f1, GATHERED, f"{unit.name} unsharded parameters")
            continue
        add(size, f0, f1, GATHERED, f"{unit.name} unsharded parameters (forward)")
        # resharded by the post-backward, after the unit's last op, before its reduce-scatter input exists
        add(size, backward[0], max(backward[0], backward[1] - 1), GATHERED,
            f"{unit.name} unsharded parameters (backward)")
    # the backward, blocks in reverse: each one's all-gather prefetched at the previous one's pre-backward (the
    # first at the backward's start), its reduce-scatter input held until the next one's post-backward
    backward_order = sorted(((b, u) for u, _, b in blocks if b is not None), key=lambda item: item[0][0])
    previous_start = bs
    for k, ((b0, b1), unit) in enumerate(backward_order):
        size = sharding.gathered_bytes(unit)
        if unit.reshard_after_forward:
            add(size, previous_start, b0, GATHERED, f"{unit.name} all-gather output (backward prefetch)")
            add(sharding.cast_bytes(unit), previous_start, previous_start, GATHERED,
                f"{unit.name} all-gather input (cast)")
        previous_start = b0
        # allocated once the unit's gradients are final (they are copied into it, then freed), and freed by the
        # next unit's post-backward before that one allocates its own
        freed = backward_order[k + 1][0][1] - 1 if k + 1 < len(backward_order) else end
        reduced, cast = sharding.reduced_bytes(unit)
        add(reduced, b1, max(b1, freed), GATHERED, f"{unit.name} reduce-scatter input")
        add(cast, b1, b1, GATHERED, f"{unit.name} reduce-scatter output (cast to the parameters' dtype)")
    # gradients: whole until their unit's post-backward, then a shard to the end of the step (the root's are
    # reduced last, by the callback that ends the backward)
    reduced_at = {p: b[1] for u, _, b in spans[:-1] if b is not None for p in u.params}
    if sharding.step_in_backward:
        temporaries = step_temporaries or {}
        for unit in sharding.units:
            at = reduced_at.get(unit.params[0], max(end - 1, 0)) if unit.params else end
            add(max((temporaries.get(p, 0) for p in unit.params), default=0), at, at, TEMPORARIES,
                f"{unit.name or '(root)'} updates, one parameter at a time")
    for param, keys in gradient_storage.items():
        at = reduced_at.get(param, max(end - 1, 0))
        for key in keys:
            s = storages[key]
            if s.category != GRADIENTS:
                continue
            storages[key] = replace(s, last_use=max(at, s.defined_at), is_output=False)
            readers[key] = sorted({*readers[key], max(at, s.defined_at)})
        if sharding.step_in_backward:
            add(sharding.shard_bytes(param), at, at, GRADIENTS, f"{param} (gradient shard, freed by its update)")
        else:
            add(sharding.shard_bytes(param), at, end, GRADIENTS, f"{param} (gradient shard)", output=True)
    for param, key in index_of.items():
        if param in sharding.shapes:
            storages[key] = replace(storages[key], nbytes=sharding.shard_bytes(param))
    return replace(table, storages=tuple(storages), readers=tuple(tuple(r) for r in readers))
