"""What happened to a gradient-descent trajectory: status codes and the criteria behind them.

Part of the engine (layer 4). The engine (:func:`gdlr_jax.sweep`) evaluates every trajectory at
a schedule of *evaluation times* (``docs/engine.md``): at each one it computes the full-batch
loss ``L(theta_t)`` and gradient norm ``||grad L(theta_t)||`` and decides, with the
:class:`ConvergenceCriteria`, whether the trajectory has converged or diverged. A trajectory that
is still moving after the last step is examined over its final ``window`` iterates for a
periodic orbit (:func:`orbit_summary`).

All functions here act on one trajectory (scalars and its flat parameter vector) or
elementwise on a batch of trajectories; the engine vmaps them.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


class TrajectoryStatus(enum.IntEnum):
    """Outcome of one trajectory (the ``status`` array of :class:`gdlr_jax.SweepResult`).

    Attributes:
        NOT_CONVERGED: bounded after ``steps`` steps, not converged, no periodic orbit found
            (still drifting, quasi-periodic, converging too slowly for the tolerances, or,
            without ``lyapunov=True``, chaotic).
        CONVERGED_MINIMUM: converged, and the loss is within ``loss_tol`` of the known minimum
            value (or no minimum value was given: see :class:`ConvergenceCriteria`).
        CONVERGED_CRITICAL_POINT: converged to a critical point whose loss is more than
            ``loss_tol`` above the known minimum value (e.g. the saddle at the origin of
            ``1/2 (1 - x y)^2``).
        DIVERGED: left the region ``||theta||_inf <= divergence_bound`` or became non-finite;
            the trajectory is stopped at its last iterate inside that region.
        PERIODIC: bounded and not converged, with iterates repeating at a lag ``p`` with
            ``2 <= p <= max_period`` over the final window (the period is in ``period``).
        CHAOTIC: only with ``sweep(..., lyapunov=True)``: bounded, not converged, no periodic
            orbit, and a finite-time maximal Lyapunov exponent above ``lyapunov_tol`` over the
            final ``lyapunov_steps`` steps (nearby trajectories separate exponentially).
    """

    NOT_CONVERGED = 0
    CONVERGED_MINIMUM = 1
    CONVERGED_CRITICAL_POINT = 2
    DIVERGED = 3
    PERIODIC = 4
    CHAOTIC = 5


class ConvergenceCriteria(NamedTuple):
    """Tolerances of the trajectory status (all documented in ``docs/engine.md``).

    A trajectory, evaluated at an evaluation time ``t`` with full-batch loss ``L_t`` and
    gradient norm ``g_t = ||grad L(theta_t)||_2``, is

    * **diverged** if ``theta_t`` has a non-finite entry or ``||theta_t||_inf >
      divergence_bound``, or ``L_t`` or ``g_t`` is non-finite;
    * **converged** if ``g_t <= grad_tol`` and ``eta * g_t <= step_tol`` (the length of the
      next plain GD step); it converged to a **minimum** if ``L_t - min_loss_value <= loss_tol``
      and to a **non-minimal critical point** otherwise. Without ``min_loss_value`` every
      converged trajectory counts as converged to a minimum (GD from a random initialisation
      converges to a strict saddle with probability zero).

    A trajectory still running after the last step is **periodic** with period ``p`` if ``p``
    is the smallest lag in ``1..max_period`` with ``||theta_j - theta_{j-p}||_inf <= period_tol
    * (1 + ||theta_j||_inf)`` for its last ``p + 1`` iterates ``j``, and ``p >= 2`` (``p = 1``,
    a stalled trajectory, reports period 0); see :func:`orbit_summary`. With
    ``sweep(..., lyapunov=True)``, one that is bounded, not converged and not periodic is
    **chaotic** if its maximal finite-time Lyapunov exponent ``lambda_1`` (the mean of
    ``log ||DG v_t||`` over the final steps, :mod:`gdlr_jax.engine._lyapunov`) exceeds
    ``lyapunov_tol``.

    Attributes:
        grad_tol: bound on the full-batch gradient norm for convergence.
        step_tol: bound on ``eta * ||grad L||`` for convergence.
        loss_tol: how far above ``min_loss_value`` a converged loss may be to count as a
            minimum.
        divergence_bound: bound on ``||theta||_inf``; beyond it a trajectory has diverged.
        window: number of final steps over which the asymptotic step norm is averaged and
            periodic orbits are sought (``>= 2 * max_period``; capped at ``steps``).
        max_period: largest period looked for.
        period_tol: relative tolerance of the lag comparison.
        lyapunov_tol: the least maximal Lyapunov exponent (per step, natural log) of a
            ``CHAOTIC`` trajectory (only used with ``lyapunov=True``). The default 0.05 is
            above the finite-time exponent ``k log(L) / L`` of a tangent growing like ``t^k``
            (a neutral or sheared, not chaotic, orbit) for ``k <= 2`` over the default
            ``L = 256`` steps (0.043), and about three times the spread of the estimate over
            starts of the cubic map of ``x^4/4 - x^2/2`` at ``eta = 1.6`` (0.015).
    """

    grad_tol: float = 1e-5
    step_tol: float = 1e-6
    loss_tol: float = 1e-6
    divergence_bound: float = 1e6
    window: int = 16
    max_period: int = 8
    period_tol: float = 1e-5
    lyapunov_tol: float = 0.05

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first field that is out of range."""
        for name in ("grad_tol", "step_tol", "loss_tol", "period_tol", "lyapunov_tol"):
            value = getattr(self, name)
            if not _is_real(value) or not value >= 0 or math.isnan(value):
                raise ValueError(
                    f"criteria.{name} must be a non-negative number, got {value!r}."
                )
        bound = self.divergence_bound
        if not _is_real(bound) or not bound > 0:
            raise ValueError(
                f"criteria.divergence_bound must be positive (inf allowed), got {bound!r}."
            )
        if not _is_int(self.max_period) or self.max_period < 1:
            raise ValueError(
                f"criteria.max_period must be a positive integer, got {self.max_period!r}."
            )
        if not _is_int(self.window) or self.window < 2 * self.max_period:
            raise ValueError(
                f"criteria.window must be an integer >= 2 * max_period = "
                f"{2 * self.max_period}, got {self.window!r}."
            )


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# XLA:CPU reduces a short minor axis (a few parameters, a few time steps) several times more
# slowly than the same sum written as fused elementwise operations; the engine runs millions of
# trajectories of tiny models, so short axes are reduced by unrolling.
_UNROLL_LIMIT = 32


def _balanced(parts: list[Array], pairwise) -> Array:
    while len(parts) > 1:  # a balanced tree: short dependency chains
        parts = [pairwise(a, b) for a, b in zip(parts[::2], parts[1::2])] + (
            [parts[-1]] if len(parts) % 2 else []
        )
    return parts[0]


def _reduce_last_axis(x: Float[Array, "... k"], pairwise, full) -> Float[Array, "..."]:
    k = x.shape[-1]
    if k <= _UNROLL_LIMIT:
        return _balanced([x[..., i] for i in range(k)], pairwise)
    return full(x, axis=-1)


def reduce_row(row: Sequence[Array], pairwise, full) -> Array:
    """Reduces a flat vector given as its entries (scalars, or vectors along their last axis):
    the same tree as :func:`_reduce_last_axis` of their concatenation when they are scalars."""
    parts = [x if x.ndim == 0 else _reduce_last_axis(x, pairwise, full) for x in row]
    return _balanced(parts, pairwise)


def sum_last_axis(x: Float[Array, "... k"]) -> Float[Array, "..."]:
    """``sum_i x[..., i]`` (unrolled for a short axis)."""
    return _reduce_last_axis(x, jnp.add, jnp.sum)


def max_last_axis(x: Float[Array, "... k"]) -> Float[Array, "..."]:
    """``max_i x[..., i]`` (unrolled for a short axis)."""
    return _reduce_last_axis(x, jnp.maximum, jnp.max)


def within_bound(theta: Float[Array, " d"], bound: float) -> Bool[Array, ""]:
    """Whether every entry of the flat parameters is finite with ``|theta_i| <= bound``.

    One comparison per entry: a NaN compares false, so non-finite entries fail too.
    """
    return jnp.all(jnp.abs(theta) <= bound)


def classify_evaluation(
    status: Int[Array, " n"],
    loss: Float[Array, " n"],
    grad_norm: Float[Array, " n"],
    sound: Bool[Array, " n"],
    etas: Float[Array, " n"],
    criteria: ConvergenceCriteria,
    min_loss_value: float | None,
) -> tuple[Int[Array, " n"], Bool[Array, " n"], Bool[Array, " n"]]:
    """Updates the status of ``n`` trajectories evaluated at the same time.

    Only trajectories with status ``NOT_CONVERGED`` (still running) change.

    Args:
        status: current status codes ``(n,)``.
        loss: full-batch loss at the current iterates ``(n,)``.
        grad_norm: ``||grad L||_2`` at the current iterates ``(n,)``.
        sound: whether the current iterates are :func:`within_bound` with a finite loss and
            gradient ``(n,)`` (:meth:`~gdlr_jax.engine._problem.Problem.evaluate`).
        etas: step sizes ``(n,)``.
        criteria: the tolerances.
        min_loss_value: the known minimum value of the loss, or ``None``.

    Returns:
        ``(new_status, diverged_now, converged_now)``, each ``(n,)``.
    """
    running = status == TrajectoryStatus.NOT_CONVERGED
    diverged_now = running & ~sound
    converged_now = (
        running
        & sound
        & (grad_norm <= criteria.grad_tol)
        & (etas * grad_norm <= criteria.step_tol)
    )
    if min_loss_value is None:
        at_minimum = jnp.ones_like(running)
    else:
        at_minimum = loss - min_loss_value <= criteria.loss_tol
    converged_code = jnp.where(
        at_minimum,
        jnp.int32(TrajectoryStatus.CONVERGED_MINIMUM),
        jnp.int32(TrajectoryStatus.CONVERGED_CRITICAL_POINT),
    )
    new_status = jnp.where(
        diverged_now,
        jnp.int32(TrajectoryStatus.DIVERGED),
        jnp.where(converged_now, converged_code, status),
    )
    return new_status, diverged_now, converged_now


def orbit_summary(
    rows: Sequence[Float[Array, " d"] | Sequence[Float[Array, "..."]]],
    max_period: int,
    period_tol: float,
) -> tuple[Int[Array, ""], Float[Array, ""]]:
    """Period and mean step length of one trajectory over its final window.

    With ``theta_0, ..., theta_W`` the last ``W + 1`` iterates (``W`` steps, flat vectors;
    ``theta_W = final``):

    * ``asymptotic_step_norm = (1/W) sum_j ||theta_{j+1} - theta_j||_2``, which for plain GD
      is the mean of ``eta * ||grad L(theta_j)||`` (the quantity of the paper's abstract and
      Figures 5-6);
    * ``period`` is the smallest ``p`` in ``1..P`` (``P = max_period``) with
      ``|theta_j - theta_{j-p}|_inf <= period_tol * (1 + |theta_j|_inf)`` for the last
      ``p + 1`` iterates ``j = W - p, ..., W`` (one full orbit and one more), reported when
      ``p >= 2`` and 0 otherwise (no orbit found, or ``p = 1``: stalled). ``P = 0`` reports 0.

    The window is walked one iterate at a time (a Python loop over its ``W + 1`` rows)
    so that, vmapped over trajectories, every intermediate is one number per trajectory: XLA
    then vectorises across trajectories even when ``d`` is tiny.

    Args:
        rows: the last ``W + 1`` iterates ``theta_0, ..., theta_W``, ``W >= 2 * max_period``:
            each a flat vector ``(d,)``, or its entries (a sequence of scalars, or of flat
            vectors, as the engine's columns and leaves store it).
        max_period: largest period looked for.
        period_tol: relative tolerance of the lag comparison.

    Returns:
        ``(period, asymptotic_step_norm)``, scalars.
    """
    rows = [tuple(row) if isinstance(row, (tuple, list)) else (row,) for row in rows]
    window = len(rows) - 1

    def norm_inf(row):
        return reduce_row([jnp.abs(x) for x in row], jnp.maximum, jnp.max)

    def difference(a, b):
        return [x - y for x, y in zip(a, b)]

    step_norms = [
        jnp.sqrt(reduce_row([jnp.square(x) for x in difference(rows[j + 1], rows[j])],
                             jnp.add, jnp.sum))
        for j in range(window)
    ]
    mean_step = functools.reduce(jnp.add, step_norms) / window
    # the tolerance of each iterate, multiplied once (44 divisions per trajectory at P = 8
    # were a tenth of the final window's cost on XLA:CPU)
    tolerance = [period_tol * (1.0 + norm_inf(row)) for row in rows[window - max_period :]]
    period = jnp.int32(0)
    for p in range(max_period, 0, -1):  # ends with the smallest repeating lag
        repeats = functools.reduce(
            jnp.logical_and,
            [
                norm_inf(difference(rows[j], rows[j - p])) <= tolerance[j - window + max_period]
                for j in range(window - p, window + 1)
            ],
        )
        period = jnp.where(repeats, jnp.int32(p), period)
    return jnp.where(period >= 2, period, 0), mean_step
