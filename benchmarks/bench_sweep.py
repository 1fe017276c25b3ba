"""Throughput of the trajectory engine on the two-neuron problem (issues 3 and 13).

Measures trajectory-steps per second, in one run and on the same grid, of

* ``engine, (n, 2) array``: :func:`gdlr_jax.sweep` with full status classification
  (convergence, divergence pinpointed to the exact step, periodic orbits, asymptotic step
  norm), the parameters an ``(n, 2)`` array, ``L(theta) = 1/2 (1 - theta_0 theta_1)^2``;
* ``engine, dict of (n,)``: the same loss written on ``{"x": (n,), "y": (n,)}``;
* ``plain scan``: ``jit(vmap(lax.scan))`` over the whole grid at once, keeping only the final
  state (the technique of the published fractal-boundary studies), ``unroll=1`` and
  ``unroll=4``;

for the cases ``eta = 1.1`` on a small square around ``(1, 1)`` (every trajectory ends on the
period-2 orbit: no early exit), ``eta = 1.05`` on ``[-2, 2]^2`` (no trajectory converges, about
37 % diverge in the first steps and the rest keep moving) and ``eta = 0.4`` on ``[-2, 2]^2``
(every trajectory converges within ~25 steps: early exit). Float32.

It prints the compute limit it assumes, from the CPU's SIMD width (``/proc/cpuinfo`` flags),
two FMA units per core, the clock (``cpu MHz``) and the cores: one trajectory-step is 4 vector
operations (``e = eta (1 - x y)``: 1 FMA + 1 mul; ``x + e y``, ``y + e x``: 2 FMA), so the limit
is ``cores * 2 * (SIMD width / 32) * clock / 4`` trajectory-steps/s; and each method's share.

Options that measure the engine's defaults (``docs/benchmarks.md``):

* ``--step-blocks 1,2,4``: the engine with each ``step_block`` (unrolled steps per block);
* ``--pairs``: the step loop's columns packed in complex pairs (``PACK_PAIRS``, the CPU
  default) against the rows of one ``(d, m)`` array;
* ``--devices``: one device against one device per core (``shard_map`` over host devices;
  the process starts with ``--xla_force_host_platform_device_count`` = cores);
* ``--layouts``: forward-mode columns against reverse-mode leaves for the scalar chain
  ``L = 1/2 (1 - theta_1 ... theta_d)^2``, ``d = 2, 4, 8, 16`` (the threshold
  ``FORWARD_MODE_MAX_PARAMS``);
* ``--lyapunov``: the cost of ``lyapunov=True`` on ``min(side^2, 2^16)`` trajectories: without
  it, with the default ``lyapunov_steps`` (256) and with ``lyapunov_steps = steps``, at
  ``eta = 1.1`` near ``(1, 1)`` (every trajectory on the period-2 orbit: all replayed) and
  ``eta = 0.4`` on ``[-2, 2]^2`` (nearly all converge: the fixed-point exponent instead),
  and the time of one replayed step against one step of the plain loop.

Usage (the figures in docs/benchmarks.md were made with the defaults)::

    python benchmarks/bench_sweep.py [--side 1024] [--steps 1000] [--repeats 5]

Each timing is warmed up (compilation excluded) and blocked until ready; the methods are
interleaved, one run of each per round, and the medians over ``--repeats`` rounds are
reported, so that load on a shared machine affects them alike.
"""

from __future__ import annotations

import os
import sys

if "--devices" in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):  # before jax is imported: one host device per core
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={len(os.sched_getaffinity(0))}"
    )

import argparse
import functools
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import gdlr_jax
from gdlr_jax.engine import _plan, _problem

OPS_PER_STEP = 4  # vector operations per trajectory-step of the two-neuron loss
FMA_UNITS = 2  # per core: every x86 core with AVX2 or AVX-512 of the last decade


def two_neuron_loss(theta):
    """``1/2 (1 - x y)^2`` for ``theta = (x, y)``."""
    return 0.5 * (1.0 - theta[0] * theta[1]) ** 2


def two_neuron_dict_loss(params):
    """``1/2 (1 - x y)^2`` for ``params = {"x": x, "y": y}``."""
    return 0.5 * (1.0 - params["x"] * params["y"]) ** 2


def grid_of_inits(side: int, low: float = -2.0, high: float = 2.0) -> np.ndarray:
    """``side x side`` initialisations on ``[low, high]^2``, float32, shape ``(side^2, 2)``."""
    axis = np.linspace(low, high, side, dtype=np.float32)
    x, y = np.meshgrid(axis, axis)
    return np.stack([x.ravel(), y.ravel()], axis=1)


def cpu_info() -> dict:
    """SIMD width (bits), clock (GHz) and model of the CPU, from ``/proc/cpuinfo``."""
    flags, mhz, model = set(), None, platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "flags" and not flags:
                    flags = set(value.split())
                elif key == "cpu MHz" and mhz is None:
                    mhz = float(value)
                elif key == "model name":
                    model = value.strip()
    except OSError:
        pass
    width = 512 if "avx512f" in flags else 256 if "avx2" in flags else 128
    return {"simd_bits": width, "ghz": (mhz or 0.0) / 1e3, "model": model}


def compute_limit(cores: int) -> float:
    """Trajectory-steps per second at the assumed peak (module docstring), and a line."""
    info = cpu_info()
    per_core = FMA_UNITS * info["simd_bits"] // 32 * info["ghz"] * 1e9 / OPS_PER_STEP
    limit = cores * per_core
    print(
        f"compute limit: {cores} cores x {FMA_UNITS} FMA units x {info['simd_bits']}-bit "
        f"vectors ({info['simd_bits'] // 32} float32) x {info['ghz']:.2f} GHz / "
        f"{OPS_PER_STEP} ops per trajectory-step = {limit / 1e9:.1f} G trajectory-steps/s"
    )
    return limit


def make_plain_scan(steps: int, unroll: int):
    grad = jax.grad(two_neuron_loss)

    @jax.jit
    def plain_scan(theta0, eta):
        def one(theta):
            def step(theta, _):
                return theta - eta * grad(theta), None

            return lax.scan(step, theta, None, length=steps, unroll=unroll)[0]

        return jax.vmap(one)(theta0)

    return plain_scan


def interleaved(methods: dict, repeats: int) -> dict:
    """Median wall and process (CPU) seconds of each method, warmed up, one run of each per
    round: ``{name: (wall, cpu)}``. The CPU time of this process counts every thread; on a
    shared machine it is less disturbed by the other processes than the wall time."""
    for fn in methods.values():
        jax.block_until_ready(fn())
    times = {key: [] for key in methods}
    for _ in range(repeats):
        for key, fn in methods.items():
            wall, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            times[key].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        key: tuple(statistics.median(x[i] for x in t) for i in (0, 1))
        for key, t in times.items()
    }


def report(seconds: dict, work: float, limit: float, baselines: tuple[str, ...]) -> None:
    """Wall and CPU seconds, rates and shares of the limit, and the engine's speed-ups over
    ``baselines`` (ratios of wall times; of CPU times in brackets)."""
    rate = {key: work / wall for key, (wall, _) in seconds.items()}
    for key, (wall, cpu) in seconds.items():
        print(
            f"   {key:40s} {wall:8.3f} s wall {cpu:8.3f} s CPU  "
            f"{rate[key] / 1e9:7.3f} G trajectory-steps/s  {100 * rate[key] / limit:5.1f} % of the limit"
        )
    for key, (wall, cpu) in seconds.items():
        # against every baseline; a baseline of an engine variant only for the same layout
        against = [b for b in baselines if not b.startswith("engine") or b[:24] == key[:24]]
        if key.startswith("engine") and against and key not in against:
            ratios = ", ".join(
                f"{seconds[b][0] / wall:.2f}x ({seconds[b][1] / cpu:.2f}x) {b}" for b in against
            )
            print(f"   {key}: {ratios}")


def engine_methods(theta0, eta, steps, **kwargs):
    """The engine on the (n, 2) array and on the dict of (n,) leaves."""
    etas = np.array([eta], np.float32)
    as_dict = {"x": theta0[:, 0].copy(), "y": theta0[:, 1].copy()}
    sweep = functools.partial(gdlr_jax.sweep, steps=steps, min_loss_value=0.0, **kwargs)
    return {
        "engine, (n, 2) array": lambda: sweep(two_neuron_loss, theta0, etas).status,
        "engine, dict of (n,)": lambda: sweep(two_neuron_dict_loss, as_dict, etas).status,
    }


def bench_case(name, theta0, eta, steps, repeats, limit):
    n = theta0.shape[0]
    eta32 = jnp.float32(eta)
    theta_device = jnp.asarray(theta0)
    methods = engine_methods(theta0, eta, steps)
    for unroll in (1, 4):
        scan = make_plain_scan(steps, unroll)
        methods[f"plain scan, unroll {unroll}"] = functools.partial(scan, theta_device, eta32)
    seconds = interleaved(methods, repeats)
    result = gdlr_jax.sweep(two_neuron_loss, theta0, np.array([eta]), steps=steps, min_loss_value=0.0)
    labels = [s.name for s in gdlr_jax.TrajectoryStatus]
    counts = np.bincount(np.asarray(result.status).ravel(), minlength=len(labels)) / n
    print(f"\n== {name}: eta = {eta}, {n} trajectories x {steps} steps, float32 ==")
    print("   status fractions: " + ", ".join(f"{l} {c:.3f}" for l, c in zip(labels, counts)))
    print(f"   median steps taken: {np.median(np.asarray(result.steps_taken)):.0f}")
    report(seconds, n * steps, limit, ("plain scan, unroll 1", "plain scan, unroll 4"))


def bench_step_blocks(theta0, eta, steps, repeats, limit, blocks):
    methods = {}
    for k in blocks:
        for key, fn in engine_methods(theta0, eta, steps, step_block=k).items():
            methods[f"{key}, step_block {k}"] = fn
    print(f"\n== step_block: eta = {eta}, {theta0.shape[0]} trajectories x {steps} steps ==")
    baselines = tuple(key for key in methods if key.endswith(f"step_block {blocks[0]}"))
    report(interleaved(methods, repeats), theta0.shape[0] * steps, limit, baselines)


def _with_pack_pairs(backends, fn):
    """``fn()`` with ``PACK_PAIRS = backends`` (read when a sweep is planned)."""
    default = _plan.PACK_PAIRS
    _plan.PACK_PAIRS = backends
    try:
        return fn()
    finally:
        _plan.PACK_PAIRS = default


def bench_pairs(theta0, eta, steps, repeats, limit):
    """The step loop's columns packed in complex pairs against the rows of a (d, m) array."""
    platform = jax.devices()[0].platform
    methods = {}
    for label, backends in (("rows", frozenset()), ("packed pairs", frozenset({platform}))):
        for key, fn in engine_methods(theta0, eta, steps).items():
            methods[f"{key}, {label}"] = functools.partial(_with_pack_pairs, backends, fn)
    print(f"\n== pairs: eta = {eta}, {theta0.shape[0]} trajectories x {steps} steps ==")
    baselines = tuple(key for key in methods if key.endswith(", rows"))
    report(interleaved(methods, repeats), theta0.shape[0] * steps, limit, baselines)


def bench_devices(theta0, eta, steps, repeats, limit):
    devices = jax.local_devices()
    methods = {}
    for count in sorted({1, len(devices)}):
        for key, fn in engine_methods(theta0, eta, steps, devices=devices[:count]).items():
            methods[f"{key}, {count} device(s)"] = fn
    print(f"\n== devices: eta = {eta}, {theta0.shape[0]} trajectories x {steps} steps ==")
    baselines = tuple(key for key in methods if key.endswith(" 1 device(s)"))
    report(interleaved(methods, repeats), theta0.shape[0] * steps, limit, baselines)


def chain_loss(depth: int):
    """``1/2 (1 - theta_1 ... theta_d)^2`` on a ``(d,)`` array, a new function object per call
    (a separate compilation)."""

    def loss(theta):
        return 0.5 * (1.0 - jnp.prod(theta)) ** 2

    return loss


def bench_layouts(n, steps, repeats):
    """Forward-mode columns against reverse-mode leaves for chains of d scalars."""
    rng = np.random.default_rng(0)
    print(f"\n== layouts: scalar chains, {n} trajectories x {steps} steps, eta = 0.05 ==")
    default = _problem.FORWARD_MODE_MAX_PARAMS
    for depth in (2, 4, 8, 16):
        theta0 = (1.0 + 0.1 * rng.standard_normal((n, depth))).astype(np.float32)
        methods = {}
        for label, limit in (("forward (columns)", depth), ("reverse (leaves)", depth - 1)):
            loss = chain_loss(depth)

            def run(loss=loss, limit=limit, theta0=theta0):
                _problem.FORWARD_MODE_MAX_PARAMS = limit  # read when the sweep is traced
                try:
                    return gdlr_jax.sweep(
                        loss, theta0, np.array([0.05]), steps=steps, min_loss_value=0.0
                    ).status
                finally:
                    _problem.FORWARD_MODE_MAX_PARAMS = default

            methods[f"d = {depth:2d}, {label}"] = run
        seconds = interleaved(methods, repeats)
        for key, (wall, cpu) in seconds.items():
            print(f"   {key:30s} {wall:8.3f} s wall {cpu:8.3f} s CPU")
        (forward, forward_cpu), (reverse, reverse_cpu) = seconds.values()
        print(f"   d = {depth:2d}: forward / reverse time {forward / reverse:.2f} "
              f"(CPU {forward_cpu / reverse_cpu:.2f})")


def bench_lyapunov(cases, steps, repeats):
    """The engine without ``lyapunov``, with the default ``lyapunov_steps`` and with all
    ``steps``; the extra time per replayed trajectory-step against the time per step."""
    lengths = {"off": None, "default": min(steps, 256), "all steps": steps}
    for name, theta0, eta in cases:
        n = theta0.shape[0]
        methods = {}
        for label, length in lengths.items():
            extra = {} if length is None else {"lyapunov": True, "lyapunov_steps": length}
            sweep = functools.partial(gdlr_jax.sweep, two_neuron_loss, theta0, np.array([eta]),
                                      steps=steps, min_loss_value=0.0, **extra)  # fmt: skip
            methods[f"lyapunov {label} (L = {length or 0})"] = lambda sweep=sweep: sweep().status
        seconds = interleaved(methods, repeats)
        result = gdlr_jax.sweep(two_neuron_loss, theta0, np.array([eta]), steps=steps,
                                min_loss_value=0.0, lyapunov=True)  # fmt: skip
        labels = [s.name for s in gdlr_jax.TrajectoryStatus]
        counts = np.bincount(result.status.ravel(), minlength=len(labels)) / n
        print(f"\n== lyapunov, {name}: eta = {eta}, {n} trajectories x {steps} steps, float32 ==")
        print("   status fractions: " + ", ".join(f"{l} {c:.3f}" for l, c in zip(labels, counts)))
        print(f"   median steps taken: {np.median(result.steps_taken):.0f}")
        off, off_cpu = seconds.pop("lyapunov off (L = 0)")
        print(f"   {'lyapunov off (L = 0)':40s} {off:8.3f} s wall {off_cpu:8.3f} s CPU")
        all_running = np.median(result.steps_taken) == steps
        for (key, (wall, cpu)), length in zip(seconds.items(), list(lengths.values())[1:]):
            line = (f"   {key:40s} {wall:8.3f} s wall {cpu:8.3f} s CPU  {wall / off:.2f}x "
                    f"({cpu / off_cpu:.2f}x CPU) the time without")  # fmt: skip
            if all_running:  # every trajectory replayed: the extra time per replayed step
                extra = (wall - off) / (n * length)
                line += f"; a Lyapunov step costs {extra / (off / (n * steps)):.2f} plain steps"
            print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=1024, help="grid side (side^2 inits)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default="near11,grid105,grid04",
                        help="comma-separated: near11, grid105, grid04")
    parser.add_argument("--step-blocks", default="", help="e.g. 1,2,4,8")
    parser.add_argument("--pairs", action="store_true")
    parser.add_argument("--devices", action="store_true")
    parser.add_argument("--layouts", action="store_true")
    parser.add_argument("--lyapunov", action="store_true")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    print(f"machine: {platform.platform()}, {cpu_info()['model']}, {cores} cores available")
    print(f"jax {jax.__version__}, devices {jax.devices()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    on_cpu = jax.devices()[0].platform == "cpu"
    limit = compute_limit(cores) if on_cpu else float("nan")
    grid = grid_of_inits(args.side)
    near = grid_of_inits(args.side, 0.95, 1.05)
    plan = gdlr_jax.plan_sweep(two_neuron_loss, grid, np.array([1.0]), steps=args.steps)
    print(f"engine chunk size: {plan.chunk_size} trajectories ({plan.num_chunks} chunks), "
          f"step_block {plan._config.step_block}")
    cases = {
        "near11": ("no early exit, near (1, 1)", near, 1.1),
        "grid105": ("no early exit, [-2, 2]^2", grid, 1.05),
        "grid04": ("most converge early, [-2, 2]^2", grid, 0.4),
    }
    for case in filter(None, args.cases.split(",")):
        name, theta0, eta = cases[case]
        bench_case(name, theta0, eta, args.steps, args.repeats, limit)
    if args.step_blocks:
        blocks = [int(k) for k in args.step_blocks.split(",")]
        bench_step_blocks(near, 1.1, args.steps, args.repeats, limit, blocks)
    if args.pairs:
        bench_pairs(near, 1.1, args.steps, args.repeats, limit)
    if args.devices:
        bench_devices(near, 1.1, args.steps, args.repeats, limit)
    if args.layouts:
        bench_layouts(min(grid.shape[0], 1 << 16), args.steps, args.repeats)
    if args.lyapunov:
        small = min(args.side, 256)  # 2^16 trajectories
        bench_lyapunov(
            [("all replayed, near (1, 1)", grid_of_inits(small, 0.95, 1.05), 1.1),
             ("most converge, [-2, 2]^2", grid_of_inits(small), 0.4)],
            args.steps,
            args.repeats,
        )


if __name__ == "__main__":
    main()
