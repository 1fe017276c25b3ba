"""The critical_step_size experiment: a tiny config on the MNIST sample end to end, resuming
an interrupted run, a checkpoint of another sweep refused, bad config keys refused in one line
before any compute, the saved estimate read back, the figure."""

from __future__ import annotations

import io
import json
import math
import pathlib
import shutil

import numpy as np
import pytest

from gdlr_jax import CheckpointMismatchError, CriticalStepEstimate
from gdlr_jax.experiments import critical_step_size
from gdlr_jax.experiments.cli import main
from gdlr_jax.experiments.config import ConfigError, load_config
from gdlr_jax.experiments.figures import CollapseCurve, collapse_figure
from gdlr_jax.experiments.runner import RunInterrupted, run_config

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
# a tiny search: 32 examples, width-4 MLPs of depths 0 and 1, 4 initialisations, threshold
# 1/2 at confidence 1/2 (z = 0.67: one initialisation of 4 certifies either end), 2 rounds of
# 3 step sizes of 40 steps each
TINY = [
    "data.max_examples=32", "model.depths=[0, 1]", "model.width=4", "search.n_init=4",
    "search.threshold=0.5", "search.confidence=0.5", "search.etas_per_round=3",
    "search.max_rounds=2", "search.steps=40", "search.sharpness_points=2",
    "search.eta_range=[0.5, 8.0]", "engine.check_every=10", "engine.etas_per_chunk=3",
    "figures.dpi=30",
]


def _config(mnist_dir: pathlib.Path, *sets: str, name: str = "critical_step_size_mnist_cpu"):
    return load_config(CONFIGS / f"{name}.yaml", [f"data.data_dir={mnist_dir}", *TINY, *sets])


def _run(mnist_dir: pathlib.Path, out: pathlib.Path, *sets: str, **how: bool):
    return run_config(
        _config(mnist_dir, *sets), out=out, progress=False, stream=io.StringIO(), **how
    )


@pytest.fixture(scope="module")
def tiny_run(mnist_dir, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("critical") / "run"
    _run(mnist_dir, out)
    return out


# ----- end to end ---------------------------------------------------------------------------
@pytest.mark.slow  # an end-to-end run (MLPs trained at 6 step sizes per depth)
def test_tiny_run_writes_the_estimate_of_every_depth(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"results.npz", "summary.json", "collapse.png", "collapse.pdf"} <= names
    assert "checkpoints" not in names  # deleted once the results are written
    results = np.load(tiny_run / "results.npz")
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert results["depths"].tolist() == [0, 1]
    assert [d["depth"] for d in summary["depths"]] == [0, 1]
    for k, entry in enumerate(summary["depths"]):
        etas = results[f"depth{entry['depth']}_etas"]
        converged = results[f"depth{entry['depth']}_converged"]
        bounds = results[f"depth{entry['depth']}_share_bounds"]
        assert np.all(np.diff(etas) > 0) and etas.shape == converged.shape
        assert np.all((0 <= converged) & (converged <= 4))
        assert np.all(bounds[:, 0] <= converged / 4) and np.all(converged / 4 <= bounds[:, 1])
        assert 1 <= entry["num_sweeps"] <= 2
        assert entry["num_trajectories"] == 4 * etas.size == results["num_trajectories"][k]
        assert [d["eta"] for d in entry["per_eta"]] == pytest.approx(etas.tolist())
        low, high = results["interval"][k]
        if np.isfinite(low) and np.isfinite(high):  # a bracket: converging below, collapsed at
            i, j = np.searchsorted(etas, [low, high])
            assert bounds[i, 0] > 0.5 and bounds[j, 1] < 0.5
            assert results["eta"][k] == pytest.approx((low + high) / 2)
        bound = entry["sharpness_bound"]
        assert (bound is None) == (converged.sum() == 0)
        if bound is not None:  # 2 / lambda_max of a minimum GD converged to at flattest_eta
            assert bound == pytest.approx(2 / entry["flattest_lambda_max"])
            assert entry["flattest_eta"] in pytest.approx(etas.tolist())
    table = summary["table"]
    assert table["headers"][:4] == ["depth", "collapse eta", "low", "high"]
    assert len(table["rows"]) == 2


@pytest.mark.slow  # two end-to-end runs
def test_an_interrupted_run_resumes_to_the_same_results(mnist_dir, tiny_run, tmp_path,
                                                        monkeypatch):
    real = critical_step_size.estimate_critical_step_size
    calls = []

    def interrupt_at_depth_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # depth 0 finished and saved; interrupted in depth 1
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(critical_step_size, "estimate_critical_step_size", interrupt_at_depth_1)
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        _run(mnist_dir, out)
    assert (out / "checkpoints" / "depth0" / "estimate.npz").is_file()
    assert not (out / "checkpoints" / "depth1" / "estimate.npz").exists()
    assert not (out / "results.npz").exists()

    # a checkpoint folder of another sweep (here: other initialisations) is refused
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    meta = tampered / "checkpoints" / "depth0" / "sweep.json"
    saved = json.loads(meta.read_text())
    saved["fingerprint"]["params0"] = "0" * 64
    meta.write_text(json.dumps(saved))
    with pytest.raises(CheckpointMismatchError, match="params0: saved 000000000000..."):
        _run(mnist_dir, tampered, resume=True)
    # --overwrite replaces an unfinished run: its estimate.npz files are gdlr's own
    _run(mnist_dir, tampered, "model.depths=[0]", "search.max_rounds=1", overwrite=True)
    assert json.loads((tampered / "summary.json").read_text())["depths"][0]["depth"] == 0

    calls.clear()
    monkeypatch.setattr(critical_step_size, "estimate_critical_step_size", lambda *a, **k: (
        calls.append(1), real(*a, **k))[1])
    _run(mnist_dir, out, resume=True)
    assert len(calls) == 1  # depth 0 was loaded, not estimated again
    resumed, uninterrupted = np.load(out / "results.npz"), np.load(tiny_run / "results.npz")
    assert set(resumed.files) == set(uninterrupted.files)
    for name in resumed.files:
        np.testing.assert_array_equal(resumed[name], uninterrupted[name], err_msg=name)


# ----- before any compute -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["search.stepz=5"], "unknown config key 'search.stepz'; allowed keys under 'search': "),
        (["search.eta_range=[2.0, 0.5]"], (
            "config key 'search.eta_range' has value [2.0, 0.5]; allowed: [eta_low, eta_high] "
            "with 0 < eta_low < eta_high"
        )),
        (["search.threshold=1.5"], (
            "config section 'search' is inconsistent: threshold = 1.5 must be in (0, 1)"
        )),
        (["search.n_init=40", "search.threshold=0.05", "search.confidence=0.95"], (
            "config section 'search' is inconsistent: n_init = 40 initialisations cannot "
            "certify a share below (or above) threshold 0.05 at confidence 0.95 (the Wilson "
            "upper bound of 0/40 is 0.0876, the lower bound of 40/40 is 0.912); use "
            "n_init >= 73 or another threshold"
        )),
        (["model.depths=[1, 1]"], (
            "config key 'model.depths' has value [1, 1]; allowed: distinct values"
        )),
    ],
)
def test_bad_keys_are_refused_in_one_line(tmp_path, capsys, monkeypatch, sets, message):
    monkeypatch.chdir(tmp_path)
    argv = ["run", "critical_step_size_mnist_cpu", "--data-dir", str(tmp_path),
            "--out", str(tmp_path / "out"), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gdlr: error: "), lines
    assert message in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # reads the data and plans 3 depths (about 6 s on a shared 2-core CPU)
def test_a_dry_run_plans_every_depth(mnist_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GDLR_MNIST_DIR", str(mnist_dir))  # as gdlr run reads it
    assert main(["run", "critical_step_size_mnist_cpu", "--dry-run", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for depth in (1, 2, 4):  # at most 3 rounds of 4 step sizes x 36 initialisations each
        assert f"#   depth{depth}           432       1000  at most 3 rounds" in out
    assert f"data_dir: {mnist_dir}" in out
    assert not (tmp_path / "runs").exists()


def test_a_missing_data_folder_is_refused_before_any_compute(tmp_path):
    config = load_config(CONFIGS / "critical_step_size_mnist_cpu.yaml",
                         [f"data.data_dir={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match="config key 'data.data_dir' has value"):
        run_config(config, out=tmp_path / "out", progress=False, stream=io.StringIO())
    assert not (tmp_path / "out").exists()


def test_the_gpu_config_differs_from_the_cpu_config_only_in_size():
    cpu, gpu = (
        load_config(CONFIGS / f"critical_step_size_mnist_{size}.yaml").params
        for size in ("cpu", "gpu")
    )
    sized = {("data", "max_examples"), ("model", "depths"), ("search", "n_init"),
             ("search", "steps"), ("search", "etas_per_round"), ("search", "max_rounds"),
             ("engine", "check_every"), ("engine", "etas_per_chunk")}
    for section, keys in cpu.items():
        if not isinstance(keys, dict):
            continue
        for key, value in keys.items():
            if (section, key) not in sized:
                assert gpu[section][key] == value, f"{section}.{key}"
    assert cpu["model"]["depths"] == [1, 2, 4] and gpu["model"]["depths"] == [1, 2, 4, 8, 16]


def test_the_config_is_figure_3s_setting():
    """The CPU config measures the MLPs of configs/mnist_gelu_mse_cpu.yaml: same data, model
    (loss convention, initialisation) and convergence criterion."""
    ours = load_config(CONFIGS / "critical_step_size_mnist_cpu.yaml").params
    figure3 = load_config(CONFIGS / "mnist_gelu_mse_cpu.yaml").params
    assert ours["data"] == figure3["data"]
    assert ours["model"] == figure3["model"]
    for key in ("grad_tol", "step_tol", "loss_tol", "divergence_bound", "window", "max_period",
                "period_tol", "check_every"):
        assert ours["engine"][key] == figure3["engine"][key], key


# ----- the parts ----------------------------------------------------------------------------
@pytest.mark.parametrize("bound", [None, 1.25])
def test_a_saved_estimate_reads_back_equal(tmp_path, bound):
    estimate = CriticalStepEstimate(
        eta=0.75, interval=(0.5, 1.0), resolved=False, threshold=0.05, confidence=0.95,
        etas=np.array([0.25, 0.5, 1.0]), converged=np.array([9, 4, 0]),
        share_bounds=np.array([[0.6, 1.0], [0.1, 0.6], [0.0, 0.3]]), trials=9, num_sweeps=1,
        num_trajectories=27, sharpness_bound=bound,
        flattest_lambda_max=None if bound is None else 2 / bound,
        flattest_eta=None if bound is None else 0.5,
    )
    path = tmp_path / "estimate.npz"
    critical_step_size._save_estimate(path, estimate)
    loaded = critical_step_size._load_estimate(path)
    for name, value in estimate._asdict().items():
        assert type(getattr(loaded, name)) is type(value), name
        np.testing.assert_array_equal(getattr(loaded, name), value, err_msg=name)
    path.write_bytes(b"not an npz")  # an unreadable file is recomputed, not an error
    assert critical_step_size._load_estimate(path) is None


def test_the_figure_has_a_panel_per_depth():
    curve = CollapseCurve(
        1, np.array([0.1, 0.5, 1.0]), np.array([10, 3, 0]),
        np.array([[0.7, 1.0], [0.1, 0.6], [0.0, 0.3]]), 10, (0.5, 1.0), True, 1.8,
    )
    unbracketed = curve._replace(depth=2, interval=(math.nan, math.nan), sharpness_bound=math.nan)
    fig = collapse_figure([curve, unbracketed, curve._replace(depth=4)], 0.05, "setting")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(fig.axes) == 3 and len(visible) == 3
    titles = [ax.get_title() for ax in visible]
    assert titles[0] == "depth 1\ncollapse in [0.5, 1]; $2/\\lambda_{\\max}$ = 1.8"
    assert titles[1] == "depth 2\nno collapse bracketed; no converged minimum"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "threshold 0.05" in labels and "paper (Fig. 3): none for $\\eta > 1$" in labels
