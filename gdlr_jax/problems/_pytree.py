"""Pytrees of parameters and data, as every layer sees them (layer 1: problems).

A loss is a pure function of a pytree of parameters (``LossFn``); concrete inputs are checked
for NaN and inf before any compute (:func:`check_finite`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jaxtyping import Array, Float

PyTree = Any
LossFn = Callable[[PyTree], Float[Array, ""]]


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
