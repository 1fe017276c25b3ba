"""Stochastic Lanczos quadrature: exact moments, unit mass, agreement with the dense spectrum."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from curvature_cases import small_mlp, symmetric_with_spectrum

import gdlr_jax as g

RNG = np.random.default_rng(0)
# A bulk near 0, a cluster in [1, 2] and outliers on both sides.
SPECTRUM = np.concatenate([RNG.normal(0, 0.3, 280), [-2.0, 3.0, 4.0, 6.0], RNG.uniform(1, 2, 16)])
H = symmetric_with_spectrum(SPECTRUM)
GRID = jnp.linspace(-4, 8, 1201)
SIGMA = 0.1


def broadened(points, eigenvalues, sigma):
    z = (np.asarray(points)[:, None] - np.asarray(eigenvalues)[None, :]) / sigma
    return np.exp(-0.5 * z**2).sum(1) / (sigma * np.sqrt(2 * np.pi) * np.size(eigenvalues))


def bin_masses(density, grid, edges):
    cumulative = np.concatenate([[0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(grid))])
    return np.diff(np.interp(edges, grid, cumulative))


@pytest.fixture(scope="module")
def rademacher():
    return g.stochastic_lanczos_quadrature(
        H, num_iterations=40, num_probes=20, key=jax.random.key(0)
    )


def test_quadrature_rules_are_gauss_rules_of_the_probes(rademacher):
    """Weights sum to 1, nodes lie in [lambda_min, lambda_max], and the moments
    sum_i w_i theta_i^j equal u^T H^j u for j < 2m (here j = 1, 2, 3)."""
    nodes, weights = rademacher
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)
    assert (
        float(nodes.min()) >= SPECTRUM.min() - 1e-9 and float(nodes.max()) <= SPECTRUM.max() + 1e-9
    )
    probes = np.asarray(
        jax.random.rademacher(
            jax.random.split(jax.random.key(0))[0], (20, SPECTRUM.size), jnp.float64
        )
    )
    u = probes / np.sqrt(SPECTRUM.size)
    power = np.eye(SPECTRUM.size)
    for j in (1, 2, 3):
        power = power @ np.asarray(H)
        np.testing.assert_allclose(
            (weights * nodes**j).sum(1), np.einsum("pi,ij,pj->p", u, power, u), rtol=1e-10
        )


def test_density_has_unit_mass_and_matches_the_dense_spectrum(rademacher):
    density = np.asarray(g.spectral_density(rademacher, GRID, SIGMA))
    grid = np.asarray(GRID)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-8)
    exact = broadened(grid, np.linalg.eigvalsh(np.asarray(H)), SIGMA)
    assert np.trapezoid(np.abs(density - exact), grid) < 0.05
    edges = np.linspace(-2.5, 6.5, 10)
    histogram = np.histogram(SPECTRUM, edges)[0] / SPECTRUM.size
    np.testing.assert_allclose(bin_masses(density, grid, edges), histogram, atol=0.04)


@pytest.mark.slow
def test_gaussian_probes_give_the_same_density():
    quadrature = g.stochastic_lanczos_quadrature(
        H, num_iterations=40, num_probes=20, key=jax.random.key(1), probe="gaussian"
    )
    density = np.asarray(g.spectral_density(quadrature, GRID, SIGMA))
    assert np.trapezoid(density, np.asarray(GRID)) == pytest.approx(1.0, abs=1e-8)
    exact = broadened(GRID, SPECTRUM, SIGMA)
    assert np.trapezoid(np.abs(density - exact), np.asarray(GRID)) < 0.06


@pytest.mark.slow
def test_log_view_resolves_a_bulk_spread_over_decades():
    """190 eigenvalues 10^s, s uniform in [-6, 1], and 10 negative ones in [-10, -0.1]."""
    s = np.random.default_rng(2).uniform(-6, 1, 190)
    spectrum = np.concatenate([10.0**s, -(10.0 ** np.linspace(-1, 1, 10))])
    quadrature = g.stochastic_lanczos_quadrature(
        symmetric_with_spectrum(spectrum, seed=3),
        num_iterations=100,
        num_probes=20,
        key=jax.random.key(2),
    )
    grid = np.linspace(-9, 3, 1201)
    positive, negative = (np.asarray(x) for x in g.log_spectral_density(quadrature, grid, 0.2))
    assert np.trapezoid(positive + negative, grid) == pytest.approx(1.0, abs=1e-6)
    assert np.trapezoid(negative, grid) == pytest.approx(0.05, abs=0.01)
    edges = np.linspace(-6, 1, 5)
    histogram = np.histogram(s, edges)[0] / spectrum.size
    np.testing.assert_allclose(bin_masses(positive, grid, edges), histogram, atol=0.05)


@pytest.mark.slow
def test_density_of_a_loss_hessian_vmaps_its_products_over_probes():
    loss_fn, params, batch = small_mlp()
    loss = lambda p: loss_fn(p, batch)  # noqa: E731
    quadrature = g.stochastic_lanczos_quadrature(
        loss, params, num_iterations=20, num_probes=4, key=jax.random.key(3)
    )
    exact = np.asarray(g.hessian_spectrum(loss, params))
    grid = np.linspace(exact[0] - 1, exact[-1] + 1, 2001)
    density = np.asarray(g.spectral_density(quadrature, grid, 0.05))
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-6)
    # The first moment is exact per probe: its mean estimates tr(H) / d.
    first = float(jnp.mean(jnp.sum(quadrature.weights * quadrature.nodes, axis=1)))
    assert first == pytest.approx(exact.mean(), abs=4 * exact.std() / np.sqrt(4 * exact.size))


def test_bad_input(rademacher):
    with pytest.raises(ValueError, match="probe must be one of .*, got 'uniform'"):
        g.stochastic_lanczos_quadrature(
            H, num_iterations=4, num_probes=2, key=jax.random.key(0), probe="uniform"
        )
    with pytest.raises(ValueError, match="num_probes must be a positive integer, got 0"):
        g.stochastic_lanczos_quadrature(H, num_iterations=4, num_probes=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"exceeds the dimension d = 300"):
        g.stochastic_lanczos_quadrature(H, num_iterations=301, num_probes=1, key=jax.random.key(0))
    with pytest.raises(
        ValueError, match=r"grid must be a 1-D array of at least 2 points, got shape \(2, 3\)"
    ):
        g.spectral_density(rademacher, jnp.ones((2, 3)), SIGMA)
    with pytest.raises(ValueError, match="sigma must be a positive finite number, got 0"):
        g.log_spectral_density(rademacher, GRID, 0)
