"""The engine on 4 (forced host) devices gives the results of 1 device, bit for bit (for
these elementwise losses), and a sweep checkpointed on 1 device is refused on 4 (the device
count is part of the fingerprint) and resumes on 1 with the same results.

``--xla_force_host_platform_device_count`` must be set before JAX starts, so the comparison
runs in a fresh Python process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import functools, pathlib, tempfile
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    import gdlr_jax
    from gdlr_jax.engine._checkpoint import CheckpointMismatchError, ChunkStore

    devices = jax.local_devices()
    assert len(devices) == 4, devices

    def two_neuron(theta):
        return 0.5 * (1.0 - theta[0] * theta[1]) ** 2

    inits = np.array([[0.5, 1.5], [0.0, 0.0], [1.2, 1.1], [1e3, 1e3], [-0.7, 0.4]])
    x = jax.random.normal(jax.random.key(3), (40, 3))
    data = (x, x @ jnp.array([1.0, -2.0, 0.5]))

    def regression(w, batch):
        return 0.5 * jnp.mean(jnp.square(batch[0] @ w - batch[1]))

    cases = {
        "gd float32": dict(loss_fn=two_neuron, params0=inits, etas=[0.4, 1.05, 1.5],
                           steps=300, min_loss_value=0.0, record_every=7),
        "gd float64": dict(loss_fn=two_neuron, params0=inits, etas=[0.4, 1.05, 1.5],
                           steps=300, min_loss_value=0.0, dtype=jnp.float64),
        "sgd per-init batches": dict(loss_fn=regression, params0=0.3 * jnp.ones((3, 3)),
                                     etas=[0.1, 0.3, 5.0], steps=40, batch_source=(data, 8),
                                     key=jax.random.key(1), same_batches=False),
        "sgd momentum": dict(loss_fn=regression, params0=0.3 * jnp.ones((3, 3)),
                             etas=[0.1, 0.3, 5.0], steps=40, batch_source=(data, 8),
                             key=jax.random.key(1),
                             optimizer=functools.partial(optax.sgd, momentum=0.9)),
    }

    def assert_identical(one, four, name):
        leaves_one, tree_one = jax.tree_util.tree_flatten(one)
        leaves_four, tree_four = jax.tree_util.tree_flatten(four)
        assert tree_one == tree_four, name
        for a, b in zip(leaves_one, leaves_four):
            np.testing.assert_array_equal(a, b, err_msg=name)

    for name, kwargs in cases.items():
        one = gdlr_jax.sweep(devices=devices[:1], **kwargs)
        four = gdlr_jax.sweep(devices=devices, **kwargs)
        plan = gdlr_jax.plan_sweep(devices=devices, **kwargs)
        assert plan.chunk_size % 4 == 0, plan.chunk_size
        assert_identical(one, four, name)
        print(name, "statuses", sorted(set(np.asarray(one.status).ravel().tolist())))

    # a matmul loss: statuses and step counts equal, values equal to rounding (XLA picks the
    # dot kernel by the number of trajectories per device; docs/engine.md, Precision and
    # reproducibility: measured 1.5 eps in float32, 2.1 eps in float64)
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(64, 10))
    ys = np.tanh(xs @ rng.normal(size=(10, 3)))

    def mlp(p):
        h = jnp.tanh(xs.astype(p["w1"].dtype) @ p["w1"])
        return 0.5 * jnp.mean((h @ p["w2"] - ys.astype(p["w1"].dtype)) ** 2)

    p0 = {"w1": 0.5 * rng.normal(size=(8, 10, 16)), "w2": 0.5 * rng.normal(size=(8, 16, 3))}
    for dtype in (jnp.float32, jnp.float64):
        kwargs = dict(loss_fn=mlp, params0=p0, etas=np.linspace(0.05, 3.0, 6), steps=300,
                      dtype=dtype)
        one = gdlr_jax.sweep(devices=devices[:1], **kwargs)
        four = gdlr_jax.sweep(devices=devices, chunk_size=16, **kwargs)
        np.testing.assert_array_equal(one.status, four.status)
        np.testing.assert_array_equal(one.steps_taken, four.steps_taken)
        np.testing.assert_allclose(four.final_loss, one.final_loss,
                                   rtol=16 * np.finfo(dtype).eps)

    # chunks 0 and 1 saved by a sweep on one device: a resume on four is refused (values of
    # matmul losses may differ in the last bits between device counts: never mixed), a
    # resume on one device loads them
    kwargs = dict(cases["gd float64"], chunk_size=4, record_every=7)
    folder = pathlib.Path(tempfile.mkdtemp()) / "checkpoints"
    plan = gdlr_jax.plan_sweep(devices=devices[:1], **kwargs)
    store = ChunkStore(folder, plan)
    for index in range(2):
        store.save(index, plan.run_chunk(index))
    try:
        gdlr_jax.sweep(devices=devices, checkpoint_dir=folder, **kwargs)
        raise AssertionError("chunks of one device were resumed on four")
    except CheckpointMismatchError as err:
        assert "devices: saved 1, now 4" in str(err), err
    resumed = gdlr_jax.sweep(devices=devices[:1], checkpoint_dir=folder, **kwargs)
    assert_identical(gdlr_jax.sweep(devices=devices[:1], **kwargs), resumed, "resumed")
    print("IDENTICAL")
    """
)


@pytest.mark.slow
def test_four_devices_equal_one_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "IDENTICAL" in out.stdout
    assert "statuses [0, 1, 2, 3, 4]" in out.stdout  # every status was exercised


def test_gdlr_sets_the_vector_width_flag_only_on_avx512(monkeypatch):
    """The ``gdlr`` entry point adds ``--xla_cpu_prefer_vector_width=512`` before jax starts,
    only where the CPU has AVX-512 and ``XLA_FLAGS`` does not choose a width itself."""
    import _gdlr_entry

    for has_avx512, flags, expected in [
        (True, "", "--xla_cpu_prefer_vector_width=512"),
        (True, "--xla_foo=1", "--xla_foo=1 --xla_cpu_prefer_vector_width=512"),
        (True, "--xla_cpu_prefer_vector_width=256", "--xla_cpu_prefer_vector_width=256"),
        (False, "--xla_foo=1", "--xla_foo=1"),
    ]:
        monkeypatch.setattr(_gdlr_entry, "_cpu_has_avx512", lambda has=has_avx512: has)
        environ = {"XLA_FLAGS": flags}
        _gdlr_entry.prefer_wide_vectors(environ)
        assert environ["XLA_FLAGS"] == expected
