"""Pictures of a plan (matplotlib, the `plot` extra): the timeline with categories stacked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memopt.plan import MemoryPlan

_COLORS = {
    "parameters": "#4c72b0", "buffers": "#8172b3", "inputs": "#937860", "gradients": "#dd8452",
    "optimizer_state": "#c44e52", "activations": "#55a868", "temporaries": "#ccb974",
}
_GIB = 2**30


def plot_plan(
    plan: MemoryPlan, path: str, *, measured_timeline: Sequence[tuple[float, int]] | None = None
) -> str:
    """Write a PNG of ``plan``'s predicted timeline to ``path`` and return the path.

    ``measured_timeline`` (fractions of the step in [0, 1], live bytes), when
    given, is drawn over the prediction, the step's steps spread evenly over
    [0, 1]: ``MeasuredPeak.timeline_fractions``, its bytes restated from the
    plan's entry (``plan.entry_bytes + live - baseline_bytes``) when the
    process holds other tensors.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    timeline = plan.timeline
    steps = range(len(timeline.totals))
    fig, ax = plt.subplots(figsize=(11, 5), dpi=110)
    try:
        categories = [c for c in timeline.by_category if any(timeline.by_category[c])]
        ax.stackplot(steps, [[v / _GIB for v in timeline.by_category[c]] for c in categories],
                     labels=categories, colors=[_COLORS.get(c, "#999999") for c in categories], alpha=0.85)
        for phase, shade in (("backward", "#f0f0f0"), ("optimizer", "#e0e0f0")):
            positions = [i for i, p in enumerate(timeline.phases) if p == phase]
            if positions:
                ax.axvspan(positions[0], positions[-1] + 1, color=shade, zorder=0, label=f"{phase} phase")
        peak = timeline.peak_index
        ax.plot([peak], [timeline.peak_bytes / _GIB], "k^", label=f"peak {timeline.peak_bytes / _GIB:.3f} GiB")
        if plan.budget_bytes is not None:
            ax.axhline(plan.budget_bytes / _GIB, color="red", linestyle="--", label="budget")
        if measured_timeline:
            n = len(timeline.totals)
            ax.plot([f * n for f, _ in measured_timeline], [b / _GIB for _, b in measured_timeline],
                    color="black", linewidth=0.8, label="measured")
        ax.set_xlabel("step of the training step (graph nodes, then optimizer)")
        ax.set_ylabel("live device memory (GiB)")
        ax.set_title(f"memopt plan: predicted peak at {timeline.peak_label} ({plan.device.name})")
        ax.set_xlim(0, max(len(timeline.totals), 1))
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
