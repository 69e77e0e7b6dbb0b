"""What an op does to memory and randomness, read from its schema and tags (never from name lists)."""

from __future__ import annotations

import torch
from torch import fx


def mutates(node: fx.Node) -> bool:
    """The op writes one of its inputs in place (its schema marks an argument as written)."""
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


def is_random(node: fx.Node) -> bool:
    """The op draws from a random generator: running it again gives other values."""
    return torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())
