"""Extreme eigenvalues of Hessians without forming them: sharpness, bottom, smallest non-zero,
and both ends of the spectrum of the GD map's Jacobian (layer 2: curvature).

All routines run :func:`gdlr_jax.lanczos` once and read the ends of its Ritz spectrum, so they
take the same ``operator``: a dense symmetric matrix, a loss with its params, or a matvec with a
flat vector (see ``gdlr_jax.curvature._lanczos``). Eigenvalues are *algebraic*: the sharpness
``lambda_max`` is the largest eigenvalue, never the largest in magnitude (a large negative
eigenvalue is not the sharpness). All are ``jit``/``vmap``-able with static ``k`` and
``num_iterations``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from gdlr_jax.curvature._hessian import PyTree, zero_tolerance
from gdlr_jax.curvature._lanczos import (
    LanczosResult,
    Operator,
    SymmetricOperator,
    as_symmetric_operator,
    check_start_block,
    lanczos,
    state_dtype,
)
from gdlr_jax.problems._pytree import check_finite


def default_num_iterations(k: int, block_size: int, dim: int) -> int:
    """``min(d / p, ceil((2 k + 40) / p))``: enough for the top few of a Hessian to converge
    to about ``1e-8`` relative in our tests and benchmark; raise it for clustered ends."""
    return min(dim // block_size, -(-(2 * k + 40) // block_size))


def _check_k(k: Any, dim: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    if k > dim:
        raise ValueError(f"k = {k} exceeds the dimension d = {dim} of the operator.")
    return int(k)


def _ends(
    op: SymmetricOperator,
    k: int,
    num_iterations: int | None,
    v0: Float[Array, "... d"] | None,
    block_size: int | None,
    key: PRNGKeyArray | None,
    compute_vectors: bool,
) -> LanczosResult:
    """Validates ``k`` and the iteration count against each other, then runs Lanczos."""
    k = _check_k(k, op.dim)
    p = check_start_block(v0, block_size, op.dim)
    if num_iterations is None:
        num_iterations = default_num_iterations(k, p, op.dim)
    if isinstance(num_iterations, (int, np.integer)) and 0 < num_iterations * p < k:
        raise ValueError(
            f"num_iterations * block_size = {num_iterations} * {p} = {num_iterations * p} is "
            f"too small for k = {k}: the Krylov basis must have at least k vectors."
        )
    return lanczos(
        op,
        num_iterations=num_iterations,
        v0=v0,
        block_size=block_size,
        key=key,
        compute_vectors=compute_vectors,
    )


def top_eigenvalues(
    operator: Operator,
    params: PyTree | None = None,
    k: int = 1,
    *,
    num_iterations: int | None = None,
    v0: Float[Array, "... d"] | None = None,
    block_size: int | None = None,
    key: PRNGKeyArray | None = None,
    return_vectors: bool = False,
) -> Float[Array, " k"] | tuple[Float[Array, " k"], Float[Array, "k d"]]:
    """The ``k`` largest (algebraic) eigenvalues ``lambda_1 >= ... >= lambda_k`` of ``H``.

    ``lambda_1 = lambda_max`` is the sharpness compared with ``2 / eta`` in the stability of
    minima (Remark 2, Def. 16). Lanczos converges fastest at the ends of the spectrum, so the
    top of the Ritz spectrum is accurate long before the interior; check convergence with
    :func:`gdlr_jax.lanczos` (``residuals``, ``converged``) when it matters.

    Args:
        operator: a dense ``(d, d)`` matrix, a loss, or a matvec (``gdlr_jax.curvature._lanczos``).
        params: None for a matrix; the loss's params; a flat ``(d,)`` vector for a matvec.
        k: how many eigenvalues (static), ``1 <= k <= d``.
        num_iterations: Lanczos iterations (static); default :func:`default_num_iterations`.
            ``num_iterations * block_size`` must be at least ``k`` and at most ``d``.
        v0: start vector ``(d,)`` or block ``(p, d)``: the previous Ritz vector warm-starts
            tracking along a trajectory.
        block_size: ``p`` (default 1); use the multiplicity of a repeated top eigenvalue.
        key: PRNG key of the random start / restarts.
        return_vectors: also return the unit eigenvectors (static).

    Returns:
        ``(k,)`` eigenvalues in descending order in the Lanczos state dtype, and with
        ``return_vectors`` the ``(k, d)`` flat eigenvectors (rows) as well.

    Raises:
        ValueError: on a malformed operator, ``k`` outside ``[1, d]``, an iteration count too
            small for ``k`` or too large for ``d``, a malformed ``v0``, or non-finite params.
    """
    op = as_symmetric_operator(operator, params)
    result = _ends(op, k, num_iterations, v0, block_size, key, return_vectors)
    values = result.ritz_values[::-1][:k]
    if return_vectors:
        return values, result.ritz_vectors[::-1][:k]
    return values


def bottom_eigenvalues(
    operator: Operator,
    params: PyTree | None = None,
    k: int = 1,
    *,
    num_iterations: int | None = None,
    v0: Float[Array, "... d"] | None = None,
    block_size: int | None = None,
    key: PRNGKeyArray | None = None,
    return_vectors: bool = False,
) -> Float[Array, " k"] | tuple[Float[Array, " k"], Float[Array, "k d"]]:
    """The ``k`` smallest (algebraic) eigenvalues of ``H``, ascending.

    The most negative eigenvalues (directions of negative curvature) away from a minimum; at a
    minimum ``H`` is positive semi-definite and the bottom is its null space (0). Arguments,
    returns and errors as :func:`top_eigenvalues`.
    """
    op = as_symmetric_operator(operator, params)
    result = _ends(op, k, num_iterations, v0, block_size, key, return_vectors)
    values = result.ritz_values[:k]
    if return_vectors:
        return values, result.ritz_vectors[:k]
    return values


def _deflated(op: SymmetricOperator, null_space: ArrayLike) -> tuple[SymmetricOperator, Any]:
    """``P H P`` with ``P = I - N N^T`` for an orthonormal basis ``N`` of ``null_space``'s rows,
    and the projector ``P``."""
    null_space = jnp.asarray(null_space)
    if (
        null_space.ndim != 2
        or null_space.shape[1] != op.dim
        or not 1 <= null_space.shape[0] < op.dim
    ):
        raise ValueError(
            f"null_space must have shape (r, d) = (r, {op.dim}) with 1 <= r < d (rows spanning "
            f"the null space), got {null_space.shape}."
        )
    check_finite("null_space", null_space)
    basis, _ = jnp.linalg.qr(null_space.T.astype(state_dtype()))  # (d, r), orthonormal columns

    def project(v: Float[Array, " d"]) -> Float[Array, " d"]:
        return v - basis @ (basis.T @ v)

    return SymmetricOperator(lambda v: project(op.matvec(project(v))), op.dim, op.dtype), project


def smallest_nonzero_eigenvalue(
    operator: Operator,
    params: PyTree | None = None,
    *,
    null_space: ArrayLike | None = None,
    rtol: float | None = None,
    num_iterations: int | None = None,
    v0: Float[Array, " d"] | None = None,
    key: PRNGKeyArray | None = None,
) -> Float[Array, ""]:
    """The smallest eigenvalue of ``H`` above zero: ``min {lambda_i : lambda_i > tol}``.

    At a minimum ``H`` is positive semi-definite and this is its smallest non-zero eigenvalue
    (the slowest direction of convergence of GD near ``M``; Prop. 10 counts the non-zero ones
    of linear networks).

    * With ``null_space`` (rows spanning ``ker H``, e.g. the tangent space of the minima
      manifold ``M`` of a linear network): Lanczos runs on ``P H P``, ``P = I - N N^T``, from a
      start vector in ``range(P)``, so the wanted eigenvalue is the *bottom* of the deflated
      spectrum and converges as an extreme one.
    * Without: single-vector Lanczos sees the whole null space as one eigenvalue 0 (to
      rounding), and the answer is the smallest Ritz value above the threshold, an interior
      one: give more iterations when the spectrum is wide.

    Zero is decided as in :func:`gdlr_jax.spectrum_counts`: ``|theta| <= rtol * max|theta|``
    over the Ritz values, with default ``rtol = 100 q eps`` (``q`` the basis size, ``eps`` of
    the products' dtype).

    Args:
        operator, params: as :func:`top_eigenvalues`.
        null_space: optional ``(r, d)`` rows spanning the known null space (need not be
            orthonormal).
        rtol: relative zero tolerance, or None for the default.
        num_iterations, v0, key: as :func:`top_eigenvalues` (single vector, ``p = 1``).

    Returns:
        The eigenvalue (state dtype), or NaN when no Ritz value is above the threshold.

    Raises:
        ValueError: as :func:`top_eigenvalues`, and on a ``null_space`` of the wrong shape.
    """
    op = as_symmetric_operator(operator, params)
    check_start_block(v0, 1, op.dim)
    if rtol is not None and not rtol >= 0:
        raise ValueError(f"rtol must be a non-negative number or None, got {rtol!r}.")
    key = jax.random.key(0) if key is None else key
    if null_space is not None:
        op, project = _deflated(op, null_space)
        start_key, key = jax.random.split(key)
        start = (
            jax.random.normal(start_key, (op.dim,), state_dtype())
            if v0 is None
            else jnp.asarray(v0, state_dtype())
        )
        v0 = project(start)
    result = _ends(op, 1, num_iterations, v0, None, key, False)
    theta = result.ritz_values
    if rtol is None:
        rtol = 100 * theta.shape[0] * float(np.finfo(op.dtype).eps)
    tol = zero_tolerance(theta, rtol)
    smallest = jnp.min(jnp.where(theta > tol, theta, jnp.inf))
    return jnp.where(jnp.isinf(smallest), jnp.nan, smallest)


class GdMapSpectrum(NamedTuple):
    """Both ends of the spectrum of ``DG = I - eta H`` (Remark 5), for each step size.

    Attributes:
        largest: ``(..., k)`` the ``k`` largest eigenvalues of ``DG``, descending.
        smallest: ``(..., k)`` the ``k`` smallest, ascending.
        spectral_radius: ``(...)`` ``rho(DG) = max(|largest_1|, |smallest_1|)``.
    """

    largest: Float[Array, "... k"]
    smallest: Float[Array, "... k"]
    spectral_radius: Float[Array, "..."]


def gd_map_spectrum(
    operator: Operator,
    params: PyTree | None = None,
    *,
    eta: ArrayLike,
    k: int = 1,
    num_iterations: int | None = None,
    v0: Float[Array, "... d"] | None = None,
    block_size: int | None = None,
    key: PRNGKeyArray | None = None,
) -> GdMapSpectrum:
    """Both ends of the spectrum of the GD map's Jacobian ``DG = I - eta H``, matrix-free.

    ``mu = 1 - eta lambda`` is monotone in ``lambda``, so the ends of ``DG``'s spectrum are the
    images of the ends of ``H``'s: one Lanczos run on ``H`` (independent of ``eta``) serves
    every step size. ``rho(DG) <= 1`` iff ``-1 <= 1 - eta lambda_i <= 1`` for all ``i``, i.e.
    (for ``eta > 0``) ``0 <= lambda_min`` and ``lambda_max <= 2 / eta``: the linear stability
    of a fixed point (Remark 2, Def. 16).

    Args:
        operator, params, num_iterations, v0, block_size, key: as :func:`top_eigenvalues`.
        eta: step size(s), a scalar or an array of any shape (traced, never static).
        k: how many eigenvalues at each end (static).

    Returns:
        A :class:`GdMapSpectrum` with leading axes the shape of ``eta``.
    """
    op = as_symmetric_operator(operator, params)
    eta = jnp.asarray(eta)
    check_finite("eta", eta)
    theta = _ends(op, k, num_iterations, v0, block_size, key, False).ritz_values
    mu = jnp.sort(
        1 - eta[..., None].astype(theta.dtype) * theta.reshape((1,) * eta.ndim + theta.shape),
        axis=-1,
    )
    largest, smallest = mu[..., ::-1][..., :k], mu[..., :k]
    radius = jnp.maximum(jnp.abs(largest[..., 0]), jnp.abs(smallest[..., 0]))
    return GdMapSpectrum(largest, smallest, radius)
