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
config patches and the heuristics to compile under, and keeps the program's order
without losing Inductor's buffer reuse.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any
from unittest import mock

from torch._inductor import memory as inductor_memory
from torch._inductor.choices import InductorChoices
from torch._inductor.graph import GraphLowering
from torch._inductor.virtualized import V

FUSION_WINDOW = "memopt.fusion_window"  # memopt's option, not an Inductor config entry


class PlanOrderChoices(InductorChoices):
    """Inductor's default heuristics, and no fusion of nodes more than ``window`` apart in the program.

    ``window`` None: no limit. ``kept_order``: compiled with the program's order kept; ``donated``: the inputs
    whose buffers the code may reuse (``inductor_patches``). Those two only tell Inductor's cache compiles apart.
    """

    def __init__(self, window: int | None = None, kept_order: bool = False, donated: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.window = window
        self.kept_order = kept_order
        self.donated = donated

    def uuid(self) -> str:  # Inductor's cache key for these heuristics
        return (f"memopt.PlanOrderChoices(window={self.window}, kept_order={self.kept_order}, "
                f"donated={self.donated})")

    def can_fuse(self, scheduler: Any, node1: Any, node2: Any, shared_data_score: int) -> bool:
        # the span of the two groups in the order the scheduler got them (fused groups keep min/max)
        span = max(abs(node1.min_order - node2.max_order), abs(node2.min_order - node1.max_order))
        near = self.window is None or span <= self.window
        return near and InductorChoices.can_fuse(scheduler, node1, node2, shared_data_score)


@contextlib.contextmanager
def inductor_patches(options: dict[str, Any], donated: Sequence[int] = ()) -> Iterator[dict[str, Any]]:
    """Inductor's config patches for ``options``, and what they need around the compile.

    ``donated``: the indices of the compiled graph's inputs (its placeholders, lifted constants first)
    whose buffers the code may reuse once it has read them, as AOTAutograd lets a training backward
    reuse the saved tensors (``bw_donated_idxs``). Inductor reads that list only when it lowers a
    backward, and a backward lowering also changes the layouts it asks of fallback kernels; so each
    of these placeholders alone is lowered as a backward's donated input.

    ``FUSION_WINDOW`` compiles under ``PlanOrderChoices``: set twice, as the config entry, which keys
    Inductor's cache, and as the handler of this thread, since Inductor keeps the first heuristics
    object it made.

    ``reorder_for_peak_memory`` False keeps the program's order, but not as Inductor's own setting:
    without that pass no buffer carries its size, so Inductor's check that reusing a freed buffer
    does not raise the peak sees a peak of 0 bytes and refuses every reuse but between neighbouring
    kernels. Each op then allocates afresh (the residual MLP's compiled step made 190 2-MiB
    allocations where torch.compile's made 46; on CPU, glibc hands the memory back and faults it in
    again). So the pass runs, with no reordering to try: it sizes the buffers and keeps the order.
    """
    patches = {key: value for key, value in options.items() if key != FUSION_WINDOW}
    window = options.get(FUSION_WINDOW)
    kept_order = patches.get("reorder_for_peak_memory") is False
    donated = tuple(sorted(donated))
    if window is None and not kept_order and not donated:
        yield patches
        return
    with contextlib.ExitStack() as stack:
        if kept_order:
            patches["reorder_for_peak_memory"] = True
            stack.enter_context(mock.patch.object(inductor_memory, "reorder_for_peak_memory",
                                                  partial(inductor_memory.reorder_for_peak_memory, methods=[])))
        if donated:
            stack.enter_context(mock.patch.object(GraphLowering, "placeholder",
                                                  _donating(GraphLowering.placeholder, frozenset(donated))))
        patches["inductor_choices_class"] = partial(PlanOrderChoices, window, kept_order, donated)
        stack.enter_context(V.set_choices_handler(PlanOrderChoices(window, kept_order, donated)))
        yield patches


def _donating(placeholder: Callable[..., Any], donated: frozenset[int]) -> Callable[..., Any]:
    """``GraphLowering.placeholder``, lowering the ``donated`` placeholders as a backward's donated inputs."""
    def lower(graph: GraphLowering, target: str, args: Any, kwargs: Any) -> Any:
        index = graph.placeholder_idx + 1  # the method counts the placeholder it lowers first
        if index not in donated:
            return placeholder(graph, target, args, kwargs)
        with mock.patch.multiple(graph, is_backward=True, bw_donated_idxs=[index]):
            return placeholder(graph, target, args, kwargs)

    return lower
