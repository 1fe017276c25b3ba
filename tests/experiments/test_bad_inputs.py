"""Bad input, everywhere a user can reach: one test per row of ``docs/bad_inputs.md``.

Command-line rows run ``gdlr run`` in-process (:func:`gdlr_jax.experiments.cli.main`) from an
empty working directory: each must exit 2 with one line ``gdlr: error: ...`` on stderr naming
what is wrong, and leave no output folder. API rows check the ``ValueError`` raised before any
compute. Rows already tested elsewhere are referenced in the table, not repeated here.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
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
from gdlr_jax.experiments import two_neuron as two_neuron_experiment
from gdlr_jax.experiments.cli import main

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


# ----- the command line: MNIST data ---------------------------------------------------------
def test_missing_data_folder(capsys, cwd):
    error = _cli_error(capsys, cwd, ["mnist_gelu_mse_cpu", "--set", f"data.data_dir={cwd / 'no'}"])
    assert f"config key 'data.data_dir' has value '{cwd / 'no'}'" in error
    assert "is not a folder. (docs/data.md says how to get MNIST)" in error


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


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_truncated_gzip, f"{IMAGES}.gz' is not a valid gzip file: Compressed file ended"),
        (_labels_magic, f"{IMAGES}' has IDX magic number 2049 (0x00000801); expected 2051"),
        (_wrong_side, f"{IMAGES}': images of (27, 28) pixels; MNIST images are 28x28."),
        (_truncated_data, "bytes of data, the file holds 7839000 (truncated)."),
    ],
    ids=["truncated-gzip", "wrong-magic", "wrong-dims", "truncated-data"],
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

    for name in ("minima_profile", "initial_grid", "sweep"):
        monkeypatch.setattr(two_neuron_experiment, name, computed)


def test_one_trajectory_too_large_for_memory(capsys, cwd, no_compute):
    error = _cli_error(capsys, cwd, ["two_neuron", *QUICK, "--set", f"portraits.0.steps={10**12}"])
    assert error.startswith(
        "gdlr: error: config key 'portraits.0.steps' has value 1000000000000: a chunk of the "
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
    with pytest.raises(ChunkMemoryError, match=r"^one trajectory needs about 7\.45e\+04 GiB \(an "
                       r"estimate: parameters, final window, recordings\), more than the "):
        gdlr_jax.plan_sweep(_two_neuron, np.ones((2, 2)), [0.1], steps=10**13, record_every=1,
                            dtype=jnp.float32)


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


def test_critical_step_size_bad_arguments():
    with pytest.raises(ValueError, match=r"^network must be a gdlr_jax.linear.LinearNetwork, got "
                       "str.$"):
        gdlr_jax.critical_step_size("two_neuron")
    with pytest.raises(ValueError, match="^learning_rate must be positive and finite, got 'x'.$"):
        gdlr_jax.critical_step_size(linear.two_neuron(), learning_rate="x")
