"""Sweeps under jax.distributed (gdlr_jax.engine._distributed): two CPU processes on localhost
give results bit-identical to one process; a process killed mid-run loses only its unfinished
chunk and one process resumes the rest; processes with different sweeps, or without a shared
folder, are refused before compute."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from subprocesses import cpu_env, finish, free_port

from gdlr_jax.engine._distributed import process_share

WORKER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import jax, jax.numpy as jnp
    process, count, port, folder, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    if count > 1:
        jax.distributed.initialize(f"localhost:{port}", num_processes=count, process_id=process,
                                   initialization_timeout=60, heartbeat_timeout_seconds=10)
    import gdlr_jax as gl
    from gdlr_jax.engine import _checkpoint
    if os.environ.get("KILL_AFTER_ONE_CHUNK") == str(process):
        save = _checkpoint.ChunkStore.save
        def save_then_die(self, index, chunk):
            path = save(self, index, chunk)
            os.kill(os.getpid(), 9)
        _checkpoint.ChunkStore.save = save_then_die
    steps = int(os.environ.get("STEPS", "200"))
    x0 = jnp.stack(jnp.meshgrid(jnp.linspace(-2.0, 2.0, 12), jnp.linspace(-2.0, 2.0, 8)), -1)
    params0 = {"x": x0[..., 0].ravel(), "y": x0[..., 1].ravel()}
    loss = lambda p: 0.5 * (1.0 - p["x"] * p["y"]) ** 2
    result = gl.sweep(loss, params0, jnp.array([0.4, 0.9, 1.1]), steps=steps, chunk_size=32,
                      record_every=50, min_loss_value=0.0,
                      checkpoint_dir=None if os.environ.get("NO_CHECKPOINT") else folder)
    flat = {k: v for k, v in result._asdict().items() if isinstance(v, np.ndarray)}
    flat.update({f"final_params.{k}": v for k, v in result.final_params.items()})
    np.savez(out, **flat)
    """
)






def _start(tmp_path, count: int, folders, env=None):
    port = free_port()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return [
        subprocess.Popen(
            [sys.executable, str(script), str(p), str(count), str(port), str(folders[p]),
             str(tmp_path / f"out{count}-{p}.npz")],
            env=env or cpu_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for p in range(count)
    ]




def _assert_identical(a_path, b_path):
    a, b = np.load(a_path), np.load(b_path)
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_process_share_is_a_partition():
    for n in range(0, 12):
        for count in range(1, 5):
            shares = [list(process_share(n, p, count)) for p in range(count)]
            assert sorted(sum(shares, [])) == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    codes, outputs = finish(_start(tmp, 1, [tmp / "ckpt"]))
    assert codes == [0], outputs[0]
    return tmp / "out1-0.npz"


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, one_process):
    folder = tmp_path / "ckpt"
    codes, outputs = finish(_start(tmp_path, 2, [folder, folder]))
    assert codes == [0, 0], "\n".join(outputs)
    _assert_identical(tmp_path / "out2-0.npz", one_process)
    _assert_identical(tmp_path / "out2-1.npz", one_process)
    # 3 step sizes x 96 starts in chunks of 32: 9 chunks, 5 on process 0 and 4 on process 1
    assert len(list(folder.glob("chunk-*.npz"))) == 9


@pytest.mark.slow
def test_a_killed_process_loses_only_its_unfinished_chunk(tmp_path, one_process):
    folder = tmp_path / "ckpt"
    procs = _start(tmp_path, 2, [folder, folder], env=cpu_env(KILL_AFTER_ONE_CHUNK="1"))
    codes, outputs = finish(procs)
    assert codes[1] == -9, outputs[1]
    assert codes[0] != 0  # the runtime ends the job when a process is lost
    saved = sorted(path.name for path in folder.glob("chunk-*.npz"))
    assert "chunk-00001.npz" in saved  # the chunk process 1 finished before it was killed
    # resumed by one process (no jax.distributed): the saved chunks are loaded, the rest run
    codes, outputs = finish(_start(tmp_path, 1, [folder]))
    assert codes == [0], outputs[0]
    _assert_identical(tmp_path / "out1-0.npz", one_process)


@pytest.mark.slow
def test_processes_with_different_sweeps_are_refused(tmp_path):
    folder = tmp_path / "ckpt"
    port = free_port()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(p), "2", str(port), str(folder), str(tmp_path / f"o{p}.npz")],
            env=cpu_env(STEPS=str(200 + 100 * p)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for p in range(2)
    ]
    codes, outputs = finish(procs)
    assert codes == [1, 1]
    for out in outputs:
        assert "DistributedError: the processes of this jax.distributed job plan different " \
               "sweeps: process 1" in out
    assert not list(folder.glob("chunk-*.npz"))  # refused before any compute


@pytest.mark.slow
def test_a_folder_not_shared_is_refused(tmp_path):
    codes, outputs = finish(_start(tmp_path, 2, [tmp_path / "a", tmp_path / "b"]))
    assert codes == [1, 1]
    for out in outputs:
        assert "is not shared between the processes of this jax.distributed job: process 1" in out
    assert not list(tmp_path.glob("*/chunk-*.npz"))


@pytest.mark.slow
def test_a_distributed_sweep_needs_a_checkpoint_folder(tmp_path):
    procs = _start(tmp_path, 2, [tmp_path / "a", tmp_path / "a"], env=cpu_env(NO_CHECKPOINT="1"))
    codes, outputs = finish(procs)
    assert codes == [1, 1]
    for out in outputs:
        assert ("ValueError: sweep under jax.distributed (2 processes) needs checkpoint_dir: a "
                "folder shared by every process, where each saves its chunks.") in out
