"""Host memory of sweeps and runs: abstract plans, ``HostMemoryError``, ``check_host_memory``.

A sweep's results live on the host; :func:`gdlr_jax.plan_sweep` estimates them (and the
grid, data and one chunk) before any compute, from arrays or from ``jax.ShapeDtypeStruct``
leaves without allocating the grid. The estimate is checked here against the peak resident
memory that a real sweep adds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gdlr_jax
from gdlr_jax import linear
from gdlr_jax.experiments.config import ConfigError
from gdlr_jax.experiments.runner import MemoryNeed, check_host_memory

LOSS = linear.two_neuron(jnp.float32).loss
ETAS = np.array([0.1, 0.5, 0.9])
GiB = 1 << 30


def _abstract(n_init: int, dtype=jnp.float32) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct((n_init, 1, 1), dtype)] * 2


# ----- abstract plans -----------------------------------------------------------------------
@pytest.mark.parametrize("record_every", [None, 5])
def test_abstract_plan_equals_the_plan_of_the_arrays(record_every):
    ones = [np.ones((1000, 1, 1), np.float32)] * 2
    kwargs = dict(steps=20, record_every=record_every, record_params=record_every is not None)
    concrete = gdlr_jax.plan_sweep(LOSS, ones, ETAS, **kwargs)
    abstract = gdlr_jax.plan_sweep(LOSS, _abstract(1000), ETAS, **kwargs)
    assert abstract.abstract and not concrete.abstract
    for name in ("grid_shape", "chunk_size", "num_chunks", "chunk_bytes", "result_bytes",
                 "peak_host_bytes"):
        assert getattr(abstract, name) == getattr(concrete, name), name
    np.testing.assert_array_equal(abstract.record_steps, concrete.record_steps)


def test_result_bytes_count_every_field_of_the_result():
    params = [np.full((7, 1, 1), 0.5, np.float32)] * 2
    plan = gdlr_jax.plan_sweep(LOSS, params, ETAS, steps=12, record_every=4, record_params=True)
    result = gdlr_jax.sweep(LOSS, params, ETAS, steps=12, record_every=4, record_params=True)
    stored = sum(x.nbytes for name, x in result._asdict().items() if name not in
                 ("etas", "record_steps", "sharpness_steps") for x in jax.tree_util.tree_leaves(x))
    assert plan.result_bytes == stored


def test_abstract_plan_allocates_nothing_and_cannot_run():
    plan = gdlr_jax.plan_sweep(LOSS, _abstract(10**7), ETAS[:1], steps=10, chunk_size=4096)
    assert plan.num_chunks == -(-(10**7) // plan.chunk_size)
    with pytest.raises(ValueError, match=r"^this plan was made from jax.ShapeDtypeStruct leaves"):
        plan.run_chunk(0)
    with pytest.raises(ValueError, match=r"^params0 has jax.ShapeDtypeStruct leaves: sweep needs "
                       "arrays"):
        gdlr_jax.sweep(LOSS, _abstract(4), ETAS, steps=10)


def test_abstract_and_array_leaves_do_not_mix():
    with pytest.raises(ValueError, match=r"^params0: every leaf must be an array, or every leaf a "
                       r"jax.ShapeDtypeStruct \(an abstract plan\); got a mix.$"):
        gdlr_jax.plan_sweep(LOSS, [jax.ShapeDtypeStruct((4, 1, 1), jnp.float32),
                                   np.ones((4, 1, 1))], ETAS, steps=10)


# ----- HostMemoryError ----------------------------------------------------------------------
def test_results_larger_than_the_host_raise_before_any_compute():
    # 10^6 starts x 10^7 step sizes: 10^13 trajectories of 36 bytes, hundreds of TiB
    etas = np.linspace(0.1, 1.0, 10**7)
    with pytest.raises(gdlr_jax.HostMemoryError) as info:
        gdlr_jax.plan_sweep(LOSS, _abstract(10**6), etas, steps=10)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.per_trajectory == 3 * 4 + 4 * 4 + 2 * 4  # status, steps, period; 4 floats; params
    assert err.needed > err.limit and 0 < err.fit < 10**13
    assert err.fit == pytest.approx(err.limit / err.per_trajectory, rel=0.01)
    assert str(err).startswith("the sweep needs about ")
    assert f"(the results of {10**13} trajectories, 36 B each, with parameters" in str(err)
    assert str(err).endswith(
        f"available: sweep at most {err.fit} trajectories per call (fewer step sizes or "
        "initialisations), or record less (record_every, record_params)."
    )


@pytest.mark.slow
def test_peak_estimate_matches_the_memory_a_sweep_adds():
    """In a fresh process: the peak resident memory (``VmHWM``, reset just before) above the
    resident memory before a sweep of 10^6 starts x 4 step sizes is within 20% of
    ``peak_host_bytes``. The sweep runs twice and the second is measured, so that compiling
    (for these shapes) is not counted; glibc is told to return large blocks to the system
    (``MALLOC_MMAP_THRESHOLD_``), so that the first sweep's freed memory is not reused."""
    script = textwrap.dedent(
        """
        import gc, json
        import jax, jax.numpy as jnp, numpy as np
        jax.config.update("jax_enable_x64", True)
        import gdlr_jax
        from gdlr_jax import linear

        def status(field):
            with open("/proc/self/status") as lines:
                return next(int(l.split()[1]) << 10 for l in lines if l.startswith(field + ":"))

        loss, etas, n = linear.two_neuron(jnp.float64).loss, [0.1, 0.2, 0.3, 0.4], 10**6
        x = np.random.default_rng(0).uniform(0.5, 1.5, (n, 1, 1))
        params0 = [x, x.copy()]
        grid = [jax.ShapeDtypeStruct((n, 1, 1), jnp.float64)] * 2
        plan = gdlr_jax.plan_sweep(loss, grid, etas, steps=8, dtype=jnp.float64)
        gdlr_jax.sweep(loss, params0, etas, steps=8, dtype=jnp.float64)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the resident memory now
        before = status("VmRSS")
        gdlr_jax.sweep(loss, params0, etas, steps=8, dtype=jnp.float64)
        print(json.dumps(dict(added=status("VmHWM") - before, estimate=plan.peak_host_bytes)))
        """
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=300, env=env)
    sizes = json.loads(out.stdout.strip().splitlines()[-1])
    assert sizes["added"] == pytest.approx(sizes["estimate"], rel=0.2), sizes


# ----- check_host_memory --------------------------------------------------------------------
def _need(key: str, value: int, kept: float, peak: float, exponent: int = 1) -> MemoryNeed:
    return MemoryNeed(int(kept * GiB), int(peak * GiB), ((key, value, exponent),))


def test_a_run_that_fits_passes():
    check_host_memory([_need("a", 10, 1, 2), _need("b", 10, 1, 2)], limit=4 * GiB)
    check_host_memory([], limit=0)


def test_the_part_needing_most_at_the_peak_is_named_with_a_value_that_fits():
    # peaks: a 2; b 1 + 9 = 10 (the worst: b's 9 GiB blamed); c 1 + 3 + 1 = 5
    needs = [_need("a", 10, 1, 2), _need("b.resolution", 300, 3, 9, exponent=2),
             _need("c", 10, 1, 1)]
    with pytest.raises(ConfigError) as info:
        check_host_memory(needs, limit=5 * GiB)
    assert info.value.key == "b.resolution"
    # room for b: 5 - 1 = 4 GiB of its 9: 300 * sqrt(4 / 9) = 200
    assert str(info.value) == (
        "config key 'b.resolution' has value 300: the run would need about 10 GiB of host "
        "memory (an estimate: b.resolution 9 GiB, a 1 GiB), more than the 5 GiB available; "
        "lower b.resolution to about 200."
    )


def test_kept_results_of_earlier_parts_count_and_can_be_blamed():
    needs = [_need("early", 100, 8, 8), _need("late", 100, 1, 1)]
    with pytest.raises(ConfigError, match=r"^config key 'early' has value 100: .* lower early to "
                       r"about 37\.$"):
        check_host_memory(needs, limit=4 * GiB)  # 8 + 1 > 4: early may keep 3 of its 8 GiB


def test_every_key_of_the_blamed_part_gets_a_value_or_a_clear_alternative():
    need = MemoryNeed(0, 16 * GiB, (("p.steps", 1000, 1), ("p.starts", 8, 2)))
    with pytest.raises(ConfigError, match=r"lower p.steps to about 250 or p.starts to about 4\.$"):
        check_host_memory([need], limit=4 * GiB)
    crowded = [_need("big", 10, 6, 6), _need("small", 10, 1, 1)]
    with pytest.raises(ConfigError, match=r"^config key 'big' .* lower big to about 5\.$"):
        check_host_memory(crowded, limit=4 * GiB)
    with pytest.raises(ConfigError, match=r"lower the sizes of the other parts first\.$"):
        check_host_memory([_need("x", 10, 5, 5), _need("y", 10, 6, 6)], limit=4 * GiB)


# ----- the probe ----------------------------------------------------------------------------
def test_host_available_bytes_is_psutils_available_memory(monkeypatch):
    import psutil

    from gdlr_jax.engine import _memory

    available = _memory.host_available_bytes()
    assert 0 < available <= psutil.virtual_memory().total
    assert abs(available - psutil.virtual_memory().available) < 256 << 20  # other processes

    def unsupported():
        raise NotImplementedError("not on this platform")

    monkeypatch.setattr(psutil, "virtual_memory", unsupported)
    assert _memory.host_available_bytes() is None  # unknown: the checks are skipped


# ----- memory mappings of compiled programs -------------------------------------------------
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux /proc only")
def test_memory_mappings_count_this_process_and_the_kernels_limit():
    from gdlr_jax.engine import _memory

    held, limit = _memory.memory_mappings()
    with open("/proc/sys/vm/max_map_count") as f:
        assert limit == int(f.read())
    assert 0 < held < limit
    fresh = jax.jit(lambda x: jnp.sin(x) * 3.0 + jnp.cumsum(x))
    fresh(jnp.arange(7.0)).block_until_ready()  # compiling maps the program's kernels
    assert _memory.memory_mappings()[0] > held


def test_compiled_programs_are_released_near_the_limit_and_only_there(monkeypatch):
    from gdlr_jax.engine import _memory

    f = jax.jit(lambda x: x * 2.0)
    f(jnp.ones(3))
    assert f._cache_size() == 1
    monkeypatch.setattr(_memory, "memory_mappings", lambda: (700, 1000))
    assert not _memory.release_compiled_programs(0.75)
    assert f._cache_size() == 1  # below the share: kept
    monkeypatch.setattr(_memory, "memory_mappings", lambda: (800, 1000))
    with pytest.warns(RuntimeWarning, match=r"800 of the kernel's 1000 memory mappings"):
        assert _memory.release_compiled_programs(0.75)
    assert f._cache_size() == 0  # released: the next call compiles again
    monkeypatch.setattr(_memory, "memory_mappings", lambda: None)  # not Linux: nothing to do
    assert not _memory.release_compiled_programs(0.0)


def test_a_sweep_near_the_mapping_limit_releases_before_it_compiles_and_runs(monkeypatch):
    from gdlr_jax.engine import _memory

    grid = [np.full((4, 1, 1), 0.5, np.float32), np.full((4, 1, 1), 1.5, np.float32)]
    before = gdlr_jax.sweep(LOSS, grid, ETAS, steps=30)
    monkeypatch.setattr(_memory, "memory_mappings", lambda: (60000, 65530))
    with pytest.warns(RuntimeWarning, match="vm.max_map_count"):
        after = gdlr_jax.sweep(LOSS, grid, ETAS, steps=30)
    np.testing.assert_array_equal(after.status, before.status)
    np.testing.assert_array_equal(after.final_loss, before.final_loss)
