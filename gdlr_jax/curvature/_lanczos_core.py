"""The compiled Lanczos core (layer 2: curvature): the block Lanczos loop with full
reorthogonalisation on the state dtype, for a fixed number of iterations or until the wanted
Ritz pairs converge, compiled once per :class:`~gdlr_jax.curvature._lanczos_inputs.CoreSpec`
and array shapes (``gdlr_jax.curvature._lanczos``, "Compiled once")."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from gdlr_jax.curvature._hessian import PyTree
from gdlr_jax.curvature._hvp import hessian_matvec
from gdlr_jax.curvature._lanczos_inputs import CoreSpec, resolve_key
from gdlr_jax.curvature._lanczos_ritz import (
    EndPairs,
    LanczosResult,
    _end,
    _ritz,
    unflatten_rows,
)


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
