"""sweep(..., stop_at_convergence=False): converged trajectories keep stepping and recording,
their status and first convergence time still reported (issue 16; Figures 5-6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gdlr_jax as gj
from gdlr_jax.linear import two_neuron

KW = {"steps": 400, "check_every": 16, "record_every": 20, "dtype": jnp.float64, "min_loss_value": 0.0}


def _grid():
    x0 = jnp.linspace(0.3, 2.0, 6)
    return [x0[:, None, None], (0.5 * x0)[:, None, None]], jnp.array([0.3, 0.9, 1.2])


def test_converged_trajectories_keep_stepping_status_and_convergence_time_reported():
    net = two_neuron()
    params0, etas = _grid()
    frozen = gj.sweep(net.loss, params0, etas, **KW)
    coasting = gj.sweep(net.loss, params0, etas, stop_at_convergence=False, **KW)
    assert frozen.converged_at is None
    np.testing.assert_array_equal(coasting.status, frozen.status)
    converged = (frozen.status == gj.TrajectoryStatus.CONVERGED_MINIMUM) | (
        frozen.status == gj.TrajectoryStatus.CONVERGED_CRITICAL_POINT
    )
    assert converged.sum() >= 10 and (~converged).sum() >= 1
    # the first convergence time is the frozen run's steps_taken; -1 where none converged
    np.testing.assert_array_equal(coasting.converged_at, np.where(converged, frozen.steps_taken, -1))
    # ... but the converged ones were stepped to the end, like plain GD
    np.testing.assert_array_equal(coasting.steps_taken[converged], KW["steps"])
    np.testing.assert_array_equal(coasting.steps_taken[~converged], frozen.steps_taken[~converged])
    for i, eta in enumerate(np.asarray(etas)):
        g = jax.jit(gj.gd_map(net.loss, float(eta)))
        for j in np.flatnonzero(converged[i]):
            p = [params0[0][j], params0[1][j]]
            for _ in range(KW["steps"]):
                p = g(p)
            got = [np.asarray(w[i, j]) for w in coasting.final_params]
            np.testing.assert_allclose(got, [np.asarray(w) for w in p], rtol=1e-12, atol=1e-15)
    # recordings after convergence show the dynamics (here: eta ||grad L|| still falls), not
    # the value frozen at convergence
    i, j = np.argwhere(converged)[0]
    after = coasting.record_steps > frozen.steps_taken[i, j]
    frozen_tail = frozen.recorded_step_norm[i, j, after]
    coasting_tail = coasting.recorded_step_norm[i, j, after]
    assert np.all(frozen_tail == frozen_tail[0])
    assert coasting_tail[-1] < 1e-3 * frozen_tail[0]
    np.testing.assert_allclose(coasting.final_loss[i, j], coasting.recorded_loss[i, j, -1], rtol=1e-12)


def test_stop_at_convergence_must_be_a_bool():
    net = two_neuron()
    params0, etas = _grid()
    with pytest.raises(ValueError, match="stop_at_convergence must be a bool, got 'no'"):
        gj.sweep(net.loss, params0, etas, stop_at_convergence="no", **KW)
