"""The step loop of the engine: the lanes are stepped from one evaluation time to the next,
in unrolled blocks of ``step_block`` steps with a remainder, finished lanes frozen, and
through the final window (layer 4: engine; ``docs/engine.md``, "How it is made fast")."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from gdlr_jax.engine._evaluation import (
    classify_final_window,
    evaluate_and_freeze,
    next_evaluation,
)
from gdlr_jax.engine._lanes import Lanes, StepSizes, any_lane
from gdlr_jax.engine._minibatches import Minibatches, epoch_permutation, minibatch
from gdlr_jax.engine._problem import Problem, State
from gdlr_jax.problems._pytree import PyTree


# the longest final window of the columns that is written out step by step (final_window):
# longer ones are stepped in a loop, so that the program does not grow with the window
WINDOW_WRITTEN_OUT = 64


class _Stepper(NamedTuple):
    """One step of every lane at time ``t``: ``step(t, (state, opt_state, permutation),
    grad=None)`` (``grad``: the lanes' gradient if known), on the state as the loop carries it
    (``into_loop`` of the packed state, :meth:`Problem.pack`; ``out_of_loop`` back), and
    ``first_permutation(t0)`` of the minibatches (``None`` without)."""

    step: Callable[[Int[Array, ""], tuple], tuple]
    into_loop: Callable[[State], State | Array]
    out_of_loop: Callable[[State | Array], State]
    first_permutation: Callable[[Int[Array, ""]], Int[Array, " n"] | None]


def _stepper(
    problem: Problem, lanes: Lanes, etas: StepSizes, keys: PRNGKeyArray | None
) -> _Stepper:
    """The step of the lanes that are stepping (the others frozen) from their packed state."""
    config = problem.config
    plain_gd = lanes.step_etas is not None
    running = lanes.stepping()
    step_etas = etas.per_entry(lanes.step_etas) if plain_gd else etas.step

    def lane_step(state, opt_state, eta, run, batch, grad):
        new_state, new_opt_state = problem.step(state, opt_state, eta, batch, grad)
        if plain_gd:
            return new_state, new_opt_state
        keep = functools.partial(jnp.where, run)
        return tuple(map(keep, new_state, state)), jax.tree_util.tree_map(
            keep, new_opt_state, opt_state
        )

    batch_axis = None if problem.data is None or config.same_batches else 0
    lanes_step = jax.vmap(lane_step, in_axes=(0, 0, 0, 0, batch_axis, 0))
    # columns not packed in pairs are carried as the rows of one (d, m) array
    rows = problem.layout.columns and not any(jnp.iscomplexobj(x) for x in lanes.state)
    into_loop, out_of_loop = (jnp.stack, tuple) if rows else (tuple, tuple)
    shuffle = draw = None
    if problem.data is not None:
        source = Minibatches(problem.data, config.batch_size)
        shuffle = functools.partial(epoch_permutation, source)
        draw = functools.partial(minibatch, source)
        if not config.same_batches:
            shuffle = jax.vmap(shuffle, in_axes=(0, None))
            draw = jax.vmap(draw, in_axes=(0, None))

    def step(t, carry, grad=None):
        carried, opt_state, permutation = carry
        batch = None
        if problem.data is not None:
            permutation = lax.cond(
                t % source.steps_per_epoch == 0,
                lambda: shuffle(keys, t),
                lambda: permutation,
            )
            batch = draw(permutation, t)
        state = problem.unpack(out_of_loop(carried))
        new_state, opt_state = lanes_step(state, opt_state, step_etas, running, batch, grad)
        return into_loop(problem.pack(new_state)), opt_state, permutation

    def first_permutation(t0):
        return None if shuffle is None else shuffle(keys, t0)

    return _Stepper(step, into_loop, out_of_loop, first_permutation)


def advance(
    problem: Problem,
    lanes: Lanes,
    etas: StepSizes,
    keys: PRNGKeyArray | None,
    t0: Int[Array, ""],
    t1: Int[Array, ""],
    history: Float[Array, "w m d"] | None,
) -> tuple[State, PyTree, Float[Array, "w m d"] | None]:
    """Steps the lanes that are stepping (their state packed: :meth:`Problem.pack`) from time
    ``t0`` to ``t1``; the others stay where they are. Returns the state, the optimiser state
    and the history.

    Full-batch plain GD freezes a finished lane by giving it the step size 0
    (``lanes.step_etas``): ``theta - 0 * grad L(theta) = theta`` exactly, because a lane is
    only frozen at an iterate where its gradient was found finite (lanes that start outside
    the bound are restored at the end), so a step carries no masking at all. With minibatches
    or an optax optimiser, each step keeps the previous state of finished lanes (``where``).

    In the columns layout the loop carries the ``d`` columns packed in pairs as complex
    numbers (``config.pack_pairs``, CPU, float32 or float64 columns of one dtype): XLA:CPU
    writes each output array of a fused step in a loop of its own that recomputes the step,
    so ``d = 2`` columns in one complex array are stepped by one loop, and ``d = 3, 4`` by
    two; otherwise as the rows of one ``(d, m)`` array (structure of arrays: each row
    contiguous). The ``t1 - t0`` steps run as ``(t1 - t0) // k`` blocks of ``k =
    step_block`` steps written out one after the other (fused into one pass over the lanes;
    for the columns, in pairs of blocks that write alternate buffers, so that the loop
    carries no copy), then the remaining steps one at a time. Where the lanes keep the
    gradient of their evaluation (``lanes.grad``: :attr:`Problem.keeps_gradient`), the first
    step takes it. With ``history`` (``(W, m, d)``, the final window of the leaves layout)
    the steps run one at a time and the flat ``theta_t`` is stored at index ``t - (steps -
    W)`` for each ``t`` in ``[t0, t1)``.
    """
    config = problem.config
    window_start = config.steps - config.window
    stepper = _stepper(problem, lanes, etas, keys)

    def one_step(t, carry, grad=None):
        carried, opt_state, permutation, history = carry
        if history is not None:
            state = problem.unpack(stepper.out_of_loop(carried))
            theta = jax.vmap(problem.layout.flat)(state)
            history = lax.dynamic_update_index_in_dim(history, theta, t - window_start, 0)
        return (*stepper.step(t, (carried, opt_state, permutation), grad), history)

    first = stepper.first_permutation(t0)
    carry = (stepper.into_loop(lanes.state), lanes.opt_state, first, history)
    if lanes.grad is not None:  # the first step takes the gradient of the evaluation at t0
        carry = one_step(t0, carry, lanes.grad)
        t0 = t0 + 1
    block = 1 if history is not None else config.step_block
    start = t0

    def one_block(b, carry):
        for i in range(block):
            carry = one_step(start + b * block + i, carry)
        return carry

    if problem.layout.columns and history is None:
        # A step of the columns reads every row, so it cannot overwrite the rows it reads and
        # XLA would copy the carried array once per block. Two buffers instead: each block
        # writes the other one (the barrier keeps the two blocks apart), and no copy is left.
        def two_blocks(p, buffers):
            spare = lax.optimization_barrier(one_block(2 * p, buffers[0]))
            return one_block(2 * p + 1, spare), spare

        pairs = (t1 - t0) // (2 * block)
        with jax.named_scope("step_pairs"):  # names the loop in the HLO (and in profiles)
            carry, _ = lax.fori_loop(0, pairs, two_blocks, (carry, carry))
        t0 = t0 + pairs * 2 * block
    elif block > 1:
        num_blocks = (t1 - t0) // block
        carry = lax.fori_loop(0, num_blocks, one_block, carry)
        t0 = t0 + num_blocks * block
    state, opt_state, _, history = lax.fori_loop(t0, t1, one_step, carry)
    return stepper.out_of_loop(state), opt_state, history


def run_phase(
    problem: Problem,
    lanes: Lanes,
    t: Int[Array, ""],
    stop: int,
    history: Float[Array, "w m d"] | None,
    etas: StepSizes,
    keys: PRNGKeyArray | None,
) -> tuple[Int[Array, ""], Lanes, Float[Array, "w m d"] | None]:
    """Advances the lanes from ``t`` from evaluation to evaluation until ``stop``, or until
    none of them is running (early exit). With ``history`` (the final window), records the
    iterates into it. The lanes' state is carried packed (:meth:`Problem.pack`) through the
    steps and the evaluations."""

    def unfinished(carry):
        t, _, _, stepping = carry
        return (t < stop) & stepping

    def between_evaluations(carry):
        t0, lanes, history, _ = carry
        t1 = next_evaluation(problem.config, t0)
        state, opt_state, history = advance(problem, lanes, etas, keys, t0, t1, history)
        lanes, stepping = evaluate_and_freeze(problem, lanes, state, opt_state, etas, t0, t1)
        return t1, lanes, history, stepping

    lanes = lanes._replace(state=problem.pack(lanes.state))
    t, lanes, history, _ = lax.while_loop(
        unfinished, between_evaluations, (t, lanes, history, any_lane(lanes.stepping()))
    )
    return t, lanes._replace(state=problem.unpack(lanes.state)), history


def final_window(
    problem: Problem,
    lanes: Lanes,
    t: Int[Array, ""],
    etas: StepSizes,
    keys: PRNGKeyArray | None,
    snapshot_at: int | None,
) -> tuple[Lanes, Int[Array, " m"], Float[Array, " m"], State | None]:
    """Steps the lanes through the final window, from ``t = steps - W`` (where the main phase
    stopped, unless no lane was left running) to ``steps``, and classifies them
    (:func:`~gdlr_jax.engine._evaluation.classify_final_window`).

    The columns take its ``W`` steps written out one after the other, at evaluation times
    known in advance (``next_evaluation`` of Python ints): each iterate is an array of its
    own, packed, with no history buffer to fill or write into. Otherwise (the leaves, a
    window of more than ``WINDOW_WRITTEN_OUT`` steps, or sharpness measurements, which would
    be compiled once per evaluation time) the window is a phase of :func:`run_phase` that
    writes each iterate into a ``(W, m, d)`` history.

    Returns:
        ``(lanes, period, mean_step, snapshot)``: ``period`` and ``mean_step`` ``(m,)`` (0 for
        lanes not running), and the state at ``snapshot_at`` (an evaluation time inside the
        window: the start of the Lyapunov steps), or ``None``.
    """
    config = problem.config
    window, start = config.window, config.steps - config.window
    m = etas.check.shape[0]
    written_out = (
        problem.layout.columns and window <= WINDOW_WRITTEN_OUT and config.sharpness_every is None
    )
    if not written_out:
        d = sum(problem.layout.sizes)
        history = jnp.zeros((window, m, d), lanes.state[0].dtype)
        snapshot = None
        if snapshot_at is not None:
            t, lanes, history = run_phase(problem, lanes, t, snapshot_at, history, etas, keys)
            snapshot = lanes.state
        _, lanes, history = run_phase(problem, lanes, t, config.steps, history, etas, keys)
        if problem.layout.columns:  # each row as its entries, like the final state
            rows = [tuple(row[:, i] for i in range(row.shape[1])) for row in history]
        else:
            rows = [(row,) for row in history]
        lanes, period, mean_step = classify_final_window(problem, lanes, rows)
        return lanes, period, mean_step, snapshot

    def unrolled(lanes):
        lanes = lanes._replace(state=problem.pack(lanes.state))
        rows, snapshot, t0 = [], None, start
        while t0 < config.steps:
            t1 = next_evaluation(config, t0)
            stepper = _stepper(problem, lanes, etas, keys)
            carry = (stepper.into_loop(lanes.state), lanes.opt_state, None)
            for t in range(t0, t1):
                rows.append(problem.unpack(stepper.out_of_loop(carry[0])))
                carry = stepper.step(jnp.int32(t), carry)
            state = stepper.out_of_loop(carry[0])
            lanes, _ = evaluate_and_freeze(
                problem, lanes, state, carry[1], etas, jnp.int32(t0), jnp.int32(t1)
            )
            if t1 == snapshot_at:
                snapshot = problem.unpack(lanes.state)
            t0 = t1
        lanes = lanes._replace(state=problem.unpack(lanes.state))
        return *classify_final_window(problem, lanes, rows), snapshot

    def skipped(lanes):  # no lane is running: nothing to step or classify
        none = jnp.zeros(m, jnp.int32)
        return lanes, none, none.astype(lanes.min_loss.dtype), (
            None if snapshot_at is None else lanes.state
        )

    stepping = (t == start) & any_lane(lanes.stepping())
    return lax.cond(stepping, unrolled, skipped, lanes)
