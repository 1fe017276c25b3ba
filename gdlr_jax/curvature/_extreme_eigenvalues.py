"""Extreme eigenvalues of Hessians without forming them: sharpness, bottom, smallest non-zero,
and both ends of the spectrum of the GD map's Jacobian (layer 2: curvature).

All routines run the Lanczos core of ``gdlr_jax.curvature._lanczos`` once and read the ends of
its Ritz spectrum, so they take the same ``operator``: a dense symmetric matrix, a loss with its
params, or a matvec with a flat vector. Eigenvalues are *algebraic*: the sharpness
``lambda_max`` is the largest eigenvalue, never the largest in magnitude (a large negative
eigenvalue is not the sharpness). The loop stops as soon as the wanted pairs' residual bounds
are below ``rtol`` (relative to ``max |theta|``), at most after ``num_iterations``. All are
compiled once per (function, shapes, options) and ``jit``/``vmap``-able with static ``k`` and
``num_iterations``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from gdlr_jax.curvature._hessian import PyTree, zero_tolerance
from gdlr_jax.curvature._lanczos_core import run_core
from gdlr_jax.curvature._lanczos_inputs import (
    CoreSpec,
    Operator,
    PreparedOperator,
    check_num_iterations,
    check_rtol,
    default_rtol,
    flat_start_block,
    prepare_operator,
    resolve_state_dtype,
)
from gdlr_jax.curvature._lanczos_ritz import EndPairs
from gdlr_jax.problems._pytree import check_finite

WHICH = ("top", "bottom")


class Eigenpairs(NamedTuple):
    """The ``k`` eigenpairs at one end of the spectrum, and how well they converged.

    Attributes:
        eigenvalues: ``(k,)`` Ritz values, descending for ``which="top"``, ascending for
            ``"bottom"``.
        eigenvectors: the unit Ritz vectors, or None unless ``return_vectors``: for a loss a
            pytree like ``params`` with a leading axis ``k`` on every leaf (``flat_vectors``:
            flat ``(k, d)`` rows laid out as ``ravel_pytree(params)``); for a matrix or a
            matvec ``(k, d)``.
        residual_bounds: ``(k,)`` ``||H y_i - theta_i y_i||``: some eigenvalue of ``H`` lies
            within it of ``eigenvalues[i]`` (Kahan), within its square over the gap when the
            rest of the spectrum is that far away.
        converged: ``(k,)`` ``residual_bounds <= rtol * max|theta|``, ``max|theta|`` over all
            Ritz values (an estimate of ``||H||``).
        num_products: ``()`` Hessian-vector (matrix-vector) products used.
    """

    eigenvalues: Float[Array, " k"]
    eigenvectors: PyTree | None
    residual_bounds: Float[Array, " k"]
    converged: Bool[Array, " k"]
    num_products: Int[Array, ""]


def default_num_iterations(k: int, block_size: int, dim: int) -> int:
    """``min(d / p, ceil((2 k + 40) / p))``: the most iterations by default (the loop usually
    stops earlier on ``rtol``); raise it for clustered ends."""
    return min(dim // block_size, -(-(2 * k + 40) // block_size))


def _check_k(k: Any, dim: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    if k > dim:
        raise ValueError(f"k = {k} exceeds the dimension d = {dim} of the operator.")
    return int(k)


def _check_iterations_for_k(num_iterations: Any, k: int, p: int, dim: int) -> int:
    """The default, or a validated count with ``k <= num_iterations * p <= d``."""
    if num_iterations is None:
        return default_num_iterations(k, p, dim)
    if isinstance(num_iterations, (int, np.integer)) and 0 < num_iterations * p < k:
        raise ValueError(
            f"num_iterations * block_size = {num_iterations} * {p} = {num_iterations * p} is "
            f"too small for k = {k}: the Krylov basis must have at least k vectors."
        )
    return check_num_iterations(num_iterations, p, dim)


def _ends(
    op: PreparedOperator,
    wanted: tuple[int, int],
    *,
    num_iterations: int | None,
    rtol: float | None,
    v0: PyTree | None,
    block_size: int | None,
    key: PRNGKeyArray | None,
    return_vectors: bool,
    flat_vectors: bool,
    float64_state: bool,
) -> tuple[EndPairs | None, EndPairs | None, Int[Array, ""]]:
    """Validates, then runs the core for the ``wanted = (k_top, k_bottom)`` pairs."""
    start, p = flat_start_block(v0, op, block_size)
    m = _check_iterations_for_k(num_iterations, max(wanted), p, op.dim)
    check_rtol(rtol)
    for name, flag in (("return_vectors", return_vectors), ("flat_vectors", flat_vectors)):
        if not isinstance(flag, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {flag!r}.")
    rtol = default_rtol(op.dtype) if rtol is None else float(rtol)
    spec = CoreSpec.of(
        op,
        float64_state,
        num_iterations=m,
        block_size=p,
        lanes=1,
        start="normal" if start is None else "given",
        wanted=wanted,
        stop=rtol > 0,
        output="ends",
        return_vectors=bool(return_vectors),
        flat_vectors=bool(flat_vectors),
    )
    return run_core(spec, op.operand, start, key, rtol)


def extreme_eigenpairs(
    operator: Operator,
    params: PyTree | None = None,
    k: int = 1,
    *,
    which: str = "top",
    num_iterations: int | None = None,
    rtol: float | None = None,
    v0: PyTree | None = None,
    block_size: int | None = None,
    key: PRNGKeyArray | None = None,
    return_vectors: bool = False,
    flat_vectors: bool = False,
    float64_state: bool = False,
) -> Eigenpairs:
    """The ``k`` largest (``which="top"``) or smallest (``"bottom"``) eigenpairs of ``H``, with
    their residual bounds, a converged mask and the number of products used.

    Lanczos with full reorthogonalisation (:func:`gdlr_jax.lanczos`) from ``v0`` (or a random
    start), stopped as soon as the ``k`` wanted Ritz pairs all have residual bounds
    ``||H y_i - theta_i y_i|| <= rtol * max|theta|`` (checked after every iteration, from the
    eigen-decomposition of the small projected matrix ``T``), at the latest after
    ``num_iterations``. By Kahan's theorem an eigenvalue of ``H`` lies within the residual
    bound of each Ritz value, and within ``bound^2 / gap`` when the rest of the spectrum is
    ``gap`` away: the default ``rtol = sqrt(eps)`` gives eigenvalues to about
    ``eps ||H||^2 / gap``. Like every Krylov method, a single start vector cannot see a second
    copy of a multiple eigenvalue before rounding brings it in: use ``block_size`` at least the
    multiplicity, or ``rtol=0`` with enough iterations.

    Args:
        operator: a dense symmetric ``(d, d)`` matrix, a loss, or a matvec
            (``gdlr_jax.curvature._lanczos``).
        params: None for a matrix; the loss's params; a flat ``(d,)`` vector for a matvec.
        k: how many eigenpairs (static), ``1 <= k <= d``.
        which: ``"top"`` (largest algebraic) or ``"bottom"`` (smallest algebraic).
        num_iterations: the most Lanczos iterations (static); default
            :func:`default_num_iterations`. ``num_iterations * block_size`` must be at least
            ``k`` and at most ``d``.
        rtol: relative residual tolerance of the stop and of ``converged``; default
            ``sqrt(eps)`` of the products' dtype (1.5e-8 in float64, 3.5e-4 in float32);
            ``0`` runs all ``num_iterations`` (a ``fori_loop``).
        v0: start vector ``(d,)`` or block ``(p, d)``, or for a loss a pytree like ``params``
            (leading axis ``p`` for a block): the previous eigenvector warm-starts tracking
            along a trajectory.
        block_size: ``p`` (default 1); use the multiplicity of a repeated end eigenvalue.
        key: PRNG key of the random start and the breakdown restarts; None means
            ``jax.random.key(0)`` (as in every curvature routine).
        return_vectors: also return the eigenvectors (static).
        flat_vectors: eigenvectors of a loss as flat ``(k, d)`` rows instead of pytrees
            (static).
        float64_state: accumulate the Lanczos state in float64 (needs x64) instead of the
            products' dtype (static).

    Returns:
        An :class:`Eigenpairs` in the Lanczos state dtype.

    Raises:
        ValueError: on a malformed operator (incl. a non-symmetric matrix), ``k`` outside
            ``[1, d]``, an unknown ``which``, an iteration count too small for ``k`` or too
            large for ``d``, a malformed ``v0``, or non-finite params.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}.")
    op = prepare_operator(operator, params)
    k = _check_k(k, op.dim)
    top, bottom, num_products = _ends(
        op,
        (k, 0) if which == "top" else (0, k),
        num_iterations=num_iterations,
        rtol=rtol,
        v0=v0,
        block_size=block_size,
        key=key,
        return_vectors=return_vectors,
        flat_vectors=flat_vectors,
        float64_state=float64_state,
    )
    end = top if which == "top" else bottom
    return Eigenpairs(end.values, end.vectors, end.residual_bounds, end.converged, num_products)


def top_eigenvalues(
    operator: Operator,
    params: PyTree | None = None,
    k: int = 1,
    *,
    num_iterations: int | None = None,
    rtol: float | None = None,
    v0: PyTree | None = None,
    block_size: int | None = None,
    key: PRNGKeyArray | None = None,
    return_vectors: bool = False,
    flat_vectors: bool = False,
    float64_state: bool = False,
) -> Float[Array, " k"] | tuple[Float[Array, " k"], PyTree]:
    """The ``k`` largest (algebraic) eigenvalues ``lambda_1 >= ... >= lambda_k`` of ``H``.

    ``lambda_1 = lambda_max`` is the sharpness compared with ``2 / eta`` in the stability of
    minima (Remark 2, Def. 16). The eigenvalues of :func:`extreme_eigenpairs` with
    ``which="top"`` (same arguments); use that function for the residual bounds, the converged
    mask and the number of products.

    Returns:
        ``(k,)`` eigenvalues in descending order in the Lanczos state dtype, and with
        ``return_vectors`` the eigenvectors as well (a pytree like ``params`` with a leading
        ``k`` for a loss, ``(k, d)`` rows otherwise or with ``flat_vectors``).

    Raises:
        ValueError: as :func:`extreme_eigenpairs`.
    """
    pairs = extreme_eigenpairs(
        operator, params, k, which="top", num_iterations=num_iterations, rtol=rtol, v0=v0,
        block_size=block_size, key=key, return_vectors=return_vectors,
        flat_vectors=flat_vectors, float64_state=float64_state,
    )  # fmt: skip
    return (pairs.eigenvalues, pairs.eigenvectors) if return_vectors else pairs.eigenvalues


def bottom_eigenvalues(
    operator: Operator,
    params: PyTree | None = None,
    k: int = 1,
    *,
    num_iterations: int | None = None,
    rtol: float | None = None,
    v0: PyTree | None = None,
    block_size: int | None = None,
    key: PRNGKeyArray | None = None,
    return_vectors: bool = False,
    flat_vectors: bool = False,
    float64_state: bool = False,
) -> Float[Array, " k"] | tuple[Float[Array, " k"], PyTree]:
    """The ``k`` smallest (algebraic) eigenvalues of ``H``, ascending.

    The most negative eigenvalues (directions of negative curvature) away from a minimum; at a
    minimum ``H`` is positive semi-definite and the bottom is its null space (0). The
    eigenvalues of :func:`extreme_eigenpairs` with ``which="bottom"``; arguments, returns and
    errors as :func:`top_eigenvalues`.
    """
    pairs = extreme_eigenpairs(
        operator, params, k, which="bottom", num_iterations=num_iterations, rtol=rtol, v0=v0,
        block_size=block_size, key=key, return_vectors=return_vectors,
        flat_vectors=flat_vectors, float64_state=float64_state,
    )  # fmt: skip
    return (pairs.eigenvalues, pairs.eigenvectors) if return_vectors else pairs.eigenvalues


def smallest_nonzero_eigenvalue(
    operator: Operator,
    params: PyTree | None = None,
    *,
    null_space: ArrayLike | None = None,
    zero_rtol: float | None = None,
    num_iterations: int | None = None,
    v0: PyTree | None = None,
    key: PRNGKeyArray | None = None,
    float64_state: bool = False,
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

    Runs all ``num_iterations`` (an interior Ritz value has no residual stop). Zero is decided
    as in :func:`gdlr_jax.spectrum_counts`: ``|theta| <= zero_rtol * max|theta|`` over the Ritz
    values, with default ``zero_rtol = 100 q eps`` (``q`` the basis size, ``eps`` of the
    products' dtype). (``rtol`` elsewhere is always a residual tolerance.)

    Args:
        operator, params: as :func:`top_eigenvalues`.
        null_space: optional ``(r, d)`` rows spanning the known null space (need not be
            orthonormal).
        zero_rtol: relative zero threshold, or None for the default.
        num_iterations, v0, key, float64_state: as :func:`top_eigenvalues` (single vector,
            ``p = 1``).

    Returns:
        The eigenvalue (state dtype), or NaN when no Ritz value is above the threshold.

    Raises:
        ValueError: as :func:`top_eigenvalues`, and on a ``null_space`` of the wrong shape.
    """
    op = prepare_operator(operator, params)
    start, _ = flat_start_block(v0, op, 1)
    m = _check_iterations_for_k(num_iterations, 1, 1, op.dim)
    if zero_rtol is not None and not zero_rtol >= 0:
        raise ValueError(f"zero_rtol must be a non-negative number or None, got {zero_rtol!r}.")
    dtype = resolve_state_dtype(op.dtype, float64_state)
    null_basis = None
    if null_space is not None:
        null_space = jnp.asarray(null_space)
        if (
            null_space.ndim != 2
            or null_space.shape[1] != op.dim
            or not 1 <= null_space.shape[0] < op.dim
        ):
            raise ValueError(
                f"null_space must have shape (r, d) = (r, {op.dim}) with 1 <= r < d (rows "
                f"spanning the null space), got {null_space.shape}."
            )
        check_finite("null_space", null_space)
        null_basis, _ = jnp.linalg.qr(null_space.T.astype(dtype))  # (d, r), orthonormal
    spec = CoreSpec(
        kind=op.kind,
        fn=op.fn,
        dim=op.dim,
        product_dtype=op.dtype,
        state_dtype=dtype,
        num_iterations=m,
        block_size=1,
        lanes=1,
        start="normal" if start is None else "given",
        wanted=(0, 0),
        stop=False,
        output="lanczos",
        return_vectors=False,
        flat_vectors=True,
    )
    result = run_core(spec, op.operand, start, key, default_rtol(op.dtype), null_basis)
    theta = result.ritz_values
    if zero_rtol is None:
        zero_rtol = 100 * theta.shape[0] * float(np.finfo(op.dtype).eps)
    tol = zero_tolerance(theta, zero_rtol)
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
    rtol: float | None = None,
    v0: PyTree | None = None,
    block_size: int | None = None,
    key: PRNGKeyArray | None = None,
    float64_state: bool = False,
) -> GdMapSpectrum:
    """Both ends of the spectrum of the GD map's Jacobian ``DG = I - eta H``, matrix-free.

    ``mu = 1 - eta lambda`` is monotone in ``lambda``, so the ends of ``DG``'s spectrum are the
    images of the ends of ``H``'s: one Lanczos run on ``H`` (independent of ``eta``), stopped
    once the ``k`` largest *and* the ``k`` smallest Ritz pairs are converged, serves every step
    size. ``rho(DG) <= 1`` iff ``-1 <= 1 - eta lambda_i <= 1`` for all ``i``, i.e. (for
    ``eta > 0``) ``0 <= lambda_min`` and ``lambda_max <= 2 / eta``: the linear stability of a
    fixed point (Remark 2, Def. 16).

    Args:
        operator, params, num_iterations, rtol, v0, block_size, key, float64_state: as
            :func:`extreme_eigenpairs`.
        eta: step size(s), a scalar or an array of any shape (traced, never static).
        k: how many eigenvalues at each end (static), ``2 k <= d``.

    Returns:
        A :class:`GdMapSpectrum` with leading axes the shape of ``eta``.
    """
    op = prepare_operator(operator, params)
    k = _check_k(k, op.dim)
    if 2 * k > op.dim:
        raise ValueError(f"k = {k}: both ends need 2 k <= d = {op.dim} eigenvalues.")
    eta = jnp.asarray(eta)
    check_finite("eta", eta)
    top, bottom, _ = _ends(
        op,
        (k, k),
        num_iterations=num_iterations,
        rtol=rtol,
        v0=v0,
        block_size=block_size,
        key=key,
        return_vectors=False,
        flat_vectors=False,
        float64_state=float64_state,
    )
    theta = jnp.concatenate([bottom.values, top.values])
    mu = jnp.sort(
        1 - eta[..., None].astype(theta.dtype) * theta.reshape((1,) * eta.ndim + theta.shape),
        axis=-1,
    )
    largest, smallest = mu[..., ::-1][..., :k], mu[..., :k]
    radius = jnp.maximum(jnp.abs(largest[..., 0]), jnp.abs(smallest[..., 0]))
    return GdMapSpectrum(largest, smallest, radius)
