"""Hypothesis strategies shared by the theory tests: random linear networks and their data,
and the number of examples a property test runs."""

from __future__ import annotations

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from gdlr_jax.linear import LinearNetwork

#: Set by tests/conftest.py: True in the quick subset (``pytest -m "not slow"``), where every
#: property test runs at most ``QUICK_EXAMPLES`` examples; the full suite (CI) runs all of them.
QUICK = False
QUICK_EXAMPLES = 1


def examples(n: int) -> int:
    """``max_examples`` of a property test: ``n`` in the full suite, at most ``QUICK_EXAMPLES``
    in the quick subset."""
    return min(n, QUICK_EXAMPLES) if QUICK else n


@st.composite
def linear_networks(draw, min_depth: int = 2, max_depth: int = 4, max_width: int = 4,
                    filling: bool | None = None) -> LinearNetwork:
    """A random linear network (depth 2-4, widths 1-4) with random Gaussian data.

    ``filling=True/False`` restricts to filling / non-filling architectures.
    """
    depth = draw(st.integers(min_depth, max_depth))
    widths = tuple(draw(st.lists(st.integers(1, max_width), min_size=depth + 1,
                                 max_size=depth + 1)))
    is_filling = min(widths) == min(widths[0], widths[-1])
    if filling is not None:
        assume(is_filling == filling)
    n = widths[0] + draw(st.integers(0, 3))
    scale = draw(st.sampled_from([0.5, 1.0, 1.0 / n]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    X = rng.normal(size=(widths[0], n))
    Y = rng.normal(size=(widths[-1], n))
    try:
        net = LinearNetwork(widths, X, Y, scale=scale)
    except ValueError:  # a (measure-zero) tie in the rank-r approximation
        assume(False)
    assume(net.target_rank == net.rank)
    return net
