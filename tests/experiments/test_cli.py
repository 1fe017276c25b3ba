"""The ``gdlr`` command line: help, version, list, errors, output folders, the installed script."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from gdlr_jax import __version__
from gdlr_jax.experiments import two_neuron as two_neuron_experiment
from gdlr_jax.experiments._dry_run import plan_run
from gdlr_jax.experiments.cli import DATA_DIR_ENV, main
from gdlr_jax.experiments.config import ConfigError, load_config
from gdlr_jax.experiments.runner import (
    RunOutput,
    RunReport,
    find_config,
    format_table,
    list_configs,
    output_dir_for,
    run_config,
    run_name,
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
    assert "config key 'sweep.steps' has value 0; allowed: an integer >= 1" in err
    assert err.endswith(" (from --set sweep.steps)\n")
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
    assert sorted(when) == [0, 1, 2, 130, 141]
    assert any(w.startswith("`gdlr list` finds no config") for w in when[1])
    assert any(w.startswith("out of memory while running") for w in when[2])
    assert any(w.startswith("a bad config") for w in when[2])
    assert len(when[130]) == 2  # during the run (with the resume command) and before it


def test_dry_run_prints_the_plan_and_the_resolved_config(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "two_neuron", "--dry-run", "--set", "sweep.steps=123"]) == 0
    out = capsys.readouterr().out
    assert "# output folder: runs/two_neuron (a new folder)" in out
    assert "#   trapping_region         52992        123  23 step sizes x 48^2 starts" in out
    assert "#   total                   93026       3000" in out
    assert "# host memory: about " in out and " at the peak (an estimate), " in out
    assert "# time: unknown (no finished run of this config to go by)" in out
    resolved = yaml.safe_load(out)  # the plan is comments: the output is the resolved config
    config = load_config(find_config("two_neuron"), ["sweep.steps=123"])
    assert resolved == config.resolved()
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
    # --overwrite replaces the previous run in the default folder (checked here, emptied by
    # run_config once the new run's plan has passed: nothing is deleted yet)
    assert output_dir_for("tn", overwrite=True, runs_dir=runs) == runs / "tn"
    assert (runs / "tn" / "config.yaml").is_file()


def test_explicit_out_is_never_overwritten_silently(tmp_path):
    out = tmp_path / "out"
    assert output_dir_for("tn", out) == out
    RunOutput(out).write_text("config.yaml", "experiment: two_neuron\n")
    with pytest.raises(
        ConfigError, match=r"output folder .*out already exists and is not empty; pass --overwrite"
    ):
        output_dir_for("tn", out)
    assert output_dir_for("tn", out, overwrite=True) == out and (out / "config.yaml").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(
        ConfigError, match=r"was not made by gdlr \(no .gdlr-run\); refusing to delete"
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
        ".gdlr-run",
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


@pytest.mark.slow  # the installed script runs the default config end to end
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


# ----- the dry run: every check of the run, nothing computed or written ----------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["mnist_gelu_mse_cpu", "--data-dir", "no_such_folder"],
         "config key 'data.data_dir' has value 'no_such_folder'"),
        (["two_neuron", "--set", "basin.resolution=1000000"],  # about 100 TiB of results
         "config key 'basin.resolution' has value 1000000: the run would need about"),
        (["two_neuron", "--out", "taken"],
         "output folder taken already exists and is not empty; pass --overwrite"),
        (["two_neuron", "--out", "taken", "--overwrite"],
         "output folder taken is not empty and was not made by gdlr"),
        (["two_neuron", "--out", "taken", "--resume"],
         "cannot resume in taken: it is not empty and holds no gdlr run"),
        (["two_neuron", "--out", "a_file/run"],
         "cannot create the output folder a_file/run: Not a directory; choose another --out"),
    ],
    ids=["missing-data", "too-large", "out-taken", "overwrite-foreign", "resume-foreign",
         "out-under-a-file"],
)
def test_dry_run_refuses_what_the_run_refuses(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "thesis.tex").write_text("precious")
    (tmp_path / "a_file").write_text("")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    errors = []
    for dry in (["--dry-run"], ["--no-progress"]):  # the real run refuses before any compute
        assert main(["run", *argv, *dry]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        errors.append(captured.err)
    numbers = re.compile(r"\d+(\.\d+)?")  # the memory available changes between the two
    assert numbers.sub("N", errors[0]) == numbers.sub("N", errors[1])
    assert errors[0].startswith("gdlr: error: ") and message in errors[0]
    assert errors[0].count("\n") == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_dry_run_estimates_the_time_from_a_finished_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(find_config("two_neuron"))
    done = tmp_path / "runs" / "two_neuron"
    done.mkdir(parents=True)
    summary = {"fingerprint": config.fingerprint, "wall_time_s": 9.25, "resumed": False}
    (done / "summary.json").write_text(json.dumps(summary))
    (done / "config.yaml").write_text("experiment: two_neuron\n")
    assert main(["run", "two_neuron", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# time: about 9.2 s (a finished run of this config: runs/two_neuron)" in out
    assert "# output folder: runs/two_neuron-2 (a new folder: runs/two_neuron holds a " in out
    # a run of other keys, or a resumed one (its wall time is partial), does not count
    assert main(["run", "two_neuron", "--dry-run", "--set", "sweep.steps=5"]) == 0
    assert "# time: unknown" in capsys.readouterr().out
    (done / "summary.json").write_text(json.dumps({**summary, "resumed": True}))
    assert main(["run", "two_neuron", "--dry-run"]) == 0
    assert "# time: unknown" in capsys.readouterr().out


# ----- the data folder: --data-dir and GDLR_MNIST_DIR ----------------------------------------
def _dry_data_dir(capsys, argv) -> str:
    assert main(["run", *argv, "--dry-run"]) == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)["data"]["data_dir"]


def test_data_dir_from_the_flag_the_environment_or_the_config(
    capsys, tmp_path, monkeypatch, mnist_dir
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    shrunk = ["--set", "data.max_examples=16", "--set", "model.depths=[1]"]
    flag = ["mnist_gelu_mse_cpu", *shrunk, "--data-dir", str(mnist_dir)]
    assert _dry_data_dir(capsys, flag) == str(mnist_dir)
    monkeypatch.setenv(DATA_DIR_ENV, str(mnist_dir))
    assert _dry_data_dir(capsys, ["mnist_gelu_mse_cpu", *shrunk]) == str(mnist_dir)
    # the flag wins over the environment, and over a --set of the key
    other = tmp_path / "other"
    shutil.copytree(mnist_dir, other)
    override = ["--set", f"data.data_dir={mnist_dir}", "--data-dir", str(other)]
    assert _dry_data_dir(capsys, ["mnist_gelu_mse_cpu", *shrunk, *override]) == str(other)
    # a config file or a --set naming the folder wins over the environment
    assert _dry_data_dir(
        capsys, ["mnist_gelu_mse_cpu", *shrunk, "--set", f"data.data_dir={other}"]
    ) == str(other)
    mine = tmp_path / "mine.yaml"
    text = find_config("mnist_gelu_mse_cpu").read_text().replace('data_dir: ""', "data_dir: other")
    mine.write_text(text)
    assert _dry_data_dir(capsys, [str(mine), *shrunk]) == "other"


def test_no_data_folder_names_the_flag_the_variable_and_the_docs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    for extra in (["--dry-run"], ["--no-progress"]):
        assert main(["run", "mnist_relu_ce_sgd_cpu", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gdlr: error: config key 'data.data_dir' is empty: source 'idx' ")
        for named in ("--data-dir PATH", DATA_DIR_ENV, "docs/data.md"):
            assert named in err
    assert not (tmp_path / "runs").exists()
    assert main(["run", "two_neuron", "--data-dir", str(tmp_path), "--dry-run"]) == 2
    assert "reads no data; drop --data-dir" in capsys.readouterr().err


def test_shipped_configs_name_no_data_folder():
    # a path of this development checkout would not exist in a fresh clone
    for name, path, _ in list_configs():
        config = load_config(path)
        if "data_dir" in config.params.get("data", {}):
            assert config.params["data"]["data_dir"] == "", name
        if config.experiment == "mnist":  # says where the data comes from
            assert "--data-dir" in path.read_text() and DATA_DIR_ENV in path.read_text()


# ----- gdlr list ----------------------------------------------------------------------------
def test_list_survives_unreadable_entries_and_fits_100_columns(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configs = tmp_path / "configs"
    (configs / "folder.yaml").mkdir(parents=True)
    (configs / "latin1.yaml").write_bytes(b"experiment: two_neuron\ndescription: caf\xe9\n")
    (configs / "broken.yaml").write_text("experiment: [\n")
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 100
    for bad, why in (("folder", "(a folder, not a config file)"),
                     ("latin1", "(not UTF-8 text)"), ("broken", "(not valid YAML)")):
        assert [line.split() for line in lines if bad in line] == [[bad, *why.split()]]
    assert any(line.startswith("  two_neuron ") for line in lines)


def test_list_into_a_closed_pipe_exits_quietly():
    # `gdlr list | head -3`: the reader is gone before gdlr writes
    launch = "import sys; from _gdlr_entry import main; sys.exit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", launch, "list"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""


# ----- run names, Python keywords in errors, gdlr show --------------------------------------
@pytest.fixture
def table_run(monkeypatch):
    """The two-neuron experiment with its compute replaced by a small result and table."""

    def run(params, planned, output, progress):
        output.write_arrays("results", {"steps": [params["sweep"]["steps"]]})
        return RunReport(
            summary={}, headers=["eta", "share"], rows=[[0.5, 0.25]], notes=["a note"]
        )

    experiment = dataclasses.replace(two_neuron_experiment.EXPERIMENT, run=run)
    monkeypatch.setattr(two_neuron_experiment, "EXPERIMENT", experiment)


def test_a_saved_config_run_again_keeps_its_run_name(capsys, tmp_path, monkeypatch, table_run):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "two_neuron", "--no-progress", "--set", "sweep.steps=7"]) == 0
    saved = tmp_path / "runs" / "two_neuron" / "config.yaml"
    assert saved.read_text().splitlines()[1] == "# run of config two_neuron"
    assert main(["run", str(saved), "--no-progress"]) == 0
    again = tmp_path / "runs" / "two_neuron-2"
    summary = json.loads((again / "summary.json").read_text())
    assert summary["config"] == "two_neuron"
    assert capsys.readouterr().out.count("gdlr: running two_neuron (two_neuron) into ") == 2
    with np.load(again / "results.npz") as results:
        assert results["steps"].tolist() == [7]
    # a config.yaml saved before the name line: the name of its folder
    legacy = tmp_path / "old" / "tn_old" / "config.yaml"
    legacy.parent.mkdir(parents=True)
    lines = saved.read_text().splitlines(keepends=True)
    legacy.write_text(lines[0] + "".join(lines[2:]))
    assert run_name(load_config(legacy)) == "tn_old"
    # any other file is named by its stem, whatever its comments
    plain = tmp_path / "config.yaml"
    plain.write_text("# run of config elsewhere\nexperiment: two_neuron\n")
    assert run_name(load_config(plain)) == "config"


def test_python_api_errors_name_keywords_and_the_command_line_flags(capsys, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "thesis.tex").write_text("precious")
    config = load_config(find_config("two_neuron"))
    for call in (run_config, plan_run):
        with pytest.raises(ConfigError) as info:
            call(config, out=taken)
        assert str(info.value) == (
            f"output folder {taken} already exists and is not empty; pass overwrite=True to "
            "replace the run in it, or choose another out folder"
        )
        with pytest.raises(ConfigError, match=r"^overwrite=True and resume=True exclude each"):
            call(config, out=taken, overwrite=True, resume=True)
        with pytest.raises(ConfigError) as info:
            call(config, out=taken, overwrite=True)
        assert "refusing to delete it with overwrite=True: choose another out folder" in str(
            info.value
        )
        assert "--" not in str(info.value)
    assert main(["run", "two_neuron", "--out", str(taken)]) == 2
    assert "pass --overwrite to replace the run in it, or choose another --out" in (
        capsys.readouterr().err
    )


def test_show_prints_the_table_and_the_files_of_a_run(capsys, tmp_path, monkeypatch, table_run):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "two_neuron", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert main(["show", "two_neuron"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run two_neuron (experiment two_neuron) in runs/two_neuron: ")
    table = format_table(["eta", "share"], [[0.5, 0.25]])
    assert table in out and table in printed and "a note" in out
    files = out.split("files in runs/two_neuron:\n")[1]
    for name in (".gdlr-run", "config.yaml", "results.npz", "summary.json"):
        assert f"\n{name} " in files
    assert main(["show", "runs/two_neuron"]) == 0  # a path works too
    assert capsys.readouterr().out == out
    # an unfinished run says how to resume it; a folder that is no run, or none, is an error
    (tmp_path / "runs" / "two_neuron" / "summary.json").unlink()
    assert main(["show", "two_neuron"]) == 0
    assert "an unfinished run (no summary.json); continue it with gdlr run " in (
        capsys.readouterr().out
    )
    (tmp_path / "plain").mkdir()
    assert main(["show", "plain"]) == 2
    assert "plain is not a gdlr run folder (no config.yaml)" in capsys.readouterr().err
    assert main(["show", "nothing"]) == 2
    assert "run not found: nothing (runs in runs/: two_neuron)" in capsys.readouterr().err
