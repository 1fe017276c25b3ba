"""Rayleigh-Ritz pairs from the coefficients of a Lanczos basis (layer 2: curvature): the
projected matrix ``T``, its eigenpairs and their residual bounds, the wanted end of the
spectrum, and the results the core returns (:class:`LanczosResult`, :class:`EndPairs`)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from gdlr_jax.curvature._hessian import PyTree
from gdlr_jax.curvature._lanczos_inputs import CoreSpec


class LanczosResult(NamedTuple):
    """Rayleigh-Ritz pairs of ``H`` on the (block) Krylov basis built by :func:`lanczos`.

    With ``m`` iterations of block size ``p`` the orthonormal basis ``V`` has ``q = m p``
    vectors and ``T = V^T H V`` is ``(q, q)``.

    Attributes:
        ritz_values: ``(q,)`` eigenvalues of ``T``, ascending.
        ritz_vectors: ``(q, d)`` Ritz vectors ``y_i = V s_i`` (flat rows, unit norm), or None
            when not requested (``return_vectors``).
        residual_bounds: ``(q,)`` bounds on ``||H y_i - theta_i y_i||``; by the Bauer-Fike /
            Kahan theorem some eigenvalue of ``H`` lies within ``residual_bounds[i]`` of
            ``ritz_values[i]`` (within ``residual_bounds[i]**2 / gap`` when the rest of the
            spectrum is ``gap`` away).
        converged: ``(q,)`` whether ``residual_bounds <= rtol * max_i |ritz_values_i|``.
        projected_eigenvectors: ``(q, q)`` eigenvectors ``s_i`` of ``T`` (columns). With
            ``p = 1`` their first row holds the Gauss quadrature weights ``s_{1i}^2`` of the
            start vector (stochastic Lanczos quadrature).
        num_products: ``()`` Hessian-vector (matrix-vector) products used, ``m p``.
    """

    ritz_values: Float[Array, " q"]
    ritz_vectors: Float[Array, "q d"] | None
    residual_bounds: Float[Array, " q"]
    converged: Bool[Array, " q"]
    projected_eigenvectors: Float[Array, "q q"]
    num_products: Int[Array, ""]


class EndPairs(NamedTuple):
    """The ``k`` Ritz pairs at one end of the spectrum (the core's ``"ends"`` output).

    Attributes:
        values: ``(k,)`` descending at the top, ascending at the bottom.
        vectors: ``(k, d)`` flat, a pytree like params with leading ``k``, or None.
        residual_bounds: ``(k,)``.
        converged: ``(k,)``.
    """

    values: Float[Array, " k"]
    vectors: PyTree | None
    residual_bounds: Float[Array, " k"]
    converged: Bool[Array, " k"]


class _Ritz(NamedTuple):
    theta: Float[Array, "b q"]  # ascending; padded entries far below (top) or above (bottom)
    s: Float[Array, "b q q"]  # columns; zero outside the active block
    residual: Float[Array, "b q"]
    scale: Float[Array, " b"]  # max |theta| over the actual Ritz values


def _ritz(
    spec: CoreSpec,
    extended: Float[Array, "b rows q"],
    norm_h: Float[Array, " b"],
    dropped_sq: Float[Array, " b"],
    num_done: Array | int,
    pad_side: str | None,
) -> _Ritz:
    """Ritz pairs after ``num_done`` iterations (possibly traced), from the Gram-Schmidt
    coefficients: ``T`` is the leading ``n x n`` block (``n = num_done p``) of the symmetrised
    upper triangle, padded to ``(q, q)`` with a decoupled diagonal far below (``"top"``) or
    above (``"bottom"``) every Ritz value, so that the wanted end of the ascending list is
    made of actual Ritz pairs. Residual bound of pair ``i``: ``||R s_i||`` with ``R`` the
    coupling of the next block, plus the parts dropped at breakdowns."""
    p, q = spec.block_size, spec.num_iterations * spec.block_size
    n = num_done * p
    upper = jnp.triu(extended[:, :q, :])
    t = upper + jnp.swapaxes(jnp.triu(upper, 1), -1, -2)
    active = jnp.arange(q) < n
    if pad_side is not None:
        pad = 2 * float(np.sqrt(q)) * norm_h + 1  # |theta| <= ||H V|| <= sqrt(q) max ||H v_i||
        pad = -pad if pad_side == "top" else pad
        t = jnp.where((active[:, None] & active[None, :])[None], t, 0)
        t = t + jnp.eye(q, dtype=t.dtype)[None] * jnp.where(active[None], 0, pad[:, None])[:, None]
    theta, s = jnp.linalg.eigh(t)
    s = jnp.where(active[None, :, None], s, 0)
    coupling = jax.lax.dynamic_slice_in_dim(extended, n, p, axis=1)  # rows n .. n + p - 1
    residual = jnp.linalg.norm(coupling @ s, axis=1) + jnp.sqrt(dropped_sq)[:, None]
    actual = jnp.sum(s**2, axis=1) > 0.5
    scale = jnp.max(jnp.where(actual, jnp.abs(theta), 0), axis=-1)
    return _Ritz(theta, s, residual, scale)


def _end(ritz: _Ritz, k: int, top: bool) -> tuple[Array, Array, Array]:
    """``(indices (k,), residuals (b, k), values (b, k))`` of the ``k`` wanted pairs."""
    q = ritz.theta.shape[-1]
    idx = jnp.arange(q - 1, q - 1 - k, -1) if top else jnp.arange(k)
    return idx, ritz.residual[:, idx], ritz.theta[:, idx]


def unflatten_rows(rows: Float[Array, "k d"], params: PyTree) -> PyTree:
    """Rows ``(k, d)`` laid out as ``ravel_pytree(params)`` -> a pytree like ``params`` with a
    leading axis ``k`` on every leaf, in the rows' dtype (``ravel_pytree``'s ``unravel`` would
    cast back to the params' dtypes)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    parts, offset = [], 0
    for leaf in leaves:
        size = int(np.prod(np.shape(leaf)))
        parts.append(rows[:, offset : offset + size].reshape((rows.shape[0],) + np.shape(leaf)))
        offset += size
    return treedef.unflatten(parts)
