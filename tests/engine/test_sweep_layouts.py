"""The lane layouts and step loop of the engine (issue 13) and step sizes per parameter leaf
(issue 17): every layout and every ``step_block`` gives the same trajectories, and per-leaf
step sizes take the step ``theta_l - eta_l grad_l L`` of a plain Python loop."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gdlr_jax
from gdlr_jax import TrajectoryStatus
from gdlr_jax.engine import _problem, _stepping
from gdlr_jax.engine._sharding import run_sharded

S = TrajectoryStatus
INITS = np.array([[0.5, 1.5], [0.0, 0.0], [1.2, 1.1], [1e3, 1e3], [-0.7, 0.4], [3.0, 2.5]])
ETAS = np.array([0.4, 1.05, 1.5])
CLASSIFICATION = ("status", "steps_taken", "period")


def two_neuron(theta):
    return 0.5 * (1.0 - theta[0] * theta[1]) ** 2


def two_neuron_dict(params):
    return 0.5 * (1.0 - params["x"] * params["y"]) ** 2


def sweep64(loss, params0, etas=ETAS, **kwargs):
    kwargs = {"steps": 200, "min_loss_value": 0.0, "dtype": jnp.float64, "check_every": 16} | kwargs
    return gdlr_jax.sweep(loss, params0, etas, **kwargs)


def assert_same_trajectories(a, b, rtol=0.0):
    for name in CLASSIFICATION:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    leaves = zip(*map(jax.tree_util.tree_leaves, (a.final_params, b.final_params)))
    for x, y in leaves:
        np.testing.assert_allclose(x, y, rtol=rtol, atol=0)
    # a loss near 0 is 1 - theta_1 theta_2 ... squared: its rounding is absolute, not relative
    np.testing.assert_allclose(a.final_loss, b.final_loss, rtol=rtol, atol=1e-18 if rtol else 0)


@pytest.mark.slow
@pytest.mark.parametrize("step_block", [1, 3, 4, 8])
def test_every_step_block_gives_the_same_trajectories(step_block):
    """Unrolling only groups steps: the iterates, statuses and recordings are bit for bit those
    of one step at a time (blocks of k with a remainder between evaluation times)."""
    kwargs = {"record_every": 5, "record_params": True}
    one = sweep64(two_neuron, INITS, step_block=1, **kwargs)
    blocked = sweep64(two_neuron, INITS, step_block=step_block, **kwargs)
    assert_same_trajectories(one, blocked)
    np.testing.assert_array_equal(one.recorded_params, blocked.recorded_params)
    np.testing.assert_array_equal(one.recorded_step_norm, blocked.recorded_step_norm)


def test_array_and_dict_params_give_the_same_trajectories():
    """The (n, 2) array and the dict of (n,) leaves are stored alike (one column per scalar):
    the same statuses and, bit for bit, the same iterates and losses."""
    array = sweep64(two_neuron, INITS)
    as_dict = sweep64(two_neuron_dict, {"x": INITS[:, 0], "y": INITS[:, 1]})
    for name in CLASSIFICATION + ("final_loss", "final_grad_norm", "asymptotic_step_norm"):
        np.testing.assert_array_equal(getattr(array, name), getattr(as_dict, name), err_msg=name)
    np.testing.assert_array_equal(array.final_params[..., 0], as_dict.final_params["x"])
    np.testing.assert_array_equal(array.final_params[..., 1], as_dict.final_params["y"])


@pytest.mark.slow
def test_forward_and_reverse_mode_give_the_same_statuses(monkeypatch):
    """Below FORWARD_MODE_MAX_PARAMS the gradient is taken by forward mode (columns), above by
    reverse mode (leaves): the two give the same statuses, and iterates equal to rounding
    (the products are associated differently) on trajectories that do not amplify it."""
    assert _problem.uses_columns(
        _problem.EngineConfig(two_neuron, None, gdlr_jax.ConvergenceCriteria(), 0.0, 10, 4,
                              None, False, None, True), 2, False
    )

    def chain(theta):
        return 0.5 * (1.0 - theta[0] * theta[1] * theta[2]) ** 2

    rng = np.random.default_rng(0)
    inits = rng.uniform(0.5, 1.3, (40, 3))
    etas = np.array([0.1, 0.3])  # below the edge of stability of the chain: no chaos
    forward = sweep64(chain, inits, etas, steps=300)
    monkeypatch.setattr(_problem, "FORWARD_MODE_MAX_PARAMS", 2)

    def chain_again(theta):  # a new function object: a new compilation
        return chain(theta)

    reverse = sweep64(chain_again, inits, etas, steps=300)
    assert_same_trajectories(forward, reverse, rtol=1e-12)
    assert np.all(forward.status == S.CONVERGED_MINIMUM)


@pytest.mark.slow
def test_the_written_out_window_classifies_like_the_history(monkeypatch):
    """The final window of the columns is written out step by step, that of the leaves (and
    of a long window) is a history filled in a loop: with evaluation times inside the window
    (recordings every 3 steps, the Lyapunov steps starting inside it) both give the same
    statuses, periods, recordings and exponents (the columns bit for bit, but for the last
    bit of a mean step length; the leaves to rounding: their gradients are associated
    differently)."""
    etas = np.array([0.4, 1.05, 1.9])  # converging, period 2, diverging
    kwargs = dict(steps=200, record_every=3, lyapunov=True, lyapunov_steps=10)
    inits = np.concatenate([INITS, [[1.3, 0.6], [0.9, 1.2]]])
    columns = sweep64(two_neuron, inits, etas, **kwargs)

    def two_neuron_again(theta):  # a new function object: a new compilation
        return two_neuron(theta)

    def two_neuron_once_more(theta):
        return two_neuron(theta)

    monkeypatch.setattr(_stepping, "WINDOW_WRITTEN_OUT", 0)  # the columns with a history
    history = sweep64(two_neuron_again, inits, etas, **kwargs)
    assert_same_trajectories(columns, history)
    for name in ("recorded_loss", "lyapunov_exponent"):
        np.testing.assert_array_equal(getattr(columns, name), getattr(history, name))
    # the same iterates; the mean step length is summed in another XLA fusion (a last bit)
    np.testing.assert_allclose(columns.asymptotic_step_norm, history.asymptotic_step_norm,
                               rtol=1e-15)  # fmt: skip
    monkeypatch.setattr(_problem, "FORWARD_MODE_MAX_PARAMS", 1)
    leaves = sweep64(two_neuron_once_more, inits, etas, **kwargs)
    assert_same_trajectories(columns, leaves, rtol=1e-12)
    assert {S.CONVERGED_MINIMUM, S.PERIODIC, S.DIVERGED} <= set(columns.status.ravel())
    np.testing.assert_allclose(columns.recorded_loss, leaves.recorded_loss, rtol=1e-9, atol=1e-18)
    np.testing.assert_allclose(columns.lyapunov_exponent, leaves.lyapunov_exponent, atol=1e-9)
    np.testing.assert_allclose(
        columns.asymptotic_step_norm, leaves.asymptotic_step_norm, rtol=1e-9
    )


def test_the_leaves_take_the_gradient_of_an_evaluation_like_a_plain_loop():
    """The leaves keep the gradient of each evaluation for the next step: the iterates are
    those of a plain ``vmap`` of a GD loop."""
    def loss(params):  # 6 scalars: the leaves layout
        return 0.5 * jnp.sum((params["w"] * params["v"] - 1.0) ** 2) + 0.1 * jnp.sum(params["w"])

    rng = np.random.default_rng(1)
    params0 = {"w": rng.uniform(0.5, 1.5, (5, 3)), "v": rng.uniform(0.5, 1.5, (5, 3))}
    steps, eta = 70, 0.3
    r = gdlr_jax.sweep(loss, params0, [eta], steps=steps, check_every=8,
                       criteria=gdlr_jax.ConvergenceCriteria(grad_tol=0.0, step_tol=0.0))  # fmt: skip

    def run(params):
        return jax.lax.fori_loop(
            0, steps, lambda _, p: jax.tree.map(lambda x, g: x - eta * g, p, jax.grad(loss)(p)),
            params,
        )

    expected = jax.jit(jax.vmap(run))(jax.tree.map(jnp.float32, params0))
    for name in ("w", "v"):
        np.testing.assert_allclose(r.final_params[name][0], expected[name], rtol=1e-6)
    assert np.all(r.steps_taken == steps)


def python_loop(grad, params, etas, steps, bound):
    """Per-leaf GD ``theta_l - eta_l grad_l`` one step at a time; stops before the first step
    that leaves the bound (the engine's exact divergence step)."""
    for t in range(steps):
        new = jax.tree_util.tree_map(lambda p, e, g: p - e * g, params, etas, grad(params))
        if not all(np.all(np.abs(x) <= bound) for x in jax.tree_util.tree_leaves(new)):
            return params, t
        params = new
    return params, steps


def test_per_leaf_step_sizes_follow_a_python_loop():
    """etas = {"x": (n_eta,), "y": (n_eta,)}: trajectory (i, j) steps x - eta_x[i] d_x L and
    y - eta_y[i] d_y L; its final iterate and steps taken are those of the loop."""
    etas = {"x": np.array([0.2, 0.9, 1.6]), "y": np.array([0.5, 0.5, 0.3])}
    inits = {"x": INITS[:, 0], "y": INITS[:, 1]}
    steps = 120
    r = sweep64(two_neuron_dict, inits, etas, steps=steps, check_every=8)
    assert r.status.shape == (3, len(INITS))
    grad = jax.jit(jax.grad(two_neuron_dict))
    bound = gdlr_jax.ConvergenceCriteria().divergence_bound
    for i in range(3):
        for j in range(len(INITS)):
            start = {"x": np.float64(INITS[j, 0]), "y": np.float64(INITS[j, 1])}
            eta = {"x": etas["x"][i], "y": etas["y"][i]}
            taken = int(r.steps_taken[i, j])
            if r.status[i, j] == S.DIVERGED:
                final, t = python_loop(grad, start, eta, steps, bound)
                assert t == taken
            else:
                final, _ = python_loop(grad, start, eta, taken, np.inf)
            np.testing.assert_allclose(r.final_params["x"][i, j], final["x"], rtol=1e-12)
            np.testing.assert_allclose(r.final_params["y"][i, j], final["y"], rtol=1e-12)
    # the converged ones satisfy the criterion with the largest step size of the leaves
    converged = r.status == S.CONVERGED_MINIMUM
    assert converged.any()
    largest = np.maximum(etas["x"], etas["y"])[:, None]
    assert np.all(largest * r.final_grad_norm <= 1e-6, where=converged)
    # one step size per leaf equal to a common one is the ordinary sweep
    same = sweep64(two_neuron_dict, inits, {"x": ETAS, "y": ETAS})
    assert_same_trajectories(same, sweep64(two_neuron_dict, inits, ETAS))


@pytest.mark.parametrize(
    ("etas", "kwargs", "message"),
    [
        ({"x": np.array([0.1]), "y": np.array([0.1, 0.2])}, {}, "same length n_eta"),
        ({"x": np.array([0.1]), "y": np.array([-0.1])}, {}, r"etas\['y'\]: etas must be positive"),
        ({"x": np.array([0.1]), "z": np.array([0.1])}, {}, "structure of the params"),
        ({"x": np.array([0.1]), "y": np.array([0.1])}, {"optimizer": "sgd"}, "need plain GD"),
    ],
)
def test_per_leaf_step_sizes_are_checked(etas, kwargs, message):
    import optax

    if kwargs.get("optimizer") == "sgd":
        kwargs = {"optimizer": optax.sgd}
    inits = {"x": INITS[:, 0], "y": INITS[:, 1]}
    with pytest.raises(ValueError, match=message):
        gdlr_jax.plan_sweep(two_neuron_dict, inits, etas, steps=10, **kwargs)


def test_step_block_is_checked():
    with pytest.raises(ValueError, match="step_block must be a positive integer, got 0"):
        gdlr_jax.plan_sweep(two_neuron, INITS, ETAS, steps=10, step_block=0)


@pytest.mark.parametrize("packed", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_the_step_loop_carries_no_copy_of_the_lanes(packed, monkeypatch):
    """The optimised HLO of the step loop of the columns has no copy of the lanes, packed in
    one complex array (the CPU default) or as a (d, m) array: pairs of blocks write alternate
    buffers (a step reads every row, so it cannot be written in place; a one-buffer loop
    copied the lanes once per block)."""
    if not packed:
        monkeypatch.setattr(gdlr_jax.engine._plan, "PACK_PAIRS", frozenset())
    for params0, loss in ((INITS, two_neuron), ({"x": INITS[:, 0], "y": INITS[:, 1]}, two_neuron_dict)):
        plan = gdlr_jax.plan_sweep(loss, params0, ETAS, steps=100, step_block=2)
        assert plan._config.pack_pairs is packed
        m = plan.chunk_size
        text = run_sharded.lower(
            plan._params0, plan._device_etas, None, None, jnp.int32(0),
            config=plan._config, mesh=plan._mesh, lanes_per_device=m,
        ).compile().as_text()
        computations = {c.split(" ", 1)[0].lstrip("%"): c for c in text.split("\n\n")}
        lanes = f"c64[{m}]{{0}}" if packed else f"f32[2,{m}]{{1,0}}"
        step_loops = re.findall(r"while\(.*?body=%?([\w.\-]+).*step_pairs", text)
        assert step_loops, "no loop of pairs of blocks found"
        for body in step_loops:
            assert f"{lanes} fusion(" in computations[body]  # the step
            assert f"{lanes} copy(" not in computations[body], computations[body]


def chain(theta):
    return 0.5 * (1.0 - jnp.prod(theta)) ** 2


def chain_dict(params):
    return 0.5 * (1.0 - jnp.prod(jnp.stack(jax.tree_util.tree_leaves(params)))) ** 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("d", "as_dict", "dtype"),
    [(2, False, jnp.float64), (3, True, jnp.float32), (4, False, jnp.float32)],
)
def test_packed_pairs_give_the_same_trajectories(d, as_dict, dtype, monkeypatch):
    """Columns packed in complex pairs (an odd last one as it is) step exactly like the
    (d, m) rows: statuses, periods, iterates, losses and recordings bit for bit, in the main
    loop and in the final window."""
    inits = 1.0 + 0.3 * np.random.default_rng(d).standard_normal((12, d))
    params0 = {f"p{i}": inits[:, i] for i in range(d)} if as_dict else inits
    loss = chain_dict if as_dict else chain
    kwargs = {"steps": 120, "min_loss_value": 0.0, "dtype": dtype, "check_every": 16,
              "record_every": 7, "record_params": True, "step_block": 3}  # fmt: skip
    etas = np.array([0.3, 0.9, 1.3])
    packed = gdlr_jax.sweep(loss, params0, etas, **kwargs)
    monkeypatch.setattr(gdlr_jax.engine._plan, "PACK_PAIRS", frozenset())
    rows = gdlr_jax.sweep(loss, params0, etas, **kwargs)
    assert gdlr_jax.plan_sweep(loss, params0, etas, **kwargs)._config.pack_pairs is False
    assert len(set(np.asarray(packed.status).ravel().tolist())) > 1  # several outcomes
    assert_same_trajectories(packed, rows)
    for name in ("recorded_params", "recorded_loss", "asymptotic_step_norm", "final_grad_norm"):
        for x, y in zip(*(jax.tree_util.tree_leaves(getattr(r, name)) for r in (packed, rows))):
            np.testing.assert_array_equal(x, y, err_msg=name)


def test_scalar_leaves_take_reverse_mode_and_array_leaves_forward_mode():
    """The columns of scalar leaves take reverse-mode gradients (no array of the entries is
    built, and the adjoint is shared); columns of array leaves forward mode, one JVP each."""
    assert not _problem.Layout.of({"x": np.zeros(3), "y": np.zeros(3)}, True).forward_mode
    assert _problem.Layout.of(np.zeros((3, 2)), True).forward_mode
    assert _problem.Layout.of({"w": np.zeros((3, 2)), "s": np.zeros(3)}, True).forward_mode
    assert not _problem.Layout.of(np.zeros((3, 2)), False).forward_mode  # leaves: reverse
