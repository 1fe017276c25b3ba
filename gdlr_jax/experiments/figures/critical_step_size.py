"""The figure of the critical-step-size experiment (layer 5): per depth, the share of the
initialisations converging to a minimum against the step size, with its Wilson intervals, the
measured collapse interval, the sharpness bound and the paper's ``eta = 1``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from jaxtyping import Float, Int
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from gdlr_jax.engine import TrajectoryStatus
from gdlr_jax.experiments.figures._common import STATUS_STYLE, new_figure

#: the paper's Figure 3: "convergence does not happen for eta > 1".
PAPER_ETA = 1.0
_INTERVAL, _BOUND = "#fdae6b", "#1f77b4"


class CollapseCurve(NamedTuple):
    """What one panel shows: a depth's :class:`~gdlr_jax.CriticalStepEstimate`.

    Attributes:
        depth: hidden layers.
        etas: ``(n,)`` the step sizes swept, ascending.
        converged: ``(n,)`` initialisations converged to a minimum at each.
        share_bounds: ``(n, 2)`` the Wilson interval of the share at each.
        trials: initialisations per step size.
        interval: ``(low, high)`` the collapse interval (NaN where not bracketed).
        resolved: whether the bisection reached its ``rtol``.
        sharpness_bound: ``2 / lambda_max`` at the flattest converged minimum, or NaN.
    """

    depth: int
    etas: Float[np.ndarray, " n"]
    converged: Int[np.ndarray, " n"]
    share_bounds: Float[np.ndarray, "n 2"]
    trials: int
    interval: tuple[float, float]
    resolved: bool
    sharpness_bound: float


def collapse_figure(curves: Sequence[CollapseCurve], threshold: float, title: str) -> Figure:
    """The converged share against ``eta`` (log axis), one panel per depth.

    Each panel: the share ``k / n`` converged to a minimum at every step size swept, with its
    Wilson interval as an error bar; the collapse interval ``(low, high)`` shaded (hatched
    when the bisection did not reach its ``rtol``); the threshold ``q`` dotted; ``eta = 1``
    (Figure 3's "no convergence for eta > 1") dashed; the sharpness bound ``2 / lambda_max``
    of the flattest converged minimum dash-dotted (``eta_E >= 2 / lambda_max``). The panel's
    title gives the interval and the bound; one legend below the panels names the marks.

    Args:
        curves: one :class:`CollapseCurve` per depth.
        threshold: the share below which a step size has collapsed.
        title: the setting (model, loss, data, initialisations).
    """
    columns = min(len(curves), 3)
    rows = math.ceil(len(curves) / columns)
    fig = new_figure(4.2 * columns, 3.3 * rows + 1.0)
    axes = fig.subplots(rows, columns, sharey=True, squeeze=False).reshape(-1)
    colour = STATUS_STYLE[TrajectoryStatus.CONVERGED_MINIMUM].colour
    for ax, curve in zip(axes, curves):
        share = curve.converged / curve.trials
        low, high = curve.interval
        ax.errorbar(
            curve.etas, 100 * share, yerr=100 * np.abs(curve.share_bounds.T - share), fmt="o",
            ms=3.5, lw=0.8, color=colour, capsize=2,
        )
        bracketed = math.isfinite(low) and math.isfinite(high)
        if bracketed:
            ax.axvspan(low, high, color=_INTERVAL, alpha=0.5, lw=0,
                       hatch=None if curve.resolved else "//")
        ax.axhline(100 * threshold, ls=":", color="grey", lw=1.0)
        ax.axvline(PAPER_ETA, ls="--", color="black", lw=1.0)
        bound = math.isfinite(curve.sharpness_bound)
        if bound:
            ax.axvline(curve.sharpness_bound, ls="-.", color=_BOUND, lw=1.0)
        shown = np.concatenate([curve.etas, [PAPER_ETA], [curve.sharpness_bound] if bound else []])
        ax.set_xscale("log")
        ax.set_xlim(shown.min() / 1.3, shown.max() * 1.3)
        interval = (
            f"collapse in [{low:.3g}, {high:.3g}]" + ("" if curve.resolved else " (unresolved)")
            if bracketed else "no collapse bracketed"
        )
        sharpness = (
            f"$2/\\lambda_{{\\max}}$ = {curve.sharpness_bound:.3g}" if bound
            else "no converged minimum"
        )
        ax.set_title(f"depth {curve.depth}\n{interval}; {sharpness}", fontsize=9)
        ax.set(xlabel="step size $\\eta$", ylim=(-3, 103))
        ax.grid(alpha=0.3)
    for ax in axes[::columns]:
        ax.set_ylabel(f"% of the {curves[0].trials} initialisations\nconverged to a minimum")
    for ax in axes[len(curves):]:
        ax.set_visible(False)
    marks = [
        (Line2D([], [], marker="o", ls="", color=colour), "converged share, Wilson interval"),
        (Patch(color=_INTERVAL, alpha=0.5), "collapse interval (hatched: unresolved)"),
        (Line2D([], [], ls=":", color="grey"), f"threshold {threshold:g}"),
        (Line2D([], [], ls="--", color="black"), "paper (Fig. 3): none for $\\eta > 1$"),
        (Line2D([], [], ls="-.", color=_BOUND),
         "$2/\\lambda_{\\max}$ at the flattest converged minimum ($\\leq \\eta_E$)"),
    ]
    fig.legend(*zip(*marks), loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    return fig
