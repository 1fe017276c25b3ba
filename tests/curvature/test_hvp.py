"""Hessian-vector products: against the dense Hessian, batched exactly, vmapped, in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from curvature_cases import small_mlp
from jax.flatten_util import ravel_pytree

import gdlr_jax as g


def pytree_loss(params):
    """A non-quadratic loss of a dict pytree with a matrix and a vector leaf."""
    w, b = params["w"], params["b"]
    return jnp.sum(jnp.tanh(w @ b) ** 2) + 0.1 * jnp.sum(b**4) + jnp.sum(w**2 * b[None, :]) ** 2


PARAMS = {
    "w": jnp.asarray(np.random.default_rng(1).normal(size=(3, 4))),
    "b": jnp.asarray(np.random.default_rng(2).normal(size=(4,))),
}


def test_hvp_matches_dense_hessian_on_pytrees():
    theta, unravel = ravel_pytree(PARAMS)
    dense = g.hessian(pytree_loss, PARAMS)
    v = jnp.asarray(np.random.default_rng(3).normal(size=theta.shape))
    out = g.hvp(pytree_loss, PARAMS, unravel(v))
    assert jax.tree.structure(out) == jax.tree.structure(PARAMS)
    np.testing.assert_allclose(ravel_pytree(out)[0], dense @ v, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        g.hessian_matvec(pytree_loss, PARAMS)(v), dense @ v, rtol=1e-12, atol=1e-12
    )


def test_matvec_vmaps_over_many_vectors_and_jits():
    matvec = g.hessian_matvec(pytree_loss, PARAMS)
    vectors = jnp.asarray(np.random.default_rng(4).normal(size=(5, 16)))
    batched = jax.jit(jax.vmap(matvec))(vectors)
    looped = jnp.stack([matvec(v) for v in vectors])
    np.testing.assert_allclose(batched, looped, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        batched, vectors @ g.hessian(pytree_loss, PARAMS), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize(
    "batch_size", [7, *(pytest.param(b, marks=pytest.mark.slow) for b in (None, 1, 5, 24, 100))]
)
def test_batched_products_are_exactly_the_full_batch_product(batch_size):
    """24 examples in batches of 5 (4 full + a last one of 4) or 7 (3 + 3): weights n_b/n."""
    loss_fn, params, batch = small_mlp(n=24)
    full = g.hessian(lambda p: loss_fn(p, batch), params)
    v = jnp.asarray(np.random.default_rng(5).normal(size=full.shape[0]))
    matvec = jax.jit(g.hessian_matvec(loss_fn, params, data=batch, batch_size=batch_size))
    np.testing.assert_allclose(matvec(v), full @ v, rtol=1e-11, atol=1e-13)


@pytest.mark.slow
def test_float32_products_stay_in_float32():
    loss_fn, params, batch = small_mlp()
    params32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    batch32 = (batch[0].astype(jnp.float32), batch[1])
    v = jnp.asarray(np.random.default_rng(6).normal(size=ravel_pytree(params)[0].shape))
    out32 = g.hessian_matvec(loss_fn, params32, data=batch32)(v)
    out64 = g.hessian_matvec(loss_fn, params, data=batch)(v)
    assert out32.dtype == jnp.float32
    np.testing.assert_allclose(out32, out64, rtol=1e-4, atol=1e-4 * float(jnp.abs(out64).max()))


def test_bad_input():
    loss_fn, params, batch = small_mlp()
    with pytest.raises(ValueError, match="batch_size=4 needs data"):
        g.hvp(pytree_loss, PARAMS, PARAMS, batch_size=4)
    with pytest.raises(ValueError, match="batch_size must be a positive integer or None, got 0"):
        g.hessian_matvec(loss_fn, params, data=batch, batch_size=0)
    with pytest.raises(ValueError, match=r"same non-zero leading size n.*\(24, 6\), \(23,\)"):
        g.hessian_matvec(loss_fn, params, data=(batch[0], batch[1][:23]), batch_size=4)
    with pytest.raises(ValueError, match="tangents must have the structure and leaf shapes"):
        g.hvp(pytree_loss, PARAMS, {"w": PARAMS["w"], "b": PARAMS["b"][:3]})
    bad = {"w": PARAMS["w"].at[1, 2].set(jnp.nan), "b": PARAMS["b"]}
    with pytest.raises(ValueError, match=r"params\['w'\]: 1 of 12 entries are not finite"):
        g.hessian_matvec(pytree_loss, bad)
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        g.hessian_matvec(lambda p: p["b"], PARAMS)
