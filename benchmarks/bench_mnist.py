"""Throughput of full-batch GD on an MLP over MNIST 0/1, batched over initialisations (issue 5).

Runs ``--steps`` full-batch GD steps ``theta <- theta - eta grad L(theta)`` of an MLP (GELU,
MSE; :mod:`gdlr_jax.mlp`) from ``--n-init`` initialisations, on the same data and the same
initialisations, three ways, in one run:

* ``engine``: :func:`gdlr_jax.sweep`, the initialisations as one vmapped pytree (zero
  tolerances so that every trajectory takes every step; its evaluations of the full-batch
  loss and gradient at the evaluation times are part of its time, not of its step count);
* ``plain vmap``: ``jit(vmap(fori_loop))`` of the same steps over the initialisations: the
  batched step alone, without the engine's bookkeeping;
* ``python loop``: a Python loop over the initialisations, each a jitted ``fori_loop`` of the
  same steps (one trajectory at a time, the kernel compiled once).

It prints trajectory-steps per second and the achieved FLOP/s counting the matmul FLOPs of a
step, for ``n`` examples and layer sizes ``d_0 = 784, d_1, ..., d_L``:

    forward 2 n sum_l d_{l-1} d_l  +  weight gradients 2 n sum_l d_{l-1} d_l
    +  input gradients 2 n sum_{l >= 2} d_{l-1} d_l

(elementwise operations, the loss and the update are not counted, so these are lower bounds
of the work done), and the share of the device's float32 peak: on a CPU ``cores x 2 FMA units
x (SIMD width / 32) x 2 FLOP x clock`` (from ``/proc/cpuinfo``, like ``bench_sweep.py``), on an
accelerator whose peak is known the vendor datasheet's (below). Every timing is warmed up (compilation excluded), blocked until
ready, and the median of ``--repeats`` interleaved repetitions; the three results are checked
against each other.

Usage (the figures in docs/benchmarks.md, section MNIST, were made with the defaults)::

    python benchmarks/bench_mnist.py [--data-dir DIR] [--examples 512] [--depth 2]
        [--n-init 16] [--steps 400] [--repeats 5]

``--data-dir`` defaults to ``$GDLR_MNIST_DIR``, else ``../shared/data/mnist-sample`` beside
the repository.
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from bench_sweep import FMA_UNITS, cpu_info
from jax import lax

import gdlr_jax
from gdlr_jax.data import load_mnist
from gdlr_jax.mlp import init_mlp_params, mlp_loss

# Dense peaks (FLOP/s) of FP32 arithmetic and of TF32 tensor cores, from NVIDIA's datasheets
# (without sparsity); matched against jax's device_kind, first match wins.
PEAK_FLOPS = {
    "H200": {"fp32": 67e12, "tf32 tensor": 494.7e12},
    "H100 PCIe": {"fp32": 51e12, "tf32 tensor": 378e12},
    "H100": {"fp32": 67e12, "tf32 tensor": 494.7e12},
    "A100": {"fp32": 19.5e12, "tf32 tensor": 156e12},
}


def matmul_flops_per_step(n: int, sizes: list[int]) -> int:
    """Matmul FLOPs of one full-batch GD step on ``n`` examples (formula in the docstring)."""
    products = [a * b for a, b in itertools.pairwise(sizes)]
    return 2 * n * (2 * sum(products) + sum(products[1:]))


def machine_info() -> str:
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    device = jax.devices()[0]
    return (
        f"machine: {platform.platform()}, {cpu}, {os.cpu_count()} CPUs\n"
        f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}, "
        f"device kind {device.device_kind!r}, default matmul precision "
        f"{jax.config.jax_default_matmul_precision}"
    )


def device_peak() -> dict[str, float]:
    """Peak FLOP/s of the first device: the CPU's float32 FMA peak, or a datasheet's."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        info = cpu_info()
        cores = len(os.sched_getaffinity(0))
        return {"fp32": cores * FMA_UNITS * info["simd_bits"] // 32 * 2 * info["ghz"] * 1e9}
    kind = device.device_kind
    return next((peak for name, peak in PEAK_FLOPS.items() if name in kind), {})


def default_data_dir() -> pathlib.Path:
    repo = pathlib.Path(__file__).resolve().parents[1]
    return pathlib.Path(
        os.environ.get("GDLR_MNIST_DIR", repo.parent / "shared" / "data" / "mnist-sample")
    )


def add_mlp_arguments(parser: argparse.ArgumentParser, *, examples: int, n_init: int) -> None:
    """The options of a GELU MLP on MNIST 0/1 shared by the benchmarks (:func:`mlp_problem`)."""
    parser.add_argument("--data-dir", type=pathlib.Path, default=default_data_dir())
    parser.add_argument("--examples", type=int, default=examples, help="0: every 0 and 1")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--n-init", type=int, default=n_init)


def mlp_problem(args: argparse.Namespace) -> tuple[tuple, object, Callable]:
    """``(batch, params0, full_batch_loss)`` of ``args.n_init`` GELU MLPs with the MSE loss on
    the MNIST examples of :func:`add_mlp_arguments` (float32, key 0)."""
    data = load_mnist(args.data_dir, max_examples=args.examples or None)
    batch = (jnp.asarray(data.images), jnp.asarray(data.labels))
    graphdef, params0 = init_mlp_params(
        jax.random.key(0), args.n_init, depth=args.depth, width=args.width, activation="gelu"
    )
    loss = mlp_loss(graphdef, loss="mse")

    def full_batch_loss(params):
        return loss(params, batch)

    return batch, params0, full_batch_loss


def interleaved_medians(methods: dict[str, Callable[[], object]], repeats: int) -> dict:
    """Median wall time of each method over ``repeats`` rounds, one call of each per round."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_mlp_arguments(parser, examples=512, n_init=16)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eta", type=float, default=0.05, help="small: no trajectory diverges")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    print(machine_info())
    batch, params0, full_batch_loss = mlp_problem(args)
    n = batch[1].shape[0]
    grad = jax.grad(full_batch_loss)
    steps, eta = args.steps, jnp.float32(args.eta)

    def run_one(params):
        return lax.fori_loop(
            0, steps, lambda _, p: jax.tree.map(lambda w, g: w - eta * g, p, grad(p)), params
        )

    run_one_jit = jax.jit(run_one)
    run_all = jax.jit(jax.vmap(run_one))
    singles = [jax.tree.map(lambda x, j=j: x[j], params0) for j in range(args.n_init)]
    no_early_stop = gdlr_jax.ConvergenceCriteria(
        grad_tol=0.0, step_tol=0.0, loss_tol=0.0, window=2, max_period=1
    )

    def engine():
        return gdlr_jax.sweep(
            full_batch_loss, params0, np.array([args.eta]), steps=steps,
            criteria=no_early_stop, check_every=steps,
        ).final_params  # host arrays: the device work is done

    methods = {
        "engine": engine,
        "plain vmap": lambda: jax.block_until_ready(run_all(params0)),
        "python loop": lambda: [jax.block_until_ready(run_one_jit(p)) for p in singles],
    }
    outputs = {name: fn() for name, fn in methods.items()}  # warm-up (compilation)
    seconds = interleaved_medians(methods, args.repeats)

    reference = jax.tree.leaves(outputs["plain vmap"])
    for name in ("engine", "python loop"):
        leaves = jax.tree.leaves(outputs[name])
        if name == "engine":
            leaves = [x[0] for x in leaves]  # (n_eta = 1, n_init, ...)
        else:
            leaves = [np.stack(xs) for xs in zip(*(jax.tree.leaves(o) for o in outputs[name]))]
        worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                    for a, b in zip(leaves, reference, strict=True))
        print(f"max |{name} - plain vmap| over the final parameters: {worst:.2e}")

    sizes = [784] + [args.width] * args.depth + [2]
    flops = matmul_flops_per_step(n, sizes)
    trajectory_steps = args.n_init * steps
    peak = device_peak()
    print(f"\nMLP {sizes} (GELU, MSE), {n} examples, {args.n_init} initialisations x {steps} "
          f"full-batch GD steps, float32; {flops / 1e6:.1f} matmul MFLOP per trajectory-step")
    header = f"{'method':12s} {'time (s)':>9s} {'traj-steps/s':>13s} {'GFLOP/s':>9s}"
    header += "".join(f" {'% ' + k + ' peak':>17s}" for k in peak)
    print(header + f" {'vs plain vmap':>14s} {'vs python loop':>15s}")
    loop_rate = trajectory_steps / seconds["python loop"]
    vmap_rate = trajectory_steps / seconds["plain vmap"]
    for name, s in seconds.items():
        rate = trajectory_steps / s
        line = f"{name:12s} {s:9.3f} {rate:13.1f} {rate * flops / 1e9:9.2f}"
        line += "".join(f" {100 * rate * flops / p:16.2f}%" for p in peak.values())
        print(line + f" {rate / vmap_rate:13.2f}x {rate / loop_rate:14.2f}x")
    if "fp32" in peak:
        print(f"(fp32 peak assumed: {peak['fp32'] / 1e9:.0f} GFLOP/s)")
    if not peak:
        print(f"(no peak FLOP/s known for {jax.devices()[0].device_kind!r}: share of peak not "
              "reported)")


if __name__ == "__main__":
    main()
