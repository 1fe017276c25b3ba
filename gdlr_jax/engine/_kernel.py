"""The kernel of the engine: one trajectory's steps, evaluations, freezing and the
replay of diverged trajectories, vmapped over the lanes of a device and sharded over devices
(layer 4: engine). How it runs: :mod:`gdlr_jax.engine._sweep` and ``docs/engine.md``."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from gdlr_jax.curvature._extreme_eigenvalues import top_eigenvalues
from gdlr_jax.curvature._lanczos import state_dtype
from gdlr_jax.engine._minibatches import (
    Minibatches,
    epoch_permutation,
    full_batch_value_and_grad,
    minibatch,
)
from gdlr_jax.engine._trajectory_status import (
    ConvergenceCriteria,
    TrajectoryStatus,
    classify_evaluation,
    orbit_summary,
    sum_last_axis,
    within_bound,
)
from gdlr_jax.problems._pytree import PyTree

LossFn = Callable[..., Float[Array, ""]]
OptimizerFactory = Callable[..., optax.GradientTransformation]

LANES = "lanes"  # the mesh axis along which trajectories are sharded
REPLAY_BLOCK = 4096  # diverged trajectories replayed together (see _pinpoint_divergence)
# On CPU, chunks of at most this many trajectories per device: their state stays in cache,
# which ran ~1.5x faster than 4x larger chunks in benchmarks/bench_sweep.py (docs/engine.md).
CPU_LANES_PER_DEVICE = 16384
RUNNING = TrajectoryStatus.NOT_CONVERGED  # the status of a trajectory still being stepped
SHARPNESS_ITERATIONS = 20  # default Lanczos steps per sharpness measurement (at most d)




@dataclasses.dataclass(frozen=True)
class EngineConfig:
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
    sharpness_every: int | None = None
    sharpness_iterations: int = 0  # Lanczos iterations per sharpness estimate

    @property
    def window(self) -> int:
        return min(self.criteria.window, self.steps)

    @property
    def num_records(self) -> int:
        return 0 if self.record_every is None else self.steps // self.record_every + 1

    @property
    def num_sharpness(self) -> int:
        return 0 if self.sharpness_every is None else self.steps // self.sharpness_every + 1


class _Problem(NamedTuple):
    """The objective of one trajectory over its flat parameter vector ``theta (d,)``."""

    config: EngineConfig
    unravel: Callable[[Float[Array, " d"]], PyTree]
    data: PyTree | None

    def loss(self, theta: Float[Array, " d"], batch: PyTree | None = None) -> Float[Array, ""]:
        args = () if batch is None else (batch,)
        return self.config.loss_fn(self.unravel(theta), *args)

    def step(
        self,
        theta: Float[Array, " d"],
        opt_state: PyTree,
        eta: Float[Array, ""],
        batch: PyTree | None,
    ) -> tuple[Float[Array, " d"], PyTree]:
        """One step: ``theta - eta * grad L(theta)`` or the optax update (on the pytree)."""
        grad = jax.grad(self.loss)(theta, batch)
        factory = self.config.optimizer
        if factory is None:
            return theta - eta * grad, opt_state
        params = self.unravel(theta)
        updates, opt_state = transform(factory, eta).update(
            self.unravel(grad), opt_state, params
        )
        return ravel_pytree(optax.apply_updates(params, updates))[0], opt_state

    def init_optimizer(self, theta: Float[Array, " d"], eta: Float[Array, ""]) -> PyTree:
        if self.config.optimizer is None:
            return ()
        return transform(self.config.optimizer, eta).init(self.unravel(theta))

    def value_and_grad(
        self, theta: Float[Array, " d"]
    ) -> tuple[Float[Array, ""], Float[Array, " d"]]:
        """Full-batch loss and gradient (batches weighted by their share of the data)."""
        if self.data is None:
            return jax.value_and_grad(self.loss)(theta)
        source = Minibatches(self.data, self.config.batch_size)
        return full_batch_value_and_grad(self.loss, theta, source)

    def evaluate(
        self, theta: Float[Array, " d"]
    ) -> tuple[Float[Array, ""], Float[Array, ""], Bool[Array, ""]]:
        """Full-batch loss, gradient norm and bound check."""
        loss, grad = self.value_and_grad(theta)
        grad_norm = jnp.sqrt(sum_last_axis(jnp.square(grad)))
        return loss, grad_norm, within_bound(theta, self.config.criteria.divergence_bound)

    def sharpness(
        self, theta: Float[Array, " d"], v0: Float[Array, " d"]
    ) -> tuple[Float[Array, ""], Float[Array, " d"]]:
        """``lambda_max`` of the full-batch Hessian at ``theta`` and its Ritz vector, by
        ``sharpness_iterations`` Lanczos steps from ``v0`` (forward-over-reverse products)."""

        def matvec(v: Float[Array, " d"]) -> Float[Array, " d"]:
            return jax.jvp(lambda x: self.value_and_grad(x)[1], (theta,), (v,))[1]

        values, vectors = top_eigenvalues(
            matvec,
            theta,
            num_iterations=self.config.sharpness_iterations,
            v0=v0,
            return_vectors=True,
        )
        return values[0], vectors[0]


class _Lanes(NamedTuple):
    """State of the ``m`` trajectories (lanes) of one device during a sweep."""

    theta: Float[Array, "m d"]
    opt_state: PyTree  # leaves (m, ...)
    status: Int[Array, " m"]
    steps_taken: Int[Array, " m"]
    detected_at: Int[Array, " m"]  # evaluation time at which divergence was seen
    final_loss: Float[Array, " m"]
    final_grad_norm: Float[Array, " m"]
    min_loss: Float[Array, " m"]
    recorded_loss: Float[Array, "m n_rec"] | None
    recorded_step_norm: Float[Array, "m n_rec"] | None
    recorded_theta: Float[Array, "m n_rec d"] | None
    sharpness_vector: Float[Array, "m d"] | None  # the last Ritz vector (warm start)
    recorded_sharpness: Float[Array, "m n_sharp"] | None


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
    recorded_sharpness: Float[Array, "m n_sharp"] | None
    final_sharpness: Float[Array, " m"] | None


def transform(factory: OptimizerFactory, eta: Float[Array, ""]) -> optax.GradientTransformation:
    """The optax optimiser of one trajectory, its learning rate ``eta`` traced in its state."""
    return optax.inject_hyperparams(factory)(learning_rate=eta)


def _select(mask: Bool[Array, " m"], on_true: PyTree, on_false: PyTree) -> PyTree:
    """Per-lane ``where`` over pytrees whose leaves have the lane axis first."""

    def pick(a, b):
        return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree_util.tree_map(pick, on_true, on_false)


def _advance(
    problem: _Problem,
    theta: Float[Array, "m d"],
    opt_state: PyTree,
    etas: Float[Array, " m"],
    running: Bool[Array, " m"],
    keys: PRNGKeyArray | None,
    t0: Int[Array, ""],
    t1: Int[Array, ""],
    history: Float[Array, "w m d"] | None,
) -> tuple[Float[Array, "m d"], PyTree, Float[Array, "w m d"] | None]:
    """Steps the running lanes from time ``t0`` to ``t1``; the others stay where they are.

    Full-batch plain GD freezes a finished lane by giving it the step size 0: ``theta - 0 *
    grad L(theta) = theta`` exactly, because a lane is only frozen at an iterate where its
    gradient was found finite (lanes that start outside the bound are restored at the end), so
    a step carries no masking at all. With minibatches or an optax optimiser, each step keeps
    the previous state of finished lanes (``where``).

    With ``history`` (``(W, m, d)``), also stores ``theta_t`` at index
    ``t - (steps - W)`` for each ``t`` in ``[t0, t1)``.
    """
    config = problem.config
    window_start = config.steps - config.window
    plain_gd = config.optimizer is None and problem.data is None
    if plain_gd:
        etas = jnp.where(running, etas, 0)

    def lane_step(theta, opt_state, eta, run, batch):
        new_theta, new_opt_state = problem.step(theta, opt_state, eta, batch)
        if plain_gd:
            return new_theta, new_opt_state
        keep = functools.partial(jnp.where, run)
        return keep(new_theta, theta), jax.tree_util.tree_map(keep, new_opt_state, opt_state)

    batch_axis = None if problem.data is None or config.same_batches else 0
    step = jax.vmap(lane_step, in_axes=(0, 0, 0, 0, batch_axis))
    if problem.data is not None:
        source = Minibatches(problem.data, config.batch_size)
        shuffle = functools.partial(epoch_permutation, source)
        draw = functools.partial(minibatch, source)
        if not config.same_batches:
            shuffle = jax.vmap(shuffle, in_axes=(0, None))
            draw = jax.vmap(draw, in_axes=(0, None))

    def body(t, carry):
        theta, opt_state, permutation, history = carry
        if history is not None:
            history = lax.dynamic_update_index_in_dim(history, theta, t - window_start, 0)
        batch = None
        if problem.data is not None:
            permutation = lax.cond(
                t % source.steps_per_epoch == 0,
                lambda: shuffle(keys, t),
                lambda: permutation,
            )
            batch = draw(permutation, t)
        theta, opt_state = step(theta, opt_state, etas, running, batch)
        return theta, opt_state, permutation, history

    permutation = None if problem.data is None else shuffle(keys, t0)
    theta, opt_state, _, history = lax.fori_loop(
        t0, t1, body, (theta, opt_state, permutation, history)
    )
    return theta, opt_state, history


def _next_evaluation(config: EngineConfig, t: Int[Array, ""]) -> Int[Array, ""]:
    """The evaluation time after ``t``: the least of ``steps``, the start of the final window
    (if still ahead), the next power of two (below ``check_every``), and the next multiples of
    ``check_every``, ``record_every`` and ``sharpness_every``."""
    every = config.check_every
    window_start = config.steps - config.window
    power_of_two = jnp.left_shift(jnp.int32(1), 32 - lax.clz(t))
    candidates = [
        jnp.where(t < window_start, window_start, config.steps),
        jnp.where(t < every, power_of_two, config.steps),
        (t // every + 1) * every,
    ]
    for interval in (config.record_every, config.sharpness_every):
        if interval is not None:
            candidates.append((t // interval + 1) * interval)
    return functools.reduce(jnp.minimum, candidates, jnp.int32(config.steps))


def _record(
    config: EngineConfig,
    lanes: _Lanes,
    t: Int[Array, ""],
    loss: Float[Array, " m"],
    step_norm: Float[Array, " m"],
) -> _Lanes:
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
            recorded_theta=(
                put(lanes.recorded_theta, lanes.theta) if config.record_params else None
            ),
        )

    return lax.cond(t % config.record_every == 0, write, lambda lanes: lanes, lanes)


def _record_sharpness(problem: _Problem, lanes: _Lanes, t: Int[Array, ""]) -> _Lanes:
    """Measures ``lambda_max`` at every lane's iterate when ``t`` is a multiple of
    ``sharpness_every``; a non-finite estimate (a lane outside the bound) keeps the previous
    Ritz vector as the next warm start."""
    every = problem.config.sharpness_every
    if every is None:
        return lanes

    def write(lanes):
        value, vector = jax.vmap(problem.sharpness)(lanes.theta, lanes.sharpness_vector)
        finite = jnp.all(jnp.isfinite(vector), axis=1) & jnp.isfinite(value)
        return lanes._replace(
            sharpness_vector=_select(finite, vector, lanes.sharpness_vector),
            recorded_sharpness=lax.dynamic_update_index_in_dim(
                lanes.recorded_sharpness,
                value.astype(lanes.recorded_sharpness.dtype),
                t // every,
                1,
            ),
        )

    return lax.cond(t % every == 0, write, lambda lanes: lanes, lanes)


def _start(problem: _Problem, theta: Float[Array, "m d"], etas: Float[Array, " m"]) -> _Lanes:
    """Lanes at time 0: optimiser states, first evaluation, recordings allocated."""
    config = problem.config
    (m, d), n_rec = theta.shape, config.num_records
    opt_state = jax.vmap(problem.init_optimizer)(theta, etas)
    loss, grad_norm, bounded = jax.vmap(problem.evaluate)(theta)
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
            jnp.zeros((m, n_rec, d), theta.dtype) if config.record_params else None,
        )
    sharpness_vector = recorded_sharpness = None
    if config.num_sharpness:
        start = jax.random.normal(jax.random.key(0), (d,), state_dtype())
        sharpness_vector = jnp.broadcast_to(start, (m, d))
        recorded_sharpness = jnp.zeros((m, config.num_sharpness), loss.dtype)
    lanes = _Lanes(
        theta=theta,
        opt_state=opt_state,
        status=status,
        steps_taken=jnp.zeros(m, jnp.int32),
        detected_at=jnp.zeros(m, jnp.int32),
        final_loss=loss,
        final_grad_norm=grad_norm,
        min_loss=jnp.where(bounded & jnp.isfinite(loss), loss, jnp.inf),
        recorded_loss=recordings[0],
        recorded_step_norm=recordings[1],
        recorded_theta=recordings[2],
        sharpness_vector=sharpness_vector,
        recorded_sharpness=recorded_sharpness,
    )
    lanes = _record(config, lanes, jnp.int32(0), loss, etas * grad_norm)
    return _record_sharpness(problem, lanes, jnp.int32(0))


def _evaluate_and_freeze(
    problem: _Problem,
    lanes: _Lanes,
    theta: Float[Array, "m d"],
    opt_state: PyTree,
    etas: Float[Array, " m"],
    t0: Int[Array, ""],
    t1: Int[Array, ""],
) -> _Lanes:
    """Evaluates the lanes stepped from ``t0`` to ``t1`` and settles those that finished.

    A lane found converged keeps its iterate at ``t1``; a lane found diverged is rolled back to
    its iterate at ``t0`` (inside the bound). Lanes still running at ``t1 = steps`` are settled
    too. The per-lane bookkeeping is only rewritten when some lane settles (``lax.cond``), so
    an evaluation at which nothing happens costs little more than the loss and gradient.
    """
    config = problem.config
    running = lanes.status == RUNNING
    loss, grad_norm, bounded = jax.vmap(problem.evaluate)(theta)
    status, diverged_now, converged_now = classify_evaluation(
        lanes.status, loss, grad_norm, bounded, etas, config.criteria, config.min_loss_value
    )
    alive = running & ~diverged_now
    settled = converged_now | (alive & (t1 == config.steps))
    stepped = lanes._replace(
        theta=theta,
        opt_state=opt_state,
        min_loss=jnp.where(alive, jnp.minimum(lanes.min_loss, loss), lanes.min_loss),
    )
    stepped = _record(config, stepped, t1, loss, etas * grad_norm)
    stepped = _record_sharpness(problem, stepped, t1)

    def settle(stepped):
        return stepped._replace(
            theta=_select(diverged_now, lanes.theta, theta),
            opt_state=_select(diverged_now, lanes.opt_state, opt_state),
            status=status,
            steps_taken=jnp.where(
                diverged_now, t0, jnp.where(settled, t1, lanes.steps_taken)
            ),
            detected_at=jnp.where(diverged_now, t1, lanes.detected_at),
            final_loss=jnp.where(settled, loss, lanes.final_loss),
            final_grad_norm=jnp.where(settled, grad_norm, lanes.final_grad_norm),
        )

    return lax.cond(jnp.any(diverged_now | settled), settle, lambda s: s, stepped)


def _run_phase(
    problem: _Problem,
    lanes: _Lanes,
    t: Int[Array, ""],
    stop: int,
    history: Float[Array, "w m d"] | None,
    etas: Float[Array, " m"],
    keys: PRNGKeyArray | None,
) -> tuple[Int[Array, ""], _Lanes, Float[Array, "w m d"] | None]:
    """Advances the lanes from ``t`` from evaluation to evaluation until ``stop``, or until
    none of them is running (early exit). With ``history`` (the final window), records the
    iterates into it."""

    def unfinished(carry):
        t, lanes, _ = carry
        return (t < stop) & jnp.any(lanes.status == RUNNING)

    def chunk(carry):
        t0, lanes, history = carry
        t1 = _next_evaluation(problem.config, t0)
        running = lanes.status == RUNNING
        theta, opt_state, history = _advance(
            problem, lanes.theta, lanes.opt_state, etas, running, keys, t0, t1, history
        )
        lanes = _evaluate_and_freeze(problem, lanes, theta, opt_state, etas, t0, t1)
        return t1, lanes, history

    return lax.while_loop(unfinished, chunk, (t, lanes, history))


def _pinpoint_divergence(
    problem: _Problem,
    lanes: _Lanes,
    etas: Float[Array, " m"],
    keys: PRNGKeyArray | None,
) -> _Lanes:
    """Replays each diverged lane from its rollback point to its exact last in-bound iterate.

    A lane found diverged at evaluation time ``t1`` was rolled back to its iterate at the
    previous evaluation ``t0``; it is stepped again from ``t0``, one checked step at a time, and
    stopped before the first step that leaves the bound (or at ``t1``). Only the diverged lanes
    are replayed: they are packed into blocks of up to ``REPLAY_BLOCK`` lanes, so the cost
    is proportional to their number.
    """
    config = problem.config
    m = etas.shape[0]
    block = min(REPLAY_BLOCK, m)
    pending = (lanes.status == TrajectoryStatus.DIVERGED) & (
        lanes.detected_at > lanes.steps_taken
    )
    count = jnp.sum(pending, dtype=jnp.int32)
    slot = jnp.where(pending, jnp.cumsum(pending, dtype=jnp.int32) - 1, m)
    order = jnp.zeros(m, jnp.int32).at[slot].set(jnp.arange(m, dtype=jnp.int32), mode="drop")
    bound = config.criteria.divergence_bound

    def replay(theta, opt_state, eta, start, stop, key):
        def running(carry):
            _, _, t, alive = carry
            return alive & (t < stop)

        def step(carry):
            theta, opt_state, t, _ = carry
            batch = None
            if problem.data is not None:
                source = Minibatches(problem.data, config.batch_size)
                batch = minibatch(source, epoch_permutation(source, key, t), t)
            new_theta, new_opt_state = problem.step(theta, opt_state, eta, batch)
            inside = within_bound(new_theta, bound)
            keep = functools.partial(jnp.where, inside)
            return (
                keep(new_theta, theta),
                jax.tree_util.tree_map(keep, new_opt_state, opt_state),
                t + inside.astype(t.dtype),
                inside,
            )

        theta, opt_state, t, _ = lax.while_loop(
            running, step, (theta, opt_state, start, jnp.bool_(True))
        )
        loss, grad_norm, _ = problem.evaluate(theta)
        return theta, opt_state, t, loss, grad_norm

    key_axis = None if keys is None or config.same_batches else 0
    replay_block = jax.vmap(replay, in_axes=(0, 0, 0, 0, 0, key_axis))

    def body(carry):
        b, lanes = carry
        first = jnp.minimum(b * block, m - block)
        index = lax.dynamic_slice(order, (first,), (block,))
        position = first + jnp.arange(block)
        valid = (position >= b * block) & (position < count)
        take = functools.partial(jnp.take, indices=index, axis=0)
        theta, opt_state, t, loss, grad_norm = replay_block(
            take(lanes.theta),
            jax.tree_util.tree_map(take, lanes.opt_state),
            take(etas),
            take(lanes.steps_taken),
            take(lanes.detected_at),
            keys if key_axis is None else take(keys),
        )

        target = jnp.where(valid, index, m)  # slots of other blocks, and padding, write nowhere

        def put(old, new):
            return old.at[target].set(new, mode="drop")

        old_min = take(lanes.min_loss)
        lanes = lanes._replace(
            theta=put(lanes.theta, theta),
            opt_state=jax.tree_util.tree_map(put, lanes.opt_state, opt_state),
            steps_taken=put(lanes.steps_taken, t),
            final_loss=put(lanes.final_loss, loss),
            final_grad_norm=put(lanes.final_grad_norm, grad_norm),
            min_loss=put(
                lanes.min_loss,
                jnp.where(jnp.isfinite(loss), jnp.minimum(old_min, loss), old_min),
            ),
        )
        return b + 1, lanes

    _, lanes = lax.while_loop(
        lambda carry: carry[0] * block < count, body, (jnp.int32(0), lanes)
    )
    return lanes


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


def _fill_recordings(config: EngineConfig, lanes: _Lanes, etas: Float[Array, " m"]) -> _Lanes:
    """Slots recorded after a lane finished hold its final values."""
    if config.record_every is None:
        return lanes
    fill = functools.partial(
        _fill_after_finish, every=config.record_every, steps_taken=lanes.steps_taken
    )
    return lanes._replace(
        recorded_loss=fill(lanes.recorded_loss, lanes.final_loss),
        recorded_step_norm=fill(lanes.recorded_step_norm, etas * lanes.final_grad_norm),
        recorded_theta=(
            fill(lanes.recorded_theta, lanes.theta) if config.record_params else None
        ),
    )


def _final_sharpness(
    problem: _Problem, lanes: _Lanes
) -> tuple[Float[Array, " m"] | None, Float[Array, "m n_sharp"] | None]:
    """``lambda_max`` at the final iterates, also written into the sharpness slots after each
    lane finished (a diverged lane's last measurement was not at its final iterate)."""
    config = problem.config
    if config.sharpness_every is None:
        return None, None
    final, _ = jax.vmap(problem.sharpness)(lanes.theta, lanes.sharpness_vector)
    final = final.astype(lanes.recorded_sharpness.dtype)
    recorded = _fill_after_finish(
        lanes.recorded_sharpness, final, config.sharpness_every, lanes.steps_taken
    )
    return final, recorded


def _run_lanes(
    config: EngineConfig,
    params: PyTree,
    etas: Float[Array, " m"],
    keys: PRNGKeyArray | None,
    data: PyTree | None,
) -> _LaneResults:
    """Runs the ``m`` trajectories of one device to the end and summarises them."""
    unravel = ravel_pytree(jax.tree_util.tree_map(lambda x: x[0], params))[1]
    problem = _Problem(config, unravel, data)
    theta = jax.vmap(lambda p: ravel_pytree(p)[0])(params)  # (m, d)
    window = config.window
    lanes = _start(problem, theta, etas)
    t, lanes, _ = _run_phase(
        problem, lanes, jnp.int32(0), config.steps - window, None, etas, keys
    )
    history = jnp.zeros((window,) + theta.shape, theta.dtype)
    _, lanes, history = _run_phase(problem, lanes, t, config.steps, history, etas, keys)

    diverged_at_start = (lanes.status == TrajectoryStatus.DIVERGED) & (lanes.detected_at == 0)
    lanes = lanes._replace(theta=_select(diverged_at_start, theta, lanes.theta))
    still_running = lanes.status == RUNNING
    max_period = min(config.criteria.max_period, window // 2)
    period, mean_step = jax.vmap(
        lambda h, final: orbit_summary(h, final, max_period, config.criteria.period_tol),
        in_axes=(1, 0),
    )(history, lanes.theta)
    period = jnp.where(still_running, period, 0)
    status = jnp.where(
        still_running & (period > 0), jnp.int32(TrajectoryStatus.PERIODIC), lanes.status
    )
    lanes = _pinpoint_divergence(problem, lanes._replace(status=status), etas, keys)
    lanes = _fill_recordings(config, lanes, etas)
    final_sharpness, recorded_sharpness = _final_sharpness(problem, lanes)
    diverged = lanes.status == TrajectoryStatus.DIVERGED
    asymptotic = jnp.where(
        still_running,
        mean_step,
        jnp.where(diverged, jnp.inf, etas * lanes.final_grad_norm),
    )
    recorded_params = None
    if config.record_params:
        recorded_params = jax.vmap(jax.vmap(unravel))(lanes.recorded_theta)
    return _LaneResults(
        status=lanes.status,
        steps_taken=lanes.steps_taken,
        final_loss=lanes.final_loss,
        final_grad_norm=lanes.final_grad_norm,
        asymptotic_step_norm=asymptotic.astype(lanes.final_loss.dtype),
        min_loss=lanes.min_loss,
        period=period.astype(jnp.int32),
        final_params=jax.vmap(unravel)(lanes.theta),
        recorded_loss=lanes.recorded_loss,
        recorded_step_norm=lanes.recorded_step_norm,
        recorded_params=recorded_params,
        recorded_sharpness=recorded_sharpness,
        final_sharpness=final_sharpness,
    )


@functools.partial(jax.jit, static_argnames=("config", "mesh", "lanes_per_device"))
def run_sharded(
    params0: PyTree,
    etas: Float[Array, " n_eta"],
    keys: PRNGKeyArray | None,
    data: PyTree | None,
    start: Int[Array, ""],
    *,
    config: EngineConfig,
    mesh: Mesh,
    lanes_per_device: int,
) -> _LaneResults:
    """Runs the trajectories ``start, start + 1, ...`` of the flattened grid on ``mesh``.

    Every device gathers its ``lanes_per_device`` trajectories (``k = i * n_init + j``; past
    the end of the grid the last one is repeated) from the replicated ``params0 (n_init, ...)``
    and ``etas``, runs them with :func:`_run_lanes` and stops on its own: devices do not
    communicate, so a trajectory's results do not depend on the device count. ``start`` is
    traced: all chunks share one compilation.
    """
    n_init = jax.tree_util.tree_leaves(params0)[0].shape[0]
    total = etas.shape[0] * n_init

    def run_device(params0, etas, keys, data, start):
        first = start + lax.axis_index(LANES) * lanes_per_device
        flat = jnp.minimum(first + jnp.arange(lanes_per_device), total - 1)
        init_index = flat % n_init
        params = jax.tree_util.tree_map(lambda x: x[init_index], params0)
        lane_keys = keys if config.same_batches or keys is None else keys[init_index]
        return _run_lanes(config, params, etas[flat // n_init], lane_keys, data)

    replicated = PartitionSpec()
    run = jax.shard_map(
        run_device,
        mesh=mesh,
        in_specs=(replicated,) * 5,
        out_specs=PartitionSpec(LANES),
        check_vma=False,
    )
    return run(params0, etas, keys, data, start)
