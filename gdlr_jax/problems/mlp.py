"""Flax (nnx) multilayer perceptrons as pure losses of their parameters (layer 1: problems).

The networks of the paper's MNIST experiments (Figures 3-6): ``depth`` hidden layers of
``width`` units (32 in the paper) between 784 inputs and 2 outputs,

    f(x) = W_out s(... s(W_1 x + b_1) ...) + b_out,     s in {GELU, ReLU, tanh, sigmoid},

with or without the biases ``b``. The engine needs pure functions of parameter pytrees, so a
model is cut by ``nnx.split`` into a static ``graphdef`` and its parameters, and
:func:`mlp_loss` / :func:`mlp_apply` rebuild it with ``nnx.merge`` inside the function:

    graphdef, params = init_mlp_params(key, n_init=100, depth=2)   # leaves: (100, ...)
    loss_fn = mlp_loss(graphdef, loss="mse")
    losses = jax.vmap(loss_fn, in_axes=(0, None))(params, (images, labels))   # (100,)

Losses, for ``n`` examples, ``C`` classes, logits ``f(x_i)`` and one-hot targets ``e_{y_i}``:

* ``"mse"``: ``L = 1/(n C) sum_i sum_c (f_c(x_i) - [y_i = c])^2``, the mean over all ``n C``
  entries (``jnp.mean(optax.squared_error(...))``, the same as PyTorch's ``nn.MSELoss()`` on
  one-hot targets);
* ``"mse_sum"``: ``L = 1/n sum_i sum_c (f_c(x_i) - [y_i = c])^2 = C * mse``, summed over the
  outputs and averaged over the examples (``nn.MSELoss(reduction="sum") / n``). Its Hessian,
  hence every step-size threshold ``2 / lambda``, differs from ``"mse"``'s by the factor ``C``
  (2 for a pair of digits): ``eta`` on ``"mse_sum"`` is ``C eta`` on ``"mse"``;
* ``"cross_entropy"``: ``L = 1/n sum_i (logsumexp_c f_c(x_i) - f_{y_i}(x_i))``
  (``optax.softmax_cross_entropy_with_integer_labels``, mean over the batch).

Initialisation follows Flax's defaults (kernels LeCun normal: truncated normal of variance
``1 / fan_in``; biases zero); ``init_scale = s`` multiplies the kernels' standard deviation by
``s`` (biases stay zero).
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float, Int, PRNGKeyArray

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": nnx.gelu,  # jax.nn.gelu, tanh approximation (Flax's default)
    "relu": nnx.relu,
    "tanh": nnx.tanh,
    "sigmoid": nnx.sigmoid,
}
__all__ = ["LOSSES", "MLP", "Batch", "Params", "init_mlp_params", "mlp_apply", "mlp_loss"]

LOSSES = ("mse", "mse_sum", "cross_entropy")

Params = nnx.State  # the nnx.Param state of an MLP; leaves (n_init, ...) when batched
Batch = tuple[Float[Array, "n d_in"], Int[Array, " n"]]


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        out = operator.index(value)
    except TypeError:
        out = None
    if out is None or out < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return out


def _check_architecture(
    depth: Any,
    width: Any,
    in_features: Any,
    out_features: Any,
    activation: Any,
    use_bias: Any,
    init_scale: Any,
    param_dtype: Any,
) -> None:
    _positive_int("depth", depth, minimum=0)
    _positive_int("width", width)
    _positive_int("in_features", in_features)
    _positive_int("out_features", out_features)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}.")
    if not isinstance(use_bias, bool):
        raise ValueError(f"use_bias must be a bool, got {use_bias!r}.")
    if init_scale is not None and not (
        isinstance(init_scale, (int, float, np.floating, np.integer))
        and not isinstance(init_scale, bool)
        and math.isfinite(init_scale)
        and init_scale > 0
    ):
        raise ValueError(
            f"init_scale must be None (Flax's default) or a positive finite number, "
            f"got {init_scale!r}."
        )
    try:
        dtype = jnp.dtype(param_dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"param_dtype must be a floating dtype, got {param_dtype!r}.")


def _checked_images(images: Any, in_features: int) -> Array:
    images = jnp.asarray(images)
    if images.ndim != 2 or images.shape[1] != in_features:
        raise ValueError(
            f"images must have shape (n, in_features) = (n, {in_features}), got {images.shape}."
        )
    return images


class MLP(nnx.Module):
    """``depth`` hidden layers of ``width`` units with activation ``s``, then a linear output.

    Args:
        depth: number of hidden layers (``>= 0``; 0 is a linear model).
        width: units per hidden layer.
        in_features: input dimension (784 for flattened MNIST).
        out_features: number of outputs (logits), 2 for a pair of digits.
        activation: ``"gelu"`` (tanh approximation, ``jax.nn.gelu``'s default), ``"relu"``,
            ``"tanh"`` or ``"sigmoid"``.
        use_bias: whether every layer has a bias.
        init_scale: ``None`` for Flax's default kernel initialiser (LeCun normal), else the
            factor multiplying its standard deviation.
        param_dtype: dtype of the parameters (float32 by default).
        rngs: ``nnx.Rngs`` with a ``params`` stream.

    Raises:
        ValueError: on an argument outside the ranges above.
    """

    def __init__(
        self,
        depth: int,
        *,
        width: int = 32,
        in_features: int = 784,
        out_features: int = 2,
        activation: str = "gelu",
        use_bias: bool = True,
        init_scale: float | None = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_architecture(
            depth, width, in_features, out_features, activation, use_bias, init_scale,
            param_dtype,
        )
        if init_scale is None:
            kernel_init = nnx.initializers.lecun_normal()
        else:
            kernel_init = nnx.initializers.variance_scaling(
                float(init_scale) ** 2, "fan_in", "truncated_normal"
            )
        sizes = [int(in_features)] + [int(width)] * int(depth)

        def linear(d_in: int, d_out: int) -> nnx.Linear:
            return nnx.Linear(
                d_in, d_out, use_bias=use_bias, kernel_init=kernel_init,
                param_dtype=param_dtype, rngs=rngs,
            )

        self.hidden = nnx.List([linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])
        self.output = linear(sizes[-1], int(out_features))
        self.activation = activation
        self.in_features = int(in_features)

    def __call__(self, images: Float[Array, "n d_in"]) -> Float[Array, "n d_out"]:
        """Logits ``f(x)`` of a batch of flattened images, shape ``(n, out_features)``."""
        images = _checked_images(images, self.in_features)
        activation = ACTIVATIONS[self.activation]
        x = images
        for layer in self.hidden:
            x = activation(layer(x))
        return self.output(x)


_ARCHITECTURE_KEYS = tuple(
    name for name in inspect.signature(MLP.__init__).parameters if name not in ("self", "rngs")
)


def _check_architecture_keys(architecture: dict[str, Any]) -> None:
    unknown = sorted(set(architecture) - set(_ARCHITECTURE_KEYS))
    if unknown:
        raise ValueError(
            f"unknown MLP architecture argument(s) {unknown}; allowed: {list(_ARCHITECTURE_KEYS)}."
        )
    if "depth" not in architecture:
        raise ValueError("the MLP architecture needs depth (the number of hidden layers).")


def _check_key(key: Any) -> None:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        ok = key.shape == ()
    else:
        ok = key.dtype == jnp.uint32 and key.shape == (2,)
    if not ok:
        raise ValueError(
            "key must be one PRNG key (jax.random.key(seed), shape (), or "
            f"jax.random.PRNGKey(seed), uint32 (2,)), got dtype {key.dtype} shape {key.shape}."
        )


def init_mlp_params(
    key: PRNGKeyArray, n_init: int, **architecture: Any
) -> tuple[nnx.GraphDef, Params]:
    """Initialise ``n_init`` MLPs at once (one vmapped init, no Python loop over them).

    Args:
        key: a PRNG key; initialisation ``i`` uses ``jax.random.split(key, n_init)[i]``.
        n_init: number of initialisations.
        **architecture: the keyword arguments of :class:`MLP` (``depth`` required; ``width``,
            ``in_features``, ``out_features``, ``activation``, ``use_bias``, ``init_scale``,
            ``param_dtype``).

    Returns:
        ``(graphdef, params)``: the static ``nnx.split`` graph definition of one MLP, and its
        ``nnx.Param`` state whose every leaf has a leading axis of length ``n_init``
        (``jax.tree.map(lambda p: p[i], params)`` is initialisation ``i``).

    Raises:
        ValueError: on a bad ``key``, ``n_init`` or architecture argument.
    """
    _check_key(key)
    n_init = _positive_int("n_init", n_init)
    _check_architecture_keys(architecture)

    def init_one(one_key: PRNGKeyArray) -> Params:
        return nnx.split(MLP(**architecture, rngs=nnx.Rngs(params=one_key)), nnx.Param)[1]

    abstract = nnx.eval_shape(lambda: MLP(**architecture, rngs=nnx.Rngs(params=0)))
    graphdef = nnx.split(abstract, nnx.Param)[0]
    params = jax.vmap(init_one)(jax.random.split(key, n_init))
    return graphdef, params


def _merge_checked(graphdef: nnx.GraphDef, params: Params) -> MLP:
    """``nnx.merge`` the model; check that ``params`` is one initialisation of ``graphdef``."""
    model = nnx.merge(graphdef, params)
    for layer in [*model.hidden, model.output]:
        expected = (layer.in_features, layer.out_features)
        if layer.kernel.shape != expected:
            raise ValueError(
                f"params do not hold one initialisation of this MLP: a kernel of shape "
                f"{layer.kernel.shape} where {expected} is expected (batched params from "
                f"init_mlp_params carry a leading n_init axis: jax.vmap over it)."
            )
    return model


def mlp_apply(
    graphdef: nnx.GraphDef, params: Params, images: Float[Array, "n d_in"]
) -> Float[Array, "n d_out"]:
    """Logits of the MLP ``nnx.merge(graphdef, params)`` on ``images``, shape ``(n, d_out)``.

    Pure in ``params``: jit-, grad- and vmap-able (vmap over a batch of initialisations).

    Raises:
        ValueError: ``params`` of the wrong shapes (e.g. still batched), or ``images`` not of
            shape ``(n, in_features)``.
    """
    return _merge_checked(graphdef, params)(images)


def mlp_loss(
    graphdef: nnx.GraphDef, *, loss: str = "mse", num_classes: int = 2
) -> Callable[[Params, Batch], Float[Array, ""]]:
    """The training loss of an MLP as a pure function ``loss_fn(params, batch)``.

    Args:
        graphdef: from :func:`init_mlp_params` (or ``nnx.split(model, nnx.Param)``).
        loss: ``"mse"``, ``L = 1/(n C) sum_i ||f(x_i) - e_{y_i}||^2`` (mean over all ``n C``
            entries against one-hot targets), ``"mse_sum"``,
            ``L = 1/n sum_i ||f(x_i) - e_{y_i}||^2`` (sum over the ``C`` outputs, mean over
            the examples: ``C`` times ``"mse"``), or ``"cross_entropy"``,
            ``L = 1/n sum_i -log softmax(f(x_i))_{y_i}``.
        num_classes: ``C``, which must equal the MLP's ``out_features``.

    Returns:
        ``loss_fn(params, (images (n, in_features), labels (n,) integers in 0..C-1))``, a
        scalar in the dtype of the logits. Labels outside ``0..C-1`` are not detected (they
        would give a zero one-hot row, resp. an undefined cross-entropy term).

    Raises:
        ValueError: at once for a bad ``loss`` or ``num_classes``; when ``loss_fn`` is called
            (or traced), for a batch that is not a pair, labels that are not an integer vector
            of the batch's length, or ``num_classes != out_features``.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}.")
    num_classes = _positive_int("num_classes", num_classes)

    def loss_fn(params: Params, batch: Batch) -> Float[Array, ""]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(
                f"batch must be a pair (images (n, d_in), labels (n,)), got {batch!r:.80}."
            )
        model = _merge_checked(graphdef, params)
        images = _checked_images(batch[0], model.in_features)
        labels = jnp.asarray(batch[1])
        if model.output.out_features != num_classes:
            raise ValueError(
                f"num_classes={num_classes} but the MLP has out_features="
                f"{model.output.out_features}."
            )
        if not jnp.issubdtype(labels.dtype, jnp.integer) or labels.shape != images.shape[:1]:
            raise ValueError(
                f"labels must be integers of shape (n,) = {images.shape[:1]} matching the "
                f"images {images.shape}, got {labels.dtype} {labels.shape}."
            )
        logits = model(images)
        if loss in ("mse", "mse_sum"):
            targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
            squared = optax.squared_error(logits, targets)  # (n, C)
            if loss == "mse":
                return jnp.mean(squared)
            return jnp.mean(jnp.sum(squared, axis=-1))
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    return loss_fn
