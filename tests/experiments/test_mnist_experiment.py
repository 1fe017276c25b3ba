"""The MNIST experiment: shrunk copies of the shipped configs end to end, the MLP through the
engine against a plain Flax training step, config errors, the heatmap statistics."""

from __future__ import annotations

import io
import json
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gdlr_jax import ConvergenceCriteria, TrajectoryStatus, sweep
from gdlr_jax.data import load_mnist
from gdlr_jax.experiments import figures
from gdlr_jax.experiments.config import (
    ConfigError,
    get_experiment,
    load_config,
    schema_entries,
)
from gdlr_jax.experiments.mnist import (
    bounded_mean,
    collapse_step_size,
    load_data,
    mlp_problem,
)
from gdlr_jax.experiments.runner import RUN_MARKER, run_config
from gdlr_jax.mlp import MLP

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
DPI = 40
DIVERGED = int(TrajectoryStatus.DIVERGED)


def _config(name: str, mnist_dir: pathlib.Path, *overrides: str):
    return load_config(
        CONFIGS / f"{name}.yaml", [f"data.data_dir={mnist_dir}", f"figures.dpi={DPI}", *overrides]
    )


def _png_size(path: pathlib.Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def _check_run_folder(path: pathlib.Path, depths: list[int]) -> dict:
    figures = ["convergence"] + [f"heatmaps_depth{d}" for d in depths]
    expected = {RUN_MARKER, "config.yaml", "results.npz", "summary.json"}
    expected |= {f"{stem}.{ext}" for stem in figures for ext in ("png", "pdf")}
    assert {p.name for p in path.iterdir()} == expected
    assert _png_size(path / "convergence.png") == (10 * DPI, int(4.4 * DPI))
    for stem in figures:
        assert (path / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
    summary = json.loads((path / "summary.json").read_text())
    assert [d["depth"] for d in summary["depths"]] == depths
    return summary


# ----- end to end -----------------------------------------------------------------------------
@pytest.mark.slow  # an end-to-end run (MNIST MLPs trained)
def test_gelu_mse_gd_config_end_to_end(mnist_dir, tmp_path):
    config = _config(
        "mnist_gelu_mse_cpu",
        mnist_dir,
        "data.max_examples=64",
        "model.depths=[1, 2]",
        "training.etas=[0.1, 100.0]",  # a small step size, and one that diverges at once
        "training.n_init=3",
        "training.steps=30",
        "training.record_every=10",
        "engine.check_every=10",
    )
    outcome = run_config(config, out=tmp_path / "gd", progress=False)
    summary = _check_run_folder(outcome.path, [1, 2])
    with np.load(outcome.path / "results.npz") as results:
        arrays = dict(results)

    np.testing.assert_array_equal(arrays["record_steps"], [0, 10, 20, 30])
    assert arrays["status"].shape == (2, 2, 3)
    assert arrays["recorded_loss"].shape == (2, 2, 3, 4)
    # the diverging step size is reported, not raised: every trajectory diverged, early
    assert np.all(arrays["status"][:, 1] == DIVERGED)
    assert np.all(arrays["steps_taken"][:, 1] < 10)
    assert np.all(np.isnan(arrays["heatmap_mean_loss"][:, 1, 1:]))
    np.testing.assert_array_equal(arrays["heatmap_bounded_share"][:, 1], [[1, 0, 0, 0]] * 2)
    # the small one trains: bounded throughout, the mean loss decreases
    assert not np.any(arrays["status"][:, 0] == DIVERGED)
    assert np.all(arrays["heatmap_mean_loss"][:, 0, -1] < arrays["heatmap_mean_loss"][:, 0, 0])
    for depth in summary["depths"]:
        large = depth["per_eta"][1]
        assert large["eta"] == 100.0
        assert large["status_fractions"]["diverged"] == 1.0 and large["converged_fraction"] == 0
        assert large["median_final_loss"] is None
    assert summary["data"] == {
        "data_dir": str(mnist_dir.resolve()), "examples": 64, "digits": [0, 1]
    }
    assert summary["criterion"]["grad_tol"] == 5e-3  # the config's criterion, recorded


@pytest.mark.slow  # an end-to-end run (MNIST MLPs trained)
def test_relu_cross_entropy_sgd_config_end_to_end(mnist_dir, tmp_path):
    config = _config(
        "mnist_relu_ce_sgd_cpu",
        mnist_dir,
        "data.max_examples=96",
        "model.depths=[1]",
        "training.etas=[0.1, 1000.0]",
        "training.n_init=2",
        "training.steps=20",
        "training.batch_size=32",
        "training.record_every=5",
        "engine.check_every=5",
        "engine.divergence_bound=100.0",
    )
    outcome = run_config(config, out=tmp_path / "sgd", progress=False)
    summary = _check_run_folder(outcome.path, [1])
    with np.load(outcome.path / "results.npz") as results:
        status, loss = results["status"], results["heatmap_mean_loss"]
    assert np.all(status[0, 1] == DIVERGED) and not np.any(status[0, 0] == DIVERGED)
    assert loss[0, 0, -1] < loss[0, 0, 0]
    assert summary["depths"][0]["per_eta"][1]["status_fractions"]["diverged"] == 1.0


@pytest.mark.slow  # an end-to-end run (MNIST MLPs trained)
def test_float64_config_runs_in_float64_end_to_end(mnist_dir, tmp_path):
    """``dtype: float64``: losses and recordings are float64 (``float32``: float32), and two
    runs of a config give identical arrays. (The initialisations are drawn in the config's
    dtype, so float32 and float64 runs start from different points.)"""
    sets = ["data.max_examples=64", "model.depths=[1]", "training.etas=[0.1]",
            "training.n_init=2", "training.steps=10", "training.record_every=5",
            "engine.check_every=5"]
    runs = {}
    for name, dtype in [("a", "float64"), ("b", "float64"), ("c", "float32")]:
        config = _config("mnist_gelu_mse_cpu", mnist_dir, *sets, f"dtype={dtype}")
        outcome = run_config(config, out=tmp_path / name, progress=False, stream=io.StringIO())
        with np.load(outcome.path / "results.npz") as results:
            runs[name] = dict(results)
    for field in ("final_loss", "final_grad_norm", "recorded_loss", "recorded_step_norm"):
        assert runs["a"][field].dtype == np.float64, field
        assert runs["c"][field].dtype == np.float32, field
    for field in runs["a"]:
        np.testing.assert_array_equal(runs["a"][field], runs["b"][field], err_msg=field)


# ----- the model through the engine -----------------------------------------------------------
def _flax_loss(model: MLP, images, labels, loss: str):
    """The training loss written directly with optax, for a Flax model."""
    logits = model(images)
    if loss == "mse":
        return jnp.mean(optax.squared_error(logits, jax.nn.one_hot(labels, 2, dtype=logits.dtype)))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


@pytest.mark.slow  # three MLPs on MNIST compiled twice each, by the engine and by Flax
@pytest.mark.parametrize(
    "loss, activation, batch_size",
    [("mse", "gelu", 0), ("cross_entropy", "relu", 0), ("cross_entropy", "relu", 16)],
)
def test_engine_step_equals_a_flax_training_step(mnist_dir, loss, activation, batch_size):
    data = load_mnist(mnist_dir, max_examples=48)
    model_keys = dict(width=8, activation=activation, use_bias=True, init_scale=1.0, loss=loss)
    training = dict(n_init=3, batch_size=batch_size, optimizer="gd", momentum=0.9)
    batch_key = jax.random.key(7)
    problem = mlp_problem(
        data, 2, model_keys, training,
        init_key=jax.random.key(3), batch_key=batch_key, dtype=jnp.float64,
    )
    eta = 0.3
    result = sweep(
        problem.loss_fn, problem.params0, np.array([eta]), steps=1,
        batch_source=problem.batch_source, key=problem.key,
        criteria=ConvergenceCriteria(grad_tol=0.0, step_tol=0.0, window=2, max_period=1),
        record_every=1, dtype=jnp.float64,
    )

    images, labels = jnp.asarray(data.images, jnp.float64), jnp.asarray(data.labels)
    if batch_size:  # the first batch: block 0 of the shuffle of epoch 0 (gdlr_jax.engine._minibatches)
        first = jax.random.permutation(jax.random.fold_in(batch_key, 0), labels.shape[0])
        step_batch = (images[first[:batch_size]], labels[first[:batch_size]])
    else:
        step_batch = (images, labels)
    template = MLP(2, width=8, activation=activation, param_dtype=jnp.float64,
                   rngs=nnx.Rngs(params=0))
    graphdef, _ = nnx.split(template, nnx.Param)
    for j in range(3):
        model = nnx.merge(graphdef, jax.tree.map(lambda x: x[j], problem.params0))
        full_loss, full_grads = nnx.value_and_grad(_flax_loss)(model, images, labels, loss)
        grads = nnx.grad(_flax_loss)(model, *step_batch, loss)
        optimizer = nnx.Optimizer(model, optax.sgd(eta), wrt=nnx.Param)
        optimizer.update(model, grads)
        # full-batch loss and eta ||grad L|| at the start, as the engine records them
        np.testing.assert_allclose(result.recorded_loss[0, j, 0], full_loss, rtol=1e-12)
        np.testing.assert_allclose(
            result.recorded_step_norm[0, j, 0], eta * optax.tree.norm(full_grads), rtol=1e-12
        )
        after = jax.tree.map(lambda x: x[0, j], result.final_params)
        for ours, flax_leaf in zip(
            jax.tree.leaves(after), jax.tree.leaves(nnx.state(model, nnx.Param)), strict=True
        ):
            np.testing.assert_allclose(ours, flax_leaf, rtol=1e-12, atol=1e-14)


# ----- configs --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("training.etas=[1.0, 0.5]",
         "config key 'training.etas' has value [1.0, 0.5]; allowed: strictly increasing values"),
        ("training.etas=[]", "config key 'training.etas' has value []; allowed: a non-empty list"),
        ("training.etas=[0.1, 0]", "config key 'training.etas.1' has value 0; allowed: a finite "
         "number > 0"),
        ("model.depths=[-1]", "config key 'model.depths.0' has value -1; allowed: an integer >= 0"),
        ("data.digits=[3, 3]", "config key 'data.digits' has value [3, 3]; allowed: distinct"),
        ("model.activation=swish", "config key 'model.activation' has value 'swish'; allowed: "
         "one of 'gelu', 'relu', 'tanh', 'sigmoid'"),
        ("training.record_every=5000", "record_every = 5000 must be <= steps = 2000"),
    ],
)
def test_bad_config_values_are_named(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "mnist_gelu_mse_cpu.yaml", [override])
    assert message in str(err.value)


def test_missing_data_folder_or_too_large_batch_fails_before_compute(mnist_dir, tmp_path):
    missing = tmp_path / "nowhere"
    config = load_config(CONFIGS / "mnist_gelu_mse_cpu.yaml", [f"data.data_dir={missing}"])
    with pytest.raises(ConfigError, match="config key 'data.data_dir' has value .*nowhere") as err:
        run_config(config, out=tmp_path / "run", progress=False)
    assert err.value.key == "data.data_dir"
    assert not (tmp_path / "run").exists()  # no partial run left behind

    small = _config("mnist_relu_ce_sgd_cpu", mnist_dir, "data.max_examples=10")
    data = load_data(small.params["data"])
    assert data.images.shape == (10, 784)
    with pytest.raises(ConfigError, match="'training.batch_size' has value 64; allowed: at most "
                       "the 10 training examples"):
        mlp_problem(data, 1, _config("mnist_relu_ce_sgd_cpu", mnist_dir).params["model"],
                    dict(n_init=1, batch_size=64, optimizer="gd", momentum=0.0),
                    init_key=jax.random.key(0), batch_key=jax.random.key(1), dtype=jnp.float32)


def test_cpu_configs_are_shrunk_copies_of_the_gpu_configs():
    for figure in ("gelu_mse", "relu_ce_sgd"):
        cpu = load_config(CONFIGS / f"mnist_{figure}_cpu.yaml").params
        gpu = load_config(CONFIGS / f"mnist_{figure}_gpu.yaml").params
        assert cpu["data"]["data_dir"] == gpu["data"]["data_dir"] == ""  # --data-dir, env
        assert gpu["training"]["n_init"] == 100 and max(gpu["model"]["depths"]) == 16
        assert gpu["data"]["max_examples"] == 0  # every 0 and 1 available
        for section, same in (
            ("model", ("width", "activation", "use_bias", "init_scale", "loss")),
            ("training", ("batch_size", "optimizer")),
            ("engine", ("grad_tol", "step_tol", "loss_tol", "divergence_bound")),
        ):
            for key in same:
                assert cpu[section][key] == gpu[section][key], f"{figure}: {section}.{key}"
        assert max(cpu["training"]["etas"]) > 1  # through and beyond 1
        assert cpu["training"]["n_init"] < 100 and cpu["training"]["steps"] <= 2000


def test_docs_document_every_key():
    text = (REPO / "docs" / "reproduction.md").read_text()
    for key, *_ in schema_entries(get_experiment("mnist").schema):
        assert f"`{key}`" in text, f"docs/reproduction.md does not document the key {key}"


# ----- what the figures show ------------------------------------------------------------------
def test_bounded_mean_leaves_out_trajectories_after_they_diverged():
    recorded = np.array([[[1.0, 2.0, 4.0], [3.0, 1e30, 1e30], [5.0, np.inf, 6.0]]])  # (1, 3, 3)
    status = np.array([[0, DIVERGED, 0]])
    steps_taken = np.array([[20, 5, 20]])
    mean, share = bounded_mean(recorded, status, steps_taken, np.array([0, 10, 20]))
    # t = 0: all three; t = 10: the second has diverged, the third is not finite; t = 20: two
    np.testing.assert_allclose(mean, [[3.0, 2.0, 5.0]])
    np.testing.assert_allclose(share, [[1.0, 1 / 3, 2 / 3]])
    none_left, _ = bounded_mean(recorded[:, 1:2], status[:, 1:2], steps_taken[:, 1:2],
                                np.array([0, 10, 20]))
    np.testing.assert_array_equal(np.isnan(none_left), [[False, True, True]])


def test_collapse_step_size():
    etas = [0.1, 0.5, 1.0, 2.0]
    assert collapse_step_size(etas, [1.0, 0.4, 0.0, 0.0]) == 1.0
    assert collapse_step_size(etas, [1.0, 0.0, 0.2, 0.0]) == 2.0  # a late converging one counts
    assert collapse_step_size(etas, [0.0, 0.0, 0.0, 0.0]) == 0.1
    assert collapse_step_size(etas, [1.0, 1.0, 1.0, 0.1]) is None


def test_heatmap_colour_scale_is_not_stretched_by_an_outlier():
    rng = np.random.default_rng(0)
    values = 10.0 ** rng.uniform(-3, -1, size=(6, 50))  # between 1e-3 and 1e-1
    values[2, 7] = 1e6  # one outlier
    values[0, :5] = np.nan  # every trajectory diverged there
    low, high = figures.colour_limits(values)
    low_p, high_p = figures.COLOUR_PERCENTILES
    finite = values[np.isfinite(values)]
    assert 1e-3 <= low < high <= 1e-1  # the outlier is beyond the scale
    assert np.mean(finite < low) == pytest.approx(low_p / 100, abs=0.01)
    assert np.mean(finite > high) == pytest.approx(1 - high_p / 100, abs=0.01)
    assert figures.colour_limits(np.full((2, 2), np.nan)) is None
    assert figures.colour_limits(np.full((2, 2), 0.5)) == (0.5, 5.0)  # at least a decade

    status = np.array([[1, 1, 3, 4], [0, 2, 2, 3]])
    one_outlier = np.array([[1e-3, 1e-2, 1e6], [1e-2, 1e-3, 1e-2]])
    fig = figures.heatmaps_figure(
        np.array([0.1, 0.2]), np.array([0, 10, 20]), one_outlier, one_outlier, status, "t"
    )
    meshes = [ax.collections[0] for ax in fig.axes[:2]]
    for mesh in meshes:
        assert mesh.norm.vmax < 1e6 and mesh.norm.vmin == pytest.approx(1e-3)
        assert mesh.colorbar.extend == "max"  # an arrow: cells beyond the scale
        assert f"percentiles {low_p:g}-{high_p:g}" in mesh.colorbar.ax.get_ylabel()


def test_heatmap_row_labels_give_every_status():
    status = np.array([[1, 1, 3, 4], [0, 2, 2, 3]])
    header, rows = figures.status_row_labels(status)
    assert header.split() == ["min", "crit", "per", "chao", "n.c.", "div", "%"]
    assert [row.split() for row in rows] == [
        ["50", "0", "25", "0", "0", "25"], ["0", "50", "0", "0", "25", "25"]
    ]
    assert all(sum(int(v) for v in row.split()) == 100 for row in rows)
