"""Bad input, everywhere a user can reach: one test per row of ``docs/bad_inputs.md``.

Command-line rows run ``gdlr run`` in-process (:func:`gdlr_jax.experiments.cli.main`) from an
empty working directory: each must exit 2 with one line ``gdlr: error: ...`` on stderr naming
what is wrong, and leave no output folder. API rows check the ``ValueError`` raised before any
compute. Rows already tested elsewhere are referenced in the table, not repeated here.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import importlib.util
import json
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.errors import JaxRuntimeError

import gdlr_jax
from gdlr_jax import linear
from gdlr_jax.engine import ChunkMemoryError
from gdlr_jax.engine._memory import allocatable_bytes
from gdlr_jax.engine._validation import check_grid_size
from gdlr_jax.experiments import _skeleton, _two_neuron_sweeps
from gdlr_jax.experiments import two_neuron as two_neuron_experiment
from gdlr_jax.experiments.cli import main
from gdlr_jax.experiments.runner import RunOutput, RunReport

IMAGES = "train-images-idx3-ubyte"
# a two-neuron run whose curvature part takes well under a second
QUICK = ["--set", "critical_step_size.restarts=1", "--set", "critical_step_size.steps=2",
         "--set", "weak_stability.points=101"]


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> pathlib.Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _cli_error(capsys, cwd: pathlib.Path, argv: list[str], out: pathlib.Path | None = None) -> str:
    """Runs ``gdlr run ARGV --out OUT``; checks exit 2, one stderr line, no output folder."""
    out = cwd / "out" if out is None else out
    code = main(["run", *argv, "--out", str(out), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("gdlr: error: "), lines
    assert not out.exists() and not (cwd / "runs").exists()
    return lines[0]


# ----- the command line: configs ------------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        (b"experiment: two_neuron\nsweep: [1, 2\n", "is not valid YAML: while parsing"),
        (b"- a\n- b\n", "a config must be a YAML mapping of keys (experiment: ..., ...), got list"),
        (b"experiment: two_neuron\n\xff\xfe: 1\n", "cannot be read as UTF-8 text"),
        (b"experiment: two_neuron\ncolour: red\n", "unknown config key 'colour'; allowed keys: "),
        (b"experiment: two_neuron\nsweep: {steps: many}\n",
         "config key 'sweep.steps' has value 'many'; allowed: an integer >= 1"),
    ],
    ids=["malformed-yaml", "not-a-mapping", "not-utf8", "unknown-key", "wrong-type"],
)
def test_bad_config_file(capsys, cwd, text, message):
    path = cwd / "bad.yaml"
    path.write_bytes(text)
    assert message in _cli_error(capsys, cwd, [str(path)])


def _alias_bomb() -> bytes:
    """306 bytes of nested aliases that expand to 9^9 = 387,420,489 strings."""
    lines = ["a: &a [x,x,x,x,x,x,x,x,x]"]
    for i in range(8):
        name, previous = chr(98 + i), chr(97 + i)
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize(
    "text, message",
    [
        (_alias_bomb(), "bad.yaml uses the YAML alias *a at line 2, column 8; configs allow no "
                        "anchors and aliases (write the values out)"),
        (b"experiment: two_neuron\nsweep: &s {steps: *s}\n", "uses the YAML alias *s at line 2"),
        (b"experiment: two_neuron\nx: " + b"[" * 40 + b"]" * 40 + b"\n",
         "bad.yaml nests mappings and lists deeper than 32 levels (at line 2, column 35)"),
        pytest.param(b"x: [" + b",".join([b"0"] * 100_001) + b"]\n",
                     "bad.yaml holds more than 100000 values (at line 1, column 199999)",
                     marks=pytest.mark.slow),
        (b"#" * (2 << 20), "bad.yaml is larger than the 1048576 bytes a config may hold"),
        (b"experiment: two_neuron\ndescription: 2024-01-01\n",
         "bad.yaml: config key 'description' holds a YAML date or timestamp, which a config "
         "cannot hold: configs hold strings, numbers, booleans, null, lists and mappings (quote "
         "a value to make it a string)"),
        (b"experiment: two_neuron\ndescription: !!set {a, b}\n",
         "config key 'description' holds a YAML !!set, which a config cannot hold"),
        (b"experiment: two_neuron\ndescription: !!binary aGVsbG8=\n",
         "config key 'description' holds YAML !!binary, which a config cannot hold"),
        (b"experiment: two_neuron\nsweep: {steps: 10}\nsweep: {steps: 20}\n",
         "bad.yaml is not valid YAML: duplicate key 'sweep' (first at line 2); a key may appear "
         "once in a mapping"),
        (b"experiment: two_neuron\nsweep: {steps: 10, steps: 20}\n", "duplicate key 'steps'"),
        (b"experiment: two_neuron\n1: x\n",
         "bad.yaml: the key 1 under '<top>' is not a string (int); config keys are strings"),
    ],
    ids=["alias-bomb", "self-alias", "deep-nesting", "too-many-values", "too-large", "date",
         "set", "binary", "duplicate-key", "duplicate-nested-key", "int-key"],
)
def test_config_file_limits_and_values_json_cannot_hold(capsys, cwd, text, message):
    path = cwd / "bad.yaml"
    path.write_bytes(text)
    assert message in _cli_error(capsys, cwd, [str(path)])


def test_override_values_are_read_within_the_same_limits(capsys, cwd):
    error = _cli_error(capsys, cwd, ["two_neuron", "--set", "sweep.steps=*a"])
    assert "--set 'sweep.steps=*a': the value uses the YAML alias *a at line 1" in error
    error = _cli_error(capsys, cwd, ["two_neuron", "--set", "sweep.region=" + "[" * 33 + "]" * 33])
    assert "the value nests mappings and lists deeper than 32 levels" in error


@pytest.mark.parametrize(
    "config, override, message",
    [
        ("two_neuron", "sweep.stepz=3", "--set sweep.stepz: unknown config key 'sweep.stepz'"),
        ("two_neuron", "sweep.steps", "--set 'sweep.steps': expected KEY=VALUE"),
        ("two_neuron", "figures.dpi=true",
         "config key 'figures.dpi' has value True; allowed: an integer >= 20"),
        ("two_neuron", "basin.eta=0",
         "config key 'basin.eta' has value 0; allowed: a finite number > 0"),
        ("mnist_gelu_mse_cpu", "training.etas=[0.1, -1]",
         "config key 'training.etas.1' has value -1; allowed: a finite number > 0"),
        ("two_neuron", "basin.eta=.nan", "config key 'basin.eta' has value nan; allowed: a finite"),
        ("two_neuron", "sweep.eta.stop=.inf", "config key 'sweep.eta.stop' has value inf; allowed"),
        ("two_neuron", "sweep.region=[0, 1, 0, .nan]", "allowed: a list of 4 finite numbers"),
    ],
    ids=["unknown-key", "malformed-set", "wrong-type", "eta-zero", "eta-negative", "eta-nan",
         "eta-inf", "nan-in-region"],
)
def test_bad_override(capsys, cwd, config, override, message):
    assert message in _cli_error(capsys, cwd, [config, "--set", override])


@pytest.mark.parametrize(
    "config, override, message",
    [
        ("two_neuron", "sweep.steps=3000000000",
         "config key 'sweep.steps' has value 3000000000; allowed: an integer >= 1 and <= "
         "1073741824"),
        ("two_neuron", "engine.check_every=2147483648",
         "config key 'engine.check_every' has value 2147483648; allowed: an integer >= 1 and <= "
         "1073741824"),
        ("mnist_gelu_mse_cpu", "training.seed=4294967296",
         "config key 'training.seed' has value 4294967296; allowed: an integer >= 0 and <= "
         "1073741824"),
        ("two_neuron", "weak_stability.curve_points=100000000000",
         "config key 'weak_stability.curve_points' has value 100000000000; allowed: an integer "
         ">= 2 and <= 100000"),
        ("two_neuron", "sweep.region=[-1e308, 1e308, 0, 1]",
         "config key 'sweep.region' has value [-1e+308, 1e+308, 0.0, 1.0]: its numbers differ "
         "by more than float64 (the run's dtype) holds; allowed: numbers that differ by at most "
         "1.8e+308"),
        ("two_neuron", "dtype=float32 --set basin.region=[-1e39, 1, 0, 1]",
         "config key 'basin.region' has value [-1e+39, 1.0, 0.0, 1.0] holding -1e+39, which is "
         "-inf in float32 (the run's dtype); allowed: numbers float32 holds, 1.18e-38 to "
         "3.4e+38 in magnitude (or 0)"),
        ("mnist_gelu_mse_cpu", "model.init_scale=1e30",
         "config key 'model.init_scale' has value 1e+30; allowed: a finite number > 0 and <= "
         "1e+06"),
        ("mnist_gelu_mse_cpu", "training.etas=[1e-50, 0.1]",
         "config key 'training.etas.0' has value 1e-50, which is 0.0 in float32 (the run's "
         "dtype); allowed: numbers float32 holds, 1.18e-38 to 3.4e+38 in magnitude (or 0)"),
        ("mnist_gelu_mse_cpu", "training.etas=[0.1, 1e300]",
         "config key 'training.etas.1' has value 1e+300, which is inf in float32"),
        ("mnist_gelu_mse_cpu", "engine.grad_tol=1e-50",
         "config key 'engine.grad_tol' has value 1e-50, which is 0.0 in float32"),
        ("two_neuron", "dtype=float32 --set engine.divergence_bound=1e300",
         "config key 'engine.divergence_bound' has value 1e+300, which is inf in float32"),
    ],
    ids=["steps", "check-every", "seed", "curve-points", "region-extent", "region-float32",
         "init-scale", "eta-underflow", "eta-overflow", "tolerance-underflow",
         "bound-overflow"],
)
def test_values_beyond_what_the_run_represents(capsys, cwd, config, override, message):
    overrides = [a for part in override.split(" --set ") for a in ("--set", part)]
    assert message in _cli_error(capsys, cwd, [config, *overrides])


# ----- the command line: the output folder --------------------------------------------------
def test_output_folder_cannot_be_created(capsys, cwd):
    (cwd / "a_file").write_text("")
    out = cwd / "a_file" / "run"
    error = _cli_error(capsys, cwd, ["two_neuron"], out)
    assert f"cannot create the output folder {out}: Not a directory; choose another --out" in error


def test_output_folder_not_writable(capsys, cwd, monkeypatch):
    out = cwd / "read_only"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the check see what a user would
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and p != out)
    code = main(["run", "two_neuron", "--out", str(out), "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err == (
        f"gdlr: error: output folder {out} is not writable; choose another --out\n"
    )
    assert not any(out.iterdir())


# ----- the command line: --overwrite -------------------------------------------------------
def _tree(path: pathlib.Path) -> dict[str, bytes | None]:
    """Every entry under ``path`` (links not followed), with the bytes of files."""
    return {
        str(p.relative_to(path)): p.read_bytes() if p.is_file() and not p.is_symlink() else None
        for p in sorted(path.rglob("*"))
    }


def _gdlr_run_folder(path: pathlib.Path) -> pathlib.Path:
    """A finished run folder as gdlr writes it (marker, config, results, summary, a chunk)."""
    output = RunOutput(path)
    output.write_text("config.yaml", f"# gdlr resolved config; fingerprint {'0' * 64}\nx: 1\n")
    output.write_arrays("results", {"old": [1.0]})
    output.write_json("summary.json", {"old": True})
    chunks = output.checkpoint_dir("sweep")
    chunks.mkdir(parents=True)
    (chunks / "sweep.json").write_text("{}")
    (chunks / "chunk-00000.npz").write_bytes(b"x")
    return path


def _refused(capsys, argv: list[str], untouched: pathlib.Path) -> str:
    """Runs ``gdlr run ARGV --overwrite``: exit 2, one line, nothing under ``untouched``
    changed."""
    before = _tree(untouched)
    code = main(["run", *argv, "--overwrite", "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("gdlr: error: "), lines
    assert _tree(untouched) == before
    return lines[0]


@pytest.fixture
def fake_run(monkeypatch):
    """The two-neuron experiment with its compute replaced by writing one small result."""

    def run(params, planned, output, progress):
        output.write_arrays("results", {"new": [2.0]})
        return RunReport(summary={"new": True}, headers=["a"], rows=[[1]])

    experiment = dataclasses.replace(two_neuron_experiment.EXPERIMENT, run=run)
    monkeypatch.setattr(two_neuron_experiment, "EXPERIMENT", experiment)


def test_overwrite_refuses_a_folder_gdlr_did_not_make(capsys, cwd):
    thesis = cwd / "thesis"
    (thesis / "src").mkdir(parents=True)
    (thesis / "src" / "thesis.tex").write_text("precious")
    (thesis / "config.yaml").write_text("experiment: two_neuron\n")  # not written by gdlr
    error = _refused(capsys, ["two_neuron", "--out", str(thesis)], thesis)
    assert error == (
        f"gdlr: error: output folder {thesis} is not empty and was not made by gdlr (no "
        ".gdlr-run); refusing to delete it with --overwrite: choose another --out"
    )


def test_overwrite_refuses_a_run_folder_holding_other_files(capsys, cwd):
    run = _gdlr_run_folder(cwd / "run")
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "sweep" / "mine.npz").write_text("mine")
    error = _refused(capsys, ["two_neuron", "--out", str(run)], run)
    assert error == (
        f"gdlr: error: output folder {run} holds files gdlr did not write ('checkpoints/sweep/"
        "mine.npz', 'notes.txt'); refusing to delete it with --overwrite: move them out, or "
        "choose another --out"
    )


def test_overwrite_refuses_an_edited_marker(capsys, cwd):
    run = _gdlr_run_folder(cwd / "run")
    marker = json.loads((run / ".gdlr-run").read_text())
    marker["files"].append("thesis.tex")  # without a new fingerprint
    (run / ".gdlr-run").write_text(json.dumps(marker))
    (run / "thesis.tex").write_text("precious")
    error = _refused(capsys, ["two_neuron", "--out", str(run)], run)
    assert error.startswith(f"gdlr: error: output folder {run}: its run marker .gdlr-run cannot "
                            "be trusted (")
    assert error.endswith(f"refusing to delete it with --overwrite: remove it by hand (rm -r "
                          f"{run}) if it is a run you no longer need, or choose another --out")


def test_overwrite_refuses_a_run_of_an_older_gdlr(capsys, cwd):
    old = cwd / "old"
    old.mkdir()
    (old / "config.yaml").write_text(f"# gdlr resolved config; fingerprint {'a' * 64}\nx: 1\n")
    (old / "results.npz").write_bytes(b"results")
    error = _refused(capsys, ["two_neuron", "--out", str(old)], old)
    assert error == (
        f"gdlr: error: output folder {old} holds a run of an older gdlr, without the run marker "
        f".gdlr-run; --overwrite deletes only folders that carry it: remove it by hand (rm -r "
        f"{old}) if you no longer need it, or choose another --out"
    )


@pytest.mark.parametrize(
    "out, message",
    [
        ("", "--out '': an empty path; name the output folder"),
        (".", "--out . is the current directory or a folder above it; --overwrite never deletes "
              "it: choose another --out"),
        ("..", "--out .. is the current directory or a folder above it"),
        ("/", "--out / is the current directory or a folder above it"),
    ],
    ids=["empty", "cwd", "parent", "root"],
)
def test_overwrite_never_deletes_the_current_directory_or_above(capsys, cwd, out, message):
    _gdlr_run_folder(cwd)  # even a run folder of gdlr's own
    assert message in _refused(capsys, ["two_neuron", "--out", out], cwd.parent)


def test_overwrite_does_not_delete_through_a_link(capsys, cwd):
    run = _gdlr_run_folder(cwd / "run")
    (cwd / "link").symlink_to(run)
    error = _refused(capsys, ["two_neuron", "--out", str(cwd / "link")], cwd)
    assert error == (
        f"gdlr: error: --out {cwd / 'link'} is a symbolic link; --overwrite does not delete "
        "through links: name the folder itself, or choose another --out"
    )


def test_overwrite_deletes_nothing_when_the_new_plan_fails(capsys, cwd, no_compute):
    run = _gdlr_run_folder(cwd / "run")
    error = _refused(capsys, ["two_neuron", "--set", "basin.resolution=200000", "--out",
                              str(run)], run)
    assert "config key 'basin.resolution' has value 200000" in error


def test_overwrite_replaces_only_what_gdlr_wrote(capsys, cwd, fake_run):
    run = _gdlr_run_folder(cwd / "run")
    assert main(["run", "two_neuron", "--out", str(run), "--overwrite", "--no-progress"]) == 0
    assert sorted(_tree(run)) == [".gdlr-run", "config.yaml", "results.npz", "summary.json"]
    with np.load(run / "results.npz") as results:
        assert list(results) == ["new"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["new"] and summary["files"] == [
        ".gdlr-run", "config.yaml", "results.npz", "summary.json"
    ]
    # the new folder is one gdlr made: it can be replaced again
    assert main(["run", "two_neuron", "--out", str(run), "--overwrite", "--no-progress"]) == 0


# ----- the command line: damaged run folders, a full disk --------------------------------
@pytest.fixture
def checkpointed_run(monkeypatch):
    """The two-neuron experiment with its compute replaced by one tiny checkpointed sweep."""

    def run(params, planned, output, progress):
        result = gdlr_jax.sweep(_two_neuron, np.ones((2, 2)), [0.1], steps=5,
                                checkpoint_dir=output.checkpoint_dir("tiny"))
        output.write_arrays("results", {"loss": result.final_loss})
        return RunReport(summary={"new": True}, headers=["a"], rows=[[1]])

    experiment = dataclasses.replace(two_neuron_experiment.EXPERIMENT, run=run)
    monkeypatch.setattr(two_neuron_experiment, "EXPERIMENT", experiment)


def _resume_error(capsys, run: pathlib.Path) -> str:
    before = _tree(run)
    code = main(["run", "two_neuron", "--resume", "--out", str(run), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gdlr: error: "), lines
    assert _tree(run) == before
    return lines[0]


@pytest.mark.parametrize(
    "name, damage, message",
    [
        ("summary.json", lambda raw: raw[: len(raw) // 2],
         "its summary.json is not JSON (Unterminated string"),
        ("summary.json", lambda raw: b"\xff" + raw,
         "its summary.json is not UTF-8 text (invalid start byte at byte 0), so the run is damaged"),
        ("summary.json", lambda raw: b"[1, 2]", "its summary.json is not a JSON object, so the "
                                                "run is damaged; remove "),
        ("config.yaml", lambda raw: raw[:20], "it holds a run of a different config"),
        ("config.yaml", lambda raw: raw[:100] + b"\xff\xfe" + raw[100:],
         "its config.yaml is not UTF-8 text (invalid start byte at byte 100)"),
    ],
    ids=["summary-truncated", "summary-not-utf8", "summary-not-a-mapping", "config-truncated",
         "config-not-utf8"],
)
def test_resume_refuses_a_damaged_run_folder(capsys, cwd, fake_run, name, damage, message):
    run = cwd / "run"
    assert main(["run", "two_neuron", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    (run / name).write_bytes(damage((run / name).read_bytes()))
    assert message in _resume_error(capsys, run)


def test_resume_refuses_checkpoints_that_are_a_file(capsys, cwd, checkpointed_run):
    run = cwd / "run"
    assert main(["run", "two_neuron", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    (run / "summary.json").unlink()  # unfinished
    (run / "checkpoints").write_text("not a folder")
    code = main(["run", "two_neuron", "--resume", "--out", str(run), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"gdlr: error: checkpoint folder {run / 'checkpoints' / 'tiny'} "
                               "cannot be made: ")
    assert (run / "checkpoints").read_text() == "not a folder"


def test_a_full_disk_gives_one_line_and_keeps_the_chunks(capsys, cwd, checkpointed_run,
                                                        monkeypatch):
    from gdlr_jax.experiments import _run_folder as runner  # where files are written

    original = runner.write_atomically

    def full(path, write):
        if pathlib.Path(path).name == "results.npz":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, write)

    monkeypatch.setattr(runner, "write_atomically", full)
    run = cwd / "run"
    code = main(["run", "two_neuron", "--out", str(run), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == (
        f"gdlr: error: cannot write into the output folder {run}: No space left on device "
        f"({run / 'results.npz'}); the finished chunks are kept: make room, then resume with "
        "--resume"
    )
    assert (run / "checkpoints" / "tiny" / "chunk-00000.npz").is_file()
    monkeypatch.setattr(runner, "write_atomically", original)
    assert main(["run", "two_neuron", "--resume", "--out", str(run), "--no-progress"]) == 0
    assert (run / "results.npz").is_file() and not (run / "checkpoints").exists()


# ----- the command line: MNIST data ---------------------------------------------------------
def test_missing_data_folder(capsys, cwd):
    error = _cli_error(capsys, cwd, ["mnist_gelu_mse_cpu", "--set", f"data.data_dir={cwd / 'no'}"])
    assert f"config key 'data.data_dir' has value '{cwd / 'no'}'" in error
    assert "is not a folder; give the folder of MNIST IDX files with gdlr run CONFIG " in error
    assert "--data-dir PATH, the environment variable GDLR_MNIST_DIR" in error
    assert "(docs/data.md says where to get them)" in error


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow_datasets") is not None, reason="TFDS is installed"
)
def test_missing_tfds_package(capsys, cwd):
    argv = ["mnist_gelu_mse_cpu", "--set", "data.source=tfds", "--set", "data.data_dir=''"]
    error = _cli_error(capsys, cwd, argv)
    assert "config key 'data.source' has value 'tfds': source='tfds' needs tensorflow-data" in error


def _truncated_gzip(raw_gz: bytes) -> tuple[str, bytes]:
    return IMAGES + ".gz", raw_gz[:100_000]


def _labels_magic(raw_gz: bytes) -> tuple[str, bytes]:
    raw = bytearray(gzip.decompress(raw_gz))
    raw[3] = 0x01  # 2051 (images) -> 2049 (labels)
    return IMAGES, bytes(raw)


def _wrong_side(raw_gz: bytes) -> tuple[str, bytes]:
    raw = bytearray(gzip.decompress(raw_gz))
    raw[11] = 27  # rows: 28 -> 27
    return IMAGES, bytes(raw)


def _truncated_data(raw_gz: bytes) -> tuple[str, bytes]:
    return IMAGES, gzip.decompress(raw_gz)[:-1000]


def _huge_count(raw_gz: bytes) -> tuple[str, bytes]:
    header = (2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (2_000_000, 28, 28))
    return IMAGES + ".gz", gzip.compress(header + bytes(1_500_000))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_truncated_gzip, f"{IMAGES}.gz' is not a valid gzip file: Compressed file ended"),
        (_labels_magic, f"{IMAGES}' has IDX magic number 2049 (0x00000801); expected 2051"),
        (_wrong_side, f"{IMAGES}': images of (27, 28) pixels; MNIST images are 28x28."),
        (_truncated_data, "bytes of data, the file holds 7839000 (truncated)."),
        (_huge_count, f"{IMAGES}.gz': the header announces 2000000 items, more than the 1000000 "
                      "an IDX file may hold here (MNIST has 70000); the file is corrupt or not "
                      "MNIST."),
    ],
    ids=["truncated-gzip", "wrong-magic", "wrong-dims", "truncated-data", "huge-count"],
)
def test_corrupt_idx_file(capsys, cwd, mnist_dir, corrupt, message):
    folder = cwd / "mnist"
    folder.mkdir()
    name, data = corrupt((mnist_dir / f"{IMAGES}.gz").read_bytes())
    (folder / name).write_bytes(data)
    labels = "train-labels-idx1-ubyte.gz"
    (folder / labels).write_bytes((mnist_dir / labels).read_bytes())
    error = _cli_error(capsys, cwd, ["mnist_gelu_mse_cpu", "--set", f"data.data_dir={folder}"])
    assert error.startswith(f"gdlr: error: config key 'data.data_dir' has value '{folder}'")
    assert message in error


# ----- the command line: memory -------------------------------------------------------------
def test_chunk_too_large_for_memory(capsys, cwd, mnist_dir):
    # one trajectory records 2 float32 values per step: about limit / 8 bytes each, so
    # 9 step sizes x 2 initialisations per chunk need about 2.25 x what the host can allocate
    steps = allocatable_bytes(jax.devices("cpu")[0]) // 64
    error = _cli_error(capsys, cwd, [
        "mnist_gelu_mse_cpu", "--set", f"data.data_dir={mnist_dir}", "--set", "model.depths=[1]",
        "--set", f"training.steps={steps}", "--set", "training.record_every=1",
        "--set", "training.n_init=2", "--set", "engine.etas_per_chunk=9",
    ])
    assert error.startswith(
        "gdlr: error: config key 'engine.etas_per_chunk' has value 9: depth 1 does not fit in "
        "memory: 9 x 2 trajectories per chunk (engine.etas_per_chunk x training.n_init) of about "
    )
    assert error.endswith(tuple(f"use engine.etas_per_chunk <= {k}." for k in (3, 4)))


def test_results_too_large_for_host_memory(capsys, cwd, mnist_dir):
    # depth 1 has 25,186 float32 parameters: about 101 kB of results per trajectory; 400 step
    # sizes of n_init MLPs need about 1.5 x the host, while a chunk of n_init fits
    limit = allocatable_bytes(jax.devices("cpu")[0])
    n_init = int(1.5 * limit / (400 * 101_000))
    etas = "[" + ",".join(f"{eta:.4f}" for eta in np.linspace(0.01, 4.0, 400)) + "]"
    error = _cli_error(capsys, cwd, [
        "mnist_gelu_mse_cpu", "--set", f"data.data_dir={mnist_dir}", "--set", "model.depths=[1]",
        "--set", f"training.etas={etas}", "--set", f"training.n_init={n_init}",
        "--set", "engine.etas_per_chunk=1",
    ])
    assert error.startswith(
        f"gdlr: error: config key 'training.n_init' has value {n_init}: the run would need about "
    )
    assert re.search(r"GiB available; lower training.n_init to about \d+\.$", error), error


@pytest.fixture
def no_compute(monkeypatch):
    """Makes the two-neuron study fail on any compute: its checks must come first."""

    def computed(*args, **kwargs):
        raise AssertionError("computed before the config was found impossible")

    monkeypatch.setattr(two_neuron_experiment, "minima_profile", computed)
    monkeypatch.setattr(_two_neuron_sweeps, "initial_grid", computed)  # where the sweeps use it
    monkeypatch.setattr(_skeleton, "sweep", computed)  # the sweeps of every experiment


def test_one_trajectory_too_large_for_memory(capsys, cwd, no_compute):
    # a portrait records 32 bytes a step: 2^30 steps (the most a key allows) need 32 GiB
    steps = 2**30
    if 32 * steps <= allocatable_bytes(jax.devices("cpu")[0]):
        pytest.skip("a portrait of 2^30 steps fits this machine's memory")
    error = _cli_error(capsys, cwd, ["two_neuron", *QUICK, "--set", f"portraits.0.steps={steps}"])
    assert error.startswith(
        f"gdlr: error: config key 'portraits.0.steps' has value {steps}: a chunk of the "
        "portrait eta=0.4 sweep does not fit in memory: about "
    )
    assert error.endswith("; take fewer steps (each step of a portrait is recorded).")


def test_grid_too_large_for_host_memory(capsys, cwd, no_compute):
    # 4 * 10^10 starts of the basin map: thousands of GiB, planned from shapes in a second
    error = _cli_error(capsys, cwd, ["two_neuron", "--set", "basin.resolution=200000"])
    assert error.startswith(
        "gdlr: error: config key 'basin.resolution' has value 200000: the run would need about "
    )
    assert re.search(r"GiB available; lower basin.resolution to about \d+\.$", error), error


def test_recordings_too_large_for_host_memory(capsys, cwd, no_compute):
    # each of the 25 starts records 32 bytes a step, about 1/8 of the host: a trajectory fits
    # a chunk, the 25 do not fit the host
    steps = allocatable_bytes(jax.devices("cpu")[0]) // (8 * 32)
    error = _cli_error(capsys, cwd, ["two_neuron", "--set", f"portraits.0.steps={steps}"])
    assert error.startswith(
        f"gdlr: error: config key 'portraits.0.steps' has value {steps}: the run would need "
    )
    assert re.search(r"lower portraits.0.steps to about \d+ or portraits.0.starts to about "
                     r"\d+\.$", error), error


@pytest.mark.parametrize(
    "error, shown",
    [
        (JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 17592186044416 bytes.\n"
                         "more XLA detail"),
         "RESOURCE_EXHAUSTED: Out of memory allocating 17592186044416 bytes."),
        (MemoryError("Unable to allocate 7.28 TiB for an array"),
         "Unable to allocate 7.28 TiB for an array"),
    ],
    ids=["device", "host"],
)
def test_out_of_memory_while_running(capsys, cwd, monkeypatch, error, shown):
    def run(params, planned, output, progress):
        raise error

    experiment = dataclasses.replace(two_neuron_experiment.EXPERIMENT, run=run)
    monkeypatch.setattr(two_neuron_experiment, "EXPERIMENT", experiment)
    out = cwd / "out"
    assert main(["run", "two_neuron", "--out", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"gdlr: error: out of memory while running ({shown}); run fewer trajectories at once: "
        "lower engine.etas_per_chunk (mnist) or engine.memory_budget_mb (two_neuron) with --set, "
        "or the problem size (resolution, n_init, width, max_examples)\n"
    )
    assert not (out / "summary.json").exists() and not (out / "results.npz").exists()


def test_other_runtime_errors_are_not_reported_as_memory(cwd, monkeypatch):
    def run(params, planned, output, progress):
        raise JaxRuntimeError("INTERNAL: something else")

    experiment = dataclasses.replace(two_neuron_experiment.EXPERIMENT, run=run)
    monkeypatch.setattr(two_neuron_experiment, "EXPERIMENT", experiment)
    with pytest.raises(JaxRuntimeError, match="INTERNAL"):
        main(["run", "two_neuron", "--out", str(cwd / "out"), "--no-progress"])


# ----- the Python API -----------------------------------------------------------------------
def _two_neuron(theta):
    return 0.5 * (1.0 - theta[0] * theta[1]) ** 2


class _Counting:
    """A loss that counts its calls (tracing included): 0 means nothing ran."""

    def __init__(self, loss):
        self.loss, self.calls = loss, 0

    def __call__(self, *args):
        self.calls += 1
        return self.loss(*args)


def _regression():
    x = np.random.default_rng(0).normal(size=(40, 3))
    y = x @ np.array([1.0, -2.0, 0.5])

    def loss(w, batch):
        inputs, targets = batch
        return jnp.mean((inputs @ w - targets) ** 2)

    return loss, np.zeros((2, 3)), x, y


def test_nan_or_inf_in_initial_parameters():
    loss = _Counting(_two_neuron)
    inits = np.array([[0.5, np.nan], [1.0, 1.0]])
    with pytest.raises(ValueError, match=r"^params0: 1 of 4 entries are not finite \(NaN or inf\), "
                       r"the first at index \(0, 1\): nan\.$"):
        gdlr_jax.sweep(loss, inits, [0.1], steps=10)
    with pytest.raises(ValueError, match=r"^params0\['w'\]: 1 of 4 .* index \(1, 0\): inf\.$"):
        gdlr_jax.plan_sweep(lambda p: loss(p["w"]), {"w": np.array([[1.0, 1.0], [np.inf, 1]])},
                            [0.1], steps=10)
    # finite in float64, but not in the float32 the sweep runs in
    with pytest.raises(ValueError, match=r"^params0: .* index \(1, 1\): inf\.$"):
        gdlr_jax.sweep(loss, np.array([[1.0, 1.0], [1.0, 1e300]]), [0.1], steps=10,
                       dtype=jnp.float32)
    assert loss.calls == 0


def test_nan_in_data():
    loss, w0, x, y = _regression()
    counting = _Counting(loss)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"^batch_source data\[0\]: 1 of 120 entries are not "
                       r"finite \(NaN or inf\), the first at index \(3, 1\): nan\.$"):
        gdlr_jax.sweep(counting, w0, [0.1], steps=10, batch_source=((x, y), 8),
                       key=jax.random.key(0))
    assert counting.calls == 0


def test_shape_mismatch_between_data_and_model():
    loss, w0, x, y = _regression()
    with pytest.raises(ValueError, match=r"^loss_fn could not be evaluated on one initialisation "
                       r"\(params0 without its leading axis and one batch\): dot_general"):
        gdlr_jax.sweep(loss, w0, [0.1], steps=10, batch_source=((x[:, :2], y), 8),
                       key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"^loss_fn could not be evaluated on one initialisation "
                       r"\(params0 without its leading axis\): dot_general"):
        gdlr_jax.sweep(lambda w: loss(w, (x, y)), np.zeros((2, 5)), [0.1], steps=10)


def test_one_trajectory_too_large_for_memory_api():
    # 2^30 recorded steps of 64 float32 parameters: about 264 GiB for one trajectory
    with pytest.raises(ChunkMemoryError, match=r"^one trajectory needs about 264 GiB \(an "
                       r"estimate: parameters, final window, recordings\), more than the "):
        gdlr_jax.plan_sweep(lambda p: jnp.sum(p**2), np.ones((2, 64)), [0.1], steps=2**30,
                            record_every=1, record_params=True, dtype=jnp.float32)


def test_chunk_size_too_large_for_memory():
    cpu = jax.devices("cpu")[:1]
    steps = allocatable_bytes(cpu[0]) // 32  # about a quarter of the host per trajectory
    with pytest.raises(ValueError) as info:
        gdlr_jax.plan_sweep(_two_neuron, np.ones((8, 2)), [0.1], steps=steps, record_every=1,
                            dtype=jnp.float32, chunk_size=8, devices=cpu)
    message = str(info.value)
    assert isinstance(info.value, ChunkMemoryError) and info.value.fit in (3, 4)
    assert message.startswith("chunk_size = 8: 8 trajectories per device need about ")
    assert message.endswith(
        f"pass chunk_size <= {info.value.fit}, or chunk_size=None to size chunks from "
        "memory_budget_bytes."
    )
    budget = 10 * allocatable_bytes(cpu[0])  # more than the host has: chunks of all 8
    with pytest.raises(ChunkMemoryError) as info:
        gdlr_jax.plan_sweep(_two_neuron, np.ones((8, 2)), [0.1], steps=steps, record_every=1,
                            dtype=jnp.float32, memory_budget_bytes=budget, devices=cpu)
    assert str(info.value).startswith(f"memory_budget_bytes = {budget}: 8 trajectories per ")
    assert str(info.value).endswith(
        f"pass memory_budget_bytes <= {info.value.limit} or chunk_size <= {info.value.fit}."
    )


def test_step_sizes_are_checked_after_the_cast_to_the_dtype():
    loss = _Counting(_two_neuron)
    with pytest.raises(ValueError, match=r"^etas must be positive and finite, got etas\[0\] = "
                       r"1e-50, which is 0.0 in float32 \(the sweep's dtype; its normal numbers "
                       r"span 1.18e-38 to 3.4e\+38\) \(2 bad value\(s\)\)\.$"):
        gdlr_jax.sweep(loss, np.ones((2, 2)), [1e-50, 1e300], steps=10, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"etas\[0\] = 1e-40, which is 9.9999\d+e-41 in float32"):
        gdlr_jax.sweep(loss, np.ones((2, 2)), [1e-40], steps=10, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"^criteria.grad_tol = 1e-50 is 0.0 in float32 \(the "
                       r"sweep's dtype\); give a value that float32 represents"):
        gdlr_jax.sweep(loss, np.ones((2, 2)), [0.1], steps=10,
                       criteria=gdlr_jax.ConvergenceCriteria(grad_tol=1e-50))
    with pytest.raises(ValueError, match=r"^min_loss_value = 1e\+300 is inf in float32"):
        gdlr_jax.sweep(loss, np.ones((2, 2)), [0.1], steps=10, min_loss_value=1e300)
    assert loss.calls == 0


@pytest.mark.parametrize("name", ["steps", "check_every", "record_every", "sharpness_every"])
def test_step_counters_fit_the_kernels_int32(name):
    loss = _Counting(_two_neuron)
    kwargs = {"steps": 10, name: 2**31}
    with pytest.raises(ValueError, match=rf"^{name} must be at most 2\^30 = 1073741824 \(the "
                       r"engine counts steps in int32\), got 2147483648\.$"):
        gdlr_jax.sweep(loss, np.ones((2, 2)), [0.1], **kwargs)
    assert loss.calls == 0


def test_a_grid_beyond_the_kernels_int32_index_is_refused():
    # reached only where the host holds the results of 2^30 trajectories (>= 36 GiB): the
    # memory checks come first and name what to shrink
    check_grid_size(2**15, 2**15)
    with pytest.raises(ValueError, match=r"^the grid has 32768 x 32769 = 1073774592 trajectories, "
                       r"more than the 2\^30 = 1073741824 the engine indexes \(int32\): sweep "
                       r"fewer step sizes or initialisations per call\.$"):
        check_grid_size(2**15, 2**15 + 1)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_is_refused_in_one_line(dtype):
    with pytest.raises(ValueError, match=r"^dtype must be a floating dtype, got b?float16: half "
                       r"precision is not supported \(its 3-4 digits are below the convergence "
                       r"tolerances\); use float32 or float64\.$"):
        gdlr_jax.sweep(_two_neuron, np.ones((2, 2)), [0.1], steps=10, dtype=dtype)


def test_weakly_stable_refuses_a_step_size_that_is_not_positive():
    point = jnp.ones(2)
    for eta in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match=r"^eta must be a positive step size, got "):
            gdlr_jax.weakly_stable(_two_neuron, point, eta)
    assert bool(gdlr_jax.weakly_stable(_two_neuron, point, 0.5))


def test_zero_size_parameters_are_refused_in_one_line():
    def loss(p):
        return _two_neuron(p["a"]) + jnp.sum(p["z"])

    with pytest.raises(ValueError, match=r"^params0: a leaf of shape \(2, 0\) holds no parameters "
                       r"\(a zero-size axis\); every leaf needs at least one entry"):
        gdlr_jax.sweep(loss, {"a": np.ones((2, 2)), "z": np.zeros((2, 0))}, [0.1], steps=5)
    message = r"^params: the parameters have dimension d = 0 \(leaf shapes \[\(0,\)\]\)"
    for routine in (gdlr_jax.hessian, lambda f, p: gdlr_jax.top_eigenvalues(f, p, k=1),
                    lambda f, p: gdlr_jax.weakly_stable(f, p, 0.5)):
        with pytest.raises(ValueError, match=message):
            routine(lambda p: jnp.sum(p) + 1.0, jnp.zeros(0))


@pytest.mark.parametrize(
    "loss, dtype",
    [(lambda p: (p[0] * p[1]).astype(jnp.int32), "int32"),
     (lambda p: jnp.sum(p) * (1 + 1j), "complex")],
    ids=["int", "complex"],
)
def test_a_loss_that_is_not_real_is_refused_in_one_line(loss, dtype):
    real = r"loss_fn must return a real floating-point scalar"
    with pytest.raises(ValueError, match=rf"^{real} for one initialisation .*, got dtype {dtype}"):
        gdlr_jax.sweep(loss, np.ones((2, 2)), [0.1], steps=5)
    for routine in (gdlr_jax.hessian, lambda f, p: gdlr_jax.hvp(f, p, jnp.ones(2)),
                    lambda f, p: gdlr_jax.top_eigenvalues(f, p, k=1)):
        with pytest.raises(ValueError, match=rf"^{real}, got dtype {dtype}"):
            routine(loss, jnp.ones(2))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_parameters_are_refused_by_the_curvature_routines(dtype):
    point = jnp.ones(2, dtype)
    message = (r"^params: every leaf must be a floating-point array \(float32 or float64\), got "
               r"a leaf of dtype b?float16: half precision is not supported")
    for routine in (gdlr_jax.hessian, lambda f, p: gdlr_jax.top_eigenvalues(f, p, k=1),
                    lambda f, p: gdlr_jax.weakly_stable(f, p, 0.5)):
        with pytest.raises(ValueError, match=message):
            routine(_two_neuron, point)


def test_critical_step_size_bad_arguments():
    with pytest.raises(ValueError, match=r"^network must be a gdlr_jax.linear.LinearNetwork, got "
                       "str.$"):
        gdlr_jax.critical_step_size("two_neuron")
    with pytest.raises(ValueError, match="^learning_rate must be positive and finite, got 'x'.$"):
        gdlr_jax.critical_step_size(linear.two_neuron(), learning_rate="x")
