"""Throughput of the trajectory engine on the two-neuron problem (issue 3).

Measures trajectory-steps per second, in one run and on the same grid, of

* ``engine``: :func:`gdlr_jax.sweep` with full status classification (convergence, divergence
  pinpointed to the exact step, periodic orbits, asymptotic step norm);
* ``plain scan``: ``jit(vmap(lax.scan))`` over the whole grid at once, keeping only the final
  state (the technique of the published fractal-boundary studies);
* ``plain scan, chunked``: the same scan run over the grid in chunks of the engine's chunk size
  (a stronger baseline: a chunk stays in cache);
* ``python loop``: one trajectory at a time, a Python loop over a jitted step, timed on a few
  trajectories and extrapolated to the grid;

for two cases: ``eta = 1.05`` on ``[-2, 2]^2`` (above eta_E = 1: no trajectory converges, about
37 % diverge in the first steps and the rest keep moving, so no early exit is possible), and
``eta = 0.4`` on the same grid (every trajectory converges within ~25 steps). Float32,
``L(x, y) = 1/2 (1 - x y)^2`` as a function of a ``(2,)`` array.

Usage (the figures in docs/benchmarks.md were made with the defaults)::

    python benchmarks/bench_sweep.py [--side 1024] [--steps 1000] [--repeats 3]

Each timing is warmed up (compilation excluded), blocked until ready, and the median of
``--repeats`` runs; the methods are interleaved so that load on a shared machine affects them
alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import gdlr_jax


def two_neuron_loss(theta):
    """``1/2 (1 - x y)^2`` for ``theta = (x, y)``."""
    return 0.5 * (1.0 - theta[0] * theta[1]) ** 2


def grid_of_inits(side: int) -> np.ndarray:
    """``side x side`` initialisations on ``[-2, 2]^2``, float32, shape ``(side^2, 2)``."""
    axis = np.linspace(-2.0, 2.0, side, dtype=np.float32)
    x, y = np.meshgrid(axis, axis)
    return np.stack([x.ravel(), y.ravel()], axis=1)


def make_plain_scan(steps: int):
    grad = jax.grad(two_neuron_loss)

    @jax.jit
    def plain_scan(theta0, eta):
        def one(theta):
            def step(theta, _):
                return theta - eta * grad(theta), None

            return lax.scan(step, theta, None, length=steps)[0]

        return jax.vmap(one)(theta0)

    return plain_scan


def make_python_loop():
    grad = jax.grad(two_neuron_loss)

    @jax.jit
    def step(theta, eta):
        return theta - eta * grad(theta)

    def run(theta, eta, steps):
        for _ in range(steps):
            theta = step(theta, eta)
        return theta.block_until_ready()

    return run


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_case(name, theta0, eta, steps, repeats, python_sample, chunk_size):
    n = theta0.shape[0]
    eta32 = jnp.float32(eta)
    plain_scan = make_plain_scan(steps)
    theta_device = jnp.asarray(theta0)
    chunks = [theta_device[i : i + chunk_size] for i in range(0, n, chunk_size)]
    if chunks[-1].shape[0] != chunk_size:  # pad so that every chunk has one shape
        pad = chunk_size - chunks[-1].shape[0]
        chunks[-1] = jnp.concatenate([chunks[-1], jnp.repeat(chunks[-1][-1:], pad, 0)])

    def engine():
        return gdlr_jax.sweep(
            two_neuron_loss, theta0, np.array([eta]), steps=steps, min_loss_value=0.0
        )

    methods = {
        "engine": engine,
        "plain scan": lambda: plain_scan(theta_device, eta32).block_until_ready(),
        "plain scan, chunked": lambda: [
            plain_scan(c, eta32).block_until_ready() for c in chunks
        ],
    }
    for fn in methods.values():  # warm up: compile
        fn()
    times = {key: [] for key in methods}
    for _ in range(repeats):
        for key, fn in methods.items():
            times[key].append(median_time(fn, 1))
    seconds = {key: statistics.median(t) for key, t in times.items()}

    loop = make_python_loop()
    loop(theta_device[0], eta32, 5)
    sample = median_time(
        lambda: [loop(theta_device[i], eta32, steps) for i in range(python_sample)], 1
    )
    seconds["python loop (extrapolated)"] = sample / python_sample * n

    result = engine()
    counts = np.bincount(np.asarray(result.status).ravel(), minlength=5) / n
    labels = [s.name for s in gdlr_jax.TrajectoryStatus]
    print(f"\n== {name}: eta = {eta}, {n} trajectories x {steps} steps, float32 ==")
    print("   status fractions: " + ", ".join(f"{l} {c:.3f}" for l, c in zip(labels, counts)))
    print(f"   median steps taken: {np.median(np.asarray(result.steps_taken)):.0f}")
    rate = {key: n * steps / s for key, s in seconds.items()}
    for key, s in seconds.items():
        print(f"   {key:28s} {s:10.3f} s  {rate[key] / 1e6:10.1f} M trajectory-steps/s")
    for key in ("plain scan", "plain scan, chunked", "python loop (extrapolated)"):
        print(f"   engine / {key:28s} {rate['engine'] / rate[key]:8.2f}x")
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=1024, help="grid side (side^2 inits)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--python-sample", type=int, default=3)
    args = parser.parse_args()

    print(f"machine: {platform.platform()}, processor {platform.processor() or 'unknown'}, "
          f"{os.cpu_count()} CPUs")
    print(f"jax {jax.__version__}, devices {jax.devices()}")
    theta0 = grid_of_inits(args.side)
    plan = gdlr_jax.plan_sweep(
        two_neuron_loss, theta0, np.array([1.0]), steps=args.steps, min_loss_value=0.0
    )
    print(f"engine chunk size: {plan.chunk_size} trajectories ({plan.num_chunks} chunks)")
    for name, eta in (("no early exit", 1.05), ("most converge early", 0.4)):
        bench_case(
            name, theta0, eta, args.steps, args.repeats, args.python_sample, plan.chunk_size
        )


if __name__ == "__main__":
    main()
