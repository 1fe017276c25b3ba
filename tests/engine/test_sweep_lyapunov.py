"""The maximal Lyapunov exponent of the GD map (``sweep(..., lyapunov=True)``) and the
``CHAOTIC`` status, against independent float64 NumPy references: quadratics (the exponent is
``log|1 - eta lambda|`` exactly), the period-2 orbit of ``1/2 (1 - x y)^2`` at ``eta = 1.1``
(half the log spectral radius of ``DG(p2) DG(p1)``) and the cubic GD map of
``x^4/4 - x^2/2`` (chaotic at ``eta = 1.6, 1.9``, a long NumPy tangent iteration)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gdlr_jax
from gdlr_jax import ConvergenceCriteria, TrajectoryStatus
from gdlr_jax.engine._checkpoint import ChunkStore

S = TrajectoryStatus
NEVER_CONVERGED = ConvergenceCriteria(grad_tol=0.0, step_tol=0.0)  # every lane runs to the end


def quadratic_1d(x):
    """``lambda x^2 / 2`` with ``lambda = 2``: the GD map is ``x -> (1 - 2 eta) x``."""
    return jnp.sum(x**2)


QUADRATIC_ETAS = np.array([0.3, 0.6, 0.95, 1.0, 1.2])  # 1 - 2 eta: 0.4, -0.2, -0.9, -1, -1.4


@pytest.mark.slow
def test_one_dimensional_quadratic_is_log_abs_one_minus_eta_lambda():
    """``lambda x^2 / 2``, ``lambda = 2``. Lanes that never stop (tolerances 0): the replayed
    exponent of the constant ``DG = 1 - 2 eta`` is ``log|1 - 2 eta|`` to rounding; ``eta = 1``
    is the period-2 orbit ``x, -x`` (exponent 0) and ``eta = 1.2`` diverges (NaN). With the
    default criteria the stable step sizes converge, and the fixed point gives the same
    number."""
    x0 = np.array([[0.7], [-1.3]])
    expected = np.repeat(np.log(np.abs(1 - 2 * QUADRATIC_ETAS))[:, None], 2, 1)
    r = gdlr_jax.sweep(quadratic_1d, x0, QUADRATIC_ETAS, steps=300, dtype=jnp.float64,
                       lyapunov=True, lyapunov_steps=64, criteria=NEVER_CONVERGED)  # fmt: skip
    np.testing.assert_allclose(r.lyapunov_exponent[:3], expected[:3], rtol=1e-13)
    assert np.all(r.status[:3] == S.NOT_CONVERGED)  # negative exponents are not chaotic
    assert np.all(r.status[3] == S.PERIODIC) and np.all(r.period[3] == 2)
    np.testing.assert_allclose(r.lyapunov_exponent[3], 0.0, atol=1e-15)
    assert np.all(r.status[4] == S.DIVERGED) and np.all(np.isnan(r.lyapunov_exponent[4]))
    assert r.lyapunov_exponent.dtype == np.float64
    r = gdlr_jax.sweep(quadratic_1d, x0, QUADRATIC_ETAS, steps=300, dtype=jnp.float64,
                       lyapunov=True, lyapunov_steps=64)  # fmt: skip
    assert np.all(r.status[:3] == S.CONVERGED_MINIMUM)
    np.testing.assert_allclose(r.lyapunov_exponent[:3], expected[:3], rtol=1e-13)


def quadratic_problem(d: int, eigenvalues=None):
    """``1/2 theta^T H theta`` over two leaves ``(d - 1,)`` and ``(1,)``, a dense SPD ``H``
    with the given eigenvalues (default ``1 .. 4`` evenly; d = 2, 3: columns layout; d = 6:
    leaves layout)."""
    rng = np.random.default_rng(d)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    lam = np.linspace(1.0, 4.0, d) if eigenvalues is None else np.asarray(eigenvalues)
    h = q @ np.diag(lam) @ q.T

    def loss(p):
        theta = jnp.concatenate([p["a"], p["b"]])
        return 0.5 * theta @ jnp.asarray(h) @ theta

    p0 = {"a": rng.normal(size=(3, d - 1)), "b": rng.normal(size=(3, 1))}
    return loss, p0, h


@pytest.mark.slow
@pytest.mark.parametrize("d", [2, 3, 6])
def test_quadratic_fixed_points_are_the_extreme_log_abs_one_minus_eta_lambda(d):
    """Converged trajectories of a dense quadratic: ``max_i log|1 - eta lambda_i|`` (the
    eigenvalues by ``numpy.linalg.eigvalsh``), ``log|1 - eta lambda_max|`` for the larger step
    sizes; with step sizes per leaf, the extreme ``log|1 - mu|`` of ``D^1/2 H D^1/2``."""
    loss, p0, h = quadratic_problem(d)
    lam = np.linalg.eigvalsh(h)
    etas = np.array([0.1, 0.45, 0.48])
    r = gdlr_jax.sweep(loss, p0, etas, steps=2000, dtype=jnp.float64, lyapunov=True)
    assert np.all(r.status == S.CONVERGED_MINIMUM)
    expected = np.max(np.log(np.abs(1 - etas[:, None] * lam[None, :])), axis=1)
    np.testing.assert_allclose(r.lyapunov_exponent, np.repeat(expected[:, None], 3, 1),
                               rtol=1e-9)  # fmt: skip
    np.testing.assert_allclose(expected[1:], np.log(np.abs(1 - etas[1:] * lam[-1])))
    per_leaf = {"a": np.array([0.1, 0.4]), "b": np.array([0.3, 0.05])}
    r = gdlr_jax.sweep(loss, p0, per_leaf, steps=3000, dtype=jnp.float64, lyapunov=True)
    assert np.all(r.status == S.CONVERGED_MINIMUM)
    for i in range(2):
        root = np.sqrt(np.concatenate([np.full(d - 1, per_leaf["a"][i]), [per_leaf["b"][i]]]))
        mu = np.linalg.eigvalsh(root[:, None] * h * root[None, :])
        np.testing.assert_allclose(r.lyapunov_exponent[i], np.max(np.log(np.abs(1 - mu))),
                                   rtol=1e-9)  # fmt: skip


@pytest.mark.slow
def test_quadratic_fixed_points_by_lanczos_when_the_krylov_space_is_smaller_than_d():
    """``sharpness_iterations = 3 < d = 6``: the ends of a Lanczos run. With the eigenvalues
    1 and 4, each three times, the Krylov space of any start holds both ends after two steps,
    so the exponent is exactly ``max(log|1 - eta|, log|1 - 4 eta|)``."""
    loss, p0, _ = quadratic_problem(6, [1.0, 1.0, 1.0, 4.0, 4.0, 4.0])
    etas = np.array([0.1, 0.45])
    r = gdlr_jax.sweep(loss, p0, etas, steps=2000, dtype=jnp.float64, lyapunov=True,
                       sharpness_iterations=3)  # fmt: skip
    assert np.all(r.status == S.CONVERGED_MINIMUM)
    expected = np.maximum(np.log(np.abs(1 - etas)), np.log(np.abs(1 - 4 * etas)))
    np.testing.assert_allclose(r.lyapunov_exponent, np.repeat(expected[:, None], 3, 1),
                               rtol=1e-9)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("d", [3, 6])
def test_quadratic_replay_tends_to_the_log_spectral_radius(d):
    """Lanes that never stop (tolerances 0): the replayed exponent of the constant map
    ``I - D H`` is ``log rho(I - D H) + log|c_1| / L + O(r^L / L)`` (``c_1`` the start tangent's
    component along the top eigenvector): within ``5 / L``, one step size and per leaf."""
    loss, p0, h = quadratic_problem(d)
    steps = length = 512
    etas = np.array([0.3, 0.45, 0.6])  # 0.6 * 4 > 2: diverges
    r = gdlr_jax.sweep(loss, p0, etas, steps=steps, dtype=jnp.float64, lyapunov=True,
                       lyapunov_steps=length, criteria=NEVER_CONVERGED)  # fmt: skip
    lam = np.linalg.eigvalsh(h)
    expected = np.max(np.log(np.abs(1 - etas[:2, None] * lam[None, :])), axis=1)
    np.testing.assert_allclose(r.lyapunov_exponent[:2], np.repeat(expected[:, None], 3, 1),
                               atol=5 / length)  # fmt: skip
    assert np.all(r.status[2] == S.DIVERGED) and np.all(np.isnan(r.lyapunov_exponent[2]))
    per_leaf = {"a": np.array([0.4]), "b": np.array([0.1])}
    r = gdlr_jax.sweep(loss, p0, per_leaf, steps=steps, dtype=jnp.float64, lyapunov=True,
                       lyapunov_steps=length, criteria=NEVER_CONVERGED)  # fmt: skip
    dg = np.eye(d) - np.concatenate([np.full(d - 1, 0.4), [0.1]])[:, None] * h
    radius = np.max(np.abs(np.linalg.eigvals(dg)))
    np.testing.assert_allclose(r.lyapunov_exponent[0], np.log(radius), atol=5 / length)


def two_neuron(theta):
    return 0.5 * (1.0 - theta[0] * theta[1]) ** 2


def two_neuron_orbit_exponent(eta: float, start: tuple[float, float]) -> tuple[float, np.ndarray]:
    """The period-2 orbit reached from ``start`` (20000 float64 NumPy GD steps) and
    ``(1/2) log rho(DG(p2) DG(p1))``, ``DG = I - eta H``, ``H = [[y^2, 2xy - 1], [2xy - 1, x^2]]``."""

    def grad(p):
        x, y = p
        return -(1 - x * y) * np.array([y, x])

    def jacobian(p):
        x, y = p
        return np.eye(2) - eta * np.array([[y * y, 2 * x * y - 1], [2 * x * y - 1, x * x]])

    p = np.array(start, float)
    for _ in range(20000):
        p = p - eta * grad(p)
    q = p - eta * grad(p)
    assert np.allclose(q - eta * grad(q), p, rtol=1e-14) and not np.allclose(p, q)
    product = jacobian(q) @ jacobian(p)
    return 0.5 * np.log(np.max(np.abs(np.linalg.eigvals(product)))), np.array([p, q])


@pytest.mark.slow
def test_two_neuron_period_two_orbit_at_eta_1_1():
    """At ``eta = 1.1`` the starts settle on the period-2 orbit across the valley
    ``(0.8146, 0.8146) <-> (1.1161, 1.1161)``; its exponent, half the log spectral radius of
    ``DG(p2) DG(p1)`` (eigenvalues 0.8 and 0.18: ``log(0.8) / 2 = -0.1116``), is matched
    within ``3 / L`` (the tangent's alignment, ``log|c_1| / L``, and the ratio 0.18/0.8 per
    period)."""
    starts = [(1.2, 1.1), (0.9, 1.15), (0.8, 1.2)]
    length = 256
    r = gdlr_jax.sweep(two_neuron, np.array(starts), [1.1], steps=600, min_loss_value=0.0,
                       dtype=jnp.float64, lyapunov=True, lyapunov_steps=length)  # fmt: skip
    assert np.all(r.status == S.PERIODIC) and np.all(r.period == 2)
    for j, start in enumerate(starts):
        expected, orbit = two_neuron_orbit_exponent(1.1, start)
        assert np.min(np.abs(orbit - r.final_params[0, j]).max(axis=1)) < 1e-8
        np.testing.assert_allclose(r.lyapunov_exponent[0, j], expected, atol=3 / length)
        assert r.lyapunov_exponent[0, j] < 0  # an attracting orbit


def cubic(x):
    """``x^4/4 - x^2/2``: the GD map ``x -> (1 + eta) x - eta x^3`` is a cubic map."""
    return jnp.sum(x**4 / 4 - x**2 / 2)


def cubic_reference_exponent(eta: float, x0: float, steps: int, burn_in: int = 1000) -> float:
    """``(1/n) sum log|1 - eta (3 x_t^2 - 1)|`` along a float64 NumPy orbit of the cubic map."""
    x = x0
    for _ in range(burn_in):
        x = x - eta * (x**3 - x)
    total = 0.0
    for _ in range(steps):
        total += np.log(abs(1 - eta * (3 * x * x - 1)))
        x = x - eta * (x**3 - x)
    return total / steps


def cubic_orbit_logs(eta: float, x0: float, period: int) -> np.ndarray:
    """``log|G'(x_i)|`` on the period-``p`` orbit reached from ``x0`` (20000 float64 NumPy
    steps of ``G(x) = x - eta (x^3 - x)``, ``G'(x) = 1 - eta (3 x^2 - 1)``): their mean is the
    orbit's exponent ``(1/p) log|G'(x_1) ... G'(x_p)|``."""
    x = x0
    for _ in range(20000):
        x = x - eta * (x**3 - x)
    orbit = [x]
    for _ in range(period - 1):
        orbit.append(orbit[-1] - eta * (orbit[-1] ** 3 - orbit[-1]))
    assert abs(orbit[-1] - eta * (orbit[-1] ** 3 - orbit[-1]) - x) < 1e-12
    return np.log(np.abs(1 - eta * (3 * np.array(orbit) ** 2 - 1)))


def fixed_point_log(eta: float, x: np.ndarray) -> np.ndarray:
    """``log|1 - eta L''(x)|``, ``L''(x) = 3 x^2 - 1``, at converged iterates ``(n, 1)``."""
    return np.log(np.abs(1 - eta * (3 * x[:, 0] ** 2 - 1)))


def test_cubic_map_converged_periodic_chaotic_and_diverged():
    """The GD map of ``x^4/4 - x^2/2`` in float64, the exponent over the last 128 of 300 steps:

    * ``eta = 0.8``: converged near ``x = +-1``: ``log|1 - 0.8 L''(x)|`` at the final iterate
      to rounding (``log 0.6`` at ``x = 1``);
    * ``eta = 1.1``: the period-2 orbit ``+-(0.8146, 1.1161)``: 128 steps are 64 periods on the
      orbit, so the exponent is the NumPy orbit's ``(1/2) log|G'(x_1) G'(x_2)| = -0.857`` to
      rounding (a 1-D tangent needs no alignment);
    * ``eta = 1.9``: ``CHAOTIC``; the long-run exponent is 0.879 (10^5 NumPy steps, see the
      slow test), a 128-step estimate spreads by about 0.035 over starts: within 0.15;
    * ``eta = 2.2``: diverged, NaN.
    """
    x0 = np.array([[0.3], [0.7]])
    r = gdlr_jax.sweep(cubic, x0, [0.8, 1.1, 1.9, 2.2], steps=300, dtype=jnp.float64,
                       lyapunov=True, lyapunov_steps=128)  # fmt: skip
    assert r.lyapunov_exponent.shape == r.status.shape
    assert np.all(r.status[0] == S.CONVERGED_MINIMUM)
    np.testing.assert_allclose(r.lyapunov_exponent[0], fixed_point_log(0.8, r.final_params[0]),
                               rtol=1e-12)  # fmt: skip
    np.testing.assert_allclose(r.lyapunov_exponent[0], np.log(0.6), rtol=1e-6)
    assert np.all(r.status[1] == S.PERIODIC) and np.all(r.period[1] == 2)
    np.testing.assert_allclose(r.lyapunov_exponent[1], np.mean(cubic_orbit_logs(1.1, 0.5, 2)),
                               rtol=1e-10)  # fmt: skip
    assert np.all(r.status[2] == S.CHAOTIC) and np.all(r.period[2] == 0)
    assert np.all(np.abs(r.lyapunov_exponent[2] - 0.879) < 0.15)
    assert np.all(r.status[3] == S.DIVERGED) and np.all(np.isnan(r.lyapunov_exponent[3]))


CUBIC_ETAS = np.array([0.8, 1.1, 1.6, 1.7, 1.9, 2.2])


@pytest.mark.slow
def test_cubic_map_chaotic_periodic_and_converged_regimes():
    """The exponents over the default 256 final steps against a 10^5-step NumPy iteration.

    * ``eta = 1.6, 1.9``: chaotic, long-run exponents 0.682 and 0.879. Each finite-time
      estimate spreads by 0.015 / 0.025 over starts (measured with NumPy), so the mean over 16
      starts is within 0.03 (five standard errors); every start is ``CHAOTIC``.
    * ``eta = 1.1``: the period-2 orbit, exponent -0.857; ``eta = 1.7``: a periodic window
      (period 6: -0.435 or -0.449, the start's orbit); both ``PERIODIC``. On a 1-D orbit the
      exponent over whole periods is the orbit's ``(1/p) sum log|G'(x_i)|`` to rounding (128
      steps: 64 periods of 2); 256 steps are 42 periods of 6 and 4 steps more, which move it
      by at most ``4 max_i |log|G'(x_i)| - mean| / 256``.
    * ``eta = 0.8``: converged near ``x = +-1``, ``log|1 - 0.8 L''(x)|`` (``log 0.6`` at 1).
    * ``eta = 2.2``: diverged, NaN.
    """
    x0 = np.linspace(0.25, 1.15, 16)[:, None]  # not 1.0: the fixed point itself
    r = gdlr_jax.sweep(cubic, x0, CUBIC_ETAS, steps=600, dtype=jnp.float64, lyapunov=True)
    assert np.all(r.status[0] == S.CONVERGED_MINIMUM)
    np.testing.assert_allclose(r.lyapunov_exponent[0], fixed_point_log(0.8, r.final_params[0]),
                               rtol=1e-12)  # fmt: skip
    np.testing.assert_allclose(r.lyapunov_exponent[0], np.log(0.6), rtol=1e-6)
    assert np.all(r.status[1] == S.PERIODIC) and np.all(r.period[1] == 2)
    np.testing.assert_allclose(r.lyapunov_exponent[1], np.mean(cubic_orbit_logs(1.1, 0.5, 2)),
                               rtol=1e-10)  # fmt: skip
    assert np.all(r.status[3] == S.PERIODIC) and np.all(r.period[3] == 6)
    for j, x in enumerate(np.linspace(0.25, 1.15, 16)):  # 256 = 42 periods + 4 steps
        logs = cubic_orbit_logs(1.7, x, 6)
        bound = 4 * np.max(np.abs(logs - logs.mean())) / 256 + 1e-12
        assert abs(r.lyapunov_exponent[3, j] - logs.mean()) <= bound
    for i in (2, 4):
        assert np.all(r.status[i] == S.CHAOTIC) and np.all(r.period[i] == 0)
        reference = cubic_reference_exponent(CUBIC_ETAS[i], 0.3, 100_000)
        assert abs(np.mean(r.lyapunov_exponent[i]) - reference) < 0.03
        assert np.all(r.lyapunov_exponent[i] > 0.5)
    assert np.all(r.status[5] == S.DIVERGED) and np.all(np.isnan(r.lyapunov_exponent[5]))
    # the tolerance decides: above every exponent nothing is chaotic
    high = gdlr_jax.sweep(cubic, np.array([[0.3], [0.7]]), [1.9], steps=600, dtype=jnp.float64,
                          lyapunov=True, criteria=ConvergenceCriteria(lyapunov_tol=2.0))
    assert np.all(high.status == S.NOT_CONVERGED)


@pytest.mark.slow
def test_cubic_map_is_chaotic_in_float32_at_eta_1_9():
    """The default float32 sweep: chaotic at ``eta = 1.9`` (exponent 0.88), converged at 0.8;
    without ``lyapunov`` the same chaotic starts are ``NOT_CONVERGED`` and there is no
    exponent."""
    x0 = np.array([[0.3], [0.7]])
    r = gdlr_jax.sweep(cubic, x0, [0.8, 1.9], steps=300, lyapunov=True, lyapunov_steps=128)
    assert r.lyapunov_exponent.dtype == np.float32
    assert np.all(r.status[0] == S.CONVERGED_MINIMUM)
    np.testing.assert_allclose(r.lyapunov_exponent[0], np.log(0.6), rtol=1e-5)
    assert np.all(r.status[1] == S.CHAOTIC)
    assert np.all(np.abs(r.lyapunov_exponent[1] - 0.879) < 0.15)
    off = gdlr_jax.sweep(cubic, x0, [0.8, 1.9], steps=300)
    assert off.lyapunov_exponent is None and np.all(off.status[1] == S.NOT_CONVERGED)
    np.testing.assert_array_equal(off.final_params[1], r.final_params[1])


@pytest.mark.slow
def test_chunks_checkpoints_and_the_memory_estimate(tmp_path):
    """Chunks of two trajectories give the one-chunk exponents bit for bit; a checkpointed
    sweep resumes them; the estimates grow by the exponent's share."""
    x0 = np.linspace(0.2, 1.2, 4)[:, None]
    kwargs = dict(loss_fn=cubic, params0=x0, etas=[0.8, 1.9], steps=200, lyapunov=True,
                  lyapunov_steps=64)  # fmt: skip
    whole = gdlr_jax.sweep(**kwargs)
    chunked = gdlr_jax.sweep(chunk_size=2, **kwargs)
    np.testing.assert_array_equal(whole.lyapunov_exponent, chunked.lyapunov_exponent)
    np.testing.assert_array_equal(whole.status, chunked.status)
    folder = tmp_path / "checkpoints"
    first = gdlr_jax.sweep(chunk_size=2, checkpoint_dir=folder, **kwargs)
    resumed = gdlr_jax.sweep(chunk_size=2, checkpoint_dir=folder, **kwargs)
    np.testing.assert_array_equal(first.lyapunov_exponent, resumed.lyapunov_exponent)
    np.testing.assert_array_equal(first.lyapunov_exponent, whole.lyapunov_exponent)
    on = gdlr_jax.plan_sweep(**kwargs)
    off = gdlr_jax.plan_sweep(cubic, x0, [0.8, 1.9], steps=200)
    assert on.chunk_bytes > off.chunk_bytes
    assert on.result_bytes == off.result_bytes + 8 * 4  # one float32 per trajectory


def test_a_chunk_file_written_before_the_field_existed_still_loads(tmp_path):
    """A chunk file without a ``lyapunov_exponent`` entry (older checkpoints) loads as
    ``None`` for a sweep without ``lyapunov``; a folder of such a sweep is refused for a sweep
    with it, in one line naming the setting."""
    kwargs = dict(loss_fn=cubic, params0=np.array([[0.3], [0.7]]), etas=[0.8], steps=50)
    plan = gdlr_jax.plan_sweep(**kwargs)
    store = ChunkStore(tmp_path / "c", plan)
    chunk = plan.run_chunk(0)
    store.save(0, chunk)
    with np.load(store.path(0)) as data:
        arrays = dict(data)
    layout = json.loads(str(arrays["__layout__"]))
    del layout["fields"]["lyapunov_exponent"]
    arrays["__layout__"] = np.array(json.dumps(layout))
    np.savez(store.path(0), **arrays)
    loaded = ChunkStore(tmp_path / "c", plan).load(0)
    assert loaded is not None and loaded.lyapunov_exponent is None
    np.testing.assert_array_equal(loaded.status, chunk.status)
    with pytest.raises(gdlr_jax.CheckpointMismatchError, match="engine.lyapunov_steps") as err:
        gdlr_jax.sweep(checkpoint_dir=tmp_path / "c", lyapunov=True, **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lyapunov="yes"), "lyapunov must be a bool, got 'yes'"),
        (dict(lyapunov_steps=10), "lyapunov_steps = 10 needs lyapunov=True"),
        (dict(lyapunov=True, lyapunov_steps=0), "lyapunov_steps must be a positive integer"),
        (dict(lyapunov=True, lyapunov_steps=2.5), "lyapunov_steps must be a positive integer"),
        (dict(lyapunov=True, lyapunov_steps=51), "lyapunov_steps = 51 exceeds steps = 50"),
        (dict(lyapunov=True, optimizer=optax.sgd), "lyapunov=True needs plain GD"),
        (dict(lyapunov=True, criteria=ConvergenceCriteria(lyapunov_tol=-1.0)),
         "criteria.lyapunov_tol must be a non-negative number, got -1.0"),
        (dict(lyapunov=True, criteria=ConvergenceCriteria(lyapunov_tol=float("nan"))),
         "criteria.lyapunov_tol must be a non-negative number"),
        (dict(sharpness_iterations=1), "sharpness_iterations needs sharpness_every"),
    ],
)
def test_bad_lyapunov_arguments_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        gdlr_jax.sweep(cubic, np.array([[0.3]]), [1.0], steps=50, **kwargs)
    assert "\n" not in str(err.value)


def test_lyapunov_refuses_a_minibatch_source():
    data = (np.ones((8, 1)), np.ones(8))

    def regression(w, batch):
        return 0.5 * jnp.mean((batch[0] @ w - batch[1]) ** 2)

    with pytest.raises(ValueError, match="lyapunov=True needs full-batch GD"):
        gdlr_jax.sweep(regression, np.zeros((2, 1)), [0.1], steps=10, lyapunov=True,
                       batch_source=(data, 4), key=jax.random.key(0))


def test_the_default_window_is_256_steps_capped_at_steps():
    def window(**kwargs):
        return gdlr_jax.plan_sweep(cubic, np.array([[0.3]]), [1.0], **kwargs)._config

    assert window(steps=1000, lyapunov=True).lyapunov_steps == 256
    assert window(steps=100, lyapunov=True).lyapunov_steps == 100
    assert window(steps=100).lyapunov_steps == 0


SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    import gdlr_jax

    devices = jax.local_devices()
    assert len(devices) == 2, devices

    def cubic(x):
        return jnp.sum(x**4 / 4 - x**2 / 2)

    kwargs = dict(loss_fn=cubic, params0=np.linspace(0.2, 1.2, 5)[:, None],
                  etas=[0.8, 1.1, 1.9], steps=300, dtype=jnp.float64, lyapunov=True)
    one = gdlr_jax.sweep(devices=devices[:1], **kwargs)
    two = gdlr_jax.sweep(devices=devices, **kwargs)
    np.testing.assert_array_equal(one.lyapunov_exponent, two.lyapunov_exponent)
    np.testing.assert_array_equal(one.status, two.status)
    print("statuses", sorted(set(one.status.ravel().tolist())))
    print("IDENTICAL")
    """
)


@pytest.mark.slow
def test_two_devices_give_the_exponents_of_one():
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "IDENTICAL" in out.stdout and "statuses [1, 4, 5]" in out.stdout
