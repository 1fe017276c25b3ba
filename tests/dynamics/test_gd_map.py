"""The GD map and its Jacobian: Remark 5, and the non-singularity of Thm. 15/20."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import gdlr_jax as gj
from strategies import linear_networks


def _random_point(net, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), net.depth)
    return [jax.random.normal(k, s) for k, s in zip(keys, net.shapes)]


@settings(max_examples=8)
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


@settings(max_examples=8)
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
