"""A cache of solver results on disk, keyed by everything the solver saw.

The key hashes the problem as plain data (the graph's structure, sizes and op
costs, node names and targets), the budget, the solver and its settings, and the
versions of memopt and torch: a plan is reused only for the same graph, shapes,
budget and options, never for another budget. Entries are pickles of plain
dataclasses, written atomically; a missing, stale or unreadable entry is a miss.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
from typing import Any

log = logging.getLogger(__name__)

_FORMAT = 1  # bump when what is stored changes shape


def cache_key(*parts: Any) -> str:
    """A stable hash of ``parts`` (plain data whose repr is deterministic), with memopt's and torch's versions."""
    import torch

    from memopt._version import __version__

    text = repr((_FORMAT, __version__, torch.__version__, parts))
    return hashlib.sha256(text.encode()).hexdigest()


def load(directory: str, key: str) -> Any | None:
    """The value stored under ``key``, or None."""
    path = os.path.join(directory, key[:2], key + ".pickle")
    try:
        with open(path, "rb") as file:
            return pickle.load(file)
    except FileNotFoundError:
        return None
    except Exception as error:  # a truncated or foreign file: plan again
        log.warning("ignoring unreadable memopt cache entry %s: %s", path, error)
        return None


def store(directory: str, key: str, value: Any) -> None:
    """Store ``value`` under ``key`` (atomically: a reader sees the old entry or the new one)."""
    folder = os.path.join(directory, key[:2])
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(handle, "wb") as file:
        pickle.dump(value, file, protocol=4)
    os.replace(temporary, os.path.join(folder, key + ".pickle"))
