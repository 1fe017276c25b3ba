"""Figures of the two-neuron study ``L(x, y) = 1/2 (1 - xy)^2`` (layer 5): Figure 1 (phase
portraits), Figure 2 (``|M_WS(eta)|`` beside the trapping-region fraction) and the basin map.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from gdlr_jax.engine import TrajectoryStatus
from gdlr_jax.experiments.figures._common import (
    STATUS_STYLE,
    new_figure,
    share,
    status_counts,
)

_MINIMA = {"color": "black", "lw": 0.8, "label": "minima $M = \\{xy = 1\\}$"}
_WEAKLY_STABLE = {"color": "#d62728", "lw": 3.0, "alpha": 0.8, "solid_capstyle": "butt"}
#: the eigenvalue ``lambda`` of each criterion of Def. 16 (``M_WS``: ``eta < 2 / lambda``), in
#: mathtext.
CRITERION_TEX = {
    "lambda_max": "\\lambda_{\\max}",
    "lambda_min_nonzero": "\\lambda_{\\min}^{\\neq 0}",
}


@dataclasses.dataclass(frozen=True)
class MinimaCurve:
    """Points of the minima M along its branches, and which lie in ``M_WS(eta)``.

    Attributes:
        xy: ``(branches, points, 2)`` points of M (each branch an ordered polyline).
        weakly_stable: ``(branches, points)`` boolean, in ``M_WS(eta)``.
    """

    xy: np.ndarray
    weakly_stable: np.ndarray

    def draw(self, ax, eta: float) -> None:
        empty = not np.any(self.weakly_stable)
        label = f"weakly stable $M_{{WS}}(\\eta={eta:g})$" + (" is empty" if empty else "")
        for branch, stable in zip(self.xy, self.weakly_stable, strict=True):
            ax.plot(branch[:, 0], branch[:, 1], **_MINIMA)
            masked = np.where(stable[:, None], branch, np.nan)
            ax.plot(masked[:, 0], masked[:, 1], **_WEAKLY_STABLE, label=label)


def _legend_once(ax, **kwargs) -> None:
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), **kwargs)


@dataclasses.dataclass(frozen=True)
class PortraitPanel:
    """One phase portrait (a panel of Figure 1).

    Attributes:
        eta: the step size.
        region: ``(x_min, x_max, y_min, y_max)`` of the starts.
        paths: ``(n, t, 2)`` GD iterates ``(x_k, y_k)`` of ``n`` trajectories (NaN after a
            trajectory stopped).
        status: ``(n,)`` :class:`TrajectoryStatus` codes.
        minima: the curve of minima with ``M_WS(eta)``.
    """

    eta: float
    region: Sequence[float]
    paths: np.ndarray
    status: np.ndarray
    minima: MinimaCurve

    def last_iterates(self) -> np.ndarray:
        """``(n, 2)``: the last finite iterate of each trajectory."""
        finite = np.all(np.isfinite(self.paths), axis=2)
        last = finite.shape[1] - 1 - np.argmax(finite[:, ::-1], axis=1)
        return self.paths[np.arange(len(self.paths)), last]

    def ends_outside(self, bounds: Sequence[float]) -> int:
        """How many last iterates lie outside ``bounds = (x_min, x_max, y_min, y_max)``."""
        (x, y), (x0, x1, y0, y1) = self.last_iterates().T, bounds
        return int(np.sum((x < x0) | (x > x1) | (y < y0) | (y > y1)))

    def view(self) -> tuple[float, float, float, float]:
        """The limits shown: ``region``, grown (with a margin of 5 % of the larger side) to
        hold the last iterate of every trajectory that did not diverge."""
        kept = self.last_iterates()[self.status != int(TrajectoryStatus.DIVERGED)]
        x0, x1, y0, y1 = (float(v) for v in self.region)
        if kept.size:
            (lx, ly), (hx, hy) = kept.min(axis=0), kept.max(axis=0)
            margin = 0.05 * max(max(x1, hx) - min(x0, lx), max(y1, hy) - min(y0, ly))
            x0, x1 = (x0 if lx >= x0 else lx - margin), (x1 if hx <= x1 else hx + margin)
            y0, y1 = (y0 if ly >= y0 else ly - margin), (y1 if hy <= y1 else hy + margin)
        return float(x0), float(x1), float(y0), float(y1)


def phase_portraits(panels: Sequence[PortraitPanel]) -> Figure:
    """Figure 1: GD trajectories in the ``(x, y)`` plane, one panel per step size.

    Iterates are dots joined by thin lines (GD is a map, not a flow), one colour per
    trajectory; circles mark the starts, crosses the last iterates. The minima M are black,
    ``M_WS(eta)`` red; each title counts the trajectories by status. A panel shows the region
    of the starts grown to hold the last iterate of every trajectory that did not diverge
    (:meth:`PortraitPanel.view`; the region is then outlined, dashed, and its legend entry
    counts the trajectories ending outside it), so that every such trajectory is seen where
    it ends; the title also counts the last iterates (of diverged ones) left off the panel.
    """
    fig = new_figure(5.2 * len(panels), 6.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        panel.minima.draw(ax, panel.eta)
        colours = colormaps["viridis"](np.linspace(0.0, 0.9, len(panel.paths)))
        for path, last, colour in zip(panel.paths, panel.last_iterates(), colours, strict=True):
            ax.plot(path[:, 0], path[:, 1], "-", color=colour, lw=0.5, alpha=0.3)
            ax.plot(path[:, 0], path[:, 1], ".", color=colour, ms=2.5)
            ax.plot(*path[0], "o", mfc="none", mec=colour, ms=5)
            ax.plot(*last, "x", color="black", ms=4, mew=0.8)
        ax.plot([], [], "o", mfc="none", mec="grey", ms=5, label="start")
        ax.plot([], [], ".-", color="grey", lw=0.6, label="GD iterates")
        ax.plot([], [], "x", color="black", ms=4, label="last iterate")
        shown, region = panel.view(), tuple(float(v) for v in panel.region)
        counts = status_counts(panel.status)
        if shown != region:
            rx0, rx1, ry0, ry1 = region
            away = panel.ends_outside(region)
            ax.add_patch(
                Rectangle(
                    (rx0, ry0), rx1 - rx0, ry1 - ry0, fill=False, ls="--", lw=0.8, ec="grey",
                    label=f"region of the starts ({away} of {len(panel.paths)} end outside)",
                )
            )
        if off_panel := panel.ends_outside(shown):
            counts += f"; {off_panel} end off the panel"
        x0, x1, y0, y1 = shown
        ax.set(xlim=(x0, x1), ylim=(y0, y1), xlabel="$x$", ylabel="$y$")
        ax.set_aspect("equal", adjustable="box")
        ax.set_title(
            f"GD on $\\frac{{1}}{{2}}(1-xy)^2$, $\\eta = {panel.eta:g}$\n{counts}",
            fontsize=10,
        )
        _legend_once(
            ax, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2, fontsize=8, frameon=False
        )
    return fig


def weak_stability_vs_trapping(
    eta_curve: np.ndarray,
    length_curve: np.ndarray,
    etas: np.ndarray,
    converged_fraction: np.ndarray,
    eta_e: float,
    *,
    reference_eta: float,
    reference_length: float,
    criterion: str,
) -> Figure:
    """Figure 2: the normalised length of ``M_WS(eta)`` beside the trapping-region fraction.

    The length is a curve (computed on the fine grid ``eta_curve``); the fraction is one
    point per step size of the sweep, not joined: between two step sizes nothing was
    measured, and at ``eta_E`` the fraction jumps.

    Args:
        eta_curve: ``(k,)`` step sizes of the length curve.
        length_curve: ``(k,)`` length of ``M_WS`` normalised by ``reference_length``.
        etas: ``(n_eta,)`` step sizes of the sweep.
        converged_fraction: ``(n_eta,)`` share of the initialisations converging to a minimum.
        eta_e: the critical step size, drawn as a vertical line.
        reference_eta, reference_length: the normalisation ``|M_WS(reference_eta)|``.
        criterion: the eigenvalue of Def. 16 used (a key of :data:`CRITERION_TEX`).
    """
    fig = new_figure(6.4, 4.4)
    ax = fig.subplots()
    ref = f"|M_{{WS}}({reference_eta:g})|"
    ax.plot(
        eta_curve,
        length_curve,
        color=_WEAKLY_STABLE["color"],
        lw=2.0,
        label=f"$|M_{{WS}}(\\eta)| \\,/\\, {ref}$, $M_{{WS}}(\\eta) = \\{{\\theta \\in M:"
        f" \\eta < 2/{CRITERION_TEX[criterion]}(\\theta)\\}}$  (${ref} = {reference_length:.4g}$)",
    )
    ax.plot(
        etas,
        converged_fraction,
        "o",
        color=STATUS_STYLE[TrajectoryStatus.CONVERGED_MINIMUM].colour,
        ms=4.5,
        label="trapping-region fraction: share of the grid of initialisations converging to "
        "a minimum\n(one point per step size of the sweep)",
    )
    ax.axvline(eta_e, color="black", ls="--", lw=1.0)
    ax.annotate(
        f"$\\eta_E = {eta_e:.6g}$",
        xy=(eta_e, 1.02),
        xycoords=("data", "axes fraction"),
        ha="center",
        va="bottom",
        fontsize=9,
    )
    ax.set(
        xlabel="step size $\\eta$",
        ylabel="fraction",
        xlim=(min(eta_curve.min(), etas.min()), max(eta_curve.max(), etas.max())),
        ylim=(-0.02, 1.05),
    )
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=8, ncols=1, frameon=False)
    return fig


def basin_map(
    region: Sequence[float],
    status: np.ndarray,
    steps_taken: np.ndarray,
    eta: float,
    minima: MinimaCurve,
) -> Figure:
    """The trapping region at one step size: each initialisation coloured by its fate.

    Args:
        region: ``(x_min, x_max, y_min, y_max)`` of the grid.
        status: ``(ny, nx)`` :class:`TrajectoryStatus` codes, row 0 at ``y_min``.
        steps_taken: ``(ny, nx)`` steps until the trajectory finished.
        eta: the step size.
        minima: M and ``M_WS(eta)`` to overlay.

    Left: status; right: steps to converge to a minimum (log scale; others blank).
    """
    fig = new_figure(11.0, 5.8)
    ax_status, ax_steps = fig.subplots(1, 2)
    codes = list(STATUS_STYLE)
    cmap = ListedColormap([STATUS_STYLE[c].colour for c in codes])
    norm = BoundaryNorm(np.arange(len(codes) + 1) - 0.5, len(codes))
    position = np.zeros(max(int(c) for c in codes) + 1, int)
    position[[int(c) for c in codes]] = np.arange(len(codes))
    index = position[status]
    extent = (region[0], region[1], region[2], region[3])
    image = {"origin": "lower", "extent": extent, "interpolation": "nearest", "aspect": "equal"}
    ax_status.imshow(index, cmap=cmap, norm=norm, **image)
    converged = status == int(TrajectoryStatus.CONVERGED_MINIMUM)
    steps = np.where(converged, np.maximum(steps_taken, 1), np.nan).astype(float)
    if np.any(converged):
        norm_steps = LogNorm(
            vmin=np.nanmin(steps), vmax=max(np.nanmax(steps), np.nanmin(steps) + 1)
        )
        shown = ax_steps.imshow(steps, cmap="viridis", norm=norm_steps, **image)
        fig.colorbar(shown, ax=ax_steps, label="steps to converge to a minimum")
    ax_steps.set_facecolor("#e0e0e0")
    handles = [
        Patch(
            color=STATUS_STYLE[c].colour,
            label=f"{STATUS_STYLE[c].label} ({share(np.mean(status == int(c)))})",
        )
        for c in codes
        if np.any(status == int(c))
    ]
    handles += [
        Line2D([], [], **_MINIMA),
        Line2D([], [], **_WEAKLY_STABLE, label=f"$M_{{WS}}(\\eta={eta:g})$"),
    ]
    for ax, title in ((ax_status, "fate of each initialisation"), (ax_steps, "steps to converge")):
        minima.draw(ax, eta)
        ax.set(xlim=extent[:2], ylim=extent[2:], xlabel="$x_0$", ylabel="$y_0$")
        ax.set_title(
            f"{title}, $\\eta = {eta:g}$ ({status.shape[1]}x{status.shape[0]} starts)", fontsize=10
        )
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    return fig
