"""eta_E = 2 / min_M lambda_max, computed, against every closed form (docs/theory.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gdlr_jax as gj
from gdlr_jax.linear import LinearNetwork, deep_scalar, two_neuron

FAST = dict(restarts=4, steps=600)


def test_two_neuron_eta_E_is_one():
    result = gj.critical_step_size(two_neuron(), **FAST)
    assert result.closed_form == 1.0
    assert result.eta == pytest.approx(1.0, rel=1e-10)
    # the minimiser is the balanced point |x| = |y| = 1
    np.testing.assert_allclose(np.abs([float(w[0, 0]) for w in result.params]), 1.0, rtol=1e-5)


@pytest.mark.parametrize("depth, x, y, scale", [(3, 1.0, 1.0, 0.5), (4, 1.3, 0.7, 1.0), (2, 2.0, -3.0, 0.25)])
def test_deep_scalar_closed_form(depth, x, y, scale):
    net = deep_scalar(depth, x=x, y=y, scale=scale)
    result = gj.critical_step_size(net, **FAST)
    expected = 1.0 / (scale * x**2 * depth * abs(y / x) ** (2 - 2 / depth))
    assert result.closed_form == pytest.approx(expected, rel=1e-14)
    assert result.eta == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("widths", [(2, 4, 3), (3, 3, 3), (2, 3, 3, 2), (1, 3, 2)])
def test_whitened_filling_closed_form(widths):
    rng = np.random.default_rng(sum(widths))
    c = 2.25
    net = LinearNetwork(widths, np.sqrt(c) * np.eye(widths[0]), rng.normal(size=(widths[-1], widths[0])))
    result = gj.critical_step_size(net, **FAST)
    sigma_1 = np.linalg.norm(np.asarray(net.target()), 2)
    h = net.depth
    assert result.closed_form == pytest.approx(1 / (0.5 * c * h * sigma_1 ** (2 - 2 / h)), rel=1e-12)
    assert result.eta == pytest.approx(result.closed_form, rel=1e-7)


def test_depth_one_is_least_squares_curvature():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3, 8))
    net = LinearNetwork((3, 2), X, rng.normal(size=(2, 8)), scale=1 / 8)
    result = gj.critical_step_size(net)
    expected = 1 / (net.scale * np.linalg.eigvalsh(X @ X.T)[-1])
    assert result.closed_form == pytest.approx(expected, rel=1e-12)
    assert result.eta == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("widths", [(3, 2, 4), (3, 1, 2, 3)])
def test_no_closed_form_case_is_certified_and_beats_sampling(widths):
    """Non-filling, unwhitened: the witness lies on M, eta = 2/lambda_max(witness), no sampled
    point of M is flatter, and no sampled minimum is weakly stable above eta_E (Thm. 18)."""
    rng = np.random.default_rng(5)
    net = LinearNetwork(widths, rng.normal(size=(widths[0], 6)), rng.normal(size=(widths[-1], 6)))
    result = gj.critical_step_size(net, **FAST)
    assert result.closed_form is None
    assert float(net.loss(result.params)) == pytest.approx(net.min_loss, rel=1e-10)
    assert result.eta == pytest.approx(2 / float(gj.hessian_spectrum(net.loss, result.params)[-1]), rel=1e-12)
    samples = net.sample_minimum(jax.random.PRNGKey(1), (512,), spread=0.5)
    thresholds = jax.jit(jax.vmap(lambda p: gj.weak_stability_threshold(net.loss, p)))(samples)
    assert float(jnp.max(thresholds)) <= result.eta * (1 + 1e-9)
    # restarts agree: one basin of the optimum found several times
    lams = np.sort(np.asarray(result.restart_lambda_max))
    assert lams[1] == pytest.approx(lams[0], rel=1e-4)


def test_bad_arguments():
    net = two_neuron()
    with pytest.raises(ValueError, match="restarts must be a positive integer"):
        gj.critical_step_size(net, restarts=0)
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        gj.critical_step_size(net, learning_rate=-1.0)
