"""What a sweep returns: :class:`SweepResult` (the whole grid) and :class:`SweepChunk`
(one chunk), host NumPy arrays (layer 4: engine)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from jaxtyping import Float, Int

from gdlr_jax.engine._trajectory_status import TrajectoryStatus
from gdlr_jax.problems._pytree import PyTree


class SweepResult(NamedTuple):
    """What happened to every trajectory of a sweep (a pytree of host NumPy arrays).

    Attributes:
        etas: the step sizes ``(n_eta,)``.
        status: :class:`~gdlr_jax.TrajectoryStatus` codes ``(n_eta, n_init)``, int32.
        steps_taken: steps applied ``(n_eta, n_init)``: the evaluation time at which a
            trajectory was found converged, the exact step of divergence (``theta`` after it is
            the last iterate inside the bound), or ``steps``.
        final_loss: full-batch loss at the final iterate ``(n_eta, n_init)``.
        final_grad_norm: full-batch ``||grad L||_2`` at the final iterate ``(n_eta, n_init)``.
        asymptotic_step_norm: ``(n_eta, n_init)``: for a trajectory still running at the end,
            the mean of ``||theta_{t+1} - theta_t||`` (``= eta ||grad L(theta_t)||`` for plain
            GD) over the final window; ``eta * final_grad_norm`` for a converged one; ``inf``
            for a diverged one.
        min_loss: the smallest full-batch loss seen at the evaluation times and at the final
            iterate ``(n_eta, n_init)`` (``inf`` if none was finite).
        period: the period ``p >= 2`` of a ``PERIODIC`` trajectory, 0 otherwise
            ``(n_eta, n_init)``.
        final_params: the final iterates, leaves ``(n_eta, n_init, ...)``.
        record_steps: the recorded times ``0, r, 2r, ... <= steps`` ``(n_rec,)``, or ``None``.
        recorded_loss: full-batch loss at ``record_steps`` ``(n_eta, n_init, n_rec)``, or
            ``None``. After a trajectory has finished, its slots hold its final values.
        recorded_step_norm: ``eta * ||grad L||`` (full batch) at ``record_steps``, like
            ``recorded_loss``.
        recorded_params: iterates at ``record_steps``, leaves ``(n_eta, n_init, n_rec, ...)``,
            only with ``record_params=True``.
        sharpness_steps: the times ``0, K, 2K, ... <= steps`` at which the sharpness was
            measured ``(n_sharp,)`` (``K = sharpness_every``), or ``None``.
        recorded_sharpness: ``lambda_max`` of the full-batch Hessian at ``sharpness_steps``
            ``(n_eta, n_init, n_sharp)``, or ``None``; slots after a trajectory finished hold
            ``final_sharpness``. Compare with ``2 / eta`` (the edge of stability).
        final_sharpness: ``lambda_max`` at the final iterate ``(n_eta, n_init)``, or ``None``
            (only with ``sharpness_every``).
        converged_at: only with ``stop_at_convergence=False``, else ``None``: the evaluation
            time at which each trajectory was first found converged (its ``status`` says to
            what), ``-1`` if never ``(n_eta, n_init)``. Such a trajectory is then stepped and
            recorded on to ``steps`` (or until it leaves the bound, where it stops at its last
            iterate inside): its ``steps_taken``, ``final_*``, ``asymptotic_step_norm`` and
            recordings describe where it went after converging.
        lyapunov_exponent: only with ``lyapunov=True``, else ``None``: the maximal
            finite-time Lyapunov exponent of the GD map (per step, natural log)
            ``(n_eta, n_init)``: for a trajectory still running at the end, the mean of
            ``log ||DG(theta_t) v_t||`` over its last ``lyapunov_steps`` steps (``DG = I -
            eta H``, the tangent ``v_t`` renormalised every step); for a converged one,
            ``max_i log|1 - eta lambda_i|`` over the Hessian's eigenvalues at its fixed point
            (``D^1/2 H D^1/2`` with step sizes per leaf); NaN for a diverged one
            (``gdlr_jax.engine._lyapunov``).
    """

    etas: Float[np.ndarray, " n_eta"]
    status: Int[np.ndarray, "n_eta n_init"]
    steps_taken: Int[np.ndarray, "n_eta n_init"]
    final_loss: Float[np.ndarray, "n_eta n_init"]
    final_grad_norm: Float[np.ndarray, "n_eta n_init"]
    asymptotic_step_norm: Float[np.ndarray, "n_eta n_init"]
    min_loss: Float[np.ndarray, "n_eta n_init"]
    period: Int[np.ndarray, "n_eta n_init"]
    final_params: PyTree
    record_steps: Int[np.ndarray, " n_rec"] | None = None
    recorded_loss: Float[np.ndarray, "n_eta n_init n_rec"] | None = None
    recorded_step_norm: Float[np.ndarray, "n_eta n_init n_rec"] | None = None
    recorded_params: PyTree | None = None
    sharpness_steps: Int[np.ndarray, " n_sharp"] | None = None
    recorded_sharpness: Float[np.ndarray, "n_eta n_init n_sharp"] | None = None
    final_sharpness: Float[np.ndarray, "n_eta n_init"] | None = None
    converged_at: Int[np.ndarray, "n_eta n_init"] | None = None
    lyapunov_exponent: Float[np.ndarray, "n_eta n_init"] | None = None

    def fraction(self, status: TrajectoryStatus | int) -> Float[np.ndarray, " n_eta"]:
        """Fraction of the initialisations with the given status, per step size."""
        return np.mean(self.status == int(status), axis=1)

    def converged_fraction(self) -> Float[np.ndarray, " n_eta"]:
        """Fraction of the initialisations that converged to a minimum, per step size."""
        return self.fraction(TrajectoryStatus.CONVERGED_MINIMUM)


class SweepChunk(NamedTuple):
    """The results of the trajectories ``start <= k < stop`` of the flattened grid.

    Trajectory ``k`` is step size ``k // n_init`` and initialisation ``k % n_init``. The fields
    are those of :class:`SweepResult` (host NumPy arrays) with the grid axes flattened to one
    axis of length ``stop - start``; ``recorded_*`` and ``final_sharpness`` are ``None`` unless
    recordings were asked for. A runner that persists chunks can save and reload them and pass
    them to
    :meth:`SweepPlan.assemble`.
    """

    start: int
    stop: int
    status: np.ndarray
    steps_taken: np.ndarray
    final_loss: np.ndarray
    final_grad_norm: np.ndarray
    asymptotic_step_norm: np.ndarray
    min_loss: np.ndarray
    period: np.ndarray
    final_params: PyTree
    recorded_loss: np.ndarray | None = None
    recorded_step_norm: np.ndarray | None = None
    recorded_params: PyTree | None = None
    recorded_sharpness: np.ndarray | None = None
    final_sharpness: np.ndarray | None = None
    converged_at: np.ndarray | None = None
    lyapunov_exponent: np.ndarray | None = None
