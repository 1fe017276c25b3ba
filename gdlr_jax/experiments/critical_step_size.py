"""The critical step size of the MNIST MLPs of Figure 3, measured (layer 5; beyond the paper).

The paper observes that GELU MLPs trained by full-batch GD on MNIST 0/1 (MSE) do not converge
for ``eta > 1`` (Figure 3) and hypothesises that, as for linear networks (Thm. 18, 21), almost
no initialisation converges above a critical step size ``eta_E``. For each depth of
``model.depths`` this experiment measures where convergence collapses with
:func:`gdlr_jax.estimate_critical_step_size`: ``search.n_init`` MLPs (:mod:`gdlr_jax.mlp`,
``depth`` hidden layers of ``width`` units) on the training set of the ``data`` section, GD

    theta_{t+1} = theta_t - eta grad L(theta_t)

on the full-batch loss ``L`` (``model.loss``) from the same initialisations at every step size,
``p(eta)`` the share converged to a minimum within ``search.steps`` steps (the engine's
criteria, ``engine``), and rounds of one :func:`gdlr_jax.sweep` over ``search.etas_per_round``
step sizes that bracket and bisect the step size where ``p`` falls through
``search.threshold``, certified by Wilson intervals at ``search.confidence``. Per depth it
reports the collapse step size with its interval, the sweeps and trajectories used, and the
sharpness bound ``2 / lambda_max`` at the flattest converged minimum found (a point of ``M``:
``eta_E >= 2 / lambda_max``).

A run writes ``collapse.png`` (per depth the converged share against ``eta`` with its Wilson
intervals, the collapse interval, the sharpness bound and ``eta = 1`` marked),
``results.npz`` and ``summary.json``. Each depth's estimate is checkpointed in
``checkpoints/depth<d>`` once it is done, so an interrupted run resumes at the first depth not
finished (``docs/reproduction.md``, section MNIST).
"""

from __future__ import annotations

import math
import pathlib
import statistics
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from gdlr_jax.engine import (
    ChunkMemoryError,
    CriticalStepEstimate,
    HostMemoryError,
    estimate_critical_step_size,
    plan_sweep,
)
from gdlr_jax.engine._checkpoint import ChunkStore, write_atomically
from gdlr_jax.engine._memory import readable_size
from gdlr_jax.experiments import _skeleton
from gdlr_jax.experiments._shared_problems import (
    DATA,
    ETAS_PER_CHUNK,
    _distinct,
    load_data,
    mlp_model,
    mlp_problem,
)
from gdlr_jax.experiments._skeleton import RunSteps
from gdlr_jax.experiments.config import ConfigError, Numbers, Scalar, Section
from gdlr_jax.experiments.figures.critical_step_size import (
    PAPER_ETA,
    CollapseCurve,
    collapse_figure,
)
from gdlr_jax.experiments.runner import (
    MemoryNeed,
    PlannedSweep,
    RunReport,
    check_host_memory,
)
from gdlr_jax.problems.data import MnistData


# ----- the schema ---------------------------------------------------------------------------
def _check_range(values: list[float]) -> str | None:
    low, high = values
    return None if 0 < low < high else "[eta_low, eta_high] with 0 < eta_low < eta_high"


def _wilson_z(confidence: float) -> float:
    """The two-sided normal quantile of ``confidence`` (the ``z`` of the Wilson interval)."""
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def _check_search(search: dict) -> str | None:
    """The threshold and the confidence in (0, 1), and enough initialisations to certify both
    ends of a bracket: the Wilson upper bound of ``0 / n`` is ``z^2 / (n + z^2)``, below ``q``
    only for ``n > z^2 (1 - q) / q``; the lower bound of ``n / n`` is ``n / (n + z^2)``, above
    ``q`` only for ``n > z^2 q / (1 - q)``."""
    q, confidence, n = search["threshold"], search["confidence"], search["n_init"]
    for key, value in (("threshold", q), ("confidence", confidence)):
        if not 0 < value < 1:
            return f"{key} = {value} must be in (0, 1)"
    z2 = _wilson_z(confidence) ** 2
    need = math.floor(z2 * max((1 - q) / q, q / (1 - q))) + 1
    if n < need:
        return (
            f"n_init = {n} initialisations cannot certify a share below (or above) threshold "
            f"{q:g} at confidence {confidence:g} (the Wilson upper bound of 0/{n} is "
            f"{z2 / (n + z2):.3g}, the lower bound of {n}/{n} is {n / (n + z2):.3g}); use "
            f"n_init >= {need} or another threshold"
        )
    return None


SCHEMA = _skeleton.schema(
    "the step size where convergence of MNIST MLPs collapses, per depth, with its interval",
    _skeleton.dtype_key("float32", "floating dtype of parameters and data"),
    {
        "data": DATA,
        "model": mlp_model("one estimate each", _distinct),
        "search": Section(
            "gdlr_jax.estimate_critical_step_size: rounds of one sweep each, from the same "
            "initialisations",
            {
                "eta_range": Numbers(
                    2,
                    "the first round's step sizes: geomspace(eta_low, eta_high); it need not "
                    "bracket the collapse",
                    [0.1, 2.0],
                    check=_check_range,
                ),
                "n_init": Scalar(
                    int, "initialisations per depth: the binomial sample of every share", 80,
                    ge=1,
                ),
                "steps": Scalar(int, "maximum GD steps per trajectory", 1000, ge=1),
                "threshold": Scalar(
                    float, "collapsed: the converged share p(eta) < threshold", 0.05, gt=0.0
                ),
                "confidence": Scalar(
                    float, "two-sided level of every Wilson interval", 0.95, gt=0.0
                ),
                "etas_per_round": Scalar(int, "step sizes per round (one sweep)", 8, ge=2),
                "rtol": Scalar(
                    float, "bisection stops at (high - low) <= rtol * high", 0.02, gt=0.0
                ),
                "max_rounds": Scalar(int, "the most rounds (sweeps) per depth", 4, ge=1),
                "sharpness_points": Scalar(
                    int, "converged final iterates whose lambda_max is measured", 16, ge=0
                ),
                "seed": Scalar(int, "seed of the initialisations", 0, ge=0),
            },
            check=_check_search,
        ),
    },
    _skeleton.engine_section(
        {
            "etas_per_chunk": ETAS_PER_CHUNK,
        },
        chunking_last=True,
    ),
)


# ----- the problems -------------------------------------------------------------------------
def _problem(data: MnistData, params: Mapping[str, Any], depth: int, n_init: int) -> Any:
    """The :func:`mlp_problem` of one depth: ``n_init`` MLPs, full-batch GD."""
    training = {"n_init": n_init, "batch_size": 0, "optimizer": "gd", "momentum": 0.0}
    key = jax.random.fold_in(jax.random.key(params["search"]["seed"]), depth)
    return mlp_problem(
        data, depth, params["model"], training, init_key=key, batch_key=key,
        dtype=jnp.dtype(params["dtype"]),
    )


def _estimate_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`gdlr_jax.estimate_critical_step_size`."""
    search, engine = params["search"], params["engine"]
    return {
        "steps": search["steps"],
        "threshold": search["threshold"],
        "confidence": search["confidence"],
        "etas_per_round": search["etas_per_round"],
        "rtol": search["rtol"],
        "max_rounds": search["max_rounds"],
        "min_loss_value": 0.0,  # every loss of the schema is >= 0 with infimum 0
        "criteria": _skeleton.criteria(engine),
        "sharpness_points": search["sharpness_points"],
        "dtype": jnp.dtype(params["dtype"]),
        "check_every": engine["check_every"],
        "chunk_size": engine["etas_per_chunk"] * search["n_init"],
    }


def _first_round(params: Mapping[str, Any]) -> np.ndarray:
    """The step sizes of the first round (every round sweeps at most as many)."""
    low, high = params["search"]["eta_range"]
    return np.geomspace(low, high, params["search"]["etas_per_round"])


def _round_plan(problem: Any, params: Mapping[str, Any]) -> Any:
    """:func:`gdlr_jax.plan_sweep` of a depth's first round (``problem.params0`` may be
    abstract): the shapes and settings of every round's sweep."""
    kwargs = _estimate_kwargs(params)
    sweep_keys = ("steps", "min_loss_value", "criteria", "dtype", "check_every", "chunk_size")
    return plan_sweep(
        problem.loss_fn, problem.params0, _first_round(params),
        **{k: kwargs[k] for k in sweep_keys},
    )


class _Planned(NamedTuple):
    data: MnistData
    trajectories: int  # the most a depth runs: max_rounds x etas_per_round x n_init


def plan(params: Mapping[str, Any]) -> _Planned:
    """Loads the data and plans a round's sweep of every depth, before any compute.

    Raises:
        ConfigError: in one line, on a missing or corrupt data folder, a round's chunk that is
            estimated not to fit in a device's memory, or the results of every round of every
            depth (each estimate keeps them until its sharpness bound is measured) not to fit
            in the host's.
    """
    data = load_data(params["data"])
    search, per_chunk = params["search"], params["engine"]["etas_per_chunk"]
    n_init = search["n_init"]
    needs, limit = [], None
    for depth in params["model"]["depths"]:
        problem = _problem(data, params, depth, 1)
        grid = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((n_init,) + x.shape[1:], x.dtype), problem.params0
        )
        sizes = (("search.max_rounds", search["max_rounds"], 1), ("search.n_init", n_init, 1))
        try:
            round_plan = _round_plan(problem._replace(params0=grid), params)
            kept = round_plan.result_bytes * search["max_rounds"]
            needs.append(MemoryNeed(kept, kept + round_plan.peak_host_bytes, sizes))
        except HostMemoryError as err:  # one round alone is too large: named below
            needs.append(MemoryNeed(err.needed, err.needed, sizes))
            limit = err.limit
        except ChunkMemoryError as err:
            fit = err.fit // n_init
            how = (
                f"use engine.etas_per_chunk <= {fit}" if fit else
                "use fewer search.n_init, fewer search.steps or a smaller model"
            )
            raise ConfigError(
                f"config key 'engine.etas_per_chunk' has value {per_chunk}: depth {depth} does "
                f"not fit in memory: {per_chunk} x {n_init} trajectories per chunk of about "
                f"{readable_size(err.per_trajectory)} each (an estimate), a device can allocate "
                f"{readable_size(err.limit)}; {how}.",
                "engine.etas_per_chunk",
            ) from None
    check_host_memory(needs, limit)
    return _Planned(data, search["max_rounds"] * search["etas_per_round"] * n_init)


# ----- the estimates, checkpointed per depth ------------------------------------------------
_ESTIMATE_FILE = "estimate.npz"
_OPTIONAL = ("sharpness_bound", "flattest_lambda_max", "flattest_eta")  # None: NaN on disk


def _save_estimate(path: pathlib.Path, estimate: CriticalStepEstimate) -> None:
    arrays = {
        name: np.asarray(np.nan if value is None and name in _OPTIONAL else value)
        for name, value in estimate._asdict().items()
    }
    write_atomically(path, lambda handle: np.savez(handle, **arrays))


def _load_estimate(path: pathlib.Path) -> CriticalStepEstimate | None:
    """The estimate saved at ``path``, or None when there is none or it cannot be read (it is
    then recomputed)."""
    try:
        with np.load(path) as saved:
            fields = {name: saved[name] for name in CriticalStepEstimate._fields}
    except (OSError, KeyError, ValueError, EOFError):
        return None
    scalars = {
        "eta": float, "resolved": bool, "threshold": float, "confidence": float, "trials": int,
        "num_sweeps": int, "num_trajectories": int,
    }
    out: dict[str, Any] = {k: convert(fields[k]) for k, convert in scalars.items()}
    out["interval"] = tuple(float(v) for v in fields["interval"])
    for name in ("etas", "converged", "share_bounds"):
        out[name] = fields[name]
    for name in _OPTIONAL:
        value = float(fields[name])
        out[name] = None if math.isnan(value) else value
    return CriticalStepEstimate(**out)


def estimate_depth(
    data: MnistData, params: Mapping[str, Any], depth: int, steps: RunSteps
) -> CriticalStepEstimate:
    """The estimate of one depth, from ``checkpoints/depth<d>`` when a previous session of the
    run finished it, else computed and saved there.

    The folder is a :class:`~gdlr_jax.engine._checkpoint.ChunkStore` of the depth's first
    round: its ``sweep.json`` fingerprints that sweep (the initialisations, the loss and its
    data, the engine's settings and source, the platform), which with the ``search`` keys (in
    the run's config fingerprint) determines every round; a folder of another sweep is
    refused (:class:`~gdlr_jax.CheckpointMismatchError`).
    """
    problem = _problem(data, params, depth, params["search"]["n_init"])
    store = ChunkStore(steps.output.checkpoint_dir(f"depth{depth}"), _round_plan(problem, params))
    path = store.folder / _ESTIMATE_FILE
    saved = _load_estimate(path) if path.exists() else None
    if saved is not None:
        return saved
    estimate = estimate_critical_step_size(
        problem.loss_fn, problem.params0, params["search"]["eta_range"], **_estimate_kwargs(params)
    )
    _save_estimate(path, estimate)
    return estimate


class _Computed(NamedTuple):
    arrays: dict[str, Any]
    estimates: dict[int, CriticalStepEstimate]


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def compute(params: Mapping[str, Any], planned: _Planned, steps: RunSteps) -> _Computed:
    """The estimate of every depth, one after the other (each checkpointed as ``depth<d>``)."""
    depths = params["model"]["depths"]
    estimates = {}
    with steps.progress_bar(len(depths), "critical step size (depths)") as bar:
        for depth in depths:
            with steps.timed(f"depth_{depth}"):
                estimates[depth] = estimate_depth(planned.data, params, depth, steps)
            bar.update(1)
    per = [estimates[d] for d in depths]
    arrays: dict[str, Any] = {
        "depths": np.asarray(depths),
        "eta": np.array([e.eta for e in per]),
        "interval": np.array([e.interval for e in per]),
        "resolved": np.array([e.resolved for e in per]),
        "num_sweeps": np.array([e.num_sweeps for e in per]),
        "num_trajectories": np.array([e.num_trajectories for e in per]),
        "sharpness_bound": np.array([_nan(e.sharpness_bound) for e in per]),
        "flattest_lambda_max": np.array([_nan(e.flattest_lambda_max) for e in per]),
        "flattest_eta": np.array([_nan(e.flattest_eta) for e in per]),
    }
    for depth, e in estimates.items():
        arrays[f"depth{depth}_etas"] = e.etas
        arrays[f"depth{depth}_converged"] = e.converged
        arrays[f"depth{depth}_share_bounds"] = e.share_bounds
    return _Computed(arrays, estimates)


# ----- figure and report --------------------------------------------------------------------
def _setting(params: Mapping[str, Any], n_examples: int) -> str:
    model, search = params["model"], params["search"]
    digits = "/".join(str(d) for d in params["data"]["digits"])
    return (
        f"{model['activation']} MLP (width {model['width']}), {model['loss']}, full-batch GD, "
        f"MNIST {digits} ({n_examples} examples), {search['n_init']} initialisations, "
        f"{search['steps']} steps"
    )


def draw_figures(
    params: Mapping[str, Any], planned: _Planned, computed: _Computed
) -> Iterable[tuple[str, Figure]]:
    curves = [
        CollapseCurve(
            depth, e.etas, e.converged, e.share_bounds, e.trials, e.interval, e.resolved,
            _nan(e.sharpness_bound),
        )
        for depth, e in computed.estimates.items()
    ]
    title = _setting(params, int(planned.data.labels.shape[0]))
    yield "collapse", collapse_figure(curves, params["search"]["threshold"], title)


def _compared(e: CriticalStepEstimate) -> str:
    """The estimate beside Figure 3's "no convergence for eta > 1"."""
    low, high = e.interval
    if math.isnan(high):
        return "no collapse found in the step sizes swept"
    if math.isnan(low):
        return f"collapsed from the smallest step size swept ({high:.4g}) on"
    where = (
        "below 1" if high < PAPER_ETA else "above 1" if low > PAPER_ETA else "contains 1"
    )
    return f"collapse interval [{low:.4g}, {high:.4g}] {where}"


def report(params: Mapping[str, Any], planned: _Planned, computed: _Computed) -> RunReport:
    """``summary.json`` and the terminal table: per depth the collapse step size, its interval,
    the sweeps and trajectories, the sharpness bound, and every step size swept."""
    per_depth, rows, notes = [], [], []
    for depth, e in computed.estimates.items():
        per_depth.append({
            "depth": depth,
            "collapse_eta": None if math.isnan(e.eta) else e.eta,
            "interval": [None if math.isnan(v) else v for v in e.interval],
            "resolved": e.resolved,
            "num_sweeps": e.num_sweeps,
            "num_trajectories": e.num_trajectories,
            "sharpness_bound": e.sharpness_bound,
            "flattest_lambda_max": e.flattest_lambda_max,
            "flattest_eta": e.flattest_eta,
            "compared_with_paper": _compared(e),
            "per_eta": [
                {"eta": float(eta), "converged": int(k), "share_bounds": [float(b) for b in bounds]}
                for eta, k, bounds in zip(e.etas, e.converged, e.share_bounds, strict=True)
            ],
        })
        bound = "-" if e.sharpness_bound is None else e.sharpness_bound
        rows.append([
            depth, e.eta, e.interval[0], e.interval[1], "yes" if e.resolved else "no",
            e.num_sweeps, e.num_trajectories, bound,
        ])
        notes.append(f"depth {depth}: {_compared(e)}")
    search = params["search"]
    summary = {
        "paper": "Figure 3: convergence does not happen for eta > 1 (GELU, MSE, full-batch GD)",
        "setting": _setting(params, int(planned.data.labels.shape[0])),
        "loss": params["model"]["loss"],
        "threshold": search["threshold"],
        "confidence": search["confidence"],
        "trials": search["n_init"],
        "criterion": _skeleton.criteria(params["engine"])._asdict(),
        "depths": per_depth,
    }
    notes.insert(0, (
        f"collapse: the converged share falls below {search['threshold']:g} (Wilson, "
        f"{search['confidence']:g} each side of the bracket, {search['n_init']} "
        "initialisations); 2/lambda_max: at the flattest converged minimum (eta_E >= it)"
    ))
    headers = ["depth", "collapse eta", "low", "high", "resolved", "sweeps", "trajectories",
               "2/lambda_max"]
    return RunReport(summary=summary, headers=headers, rows=rows, notes=notes)


def describe(params: Mapping[str, Any], planned: _Planned) -> list[PlannedSweep]:
    """One estimate per depth, at most ``max_rounds`` sweeps each (``gdlr run --dry-run``)."""
    search = params["search"]
    note = (
        f"at most {search['max_rounds']} rounds of {search['etas_per_round']} step sizes x "
        f"{search['n_init']} initialisations, {planned.data.images.shape[0]} examples"
    )
    return [
        PlannedSweep(f"depth{depth}", planned.trajectories, search["steps"], note)
        for depth in params["model"]["depths"]
    ]


EXPERIMENT = _skeleton.experiment(
    name="critical_step_size",
    summary="the step size where convergence of MNIST MLPs collapses, per depth, with its "
    "Wilson interval and the sharpness bound 2/lambda_max (beside Figure 3's eta > 1)",
    schema=SCHEMA,
    plan=plan,
    compute=compute,
    figures=draw_figures,
    report=report,
    describe=describe,
)
