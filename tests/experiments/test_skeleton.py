"""The skeleton every experiment shares: the common sections (every experiment's come from
it) and the run steps."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from gdlr_jax import ConvergenceCriteria, TrajectoryStatus
from gdlr_jax.experiments import _skeleton, figures
from gdlr_jax.experiments.config import EXPERIMENTS, ConfigError, get_experiment
from gdlr_jax.experiments.figures._common import new_figure
from gdlr_jax.experiments.runner import RunOutput, RunReport


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_experiment_has_the_common_sections(name):
    keys = get_experiment(name).schema.keys
    names = list(keys)
    assert names[0] == "dtype" and names[-2:] == ["engine", "figures"]
    assert keys["figures"] is _skeleton.FIGURES
    assert keys["engine"].check is _skeleton.engine_section({}).check  # the shared criteria
    assert keys["dtype"].choices == ("float32", "float64")
    engine = keys["engine"].validate({}, "engine")
    assert _skeleton.criteria(engine) == ConvergenceCriteria()  # the engine's defaults
    assert set(ConvergenceCriteria._fields) | {"check_every"} <= set(engine)


def test_engine_section_orders_the_chunking_keys_and_checks_the_criteria():
    chunk = {"chunk": _skeleton.Scalar(int, "a chunking key", 1, ge=1)}
    first = list(_skeleton.engine_section(chunk).keys)
    last = list(_skeleton.engine_section(chunk, chunking_last=True).keys)
    assert first[:2] == ["check_every", "chunk"] and last[-1] == "chunk"
    assert sorted(first) == sorted(last)
    with pytest.raises(ConfigError, match="criteria.window must be an integer >= 2 \\* max_period"):
        _skeleton.engine_section(chunk).validate({"window": 4, "max_period": 3}, "engine")


def test_status_fractions_and_cells():
    status = np.array([[1, 1, 3], [0, 4, 1]])  # 3 minima, 1 diverged, 1 not converged, 1 periodic
    fractions = _skeleton.status_fractions(status)
    assert fractions == {
        "not_converged": 1 / 6, "converged_minimum": 3 / 6, "converged_critical_point": 0.0,
        "diverged": 1 / 6, "periodic": 1 / 6, "chaotic": 0.0,
    }
    assert _skeleton.status_cells(fractions) == [3 / 6, 0.0, 1 / 6, 0.0, 1 / 6, 1 / 6]
    assert _skeleton.STATUS_HEADERS == (
        "minimum", "critical pt", "periodic", "chaotic", "not conv.", "diverged"
    )
    assert list(figures.STATUS_STYLE) == [
        TrajectoryStatus.CONVERGED_MINIMUM, TrajectoryStatus.CONVERGED_CRITICAL_POINT,
        TrajectoryStatus.PERIODIC, TrajectoryStatus.CHAOTIC, TrajectoryStatus.NOT_CONVERGED,
        TrajectoryStatus.DIVERGED,
    ]


@pytest.mark.parametrize("float64", [False, True])
def test_experiment_runs_the_steps_in_order_and_writes_every_file(tmp_path, float64):
    calls = []

    def plan(params):
        calls.append(("plan", jax.config.jax_enable_x64))
        return "planned"

    def compute(params, planned, steps):
        calls.append(("compute", jax.config.jax_enable_x64, planned))
        with steps.timed("part"):
            arrays = {"x": np.arange(3.0)}
        return type("Computed", (), {"arrays": arrays})()

    def draw(params, planned, computed):
        calls.append(("figures", computed.arrays["x"].sum()))
        yield "tiny", new_figure(1.0, 0.5)

    def report(params, planned, computed):
        calls.append(("report",))
        return RunReport(summary={"total": 3.0}, headers=["a"], rows=[[1]])

    experiment = _skeleton.experiment(
        name="toy", summary="a toy", schema=_skeleton.FIGURES, plan=plan, compute=compute,
        figures=draw, report=report, enable_x64=lambda params: float64,
    )
    params = {"figures": {"dpi": 20}}
    before = jax.config.jax_enable_x64
    planned = experiment.plan(params)
    output = RunOutput(tmp_path / "run")
    done = experiment.run(params, planned, output, progress=False)
    assert jax.config.jax_enable_x64 == before  # restored
    assert calls == [
        ("plan", float64), ("compute", float64, "planned"), ("figures", 3.0), ("report",)
    ]
    assert output.files == ["results.npz", "tiny.png", "tiny.pdf"]
    assert list(done.summary) == ["total", "timings_s"]
    assert list(done.summary["timings_s"]) == ["part", "figures"]
    json.dumps(done.summary)
    with np.load(tmp_path / "run" / "results.npz") as results:
        np.testing.assert_array_equal(results["x"], np.arange(3.0))
