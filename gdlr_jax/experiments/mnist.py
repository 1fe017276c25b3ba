"""The MNIST experiments of the paper (Figures 3-6): MLPs on two digits, batched (layer 5).

MLPs (:mod:`gdlr_jax.mlp`: ``depth`` hidden layers of ``width`` units, one output per digit)
are trained on the chosen MNIST digits (0 and 1 in the paper) from ``n_init`` initialisations
at every step size ``eta`` of a grid, for each depth of a list. Every trajectory is

    theta_{t+1} = theta_t - eta * grad L_{B_t}(theta_t)

with ``L_B`` the mean loss (``mse`` against one-hot targets, or softmax ``cross_entropy``)
over the batch ``B_t``: the whole training set (``batch_size: 0``, full-batch GD) or a
minibatch drawn per epoch from a key, the same sequence for every step size and
initialisation (SGD); or the update of an optax optimiser with learning rate ``eta``. All
``n_eta x n_init`` trajectories of a depth are one :func:`gdlr_jax.sweep` (one vmapped pytree
of initialisations, no Python loop over them), classified by the engine's convergence
criterion (:class:`gdlr_jax.ConvergenceCriteria`, stated in the config under ``engine`` and
in ``docs/reproduction.md``): converged to a minimum when, at an evaluation time,
``||grad L|| <= grad_tol``, ``eta ||grad L|| <= step_tol`` and ``L <= loss_tol`` (full-batch
quantities; the infimum of both losses is 0); diverged when the parameters leave
``||theta||_inf <= divergence_bound`` or a value is non-finite.

A run writes (``docs/reproduction.md``, section MNIST):

* ``convergence.png``: the share of initialisations converging to a minimum (the trapping
  region) and the share diverging, per step size, one curve per depth (Figures 3 and 4);
* ``heatmaps_depth<d>.png``: over (step size x update), the mean full-batch loss and the mean
  ``eta ||grad L||`` over the initialisations still bounded at that update, log colour scale
  (Figures 5 and 6);
* ``results.npz`` and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Float, Int, PRNGKeyArray
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from gdlr_jax.engine import (
    ChunkMemoryError,
    ConvergenceCriteria,
    HostMemoryError,
    SweepResult,
    TrajectoryStatus,
    plan_sweep,
    sweep,
)
from gdlr_jax.engine._memory import readable_size
from gdlr_jax.experiments import figures
from gdlr_jax.experiments.config import ConfigError, Experiment, Scalar, Section
from gdlr_jax.experiments.runner import (
    MemoryNeed,
    RunOutput,
    RunReport,
    check_host_memory,
    progress_bar,
)
from gdlr_jax.experiments.two_neuron import SCHEMA as _TWO_NEURON_SCHEMA
from gdlr_jax.problems import mlp
from gdlr_jax.problems.data import MnistData, load_mnist
from gdlr_jax.problems.data.mnist import NUM_PIXELS, SOURCES


# ----- the schema ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NumberList:
    """A config key holding a non-empty list of numbers, each validated by ``item``.

    ``check(values)`` returns what is allowed (a string) when the list as a whole is not
    (e.g. not increasing), else None.
    """

    item: Scalar
    help: str
    default: list
    check: Callable[[list], str | None] | None = None

    def describe(self) -> str:
        return f"a non-empty list, each item {self.item.describe()}"

    def validate(self, value: Any, key: str) -> list:
        if not isinstance(value, list) or not value:
            raise ConfigError(
                f"config key '{key}' has value {value!r}; allowed: {self.describe()}", key
            )
        out = [self.item.validate(v, f"{key}.{i}") for i, v in enumerate(value)]
        problem = self.check(out) if self.check is not None else None
        if problem is not None:
            raise ConfigError(f"config key '{key}' has value {value!r}; allowed: {problem}", key)
        return out


def _increasing(values: list) -> str | None:
    if all(a < b for a, b in zip(values, values[1:])):
        return None
    return "strictly increasing values"


def _distinct(values: list) -> str | None:
    return None if len(set(values)) == len(values) else "distinct values"


def _check_data(data: dict) -> str | None:
    if data["source"] == "idx" and not data["data_dir"]:
        return "source 'idx' needs data_dir, the folder of MNIST IDX files"
    return None


def _check_training(training: dict) -> str | None:
    if training["record_every"] > training["steps"]:
        return f"record_every = {training['record_every']} must be <= steps = {training['steps']}"
    return None


_ENGINE = _TWO_NEURON_SCHEMA.keys["engine"]  # the engine's settings and criteria, shared

SCHEMA = Section(
    "MLPs on MNIST digits: the trapping region per step size and depth (Figures 3-6)",
    {
        "dtype": Scalar(
            str, "floating dtype of parameters and data", "float32", choices=("float32", "float64")
        ),
        "data": Section(
            "the training set (gdlr_jax.data.load_mnist, split 'train'; docs/data.md)",
            {
                "data_dir": Scalar(
                    str,
                    "folder of MNIST IDX files; a relative path is taken from the current "
                    "directory (\"\" for none, with source tfds or auto)",
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
            check=_check_data,
        ),
        "model": Section(
            "the MLP (gdlr_jax.mlp): depth hidden layers of width units",
            {
                "depths": NumberList(
                    Scalar(int, "a number of hidden layers", ge=0),
                    "numbers of hidden layers; one sweep each",
                    [1, 2],
                    check=_increasing,
                ),
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
                ),
                "loss": Scalar(
                    str,
                    "mse (mean over examples and outputs, one-hot targets) or cross_entropy "
                    "(softmax, mean over examples)",
                    "mse",
                    choices=mlp.LOSSES,
                ),
            },
        ),
        "training": Section(
            "the trajectories: one per (step size, initialisation) and depth",
            {
                "etas": NumberList(
                    Scalar(float, "a step size", gt=0.0),
                    "step sizes",
                    [0.1, 0.5, 1.0, 2.0],
                    check=_increasing,
                ),
                "n_init": Scalar(
                    int, "initialisations per depth (shared by all step sizes)", 8, ge=1
                ),
                "steps": Scalar(int, "maximum updates per trajectory", 1000, ge=1),
                "batch_size": Scalar(
                    int,
                    "examples per update: 0 for full-batch GD, else minibatches drawn per epoch "
                    "(the same sequence for every trajectory)",
                    0,
                    ge=0,
                ),
                "optimizer": Scalar(
                    str,
                    "gd: plain steps theta - eta grad (the paper); momentum: optax.sgd with "
                    "momentum; adam: optax.adam; eta is the learning rate",
                    "gd",
                    choices=("gd", "momentum", "adam"),
                ),
                "momentum": Scalar(float, "momentum of optimizer: momentum", 0.9, ge=0.0, le=1.0),
                "record_every": Scalar(
                    int, "record the loss and eta ||grad L|| every this many updates (heatmaps)",
                    10, ge=1,
                ),
                "seed": Scalar(int, "seed of the initialisations and of the minibatches", 0, ge=0),
            },
            check=_check_training,
        ),
        "engine": Section(
            "gdlr_jax.sweep settings and the convergence criterion (docs/engine.md)",
            {
                **{k: v for k, v in _ENGINE.keys.items() if k != "memory_budget_mb"},
                "etas_per_chunk": Scalar(
                    int,
                    "step sizes run together (n_init trajectories each); a chunk stops as soon "
                    "as all its trajectories have finished",
                    1,
                    ge=1,
                ),
            },
            check=_ENGINE.check,
        ),
        "figures": Section(
            "figure output",
            {"dpi": Scalar(int, "resolution of the PNG files", 150, ge=20, le=1200)},
        ),
    },
)


# ----- the problem: data, initialisations, loss ---------------------------------------------
def load_data(data: Mapping[str, Any]) -> MnistData:
    """The training images of the config's ``data`` section (:func:`gdlr_jax.data.load_mnist`).

    Raises:
        ConfigError: in one line, when the data folder or its files are missing or corrupt
            (wrong magic, truncated, bad gzip), or no source can provide MNIST (key
            ``data.data_dir``, or ``data.source`` when its package is missing; a relative path
            is taken from the current directory).
    """
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
        raise ConfigError(
            f"config key '{key}' has value {data[key[5:]]!r}{where}: {first}"
            + (" (docs/data.md says how to get MNIST)" if more else ""),
            key,
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


# ----- what the figures show ----------------------------------------------------------------
def bounded_mean(
    recorded: Float[np.ndarray, "n_eta n_init n_rec"],
    status: Int[np.ndarray, "n_eta n_init"],
    steps_taken: Int[np.ndarray, "n_eta n_init"],
    record_steps: Int[np.ndarray, " n_rec"],
) -> tuple[Float[np.ndarray, "n_eta n_rec"], Float[np.ndarray, "n_eta n_rec"]]:
    """Mean of a recording over the trajectories still bounded at each recorded update.

    Trajectory ``j`` counts at update ``t`` unless it has diverged by then (status
    ``DIVERGED`` and ``t > steps_taken``: its slot holds its last bounded value) or its
    recorded value is not finite.

    Returns:
        ``(mean, share)``: the mean (NaN where no trajectory counts, e.g. all diverged), and
        the share of trajectories that count, each ``(n_eta, n_rec)``.
    """
    recorded = np.asarray(recorded, np.float64)
    gone = (status == int(TrajectoryStatus.DIVERGED))[..., None] & (
        record_steps[None, None, :] > steps_taken[..., None]
    )
    counts = ~gone & np.isfinite(recorded)
    total = np.where(counts, recorded, 0.0).sum(axis=1)
    number = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(number > 0, total / number, np.nan)
    return mean, number / recorded.shape[1]


def status_shares(status: Int[np.ndarray, "... n_init"]) -> dict[str, np.ndarray]:
    """Share of the initialisations with each :class:`~gdlr_jax.TrajectoryStatus` (last axis)."""
    return {s.name.lower(): np.mean(status == int(s), axis=-1) for s in TrajectoryStatus}


def collapse_step_size(etas: Sequence[float], converged: Sequence[float]) -> float | None:
    """The smallest step size of the grid from which on no initialisation converges.

    ``None`` when the largest step size still has converging initialisations.
    """
    converged = np.asarray(converged)
    if converged[-1] > 0:
        return None
    some = np.flatnonzero(converged > 0)
    return float(etas[0] if some.size == 0 else etas[some[-1] + 1])


def _eta_axis(ax: Any, etas: np.ndarray) -> None:
    if etas.size > 1 and etas[-1] / etas[0] > 10:
        ax.set_xscale("log")


def convergence_figure(
    etas: Float[np.ndarray, " n_eta"],
    depths: Sequence[int],
    status: Int[np.ndarray, "n_depth n_eta n_init"],
    title: str,
) -> Figure:
    """Figures 3 and 4: the share converging to a minimum and diverging, per step size.

    Args:
        etas: the step sizes.
        depths: the depths, one curve each.
        status: :class:`~gdlr_jax.TrajectoryStatus` codes.
        title: the setting (model, loss, optimiser, initialisations).
    """
    fig = Figure(figsize=(10.0, 4.4), layout="constrained")
    ax_conv, ax_div = fig.subplots(1, 2, sharex=True)
    colours = colormaps["viridis"](np.linspace(0.0, 0.85, len(depths)))
    for depth, codes, colour in zip(depths, status, colours, strict=True):
        shares = status_shares(codes)
        ax_conv.plot(etas, 100 * shares["converged_minimum"], "o-", color=colour, ms=4,
                     label=f"depth {depth}")
        ax_div.plot(etas, 100 * shares["diverged"], "s--", color=colour, ms=4,
                    label=f"depth {depth}")
    for ax, what in ((ax_conv, "converged to a minimum"), (ax_div, "diverged")):
        _eta_axis(ax, etas)
        ax.set(xlabel="step size $\\eta$", ylabel=f"% of initialisations {what}",
               ylim=(-3, 103))
        ax.grid(alpha=0.3)
    ax_conv.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def _cell_edges(centres: np.ndarray) -> np.ndarray:
    """Edges of cells centred at increasing ``centres`` (half-way between neighbours)."""
    if centres.size == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    mid = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - mid[0]], mid, [2 * centres[-1] - mid[-1]]])


def heatmaps_figure(
    etas: Float[np.ndarray, " n_eta"],
    record_steps: Int[np.ndarray, " n_rec"],
    mean_loss: Float[np.ndarray, "n_eta n_rec"],
    mean_step_norm: Float[np.ndarray, "n_eta n_rec"],
    status: Int[np.ndarray, "n_eta n_init"],
    title: str,
) -> Figure:
    """Figures 5 and 6: mean loss and mean ``eta ||grad L||`` over (step size x update).

    One row per step size (smallest at the bottom), one column per recorded update; log
    colour scales. Cells where every trajectory has diverged (NaN means, see
    :func:`bounded_mean`) are grey. The means are over the trajectories still bounded, so
    the right-hand labels give, per step size, the shares of the initialisations that
    converged to a minimum and that diverged (from ``status``).
    """
    fig = Figure(figsize=(12.0, 2.4 + 0.28 * len(etas)), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    x_edges = _cell_edges(np.asarray(record_steps, np.float64))
    cmap = colormaps["magma"].with_extremes(bad="#bdbdbd")
    for ax, values, label in (
        (axes[0], mean_loss, "mean full-batch loss $L$"),
        (axes[1], mean_step_norm, "mean $\\eta\\,\\|\\nabla L\\|$"),
    ):
        positive = values[np.isfinite(values) & (values > 0)]
        norm = None
        if positive.size:
            low, high = positive.min(), positive.max()
            norm = LogNorm(vmin=low, vmax=max(high, low * 10))
            values = np.where(np.isfinite(values), np.maximum(values, low), np.nan)
        mesh = ax.pcolormesh(
            x_edges, np.arange(len(etas) + 1), np.ma.masked_invalid(values), cmap=cmap,
            norm=norm, shading="flat",
        )
        fig.colorbar(mesh, ax=ax, label=f"{label} (log scale)")
        ax.set(xlabel="update $t$", title=label)
    rows = np.arange(len(etas)) + 0.5
    axes[0].set_yticks(rows, labels=[f"{e:g}" for e in etas])
    axes[0].set_ylabel("step size $\\eta$")
    shares = status_shares(status)
    right = axes[1].twinx()
    right.set_ylim(axes[1].get_ylim())
    right.set_yticks(
        rows,
        labels=[
            f"{c:.0%} conv. {d:.0%} div."
            for c, d in zip(shares["converged_minimum"], shares["diverged"], strict=True)
        ],
        fontsize=7,
    )
    fig.legend(
        handles=[Patch(color="#bdbdbd", label="every trajectory has diverged")],
        loc="outside lower center", fontsize=8, frameon=False,
    )
    fig.suptitle(title, fontsize=10)
    return fig


# ----- the run ------------------------------------------------------------------------------
def _setting(params: Mapping[str, Any], n_examples: int) -> str:
    model, training = params["model"], params["training"]
    batches = (
        "full-batch" if training["batch_size"] == 0 else f"batch {training['batch_size']}"
    )
    method = {"gd": "GD" if training["batch_size"] == 0 else "SGD"}.get(
        training["optimizer"], training["optimizer"]
    )
    digits = "/".join(str(d) for d in params["data"]["digits"])
    return (
        f"{model['activation']} MLP (width {model['width']}), {model['loss']}, {batches} "
        f"{method}, MNIST {digits} ({n_examples} examples), {training['n_init']} "
        f"initialisations, {training['steps']} updates"
    )


def _sweep_arguments(
    problem: MlpProblem, etas: np.ndarray, params: Mapping[str, Any], dtype: Any
) -> tuple[tuple, dict[str, Any]]:
    """The arguments ``(args, kwargs)`` of :func:`gdlr_jax.sweep` for one depth."""
    training, engine = params["training"], params["engine"]
    args = (problem.loss_fn, problem.params0, jnp.asarray(etas, dtype))
    return args, dict(
        steps=training["steps"],
        batch_source=problem.batch_source,
        optimizer=problem.optimizer,
        key=problem.key,
        min_loss_value=0.0,
        criteria=ConvergenceCriteria(**{k: engine[k] for k in ConvergenceCriteria._fields}),
        check_every=engine["check_every"],
        record_every=training["record_every"],
        dtype=dtype,
        chunk_size=engine["etas_per_chunk"] * training["n_init"],
    )


def _problems(
    data: MnistData, params: Mapping[str, Any], dtype: Any, n_init: int
) -> dict[int, MlpProblem]:
    """The :func:`mlp_problem` of every depth of the config, with ``n_init`` MLPs each."""
    training = {**params["training"], "n_init": n_init}
    init_root, batch_key = jax.random.split(jax.random.key(training["seed"]))
    return {
        depth: mlp_problem(
            data, depth, params["model"], training,
            init_key=jax.random.fold_in(init_root, depth), batch_key=batch_key, dtype=dtype,
        )
        for depth in params["model"]["depths"]
    }


def check_chunks_fit(
    data: MnistData, etas: np.ndarray, params: Mapping[str, Any], dtype: Any
) -> None:
    """Plans the sweep of every depth (:func:`gdlr_jax.plan_sweep`) before any of them runs,
    from the shapes of ``training.n_init`` initialisations (one MLP per depth is built).

    Raises:
        ConfigError: in one line, when a depth's chunk of ``engine.etas_per_chunk x
            training.n_init`` trajectories is estimated not to fit in a device's memory, or
            the results of every depth not to fit in the host's; the message says how to
            reduce it.
    """
    per_chunk, n_init = params["engine"]["etas_per_chunk"], params["training"]["n_init"]
    sizes = (("training.n_init", n_init, 1),)
    needs, limit = [], None
    for depth, problem in _problems(data, params, dtype, 1).items():
        grid = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((n_init,) + x.shape[1:], x.dtype), problem.params0
        )
        args, kwargs = _sweep_arguments(problem._replace(params0=grid), etas, params, dtype)
        try:
            plan = plan_sweep(*args, **kwargs)
            needs.append(MemoryNeed(plan.result_bytes, plan.peak_host_bytes, sizes))
        except HostMemoryError as err:  # alone too large: named by the check below
            needs.append(MemoryNeed(err.needed, err.needed, sizes))
            limit = err.limit
        except ChunkMemoryError as err:
            key, value = "engine.etas_per_chunk", per_chunk
            if err.fit >= n_init:
                how = f"use engine.etas_per_chunk <= {err.fit // n_init}"
            elif err.fit:
                key, value = "training.n_init", n_init
                how = f"use training.n_init <= {err.fit} (and engine.etas_per_chunk = 1)"
            else:
                key, value = "training.steps", params["training"]["steps"]
                how = "take fewer training.steps, record less often (training.record_every) "
                how += "or use a smaller model"
            raise ConfigError(
                f"config key '{key}' has value {value}: depth {depth} does not fit in memory: "
                f"{per_chunk} x {n_init} trajectories per chunk (engine.etas_per_chunk x "
                f"training.n_init) of about {readable_size(err.per_trajectory)} each (an "
                f"estimate), a device can allocate {readable_size(err.limit)}; {how}.",
                key,
            ) from None
    check_host_memory(needs, limit)  # the results of every depth are kept to the end


def _sweep_depth(
    problem: MlpProblem,
    etas: np.ndarray,
    params: Mapping[str, Any],
    dtype: Any,
    on_chunk: Callable[[int, Any], None],
    checkpoint_dir: pathlib.Path,
) -> SweepResult:
    args, kwargs = _sweep_arguments(problem, etas, params, dtype)
    return sweep(*args, **kwargs, on_chunk=on_chunk, checkpoint_dir=checkpoint_dir)


def plan(params: Mapping[str, Any]) -> MnistData:
    """Loads the data and plans every depth's sweep (:func:`check_chunks_fit`), before the
    run makes its folder.

    Returns:
        The training data.

    Raises:
        ConfigError: in one line, on a missing or corrupt data folder, or a sweep that is
            estimated not to fit in memory.
    """
    with jax.enable_x64(params["dtype"] == "float64"):
        data = load_data(params["data"])
        etas = np.asarray(params["training"]["etas"], np.float64)
        check_chunks_fit(data, etas, params, jnp.dtype(params["dtype"]))
        return data


def run(
    params: Mapping[str, Any], data: MnistData, output: RunOutput, progress: bool = True
) -> RunReport:
    """Runs the MNIST experiment from resolved config keys (see :data:`SCHEMA`) on ``data``
    (from :func:`plan`)."""
    with jax.enable_x64(params["dtype"] == "float64"):
        return _run(params, data, output, progress)


_FIELDS = (
    "status", "steps_taken", "final_loss", "final_grad_norm", "asymptotic_step_norm", "period",
    "recorded_loss", "recorded_step_norm",
)
_SHORT_NAMES = ("minimum", "critical pt", "periodic", "not conv.", "diverged")


def _run(
    params: Mapping[str, Any], data: MnistData, output: RunOutput, progress: bool
) -> RunReport:
    training = params["training"]
    timings = {}
    dtype = jnp.dtype(params["dtype"])
    etas = np.asarray(training["etas"], np.float64)
    depths = params["model"]["depths"]
    problems = _problems(data, params, dtype, training["n_init"])

    results = []
    total = len(depths) * len(etas) * training["n_init"]
    with progress_bar(total, "mnist sweeps", progress) as bar:
        for depth in depths:
            tic = time.perf_counter()
            result = _sweep_depth(
                problems[depth], etas, params, dtype,
                on_chunk=lambda index, chunk: bar.update(chunk.stop - chunk.start),
                checkpoint_dir=output.checkpoint_dir(f"depth{depth}"),
            )
            results.append(result)
            timings[f"depth_{depth}"] = time.perf_counter() - tic

    arrays: dict[str, Any] = {
        "etas": etas,
        "depths": np.asarray(depths),
        "record_steps": results[0].record_steps,
        **{name: np.stack([getattr(r, name) for r in results]) for name in _FIELDS},
    }
    record_steps = arrays["record_steps"]
    means = [
        [
            bounded_mean(getattr(r, name), r.status, r.steps_taken, record_steps)
            for name in ("recorded_loss", "recorded_step_norm")
        ]
        for r in results
    ]
    arrays["heatmap_mean_loss"] = np.stack([m[0][0] for m in means])
    arrays["heatmap_mean_step_norm"] = np.stack([m[1][0] for m in means])
    arrays["heatmap_bounded_share"] = np.stack([m[0][1] for m in means])
    shares = status_shares(arrays["status"])  # each (n_depth, n_eta)
    arrays["converged_fraction"] = shares["converged_minimum"]
    output.write_arrays("results", arrays)

    tic = time.perf_counter()
    dpi = params["figures"]["dpi"]
    setting = _setting(params, int(data.labels.shape[0]))
    output.save_figure(
        convergence_figure(etas, depths, arrays["status"], setting), "convergence", dpi=dpi
    )
    for k, depth in enumerate(depths):
        figure = heatmaps_figure(
            etas, record_steps, arrays["heatmap_mean_loss"][k],
            arrays["heatmap_mean_step_norm"][k], arrays["status"][k], f"depth {depth}: {setting}",
        )
        output.save_figure(figure, f"heatmaps_depth{depth}", dpi=dpi)
    timings["figures"] = time.perf_counter() - tic
    return _report(params, data, arrays, shares, timings)


def _median_of_bounded(values: np.ndarray, status: np.ndarray) -> float | None:
    kept = values[(status != int(TrajectoryStatus.DIVERGED)) & np.isfinite(values)]
    return float(np.median(kept)) if kept.size else None


def _report(
    params: Mapping[str, Any],
    data: MnistData,
    arrays: Mapping[str, Any],
    shares: Mapping[str, np.ndarray],
    timings: Mapping[str, float],
) -> RunReport:
    etas, depths = arrays["etas"], params["model"]["depths"]
    names = [code.name.lower() for code in figures.STATUS_STYLE]
    per_depth, rows, notes = [], [], []
    for k, depth in enumerate(depths):
        per_eta = []
        for i, eta in enumerate(etas):
            status = arrays["status"][k, i]
            entry = {
                "eta": float(eta),
                "converged_fraction": float(shares["converged_minimum"][k, i]),
                "status_fractions": {s: float(shares[s][k, i]) for s in shares},
                "median_final_loss": _median_of_bounded(arrays["final_loss"][k, i], status),
                "median_asymptotic_step_norm": _median_of_bounded(
                    arrays["asymptotic_step_norm"][k, i], status
                ),
            }
            per_eta.append(entry)
            step = entry["median_asymptotic_step_norm"]
            rows.append([
                depth, float(eta), *(entry["status_fractions"][s] for s in names),
                "-" if step is None else step,
            ])
        converged = shares["converged_minimum"][k]
        some = np.flatnonzero(converged > 0)
        largest = float(etas[some[-1]]) if some.size else None
        collapse = collapse_step_size(etas, converged)
        per_depth.append({
            "depth": depth,
            "largest_converging_eta": largest,
            "collapse_eta": collapse,
            "per_eta": per_eta,
        })
        if largest is None:
            notes.append(f"depth {depth}: no initialisation converged at any step size")
        else:
            notes.append(
                f"depth {depth}: converging initialisations up to eta = {largest:g}; "
                + ("some still converge at the largest step size" if collapse is None
                   else f"none converges for eta >= {collapse:g}")
            )
    engine = params["engine"]
    criterion = {k: engine[k] for k in ConvergenceCriteria._fields}
    summary = {
        "data": {
            "data_dir": str(pathlib.Path(params["data"]["data_dir"]).expanduser().resolve())
            if params["data"]["data_dir"] else None,
            "examples": int(data.labels.shape[0]),
            "digits": list(data.digits),
        },
        "criterion": criterion,
        "depths": per_depth,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    headers = ["depth", "eta", *_SHORT_NAMES, "median eta|grad L|"]
    return RunReport(summary=summary, headers=headers, rows=rows, notes=notes)


EXPERIMENT = Experiment(
    name="mnist",
    summary="MLPs on MNIST digits: trapping region per step size and depth, loss and "
    "eta ||grad L|| heatmaps (Figures 3-6)",
    schema=SCHEMA,
    plan=plan,
    run=run,
)
