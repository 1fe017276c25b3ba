"""Test configuration: float64, strict shapes, and a hypothesis profile sized for 2 cores.

* float64 is on for the whole suite: the theorems are checked with tolerances near 1e-10.
  Code paths that default to float32 (the trajectory engine) are tested with an explicit
  ``dtype=jnp.float32`` argument.
* ``jax_numpy_rank_promotion="raise"``: an accidental broadcast of a (n,) against (n, 1) is an
  error, not a silently wrong number.
* hypothesis runs derandomized (reproducible in CI), without deadline (the first call of a
  jitted function compiles), with few examples (2-core machine); in the quick subset
  (``pytest -m "not slow"``) every property test runs at most ``strategies.QUICK_EXAMPLES``.
* A persistent XLA compilation cache in a temporary folder of this test session (removed at
  its end; shared by pytest-xdist workers and by the ``gdlr`` processes the tests start,
  through ``JAX_COMPILATION_CACHE_DIR``): tests build fresh closures of the same programs,
  which then compile once. Set ``GDLR_TESTS_XLA_CACHE=0`` to compile everything afresh.
* After a test, the compiled programs are freed once the process holds half the kernel's
  limit of memory mappings (XLA:CPU's programs hold ~250 each; past the limit a compile
  segfaults).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import jax
import pytest
import strategies
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

_CACHE_OWNER = os.environ.get("GDLR_TESTS_XLA_CACHE") is None
if _CACHE_OWNER:
    os.environ["GDLR_TESTS_XLA_CACHE"] = tempfile.mkdtemp(prefix="gdlr-tests-xla-cache-")
if os.environ["GDLR_TESTS_XLA_CACHE"] != "0":
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["GDLR_TESTS_XLA_CACHE"]
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"
    jax.config.update("jax_compilation_cache_dir", os.environ["GDLR_TESTS_XLA_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Removes the session's compilation cache (only the process that made it)."""
    if _CACHE_OWNER and os.environ["GDLR_TESTS_XLA_CACHE"] != "0":
        shutil.rmtree(os.environ["GDLR_TESTS_XLA_CACHE"], ignore_errors=True)


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


def pytest_configure(config: pytest.Config) -> None:
    """The quick subset (a marker expression that leaves out ``slow``) runs few examples."""
    strategies.QUICK = "not slow" in (config.option.markexpr or "")
    if strategies.QUICK:
        settings.register_profile(
            "quick", parent=settings(), max_examples=strategies.QUICK_EXAMPLES
        )
        settings.load_profile("quick")



def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Frees the compiled programs once this process holds half the kernel's memory
    mappings: the suite compiles thousands of programs in one process, and XLA:CPU would
    otherwise crash in a compile past ``vm.max_map_count`` (``engine/_memory.py``)."""
    from gdlr_jax.engine._memory import release_compiled_programs

    release_compiled_programs(0.5, warn=False)


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
