"""The loss of one lane as a function of its scalar parameters, the small arrays of the user's
loss unrolled into scalars (layer 4: engine; ``docs/engine.md``, "How it is made fast").

A model with a few scalar parameters is stored as one column per scalar
(:class:`~gdlr_jax.engine._problem.Layout`). Written on an array ``theta (d,)``, its loss
builds that array from the columns, and the derivative of an array built from several
scalars carries explicit zeros for the entries it is not taken along: forward mode multiplies
by them (``x * 0`` is not folded by XLA: it is ``nan`` for ``x = inf``) and reverse mode pads
and adds; per trajectory-step of ``1/2 (1 - theta_0 theta_1)^2`` that is 17 operations
against the 9 of the same loss written on scalar leaves. :func:`scalar_loss` removes the
arrays instead: it traces the loss once (``jax.make_jaxpr``) and evaluates its jaxpr on arrays
of scalars, so ``theta[0]``, ``theta @ w``, ``jnp.prod(theta)`` become the scalar operations
they stand for, and the gradient is taken by reverse mode on the scalars.

Each array of the jaxpr is a NumPy array of ``dtype=object`` holding one traced scalar per
entry: slicing, reshaping, broadcasting, concatenation and transposition rearrange the
entries; elementwise primitives are applied entry by entry; sums, products and dot products
are folded left to right (as XLA's loop over a short axis does, so the values are those of
the array loss up to the rounding of a reordered sum). A loss that uses anything else (a
``custom_jvp`` function such as ``jax.nn.relu``, control flow, a gather, a maximum over an
axis, a large array) is not unrolled: :func:`scalar_loss` returns ``None`` and the engine takes the
forward-mode gradient of the array loss.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.extend import core
from jaxtyping import Array, Float

#: primitives applied entry by entry (all inputs of one shape, or scalars)
_ELEMENTWISE = frozenset(
    {
        "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh",
        "cbrt", "ceil", "clamp", "convert_element_type", "copy", "cos", "cosh", "div",
        "eq", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt",
        "integer_pow", "is_finite", "le", "lgamma", "digamma", "log", "log1p", "logistic",
        "lt", "max", "min", "mul", "ne", "neg", "nextafter", "not", "or", "pow", "rem",
        "round", "rsqrt", "select_n", "sign", "sin", "sinh", "sqrt", "square", "sub",
        "tan", "tanh", "xor",
    }
)
#: reductions and the binary operation that folds them (not the maxima: a fold of binary
#: maxima would share the gradient among tied entries unlike reduce_max, which shares it evenly)
_FOLDS = {"reduce_sum": lax.add, "reduce_prod": lax.mul}
_MAX_ENTRIES = 64  # larger arrays are not unrolled (the loss of a tiny model has few entries)


class _NotScalar(Exception):
    """The jaxpr uses an operation this module does not unroll."""


@functools.lru_cache(maxsize=32)
def scalar_loss(
    loss_fn: Callable[..., Float[Array, ""]],
    shapes: tuple[tuple[int, ...], ...],
    dtypes: tuple[Any, ...],
    treedef: jax.tree_util.PyTreeDef,
) -> Callable[[tuple], Float[Array, ""]] | None:
    """``loss_fn`` of one lane as a function of its ``d`` scalars (``ravel_pytree`` order of
    the leaves of shapes ``shapes`` and dtypes ``dtypes``), or ``None`` where it cannot be
    unrolled (module docstring). The returned function computes the same loss from the same
    scalars. Cached: the engine asks for it at every trace of a step."""
    leaves = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in zip(shapes, dtypes)]
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    try:
        closed = jax.make_jaxpr(loss_fn)(params)
    except Exception:  # noqa: BLE001 - the array loss then runs as it is, and reports its error
        return None
    sizes = [math.prod(shape) for shape in shapes]
    bounds = np.cumsum([0, *sizes])

    def loss(scalars: tuple) -> Float[Array, ""]:
        arrays = [_entries(scalars[a:b], shape) for a, b, shape in zip(bounds, bounds[1:], shapes)]
        (out,) = _evaluate(closed.jaxpr, closed.consts, arrays)
        return out[()]

    try:  # a dry run finds an operation that is not unrolled
        jax.eval_shape(loss, tuple(jax.ShapeDtypeStruct((), d) for d, n in zip(dtypes, sizes)
                                   for _ in range(n)))  # fmt: skip
    except Exception:  # noqa: BLE001 - _NotScalar, or anything else: the array loss runs as it is
        return None
    return loss


def _entries(scalars: Sequence[Any], shape: tuple[int, ...]) -> np.ndarray:
    """An object array of ``shape`` holding ``scalars`` in row-major order."""
    out = np.empty(len(scalars), dtype=object)
    for i, scalar in enumerate(scalars):  # one by one: a slice assignment would convert them
        out[i] = scalar
    return out.reshape(shape)


def _as_entries(value: Any) -> np.ndarray:
    """A value of the jaxpr as an object array of scalars."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        return value
    array = np.asarray(value) if not isinstance(value, jax.Array) else value
    if array.size > _MAX_ENTRIES:
        raise _NotScalar(f"an array of {array.size} entries")
    flat = [array.reshape(-1)[i] for i in range(array.size)]
    return _entries(flat, array.shape)


def _read(env: dict, var: Any) -> Any:
    if isinstance(var, core.Literal):
        return np.asarray(var.val, dtype=var.aval.dtype)
    return env[var]


def _evaluate(jaxpr: core.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list:
    env: dict = {}
    for var, value in zip(jaxpr.constvars, consts):
        env[var] = _as_entries(value)
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.eqns:
        inputs = [_as_entries(_read(env, var)) for var in eqn.invars]
        outputs = _apply(eqn, inputs)
        for var, value in zip(eqn.outvars, outputs):
            env[var] = value
    return [_as_entries(_read(env, var)) for var in jaxpr.outvars]


def _apply(eqn: core.JaxprEqn, inputs: list[np.ndarray]) -> list[np.ndarray]:
    name, params = eqn.primitive.name, eqn.params
    if any(x.size > _MAX_ENTRIES for x in inputs):
        raise _NotScalar(f"{name} of a large array")
    if name in _ELEMENTWISE:
        shape = np.broadcast_shapes(*(x.shape for x in inputs))
        inputs = [np.broadcast_to(x, shape) for x in inputs]
        out = np.empty(shape, dtype=object)
        for index in np.ndindex(shape):
            out[index] = eqn.primitive.bind(*(x[index] for x in inputs), **params)
        return [out]
    if name in ("pjit", "jit", "closed_call", "core_call"):
        inner = params["jaxpr"]
        return _evaluate(inner.jaxpr, inner.consts, inputs)
    if not inputs:  # a constant (iota, ...): computed as an array, then taken apart
        return [_as_entries(out) for out in _bind(eqn)]
    (x, *rest) = inputs
    if name == "slice":
        strides = params["strides"] or (1,) * x.ndim
        index = tuple(slice(a, b, s) for a, b, s in
                      zip(params["start_indices"], params["limit_indices"], strides))  # fmt: skip
        return [x[index]]
    if name == "squeeze":
        return [np.squeeze(x, axis=tuple(params["dimensions"]))]
    if name == "reshape" and params.get("dimensions") is None:
        return [x.reshape(params["new_sizes"])]
    if name == "broadcast_in_dim":
        shape, dims = params["shape"], params["broadcast_dimensions"]
        expanded = x.reshape([x.shape[dims.index(i)] if i in dims else 1 for i in range(len(shape))])
        return [np.broadcast_to(expanded, shape).copy()]
    if name == "concatenate":
        return [np.concatenate(inputs, axis=params["dimension"])]
    if name == "transpose":
        return [np.transpose(x, params["permutation"])]
    if name == "rev":
        return [np.flip(x, axis=tuple(params["dimensions"]))]
    if name in _FOLDS and not rest:
        return [_fold(x, tuple(params["axes"]), _FOLDS[name])]
    preferred = params.get("preferred_element_type")
    if name == "dot_general" and preferred in (None, eqn.outvars[0].aval.dtype):
        return [_dot(x, rest[0], params["dimension_numbers"])]
    raise _NotScalar(name)


def _bind(eqn: core.JaxprEqn) -> list:
    """The outputs of an equation without inputs."""
    out = eqn.primitive.bind(**eqn.params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _fold(x: np.ndarray, axes: tuple[int, ...], op: Callable) -> np.ndarray:
    """``x`` reduced over ``axes`` by ``op``, left to right."""
    if not axes:
        return x
    kept = [i for i in range(x.ndim) if i not in axes]
    moved = np.transpose(x, kept + list(axes)).reshape([x.shape[i] for i in kept] + [-1])
    if moved.shape[-1] == 0:
        raise _NotScalar("a reduction over an empty axis")
    out = np.empty(moved.shape[:-1], dtype=object)
    for index in np.ndindex(out.shape):
        out[index] = functools.reduce(op, moved[index])
    return out


def _dot(x: np.ndarray, y: np.ndarray, dimension_numbers: Any) -> np.ndarray:
    """``lax.dot_general`` of object arrays: each output entry is the sum, left to right, of
    the products over the contracting dimensions."""
    (cx, cy), (bx, by) = dimension_numbers
    fx = [i for i in range(x.ndim) if i not in cx and i not in bx]
    fy = [i for i in range(y.ndim) if i not in cy and i not in by]
    xt = np.transpose(x, list(bx) + fx + list(cx))
    yt = np.transpose(y, list(by) + fy + list(cy))
    nb, k = len(bx), math.prod(x.shape[i] for i in cx)
    xs = xt.reshape(xt.shape[: nb + len(fx)] + (k,))
    ys = yt.reshape(yt.shape[: nb + len(fy)] + (k,))
    if k == 0:
        raise _NotScalar("a dot product over an empty axis")
    shape = xs.shape[:nb] + xs.shape[nb:-1] + ys.shape[nb:-1]
    out = np.empty(shape, dtype=object)
    for index in np.ndindex(shape):
        b, i, j = index[:nb], index[nb : nb + len(fx)], index[nb + len(fx) :]
        terms = [lax.mul(a, c) for a, c in zip(xs[b + i], ys[b + j])]
        out[index] = functools.reduce(lax.add, terms)
    return out
