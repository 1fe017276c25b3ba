"""``gdlr_jax.linear``: the public name of :mod:`gdlr_jax.problems.linear` (layer 1: problems)."""

from gdlr_jax.problems.linear import *  # noqa: F403
from gdlr_jax.problems.linear import __all__ as __all__
