"""gdlr's curvature against its peers on an MNIST MLP: top-5 and the spectral density (issue 15).

The model (as in ``bench_mnist.py``/``bench_sharpness.py``): a GELU MLP 784 -> 32 -> 32 -> 2
(d = 26,242), MSE loss over 512 MNIST images of digits 0 and 1 (full batch), Flax default
initialisation with key 0. In one run, every method on the same weights and the same data:

* **top-5** (the 5 largest *algebraic* eigenvalues) by :func:`gdlr_jax.extreme_eigenpairs`
  (called eagerly, as documented, and under ``jax.jit``), by ``scipy.sparse.linalg.eigsh``
  (``which="LA"``, ARPACK) over a jitted JAX Hessian-vector product, by matfree's
  ``eig.eigh_partial(decomp.tridiag_sym(N, reortho="full"))`` under ``jax.jit``, and -- when
  ``torch`` is installed -- by PyHessian's method (power iteration with deflation,
  ``maxIter=100, tol=1e-3``, reverse-over-reverse products) in PyTorch on the same weights;
* **the spectral density** by stochastic Lanczos quadrature, 80 steps x 10 Rademacher probes,
  by :func:`gdlr_jax.stochastic_lanczos_quadrature` and by matfree's ``tridiag_sym(80)``
  vmapped over the same probes; its moments against the exact ``tr(H) / d`` and
  ``tr(H^2) / d`` (from all ``d`` columns ``H e_i``, batched).

Reported: products used, the relative error of each eigenvalue against a float64 reference
(``eigsh`` LA with ``tol=1e-12``, cross-checked with gdlr at ``rtol=1e-12``), and time ratios.
"Matched accuracy": for each method the cheapest setting (gdlr: the largest ``rtol`` of a grid;
matfree: the fewest ``N``; eigsh: the largest ``tol``) whose largest relative error over the 5
eigenvalues is at most ``--f32-target`` (float32) or ``--f64-target`` (float64); matfree's
error for every ``N`` is read off one long run (Lanczos with ``N`` steps is the leading block
of a longer run from the same start). The float32 runs use float32 weights, data, products
and Lanczos state (gdlr's default); the float64 runs use float64 weights and products.

The CPU is shared with other jobs: every timing is a median of ``--repeats`` interleaved rounds
(each method called once per round, in turn), after a warm-up (compilation excluded), blocked
until ready; ratios are taken within the same run. Threads: OpenBLAS (scipy's ARPACK) and
PyTorch's OpenMP pool spin while waiting and then steal the cores from XLA's own pool (eigsh
over the JAX HVP took 25x longer with OpenBLAS's default threads here), so this script sets
``OPENBLAS_NUM_THREADS=1`` and ``OMP_WAIT_POLICY=PASSIVE`` before importing them, and times
PyTorch in its own interleaved pair with gdlr rather than among the JAX methods.

Usage (the figures in docs/benchmarks.md, section Curvature, were made with the defaults)::

    python benchmarks/bench_curvature_peers.py [--data-dir DIR] [--repeats 5]

Optional dependencies: ``pip install matfree`` (or ``.[bench]``), ``torch`` (any CPU build;
the PyTorch row is skipped without it).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy/scipy load OpenBLAS
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg
from bench_mnist import add_mlp_arguments, interleaved_medians, machine_info, mlp_problem
from jax.flatten_util import ravel_pytree

jax.config.update("jax_enable_x64", True)

import gdlr_jax as g  # noqa: E402

K = 5
GDLR_RTOLS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7, 3e-8, 1e-8)
GDLR_RTOLS += (1e-9, 1e-10, 1e-11, 1e-12)
EIGSH_TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12)


def relative_errors(values, reference) -> np.ndarray:
    return np.abs(np.asarray(values, np.float64) - reference) / np.abs(reference)


def blocked(fn):
    return lambda: jax.block_until_ready(fn())


class CountingOperator:
    """A ``scipy`` LinearOperator over a jitted HVP that counts its products."""

    def __init__(self, hvp, theta):
        self.count = 0
        self.hvp, self.theta = hvp, theta
        self.operator = scipy.sparse.linalg.LinearOperator(
            (theta.size, theta.size), matvec=self._matvec, dtype=np.dtype(theta.dtype)
        )

    def _matvec(self, v):
        self.count += 1
        return np.asarray(self.hvp(self.theta, jnp.asarray(v.ravel(), self.theta.dtype)))


def eigsh_top(hvp, theta, tol: float, v0: np.ndarray) -> tuple[np.ndarray, int]:
    """``eigsh(which="LA")`` top-``K`` (descending) and its number of products."""
    op = CountingOperator(hvp, theta)
    values = scipy.sparse.linalg.eigsh(
        op.operator, k=K, which="LA", tol=tol, v0=v0, return_eigenvectors=False
    )
    return np.sort(values)[::-1], op.count


def matfree_top(loss, unravel, num_matvecs: int):
    """``jit((theta, v0) -> top-K)`` by matfree's partial eigh with full reorthogonalisation."""
    import matfree.decomp
    import matfree.eig

    eigh = matfree.eig.eigh_partial(matfree.decomp.tridiag_sym(num_matvecs, reortho="full"))

    def run(theta, v0):
        values, _ = eigh(lambda v, t: g.hessian_matvec(loss, unravel(t))(v), v0, theta)
        return jnp.sort(values)[::-1][:K]

    return jax.jit(run)


def matfree_errors_by_length(loss, unravel, theta, v0, longest: int, reference) -> dict:
    """``{N: max relative error of matfree's top-K with N products}`` from one run of
    ``longest`` steps (the leading ``N x N`` block of its tridiagonal matrix)."""
    import matfree.decomp

    decompose = matfree.decomp.tridiag_sym(longest, reortho="full")
    tridiagonal = jax.jit(
        lambda t, v: decompose(lambda w, s: g.hessian_matvec(loss, unravel(s))(w), v, t)[1]
    )(theta, v0)
    t = np.asarray(tridiagonal, np.float64)
    return {
        n: float(np.max(relative_errors(np.linalg.eigvalsh(t[:n, :n])[::-1][:K], reference)))
        for n in range(K, longest + 1)
    }


def cheapest(errors: dict, target: float):
    """The first setting (in the dict's order, cheapest first) with error <= target, or None."""
    return next((s for s, e in errors.items() if e <= target), None)


def torch_power_deflation(params, batch, max_iter: int = 100, tol: float = 1e-3, seed: int = 0):
    """PyHessian's ``hessian.eigenvalues(maxIter=100, tol=1e-3, top_n=K)`` on the same MLP:
    ``(run() -> (eigenvalues, products), loss, Hv of a test vector)`` in float32."""
    import torch

    leaves = jax.tree_util.tree_leaves_with_path(params)
    names = [jax.tree_util.keystr(path).removesuffix(".value") for path, _ in leaves]
    weights = {n: torch.tensor(np.asarray(x), requires_grad=True) for n, (_, x) in zip(names, leaves)}
    layers = sorted({n.rsplit("[", 1)[0] for n in names})  # hidden[0], hidden[1], output
    hidden = [name for name in layers if name.startswith("['hidden']")]
    images = torch.tensor(np.asarray(batch[0]))
    targets = torch.nn.functional.one_hot(torch.tensor(np.asarray(batch[1], np.int64)), 2).float()

    def loss_fn():
        x = images
        for name in hidden:
            x = torch.nn.functional.gelu(
                x @ weights[name + "['kernel']"] + weights[name + "['bias']"], approximate="tanh"
            )
        logits = x @ weights["['output']['kernel']"] + weights["['output']['bias']"]
        return torch.mean((logits - targets) ** 2)

    ordered = [weights[n] for n in names]  # ravel_pytree order

    def dot(a, b):
        return sum(torch.sum(x * y) for x, y in zip(a, b))

    def normalized(v):
        norm = torch.sqrt(dot(v, v))
        return [x / (norm + 1e-6) for x in v]

    def run():
        generator = torch.Generator().manual_seed(seed)
        grads = torch.autograd.grad(loss_fn(), ordered, create_graph=True)
        products, eigenvalues, eigenvectors = 0, [], []
        for _ in range(K):
            eigenvalue = None
            v = normalized([torch.randn(x.shape, generator=generator) for x in ordered])
            for _ in range(max_iter):
                for u in eigenvectors:  # PyHessian's orthnormal(v, eigenvectors)
                    c = dot(v, u)
                    v = [x - c * y for x, y in zip(v, u)]
                v = normalized(v)
                hv = torch.autograd.grad(grads, ordered, grad_outputs=v, retain_graph=True)
                products += 1
                estimate = dot(hv, v).item()
                v = normalized([x.detach() for x in hv])
                if eigenvalue is not None and abs(eigenvalue - estimate) / (
                    abs(eigenvalue) + 1e-6
                ) < tol:
                    break
                eigenvalue = estimate
            eigenvalues.append(eigenvalue)
            eigenvectors.append(v)
        return np.array(eigenvalues), products

    def hvp(v_flat):
        sizes = [x.numel() for x in ordered]
        parts = torch.split(torch.tensor(np.asarray(v_flat)), sizes)
        v = [p.reshape(x.shape) for p, x in zip(parts, ordered)]
        grads = torch.autograd.grad(loss_fn(), ordered, create_graph=True)
        hv = torch.autograd.grad(grads, ordered, grad_outputs=v)
        return np.concatenate([x.detach().numpy().ravel() for x in hv])

    return run, float(loss_fn().detach()), hvp


def exact_moments(loss, unravel, theta, batch_size: int) -> tuple[float, float]:
    """``(tr(H) / d, tr(H^2) / d)`` from every column ``H e_i`` (``d`` products, vmapped over
    ``batch_size`` columns at a time, never the whole matrix in memory)."""
    d = theta.size

    def column_stats(i):
        column = g.hessian_matvec(loss, unravel(theta))(jax.nn.one_hot(i, d, dtype=theta.dtype))
        return column[i], jnp.sum(column.astype(jnp.float64) ** 2)

    diagonal, squares = jax.jit(
        lambda: jax.lax.map(column_stats, jnp.arange(d), batch_size=batch_size)
    )()
    return float(np.sum(np.asarray(diagonal, np.float64))) / d, float(np.sum(squares)) / d


def quadrature_moments(nodes, weights) -> tuple[np.ndarray, np.ndarray]:
    """Per-probe first and second moments ``sum_i w_i theta_i^j`` (j = 1, 2)."""
    nodes, weights = np.asarray(nodes, np.float64), np.asarray(weights, np.float64)
    return np.sum(weights * nodes, axis=1), np.sum(weights * nodes**2, axis=1)


def matfree_quadrature(loss, unravel, num_steps: int):
    """``jit((theta, probes (P, d)) -> (nodes, weights))`` by matfree, vmapped over probes."""
    import matfree.decomp

    decompose = matfree.decomp.tridiag_sym(num_steps, reortho="full")

    def one(theta, probe):
        t = decompose(lambda w, s: g.hessian_matvec(loss, unravel(s))(w), probe, theta)[1]
        nodes, vectors = jnp.linalg.eigh(t)
        return nodes, vectors[0] ** 2

    return jax.jit(jax.vmap(one, in_axes=(None, 0)))


def fmt(errors) -> str:
    return " ".join(f"{e:.1e}" for e in errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_mlp_arguments(parser, examples=512, n_init=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--f32-target", type=float, default=1e-6)
    parser.add_argument("--f64-target", type=float, default=1e-10)
    parser.add_argument("--matfree-longest", type=int, default=80)
    parser.add_argument("--density-steps", type=int, default=80)
    parser.add_argument("--density-probes", type=int, default=10)
    parser.add_argument("--trace-batch", type=int, default=256)
    args = parser.parse_args()

    print(machine_info())
    print("the CPU is shared with other jobs: medians of interleaved rounds, ratios in-run")
    batch, params0, loss = mlp_problem(args)
    params32 = jax.tree.map(lambda x: x[0], params0)
    params64 = jax.tree.map(lambda x: x.astype(jnp.float64), params32)
    theta32, unravel32 = ravel_pytree(params32)
    theta64, unravel64 = ravel_pytree(params64)
    d = theta32.size
    print(f"MLP 784 -> {args.width} x {args.depth} -> 2 (GELU, MSE), d = {d:,}, "
          f"{batch[0].shape[0]} images of digits 0/1")
    hvp32 = jax.jit(lambda t, v: g.hessian_matvec(loss, unravel32(t))(v))
    hvp64 = jax.jit(lambda t, v: g.hessian_matvec(loss, unravel64(t))(v))
    start = np.asarray(jax.random.normal(jax.random.key(1), (d,), jnp.float64))

    # float64 reference: eigsh LA at tol 1e-12, cross-checked with gdlr at rtol 1e-12
    reference, ref_products = eigsh_top(hvp64, theta64, 1e-12, start)
    check = g.extreme_eigenpairs(loss, params64, K, rtol=1e-12, num_iterations=150)
    print(f"\nreference top-{K} (float64 eigsh LA, tol 1e-12, {ref_products} products): "
          f"{np.array2string(reference, precision=12)}")
    print(f"  gdlr float64 rtol 1e-12 ({int(check.num_products)} products): max relative "
          f"difference {np.max(relative_errors(check.eigenvalues, reference)):.1e}, "
          f"converged {bool(np.all(check.converged))}")
    lanczos64 = g.lanczos(loss, params64, num_iterations=100)
    print(f"  lambda_min (100 Lanczos steps) = {float(lanczos64.ritz_values[0]):.6g}: the "
          "Hessian is indefinite")

    # ---- float32 top-5 ----
    gdlr32 = {}
    for rtol in GDLR_RTOLS:
        pairs = g.extreme_eigenpairs(loss, params32, K, rtol=rtol, num_iterations=80)
        gdlr32[rtol] = (int(pairs.num_products), relative_errors(pairs.eigenvalues, reference))
    rtol32 = cheapest({r: np.max(e) for r, (_, e) in gdlr32.items()}, args.f32_target)
    mf32 = matfree_errors_by_length(loss, unravel32, theta32, jnp.asarray(start, jnp.float32),
                                    args.matfree_longest, reference)
    n32 = cheapest(mf32, args.f32_target)
    eigsh32 = {tol: eigsh_top(hvp32, theta32, tol, start.astype(np.float32)) for tol in EIGSH_TOLS}
    tol32 = cheapest({t: np.max(relative_errors(v, reference)) for t, (v, _) in eigsh32.items()},
                     args.f32_target)
    print(f"\n[float32] cheapest settings with max relative error <= {args.f32_target:g}: gdlr "
          f"rtol={rtol32}, matfree N={n32}, eigsh tol={tol32}")
    print("  gdlr products/max error by rtol: " + ", ".join(
        f"{r:g}: {p}/{np.max(e):.1e}" for r, (p, e) in gdlr32.items()))
    print("  eigsh products/max error by tol: " + ", ".join(
        f"{t:g}: {c}/{np.max(relative_errors(v, reference)):.1e}" for t, (v, c) in eigsh32.items()))
    print("  matfree max error by N: " + ", ".join(
        f"{n}: {e:.1e}" for n, e in mf32.items() if n % 5 == 0 or n == n32))

    methods32 = {
        "gdlr eager": blocked(lambda: g.extreme_eigenpairs(loss, params32, K, rtol=rtol32)),
        "gdlr jit": None,
        "gdlr default rtol": blocked(lambda: g.extreme_eigenpairs(loss, params32, K)),
        "gdlr float64 state": blocked(
            lambda: g.extreme_eigenpairs(loss, params32, K, rtol=rtol32, float64_state=True)
        ),
    }
    jitted = jax.jit(lambda p: g.extreme_eigenpairs(loss, p, K, rtol=rtol32))
    methods32["gdlr jit"] = blocked(lambda: jitted(params32))
    mf_run = matfree_top(loss, unravel32, n32) if n32 else None
    v0_32 = jnp.asarray(start, jnp.float32)
    if mf_run is not None:
        methods32["matfree"] = blocked(lambda: mf_run(theta32, v0_32))
    if tol32 is not None:
        methods32["eigsh"] = lambda: eigsh_top(hvp32, theta32, tol32, start.astype(np.float32))
    methods32["one HVP"] = blocked(lambda: hvp32(theta32, v0_32))
    try:
        torch_run, torch_loss, torch_hvp = torch_power_deflation(params32, batch)
    except ImportError:
        torch_run = None
        print("  torch is not installed: no PyHessian row")
    if torch_run is not None:
        import torch

        v = np.asarray(v0_32)
        hv_jax = np.asarray(hvp32(theta32, v0_32))
        print(f"  torch model check: loss {torch_loss:.7g} vs jax {float(loss(params32)):.7g}; "
              f"HVP relative difference "
              f"{np.linalg.norm(torch_hvp(v) - hv_jax) / np.linalg.norm(hv_jax):.1e} "
              f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for fn in methods32.values():  # warm-up: compilation
        fn()
    seconds32 = interleaved_medians(methods32, args.repeats)
    ratios = {}
    if torch_run is not None:
        pair = interleaved_medians(
            {"gdlr eager": methods32["gdlr eager"], "PyHessian (torch)": torch_run}, args.repeats
        )
        seconds32["PyHessian (torch)"] = pair["PyHessian (torch)"]
        ratios = {"PyHessian (torch)": pair["PyHessian (torch)"] / pair["gdlr eager"]}
        print(f"  PyHessian timed against gdlr eager in its own interleaved pair: "
              f"{pair['PyHessian (torch)']:.2f} s vs {pair['gdlr eager'] * 1e3:.1f} ms")
    pairs = g.extreme_eigenpairs(loss, params32, K)
    wide = g.extreme_eigenpairs(loss, params32, K, rtol=rtol32, float64_state=True)
    results32 = {
        "gdlr eager": gdlr32[rtol32],
        "gdlr jit": gdlr32[rtol32],
        "gdlr default rtol": (int(pairs.num_products), relative_errors(pairs.eigenvalues, reference)),
        "gdlr float64 state": (int(wide.num_products), relative_errors(wide.eigenvalues, reference)),
    }
    if mf_run is not None:
        results32["matfree"] = (n32, relative_errors(mf_run(theta32, v0_32), reference))
    if tol32 is not None:
        values, count = eigsh32[tol32]
        results32["eigsh"] = (count, relative_errors(values, reference))
    results32["one HVP"] = (1, np.array([]))
    if torch_run is not None:
        values, count = torch_run()
        results32["PyHessian (torch)"] = (count, values)
    print(f"\n| float32 top-{K} | setting | products | time (ms) | vs gdlr eager | relative "
          "error of each eigenvalue |")
    print("|---|---|---:|---:|---:|---|")
    settings = {"gdlr eager": f"rtol {rtol32:g}", "gdlr jit": f"rtol {rtol32:g}",
                "gdlr default rtol": "rtol 3.5e-4", "gdlr float64 state": f"rtol {rtol32:g}",
                "matfree": f"N = {n32}", "one HVP": "jitted, device arrays",
                "eigsh": f"tol {tol32}", "PyHessian (torch)": "maxIter 100, tol 1e-3"}
    base = seconds32["gdlr eager"]
    for name, s in seconds32.items():
        products, errors = results32[name]
        if name == "PyHessian (torch)":
            found = np.sort(errors)[::-1]
            text = f"found {np.array2string(errors, precision=4)}; sorted vs reference: " + fmt(
                relative_errors(found, reference))
        else:
            text = fmt(errors)
        ratio = ratios.get(name, s / base)
        print(f"| {name} | {settings[name]} | {products} | {1e3 * s:.1f} | {ratio:.2f} | {text} |")
    print(f"  eager / jit = {seconds32['gdlr eager'] / seconds32['gdlr jit']:.2f}; gdlr eager / "
          f"matfree = {base / seconds32.get('matfree', np.nan):.2f}")

    # ---- float64 top-5 ----
    gdlr64 = {}
    for rtol in GDLR_RTOLS:
        pairs = g.extreme_eigenpairs(loss, params64, K, rtol=rtol, num_iterations=120)
        gdlr64[rtol] = (int(pairs.num_products), relative_errors(pairs.eigenvalues, reference))
    rtol64 = cheapest({r: np.max(e) for r, (_, e) in gdlr64.items()}, args.f64_target)
    eigsh64 = {tol: eigsh_top(hvp64, theta64, tol, start) for tol in EIGSH_TOLS}
    tol64 = cheapest({t: np.max(relative_errors(v, reference)) for t, (v, _) in eigsh64.items()},
                     args.f64_target)
    mf64 = matfree_errors_by_length(loss, unravel64, theta64, jnp.asarray(start),
                                    args.matfree_longest, reference)
    n64 = cheapest(mf64, args.f64_target)
    print(f"\n[float64] cheapest settings with max relative error <= {args.f64_target:g}: gdlr "
          f"rtol={rtol64}, eigsh tol={tol64}, matfree N={n64}")
    print("  gdlr products/max error by rtol: " + ", ".join(
        f"{r:g}: {p}/{np.max(e):.1e}" for r, (p, e) in gdlr64.items()))
    print("  eigsh products/max error by tol: " + ", ".join(
        f"{t:g}: {c}/{np.max(relative_errors(v, reference)):.1e}" for t, (v, c) in eigsh64.items()))
    methods64 = {
        "gdlr eager": blocked(lambda: g.extreme_eigenpairs(loss, params64, K, rtol=rtol64)),
        "eigsh": lambda: eigsh_top(hvp64, theta64, tol64, start),
    }
    mf64_run = matfree_top(loss, unravel64, n64) if n64 else None
    if mf64_run is not None:
        methods64["matfree"] = blocked(lambda: mf64_run(theta64, jnp.asarray(start)))
    start64 = jnp.asarray(start)
    methods64["one HVP"] = blocked(lambda: hvp64(theta64, start64))
    for fn in methods64.values():
        fn()
    seconds64 = interleaved_medians(methods64, args.repeats)
    print(f"\n| float64 top-{K} | setting | products | time (ms) | vs gdlr | relative error "
          "of each eigenvalue |")
    print("|---|---|---:|---:|---:|---|")
    results64 = {"gdlr eager": (f"rtol {rtol64:g}", *gdlr64[rtol64]),
                 "eigsh": (f"tol {tol64:g}", eigsh64[tol64][1],
                           relative_errors(eigsh64[tol64][0], reference))}
    if mf64_run is not None:
        results64["matfree"] = (f"N = {n64}", n64,
                                relative_errors(mf64_run(theta64, jnp.asarray(start)), reference))
    results64["one HVP"] = ("jitted, device arrays", 1, np.array([]))
    for name, s in seconds64.items():
        setting, products, errors = results64[name]
        print(f"| {name} | {setting} | {products} | {1e3 * s:.1f} | "
              f"{s / seconds64['gdlr eager']:.2f} | {fmt(errors)} |")
    print(f"  gdlr / eigsh = {seconds64['gdlr eager'] / seconds64['eigsh']:.2f}")

    # rtol 1e-6: products against eigsh at the same accuracy
    products, errors = gdlr64[1e-6]
    reached = float(np.max(errors))
    tol_same = cheapest({t: np.max(relative_errors(v, reference)) for t, (v, _) in eigsh64.items()},
                        reached)
    same = eigsh64[tol_same][1] if tol_same is not None else None
    print(f"\n[rtol 1e-6, float64] gdlr: {products} products, max relative error {reached:.1e}; "
          f"eigsh reaches that first at tol {tol_same} with {same} products; eigsh at tol 1e-6: "
          f"{eigsh64[1e-6][1]} products, max error "
          f"{np.max(relative_errors(eigsh64[1e-6][0], reference)):.1e}")

    # ---- spectral density ----
    steps, probes = args.density_steps, args.density_probes
    key = jax.random.key(2)
    slq = jax.jit(lambda p, k: g.stochastic_lanczos_quadrature(
        loss, p, num_iterations=steps, num_probes=probes, key=k))
    probe_vectors = jax.random.rademacher(jax.random.split(key)[0], (probes, 1, d), jnp.float32)
    probe_vectors = probe_vectors[:, 0]  # the probes gdlr draws from this key
    mf_slq = matfree_quadrature(loss, unravel32, steps)
    density_methods = {
        "gdlr eager": blocked(lambda: g.stochastic_lanczos_quadrature(
            loss, params32, num_iterations=steps, num_probes=probes, key=key)),
        "gdlr jit": blocked(lambda: slq(params32, key)),
        "matfree": blocked(lambda: mf_slq(theta32, probe_vectors)),
    }
    outputs = {name: fn() for name, fn in density_methods.items()}
    seconds_density = interleaved_medians(density_methods, args.repeats)
    start_time = time.perf_counter()
    trace, trace_sq = exact_moments(loss, unravel32, theta32, args.trace_batch)
    print(f"\n[density] exact tr(H)/d = {trace:.6e}, tr(H^2)/d = {trace_sq:.6e} ({d:,} products, "
          f"{time.perf_counter() - start_time:.0f} s)")
    print(f"\n| density ({steps} steps x {probes} probes, float32) | products | time (s) | vs "
          "gdlr eager | tr(H)/d: estimate, error / standard error | tr(H^2)/d: estimate, "
          "relative error, error / standard error |")
    print("|---|---:|---:|---:|---|---|")
    for name, s in seconds_density.items():
        first, second = quadrature_moments(*outputs[name])
        m1, m2 = first.mean(), second.mean()
        se1, se2 = (x.std(ddof=1) / np.sqrt(probes) for x in (first, second))
        print(f"| {name} | {steps * probes} | {s:.3f} | {s / seconds_density['gdlr eager']:.2f} | "
              f"{m1:.3e}, {abs(m1 - trace) / se1:.2f} | {m2:.4e}, "
              f"{abs(m2 - trace_sq) / trace_sq:.1e}, {abs(m2 - trace_sq) / se2:.2f} |")
    nodes_g = np.asarray(outputs["gdlr jit"][0], np.float64)
    nodes_m = np.asarray(outputs["matfree"][0], np.float64)
    print(f"  same probes: max |node difference| gdlr vs matfree "
          f"{np.max(np.abs(np.sort(nodes_g, 1) - np.sort(nodes_m, 1))):.1e}")
    print(f"  density: gdlr eager / matfree = "
          f"{seconds_density['gdlr eager'] / seconds_density['matfree']:.2f}; eager / jit = "
          f"{seconds_density['gdlr eager'] / seconds_density['gdlr jit']:.2f}")


if __name__ == "__main__":
    main()
