"""Layer 1, problems: pure losses over pytrees of parameters, and the data they read.

* :mod:`gdlr_jax.problems.linear` (public as ``gdlr_jax.linear``): linear networks, their
  manifold of minima ``M``, the two-neuron example and deep scalar networks;
* :mod:`gdlr_jax.problems.mlp` (public as ``gdlr_jax.mlp``): Flax MLPs as pure losses;
* :mod:`gdlr_jax.problems.data` (public as ``gdlr_jax.data``): MNIST from IDX files or TFDS;
* ``_pytree``: the ``PyTree`` and ``LossFn`` types and the NaN/inf check every layer uses.

This layer imports no other layer of gdlr_jax. ``mlp`` is imported on first use (it imports
Flax).
"""

import importlib as _importlib
from typing import Any as _Any

from gdlr_jax.problems import data as data
from gdlr_jax.problems import linear as linear


def __getattr__(name: str) -> _Any:
    """``gdlr_jax.problems.mlp``, imported on first access (it imports Flax)."""
    if name == "mlp":
        return _importlib.import_module("gdlr_jax.problems.mlp")
    raise AttributeError(f"module 'gdlr_jax.problems' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "mlp"])
