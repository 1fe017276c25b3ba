"""Figures of the experiments, drawn with matplotlib's Agg canvas (no display needed; layer 5).

Every function takes plain numpy arrays and returns a ``matplotlib.figure.Figure`` built
without pyplot (no global figure state, nothing to close); the runner saves it as PNG and PDF
(:meth:`gdlr_jax.experiments.runner.RunOutput.save_figure`). Sizes are fixed in inches, so a
PNG is ``figsize * dpi`` pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from gdlr_jax.engine._trajectory_status import TrajectoryStatus

#: colour and legend label of each trajectory status.
STATUS_STYLE: dict[TrajectoryStatus, tuple[str, str]] = {
    TrajectoryStatus.CONVERGED_MINIMUM: ("#2ca02c", "converged to a minimum"),
    TrajectoryStatus.CONVERGED_CRITICAL_POINT: (
        "#1f77b4",
        "converged to a non-minimal critical point",
    ),
    TrajectoryStatus.PERIODIC: ("#ff7f0e", "periodic orbit"),
    TrajectoryStatus.NOT_CONVERGED: ("#9e9e9e", "not converged"),
    TrajectoryStatus.DIVERGED: ("#6a1b9a", "diverged"),
}
_MINIMA = dict(color="black", lw=0.8, label="minima $M = \\{xy = 1\\}$")
_WEAKLY_STABLE = dict(color="#d62728", lw=3.0, alpha=0.8, solid_capstyle="butt")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


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


def share(fraction: float) -> str:
    """A fraction as a percentage with one decimal; ``"<0.1%"`` when positive but smaller."""
    return "<0.1%" if 0 < fraction < 1e-3 else f"{fraction:.1%}"


def _status_counts(status: np.ndarray) -> str:
    return ", ".join(
        f"{np.sum(status == int(code))} {label}"
        for code, (_, label) in STATUS_STYLE.items()
        if np.any(status == int(code))
    )


def _legend_once(ax, **kwargs) -> None:
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), **kwargs)


@dataclasses.dataclass(frozen=True)
class PortraitPanel:
    """One phase portrait (a panel of Figure 1).

    Attributes:
        eta: the step size.
        region: ``(x_min, x_max, y_min, y_max)`` shown.
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


def phase_portraits(panels: Sequence[PortraitPanel]) -> Figure:
    """Figure 1: GD trajectories in the ``(x, y)`` plane, one panel per step size.

    Iterates are dots joined by thin lines (GD is a map, not a flow), one colour per
    trajectory; circles mark the starts, crosses the last iterates. The minima M are black,
    ``M_WS(eta)`` red; each title counts the trajectories by status.
    """
    fig = _figure(5.2 * len(panels), 6.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        panel.minima.draw(ax, panel.eta)
        colours = colormaps["viridis"](np.linspace(0.0, 0.9, len(panel.paths)))
        for path, colour in zip(panel.paths, colours, strict=True):
            ax.plot(path[:, 0], path[:, 1], "-", color=colour, lw=0.5, alpha=0.3)
            ax.plot(path[:, 0], path[:, 1], ".", color=colour, ms=2.5)
            last = path[np.flatnonzero(np.all(np.isfinite(path), axis=1))[-1]]
            ax.plot(*path[0], "o", mfc="none", mec=colour, ms=5)
            ax.plot(*last, "x", color="black", ms=4, mew=0.8)
        ax.plot([], [], "o", mfc="none", mec="grey", ms=5, label="start")
        ax.plot([], [], ".-", color="grey", lw=0.6, label="GD iterates")
        ax.plot([], [], "x", color="black", ms=4, label="last iterate")
        x0, x1, y0, y1 = panel.region
        ax.set(xlim=(x0, x1), ylim=(y0, y1), xlabel="$x$", ylabel="$y$")
        ax.set_aspect("equal", adjustable="box")
        ax.set_title(
            f"GD on $\\frac{{1}}{{2}}(1-xy)^2$, $\\eta = {panel.eta:g}$\n"
            f"{_status_counts(panel.status)}",
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

    Args:
        eta_curve: ``(k,)`` step sizes of the length curve.
        length_curve: ``(k,)`` length of ``M_WS`` normalised by ``reference_length``.
        etas: ``(n_eta,)`` step sizes of the sweep.
        converged_fraction: ``(n_eta,)`` share of the initialisations converging to a minimum.
        eta_e: the critical step size, drawn as a vertical line.
        reference_eta, reference_length: the normalisation ``|M_WS(reference_eta)|``.
        criterion: the eigenvalue of Def. 16 used (for the legend).
    """
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    ax.plot(
        eta_curve,
        length_curve,
        color=_WEAKLY_STABLE["color"],
        lw=2.0,
        label=f"$|M_{{WS}}(\\eta)| \\,/\\, |M_{{WS}}({reference_eta:g})|$"
        f"  ({criterion}; $|M_{{WS}}({reference_eta:g})| = {reference_length:.4g}$)",
    )
    ax.plot(
        etas,
        converged_fraction,
        "o-",
        color=STATUS_STYLE[TrajectoryStatus.CONVERGED_MINIMUM][0],
        ms=4,
        lw=1.2,
        label="trapping-region fraction (grid of initialisations)",
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
    fig = _figure(11.0, 5.8)
    ax_status, ax_steps = fig.subplots(1, 2)
    codes = list(STATUS_STYLE)
    cmap = ListedColormap([STATUS_STYLE[c][0] for c in codes])
    norm = BoundaryNorm(np.arange(len(codes) + 1) - 0.5, len(codes))
    position = np.zeros(max(int(c) for c in codes) + 1, int)
    position[[int(c) for c in codes]] = np.arange(len(codes))
    index = position[status]
    extent = (region[0], region[1], region[2], region[3])
    image = dict(origin="lower", extent=extent, interpolation="nearest", aspect="equal")
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
            color=STATUS_STYLE[c][0],
            label=f"{STATUS_STYLE[c][1]} ({share(np.mean(status == int(c)))})",
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


def sharpness_trajectories(
    steps: np.ndarray,
    sharpness: np.ndarray,
    etas: np.ndarray,
    *,
    title: str = "sharpness along GD trajectories",
) -> Figure:
    """Sharpness ``lambda_max(H(theta_t))`` against ``t``, with the edge of stability ``2/eta``.

    Draws ``SweepResult.recorded_sharpness`` (``sweep(..., sharpness_every=K)``): a thin line
    per trajectory and a thick line for the median over the initialisations, one colour per
    step size, and a dashed line at ``2 / eta`` in the same colour (a minimum with
    ``lambda_max > 2 / eta`` is unstable, Thm. 17). The vertical axis stops at
    ``1.3 * max(2 / eta)``: trajectories far above it are diverging.

    Args:
        steps: measurement times ``(n_sharp,)`` (``SweepResult.sharpness_steps``).
        sharpness: ``(n_eta, n_init, n_sharp)`` (``SweepResult.recorded_sharpness``).
        etas: ``(n_eta,)`` the step sizes.
        title: the axes title.

    Raises:
        ValueError: if the shapes do not agree.
    """
    steps, sharpness, etas = np.asarray(steps), np.asarray(sharpness), np.asarray(etas)
    if sharpness.ndim != 3 or sharpness.shape[::2] != (etas.shape[0], steps.shape[0]):
        raise ValueError(
            "recorded_sharpness must have shape (n_eta, n_init, n_sharp) = "
            f"({etas.shape[0]}, n_init, {steps.shape[0]}), got {sharpness.shape}."
        )
    fig = _figure(7.0, 4.5)
    ax = fig.subplots()
    colours = colormaps["viridis"](np.linspace(0.0, 0.85, len(etas)))
    for eta, runs, colour in zip(etas, sharpness, colours, strict=True):
        for run in runs:
            ax.plot(steps, run, "-", color=colour, lw=0.5, alpha=0.25)
        ax.plot(steps, np.median(runs, axis=0), "-", color=colour, lw=2.0,
                label=f"$\\eta = {eta:g}$ (median)")
        ax.axhline(2 / eta, ls="--", color=colour, lw=1.0)
    ax.plot([], [], "--", color="grey", lw=1.0, label="$2/\\eta$ (edge of stability)")
    top = 1.3 * float(np.max(2 / etas))
    bottom = min(0.0, float(np.nanmin(sharpness)))
    ax.set(xlabel="step $t$", ylabel="$\\lambda_{\\max}(\\nabla^2 L(\\theta_t))$",
           ylim=(bottom, top), title=title)
    ax.legend(fontsize=8, loc="lower right")
    return fig
