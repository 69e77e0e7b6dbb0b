"""Pictures of a plan (matplotlib, the `plot` extra): the timeline with categories stacked, and the
budget-to-overhead curve.

Bytes are drawn in the unit the largest value drawn reaches (``byte_unit``), so that a step
of tens of MiB reads in MiB, not in hundredths of a GiB. The figures are matplotlib ``Figure``
objects, not pyplot's: nothing is registered with pyplot, no window opens, the caller's backend
is left as it is, and ``plan_figure`` and ``pareto_figure`` hand the figure to whoever wants to
read or change it before it is saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from memopt.budget import format_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from memopt.report.pareto import ParetoCurve
    from memopt.report.plan import MemoryPlan

_COLORS = {
    "parameters": "#4c72b0", "buffers": "#8172b3", "inputs": "#937860", "gradients": "#dd8452",
    "optimizer_state": "#c44e52", "activations": "#55a868", "temporaries": "#ccb974", "gathered": "#da8bc3",
}
_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
_HOST_COLOR = "#17becf"  # the offload band: host memory, apart from the device's stack
_BASELINE_MARKERS = {"blocks": ("s", "#dd8452"), "sqrt": ("D", "#c44e52"), "none": ("o", "#777777")}


def byte_unit(largest_bytes: float) -> tuple[str, int]:
    """The unit to draw bytes in, and its size: the largest of GiB, MiB and KiB that ``largest_bytes``
    (the largest value drawn) reaches, else bytes."""
    return next(((name, size) for name, size in _UNITS if abs(largest_bytes) >= size), ("B", 1))


def _marks(plan: MemoryPlan) -> dict[str, list[int]]:
    """The nodes where the planned step replays a random op from its saved generator state, updates a parameter
    inside the backward (step_in_backward), and packs and unpacks a saved activation (compress=), by position on
    the timeline."""
    import torch

    from memopt.lower.rng_ops import RUN_WITH_RNG_STATE
    from memopt.passes.step_in_backward import step_parameter

    labels = {RUN_WITH_RNG_STATE: "random op replayed", step_parameter: "parameter updated in the backward"}
    if plan.compressed:  # (the ops exist once memopt's kernels are loaded, which packing did)
        labels[torch.ops.memopt.pack.default] = f"activation packed to {plan.compressed[0].format}"
        labels[torch.ops.memopt.unpack.default] = "activation unpacked"
    marks: dict[str, list[int]] = {label: [] for label in labels.values()}
    if plan.program is None:
        return marks
    position = {name: i for i, name in enumerate(plan.storages.node_names)}
    for node in plan.program.graph.graph.nodes:
        label = labels.get(node.target)
        if label is not None and node.name in position:
            marks[label].append(position[node.name])
    return marks


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
    plan_figure(plan, measured_timeline=measured_timeline).savefig(path)
    return path


def plan_figure(plan: MemoryPlan, *, measured_timeline: Sequence[tuple[float, int]] | None = None) -> Figure:
    """The figure ``plot_plan`` saves."""
    from matplotlib.figure import Figure

    timeline = plan.timeline
    steps = range(len(timeline.totals))
    host = plan.offload.host_timeline if plan.offload is not None else ()
    drawn = [timeline.peak_bytes, plan.budget_bytes or 0, *host, *(live for _, live in measured_timeline or ())]
    unit, scale = byte_unit(max(drawn))
    fig = Figure(figsize=(11, 5), dpi=110)
    ax = fig.subplots()
    categories = [c for c in timeline.by_category if any(timeline.by_category[c])]
    ax.stackplot(steps, [[v / scale for v in timeline.by_category[c]] for c in categories],
                 labels=categories, colors=[_COLORS.get(c, "#999999") for c in categories], alpha=0.85)
    for phase, shade in (("backward", "#f0f0f0"), ("optimizer", "#e0e0f0")):
        positions = [i for i, p in enumerate(timeline.phases) if p == phase]
        if positions:
            ax.axvspan(positions[0], positions[-1] + 1, color=shade, zorder=0, label=f"{phase} phase")
    if any(host):  # host bytes over time: drawn downwards from zero, so it never reads as device memory
        ax.fill_between(steps, [-b / scale for b in host], 0, color=_HOST_COLOR, alpha=0.6, step="post",
                        hatch="//", edgecolor="#0e7c88", linewidth=0.5,
                        label=f"offloaded to host (below 0; pool {format_bytes(plan.offload.host_peak_bytes)})")
        ax.axhline(0, color="black", linewidth=0.6)
    peak = timeline.peak_index
    ax.plot([peak], [timeline.peak_bytes / scale], "k^", label=f"peak {format_bytes(timeline.peak_bytes)}")
    if plan.budget_bytes is not None:
        ax.axhline(plan.budget_bytes / scale, color="red", linestyle="--", label="budget")
    if measured_timeline:
        n = len(timeline.totals)
        ax.plot([f * n for f, _ in measured_timeline], [b / scale for _, b in measured_timeline],
                color="black", linewidth=0.8, label="measured")
    for (label, positions), color in zip(_marks(plan).items(), ("#8c564b", "#9467bd", "#17becf", "#bcbd22")):
        if positions:  # ticks along the floor where the plan does it
            ax.plot(positions, [0] * len(positions), linestyle="", marker="|", markersize=14, color=color,
                    clip_on=False, label=f"{label} ({len(positions)})")
    ax.set_xlabel("step of the training step (graph nodes, then optimizer)")
    ax.set_ylabel(f"live device memory ({unit})" + ("; host below 0" if any(host) else ""))
    chunked = "".join(f"; loss head in {c.chunks} chunks" for c in plan.chunked if c.chunks > 1)
    if plan.chunked_mlp:
        chunked += f"; MLPs in {plan.chunked_mlp[0].chunks} chunks"
    if plan.compressed:
        chunked += f"; {len(plan.compressed)} activations packed (approximate)"
    ax.set_title(f"memopt plan: predicted peak at {timeline.peak_label} ({plan.device.name}){chunked}")
    ax.set_xlim(0, max(len(timeline.totals), 1))
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def plot_pareto(curve: ParetoCurve, path: str) -> str:
    """Write a PNG of ``curve`` to ``path``: predicted recompute overhead against budget, memopt's plans as
    a line, each baseline as a point at the smallest budget it fits; return the path."""
    pareto_figure(curve).savefig(path)
    return path


def pareto_figure(curve: ParetoCurve) -> Figure:
    """The figure ``plot_pareto`` saves."""
    from matplotlib.figure import Figure

    fitted = [p for p in curve.points if p.overhead_s is not None]
    baselines = [p for p in curve.baselines if p.overhead_s is not None]
    unit, scale = byte_unit(max([curve.eager_peak_bytes, curve.proven_minimum_bytes,
                                 *(p.budget_bytes for p in (*fitted, *baselines))]))
    fig = Figure(figsize=(9, 5.5), dpi=110)
    ax = fig.subplots()
    ax.plot([p.budget_bytes / scale for p in fitted], [p.overhead_s for p in fitted], "o-", color="#4c72b0",
            label="memopt")
    for number, point in enumerate(baselines):
        marker, color = _BASELINE_MARKERS.get(point.solver, ("x", "#555555"))
        ax.plot([point.budget_bytes / scale], [point.overhead_s], marker, color=color, markersize=9,
                linestyle="none", label=f"{point.solver} (baseline)")
        # baselines often coincide: stagger their names
        ax.annotate(point.solver, (point.budget_bytes / scale, point.overhead_s), xytext=(10, 6 - 14 * number),
                    textcoords="offset points", fontsize=8, color=color)
    ax.axvline(curve.eager_peak_bytes / scale, color="#55a868", linestyle="--", label="eager peak")
    ax.axvline(curve.proven_minimum_bytes / scale, color="black", linestyle=":", label="proven minimum")
    if curve.step_seconds > 0:
        step = curve.step_seconds
        right = ax.secondary_yaxis("right", functions=(lambda s: s / step * 100, lambda f: f * step / 100))
        right.set_ylabel("% of the eager forward+backward")
    ax.set_xlabel(f"budget ({unit})")
    ax.set_ylabel("predicted recompute overhead per step (s)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"memopt budget-to-overhead ({curve.device}): eager peak "
                 f"{format_bytes(curve.eager_peak_bytes)}, step {curve.step_seconds:.3g} s")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig
