"""The sweeps of the two-neuron study (layer 5): Figure 1's phase portraits, Figure 2's
trapping region and the basin map, each a :func:`gdlr_jax.sweep` of a grid of initialisations
planned by :mod:`gdlr_jax.experiments._two_neuron_plan`, and the share of them classified as
converged outside ``M_WS``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from jaxtyping import Float

from gdlr_jax.engine import SweepResult, TrajectoryStatus
from gdlr_jax.experiments._shared_problems import initial_grid
from gdlr_jax.experiments._skeleton import RunSteps, status_fractions
from gdlr_jax.experiments._two_neuron_minima import weak_stability_thresholds
from gdlr_jax.experiments._two_neuron_plan import _sweep_arguments, _SweepSpec


class _Sweeping(NamedTuple):
    """What every sweep of the study shares."""

    dtype: Any  # of the trajectories
    engine: Mapping[str, Any]  # the config's engine section
    criterion: str  # the eigenvalue of Def. 16


def _run_sweep(
    spec: _SweepSpec, ctx: _Sweeping, steps: RunSteps
) -> tuple[np.ndarray, np.ndarray, SweepResult]:
    """:func:`gdlr_jax.sweep` of ``spec`` with a progress bar over trajectories; its finished
    chunks are saved in the run's checkpoint folder ``spec.name`` (resumable).

    Returns:
        The grid's ``xs (starts,)``, ``ys (starts,)`` and the sweep's result.
    """
    xs, ys, params0 = initial_grid(spec.region, spec.starts, spec.starts, ctx.dtype)
    args, kwargs = _sweep_arguments(spec, params0, ctx.dtype, ctx.engine)
    with steps.progress_bar(len(spec.etas) * spec.starts**2, spec.desc) as bar:
        result = steps.sweep(spec.name, bar, *args, **kwargs)
    return xs, ys, result


def unstable_convergence_fraction(
    result: SweepResult, criterion: str = "lambda_max"
) -> Float[np.ndarray, " n_eta"]:
    """Per step size, the share of the initialisations that :func:`gdlr_jax.sweep` classified
    as converged to a minimum whose final point is *not* weakly stable (``eta >= 2 / lambda``).

    Only a null set of initialisations can converge to such a minimum (Thm. 17: it is
    unstable): a start on it (a fixed point), or a trajectory mapped exactly onto it. A
    larger share means trajectories that passed within the engine's tolerances of M and were
    classified at that moment (``docs/reproduction.md``).

    Args:
        result: a sweep of the two-neuron loss.
        criterion: the eigenvalue of Def. 16.

    Returns:
        ``(n_eta,)`` shares.
    """
    status = np.asarray(result.status)
    eta_index, init_index = np.nonzero(status == int(TrajectoryStatus.CONVERGED_MINIMUM))
    w1, w2 = (np.asarray(w)[eta_index, init_index, 0, 0] for w in result.final_params)
    unstable = weak_stability_thresholds(w1, w2, criterion) <= np.asarray(result.etas)[eta_index]
    counts = np.bincount(eta_index[unstable], minlength=status.shape[0])
    return counts / status.shape[1]


def _phase_portraits(
    specs: list[_SweepSpec], ctx: _Sweeping, steps: RunSteps
) -> tuple[dict, list]:
    """Figure 1 from the engine's recordings of the iterates: (arrays, summaries)."""
    arrays, summaries = {}, []
    for i, spec in enumerate(specs):
        _, _, result = _run_sweep(spec, ctx, steps)
        w1, w2 = (np.asarray(w)[0, :, :, 0, 0] for w in result.recorded_params)
        status = np.asarray(result.status)[0]
        arrays[f"portrait{i}_paths"] = np.stack([w1, w2], axis=-1)  # (starts^2, steps + 1, 2)
        arrays[f"portrait{i}_status"] = status
        summaries.append({"eta": float(spec.etas[0]), "status_fractions": status_fractions(status)})
    return arrays, summaries


def _trapping_region(spec: _SweepSpec, ctx: _Sweeping, steps: RunSteps) -> dict:
    """The sweep of Figure 2: every initialisation of the grid at every step size."""
    xs, ys, result = _run_sweep(spec, ctx, steps)
    return {
        "sweep_eta": spec.etas,
        "sweep_x0": xs,
        "sweep_y0": ys,
        "sweep_status": np.asarray(result.status),
        "sweep_steps_taken": np.asarray(result.steps_taken),
        "sweep_final_loss": np.asarray(result.final_loss),
        "sweep_asymptotic_step_norm": np.asarray(result.asymptotic_step_norm),
        "sweep_period": np.asarray(result.period),
        "sweep_converged_fraction": np.asarray(result.converged_fraction(), np.float64),
        "sweep_converged_outside_mws": unstable_convergence_fraction(result, ctx.criterion),
    }


def _basin_map(spec: _SweepSpec, ctx: _Sweeping, steps: RunSteps) -> dict:
    """The status and steps of every initialisation of a fine grid at one step size."""
    xs, ys, result = _run_sweep(spec, ctx, steps)
    n = spec.starts
    return {
        "basin_x0": xs,
        "basin_y0": ys,
        "basin_status": np.asarray(result.status)[0].reshape(n, n),
        "basin_steps_taken": np.asarray(result.steps_taken)[0].reshape(n, n),
        "basin_converged_outside_mws": unstable_convergence_fraction(result, ctx.criterion),
    }
