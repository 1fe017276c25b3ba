"""Pytrees of parameters and data, as every layer sees them (layer 1: problems).

A loss is a pure function of a pytree of parameters (``LossFn``); concrete inputs are checked
for NaN and inf before any compute (:func:`check_finite`), and every routine that
differentiates a loss checks the same things first: float32 or float64 leaves
(:func:`check_param_dtypes`), at least one parameter (:func:`check_dimension`) and a real
floating loss (:func:`check_loss_dtype`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

PyTree = Any
LossFn = Callable[[PyTree], Float[Array, ""]]

#: the dtypes of parameters and losses every routine supports. Half precision (float16,
#: bfloat16) is refused: LAPACK has no routines for it and its 3-4 significant digits are
#: below the tolerances of the eigen-solvers and of the trajectory status.
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_param_dtypes(name: str, dtypes: Iterable[Any]) -> None:
    """Raises ``ValueError`` unless every dtype (of the leaves of ``name``) is float32 or
    float64 (:data:`SUPPORTED_DTYPES`)."""
    for dtype in dtypes:
        dt = np.dtype(dtype)
        if dt in SUPPORTED_DTYPES:
            continue
        half = jnp.issubdtype(dt, jnp.floating) and dt.itemsize == 2
        raise ValueError(
            f"{name}: every leaf must be a floating-point array (float32 or float64), got a "
            f"leaf of dtype {dt}"
            + (": half precision is not supported (no LAPACK routines; 3-4 digits are below "
               "the tolerances); cast it to float32." if half else ".")
        )


def check_dimension(name: str, shapes: Iterable[tuple[int, ...]]) -> int:
    """The number of parameters ``d`` of leaves of these shapes; ``ValueError`` when it is 0
    (every leaf empty: no point to differentiate at)."""
    shapes = list(shapes)
    dim = sum(math.prod(shape) for shape in shapes)
    if dim == 0:
        raise ValueError(
            f"{name}: the parameters have dimension d = 0 (leaf shapes {shapes}); expected at "
            "least one parameter."
        )
    return dim


def check_loss_dtype(dtype: Any, where: str = "") -> None:
    """Raises ``ValueError`` unless a loss of this dtype can be differentiated: a real
    floating scalar (not an integer, a boolean or a complex number)."""
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"loss_fn must return a real floating-point scalar{where}, got dtype "
            f"{np.dtype(dtype)}: gradients need a real loss (cast an integer with "
            ".astype(float), take the real part of a complex one)."
        )


def check_finite(name: str, tree: PyTree) -> None:
    """Raises ``ValueError`` if a concrete leaf of ``tree`` holds NaN or inf.

    The message names the leaf (its path in ``tree``), the number of bad entries and the index
    and value of the first one. Traced leaves (inside ``jit``/``vmap``) cannot be inspected and
    are passed through: there a non-finite point gives non-finite results, which the caller
    treats as data.
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(leaf, jax.core.Tracer):
            continue
        values = np.asarray(leaf)
        finite = np.isfinite(values)
        bad = int(finite.size - np.count_nonzero(finite))
        if bad:
            first = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)}: {bad} of {finite.size} entries are not "
                f"finite (NaN or inf), the first at index {first}: {values[first].item()!r}."
            )
