"""Block Lanczos with full reorthogonalisation, for dense matrices, matvecs and losses (layer 2).

Every spectral routine of the matrix-free layer takes an ``operator`` that is one of

* a dense symmetric matrix ``(d, d)`` (``params`` is None);
* a loss ``loss_fn(params) -> scalar`` and its point ``params`` (any pytree): the operator is
  the Hessian, applied by forward-over-reverse products (:func:`gdlr_jax.hessian_matvec`);
* a matvec ``v (d,) -> H v (d,)`` on flat vectors, with ``params`` a flat vector ``(d,)`` whose
  shape and dtype fix the space and the precision of the products (its values are not used;
  the flat parameters themselves are the natural choice).

A callable is told apart by ``jax.eval_shape(operator, params)``: a scalar output means a loss,
an output of the shape ``(d,)`` of ``params`` a matvec.

The products run in the operator's dtype (the model's, e.g. float32) and the Lanczos state --
basis, projected matrix, Ritz values -- in float64 when ``jax_enable_x64`` is on (float32
otherwise).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from gdlr_jax.curvature._hessian import PyTree
from gdlr_jax.curvature._hvp import hessian_matvec
from gdlr_jax.problems._pytree import check_finite

Operator = Any  # Float[Array, "d d"] | Callable (a loss or a matvec), see the module docstring


class SymmetricOperator(NamedTuple):
    """A symmetric linear operator on ``R^d`` in the form the Lanczos loop uses.

    Attributes:
        matvec: ``v (d,) -> H v (d,)``; takes and returns the Lanczos state dtype, computes in
            ``dtype``.
        dim: ``d``.
        dtype: the dtype the products are computed in (the model's precision).
    """

    matvec: Callable[[Float[Array, " d"]], Float[Array, " d"]]
    dim: int
    dtype: np.dtype


class LanczosResult(NamedTuple):
    """Rayleigh-Ritz pairs of ``H`` on the (block) Krylov basis built by :func:`lanczos`.

    With ``m`` iterations of block size ``p`` the orthonormal basis ``V`` has ``q = m p``
    vectors and ``T = V^T H V`` is ``(q, q)``.

    Attributes:
        ritz_values: ``(q,)`` eigenvalues of ``T``, ascending.
        ritz_vectors: ``(q, d)`` Ritz vectors ``y_i = V s_i`` (rows, unit norm), or None when
            not requested.
        residuals: ``(q,)`` bounds on ``||H y_i - theta_i y_i||``; by the Bauer-Fike /
            Kahan theorem some eigenvalue of ``H`` lies within ``residuals[i]`` of
            ``ritz_values[i]`` (within ``residuals[i]**2 / gap`` when the rest of the spectrum
            is ``gap`` away).
        converged: ``(q,)`` whether ``residuals <= rtol * max_i |ritz_values_i|``.
        projected_eigenvectors: ``(q, q)`` eigenvectors ``s_i`` of ``T`` (columns). With
            ``p = 1`` their first row holds the Gauss quadrature weights ``s_{1i}^2`` of the
            start vector (stochastic Lanczos quadrature).
    """

    ritz_values: Float[Array, " q"]
    ritz_vectors: Float[Array, "q d"] | None
    residuals: Float[Array, " q"]
    converged: Bool[Array, " q"]
    projected_eigenvectors: Float[Array, "q q"]


def state_dtype() -> np.dtype:
    """float64 when ``jax_enable_x64`` is on, float32 otherwise: the dtype of Lanczos states."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def as_symmetric_operator(operator: Operator, params: PyTree | None = None) -> SymmetricOperator:
    """Normalises a dense matrix, a loss with its params, or a matvec (module docstring).

    A :class:`SymmetricOperator` is returned as it is (the routines build derived operators,
    e.g. deflated ones, this way).

    Raises:
        ValueError: on a matrix that is not square or not finite, params given with a matrix
            or missing with a callable, a callable whose output is neither a scalar nor of the
            shape of ``params``, or non-finite params of a loss.
    """
    if isinstance(operator, SymmetricOperator):
        return operator
    dtype_out = state_dtype()
    if callable(operator):
        if params is None:
            raise ValueError(
                "params is required when operator is a callable: the point (pytree) of a "
                "loss_fn, or a flat vector (d,) giving the space and dtype of a matvec."
            )
        out = jax.eval_shape(operator, params)
        if getattr(out, "shape", None) == ():
            flat = jax.eval_shape(lambda p: ravel_pytree(p)[0], params)
            model_matvec = hessian_matvec(operator, params)
            dim, dtype = int(flat.shape[0]), np.dtype(flat.dtype)
        else:
            shape = jnp.shape(params) if isinstance(params, (jax.Array, np.ndarray)) else None
            if shape is None or len(shape) != 1 or getattr(out, "shape", None) != shape:
                raise ValueError(
                    "operator: a callable must be a loss (params -> scalar) or a matvec "
                    "(v (d,) -> H v (d,)) with params a flat vector (d,); got params of shape "
                    f"{shape if shape is not None else type(params).__name__} and an output of "
                    f"shape {getattr(out, 'shape', type(out).__name__)}."
                )
            model_matvec = operator
            dim, dtype = int(shape[0]), np.dtype(jnp.result_type(params))
    else:
        if params is not None:
            raise ValueError(
                f"params must be None when operator is a dense matrix, got {type(params).__name__}."
            )
        try:
            matrix = jnp.asarray(operator)
        except TypeError as err:
            raise ValueError(
                "operator must be a square matrix (d, d) or a callable, got "
                f"{type(operator).__name__}."
            ) from err
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
            raise ValueError(
                f"operator: a dense matrix must be square (d, d) with d >= 1, got shape "
                f"{matrix.shape}."
            )
        if not jnp.issubdtype(matrix.dtype, jnp.floating):
            matrix = matrix.astype(dtype_out)
        check_finite("operator", matrix)
        dim, dtype = int(matrix.shape[0]), np.dtype(matrix.dtype)

        def model_matvec(v: Float[Array, " d"]) -> Float[Array, " d"]:
            return matrix @ v

    def matvec(v: Float[Array, " d"]) -> Float[Array, " d"]:
        return jnp.asarray(model_matvec(v.astype(dtype)), dtype_out)

    return SymmetricOperator(matvec, dim, dtype)


def check_start_block(v0: Float[Array, "... d"] | None, block_size: int | None, dim: int) -> int:
    """Validates a start vector/block and returns the block size ``p``.

    ``v0`` is ``(d,)`` (``p = 1``), ``(p, d)``, or None (then ``p = block_size or 1``).
    """
    if block_size is not None and (
        isinstance(block_size, bool)
        or not isinstance(block_size, (int, np.integer))
        or block_size < 1
    ):
        raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}.")
    if block_size is not None and block_size > dim:
        raise ValueError(f"block_size={block_size} exceeds the dimension d = {dim}.")
    if v0 is None:
        return int(block_size or 1)
    shape = jnp.shape(v0)
    if len(shape) not in (1, 2) or shape[-1] != dim or (len(shape) == 2 and shape[0] < 1):
        raise ValueError(f"v0 must have shape (d,) = ({dim},) or (p, d) = (p, {dim}), got {shape}.")
    p = 1 if len(shape) == 1 else int(shape[0])
    if block_size is not None and block_size != p:
        raise ValueError(f"block_size={block_size} disagrees with v0 of shape {shape} (p = {p}).")
    check_finite("v0", v0)
    return p


def check_num_iterations(num_iterations: Any, block_size: int, dim: int) -> int:
    """Validates the static iteration count: ``1 <= num_iterations * block_size <= d``."""
    if (
        isinstance(num_iterations, bool)
        or not isinstance(num_iterations, (int, np.integer))
        or num_iterations < 1
    ):
        raise ValueError(f"num_iterations must be a positive integer, got {num_iterations!r}.")
    if num_iterations * block_size > dim:
        raise ValueError(
            f"num_iterations * block_size = {num_iterations} * {block_size} = "
            f"{num_iterations * block_size} exceeds the dimension d = {dim}: a Krylov basis has "
            "at most d vectors."
        )
    return int(num_iterations)


def _orthonormalize(
    basis: Float[Array, "b d"],
    w: Float[Array, " d"],
    row: Array,
    tol: Float[Array, ""],
    key: PRNGKeyArray,
) -> tuple[Float[Array, "b d"], Float[Array, " b"], Float[Array, ""], Bool[Array, ""]]:
    """Orthogonalises ``w`` against the rows of ``basis`` twice and stores it at ``row``.

    Classical Gram-Schmidt applied twice ("twice is enough") keeps the basis orthonormal to
    working precision. If the remainder has norm ``<= tol`` (breakdown: ``w`` lies in the span
    of the basis, an invariant subspace has been found) a random vector orthogonal to the basis
    is stored instead (a zero row if the basis already spans ``R^d``). Unused rows of ``basis``
    are zero, so they do not contribute.

    Returns:
        ``(basis, coefficients, norm, broken)``: the basis with the new row, the projection
        coefficients ``basis^T w`` (before the new row), the remainder's norm and the breakdown
        flag.
    """

    def project_out(x: Float[Array, " d"]) -> tuple[Float[Array, " d"], Float[Array, " b"]]:
        c1 = basis @ x
        x = x - c1 @ basis
        c2 = basis @ x
        return x - c2 @ basis, c1 + c2

    w, coefficients = project_out(w)
    norm = jnp.linalg.norm(w)
    broken = norm <= tol
    z = jax.random.normal(jax.random.fold_in(key, row), w.shape, w.dtype)
    z_scale = 100 * jnp.finfo(w.dtype).eps * np.sqrt(w.shape[0]) * jnp.linalg.norm(z)
    z, _ = project_out(z)
    z_norm = jnp.linalg.norm(z)
    # When the basis already spans R^d (only the extension block, q = d) z is rounding noise:
    # store a zero row, which projects nothing out and adds nothing to T.
    usable = z_norm > z_scale
    fresh = jnp.where(usable, z / jnp.where(usable, z_norm, 1), 0)
    q = jnp.where(broken, fresh, w / jnp.where(broken, 1, norm))
    return basis.at[row].set(q), coefficients, norm, broken


def lanczos(
    operator: Operator,
    params: PyTree | None = None,
    *,
    num_iterations: int,
    v0: Float[Array, "... d"] | None = None,
    block_size: int | None = None,
    key: PRNGKeyArray | None = None,
    compute_vectors: bool = False,
    rtol: float | None = None,
) -> LanczosResult:
    """Block Lanczos with full reorthogonalisation: Rayleigh-Ritz of ``H`` on a Krylov space.

    From an orthonormalised start block ``Q_0 (p, d)``, iteration ``j`` applies ``H`` to the
    ``p`` vectors of block ``j`` and orthogonalises each product against *all* the basis
    vectors so far, twice (classical Gram-Schmidt twice), giving block ``j + 1``. After
    ``m = num_iterations`` iterations the basis ``V`` spans the block Krylov space
    ``K_m = span{Q_0, H Q_0, ..., H^{m-1} Q_0}`` (``q = m p`` vectors) and
    ``H V = V T + R_m E_m^T`` with ``T = V^T H V``; the Ritz values are the eigenvalues of
    ``T``, and the residual of the Ritz pair ``(theta_i, V s_i)`` is ``||R_m s_i||`` exactly.

    A breakdown (the product lies in the span of the basis to within
    ``10 eps ||H||``, ``eps`` of the products' dtype and ``||H||`` estimated by the largest
    ``||H v||`` seen) means an invariant subspace was found: the basis continues with a random
    vector orthogonal to it, which lets Lanczos find further copies of multiple eigenvalues;
    the (tiny) dropped parts are added to the residual bounds.

    Everything is a fixed number of ``lax.fori_loop`` steps: ``jit``/``vmap``-able (over
    ``params``, ``v0`` and ``key``), ``num_iterations`` and ``block_size`` are static.

    In exact arithmetic a single start vector (``p = 1``) sees one copy of a multiple
    eigenvalue; the other copies appear only late (through rounding, or the restarts after the
    Krylov space is exhausted). Use ``p`` at least the multiplicity to resolve a multiple
    eigenvalue in few iterations.

    Args:
        operator: a dense symmetric ``(d, d)`` matrix, a loss, or a matvec (module docstring).
        params: None for a matrix; the loss's params; a flat ``(d,)`` vector for a matvec.
        num_iterations: ``m``, static; ``m * p <= d``. Each iteration costs ``p`` products.
        v0: start vector ``(d,)`` or block ``(p, d)`` (e.g. the previous Ritz vector, for a
            warm start); random normal from ``key`` when None.
        block_size: ``p`` when ``v0`` is None (default 1); must agree with ``v0`` otherwise.
        key: PRNG key for the random start and the breakdown restarts
            (``jax.random.key(0)`` when None).
        compute_vectors: also return the Ritz vectors ``(q, d)`` (static).
        rtol: relative residual tolerance of ``converged``; default ``sqrt(eps)`` of the
            products' dtype (about 1.5e-8 in float64, 3.5e-4 in float32).

    Returns:
        A :class:`LanczosResult` in the state dtype.

    Raises:
        ValueError: on a malformed operator (see :func:`as_symmetric_operator`), a ``v0`` or
            ``block_size`` that does not fit, or ``num_iterations`` out of ``[1, d / p]``.
    """
    op = as_symmetric_operator(operator, params)
    p = check_start_block(v0, block_size, op.dim)
    m = check_num_iterations(num_iterations, p, op.dim)
    if rtol is not None and not rtol >= 0:
        raise ValueError(f"rtol must be a non-negative number or None, got {rtol!r}.")
    rtol = float(np.sqrt(np.finfo(op.dtype).eps)) if rtol is None else float(rtol)
    dtype = state_dtype()
    eps = float(np.finfo(op.dtype).eps)
    d, q = op.dim, m * p
    key = jax.random.key(0) if key is None else key
    start_key, restart_key = jax.random.split(key)
    start = (
        jax.random.normal(start_key, (p, d), dtype)
        if v0 is None
        else jnp.asarray(v0, dtype).reshape(p, d)
    )

    basis = jnp.zeros(((m + 1) * p, d), dtype)
    start_scale = jnp.max(jnp.linalg.norm(start, axis=1))
    for i in range(p):
        basis, _, _, _ = _orthonormalize(basis, start[i], i, 10 * eps * start_scale, restart_key)

    def apply(block: Float[Array, "p d"]) -> Float[Array, "p d"]:
        if p == 1:  # a user's matvec need not be vmappable
            return op.matvec(block[0])[None]
        return jax.vmap(op.matvec)(block)

    def step(j: Array, carry: tuple) -> tuple:
        basis, extended, norm_h, dropped_sq = carry
        products = apply(jax.lax.dynamic_slice_in_dim(basis, j * p, p))
        norm_h = jnp.maximum(norm_h, jnp.max(jnp.linalg.norm(products, axis=1)))
        for i in range(p):
            row = (j + 1) * p + i
            basis, coefficients, norm, broken = _orthonormalize(
                basis, products[i], row, 10 * eps * norm_h, restart_key
            )
            coefficients = coefficients.at[row].set(jnp.where(broken, 0, norm))
            extended = jax.lax.dynamic_update_index_in_dim(extended, coefficients, j * p + i, 1)
            dropped_sq = dropped_sq + jnp.where(broken, norm**2, 0)
        return basis, extended, norm_h, dropped_sq

    zero = jnp.zeros((), dtype)
    extended = jnp.zeros(((m + 1) * p, q), dtype)  # column c: coefficients of H v_c on V
    basis, extended, _, dropped_sq = jax.lax.fori_loop(0, m, step, (basis, extended, zero, zero))
    upper = jnp.triu(extended[:q])
    projected = upper + jnp.triu(upper, 1).T
    ritz_values, s = jnp.linalg.eigh(projected)
    residuals = jnp.linalg.norm(extended[q:, q - p :] @ s[q - p :], axis=0) + jnp.sqrt(dropped_sq)
    converged = residuals <= rtol * jnp.max(jnp.abs(ritz_values))
    vectors = s.T @ basis[:q] if compute_vectors else None
    return LanczosResult(ritz_values, vectors, residuals, converged, s)
