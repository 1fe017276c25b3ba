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

from jaxtyping import PRNGKeyArray

from gdlr_jax.curvature._hessian import PyTree
from gdlr_jax.curvature._lanczos_core import run_core
from gdlr_jax.curvature._lanczos_inputs import (
    CoreSpec,
    Operator,
    check_num_iterations,
    check_rtol,
    default_rtol,
    flat_start_block,
    prepare_operator,
    state_dtype,
)
from gdlr_jax.curvature._lanczos_ritz import LanczosResult

# lanczos, and the names other layers import from here (the rest is in _lanczos_inputs,
# _lanczos_core and _lanczos_ritz)
__all__ = ["LanczosResult", "lanczos", "state_dtype"]


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
