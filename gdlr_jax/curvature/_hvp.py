"""Hessian-vector products of pytree losses, full batch or exactly batched (layer 2: curvature).

``H v`` is computed forward-over-reverse, ``H v = d/dt grad L(theta + t v) |_{t=0}``
(``jax.jvp`` of ``jax.grad``): about the cost of two to three gradients and the memory of one,
never the ``(d, d)`` matrix.

When the loss is a mean over data, ``L(theta) = (1/n) sum_i l(theta, z_i)``, and the data are
split into batches ``B_1, ..., B_K`` of sizes ``n_b`` (the last one possibly smaller), the
full-batch Hessian is recovered exactly as ``H = sum_b (n_b / n) H_b`` with ``H_b`` the Hessian
of the batch mean; only one batch is in memory at a time.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float

from gdlr_jax.curvature._hessian import flatten_loss
from gdlr_jax.problems._pytree import PyTree, check_finite, check_loss_dtype

Matvec = Callable[[Float[Array, " d"]], Float[Array, " d"]]


def _data_size(data: PyTree) -> int:
    """The common leading size ``n`` of the leaves of ``data``, checked."""
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise ValueError("data: the pytree has no array leaves; expected arrays of leading size n.")
    sizes = {int(jnp.shape(leaf)[0]) if jnp.ndim(leaf) else None for leaf in leaves}
    if None in sizes or len(sizes) != 1 or 0 in sizes:
        shapes = [tuple(jnp.shape(leaf)) for leaf in leaves]
        raise ValueError(
            f"data: every leaf must have the same non-zero leading size n (the examples), got "
            f"shapes {shapes}."
        )
    return sizes.pop()


def _check_batch_size(batch_size: Any, data: PyTree) -> None:
    if batch_size is None:
        return
    if data is None:
        raise ValueError(
            f"batch_size={batch_size!r} needs data: without data the loss is evaluated as a "
            "whole (full batch)."
        )
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")


def _check_tangents(params: PyTree, tangents: PyTree) -> None:
    p_def, t_def = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(tangents)
    p_shapes = [jnp.shape(x) for x in jax.tree_util.tree_leaves(params)]
    t_shapes = [jnp.shape(x) for x in jax.tree_util.tree_leaves(tangents)]
    if p_def != t_def or p_shapes != t_shapes:
        raise ValueError(
            f"tangents must have the structure and leaf shapes of params: params {p_def} with "
            f"shapes {p_shapes}, tangents {t_def} with shapes {t_shapes}."
        )


def hvp(
    loss_fn: Callable[..., Float[Array, ""]],
    params: PyTree,
    tangents: PyTree,
    data: PyTree | None = None,
    batch_size: int | None = None,
) -> PyTree:
    """Hessian-vector product ``H_L(theta) v`` over pytrees, by ``jax.jvp`` of ``jax.grad``.

    Without ``data``, ``L = loss_fn(params)``. With ``data`` (a pytree of arrays of leading size
    ``n``), ``loss_fn(params, batch)`` must be the *mean* loss over ``batch``, and
    ``L(theta) = loss_fn(theta, data)``; with ``batch_size`` the product is accumulated over
    ``floor(n / batch_size)`` batches of ``batch_size`` examples (a ``lax.scan``) and one last
    batch of the ``n mod batch_size`` remaining ones, each weighted by its share ``n_b / n``:
    ``H v = sum_b (n_b / n) H_b v``, exactly the full-batch product.

    Differentiable, ``jit``-able and ``vmap``-able over ``tangents`` (many vectors at once).

    Args:
        loss_fn: ``params -> scalar`` or, with ``data``, ``(params, batch) -> scalar``.
        params: the point ``theta``, any pytree of floating arrays.
        tangents: ``v``, a pytree with the structure and shapes of ``params``.
        data: optional pytree of arrays with a common leading size ``n``.
        batch_size: optional number of examples per batch (needs ``data``).

    Returns:
        ``H v`` with the structure of ``params``.
    """
    _check_tangents(params, tangents)
    _check_batch_size(batch_size, data)
    tangents = jax.tree_util.tree_map(
        lambda p, t: jnp.asarray(t, jnp.result_type(p)), params, tangents
    )

    def batch_hvp(batch: PyTree | None) -> PyTree:
        loss = loss_fn if batch is None else (lambda p: loss_fn(p, batch))
        check_loss_dtype(jax.eval_shape(loss, params).dtype)  # before jax.grad's TypeError
        return jax.jvp(jax.grad(loss), (params,), (tangents,))[1]

    if data is None:
        return batch_hvp(None)
    n = _data_size(data)
    if batch_size is None or batch_size >= n:
        return batch_hvp(data)
    num_full, remainder = divmod(n, batch_size)
    full = jax.tree_util.tree_map(
        lambda x: x[: num_full * batch_size].reshape(num_full, batch_size, *x.shape[1:]), data
    )

    def accumulate(total: PyTree, batch: PyTree) -> tuple[PyTree, None]:
        return jax.tree_util.tree_map(jnp.add, total, batch_hvp(batch)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, tangents)
    total, _ = jax.lax.scan(accumulate, zeros, full)
    out = jax.tree_util.tree_map(lambda s: s * (batch_size / n), total)
    if remainder:
        rest = batch_hvp(jax.tree_util.tree_map(lambda x: x[num_full * batch_size :], data))
        out = jax.tree_util.tree_map(lambda o, r: o + r * (remainder / n), out, rest)
    return out


def hessian_matvec(
    loss_fn: Callable[..., Float[Array, ""]],
    params: PyTree,
    data: PyTree | None = None,
    batch_size: int | None = None,
) -> Matvec:
    """The Hessian of a pytree loss as a matvec ``v (d,) -> H v (d,)`` on flat vectors.

    ``v`` is cast to the parameters' dtype (the products run in the model's precision), laid
    out as ``ravel_pytree(params)``, and the product :func:`hvp` is flattened the same way.
    The matvec is ``jit``-able and ``vmap``-able (``jax.vmap(matvec)(V)`` for ``V (k, d)``).

    Args:
        loss_fn, params, data, batch_size: as in :func:`hvp`.

    Returns:
        ``matvec``: ``(d,) -> (d,)`` in the dtype of the flat parameters.

    Raises:
        ValueError: on a malformed loss or params (see ``flatten_loss``), non-finite concrete
            params, or malformed ``data``/``batch_size``.
    """
    _check_batch_size(batch_size, data)
    if data is not None:
        _data_size(data)
    full_loss = loss_fn if data is None else (lambda p: loss_fn(p, data))
    flat = flatten_loss(full_loss, params)
    check_finite("params", params)

    def matvec(v: Float[Array, " d"]) -> Float[Array, " d"]:
        tangents = flat.unravel(jnp.asarray(v, flat.theta.dtype))
        return ravel_pytree(hvp(loss_fn, params, tangents, data, batch_size))[0]

    return matvec
