"""The inputs of a Lanczos run, checked eagerly before any compute (layer 2: curvature): the
operator (a dense matrix, a loss with its params, or a matvec, see
:mod:`gdlr_jax.curvature._lanczos`), the start block, the iteration count, the tolerance, the
PRNG key and the state dtype, and :class:`CoreSpec`, the static part of a run they give."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from gdlr_jax.curvature._hessian import PyTree
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
