"""Linear networks: the loss, the target W*, the chart of M, and Prop. 9/10 and Thm. 12."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import examples, linear_networks

import gdlr_jax as gj
from gdlr_jax.linear import LinearNetwork, deep_scalar, two_neuron


def test_two_neuron_is_the_worked_example():
    net = two_neuron()
    for x, y in [(0.3, -1.2), (2.0, 0.5), (0.0, 0.0)]:
        params = [jnp.array([[x]]), jnp.array([[y]])]
        assert net.loss(params) == pytest.approx(0.5 * (1 - x * y) ** 2, rel=1e-15)
    assert net.minima_dim == 1 and net.rank == 1 and net.is_filling
    assert net.min_loss == 0.0
    np.testing.assert_allclose(net.target(), [[1.0]])


def test_deep_scalar_product_and_loss():
    net = deep_scalar(3, x=2.0, y=3.0, scale=1.0)
    params = [jnp.array([[0.5]]), jnp.array([[2.0]]), jnp.array([[-1.5]])]
    assert float(net.product(params)[0, 0]) == pytest.approx(-1.5)
    assert float(net.loss(params)) == pytest.approx((3.0 - (-1.5) * 2.0) ** 2)
    np.testing.assert_allclose(net.target(), [[1.5]])


def test_filling_target_is_least_squares():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(3, 7)), rng.normal(size=(2, 7))
    net = LinearNetwork((3, 4, 2), X, Y)
    w_ls = np.linalg.lstsq(X.T, Y.T, rcond=None)[0].T
    np.testing.assert_allclose(net.target(), w_ls, rtol=1e-12)
    # ... and not the "seed formula" Y X^T (X X^T)^(-1/2), which is W_ls (X X^T)^(1/2).
    evals, evecs = np.linalg.eigh(X @ X.T)
    seed = Y @ X.T @ (evecs / np.sqrt(evals)) @ evecs.T
    assert not np.allclose(seed, w_ls, rtol=1e-3)


def test_non_filling_target_beats_every_rank_r_competitor():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(4, 9)), rng.normal(size=(3, 9))
    net = LinearNetwork((4, 1, 3), X, Y)
    assert not net.is_filling and net.rank == 1 and net.target_rank == 1
    target_loss = net.scale * np.sum((Y - np.asarray(net.target()) @ X) ** 2)
    assert target_loss == pytest.approx(net.min_loss)
    # Random rank-1 matrices near W* and far from it never do better (a local-optimality and a
    # global sanity check of the X-weighted Eckart-Young solution).
    for _ in range(200):
        u, v = rng.normal(size=(3, 1)), rng.normal(size=(1, 4))
        w = np.asarray(net.target()) + 1e-3 * (u @ v) if _ % 2 else u @ v
        if np.linalg.matrix_rank(w) <= 1:
            assert net.scale * np.sum((Y - w @ X) ** 2) >= target_loss - 1e-12
    # The unweighted truncation of W_ls is a different (worse) matrix here.
    w_ls = np.linalg.lstsq(X.T, Y.T, rcond=None)[0].T
    u, s, vt = np.linalg.svd(w_ls)
    naive = s[0] * np.outer(u[:, 0], vt[0])
    assert net.scale * np.sum((Y - naive @ X) ** 2) > target_loss + 1e-9


@settings(max_examples=examples(12))
@given(linear_networks())
def test_prop9_prop10_sampled_minima(net):
    """Prop. 9: M has dimension d_theta - r(d_0 + d_h - r); Prop. 10: at theta in M the Hessian
    has exactly dim M zero and r(d_0 + d_h - r) positive eigenvalues, none negative."""
    params = net.sample_minimum(jax.random.PRNGKey(net.num_params), (3,), spread=0.3)
    losses = jax.vmap(net.loss)(params)
    np.testing.assert_allclose(losses, net.min_loss, atol=1e-10 * max(1.0, net.min_loss))
    # Prop. 9 from the geometry alone: M = mu^{-1}(W*) and Dmu has constant rank on M.
    one = [w[0] for w in params]
    jac = jax.jacfwd(lambda th: net.product(th).ravel())(one)
    jac = np.concatenate([np.asarray(j).reshape(j.shape[0], -1) for j in jac], axis=1)
    assert net.num_params - np.linalg.matrix_rank(jac, tol=1e-9 * np.abs(jac).max()) == net.minima_dim
    # Prop. 10 from the Hessian.
    counts = jax.jit(jax.vmap(lambda p: gj.spectrum_counts(gj.hessian_spectrum(net.loss, p))))(
        params
    )
    expected = np.array([0, net.minima_dim, net.num_nonzero_eigenvalues])
    np.testing.assert_array_equal(counts, np.broadcast_to(expected, counts.shape))


@pytest.mark.slow
def test_sampled_minima_are_spread_not_one_balanced_point():
    net = LinearNetwork((2, 3, 3, 2), np.eye(2), np.array([[1.0, 0.3], [-0.2, 2.0]]))
    params = net.sample_minimum(jax.random.PRNGKey(0), (64,), spread=0.5)
    norms = np.asarray(jnp.sqrt(sum(jnp.sum(w**2, axis=(-2, -1)) for w in params)))
    assert norms.std() > 0.2 * norms.mean()
    # Generic points: the middle factor (3 x 3) has full rank 3 > r = 2, which a gauge orbit of
    # a zero-padded balanced point never reaches.
    ranks = np.linalg.matrix_rank(np.asarray(params[1]))
    assert np.all(ranks == 3)


def _gauge(params, i, t):
    """theta -> (..., t W_i, W_{i+1} / t, ...): stays on M (W_{i+1} W_i is unchanged)."""
    out = list(params)
    out[i], out[i + 1] = t * params[i], params[i + 1] / t
    return out


@settings(max_examples=examples(8))
@given(linear_networks(), st.data())
def test_thm12_lambda_max_unbounded_along_M(net, data):
    """Thm. 12 (as proved for lambda_max): along a path on M leaving every compact set,
    lambda_max of the Hessian grows without bound (here like t^2)."""
    params = net.sample_minimum(jax.random.PRNGKey(0), spread=0.2)
    i = data.draw(st.integers(0, net.depth - 2))
    lambda_max = jax.jit(lambda p: gj.hessian_spectrum(net.loss, p)[-1])
    lam = [float(lambda_max(_gauge(params, i, t))) for t in (1e1, 1e2, 1e3)]
    assert lam[0] < lam[1] < lam[2]
    assert lam[2] > 1e3 * lam[0]


def test_thm12_smallest_nonzero_eigenvalue_can_stay_bounded():
    """'Each non-zero eigenvalue grows without bound along M' is false in general: for widths
    (2, 1, 2), X = I and scale 1/2, the non-zero Hessian eigenvalues at theta = (a^T, b) in M
    are |a|^2 + |b|^2, |a|^2 and |b|^2; on M, min(|a|^2, |b|^2) <= sigma_1(W*), and along the
    gauge path (t a^T, b / t), which leaves every compact set, |b|^2 / t^2 tends to 0.
    (Y has rank 1, so that the residual, and with it the second-order term, vanishes on M.)"""
    net = LinearNetwork((2, 1, 2), np.eye(2), np.outer([2.0, -0.5], [1.0, 0.3]))
    params = net.sample_minimum(jax.random.PRNGKey(3))
    spectrum = jax.jit(lambda p: gj.hessian_spectrum(net.loss, p))
    smallest = []
    for t in (1.0, 1e1, 1e2):
        a, b = t * params[0][0], params[1][:, 0] / t
        expected = np.sort([a @ a + b @ b, a @ a, b @ b])
        lam = np.asarray(spectrum(_gauge(params, 0, t)))
        positive = lam[lam > 1e-9 * lam[-1]]
        np.testing.assert_allclose(positive, expected, rtol=1e-8)
        smallest.append(positive[0])
    sigma_1 = np.linalg.norm(np.asarray(net.target()), 2)
    assert max(smallest) <= sigma_1 * (1 + 1e-12)  # bounded on all of M ...
    assert smallest[2] < 0.02 * smallest[1]  # ... and tending to 0 along this path


def test_chart_reaches_a_given_point_and_is_differentiable():
    net = LinearNetwork((3, 2, 4), np.random.default_rng(2).normal(size=(3, 5)),
                        np.random.default_rng(3).normal(size=(4, 5)))
    coords = net.sample_coordinates(jax.random.PRNGKey(0))
    g = jax.jit(jax.grad(lambda c: net.loss(net.minimum_from_coordinates(c))))(coords)
    # the loss is constant (= min) on the chart: its gradient vanishes
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(g) if x.size) < 1e-9


@pytest.mark.parametrize(
    "args, match",
    [
        (((1,), np.ones((1, 1)), np.ones((1, 1))), "widths"),
        (((2, 0, 1), np.ones((2, 3)), np.ones((1, 3))), "widths"),
        (((2, 2, 1), np.ones((3, 3)), np.ones((1, 3))), r"X must have shape \(d_0, n\) = \(2, n\)"),
        (((2, 2, 1), np.eye(2), np.ones((2, 2))), r"Y must have shape"),
        (((2, 2, 1), np.ones((2, 1)), np.ones((1, 1))), "X X\\^T must be invertible"),
        (((1, 1), np.array([[np.nan]]), np.ones((1, 1))), "finite"),
    ],
)
def test_bad_construction(args, match):
    with pytest.raises(ValueError, match=match):
        LinearNetwork(*args)


def test_bad_scale_and_params():
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        LinearNetwork((1, 1), np.ones((1, 1)), np.ones((1, 1)), scale=0.0)
    net = two_neuron()
    with pytest.raises(ValueError, match=r"params must be a list of 2 matrices"):
        net.loss([jnp.ones((1, 1))])
    with pytest.raises(ValueError, match=r"params\[1\] \(W_2\) must have shape \(1, 1\)"):
        net.loss([jnp.ones((1, 1)), jnp.ones((2, 1))])
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        deep_scalar(0)


def test_degenerate_target_is_refused_where_prop9_needs_full_rank():
    net = LinearNetwork((2, 2, 2), np.eye(2), np.zeros((2, 2)))
    assert net.target_rank == 0
    with pytest.raises(ValueError, match="rank 0 < r = 2"):
        net.minima_dim
