"""Minibatches for SGD sweeps, drawn per epoch from a PRNG key (layer 4: engine).

A data set is a pytree whose leaves share a leading example axis of length ``n``. Step ``t``
(counted from 0) belongs to epoch ``e = t // (n // batch_size)``; the examples are shuffled
once per epoch with the permutation ``pi_e = permutation(fold_in(key, e), n)`` and step ``t``
uses the ``b = t mod (n // batch_size)``-th consecutive block of ``batch_size`` examples of
``pi_e`` (the last ``n mod batch_size`` examples of each shuffle are left out). The batch of a
step is a pure function of ``(key, t)``: every trajectory given the same key sees the same
sequence, and a sweep is reproducible bit for bit.

``loss_fn(params, batch)`` must be the *mean* of a per-example loss over the batch, so that the
full-batch loss is the example-weighted mean of the losses of disjoint blocks
(:func:`full_batch_value_and_grad`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from gdlr_jax.problems._pytree import check_finite

PyTree = Any


class Minibatches(NamedTuple):
    """The data source of an SGD sweep: a data set and a batch size.

    Attributes:
        data: pytree of arrays with a shared leading example axis ``(n, ...)``.
        batch_size: examples per step, ``1 <= batch_size <= n``.
    """

    data: PyTree
    batch_size: int

    @property
    def num_examples(self) -> int:
        """``n``, the length of the leading axis of the data leaves."""
        return int(jax.tree_util.tree_leaves(self.data)[0].shape[0])

    @property
    def steps_per_epoch(self) -> int:
        """``n // batch_size``."""
        return self.num_examples // self.batch_size


def as_minibatches(batch_source: Any, dtype: Any) -> Minibatches:
    """Validates ``batch_source = (data, batch_size)`` and casts floating data to ``dtype``.

    Raises:
        ValueError: if ``batch_source`` is not a pair, the data has no leaves, a leaf has no
            leading axis, the leading axes differ or are empty, ``batch_size`` is not an
            integer in ``[1, n]``, or a data value is NaN or inf (after the cast to ``dtype``).
    """
    if not isinstance(batch_source, tuple) or len(batch_source) != 2:
        raise ValueError(
            "batch_source must be a pair (data, batch_size) or a Minibatches, got "
            f"{type(batch_source).__name__}."
        )
    data, batch_size = batch_source
    leaves, treedef = jax.tree_util.tree_flatten(data)
    if not leaves:
        raise ValueError("batch_source: the data pytree has no array leaves.")
    arrays = [np.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf for leaf in leaves]
    shapes = [tuple(a.shape) for a in arrays]
    if any(len(s) == 0 for s in shapes):
        raise ValueError(
            f"batch_source: every data leaf needs a leading example axis, got shapes {shapes}."
        )
    sizes = {s[0] for s in shapes}
    if len(sizes) != 1:
        raise ValueError(
            f"batch_source: data leaves must share the leading example axis, got shapes "
            f"{shapes}."
        )
    (n,) = sizes
    if n == 0:
        raise ValueError("batch_source: the data set is empty (leading axis of length 0).")
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or not (
        1 <= batch_size <= n
    ):
        raise ValueError(
            f"batch_source: batch_size must be an integer in [1, n] = [1, {n}], got "
            f"{batch_size!r}."
        )
    cast = [
        jnp.asarray(a, dtype) if jnp.issubdtype(a.dtype, jnp.floating) else jnp.asarray(a)
        for a in arrays
    ]
    data = jax.tree_util.tree_unflatten(treedef, cast)
    check_finite("batch_source data", data)
    return Minibatches(data, int(batch_size))


def epoch_permutation(
    source: Minibatches, key: PRNGKeyArray, step: Int[Array, ""]
) -> Int[Array, " n"]:
    """The shuffle ``pi_e = permutation(fold_in(key, e), n)`` of the epoch of ``step``."""
    epoch = step // source.steps_per_epoch
    return jax.random.permutation(jax.random.fold_in(key, epoch), source.num_examples)


def minibatch(source: Minibatches, permutation: Int[Array, " n"], step: Int[Array, ""]) -> PyTree:
    """The batch of ``step``: block ``step mod (n // batch_size)`` of its epoch's shuffle.

    Args:
        source: the data set.
        permutation: :func:`epoch_permutation` of ``step``'s epoch, ``(n,)``.
        step: the step index (scalar).

    Returns:
        The data pytree restricted to ``batch_size`` examples (leaves ``(batch_size, ...)``).
    """
    start = (step % source.steps_per_epoch) * source.batch_size
    indices = lax.dynamic_slice(permutation, (start,), (source.batch_size,))
    return jax.tree_util.tree_map(lambda x: jnp.take(x, indices, axis=0), source.data)


def full_batch_value_and_grad(
    loss_fn: Callable[[PyTree, PyTree], Float[Array, ""]],
    params: PyTree,
    source: Minibatches,
) -> tuple[Float[Array, ""], PyTree]:
    """Full-batch loss and gradient, evaluated in consecutive blocks of ``batch_size``.

    ``L(theta) = (1/n) sum_k |B_k| loss_fn(theta, B_k)`` over the blocks ``B_k`` of the data in
    its stored order (exact when ``loss_fn`` is a mean over the batch); the memory used is that
    of one training step.

    Returns:
        ``(loss, grads)``: a scalar and a pytree like ``params``.
    """
    n, size = source.num_examples, source.batch_size
    value_and_grad = jax.value_and_grad(loss_fn)
    num_full, rest = divmod(n, size)

    def add_block(carry, block_index):
        total, grads = carry
        block = jax.tree_util.tree_map(
            lambda x: lax.dynamic_slice_in_dim(x, block_index * size, size, axis=0),
            source.data,
        )
        value, block_grads = value_and_grad(params, block)
        grads = jax.tree_util.tree_map(lambda a, g: a + size * g, grads, block_grads)
        return (total + size * value, grads), None

    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    zero_loss = jnp.zeros((), jax.tree_util.tree_leaves(params)[0].dtype)
    (total, grads), _ = lax.scan(add_block, (zero_loss, zero_grads), jnp.arange(num_full))
    if rest:
        tail = jax.tree_util.tree_map(lambda x: x[num_full * size :], source.data)
        value, tail_grads = value_and_grad(params, tail)
        total = total + rest * value
        grads = jax.tree_util.tree_map(lambda a, g: a + rest * g, grads, tail_grads)
    return total / n, jax.tree_util.tree_map(lambda g: g / n, grads)
