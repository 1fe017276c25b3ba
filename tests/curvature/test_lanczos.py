"""Lanczos against dense float64 eigh: Ritz values, vectors, residual bounds, breakdowns,
precision of the state, one compilation per (operator, shapes, options)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from curvature_cases import SPECTRUM, symmetric_with_spectrum

import gdlr_jax as g

H = symmetric_with_spectrum(SPECTRUM)
D = SPECTRUM.size
EXACT = np.sort(SPECTRUM)


def nearest_eigenvalue_distance(values):
    return np.min(np.abs(np.asarray(values)[:, None] - EXACT[None, :]), axis=1)


def test_full_krylov_space_gives_the_whole_spectrum_with_multiplicities():
    """m = d: the Krylov space of one vector is exhausted (one copy of each distinct
    eigenvalue), breakdowns restart it, and every copy of -3 and 0 is found."""
    result = g.lanczos(H, num_iterations=D)
    np.testing.assert_allclose(result.ritz_values, EXACT, atol=1e-12)
    assert bool(jnp.all(result.converged))
    assert int(result.num_products) == D


def test_ritz_pairs_and_residual_bounds_are_honest():
    result = g.lanczos(H, num_iterations=25, return_vectors=True)
    y, theta = np.asarray(result.ritz_vectors), np.asarray(result.ritz_values)
    np.testing.assert_allclose(y @ y.T, np.eye(25), atol=1e-13)
    true_residuals = np.linalg.norm(y @ np.asarray(H) - theta[:, None] * y, axis=1)
    np.testing.assert_allclose(result.residual_bounds, true_residuals, rtol=1e-6, atol=1e-13)
    # Kahan: an eigenvalue within the residual of every Ritz value.
    assert np.all(nearest_eigenvalue_distance(theta) <= true_residuals + 1e-12)
    # Both ends converge first: the top three and the bottom one are exact to 1e-8.
    assert bool(jnp.all(result.converged[-3:])) and bool(result.converged[0])
    np.testing.assert_allclose(theta[-3:], EXACT[-3:], rtol=1e-8)
    np.testing.assert_allclose(theta[0], EXACT[0], rtol=1e-8)
    assert result.residual_bounds.dtype == jnp.float64


def test_block_lanczos_resolves_a_multiple_top_eigenvalue():
    spectrum = np.concatenate([[7.0, 7.0, 7.0, 6.0], np.linspace(-2, 2, 56)])
    h = symmetric_with_spectrum(spectrum, seed=1)
    block = g.lanczos(h, num_iterations=10, block_size=3)
    np.testing.assert_allclose(block.ritz_values[-4:], [6.0, 7.0, 7.0, 7.0], rtol=1e-8)


@pytest.mark.slow
def test_matvec_and_matrix_agree_and_the_state_follows_the_products_dtype():
    """float32 products: a float32 state by default, float64 with float64_state=True (one more
    digit: here 1e-5 against 1e-8 relative for lambda_max)."""
    matvec = lambda v: H @ v  # noqa: E731
    as_matrix = g.lanczos(H, num_iterations=20)
    as_matvec = g.lanczos(matvec, jnp.zeros(D), num_iterations=20)
    np.testing.assert_allclose(as_matvec.ritz_values, as_matrix.ritz_values, rtol=1e-13, atol=1e-13)
    h32 = H.astype(jnp.float32)
    single = g.lanczos(h32, num_iterations=20)
    assert single.ritz_values.dtype == jnp.float32 and single.projected_eigenvectors.dtype == jnp.float32
    wide = g.lanczos(h32, num_iterations=20, float64_state=True)
    assert wide.ritz_values.dtype == jnp.float64
    exact32 = np.linalg.eigvalsh(np.asarray(h32, np.float64))  # the float32 matrix's spectrum
    np.testing.assert_allclose(single.ritz_values[-1], exact32[-1], rtol=1e-5)
    np.testing.assert_allclose(wide.ritz_values[-1], exact32[-1], rtol=1e-8)


def test_float64_state_needs_x64():
    with (
        jax.enable_x64(False),
        pytest.raises(ValueError, match=r"float64_state=True needs float64"),
    ):
        g.lanczos(np.eye(3, dtype=np.float32), num_iterations=2, float64_state=True)


def _primitives_outside_cond(jaxpr) -> set[str]:
    """Names of the primitives of a jaxpr and its sub-jaxprs (loops, calls), not descending into
    the branches of a ``cond``."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        if eqn.primitive.name == "cond":
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names |= _primitives_outside_cond(inner)
    return names


def test_the_breakdown_restart_is_drawn_only_on_breakdown():
    """The random vector of a breakdown restart is drawn inside a ``cond`` on the breakdown
    flag, never at every step: with a given start, no random bits outside a cond."""
    jaxpr = jax.make_jaxpr(lambda v: g.lanczos(H, num_iterations=5, v0=v))(jnp.ones(D)).jaxpr
    outside = _primitives_outside_cond(jaxpr)
    assert "cond" in outside
    assert "random_bits" not in outside and "random_fold_in" not in outside


def test_the_symmetry_of_a_dense_operator_is_checked():
    """[[0, 1], [0, 0]]: Lanczos would return 0.742, an eigenvalue of neither the matrix nor its
    symmetric part; the check names the asymmetry instead."""
    with pytest.raises(
        ValueError,
        match=r"must be symmetric, got max \|A - A\^T\| = 1 at \(0, 1\) \(A\[0, 1\] = 1.0, A\[1, 0\] = 0.0\)",
    ):
        g.lanczos(jnp.array([[0.0, 1.0], [0.0, 0.0]]), num_iterations=2)
    # rounding-level asymmetry of Q diag Q^T (here ~1e-15) passes
    g.lanczos(H, num_iterations=2)


@pytest.mark.slow
def test_warm_start_at_an_eigenvector_and_zero_start_break_down_cleanly():
    """v0 an exact eigenvector: H v0 is in span(v0) at once (breakdown), the basis continues
    from a random vector; v0 = 0 likewise. No NaN either way."""
    top_vector = jnp.linalg.eigh(H)[1][:, -1]
    warm = g.lanczos(H, num_iterations=30, v0=top_vector)
    np.testing.assert_allclose(warm.ritz_values[-3:], EXACT[-3:], rtol=1e-8)
    zero = g.lanczos(H, num_iterations=30, v0=jnp.zeros(D))
    assert bool(jnp.all(jnp.isfinite(zero.ritz_values)))
    np.testing.assert_allclose(zero.ritz_values[-1], EXACT[-1], rtol=1e-8)


@pytest.mark.slow
def test_jit_and_vmap_over_start_vectors_match_a_loop():
    starts = jnp.asarray(np.random.default_rng(2).normal(size=(3, D)))
    run = jax.jit(lambda v: g.lanczos(H, num_iterations=12, v0=v).ritz_values)
    batched = jax.vmap(run)(starts)
    for i in range(3):
        np.testing.assert_allclose(batched[i], run(starts[i]), rtol=1e-12, atol=1e-12)


def test_bad_input():
    with pytest.raises(
        ValueError, match=r"must be square \(d, d\) with d >= 1, got shape \(3, 4\)"
    ):
        g.lanczos(jnp.ones((3, 4)), num_iterations=2)
    with pytest.raises(ValueError, match="params must be None when operator is a dense matrix"):
        g.lanczos(H, jnp.zeros(D), num_iterations=2)
    with pytest.raises(ValueError, match="params is required when operator is a callable"):
        g.lanczos(lambda v: v, num_iterations=2)
    with pytest.raises(ValueError, match=r"params of shape \(60,\) and an output of shape \(59,\)"):
        g.lanczos(lambda v: v[1:], jnp.zeros(D), num_iterations=2)
    with pytest.raises(ValueError, match="operator: 1 of 3600 entries are not finite"):
        g.lanczos(H.at[0, 0].set(jnp.inf), num_iterations=2)
    with pytest.raises(ValueError, match=r"v0 must have shape \(d,\) = \(60,\) .* got \(59,\)"):
        g.lanczos(H, num_iterations=2, v0=jnp.ones(D - 1))
    with pytest.raises(ValueError, match="v0: 60 of 60 entries are not finite"):
        g.lanczos(H, num_iterations=2, v0=jnp.full(D, jnp.nan))
    with pytest.raises(ValueError, match=r"block_size=2 disagrees with v0 of shape \(3, 60\)"):
        g.lanczos(H, num_iterations=2, v0=jnp.ones((3, D)), block_size=2)
    with pytest.raises(ValueError, match="block_size=61 exceeds the dimension d = 60"):
        g.lanczos(H, num_iterations=1, block_size=61)
    with pytest.raises(ValueError, match="num_iterations must be a positive integer, got 0"):
        g.lanczos(H, num_iterations=0)
    with pytest.raises(ValueError, match=r"= 31 \* 2 = 62 exceeds the dimension d = 60"):
        g.lanczos(H, num_iterations=31, block_size=2)
    with pytest.raises(ValueError, match="rtol must be a non-negative number or None, got -1"):
        g.lanczos(H, num_iterations=2, rtol=-1)
    with pytest.raises(ValueError, match="float64_state must be True or False, got 'yes'"):
        g.lanczos(H, num_iterations=2, float64_state="yes")
