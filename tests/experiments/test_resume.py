"""``gdlr run --resume``: a run killed (SIGKILL) or interrupted (SIGINT) in the middle of its
sweeps resumes from the saved chunks and gives the results of an uninterrupted run, bit for bit;
a folder of another config is refused.

The runs are real ``gdlr run`` processes on a shrunk two-neuron config whose Figure 2 sweep is
cut into ~38 chunks (``engine.memory_budget_mb=1``). They share a JAX compilation cache (a
temporary folder of this module), so that only the first one compiles.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gdlr_jax.experiments.cli import main
from gdlr_jax.experiments.config import load_config
from gdlr_jax.experiments.runner import find_config

SMALL = [
    "engine.memory_budget_mb=1",  # ~1400 trajectories per chunk: many chunks
    "critical_step_size.restarts=1",
    "critical_step_size.steps=100",
    "weak_stability.points=1001",
    "weak_stability.curve_points=20",
    "basin.resolution=20",
    "figures.dpi=20",
]
SETS = [arg for key in SMALL for arg in ("--set", key)]
# the installed `gdlr` script, run by this interpreter
LAUNCH = [
    sys.executable,
    "-c",
    # SIGINT delivered and handled as for a command typed at a terminal, whatever the test
    # process passed on (a blocked or ignored SIGINT is inherited across exec)
    "import signal, sys; signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT]); "
    "signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from gdlr_jax.experiments.cli import main; sys.exit(main())",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    out = dict(os.environ)
    out.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax-cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return out


def _gdlr(args, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        LAUNCH + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def _start(args, env, cwd) -> subprocess.Popen:
    return subprocess.Popen(
        LAUNCH + ["run", "two_neuron", *SETS, "--no-progress", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _chunk_files(out: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.glob("checkpoints/*/chunk-*.npz"))


def _wait_for_chunks(proc: subprocess.Popen, out: pathlib.Path, enough) -> None:
    """Polls the chunk files of the run in ``out`` until ``enough(files)``."""
    deadline = time.monotonic() + 120
    while not enough(_chunk_files(out)):
        assert proc.poll() is None, "the run ended before writing its chunks"
        assert time.monotonic() < deadline, "no chunks written"
        time.sleep(0.005)


def _results(out: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(out / "results.npz") as data:
        return dict(data)


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env):
    """``results.npz`` of an uninterrupted run of the shrunk config."""
    root = tmp_path_factory.mktemp("whole")
    done = _gdlr(["run", "two_neuron", *SETS, "--no-progress", "--out", "run"], env, root)
    assert done.returncode == 0, done.stderr
    assert not (root / "run" / "checkpoints").exists()  # removed once the run is complete
    results = _results(root / "run")
    assert results["sweep_final_loss"].dtype == np.float64  # dtype: float64, end to end
    return results


@pytest.mark.slow  # end-to-end runs killed and resumed
def test_killed_then_interrupted_run_resumes_to_the_uninterrupted_results(
    tmp_path, env, uninterrupted, capsys
):
    out = tmp_path / "run"
    resume = ["run", "two_neuron", *SETS, "--resume", "--out", str(out)]

    # 1. SIGKILL once 2 chunks of the Figure 2 sweep are saved
    proc = _start(["--out", str(out)], env, tmp_path)
    _wait_for_chunks(proc, out, lambda files: sum("trapping_region" in f for f in files) >= 2)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists() and not (out / "results.npz").exists()
    killed = _chunk_files(out)

    # 2. a resume with another config is refused before any compute, naming the key
    assert main([*resume, "--set", "sweep.steps=1999"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"gdlr: error: cannot resume in {out}: it holds a run of a different config "
        "(sweep.steps: 2000 there, 1999 now); choose another --out, or replace that run with "
        "--overwrite"
    )
    assert _chunk_files(out) == killed

    # 3. resume, and interrupt it (SIGINT) once it has saved one more chunk
    proc = _start(["--resume", "--out", str(out)], env, tmp_path)
    _wait_for_chunks(proc, out, lambda files: len(files) > len(killed))
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert stdout.startswith(f"gdlr: resuming two_neuron (two_neuron) in {out}\n")
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "unusable" not in stderr
    command = shlex.join(["gdlr", *resume])
    last = stderr.strip().splitlines()[-1]
    assert last == f"gdlr: interrupted; finished chunks are saved; resume with: {command}"
    interrupted = _chunk_files(out)
    assert set(killed) < set(interrupted)

    # 4. the printed command finishes the run: the results of an uninterrupted run
    done = _gdlr(shlex.split(command)[1:] + ["--no-progress"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "unusable" not in done.stderr  # every saved chunk was loaded
    _assert_identical(_results(out), uninterrupted)
    assert not (out / "checkpoints").exists()
    assert json.loads((out / "summary.json").read_text())["resumed"] is True

    # 5. resuming a finished run does nothing
    assert main(resume) == 0
    assert "holds the finished run of this config; nothing to resume" in capsys.readouterr().out


def test_resume_needs_a_gdlr_run_and_excludes_overwrite(tmp_path, capsys, monkeypatch):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    assert main(["run", "--resume", "--out", str(foreign)]) == 2
    assert "holds no gdlr run (no config.yaml)" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]
    with pytest.raises(SystemExit) as info:
        main(["run", "--resume", "--overwrite"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    # the default folder of a resumed run is runs/NAME itself, not a numbered one
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "two_neuron").mkdir(parents=True)
    saved = tmp_path / "runs" / "two_neuron" / "config.yaml"
    saved.write_text("x\n")
    assert main(["run", "--dry-run", "--resume"]) == 2  # as the run: another config's run
    assert "cannot resume in runs/two_neuron: it holds a run of a different config" in (
        capsys.readouterr().err
    )
    config = load_config(find_config("two_neuron"))
    header = f"# gdlr resolved config; fingerprint {config.fingerprint}\n"
    saved.write_text(header + config.to_yaml())
    assert main(["run", "--dry-run", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "# output folder: runs/two_neuron (resumes the unfinished run in it)\n" in out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "--resume" in capsys.readouterr().out
