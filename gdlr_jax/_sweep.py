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
  asymptotic step length and to look for periodic orbits;
* with ``sharpness_every = K``, the sharpness ``lambda_max`` of the full-batch Hessian is
  estimated every ``K`` steps for every trajectory by a few Lanczos iterations
  (Hessian-vector products), each warm-started from the trajectory's previous Ritz vector.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from gdlr_jax._extreme_eigenvalues import top_eigenvalues
from gdlr_jax._hvp import check_finite
from gdlr_jax._lanczos import state_dtype
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
    sum_last_axis,
    within_bound,
)

PyTree = Any
LossFn = Callable[..., Float[Array, ""]]
OptimizerFactory = Callable[..., optax.GradientTransformation]

_LANES = "lanes"  # the mesh axis along which trajectories are sharded
_REPLAY_BLOCK = 4096  # diverged trajectories replayed together (see _pinpoint_divergence)
# On CPU, chunks of at most this many trajectories per device: their state stays in cache,
# which ran ~1.5x faster than 4x larger chunks in benchmarks/bench_sweep.py (docs/engine.md).
_CPU_LANES_PER_DEVICE = 16384
_RUNNING = TrajectoryStatus.NOT_CONVERGED  # the status of a trajectory still being stepped
_SHARPNESS_ITERATIONS = 20  # default Lanczos steps per sharpness measurement (at most d)


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------
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

    config: _EngineConfig
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
        updates, opt_state = _transform(factory, eta).update(
            self.unravel(grad), opt_state, params
        )
        return ravel_pytree(optax.apply_updates(params, updates))[0], opt_state

    def init_optimizer(self, theta: Float[Array, " d"], eta: Float[Array, ""]) -> PyTree:
        if self.config.optimizer is None:
            return ()
        return _transform(self.config.optimizer, eta).init(self.unravel(theta))

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


def _transform(factory: OptimizerFactory, eta: Float[Array, ""]) -> optax.GradientTransformation:
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


def _next_evaluation(config: _EngineConfig, t: Int[Array, ""]) -> Int[Array, ""]:
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
    running = lanes.status == _RUNNING
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
        return (t < stop) & jnp.any(lanes.status == _RUNNING)

    def chunk(carry):
        t0, lanes, history = carry
        t1 = _next_evaluation(problem.config, t0)
        running = lanes.status == _RUNNING
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
    are replayed: they are packed into blocks of up to ``_REPLAY_BLOCK`` lanes, so the cost
    is proportional to their number.
    """
    config = problem.config
    m = etas.shape[0]
    block = min(_REPLAY_BLOCK, m)
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


def _fill_recordings(config: _EngineConfig, lanes: _Lanes, etas: Float[Array, " m"]) -> _Lanes:
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
    config: _EngineConfig,
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
    still_running = lanes.status == _RUNNING
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
def _run_sharded(
    params0: PyTree,
    etas: Float[Array, " n_eta"],
    keys: PRNGKeyArray | None,
    data: PyTree | None,
    start: Int[Array, ""],
    *,
    config: _EngineConfig,
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
        first = start + lax.axis_index(_LANES) * lanes_per_device
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
        out_specs=PartitionSpec(_LANES),
        check_vma=False,
    )
    return run(params0, etas, keys, data, start)


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
            f"etas must be positive and finite, got etas[{i}] = {values[i].item()!r} "
            f"({bad.size} bad value(s))."
        )
    return values.astype(dtype)


def _check_params(params0: PyTree, dtype: Any) -> tuple[PyTree, int]:
    """``params0`` cast to ``dtype`` on the host, and ``n_init``; ``jax.ShapeDtypeStruct``
    leaves (an abstract plan) stay abstract."""
    leaves, treedef = jax.tree_util.tree_flatten(params0)
    if not leaves:
        raise ValueError("params0: the pytree has no array leaves; expected at least one.")
    abstract = [isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves]
    if any(abstract) and not all(abstract):
        raise ValueError(
            "params0: every leaf must be an array, or every leaf a jax.ShapeDtypeStruct (an "
            "abstract plan); got a mix."
        )
    arrays = leaves if all(abstract) else [np.asarray(leaf) for leaf in leaves]
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
    if all(abstract):
        cast = [jax.ShapeDtypeStruct(a.shape, dtype) for a in arrays]
        return jax.tree_util.tree_unflatten(treedef, cast), n_init
    with np.errstate(over="ignore"):  # an overflow becomes inf, reported just below
        cast = jax.tree_util.tree_unflatten(treedef, [a.astype(dtype) for a in arrays])
    check_finite("params0", cast)  # after the cast: a float64 value beyond float32 is inf
    return cast, n_init


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
        raise ValueError(
            f"optimizer must build an optax GradientTransformation, got {transform!r}."
        )


def _check_loss(loss_fn: Any, params: PyTree, source: Minibatches | None) -> None:
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {loss_fn!r}.")
    single = _one_trajectory(params)
    args = (single,)
    if source is not None:
        batch = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((source.batch_size,) + x.shape[1:], x.dtype),
            source.data,
        )
        args = (single, batch)
    what = "one initialisation (params0 without its leading axis" + (
        " and one batch)" if source else ")"
    )
    try:
        out = jax.eval_shape(loss_fn, *args)
    except Exception as error:  # noqa: BLE001 - any failure of the user's function is bad input
        raise ValueError(f"loss_fn could not be evaluated on {what}: {error}") from error
    shape = getattr(out, "shape", None)
    if shape != ():
        raise ValueError(
            f"loss_fn must return a scalar for {what}, got {shape or type(out).__name__}."
        )


def _tree_bytes(tree: PyTree) -> int:
    """Bytes of the leaves of a pytree of arrays or ``jax.ShapeDtypeStruct`` s."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def _one_trajectory(params: PyTree) -> PyTree:
    """The shapes of one initialisation: ``params`` leaves without their leading axis."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params)


def _bytes_per_trajectory(
    config: _EngineConfig, params: PyTree, source: Minibatches | None
) -> int:
    """Rough device memory of one trajectory (lane) of a chunk, in bytes.

    Parameters are held about six times (iterate, rollback copy, step, gradient, evaluation),
    the optimiser state twice, plus the final-window history, the recordings and, with
    per-initialisation batches, a shuffle and a batch, and with sharpness tracking the Lanczos
    basis. Activations of ``loss_fn`` are not
    counted: lower the budget for large models.
    """
    single = _one_trajectory(params)
    param_bytes = _tree_bytes(single)
    opt_bytes = 0
    if config.optimizer is not None:
        opt_bytes = _tree_bytes(
            jax.eval_shape(
                lambda p: _transform(config.optimizer, jnp.ones((), jnp.float32)).init(p), single
            )
        )
    scalar = np.dtype(jax.tree_util.tree_leaves(single)[0].dtype).itemsize
    total = (6 + config.window) * param_bytes + 2 * opt_bytes + 16 * scalar
    total += config.num_records * (2 * scalar + (param_bytes if config.record_params else 0))
    if config.sharpness_every is not None:  # Lanczos basis, warm start, recordings
        state = np.dtype(state_dtype()).itemsize
        num_params = param_bytes // scalar
        total += (config.sharpness_iterations + 3) * num_params * state
        total += config.num_sharpness * scalar
    if source is not None and not config.same_batches:
        example_bytes = sum(
            math.prod(x.shape[1:]) * x.dtype.itemsize
            for x in jax.tree_util.tree_leaves(source.data)
        )
        total += 4 * source.num_examples + source.batch_size * example_bytes
    return int(total)


def _result_bytes_per_trajectory(config: _EngineConfig, params: PyTree) -> int:
    """Host memory of one trajectory's results in a :class:`SweepResult`, in bytes: the
    per-trajectory fields, the final parameters and the recordings."""
    param_bytes = _tree_bytes(_one_trajectory(params))
    scalar = np.dtype(jax.tree_util.tree_leaves(params)[0].dtype).itemsize
    total = 3 * 4 + 4 * scalar + param_bytes  # status, steps, period; losses and norms
    total += config.num_records * (2 * scalar + (param_bytes if config.record_params else 0))
    if config.sharpness_every is not None:
        total += (config.num_sharpness + 1) * scalar
    return int(total)


class ChunkMemoryError(ValueError):
    """A chunk of a sweep, or one trajectory, needs more memory than a device can allocate.

    Raised by :func:`plan_sweep` before any compute; a ``ValueError`` like every bad argument.

    Attributes:
        per_trajectory: the estimated bytes of one trajectory.
        limit: the bytes one device can allocate.
        fit: the largest ``chunk_size`` that fits (0: not even one trajectory per device).
    """

    def __init__(self, message: str, *, per_trajectory: int, limit: int, fit: int):
        super().__init__(message)
        self.per_trajectory, self.limit, self.fit = per_trajectory, limit, fit


class HostMemoryError(ValueError):
    """The grid and results of a sweep need more host memory than is available.

    Raised by :func:`plan_sweep` before any compute; a ``ValueError`` like every bad argument.

    Attributes:
        needed: the estimated peak host bytes of the sweep (:attr:`SweepPlan.peak_host_bytes`).
        limit: the host's available bytes.
        per_trajectory: the estimated host bytes of one trajectory's results.
        fit: the most trajectories whose results fit beside the rest (0: none).
    """

    def __init__(self, message: str, *, needed: int, limit: int, per_trajectory: int, fit: int):
        super().__init__(message)
        self.needed, self.limit = needed, limit
        self.per_trajectory, self.fit = per_trajectory, fit


def host_available_bytes() -> int | None:
    """The host memory available to new allocations: ``MemAvailable`` of ``/proc/meminfo``,
    else the free pages; ``None`` when unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) << 10  # the value is in kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _allocatable_bytes(device: jax.Device) -> int | None:
    """What ``device`` can allocate: its allocator's ``bytes_limit`` where it reports one (GPU,
    TPU), else for a CPU device :func:`host_available_bytes`; ``None`` when unknown."""
    stats = device.memory_stats()
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return host_available_bytes() if device.platform == "cpu" else None


def readable_size(num_bytes: float) -> str:
    """``num_bytes`` in the largest binary unit it reaches (``"1.5 GiB"``)."""
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if num_bytes >= 1 << shift:
            return f"{num_bytes / 2**shift:.3g} {unit}"
    return f"{int(num_bytes)} B"


def _check_chunk_memory(
    per_trajectory: int,
    chunk_size: int,
    devices: Sequence[jax.Device],
    requested: int | None,
    memory_budget_bytes: int,
) -> None:
    """Raises :class:`ChunkMemoryError` when a device's share of a chunk does not fit.

    A device runs ``m = chunk_size / n_dev`` lanes of about ``per_trajectory`` bytes each
    (:func:`_bytes_per_trajectory`); ``m * per_trajectory`` must not exceed
    :func:`_allocatable_bytes` of any device (CPU devices share the host's memory, so each
    gets ``1 / n_dev`` of it). ``requested`` is the ``chunk_size`` argument (``None``: sized
    from ``memory_budget_bytes``); the message says which one to lower, and to what.
    """
    n_dev = len(devices)
    if all(d.platform == "cpu" for d in devices):
        host = _allocatable_bytes(devices[0])
        limits = [] if host is None else [host // n_dev]
    else:
        limits = [b for b in map(_allocatable_bytes, devices) if b is not None]
    if not limits:
        return
    limit = min(limits)
    lanes = chunk_size // n_dev
    if lanes * per_trajectory <= limit:
        return
    fit = limit // per_trajectory * n_dev
    sizes = dict(per_trajectory=per_trajectory, limit=limit, fit=fit)
    one, available = readable_size(per_trajectory), readable_size(limit)
    if fit == 0:
        raise ChunkMemoryError(
            f"one trajectory needs about {one} (an estimate: parameters, final window, "
            f"recordings), more than the {available} a {devices[0].platform} "
            "device can allocate: record less (record_every, record_params), take fewer "
            "steps or use a smaller model.",
            **sizes,
        )
    given = (
        f"chunk_size = {requested}"
        if requested is not None
        else f"memory_budget_bytes = {memory_budget_bytes}"
    )
    how = (
        f"pass chunk_size <= {fit}, or chunk_size=None to size chunks from memory_budget_bytes"
        if requested is not None
        else f"pass memory_budget_bytes <= {limit} or chunk_size <= {fit}"
    )
    raise ChunkMemoryError(
        f"{given}: {lanes} trajectories per device need about "
        f"{readable_size(lanes * per_trajectory)} ({one} each, an estimate), more than the "
        f"{available} a {devices[0].platform} device can allocate; {how}.",
        **sizes,
    )


def _check_host_memory(peak: int, per_trajectory: int, total: int) -> None:
    """Raises :class:`HostMemoryError` when ``peak`` bytes exceed
    :func:`host_available_bytes`; ``total`` trajectories of ``per_trajectory`` bytes each
    are part of it, and the message says how many would fit."""
    limit = host_available_bytes()
    if limit is None or peak <= limit:
        return
    fit = max(0, (limit - (peak - total * per_trajectory)) // per_trajectory)
    how = (
        f"sweep at most {fit} trajectories per call (fewer step sizes or initialisations)"
        if fit
        else "shrink the grid of initialisations or the data"
    )
    raise HostMemoryError(
        f"the sweep needs about {readable_size(peak)} of host memory (the results of {total} "
        f"trajectories, {readable_size(per_trajectory)} each, with parameters, data and a "
        f"chunk; an estimate), more than the {readable_size(limit)} available: {how}, or "
        "record less (record_every, record_params).",
        needed=peak,
        limit=limit,
        per_trajectory=per_trajectory,
        fit=fit,
    )


class SweepPlan:
    """A validated sweep, its grid cut into chunks that can be run one at a time.

    :func:`sweep` is ``plan_sweep`` followed by :meth:`run_chunk` for every chunk and
    :meth:`assemble`. A runner that checkpoints a long sweep runs the chunks it has not saved
    yet and assembles the saved ones. A plan made from ``jax.ShapeDtypeStruct`` leaves
    (``abstract``) has every attribute but cannot run: it sizes a sweep without allocating
    its grid.

    Attributes:
        grid_shape: ``(n_eta, n_init)``.
        num_trajectories: ``n_eta * n_init``.
        chunk_size: trajectories per chunk (a multiple of the number of devices).
        num_chunks: ``ceil(num_trajectories / chunk_size)``.
        record_steps: the recorded times ``(n_rec,)`` or ``None``.
        sharpness_steps: the times of the sharpness measurements ``(n_sharp,)`` or ``None``.
        chunk_bytes: estimated device memory of one chunk, all devices together.
        result_bytes: estimated host memory of the :class:`SweepResult`.
        peak_host_bytes: estimated host memory while the sweep runs: the result, the host
            copy of ``params0`` and, on CPU devices (which live in host memory), the
            replicated ``params0`` and data and one chunk.
        abstract: made from ``jax.ShapeDtypeStruct`` leaves (cannot run).
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
        *,
        chunk_bytes: int,
        result_bytes: int,
        peak_host_bytes: int,
    ):
        self._config = config
        self._mesh = mesh
        self.abstract = isinstance(jax.tree_util.tree_leaves(params0)[0], jax.ShapeDtypeStruct)
        replicated = NamedSharding(mesh, PartitionSpec())

        def put(x: PyTree) -> PyTree:
            return x if self.abstract else jax.device_put(x, replicated)

        self._params0 = put(params0)  # leaves (n_init, ...)
        self._etas = etas
        self._device_etas = put(etas)
        self._data = None if source is None else put(source.data)
        self._keys = None
        if key is not None:
            if not config.same_batches:
                key = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(n_init))
            self._keys = put(key)
        self.chunk_bytes = int(chunk_bytes)
        self.result_bytes = int(result_bytes)
        self.peak_host_bytes = int(peak_host_bytes)
        self.grid_shape = (int(etas.shape[0]), int(n_init))
        self.num_trajectories = self.grid_shape[0] * self.grid_shape[1]
        self.chunk_size = int(chunk_size)
        self.num_chunks = -(-self.num_trajectories // self.chunk_size)
        self.record_steps = (
            None
            if config.record_every is None
            else np.arange(config.num_records) * config.record_every
        )
        self.sharpness_steps = (
            None
            if config.sharpness_every is None
            else np.arange(config.num_sharpness) * config.sharpness_every
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
        if self.abstract:
            raise ValueError(
                "this plan was made from jax.ShapeDtypeStruct leaves (it sizes a sweep, it "
                "cannot run one): plan_sweep with arrays as params0 to run it."
            )
        out = _run_sharded(
            self._params0,
            self._device_etas,
            self._keys,
            self._data,
            jnp.int32(start),
            config=self._config,
            mesh=self._mesh,
            lanes_per_device=self.chunk_size // self._mesh.size,
        )
        host = jax.tree_util.tree_map(lambda x: x[: stop - start], jax.device_get(out))
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
            return x.reshape(grid + x.shape[1:])

        fields = {name: jax.tree_util.tree_map(as_grid, value) for name, value in arrays.items()}
        return SweepResult(
            etas=self._etas,
            record_steps=self.record_steps,
            sharpness_steps=self.sharpness_steps,
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
    check_every: int = 128,
    record_every: int | None = None,
    record_params: bool = False,
    sharpness_every: int | None = None,
    sharpness_iterations: int | None = None,
    dtype: Any = jnp.float32,
    chunk_size: int | None = None,
    memory_budget_bytes: int = 1 << 30,
    devices: Sequence[jax.Device] | None = None,
    same_batches: bool = True,
) -> SweepPlan:
    """Validates the arguments of :func:`sweep` and cuts its grid into chunks.

    Takes the arguments of :func:`sweep` (except ``progress``, ``on_chunk`` and
    ``checkpoint_dir``); raises the same ``ValueError`` s, before any compute. ``params0``
    may also have ``jax.ShapeDtypeStruct`` leaves ``(n_init, ...)``: the plan is then
    ``abstract``, it checks the arguments and the memory of a sweep without allocating its
    grid, and cannot run (like ``jax.eval_shape``).

    Example, whether a grid of 10^8 starts of the two-neuron loss fits in host memory::

        grid = [jax.ShapeDtypeStruct((10**8, 1, 1), jnp.float32)] * 2
        plan = plan_sweep(two_neuron().loss, grid, etas, steps=1000)  # HostMemoryError if not
        plan.peak_host_bytes, plan.num_chunks
    """
    dt = _check_dtype(dtype)
    etas_host = _check_etas(etas, dt)
    params_host, n_init = _check_params(params0, dt)
    _check_positive_int("steps", steps)
    _check_positive_int("check_every", check_every)
    _check_positive_int("record_every", record_every, allow_none=True)
    _check_positive_int("sharpness_every", sharpness_every, allow_none=True)
    _check_positive_int("sharpness_iterations", sharpness_iterations, allow_none=True)
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
    if sharpness_iterations is not None and sharpness_every is None:
        raise ValueError("sharpness_iterations needs sharpness_every (the measuring interval).")
    num_params = sum(
        math.prod(leaf.shape[1:]) for leaf in jax.tree_util.tree_leaves(params_host)
    )
    if sharpness_iterations is None:
        sharpness_iterations = min(_SHARPNESS_ITERATIONS, num_params)
    elif sharpness_iterations > num_params:
        raise ValueError(
            f"sharpness_iterations = {sharpness_iterations} exceeds the number of parameters "
            f"d = {num_params}: a Krylov space has at most d dimensions."
        )
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
        sharpness_every=None if sharpness_every is None else int(sharpness_every),
        sharpness_iterations=0 if sharpness_every is None else int(sharpness_iterations),
    )
    n_dev = len(devices)
    total = etas_host.shape[0] * n_init
    requested = chunk_size
    per_trajectory = _bytes_per_trajectory(config, params_host, source)
    if chunk_size is None:
        per_device = max(1, memory_budget_bytes // per_trajectory)
        if all(d.platform == "cpu" for d in devices):
            per_device = min(per_device, _CPU_LANES_PER_DEVICE)
        chunk_size = per_device * n_dev
    chunk_size = min(int(chunk_size), total)
    chunk_size = -(-chunk_size // n_dev) * n_dev  # a multiple of the device count
    _check_chunk_memory(per_trajectory, chunk_size, devices, requested, memory_budget_bytes)
    result_per_trajectory = _result_bytes_per_trajectory(config, params_host)
    chunk_bytes = chunk_size * per_trajectory
    inputs = _tree_bytes(params_host) + (0 if source is None else _tree_bytes(source.data))
    peak = total * result_per_trajectory + inputs
    if all(d.platform == "cpu" for d in devices):  # device buffers are host memory
        peak += n_dev * inputs + chunk_bytes
    _check_host_memory(peak, result_per_trajectory, total)
    mesh = Mesh(np.array(devices), (_LANES,))
    return SweepPlan(
        config,
        params_host,
        etas_host,
        n_init,
        key,
        source,
        chunk_size,
        mesh,
        chunk_bytes=chunk_bytes,
        result_bytes=total * result_per_trajectory,
        peak_host_bytes=peak,
    )


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
    check_every: int = 128,
    record_every: int | None = None,
    record_params: bool = False,
    sharpness_every: int | None = None,
    sharpness_iterations: int | None = None,
    dtype: Any = jnp.float32,
    chunk_size: int | None = None,
    memory_budget_bytes: int = 1 << 30,
    devices: Sequence[jax.Device] | None = None,
    same_batches: bool = True,
    progress: bool = False,
    on_chunk: Callable[[int, SweepChunk], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
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
        sharpness_every: measure the sharpness ``lambda_max`` of the full-batch Hessian every
            this many steps (``None``: never), into ``recorded_sharpness`` and
            ``final_sharpness``. Each measurement is ``sharpness_iterations`` Lanczos steps
            (Hessian-vector products) per trajectory, warm-started from its previous Ritz
            vector, so it tracks the top eigenvalue as it drifts (``docs/engine.md``).
        sharpness_iterations: Lanczos steps per measurement, ``<= d`` (default
            ``min(20, d)``, ``d`` the number of parameters).
        dtype: floating dtype of parameters, step sizes and floating data (float32 default;
            float64 needs ``jax_enable_x64``).
        chunk_size: trajectories per chunk (rounded up to a multiple of the device count); by
            default as many per device as fit ``memory_budget_bytes``, and at most 16384 per
            device on CPU (cache-sized chunks run faster).
        memory_budget_bytes: memory of one device allowed for its share of a chunk (the
            estimate is in ``docs/engine.md``); default 1 GiB.
        devices: devices to shard trajectories over (default ``jax.local_devices()``).
        same_batches: every trajectory sees the same minibatch sequence (default); ``False``:
            initialisation ``j`` uses the key ``fold_in(key, j)`` (shared by all step sizes).
        progress: show a progress bar over chunks.
        on_chunk: called as ``on_chunk(index, chunk)`` after each chunk (e.g. to persist it),
            loaded ones included.
        checkpoint_dir: a folder where each finished chunk is saved atomically as it
            completes; a chunk already saved there is loaded instead of run, so a sweep
            interrupted at any moment resumes where it stopped, with identical results
            (``gdlr_jax._checkpoint``, ``docs/engine.md``). ``None``: nothing is saved.

    Returns:
        A :class:`SweepResult` with arrays ``(n_eta, n_init)``.

    Raises:
        ValueError: before any compute, on bad arguments: non-positive, non-finite, empty or
            non-1-D ``etas``; ``params0`` leaves without a common leading axis; NaN or inf in
            ``params0`` or the ``batch_source`` data (the message names the leaf and the
            index); ``steps < 1``; a ``loss_fn`` that does not return a scalar; a malformed
            ``batch_source``; a missing or superfluous ``key``; bad tolerances; a chunk (or one
            trajectory) estimated to need more memory than a device can allocate
            (``ChunkMemoryError``), or results estimated not to fit in the host's available
            memory (``HostMemoryError``): the message says how to reduce it;
            ``jax.ShapeDtypeStruct`` leaves in ``params0`` (those only plan, see
            :func:`plan_sweep`).
        gdlr_jax._checkpoint.CheckpointMismatchError: (a ``ValueError``) when
            ``checkpoint_dir`` holds chunks of a sweep with other arguments; the message names
            what differs.
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
        sharpness_every=sharpness_every,
        sharpness_iterations=sharpness_iterations,
        dtype=dtype,
        chunk_size=chunk_size,
        memory_budget_bytes=memory_budget_bytes,
        devices=devices,
        same_batches=same_batches,
    )
    if plan.abstract:
        raise ValueError(
            "params0 has jax.ShapeDtypeStruct leaves: sweep needs arrays (plan_sweep sizes a "
            "sweep from shapes)."
        )
    indices: Iterable[int] = range(plan.num_chunks)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="sweep", unit="chunk")

    run_chunk = plan.run_chunk
    if checkpoint_dir is not None:
        from gdlr_jax._checkpoint import ChunkStore  # imports this module

        run_chunk = ChunkStore(checkpoint_dir, plan).load_or_run

    def chunks():
        for index in indices:
            chunk = run_chunk(index)
            if on_chunk is not None:
                on_chunk(index, chunk)
            yield chunk

    return plan.assemble(chunks())
