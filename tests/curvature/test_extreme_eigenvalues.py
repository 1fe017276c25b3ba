"""Top, bottom and smallest non-zero eigenvalues and the spectrum of DG, against dense eigh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from curvature_cases import SPECTRUM, linear_network_at_minimum, small_mlp, symmetric_with_spectrum
from hypothesis import given, settings
from jax.flatten_util import ravel_pytree
from strategies import linear_networks

import gdlr_jax as g

H = symmetric_with_spectrum(SPECTRUM)


def test_sharpness_is_the_largest_algebraic_eigenvalue_not_the_largest_magnitude():
    """|lambda_min| = 12 > lambda_max = 5: the sharpness is 5, power iteration would say -12."""
    top = g.top_eigenvalues(H, k=3)
    np.testing.assert_allclose(top, [5.0, 4.5, 4.0], rtol=1e-8)
    np.testing.assert_allclose(g.bottom_eigenvalues(H, k=3), [-12.0, -3.0, -3.0], rtol=1e-8)


def test_top_and_bottom_of_an_mlp_hessian_match_dense_eigh():
    loss_fn, params, batch = small_mlp()
    loss = lambda p: loss_fn(p, batch)  # noqa: E731
    dense = np.asarray(g.hessian(loss, params))
    exact = np.linalg.eigvalsh(dense)
    values, vectors = g.top_eigenvalues(loss, params, 4, return_vectors=True)
    np.testing.assert_allclose(values, exact[::-1][:4], rtol=1e-8)
    np.testing.assert_allclose(vectors @ dense, values[:, None] * vectors, atol=1e-7)
    np.testing.assert_allclose(g.bottom_eigenvalues(loss, params, 2), exact[:2], rtol=1e-8)


def test_matvec_operator_with_flat_params():
    loss_fn, params, batch = small_mlp()
    theta = ravel_pytree(params)[0]
    matvec = g.hessian_matvec(loss_fn, params, data=batch, batch_size=10)
    exact = np.asarray(g.hessian_spectrum(lambda p: loss_fn(p, batch), params))
    np.testing.assert_allclose(g.top_eigenvalues(matvec, theta, 2), exact[::-1][:2], rtol=1e-8)


def test_tracking_along_trajectories_under_jit_and_vmap_with_warm_starts():
    """The engine's use: a batch of points, each warm-started from its previous Ritz vector;
    vmapped results equal a loop, and new points do not recompile."""
    loss_fn, params, batch = small_mlp()
    loss = lambda p: loss_fn(p, batch)  # noqa: E731
    points = jax.tree.map(
        lambda x: x[None] + 0.1 * jnp.arange(3.0).reshape((3,) + (1,) * x.ndim), params
    )
    traces = []

    def sharpness(p, v0):
        traces.append(None)
        value, vector = g.top_eigenvalues(loss, p, 1, v0=v0, num_iterations=30, return_vectors=True)
        return value[0], vector[0]

    run = jax.jit(jax.vmap(sharpness))
    d = ravel_pytree(params)[0].size
    first, vectors = run(points, jnp.ones((3, d)))
    second, _ = run(jax.tree.map(lambda x: x * 1.001, points), vectors)
    assert len(traces) == 1
    for i in range(3):
        point = jax.tree.map(lambda x: x[i], points)
        assert float(first[i]) == pytest.approx(
            float(g.hessian_spectrum(loss, point)[-1]), rel=1e-8
        )
    assert bool(jnp.all(jnp.isfinite(second)))


def test_smallest_nonzero_on_a_linear_network_with_and_without_deflation():
    net, params, null_space = linear_network_at_minimum()
    exact = np.asarray(g.hessian_spectrum(net.loss, params))
    positive = exact[exact > 1e-8 * exact[-1]]
    assert positive.size == net.num_nonzero_eigenvalues  # Prop. 10
    deflated = g.smallest_nonzero_eigenvalue(
        net.loss, params, null_space=null_space, num_iterations=8
    )
    thresholded = g.smallest_nonzero_eigenvalue(net.loss, params)
    np.testing.assert_allclose(deflated, positive[0], rtol=1e-8)
    np.testing.assert_allclose(thresholded, positive[0], rtol=1e-8)


@settings(max_examples=3)
@given(linear_networks(max_depth=3, filling=True))
def test_smallest_nonzero_with_the_tangent_space_of_random_linear_networks(net):
    params = net.sample_minimum(jax.random.key(1))
    hessian = g.hessian(net.loss, params)
    exact = np.asarray(jnp.linalg.eigvalsh(hessian))
    flat, unravel = ravel_pytree(params)
    jac = jax.jacfwd(lambda t: net.product(unravel(t)).ravel())(flat)  # T_theta M = ker D mu
    _, _, vt = np.linalg.svd(np.asarray(jac))
    null_space = vt[net.num_nonzero_eigenvalues :]
    assert null_space.shape[0] == net.minima_dim
    value = g.smallest_nonzero_eigenvalue(
        net.loss, params, null_space=null_space, num_iterations=net.num_params - net.minima_dim
    )
    np.testing.assert_allclose(value, exact[net.minima_dim], rtol=1e-8)


def test_gd_map_spectrum_matches_the_dense_jacobian_for_many_step_sizes():
    eta = jnp.asarray([0.05, 0.3, 0.45])
    out = jax.jit(lambda e: g.gd_map_spectrum(H, eta=e, k=2, num_iterations=40))(eta)
    for i, e in enumerate(eta):
        mu = np.sort(np.linalg.eigvalsh(np.eye(H.shape[0]) - float(e) * np.asarray(H)))
        np.testing.assert_allclose(out.largest[i], mu[::-1][:2], rtol=1e-8)
        np.testing.assert_allclose(out.smallest[i], mu[:2], rtol=1e-8)
        np.testing.assert_allclose(out.spectral_radius[i], np.max(np.abs(mu)), rtol=1e-8)
    # lambda_min = -12 < 0: the bottom of H sets rho(DG) = 1 + 12 eta > 1 for every eta.
    np.testing.assert_allclose(out.spectral_radius, out.largest[:, 0], rtol=1e-12)


def test_gd_map_spectrum_of_a_loss_agrees_with_the_dense_gd_map():
    loss_fn, params, batch = small_mlp()
    loss = lambda p: loss_fn(p, batch)  # noqa: E731
    out = g.gd_map_spectrum(loss, params, eta=2.0, k=1)
    np.testing.assert_allclose(
        out.spectral_radius, g.gd_map_spectral_radius(loss, params, 2.0), rtol=1e-8
    )


def test_bad_input():
    loss_fn, params, batch = small_mlp()
    loss = lambda p: loss_fn(p, batch)  # noqa: E731
    with pytest.raises(ValueError, match="k = 61 exceeds the dimension d = 60"):
        g.top_eigenvalues(H, k=61)
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        g.bottom_eigenvalues(H, k=0)
    with pytest.raises(ValueError, match=r"= 3 \* 1 = 3 is too small for k = 5"):
        g.top_eigenvalues(H, k=5, num_iterations=3)
    nan_params = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), params)
    with pytest.raises(ValueError, match=r"params.*: 1 of \d+ entries are not finite"):
        g.top_eigenvalues(loss, nan_params)
    with pytest.raises(ValueError, match=r"null_space must have shape \(r, d\) = \(r, 60\)"):
        g.smallest_nonzero_eigenvalue(H, null_space=jnp.ones((2, 59)))
    with pytest.raises(ValueError, match="eta: 1 of 2 entries are not finite"):
        g.gd_map_spectrum(H, eta=jnp.asarray([0.1, jnp.inf]))
    with pytest.raises(
        ValueError, match=r"operator: a callable must be a loss .* output of shape \(3,\)"
    ):
        g.top_eigenvalues(lambda p: p["w"][0], {"w": jnp.ones((2, 3))})
