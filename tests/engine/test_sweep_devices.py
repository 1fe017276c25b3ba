"""The engine on 4 (forced host) devices gives the results of 1 device, bit for bit, and a
sweep checkpointed on 1 device resumes on 4 with the same results.

``--xla_force_host_platform_device_count`` must be set before JAX starts, so the comparison
runs in a fresh Python process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import functools, pathlib, tempfile
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    import gdlr_jax
    from gdlr_jax.engine._checkpoint import ChunkStore

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

    # chunks 0 and 1 saved by a sweep on one device; the rest run on four when resumed
    kwargs = dict(cases["gd float64"], chunk_size=4, record_every=7)
    folder = pathlib.Path(tempfile.mkdtemp()) / "checkpoints"
    plan = gdlr_jax.plan_sweep(devices=devices[:1], **kwargs)
    store = ChunkStore(folder, plan)
    for index in range(2):
        store.save(index, plan.run_chunk(index))
    resumed = gdlr_jax.sweep(devices=devices, checkpoint_dir=folder, **kwargs)
    assert_identical(gdlr_jax.sweep(devices=devices[:1], **kwargs), resumed, "resumed")
    print("IDENTICAL")
    """
)


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
