"""``gdlr run`` across processes (docs/distributed.md): two CPU processes on localhost write the
results.npz of one process; bad starts, different configs and folders that are not shared are
refused in one line, before compute."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from subprocesses import cpu_env, finish, free_port

# a two-neuron run of a few seconds, with several chunks per sweep (a 1 MiB budget)
QUICK = [
    "--set", "critical_step_size.restarts=1", "--set", "critical_step_size.steps=2",
    "--set", "weak_stability.points=101", "--set", "basin.resolution=40",
    "--set", "sweep.resolution=30", "--set", "sweep.eta.num=4", "--set", "sweep.steps=300",
    "--set", "basin.steps=300", "--set", "engine.memory_budget_mb=1", "--no-progress",
]
GDLR = [sys.executable, "-c", "import sys; from gdlr_jax.experiments.cli import main; sys.exit(main())"]






def _gdlr(args, cwd, **popen):
    return subprocess.Popen([*GDLR, *args], cwd=cwd, env=cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)




def _two_processes(tmp_path, args_of):
    port = free_port()
    procs = [
        _gdlr([*args_of(p), "--coordinator", f"localhost:{port}", "--num-processes", "2",
               "--process-id", str(p)], tmp_path)
        for p in range(2)
    ]
    return finish(procs)


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("gdlr: error:")]


def _same_results(a, b):
    a, b = np.load(a), np.load(b)
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.slow
def test_two_processes_write_the_results_of_one(tmp_path):
    codes, outputs = finish([_gdlr(["run", "two_neuron", "--out", "one", *QUICK], tmp_path)])
    assert codes == [0], outputs[0]
    codes, outputs = _two_processes(tmp_path, lambda p: ["run", "two_neuron", "--out", "two", *QUICK])
    assert codes == [0, 0], "\n".join(outputs)
    assert "process 1 of 2 done; process 0 writes the results to two" in outputs[1]
    _same_results(tmp_path / "one" / "results.npz", tmp_path / "two" / "results.npz")
    assert not (tmp_path / "two" / "checkpoints").exists()
    # a finished run resumed by two processes: nothing to do, on both
    codes, outputs = _two_processes(
        tmp_path, lambda p: ["run", "two_neuron", "--out", "two", "--resume", *QUICK])
    assert codes == [0, 0] and all("nothing to resume" in out for out in outputs), outputs


@pytest.mark.slow
def test_small_mnist_config_on_two_processes(tmp_path, mnist_dir):
    small = ["--data-dir", str(mnist_dir), "--set", "data.max_examples=64", "--set", "model.depths=[1]",
             "--set", "training.n_init=3", "--set", "training.steps=40",
             "--set", "training.etas=[0.1, 2.0]", "--no-progress"]
    codes, outputs = finish([_gdlr(["run", "mnist_gelu_mse_cpu", "--out", "one", *small], tmp_path)])
    assert codes == [0], outputs[0]
    codes, outputs = _two_processes(
        tmp_path, lambda p: ["run", "mnist_gelu_mse_cpu", "--out", "two", *small])
    assert codes == [0, 0], "\n".join(outputs)
    _same_results(tmp_path / "one" / "results.npz", tmp_path / "two" / "results.npz")


@pytest.mark.slow
def test_different_configs_are_refused_before_compute(tmp_path):
    codes, outputs = _two_processes(
        tmp_path,
        lambda p: ["run", "two_neuron", "--out", "two", *QUICK, "--set", f"sweep.steps={300 + p}"],
    )
    assert codes == [2, 2]
    for out in outputs:
        (error,) = _errors(out)
        assert "the processes of this jax.distributed run have different configs: process 1" in error
    assert not (tmp_path / "two").exists()


@pytest.mark.slow
def test_an_output_folder_not_shared_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    port = free_port()
    procs = [
        _gdlr(["run", "two_neuron", "--out", "two", *QUICK, "--coordinator", f"localhost:{port}",
               "--num-processes", "2", "--process-id", str(p)], tmp_path / "ab"[p])
        for p in range(2)
    ]
    codes, outputs = finish(procs)
    assert codes == [2, 2]
    for out in outputs:
        (error,) = _errors(out)
        assert "is not shared between the processes of this jax.distributed run: process 1" in error
    assert not (tmp_path / "a" / "two").exists()  # process 0 removed what it had made


def test_a_coordinator_that_never_answers_is_one_line_within_the_timeout(tmp_path):
    port = free_port()  # nobody listens there
    start = time.monotonic()
    codes, outputs = finish([_gdlr(
        ["run", "two_neuron", "--coordinator", f"localhost:{port}", "--num-processes", "2",
         "--process-id", "1", "--coordinator-timeout", "3"], tmp_path)], timeout=120)
    assert codes == [2]
    assert _errors(outputs[0]) == [
        f"gdlr: error: coordinator localhost:{port} did not answer within 3 s; start process 0 "
        "there (it is the coordinator), or check the address"
    ]
    assert "Traceback" not in outputs[0]
    assert time.monotonic() - start < 60
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
         "coordinator must be HOST:PORT with a port in 1..65535, got 'localhost'"),
        (["--coordinator", "h:70000", "--num-processes", "2", "--process-id", "0"],
         "coordinator must be HOST:PORT with a port in 1..65535, got 'h:70000'"),
        (["--coordinator", "h:1234", "--num-processes", "2", "--process-id", "2"],
         "process_id must be an integer in 0..1, got 2"),
        (["--coordinator", "h:1234", "--num-processes", "0", "--process-id", "0"],
         "num_processes must be an integer >= 1, got 0"),
        (["--distributed", "--process-id", "0"], "--distributed detects the cluster"),
        (["--num-processes", "2"], "an explicit jax.distributed start needs all of"),
    ],
)
def test_bad_distributed_flags_are_one_line(tmp_path, flags, message):
    codes, outputs = finish([_gdlr(["run", "two_neuron", *flags], tmp_path)], timeout=120)
    assert codes == [2], outputs[0]
    (error,) = _errors(outputs[0])
    assert message in error
    assert "Traceback" not in outputs[0]


@pytest.mark.slow
def test_a_run_killed_on_two_processes_resumes_on_one(tmp_path):
    """Both processes are killed (SIGKILL) once process 1 has saved a chunk of the first large
    sweep; `gdlr run --resume` on one process loads the saved chunks and writes the results of
    an uninterrupted one-process run."""
    codes, outputs = finish([_gdlr(["run", "two_neuron", "--out", "one", *QUICK], tmp_path)])
    assert codes == [0], outputs[0]
    port = free_port()
    procs = [
        _gdlr(["run", "two_neuron", "--out", "two", *QUICK, "--coordinator", f"localhost:{port}",
               "--num-processes", "2", "--process-id", str(p)], tmp_path)
        for p in range(2)
    ]
    saved = tmp_path / "two" / "checkpoints" / "trapping_region" / "chunk-00001.npz"
    deadline = time.monotonic() + 600
    while not saved.exists() and time.monotonic() < deadline and procs[1].poll() is None:
        time.sleep(0.05)
    for proc in procs:
        proc.kill()
    finish(procs)
    assert saved.exists(), "process 1 saved no chunk of the trapping-region sweep"
    assert not (tmp_path / "two" / "results.npz").exists()
    codes, outputs = finish(
        [_gdlr(["run", "two_neuron", "--out", "two", "--resume", *QUICK], tmp_path)])
    assert codes == [0], outputs[0]
    assert "resuming two_neuron" in outputs[0]
    _same_results(tmp_path / "one" / "results.npz", tmp_path / "two" / "results.npz")
