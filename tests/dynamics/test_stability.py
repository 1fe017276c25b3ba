"""Stability of minima: Remark 2, Def. 16 (both criteria), Thm. 17."""

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
from gdlr_jax import FixedPointStability as S
from gdlr_jax.linear import two_neuron


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


@settings(max_examples=examples(8))
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


# ----- eq. (8), corrected (docs/theory.md, "The Hessian on M") --------------------------------
def _hessian_parts(net, params):
    """``(H, GN, R X^T)``: the loss Hessian, the paper's eq. (8) ``Dmu^T D^2 l Dmu`` (jax.jacfwd
    of the product map and jax.hessian of ``l(W)``, not gdlr's curvature code) and ``R X^T``."""
    theta, unravel = ravel_pytree(params)
    jac = jax.jacfwd(lambda t: net.product(unravel(t)).ravel())(theta)
    w_shape = (net.widths[-1], net.widths[0])
    l_of_w = lambda w: net.scale * jnp.sum((net.Y - w.reshape(w_shape) @ net.X) ** 2)
    d2l = jax.hessian(l_of_w)(net.product(params).ravel())
    residual = net.Y - net.product(params) @ net.X
    return gj.hessian(net.loss, params), jac.T @ d2l @ jac, residual @ net.X.T


@pytest.mark.parametrize(
    "widths", [(3, 1, 3), pytest.param((2, 4, 1, 3), marks=pytest.mark.slow)]
)
def test_eq8_gauss_newton_form_fails_on_non_filling_minima(widths):
    """Non-filling: grad l(W*) = -2 scale R X^T != 0, so H = Dmu^T D^2l Dmu + dl . D^2 mu keeps
    its second term; the Prop. 10 counts hold all the same."""
    rng = np.random.default_rng(5)
    net = gj.linear.LinearNetwork(widths, rng.normal(size=(widths[0], 6)), rng.normal(size=(widths[-1], 6)))
    assert not net.is_filling
    points = net.sample_minimum(jax.random.PRNGKey(1), (8,), spread=0.5)
    h, gn, rxt = jax.jit(jax.vmap(lambda p: _hessian_parts(net, p)))(points)
    assert float(jnp.linalg.norm(rxt[0])) > 0.01 * float(jnp.linalg.norm(net.Y @ net.X.T))
    ratios = jnp.linalg.norm(h - gn, axis=(1, 2)) / jnp.linalg.norm(h, axis=(1, 2))
    # measured max 0.25 on (3, 1, 3), 0.042 on (2, 4, 1, 3) with these data (points vary)
    assert float(jnp.max(ratios)) > 0.02, ratios
    counts = gj.spectrum_counts(jnp.linalg.eigvalsh(h))
    np.testing.assert_array_equal(
        counts, np.broadcast_to([0, net.minima_dim, net.num_nonzero_eigenvalues], (8, 3))
    )


@pytest.mark.parametrize("widths", [(2, 3, 2), (3, 2, 4, 2)])
def test_eq8_holds_on_filling_minima_where_R_X_T_vanishes(widths):
    """Filling: W* = W_ls, so R X^T = 0 and H = GN (eq. 8) -- but with n > d_0 the residual R
    itself does not vanish (theory.md's old wording), nor does the minimum loss."""
    rng = np.random.default_rng(2)
    net = gj.linear.LinearNetwork(widths, rng.normal(size=(widths[0], 7)), rng.normal(size=(widths[-1], 7)))
    assert net.is_filling and net.min_loss > 0.1
    h, gn, rxt = jax.jit(lambda p: _hessian_parts(net, p))(net.sample_minimum(jax.random.PRNGKey(0)))
    assert float(jnp.linalg.norm(rxt)) < 1e-12 * float(jnp.linalg.norm(net.Y @ net.X.T))
    np.testing.assert_allclose(gn, h, atol=1e-10 * float(jnp.max(jnp.abs(h))))


def test_def16_inclusive_is_the_papers_boundary():
    """Def. 16 writes eta <= 2/lambda; the default is <. At eta = 2/lambda_max exactly
    (two-neuron at x = y = 1: lambda_max = 2, eta = 1 in binary) only the inclusive one holds."""
    net = two_neuron()
    on_m = [jnp.array([[1.0]]), jnp.array([[1.0]])]
    assert float(gj.weak_stability_threshold(net.loss, on_m)) == 1.0
    for criterion in ("lambda_max", "lambda_min_nonzero"):
        assert not gj.weakly_stable(net.loss, on_m, 1.0, criterion=criterion)
        assert gj.weakly_stable(net.loss, on_m, 1.0, criterion=criterion, inclusive=True)
    below, above = np.nextafter(1.0, 0.0), np.nextafter(1.0, 2.0)
    for inclusive in (False, True):
        assert gj.weakly_stable(net.loss, on_m, below, inclusive=inclusive)
        assert not gj.weakly_stable(net.loss, on_m, above, inclusive=inclusive)
    f = jax.jit(lambda e: gj.weakly_stable(net.loss, on_m, e, inclusive=True))
    assert f(1.0) and not f(above)
    with pytest.raises(ValueError, match="inclusive must be a bool"):
        gj.weakly_stable(net.loss, on_m, 1.0, inclusive="yes")
