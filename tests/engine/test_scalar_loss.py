"""The loss of a tiny model unrolled into scalars (``gdlr_jax.engine._scalar_loss``, issue 13):
the same loss and gradient as the array loss, the operations it does not unroll reported by
``None``, and the engine's sweeps of array and scalar-leaf losses alike."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import examples

import gdlr_jax
from gdlr_jax.engine._scalar_loss import scalar_loss


def two_neuron(theta):
    return 0.5 * (1.0 - theta[0] * theta[1]) ** 2


def chain(theta):
    return 0.5 * (1.0 - jnp.prod(theta)) ** 2


def matrix(w):  # dot with a constant, mean, transpose, broadcast, elementwise max, tanh
    r = w @ jnp.array([1.0, 2.0]) - jnp.array([0.5, 1.0])
    return jnp.sum(r**2) + jnp.sum(jnp.maximum(w.T, 0.5) * w) + jnp.mean(jnp.tanh(w))


def mixed(params):  # leaves of two shapes, a concatenation, a nested jit, a reversal
    v = jnp.concatenate([params["w"], params["s"][None]])
    return jax.jit(lambda v: jnp.sum(v[::-1] * jnp.arange(1.0, 4.0)) ** 2)(v) + params["s"] ** 4


CASES = {
    "two_neuron": (two_neuron, {"t": (2,)}, lambda p: p["t"]),
    "chain": (chain, {"t": (4,)}, lambda p: p["t"]),
    "matrix": (matrix, {"t": (2, 2)}, lambda p: p["t"]),
    "mixed": (mixed, {"s": (), "w": (2,)}, lambda p: p),
}


def unrolled(name):
    """The case's unrolled loss, and a function of the flat vector that runs the array loss."""
    loss_fn, shapes, view = CASES[name]
    treedef = jax.tree_util.tree_structure({k: 0 for k in shapes})

    def wrapped(params):
        return loss_fn(view(params))

    scalar = scalar_loss(wrapped, tuple(shapes.values()), (jnp.dtype(jnp.float64),) * len(shapes),
                         treedef)  # fmt: skip
    sizes = [int(np.prod(s)) for s in shapes.values()]

    def array_loss(theta):
        leaves = jnp.split(theta, np.cumsum(sizes)[:-1])
        params = {k: x.reshape(s) for (k, s), x in zip(shapes.items(), leaves)}
        return wrapped(params)

    return scalar, array_loss, sum(sizes)


@pytest.mark.parametrize("name", list(CASES))
@given(data=st.data())
@settings(max_examples=examples(6))
def test_the_unrolled_loss_has_the_value_and_gradient_of_the_array_loss(name, data):
    scalar, array_loss, d = unrolled(name)
    assert scalar is not None
    theta = np.array(data.draw(st.lists(st.floats(-2, 2), min_size=d, max_size=d)))
    scalars = tuple(jnp.float64(x) for x in theta)
    value, grad = jax.value_and_grad(scalar)(scalars)
    ref_value, ref_grad = jax.value_and_grad(array_loss)(jnp.asarray(theta))
    np.testing.assert_allclose(value, ref_value, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(jnp.stack(grad), ref_grad, rtol=1e-12, atol=1e-12)


def test_the_two_neuron_loss_unrolls_to_the_operations_of_its_scalar_form():
    """``theta[0] * theta[1]`` of the array becomes the product of the two scalars: the
    gradient is bit for bit that of ``1/2 (1 - x y)^2`` written on scalars."""
    scalar, _, _ = unrolled("two_neuron")
    x, y = jnp.float64(0.3), jnp.float64(1.7)
    grad = jax.grad(scalar)((x, y))
    ref = jax.grad(lambda x, y: 0.5 * (1.0 - x * y) ** 2, argnums=(0, 1))(x, y)
    assert [float(g) for g in grad] == [float(r) for r in ref]


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda t: jnp.sum(jax.nn.relu(t)),  # custom_jvp: its rule is kept
        lambda t: jax.lax.cond(t[0] > 0, lambda: t[0], lambda: t[1]),  # control flow
        lambda t: jnp.sum(t) * jnp.sum(jnp.ones(100)),  # a large array
        lambda t: t[jnp.argmax(t)],  # a gather
        lambda t: jnp.max(t),  # its gradient is shared evenly among ties
    ],
    ids=["custom_jvp", "cond", "large", "gather", "reduce_max"],
)
def test_what_is_not_unrolled_is_reported_by_none(loss_fn):
    assert scalar_loss(loss_fn, ((2,),), (jnp.dtype(jnp.float32),),
                       jax.tree_util.tree_structure(0)) is None  # fmt: skip


def relu_two_neuron(theta):
    return 0.5 * (1.0 - jax.nn.relu(theta[0]) * theta[1]) ** 2


def relu_two_neuron_dict(params):
    return 0.5 * (1.0 - jax.nn.relu(params["x"]) * params["y"]) ** 2


@pytest.mark.slow
def test_a_loss_that_is_not_unrolled_sweeps_like_its_scalar_form():
    """The array loss with a ReLU is not unrolled (forward mode on the array instead): its
    sweep has the statuses and iterates of the same loss on scalar leaves."""
    inits = np.array([[0.5, 1.5], [-0.3, 0.8], [1.2, 1.1], [2.0, 0.1]])
    etas = np.array([0.4, 1.05])
    sweep = functools.partial(gdlr_jax.sweep, etas=etas, steps=100, min_loss_value=0.0,
                              dtype=jnp.float64)  # fmt: skip
    array = sweep(relu_two_neuron, inits)
    leaves = sweep(relu_two_neuron_dict, {"x": inits[:, 0], "y": inits[:, 1]})
    np.testing.assert_array_equal(array.status, leaves.status)
    np.testing.assert_array_equal(array.steps_taken, leaves.steps_taken)
    np.testing.assert_allclose(array.final_params[..., 1], leaves.final_params["y"], rtol=1e-13)
