"""The critical step size of any model, measured: where the share of converging
initialisations collapses (layer 4: engine; beyond the paper).

For linear networks ``eta_E = 2 / min_M lambda_max`` is computed by
:func:`gdlr_jax.critical_step_size`: above it no global minimum is weakly stable and almost no
initialisation converges (Thm. 18, 21). For a model without that structure (an MLP), the paper
hypothesises the same and observes "no convergence for eta > 1" on MNIST (Figure 3).
:func:`estimate_critical_step_size` measures the step size where convergence collapses with
batched :func:`gdlr_jax.sweep` calls -- each round one sweep over several step sizes from the
same initialisations -- and certifies both ends of the bracket with binomial confidence
bounds (Wilson score intervals), and gives a lower bound on ``eta_E`` from the curvature of
the flattest converged minimum it found (a point of ``M`` gives ``eta_E >= 2 / lambda_max``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float, Int

from gdlr_jax.curvature import top_eigenvalues
from gdlr_jax.engine._problem import LossFn
from gdlr_jax.engine._results import SweepResult
from gdlr_jax.engine._sweep import sweep
from gdlr_jax.engine._trajectory_status import ConvergenceCriteria, TrajectoryStatus
from gdlr_jax.problems._pytree import PyTree


class CriticalStepEstimate(NamedTuple):
    """The result of :func:`estimate_critical_step_size`.

    With ``p(eta)`` the share of the initialisations that converge to a minimum at step size
    ``eta`` and ``q = threshold``, a step size is *converging* when the Wilson lower bound of
    ``p`` exceeds ``q`` and *collapsed* when the Wilson upper bound is below ``q``.

    Attributes:
        eta: the collapse step size, the midpoint of ``interval``.
        interval: ``(low, high)``: ``high`` the smallest collapsed step size swept, ``low`` the
            largest converging one below it; where ``p`` decreases through ``q`` once, the
            crossing lies in ``interval`` with at least the probability that both
            certifications hold (``>= 2 confidence - 1``).
        resolved: whether ``(high - low) <= rtol * high`` was reached within ``max_rounds``
            (else ``interval`` is what the rounds reached: widen the trials or the steps).
        threshold: ``q``.
        confidence: the two-sided level of each Wilson interval.
        etas: ``(n,)`` every step size swept, ascending.
        converged: ``(n,)`` how many initialisations converged to a minimum at each.
        share_bounds: ``(n, 2)`` the Wilson interval of ``p`` at each.
        trials: initialisations per step size (``n_init``).
        num_sweeps: the sweeps run (one per round).
        num_trajectories: the trajectories run, ``n * trials``.
        sharpness_bound: ``2 / lambda_max`` at the flattest of the converged final iterates
            examined (``None`` if none converged): a lower bound on ``eta_E`` when that iterate
            is a global minimum (up to the tolerances of convergence).
        flattest_lambda_max: that ``lambda_max`` (``None`` if none converged).
        flattest_eta: the step size of the trajectory that found it (``None`` likewise).
    """

    eta: float
    interval: tuple[float, float]
    resolved: bool
    threshold: float
    confidence: float
    etas: Float[np.ndarray, " n"]
    converged: Int[np.ndarray, " n"]
    share_bounds: Float[np.ndarray, "n 2"]
    trials: int
    num_sweeps: int
    num_trajectories: int
    sharpness_bound: float | None
    flattest_lambda_max: float | None
    flattest_eta: float | None


_DEFAULT_CRITERIA = ConvergenceCriteria()  # the engine's default tolerances


def wilson_interval(
    successes: Int[np.ndarray, " n"], trials: int, confidence: float
) -> Float[np.ndarray, "n 2"]:
    """The Wilson score interval of a binomial share, ``(n, 2)`` ``(low, high)``.

    With ``p_hat = k / n`` and ``z`` the two-sided normal quantile of ``confidence``:

        (p_hat + z^2 / 2n -/+ z sqrt(p_hat (1 - p_hat) / n + z^2 / 4n^2)) / (1 + z^2 / n).
    """
    import scipy.stats  # here: importing gdlr_jax does not import scipy.stats (~1 s)

    k = np.asarray(successes, np.float64)
    z = float(scipy.stats.norm.ppf(0.5 + confidence / 2))
    p = k / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = (
        z
        * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
        / (1 + z * z / trials)
    )
    return np.stack(
        [np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)], -1
    )


def _positive(name: str, value: Any) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
    return float(value)


def _count(name: str, value: Any, minimum: int) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
    ):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _share(name: str, value: Any) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0 < value < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}.")
    return float(value)


def _bracket(
    etas: np.ndarray, bounds: np.ndarray, threshold: float
) -> tuple[float | None, float | None]:
    """``(low, high)``: the smallest collapsed step size and the largest converging one below
    it (each ``None`` when there is none)."""
    collapsed = etas[bounds[:, 1] < threshold]
    high = float(collapsed.min()) if collapsed.size else None
    converging = etas[
        (bounds[:, 0] > threshold) & (etas < (np.inf if high is None else high))
    ]
    low = float(converging.max()) if converging.size else None
    return low, high


def estimate_critical_step_size(
    loss_fn: LossFn,
    params0: PyTree,
    eta_range: Sequence[float],
    *,
    steps: int,
    threshold: float = 0.05,
    confidence: float = 0.95,
    etas_per_round: int = 8,
    rtol: float = 0.01,
    max_rounds: int = 8,
    min_loss_value: float | None = None,
    criteria: ConvergenceCriteria = _DEFAULT_CRITERIA,
    sharpness_points: int = 16,
    dtype: Any = jnp.float32,
    check_every: int = 128,
    memory_budget_bytes: int = 1 << 30,
    chunk_size: int | None = None,
) -> CriticalStepEstimate:
    """Brackets and bisects the step size at which full-batch GD stops converging.

    ``p(eta)`` is the share of the initialisations ``params0`` that :func:`gdlr_jax.sweep`
    classifies as converged to a minimum within ``steps`` steps. The estimate is the step
    size where ``p`` falls through ``threshold`` (the *collapse*), found in rounds, each one
    sweep over ``etas_per_round`` step sizes from all of ``params0``:

    1. bracketing: ``geomspace(eta_range[0], eta_range[1])``; while no step size is
       certified converging (Wilson lower bound of ``p > threshold``), the next round sweeps a
       range as wide below the smallest, and while none is certified collapsed (Wilson upper
       bound ``< threshold``), one above the largest;
    2. bisection: ``etas_per_round`` step sizes evenly inside the bracket ``(low, high)``,
       ``high`` the smallest collapsed step size swept and ``low`` the largest converging one
       below it, until ``high - low <= rtol * high`` or ``max_rounds`` rounds.

    For a linear network the collapse lies below ``eta_E`` (Thm. 18, 21: above it no minimum is
    weakly stable), and the flattest converged minimum gives ``eta_E >= 2 / lambda_max``
    (:attr:`CriticalStepEstimate.sharpness_bound`); ``lambda_max`` is measured by
    :func:`gdlr_jax.top_eigenvalues` (Lanczos) at up to ``sharpness_points`` converged final
    iterates, taken from the largest converging step sizes first (a minimum GD converges to at
    step size ``eta`` has ``lambda_max <~ 2 / eta``: the flattest are found there).

    Args:
        loss_fn: ``loss_fn(params) -> scalar``, the full-batch loss.
        params0: initialisations, every leaf ``(n_init, ...)``: the same ones at every step
            size (``n_init`` is the binomial sample size of every share).
        eta_range: ``(eta_low, eta_high)``, ``0 < eta_low < eta_high``: the first round's
            range; it need not bracket the collapse.
        steps: the steps of every trajectory (more steps let slow trajectories near the
            collapse converge).
        threshold: ``q`` in ``(0, 1)``: a step size has collapsed when ``p(eta) < q``.
        confidence: two-sided level of the Wilson intervals, in ``(0, 1)``.
        etas_per_round: step sizes per sweep, ``>= 2``.
        rtol: the relative width of the bracket at which bisection stops, ``> 0``.
        max_rounds: the most sweeps, ``>= 1``.
        min_loss_value: the known minimum value of the loss (minima are then told from other
            critical points), or ``None``.
        criteria, dtype, check_every, memory_budget_bytes, chunk_size: as in
            :func:`gdlr_jax.sweep`.
        sharpness_points: converged final iterates whose ``lambda_max`` is measured, ``>= 0``.

    Returns:
        A :class:`CriticalStepEstimate`.

    Raises:
        ValueError: before any compute, on an ``eta_range`` that is not two increasing
            positive numbers or any other argument out of range, and as :func:`gdlr_jax.sweep`
            does on ``loss_fn``, ``params0`` or the criteria.
    """
    try:
        low0, high0 = (float(v) for v in eta_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"eta_range must be two numbers (eta_low, eta_high), got {eta_range!r}."
        ) from None
    if not (math.isfinite(low0) and math.isfinite(high0) and 0 < low0 < high0):
        raise ValueError(
            f"eta_range must have 0 < eta_low < eta_high, both finite, got {eta_range!r}."
        )
    threshold = _share("threshold", threshold)
    confidence = _share("confidence", confidence)
    per_round = _count("etas_per_round", etas_per_round, 2)
    rtol = _positive("rtol", rtol)
    max_rounds = _count("max_rounds", max_rounds, 1)
    sharpness_points = _count("sharpness_points", sharpness_points, 0)
    leaves = jax.tree_util.tree_leaves(params0)
    if not leaves or np.ndim(leaves[0]) < 1:
        raise ValueError(
            "params0 must be a pytree of arrays with a leading axis (n_init, ...)."
        )
    trials = int(np.shape(leaves[0])[0])

    results: list[SweepResult] = []
    swept = np.zeros(0)
    counts = np.zeros(0, np.int64)

    def run(etas: np.ndarray) -> None:
        nonlocal swept, counts
        etas = np.setdiff1d(np.unique(etas), swept)  # never sweep a step size twice
        if etas.size == 0:
            return
        result = sweep(
            loss_fn,
            params0,
            etas,
            steps=steps,
            min_loss_value=min_loss_value,
            criteria=criteria,
            dtype=dtype,
            check_every=check_every,
            memory_budget_bytes=memory_budget_bytes,
            chunk_size=chunk_size,
        )
        results.append(result)
        converged = np.sum(
            result.status == int(TrajectoryStatus.CONVERGED_MINIMUM), axis=1
        )
        order = np.argsort(np.concatenate([swept, np.asarray(result.etas, np.float64)]))
        swept = np.concatenate([swept, np.asarray(result.etas, np.float64)])[order]
        counts = np.concatenate([counts, converged])[order]

    run(np.geomspace(low0, high0, per_round))
    low = high = None
    while True:
        bounds = wilson_interval(counts, trials, confidence)
        low, high = _bracket(swept, bounds, threshold)
        done = low is not None and high is not None and high - low <= rtol * high
        if done or len(results) >= max_rounds:
            break
        before = swept.size
        if high is None:  # nothing collapsed yet: look above
            top = swept.max()
            run(np.geomspace(top, top * high0 / low0, per_round + 1)[1:])
        elif low is None:  # nothing converging below the collapse: look below
            bottom = swept.min()
            run(np.geomspace(bottom * low0 / high0, bottom, per_round + 1)[:-1])
        else:
            run(np.linspace(low, high, per_round + 2)[1:-1])
        if swept.size == before:  # the step sizes no longer differ in the sweep's dtype
            break

    bounds = wilson_interval(counts, trials, confidence)
    lam, lam_eta = _flattest_minimum(loss_fn, results, sharpness_points)
    interval = (
        float("nan") if low is None else low,
        float("nan") if high is None else high,
    )
    return CriticalStepEstimate(
        eta=float(np.mean(interval)),
        interval=interval,
        resolved=bool(
            low is not None and high is not None and high - low <= rtol * high
        ),
        threshold=threshold,
        confidence=confidence,
        etas=swept,
        converged=counts,
        share_bounds=bounds,
        trials=trials,
        num_sweeps=len(results),
        num_trajectories=int(swept.size * trials),
        sharpness_bound=None if lam is None else 2.0 / lam,
        flattest_lambda_max=lam,
        flattest_eta=lam_eta,
    )


def _flattest_minimum(
    loss_fn: LossFn, results: list[SweepResult], points: int
) -> tuple[float | None, float | None]:
    """The smallest ``lambda_max`` over up to ``points`` converged final iterates of
    ``results`` (largest step sizes first), and the step size that reached it."""
    picked = []  # (eta, result, eta index, init index)
    for result in results:
        status = np.asarray(result.status)
        for i, j in zip(*np.nonzero(status == int(TrajectoryStatus.CONVERGED_MINIMUM))):
            picked.append((float(result.etas[i]), result, int(i), int(j)))
    picked.sort(key=lambda item: -item[0])
    picked = picked[:points]
    if not picked:
        return None, None
    stacked = jax.tree_util.tree_map(
        lambda *leaves: jnp.stack(leaves),
        *[_trajectory(result.final_params, i, j) for _, result, i, j in picked],
    )
    lams = np.asarray(jax.vmap(lambda p: top_eigenvalues(loss_fn, p, 1)[0])(stacked))
    best = int(np.argmin(lams))
    return float(lams[best]), picked[best][0]


def _trajectory(params: PyTree, i: int, j: int) -> PyTree:
    """Trajectory ``(i, j)`` of a pytree with leaves ``(n_eta, n_init, ...)``."""
    return jax.tree_util.tree_map(lambda leaf: leaf[i, j], params)
