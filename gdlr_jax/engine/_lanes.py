"""The state of the ``m`` trajectories (lanes) of one device and how it starts (layer 4:
engine): their parameters (a :data:`~gdlr_jax.engine._problem.State` of ``(m, ...)`` arrays),
optimiser states, status and bookkeeping, the step sizes of every lane, and the first
evaluation at time 0."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from gdlr_jax.curvature._lanczos import state_dtype
from gdlr_jax.engine._problem import Problem, State
from gdlr_jax.engine._trajectory_status import TrajectoryStatus, classify_evaluation
from gdlr_jax.problems._pytree import PyTree

RUNNING = TrajectoryStatus.NOT_CONVERGED  # the status of a trajectory still being stepped


class StepSizes(NamedTuple):
    """The step sizes of the lanes.

    Attributes:
        step: the step size of every entry of the state, each ``(m,)`` (the same array for
            every entry with one step size per trajectory; the entry's leaf's with ``etas``
            per leaf).
        check: ``(m,)``, the ``eta`` of the step-size criterion ``eta ||grad L|| <= step_tol``:
            the trajectory's step size, or with one per leaf the largest (a bound on the step
            length).
    """

    step: State
    check: Float[Array, " m"]

    @classmethod
    def of(cls, etas: PyTree, problem: Problem) -> StepSizes:
        """From ``etas (m,)``, or with ``per_leaf_etas`` a pytree like the params of ``(m,)``
        leaves."""
        leaf_of = problem.layout.leaf_of_entry()
        if not problem.config.per_leaf_etas:
            return cls(tuple(etas for _ in leaf_of), etas)
        leaves = jax.tree_util.tree_leaves(etas)
        check = leaves[0]
        for leaf in leaves[1:]:
            check = jnp.maximum(check, leaf)
        return cls(tuple(leaves[i] for i in leaf_of), check)

    def distinct(self) -> tuple[Float[Array, " m"], ...]:
        """The distinct arrays of ``step``, in order (one with one step size per trajectory,
        one per leaf with ``per_leaf_etas``)."""
        return tuple({id(e): e for e in self.step}.values())

    def per_entry(self, distinct: tuple[Float[Array, " m"], ...]) -> State:
        """``distinct`` arrays like those of :meth:`distinct`, one for every entry of ``step``
        (so that XLA reads each of them once in a step, not once per entry)."""
        position = {id(e): i for i, e in enumerate(self.distinct())}
        return tuple(distinct[position[id(e)]] for e in self.step)


class Lanes(NamedTuple):
    """State of the ``m`` trajectories (lanes) of one device during a sweep."""

    state: State  # parameters, each entry (m, ...)
    opt_state: PyTree  # leaves (m, ...)
    status: Int[Array, " m"]
    steps_taken: Int[Array, " m"]
    detected_at: Int[Array, " m"]  # evaluation time at which divergence was seen
    final_loss: Float[Array, " m"]
    final_grad_norm: Float[Array, " m"]
    final_step_norm: Float[Array, " m"]  # its step norm (final_values: evaluated at the end)
    min_loss: Float[Array, " m"]
    recorded_loss: Float[Array, "m n_rec"] | None
    recorded_step_norm: Float[Array, "m n_rec"] | None
    recorded_state: State | None  # each entry (m, n_rec, ...)
    sharpness_vector: Float[Array, "m d"] | None  # the last Ritz vector (warm start)
    recorded_sharpness: Float[Array, "m n_sharp"] | None
    # with stop_at_convergence=False: the evaluation time of the first convergence (-1 if
    # none), and whether a converged lane is still being stepped (until it leaves the bound)
    converged_at: Int[Array, " m"] | None = None
    coasting: Bool[Array, " m"] | None = None
    # full-batch plain GD: the distinct step sizes (StepSizes.distinct), 0 for the lanes not
    # stepping (frozen: theta - 0 * grad L = theta), rewritten only when some lane settles
    step_etas: tuple[Float[Array, " m"], ...] | None = None
    # Problem.keeps_gradient: the full-batch gradient at `state`, for the next step
    grad: State | None = None

    def stepping(self) -> Bool[Array, " m"]:
        """The lanes the step loop advances: running ones, and converged ones that coast."""
        running = self.status == RUNNING
        return running if self.coasting is None else running | self.coasting

    def freeze(self, problem: Problem, etas: StepSizes) -> Lanes:
        """``step_etas`` for the lanes' status (full-batch plain GD; else ``None``)."""
        if problem.config.optimizer is not None or problem.data is not None:
            return self
        stepping = self.stepping()
        return self._replace(
            step_etas=tuple(jnp.where(stepping, e, jnp.zeros_like(e)) for e in etas.distinct())
        )


class LaneResults(NamedTuple):
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
    converged_at: Int[Array, " m"] | None = None
    lyapunov_exponent: Float[Array, " m"] | None = None


def any_lane(mask: Bool[Array, " m"]) -> Bool[Array, ""]:
    """``jnp.any(mask)`` in one pass over the lanes: the largest of ``mask`` as ``uint8``. (XLA
    rewrites a reduction of booleans into a tree of reduce-windows, each a kernel of its own
    on CPU, which cost ~25 us more per reduction over 65536 lanes on the project's CPU.)"""
    return jnp.max(mask.astype(jnp.uint8)) > 0


def select(mask: Bool[Array, " m"], on_true: PyTree, on_false: PyTree) -> PyTree:
    """Per-lane ``where`` over pytrees whose leaves have the lane axis first."""

    def pick(a, b):
        return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree_util.tree_map(pick, on_true, on_false)


def pack(mask: Bool[Array, " m"]) -> tuple[Int[Array, ""], Int[Array, " m"]]:
    """The lanes of ``mask`` packed to the front: ``(count, order)``, ``order[:count]`` their
    indices in increasing order (the rest 0), for work on a few lanes in compact blocks."""
    m = mask.shape[0]
    count = jnp.sum(mask, dtype=jnp.int32)
    slot = jnp.where(mask, jnp.cumsum(mask, dtype=jnp.int32) - 1, m)
    order = jnp.zeros(m, jnp.int32).at[slot].set(jnp.arange(m, dtype=jnp.int32), mode="drop")
    return count, order


def packed_block(
    order: Int[Array, " m"], count: Int[Array, ""], b: Int[Array, ""], block: int
) -> tuple[Int[Array, " block"], Bool[Array, " block"]]:
    """Block ``b`` of ``block`` packed lanes (:func:`pack`): their indices and which slots hold
    one (the last block is shifted back to stay inside ``m``; slots of earlier blocks and past
    ``count`` are not valid)."""
    m = order.shape[0]
    first = jnp.minimum(b * block, m - block)
    index = lax.dynamic_slice(order, (first,), (block,))
    position = first + jnp.arange(block)
    return index, (position >= b * block) & (position < count)


def evaluate_lanes(
    problem: Problem, state: State, etas: StepSizes
) -> tuple[Float[Array, " m"], Float[Array, " m"], Float[Array, " m"], Bool[Array, " m"], State]:
    """:meth:`Problem.evaluate` of every lane: loss, gradient norm, step norm, whether the lane
    is sound (inside the bound, finite loss and gradient), gradient."""
    return jax.vmap(problem.evaluate)(state, etas.step, etas.check)


def start_lanes(problem: Problem, state: State, etas: StepSizes) -> Lanes:
    """Lanes at time 0: optimiser states, first evaluation and status, recordings allocated
    (nothing is recorded yet: :func:`gdlr_jax.engine._evaluation.record` of time 0 writes
    ``final_loss`` and ``final_step_norm``, which are then the values at time 0)."""
    config = problem.config
    m, n_rec = etas.check.shape[0], config.num_records
    opt_state = jax.vmap(problem.init_optimizer)(state, etas.step)
    loss, grad_norm, step_norm, sound, grad = evaluate_lanes(problem, state, etas)
    status, _, _ = classify_evaluation(
        jnp.zeros(m, jnp.int32),
        loss,
        grad_norm,
        sound,
        etas.check,
        config.criteria,
        config.min_loss_value,
    )
    recorded_loss = recorded_step_norm = recorded_state = None
    if n_rec:
        recorded_loss = jnp.zeros((m, n_rec), loss.dtype)
        recorded_step_norm = jnp.zeros((m, n_rec), loss.dtype)
        if config.record_params:
            recorded_state = tuple(
                jnp.zeros((m, n_rec) + x.shape[1:], x.dtype) for x in state
            )
    sharpness_vector = recorded_sharpness = None
    if config.num_sharpness:
        d = sum(problem.layout.sizes)
        start = jax.random.normal(jax.random.key(0), (d,), state_dtype())
        sharpness_vector = jnp.broadcast_to(start, (m, d))
        recorded_sharpness = jnp.zeros((m, config.num_sharpness), loss.dtype)
    converged_at = coasting = None
    if not config.stop_at_convergence:
        converged = (status == TrajectoryStatus.CONVERGED_MINIMUM) | (
            status == TrajectoryStatus.CONVERGED_CRITICAL_POINT
        )
        converged_at = jnp.where(converged, 0, -1).astype(jnp.int32)
        coasting = converged
    lanes = Lanes(
        converged_at=converged_at,
        coasting=coasting,
        state=state,
        opt_state=opt_state,
        status=status,
        steps_taken=jnp.zeros(m, jnp.int32),
        detected_at=jnp.zeros(m, jnp.int32),
        final_loss=loss,
        final_grad_norm=grad_norm,
        final_step_norm=step_norm,
        min_loss=jnp.where(
            jax.vmap(problem.within_bound)(state) & jnp.isfinite(loss), loss, jnp.inf
        ),
        recorded_loss=recorded_loss,
        recorded_step_norm=recorded_step_norm,
        recorded_state=recorded_state,
        sharpness_vector=sharpness_vector,
        recorded_sharpness=recorded_sharpness,
        grad=grad if problem.keeps_gradient else None,
    )
    return lanes.freeze(problem, etas)
