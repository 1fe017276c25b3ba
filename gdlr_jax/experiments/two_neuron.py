"""The two-neuron study: the paper's worked example ``L(x, y) = 1/2 (1 - xy)^2`` (layer 5).

Its minima are the hyperbola ``M = {xy = 1}`` (two branches), with one non-zero Hessian
eigenvalue ``x^2 + y^2`` on M, so ``M_WS(eta) = {xy = 1, x^2 + y^2 < 2/eta}`` and
``eta_E = 1``. The study computes, from a config (``configs/two_neuron.yaml``):

* Figure 1 (``phase_portraits``): GD trajectories from a grid of starts for each step size of
  ``portraits`` (the paper: ``eta = 0.4`` over ``R = [-0.2, 2.5] x [0, 2.5]``, trajectories
  converging onto ``M_WS``; ``eta = 1.1`` over ``[0.7, 1.2] x [0.6, 1.2]``, none converging),
  from the engine's recordings of the iterates, each panel grown beyond its region to show
  where every trajectory that did not diverge ends;
* Figure 2 (``weak_stability``): the length of ``M_WS(eta)`` normalised by its length at
  ``reference_eta`` (the paper: 0.1), beside the *trapping-region fraction*: the share of a
  grid of initialisations that :func:`gdlr_jax.sweep` classifies as converged to a minimum;
  with ``eta_E`` from :func:`gdlr_jax.critical_step_size` marked;
* a basin map (``basin_map``): the status of every initialisation of a fine grid at one step
  size, and its steps to converge.

The length of ``M_WS`` comes from the toolkit's curvature, not from the formula above:
:func:`gdlr_jax.weak_stability_threshold` (``2 / lambda`` of the exact Hessian) is vmapped over
a fine parametrisation ``x = s e^t, y = s e^{-t}`` (``s = +-1``, ``|t| <= log_extent``) of each
branch, and the arclength of ``{eta < threshold}`` is integrated along the polyline, the
threshold interpolated linearly between points (so a crossing is located to second order).

The figures are drawn by :mod:`gdlr_jax.experiments.figures.two_neuron`; the run's steps
(plan, sweeps, results, figures, summary) are those of :mod:`gdlr_jax.experiments._skeleton`.
This module holds the schema and ``compute``; the parts are in
:mod:`~gdlr_jax.experiments._two_neuron_minima` (``M_WS`` along M),
:mod:`~gdlr_jax.experiments._two_neuron_plan` (the sweeps planned, before any compute),
:mod:`~gdlr_jax.experiments._two_neuron_sweeps` (the sweeps run) and
:mod:`~gdlr_jax.experiments._two_neuron_report` (figures and summary).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from gdlr_jax.dynamics import critical_step_size
from gdlr_jax.dynamics._stability import CRITERIA
from gdlr_jax.experiments import _skeleton
from gdlr_jax.experiments._shared_problems import initial_grid
from gdlr_jax.experiments._skeleton import RunSteps
from gdlr_jax.experiments._two_neuron_minima import (
    MinimaProfile,
    minima_profile,
    weak_stability_thresholds,
    weakly_stable_length,
)
from gdlr_jax.experiments._two_neuron_plan import _SweepSpec, describe, plan
from gdlr_jax.experiments._two_neuron_report import _Computed, draw_figures, report
from gdlr_jax.experiments._two_neuron_sweeps import (
    _basin_map,
    _phase_portraits,
    _Sweeping,
    _trapping_region,
    unstable_convergence_fraction,
)
from gdlr_jax.experiments.config import Numbers, Repeated, Scalar, Section
from gdlr_jax.problems import linear

# the study's public names, those of its parts included (tests and docs import them from here)
__all__ = [
    "EXPERIMENT",
    "SCHEMA",
    "MinimaProfile",
    "R",
    "compute",
    "describe",
    "draw_figures",
    "initial_grid",
    "minima_profile",
    "plan",
    "report",
    "unstable_convergence_fraction",
    "weak_stability_thresholds",
    "weakly_stable_length",
]


# ----- the schema ---------------------------------------------------------------------------
def _check_region(v: list[float]) -> str | None:
    if v[0] < v[1] and v[2] < v[3]:
        return None
    return "[x_min, x_max, y_min, y_max] with x_min < x_max and y_min < y_max"


def _region(default: list[float], what: str) -> Numbers:
    return Numbers(4, f"{what}: [x_min, x_max, y_min, y_max]", default, check=_check_region)


def _eta(default: float, what: str) -> Scalar:
    return Scalar(float, what, default, gt=0.0)


def _steps(default: int) -> Scalar:
    return Scalar(int, "maximum GD steps per trajectory", default, ge=1)


def _check_eta_grid(grid: dict) -> str | None:
    if grid["start"] <= grid["stop"]:
        return None
    return f"eta.start = {grid['start']} must be <= eta.stop = {grid['stop']}"


R = [-0.2, 2.5, 0.0, 2.5]  # the region R of the paper's Figure 1 (left)

SCHEMA = _skeleton.schema(
    "the two-neuron study",
    _skeleton.dtype_key(
        "float64", "floating dtype of the GD trajectories (curvature is always float64)"
    ),
    {
        "critical_step_size": Section(
            "eta_E by gdlr_jax.critical_step_size (minimises lambda_max over M)",
            {
                "restarts": Scalar(int, "random restarts", 4, ge=1),
                "steps": Scalar(int, "Adam steps per restart", 600, ge=1),
            },
        ),
        "weak_stability": Section(
            "the length of M_WS(eta) along M = {xy = 1} (Def. 16)",
            {
                "criterion": Scalar(
                    str,
                    "eigenvalue of Def. 16 (they coincide for this loss)",
                    "lambda_max",
                    choices=CRITERIA,
                ),
                "branches": Scalar(
                    str,
                    "branches of M measured: x, y > 0 only, or both",
                    "both",
                    choices=("positive", "both"),
                ),
                "log_extent": Scalar(
                    float,
                    "each branch is x = +-e^t, y = +-e^-t with |t| <= log_extent (at most "
                    "350: the curvature x^2 + y^2 = e^(2t) overflows float64 past ~354.9)",
                    4.0,
                    gt=0.0,
                    le=350.0,
                ),
                "points": Scalar(int, "points per branch", 8001, ge=3),
                "reference_eta": _eta(0.1, "lengths are normalised by |M_WS(reference_eta)|"),
                "curve_points": Scalar(
                    int, "step sizes on the length curve of Figure 2", 300, ge=2, le=100_000
                ),
            },
        ),
        "sweep": Section(
            "Figure 2: trapping-region fraction on a grid of step sizes",
            {
                "eta": Section(
                    "step sizes linspace(start, stop, num)",
                    {
                        "start": _eta(0.1, "smallest step size"),
                        "stop": _eta(1.2, "largest step size"),
                        "num": Scalar(int, "number of step sizes", 23, ge=1),
                    },
                    check=_check_eta_grid,
                ),
                "region": _region(R, "initialisations"),
                "resolution": Scalar(
                    int, "initialisations per axis (cell centres of a square grid)", 48, ge=1
                ),
                "steps": _steps(2000),
            },
        ),
        "portraits": Repeated(
            Section(
                "one panel of Figure 1",
                {
                    "eta": Scalar(float, "step size", gt=0.0),
                    "region": Numbers(
                        4,
                        "region of the starts, shown grown to hold every last iterate of a "
                        "trajectory that did not diverge: [x_min, x_max, y_min, y_max]",
                        check=_check_region,
                    ),
                    "starts": Scalar(int, "starts per axis (cell centres)", ge=1),
                    "steps": Scalar(int, "GD steps per trajectory", ge=1),
                },
            ),
            "Figure 1: phase portraits, one panel each",
            default=[
                {"eta": 0.4, "region": R, "starts": 5, "steps": 100},
                {"eta": 1.1, "region": [0.7, 1.2, 0.6, 1.2], "starts": 3, "steps": 30},
            ],
        ),
        "basin": Section(
            "basin map: the status of every initialisation of a fine grid at one step size",
            {
                "eta": _eta(0.9, "step size"),
                "region": _region([-2.5, 2.5, -2.5, 2.5], "initialisations"),
                "resolution": Scalar(int, "initialisations per axis", 200, ge=1),
                "steps": _steps(3000),
            },
        ),
    },
    _skeleton.engine_section(
        {
            "memory_budget_mb": Scalar(
                int, "memory for one chunk of trajectories (MiB)", 1024, ge=1
            ),
        }
    ),
)


# ----- the study ----------------------------------------------------------------------------
def compute(params: Mapping[str, Any], specs: list[_SweepSpec], steps: RunSteps) -> _Computed:
    """The study's computations from resolved config keys (see :data:`SCHEMA`) and its sweeps
    ``specs`` (from :func:`plan`): ``M_WS`` along M, ``eta_E``, then the sweeps of Figure 1,
    Figure 2 and the basin map. Runs with float64 enabled (the run's ``compute`` step):
    curvature and ``eta_E`` are always float64; the trajectories use ``params["dtype"]``."""
    ws = params["weak_stability"]
    *portrait_specs, trapping_spec, basin_spec = specs
    etas = trapping_spec.etas

    with steps.timed("weak_stability"):
        profile = minima_profile(
            branches=ws["branches"],
            log_extent=ws["log_extent"],
            points=ws["points"],
            criterion=ws["criterion"],
        )
        eta_curve = np.linspace(min(etas[0], ws["reference_eta"]), etas[-1], ws["curve_points"])
        reference_length = float(weakly_stable_length(profile, [ws["reference_eta"]])[0])
        length_curve = weakly_stable_length(profile, eta_curve) / reference_length
        mws_length = weakly_stable_length(profile, etas)
    with steps.timed("critical_step_size"):
        critical = critical_step_size(
            linear.two_neuron(jnp.float64), **params["critical_step_size"]
        )

    ctx = _Sweeping(jnp.dtype(params["dtype"]), params["engine"], ws["criterion"])
    arrays: dict[str, Any] = {
        "minima_xy": profile.xy,
        "minima_arclength": profile.arclength,
        "minima_thresholds": profile.thresholds,
        "curve_eta": eta_curve,
        "curve_mws_length_normalised": length_curve,
        "sweep_mws_length": mws_length,
        "sweep_mws_length_normalised": mws_length / reference_length,
    }
    with steps.timed("portraits"):
        portrait_arrays, portrait_summaries = _phase_portraits(portrait_specs, ctx, steps)
        arrays.update(portrait_arrays)
    with steps.timed("sweep"):
        arrays.update(_trapping_region(trapping_spec, ctx, steps))
    with steps.timed("basin"):
        arrays.update(_basin_map(basin_spec, ctx, steps))
    return _Computed(arrays, profile, critical, reference_length, portrait_summaries)


EXPERIMENT = _skeleton.experiment(
    name="two_neuron",
    summary="the worked example 1/2 (1 - xy)^2: Figures 1 and 2 and a basin map",
    schema=SCHEMA,
    plan=plan,
    compute=compute,
    figures=draw_figures,
    report=report,
    enable_x64=lambda params: True,  # curvature and eta_E are always float64
    describe=describe,
)
