"""The step loop of the engine: the lanes are stepped from one evaluation time to the next,
in unrolled blocks of ``step_block`` steps with a remainder, finished lanes frozen (layer 4:
engine; ``docs/engine.md``, "How it is made fast")."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from gdlr_jax.engine._evaluation import evaluate_and_freeze, next_evaluation
from gdlr_jax.engine._lanes import Lanes, StepSizes
from gdlr_jax.engine._minibatches import Minibatches, epoch_permutation, minibatch
from gdlr_jax.engine._problem import Problem, State
from gdlr_jax.problems._pytree import PyTree


def pack_pairs(columns: State) -> State:
    """The columns ``(m,)`` of the lanes packed in pairs: ``x_0 + i x_1, x_2 + i x_3, ...``
    (complex, exact), an odd last column as it is."""
    pairs = tuple(lax.complex(a, b) for a, b in zip(columns[::2], columns[1::2]))
    return pairs + columns[len(pairs) * 2 :]


def unpack_pairs(packed: State, d: int) -> State:
    """The ``d`` columns of :func:`pack_pairs`."""
    columns = []
    for z in packed[: d // 2]:
        columns += [jnp.real(z), jnp.imag(z)]
    return tuple(columns) + tuple(packed[d // 2 :])


def advance(
    problem: Problem,
    state: State,
    opt_state: PyTree,
    etas: StepSizes,
    running: Bool[Array, " m"],
    keys: PRNGKeyArray | None,
    t0: Int[Array, ""],
    t1: Int[Array, ""],
    history: Float[Array, "w m d"] | None,
) -> tuple[State, PyTree, Float[Array, "w m d"] | None]:
    """Steps the running lanes from time ``t0`` to ``t1``; the others stay where they are.

    Full-batch plain GD freezes a finished lane by giving it the step size 0: ``theta - 0 *
    grad L(theta) = theta`` exactly, because a lane is only frozen at an iterate where its
    gradient was found finite (lanes that start outside the bound are restored at the end), so
    a step carries no masking at all. With minibatches or an optax optimiser, each step keeps
    the previous state of finished lanes (``where``).

    In the columns layout the loop carries the ``d`` columns as the rows of one ``(d, m)``
    array (structure of arrays: each row contiguous), so that XLA fuses a whole step into one
    loop over the lanes that writes every row; with ``config.pack_pairs`` (CPU) and float32 or
    float64 columns of one dtype, packed in pairs as complex numbers instead
    (:func:`pack_pairs`): XLA:CPU writes each row, or each output, in a loop of its own that
    recomputes the step, so ``d = 2`` columns in one complex array are stepped by one loop,
    and ``d = 3, 4`` by two. The ``t1 - t0`` steps run as
    ``(t1 - t0) // k`` blocks of ``k = step_block`` steps written out one after the other
    (fused into one pass over the lanes; for the columns, in pairs of blocks that write
    alternate buffers, so that the loop carries no copy), then the remaining steps one at a
    time. With ``history`` (``(W, m, d)``, the final window) the
    steps run one at a time and the flat ``theta_t`` is stored at index ``t - (steps - W)``
    for each ``t`` in ``[t0, t1)``.
    """
    config = problem.config
    window_start = config.steps - config.window
    plain_gd = config.optimizer is None and problem.data is None
    step_etas = etas.step
    if plain_gd:  # one where per distinct array (entries of a leaf, or all, share one)
        frozen = {id(e): jnp.where(running, e, 0) for e in step_etas}
        step_etas = tuple(frozen[id(e)] for e in step_etas)

    def lane_step(state, opt_state, eta, run, batch):
        new_state, new_opt_state = problem.step(state, opt_state, eta, batch)
        if plain_gd:
            return new_state, new_opt_state
        keep = functools.partial(jnp.where, run)
        return tuple(map(keep, new_state, state)), jax.tree_util.tree_map(
            keep, new_opt_state, opt_state
        )

    batch_axis = None if problem.data is None or config.same_batches else 0
    columns = problem.layout.columns
    lanes_step = jax.vmap(lane_step, in_axes=(0, 0, 0, 0, batch_axis))
    if columns:  # the loop carries the columns as one (d, m) array, or packed in pairs
        d = len(state)
        dtypes = {x.dtype for x in state}
        pairs = config.pack_pairs and dtypes <= {jnp.dtype(jnp.float32)} | {jnp.dtype(jnp.float64)}
        pairs = pairs and len(dtypes) == 1 and d > 1
        pack = pack_pairs if pairs else jnp.stack
        unpack = functools.partial(unpack_pairs, d=d) if pairs else tuple

        def step(packed, opt_state, eta, run, batch):
            new_state, opt_state = lanes_step(unpack(packed), opt_state, eta, run, batch)
            return pack(new_state), opt_state

    else:
        step = lanes_step
    if problem.data is not None:
        source = Minibatches(problem.data, config.batch_size)
        shuffle = functools.partial(epoch_permutation, source)
        draw = functools.partial(minibatch, source)
        if not config.same_batches:
            shuffle = jax.vmap(shuffle, in_axes=(0, None))
            draw = jax.vmap(draw, in_axes=(0, None))

    def one_step(t, carry):
        state, opt_state, permutation, history = carry
        if history is not None:
            theta = (
                jnp.stack(unpack(state), axis=1)
                if columns
                else jax.vmap(problem.layout.flat)(state)
            )
            history = lax.dynamic_update_index_in_dim(history, theta, t - window_start, 0)
        batch = None
        if problem.data is not None:
            permutation = lax.cond(
                t % source.steps_per_epoch == 0,
                lambda: shuffle(keys, t),
                lambda: permutation,
            )
            batch = draw(permutation, t)
        state, opt_state = step(state, opt_state, step_etas, running, batch)
        return state, opt_state, permutation, history

    block = 1 if history is not None else config.step_block

    def one_block(b, carry):
        for i in range(block):
            carry = one_step(t0 + b * block + i, carry)
        return carry

    permutation = None if problem.data is None else shuffle(keys, t0)
    carry = (pack(state) if columns else state, opt_state, permutation, history)
    if columns and history is None:
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
    return (unpack(state) if columns else state), opt_state, history


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
    iterates into it."""

    def unfinished(carry):
        t, lanes, _ = carry
        return (t < stop) & jnp.any(lanes.stepping())

    def between_evaluations(carry):
        t0, lanes, history = carry
        t1 = next_evaluation(problem.config, t0)
        running = lanes.stepping()
        state, opt_state, history = advance(
            problem, lanes.state, lanes.opt_state, etas, running, keys, t0, t1, history
        )
        lanes = evaluate_and_freeze(problem, lanes, state, opt_state, etas, t0, t1)
        return t1, lanes, history

    return lax.while_loop(unfinished, between_evaluations, (t, lanes, history))
