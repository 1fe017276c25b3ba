"""Checks of a sweep's arguments, on the host before any compute (layer 4: engine).

Each raises ``ValueError`` naming the argument, its value or shape, and what was expected."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import PRNGKeyArray

from gdlr_jax.engine._memory import one_trajectory
from gdlr_jax.engine._minibatches import Minibatches
from gdlr_jax.problems._pytree import PyTree, check_finite


def check_etas(etas: Any, dtype: Any) -> np.ndarray:
    values = np.asarray(etas)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(
            f"etas must be a non-empty 1-D array of step sizes, got shape {values.shape}."
        )
    if not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
        raise ValueError(f"etas must be real numbers, got dtype {values.dtype}.")
    bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"etas must be positive and finite, got etas[{i}] = {values[i].item()!r} "
            f"({bad.size} bad value(s))."
        )
    return values.astype(dtype)


def check_params(params0: PyTree, dtype: Any) -> tuple[PyTree, int]:
    """``params0`` cast to ``dtype`` on the host, and ``n_init``; ``jax.ShapeDtypeStruct``
    leaves (an abstract plan) stay abstract."""
    leaves, treedef = jax.tree_util.tree_flatten(params0)
    if not leaves:
        raise ValueError("params0: the pytree has no array leaves; expected at least one.")
    abstract = [isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves]
    if any(abstract) and not all(abstract):
        raise ValueError(
            "params0: every leaf must be an array, or every leaf a jax.ShapeDtypeStruct (an "
            "abstract plan); got a mix."
        )
    arrays = leaves if all(abstract) else [np.asarray(leaf) for leaf in leaves]
    shapes = [a.shape for a in arrays]
    if any(a.ndim == 0 for a in arrays):
        raise ValueError(
            "params0: every leaf needs a leading initialisation axis (n_init, ...), got leaf "
            f"shapes {shapes}."
        )
    sizes = {a.shape[0] for a in arrays}
    if len(sizes) != 1:
        raise ValueError(
            "params0: every leaf must have the same leading initialisation axis n_init, got "
            f"leaf shapes {shapes}."
        )
    (n_init,) = sizes
    if n_init == 0:
        raise ValueError(f"params0: the grid is empty (n_init = 0), got leaf shapes {shapes}.")
    for a in arrays:
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(
                f"params0: leaves must be real arrays, got a leaf of dtype {a.dtype}."
            )
    if all(abstract):
        cast = [jax.ShapeDtypeStruct(a.shape, dtype) for a in arrays]
        return jax.tree_util.tree_unflatten(treedef, cast), n_init
    with np.errstate(over="ignore"):  # an overflow becomes inf, reported just below
        cast = jax.tree_util.tree_unflatten(treedef, [a.astype(dtype) for a in arrays])
    check_finite("params0", cast)  # after the cast: a float64 value beyond float32 is inf
    return cast, n_init


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def check_dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be a floating dtype, got {dtype!r}.") from None
    if not np.issubdtype(dt, np.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dt}.")
    if dt.itemsize > 4 and not jax.config.jax_enable_x64:
        raise ValueError(
            f"dtype {dt} needs jax_enable_x64 (jax.config.update('jax_enable_x64', True))."
        )
    return dt


def check_key(key: Any, batch_source: Any) -> PRNGKeyArray | None:
    if batch_source is None:
        if key is not None:
            raise ValueError("key is only used with batch_source (minibatch SGD); got a key.")
        return None
    if key is None:
        raise ValueError("key: a PRNG key is required with batch_source, got None.")
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"key must be a single PRNG key, got shape {key.shape}.")
        return key
    raw = np.asarray(key)
    if raw.dtype != np.uint32 or raw.shape != (2,):
        raise ValueError(
            f"key must be a PRNG key (jax.random.key(seed)), got {raw.dtype} {raw.shape}."
        )
    return jax.random.wrap_key_data(jnp.asarray(raw))


def check_optimizer(optimizer: Any) -> None:
    if optimizer is None:
        return
    try:
        transform = optax.inject_hyperparams(optimizer)(learning_rate=1.0)
    except Exception as error:  # noqa: BLE001 - report any failure as a bad argument
        raise ValueError(
            "optimizer must be an optax factory taking learning_rate (e.g. optax.sgd, "
            f"optax.adam), got {optimizer!r}: {error}"
        ) from error
    if not isinstance(transform, optax.GradientTransformation):
        raise ValueError(
            f"optimizer must build an optax GradientTransformation, got {transform!r}."
        )


def check_loss(loss_fn: Any, params: PyTree, source: Minibatches | None) -> None:
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {loss_fn!r}.")
    single = one_trajectory(params)
    args = (single,)
    if source is not None:
        batch = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((source.batch_size,) + x.shape[1:], x.dtype),
            source.data,
        )
        args = (single, batch)
    what = "one initialisation (params0 without its leading axis" + (
        " and one batch)" if source else ")"
    )
    try:
        out = jax.eval_shape(loss_fn, *args)
    except Exception as error:  # noqa: BLE001 - any failure of the user's function is bad input
        raise ValueError(f"loss_fn could not be evaluated on {what}: {error}") from error
    shape = getattr(out, "shape", None)
    if shape != ():
        raise ValueError(
            f"loss_fn must return a scalar for {what}, got {shape or type(out).__name__}."
        )
