"""Sharpness of an MNIST MLP: Lanczos vs power iteration vs dense eigh, and HVP cost (issue 6).

The model: a GELU MLP 784 -> 32 x 4 -> 2 (d = 28,354 parameters) at its initialisation, MSE
loss over the 0/1 digits of the MNIST sample (2,128 images, full batch). In one run:

* **HVP cost**: Hessian-vector products per second (:func:`gdlr_jax.hessian_matvec`,
  forward-over-reverse) against gradients per second, float64 and float32.
* **lambda_max**: the number of Hessian-vector products, and the time, that
  :func:`gdlr_jax.lanczos` and plain power iteration (``v <- H v / ||H v||`` with the Rayleigh
  quotient as estimate, the method of the popular PyTorch Hessian tools) need to reach
  ``|lambda - lambda_ref| <= rtol lambda_ref``. For Lanczos two counts: the first iteration whose
  Ritz value is within ``rtol`` (known only with the reference) and the first whose own residual
  bound certifies it (``r <= rtol theta``, Kahan's bound, usable as a stopping rule). For power
  iteration: the first iterate within ``rtol``, and where the usual stopping rule (relative
  change of the estimate ``< rtol``) would stop, with its actual error.
* **dense check**: a dense float64 Hessian of 28,354^2 entries (6.4 GB, and an O(d^3)
  eigensolver) does not fit this machine's budget, so the dense ``eigh`` reference is taken on
  the same network with width 8 (``d = 6,522``; ``--dense-width``); on the full network the
  reference is a long Lanczos run whose residual bound certifies it.

Usage (the figures in docs/benchmarks.md were made with the defaults)::

    python benchmarks/bench_curvature.py [--data-dir DIR] [--repeats 5]

``--data-dir`` defaults to ``../shared/data/mnist-sample`` beside the repository. Timings are
medians of ``--repeats`` runs (``4 x --repeats`` for the single products) after a warm-up
(compilation excluded), blocked until ready, the compared methods called in turn.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

jax.config.update("jax_enable_x64", True)

import gdlr_jax as g  # noqa: E402
from gdlr_jax.data import load_mnist  # noqa: E402
from gdlr_jax.mlp import init_mlp_params, mlp_loss  # noqa: E402


def median_times(fns, repeats: int) -> list[float]:
    """Median wall time of each ``fn()`` (blocked until ready) after one warm-up call each; the
    functions are called in turn, so that load on a shared machine affects them alike."""
    for fn in fns:
        jax.block_until_ready(fn())
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def mlp_at_init(images, labels, depth: int, width: int, dtype, seed: int):
    """``(loss_fn(params, batch), params, batch)`` of the MLP at its initialisation, in ``dtype``.

    Every jitted function below takes ``params`` and ``batch`` as arguments (never closed over:
    XLA would constant-fold the forward pass into the timings).
    """
    graphdef, params = init_mlp_params(jax.random.key(seed), 1, depth=depth, width=width)
    params = jax.tree.map(lambda p: p[0].astype(dtype), params)
    batch = (jnp.asarray(images, dtype), jnp.asarray(labels))
    return mlp_loss(graphdef, loss="mse"), params, batch


def power_rayleigh_quotients(matvec, v0, num_iterations: int):
    """Rayleigh quotients ``v_j^T H v_j`` of power iteration, ``(num_iterations,)``: entry ``j``
    after ``j + 1`` products."""

    def step(v, _):
        w = matvec(v)
        return w / jnp.linalg.norm(w), v @ w

    return jax.lax.scan(step, v0 / jnp.linalg.norm(v0), None, length=num_iterations)[1]


def lanczos_history(result: g.LanczosResult):
    """Top Ritz value and its residual bound after each iteration ``j = 1..q`` of a single-vector
    run, from the leading ``j x j`` block of ``T = S diag(theta) S^T``."""
    s, theta = np.asarray(result.projected_eigenvectors), np.asarray(result.ritz_values)
    t = (s * theta) @ s.T
    values, bounds = [], []
    for j in range(1, t.shape[0]):
        evals, evecs = np.linalg.eigh(t[:j, :j])
        values.append(evals[-1])
        bounds.append(abs(t[j, j - 1] * evecs[-1, -1]))
    return np.array(values), np.array(bounds)


def first_index(mask) -> int | None:
    """1-based index of the first true entry (a count of products), or None."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) + 1 if hits.size else None


def lanczos_run(loss_fn, num_iterations: int, float64_state: bool = False):
    """``jit((params, batch, v0) -> LanczosResult)``."""
    return jax.jit(
        lambda p, b, v: g.lanczos(
            lambda q: loss_fn(q, b),
            p,
            num_iterations=num_iterations,
            v0=v,
            float64_state=float64_state,
        )
    )


def power_run(loss_fn, num_iterations: int):
    """``jit((params, batch, v0) -> Rayleigh quotients (num_iterations,))``."""
    return jax.jit(
        lambda p, b, v: power_rayleigh_quotients(
            g.hessian_matvec(lambda q: loss_fn(q, b), p), v, num_iterations
        )
    )


def compare_sharpness(
    name, loss_fn, params, batch, reference, rtol, max_lanczos, max_power, repeats, key
):
    """Lanczos vs power iteration to ``rtol`` of ``reference``; prints one block."""
    theta0 = ravel_pytree(params)[0]
    v0 = jax.random.normal(key, theta0.shape, theta0.dtype)
    values, bounds = lanczos_history(lanczos_run(loss_fn, max_lanczos)(params, batch, v0))
    error = np.abs(values - reference) / reference
    lanczos_hit = first_index(error <= rtol)
    lanczos_certified = first_index(bounds <= rtol * values)
    quotients = np.asarray(power_run(loss_fn, max_power)(params, batch, v0))
    power_error = np.abs(quotients - reference) / reference
    power_hit = first_index(power_error <= rtol)
    change = np.abs(np.diff(quotients)) / np.abs(quotients[1:])
    power_rule = first_index(change < rtol)
    power_rule = None if power_rule is None else power_rule + 1

    print(f"\n[{name}] d = {theta0.size}, lambda_ref = {reference:.12g}, rtol = {rtol:g}")
    print(
        f"  lanczos  : within rtol after {lanczos_hit} HVPs, certified by its residual bound "
        f"after {lanczos_certified} HVPs; error after {max_lanczos}: {error[-1]:.2e}"
    )
    print(
        f"  power it.: within rtol after {power_hit} HVPs (of at most {max_power}); "
        f"'relative change < rtol' stops after {power_rule} HVPs with error "
        f"{power_error[power_rule - 1] if power_rule else float('nan'):.2e}"
    )
    if lanczos_hit and power_hit:
        print(f"  HVP ratio lanczos / power (both within rtol): {lanczos_hit / power_hit:.3f}")
    if lanczos_certified and power_hit:
        lanczos_fn, power_fn = (
            lanczos_run(loss_fn, lanczos_certified),
            power_run(loss_fn, power_hit),
        )
        t_l, t_p = median_times(
            [lambda: lanczos_fn(params, batch, v0), lambda: power_fn(params, batch, v0)], repeats
        )
        print(
            f"  time: lanczos ({lanczos_certified} its, certified) {t_l * 1e3:.0f} ms, "
            f"power ({power_hit} its) {t_p * 1e3:.0f} ms, ratio {t_l / t_p:.3f}"
        )


def hvp_versus_gradient(loss_fn, params, batch, repeats: int, label: str) -> None:
    theta = ravel_pytree(params)[0]
    matvec = jax.jit(lambda p, b, v: g.hessian_matvec(loss_fn, p, data=b)(v))
    grad = jax.jit(lambda p, b: ravel_pytree(jax.grad(loss_fn)(p, b))[0])
    v = jax.random.normal(jax.random.key(7), theta.shape, theta.dtype)
    t_hvp, t_grad = median_times(
        [lambda: matvec(params, batch, v), lambda: grad(params, batch)], 4 * repeats
    )
    print(
        f"  {label}: {1 / t_hvp:8.1f} HVP/s ({t_hvp * 1e3:.2f} ms), {1 / t_grad:8.1f} grad/s "
        f"({t_grad * 1e3:.2f} ms): one HVP costs {t_hvp / t_grad:.2f} gradients"
    )


def main() -> None:
    repo = pathlib.Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir",
        default=None,
        help="MNIST IDX folder (default: ../shared/data/mnist-sample beside the repo)",
    )
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--dense-width", type=int, default=8)
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--lanczos-iterations", type=int, default=120)
    parser.add_argument("--power-iterations", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data_dir = (
        pathlib.Path(args.data_dir)
        if args.data_dir
        else repo.parent / "shared" / "data" / "mnist-sample"
    )

    print(
        f"machine: {platform.platform()}, processor {platform.processor() or 'unknown'}, "
        f"{os.cpu_count()} CPUs; jax {jax.__version__}, devices {jax.devices()}"
    )
    data = load_mnist(data_dir, digits=(0, 1))
    print(f"data: {data.images.shape[0]} images of digits {data.digits} from {data_dir}")
    key = jax.random.key(args.seed + 1)

    loss_fn, params64, batch64 = mlp_at_init(
        data.images, data.labels, args.depth, args.width, jnp.float64, args.seed
    )
    _, params32, batch32 = mlp_at_init(
        data.images, data.labels, args.depth, args.width, jnp.float32, args.seed
    )
    print(f"\nHVP cost, MLP 784 -> {args.width} x {args.depth} -> 2, full batch:")
    hvp_versus_gradient(loss_fn, params64, batch64, args.repeats, "float64")
    hvp_versus_gradient(loss_fn, params32, batch32, args.repeats, "float32")

    # Dense check on the narrow network: eigh of the Hessian assembled from d products.
    loss_small, params_small, batch_small = mlp_at_init(
        data.images, data.labels, args.depth, args.dense_width, jnp.float64, args.seed
    )
    d_small = ravel_pytree(params_small)[0].size
    start = time.perf_counter()
    dense = jax.jit(
        lambda p, b: jax.lax.map(
            g.hessian_matvec(loss_small, p, data=b), jnp.eye(d_small), batch_size=256
        )
    )(params_small, batch_small)
    eigenvalues = np.asarray(jnp.linalg.eigvalsh(0.5 * (dense + dense.T)))
    t_dense = time.perf_counter() - start
    del dense
    v0 = jax.random.normal(key, (d_small,), jnp.float64)
    run = lanczos_run(loss_small, args.lanczos_iterations)
    result = run(params_small, batch_small, v0)
    [t_lanczos] = median_times([lambda: run(params_small, batch_small, v0)], args.repeats)
    top = float(result.ritz_values[-1])
    print(
        f"\n[dense check, width {args.dense_width}] d = {d_small}: dense Hessian ({d_small} HVPs) "
        f"+ eigvalsh {t_dense:.1f} s; lanczos {args.lanczos_iterations} its {t_lanczos:.2f} s"
    )
    print(
        f"  lambda_max: eigh {eigenvalues[-1]:.15g}, lanczos {top:.15g} (residual bound "
        f"{float(result.residual_bounds[-1]):.1e}), relative difference "
        f"{abs(top - eigenvalues[-1]) / eigenvalues[-1]:.1e}; "
        f"lambda_min (eigh) {eigenvalues[0]:.4g}"
    )
    compare_sharpness(
        f"width {args.dense_width}, reference: dense eigh",
        loss_small,
        params_small,
        batch_small,
        float(eigenvalues[-1]),
        args.rtol,
        args.lanczos_iterations,
        args.power_iterations,
        args.repeats,
        key,
    )

    # Full network: a long Lanczos run, certified by its residual bound, is the reference.
    v0 = jax.random.normal(jax.random.key(args.seed + 2), ravel_pytree(params64)[0].shape)
    reference = lanczos_run(loss_fn, 2 * args.lanczos_iterations)(params64, batch64, v0)
    lam, bound = float(reference.ritz_values[-1]), float(reference.residual_bounds[-1])
    print(
        f"\n[reference, width {args.width}] lanczos {2 * args.lanczos_iterations} its: "
        f"lambda_max = {lam:.15g}, residual bound {bound:.1e} (relative {bound / lam:.1e}); "
        f"next Ritz values {np.asarray(reference.ritz_values[-4:-1])[::-1]}"
    )
    compare_sharpness(
        f"width {args.width}, reference: certified lanczos",
        loss_fn,
        params64,
        batch64,
        lam,
        args.rtol,
        args.lanczos_iterations,
        args.power_iterations,
        args.repeats,
        key,
    )

    for float64_state in (False, True):
        top32 = lanczos_run(loss_fn, args.lanczos_iterations, float64_state)(
            params32, batch32, v0
        ).ritz_values[-1]
        print(
            f"\n[float32 products, float{64 if float64_state else 32} lanczos state] lambda_max "
            f"{float(top32):.12g}: relative difference to the float64 reference "
            f"{abs(float(top32) - lam) / lam:.1e} (float32 parameters are the float64 ones "
            "rounded)"
        )


if __name__ == "__main__":
    main()
