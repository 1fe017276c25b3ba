"""Evaluation times, evaluations and the status of the lanes (layer 4: engine).

Between evaluation times the lanes are stepped without bookkeeping
(:mod:`gdlr_jax.engine._stepping`); at each one the full-batch loss and gradient decide which
lanes converged or diverged (:func:`evaluate_and_freeze`), the recordings are written
(:func:`record`, :func:`record_sharpness`), and after the last step the final window gives the
periods and asymptotic step norms (:func:`classify_final_window`). Times and criteria:
``docs/engine.md``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from gdlr_jax.engine._lanes import RUNNING, Lanes, StepSizes, evaluate_lanes, select
from gdlr_jax.engine._problem import EngineConfig, Problem, State
from gdlr_jax.engine._trajectory_status import (
    TrajectoryStatus,
    classify_evaluation,
    orbit_summary,
)
from gdlr_jax.problems._pytree import PyTree


def next_evaluation(config: EngineConfig, t: Int[Array, ""]) -> Int[Array, ""]:
    """The evaluation time after ``t``: the least of ``steps``, the start of the final window
    and of the Lyapunov steps (if still ahead), the next power of two (below ``check_every``),
    and the next multiples of ``check_every``, ``record_every`` and ``sharpness_every``."""
    every = config.check_every
    window_start = config.steps - config.window
    power_of_two = jnp.left_shift(jnp.int32(1), 32 - lax.clz(t))
    candidates = [
        jnp.where(t < window_start, window_start, config.steps),
        jnp.where(t < every, power_of_two, config.steps),
        (t // every + 1) * every,
    ]
    if config.lyapunov_steps:
        lyapunov_start = config.steps - config.lyapunov_steps
        candidates.append(jnp.where(t < lyapunov_start, lyapunov_start, config.steps))
    for interval in (config.record_every, config.sharpness_every):
        if interval is not None:
            candidates.append((t // interval + 1) * interval)
    return functools.reduce(jnp.minimum, candidates, jnp.int32(config.steps))


def record(
    config: EngineConfig,
    lanes: Lanes,
    t: Int[Array, ""],
    loss: Float[Array, " m"],
    step_norm: Float[Array, " m"],
) -> Lanes:
    """Writes the values of time ``t`` into the recordings when ``t`` is a recorded time."""
    if config.record_every is None:
        return lanes

    def write(lanes):
        put = functools.partial(
            lax.dynamic_update_index_in_dim, index=t // config.record_every, axis=1
        )
        return lanes._replace(
            recorded_loss=put(lanes.recorded_loss, loss),
            recorded_step_norm=put(lanes.recorded_step_norm, step_norm),
            recorded_state=(
                tuple(map(put, lanes.recorded_state, lanes.state))
                if config.record_params
                else None
            ),
        )

    return lax.cond(t % config.record_every == 0, write, lambda lanes: lanes, lanes)


def record_sharpness(problem: Problem, lanes: Lanes, t: Int[Array, ""]) -> Lanes:
    """Measures ``lambda_max`` at every lane's iterate when ``t`` is a multiple of
    ``sharpness_every``; a non-finite estimate (a lane outside the bound) keeps the previous
    Ritz vector as the next warm start."""
    every = problem.config.sharpness_every
    if every is None:
        return lanes

    def write(lanes):
        value, vector = jax.vmap(problem.sharpness)(lanes.state, lanes.sharpness_vector)
        finite = jnp.all(jnp.isfinite(vector), axis=1) & jnp.isfinite(value)
        return lanes._replace(
            sharpness_vector=select(finite, vector, lanes.sharpness_vector),
            recorded_sharpness=lax.dynamic_update_index_in_dim(
                lanes.recorded_sharpness,
                value.astype(lanes.recorded_sharpness.dtype),
                t // every,
                1,
            ),
        )

    return lax.cond(t % every == 0, write, lambda lanes: lanes, lanes)


def evaluate_and_freeze(
    problem: Problem,
    lanes: Lanes,
    state: State,
    opt_state: PyTree,
    etas: StepSizes,
    t0: Int[Array, ""],
    t1: Int[Array, ""],
) -> Lanes:
    """Evaluates the lanes stepped from ``t0`` to ``t1`` and settles those that finished.

    A lane found converged keeps its iterate at ``t1``; a lane found diverged is rolled back to
    its iterate at ``t0`` (inside the bound; replayed later by
    :func:`gdlr_jax.engine._divergence.pinpoint_divergence`). Lanes still running at
    ``t1 = steps`` are settled too. With ``stop_at_convergence=False`` a converged lane keeps
    its status and its ``converged_at = t1`` but goes on *coasting*: stepped and recorded, its
    ``steps_taken`` and final values those of the latest evaluation, until ``steps`` or until
    it leaves the bound (or a value is not finite): then it is rolled back to its iterate at
    ``t0`` and stops there (its status stays converged). The per-lane bookkeeping is only rewritten when some lane
    settles (``lax.cond``), so an evaluation at which nothing happens costs little more than
    the loss and gradient.
    """
    config = problem.config
    running = lanes.status == RUNNING
    loss, grad_norm, step_norm, bounded = evaluate_lanes(problem, state, etas)
    status, diverged_now, converged_now = classify_evaluation(
        lanes.status, loss, grad_norm, bounded, etas.check, config.criteria, config.min_loss_value
    )
    alive = running & ~diverged_now
    settled = converged_now | (alive & (t1 == config.steps))
    rollback = diverged_now
    if lanes.coasting is not None:
        ok = bounded & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        lost = lanes.coasting & ~ok
        still_coasting = lanes.coasting & ok
        alive = alive | still_coasting
        settled = settled | still_coasting
        rollback = rollback | lost
    stepped = lanes._replace(
        state=state,
        opt_state=opt_state,
        min_loss=jnp.where(alive, jnp.minimum(lanes.min_loss, loss), lanes.min_loss),
    )
    stepped = record(config, stepped, t1, loss, step_norm)
    stepped = record_sharpness(problem, stepped, t1)

    def settle(stepped):
        out = stepped._replace(
            state=select(rollback, lanes.state, state),
            opt_state=select(rollback, lanes.opt_state, opt_state),
            status=status,
            steps_taken=jnp.where(
                rollback, jnp.where(diverged_now, t0, lanes.steps_taken),
                jnp.where(settled, t1, lanes.steps_taken),
            ),
            detected_at=jnp.where(diverged_now, t1, lanes.detected_at),
            final_loss=jnp.where(settled, loss, lanes.final_loss),
            final_grad_norm=jnp.where(settled, grad_norm, lanes.final_grad_norm),
            final_step_norm=jnp.where(settled, step_norm, lanes.final_step_norm),
        )
        if lanes.coasting is None:
            return out
        return out._replace(
            converged_at=jnp.where(converged_now, t1, lanes.converged_at),
            coasting=still_coasting | converged_now,
        )

    return lax.cond(jnp.any(rollback | settled), settle, lambda s: s, stepped)


def classify_final_window(
    problem: Problem, lanes: Lanes, history: Float[Array, "w m d"]
) -> tuple[Lanes, Int[Array, " m"], Float[Array, " m"]]:
    """Periods of the lanes still running after the last step, from the final window.

    ``history`` holds the flat iterates of the last ``W`` steps, ``(W, m, d)``, for
    :func:`orbit_summary`. A running lane with a period becomes ``PERIODIC``.

    Returns:
        ``(lanes, period, mean_step)``: the period (0 for lanes not running) and the mean step
        length over the window, each ``(m,)``.
    """
    config = problem.config
    still_running = lanes.status == RUNNING
    max_period = min(config.criteria.max_period, config.window // 2)
    final = jax.vmap(problem.layout.flat)(lanes.state)
    period, mean_step = jax.vmap(
        lambda h, final: orbit_summary(h, final, max_period, config.criteria.period_tol),
        in_axes=(1, 0),
    )(history, final)
    period = jnp.where(still_running, period, 0)
    status = jnp.where(
        still_running & (period > 0), jnp.int32(TrajectoryStatus.PERIODIC), lanes.status
    )
    return lanes._replace(status=status), period, mean_step


def _fill_after_finish(
    recorded: Float[Array, "m n ..."],
    final: Float[Array, "m ..."],
    every: int,
    steps_taken: Int[Array, " m"],
) -> Float[Array, "m n ..."]:
    """Slot ``s`` (time ``s * every``) of a lane that finished before that time gets ``final``."""
    after = (jnp.arange(recorded.shape[1]) * every)[None, :] > steps_taken[:, None]  # (m, n)
    mask = after.reshape(after.shape + (1,) * (recorded.ndim - 2))
    return jnp.where(mask, jnp.expand_dims(final, 1), recorded)


def fill_recordings(config: EngineConfig, lanes: Lanes) -> Lanes:
    """Slots recorded after a lane finished hold its final values."""
    if config.record_every is None:
        return lanes
    fill = functools.partial(
        _fill_after_finish, every=config.record_every, steps_taken=lanes.steps_taken
    )
    return lanes._replace(
        recorded_loss=fill(lanes.recorded_loss, lanes.final_loss),
        recorded_step_norm=fill(lanes.recorded_step_norm, lanes.final_step_norm),
        recorded_state=(
            tuple(map(fill, lanes.recorded_state, lanes.state)) if config.record_params else None
        ),
    )


def final_sharpness(
    problem: Problem, lanes: Lanes
) -> tuple[Float[Array, " m"] | None, Float[Array, "m n_sharp"] | None]:
    """``lambda_max`` at the final iterates, also written into the sharpness slots after each
    lane finished (a diverged lane's last measurement was not at its final iterate)."""
    config = problem.config
    if config.sharpness_every is None:
        return None, None
    final, _ = jax.vmap(problem.sharpness)(lanes.state, lanes.sharpness_vector)
    final = final.astype(lanes.recorded_sharpness.dtype)
    recorded = _fill_after_finish(
        lanes.recorded_sharpness, final, config.sharpness_every, lanes.steps_taken
    )
    return final, recorded
