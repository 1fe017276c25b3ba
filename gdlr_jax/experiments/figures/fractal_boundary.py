"""Figures of the fractal-boundary experiment (layer 5): the labels of every zoom level and
the box counts of their boundaries (:mod:`gdlr_jax.experiments.fractal_boundary`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from gdlr_jax.dynamics import BoundaryDimension
from gdlr_jax.engine import TrajectoryStatus
from gdlr_jax.experiments.figures._common import STATUS_STYLE, new_figure


class ZoomLevel(Protocol):
    """What the figures read of one zoom level: its ``region`` ``[x_min, x_max, y_min,
    y_max]``, its ``(resolution, resolution)`` class ``labels`` (rows along ``y``) and the
    :class:`~gdlr_jax.BoundaryDimension` of their boundary (None: a single class)."""

    region: list[float]
    labels: np.ndarray
    dimension: BoundaryDimension | None


def label_colours(labels: str) -> tuple[list[str], list[str]]:
    """Colours and names of the label values ``0, 1, ...`` of the config key ``labels``:
    ``converged`` (0: not converged to a minimum, 1: converged to one) or ``status`` (each
    :class:`~gdlr_jax.TrajectoryStatus` code with its style, :data:`STATUS_STYLE`)."""
    if labels == "converged":
        return ["#6a1b9a", STATUS_STYLE[TrajectoryStatus.CONVERGED_MINIMUM].colour], [
            "not converged to a minimum",
            "converged to a minimum",
        ]
    codes = sorted(TrajectoryStatus)
    return [STATUS_STYLE[c].colour for c in codes], [
        STATUS_STYLE[c].label for c in codes
    ]


def zoom_figure(
    levels: Sequence[ZoomLevel],
    axis_labels: tuple[str, str],
    colours: list[str],
    names: list[str],
) -> Figure:
    """The labels of every level side by side, the next level's region outlined in red."""
    fig = new_figure(3.2 * len(levels) + 0.4, 3.9)
    axes = fig.subplots(1, len(levels), squeeze=False)[0]
    cmap = ListedColormap(colours)
    for k, (ax, level) in enumerate(zip(axes, levels)):
        ax.imshow(
            level.labels,
            origin="lower",
            extent=level.region,
            cmap=cmap,
            vmin=-0.5,
            vmax=len(colours) - 0.5,
            interpolation="nearest",
            aspect="auto",
        )
        if k + 1 < len(levels):
            x0, x1, y0, y1 = levels[k + 1].region
            ax.add_patch(
                Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="red", lw=1.2)
            )
        d = level.dimension
        title = (
            "no boundary"
            if d is None
            else f"$D = {d.dimension:.3f} \\pm {d.standard_error:.3f}$"
        )
        ax.set_title(f"level {k}: {title}", fontsize=9)
        ax.set_xlabel(axis_labels[0])
        ax.set_ylabel(axis_labels[1])
        ax.tick_params(labelsize=7)
    present = sorted({int(v) for lv in levels for v in np.unique(lv.labels)})
    fig.legend(
        handles=[Patch(color=colours[v], label=names[v]) for v in present],
        loc="outside lower center",
        ncols=min(len(present), 5),
        fontsize=8,
    )
    return fig


def box_count_figure(levels: Sequence[ZoomLevel]) -> Figure:
    """``log N(b)`` against ``log`` (box width) per level (mean over the box placements, their
    range as bars), with the fitted lines ``log N = c - D log b``."""
    fig = new_figure(5.0, 3.8)
    ax = fig.subplots()
    for k, level in enumerate(levels):
        d = level.dimension
        if d is None:
            continue
        log_counts = np.log(d.counts)
        mean = np.exp(log_counts.mean(axis=0))
        low, high = np.exp(log_counts.min(axis=0)), np.exp(log_counts.max(axis=0))
        (points,) = ax.plot(
            d.box_widths, mean, "o", ms=4, label=f"level {k}: $D = {d.dimension:.3f}$"
        )
        ax.vlines(d.box_widths, low, high, color=points.get_color(), lw=1)
        fitted = np.exp(d.intercept - d.dimension * np.log(d.box_cells))
        ax.plot(d.box_widths, fitted, "-", color=points.get_color(), lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("box width (units of the x axis)")
    ax.set_ylabel("boxes crossed by the boundary $N$")
    if any(level.dimension is not None for level in levels):
        ax.legend(fontsize=8)
    return fig
