"""The two-neuron study: end to end on a shrunk copy of the shipped config; the M_WS length;
what its figures show."""

from __future__ import annotations

import io
import json
import pathlib
import struct

import numpy as np
import pytest
from scipy.integrate import quad

from gdlr_jax import TrajectoryStatus, sweep
from gdlr_jax.dynamics._stability import CRITERIA
from gdlr_jax.experiments import figures
from gdlr_jax.experiments.config import ConfigError, load_config
from gdlr_jax.experiments.runner import RUN_MARKER, run_config
from gdlr_jax.experiments.two_neuron import (
    initial_grid,
    minima_profile,
    unstable_convergence_fraction,
    weakly_stable_length,
)
from gdlr_jax.linear import two_neuron

REPO = pathlib.Path(__file__).resolve().parents[2]
DPI = 40
SHRUNK = [  # the shipped config, shrunk to run in seconds
    "critical_step_size.restarts=2",
    "critical_step_size.steps=300",
    "weak_stability.points=2001",
    "weak_stability.curve_points=40",
    "sweep.eta={start: 0.3, stop: 1.2, num: 4}",  # 0.3, 0.6, 0.9 | 1.2 around eta_E = 1
    "sweep.resolution=8",
    "sweep.steps=1500",
    "portraits.0.starts=2",
    "portraits.0.steps=60",
    "portraits.1.starts=2",
    "portraits.1.steps=30",
    "basin.resolution=12",
    "basin.steps=1500",
    f"figures.dpi={DPI}",
]
FIGURES = {  # stem -> size in inches (gdlr_jax/experiments/figures/two_neuron.py)
    "figure1_phase_portraits": (10.4, 6.2),
    "figure2_weak_stability": (6.4, 4.4),
    "basin_map": (11.0, 5.8),
}


def _hand_length(eta: float) -> float:
    """|M_WS(eta)| from the closed form lambda = x^2 + y^2 on xy = 1 (both branches)."""
    c = 2.0 / eta  # x^2 + 1/x^2 < c
    if c <= 2.0:
        return 0.0
    root = np.sqrt(c * c - 4.0)
    lo, hi = np.sqrt((c - root) / 2.0), np.sqrt((c + root) / 2.0)
    return 2.0 * quad(lambda x: np.sqrt(1.0 + x**-4), lo, hi, epsabs=1e-12, epsrel=1e-12)[0]


@pytest.fixture(scope="module")
def profile():
    return minima_profile()  # the default 8001 points per branch


def test_mws_length_from_curvature_matches_the_closed_form(profile):
    etas = np.array([0.05, 0.1, 0.25, 0.4, 0.7, 0.9, 0.99, 1.0, 1.01, 1.5])
    ours = weakly_stable_length(profile, etas)
    hand = np.array([_hand_length(e) for e in etas])
    # second order in the spacing of the points (linear interpolation of the threshold)
    np.testing.assert_allclose(ours, hand, rtol=1e-5, atol=1e-9)
    assert ours[1] == pytest.approx(14.4698, abs=1e-4)  # |M_WS(0.1)|, both branches


@pytest.mark.parametrize("extent", [32.0, 350.0])
def test_mws_length_does_not_depend_on_how_far_the_branches_reach(extent):
    """Regression: the segments were differences of the arclength cumulated from the far end
    of a branch (~e^extent), which past log_extent ~30 rounded the short segments near
    (1, 1) to 0: |M_WS| came out 0. The same spacing of the points must give the same length."""
    near = weakly_stable_length(minima_profile(log_extent=4.0, points=201), [0.1, 0.5])
    far = weakly_stable_length(
        minima_profile(log_extent=extent, points=int(50 * extent) + 1), [0.1, 0.5]
    )
    np.testing.assert_allclose(far, near, rtol=1e-9)
    assert near[0] == pytest.approx(14.4698, rel=1e-3)


def test_mws_length_criteria_and_branches():
    both = minima_profile(points=1001)
    paper = minima_profile(points=1001, criterion="lambda_min_nonzero")
    np.testing.assert_allclose(paper.thresholds, both.thresholds, rtol=1e-12)
    positive = minima_profile(points=1001, branches="positive")
    assert positive.xy.shape == (1, 1001, 2) and both.xy.shape == (2, 1001, 2)
    np.testing.assert_allclose(
        2 * weakly_stable_length(positive, [0.1, 0.5]), weakly_stable_length(both, [0.1, 0.5])
    )
    np.testing.assert_allclose(np.prod(both.xy, axis=-1), 1.0, rtol=1e-12)  # points of M
    np.testing.assert_allclose(both.thresholds, 2 / np.sum(both.xy**2, axis=-1), rtol=1e-12)


def test_unstable_convergence_fraction_flags_minima_outside_mws():
    # (2, 0.5) is a minimum with threshold 2/4.25 < 0.5: a fixed point, but not weakly stable;
    # (1.2, 1/1.2) has threshold 0.937 > 0.9: weakly stable; (0.5, 1.5) converges into M_WS.
    params0 = [
        np.array([2.0, 1.2, 0.5]).reshape(3, 1, 1),
        np.array([0.5, 1 / 1.2, 1.5]).reshape(3, 1, 1),
    ]
    result = sweep(
        two_neuron().loss,
        params0,
        np.array([0.3, 0.5, 0.9]),
        steps=500,
        min_loss_value=0.0,
        dtype=np.float64,
    )
    assert np.all(np.asarray(result.status)[:, :2] == int(TrajectoryStatus.CONVERGED_MINIMUM))
    np.testing.assert_allclose(unstable_convergence_fraction(result), [0.0, 1 / 3, 1 / 3])


def test_initial_grid_is_row_major_cell_centres():
    xs, ys, (w1, w2) = initial_grid([0.0, 1.0, 2.0, 4.0], 2, 3, np.float64)
    np.testing.assert_allclose(xs, [0.25, 0.75])
    np.testing.assert_allclose(ys, [2 + 1 / 3, 3.0, 4 - 1 / 3])
    assert w1.shape == (6, 1, 1)
    np.testing.assert_allclose(w1[:, 0, 0], [0.25, 0.75] * 3)
    np.testing.assert_allclose(w2[:, 0, 0], np.repeat(ys, 2))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = load_config(REPO / "configs" / "two_neuron.yaml", SHRUNK)
    out = tmp_path_factory.mktemp("tn") / "run"
    stream = io.StringIO()
    outcome = run_config(config, out=out, progress=False, stream=stream)
    return config, outcome, stream.getvalue()


def _png_size(path: pathlib.Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow  # the end-to-end run of the module fixture `run`
def test_run_writes_every_file(run):
    config, outcome, _ = run
    names = {p.name for p in outcome.path.iterdir()}
    expected = {RUN_MARKER, "config.yaml", "results.npz", "summary.json"}
    expected |= {f"{stem}.{ext}" for stem in FIGURES for ext in ("png", "pdf")}
    assert names == expected
    assert set(outcome.summary["files"]) == expected
    for stem, (width, height) in FIGURES.items():
        assert _png_size(outcome.path / f"{stem}.png") == (round(width * DPI), round(height * DPI))
        assert (outcome.path / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
    resolved = load_config(outcome.path / "config.yaml")
    assert resolved.params == config.params
    assert resolved.fingerprint == outcome.summary["fingerprint"] == config.fingerprint
    assert outcome.summary["overrides"] == SHRUNK
    assert outcome.summary["resumed"] is False


@pytest.mark.slow  # the end-to-end run of the module fixture `run`
def test_summary_converged_fraction_vanishes_exactly_above_eta_e(run):
    _, outcome, _ = run
    summary = json.loads((outcome.path / "summary.json").read_text())
    eta_e = summary["eta_E"]["computed"]
    assert eta_e == pytest.approx(1.0, rel=1e-6)
    assert summary["eta_E"]["closed_form"] == 1.0
    rows = summary["per_eta"]
    assert [r["eta"] for r in rows] == pytest.approx([0.3, 0.6, 0.9, 1.2])
    for row in rows:
        if row["eta"] < eta_e:
            assert row["converged_fraction"] > 0 and row["mws_length"] > 0
        else:
            assert row["converged_fraction"] == 0 and row["mws_length"] == 0
        assert sum(row["status_fractions"].values()) == pytest.approx(1.0)
        assert row["converged_outside_mws_fraction"] == 0
        assert row["mws_length"] == pytest.approx(_hand_length(row["eta"]), rel=1e-3, abs=1e-9)
    assert rows[0]["mws_length_normalised"] == pytest.approx(
        _hand_length(0.3) / _hand_length(0.1), rel=1e-3
    )
    assert summary["weak_stability"]["reference_length"] == pytest.approx(
        _hand_length(0.1), rel=1e-3
    )


@pytest.mark.slow  # the end-to-end run of the module fixture `run`
def test_results_arrays(run):
    config, outcome, _ = run
    with np.load(outcome.path / "results.npz") as results:
        status = results["sweep_status"]
        assert status.shape == (4, 64)
        np.testing.assert_allclose(
            results["sweep_converged_fraction"],
            np.mean(status == int(TrajectoryStatus.CONVERGED_MINIMUM), axis=1),
        )
        assert results["basin_status"].shape == (12, 12)
        # Figure 1: at eta = 0.4 every start is trapped, its last iterate on M; at 1.1 none is
        paths, panel_status = results["portrait0_paths"], results["portrait0_status"]
        assert paths.shape == (4, 61, 2)
        np.testing.assert_allclose(
            paths[:, 0], np.array([[x, y] for y in (0.625, 1.875) for x in (0.475, 1.825)])
        )
        assert np.all(panel_status == int(TrajectoryStatus.CONVERGED_MINIMUM))
        np.testing.assert_allclose(np.prod(paths[:, -1], axis=-1), 1.0, atol=1e-6)
        assert not np.any(results["portrait1_status"] == int(TrajectoryStatus.CONVERGED_MINIMUM))


@pytest.mark.slow  # the end-to-end run of the module fixture `run`
def test_terminal_table(run):
    _, outcome, text = run
    lines = text.splitlines()
    assert lines[0] == f"gdlr: running two_neuron (two_neuron) into {outcome.path}"
    assert lines[1].split()[0] == "eta" and "|M_WS|/ref" in lines[1]
    assert [line.split()[0] for line in lines[3:7]] == ["0.3", "0.6", "0.9", "1.2"]
    assert any(line.startswith("eta_E = ") for line in lines)
    files = 4 + 2 * len(FIGURES)  # the marker, config, results, summary and the figures
    assert lines[-1].startswith(f"gdlr: wrote {files} files to {outcome.path} in ")


def test_too_short_branch_is_a_config_error_and_leaves_nothing(tmp_path):
    config = load_config(
        REPO / "configs" / "two_neuron.yaml",
        ["weak_stability.log_extent=0.5", "weak_stability.points=101"],
    )
    with pytest.raises(
        ConfigError,
        match=r"^config key 'weak_stability.log_extent' has value 0.5: too short, the ends",
    ):
        run_config(config, out=tmp_path / "run", progress=False, stream=io.StringIO())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extent", ["351", "800"])
def test_a_branch_whose_curvature_overflows_is_refused_by_the_schema(extent):
    """Regression: past ~354.9 the curvature e^(2t) at the branch's ends overflowed float64,
    and the check of the extent then called the branch too *short*."""
    with pytest.raises(
        ConfigError,
        match=rf"'weak_stability.log_extent' has value {extent}; allowed: a finite number > 0 "
        r"and <= 350",
    ):
        load_config(REPO / "configs" / "two_neuron.yaml", [f"weak_stability.log_extent={extent}"])


# ----- what the figures show ------------------------------------------------------------------
CONVERGED, DIVERGED = int(TrajectoryStatus.CONVERGED_MINIMUM), int(TrajectoryStatus.DIVERGED)


def _panel(ends, status, region=(0.0, 2.0, 0.0, 2.0)):
    """A portrait panel whose trajectories go from (1, 1) to ``ends`` (NaN after the end)."""
    paths = np.full((len(ends), 3, 2), np.nan)
    paths[:, 0] = 1.0
    paths[:, 1] = ends
    profile = minima_profile(points=11)
    minima = figures.MinimaCurve(profile.xy, profile.thresholds > 0.4)
    return figures.PortraitPanel(0.4, region, paths, np.asarray(status), minima)


def test_portrait_shows_where_every_bounded_trajectory_ends():
    # one ends inside the region, one on the other branch (-1, -1), one diverged far away
    panel = _panel([[0.5, 1.5], [-1.0, -1.0], [50.0, 50.0]], [CONVERGED, CONVERGED, DIVERGED])
    np.testing.assert_array_equal(panel.last_iterates(), [[0.5, 1.5], [-1.0, -1.0], [50, 50]])
    x0, x1, y0, y1 = panel.view()
    assert (x1, y1) == (2.0, 2.0)  # grown only where an end lies outside
    assert x0 == y0 == pytest.approx(-1.0 - 0.05 * 3.0)  # 5 % of the larger side, 3
    assert panel.ends_outside(panel.region) == 2 and panel.ends_outside(panel.view()) == 1
    fig = figures.phase_portraits([panel])
    (ax,) = fig.axes
    assert ax.get_xlim() == pytest.approx((x0, x1)) and ax.get_ylim() == pytest.approx((y0, y1))
    assert ax.get_title().endswith("2 converged to a minimum, 1 diverged; 1 end off the panel")
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "region of the starts (2 of 3 end outside)" in legend

    inside = _panel([[0.5, 1.5], [1.5, 0.5]], [CONVERGED, CONVERGED])
    assert inside.view() == inside.region  # nothing to grow: the region as configured
    ax = figures.phase_portraits([inside]).axes[0]
    assert ax.get_title().endswith("\n2 converged to a minimum")
    assert not any("region" in t.get_text() for t in ax.get_legend().get_texts())


@pytest.mark.parametrize("criterion", CRITERIA)
def test_figure2_points_are_not_joined_and_the_legend_is_mathematics(criterion):
    etas = np.array([0.9, 0.95, 1.0, 1.05])
    fig = figures.weak_stability_vs_trapping(
        np.linspace(0.1, 1.05, 20), np.linspace(1.0, 0.0, 20), etas,
        np.array([0.65, 0.62, 0.0, 0.0]), 1.0,
        reference_eta=0.1, reference_length=14.4698, criterion=criterion,
    )
    (ax,) = fig.axes
    fraction = [line for line in ax.get_lines() if np.array_equal(line.get_xdata(), etas)]
    assert len(fraction) == 1 and fraction[0].get_linestyle() == "None"  # points only
    labels = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert criterion not in labels  # the config's name of the criterion is not shown
    assert f"2/{figures.CRITERION_TEX[criterion]}" in labels
