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
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from gdlr_jax.engine._lanes import (
    RUNNING,
    Lanes,
    StepSizes,
    any_lane,
    evaluate_lanes,
    select,
)
from gdlr_jax.engine._problem import EngineConfig, Problem, State
from gdlr_jax.engine._trajectory_status import (
    TrajectoryStatus,
    classify_evaluation,
    orbit_summary,
)
from gdlr_jax.problems._pytree import PyTree


def next_evaluation(config: EngineConfig, t: Int[Array, ""] | int) -> Int[Array, ""] | int:
    """The evaluation time after ``t``: the least of ``steps``, the start of the final window
    and of the Lyapunov steps (if still ahead), the next power of two (below ``check_every``),
    and the next multiples of ``check_every``, ``record_every`` and ``sharpness_every``. Of a
    traced ``t`` (the step loop) or of a Python ``int`` (the final window, unrolled)."""
    if isinstance(t, int):
        where, minimum, power_of_two = (lambda c, a, b: a if c else b), min, 1 << t.bit_length()
    else:
        where, minimum = jnp.where, jnp.minimum
        power_of_two = jnp.left_shift(jnp.int32(1), 32 - lax.clz(t))
    every = config.check_every
    window_start = config.steps - config.window
    candidates = [
        where(t < window_start, window_start, config.steps),
        where(t < every, power_of_two, config.steps),
        (t // every + 1) * every,
    ]
    if config.lyapunov_steps:
        lyapunov_start = config.steps - config.lyapunov_steps
        candidates.append(where(t < lyapunov_start, lyapunov_start, config.steps))
    for interval in (config.record_every, config.sharpness_every):
        if interval is not None:
            candidates.append((t // interval + 1) * interval)
    steps = config.steps if isinstance(t, int) else jnp.int32(config.steps)
    return functools.reduce(minimum, candidates, steps)


def record(
    config: EngineConfig,
    lanes: Lanes,
    state: State,
    t: Int[Array, ""],
    loss: Float[Array, " m"],
    step_norm: Float[Array, " m"],
) -> Lanes:
    """Writes the values of time ``t`` (``state`` the lanes' iterates, not packed) into the
    recordings when ``t`` is a recorded time."""
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
                tuple(map(put, lanes.recorded_state, state))
                if config.record_params
                else None
            ),
        )

    return lax.cond(t % config.record_every == 0, write, lambda lanes: lanes, lanes)


def record_sharpness(problem: Problem, lanes: Lanes, state: State, t: Int[Array, ""]) -> Lanes:
    """Measures ``lambda_max`` at every lane's iterate (``state``, not packed) when ``t`` is a
    multiple of ``sharpness_every``; a non-finite estimate (a lane outside the bound) keeps
    the previous Ritz vector as the next warm start."""
    every = problem.config.sharpness_every
    if every is None:
        return lanes

    def write(lanes):
        value, vector = jax.vmap(problem.sharpness)(state, lanes.sharpness_vector)
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


class _Findings(NamedTuple):
    """What an evaluation found, per lane (``(m,)`` each)."""

    loss: Float[Array, " m"]
    grad_norm: Float[Array, " m"]
    step_norm: Float[Array, " m"]
    status: Int[Array, " m"]  # the status after the evaluation
    diverged_now: Bool[Array, " m"]
    converged_now: Bool[Array, " m"]
    alive: Bool[Array, " m"]  # stepped to t1 and still inside the bound
    settled: Bool[Array, " m"]  # their values at t1 are final (converged, or t1 = steps)
    rollback: Bool[Array, " m"]  # back to their iterates at t0
    still_coasting: Bool[Array, " m"] | None
    grad: State  # the gradient, like the state


def _findings(
    problem: Problem, lanes: Lanes, state: State, etas: StepSizes, t1: Int[Array, ""]
) -> _Findings:
    """Evaluates the lanes at ``state`` (packed) at time ``t1``: loss, gradient norm, whether
    each is sound, and which lanes converged, diverged or settled."""
    config = problem.config
    running = lanes.status == RUNNING
    loss, grad_norm, step_norm, sound, grad = evaluate_lanes(problem, problem.unpack(state), etas)
    status, diverged_now, converged_now = classify_evaluation(
        lanes.status, loss, grad_norm, sound, etas.check, config.criteria, config.min_loss_value
    )
    alive = running & ~diverged_now
    settled = converged_now | (alive & (t1 == config.steps))
    rollback = diverged_now
    still_coasting = None
    if lanes.coasting is not None:
        still_coasting = lanes.coasting & sound
        alive = alive | still_coasting
        settled = settled | still_coasting
        rollback = rollback | (lanes.coasting & ~sound)
    return _Findings(
        loss, grad_norm, step_norm, status, diverged_now, converged_now, alive, settled,
        rollback, still_coasting, grad,
    )


def evaluate_and_freeze(
    problem: Problem,
    lanes: Lanes,
    state: State,
    opt_state: PyTree,
    etas: StepSizes,
    t0: Int[Array, ""],
    t1: Int[Array, ""],
) -> tuple[Lanes, Bool[Array, ""]]:
    """Evaluates the lanes stepped from ``t0`` to ``t1`` and settles those that finished.

    ``lanes`` (at ``t0``) and ``state`` (at ``t1``) are packed (:meth:`Problem.pack`). A lane
    found converged keeps its iterate at ``t1``; a lane found diverged is rolled back to its
    iterate at ``t0`` (inside the bound; replayed later by
    :func:`gdlr_jax.engine._divergence.pinpoint_divergence`). Lanes still running at
    ``t1 = steps`` are settled too (the final loss and norms of every lane are evaluated at
    the end: :func:`final_values`). With ``stop_at_convergence=False`` a converged lane keeps
    its status and its ``converged_at = t1`` but goes on *coasting*: stepped and recorded, its
    ``steps_taken`` and final values those of the latest evaluation, until ``steps`` or until
    it leaves the bound (or a value is not finite): then it is rolled back to its iterate at
    ``t0`` and stops there (its status stays converged).

    At most evaluation times no lane settles: the running minimum of the loss, the rollback
    of diverged lanes and whether any lane settles are computed then, and the bookkeeping
    only when some lane settles (``lax.cond``; the arrays written in it are few, since XLA
    copies every array that passes through a branch). For the columns the evaluation is
    done again inside the ``cond`` (a few operations per lane): what XLA then computes at
    every evaluation time is a few passes over the lanes, each fusing its own copy of the
    evaluation, rather than every finding written out for the ``cond``.

    Returns:
        ``(lanes, stepping)``: the lanes at ``t1`` and whether some lane is still stepping,
        given that some lane was stepping at ``t0`` (``True`` unless one settles).
    """
    config = problem.config
    found = _findings(problem, lanes, state, etas, t1)
    stepped = lanes._replace(
        state=select(found.rollback, lanes.state, state),
        opt_state=select(found.rollback, lanes.opt_state, opt_state),
        min_loss=jnp.where(found.alive, jnp.minimum(lanes.min_loss, found.loss), lanes.min_loss),
        grad=None if lanes.grad is None else select(found.rollback, lanes.grad, found.grad),
    )
    if config.record_every is not None or config.sharpness_every is not None:
        unpacked = problem.unpack(state)
        stepped = record(config, stepped, unpacked, t1, found.loss, found.step_norm)
        stepped = record_sharpness(problem, stepped, unpacked, t1)

    def settle(stepped):
        # the columns: cheaper to evaluate again than to keep the findings
        now = _findings(problem, lanes, state, etas, t1) if problem.layout.columns else found
        rollback, settled = now.rollback, now.settled
        out = stepped._replace(
            status=now.status,
            steps_taken=jnp.where(
                rollback, jnp.where(now.diverged_now, t0, lanes.steps_taken),
                jnp.where(settled, t1, lanes.steps_taken),
            ),
            detected_at=jnp.where(now.diverged_now, t1, lanes.detected_at),
        )
        if lanes.coasting is not None:
            out = out._replace(
                converged_at=jnp.where(now.converged_now, t1, lanes.converged_at),
                coasting=now.still_coasting | now.converged_now,
            )
        out = out.freeze(problem, etas)
        return out, any_lane(out.stepping())

    return lax.cond(
        any_lane(found.rollback | found.settled),
        settle,
        lambda stepped: (stepped, jnp.bool_(True)),
        stepped,
    )


def classify_final_window(
    problem: Problem, lanes: Lanes, rows: Sequence[State]
) -> tuple[Lanes, Int[Array, " m"], Float[Array, " m"]]:
    """Periods of the lanes still running after the last step, from the final window.

    ``rows`` holds the iterates of the lanes at the ``W`` steps of the final window: each the
    columns (``(m,)`` each), or in the leaves layout the flat iterates ``(m, d)`` as a
    1-tuple; with the final iterates (``lanes.state``) they are the ``W + 1`` iterates of
    :func:`orbit_summary`. A running lane with a period becomes ``PERIODIC``.

    Returns:
        ``(lanes, period, mean_step)``: the period (0 for lanes not running) and the mean step
        length over the window, each ``(m,)``.
    """
    config = problem.config
    still_running = lanes.status == RUNNING
    max_period = min(config.criteria.max_period, config.window // 2)
    final = lanes.state if problem.layout.columns else (jax.vmap(problem.layout.flat)(lanes.state),)
    period, mean_step = jax.vmap(
        lambda rows: orbit_summary(rows, max_period, config.criteria.period_tol)
    )([*rows, final])
    period = jnp.where(still_running, period, 0)
    status = jnp.where(
        still_running & (period > 0), jnp.int32(TrajectoryStatus.PERIODIC), lanes.status
    )
    return lanes._replace(status=status), period, mean_step


def final_values(problem: Problem, lanes: Lanes, etas: StepSizes) -> Lanes:
    """``final_loss``, ``final_grad_norm`` and ``final_step_norm``: the evaluation of every
    lane at its final iterate, which is its iterate at ``steps_taken`` (a settled lane does
    not move again; a diverged one is at its rollback point until the replay gives it its
    own). Evaluated once here, not written at every evaluation time where some lane settles.
    """
    loss, grad_norm, step_norm, _, _ = evaluate_lanes(problem, lanes.state, etas)
    return lanes._replace(final_loss=loss, final_grad_norm=grad_norm, final_step_norm=step_norm)


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
