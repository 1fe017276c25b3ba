"""Tests of gdlr_jax.mlp: architecture, vmapped init, pure losses against plain nnx."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gdlr_jax as gj
from gdlr_jax.mlp import MLP, init_mlp_params, mlp_apply, mlp_loss

N, D_IN = 24, 784


@pytest.fixture(scope="module")
def batch64():
    images = jax.random.uniform(jax.random.key(11), (N, D_IN), dtype=jnp.float64)
    labels = jax.random.randint(jax.random.key(12), (N,), 0, 2, dtype=jnp.int32)
    return images, labels


def _one(params, i):
    return jax.tree.map(lambda leaf: leaf[i], params)


def _count(params, n_init):
    return sum(leaf.size for leaf in jax.tree.leaves(params)) // n_init


# ----- architecture and initialisation -----------------------------------------------------


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("use_bias", [True, False])
def test_parameter_count(depth, use_bias):
    _, params = init_mlp_params(jax.random.key(0), 2, depth=depth, use_bias=use_bias)
    sizes = [784] + [32] * depth + [2]
    expected = sum(a * b + (b if use_bias else 0) for a, b in zip(sizes[:-1], sizes[1:]))
    assert _count(params, 2) == expected


def test_parameter_count_depth_two_literal():
    # 784*32 + 32 + 32*32 + 32 + 32*2 + 2, and the same without the 66 biases
    assert _count(init_mlp_params(jax.random.key(0), 1, depth=2)[1], 1) == 26242
    assert _count(init_mlp_params(jax.random.key(0), 1, depth=2, use_bias=False)[1], 1) == 26176


@pytest.mark.slow
def test_batched_init_matches_one_model_per_key_and_flax_defaults():
    key = jax.random.key(3)
    graphdef, params = init_mlp_params(key, 4, depth=2, width=16)
    leaves = jax.tree.leaves(params)
    assert all(leaf.shape[0] == 4 and leaf.dtype == jnp.float32 for leaf in leaves)
    for i, one_key in list(enumerate(jax.random.split(key, 4)))[::3]:  # the first and the last
        model = MLP(2, width=16, rngs=nnx.Rngs(params=one_key))
        reference = nnx.state(model, nnx.Param)
        for got, want in zip(jax.tree.leaves(_one(params, i)), jax.tree.leaves(reference)):
            np.testing.assert_array_equal(got, want)
    kernels = [params["hidden"][0]["kernel"][i] for i in range(4)]
    assert all(not np.array_equal(kernels[0], k) for k in kernels[1:])  # distinct per key
    np.testing.assert_array_equal(params["output"]["bias"][...], 0.0)  # Flax default: zeros
    # LeCun normal: variance 1 / fan_in
    np.testing.assert_allclose(np.std(np.asarray(kernels[0])), 784**-0.5, rtol=0.03)
    np.testing.assert_allclose(np.std(np.asarray(params["output"]["kernel"][...])), 16**-0.5, rtol=0.15)
    assert isinstance(graphdef, nnx.GraphDef)


def test_init_scale_multiplies_the_default_kernels():
    key = jax.random.PRNGKey(5)  # raw uint32 keys work too
    _, default = init_mlp_params(key, 2, depth=1)
    _, unit = init_mlp_params(key, 2, depth=1, init_scale=1.0)
    _, scaled = init_mlp_params(key, 2, depth=1, init_scale=2.5)
    for d, u, s, path in zip(
        jax.tree.leaves(default), jax.tree.leaves(unit), jax.tree.leaves(scaled),
        [p for p, _ in jax.tree_util.tree_flatten_with_path(default)[0]],
    ):
        np.testing.assert_array_equal(u, d)
        np.testing.assert_allclose(s, 2.5 * d, rtol=1e-6, err_msg=str(path))


@pytest.mark.parametrize(
    "activation",
    ["gelu", *(pytest.param(a, marks=pytest.mark.slow) for a in ("relu", "tanh", "sigmoid"))],
)
def test_forward_matches_the_formula(activation):
    graphdef, params = init_mlp_params(
        jax.random.key(1), 1, depth=2, width=8, in_features=5, out_features=3,
        activation=activation, param_dtype=jnp.float64,
    )
    p = _one(params, 0)
    x = jax.random.normal(jax.random.key(2), (7, 5), dtype=jnp.float64)
    act = {"gelu": jax.nn.gelu, "relu": jax.nn.relu, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid}
    h = x
    for layer in (p["hidden"][0], p["hidden"][1]):
        h = act[activation](h @ layer["kernel"][...] + layer["bias"][...][None, :])
    expected = h @ p["output"]["kernel"][...] + p["output"]["bias"][...][None, :]
    np.testing.assert_allclose(mlp_apply(graphdef, p, x), expected, rtol=1e-12, atol=1e-14)


# ----- losses and gradients against a plain nnx model ------------------------------------------


def _plain_loss(model, images, labels, loss):
    logits = model(images)
    if loss == "mse":
        targets = jax.nn.one_hot(labels, 2, dtype=logits.dtype)
        return jnp.sum((logits - targets) ** 2) / (labels.shape[0] * 2)
    if loss == "mse_sum":
        targets = jax.nn.one_hot(labels, 2, dtype=logits.dtype)
        return jnp.sum((logits - targets) ** 2) / labels.shape[0]
    log_p = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1))


@pytest.mark.parametrize(
    ("activation", "loss", "use_bias"),
    [
        ("gelu", "mse", True), ("relu", "cross_entropy", True), ("tanh", "mse_sum", True),
        *(
            pytest.param(*case, marks=pytest.mark.slow)
            for case in [("tanh", "mse", False), ("sigmoid", "cross_entropy", False),
                         ("relu", "mse", True), ("gelu", "cross_entropy", True)]
        ),
    ],
)
def test_loss_and_grad_equal_plain_nnx(batch64, activation, loss, use_bias):
    images, labels = batch64
    arch = dict(depth=2, width=16, activation=activation, use_bias=use_bias, param_dtype=jnp.float64)
    model = MLP(**arch, rngs=nnx.Rngs(params=jax.random.key(7)))
    want_value, want_grads = nnx.value_and_grad(_plain_loss)(model, images, labels, loss)

    graphdef, params = nnx.split(model, nnx.Param)
    loss_fn = mlp_loss(graphdef, loss=loss)
    value, grads = jax.jit(jax.value_and_grad(loss_fn))(params, (images, labels))
    assert value.dtype == jnp.float64
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)


def test_gd_step_equals_a_plain_flax_optimizer_step(batch64):
    images, labels = batch64
    eta = 0.7
    model = MLP(1, width=8, param_dtype=jnp.float64, rngs=nnx.Rngs(params=jax.random.key(9)))
    graphdef, params = nnx.split(model, nnx.Param)
    grads = jax.grad(mlp_loss(graphdef, loss="cross_entropy"))(params, (images, labels))
    ours = jax.tree.map(lambda p, g: p - eta * g, params, grads)

    optimizer = nnx.Optimizer(model, optax.sgd(eta), wrt=nnx.Param)
    optimizer.update(model, nnx.grad(_plain_loss)(model, images, labels, "cross_entropy"))
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_mse_normalisation_is_the_mean_over_all_entries():
    graphdef, params = init_mlp_params(
        jax.random.key(4), 1, depth=0, in_features=3, out_features=4, param_dtype=jnp.float64
    )
    p = _one(params, 0)
    x = jnp.eye(3, dtype=jnp.float64)
    y = jnp.array([0, 3, 1], dtype=jnp.int32)
    logits = np.asarray(mlp_apply(graphdef, p, x))
    expected = np.mean((logits - np.eye(4)[np.asarray(y)]) ** 2)  # over n * C = 12 entries
    value = mlp_loss(graphdef, loss="mse", num_classes=4)(p, (x, y))
    np.testing.assert_allclose(value, expected, rtol=1e-14)
    np.testing.assert_allclose(value, np.mean(optax.squared_error(logits, np.eye(4)[np.asarray(y)])), rtol=1e-14)


@pytest.mark.slow
def test_mse_sum_is_the_sum_over_outputs_mean_over_examples():
    """"mse_sum": L = 1/n sum_i ||f(x_i) - e_{y_i}||^2 = C * "mse", and so are its gradient and
    Hessian: every threshold 2/lambda of "mse_sum" is that of "mse" divided by C."""
    graphdef, params = init_mlp_params(
        jax.random.key(4), 1, depth=1, width=3, in_features=3, out_features=4, param_dtype=jnp.float64
    )
    p = _one(params, 0)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)))
    y = jnp.array([0, 3, 1, 2, 2], dtype=jnp.int32)
    logits = np.asarray(mlp_apply(graphdef, p, x))
    expected = np.sum((logits - np.eye(4)[np.asarray(y)]) ** 2) / 5  # sum over C, mean over n
    summed = mlp_loss(graphdef, loss="mse_sum", num_classes=4)
    mean = mlp_loss(graphdef, loss="mse", num_classes=4)
    np.testing.assert_allclose(summed(p, (x, y)), expected, rtol=1e-14)
    np.testing.assert_allclose(summed(p, (x, y)), 4 * mean(p, (x, y)), rtol=1e-14)
    top = lambda f: gj.hessian_spectrum(lambda q: f(q, (x, y)), p)[-1]
    np.testing.assert_allclose(top(summed), 4 * top(mean), rtol=1e-10)


@pytest.mark.parametrize(
    "loss", ["mse", pytest.param("mse_sum", marks=pytest.mark.slow), "cross_entropy"]
)
def test_vmap_over_inits_under_jit_float32(loss):
    graphdef, params = init_mlp_params(jax.random.key(2), 3, depth=2, width=8)
    images = jax.random.uniform(jax.random.key(3), (10, D_IN), dtype=jnp.float32)
    labels = jnp.arange(10, dtype=jnp.int32) % 2
    loss_fn = mlp_loss(graphdef, loss=loss)
    values, grads = jax.jit(jax.vmap(jax.value_and_grad(loss_fn), in_axes=(0, None)))(
        params, (images, labels)
    )
    assert values.shape == (3,) and values.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    one_init = jax.jit(jax.value_and_grad(loss_fn))
    for i in range(3):
        value_i, grads_i = one_init(_one(params, i), (images, labels))
        np.testing.assert_allclose(values[i], value_i, rtol=1e-6)
        for got, want in zip(jax.tree.leaves(_one(grads, i)), jax.tree.leaves(grads_i)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    logits = jax.vmap(mlp_apply, in_axes=(None, 0, None))(graphdef, params, images)
    assert logits.shape == (3, 10, 2)


# ----- bad arguments -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depth": -1}, "depth must be an integer >= 0, got -1"),
        ({"depth": 1.5}, "depth must be an integer >= 0, got 1.5"),
        ({"depth": True}, "depth must be an integer >= 0, got True"),
        ({"depth": 1, "width": 0}, "width must be an integer >= 1, got 0"),
        ({"depth": 1, "in_features": 0}, "in_features must be an integer >= 1, got 0"),
        ({"depth": 1, "out_features": "2"}, "out_features must be an integer >= 1, got '2'"),
        ({"depth": 1, "activation": "swish"}, r"activation must be one of \['gelu', 'relu', 'tanh', 'sigmoid'\], got 'swish'"),
        ({"depth": 1, "use_bias": 1}, "use_bias must be a bool, got 1"),
        ({"depth": 1, "init_scale": 0.0}, "init_scale must be None .* or a positive finite number, got 0.0"),
        ({"depth": 1, "init_scale": float("nan")}, "init_scale must be .* got nan"),
        ({"depth": 1, "param_dtype": jnp.int32}, "param_dtype must be a floating dtype"),
        ({"depth": 1, "widht": 8}, r"unknown MLP architecture argument\(s\) \['widht'\]; allowed: \['depth', 'width'"),
        ({"width": 8}, "the MLP architecture needs depth"),
    ],
)
def test_bad_architecture(kwargs, message):
    with pytest.raises(ValueError, match=message):
        init_mlp_params(jax.random.key(0), 2, **kwargs)


def test_bad_init_arguments():
    with pytest.raises(ValueError, match="n_init must be an integer >= 1, got 0"):
        init_mlp_params(jax.random.key(0), 0, depth=1)
    with pytest.raises(ValueError, match=r"key must be one PRNG key .* got dtype key<fry> shape \(2,\)"):
        init_mlp_params(jax.random.split(jax.random.key(0), 2), 2, depth=1)
    with pytest.raises(ValueError, match="depth must be an integer >= 0, got -2"):
        MLP(-2, rngs=nnx.Rngs(0))


def test_bad_loss_arguments_and_batches():
    graphdef, params = init_mlp_params(jax.random.key(0), 2, depth=1, width=4)
    with pytest.raises(
        ValueError, match=r"loss must be one of \['mse', 'mse_sum', 'cross_entropy'\], got 'hinge'"
    ):
        mlp_loss(graphdef, loss="hinge")
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1, got 0"):
        mlp_loss(graphdef, num_classes=0)
    p = _one(params, 0)
    images = jnp.zeros((5, D_IN), jnp.float32)
    labels = jnp.zeros(5, jnp.int32)
    loss_fn = mlp_loss(graphdef)
    with pytest.raises(ValueError, match="num_classes=3 but the MLP has out_features=2"):
        mlp_loss(graphdef, num_classes=3)(p, (images, labels))
    with pytest.raises(ValueError, match=r"images must have shape \(n, in_features\) = \(n, 784\), got \(5, 783\)"):
        loss_fn(p, (jnp.zeros((5, 783)), labels))
    with pytest.raises(ValueError, match=r"images must have shape .* got \(784,\)"):
        mlp_apply(graphdef, p, jnp.zeros(D_IN))
    with pytest.raises(ValueError, match=r"labels must be integers of shape \(n,\) = \(5,\) .* got float32 \(5,\)"):
        loss_fn(p, (images, jnp.zeros(5, jnp.float32)))
    with pytest.raises(ValueError, match=r"labels must be integers .* got int32 \(4,\)"):
        loss_fn(p, (images, labels[:4]))
    with pytest.raises(ValueError, match="batch must be a pair"):
        loss_fn(p, images)
    with pytest.raises(ValueError, match=r"a kernel of shape \(2, 784, 4\) where \(784, 4\) is expected"):
        mlp_apply(graphdef, params, images)
