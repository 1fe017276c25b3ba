"""The GD map and its Jacobian: Remark 5, and the non-singularity of Thm. 15/20."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree
from strategies import examples, linear_networks

import gdlr_jax as gj


def _random_point(net, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), net.depth)
    return [jax.random.normal(k, s) for k, s in zip(keys, net.shapes)]


@settings(max_examples=examples(8))
@given(linear_networks(), st.floats(0.01, 3.0), st.integers(0, 1000))
def test_remark5_jacobian_is_I_minus_eta_H(net, eta, seed):
    """DG = I - eta H equals jax.jacfwd of the GD map, and central finite differences."""
    params = _random_point(net, seed)
    theta, unravel = ravel_pytree(params)
    g_flat = lambda t: ravel_pytree(gj.gd_map(net.loss, eta)(unravel(t)))[0]
    dg = jax.jit(gj.gd_map_jacobian, static_argnums=0)(net.loss, params, eta)
    np.testing.assert_allclose(dg, jax.jit(jax.jacfwd(g_flat))(theta), atol=1e-10, rtol=1e-10)
    step = 1e-6
    central = jax.vmap(lambda e: (g_flat(theta + step * e) - g_flat(theta - step * e)) / (2 * step))
    fd = jax.jit(central)(jnp.eye(theta.size)).T
    scale = max(1.0, float(jnp.max(jnp.abs(dg))))
    np.testing.assert_allclose(dg, fd, atol=1e-6 * scale)


def test_gd_map_is_one_gradient_step():
    net_loss = lambda p: 0.5 * (1 - p["x"] * p["y"]) ** 2
    p = {"x": jnp.array(0.5), "y": jnp.array(1.5)}
    out = gj.gd_map(net_loss, 0.4)(p)
    r = 1 - 0.75
    assert float(out["x"]) == 0.5 + 0.4 * r * 1.5
    assert float(out["y"]) == 1.5 + 0.4 * r * 0.5


@settings(max_examples=examples(8))
@given(linear_networks(), st.floats(0.01, 10.0), st.integers(0, 1000))
def test_thm15_20_gd_map_nonsingular_at_random_points(net, eta, seed):
    """det DG != 0 at random (theta, eta): DG is singular only on a null set (Thm. 15/20)."""
    params = _random_point(net, seed)

    @jax.jit
    def both(p):
        ref = jnp.linalg.slogdet(gj.gd_map_jacobian(net.loss, p, eta))
        return gj.gd_map_slogdet(net.loss, p, eta), ref

    (sign, logabsdet), (ref_sign, ref_logabsdet) = both(params)
    assert sign != 0 and np.isfinite(logabsdet)
    assert sign == ref_sign
    np.testing.assert_allclose(logabsdet, ref_logabsdet, rtol=1e-8, atol=1e-8)


def test_singular_set_is_hit_exactly_at_eta_one_over_lambda():
    """The null set is real: at eta = 1/lambda_i, DG has the eigenvalue 0."""
    net = gj.linear.two_neuron()
    params = [jnp.array([[1.2]]), jnp.array([[0.3]])]
    lam = gj.hessian_spectrum(net.loss, params)
    eta = 1.0 / lam[-1]
    mu = gj.gd_map_eigenvalues(net.loss, params, eta)
    assert jnp.min(jnp.abs(mu)) < 1e-14
    assert float(gj.gd_map_spectral_radius(net.loss, params, 0.1)) == float(jnp.max(jnp.abs(1 - 0.1 * lam)))


def test_traced_eta_does_not_recompile():
    net = gj.linear.two_neuron()
    params = [jnp.array([[1.2]]), jnp.array([[0.3]])]
    f = jax.jit(lambda p, eta: gj.gd_map_slogdet(net.loss, p, eta))
    for eta in (0.1, 0.7, 2.5):
        f(params, eta)
    assert f._cache_size() == 1


# ----- Lemma 43 and Lemma 47, corrected (docs/theory.md) ---------------------------------------
@pytest.mark.parametrize("widths", [(3, 1, 3), (3, 2, 3), (2, 4, 1, 3)])
def test_lemma43_product_runs_over_the_nonzero_eigenvalues(widths):
    """On M, det DG = prod (1 - eta lambda_i) over the r(d_0 + d_h - r) non-zero eigenvalues
    (the dim M others give factors 1), not over dim M of them as Lemma 43 writes."""
    rng = np.random.default_rng(1)
    net = gj.linear.LinearNetwork(widths, rng.normal(size=(widths[0], 5)), rng.normal(size=(widths[-1], 5)))
    assert net.minima_dim != net.num_nonzero_eigenvalues
    k = net.num_nonzero_eigenvalues
    params = net.sample_minimum(jax.random.PRNGKey(2), spread=0.3)

    @jax.jit
    def parts(p):
        lam = gj.hessian_spectrum(net.loss, p)
        eta = 0.7 * 2 / lam[-1]
        return lam, gj.gd_map_slogdet(net.loss, p, eta), gj.gd_map_eigenvalues(net.loss, p, eta), eta

    lam, (sign, logabsdet), mu, eta = parts(params)
    assert int(jnp.sum(jnp.abs(mu - 1) > 1e-9)) == k  # exactly k factors differ from 1
    top = 1 - eta * lam[-k:]
    assert sign == jnp.prod(jnp.sign(top))
    np.testing.assert_allclose(logabsdet, jnp.sum(jnp.log(jnp.abs(top))), rtol=1e-9, atol=1e-12)
    if net.minima_dim < k:  # "dim M of them" drops factors: another number
        wrong = jnp.sum(jnp.log(jnp.abs(1 - eta * lam[-net.minima_dim:])))
        assert abs(float(wrong - logabsdet)) > 1e-3


def test_lemma47_hypothesis_fails_det_DG_changes_sign_along_M():
    """Widths (2, 1, 2), X = I, rank-one Y = sigma u v^T, eta = 1.5 eta_E: along the gauge path
    (t a, b / t) of M, det DG changes sign twice (DG is singular where |a|^2 or |b|^2 = 1/eta),
    so 'DG invertible at every minimum' (Lemma 47's hypothesis) is false; the smallest non-zero
    eigenvalue tends to 0 at both ends. Thm. 17's part of Thm. 18 still holds on the whole path:
    no minimum is weakly stable."""
    u, v, sigma = np.array([0.6, 0.8]), np.array([1.0, 0.0]), 2.0
    net = gj.linear.LinearNetwork((2, 1, 2), np.eye(2), sigma * np.outer(u, v))
    eta_e = gj.critical_step_size(net, restarts=2, steps=300).closed_form
    assert eta_e == pytest.approx(1 / sigma, rel=1e-14)  # 1 / (s c h sigma_1^(2 - 2/h))
    eta = 1.5 * eta_e
    a, b = np.sqrt(sigma) * v[None, :], np.sqrt(sigma) * u[:, None]
    ts = jnp.logspace(-1.0, 1.0, 81)

    @jax.jit
    @jax.vmap
    def along(t):
        p = [t * jnp.asarray(a), jnp.asarray(b) / t]
        sign, _ = gj.gd_map_slogdet(net.loss, p, eta)
        lam = gj.hessian_spectrum(net.loss, p)
        return sign, lam, gj.weakly_stable(net.loss, p, eta, inclusive=True), net.loss(p)

    signs, lam, stable, loss = along(ts)
    np.testing.assert_allclose(loss, 0.0, atol=1e-12)
    signs = np.asarray(signs)
    # + for t^2 < 2/3, - while both |a|^2 = sigma t^2 and |b|^2 = sigma / t^2 exceed 1/eta, +
    t2 = np.asarray(ts) ** 2
    np.testing.assert_array_equal(signs, np.where((t2 > 2 / 3) & (t2 < 3 / 2), -1.0, 1.0))
    assert int(np.sum(np.diff(signs) != 0)) == 2
    np.testing.assert_allclose(lam[:, -3:], np.sort(np.stack([sigma * (t2 + 1 / t2), sigma * t2, sigma / t2], 1), 1), rtol=1e-12, atol=1e-12)
    assert float(lam[0, -3]) < 0.03 and float(lam[-1, -3]) < 0.03  # lambda_min^+ -> 0
    assert not np.any(np.asarray(stable))
