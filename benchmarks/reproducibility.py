"""How much sweep results depend on the chunk size and the device count (docs/engine.md,
Precision and reproducibility).

Runs the same sweep in several layouts (devices x trajectories per chunk) and compares each
with one device running the whole grid as one chunk: statuses, ``steps_taken`` and
``final_loss`` (largest relative difference, in units of the dtype's eps), per status. Two
losses: the two-neuron loss (elementwise) and a one-hidden-layer tanh MLP on random data (its
matmuls are batched over the trajectories of a device, and XLA picks the dot kernel by that
batch size).

    python benchmarks/reproducibility.py        # 4 forced host devices on CPU
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)
import gdlr_jax

RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 10))
Y = np.tanh(X @ RNG.normal(size=(10, 3)))
N_INIT = 8


def mlp(p):
    h = jnp.tanh(X.astype(p["w1"].dtype) @ p["w1"])
    return 0.5 * jnp.mean((h @ p["w2"] - Y.astype(p["w1"].dtype)) ** 2)


def two_neuron(t):
    return 0.5 * (1.0 - t[0] * t[1]) ** 2


CASES = {
    "mlp": (mlp, {"w1": 0.5 * RNG.normal(size=(N_INIT, 10, 16)),
                  "w2": 0.5 * RNG.normal(size=(N_INIT, 16, 3))}, np.linspace(0.05, 3.0, 6)),
    "two_neuron": (two_neuron, RNG.uniform(-2, 2, size=(N_INIT, 2)), np.linspace(0.1, 1.2, 6)),
}
LAYOUTS = [(1, 1), (1, 2), (1, 5), (1, 16), (2, 16), (4, 4), (4, 16), (4, 48)]  # (devices, chunk)


def main() -> None:
    devices = jax.local_devices()
    print(f"{jax.devices()[0].device_kind}, {len(devices)} devices, jax {jax.__version__}")
    print("loss        dtype    devices chunk  statuses  steps_taken  max |rel diff| of "
          "final_loss in eps, per status")
    for name, (loss, params0, etas) in CASES.items():
        for dtype in (jnp.float32, jnp.float64):
            eps = np.finfo(dtype).eps

            def run(n_dev: int, chunk: int, loss=loss, params0=params0, etas=etas, dtype=dtype):
                return gdlr_jax.sweep(loss, params0, etas, steps=300, dtype=dtype,
                                      chunk_size=chunk, devices=devices[:n_dev])

            ref = run(1, len(etas) * N_INIT)
            status = np.asarray(ref.status)
            for n_dev, chunk in LAYOUTS:
                out = run(n_dev, chunk)
                a = np.asarray(ref.final_loss, np.float64)
                b = np.asarray(out.final_loss, np.float64)
                per_status = []
                for s in sorted(set(status.ravel().tolist())):
                    m = status == s
                    rel = np.abs(a[m] - b[m]) / np.maximum(np.abs(a[m]), np.finfo(dtype).tiny)
                    per_status.append(f"{gdlr_jax.TrajectoryStatus(s).name}: {rel.max() / eps:.3g}")
                same_status = np.array_equal(out.status, ref.status)
                steps = int(np.sum(np.asarray(out.steps_taken) != np.asarray(ref.steps_taken)))
                print(f"{name:11s} {np.dtype(dtype).name:8s} {n_dev:7d} {chunk:5d}  "
                      f"{'equal' if same_status else 'DIFFER':8s}  {steps:3d} differ    "
                      + ", ".join(per_status), flush=True)


if __name__ == "__main__":
    main()
