"""The problems more than one experiment runs (layer 5): the two-neuron network's loss and
grids of initialisations, and the MNIST training set (the config's ``data`` section, its
loading) and MLPs on it as inputs of :func:`gdlr_jax.sweep`.

Each experiment module holds only what is its own; what experiments share lives here (and in
:mod:`gdlr_jax.experiments._skeleton`), so that no experiment module imports another
(``tests/test_architecture.py``). Used by :mod:`~gdlr_jax.experiments.two_neuron` (and its
parts ``_two_neuron_*``) and
:mod:`~gdlr_jax.experiments.mnist` (their own studies) and by
:mod:`~gdlr_jax.experiments.fractal_boundary` (its ``two_neuron_*`` and ``mnist_eta`` planes).
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Float, PRNGKeyArray

from gdlr_jax.experiments._skeleton import NumberList
from gdlr_jax.experiments.config import ConfigError, Scalar, Section
from gdlr_jax.problems import linear, mlp
from gdlr_jax.problems.data import MnistData, load_mnist
from gdlr_jax.problems.data.mnist import NUM_PIXELS, SOURCES


# ----- the two-neuron network L(x, y) = 1/2 (1 - xy)^2 --------------------------------------
def initial_grid(
    region: list[float], nx: int, ny: int, dtype: Any
) -> tuple[np.ndarray, np.ndarray, list]:
    """Cell centres of an ``ny x nx`` grid over ``region`` as engine parameters.

    Cell centres (not the edges) keep exceptional points such as the balanced minimum
    ``(1, 1)``, a fixed point for every ``eta``, off the usual grids.

    Returns:
        ``xs (nx,)``, ``ys (ny,)`` and ``params0 = [W1 (ny*nx, 1, 1), W2 (ny*nx, 1, 1)]``
        (row-major: initialisation ``i = iy * nx + ix`` starts at ``(xs[ix], ys[iy])``).
    """
    x0, x1, y0, y1 = region
    xs = x0 + (np.arange(nx) + 0.5) * (x1 - x0) / nx
    ys = y0 + (np.arange(ny) + 0.5) * (y1 - y0) / ny
    gx, gy = np.meshgrid(xs, ys)
    params0 = [jnp.asarray(g.reshape(-1, 1, 1), dtype) for g in (gx, gy)]
    return xs, ys, params0


@functools.cache
def two_neuron_loss(dtype_name: str) -> Any:
    """The loss ``L(x, y) = 1/2 (1 - xy)^2`` of :func:`gdlr_jax.linear.two_neuron` at the dtype
    ``dtype_name``; one loss object per dtype, so that repeated sweeps reuse their compilation."""
    return linear.two_neuron(jnp.dtype(dtype_name)).loss


# ----- MNIST: the data section, its loading, MLPs on it -------------------------------------
def _distinct(values: list) -> str | None:
    return None if len(set(values)) == len(values) else "distinct values"


#: the config's ``data`` section: the training set (shared by every MNIST experiment).
DATA = Section(
    "the training set (gdlr_jax.data.load_mnist, split 'train'; docs/data.md)",
    {
        "data_dir": Scalar(
            str,
            "folder of MNIST IDX files, a relative path taken from the current "
            "directory; \"\": gdlr run --data-dir PATH, else $GDLR_MNIST_DIR (or none, "
            "with source tfds or auto)",
            "",
        ),
        "source": Scalar(str, "where MNIST is read from", "idx", choices=SOURCES),
        "digits": NumberList(
            Scalar(int, "a digit", ge=0, le=9),
            "the digits told apart; label j is digits[j]; one output per digit",
            [0, 1],
            check=_distinct,
        ),
        "max_examples": Scalar(
            int, "keep the first max_examples images of the digits (0: all)", 0, ge=0
        ),
        "standardize": Scalar(
            bool, "standardise each pixel over the examples (else k/255 in [0, 1])", False
        ),
    },
)


def mlp_model(each: str, check: Callable[[list], str | None]) -> Section:
    """The config's ``model`` section of an MNIST experiment: the MLP of ``gdlr_jax.mlp`` (depth
    hidden layers of width units); its ``depths`` are the numbers of hidden layers, with
    ``each`` saying what the experiment does per depth and ``check`` its rule on the list."""
    depths = NumberList(
        Scalar(int, "a number of hidden layers", ge=0),
        f"numbers of hidden layers; {each}",
        [1, 2],
        check=check,
    )
    return Section(
        "the MLP (gdlr_jax.mlp): depth hidden layers of width units",
        {
            "depths": depths,
            "width": Scalar(int, "units per hidden layer", 32, ge=1),
            "activation": Scalar(
                str, "activation of the hidden layers", "gelu", choices=tuple(mlp.ACTIVATIONS)
            ),
            "use_bias": Scalar(bool, "every layer has a bias", True),
            "init_scale": Scalar(
                float,
                "multiplies the standard deviation of Flax's default kernel initialiser "
                "(LeCun normal, variance 1/fan_in); 1 is Flax's default; biases start at 0",
                1.0,
                gt=0.0,
                le=1e6,  # the variance init_scale^2 stays finite in float32
            ),
            "loss": Scalar(
                str,
                "mse (mean over examples and outputs, one-hot targets), mse_sum (sum over "
                "outputs, mean over examples: 2 x mse for two digits) or cross_entropy "
                "(softmax, mean over examples); docs/theory.md, loss conventions",
                "mse",
                choices=mlp.LOSSES,
            ),
        },
    )


DATA_HINT = (
    "give the folder of MNIST IDX files with gdlr run CONFIG --data-dir PATH, the environment "
    "variable GDLR_MNIST_DIR, or the key data.data_dir (docs/data.md says where to get them)"
)


def load_data(data: Mapping[str, Any]) -> MnistData:
    """The training images of the config's ``data`` section (:func:`gdlr_jax.data.load_mnist`).

    Raises:
        ConfigError: in one line, when ``data.data_dir`` is empty with source ``idx``, when
            the data folder or its files are missing or corrupt
            (wrong magic, truncated, bad gzip), or no source can provide MNIST (key
            ``data.data_dir``, or ``data.source`` when its package is missing; a relative path
            is taken from the current directory).
    """
    if data["source"] == "idx" and not data["data_dir"]:  # a config may leave it to the CLI
        raise ConfigError(
            f"config key 'data.data_dir' is empty: source 'idx' reads a folder of MNIST IDX "
            f"files; {DATA_HINT}",
            "data.data_dir",
        )
    data_dir = pathlib.Path(data["data_dir"]).expanduser() if data["data_dir"] else None
    try:
        return load_mnist(
            data_dir,
            digits=data["digits"],
            split="train",
            standardize=data["standardize"],
            max_examples=data["max_examples"] or None,
            source=data["source"],
        )
    except (FileNotFoundError, ImportError, RuntimeError, ValueError) as err:
        key = "data.source" if isinstance(err, ImportError) else "data.data_dir"
        where = "" if data_dir is None else f" (current directory {pathlib.Path.cwd()})"
        first, *more = str(err).splitlines()  # the rest says how to get MNIST: docs/data.md
        if isinstance(err, (FileNotFoundError, RuntimeError)):  # no MNIST there: where to get it
            first = f"{first.rstrip('.')}; {DATA_HINT}"
        elif more:
            first += " (docs/data.md says how to get MNIST)"
        raise ConfigError(
            f"config key '{key}' has value {data[key[5:]]!r}{where}: {first}", key
        ) from None


class MlpProblem(NamedTuple):
    """The arguments of :func:`gdlr_jax.sweep` for one architecture.

    Attributes:
        loss_fn: ``loss_fn(params)`` (full batch, the data closed over) or
            ``loss_fn(params, (images, labels))`` (with ``batch_source``).
        params0: the ``nnx.Param`` state of ``n_init`` MLPs, leaves ``(n_init, ...)``.
        batch_source: ``((images (n, 784), labels (n,)), batch_size)`` or ``None``.
        key: the key of the minibatch sequence, or ``None``.
        optimizer: an optax factory taking ``learning_rate``, or ``None`` (plain steps).
    """

    loss_fn: Callable[..., Float[jax.Array, ""]]
    params0: Any
    batch_source: tuple[tuple[jax.Array, jax.Array], int] | None
    key: PRNGKeyArray | None
    optimizer: Callable[..., optax.GradientTransformation] | None


def optimizer_factory(name: str, momentum: float) -> Callable[..., Any] | None:
    """The optax factory of ``training.optimizer`` (``None`` for plain GD/SGD steps)."""
    if name == "gd":
        return None
    if name == "momentum":
        return functools.partial(optax.sgd, momentum=momentum)
    return optax.adam


def mlp_problem(
    data: MnistData,
    depth: int,
    model: Mapping[str, Any],
    training: Mapping[str, Any],
    *,
    init_key: PRNGKeyArray,
    batch_key: PRNGKeyArray,
    dtype: Any,
) -> MlpProblem:
    """``n_init`` MLPs of one depth on ``data``, as inputs of :func:`gdlr_jax.sweep`.

    Args:
        data: the training set (``len(data.digits)`` classes, one output each).
        depth: number of hidden layers.
        model: the config's ``model`` section (``width``, ``activation``, ``use_bias``,
            ``init_scale``, ``loss``).
        training: the config's ``training`` section (``n_init``, ``batch_size``,
            ``optimizer``, ``momentum``).
        init_key: key of the initialisations (:func:`gdlr_jax.mlp.init_mlp_params`).
        batch_key: key of the minibatch sequence (used when ``batch_size > 0``).
        dtype: floating dtype of parameters and images.

    Returns:
        An :class:`MlpProblem`.

    Raises:
        ConfigError: when ``training.batch_size`` exceeds the number of examples.
    """
    n = data.labels.shape[0]
    if training["batch_size"] > n:
        raise ConfigError(
            f"config key 'training.batch_size' has value {training['batch_size']}; allowed: "
            f"at most the {n} training examples of the digits {list(data.digits)}",
            "training.batch_size",
        )
    classes = len(data.digits)
    graphdef, params0 = mlp.init_mlp_params(
        init_key,
        training["n_init"],
        depth=depth,
        width=model["width"],
        in_features=NUM_PIXELS,
        out_features=classes,
        activation=model["activation"],
        use_bias=model["use_bias"],
        init_scale=model["init_scale"],
        param_dtype=dtype,
    )
    loss_fn = mlp.mlp_loss(graphdef, loss=model["loss"], num_classes=classes)
    batch = (jnp.asarray(data.images, dtype), jnp.asarray(data.labels))
    optimizer = optimizer_factory(training["optimizer"], training["momentum"])
    if training["batch_size"] == 0:

        def full_batch_loss(params: Any) -> Float[jax.Array, ""]:
            return loss_fn(params, batch)

        return MlpProblem(full_batch_loss, params0, None, None, optimizer)
    return MlpProblem(loss_fn, params0, (batch, training["batch_size"]), batch_key, optimizer)


#: the ``engine.etas_per_chunk`` key of the MNIST experiments (chunk = that many step sizes)
ETAS_PER_CHUNK = Scalar(
    int,
    "step sizes run together (n_init trajectories each); a chunk stops as soon "
    "as all its trajectories have finished",
    1,
    ge=1,
)
