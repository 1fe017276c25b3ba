"""Sharpness tracking in the engine (``sweep(..., sharpness_every=K)``): every measurement is
``lambda_max`` of the full-batch Hessian at the trajectory's iterate, as dense ``eigh`` says."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gdlr_jax
from gdlr_jax import TrajectoryStatus
from gdlr_jax.experiments import figures
from gdlr_jax.linear import LinearNetwork, two_neuron

S = TrajectoryStatus


def dense_lambda_max(loss_fn, params):
    """Largest eigenvalue of the dense Hessian of ``loss_fn`` at every point of ``params``
    (leaves with any number of leading batch axes), by ``eigh``."""
    leaf = jax.tree_util.tree_leaves(params)[0]
    batch = leaf.shape[: leaf.ndim - 2]  # the linear network's leaves are matrices
    flat = jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[len(batch):]), params)
    top = jax.jit(jax.vmap(lambda p: gdlr_jax.hessian_spectrum(loss_fn, p)[-1]))(flat)
    return np.asarray(top).reshape(batch)


@functools.lru_cache(maxsize=None)
def linear_network_sweep():
    """A (3, 4, 3, 2) linear network, d = 30 > the default 20 Lanczos steps per measurement."""
    kx, ky, kp = jax.random.split(jax.random.key(7), 3)
    net = LinearNetwork((3, 4, 3, 2), jax.random.normal(kx, (3, 8)), jax.random.normal(ky, (2, 8)))
    shapes = [(4, 3), (3, 4), (2, 3)]  # W_i (d_i, d_{i-1})
    params0 = [
        0.7 * jax.random.normal(k, (4,) + shape)
        for k, shape in zip(jax.random.split(kp, 3), shapes, strict=True)
    ]
    result = gdlr_jax.sweep(
        net.loss,
        params0,
        [0.02, 0.08],
        steps=120,
        sharpness_every=20,
        record_every=20,
        record_params=True,
        dtype=jnp.float64,
    )
    return net, result


@pytest.mark.slow
def test_recorded_sharpness_is_lambda_max_of_the_dense_hessian_at_each_iterate():
    net, r = linear_network_sweep()
    np.testing.assert_array_equal(r.sharpness_steps, np.arange(0, 121, 20))
    assert r.recorded_sharpness.shape == (2, 4, 7) and r.final_sharpness.shape == (2, 4)
    expected = dense_lambda_max(net.loss, r.recorded_params)
    np.testing.assert_allclose(r.recorded_sharpness, expected, rtol=1e-8)
    expected = dense_lambda_max(net.loss, r.final_params)
    np.testing.assert_allclose(r.final_sharpness, expected, rtol=1e-8)


@pytest.mark.slow
def test_minibatch_sweeps_measure_the_full_batch_hessian_with_uneven_batches():
    """Least squares: the Hessian is ``X^T X / n`` everywhere; 40 examples in batches of 6
    leave a tail of 4, which a mean of batch means would over-weight."""
    x = jax.random.normal(jax.random.key(3), (40, 3)) * jnp.array([[1.0, 2.0, 0.5]])
    y = x @ jnp.array([1.0, -2.0, 0.5])

    def loss(w, batch):
        xb, yb = batch
        return 0.5 * jnp.mean(jnp.square(xb @ w - yb))

    r = gdlr_jax.sweep(
        loss,
        jnp.zeros((3, 3)),
        [0.01, 0.1],
        steps=50,
        batch_source=((x, y), 6),
        key=jax.random.key(0),
        sharpness_every=10,
        dtype=jnp.float64,
    )
    expected = np.linalg.eigvalsh(np.asarray(x.T @ x) / 40)[-1]
    np.testing.assert_allclose(r.recorded_sharpness, expected, rtol=1e-10)
    np.testing.assert_allclose(r.final_sharpness, expected, rtol=1e-10)


@pytest.mark.slow
def test_minima_reached_by_gd_have_sharpness_at_most_two_over_eta():
    """Thm. 17 on ``1/2 (1 - xy)^2``: GD converges (from almost every start) only to minima
    with ``lambda_max = x^2 + y^2 <= 2 / eta``; the trajectories that diverge measured a
    sharpness above ``2 / eta`` on their way."""
    inits = jax.random.uniform(jax.random.key(0), (256, 2), minval=-2.0, maxval=2.0)
    etas = np.array([0.5, 0.8, 0.95])
    net = two_neuron()
    r = gdlr_jax.sweep(
        lambda p: net.loss([p[:1, None], p[1:, None]]),
        inits,
        etas,
        steps=2000,
        min_loss_value=0.0,
        sharpness_every=50,
        dtype=jnp.float64,
    )
    converged = r.status == S.CONVERGED_MINIMUM
    assert converged.sum() > 300
    bound = (2 / etas)[:, None] * np.ones_like(r.final_sharpness)
    assert np.all(r.final_sharpness[converged] <= bound[converged] * (1 + 1e-6))
    x, y = r.final_params[..., 0], r.final_params[..., 1]
    np.testing.assert_allclose(r.final_sharpness[converged], (x**2 + y**2)[converged], rtol=1e-6)
    diverged = r.status == S.DIVERGED
    assert diverged.sum() > 50 and np.all(converged | diverged)
    assert np.all(r.recorded_sharpness[diverged].max(axis=-1) > bound[diverged])


@pytest.mark.slow
def test_slots_after_a_trajectory_ends_hold_its_final_sharpness():
    inits = np.array([[0.5, 1.5], [1e3, 1e3], [1.2, 1.1], [0.3, 3.0]])
    r = gdlr_jax.sweep(
        lambda t: 0.5 * (1.0 - t[0] * t[1]) ** 2,
        inits,
        [0.4, 1.5],
        steps=200,
        min_loss_value=0.0,
        sharpness_every=10,
        dtype=jnp.float64,
    )
    after = r.sharpness_steps[None, None, :] > r.steps_taken[:, :, None]
    final = np.broadcast_to(r.final_sharpness[:, :, None], after.shape)
    np.testing.assert_array_equal(r.recorded_sharpness[after], final[after])
    assert (after & (r.status == S.DIVERGED)[:, :, None]).any()
    assert (after & (r.status == S.CONVERGED_MINIMUM)[:, :, None]).any()
    x, y = r.final_params[..., 0], r.final_params[..., 1]
    hessian = np.stack(
        [np.stack([y**2, 2 * x * y - 1], -1), np.stack([2 * x * y - 1, x**2], -1)], -2
    )
    np.testing.assert_allclose(r.final_sharpness, np.linalg.eigvalsh(hessian)[..., -1], rtol=1e-9)


def test_bad_sharpness_options():
    inits = np.zeros((2, 2))
    loss = lambda t: jnp.sum(t**2)  # noqa: E731
    with pytest.raises(ValueError, match="sharpness_every must be a positive integer, got 0"):
        gdlr_jax.sweep(loss, inits, [0.1], steps=5, sharpness_every=0)
    with pytest.raises(ValueError, match="sharpness_iterations needs sharpness_every"):
        gdlr_jax.sweep(loss, inits, [0.1], steps=5, sharpness_iterations=2)
    with pytest.raises(ValueError, match="sharpness_iterations = 3 exceeds the number of "
                       "parameters d = 2"):
        gdlr_jax.sweep(loss, inits, [0.1], steps=5, sharpness_every=1, sharpness_iterations=3)


@pytest.mark.slow
def test_sharpness_figure_draws_every_step_size_and_its_edge_of_stability(tmp_path):
    _, r = linear_network_sweep()
    fig = figures.sharpness_trajectories(r.sharpness_steps, r.recorded_sharpness, r.etas)
    (ax,) = fig.axes
    edges = sorted(
        line.get_ydata()[0]
        for line in ax.get_lines()
        if line.get_linestyle() == "--" and len(line.get_ydata())
    )
    np.testing.assert_allclose(edges, sorted(2 / r.etas))
    # every trajectory, a median and 2/eta per step size, and the legend's 2/eta entry
    assert len(ax.get_lines()) == 2 * 4 + 2 * 2 + 1
    fig.savefig(tmp_path / "sharpness.png")
    assert (tmp_path / "sharpness.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="recorded_sharpness must have shape"):
        figures.sharpness_trajectories(r.sharpness_steps, r.recorded_sharpness[:, :, 1:], r.etas)
