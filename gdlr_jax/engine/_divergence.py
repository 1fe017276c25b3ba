"""Divergence pinpointed to the exact step: the replay of the lanes rolled back when an
evaluation found them diverged (layer 4: engine; ``docs/engine.md``, "Divergence")."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import PRNGKeyArray

from gdlr_jax.engine._lanes import Lanes, StepSizes, any_lane, pack, packed_block
from gdlr_jax.engine._minibatches import Minibatches, epoch_permutation, minibatch
from gdlr_jax.engine._problem import Problem
from gdlr_jax.engine._trajectory_status import TrajectoryStatus

REPLAY_BLOCK = 4096  # diverged trajectories replayed together (see pinpoint_divergence)


def pinpoint_divergence(
    problem: Problem, lanes: Lanes, etas: StepSizes, keys: PRNGKeyArray | None
) -> Lanes:
    """Replays each diverged lane from its rollback point to its exact last in-bound iterate.

    A lane found diverged at evaluation time ``t1`` was rolled back to its iterate at the
    previous evaluation ``t0``; it is stepped again from ``t0``, one checked step at a time, and
    stopped before the first step that leaves the bound (or at ``t1``). The replayed step is
    the step of the main loop (:meth:`Problem.step`, the same operations), so the replay
    retraces the same iterates bit for bit. Only the diverged lanes are replayed: they are
    packed into blocks of up to ``REPLAY_BLOCK`` lanes, so the cost is proportional to their
    number; a block's padding slots write nowhere. Like the main loop, each iteration of the
    replay's loop takes ``step_block`` checked steps (a lane that has stopped keeps its
    iterate): one test of the loop's condition, and one round of its few small kernels and
    buffer copies (the carry is the packed state and one clock per lane: one loop and one
    copy each), for all of them; the same unrolling, so that XLA fuses the steps alike.
    """
    config = problem.config
    m = etas.check.shape[0]
    block = min(REPLAY_BLOCK, m)
    pending = (lanes.status == TrajectoryStatus.DIVERGED) & (
        lanes.detected_at > lanes.steps_taken
    )

    def replay(state, opt_state, eta, check_eta, start, stop, key):
        # the time and whether the lane goes on in one number (the loop then writes two
        # arrays, the packed state and this one, instead of one per column and two more):
        # t while the lane goes on, -1 - t once it has stopped before leaving the bound
        def running(carry):
            _, _, clock = carry
            return (clock >= 0) & (clock < stop)

        def checked_step(carry):  # a no-op once the lane has stopped
            packed, opt_state, clock = carry
            state = problem.unpack(packed)
            batch = None
            if problem.data is not None:
                source = Minibatches(problem.data, config.batch_size)
                batch = minibatch(source, epoch_permutation(source, key, clock), clock)
            new_state, new_opt_state = problem.step(state, opt_state, eta, batch)
            going = running(carry)
            inside = problem.within_bound(new_state)
            keep = functools.partial(jnp.where, going & inside)
            return (
                problem.pack(tuple(map(keep, new_state, state))),
                jax.tree_util.tree_map(keep, new_opt_state, opt_state),
                jnp.where(going, jnp.where(inside, clock + 1, -1 - clock), clock),
            )

        def steps(carry):  # step_block checked steps: one loop condition for all of them
            for _ in range(config.step_block):
                carry = checked_step(carry)
            return carry

        packed, opt_state, clock = lax.while_loop(
            running, steps, (problem.pack(state), opt_state, start)
        )
        state = problem.unpack(packed)
        t = jnp.where(clock < 0, -1 - clock, clock)
        loss, grad_norm, step_norm, _, _ = problem.evaluate(state, eta, check_eta)
        return state, opt_state, t, loss, grad_norm, step_norm

    key_axis = None if keys is None or config.same_batches else 0
    replay_block = jax.vmap(replay, in_axes=(0, 0, 0, 0, 0, 0, key_axis))

    def replay_block_of(order, count, b, lanes):
        index, valid = packed_block(order, count, b, block)
        take = functools.partial(jnp.take, indices=index, axis=0)
        state, opt_state, t, loss, grad_norm, step_norm = replay_block(
            tuple(map(take, lanes.state)),
            jax.tree_util.tree_map(take, lanes.opt_state),
            tuple(map(take, etas.step)),
            take(etas.check),
            take(lanes.steps_taken),
            take(lanes.detected_at),
            keys if key_axis is None else take(keys),
        )

        target = jnp.where(valid, index, m)  # slots of other blocks, and padding, write nowhere

        def put(old, new):
            return old.at[target].set(new, mode="drop")

        old_min = take(lanes.min_loss)
        lanes = lanes._replace(
            state=tuple(map(put, lanes.state, state)),
            opt_state=jax.tree_util.tree_map(put, lanes.opt_state, opt_state),
            steps_taken=put(lanes.steps_taken, t),
            final_loss=put(lanes.final_loss, loss),
            final_grad_norm=put(lanes.final_grad_norm, grad_norm),
            final_step_norm=put(lanes.final_step_norm, step_norm),
            min_loss=put(
                lanes.min_loss,
                jnp.where(jnp.isfinite(loss), jnp.minimum(old_min, loss), old_min),
            ),
        )
        return lanes

    def replay_all(lanes):
        count, order = pack(pending)

        def body(carry):
            b, lanes = carry
            return b + 1, replay_block_of(order, count, b, lanes)

        _, lanes = lax.while_loop(
            lambda carry: carry[0] * block < count, body, (jnp.int32(0), lanes)
        )
        return lanes

    # no lane pending (the common case): not even their packing (a cumulative sum) is paid
    return lax.cond(any_lane(pending), replay_all, lambda lanes: lanes, lanes)
