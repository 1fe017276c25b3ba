"""Tests of gdlr_jax.estimate_critical_step_size against the exact eta_E of linear networks and
for reproducibility on an MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gdlr_jax
from gdlr_jax import linear
from gdlr_jax.engine._critical_step_estimate import wilson_interval


def _uniform_starts(
    rng: np.random.Generator, n: int, depth: int, low: float, high: float
):
    values = rng.uniform(low, high, (n, depth))
    return [jnp.asarray(values[:, i]).reshape(n, 1, 1) for i in range(depth)]


def _check_against_exact(estimate, eta_e: float, rtol: float) -> None:
    """Above eta_E no minimum is weakly stable (Thm. 18, 21), so no step size above it is
    certified converging: ``low <= eta_E``. Below it, GD from these starts reaches the
    weakly stable minima near the flattest one, more slowly as eta -> eta_E (the contraction
    there is ``|1 - eta lambda| -> 1``); with the steps given, a share above the threshold
    converges up to within ``rtol`` of eta_E, so ``high >= eta_E (1 - rtol)`` and the
    bracket, ``rtol`` wide, holds ``eta_E`` to within ``rtol``."""
    low, high = estimate.interval
    assert estimate.resolved
    assert low <= eta_e * (1 + 1e-9)
    assert high >= eta_e * (1 - rtol)
    assert abs(estimate.eta - eta_e) <= 2 * rtol * eta_e
    # a converged point of M is no flatter than the flattest: 2 / lambda_max <= eta_E
    assert estimate.sharpness_bound <= eta_e * (1 + 1e-6)
    assert estimate.sharpness_bound >= low * (
        1 - 1e-6
    )  # converged at `low`: stable there


@pytest.mark.slow  # several sweeps
def test_two_neuron_collapse_is_eta_e():
    network = linear.two_neuron(jnp.float64)
    params0 = _uniform_starts(np.random.default_rng(0), 128, 2, 0.5, 1.5)
    estimate = gdlr_jax.estimate_critical_step_size(
        network.loss,
        params0,
        (0.2, 2.0),
        steps=4000,
        min_loss_value=0.0,
        dtype=jnp.float64,
    )
    _check_against_exact(
        estimate, gdlr_jax.critical_step_size(network).closed_form, 0.01
    )
    assert estimate.trials == 128
    assert estimate.num_trajectories == estimate.etas.size * 128
    assert estimate.num_sweeps <= 8
    np.testing.assert_array_equal(estimate.etas, np.sort(estimate.etas))
    # the certificates behind the bracket
    at_low = estimate.etas == estimate.interval[0]
    at_high = estimate.etas == estimate.interval[1]
    assert estimate.share_bounds[at_low, 0] > estimate.threshold
    assert estimate.share_bounds[at_high, 1] < estimate.threshold


@pytest.mark.slow  # several sweeps
@pytest.mark.parametrize(
    "network",
    [
        linear.deep_scalar(3, dtype=jnp.float64),  # eta_E = 2/3
        linear.LinearNetwork(  # filling, whitened data: eta_E = 1 / (scale c h sigma_1^(2-2/h))
            (2, 3, 2), jnp.eye(2), jnp.diag(jnp.array([1.2, 0.5])), scale=0.5
        ),
    ],
    ids=["deep_scalar_3", "widths_2_3_2"],
)
def test_linear_network_collapse_is_eta_e(network):
    eta_e = gdlr_jax.critical_step_size(network).closed_form
    key = jax.random.PRNGKey(0)
    # starts near M: minima of M perturbed by 10% noise
    minima = jax.vmap(lambda k: network.sample_minimum(k, spread=0.3))(
        jax.random.split(key, 128)
    )
    noise_keys = jax.random.split(jax.random.PRNGKey(1), len(minima))
    params0 = [
        w + 0.1 * jax.random.normal(k, w.shape, w.dtype)
        for w, k in zip(minima, noise_keys)
    ]
    estimate = gdlr_jax.estimate_critical_step_size(
        network.loss,
        params0,
        (0.2 * eta_e, 2 * eta_e),
        steps=4000,
        min_loss_value=0.0,
        dtype=jnp.float64,
    )
    _check_against_exact(estimate, eta_e, 0.02)


@pytest.mark.slow  # several sweeps
def test_mlp_estimate_is_reproducible_across_seeds():
    """Two draws of 32 initialisations of a tiny GELU MLP (4 -> 16 -> 2, MSE, 8 synthetic
    examples it can interpolate): each estimate lies in the other's interval (the two
    brackets certify the same crossing of the threshold)."""
    rng = np.random.default_rng(0)
    batch = (
        jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
        jnp.asarray(rng.integers(0, 2, 8), jnp.int32),
    )
    architecture = {"depth": 1, "width": 16, "in_features": 4}
    graphdef, _ = gdlr_jax.mlp.init_mlp_params(jax.random.PRNGKey(0), 1, **architecture)
    loss = gdlr_jax.mlp.mlp_loss(graphdef)

    def full_batch_loss(params):
        return loss(params, batch)

    estimates = []
    for seed in (1, 2):
        _, params0 = gdlr_jax.mlp.init_mlp_params(
            jax.random.PRNGKey(seed), 32, **architecture
        )
        estimates.append(
            gdlr_jax.estimate_critical_step_size(
                full_batch_loss,
                params0,
                (0.25, 4.0),
                steps=1000,
                threshold=0.5,
                rtol=0.1,
                max_rounds=4,
                etas_per_round=6,
                criteria=gdlr_jax.ConvergenceCriteria(grad_tol=1e-3, step_tol=1e-3),
                sharpness_points=4,
            )
        )
    for a, b in (estimates, estimates[::-1]):
        low, high = b.interval
        assert low <= a.eta <= high
        # 32 trials resolve the crossing of 1/2 to where the Wilson intervals straddle it
        assert a.interval[1] - a.interval[0] <= 0.15 * a.eta
        assert a.sharpness_bound is not None and a.sharpness_bound > 0


def test_wilson_interval_matches_the_formula():
    bounds = wilson_interval(np.array([0, 5, 10]), 10, 0.95)
    z = 1.959963984540054
    p = 0.5
    centre = (p + z * z / 20) / (1 + z * z / 10)
    half = z * np.sqrt(p * (1 - p) / 10 + z * z / 400) / (1 + z * z / 10)
    np.testing.assert_allclose(bounds[1], [centre - half, centre + half])
    assert bounds[0, 0] == 0 and 0 < bounds[0, 1] < 0.3
    assert bounds[2, 1] == pytest.approx(1) and 0.7 < bounds[2, 0] < 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eta_range": (1.0, 0.5)}, r"eta_range must have 0 < eta_low < eta_high"),
        ({"eta_range": (0.0, 0.5)}, r"eta_range must have 0 < eta_low < eta_high"),
        ({"eta_range": 1.0}, r"eta_range must be two numbers"),
        ({"threshold": 1.0}, r"threshold must be in \(0, 1\), got 1.0"),
        ({"confidence": 0}, r"confidence must be in \(0, 1\)"),
        ({"etas_per_round": 1}, r"etas_per_round must be an integer >= 2, got 1"),
        ({"rtol": -1.0}, r"rtol must be a positive finite number"),
        ({"max_rounds": 0}, r"max_rounds must be an integer >= 1"),
        ({"sharpness_points": -1}, r"sharpness_points must be an integer >= 0"),
    ],
)
def test_bad_arguments_are_one_line_value_errors(kwargs, match):
    network = linear.two_neuron(jnp.float64)
    params0 = _uniform_starts(np.random.default_rng(0), 4, 2, 0.5, 1.5)
    arguments = {"eta_range": (0.5, 2.0), **kwargs}
    with pytest.raises(ValueError, match=match) as info:
        gdlr_jax.estimate_critical_step_size(
            network.loss, params0, steps=10, **arguments
        )
    assert "\n" not in str(info.value)
