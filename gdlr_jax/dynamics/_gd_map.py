"""The gradient-descent map ``G(theta) = theta - eta grad L(theta)`` and its Jacobian (layer 3).

``DG(theta) = I - eta H_L(theta)`` (Remark 5) is symmetric, so its eigenvalues are
``1 - eta lambda_i`` for the Hessian eigenvalues ``lambda_i``; its determinant is non-zero
except on a null set of ``(theta, eta)`` (Thm. 15 for linear networks, Thm. 20 in general).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from gdlr_jax.curvature._hessian import LossFn, PyTree, hessian, hessian_spectrum


def gd_map(loss_fn: LossFn, eta: ArrayLike) -> Callable[[PyTree], PyTree]:
    """The GD map ``G(theta) = theta - eta * grad L(theta)`` (eq. 2), on pytrees.

    Args:
        loss_fn: ``params -> scalar``.
        eta: the step size (a traced scalar is fine: nothing is static).

    Returns:
        ``G``, a function from params to params of the same structure.
    """
    grad = jax.grad(loss_fn)

    def step(params: PyTree) -> PyTree:
        return jax.tree_util.tree_map(lambda p, g: p - eta * g, params, grad(params))

    return step


def gd_map_jacobian(loss_fn: LossFn, params: PyTree, eta: ArrayLike) -> Float[Array, "d d"]:
    """``DG(theta) = I - eta H_L(theta)`` over the flattened parameters (Remark 5).

    Returns:
        The ``(d, d)`` Jacobian of :func:`gd_map` at ``params``.
    """
    h = hessian(loss_fn, params)
    return jnp.eye(h.shape[0], dtype=h.dtype) - eta * h


def gd_map_eigenvalues(loss_fn: LossFn, params: PyTree, eta: ArrayLike) -> Float[Array, " d"]:
    """Eigenvalues ``1 - eta lambda_i`` of ``DG``, ordered as the Hessian's ascending ones.

    (So they come in descending order for ``eta > 0``.)
    """
    return 1.0 - eta * hessian_spectrum(loss_fn, params)


def gd_map_spectral_radius(loss_fn: LossFn, params: PyTree, eta: ArrayLike) -> Float[Array, ""]:
    """``rho(DG) = max_i |1 - eta lambda_i|``, the linear stability indicator (Remark 2)."""
    return jnp.max(jnp.abs(gd_map_eigenvalues(loss_fn, params, eta)))


def gd_map_slogdet(
    loss_fn: LossFn, params: PyTree, eta: ArrayLike
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Sign and ``log|det DG|`` with ``det DG = prod_i (1 - eta lambda_i)`` (Thm. 15, 20).

    Computed from the eigenvalues, which is accurate even when ``|det|`` under- or overflows.

    Returns:
        ``(sign, logabsdet)`` as ``jnp.linalg.slogdet``: ``sign`` is 0 and ``logabsdet`` is
        ``-inf`` exactly when ``DG`` is singular.
    """
    mu = gd_map_eigenvalues(loss_fn, params, eta)
    return jnp.prod(jnp.sign(mu)), jnp.sum(jnp.log(jnp.abs(mu)))
