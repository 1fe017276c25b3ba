"""Figures of the MNIST experiments (layer 5): the trapping region per step size and depth
(Figures 3 and 4) and the loss and ``eta ||grad L||`` heatmaps (Figures 5 and 6)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from jaxtyping import Float, Int
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from gdlr_jax.experiments.figures._common import STATUS_STYLE, new_figure, status_shares

#: the percentiles of a heatmap's cells (log scale) that bound its colour scale.
COLOUR_PERCENTILES = (2.0, 98.0)
_DIVERGED_GREY = "#bdbdbd"


def _eta_axis(ax: Any, etas: np.ndarray) -> None:
    if etas.size > 1 and etas[-1] / etas[0] > 10:
        ax.set_xscale("log")


def convergence_figure(
    etas: Float[np.ndarray, " n_eta"],
    depths: Sequence[int],
    status: Int[np.ndarray, "n_depth n_eta n_init"],
    title: str,
) -> Figure:
    """Figures 3 and 4: the share converging to a minimum and diverging, per step size.

    Args:
        etas: the step sizes.
        depths: the depths, one curve each.
        status: :class:`~gdlr_jax.TrajectoryStatus` codes.
        title: the setting (model, loss, optimiser, initialisations).
    """
    fig = new_figure(10.0, 4.4)
    ax_conv, ax_div = fig.subplots(1, 2, sharex=True)
    colours = colormaps["viridis"](np.linspace(0.0, 0.85, len(depths)))
    for depth, codes, colour in zip(depths, status, colours, strict=True):
        shares = status_shares(codes)
        ax_conv.plot(etas, 100 * shares["converged_minimum"], "o-", color=colour, ms=4,
                     label=f"depth {depth}")
        ax_div.plot(etas, 100 * shares["diverged"], "s--", color=colour, ms=4,
                    label=f"depth {depth}")
    for ax, what in ((ax_conv, "converged to a minimum"), (ax_div, "diverged")):
        _eta_axis(ax, etas)
        ax.set(xlabel="step size $\\eta$", ylabel=f"% of initialisations {what}",
               ylim=(-3, 103))
        ax.grid(alpha=0.3)
    ax_conv.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def _cell_edges(centres: np.ndarray) -> np.ndarray:
    """Edges of cells centred at increasing ``centres`` (half-way between neighbours)."""
    if centres.size == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    mid = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - mid[0]], mid, [2 * centres[-1] - mid[-1]]])


def colour_limits(values: np.ndarray) -> tuple[float, float] | None:
    """The colour scale of a heatmap: the :data:`COLOUR_PERCENTILES` of the logarithms of its
    finite positive cells, so that a few outlying cells do not stretch it (cells beyond take
    the end colours); the upper limit is at least ten times the lower. ``None`` when no cell
    is finite and positive."""
    positive = values[np.isfinite(values) & (values > 0)]
    if not positive.size:
        return None
    low, high = 10.0 ** np.percentile(np.log10(positive), COLOUR_PERCENTILES)
    return float(low), float(max(high, low * 10))


def status_row_labels(status: Int[np.ndarray, "n_eta n_init"]) -> tuple[str, list[str]]:
    """The right-hand labels of a heatmap: a header naming the statuses (abbreviated, in the
    order of :data:`STATUS_STYLE`) and, per step size, the percentage of the initialisations
    with each (every status: they add up to 100)."""
    shares = status_shares(status)
    header = " ".join(f"{style.abbreviation:>4}" for style in STATUS_STYLE.values())
    rows = [
        " ".join(f"{100 * shares[code.name.lower()][i]:4.0f}" for code in STATUS_STYLE)
        for i in range(status.shape[0])
    ]
    return header + " %", rows


def heatmaps_figure(
    etas: Float[np.ndarray, " n_eta"],
    record_steps: Int[np.ndarray, " n_rec"],
    mean_loss: Float[np.ndarray, "n_eta n_rec"],
    mean_step_norm: Float[np.ndarray, "n_eta n_rec"],
    status: Int[np.ndarray, "n_eta n_init"],
    title: str,
) -> Figure:
    """Figures 5 and 6: mean loss and mean ``eta ||grad L||`` over (step size x update).

    One row per step size (smallest at the bottom), one column per recorded update; log
    colour scales bounded by :func:`colour_limits` (arrows on a colour bar: cells beyond its
    ends). Cells where every trajectory has diverged (NaN means, see
    :func:`gdlr_jax.experiments.mnist.bounded_mean`) are grey. The means are over the
    trajectories still bounded, so the right-hand labels give, per step size, the shares of
    the initialisations with each final status (:func:`status_row_labels`).
    """
    fig = new_figure(12.0, 2.4 + 0.28 * len(etas))
    axes = fig.subplots(1, 2, sharey=True)
    x_edges = _cell_edges(np.asarray(record_steps, np.float64))
    cmap = colormaps["magma"].with_extremes(bad=_DIVERGED_GREY)
    low_p, high_p = COLOUR_PERCENTILES
    for ax, values, label in (
        (axes[0], mean_loss, "mean full-batch loss $L$"),
        (axes[1], mean_step_norm, "mean $\\eta\\,\\|\\nabla L\\|$"),
    ):
        limits, norm, extend = colour_limits(values), None, "neither"
        if limits is not None:
            low, high = limits
            finite = values[np.isfinite(values)]
            under, over = bool(np.any(finite < low)), bool(np.any(finite > high))
            extend = ("neither", "min", "max", "both")[under + 2 * over]
            norm = LogNorm(vmin=low, vmax=high)
            values = np.where(np.isfinite(values), np.maximum(values, low), np.nan)
        mesh = ax.pcolormesh(
            x_edges, np.arange(len(etas) + 1), np.ma.masked_invalid(values), cmap=cmap,
            norm=norm, shading="flat",
        )
        fig.colorbar(mesh, ax=ax, extend=extend,
                     label=f"{label} (log scale, percentiles {low_p:g}-{high_p:g})")
        ax.set(xlabel="update $t$", title=label)
    rows = np.arange(len(etas)) + 0.5
    axes[0].set_yticks(rows, labels=[f"{e:g}" for e in etas])
    axes[0].set_ylabel("step size $\\eta$")
    header, labels = status_row_labels(status)
    right = axes[1].twinx()
    right.set_ylim(axes[1].get_ylim())
    right.set_yticks(rows, labels=labels, fontsize=7, family="monospace")
    right.annotate(header, xy=(1, 1), xycoords="axes fraction", xytext=(7, 3),
                   textcoords="offset points", ha="left", va="bottom", fontsize=7,
                   family="monospace")
    names = ", ".join(f"{s.abbreviation}: {s.label}" for s in STATUS_STYLE.values())
    fig.legend(
        handles=[
            Patch(color=_DIVERGED_GREY, label="every trajectory has diverged"),
            Line2D([], [], ls="none", label=f"colour scales: from percentile {low_p:g} to "
                   f"{high_p:g} of the panel's cells (arrows: cells beyond, in the end colours)"),
            Line2D([], [], ls="none", label=f"right: % of the initialisations by final status "
                   f"({names})"),
        ],
        loc="outside lower center", fontsize=8, frameon=False, ncols=1,
    )
    fig.suptitle(title, fontsize=10)
    return fig
