"""Keeping Inductor's fusions near the plan's order, for programs whose code breaks the budget.

Inductor fuses nodes far apart in a program when one feeds the other or both read
the same data, and a fused kernel runs where its earliest node was: what its later
nodes read is computed before it. On the backward of the 3-layer test Llama at
memopt's smallest budget, a kernel fusing the last RMSNorm's backward with that
norm's recomputed output (which the LM head's weight gradient reads) pulled the
last block's recomputed MLP ahead of that gradient, and the logits' gradient
(batch × seq × vocab floats) stayed alive across it: the code peaks 2.2% over the
plan (over the budget), and 9.5% under it with fusions at most 4 scheduler nodes
apart. (On the benchmark's 4-layer Llama, measured before memopt let go of unread
inputs, the window took its code from 335.0 MB to 329.4 MB only.)

``PlanOrderChoices(window)`` is an Inductor heuristics object (its documented hook,
``InductorChoices``) that refuses fusing nodes more than ``window`` nodes apart in
the program's order, which is the plan's: a kernel fuses only what the plan put
close together. ``FUSION_WINDOW`` is memopt's option for it, among Inductor's own
in ``InductorStep``'s options; ``inductor_patches`` turns options into Inductor's
config patches and the heuristics to compile under.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from typing import Any

from torch._inductor.choices import InductorChoices
from torch._inductor.virtualized import V

FUSION_WINDOW = "memopt.fusion_window"  # memopt's option, not an Inductor config entry


class PlanOrderChoices(InductorChoices):
    """Inductor's default heuristics, and no fusion of nodes more than ``window`` apart in the program."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def uuid(self) -> str:  # Inductor's cache key for these heuristics
        return f"memopt.PlanOrderChoices(window={self.window})"

    def can_fuse(self, scheduler: Any, node1: Any, node2: Any, shared_data_score: int) -> bool:
        # the span of the two groups in the order the scheduler got them (fused groups keep min/max)
        span = max(abs(node1.min_order - node2.max_order), abs(node2.min_order - node1.max_order))
        return span <= self.window and InductorChoices.can_fuse(scheduler, node1, node2, shared_data_score)


@contextlib.contextmanager
def inductor_patches(options: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Inductor's config patches for ``options``, compiled under ``PlanOrderChoices`` if they set a window.

    The heuristics are set twice: as the config entry, which keys Inductor's cache, and as
    the handler of this thread, since Inductor keeps the first heuristics object it made.
    """
    patches = {key: value for key, value in options.items() if key != FUSION_WINDOW}
    window = options.get(FUSION_WINDOW)
    if window is None:
        yield patches
        return
    patches["inductor_choices_class"] = partial(PlanOrderChoices, window)
    with V.set_choices_handler(PlanOrderChoices(window)):
        yield patches
