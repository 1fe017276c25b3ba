"""Sharpness along GD trajectories, from the engine's recordings (layer 5)."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from gdlr_jax.experiments.figures._common import new_figure


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
    fig = new_figure(7.0, 4.5)
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
