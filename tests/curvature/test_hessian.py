"""Dense Hessians, spectra and the zero-aware eigenvalue counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gdlr_jax as gj


def quadratic(a):
    return lambda p: 0.5 * p["x"] @ a @ p["x"] + jnp.sum(p["y"] ** 2)


def test_hessian_of_a_pytree_quadratic():
    a = jnp.array([[2.0, 1.0], [1.0, -3.0]])
    params = {"x": jnp.ones(2), "y": jnp.zeros((1, 2))}
    h = gj.hessian(quadratic(a), params)
    expected = np.zeros((4, 4))
    expected[:2, :2] = a
    expected[2:, 2:] = 2 * np.eye(2)
    np.testing.assert_allclose(h, expected, atol=1e-14)
    np.testing.assert_allclose(
        gj.hessian_spectrum(quadratic(a), params), np.sort(np.linalg.eigvalsh(expected)), atol=1e-13
    )


def test_spectrum_counts_and_tolerance():
    lam = jnp.array([-2.0, -1e-17, 0.0, 3e-16, 1e-6, 5.0])
    np.testing.assert_array_equal(gj.spectrum_counts(lam), [1, 3, 2])
    np.testing.assert_array_equal(gj.spectrum_counts(lam, zero_rtol=1e-6), [1, 4, 1])
    batch = jnp.stack([lam, -lam])
    np.testing.assert_array_equal(gj.spectrum_counts(batch), [[1, 3, 2], [2, 3, 1]])
    np.testing.assert_array_equal(jax.jit(gj.spectrum_counts)(lam), [1, 3, 2])


def test_spectrum_counts_float32_tolerance_scales_with_eps():
    lam = jnp.array([0.0, 1e-6, 1.0], dtype=jnp.float32)  # 1e-6 is noise in float32
    np.testing.assert_array_equal(gj.spectrum_counts(lam), [0, 2, 1])
    np.testing.assert_array_equal(gj.spectrum_counts(lam.astype(jnp.float64)), [0, 1, 2])


def test_hessian_under_vmap_and_jit():
    loss = lambda p: jnp.sum(jnp.sin(p) * p**2)
    ps = jnp.linspace(-1.0, 1.0, 6).reshape(3, 2)
    batched = jax.jit(jax.vmap(lambda p: gj.hessian(loss, p)))(ps)
    for p, h in zip(ps, batched):
        np.testing.assert_allclose(h, jax.hessian(loss)(p), atol=1e-14)


def test_bad_input():
    with pytest.raises(ValueError, match="loss_fn must return a scalar, got an output of shape \\(2,\\)"):
        gj.hessian(lambda p: p * 2, jnp.ones(2))
    with pytest.raises(ValueError, match="params: the pytree has no array leaves"):
        gj.hessian(lambda p: 0.0, {})
    with pytest.raises(ValueError, match="floating-point"):
        gj.hessian(lambda p: jnp.sum(p), jnp.arange(3))
    with pytest.raises(ValueError, match="at least one axis"):
        gj.spectrum_counts(jnp.array(1.0))
    with pytest.raises(ValueError, match="zero_rtol must be a non-negative number, got -1.0"):
        gj.spectrum_counts(jnp.ones(3), zero_rtol=-1.0)
