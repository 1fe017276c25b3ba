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
  ``eta ||grad L||`` over the initialisations still bounded at that update, log colour scales
  bounded by percentiles of the cells, and per step size the share of each final status
  (Figures 5 and 6);
* ``results.npz`` and ``summary.json`` (with, per depth, the asymptotic ``eta ||grad L||``
  against ``eta`` and its exponential and power-law fits: :func:`step_norm_growth`).

The figures are drawn by :mod:`gdlr_jax.experiments.figures.mnist`; the run's steps (plan,
sweeps, results, figures, summary) are those of :mod:`gdlr_jax.experiments._skeleton`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float, Int

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
    ETAS_PER_CHUNK,
    MlpProblem,
    load_data,
    mlp_model,
    mlp_problem,
)
from gdlr_jax.experiments._skeleton import NumberList, RunSteps, status_cells
from gdlr_jax.experiments.config import ConfigError, Scalar, Section
from gdlr_jax.experiments.runner import (
    MemoryNeed,
    PlannedSweep,
    RunReport,
    check_host_memory,
)
from gdlr_jax.problems.data import MnistData


# ----- the schema ---------------------------------------------------------------------------
def _increasing(values: list) -> str | None:
    if all(a < b for a, b in zip(values, values[1:])):
        return None
    return "strictly increasing values"


def _check_training(training: dict) -> str | None:
    if training["record_every"] > training["steps"]:
        return f"record_every = {training['record_every']} must be <= steps = {training['steps']}"
    return None


SCHEMA = _skeleton.schema(
    "MLPs on MNIST digits: the trapping region per step size and depth (Figures 3-6)",
    _skeleton.dtype_key("float32", "floating dtype of parameters and data"),
    {
        "data": DATA,
        "model": mlp_model("one sweep each", _increasing),
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
    },
    _skeleton.engine_section(
        {
            "etas_per_chunk": ETAS_PER_CHUNK,
            "stop_at_convergence": Scalar(
                bool,
                "true: a converged trajectory is frozen there (its heatmap rows then show eta x "
                "the tolerance); false: it keeps stepping and recording to training.steps "
                "(gdlr_jax.sweep(stop_at_convergence=False); the heatmaps show the dynamics)",
                True,
            ),
        },
        chunking_last=True,
    ),
)


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


def collapse_step_size(etas: Sequence[float], converged: Sequence[float]) -> float | None:
    """The smallest step size of the grid from which on no initialisation converges.

    ``None`` when the largest step size still has converging initialisations.
    """
    converged = np.asarray(converged)
    if converged[-1] > 0:
        return None
    some = np.flatnonzero(converged > 0)
    return float(etas[0] if some.size == 0 else etas[some[-1] + 1])


def _log_fit(x: np.ndarray, log_y: np.ndarray) -> dict[str, float]:
    """Least squares ``log_y = intercept + slope x`` and its ``R^2 = 1 - SS_res / SS_tot``."""
    slope, intercept = np.polyfit(x, log_y, 1)
    residual = log_y - (intercept + slope * x)
    total = np.sum((log_y - np.mean(log_y)) ** 2)
    r2 = 1.0 - float(np.sum(residual**2) / total) if total > 0 else float("nan")
    return {"intercept": float(intercept), "slope": float(slope), "r2": r2}


def step_norm_growth(
    etas: Sequence[float],
    mean_step_norm: Float[np.ndarray, "n_eta n_rec"],
    record_steps: Int[np.ndarray, " n_rec"],
    tail: float = 0.25,
) -> dict[str, Any]:
    """Figure 6's claim, measured: the asymptotic ``eta ||grad L||`` against ``eta``, fitted.

    The asymptotic value ``a(eta)`` is the mean, over the recorded updates in the last
    ``tail`` of the run (``t >= (1 - tail) t_last``), of ``mean_step_norm`` (the full-batch
    ``eta ||grad L||`` averaged over the trajectories still bounded at each update:
    :func:`bounded_mean`); ``None`` where no trajectory is bounded there. Over the step sizes
    with ``a > 0`` two laws are fitted by least squares on ``log a``: exponential,
    ``log a = c + b eta`` (the paper's claim), and a power law, ``log a = c + b log eta``; each
    with its ``R^2`` on ``log a`` (``None`` with fewer than 3 step sizes).

    Returns:
        ``{"eta", "asymptotic_step_norm", "points", "exponential", "power_law"}``, the fits as
        ``{"intercept", "slope", "r2"}``.
    """
    etas = np.asarray(etas, np.float64)
    record_steps = np.asarray(record_steps)
    in_tail = record_steps >= (1.0 - tail) * record_steps[-1]
    values = np.asarray(mean_step_norm, np.float64)[:, in_tail]
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        level = np.where(finite, values, 0.0).sum(axis=1) / finite.sum(axis=1)
    asymptotic = [float(v) if n and v > 0 else None for v, n in zip(level, finite.sum(axis=1))]
    kept = np.array([a is not None for a in asymptotic])
    fits: dict[str, Any] = {"exponential": None, "power_law": None}
    if kept.sum() >= 3:
        log_a = np.log(level[kept])
        fits = {
            "exponential": _log_fit(etas[kept], log_a),
            "power_law": _log_fit(np.log(etas[kept]), log_a),
        }
    return {
        "eta": etas.tolist(),
        "asymptotic_step_norm": asymptotic,
        "points": int(kept.sum()),
        **fits,
    }


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
        criteria=_skeleton.criteria(engine),
        check_every=engine["check_every"],
        record_every=training["record_every"],
        dtype=dtype,
        chunk_size=engine["etas_per_chunk"] * training["n_init"],
        stop_at_convergence=engine["stop_at_convergence"],
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


def plan(params: Mapping[str, Any]) -> MnistData:
    """Loads the data and plans every depth's sweep (:func:`check_chunks_fit`), before the
    run makes its folder (float64 enabled when ``dtype`` is float64: the run's ``plan`` step,
    see :mod:`gdlr_jax.experiments._skeleton`).

    Returns:
        The training data.

    Raises:
        ConfigError: in one line, on a missing or corrupt data folder, or a sweep that is
            estimated not to fit in memory.
    """
    data = load_data(params["data"])
    etas = np.asarray(params["training"]["etas"], np.float64)
    check_chunks_fit(data, etas, params, jnp.dtype(params["dtype"]))
    return data


_FIELDS = (
    "status", "steps_taken", "final_loss", "final_grad_norm", "asymptotic_step_norm", "period",
    "recorded_loss", "recorded_step_norm",
)


class _Computed(NamedTuple):
    """What the sweeps give the figures and the report."""

    arrays: dict[str, Any]  # results.npz
    shares: dict[str, np.ndarray]  # status shares, each (n_depth, n_eta)


def compute(params: Mapping[str, Any], data: MnistData, steps: RunSteps) -> _Computed:
    """The sweep of every depth on ``data`` (from :func:`plan`), from resolved config keys
    (see :data:`SCHEMA`), and the heatmaps' means (:func:`bounded_mean`)."""
    training = params["training"]
    dtype = jnp.dtype(params["dtype"])
    etas = np.asarray(training["etas"], np.float64)
    depths = params["model"]["depths"]
    problems = _problems(data, params, dtype, training["n_init"])

    results = []
    total = len(depths) * len(etas) * training["n_init"]
    with steps.progress_bar(total, "mnist sweeps") as bar:
        for depth in depths:
            with steps.timed(f"depth_{depth}"):
                args, kwargs = _sweep_arguments(problems[depth], etas, params, dtype)
                results.append(steps.sweep(f"depth{depth}", bar, *args, **kwargs))

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
    shares = figures.status_shares(arrays["status"])  # each (n_depth, n_eta)
    arrays["converged_fraction"] = shares["converged_minimum"]
    return _Computed(arrays, shares)


def draw_figures(
    params: Mapping[str, Any], data: MnistData, computed: _Computed
) -> Iterator[tuple[str, Any]]:
    """``convergence`` (Figures 3 and 4) and ``heatmaps_depth<d>`` per depth (Figures 5 and
    6), each drawn when the run saves it."""
    arrays, depths = computed.arrays, params["model"]["depths"]
    setting = _setting(params, int(data.labels.shape[0]))
    yield "convergence", figures.convergence_figure(
        arrays["etas"], depths, arrays["status"], setting
    )
    for k, depth in enumerate(depths):
        yield f"heatmaps_depth{depth}", figures.heatmaps_figure(
            arrays["etas"], arrays["record_steps"], arrays["heatmap_mean_loss"][k],
            arrays["heatmap_mean_step_norm"][k], arrays["status"][k], f"depth {depth}: {setting}",
        )


def _median_of_bounded(values: np.ndarray, status: np.ndarray) -> float | None:
    kept = values[(status != int(TrajectoryStatus.DIVERGED)) & np.isfinite(values)]
    return float(np.median(kept)) if kept.size else None


def report(params: Mapping[str, Any], data: MnistData, computed: _Computed) -> RunReport:
    """``summary.json`` and the terminal table: per depth and step size the status shares and
    the medians of the bounded trajectories; per depth where convergence stops and the growth
    of the asymptotic ``eta ||grad L||`` with ``eta`` (:func:`step_norm_growth`, Figure 6)."""
    arrays, shares = computed.arrays, computed.shares
    etas, depths = arrays["etas"], params["model"]["depths"]
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
                depth, float(eta), *status_cells(entry["status_fractions"]),
                "-" if step is None else step,
            ])
        converged = shares["converged_minimum"][k]
        some = np.flatnonzero(converged > 0)
        largest = float(etas[some[-1]]) if some.size else None
        collapse = collapse_step_size(etas, converged)
        growth = step_norm_growth(
            etas, arrays["heatmap_mean_step_norm"][k], arrays["record_steps"]
        )
        per_depth.append({
            "depth": depth,
            "largest_converging_eta": largest,
            "collapse_eta": collapse,
            "step_norm_growth": growth,
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
        if growth["exponential"] is not None:
            exp_fit, power = growth["exponential"], growth["power_law"]
            notes.append(
                f"depth {depth}: asymptotic eta|grad L| (last 25% of updates) over "
                f"{growth['points']} step sizes: exponential fit exp({exp_fit['slope']:.3g} eta)"
                f" R^2 = {exp_fit['r2']:.3f}; power law eta^{power['slope']:.3g} "
                f"R^2 = {power['r2']:.3f}"
            )
    summary = {
        "data": {
            "data_dir": str(pathlib.Path(params["data"]["data_dir"]).expanduser().resolve())
            if params["data"]["data_dir"] else None,
            "examples": int(data.labels.shape[0]),
            "digits": list(data.digits),
        },
        "criterion": _skeleton.criteria(params["engine"])._asdict(),
        "depths": per_depth,
    }
    headers = ["depth", "eta", *_skeleton.STATUS_HEADERS, "median eta|grad L|"]
    return RunReport(summary=summary, headers=headers, rows=rows, notes=notes)


def describe(params: Mapping[str, Any], data: MnistData) -> list[PlannedSweep]:
    """One sweep per depth, on ``data`` from :func:`plan` (for ``gdlr run --dry-run``)."""
    training, n = params["training"], data.images.shape[0]
    n_eta, batch = len(training["etas"]), training["batch_size"]
    note = f"{n_eta} step sizes x {training['n_init']} initialisations, {n} examples, " + (
        f"batch {batch}" if batch else "full batch"
    )
    return [
        PlannedSweep(f"depth{depth}", n_eta * training["n_init"], training["steps"], note)
        for depth in params["model"]["depths"]
    ]


EXPERIMENT = _skeleton.experiment(
    name="mnist",
    summary="MLPs on MNIST digits: trapping region per step size and depth, loss and "
    "eta ||grad L|| heatmaps (Figures 3-6)",
    schema=SCHEMA,
    plan=plan,
    compute=compute,
    figures=draw_figures,
    report=report,
    describe=describe,
)
