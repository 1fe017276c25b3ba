"""Checks of a sweep's arguments, on the host before any compute (layer 4: engine).

Each raises ``ValueError`` naming the argument, its value or shape, and what was expected."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import PRNGKeyArray

from gdlr_jax.engine._memory import one_trajectory
from gdlr_jax.engine._minibatches import Minibatches
from gdlr_jax.engine._problem import LYAPUNOV_STEPS
from gdlr_jax.problems._pytree import PyTree, check_finite, check_loss_dtype


#: the largest value of a step counter (``steps``, ``check_every``, ``record_every``,
#: ``sharpness_every``, ...): the kernels count steps in int32 and add two counters (the
#: next evaluation time ``t + check_every``), so each is at most 2^30 and a sum stays below
#: 2^31.
MAX_COUNTER = 1 << 30
_COUNTERS = frozenset(
    {"steps", "check_every", "record_every", "sharpness_every", "sharpness_iterations",
     "step_block"}
)
#: the most trajectories of one sweep: the kernels index them (``k = i * n_init + j``, plus
#: up to a chunk past the end) in int32.
MAX_TRAJECTORIES = MAX_COUNTER


def check_grid_size(n_eta: int, n_init: int) -> None:
    """``n_eta * n_init`` trajectories fit the kernels' int32 trajectory index."""
    if n_eta * n_init > MAX_TRAJECTORIES:
        raise ValueError(
            f"the grid has {n_eta} x {n_init} = {n_eta * n_init} trajectories, more than the "
            f"2^30 = {MAX_TRAJECTORIES} the engine indexes (int32): sweep fewer step sizes or "
            "initialisations per call."
        )


def _cast(values: np.ndarray, dtype: Any) -> np.ndarray:
    with np.errstate(over="ignore", under="ignore"):  # checked by the caller
        return values.astype(dtype)


def check_etas(etas: Any, dtype: Any) -> np.ndarray:
    """``etas`` cast to ``dtype``; every step size positive and finite *after* the cast, and
    a normal number (in float32, ``1e-50`` is 0, ``1e-40`` subnormal, flushed to zero by XLA
    on CPU, and ``1e300`` inf: all refused)."""
    values = np.asarray(etas)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(
            f"etas must be a non-empty 1-D array of step sizes, got shape {values.shape}."
        )
    if not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
        raise ValueError(f"etas must be real numbers, got dtype {values.dtype}.")
    cast = _cast(values, dtype)
    bad = np.flatnonzero(~(np.isfinite(cast) & (cast >= np.finfo(dtype).tiny)))
    if bad.size:
        i = int(bad[0])
        after = ""
        if np.isfinite(values[i]) and values[i] > 0:
            after = (
                f", which is {cast[i].item()!r} in {np.dtype(dtype)} (the sweep's dtype; "
                f"its normal numbers span {np.finfo(dtype).tiny:.3g} to "
                f"{np.finfo(dtype).max:.3g})"
            )
        raise ValueError(
            f"etas must be positive and finite, got etas[{i}] = {values[i].item()!r}{after} "
            f"({bad.size} bad value(s))."
        )
    return cast


def check_cast_criteria(criteria: Any, min_loss_value: Any, dtype: Any) -> None:
    """The tolerances of ``criteria`` and ``min_loss_value`` as the kernels see them, cast
    to ``dtype``: a nonzero value must stay a normal number (``grad_tol = 1e-50`` is 0 in
    float32: convergence would need an exactly zero gradient), a finite value finite."""
    values = {f"criteria.{name}": getattr(criteria, name) for name in
              ("grad_tol", "step_tol", "loss_tol", "divergence_bound", "period_tol")}
    values["min_loss_value"] = min_loss_value
    for name, value in values.items():
        if value is None or not math.isfinite(value):
            continue
        cast = _cast(np.asarray(value, np.float64), dtype)
        if not np.isfinite(cast) or (value != 0 and abs(cast) < np.finfo(dtype).tiny):
            raise ValueError(
                f"{name} = {value!r} is {cast.item()!r} in {np.dtype(dtype)} (the sweep's "
                f"dtype); give a value that {np.dtype(dtype)} represents (its range: "
                f"{np.finfo(dtype).tiny:.3g} to {np.finfo(dtype).max:.3g} in magnitude)."
            )


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
    empty = [shape for shape in shapes if math.prod(shape[1:]) == 0]
    if empty:
        raise ValueError(
            f"params0: a leaf of shape {empty[0]} holds no parameters (a zero-size axis); "
            f"every leaf needs at least one entry per initialisation, got leaf shapes {shapes}."
        )
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
    """A positive integer; a step counter (:data:`MAX_COUNTER`) at most 2^30."""
    if value is None and allow_none:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if name in _COUNTERS and value > MAX_COUNTER:
        raise ValueError(
            f"{name} must be at most 2^30 = {MAX_COUNTER} (the engine counts steps in int32), "
            f"got {value!r}."
        )


def check_dtype(dtype: Any) -> np.dtype:
    """float32 or float64: half precision (float16, bfloat16) is refused, its 3-4 digits
    are below the tolerances of the trajectory status and LAPACK has no such routines."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be a floating dtype, got {dtype!r}.") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dt}.")
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(
            f"dtype must be a floating dtype, got {dt}: half precision is not supported (its "
            "3-4 digits are below the convergence tolerances); use float32 or float64."
        )
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
    check_loss_dtype(out.dtype, f" for {what}")


def check_lyapunov(
    lyapunov: Any,
    lyapunov_steps: Any,
    *,
    steps: int,
    window: int,
    optimizer: Any,
    batch_source: Any,
) -> int:
    """The number of final steps of the Lyapunov exponent (0 without ``lyapunov``): by default
    ``min(steps, max(LYAPUNOV_STEPS, window))``. The exponent is that of the plain full-batch
    GD map, so ``lyapunov=True`` refuses an optimiser and a minibatch source."""
    if not isinstance(lyapunov, (bool, np.bool_)):
        raise ValueError(f"lyapunov must be a bool, got {lyapunov!r}.")
    if not lyapunov:
        if lyapunov_steps is not None:
            raise ValueError(
                f"lyapunov_steps = {lyapunov_steps!r} needs lyapunov=True (the exponent's steps)."
            )
        return 0
    if optimizer is not None:
        raise ValueError(
            "lyapunov=True needs plain GD (optimizer=None): the exponent is that of the GD map "
            f"theta - eta grad L(theta), got optimizer={optimizer!r}."
        )
    if batch_source is not None:
        raise ValueError(
            "lyapunov=True needs full-batch GD (batch_source=None): the exponent is that of the "
            "deterministic GD map theta - eta grad L(theta), not of a random minibatch map."
        )
    if lyapunov_steps is None:
        return min(steps, max(LYAPUNOV_STEPS, window))
    check_positive_int("lyapunov_steps", lyapunov_steps)
    if lyapunov_steps > steps:
        raise ValueError(
            f"lyapunov_steps = {lyapunov_steps} exceeds steps = {steps}: the exponent is "
            "measured over the final lyapunov_steps steps of the run."
        )
    return int(lyapunov_steps)
