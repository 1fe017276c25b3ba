"""Test configuration: float64, strict shapes, and a hypothesis profile sized for 2 cores.

* float64 is on for the whole suite: the theorems are checked with tolerances near 1e-10.
  Code paths that default to float32 (the trajectory engine) are tested with an explicit
  ``dtype=jnp.float32`` argument.
* ``jax_numpy_rank_promotion="raise"``: an accidental broadcast of a (n,) against (n, 1) is an
  error, not a silently wrong number.
* hypothesis runs derandomized (reproducible in CI), without deadline (the first call of a
  jitted function compiles), with few examples (2-core machine).
"""

from __future__ import annotations

import os
import pathlib

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=15,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_dir() -> pathlib.Path:
    """The folder of real MNIST IDX files used by the data and experiment tests.

    Taken from ``GDLR_MNIST_DIR`` (the variable ``gdlr run`` reads too, docs/data.md) or, by
    default, ``../shared/data/mnist-sample`` beside the repository (where the project's CI
    lays its sample). Tests that need it are skipped when it is absent.
    """
    path = pathlib.Path(
        os.environ.get("GDLR_MNIST_DIR", REPO_ROOT.parent / "shared" / "data" / "mnist-sample")
    )
    if not path.is_dir():
        pytest.skip(
            f"MNIST folder not found at {path} (set GDLR_MNIST_DIR to a folder of MNIST IDX "
            "files; docs/data.md)"
        )
    return path
