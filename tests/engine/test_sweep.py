"""Tests of the trajectory engine (gdlr_jax.sweep and its pieces)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gdlr_jax
from gdlr_jax import ConvergenceCriteria, TrajectoryStatus
from gdlr_jax.engine._lanes import any_lane
from gdlr_jax.engine._minibatches import epoch_permutation, minibatch
from gdlr_jax.engine._sharding import run_sharded
from gdlr_jax.engine._trajectory_status import orbit_summary

S = TrajectoryStatus


def two_neuron(theta):
    """``1/2 (1 - x y)^2`` for ``theta = (x, y)``."""
    return 0.5 * (1.0 - theta[0] * theta[1]) ** 2


# A grid with every status: converging, the saddle, a period-2 orbit (eta = 1.05), chaos
# (eta = 1.5) and divergence (a far start, and (0.5, 1.5) at eta = 1.5).
INITS = np.array([[0.5, 1.5], [0.0, 0.0], [1.2, 1.1], [1e3, 1e3], [-0.7, 0.4]])
ETAS = np.array([0.4, 1.05, 1.5])


def gd_iterate(loss_fn, theta, eta, steps, dtype):
    """``steps`` plain GD steps, one jitted step at a time (the reference loop)."""
    step = jax.jit(lambda th, e: th - e * jax.grad(loss_fn)(th))
    theta = jnp.asarray(theta, dtype)
    for _ in range(int(steps)):
        theta = step(theta, jnp.asarray(eta, dtype))
    return theta


@functools.lru_cache(maxsize=None)
def grid_result(dtype_name):
    dtype = jnp.dtype(dtype_name)
    return gdlr_jax.sweep(
        two_neuron, INITS, ETAS, steps=300, min_loss_value=0.0, dtype=dtype
    )


# ----------------------------------------------------------------------------------------
# Known answers on 1/2 (1 - x y)^2
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype_name", ["float32", pytest.param("float64", marks=pytest.mark.slow)])
def test_known_answers_two_neuron(dtype_name):
    r = grid_result(dtype_name)
    assert r.status.shape == (3, 5) and r.status.dtype == np.int32
    assert r.final_params.dtype == np.dtype(dtype_name)
    # eta = 0.4 from (0.5, 1.5): a minimum
    assert r.status[0, 0] == S.CONVERGED_MINIMUM
    x, y = r.final_params[0, 0]
    assert abs(1 - x * y) < 1e-3 and r.final_loss[0, 0] <= 1e-6
    # from (0, 0): the saddle, at every step size, found at step 0 and not moved
    assert np.all(r.status[:, 1] == S.CONVERGED_CRITICAL_POINT)
    assert np.all(r.steps_taken[:, 1] == 0) and np.all(r.final_params[:, 1] == 0)
    np.testing.assert_allclose(r.final_loss[:, 1], 0.5)
    # eta = 1.5 from (1.2, 1.1): does not converge (bounded, chaotic)
    assert r.status[2, 2] == S.NOT_CONVERGED and r.period[2, 2] == 0
    assert r.steps_taken[2, 2] == 300 and np.isfinite(r.asymptotic_step_norm[2, 2])
    # eta = 1.05 from (1.2, 1.1): the period-2 orbit across the valley
    assert r.status[1, 2] == S.PERIODIC and r.period[1, 2] == 2
    final = r.final_params[1, 2]
    two_steps = gd_iterate(two_neuron, final, 1.05, 2, jnp.dtype(dtype_name))
    np.testing.assert_allclose(two_steps, final, rtol=1e-4)
    assert not np.allclose(gd_iterate(two_neuron, final, 1.05, 1, jnp.dtype(dtype_name)), final)
    # (1e3, 1e3) diverges at once, at every step size; stopped at its start, no NaN anywhere
    assert np.all(r.status[:, 3] == S.DIVERGED) and np.all(r.steps_taken[:, 3] == 0)
    assert np.all(r.final_params[:, 3] == 1e3)
    assert np.all(np.isinf(r.asymptotic_step_norm[:, 3]))
    assert np.all(np.isfinite(r.final_params))
    finished = r.status != S.DIVERGED
    assert np.all(np.isfinite(r.final_loss[finished]))
    assert np.all(np.isfinite(r.min_loss))
    np.testing.assert_allclose(r.converged_fraction(), [0.6, 0.0, 0.0])
    np.testing.assert_allclose(r.fraction(S.CONVERGED_CRITICAL_POINT), [0.2, 0.2, 0.2])


def test_known_answers_pytree_params():
    """The same problem as the linear network [W1 (1, 1), W2 (1, 1)] of gdlr_jax.linear."""
    net = gdlr_jax.linear.two_neuron(jnp.float32)
    params0 = [INITS[:, :1, None], INITS[:, 1:, None]]  # leaves (n_init, 1, 1)
    r = gdlr_jax.sweep(
        net.loss, params0, ETAS, steps=300, min_loss_value=0.0, dtype=jnp.float32
    )
    flat = grid_result("float32")
    np.testing.assert_array_equal(r.status, flat.status)
    np.testing.assert_array_equal(r.steps_taken, flat.steps_taken)
    assert r.final_params[0].shape == (3, 5, 1, 1)
    assert np.all(r.final_params[0][:, 3] == 1e3)


def test_divergence_is_stopped_at_the_exact_step():
    """A diverged trajectory ends at its last iterate inside the bound, ``steps_taken`` steps
    after its start; the next step leaves the bound."""
    r = grid_result("float64")
    i, j = 2, 0  # eta = 1.5 from (0.5, 1.5)
    assert r.status[i, j] == S.DIVERGED and r.steps_taken[i, j] > 0
    last = gd_iterate(two_neuron, INITS[j], ETAS[i], r.steps_taken[i, j], jnp.float64)
    np.testing.assert_allclose(r.final_params[i, j], last, rtol=1e-12)
    bound = ConvergenceCriteria().divergence_bound
    assert np.max(np.abs(last)) <= bound
    after = gd_iterate(two_neuron, last, ETAS[i], 1, jnp.float64)
    assert not np.max(np.abs(after)) <= bound


def test_a_finite_loss_with_an_infinite_gradient_is_diverged():
    """A trajectory is sound when it is inside the bound with a finite loss and a finite
    gradient, which the engine asks of the gradient's sum of squares (no square root):
    ``sqrt(|x|)`` at 0 (and at 1e-30, whose gradient overflows float32) has a finite loss and
    an infinite gradient, so it diverges at time 0; its ``min_loss`` is the loss it had."""
    th = np.array([[0.0, 1.0], [0.5, 1.0], [1e-30, 1.0]], np.float32)
    r = gdlr_jax.sweep(lambda t: jnp.sqrt(jnp.abs(t[0])) + 0.0 * t[1], th, [0.1], steps=50)
    np.testing.assert_array_equal(r.status[0], [S.DIVERGED, S.NOT_CONVERGED, S.DIVERGED])
    np.testing.assert_array_equal(r.steps_taken[0], [0, 50, 0])
    assert r.min_loss[0, 0] == 0.0 and np.isclose(r.min_loss[0, 2], 1e-15)
    assert np.isinf(r.final_grad_norm[0, 0])


@pytest.mark.parametrize("m", [1, 2, 65536])
def test_any_lane_is_any(m):
    """``any_lane`` (a largest ``uint8``, one pass on XLA:CPU) is ``jnp.any``: no lane, one
    lane anywhere, several."""
    rng = np.random.default_rng(m)
    masks = [np.zeros(m, bool), np.ones(m, bool), rng.random(m) < 0.5]
    for i in {0, m // 2, m - 1}:
        one = np.zeros(m, bool)
        one[i] = True
        masks.append(one)
    for mask in masks:
        assert bool(jax.jit(any_lane)(jnp.asarray(mask))) == bool(mask.any())


@pytest.mark.parametrize("step_block", [None, 3])
@pytest.mark.parametrize(
    "chunk_size", [1, *(pytest.param(n, marks=pytest.mark.slow) for n in (2, 3, 5, 8))]
)
def test_every_diverged_trajectory_of_a_chunk_is_pinpointed(chunk_size, step_block):
    """Regression: with fewer diverged lanes than lanes in a chunk, the replay of lane 0 was
    overwritten by the padding of its block (a duplicate scatter index), leaving it at its
    rollback point. Every chunking must stop each trajectory at its exact step, also where the
    replay's unrolled block of ``step_block`` checked steps ends past it."""
    inits = np.array([[3.0, 2.5], [2.0, 2.1], [0.5, 1.5], [4.0, 1.0], [1.2, 1.1], [5.0, 4.0]])
    etas = np.array([1.5, 0.9])
    r = gdlr_jax.sweep(
        two_neuron, inits, etas, steps=64, min_loss_value=0.0, dtype=jnp.float64,
        chunk_size=chunk_size, check_every=16, step_block=step_block,
    )
    bound = ConvergenceCriteria().divergence_bound
    diverged = np.argwhere(r.status == S.DIVERGED)
    assert len(diverged) >= 4 and (r.status[0, 0] == S.DIVERGED)  # lane 0 of the first chunk
    for i, j in diverged:
        last = gd_iterate(two_neuron, inits[j], etas[i], r.steps_taken[i, j], jnp.float64)
        np.testing.assert_allclose(r.final_params[i, j], last, rtol=1e-12)
        assert np.max(np.abs(last)) <= bound
        assert not np.max(np.abs(gd_iterate(two_neuron, last, etas[i], 1, jnp.float64))) <= bound


# ----------------------------------------------------------------------------------------
# The batched engine equals a loop over single trajectories
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype_name", ["float32", pytest.param("float64", marks=pytest.mark.slow)])
def test_grid_equals_loop_over_single_trajectories(dtype_name):
    dtype = jnp.dtype(dtype_name)
    r = grid_result(dtype_name)
    for i, eta in enumerate(ETAS):
        for j, init in enumerate(INITS):
            one = gdlr_jax.sweep(
                two_neuron, init[None], [eta], steps=300, min_loss_value=0.0, dtype=dtype
            )
            for name in ("status", "steps_taken", "period"):
                assert getattr(one, name)[0, 0] == getattr(r, name)[i, j], (name, i, j)
            for name in ("final_loss", "final_grad_norm", "asymptotic_step_norm", "min_loss"):
                np.testing.assert_array_equal(getattr(one, name)[0, 0], getattr(r, name)[i, j])
            np.testing.assert_array_equal(one.final_params[0, 0], r.final_params[i, j])


@pytest.mark.parametrize("dtype_name", ["float32", pytest.param("float64", marks=pytest.mark.slow)])
def test_final_state_equals_python_loop_over_jitted_step(dtype_name):
    """Where the dynamics is not chaotic, the final iterate is GD applied ``steps_taken``
    times by a plain Python loop, and the reported loss and gradient norm are its own."""
    dtype = jnp.dtype(dtype_name)
    r = grid_result(dtype_name)
    rtol = 1e-5 if dtype == jnp.float32 else 1e-12
    eps = float(jnp.finfo(dtype).eps)  # at a minimum, loss and gradient are rounding noise
    for i, j in [(0, 0), (0, 4), (1, 0), (1, 2), (2, 0), (1, 1)]:
        theta = gd_iterate(two_neuron, INITS[j], ETAS[i], r.steps_taken[i, j], dtype)
        np.testing.assert_allclose(r.final_params[i, j], theta, rtol=rtol, atol=1e-30)
        loss, grad = jax.value_and_grad(two_neuron)(theta)
        residual = np.sqrt(2 * float(loss))  # L = r^2 / 2 and r carries a rounding error eps
        np.testing.assert_allclose(
            r.final_loss[i, j], loss, rtol=10 * rtol, atol=10 * eps * (residual + eps)
        )
        np.testing.assert_allclose(
            r.final_grad_norm[i, j], jnp.linalg.norm(grad), rtol=10 * rtol, atol=10 * eps
        )


def test_results_do_not_depend_on_chunking():
    whole = grid_result("float32")
    seen = []
    chunked = gdlr_jax.sweep(
        two_neuron,
        INITS,
        ETAS,
        steps=300,
        min_loss_value=0.0,
        dtype=jnp.float32,
        chunk_size=4,
        on_chunk=lambda index, chunk: seen.append((index, chunk.start, chunk.stop)),
    )
    assert seen == [(0, 0, 4), (1, 4, 8), (2, 8, 12), (3, 12, 15)]
    for name in whole._fields:
        jax.tree_util.tree_map(
            np.testing.assert_array_equal, getattr(chunked, name), getattr(whole, name)
        )


def test_chunks_are_pipelined_where_two_fit_in_the_memory_budget():
    """The next chunk is started before this one is fetched (pipelined) only where two chunks
    fit in the budget; either way the chunks come in order with the same values."""
    plan = functools.partial(gdlr_jax.plan_sweep, two_neuron, INITS, ETAS, steps=50,
                             min_loss_value=0.0, dtype=jnp.float32, chunk_size=4)  # fmt: skip
    pipelined = plan()
    per_chunk = pipelined.chunk_bytes
    serial = plan(memory_budget_bytes=per_chunk + per_chunk // 2)
    assert pipelined.pipelined and not serial.pipelined
    chunks = [list(p.run_chunks(range(p.num_chunks))) for p in (pipelined, serial)]
    for a, b in zip(*chunks):
        assert (a.start, a.stop) == (b.start, b.stop)
        np.testing.assert_array_equal(a.status, b.status)
        np.testing.assert_array_equal(a.final_params, b.final_params)


@pytest.mark.slow
def test_plan_runs_chunks_separately_and_checks_coverage():
    plan = gdlr_jax.plan_sweep(
        two_neuron, INITS, ETAS, steps=300, min_loss_value=0.0, chunk_size=6
    )
    assert (plan.grid_shape, plan.num_chunks, plan.chunk_bounds(2)) == ((3, 5), 3, (12, 15))
    chunks = [plan.run_chunk(i) for i in (2, 0, 1)]  # any order, e.g. after a restart
    result = plan.assemble(chunks)
    np.testing.assert_array_equal(result.status, grid_result("float32").status)
    with pytest.raises(ValueError, match="trajectory 6"):
        plan.assemble(chunks[:2])
    with pytest.raises(ValueError, match="seen twice"):
        plan.assemble(chunks + chunks[:1])
    with pytest.raises(ValueError, match=r"index must be in \[0, 3\)"):
        plan.chunk_bounds(3)


# ----------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------
def test_new_etas_of_the_same_shape_do_not_recompile():
    kwargs = dict(steps=50, min_loss_value=0.0, dtype=jnp.float32)
    gdlr_jax.sweep(two_neuron, INITS, np.array([0.1, 0.2]), **kwargs)
    compiled = run_sharded._cache_size()
    again = gdlr_jax.sweep(two_neuron, INITS, np.array([0.7, 1.3]), **kwargs)
    assert run_sharded._cache_size() == compiled
    np.testing.assert_array_equal(again.etas, np.float32([0.7, 1.3]))


# ----------------------------------------------------------------------------------------
# Status pieces
# ----------------------------------------------------------------------------------------
def test_orbit_summary_finds_the_smallest_period_and_mean_step():
    cycle = np.array([[0.0, 1.0], [2.0, 1.0], [2.0, 3.0]])  # period 3
    iterates = jnp.asarray(np.concatenate([cycle] * 6)[:17])  # W = 16 steps

    def summary(iterates, max_period):
        return orbit_summary(list(iterates), max_period, 1e-9)

    period, mean_step = summary(iterates, 8)
    assert period == 3
    lengths = [2.0, 2.0, np.sqrt(8.0)] * 6
    np.testing.assert_allclose(mean_step, np.mean(lengths[:16]), rtol=1e-12)
    assert summary(jnp.ones((17, 2)), 8)[0] == 0  # stalled: p = 1 is not a period
    assert summary(jnp.arange(34.0).reshape(17, 2), 8)[0] == 0  # drifting
    assert summary(iterates, 2)[0] == 0  # period 3 > max_period
    # only the last p + 1 iterates are compared at lag p
    assert summary(iterates.at[2].add(1e-3), 8)[0] == 3
    assert summary(iterates.at[14].add(1e-3), 8)[0] == 0
    # rows given as their entries (the engine's columns) give the same numbers, bit for bit
    rng = np.random.default_rng(0)
    rows = jnp.asarray(rng.normal(size=(17, 3)))
    for p in (2, 8):
        flat = orbit_summary(list(rows), p, 1e-2)
        entries = orbit_summary([tuple(row) for row in rows], p, 1e-2)
        assert [float(x) for x in flat] == [float(x) for x in entries]


def test_without_min_loss_value_every_critical_point_counts_as_minimum():
    r = gdlr_jax.sweep(two_neuron, INITS[:2], [0.4], steps=300, dtype=jnp.float32)
    assert list(r.status[0]) == [S.CONVERGED_MINIMUM, S.CONVERGED_MINIMUM]


@pytest.mark.slow
def test_custom_criteria_and_short_runs():
    loose = ConvergenceCriteria(grad_tol=1e-2, step_tol=1e-2, window=4, max_period=2)
    r = gdlr_jax.sweep(
        two_neuron, INITS[:1], [0.4], steps=300, criteria=loose, min_loss_value=0.0
    )
    tight = grid_result("float32")
    assert r.status[0, 0] == S.CONVERGED_MINIMUM
    assert r.steps_taken[0, 0] < tight.steps_taken[0, 0]
    short = gdlr_jax.sweep(two_neuron, INITS, ETAS, steps=3, min_loss_value=0.0)
    assert short.steps_taken.max() == 3 and short.period.max() == 0


# ----------------------------------------------------------------------------------------
# Recordings
# ----------------------------------------------------------------------------------------
def test_recordings_follow_the_trajectory_and_hold_final_values_after_it_ends():
    r = gdlr_jax.sweep(
        two_neuron,
        INITS,
        ETAS,
        steps=60,
        min_loss_value=0.0,
        dtype=jnp.float64,
        record_every=10,
        record_params=True,
    )
    np.testing.assert_array_equal(r.record_steps, np.arange(0, 61, 10))
    assert r.recorded_loss.shape == (3, 5, 7) and r.recorded_params.shape == (3, 5, 7, 2)
    np.testing.assert_allclose(r.recorded_loss[:, :, 0], [[two_neuron(x) for x in INITS]] * 3)
    i, j = 2, 2  # eta = 1.5 from (1.2, 1.1): running all along
    for k, t in enumerate(r.record_steps):
        theta = gd_iterate(two_neuron, INITS[j], ETAS[i], t, jnp.float64)
        np.testing.assert_allclose(r.recorded_params[i, j, k], theta, rtol=1e-9)
        grad_norm = jnp.linalg.norm(jax.grad(two_neuron)(theta))
        np.testing.assert_allclose(r.recorded_step_norm[i, j, k], ETAS[i] * grad_norm, rtol=1e-8)
    after = r.record_steps[None, None, :] > r.steps_taken[:, :, None]
    final_loss = np.broadcast_to(r.final_loss[:, :, None], after.shape)
    np.testing.assert_array_equal(r.recorded_loss[after], final_loss[after])
    assert after[0, 0].any() and after[2, 0].any()  # a converged and a diverged trajectory


# ----------------------------------------------------------------------------------------
# Optimisers and minibatches
# ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_optax_sgd_matches_plain_gd_and_adam_runs():
    plain = grid_result("float64")
    sgd = gdlr_jax.sweep(
        two_neuron, INITS, ETAS, steps=300, min_loss_value=0.0, dtype=jnp.float64,
        optimizer=optax.sgd,
    )
    np.testing.assert_array_equal(sgd.status, plain.status)
    np.testing.assert_array_equal(sgd.steps_taken, plain.steps_taken)
    np.testing.assert_allclose(sgd.final_params, plain.final_params, rtol=1e-9)
    adam = gdlr_jax.sweep(
        lambda th: jnp.sum(jnp.square(th - 1.0)),
        jnp.zeros((2, 3)),
        [0.05],
        steps=2000,
        min_loss_value=0.0,
        optimizer=optax.adam,
        criteria=ConvergenceCriteria(grad_tol=1e-3, step_tol=1e-3, loss_tol=1e-6),
    )
    assert np.all(adam.status == S.CONVERGED_MINIMUM)
    np.testing.assert_allclose(adam.final_params, 1.0, atol=1e-3)


def _regression_problem():
    data_key, init_key = jax.random.split(jax.random.key(3))
    x = jax.random.normal(data_key, (40, 3))
    y = x @ jnp.array([1.0, -2.0, 0.5])
    params0 = 0.1 * jax.random.normal(init_key, (4, 3))

    def loss(w, batch):
        xb, yb = batch
        return 0.5 * jnp.mean(jnp.square(xb @ w - yb))

    return loss, params0, (x, y)


def test_sgd_is_deterministic_and_follows_the_documented_batches():
    loss, params0, data = _regression_problem()
    run = functools.partial(
        gdlr_jax.sweep, loss, params0, [0.05, 0.3], steps=23, batch_source=(data, 8),
        min_loss_value=0.0, dtype=jnp.float64,
    )
    first, second = run(key=jax.random.key(7)), run(key=jax.random.key(7))
    jax.tree_util.tree_map(np.testing.assert_array_equal, first, second)
    other = run(key=jax.random.key(8))
    assert not np.allclose(other.final_params, first.final_params)
    # the loop: step t uses block t mod 5 of the shuffle of epoch t // 5
    source = gdlr_jax.Minibatches(data, 8)
    grad = jax.jit(jax.grad(loss))
    for i, eta in enumerate([0.05, 0.3]):
        for j in range(4):
            w = params0[j]
            for t in range(23):
                batch = minibatch(source, epoch_permutation(source, jax.random.key(7), t), t)
                w = w - eta * grad(w, batch)
            assert first.status[i, j] == S.NOT_CONVERGED
            np.testing.assert_allclose(first.final_params[i, j], w, rtol=1e-10)
    # full-batch quantities at the end
    full_loss = loss(first.final_params[1, 2], data)
    np.testing.assert_allclose(first.final_loss[1, 2], full_loss, rtol=1e-10)


@pytest.mark.slow
def test_sgd_per_initialisation_batches():
    loss, params0, data = _regression_problem()
    same_init = jnp.broadcast_to(params0[:1], (2, 3))
    r = gdlr_jax.sweep(
        loss, same_init, [0.3], steps=23, batch_source=(data, 8), key=jax.random.key(7),
        same_batches=False, dtype=jnp.float64,
    )
    assert not np.allclose(r.final_params[0, 0], r.final_params[0, 1])
    shared = gdlr_jax.sweep(
        loss, same_init, [0.3], steps=23, batch_source=(data, 8), key=jax.random.key(7),
        dtype=jnp.float64,
    )
    np.testing.assert_array_equal(shared.final_params[0, 0], shared.final_params[0, 1])


@pytest.mark.slow
def test_sgd_divergence_is_pinpointed():
    loss, params0, data = _regression_problem()
    r = gdlr_jax.sweep(
        loss, params0, [5.0], steps=200, batch_source=(data, 8), key=jax.random.key(7),
        dtype=jnp.float64, criteria=ConvergenceCriteria(divergence_bound=1e3),
    )
    assert np.all(r.status == S.DIVERGED)
    source = gdlr_jax.Minibatches(data, 8)
    grad = jax.jit(jax.grad(loss))
    for j in range(4):
        w = params0[j]
        for t in range(int(r.steps_taken[0, j])):
            batch = minibatch(source, epoch_permutation(source, jax.random.key(7), t), t)
            w = w - 5.0 * grad(w, batch)
        np.testing.assert_allclose(r.final_params[0, j], w, rtol=1e-10)
        t = int(r.steps_taken[0, j])
        batch = minibatch(source, epoch_permutation(source, jax.random.key(7), t), t)
        assert np.max(np.abs(w - 5.0 * grad(w, batch))) > 1e3


# ----------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument, before any compute
# ----------------------------------------------------------------------------------------
class _CountingLoss:
    def __init__(self):
        self.calls = 0

    def __call__(self, theta):
        self.calls += 1
        return two_neuron(theta)


@pytest.mark.parametrize(
    "etas, match",
    [
        ([0.1, 0.0], r"etas must be positive and finite, got etas\[1\] = 0.0"),
        ([-0.5], r"etas\[0\] = -0.5"),
        ([0.1, np.nan], r"etas\[1\] = nan"),
        ([np.inf], r"etas\[0\] = inf"),
        ([], r"etas must be a non-empty 1-D array .* shape \(0,\)"),
        ([[0.1, 0.2]], r"etas must be a non-empty 1-D array .* shape \(1, 2\)"),
        (0.1, r"etas must be a non-empty 1-D array .* shape \(\)"),
    ],
)
def test_bad_etas(etas, match):
    loss = _CountingLoss()
    with pytest.raises(ValueError, match=match):
        gdlr_jax.sweep(loss, INITS, etas, steps=10)
    assert loss.calls == 0  # nothing traced, nothing run


@pytest.mark.parametrize(
    "params0, match",
    [
        ([np.zeros((3, 1, 1)), np.zeros((4, 1, 1))], "params0: every leaf must have the same"),
        ([np.zeros((3, 1)), np.float32(1.0)], "params0: every leaf needs a leading initialis"),
        (np.zeros((0, 2)), r"params0: the grid is empty \(n_init = 0\)"),
        ({}, r"params0: the pytree has no array leaves"),
        (np.zeros((2, 2), complex), r"params0: leaves must be real arrays, got .* complex128"),
    ],
)
def test_bad_params0(params0, match):
    with pytest.raises(ValueError, match=match):
        gdlr_jax.sweep(two_neuron, params0, [0.1], steps=10)


def test_bad_scalars_and_options():
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        gdlr_jax.sweep(two_neuron, INITS, [0.1], steps=0)
    with pytest.raises(ValueError, match="steps must be a positive integer, got 2.5"):
        gdlr_jax.sweep(two_neuron, INITS, [0.1], steps=2.5)
    with pytest.raises(ValueError, match="check_every must be a positive integer"):
        gdlr_jax.sweep(two_neuron, INITS, [0.1], steps=5, check_every=0)
    with pytest.raises(ValueError, match="record_params=True needs record_every"):
        gdlr_jax.sweep(two_neuron, INITS, [0.1], steps=5, record_params=True)
    with pytest.raises(ValueError, match="dtype must be a floating dtype, got int32"):
        gdlr_jax.sweep(two_neuron, INITS, [0.1], steps=5, dtype=jnp.int32)
    with pytest.raises(ValueError, match="min_loss_value must be a finite number"):
        gdlr_jax.sweep(two_neuron, INITS, [0.1], steps=5, min_loss_value=np.nan)
    with pytest.raises(ValueError, match=r"criteria.window must be an integer >= 2 \* max_period"):
        gdlr_jax.sweep(two_neuron, INITS, [0.1], steps=5, criteria=ConvergenceCriteria(window=8))
    with pytest.raises(ValueError, match="criteria.grad_tol must be a non-negative number"):
        gdlr_jax.sweep(
            two_neuron, INITS, [0.1], steps=5, criteria=ConvergenceCriteria(grad_tol=-1.0)
        )
    with pytest.raises(ValueError, match="criteria must be a ConvergenceCriteria"):
        gdlr_jax.sweep(two_neuron, INITS, [0.1], steps=5, criteria={"grad_tol": 1.0})
    with pytest.raises(ValueError, match="optimizer must be an optax factory"):
        gdlr_jax.sweep(two_neuron, INITS, [0.1], steps=5, optimizer=optax.sgd(0.1))
    with pytest.raises(ValueError, match="devices must be a non-empty sequence"):
        gdlr_jax.sweep(two_neuron, INITS, [0.1], steps=5, devices=[])


def test_loss_must_return_a_scalar():
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar .* got \(2,\)"):
        gdlr_jax.sweep(lambda th: th**2, INITS, [0.1], steps=5)
    with pytest.raises(ValueError, match="loss_fn could not be evaluated on one initialisation"):
        gdlr_jax.sweep(lambda th, batch: th[0], INITS, [0.1], steps=5)
    with pytest.raises(ValueError, match="loss_fn must be callable"):
        gdlr_jax.sweep("two_neuron", INITS, [0.1], steps=5)


def test_bad_batch_source_and_key():
    loss, params0, (x, y) = _regression_problem()
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="batch_source must be a pair"):
        gdlr_jax.sweep(loss, params0, [0.1], steps=5, batch_source=(x, y, 8), key=key)
    with pytest.raises(ValueError, match="batch_source: data leaves must share the leading"):
        gdlr_jax.sweep(loss, params0, [0.1], steps=5, batch_source=((x, y[:30]), 8), key=key)
    with pytest.raises(ValueError, match=r"batch_size must be an integer in \[1, n\] = \[1, 40\]"):
        gdlr_jax.sweep(loss, params0, [0.1], steps=5, batch_source=((x, y), 41), key=key)
    with pytest.raises(ValueError, match="key: a PRNG key is required with batch_source"):
        gdlr_jax.sweep(loss, params0, [0.1], steps=5, batch_source=((x, y), 8))
    with pytest.raises(ValueError, match="key is only used with batch_source"):
        gdlr_jax.sweep(two_neuron, INITS, [0.1], steps=5, key=key)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar .* and one batch"):
        gdlr_jax.sweep(
            lambda w, b: b[0] @ w, params0, [0.1], steps=5, batch_source=((x, y), 8), key=key
        )
