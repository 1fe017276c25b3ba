"""Dense Hessians of pytree losses and their spectra (layer 2: curvature).

A loss ``loss_fn(params) -> scalar`` over any pytree is flattened with
``jax.flatten_util.ravel_pytree``: the Hessian is the ``(d, d)`` matrix of second derivatives
with respect to the flat parameter vector ``theta`` of length ``d = d_theta``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, Int

from gdlr_jax.problems._pytree import (
    LossFn,
    PyTree,
    check_dimension,
    check_loss_dtype,
    check_param_dtypes,
)


class FlatLoss(NamedTuple):
    """A pytree loss seen as a function of one flat vector.

    Attributes:
        fn: ``theta (d,) -> scalar``, the loss of ``unravel(theta)``.
        theta: the flat parameters ``(d,)``.
        unravel: ``theta (d,) -> params`` (the inverse of ``ravel_pytree``).
    """

    fn: Callable[[Float[Array, " d"]], Float[Array, ""]]
    theta: Float[Array, " d"]
    unravel: Callable[[Float[Array, " d"]], PyTree]


def flatten_loss(loss_fn: LossFn, params: PyTree) -> FlatLoss:
    """Flattens ``loss_fn`` over the pytree ``params`` into a function of a vector ``(d,)``.

    Raises:
        ValueError: if ``params`` has no leaves or no parameters, a leaf is not a float32 or
            float64 array, or ``loss_fn`` does not return a real floating scalar (checked
            with ``jax.eval_shape``, before any compute).
    """
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("params: the pytree has no array leaves; expected at least one.")
    check_param_dtypes("params", (jnp.result_type(leaf) for leaf in leaves))
    check_dimension("params", (jnp.shape(leaf) for leaf in leaves))
    out = jax.eval_shape(loss_fn, params)
    if not hasattr(out, "shape") or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(f"loss_fn must return a scalar, got an output of shape {shape}.")
    check_loss_dtype(out.dtype)
    theta, unravel = ravel_pytree(params)
    return FlatLoss(lambda t: loss_fn(unravel(t)), theta, unravel)


def hessian(loss_fn: LossFn, params: PyTree) -> Float[Array, "d d"]:
    """Dense Hessian ``H_ij = d^2 L / d theta_i d theta_j`` over the flattened parameters.

    Computed by forward-over-reverse differentiation (``jax.hessian``) and symmetrised,
    ``(H + H^T) / 2``, so that its eigen-decomposition is that of a symmetric matrix.

    Args:
        loss_fn: ``params -> scalar``.
        params: any pytree of floating arrays, flattened by ``ravel_pytree`` to ``(d,)``.

    Returns:
        The ``(d, d)`` Hessian, in the dtype of the parameters.
    """
    flat = flatten_loss(loss_fn, params)
    h = jax.hessian(flat.fn)(flat.theta)
    return 0.5 * (h + h.T)


def hessian_spectrum(loss_fn: LossFn, params: PyTree) -> Float[Array, " d"]:
    """Eigenvalues of the dense Hessian, in ascending order (``jnp.linalg.eigvalsh``).

    Args:
        loss_fn: ``params -> scalar``.
        params: any pytree; ``d`` is its total number of entries.

    Returns:
        ``(d,)`` eigenvalues ``lambda_1 <= ... <= lambda_d``.
    """
    return jnp.linalg.eigvalsh(hessian(loss_fn, params))


def zero_tolerance(
    eigenvalues: Float[Array, "... d"], zero_rtol: float | None = None
) -> Float[Array, "..."]:
    """The absolute threshold below which ``|lambda|`` counts as zero.

    ``tol = zero_rtol * max_i |lambda_i|`` with the default ``zero_rtol = 100 * d * eps``
    (``eps`` of the eigenvalues' dtype): the backward error of a symmetric eigensolver is of
    order ``d * eps * ||H||``, and autodiff adds a few ulps per entry. (The curvature routines
    keep the name ``rtol`` for a residual tolerance; a zero threshold is ``zero_rtol``.)
    """
    d = eigenvalues.shape[-1]
    if zero_rtol is None:
        zero_rtol = 100.0 * max(d, 1) * float(jnp.finfo(eigenvalues.dtype).eps)
    elif not zero_rtol >= 0:
        raise ValueError(f"zero_rtol must be a non-negative number, got {zero_rtol!r}.")
    return zero_rtol * jnp.max(jnp.abs(eigenvalues), axis=-1)


def spectrum_counts(
    eigenvalues: Float[Array, "... d"], zero_rtol: float | None = None
) -> Int[Array, "... 3"]:
    """Counts ``(n_negative, n_zero, n_positive)`` of a spectrum, with a scale-aware zero.

    An eigenvalue is zero when ``|lambda| <= zero_rtol * max_i |lambda_i|``; see
    :func:`zero_tolerance` for the default ``zero_rtol``. Used to check Prop. 10 (the Hessian at a
    global minimum of a linear network has ``dim M`` zero and ``r (d_0 + d_h - r)`` positive
    eigenvalues).

    Args:
        eigenvalues: ``(..., d)`` real eigenvalues (any order); leading axes are batch axes.
        zero_rtol: relative zero threshold, or None for the default.

    Returns:
        ``(..., 3)`` integer counts ``(n_negative, n_zero, n_positive)``.
    """
    eigenvalues = jnp.asarray(eigenvalues)
    if eigenvalues.ndim < 1:
        raise ValueError(
            f"eigenvalues must have at least one axis, got shape {eigenvalues.shape}."
        )
    tol = zero_tolerance(eigenvalues, zero_rtol)[..., None]
    zero = jnp.abs(eigenvalues) <= tol
    negative = (eigenvalues < 0) & ~zero
    positive = (eigenvalues > 0) & ~zero
    return jnp.stack([negative.sum(-1), zero.sum(-1), positive.sum(-1)], axis=-1)
