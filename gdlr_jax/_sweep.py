"""Batched GD/SGD trajectories over (step size x initialisation) grids (layer 4: engine).

For every pair ``(eta_i, theta_0^(j))`` of a grid, the engine runs

    theta_{t+1} = theta_t - eta_i * grad L(theta_t)                    (plain GD, default)

or the update of an optax optimiser with learning rate ``eta_i`` (minibatch gradients when a
data source is given), for at most ``steps`` steps, and says what happened
(:class:`~gdlr_jax.TrajectoryStatus`). The kernel is written for one trajectory and vmapped over
all of them, step sizes traced: the whole grid compiles once.

How it runs (details and every default in ``docs/engine.md``):

* the flattened grid (index ``k = i * n_init + j``) is cut into chunks sized from a memory
  budget; each chunk is sharded over the local devices (``shard_map`` over a 1-D ``Mesh``) and
  each device runs its lanes independently;
* trajectories are stepped without per-step bookkeeping between *evaluation times* (0, 1, 2,
  4, ... up to ``check_every``, then every ``check_every`` steps, every ``record_every`` steps,
  the start of the final window and ``steps``); at each one the full-batch loss and gradient
  decide convergence or divergence, finished trajectories are frozen, and the device stops
  as soon as none of its trajectories is running (early exit);
* a trajectory found diverged is rolled back to its previous evaluation and, after the loop,
  replayed step by step (only the diverged ones, in compact blocks) to stop it at its last
  iterate inside the bound: ``steps_taken`` is then the exact step of divergence;
* the final ``window`` iterates of the trajectories still running are kept to measure their
  asymptotic step length and to look for periodic orbits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from gdlr_jax._minibatches import (
    Minibatches,
    as_minibatches,
    epoch_permutation,
    full_batch_value_and_grad,
    minibatch,
)
from gdlr_jax._trajectory_status import (
    ConvergenceCriteria,
    TrajectoryStatus,
    classify_evaluation,
    orbit_summary,
    within_bound,
)

PyTree = Any
LossFn = Callable[..., Float[Array, ""]]
OptimizerFactory = Callable[..., optax.GradientTransformation]

_LANES = "lanes"  # the mesh axis along which trajectories are sharded
_REPLAY_BLOCK = 1024  # diverged trajectories replayed together (see _pinpoint_divergence)
_RUNNING = TrajectoryStatus.NOT_CONVERGED  # the status of a trajectory still being stepped
_SUMMARY_FIELDS = (
    "status",
    "steps_taken",
    "final_loss",
    "final_grad_norm",
    "asymptotic_step_norm",
    "min_loss",
    "period",
)


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------
class SweepResult(NamedTuple):
    """What happened to every trajectory of a sweep (a pytree; arrays on the default device).

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
    """

    etas: Float[Array, " n_eta"]
    status: Int[Array, "n_eta n_init"]
    steps_taken: Int[Array, "n_eta n_init"]
    final_loss: Float[Array, "n_eta n_init"]
    final_grad_norm: Float[Array, "n_eta n_init"]
    asymptotic_step_norm: Float[Array, "n_eta n_init"]
    min_loss: Float[Array, "n_eta n_init"]
    period: Int[Array, "n_eta n_init"]
    final_params: PyTree
    record_steps: Int[Array, " n_rec"] | None = None
    recorded_loss: Float[Array, "n_eta n_init n_rec"] | None = None
    recorded_step_norm: Float[Array, "n_eta n_init n_rec"] | None = None
    recorded_params: PyTree | None = None

    def fraction(self, status: TrajectoryStatus | int) -> Float[Array, " n_eta"]:
        """Fraction of the initialisations with the given status, per step size."""
        return jnp.mean(self.status == int(status), axis=1)

    def converged_fraction(self) -> Float[Array, " n_eta"]:
        """Fraction of the initialisations that converged to a minimum, per step size."""
        return self.fraction(TrajectoryStatus.CONVERGED_MINIMUM)


class SweepChunk(NamedTuple):
    """The results of the trajectories ``start <= k < stop`` of the flattened grid.

    Trajectory ``k`` is step size ``k // n_init`` and initialisation ``k % n_init``. The fields
    are those of :class:`SweepResult` (host NumPy arrays) with the grid axes flattened to one
    axis of length ``stop - start``; ``recorded_*`` are ``None`` unless recordings were asked
    for. A runner that persists chunks can save and reload them and pass them to
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


# ----------------------------------------------------------------------------------------
# The kernel: one trajectory, vmapped over the lanes of a device
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _EngineConfig:
    """Everything static about a sweep (a jit static argument: equal configs share a compile).

    ``loss_fn`` and ``optimizer`` compare by identity: pass the same function objects to
    reuse a compilation.
    """

    loss_fn: LossFn
    optimizer: OptimizerFactory | None
    criteria: ConvergenceCriteria
    min_loss_value: float | None
    steps: int
    check_every: int
    record_every: int | None
    record_params: bool
    batch_size: int | None  # None: full-batch GD
    same_batches: bool

    @property
    def window(self) -> int:
        return min(self.criteria.window, self.steps)

    @property
    def num_records(self) -> int:
        return 0 if self.record_every is None else self.steps // self.record_every + 1


class _Lanes(NamedTuple):
    """State of the ``m`` trajectories (lanes) of one device during a sweep."""

    params: PyTree  # leaves (m, ...)
    opt_state: PyTree  # leaves (m, ...)
    status: Int[Array, " m"]
    steps_taken: Int[Array, " m"]
    detected_at: Int[Array, " m"]  # evaluation time at which divergence was seen
    final_loss: Float[Array, " m"]
    final_grad_norm: Float[Array, " m"]
    min_loss: Float[Array, " m"]
    recorded_loss: Float[Array, "m n_rec"] | None
    recorded_step_norm: Float[Array, "m n_rec"] | None
    recorded_params: PyTree | None  # leaves (m, n_rec, ...)


class _LaneResults(NamedTuple):
    status: Int[Array, " m"]
    steps_taken: Int[Array, " m"]
    final_loss: Float[Array, " m"]
    final_grad_norm: Float[Array, " m"]
    asymptotic_step_norm: Float[Array, " m"]
    min_loss: Float[Array, " m"]
    period: Int[Array, " m"]
    final_params: PyTree
    recorded_loss: Float[Array, "m n_rec"] | None
    recorded_step_norm: Float[Array, "m n_rec"] | None
    recorded_params: PyTree | None


def _transform(factory: OptimizerFactory, eta: Float[Array, ""]) -> optax.GradientTransformation:
    """The optax optimiser of one trajectory, its learning rate ``eta`` traced in its state."""
    return optax.inject_hyperparams(factory)(learning_rate=eta)


def _init_optimizer(config: _EngineConfig, params: PyTree, eta: Float[Array, ""]) -> PyTree:
    if config.optimizer is None:
        return ()
    return _transform(config.optimizer, eta).init(params)


def _step(
    config: _EngineConfig,
    params: PyTree,
    opt_state: PyTree,
    eta: Float[Array, ""],
    batch: PyTree | None,
) -> tuple[PyTree, PyTree]:
    """One step of one trajectory: ``theta - eta * grad L`` or the optax update."""
    args = () if batch is None else (batch,)
    grads = jax.grad(config.loss_fn)(params, *args)
    if config.optimizer is None:
        return jax.tree_util.tree_map(lambda p, g: p - eta * g, params, grads), opt_state
    updates, opt_state = _transform(config.optimizer, eta).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _evaluate(
    config: _EngineConfig, params: PyTree, data: PyTree | None
) -> tuple[Float[Array, ""], Float[Array, ""], Bool[Array, ""]]:
    """Full-batch loss, gradient norm and bound check of one trajectory."""
    if data is None:
        loss, grads = jax.value_and_grad(config.loss_fn)(params)
    else:
        source = Minibatches(data, config.batch_size)
        loss, grads = full_batch_value_and_grad(config.loss_fn, params, source)
    bounded = within_bound(params, config.criteria.divergence_bound)
    return loss, optax.global_norm(grads), bounded


def _select(mask: Bool[Array, " m"], on_true: PyTree, on_false: PyTree) -> PyTree:
    """Per-lane ``where`` over pytrees whose leaves have the lane axis first."""

    def pick(a, b):
        return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree_util.tree_map(pick, on_true, on_false)


def _batch_axis(config: _EngineConfig) -> int | None:
    return None if config.same_batches else 0


def _advance(
    config: _EngineConfig,
    params: PyTree,
    opt_state: PyTree,
    etas: Float[Array, " m"],
    keys: PRNGKeyArray | None,
    data: PyTree | None,
    t0: Int[Array, ""],
    t1: Int[Array, ""],
    history: PyTree | None,
) -> tuple[PyTree, PyTree, PyTree | None]:
    """Steps every lane from time ``t0`` to ``t1``, with no per-step bookkeeping.

    With ``history`` (leaves ``(W + 1, m, ...)``), also stores ``theta_t`` at index
    ``t - (steps - W)`` for each ``t`` in ``[t0, t1)``.
    """
    window_start = config.steps - config.window
    if data is None:
        step = jax.vmap(lambda p, o, e: _step(config, p, o, e, None))
    else:
        step = jax.vmap(functools.partial(_step, config), in_axes=(0, 0, 0, _batch_axis(config)))
        source = Minibatches(data, config.batch_size)
        shuffle = functools.partial(epoch_permutation, source)
        draw = functools.partial(minibatch, source)
        if not config.same_batches:
            shuffle = jax.vmap(shuffle, in_axes=(0, None))
            draw = jax.vmap(draw, in_axes=(0, None))

    def body(t, carry):
        params, opt_state, permutation, history = carry
        if history is not None:
            history = jax.tree_util.tree_map(
                lambda h, p: lax.dynamic_update_index_in_dim(h, p, t - window_start, 0),
                history,
                params,
            )
        if data is None:
            params, opt_state = step(params, opt_state, etas)
        else:
            permutation = lax.cond(
                t % source.steps_per_epoch == 0,
                lambda: shuffle(keys, t),
                lambda: permutation,
            )
            params, opt_state = step(params, opt_state, etas, draw(permutation, t))
        return params, opt_state, permutation, history

    permutation = None if data is None else shuffle(keys, t0)
    params, opt_state, _, history = lax.fori_loop(
        t0, t1, body, (params, opt_state, permutation, history)
    )
    return params, opt_state, history


def _next_evaluation(config: _EngineConfig, t: Int[Array, ""]) -> Int[Array, ""]:
    """The evaluation time after ``t``: the least of ``steps``, the start of the final window
    (if still ahead), the next power of two (below ``check_every``), and the next multiples of
    ``check_every`` and ``record_every``."""
    every = config.check_every
    window_start = config.steps - config.window
    power_of_two = jnp.left_shift(jnp.int32(1), 32 - lax.clz(t))
    candidates = [
        jnp.where(t < window_start, window_start, config.steps),
        jnp.where(t < every, power_of_two, config.steps),
        (t // every + 1) * every,
    ]
    if config.record_every is not None:
        candidates.append((t // config.record_every + 1) * config.record_every)
    return functools.reduce(jnp.minimum, candidates, jnp.int32(config.steps))


def _record(
    config: _EngineConfig,
    lanes: _Lanes,
    t: Int[Array, ""],
    loss: Float[Array, " m"],
    step_norm: Float[Array, " m"],
) -> _Lanes:
    """Writes the values of time ``t`` into the recordings when ``t`` is a recorded time."""
    if config.record_every is None:
        return lanes

    def write(lanes):
        slot = t // config.record_every
        put = functools.partial(lax.dynamic_update_index_in_dim, index=slot, axis=1)
        return lanes._replace(
            recorded_loss=put(lanes.recorded_loss, loss),
            recorded_step_norm=put(lanes.recorded_step_norm, step_norm),
            recorded_params=(
                jax.tree_util.tree_map(put, lanes.recorded_params, lanes.params)
                if config.record_params
                else None
            ),
        )

    return lax.cond(t % config.record_every == 0, write, lambda lanes: lanes, lanes)


def _start(
    config: _EngineConfig, params: PyTree, etas: Float[Array, " m"], data: PyTree | None
) -> _Lanes:
    """Lanes at time 0: optimiser states, first evaluation, recordings allocated."""
    m, n_rec = etas.shape[0], config.num_records
    opt_state = jax.vmap(functools.partial(_init_optimizer, config))(params, etas)
    loss, grad_norm, bounded = jax.vmap(
        functools.partial(_evaluate, config), in_axes=(0, None)
    )(params, data)
    status, _, _ = classify_evaluation(
        jnp.zeros(m, jnp.int32),
        loss,
        grad_norm,
        bounded,
        etas,
        config.criteria,
        config.min_loss_value,
    )
    recordings = (None, None, None)
    if n_rec:
        recordings = (
            jnp.zeros((m, n_rec), loss.dtype),
            jnp.zeros((m, n_rec), loss.dtype),
            jax.tree_util.tree_map(
                lambda p: jnp.zeros((m, n_rec) + p.shape[1:], p.dtype), params
            )
            if config.record_params
            else None,
        )
    finite = bounded & jnp.isfinite(loss)
    lanes = _Lanes(
        params=params,
        opt_state=opt_state,
        status=status,
        steps_taken=jnp.zeros(m, jnp.int32),
        detected_at=jnp.zeros(m, jnp.int32),
        final_loss=loss,
        final_grad_norm=grad_norm,
        min_loss=jnp.where(finite, loss, jnp.inf),
        recorded_loss=recordings[0],
        recorded_step_norm=recordings[1],
        recorded_params=recordings[2],
    )
    return _record(config, lanes, jnp.int32(0), loss, etas * grad_norm)


def _evaluate_and_freeze(
    config: _EngineConfig,
    lanes: _Lanes,
    params: PyTree,
    opt_state: PyTree,
    etas: Float[Array, " m"],
    data: PyTree | None,
    t0: Int[Array, ""],
    t1: Int[Array, ""],
) -> _Lanes:
    """Evaluates the lanes stepped from ``t0`` to ``t1`` and updates their status.

    Lanes finished before ``t0`` keep their frozen state; lanes found diverged at ``t1`` are
    rolled back to their state at ``t0`` (inside the bound).
    """
    running = lanes.status == _RUNNING
    params = _select(running, params, lanes.params)
    opt_state = _select(running, opt_state, lanes.opt_state)
    loss, grad_norm, bounded = jax.vmap(
        functools.partial(_evaluate, config), in_axes=(0, None)
    )(params, data)
    status, diverged_now, _ = classify_evaluation(
        lanes.status, loss, grad_norm, bounded, etas, config.criteria, config.min_loss_value
    )
    valid = running & ~diverged_now
    lanes = lanes._replace(
        params=_select(diverged_now, lanes.params, params),
        opt_state=_select(diverged_now, lanes.opt_state, opt_state),
        status=status,
        steps_taken=jnp.where(diverged_now, t0, jnp.where(running, t1, lanes.steps_taken)),
        detected_at=jnp.where(diverged_now, t1, lanes.detected_at),
        final_loss=jnp.where(valid, loss, lanes.final_loss),
        final_grad_norm=jnp.where(valid, grad_norm, lanes.final_grad_norm),
        min_loss=jnp.where(valid, jnp.minimum(lanes.min_loss, loss), lanes.min_loss),
    )
    return _record(config, lanes, t1, loss, etas * grad_norm)


def _pinpoint_divergence(
    config: _EngineConfig,
    lanes: _Lanes,
    etas: Float[Array, " m"],
    keys: PRNGKeyArray | None,
    data: PyTree | None,
) -> _Lanes:
    """Replays each diverged lane from its rollback point to its exact last in-bound iterate.

    A lane found diverged at evaluation time ``t1`` was rolled back to its iterate at the
    previous evaluation ``t0``; it is stepped again from ``t0``, one checked step at a time, and
    stopped before the first step that leaves the bound (or at ``t1``). Only the diverged lanes
    are replayed: they are gathered into blocks of up to ``_REPLAY_BLOCK`` lanes, so the cost
    is proportional to their number.
    """
    m = etas.shape[0]
    block = min(_REPLAY_BLOCK, m)
    pending = (lanes.status == TrajectoryStatus.DIVERGED) & (
        lanes.detected_at > lanes.steps_taken
    )
    count = jnp.sum(pending)
    order = jnp.argsort(~pending, stable=True)  # pending lanes first
    bound = config.criteria.divergence_bound

    def replay(params, opt_state, eta, start, stop, key):
        def running(carry):
            _, _, t, alive = carry
            return alive & (t < stop)

        def step(carry):
            params, opt_state, t, _ = carry
            batch = None
            if data is not None:
                source = Minibatches(data, config.batch_size)
                batch = minibatch(source, epoch_permutation(source, key, t), t)
            new_params, new_opt_state = _step(config, params, opt_state, eta, batch)
            inside = within_bound(new_params, bound)
            keep = functools.partial(jnp.where, inside)
            return (
                jax.tree_util.tree_map(keep, new_params, params),
                jax.tree_util.tree_map(keep, new_opt_state, opt_state),
                t + inside.astype(t.dtype),
                inside,
            )

        params, opt_state, t, _ = lax.while_loop(
            running, step, (params, opt_state, start, jnp.bool_(True))
        )
        loss, grad_norm, _ = _evaluate(config, params, data)
        return params, opt_state, t, loss, grad_norm

    key_axis = None if keys is None or config.same_batches else 0
    replay_block = jax.vmap(replay, in_axes=(0, 0, 0, 0, 0, key_axis))

    def body(carry):
        b, lanes = carry
        first = jnp.minimum(b * block, m - block)
        index = lax.dynamic_slice(order, (first,), (block,))
        position = first + jnp.arange(block)
        valid = (position >= b * block) & (position < count)
        take = functools.partial(jnp.take, indices=index, axis=0)
        params, opt_state, t, loss, grad_norm = replay_block(
            jax.tree_util.tree_map(take, lanes.params),
            jax.tree_util.tree_map(take, lanes.opt_state),
            take(etas),
            take(lanes.steps_taken),
            take(lanes.detected_at),
            keys if key_axis is None else take(keys),
        )

        def put(old, new):
            return old.at[index].set(_select(valid, new, take(old)))

        finite = jnp.isfinite(loss)
        lanes = lanes._replace(
            params=jax.tree_util.tree_map(put, lanes.params, params),
            opt_state=jax.tree_util.tree_map(put, lanes.opt_state, opt_state),
            steps_taken=put(lanes.steps_taken, t),
            final_loss=put(lanes.final_loss, loss),
            final_grad_norm=put(lanes.final_grad_norm, grad_norm),
            min_loss=put(
                lanes.min_loss,
                jnp.where(finite, jnp.minimum(take(lanes.min_loss), loss), take(lanes.min_loss)),
            ),
        )
        return b + 1, lanes

    _, lanes = lax.while_loop(lambda carry: carry[0] * block < count, body, (0, lanes))
    return lanes


def _fill_recordings(config: _EngineConfig, lanes: _Lanes, etas: Float[Array, " m"]) -> _Lanes:
    """Slots recorded after a lane finished hold its final values."""
    if config.record_every is None:
        return lanes
    times = jnp.arange(config.num_records) * config.record_every
    after = times[None, :] > lanes.steps_taken[:, None]  # (m, n_rec)

    def fill(recorded, final):
        mask = after.reshape(after.shape + (1,) * (recorded.ndim - 2))
        return jnp.where(mask, jnp.expand_dims(final, 1), recorded)

    return lanes._replace(
        recorded_loss=fill(lanes.recorded_loss, lanes.final_loss),
        recorded_step_norm=fill(lanes.recorded_step_norm, etas * lanes.final_grad_norm),
        recorded_params=(
            jax.tree_util.tree_map(fill, lanes.recorded_params, lanes.params)
            if config.record_params
            else None
        ),
    )


def _run_phase(
    config: _EngineConfig,
    lanes: _Lanes,
    t: Int[Array, ""],
    stop: int,
    history: PyTree | None,
    *,
    etas: Float[Array, " m"],
    keys: PRNGKeyArray | None,
    data: PyTree | None,
) -> tuple[Int[Array, ""], _Lanes, PyTree | None]:
    """Advances the lanes from ``t`` from evaluation to evaluation until ``stop``, or until
    none of them is running (early exit). With ``history`` (the final window), records the
    iterates into it."""

    def unfinished(carry):
        t, lanes, _ = carry
        return (t < stop) & jnp.any(lanes.status == _RUNNING)

    def chunk(carry):
        t0, lanes, history = carry
        t1 = _next_evaluation(config, t0)
        params, opt_state, history = _advance(
            config, lanes.params, lanes.opt_state, etas, keys, data, t0, t1, history
        )
        lanes = _evaluate_and_freeze(config, lanes, params, opt_state, etas, data, t0, t1)
        return t1, lanes, history

    return lax.while_loop(unfinished, chunk, (t, lanes, history))


def _run_lanes(
    config: _EngineConfig,
    params: PyTree,
    etas: Float[Array, " m"],
    keys: PRNGKeyArray | None,
    data: PyTree | None,
) -> _LaneResults:
    """Runs the ``m`` trajectories of one device to the end and summarises them."""
    window = config.window
    window_start = config.steps - window
    lanes = _start(config, params, etas, data)
    run = functools.partial(_run_phase, config, etas=etas, keys=keys, data=data)
    t, lanes, _ = run(lanes, jnp.int32(0), window_start, None)
    history = jax.tree_util.tree_map(
        lambda p: jnp.zeros((window + 1,) + p.shape, p.dtype), params
    )
    _, lanes, history = run(lanes, t, config.steps, history)

    still_running = lanes.status == _RUNNING
    history = jax.tree_util.tree_map(
        lambda h, p: h.at[window].set(p), history, lanes.params
    )
    max_period = min(config.criteria.max_period, window // 2)
    period, mean_step = jax.vmap(
        lambda h: orbit_summary(h, max_period, config.criteria.period_tol), in_axes=1
    )(history)
    period = jnp.where(still_running, period, 0)
    status = jnp.where(
        still_running & (period > 0), jnp.int32(TrajectoryStatus.PERIODIC), lanes.status
    )
    lanes = _pinpoint_divergence(config, lanes._replace(status=status), etas, keys, data)
    lanes = _fill_recordings(config, lanes, etas)
    diverged = lanes.status == TrajectoryStatus.DIVERGED
    asymptotic = jnp.where(
        still_running,
        mean_step,
        jnp.where(diverged, jnp.inf, etas * lanes.final_grad_norm),
    )
    return _LaneResults(
        status=lanes.status,
        steps_taken=lanes.steps_taken,
        final_loss=lanes.final_loss,
        final_grad_norm=lanes.final_grad_norm,
        asymptotic_step_norm=asymptotic.astype(lanes.final_loss.dtype),
        min_loss=lanes.min_loss,
        period=period.astype(jnp.int32),
        final_params=lanes.params,
        recorded_loss=lanes.recorded_loss,
        recorded_step_norm=lanes.recorded_step_norm,
        recorded_params=lanes.recorded_params,
    )


@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def _run_sharded(
    params: PyTree,
    etas: Float[Array, " m"],
    keys: PRNGKeyArray | None,
    data: PyTree | None,
    *,
    config: _EngineConfig,
    mesh: Mesh,
) -> _LaneResults:
    """:func:`_run_lanes` with the lanes split over the devices of ``mesh``.

    Each device runs its own lanes and stops on its own (no communication between devices);
    a lane's results do not depend on which device runs it.
    """
    lane, replicated = PartitionSpec(_LANES), PartitionSpec()
    key_spec = replicated if config.same_batches else lane
    run = jax.shard_map(
        functools.partial(_run_lanes, config),
        mesh=mesh,
        in_specs=(lane, lane, key_spec, replicated),
        out_specs=lane,
        check_vma=False,
    )
    return run(params, etas, keys, data)


# ----------------------------------------------------------------------------------------
# Validation and planning (host side, before any compute)
# ----------------------------------------------------------------------------------------
def _check_etas(etas: Any, dtype: Any) -> np.ndarray:
    values = np.asarray(etas)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(
            f"etas must be a non-empty 1-D array of step sizes, got shape {values.shape}."
        )
    if not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
        raise ValueError(f"etas must be real numbers, got dtype {values.dtype}.")
    bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"etas must be positive and finite, got etas[{i}] = {values[i]!r} "
            f"({bad.size} bad value(s))."
        )
    return values.astype(dtype)


def _check_params(params0: PyTree, dtype: Any) -> tuple[PyTree, int]:
    leaves, treedef = jax.tree_util.tree_flatten(params0)
    if not leaves:
        raise ValueError("params0: the pytree has no array leaves; expected at least one.")
    arrays = [np.asarray(leaf) for leaf in leaves]
    shapes = [a.shape for a in arrays]
    if any(a.ndim == 0 for a in arrays):
        raise ValueError(
            "params0: every leaf needs a leading initialisation axis (n_init, ...), got leaf "
            f"shapes {shapes}."
        )
    sizes = {a.shape[0] for a in arrays}
    if len(sizes) != 1:
        raise ValueError(
            "params0: every leaf must have the same leading initialisation axis n_init, got "
            f"leaf shapes {shapes}."
        )
    (n_init,) = sizes
    if n_init == 0:
        raise ValueError(f"params0: the grid is empty (n_init = 0), got leaf shapes {shapes}.")
    for a in arrays:
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(
                f"params0: leaves must be real arrays, got a leaf of dtype {a.dtype}."
            )
    cast = [a.astype(dtype) for a in arrays]
    return jax.tree_util.tree_unflatten(treedef, cast), n_init


def _check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be a floating dtype, got {dtype!r}.") from None
    if not np.issubdtype(dt, np.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dt}.")
    if dt.itemsize > 4 and not jax.config.jax_enable_x64:
        raise ValueError(
            f"dtype {dt} needs jax_enable_x64 (jax.config.update('jax_enable_x64', True))."
        )
    return dt


def _check_key(key: Any, batch_source: Any) -> PRNGKeyArray | None:
    if batch_source is None:
        if key is not None:
            raise ValueError("key is only used with batch_source (minibatch SGD); got a key.")
        return None
    if key is None:
        raise ValueError("key: a PRNG key is required with batch_source, got None.")
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"key must be a single PRNG key, got shape {key.shape}.")
        return key
    raw = np.asarray(key)
    if raw.dtype != np.uint32 or raw.shape != (2,):
        raise ValueError(
            f"key must be a PRNG key (jax.random.key(seed)), got {raw.dtype} {raw.shape}."
        )
    return jax.random.wrap_key_data(jnp.asarray(raw))


def _check_optimizer(optimizer: Any) -> None:
    if optimizer is None:
        return
    try:
        transform = optax.inject_hyperparams(optimizer)(learning_rate=1.0)
    except Exception as error:  # noqa: BLE001 - report any failure as a bad argument
        raise ValueError(
            "optimizer must be an optax factory taking learning_rate (e.g. optax.sgd, "
            f"optax.adam), got {optimizer!r}: {error}"
        ) from error
    if not isinstance(transform, optax.GradientTransformation):
        raise ValueError(f"optimizer must build an optax GradientTransformation, got {transform!r}.")


def _check_loss(loss_fn: Any, params: PyTree, source: Minibatches | None) -> None:
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {loss_fn!r}.")
    single = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params)
    args = (single,)
    if source is not None:
        batch = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((source.batch_size,) + x.shape[1:], x.dtype),
            source.data,
        )
        args = (single, batch)
    out = jax.eval_shape(loss_fn, *args)
    shape = getattr(out, "shape", None)
    if shape != ():
        raise ValueError(
            "loss_fn must return a scalar for one initialisation (params0 without its leading "
            f"axis{' and one batch' if source else ''}), got {shape or type(out).__name__}."
        )


def _bytes_per_trajectory(
    config: _EngineConfig, params: PyTree, source: Minibatches | None
) -> int:
    """Rough device memory of one trajectory (lane) of a chunk, in bytes.

    Parameters are held about six times (iterate, rollback copy, step, gradient, evaluation),
    the optimiser state twice, plus the final-window history, the recordings and, with
    per-initialisation batches, a shuffle and a batch. Activations of ``loss_fn`` are not
    counted: lower the budget for large models.
    """
    single = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params)
    param_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(single))
    opt_bytes = 0
    if config.optimizer is not None:
        opt_shapes = jax.eval_shape(
            lambda p: _transform(config.optimizer, jnp.ones((), jnp.float32)).init(p), single
        )
        opt_bytes = sum(
            math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(opt_shapes)
        )
    scalar = np.dtype(jax.tree_util.tree_leaves(single)[0].dtype).itemsize
    total = 6 * param_bytes + 2 * opt_bytes + (config.window + 1) * param_bytes + 16 * scalar
    total += config.num_records * (2 * scalar + (param_bytes if config.record_params else 0))
    if source is not None and not config.same_batches:
        example_bytes = sum(
            math.prod(x.shape[1:]) * x.dtype.itemsize
            for x in jax.tree_util.tree_leaves(source.data)
        )
        total += 4 * source.num_examples + source.batch_size * example_bytes
    return int(total)


class SweepPlan:
    """A validated sweep, its grid cut into chunks that can be run one at a time.

    :func:`sweep` is ``plan_sweep`` followed by :meth:`run_chunk` for every chunk and
    :meth:`assemble`. A runner that checkpoints a long sweep runs the chunks it has not saved
    yet and assembles the saved ones.

    Attributes:
        grid_shape: ``(n_eta, n_init)``.
        num_trajectories: ``n_eta * n_init``.
        chunk_size: trajectories per chunk (a multiple of the number of devices).
        num_chunks: ``ceil(num_trajectories / chunk_size)``.
        record_steps: the recorded times ``(n_rec,)`` or ``None``.
    """

    def __init__(
        self,
        config: _EngineConfig,
        params0: PyTree,
        etas: np.ndarray,
        n_init: int,
        key: PRNGKeyArray | None,
        source: Minibatches | None,
        chunk_size: int,
        mesh: Mesh,
    ):
        self._config = config
        self._params0 = params0  # host arrays, leaves (n_init, ...)
        self._etas = etas
        self._mesh = mesh
        self._lane_sharding = NamedSharding(mesh, PartitionSpec(_LANES))
        replicated = NamedSharding(mesh, PartitionSpec())
        self._data = None if source is None else jax.device_put(source.data, replicated)
        self._init_keys = None
        self._key = None
        if key is not None:
            if config.same_batches:
                self._key = jax.device_put(key, replicated)
            else:
                self._init_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
                    key, jnp.arange(n_init)
                )
        self.grid_shape = (int(etas.shape[0]), int(n_init))
        self.num_trajectories = self.grid_shape[0] * self.grid_shape[1]
        self.chunk_size = int(chunk_size)
        self.num_chunks = -(-self.num_trajectories // self.chunk_size)
        self.record_steps = (
            None
            if config.record_every is None
            else np.arange(config.num_records) * config.record_every
        )

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        """``(start, stop)`` of chunk ``index`` in the flattened grid."""
        if not 0 <= index < self.num_chunks:
            raise ValueError(f"index must be in [0, {self.num_chunks}), got {index!r}.")
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.num_trajectories)

    def run_chunk(self, index: int) -> SweepChunk:
        """Runs the trajectories of chunk ``index`` and returns their results on the host."""
        start, stop = self.chunk_bounds(index)
        flat = np.minimum(np.arange(start, start + self.chunk_size), stop - 1)  # pad: repeat
        eta_index, init_index = np.divmod(flat, self.grid_shape[1])
        put = functools.partial(jax.device_put, device=self._lane_sharding)
        params = jax.tree_util.tree_map(lambda x: put(x[init_index]), self._params0)
        keys = self._key if self._init_keys is None else put(self._init_keys[init_index])
        out = _run_sharded(
            params,
            put(self._etas[eta_index]),
            keys,
            self._data,
            config=self._config,
            mesh=self._mesh,
        )
        host = jax.tree_util.tree_map(lambda x: np.asarray(x)[: stop - start], out)
        return SweepChunk(start, stop, **host._asdict())

    def assemble(self, chunks: Iterable[SweepChunk]) -> SweepResult:
        """Puts chunk results together into a :class:`SweepResult`.

        Raises:
            ValueError: if the chunks do not cover every trajectory exactly once.
        """
        n = self.num_trajectories
        covered = np.zeros(n, bool)
        arrays: dict[str, Any] = {}
        for chunk in chunks:
            if covered[chunk.start : chunk.stop].any():
                raise ValueError(f"chunks: trajectories {chunk.start}..{chunk.stop} seen twice.")
            covered[chunk.start : chunk.stop] = True
            for name in chunk._fields[2:]:
                value = getattr(chunk, name)
                if value is None:
                    continue
                if name not in arrays:
                    arrays[name] = jax.tree_util.tree_map(
                        lambda x: np.empty((n,) + x.shape[1:], x.dtype), value
                    )
                jax.tree_util.tree_map(
                    lambda out, x: out.__setitem__(slice(chunk.start, chunk.stop), x),
                    arrays[name],
                    value,
                )
        if not covered.all():
            missing = int(np.flatnonzero(~covered)[0])
            raise ValueError(f"chunks: trajectory {missing} (and maybe more) is missing.")
        grid = self.grid_shape

        def as_grid(x):
            return jnp.asarray(x.reshape(grid + x.shape[1:]))

        fields = {name: jax.tree_util.tree_map(as_grid, value) for name, value in arrays.items()}
        return SweepResult(
            etas=jnp.asarray(self._etas),
            record_steps=None if self.record_steps is None else jnp.asarray(self.record_steps),
            **fields,
        )


def plan_sweep(
    loss_fn: LossFn,
    params0: PyTree,
    etas: Float[Array, " n_eta"],
    *,
    steps: int,
    batch_source: Minibatches | tuple[PyTree, int] | None = None,
    optimizer: OptimizerFactory | None = None,
    key: PRNGKeyArray | None = None,
    min_loss_value: float | None = None,
    criteria: ConvergenceCriteria = ConvergenceCriteria(),
    check_every: int = 64,
    record_every: int | None = None,
    record_params: bool = False,
    dtype: Any = jnp.float32,
    chunk_size: int | None = None,
    memory_budget_bytes: int = 1 << 30,
    devices: Sequence[jax.Device] | None = None,
    same_batches: bool = True,
) -> SweepPlan:
    """Validates the arguments of :func:`sweep` and cuts its grid into chunks.

    Takes the arguments of :func:`sweep` (except ``progress`` and ``on_chunk``); raises the
    same ``ValueError`` s, before any compute.
    """
    dt = _check_dtype(dtype)
    etas_host = _check_etas(etas, dt)
    params_host, n_init = _check_params(params0, dt)
    _check_positive_int("steps", steps)
    _check_positive_int("check_every", check_every)
    _check_positive_int("record_every", record_every, allow_none=True)
    _check_positive_int("chunk_size", chunk_size, allow_none=True)
    _check_positive_int("memory_budget_bytes", memory_budget_bytes)
    if not isinstance(criteria, ConvergenceCriteria):
        raise ValueError(
            f"criteria must be a ConvergenceCriteria, got {type(criteria).__name__}."
        )
    criteria.validate()
    if min_loss_value is not None and not (
        isinstance(min_loss_value, (int, float, np.floating)) and math.isfinite(min_loss_value)
    ):
        raise ValueError(f"min_loss_value must be a finite number or None, got {min_loss_value!r}.")
    if record_params and record_every is None:
        raise ValueError("record_params=True needs record_every (the recording interval).")
    source = None if batch_source is None else as_minibatches(batch_source, dt)
    key = _check_key(key, batch_source)
    _check_optimizer(optimizer)
    _check_loss(loss_fn, params_host, source)
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise ValueError(f"devices must be a non-empty sequence of jax devices, got {devices!r}.")

    config = _EngineConfig(
        loss_fn=loss_fn,
        optimizer=optimizer,
        criteria=criteria,
        min_loss_value=None if min_loss_value is None else float(min_loss_value),
        steps=int(steps),
        check_every=int(check_every),
        record_every=None if record_every is None else int(record_every),
        record_params=bool(record_params),
        batch_size=None if source is None else source.batch_size,
        same_batches=bool(same_batches),
    )
    n_dev = len(devices)
    total = etas_host.shape[0] * n_init
    if chunk_size is None:
        per_trajectory = _bytes_per_trajectory(config, params_host, source)
        chunk_size = max(1, memory_budget_bytes // per_trajectory)
    chunk_size = min(int(chunk_size), total)
    chunk_size = -(-chunk_size // n_dev) * n_dev  # a multiple of the device count
    mesh = Mesh(np.array(devices), (_LANES,))
    return SweepPlan(config, params_host, etas_host, n_init, key, source, chunk_size, mesh)


def sweep(
    loss_fn: LossFn,
    params0: PyTree,
    etas: Float[Array, " n_eta"],
    *,
    steps: int,
    batch_source: Minibatches | tuple[PyTree, int] | None = None,
    optimizer: OptimizerFactory | None = None,
    key: PRNGKeyArray | None = None,
    min_loss_value: float | None = None,
    criteria: ConvergenceCriteria = ConvergenceCriteria(),
    check_every: int = 64,
    record_every: int | None = None,
    record_params: bool = False,
    dtype: Any = jnp.float32,
    chunk_size: int | None = None,
    memory_budget_bytes: int = 1 << 30,
    devices: Sequence[jax.Device] | None = None,
    same_batches: bool = True,
    progress: bool = False,
    on_chunk: Callable[[int, SweepChunk], None] | None = None,
) -> SweepResult:
    """Runs GD (or SGD, or an optax optimiser) from every initialisation at every step size.

    Trajectory ``(i, j)`` starts at ``params0[j]`` and takes at most ``steps`` steps
    ``theta <- theta - etas[i] * grad L(theta)`` (or the optimiser's update with learning rate
    ``etas[i]``). Each is classified (:class:`~gdlr_jax.TrajectoryStatus`) with the criteria
    of :class:`~gdlr_jax.ConvergenceCriteria`, evaluated on the full-batch loss and gradient
    at the evaluation times ``0, 1, 2, 4, ...`` (powers of two below ``check_every``), every
    ``check_every`` steps, every ``record_every`` steps, at the start of the final window and
    at ``steps`` (``docs/engine.md``).

    Args:
        loss_fn: ``loss_fn(params) -> scalar`` (full batch), or ``loss_fn(params, batch) ->
            scalar`` with ``batch_source``, the mean of a per-example loss over the batch. Pass
            the same function object again to reuse the compilation.
        params0: pytree of initialisations, every leaf ``(n_init, ...)``.
        etas: step sizes ``(n_eta,)``, positive and finite; traced (new values of the same
            shape do not recompile).
        steps: maximum number of steps, ``>= 1``.
        batch_source: ``(data, batch_size)`` or :class:`~gdlr_jax.Minibatches` for minibatch
            SGD: data leaves ``(n, ...)``; batches are consecutive blocks of a per-epoch shuffle
            drawn from ``key`` (see ``gdlr_jax._minibatches``). ``None``: full-batch GD.
        optimizer: an optax factory taking ``learning_rate`` (e.g. ``optax.sgd``,
            ``functools.partial(optax.sgd, momentum=0.9)``, ``optax.adam``), built per
            trajectory with ``learning_rate = eta``. ``None``: plain GD.
        key: PRNG key of the minibatch sequence (required with ``batch_source``, otherwise
            must be ``None``).
        min_loss_value: the known minimum value of the loss (e.g. 0 for the two-neuron loss),
            to tell minima from other critical points; ``None`` if unknown.
        criteria: tolerances and window (:class:`~gdlr_jax.ConvergenceCriteria`).
        check_every: steps between regular evaluations (after the early powers of two). Larger
            values cost less per step, smaller ones exit sooner and replay less on divergence.
        record_every: record the full-batch loss and ``eta ||grad L||`` every this many steps
            (``None``: no recordings).
        record_params: also record the iterates (needs ``record_every``).
        dtype: floating dtype of parameters, step sizes and floating data (float32 default;
            float64 needs ``jax_enable_x64``).
        chunk_size: trajectories per chunk; by default as many as fit ``memory_budget_bytes``.
        memory_budget_bytes: device memory allowed for one chunk (estimate in
            ``docs/engine.md``); default 1 GiB.
        devices: devices to shard trajectories over (default ``jax.local_devices()``).
        same_batches: every trajectory sees the same minibatch sequence (default); ``False``:
            initialisation ``j`` uses the key ``fold_in(key, j)`` (shared by all step sizes).
        progress: show a progress bar over chunks.
        on_chunk: called as ``on_chunk(index, chunk)`` after each chunk (e.g. to persist it).

    Returns:
        A :class:`SweepResult` with arrays ``(n_eta, n_init)``.

    Raises:
        ValueError: before any compute, on bad arguments: non-positive, non-finite, empty or
            non-1-D ``etas``; ``params0`` leaves without a common leading axis; ``steps < 1``;
            a ``loss_fn`` that does not return a scalar; a malformed ``batch_source``; a
            missing or superfluous ``key``; bad tolerances.
    """
    plan = plan_sweep(
        loss_fn,
        params0,
        etas,
        steps=steps,
        batch_source=batch_source,
        optimizer=optimizer,
        key=key,
        min_loss_value=min_loss_value,
        criteria=criteria,
        check_every=check_every,
        record_every=record_every,
        record_params=record_params,
        dtype=dtype,
        chunk_size=chunk_size,
        memory_budget_bytes=memory_budget_bytes,
        devices=devices,
        same_batches=same_batches,
    )
    indices: Iterable[int] = range(plan.num_chunks)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="sweep", unit="chunk")

    def chunks():
        for index in indices:
            chunk = plan.run_chunk(index)
            if on_chunk is not None:
                on_chunk(index, chunk)
            yield chunk

    return plan.assemble(chunks())
