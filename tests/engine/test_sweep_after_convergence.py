"""sweep(..., stop_at_convergence=False): converged trajectories keep stepping and recording,
their status and first convergence time still reported (issue 16; Figures 5-6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gdlr_jax as gj
from gdlr_jax.engine._minibatches import epoch_permutation
from gdlr_jax.linear import two_neuron

KW = {"steps": 400, "check_every": 16, "record_every": 20, "dtype": jnp.float64, "min_loss_value": 0.0}


def _grid():
    x0 = jnp.linspace(0.3, 2.0, 6)
    return [x0[:, None, None], (0.5 * x0)[:, None, None]], jnp.array([0.3, 0.9, 1.2])


@pytest.mark.slow  # two sweeps or a minibatch sweep, ~15-30 s on 2 busy cores; the fast
# check of coasting: test_a_coasting_trajectory_that_leaves_the_bound_...
def test_converged_trajectories_keep_stepping_status_and_convergence_time_reported():
    net = two_neuron()
    params0, etas = _grid()
    frozen = gj.sweep(net.loss, params0, etas, **KW)
    coasting = gj.sweep(net.loss, params0, etas, stop_at_convergence=False, **KW)
    assert frozen.converged_at is None
    np.testing.assert_array_equal(coasting.status, frozen.status)
    converged = (frozen.status == gj.TrajectoryStatus.CONVERGED_MINIMUM) | (
        frozen.status == gj.TrajectoryStatus.CONVERGED_CRITICAL_POINT
    )
    assert converged.sum() >= 10 and (~converged).sum() >= 1
    # the first convergence time is the frozen run's steps_taken; -1 where none converged
    np.testing.assert_array_equal(coasting.converged_at, np.where(converged, frozen.steps_taken, -1))
    # ... but the converged ones were stepped to the end, like plain GD
    np.testing.assert_array_equal(coasting.steps_taken[converged], KW["steps"])
    np.testing.assert_array_equal(coasting.steps_taken[~converged], frozen.steps_taken[~converged])
    for i, eta in enumerate(np.asarray(etas)):
        g = jax.jit(gj.gd_map(net.loss, float(eta)))
        for j in np.flatnonzero(converged[i]):
            p = [params0[0][j], params0[1][j]]
            for _ in range(KW["steps"]):
                p = g(p)
            got = [np.asarray(w[i, j]) for w in coasting.final_params]
            np.testing.assert_allclose(got, [np.asarray(w) for w in p], rtol=1e-12, atol=1e-15)
    # recordings after convergence show the dynamics (here: eta ||grad L|| still falls), not
    # the value frozen at convergence
    i, j = np.argwhere(converged)[0]
    after = coasting.record_steps > frozen.steps_taken[i, j]
    frozen_tail = frozen.recorded_step_norm[i, j, after]
    coasting_tail = coasting.recorded_step_norm[i, j, after]
    assert np.all(frozen_tail == frozen_tail[0])
    assert coasting_tail[-1] < 1e-3 * frozen_tail[0]
    np.testing.assert_allclose(coasting.final_loss[i, j], coasting.recorded_loss[i, j, -1], rtol=1e-12)


def test_stop_at_convergence_must_be_a_bool():
    net = two_neuron()
    params0, etas = _grid()
    with pytest.raises(ValueError, match="stop_at_convergence must be a bool, got 'no'"):
        gj.sweep(net.loss, params0, etas, stop_at_convergence="no", **KW)


def _cubic_plateau(p):
    """``1 - sum(p^3)``: near 0 a slow, nearly flat region (an inflection point, not a
    minimum); GD ``p <- p + 3 eta p^2`` creeps away from a small ``p > 0`` and then escapes to
    infinity, while from a small ``p < 0`` it creeps towards 0 and stays bounded."""
    return 1.0 - jnp.sum(p**3)


def test_a_coasting_trajectory_that_leaves_the_bound_is_rolled_back_and_stops_converged():
    """With a loose gradient tolerance the plateau counts as converged (to a critical point: the
    loss 1 is above loss_tol) at t = 0; coasting, the lane from 0.02 escapes (|p| > 1e6 between
    t = 16 and the next evaluation, t = 24). The engine then rolls it back to its iterate at the
    last evaluation inside the bound, stops it there (steps_taken, final values and the
    recordings after it are those of that iterate) and keeps its converged status and
    converged_at; it is not reported as diverged. The lane from -0.02 coasts to the end; a
    lane from 0.3 (gradient above the tolerance) diverges as usual."""
    x0 = jnp.array([[0.02], [-0.02], [0.3]])
    criteria = gj.ConvergenceCriteria(grad_tol=5e-3, step_tol=5e-3, loss_tol=1e-2, divergence_bound=1e6)
    steps, every = 64, 8
    r = gj.sweep(
        _cubic_plateau, x0, jnp.array([1.0]), steps=steps, check_every=16, record_every=every,
        dtype=jnp.float64, min_loss_value=0.0, criteria=criteria, stop_at_convergence=False,
    )
    S = gj.TrajectoryStatus
    assert r.status[0].tolist() == [S.CONVERGED_CRITICAL_POINT, S.CONVERGED_CRITICAL_POINT, S.DIVERGED]
    assert r.converged_at[0].tolist() == [0, 0, -1]
    # the plain loop p <- p + 3 p^2 (eta = 1)
    orbits = np.zeros((3, steps + 1))
    orbits[:, 0] = np.asarray(x0[:, 0])
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(steps):
            orbits[:, t + 1] = orbits[:, t] + 3.0 * orbits[:, t] ** 2
    escaped = int(np.argmax(~(np.abs(orbits[0]) <= 1e6)))  # first step outside the bound: 24
    assert 16 < escaped <= 24
    stop = int(r.steps_taken[0, 0])
    assert stop == 16  # the last evaluation (16, 24, ... with check_every 16, record_every 8)
    np.testing.assert_allclose(r.final_params[0, 0, 0], orbits[0, stop], rtol=1e-13)
    np.testing.assert_allclose(r.final_loss[0, 0], 1.0 - orbits[0, stop] ** 3, rtol=1e-13)
    np.testing.assert_allclose(r.final_grad_norm[0, 0], 3.0 * orbits[0, stop] ** 2, rtol=1e-12)
    after = r.record_steps > stop
    np.testing.assert_allclose(r.recorded_loss[0, 0, ~after], 1.0 - orbits[0, r.record_steps[~after]] ** 3, rtol=1e-13)
    np.testing.assert_array_equal(r.recorded_loss[0, 0, after], r.final_loss[0, 0])
    assert np.all(np.isfinite(r.recorded_step_norm[0, 0]))
    # the lane that stays bounded coasts to the end, like the plain loop
    assert r.steps_taken[0, 1] == steps
    np.testing.assert_allclose(r.final_params[0, 1, 0], orbits[1, steps], rtol=1e-12)
    np.testing.assert_allclose(r.recorded_loss[0, 1], 1.0 - orbits[1, r.record_steps] ** 3, rtol=1e-12)


def _least_squares():
    """``0.5 mean((x w - y)^2)`` with ``y = x w_true`` (interpolable: SGD converges)."""
    x = np.random.default_rng(3).normal(size=(40, 3))
    y = x @ np.array([1.0, -2.0, 0.5])
    params0 = 0.1 * np.random.default_rng(4).normal(size=(3, 3))

    def loss(w, batch):
        xb, yb = batch
        return 0.5 * jnp.mean(jnp.square(xb @ w - yb))

    return loss, params0, x, y


@pytest.mark.slow  # two sweeps or a minibatch sweep, ~15-30 s on 2 busy cores; the fast
# check of coasting: test_a_coasting_trajectory_that_leaves_the_bound_...
def test_sgd_keeps_stepping_after_convergence_like_a_plain_loop():
    """SGD, batch 8 of 40: with the option, converged lanes go on with the same minibatch
    sequence; final iterates and the recorded full-batch loss and eta ||grad L|| equal a NumPy
    loop of the same updates (the batches of step t: block t mod 5 of epoch t // 5's shuffle)."""
    loss, params0, x, y = _least_squares()
    etas, steps, every, key = [0.1, 0.3], 120, 10, jax.random.key(7)
    criteria = gj.ConvergenceCriteria(grad_tol=1e-2, step_tol=1e-2, loss_tol=1e-2)
    r = gj.sweep(
        loss, jnp.asarray(params0), etas, steps=steps, batch_source=((x, y), 8), key=key,
        check_every=16, record_every=every, dtype=jnp.float64, min_loss_value=0.0,
        criteria=criteria, stop_at_convergence=False,
    )
    assert np.all(r.status == gj.TrajectoryStatus.CONVERGED_MINIMUM)
    assert np.all((r.converged_at > 0) & (r.converged_at < steps))
    np.testing.assert_array_equal(r.steps_taken, steps)
    source = gj.Minibatches((jnp.asarray(x), jnp.asarray(y)), 8)
    blocks = [
        np.asarray(epoch_permutation(source, key, t))[(t % 5) * 8 : (t % 5 + 1) * 8] for t in range(steps)
    ]
    for i, eta in enumerate(etas):
        for j in range(3):
            w, losses, step_norms = params0[j].copy(), [], []
            for t in range(steps + 1):
                if t % every == 0:
                    residual = x @ w - y
                    losses.append(0.5 * np.mean(residual**2))
                    step_norms.append(eta * np.linalg.norm(x.T @ residual / len(y)))
                if t < steps:
                    xb, yb = x[blocks[t]], y[blocks[t]]
                    w = w - eta * xb.T @ (xb @ w - yb) / 8
            np.testing.assert_allclose(r.final_params[i, j], w, rtol=1e-10, atol=1e-14)
            # to rounding: the loss falls to 1e-31, where the two sums' round-off differs
            np.testing.assert_allclose(r.recorded_loss[i, j], losses, rtol=1e-8, atol=1e-20)
            np.testing.assert_allclose(r.recorded_step_norm[i, j], step_norms, rtol=1e-8, atol=1e-12)
    # the recordings after convergence kept falling (not frozen at eta x tolerance)
    assert np.all(r.recorded_loss[..., -1] < 1e-3 * r.recorded_loss[..., 1])


@pytest.mark.slow  # two sweeps or a minibatch sweep, ~15-30 s on 2 busy cores; the fast
# check of coasting: test_a_coasting_trajectory_that_leaves_the_bound_...
def test_an_optax_optimizer_keeps_stepping_after_convergence_like_a_plain_loop():
    """Adam (optax) on ``sum((theta - 1)^2)``: converged lanes go on with their optimiser state;
    the final iterates and recordings equal a NumPy Adam loop (bias-corrected moments,
    ``b1 = 0.9, b2 = 0.999, eps = 1e-8``)."""
    etas, steps, every = [0.05, 0.1], 300, 25
    params0 = np.array([[0.0, 0.5, 2.0], [-1.0, 0.0, 1.5]])
    criteria = gj.ConvergenceCriteria(grad_tol=5e-2, step_tol=5e-2, loss_tol=1e-2)
    r = gj.sweep(
        lambda th: jnp.sum(jnp.square(th - 1.0)), jnp.asarray(params0), etas, steps=steps,
        optimizer=optax.adam, check_every=16, record_every=every, dtype=jnp.float64,
        min_loss_value=0.0, criteria=criteria, stop_at_convergence=False,
    )
    assert np.all(r.status == gj.TrajectoryStatus.CONVERGED_MINIMUM)
    assert np.all((r.converged_at > 0) & (r.converged_at < steps))
    np.testing.assert_array_equal(r.steps_taken, steps)
    for i, eta in enumerate(etas):
        for j in range(2):
            w, m, v, losses = params0[j].copy(), 0.0, 0.0, []
            for t in range(steps + 1):
                if t % every == 0:
                    losses.append(np.sum((w - 1.0) ** 2))
                if t < steps:
                    g = 2.0 * (w - 1.0)
                    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g**2
                    m_hat, v_hat = m / (1 - 0.9 ** (t + 1)), v / (1 - 0.999 ** (t + 1))
                    w = w - eta * m_hat / (np.sqrt(v_hat) + 1e-8)
            np.testing.assert_allclose(r.final_params[i, j], w, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(r.recorded_loss[i, j], losses, rtol=1e-7, atol=1e-20)
