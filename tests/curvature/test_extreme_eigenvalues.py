"""Top, bottom and smallest non-zero eigenvalues and the spectrum of DG, against dense eigh;
the tolerance stop, the result type, pytree eigenvectors, one compilation per call pattern."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from curvature_cases import (
    SPECTRUM,
    count_compilations,
    linear_network_at_minimum,
    small_mlp,
    symmetric_with_spectrum,
)
from hypothesis import given, settings
from jax.flatten_util import ravel_pytree
from strategies import examples, linear_networks

import gdlr_jax as g

H = symmetric_with_spectrum(SPECTRUM)


@pytest.mark.slow
def test_sharpness_is_the_largest_algebraic_eigenvalue_not_the_largest_magnitude():
    """|lambda_min| = 12 > lambda_max = 5: the sharpness is 5, power iteration would say -12."""
    top = g.top_eigenvalues(H, k=3)
    np.testing.assert_allclose(top, [5.0, 4.5, 4.0], rtol=1e-8)
    np.testing.assert_allclose(g.bottom_eigenvalues(H, k=3), [-12.0, -3.0, -3.0], rtol=1e-8)


@pytest.mark.slow
def test_top_and_bottom_of_an_mlp_hessian_match_dense_eigh():
    loss_fn, params, batch = small_mlp()
    loss = lambda p: loss_fn(p, batch)  # noqa: E731
    dense = np.asarray(g.hessian(loss, params))
    exact = np.linalg.eigvalsh(dense)
    values, vectors = g.top_eigenvalues(loss, params, 4, return_vectors=True, flat_vectors=True)
    np.testing.assert_allclose(values, exact[::-1][:4], rtol=1e-8)
    np.testing.assert_allclose(vectors @ dense, values[:, None] * vectors, atol=1e-7)
    np.testing.assert_allclose(g.bottom_eigenvalues(loss, params, 2), exact[:2], rtol=1e-8)


@pytest.mark.slow
def test_eigenvectors_are_pytrees_like_params_and_warm_start_as_v0():
    loss_fn, params, batch = small_mlp()
    loss = lambda p: loss_fn(p, batch)  # noqa: E731
    pairs = g.extreme_eigenpairs(loss, params, 2, return_vectors=True)
    flat = g.extreme_eigenpairs(loss, params, 2, return_vectors=True, flat_vectors=True)
    assert jax.tree.structure(pairs.eigenvectors) == jax.tree.structure(params)
    for vec, leaf in zip(jax.tree.leaves(pairs.eigenvectors), jax.tree.leaves(params)):
        assert vec.shape == (2,) + leaf.shape
    rows = jnp.stack(
        [ravel_pytree(jax.tree.map(lambda x, i=i: x[i], pairs.eigenvectors))[0] for i in (0, 1)]
    )
    np.testing.assert_array_equal(rows, flat.eigenvectors)
    # the top eigenvector as a pytree warm-starts a new run, which stops at once
    top = jax.tree.map(lambda x: x[0], pairs.eigenvectors)
    warm = g.extreme_eigenpairs(loss, params, 1, v0=top)
    np.testing.assert_allclose(warm.eigenvalues, pairs.eigenvalues[:1], rtol=1e-10)
    assert int(warm.num_products) < int(pairs.num_products)


@pytest.mark.slow
def test_the_tolerance_stop_reports_what_it_reached():
    """rtol=1e-6: stops before the iteration budget with the wanted pairs converged, their
    bounds honest (true residuals below them) and the eigenvalues right to ~bound^2/gap;
    rtol=0: every iteration."""
    dense = np.asarray(H)
    pairs = g.extreme_eigenpairs(H, k=3, rtol=1e-6, num_iterations=50, return_vectors=True)
    assert bool(jnp.all(pairs.converged))
    assert 3 <= int(pairs.num_products) < 50
    scale = np.abs(SPECTRUM).max()
    assert np.all(np.asarray(pairs.residual_bounds) <= 1e-6 * scale * (1 + 1e-12))
    y = np.asarray(pairs.eigenvectors)
    true = np.linalg.norm(y @ dense - np.asarray(pairs.eigenvalues)[:, None] * y, axis=1)
    assert np.all(true <= np.asarray(pairs.residual_bounds) * (1 + 1e-6) + 1e-13)
    np.testing.assert_allclose(pairs.eigenvalues, [5.0, 4.5, 4.0], rtol=1e-8)
    full = g.extreme_eigenpairs(H, k=3, rtol=0, num_iterations=50)
    assert int(full.num_products) == 50 and not bool(jnp.any(full.converged))
    block = g.extreme_eigenpairs(H, k=3, which="bottom", block_size=2)
    np.testing.assert_allclose(block.eigenvalues, [-12.0, -3.0, -3.0], rtol=1e-8)
    assert int(block.num_products) % 2 == 0


def test_repeated_eager_calls_compile_once():
    """The documented eager use: after the first call, new params (same shapes), a new v0, key
    or rtol compile nothing."""
    loss_fn, params, batch = small_mlp()
    loss = lambda p: loss_fn(p, batch)  # noqa: E731
    g.top_eigenvalues(loss, params, 2)
    moved = jax.tree.map(lambda x: 1.01 * x, params)
    with count_compilations() as compilations:
        for i, point in enumerate((params, moved, params)):
            jax.block_until_ready(g.top_eigenvalues(loss, point, 2, key=jax.random.key(i)))
            jax.block_until_ready(g.extreme_eigenpairs(loss, point, 2, rtol=1e-5 * (i + 1)))
    assert compilations == []


@pytest.mark.slow
def test_repeated_eager_calls_of_every_routine_compile_once():
    """The same for the spectral density and plain Lanczos; a new k or dtype compiles once."""
    loss_fn, params, batch = small_mlp()
    loss = lambda p: loss_fn(p, batch)  # noqa: E731
    g.stochastic_lanczos_quadrature(loss, params, num_iterations=6, num_probes=3)
    g.lanczos(loss, params, num_iterations=6)
    moved = jax.tree.map(lambda x: 1.01 * x, params)
    with count_compilations() as compilations:
        for i, point in enumerate((params, moved, params)):
            g.stochastic_lanczos_quadrature(
                loss, point, num_iterations=6, num_probes=3, key=jax.random.key(i)
            )
            g.lanczos(loss, point, num_iterations=6)
    assert compilations == []
    with count_compilations() as compilations:
        g.top_eigenvalues(loss, params, 3)
        g.top_eigenvalues(loss, params, 3)
    assert len(compilations) == 1


@pytest.mark.slow
def test_matvec_operator_with_flat_params():
    loss_fn, params, batch = small_mlp()
    theta = ravel_pytree(params)[0]
    matvec = g.hessian_matvec(loss_fn, params, data=batch, batch_size=10)
    exact = np.asarray(g.hessian_spectrum(lambda p: loss_fn(p, batch), params))
    np.testing.assert_allclose(g.top_eigenvalues(matvec, theta, 2), exact[::-1][:2], rtol=1e-8)


@pytest.mark.slow
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
        value, vector = g.top_eigenvalues(
            loss, p, 1, v0=v0, num_iterations=30, return_vectors=True, flat_vectors=True
        )
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


@pytest.mark.slow
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


@pytest.mark.slow
@settings(max_examples=examples(3))
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


@pytest.mark.slow
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
    with pytest.raises(ValueError, match="which must be one of \\('top', 'bottom'\\), got 'LA'"):
        g.extreme_eigenpairs(H, k=1, which="LA")
    with pytest.raises(ValueError, match="must be symmetric"):
        g.top_eigenvalues(jnp.array([[0.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"v0: a pytree start must have the structure of params"):
        g.top_eigenvalues(loss, params, v0=jax.tree.map(lambda x: x[..., :1], params))
    with pytest.raises(ValueError, match="zero_rtol must be a non-negative number or None"):
        g.smallest_nonzero_eigenvalue(H, zero_rtol=-1.0)
