"""Figure 6's measurement: the asymptotic eta ||grad L|| against eta and its two fits
(gdlr_jax.experiments.mnist.step_norm_growth)."""

from __future__ import annotations

import numpy as np
import pytest

from gdlr_jax.experiments.mnist import step_norm_growth

ETAS = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
RECORD_STEPS = np.arange(0, 101, 10)  # the tail: updates 80, 90, 100


def _rows(levels: np.ndarray) -> np.ndarray:
    """Recordings whose last 25 % equal ``levels`` and whose start is far off (left out)."""
    rows = np.full((len(levels), len(RECORD_STEPS)), 1e3)
    rows[:, RECORD_STEPS >= 75] = levels[:, None]
    return rows


def test_an_exponential_law_is_recovered_exactly():
    levels = 1e-4 * np.exp(6.0 * ETAS)
    growth = step_norm_growth(ETAS, _rows(levels), RECORD_STEPS)
    np.testing.assert_allclose(growth["asymptotic_step_norm"], levels, rtol=1e-12)
    assert growth["points"] == 5
    assert growth["exponential"]["slope"] == pytest.approx(6.0, rel=1e-10)
    assert growth["exponential"]["intercept"] == pytest.approx(np.log(1e-4), rel=1e-10)
    assert growth["exponential"]["r2"] == pytest.approx(1.0, abs=1e-12)
    assert growth["power_law"]["r2"] < 1.0


def test_a_power_law_is_recovered_and_fits_better_than_the_exponential():
    levels = 3e-3 * ETAS**1.5
    growth = step_norm_growth(ETAS, _rows(levels), RECORD_STEPS)
    assert growth["power_law"]["slope"] == pytest.approx(1.5, rel=1e-10)
    assert growth["power_law"]["r2"] == pytest.approx(1.0, abs=1e-12)
    assert growth["exponential"]["r2"] < growth["power_law"]["r2"]


def test_step_sizes_without_bounded_trajectories_are_left_out():
    """All diverged (NaN throughout the tail): None, and the fit uses the others; a NaN at one
    tail update (everything diverged there) only drops that update from the mean."""
    levels = 1e-4 * np.exp(6.0 * ETAS)
    rows = _rows(levels)
    rows[4, RECORD_STEPS >= 75] = np.nan
    rows[3, -1] = np.nan
    growth = step_norm_growth(ETAS, rows, RECORD_STEPS)
    assert growth["asymptotic_step_norm"][4] is None
    assert growth["asymptotic_step_norm"][3] == pytest.approx(levels[3], rel=1e-12)
    assert growth["points"] == 4
    assert growth["exponential"]["slope"] == pytest.approx(6.0, rel=1e-10)


def test_fewer_than_three_step_sizes_are_not_fitted():
    growth = step_norm_growth(ETAS[:2], _rows(np.array([1e-4, 2e-4])), RECORD_STEPS)
    assert growth["points"] == 2
    assert growth["exponential"] is None and growth["power_law"] is None
