"""Block Lanczos with full reorthogonalisation, for dense matrices, matvecs and losses (layer 2).

Every spectral routine of the matrix-free layer takes an ``operator`` that is one of

* a dense symmetric matrix ``(d, d)`` (``params`` is None); checked for symmetry when concrete;
* a loss ``loss_fn(params) -> scalar`` and its point ``params`` (any pytree): the operator is
  the Hessian, applied by forward-over-reverse products (:func:`gdlr_jax.hessian_matvec`);
* a matvec ``v (d,) -> H v (d,)`` on flat vectors, with ``params`` a flat vector ``(d,)`` whose
  shape and dtype fix the space and the precision of the products (its values are not used;
  the flat parameters themselves are the natural choice).

A callable is told apart by ``jax.eval_shape(operator, params)``: a scalar output means a loss,
an output of the shape ``(d,)`` of ``params`` a matvec.

**Compiled once.** Every routine validates its inputs eagerly, then calls one jitted core whose
static part is the operator's function object (the loss or the matvec, hashed by identity, as
``jax.jit`` hashes a static argument), the shapes/dtypes and the static options; the arrays
(``params`` or the matrix, ``v0``, ``key``, ``rtol``) are traced. A second eager call with the
same function object, shapes and options reuses the compiled program (a cached dispatch); a new
function object -- e.g. a fresh ``lambda`` per call -- compiles anew, as under ``jax.jit``.
Inside a user's ``jit``/``vmap`` the core is simply inlined.

**Precision.** The products run in the operator's dtype (the model's, e.g. float32). The
Lanczos state -- basis, projected matrix, Ritz values, vectors -- is in that same dtype by
default (at least float32); ``float64_state=True`` accumulates it in float64 instead (needs
``jax_enable_x64``), which costs about twice the orthogonalisation work and buys about one more
digit for float32 models (``docs/curvature.md``, section Precision, measured).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from gdlr_jax.curvature._hessian import PyTree
from gdlr_jax.curvature._hvp import hessian_matvec
from gdlr_jax.problems._pytree import (
    check_dimension,
    check_finite,
    check_loss_dtype,
    check_param_dtypes,
)

Operator = Any  # Float[Array, "d d"] | Callable (a loss or a matvec), see the module docstring


class PreparedOperator(NamedTuple):
    """A validated operator, split into its static part and its arrays.

    Attributes:
        kind: ``"matrix"``, ``"loss"`` or ``"matvec"``.
        fn: the loss or the matvec (None for a matrix); static, hashed by identity.
        operand: the matrix, the loss's params, or the matvec's flat vector (traced).
        dim: ``d``.
        dtype: the dtype the products are computed in (the model's precision).
    """

    kind: str
    fn: Callable | None
    operand: PyTree
    dim: int
    dtype: np.dtype


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


def state_dtype() -> np.dtype:
    """float64 when ``jax_enable_x64`` is on, float32 otherwise: the Lanczos state dtype with
    ``float64_state=True``, and the widest one any routine uses (an upper bound for memory)."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def resolve_state_dtype(product_dtype: np.dtype, float64_state: Any) -> np.dtype:
    """The Lanczos state dtype: the products' dtype (at least float32), or float64 on request.

    Raises:
        ValueError: ``float64_state`` not a bool, or True without ``jax_enable_x64``.
    """
    if not isinstance(float64_state, (bool, np.bool_)):
        raise ValueError(f"float64_state must be True or False, got {float64_state!r}.")
    if float64_state:
        if state_dtype() != np.float64:
            raise ValueError(
                "float64_state=True needs float64: enable it with "
                "jax.config.update('jax_enable_x64', True)."
            )
        return np.dtype(np.float64)
    return np.dtype(jnp.promote_types(product_dtype, jnp.float32))


def check_rtol(rtol: Any) -> None:
    """``rtol`` is None or a non-negative Python/NumPy number (it selects the loop's form)."""
    if rtol is None:
        return
    if (
        isinstance(rtol, bool)
        or not isinstance(rtol, (int, float, np.integer, np.floating))
        or not rtol >= 0
    ):
        raise ValueError(f"rtol must be a non-negative number or None, got {rtol!r}.")


def default_rtol(product_dtype: np.dtype) -> float:
    """``sqrt(eps)`` of the products' dtype (1.5e-8 in float64, 3.5e-4 in float32): residuals
    at that level give eigenvalues to about ``eps ||H||^2 / gap``."""
    return float(np.sqrt(np.finfo(product_dtype).eps))


@functools.lru_cache(maxsize=256)
def _classify_callable(fn: Callable, treedef: Any, avals: tuple) -> tuple[str, int, np.dtype]:
    """``(kind, d, products dtype)`` of a callable operator at params of these shapes/dtypes
    (cached: the eager check traces the function abstractly once per function and shapes)."""
    struct = treedef.unflatten([jax.ShapeDtypeStruct(s, t) for s, t in avals])
    out = jax.eval_shape(fn, struct)
    if getattr(out, "shape", None) == ():
        if not avals:
            raise ValueError("params: the pytree has no array leaves; expected at least one.")
        check_param_dtypes("params", (dtype for _, dtype in avals))
        dim = check_dimension("params", (s for s, _ in avals))
        check_loss_dtype(out.dtype)
        return "loss", dim, np.dtype(jnp.result_type(*(t for _, t in avals)))
    shape = avals[0][0] if jax.tree_util.treedef_is_leaf(treedef) and avals else None
    if (
        shape is None
        or len(shape) != 1
        or getattr(out, "shape", None) != shape
    ):
        described = shape if shape is not None else f"a pytree {treedef}"
        raise ValueError(
            "operator: a callable must be a loss (params -> scalar) or a matvec "
            "(v (d,) -> H v (d,)) with params a flat vector (d,); got params of shape "
            f"{described} and an output of shape {getattr(out, 'shape', type(out).__name__)}."
        )
    return "matvec", int(shape[0]), np.dtype(avals[0][1])


def _check_symmetric(matrix: Float[Array, "d d"]) -> None:
    """A concrete dense operator must be symmetric to within ``min(100 d eps, sqrt(eps))``
    relative to its largest entry (rounding of a symmetric-by-construction product)."""
    if isinstance(matrix, jax.core.Tracer):
        return
    a = np.asarray(matrix)
    asymmetry = np.abs(a - a.T)
    worst = float(asymmetry.max())
    eps = float(np.finfo(a.dtype).eps)
    scale = float(np.abs(a).max())
    tol = min(100 * a.shape[0] * eps, np.sqrt(eps)) * scale
    if worst > tol:
        i, j = (int(x) for x in np.unravel_index(int(asymmetry.argmax()), a.shape))
        raise ValueError(
            f"operator: a dense matrix must be symmetric, got max |A - A^T| = {worst:.3g} at "
            f"({i}, {j}) (A[{i}, {j}] = {a[i, j].item()!r}, A[{j}, {i}] = {a[j, i].item()!r}), "
            f"above the tolerance {tol:.3g} = min(100 d eps, sqrt(eps)) * max|A|; pass "
            "(A + A.T) / 2 for the symmetric part."
        )


def prepare_operator(operator: Operator, params: PyTree | None = None) -> PreparedOperator:
    """Validates a dense matrix, a loss with its params, or a matvec (module docstring).

    Raises:
        ValueError: on a matrix that is not square, not finite or not symmetric, params given
            with a matrix or missing with a callable, a callable whose output is neither a
            scalar nor of the shape of ``params``, or non-finite params of a loss.
    """
    if callable(operator):
        if params is None:
            raise ValueError(
                "params is required when operator is a callable: the point (pytree) of a "
                "loss_fn, or a flat vector (d,) giving the space and dtype of a matvec."
            )
        leaves, treedef = jax.tree_util.tree_flatten(params)
        avals = tuple((tuple(np.shape(x)), np.dtype(jnp.result_type(x))) for x in leaves)
        try:
            kind, dim, dtype = _classify_callable(operator, treedef, avals)
        except TypeError as err:  # an unhashable callable: classify it without the cache
            if "unhashable" not in str(err):
                raise
            kind, dim, dtype = _classify_callable.__wrapped__(operator, treedef, avals)
        if kind == "loss":
            check_finite("params", params)
        return PreparedOperator(kind, operator, params, dim, dtype)
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
        matrix = matrix.astype(state_dtype())
    check_finite("operator", matrix)
    _check_symmetric(matrix)
    return PreparedOperator("matrix", None, matrix, int(matrix.shape[0]), np.dtype(matrix.dtype))


def check_block_size(block_size: Any, dim: int) -> None:
    if block_size is not None and (
        isinstance(block_size, bool)
        or not isinstance(block_size, (int, np.integer))
        or block_size < 1
    ):
        raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}.")
    if block_size is not None and block_size > dim:
        raise ValueError(f"block_size={block_size} exceeds the dimension d = {dim}.")


def flat_start_block(
    v0: PyTree | None, op: PreparedOperator, block_size: int | None
) -> tuple[Float[Array, "p d"] | None, int]:
    """Validates a start vector/block and returns it flat ``(p, d)`` (or None) with ``p``.

    ``v0`` is flat, ``(d,)`` (``p = 1``) or ``(p, d)``, or -- for a loss -- a pytree with the
    structure of ``params`` whose leaves have the params' shapes (``p = 1``) or a common leading
    axis ``p`` before them (an eigenvector returned by :func:`gdlr_jax.top_eigenvalues` is
    such a pytree). None: ``p = block_size or 1``, random start.
    """
    dim = op.dim
    check_block_size(block_size, dim)
    if v0 is None:
        return None, int(block_size or 1)
    if op.kind == "loss":
        p_leaves, p_def = jax.tree_util.tree_flatten(op.operand)
        v_leaves, v_def = jax.tree_util.tree_flatten(v0)
        p_shapes = [tuple(np.shape(x)) for x in p_leaves]
        v_shapes = [tuple(np.shape(x)) for x in v_leaves]
        block = v_def == p_def and len({v[:1] for v in v_shapes}) == 1
        block = block and all(v[1:] == s for v, s in zip(v_shapes, p_shapes))
        if v_def == p_def and v_shapes == p_shapes:
            v0 = jnp.concatenate([jnp.ravel(x) for x in v_leaves])
        elif block:
            v0 = jnp.concatenate([jnp.reshape(x, (v_shapes[0][0], -1)) for x in v_leaves], 1)
        elif not isinstance(v0, (jax.Array, np.ndarray)):
            raise ValueError(
                f"v0: a pytree start must have the structure of params {p_def} and its leaf "
                f"shapes {p_shapes} (one vector) or those with a common leading axis p (a "
                f"block); got {v_def} with shapes {v_shapes}."
            )
    shape = jnp.shape(v0)
    if len(shape) not in (1, 2) or shape[-1] != dim or (len(shape) == 2 and shape[0] < 1):
        raise ValueError(f"v0 must have shape (d,) = ({dim},) or (p, d) = (p, {dim}), got {shape}.")
    p = 1 if len(shape) == 1 else int(shape[0])
    if block_size is not None and block_size != p:
        raise ValueError(f"block_size={block_size} disagrees with v0 of shape {shape} (p = {p}).")
    if p > dim:
        raise ValueError(f"block_size={p} exceeds the dimension d = {dim}.")
    check_finite("v0", v0)
    return jnp.reshape(jnp.asarray(v0), (p, dim)), p


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


def resolve_key(key: PRNGKeyArray | None) -> PRNGKeyArray:
    """The documented default of every curvature routine: ``jax.random.key(0)`` when None."""
    return jax.random.key(0) if key is None else key


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


class CoreSpec(NamedTuple):
    """The static part of a Lanczos run: what the compiled program depends on.

    Attributes:
        kind, fn, dim, product_dtype: of the :class:`PreparedOperator`.
        state_dtype: dtype of the basis, ``T`` and the outputs.
        num_iterations: ``m``, the most iterations (the basis has room for ``(m + 1) p`` rows).
        block_size: ``p``.
        lanes: ``b`` independent runs sharing the operator (the probes of a density).
        start: ``"given"`` (``v0``), ``"normal"`` or ``"rademacher"`` (drawn from the key).
        wanted: ``(k_top, k_bottom)``, the pairs read by the ``"ends"`` output.
        stop: stop once the wanted pairs of every lane are converged (a ``while_loop``);
            False: a fixed ``m`` iterations (a ``fori_loop``).
        output: ``"lanczos"`` (a :class:`LanczosResult`), ``"ends"`` (the wanted pairs) or
            ``"quadrature"`` (nodes and Gauss weights per lane).
        return_vectors: compute Ritz vectors.
        flat_vectors: vectors as flat ``(k, d)`` rows even for a loss (else pytrees like params).
    """

    kind: str
    fn: Callable | None
    dim: int
    product_dtype: np.dtype
    state_dtype: np.dtype
    num_iterations: int
    block_size: int
    lanes: int
    start: str
    wanted: tuple[int, int]
    stop: bool
    output: str
    return_vectors: bool
    flat_vectors: bool

    @classmethod
    def of(cls, op: PreparedOperator, float64_state: bool, **options: Any) -> CoreSpec:
        """The spec of a run on ``op`` (its kind, function, size and product dtype), the state
        in the operator's dtype or, with ``float64_state``, in float64; ``options``: the rest."""
        return cls(
            kind=op.kind,
            fn=op.fn,
            dim=op.dim,
            product_dtype=op.dtype,
            state_dtype=resolve_state_dtype(op.dtype, float64_state),
            **options,
        )


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


def _state_matvec(
    spec: CoreSpec, operand: PyTree, null_basis: Float[Array, "d r"] | None
) -> Callable[[Float[Array, " d"]], Float[Array, " d"]]:
    """``v -> H v`` (or ``P H P v``) from the state dtype to the state dtype, the product
    computed in the operator's dtype."""
    if spec.kind == "matrix":
        model_matvec = lambda v: operand @ v
    elif spec.kind == "loss":
        model_matvec = hessian_matvec(spec.fn, operand)
    else:
        model_matvec = spec.fn

    def matvec(v: Float[Array, " d"]) -> Float[Array, " d"]:
        out = model_matvec(v.astype(spec.product_dtype))
        return jnp.asarray(out, spec.state_dtype)

    if null_basis is None:
        return matvec
    return lambda v: project_out_null(null_basis, matvec(project_out_null(null_basis, v)))


def project_out_null(null_basis: Float[Array, "d r"], v: Float[Array, "... d"]) -> Array:
    """``P v = v - N (N^T v)`` for an orthonormal ``N (d, r)``."""
    return v - (v @ null_basis) @ null_basis.T


def _orthonormalize(
    basis: Float[Array, "b rows d"],
    w: Float[Array, "b d"],
    row: Array,
    tol: Float[Array, " b"],
    key: PRNGKeyArray,
) -> tuple[Float[Array, "b rows d"], Float[Array, "b rows"], Float[Array, " b"], Bool[Array, " b"]]:
    """Orthogonalises ``w`` against the rows of ``basis`` twice and stores it at ``row``.

    Classical Gram-Schmidt applied twice ("twice is enough") keeps the basis orthonormal to
    working precision. If the remainder has norm ``<= tol`` (breakdown: ``w`` lies in the span
    of the basis, an invariant subspace has been found) a random vector orthogonal to the basis
    is stored instead (a zero row if the basis already spans ``R^d``). The random vectors are
    drawn and projected only when some lane breaks down (``lax.cond``; under a user's ``vmap``
    the condition is batched and JAX evaluates both branches). Unused rows of ``basis`` are
    zero, so they do not contribute.

    Returns:
        ``(basis, coefficients, norm, broken)``: the basis with the new row, the projection
        coefficients ``basis^T w`` (before the new row), the remainder's norm and the breakdown
        flag, per lane.
    """

    def project_out(x: Float[Array, "b d"]) -> tuple[Float[Array, "b d"], Float[Array, "b rows"]]:
        c1 = jnp.einsum("brd,bd->br", basis, x)
        x = x - jnp.einsum("br,brd->bd", c1, basis)
        c2 = jnp.einsum("brd,bd->br", basis, x)
        return x - jnp.einsum("br,brd->bd", c2, basis), c1 + c2

    w, coefficients = project_out(w)
    norm = jnp.linalg.norm(w, axis=-1)
    broken = norm <= tol

    def fresh_vectors(_: None) -> Float[Array, "b d"]:
        z = jax.random.normal(jax.random.fold_in(key, row), w.shape, w.dtype)
        noise = 100 * float(jnp.finfo(w.dtype).eps * np.sqrt(w.shape[-1]))
        z_scale = noise * jnp.linalg.norm(z, axis=-1)
        z, _ = project_out(z)
        z_norm = jnp.linalg.norm(z, axis=-1)
        # When the basis already spans R^d (only the extension block, q = d) z is rounding
        # noise: store a zero row, which projects nothing out and adds nothing to T.
        usable = z_norm > z_scale
        return jnp.where(usable[:, None], z / jnp.where(usable, z_norm, 1)[:, None], 0)

    fresh = jax.lax.cond(jnp.any(broken), fresh_vectors, lambda _: jnp.zeros_like(w), None)
    new = jnp.where(broken[:, None], fresh, w / jnp.where(broken, 1, norm)[:, None])
    return jax.lax.dynamic_update_index_in_dim(basis, new, row, 1), coefficients, norm, broken


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


def _core(
    spec: CoreSpec,
    operand: PyTree,
    v0: Float[Array, "b p d"] | None,
    key: PRNGKeyArray,
    rtol: Float[Array, ""],
    null_basis: Float[Array, "d r"] | None,
) -> Any:
    """The Lanczos loop and its outputs (module docstring; jitted by :func:`run_core`)."""
    b, p, m, d = spec.lanes, spec.block_size, spec.num_iterations, spec.dim
    q, rows, dtype = m * p, (m + 1) * p, spec.state_dtype
    eps = float(np.finfo(spec.product_dtype).eps)
    matvec = _state_matvec(spec, operand, null_basis)
    start_key, restart_key = jax.random.split(key)
    if spec.start == "given":
        start = jnp.asarray(v0, dtype).reshape(b, p, d)
    elif spec.start == "rademacher":
        start = jax.random.rademacher(start_key, (b, p, d), dtype)
    else:
        start = jax.random.normal(start_key, (b, p, d), dtype)
    if null_basis is not None:
        start = project_out_null(null_basis.astype(dtype), start)

    basis = jnp.zeros((b, rows, d), dtype)
    start_scale = jnp.max(jnp.linalg.norm(start, axis=-1), axis=-1)
    for i in range(p):
        basis, _, _, _ = _orthonormalize(basis, start[:, i], i, 10 * eps * start_scale, restart_key)

    def apply(block: Float[Array, "b p d"]) -> Float[Array, "b p d"]:
        if b * p == 1:  # a user's matvec need not be vmappable
            return matvec(block[0, 0])[None, None]
        return jax.vmap(matvec)(block.reshape(b * p, d)).reshape(b, p, d)

    def step(j: Array, carry: tuple) -> tuple:
        basis, extended, norm_h, dropped_sq = carry
        products = apply(jax.lax.dynamic_slice_in_dim(basis, j * p, p, axis=1))
        norm_h = jnp.maximum(norm_h, jnp.max(jnp.linalg.norm(products, axis=-1), axis=-1))
        for i in range(p):
            row = (j + 1) * p + i
            basis, coefficients, norm, broken = _orthonormalize(
                basis, products[:, i], row, 10 * eps * norm_h, restart_key
            )
            coefficients = jax.lax.dynamic_update_index_in_dim(
                coefficients, jnp.where(broken, 0, norm), row, 1
            )
            extended = jax.lax.dynamic_update_index_in_dim(extended, coefficients, j * p + i, 2)
            dropped_sq = dropped_sq + jnp.where(broken, norm**2, 0)
        return basis, extended, norm_h, dropped_sq

    zero = jnp.zeros((b,), dtype)
    # extended[:, :, c]: the coefficients of H v_c on the basis V
    carry = (basis, jnp.zeros((b, rows, q), dtype), zero, zero)
    k_top, k_bottom = spec.wanted
    if not spec.stop:
        carry = jax.lax.fori_loop(0, m, step, carry)
        num_done = m
    else:

        def wanted_converged(carry: tuple, j: Array) -> Array:
            _, extended, norm_h, dropped_sq = carry
            done = j * p >= max(k_top, k_bottom)
            for k, side in ((k_top, "top"), (k_bottom, "bottom")):
                if k:
                    ritz = _ritz(spec, extended, norm_h, dropped_sq, j, side)
                    _, residual, _ = _end(ritz, k, side == "top")
                    done = done & jnp.all(residual <= rtol * ritz.scale[:, None])
            return done

        def body(state: tuple) -> tuple:
            j, carry, _ = state
            carry = step(j, carry)
            return j + 1, carry, wanted_converged(carry, j + 1)

        num_done, carry, _ = jax.lax.while_loop(
            lambda state: (state[0] < m) & ~state[2],
            body,
            (jnp.int32(0), carry, jnp.asarray(False)),
        )
    basis, extended, norm_h, dropped_sq = carry
    num_products = jnp.asarray(num_done * p, jnp.int32)

    if spec.output == "quadrature":
        ritz = _ritz(spec, extended, norm_h, dropped_sq, m, None)
        return ritz.theta, ritz.s[:, 0, :] ** 2
    if spec.output == "lanczos":
        ritz = _ritz(spec, extended, norm_h, dropped_sq, m, None)
        vectors = None
        if spec.return_vectors:
            vectors = jnp.einsum("qi,qd->id", ritz.s[0], basis[0, :q])
        converged = ritz.residual[0] <= rtol * ritz.scale[0]
        return LanczosResult(
            ritz.theta[0], vectors, ritz.residual[0], converged, ritz.s[0], num_products
        )
    ends = []
    for k, side in ((k_top, "top"), (k_bottom, "bottom")):
        if not k:
            ends.append(None)
            continue
        ritz = _ritz(spec, extended, norm_h, dropped_sq, num_done, side)
        idx, residual, values = _end(ritz, k, side == "top")
        vectors = None
        if spec.return_vectors:
            vectors = jnp.einsum("qk,qd->kd", ritz.s[0][:, idx], basis[0, :q])
            if spec.kind == "loss" and not spec.flat_vectors:
                vectors = unflatten_rows(vectors, operand)
        converged = residual[0] <= rtol * ritz.scale[0]
        ends.append(EndPairs(values[0], vectors, residual[0], converged))
    return ends[0], ends[1], num_products


_core_jit = jax.jit(_core, static_argnums=0)


def run_core(
    spec: CoreSpec,
    operand: PyTree,
    v0: Float[Array, "b p d"] | None,
    key: PRNGKeyArray | None,
    rtol: float,
    null_basis: Float[Array, "d r"] | None = None,
) -> Any:
    """Runs the compiled core: one program per ``spec`` and array shapes, reused by every
    later call (``rtol`` and the arrays are traced). An operator function that cannot be
    hashed (so cannot key a cache) is compiled for this call only."""
    args = (operand, v0, resolve_key(key), jnp.asarray(rtol, spec.state_dtype))
    args += (None if null_basis is None else jnp.asarray(null_basis, spec.state_dtype),)
    try:
        hash(spec)
    except TypeError:
        return jax.jit(functools.partial(_core, spec))(*args)
    return _core_jit(spec, *args)


def lanczos(
    operator: Operator,
    params: PyTree | None = None,
    *,
    num_iterations: int,
    v0: PyTree | None = None,
    block_size: int | None = None,
    key: PRNGKeyArray | None = None,
    return_vectors: bool = False,
    rtol: float | None = None,
    float64_state: bool = False,
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
    vector orthogonal to it (drawn only then), which lets Lanczos find further copies of
    multiple eigenvalues; the (tiny) dropped parts are added to the residual bounds.

    This routine always runs all ``m`` iterations (a ``lax.fori_loop``); the eigenvalue
    routines (:func:`gdlr_jax.extreme_eigenpairs`) stop on a residual tolerance. Compiled once
    per (operator function, shapes, options) and reused by later eager calls; ``jit``/
    ``vmap``-able (over ``params``, ``v0`` and ``key``); ``num_iterations`` and ``block_size``
    are static.

    In exact arithmetic a single start vector (``p = 1``) sees one copy of a multiple
    eigenvalue; the other copies appear only late (through rounding, or the restarts after the
    Krylov space is exhausted). Use ``p`` at least the multiplicity to resolve a multiple
    eigenvalue in few iterations.

    Args:
        operator: a dense symmetric ``(d, d)`` matrix, a loss, or a matvec (module docstring).
        params: None for a matrix; the loss's params; a flat ``(d,)`` vector for a matvec.
        num_iterations: ``m``, static; ``m * p <= d``. Each iteration costs ``p`` products.
        v0: start vector ``(d,)`` or block ``(p, d)``, or for a loss a pytree like ``params``
            (leading axis ``p`` for a block); random normal from ``key`` when None.
        block_size: ``p`` when ``v0`` is None (default 1); must agree with ``v0`` otherwise.
        key: PRNG key of the random start and the breakdown restarts; None means
            ``jax.random.key(0)`` (as in every curvature routine).
        return_vectors: also return the flat Ritz vectors ``(q, d)`` (static).
        rtol: relative residual tolerance of ``converged`` (``residual_bounds <= rtol *
            max|theta|``); default ``sqrt(eps)`` of the products' dtype (1.5e-8 in float64,
            3.5e-4 in float32).
        float64_state: accumulate the Lanczos state in float64 (needs x64) instead of the
            products' dtype (static).

    Returns:
        A :class:`LanczosResult` in the state dtype.

    Raises:
        ValueError: on a malformed operator (see :func:`prepare_operator`), a ``v0`` or
            ``block_size`` that does not fit, or ``num_iterations`` out of ``[1, d / p]``.
    """
    op = prepare_operator(operator, params)
    start, p = flat_start_block(v0, op, block_size)
    m = check_num_iterations(num_iterations, p, op.dim)
    check_rtol(rtol)
    spec = CoreSpec.of(
        op,
        float64_state,
        num_iterations=m,
        block_size=p,
        lanes=1,
        start="normal" if start is None else "given",
        wanted=(0, 0),
        stop=False,
        output="lanczos",
        return_vectors=bool(return_vectors),
        flat_vectors=True,
    )
    rtol = default_rtol(op.dtype) if rtol is None else float(rtol)
    return run_core(spec, op.operand, start, key, rtol)
