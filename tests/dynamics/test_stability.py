"""Stability of minima: Remark 2, Def. 16 (both criteria), Thm. 17."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import gdlr_jax as gj
from gdlr_jax import FixedPointStability as S
from gdlr_jax.linear import two_neuron
from strategies import linear_networks


def test_two_neuron_threshold_is_two_over_x2_plus_y2():
    net = two_neuron()
    for x in (0.5, 1.0, 2.0):
        params = [jnp.array([[x]]), jnp.array([[1.0 / x]])]
        expected = 2.0 / (x**2 + 1.0 / x**2)
        assert float(gj.weak_stability_threshold(net.loss, params)) == pytest.approx(expected, rel=1e-14)
        # one non-zero eigenvalue: both criteria agree
        assert float(
            gj.weak_stability_threshold(net.loss, params, criterion="lambda_min_nonzero")
        ) == pytest.approx(expected, rel=1e-14)


def test_criteria_differ_when_several_nonzero_eigenvalues():
    a, b = np.array([[2.0, 0.0]]), np.array([[1.0], [0.0]])  # W2 W1 = [[2, 0], [0, 0]]
    net = gj.linear.LinearNetwork((2, 1, 2), np.eye(2), b @ a)
    params = [jnp.asarray(a), jnp.asarray(b)]
    lam = np.array([5.0, 4.0, 1.0])  # |a|^2+|b|^2, |a|^2, |b|^2
    assert float(gj.weak_stability_threshold(net.loss, params)) == pytest.approx(2 / lam.max())
    assert float(
        gj.weak_stability_threshold(net.loss, params, criterion="lambda_min_nonzero")
    ) == pytest.approx(2 / lam.min())
    eta = 1.0  # between 2/5 and 2/1
    assert not gj.weakly_stable(net.loss, params, eta)
    assert gj.weakly_stable(net.loss, params, eta, criterion="lambda_min_nonzero")
    # ... and lambda_max is the one that decides: the point is unstable at this eta.
    assert gj.classify_fixed_point(net.loss, params, eta) == S.UNSTABLE


def test_classify_fixed_point_remark2():
    quad = lambda p: 0.5 * (p[0] ** 2 + 3.0 * p[1] ** 2)  # isolated minimum, lambda = 1, 3
    zero = jnp.zeros(2)
    assert gj.classify_fixed_point(quad, zero, 0.5) == S.STABLE
    assert gj.classify_fixed_point(quad, zero, 0.9) == S.UNSTABLE  # |1 - 2.7| > 1
    assert gj.classify_fixed_point(quad, zero, 2.0 / 3.0) == S.UNDECIDED  # eigenvalue -1
    # On a manifold of minima, DG has the eigenvalue 1: never "stable" by Remark 2.
    net = two_neuron()
    on_m = [jnp.array([[1.0]]), jnp.array([[1.0]])]
    assert gj.classify_fixed_point(net.loss, on_m, 0.5) == S.UNDECIDED
    assert gj.classify_fixed_point(net.loss, on_m, 1.5) == S.UNSTABLE
    # the saddle at the origin of 1/2 (1 - xy)^2: H has eigenvalues -1, 1
    origin = [jnp.zeros((1, 1)), jnp.zeros((1, 1))]
    assert gj.classify_fixed_point(net.loss, origin, 0.5) == S.UNSTABLE


@settings(max_examples=8)
@given(linear_networks(), st.floats(0.05, 0.5))
def test_thm17_minima_outside_mws_are_unstable(net, delta):
    """Outside M_WS(eta) (eta > 2/lambda_max), a small perturbation along the top Hessian
    eigenvector grows under G like |1 - eta lambda_max|^k; inside (eta < 2/lambda_max) it
    does not."""
    steps, eps = 12, 1e-7

    @jax.jit
    def verdicts(factor):
        params = net.sample_minimum(jax.random.PRNGKey(7), spread=0.2)
        theta, unravel = ravel_pytree(params)
        lam, vecs = jnp.linalg.eigh(gj.hessian(net.loss, params))
        eta = factor * 2 / lam[-1]
        g = gj.gd_map(net.loss, eta)
        p = jax.lax.fori_loop(0, steps, lambda _, p: g(p), unravel(theta + eps * vecs[:, -1]))
        growth = jnp.linalg.norm(ravel_pytree(p)[0] - theta) / eps
        stable = gj.weakly_stable(net.loss, params, eta)
        status = gj.classify_fixed_point(net.loss, params, eta)
        return stable, status, growth, jnp.abs(1 - eta * lam[-1]) ** steps

    stable, status, growth, predicted = verdicts(1 + delta)
    assert not stable and status == S.UNSTABLE
    assert growth > 0.5 * predicted > 1.5
    stable, status, growth, _ = verdicts(1 - delta)
    assert stable and status == S.UNDECIDED  # the eigenvalue 1 along M
    assert growth < 1.0 + 1e-6


def test_weakly_stable_vmaps_over_points_and_step_sizes():
    net = two_neuron()
    xs = jnp.array([0.5, 1.0, 2.0])
    params = [xs[:, None, None], (1 / xs)[:, None, None]]
    etas = jnp.array([0.5, 1.0, 1.5])
    f = jax.jit(jax.vmap(jax.vmap(lambda p, e: gj.weakly_stable(net.loss, p, e), (None, 0)), (0, None)))
    out = np.asarray(f(params, etas))
    thresholds = 2 / (xs**2 + 1 / xs**2)
    np.testing.assert_array_equal(out, np.asarray(etas)[None, :] < np.asarray(thresholds)[:, None])


def test_bad_criterion():
    with pytest.raises(ValueError, match="criterion must be one of"):
        gj.weakly_stable(lambda p: jnp.sum(p**2), jnp.ones(2), 0.1, criterion="lambda_min")
