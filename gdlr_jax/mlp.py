"""``gdlr_jax.mlp``: the public name of :mod:`gdlr_jax.problems.mlp` (layer 1: problems)."""

from gdlr_jax.problems.mlp import *  # noqa: F403
from gdlr_jax.problems.mlp import __all__ as __all__
