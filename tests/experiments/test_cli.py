"""The ``gdlr`` command line: help, version, list, errors, output folders, the installed script."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gdlr_jax import __version__
from gdlr_jax.experiments.cli import main
from gdlr_jax.experiments.config import ConfigError
from gdlr_jax.experiments.runner import (
    RunOutput,
    find_config,
    format_table,
    list_configs,
    output_dir_for,
)

REPO = pathlib.Path(__file__).resolve().parents[2]


def _exit_code(argv) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def test_help_explains_commands_and_options(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("run", "list", "--version", "examples:"):
        assert word in out
    assert _exit_code(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for option in (
        "CONFIG",
        "--out DIR",
        "--overwrite",
        "--set KEY=VALUE",
        "--dry-run",
        "--no-progress",
    ):
        assert option in out
    assert "never overwritten silently" in " ".join(out.split())


def test_version(capsys):
    assert _exit_code(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"gdlr_jax {__version__}"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: gdlr" in capsys.readouterr().out


def test_list_shows_shipped_configs_with_descriptions(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs are found beside the package too
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name, _, description in list_configs():
        assert name in out and description[:30] in out
    assert "two_neuron " in out
    assert "  two_neuron: the worked example 1/2 (1 - xy)^2" in out


def test_bad_config_and_bad_set_exit_2_with_a_message(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "no_such_config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gdlr: error: config not found: no_such_config (shipped configs: ")
    assert "two_neuron" in err
    assert main(["run", "--set", "sweep.steps=0"]) == 2
    err = capsys.readouterr().err
    assert (
        "config key 'sweep.steps' has value 0; allowed: an integer >= 1 (from --set sweep.steps)"
        in err
    )
    assert main(["run", "--set", "nonsense"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert main(["run", "mnist_gelu_mse_cpu", "--set", "training.etas=[.nan]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gdlr: error: ") and err.count("\n") == 1
    assert err.endswith(
        "config key 'training.etas.0' has value nan; allowed: a finite number > 0"
        " (from --set training.etas)\n"
    )
    assert not (tmp_path / "runs").exists()  # nothing written before validation passed


def test_docs_give_every_exit_status():
    text = (REPO / "docs" / "cli.md").read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")]
    when = {}
    for status, *rest in rows:
        if status[2:].isdigit():
            when.setdefault(int(status[2:]), []).append(rest[0])
    assert sorted(when) == [0, 1, 2, 130]
    assert any(w.startswith("`gdlr list` finds no config") for w in when[1])
    assert any(w.startswith("out of memory while running") for w in when[2])
    assert any(w.startswith("a bad config") for w in when[2])
    assert len(when[130]) == 2  # during the run (with the resume command) and before it


def test_dry_run_prints_the_resolved_config(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "two_neuron", "--dry-run", "--set", "sweep.steps=123"]) == 0
    out = capsys.readouterr().out
    assert "# output folder: runs/two_neuron" in out
    assert "steps: 123" in out and "experiment: two_neuron" in out
    assert not (tmp_path / "runs").exists()


def test_find_config_by_name_path_and_suffix(tmp_path):
    shipped = find_config("two_neuron")
    assert shipped.name == "two_neuron.yaml" and shipped.is_file()
    assert find_config("two_neuron.yaml") == shipped
    own = tmp_path / "mine.yaml"
    own.write_text("experiment: two_neuron\n")
    assert find_config(own) == own
    with pytest.raises(ConfigError, match="config not found: "):
        find_config(tmp_path / "missing.yaml")


def test_default_output_folder_is_numbered_when_taken(tmp_path):
    runs = tmp_path / "runs"
    first = output_dir_for("tn", runs_dir=runs)
    assert first == runs / "tn"
    RunOutput(first).write_text("config.yaml", "experiment: two_neuron\n")
    second = output_dir_for("tn", runs_dir=runs)
    assert second == runs / "tn-2"
    RunOutput(second).write_text("config.yaml", "x\n")
    assert output_dir_for("tn", runs_dir=runs) == runs / "tn-3"
    # an empty folder is reused
    (runs / "tn-3").mkdir()
    assert output_dir_for("tn", runs_dir=runs) == runs / "tn-3"
    # --overwrite replaces the previous run in the default folder
    assert output_dir_for("tn", overwrite=True, runs_dir=runs) == runs / "tn"
    assert not (runs / "tn").exists()


def test_explicit_out_is_never_overwritten_silently(tmp_path):
    out = tmp_path / "out"
    assert output_dir_for("tn", out) == out
    RunOutput(out).write_text("config.yaml", "experiment: two_neuron\n")
    with pytest.raises(
        ConfigError, match=r"output folder .*out already exists and is not empty; pass --overwrite"
    ):
        output_dir_for("tn", out)
    assert output_dir_for("tn", out, overwrite=True) == out and not out.exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(
        ConfigError, match=r"holds no previous run \(no config.yaml\); refusing to delete"
    ):
        output_dir_for("tn", foreign, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "precious"
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        output_dir_for("tn", a_file)


def test_run_output_writes_atomically(tmp_path):
    output = RunOutput(tmp_path / "o")
    output.write_json("a.json", {"x": 1})
    output.write_arrays("r", {"v": [1, 2]})
    assert output.files == ["a.json", "r.npz"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "a.json",
        "r.npz",
    ]  # no temp files


def test_format_table():
    text = format_table(["eta", "share", "note"], [[0.1, 0.123456, "a"], [1.0, 0, "bc"]])
    assert text.splitlines() == [
        "eta   share  note",
        "---  ------  ----",
        "0.1  0.1235  a",
        "  1       0  bc",
    ]


TINY = [  # the default config shrunk to a fraction of a second of compute, in float32
    "dtype=float32",
    "critical_step_size.restarts=1",
    "critical_step_size.steps=50",
    "weak_stability.points=501",
    "sweep.eta.num=2",
    "sweep.resolution=4",
    "sweep.steps=200",
    "portraits.0.starts=1",
    "portraits.1.starts=1",
    "basin.resolution=4",
    "basin.steps=200",
    "figures.dpi=20",
]


def test_script_entry_point_is_outside_the_package():
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="gdlr")
    assert script.value == "_gdlr_entry:main"
    done = subprocess.run(
        [sys.executable, "-c", "import sys, _gdlr_entry; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "'gdlr_jax'" not in done.stdout and "'jax'" not in done.stdout


def test_ctrl_c_while_importing_exits_130_without_traceback(tmp_path):
    # `from _gdlr_entry import main; sys.exit(main())` is the installed script; SIGINT is
    # re-enabled in case this test runs where it is ignored (a background job)
    launch = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "print('started', file=sys.stderr, flush=True); "
        "from _gdlr_entry import main; sys.exit(main())"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launch, "run", "two_neuron", "--out", str(tmp_path / "out")],
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr.readline() == "started\n"
    time.sleep(0.3)  # importing jax takes about a second (a Ctrl-C later gives 130 too)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert err.splitlines()[-1].startswith("gdlr: interrupted"), err


@pytest.mark.skipif(
    shutil.which("gdlr", path=str(pathlib.Path(sys.executable).parent)) is None,
    reason="the gdlr script is not installed in this environment",
)
def test_installed_script_runs_the_default_config(tmp_path):
    gdlr = shutil.which("gdlr", path=str(pathlib.Path(sys.executable).parent))
    argv = [gdlr, "run", "--no-progress"] + [a for kv in TINY for a in ("--set", kv)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "runs" / "two_neuron"
    assert done.stdout.startswith("gdlr: running two_neuron (two_neuron) into runs/two_neuron")
    summary = json.loads((run / "summary.json").read_text())
    assert [row["eta"] for row in summary["per_eta"]] == pytest.approx([0.1, 1.2])
    with np.load(run / "results.npz") as results:
        assert results["sweep_final_loss"].dtype == np.float32
    # a bad config stops before anything is written
    bad = subprocess.run(
        [gdlr, "run", "--set", "basin.eta=-1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert bad.returncode == 2
    assert "config key 'basin.eta' has value -1; allowed: a finite number > 0" in bad.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["two_neuron"]
