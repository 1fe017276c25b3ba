"""Fractal trainability boundaries: the boundary between converging and non-converging GD,
zoomed into, with its box-counting dimension at each level (layer 5; beyond the paper).

Recent work finds that the set of hyperparameters for which training converges has a fractal
boundary (Sohl-Dickstein 2024, box-counting dimensions between about 1.2 and 2). This
experiment measures it on a plane of one of three kinds (``plane.problem``):

* ``two_neuron_init``: initialisations ``(x_0, y_0)`` of ``L(x, y) = 1/2 (1 - xy)^2`` at one
  step size ``plane.eta`` (the basin of convergence);
* ``two_neuron_eta``: per-coordinate step sizes ``(eta_x, eta_y)`` of the same loss from one
  initialisation ``plane.init``: ``x <- x - eta_x dL/dx``, ``y <- y - eta_y dL/dy``;
* ``mnist_eta``: per-layer step sizes ``(eta_1, eta_2)`` of a one-hidden-layer Flax MLP
  (:mod:`gdlr_jax.mlp`) on MNIST digits from one initialisation: every leaf of the hidden
  layer steps with ``eta_1``, every leaf of the output layer with ``eta_2``.

Each plane is swept on a ``resolution x resolution`` grid of cell centres (one
:func:`gdlr_jax.sweep`: a grid of initialisations at one step size, or per-leaf step sizes
``etas`` of shape ``(resolution^2,)`` from one initialisation). The cells are labelled
(converged to a minimum or not, or every status), :func:`gdlr_jax.boundary_dimension` gives
the box-counting dimension of the boundary, and the next level is a fresh grid over the
region ``zoom.factor`` times smaller centred on the boundary point nearest to the current
centre -- ``zoom.levels`` levels in all. Step-size axes can be logarithmic
(``plane.log_step_sizes``: the region is then in ``log10 eta``).

A run writes ``zoom.png`` (the labels of every level, the next level's region outlined),
``box_counts.png`` (the counts and fitted lines per level), ``results.npz`` and
``summary.json``; each level's sweep is checkpointed, so an interrupted run resumes where it
stopped (``docs/fractal_boundary.md``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from gdlr_jax.dynamics import BoundaryDimension, boundary_dimension
from gdlr_jax.dynamics._boundary_dimension import boundary_squares
from gdlr_jax.engine import (
    ChunkMemoryError,
    HostMemoryError,
    TrajectoryStatus,
    plan_sweep,
)
from gdlr_jax.engine._memory import readable_size
from gdlr_jax.experiments import _skeleton, figures
from gdlr_jax.experiments._shared_problems import (
    DATA,
    initial_grid,
    load_data,
    mlp_problem,
    two_neuron_loss,
)
from gdlr_jax.experiments._skeleton import RunSteps, status_fractions
from gdlr_jax.experiments.config import ConfigError, Numbers, Scalar, Section
from gdlr_jax.experiments.runner import PlannedSweep, RunReport
from gdlr_jax.problems import mlp

PROBLEMS = ("two_neuron_init", "two_neuron_eta", "mnist_eta")
LABELS = ("converged", "status")


def _check_region(v: list[float]) -> str | None:
    if v[0] < v[1] and v[2] < v[3]:
        return None
    return "[x_min, x_max, y_min, y_max] with x_min < x_max and y_min < y_max"


def _check_target(v: list[float]) -> str | None:
    return None if all(0 <= t <= 1 for t in v) else "two fractions in [0, 1]"


def _check_plane(plane: dict) -> str | None:
    steps_plane = plane["problem"] != "two_neuron_init"
    if steps_plane and not plane["log_step_sizes"] and min(plane["region"]) <= 0:
        return f"step sizes must be positive: region {plane['region']} (or log_step_sizes: true)"
    return None


SCHEMA = _skeleton.schema(
    "zooms into the boundary of convergence on a plane and measures its box-counting dimension",
    _skeleton.dtype_key("float64", "floating dtype of the GD trajectories"),
    {
        "plane": Section(
            "the plane swept: what its axes are and the first level's region",
            {
                "problem": Scalar(
                    str,
                    "two_neuron_init: initialisations (x0, y0) of 1/2 (1 - xy)^2 at step size "
                    "eta; two_neuron_eta: step sizes (eta_x, eta_y) from init; mnist_eta: step "
                    "sizes (eta_1, eta_2) of the hidden and output layer of an MLP on MNIST",
                    "two_neuron_init",
                    choices=PROBLEMS,
                ),
                "region": Numbers(
                    4,
                    "first level: [x_min, x_max, y_min, y_max] (in log10 eta with "
                    "log_step_sizes)",
                    [-2.5, 2.5, -2.5, 2.5],
                    check=_check_region,
                ),
                "log_step_sizes": Scalar(
                    bool,
                    "step-size axes in log10 eta (two_neuron_eta, mnist_eta)",
                    False,
                ),
                "eta": Scalar(float, "the step size of two_neuron_init", 0.9, gt=0.0),
                "init": Numbers(
                    2, "the initialisation (x0, y0) of two_neuron_eta", [2.0, 0.3]
                ),
                "seed": Scalar(
                    int, "PRNG seed of the MLP's initialisation (mnist_eta)", 0, ge=0
                ),
            },
            check=_check_plane,
        ),
        "zoom": Section(
            "the zoom: a fresh grid per level, each factor times smaller than the last",
            {
                "levels": Scalar(int, "number of levels (grids)", 3, ge=1),
                "factor": Scalar(
                    float, "each level's region is factor times smaller", 4.0, gt=1.0
                ),
                "resolution": Scalar(
                    int, "grid points per axis (cell centres)", 128, ge=33
                ),
                "steps": Scalar(int, "maximum GD steps per trajectory", 2000, ge=1),
                "target": Numbers(
                    2,
                    "where to zoom, as fractions [u, v] of the first level's region: each level "
                    "centres on the boundary point nearest to that point",
                    [0.5, 0.5],
                    check=_check_target,
                ),
            },
        ),
        "labels": Scalar(
            str,
            "classes of the cells: converged (to a minimum, or not) or status (every "
            "TrajectoryStatus its own class)",
            "converged",
            choices=LABELS,
        ),
        "dimension": Section(
            "the box-counting fit (gdlr_jax.boundary_dimension)",
            {
                "min_box": Scalar(
                    int, "smallest box side in cells, a power of two", 1, ge=1
                ),
                "max_box": Scalar(
                    int,
                    "largest box side, a power of two (0: (resolution - 1) / 8)",
                    0,
                    ge=0,
                ),
            },
        ),
        "data": DATA,
        "mlp": Section(
            "the MLP of mnist_eta (gdlr_jax.mlp): one hidden layer of width units",
            {
                "width": Scalar(int, "hidden units", 16, ge=1),
                "activation": Scalar(
                    str,
                    "activation of the hidden layer",
                    "gelu",
                    choices=tuple(mlp.ACTIVATIONS),
                ),
                "use_bias": Scalar(bool, "both layers have a bias", True),
                "loss": Scalar(str, "training loss", "mse", choices=mlp.LOSSES),
            },
        ),
    },
    _skeleton.engine_section(
        {
            "memory_budget_mb": Scalar(
                int, "memory for one chunk of trajectories (MiB)", 1024, ge=1
            )
        }
    ),
)


# ----- the planes ---------------------------------------------------------------------------
class Plane(NamedTuple):
    """What a plane's sweeps need: the loss, how a region becomes the arguments of a sweep,
    and how its status comes back as a ``(resolution, resolution)`` grid (rows along ``y``).

    Attributes:
        loss_fn: the full-batch loss.
        arguments: ``arguments(region) -> (params0, etas)`` for a grid over ``region``
            (region in the units of the axes: ``log10 eta`` with ``log_step_sizes``).
        axis_labels: the labels of the x and y axes.
    """

    loss_fn: Any
    arguments: Any
    axis_labels: tuple[str, str]


def _grid_points(region: list[float], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The cell centres of an ``n x n`` grid over ``region``, row-major ``(n^2,)`` each."""
    x0, x1, y0, y1 = region
    xs = x0 + (np.arange(n) + 0.5) * (x1 - x0) / n
    ys = y0 + (np.arange(n) + 0.5) * (y1 - y0) / n
    gx, gy = np.meshgrid(xs, ys)
    return gx.reshape(-1), gy.reshape(-1)


def _layer_etas(params0: Any, eta_1: np.ndarray, eta_2: np.ndarray, dtype: Any) -> Any:
    """Per-leaf step sizes of an MLP: ``eta_1`` for every leaf of the hidden layer(s), ``eta_2``
    for those of the output layer (a pytree shaped like one initialisation)."""

    def leaf_etas(path: tuple, _: Any) -> jax.Array:
        output = any(getattr(k, "key", None) == "output" for k in path)
        return jnp.asarray(eta_2 if output else eta_1, dtype)

    return jax.tree_util.tree_map_with_path(leaf_etas, params0)


def make_plane(params: Mapping[str, Any], data: Any, abstract: bool = False) -> Plane:
    """The :class:`Plane` of ``plane.problem`` (``data``: the MNIST training set for
    ``mnist_eta``, else None). With ``abstract``, ``arguments`` gives shapes only (for
    :func:`gdlr_jax.plan_sweep`)."""
    plane, n, dtype = (
        params["plane"],
        params["zoom"]["resolution"],
        jnp.dtype(params["dtype"]),
    )
    scale = (lambda v: 10.0**v) if plane["log_step_sizes"] else (lambda v: v)
    if plane["problem"] == "two_neuron_init":

        def init_arguments(region: list[float]) -> tuple[Any, Any]:
            if abstract:
                return [jax.ShapeDtypeStruct((n * n, 1, 1), dtype)] * 2, np.array(
                    [plane["eta"]]
                )
            return initial_grid(region, n, n, dtype)[2], np.array([plane["eta"]])

        return Plane(two_neuron_loss(dtype.name), init_arguments, ("$x_0$", "$y_0$"))

    log = "\\log_{10} " if plane["log_step_sizes"] else ""
    if plane["problem"] == "two_neuron_eta":
        x0, y0 = plane["init"]
        params0 = [jnp.full((1, 1, 1), x0, dtype), jnp.full((1, 1, 1), y0, dtype)]

        def eta_arguments(region: list[float]) -> tuple[Any, Any]:
            ex, ey = (scale(v) for v in _grid_points(region, n))
            return params0, [jnp.asarray(ex, dtype), jnp.asarray(ey, dtype)]

        labels = (f"${log}\\eta_x$", f"${log}\\eta_y$")
        return Plane(two_neuron_loss(dtype.name), eta_arguments, labels)

    model = {**params["mlp"], "init_scale": 1.0}
    training = {"n_init": 1, "batch_size": 0, "optimizer": "gd", "momentum": 0.0}
    key = jax.random.key(plane["seed"])
    problem = mlp_problem(
        data, 1, model, training, init_key=key, batch_key=key, dtype=dtype
    )

    def mlp_arguments(region: list[float]) -> tuple[Any, Any]:
        e1, e2 = (scale(v) for v in _grid_points(region, n))
        return problem.params0, _layer_etas(problem.params0, e1, e2, dtype)

    labels = (f"${log}\\eta_1$ (hidden layer)", f"${log}\\eta_2$ (output layer)")
    return Plane(problem.loss_fn, mlp_arguments, labels)


def _sweep_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:
    engine = params["engine"]
    return {
        "steps": params["zoom"]["steps"],
        "min_loss_value": 0.0,  # both losses are >= 0, and 0 is their infimum
        "criteria": _skeleton.criteria(engine),
        "check_every": engine["check_every"],
        "memory_budget_bytes": engine["memory_budget_mb"] << 20,
        "dtype": jnp.dtype(params["dtype"]),
    }


def _check_dimension_keys(params: Mapping[str, Any]) -> None:
    """Raises :class:`ConfigError` when the box sizes cannot be fitted on the grid (the
    same check :func:`gdlr_jax.boundary_dimension` makes, on a grid with a boundary)."""
    n, dim = params["zoom"]["resolution"], params["dimension"]
    probe = np.zeros((n, n), np.int32)
    probe[:, n // 2 :] = 1
    try:
        boundary_dimension(probe, [0, 1, 0, 1], **_box_sizes(dim))
    except ValueError as err:
        key = "dimension.max_box" if dim["max_box"] else "dimension.min_box"
        raise ConfigError(
            f"config key '{key}' has value {dim[key[10:]]}: {err} (zoom.resolution = {n})",
            key,
        ) from None


def _box_sizes(dim: Mapping[str, Any]) -> dict[str, Any]:
    return {"min_box": dim["min_box"], "max_box": dim["max_box"] or None}


class _Planned(NamedTuple):
    data: Any  # the MNIST training set (mnist_eta) or None
    trajectories: int  # per level


def plan(params: Mapping[str, Any]) -> _Planned:
    """Checks the box sizes against the grid, loads MNIST for ``mnist_eta``, and plans one
    level's sweep (every level has the same shapes), before any compute.

    Raises:
        ConfigError: in one line, on box sizes the grid cannot hold, a missing data folder,
            or a level's sweep estimated not to fit in memory.
    """
    _check_dimension_keys(params)
    data = (
        load_data(params["data"])
        if params["plane"]["problem"] == "mnist_eta"
        else None
    )
    plane = make_plane(params, data, abstract=True)
    params0, etas = plane.arguments(params["plane"]["region"])
    n = params["zoom"]["resolution"]
    try:
        plan_sweep(plane.loss_fn, params0, etas, **_sweep_kwargs(params))
    except (ChunkMemoryError, HostMemoryError) as err:
        need = getattr(err, "per_trajectory", getattr(err, "needed", 0))
        raise ConfigError(
            f"config key 'zoom.resolution' has value {n}: a level's sweep of {n * n} "
            f"trajectories does not fit in memory (about {readable_size(need)}; {err}); lower "
            "it or engine.memory_budget_mb.",
            "zoom.resolution",
        ) from None
    return _Planned(data, n * n)


# ----- the zoom -----------------------------------------------------------------------------
def class_labels(status: np.ndarray, labels: str) -> np.ndarray:
    """The class of each cell: 1 where converged to a minimum, 0 elsewhere (``converged``),
    or the status code itself (``status``)."""
    if labels == "converged":
        return (status == int(TrajectoryStatus.CONVERGED_MINIMUM)).astype(np.int32)
    return status.astype(np.int32)


def next_region(
    region: list[float], labels: np.ndarray, factor: float, target: tuple[float, float]
) -> list[float] | None:
    """The region ``factor`` times smaller centred on the boundary point of ``labels`` (over
    ``region``) nearest to the point ``target`` (the centre of the nearest unit square the
    boundary crosses, between four cell centres; distances in units of the region's sides), or
    None when ``labels`` has no boundary."""
    squares = np.argwhere(boundary_squares(labels))
    if squares.size == 0:
        return None
    n_y, n_x = labels.shape
    x0, x1, y0, y1 = region
    # unit square (i, j) lies between the cell centres i, i + 1 (rows) and j, j + 1 (columns)
    xs = x0 + (squares[:, 1] + 1.0) * (x1 - x0) / n_x
    ys = y0 + (squares[:, 0] + 1.0) * (y1 - y0) / n_y
    cx, cy = target
    k = int(np.argmin(((xs - cx) / (x1 - x0)) ** 2 + ((ys - cy) / (y1 - y0)) ** 2))
    hx, hy = (x1 - x0) / (2 * factor), (y1 - y0) / (2 * factor)
    return [float(xs[k] - hx), float(xs[k] + hx), float(ys[k] - hy), float(ys[k] + hy)]


class Level(NamedTuple):
    """One level of the zoom."""

    region: list[float]
    status: np.ndarray  # (resolution, resolution), rows along y
    labels: np.ndarray
    dimension: BoundaryDimension | None  # None: a single class, no boundary


class _Computed(NamedTuple):
    arrays: dict[str, Any]
    levels: list[Level]
    axis_labels: tuple[str, str]
    stopped: str | None  # why the zoom stopped early, or None


def compute(params: Mapping[str, Any], planned: _Planned, steps: RunSteps) -> _Computed:
    """Sweeps the levels one after the other (each checkpointed as ``level<k>``)."""
    plane = make_plane(params, planned.data)
    zoom, n = params["zoom"], params["zoom"]["resolution"]
    region, levels, stopped = list(params["plane"]["region"]), [], None
    (u, v), (x0, x1, y0, y1) = zoom["target"], region
    target = (x0 + u * (x1 - x0), y0 + v * (y1 - y0))
    for k in range(zoom["levels"]):
        params0, etas = plane.arguments(region)
        with steps.timed(f"level{k}"), steps.progress_bar(n * n, f"level {k}") as bar:
            result = steps.sweep(
                f"level{k}", bar, plane.loss_fn, params0, etas, **_sweep_kwargs(params)
            )
        status = np.asarray(result.status).reshape(n, n)
        labels = class_labels(status, params["labels"])
        try:
            dimension = boundary_dimension(
                labels, region, **_box_sizes(params["dimension"])
            )
        except (
            ValueError
        ) as err:  # a single class in the grid: no boundary at this level
            dimension, stopped = None, f"level {k}: {err}"
        levels.append(Level(region, status, labels, dimension))
        nxt = (
            next_region(region, labels, zoom["factor"], target)
            if dimension is not None
            else None
        )
        if nxt is None:
            stopped = stopped or f"level {k}: no boundary to zoom into"
            break
        region = nxt
    arrays: dict[str, Any] = {}
    for k, level in enumerate(levels):
        arrays[f"level{k}_region"] = np.asarray(level.region)
        arrays[f"level{k}_status"] = level.status
        arrays[f"level{k}_labels"] = level.labels
        if level.dimension is not None:
            arrays[f"level{k}_box_widths"] = level.dimension.box_widths
            arrays[f"level{k}_box_cells"] = level.dimension.box_cells
            arrays[f"level{k}_counts"] = level.dimension.counts
    arrays["dimension"] = np.array(
        [np.nan if lv.dimension is None else lv.dimension.dimension for lv in levels]
    )
    arrays["standard_error"] = np.array(
        [
            np.nan if lv.dimension is None else lv.dimension.standard_error
            for lv in levels
        ]
    )
    return _Computed(arrays, levels, plane.axis_labels, stopped)


# ----- figures (drawn by gdlr_jax.experiments.figures.fractal_boundary) --------------------
def draw_figures(
    params: Mapping[str, Any], planned: _Planned, computed: _Computed
) -> Iterable[tuple[str, Figure]]:
    colours, names = figures.label_colours(params["labels"])
    yield "zoom", figures.zoom_figure(computed.levels, computed.axis_labels, colours, names)
    yield "box_counts", figures.box_count_figure(computed.levels)


# ----- report -------------------------------------------------------------------------------
def report(
    params: Mapping[str, Any], planned: _Planned, computed: _Computed
) -> RunReport:
    per_level = []
    for k, level in enumerate(computed.levels):
        d = level.dimension
        per_level.append(
            {
                "level": k,
                "region": level.region,
                "width": level.region[1] - level.region[0],
                "dimension": None if d is None else d.dimension,
                "standard_error": None if d is None else d.standard_error,
                "interval": None if d is None else list(d.interval),
                "box_cells": None if d is None else d.box_cells.tolist(),
                "counts": None if d is None else d.counts.tolist(),
                "status_fractions": status_fractions(level.status),
            }
        )
    summary = {
        "problem": params["plane"]["problem"],
        "labels": params["labels"],
        "per_level": per_level,
        "stopped_early": computed.stopped,
    }
    rows = [
        [
            p["level"],
            p["width"],
            *(
                [p["dimension"], p["standard_error"], *p["interval"]]
                if p["dimension"] is not None
                else ["-"] * 4
            ),
            p["status_fractions"]["converged_minimum"],
        ]
        for p in per_level
    ]
    what = f"{len(per_level)} level(s) of {planned.trajectories} trajectories each"
    notes = [
        f"{params['plane']['problem']}: {what}, zoom factor {params['zoom']['factor']:g}"
    ]
    if computed.stopped:
        notes.append(f"the zoom stopped early: {computed.stopped}")
    headers = ["level", "width", "D", "std err", "D low", "D high", "minimum"]
    return RunReport(summary=summary, headers=headers, rows=rows, notes=notes)


def describe(params: Mapping[str, Any], planned: _Planned) -> list[PlannedSweep]:
    n = params["zoom"]["resolution"]
    return [
        PlannedSweep(
            f"level{k}", planned.trajectories, params["zoom"]["steps"], f"{n}^2 grid"
        )
        for k in range(params["zoom"]["levels"])
    ]


EXPERIMENT = _skeleton.experiment(
    name="fractal_boundary",
    summary="zooms into the boundary of convergence and measures its box-counting dimension",
    schema=SCHEMA,
    plan=plan,
    compute=compute,
    figures=draw_figures,
    report=report,
    describe=describe,
)
