"""One sweep on 1 process against the same sweep shared by P processes under jax.distributed
(localhost, CPU), whole wall time of each run (start-up, compile and all), interleaved repeats,
medians; checks that the results are bit-identical.

    python benchmarks/bench_distributed.py [--processes 2] [--starts 262144] [--steps 1000]

The workload: the two-neuron loss 1/2 (1 - xy)^2, float32, starts near (1, 1) at eta = 1.1 (a
period-2 orbit: no trajectory exits early), in chunks of 16384 trajectories.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

WORKER = r"""
import sys, time
import numpy as np
process, count, port, folder, out, starts, steps = sys.argv[1:8]
process, count, starts, steps = int(process), int(count), int(starts), int(steps)
import jax
if count > 1:
    jax.distributed.initialize(f"localhost:{port}", num_processes=count, process_id=process,
                               initialization_timeout=120)
import jax.numpy as jnp
import gdlr_jax as gl
key = jax.random.PRNGKey(0)
params0 = {"x": 1.0 + 0.05 * jax.random.normal(key, (starts,)),
           "y": 1.0 + 0.05 * jax.random.normal(jax.random.fold_in(key, 1), (starts,))}
loss = lambda p: 0.5 * (1.0 - p["x"] * p["y"]) ** 2
result = gl.sweep(loss, params0, jnp.array([1.1]), steps=steps, chunk_size=16384,
                  checkpoint_dir=folder)
if process == 0:
    np.savez(out, status=result.status, final_loss=result.final_loss,
             x=result.final_params["x"], y=result.final_params["y"])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run(count: int, starts: int, steps: int, workdir: str) -> tuple[float, str]:
    """Wall time of one whole run on ``count`` processes, and its result file."""
    folder = tempfile.mkdtemp(dir=workdir)
    out = os.path.join(folder, "result.npz")
    script = os.path.join(workdir, "worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    port = str(_free_port())
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(p), str(count), port, os.path.join(folder, "ckpt"),
             out, str(starts), str(steps)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for p in range(count)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=1800)
        if proc.returncode:
            raise SystemExit(f"a worker failed:\n{err[-2000:]}")
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--starts", type=int, default=1 << 18)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{args.starts} trajectories x {args.steps} steps, float32, chunks of 16384")
    times: dict[int, list[float]] = {1: [], args.processes: []}
    with tempfile.TemporaryDirectory() as workdir:
        with open(os.path.join(workdir, "worker.py"), "w") as handle:
            handle.write(WORKER)
        reference = None
        for _ in range(args.repeats):  # interleaved: 1, P, 1, P, ...
            for count in times:
                seconds, out = run(count, args.starts, args.steps, workdir)
                times[count].append(seconds)
                arrays = dict(np.load(out))
                if reference is None:
                    reference = arrays
                assert all(np.array_equal(reference[k], arrays[k]) for k in reference), (
                    "results differ between process counts")
    one = statistics.median(times[1])
    many = statistics.median(times[args.processes])
    print(f"1 process:  median {one:.2f} s  (runs {', '.join(f'{t:.2f}' for t in times[1])})")
    print(f"{args.processes} processes: median {many:.2f} s  (runs "
          f"{', '.join(f'{t:.2f}' for t in times[args.processes])})")
    print(f"speed-up {one / many:.2f}x; results bit-identical across process counts")


if __name__ == "__main__":
    main()
