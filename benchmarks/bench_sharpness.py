"""Sharpness along GD trajectories of an MLP on MNIST 0/1: cost and accuracy (issue 6).

Runs full-batch GD (GELU MLP, MSE; :mod:`gdlr_jax.mlp`) from ``--n-init`` initialisations at
each step size of ``--etas`` with :func:`gdlr_jax.sweep`, once without and once with
``sharpness_every=K`` (``lambda_max`` of the full-batch Hessian every ``K`` steps by
warm-started Lanczos), in one run, and prints

* the wall time of both (medians of ``--repeats`` interleaved repetitions, compilation
  excluded) and their ratio, with the number of Hessian-vector products per trajectory;
* the accuracy of the engine's last measurement: ``final_sharpness`` against a cold-started
  Lanczos of 80 iterations at the same final iterates (relative difference);
* per step size: the share of trajectories that converged, the median sharpness at the end
  against ``2 / eta`` (Thm. 17: a minimum reached by GD has ``lambda_max <= 2 / eta``), and
  the largest sharpness measured along the way;

and draws ``recorded_sharpness`` against ``2 / eta``
(:func:`gdlr_jax.experiments.figures.sharpness_trajectories`) into ``--figure``.

Usage (the figures in docs/benchmarks.md, section Sharpness, were made with the defaults)::

    python benchmarks/bench_sharpness.py [--data-dir DIR] [--examples 256] [--depth 2]
        [--n-init 8] [--steps 1000] [--every 20] [--iterations 20] [--etas 0.1 0.5 1.0 2.0]
        [--repeats 3]
        [--figure docs/figures/sharpness_mnist_gelu_mse.png]
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import numpy as np
from bench_mnist import add_mlp_arguments, interleaved_medians, machine_info, mlp_problem

import gdlr_jax
from gdlr_jax import TrajectoryStatus
from gdlr_jax.experiments import figures

REFERENCE_ITERATIONS = 80


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_mlp_arguments(parser, examples=256, n_init=8)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=20, help="sharpness_every")
    parser.add_argument("--iterations", type=int, default=20, help="sharpness_iterations")
    parser.add_argument("--etas", type=float, nargs="+", default=[0.1, 0.5, 1.0, 2.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--figure",
        type=pathlib.Path,
        default=pathlib.Path(__file__).resolve().parents[1]
        / "docs/figures/sharpness_mnist_gelu_mse.png",
    )
    args = parser.parse_args()

    print(machine_info())
    batch, params0, full_batch_loss = mlp_problem(args)
    etas = np.asarray(args.etas, np.float32)
    criteria = gdlr_jax.ConvergenceCriteria(grad_tol=5e-3, step_tol=5e-3, loss_tol=1e-2)

    def run(every):
        return gdlr_jax.sweep(
            full_batch_loss, params0, etas, steps=args.steps, criteria=criteria,
            check_every=50, sharpness_every=every,
            sharpness_iterations=None if every is None else args.iterations,
        )

    methods = {"without sharpness": lambda: run(None), "with sharpness": lambda: run(args.every)}
    outputs = {name: fn() for name, fn in methods.items()}  # warm-up (compilation)
    seconds = interleaved_medians(methods, args.repeats)
    plain, tracked = outputs["without sharpness"], outputs["with sharpness"]
    assert np.array_equal(plain.status, tracked.status), "sharpness tracking changed the run"

    d = sum(x[0].size for x in jax.tree.leaves(params0))
    measurements = len(tracked.sharpness_steps) + 1  # + the one at the final iterate
    print(
        f"\nMLP 784 -> {args.width} x {args.depth} -> 2 (d = {d:,}), {batch[0].shape[0]} "
        f"examples, {len(etas)} step sizes x {args.n_init} initialisations, {args.steps} steps"
    )
    print(
        f"sweep without sharpness: {seconds['without sharpness']:.3f} s; with "
        f"sharpness_every={args.every}: {seconds['with sharpness']:.3f} s "
        f"(ratio {seconds['with sharpness'] / seconds['without sharpness']:.2f}); "
        f"{measurements} measurements x {args.iterations} HVPs per trajectory"
    )

    reference = jax.jit(
        jax.vmap(
            lambda p: gdlr_jax.top_eigenvalues(
                full_batch_loss, p, num_iterations=REFERENCE_ITERATIONS
            )[0]
        )
    )
    finite = np.isfinite(tracked.final_sharpness) & (tracked.status != TrajectoryStatus.DIVERGED)
    flat = jax.tree.map(lambda x: x[finite], tracked.final_params)
    cold = np.asarray(reference(flat))
    rel = np.abs(tracked.final_sharpness[finite] - cold) / np.abs(cold)
    print(
        f"final_sharpness vs cold Lanczos ({REFERENCE_ITERATIONS} iterations) at "
        f"{finite.sum()} final iterates: median rel. diff {np.median(rel):.1e}, max "
        f"{np.max(rel):.1e}"
    )

    print("\n| eta | 2/eta | converged | median final lambda_max (converged) | max measured |")
    print("|---|---|---|---|---|")
    for i, eta in enumerate(etas):
        converged = tracked.status[i] == TrajectoryStatus.CONVERGED_MINIMUM
        final = np.median(tracked.final_sharpness[i][converged]) if converged.any() else np.nan
        print(
            f"| {eta:g} | {2 / eta:.3g} | {converged.mean():.0%} | {final:.4g} | "
            f"{np.nanmax(tracked.recorded_sharpness[i]):.4g} |"
        )

    fig = figures.sharpness_trajectories(
        tracked.sharpness_steps,
        tracked.recorded_sharpness,
        etas,
        title=f"GELU MLP 784-{args.width}x{args.depth}-2, MSE, full-batch GD on MNIST 0/1",
    )
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=120)
    print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()
