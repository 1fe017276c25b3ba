"""What every figure shares: the trajectory statuses' colours and names, shares (layer 5).

Figures are drawn on matplotlib's Agg canvas without pyplot (no global figure state, nothing
to close); sizes are fixed in inches, so a PNG is ``figsize * dpi`` pixels.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from jaxtyping import Float, Int
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gdlr_jax.engine import TrajectoryStatus


class StatusStyle(NamedTuple):
    """How a trajectory status is shown: its colour, its legend label, its short name (table
    columns) and its abbreviation (heatmap row labels)."""

    colour: str
    label: str
    short: str
    abbreviation: str


#: the style of each trajectory status, in the order figures and tables show them.
STATUS_STYLE: dict[TrajectoryStatus, StatusStyle] = {
    TrajectoryStatus.CONVERGED_MINIMUM: StatusStyle(
        "#2ca02c", "converged to a minimum", "minimum", "min"
    ),
    TrajectoryStatus.CONVERGED_CRITICAL_POINT: StatusStyle(
        "#1f77b4", "converged to a non-minimal critical point", "critical pt", "crit"
    ),
    TrajectoryStatus.PERIODIC: StatusStyle("#ff7f0e", "periodic orbit", "periodic", "per"),
    TrajectoryStatus.CHAOTIC: StatusStyle("#d62728", "chaotic", "chaotic", "chao"),
    TrajectoryStatus.NOT_CONVERGED: StatusStyle(
        "#9e9e9e", "not converged", "not conv.", "n.c."
    ),
    TrajectoryStatus.DIVERGED: StatusStyle("#6a1b9a", "diverged", "diverged", "div"),
}


def status_shares(status: Int[np.ndarray, "... n"]) -> dict[str, Float[np.ndarray, ...]]:
    """Share of the trajectories with each :class:`~gdlr_jax.TrajectoryStatus` along the last
    axis, keyed by the status's lower-case name (``"converged_minimum"``, ...)."""
    return {s.name.lower(): np.mean(status == int(s), axis=-1) for s in TrajectoryStatus}


def share(fraction: float) -> str:
    """A fraction as a percentage with one decimal; ``"<0.1%"`` when positive but smaller."""
    return "<0.1%" if 0 < fraction < 1e-3 else f"{fraction:.1%}"


def status_counts(status: np.ndarray) -> str:
    """``"22 converged to a minimum, 3 diverged"``: the trajectories by status (none left out
    but the statuses nobody has)."""
    return ", ".join(
        f"{np.sum(status == int(code))} {style.label}"
        for code, style in STATUS_STYLE.items()
        if np.any(status == int(code))
    )


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width x height`` inches with constrained layout on an Agg canvas."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig
