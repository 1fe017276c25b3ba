"""The fractal_boundary experiment: end to end on shrunk copies of the shipped configs; the
zoom; resuming an interrupted run."""

from __future__ import annotations

import io
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdlr_jax import TrajectoryStatus, mlp
from gdlr_jax.experiments import fractal_boundary
from gdlr_jax.experiments.config import ConfigError, load_config
from gdlr_jax.experiments.runner import RunInterrupted, run_config

REPO = pathlib.Path(__file__).resolve().parents[2]
SHRUNK = ["zoom.levels=3", "zoom.resolution=33", "zoom.steps=400", "figures.dpi=40"]


def _run(config_name: str, out: pathlib.Path, *sets: str, resume: bool = False):
    config = load_config(REPO / "configs" / f"{config_name}.yaml", [*SHRUNK, *sets])
    return run_config(
        config, out=out, progress=False, stream=io.StringIO(), resume=resume
    )


@pytest.fixture(scope="module")
def basin_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fb") / "basin"
    _run("fractal_boundary_two_neuron_basin", out)
    return out


@pytest.mark.slow  # an end-to-end run
def test_basin_run_writes_levels_dimensions_and_figures(basin_run):
    for name in (
        "results.npz",
        "summary.json",
        "zoom.png",
        "box_counts.png",
        "config.yaml",
    ):
        assert (basin_run / name).is_file(), name
    results = np.load(basin_run / "results.npz")
    summary = json.loads((basin_run / "summary.json").read_text())
    levels = summary["per_level"]
    assert len(levels) == 3
    for k, level in enumerate(levels):
        status = results[f"level{k}_status"]
        assert status.shape == (33, 33)
        assert level["dimension"] == pytest.approx(results["dimension"][k])
        low, high = level["interval"]
        assert low < level["dimension"] < high
        assert 0.5 < level["dimension"] < 2.0
        assert results[f"level{k}_counts"].shape == (4, len(level["box_cells"]))
    for k in range(2):  # each level a factor-4 zoom centred inside the previous one
        outer, inner = results[f"level{k}_region"], results[f"level{k + 1}_region"]
        assert inner[1] - inner[0] == pytest.approx((outer[1] - outer[0]) / 4)
        centre = ((inner[0] + inner[1]) / 2, (inner[2] + inner[3]) / 2)
        assert outer[0] < centre[0] < outer[1] and outer[2] < centre[1] < outer[3]


def test_next_region_centres_on_the_boundary_point_nearest_the_target():
    labels = np.zeros((9, 9), np.int32)
    labels[:, 6:] = 1  # boundary between the cell centres 5 and 6 of every row
    region = [0.0, 9.0, 0.0, 9.0]  # cells of side 1, centres at 0.5, 1.5, ...
    assert (
        fractal_boundary.next_region(region, labels, 3.0, (0.0, 4.6))
        == [4.5, 7.5, 3.5, 6.5]
    )  # the boundary x = 6 (between centres 5.5 and 6.5), square centre y = 5 nearest 4.6
    assert (
        fractal_boundary.next_region(region, np.zeros((9, 9), np.int32), 3.0, (0, 0))
        is None
    )


@pytest.mark.slow  # an end-to-end run
def test_step_size_plane_uses_per_leaf_step_sizes(tmp_path):
    out = tmp_path / "eta"
    _run("fractal_boundary_two_neuron_eta", out, "zoom.levels=1", "zoom.resolution=65")
    results = np.load(out / "results.npz")
    status = results["level0_status"]
    # below the line eta_x + eta_y small, GD from (2, 0.3) converges; for large step sizes of
    # both coordinates it does not: both classes are on the plane
    labels = results["level0_labels"]
    assert labels[0, 0] == 1 and labels[-1, -1] == 0
    assert status.shape == (65, 65)


@pytest.mark.slow  # an end-to-end run
def test_an_interrupted_run_resumes_to_the_same_results(
    tmp_path, basin_run, monkeypatch
):
    calls = {"n": 0}
    real = fractal_boundary.boundary_dimension

    def interrupt_at_level_1(*args, **kwargs):
        calls["n"] += 1
        # call 1 checks the box sizes (plan), 2 is level 0's; at 3, level 1's sweep is saved
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fractal_boundary, "boundary_dimension", interrupt_at_level_1)
    out = tmp_path / "basin"
    with pytest.raises(RunInterrupted):
        _run("fractal_boundary_two_neuron_basin", out)
    assert (out / "checkpoints" / "level1").is_dir()
    assert not (out / "results.npz").exists()
    monkeypatch.setattr(fractal_boundary, "boundary_dimension", real)
    _run("fractal_boundary_two_neuron_basin", out, resume=True)
    resumed, uninterrupted = (
        np.load(out / "results.npz"),
        np.load(basin_run / "results.npz"),
    )
    assert set(resumed.files) == set(uninterrupted.files)
    for name in resumed.files:
        np.testing.assert_array_equal(resumed[name], uninterrupted[name], err_msg=name)


@pytest.mark.slow  # an end-to-end run
def test_mnist_plane_steps_each_layer_with_its_own_step_size(tmp_path, mnist_dir):
    out = tmp_path / "mnist"
    _run(
        "fractal_boundary_mnist_cpu",
        out,
        "zoom.levels=1",
        "zoom.steps=100",
        f"data.data_dir={mnist_dir}",
        "data.max_examples=64",
        "labels=status",
    )
    status = np.load(out / "results.npz")["level0_status"]
    assert status.shape == (
        33,
        33,
    )  # rows: log10 eta_2 from -1.5 up; columns: log10 eta_1
    assert status[-1, -1] == int(TrajectoryStatus.DIVERGED)  # eta_1 = eta_2 ~ 10
    assert status[0, 0] != int(TrajectoryStatus.DIVERGED)  # eta_1 = eta_2 ~ 0.03


def test_layer_step_sizes_follow_the_layers():
    _, params0 = mlp.init_mlp_params(
        jax.random.key(0), 1, depth=1, width=3, in_features=2
    )
    etas = fractal_boundary._layer_etas(
        params0, np.array([0.1, 0.2]), np.array([3.0, 4.0]), jnp.float32
    )
    assert jax.tree_util.tree_structure(etas) == jax.tree_util.tree_structure(params0)
    for path, leaf in jax.tree_util.tree_leaves_with_path(etas):
        output = "output" in jax.tree_util.keystr(path)
        np.testing.assert_array_equal(
            leaf, np.float32([3.0, 4.0] if output else [0.1, 0.2])
        )


@pytest.mark.parametrize(
    "sets, key",
    [
        (["zoom.resolution=32"], "zoom.resolution"),
        (["dimension.max_box=64"], "dimension.max_box"),
        (["dimension.min_box=3"], "dimension.min_box"),
        (["zoom.target=[1.5, 0.5]"], "zoom.target"),
        (["plane.problem=two_neuron_eta", "plane.region=[-1, 1, 0.1, 1]"], "plane"),
    ],
)
def test_bad_keys_fail_before_any_compute_naming_the_key(tmp_path, sets, key):
    with pytest.raises(ConfigError) as info:
        _run("fractal_boundary_two_neuron_basin", tmp_path / "bad", *sets)
    assert info.value.key == key
    assert "\n" not in str(info.value)
    assert not (tmp_path / "bad").exists()
