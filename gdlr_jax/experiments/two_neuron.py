"""The two-neuron study: the paper's worked example ``L(x, y) = 1/2 (1 - xy)^2`` (layer 5).

Its minima are the hyperbola ``M = {xy = 1}`` (two branches), with one non-zero Hessian
eigenvalue ``x^2 + y^2`` on M, so ``M_WS(eta) = {xy = 1, x^2 + y^2 < 2/eta}`` and
``eta_E = 1``. The study computes, from a config (``configs/two_neuron.yaml``):

* Figure 1 (``phase_portraits``): GD trajectories from a grid of starts for each step size of
  ``portraits`` (the paper: ``eta = 0.4`` over ``R = [-0.2, 2.5] x [0, 2.5]``, trajectories
  converging onto ``M_WS``; ``eta = 1.1`` over ``[0.7, 1.2] x [0.6, 1.2]``, none converging),
  from the engine's recordings of the iterates;
* Figure 2 (``weak_stability``): the length of ``M_WS(eta)`` normalised by its length at
  ``reference_eta`` (the paper: 0.1), beside the *trapping-region fraction*: the share of a
  grid of initialisations that :func:`gdlr_jax.sweep` classifies as converged to a minimum;
  with ``eta_E`` from :func:`gdlr_jax.critical_step_size` marked;
* a basin map (``basin_map``): the status of every initialisation of a fine grid at one step
  size, and its steps to converge.

The length of ``M_WS`` comes from the toolkit's curvature, not from the formula above:
:func:`gdlr_jax.weak_stability_threshold` (``2 / lambda`` of the exact Hessian) is vmapped over
a fine parametrisation ``x = s e^t, y = s e^{-t}`` (``s = +-1``, ``|t| <= log_extent``) of each
branch, and the arclength of ``{eta < threshold}`` is integrated along the polyline, the
threshold interpolated linearly between points (so a crossing is located to second order).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from gdlr_jax import linear
from gdlr_jax._stability import CRITERIA, weak_stability_threshold
from gdlr_jax._sweep import SweepResult, sweep
from gdlr_jax._trajectory_status import ConvergenceCriteria, TrajectoryStatus
from gdlr_jax.experiments import figures
from gdlr_jax.experiments.config import ConfigError, Experiment, Numbers, Repeated, Scalar, Section
from gdlr_jax.experiments.runner import RunOutput, RunReport, progress_bar


# ----- the schema ---------------------------------------------------------------------------
def _check_region(v: list[float]) -> str | None:
    if v[0] < v[1] and v[2] < v[3]:
        return None
    return "[x_min, x_max, y_min, y_max] with x_min < x_max and y_min < y_max"


def _region(default: list[float], what: str) -> Numbers:
    return Numbers(4, f"{what}: [x_min, x_max, y_min, y_max]", default, check=_check_region)


def _eta(default: float, what: str) -> Scalar:
    return Scalar(float, what, default, gt=0.0)


def _steps(default: int) -> Scalar:
    return Scalar(int, "maximum GD steps per trajectory", default, ge=1)


def _check_eta_grid(grid: dict) -> str | None:
    if grid["start"] <= grid["stop"]:
        return None
    return f"eta.start = {grid['start']} must be <= eta.stop = {grid['stop']}"


def _criteria(engine: Mapping[str, Any]) -> ConvergenceCriteria:
    return ConvergenceCriteria(**{k: engine[k] for k in ConvergenceCriteria._fields})


def _check_criteria(engine: dict) -> str | None:
    try:
        _criteria(engine).validate()
    except ValueError as err:
        return str(err)
    return None


R = [-0.2, 2.5, 0.0, 2.5]  # the region R of the paper's Figure 1 (left)
_CRITERIA = ConvergenceCriteria()  # the engine's default tolerances

SCHEMA = Section(
    "the two-neuron study",
    {
        "dtype": Scalar(
            str, "floating dtype of the GD trajectories (curvature is always float64)",
            "float64", choices=("float32", "float64"),
        ),
        "critical_step_size": Section(
            "eta_E by gdlr_jax.critical_step_size (minimises lambda_max over M)",
            {
                "restarts": Scalar(int, "random restarts", 4, ge=1),
                "steps": Scalar(int, "Adam steps per restart", 600, ge=1),
            },
        ),
        "weak_stability": Section(
            "the length of M_WS(eta) along M = {xy = 1} (Def. 16)",
            {
                "criterion": Scalar(
                    str, "eigenvalue of Def. 16 (they coincide for this loss)",
                    "lambda_max", choices=CRITERIA,
                ),
                "branches": Scalar(
                    str, "branches of M measured: x, y > 0 only, or both", "both",
                    choices=("positive", "both"),
                ),
                "log_extent": Scalar(
                    float, "each branch is x = +-e^t, y = +-e^-t with |t| <= log_extent",
                    4.0, gt=0.0,
                ),
                "points": Scalar(int, "points per branch", 8001, ge=3),
                "reference_eta": _eta(0.1, "lengths are normalised by |M_WS(reference_eta)|"),
                "curve_points": Scalar(int, "step sizes on the length curve of Figure 2", 300, ge=2),
            },
        ),
        "sweep": Section(
            "Figure 2: trapping-region fraction on a grid of step sizes",
            {
                "eta": Section(
                    "step sizes linspace(start, stop, num)",
                    {
                        "start": _eta(0.1, "smallest step size"),
                        "stop": _eta(1.2, "largest step size"),
                        "num": Scalar(int, "number of step sizes", 23, ge=1),
                    },
                    check=_check_eta_grid,
                ),
                "region": _region(R, "initialisations"),
                "resolution": Scalar(
                    int, "initialisations per axis (cell centres of a square grid)", 48, ge=1
                ),
                "steps": _steps(2000),
            },
        ),
        "portraits": Repeated(
            Section(
                "one panel of Figure 1",
                {
                    "eta": Scalar(float, "step size", gt=0.0),
                    "region": Numbers(4, "region shown and of the starts: [x_min, x_max, "
                                      "y_min, y_max]", check=_check_region),
                    "starts": Scalar(int, "starts per axis (cell centres)", ge=1),
                    "steps": Scalar(int, "GD steps per trajectory", ge=1),
                },
            ),
            "Figure 1: phase portraits, one panel each",
            default=[
                {"eta": 0.4, "region": R, "starts": 5, "steps": 100},
                {"eta": 1.1, "region": [0.7, 1.2, 0.6, 1.2], "starts": 3, "steps": 30},
            ],
        ),
        "basin": Section(
            "basin map: the status of every initialisation of a fine grid at one step size",
            {
                "eta": _eta(0.9, "step size"),
                "region": _region(R, "initialisations"),
                "resolution": Scalar(int, "initialisations per axis", 200, ge=1),
                "steps": _steps(3000),
            },
        ),
        "engine": Section(
            "gdlr_jax.sweep settings and the convergence criteria of a trajectory "
            "(docs/engine.md)",
            {
                "check_every": Scalar(int, "steps between convergence checks", 64, ge=1),
                "memory_budget_mb": Scalar(
                    int, "memory for one chunk of trajectories (MiB)", 1024, ge=1
                ),
                "grad_tol": Scalar(float, "converged: ||grad L|| <= grad_tol", _CRITERIA.grad_tol, ge=0.0),
                "step_tol": Scalar(float, "converged: eta ||grad L|| <= step_tol", _CRITERIA.step_tol, ge=0.0),
                "loss_tol": Scalar(float, "a minimum: loss <= loss_tol (the minimum value is 0)", _CRITERIA.loss_tol, ge=0.0),
                "divergence_bound": Scalar(float, "diverged: max |theta_i| > divergence_bound", _CRITERIA.divergence_bound, gt=0.0),
                "window": Scalar(int, "final steps searched for a periodic orbit", _CRITERIA.window, ge=2),
                "max_period": Scalar(int, "largest period looked for", _CRITERIA.max_period, ge=1),
                "period_tol": Scalar(float, "relative tolerance of the period test", _CRITERIA.period_tol, ge=0.0),
            },
            check=_check_criteria,
        ),
        "figures": Section(
            "figure output",
            {"dpi": Scalar(int, "resolution of the PNG files", 150, ge=20, le=1200)},
        ),
    },
)


# ----- M_WS along M -------------------------------------------------------------------------
class MinimaProfile(NamedTuple):
    """Points of ``M = {xy = 1}`` with their weak-stability thresholds.

    Attributes:
        xy: ``(branches, points, 2)`` points of each branch, ordered along it.
        arclength: ``(branches, points)`` arclength from the first point of the branch.
        thresholds: ``(branches, points)`` ``2 / lambda`` (Def. 16): the point is in
            ``M_WS(eta)`` iff ``eta < threshold``.
    """

    xy: np.ndarray
    arclength: np.ndarray
    thresholds: np.ndarray


def minima_profile(
    *, branches: str = "both", log_extent: float = 4.0, points: int = 8001,
    criterion: str = "lambda_max",
) -> MinimaProfile:
    """Thresholds ``2 / lambda`` of the two-neuron loss along ``M = {xy = 1}``, in float64.

    Each branch is parametrised by ``x = s e^t, y = s e^{-t}``, ``t`` uniform in
    ``[-log_extent, log_extent]`` (``s = 1``, and ``s = -1`` when ``branches="both"``);
    :func:`gdlr_jax.weak_stability_threshold` is vmapped over the points.
    """
    with jax.enable_x64(True):
        t = jnp.linspace(-log_extent, log_extent, points, dtype=jnp.float64)
        signs = jnp.array([1.0] if branches == "positive" else [1.0, -1.0], jnp.float64)
        x = signs[:, None] * jnp.exp(t)[None, :]
        y = signs[:, None] * jnp.exp(-t)[None, :]
        params = [x.reshape(-1, 1, 1), y.reshape(-1, 1, 1)]
        loss = linear.two_neuron(jnp.float64).loss
        thresholds = jax.jit(jax.vmap(
            lambda p: weak_stability_threshold(loss, p, criterion=criterion)
        ))(params)
        xy = np.stack([np.asarray(x), np.asarray(y)], axis=-1)
    segment = np.hypot(*np.moveaxis(np.diff(xy, axis=1), -1, 0))
    arclength = np.concatenate([np.zeros((xy.shape[0], 1)), np.cumsum(segment, axis=1)], axis=1)
    return MinimaProfile(xy, arclength, np.asarray(thresholds).reshape(x.shape))


def weakly_stable_length(profile: MinimaProfile, etas: Float[Array, " k"]) -> np.ndarray:
    """Arclength of ``M_WS(eta) = {theta in M : eta < threshold(theta)}`` for each ``eta``.

    The threshold is interpolated linearly between consecutive points of each branch, so the
    part of a segment above ``eta`` is exact for that interpolation; branches are summed.

    Returns:
        ``(k,)`` lengths.
    """
    etas = np.asarray(etas, np.float64)[:, None, None]
    a, b = profile.thresholds[None, :, :-1], profile.thresholds[None, :, 1:]
    ds = np.diff(profile.arclength, axis=1)[None]
    above_a, above_b = a > etas, b > etas
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing = np.clip((etas - a) / (b - a), 0.0, 1.0)  # where the segment meets eta
    share = np.where(above_a & above_b, 1.0, 0.0)
    share = np.where(above_a & ~above_b, crossing, share)
    share = np.where(~above_a & above_b, 1.0 - crossing, share)
    return np.sum(share * ds, axis=(1, 2))


def _check_extent(profile: MinimaProfile, smallest_eta: float, extent: float) -> None:
    ends = profile.thresholds[:, [0, -1]]
    if np.any(ends > smallest_eta):
        raise ConfigError(
            f"weak_stability.log_extent = {extent} is too short: the ends of the parametrised "
            f"branches are still in M_WS(eta = {smallest_eta:g}) (threshold "
            f"{float(ends.max()):.4g}), so its length would be truncated; increase it.",
            "weak_stability.log_extent",
        )


# ----- grids of initialisations -------------------------------------------------------------
def initial_grid(region: list[float], nx: int, ny: int, dtype: Any) -> tuple[np.ndarray, np.ndarray, list]:
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


@functools.lru_cache(maxsize=None)
def _two_neuron_loss(dtype_name: str) -> Any:
    """One loss object per dtype, so that repeated sweeps can reuse their compilation."""
    return linear.two_neuron(jnp.dtype(dtype_name)).loss


def _run_sweep(params0: list, etas: np.ndarray, steps: int, dtype: Any, engine: Mapping[str, Any],
               desc: str, progress: bool, **kwargs: Any) -> SweepResult:
    """:func:`gdlr_jax.sweep` of the two-neuron loss, with a progress bar over trajectories."""
    loss = _two_neuron_loss(jnp.dtype(dtype).name)
    with progress_bar(len(etas) * params0[0].shape[0], desc, progress) as bar:
        return sweep(
            loss, params0, jnp.asarray(etas, dtype), steps=steps, min_loss_value=0.0,
            criteria=_criteria(engine), check_every=engine["check_every"],
            memory_budget_bytes=engine["memory_budget_mb"] << 20, dtype=dtype,
            on_chunk=lambda index, chunk: bar.update(chunk.stop - chunk.start), **kwargs,
        )


def _status_fractions(status: np.ndarray) -> dict[str, float]:
    return {s.name.lower(): float(np.mean(status == int(s))) for s in TrajectoryStatus}


# ----- the study ----------------------------------------------------------------------------
def run(params: Mapping[str, Any], output: RunOutput, progress: bool = True) -> RunReport:
    """Runs the two-neuron study from resolved config keys (see :data:`SCHEMA`)."""
    with jax.enable_x64(True):
        return _run(params, output, progress)


def _run(params: Mapping[str, Any], output: RunOutput, progress: bool) -> RunReport:
    timings = {}
    dtype = jnp.dtype(params["dtype"])
    ws, sw, basin_cfg = params["weak_stability"], params["sweep"], params["basin"]
    engine = params["engine"]
    etas = np.linspace(sw["eta"]["start"], sw["eta"]["stop"], sw["eta"]["num"])

    tic = time.perf_counter()
    profile = minima_profile(
        branches=ws["branches"], log_extent=ws["log_extent"], points=ws["points"],
        criterion=ws["criterion"],
    )
    eta_curve = np.linspace(min(etas[0], ws["reference_eta"]), etas[-1], ws["curve_points"])
    _check_extent(profile, min(eta_curve[0], basin_cfg["eta"],
                               *(p["eta"] for p in params["portraits"])), ws["log_extent"])
    reference_length = float(weakly_stable_length(profile, [ws["reference_eta"]])[0])
    length_curve = weakly_stable_length(profile, eta_curve) / reference_length
    mws_length = weakly_stable_length(profile, etas)
    timings["weak_stability"] = time.perf_counter() - tic

    tic = time.perf_counter()
    critical = linear.two_neuron(jnp.float64).critical_step_size(
        restarts=params["critical_step_size"]["restarts"],
        steps=params["critical_step_size"]["steps"],
    )
    timings["critical_step_size"] = time.perf_counter() - tic

    def minima_at(eta: float) -> figures.MinimaCurve:
        return figures.MinimaCurve(profile.xy, profile.thresholds > eta)

    arrays: dict[str, Any] = {
        "minima_xy": profile.xy, "minima_arclength": profile.arclength,
        "minima_thresholds": profile.thresholds,
        "curve_eta": eta_curve, "curve_mws_length_normalised": length_curve,
    }

    # Figure 1
    tic = time.perf_counter()
    panels, portrait_summaries = [], []
    for i, panel in enumerate(params["portraits"]):
        _, _, starts = initial_grid(panel["region"], panel["starts"], panel["starts"], dtype)
        result = _run_sweep(starts, np.array([panel["eta"]]), panel["steps"], dtype, engine,
                            f"portrait eta={panel['eta']:g}", progress,
                            record_every=1, record_params=True)
        w1, w2 = (np.asarray(w)[0, :, :, 0, 0] for w in result.recorded_params)
        paths = np.stack([w1, w2], axis=-1)  # (starts^2, steps + 1, 2), time 0 included
        status = np.asarray(result.status)[0]
        panels.append(figures.PortraitPanel(panel["eta"], panel["region"], paths, status,
                                            minima_at(panel["eta"])))
        arrays[f"portrait{i}_paths"] = paths
        arrays[f"portrait{i}_status"] = status
        portrait_summaries.append({"eta": panel["eta"], "status_fractions": _status_fractions(status)})
    timings["portraits"] = time.perf_counter() - tic

    # Figure 2
    tic = time.perf_counter()
    n = sw["resolution"]
    xs, ys, params0 = initial_grid(sw["region"], n, n, dtype)
    result = _run_sweep(params0, etas, sw["steps"], dtype, engine, "trapping region", progress)
    status = np.asarray(result.status)
    fraction = np.asarray(result.converged_fraction(), np.float64)
    timings["sweep"] = time.perf_counter() - tic
    arrays.update(
        sweep_eta=etas, sweep_x0=xs, sweep_y0=ys, sweep_status=status,
        sweep_steps_taken=np.asarray(result.steps_taken), sweep_final_loss=np.asarray(result.final_loss),
        sweep_asymptotic_step_norm=np.asarray(result.asymptotic_step_norm),
        sweep_period=np.asarray(result.period),
        sweep_converged_fraction=fraction, sweep_mws_length=mws_length,
        sweep_mws_length_normalised=mws_length / reference_length,
    )

    # basin map
    tic = time.perf_counter()
    nb = basin_cfg["resolution"]
    bx, by, basin0 = initial_grid(basin_cfg["region"], nb, nb, dtype)
    basin = _run_sweep(basin0, np.array([basin_cfg["eta"]]), basin_cfg["steps"], dtype, engine,
                       f"basin map eta={basin_cfg['eta']:g}", progress)
    basin_status = np.asarray(basin.status)[0].reshape(nb, nb)
    basin_steps = np.asarray(basin.steps_taken)[0].reshape(nb, nb)
    timings["basin"] = time.perf_counter() - tic
    arrays.update(basin_x0=bx, basin_y0=by, basin_status=basin_status, basin_steps_taken=basin_steps)
    output.write_arrays("results", arrays)

    tic = time.perf_counter()
    dpi = params["figures"]["dpi"]
    output.save_figure(figures.phase_portraits(panels), "figure1_phase_portraits", dpi=dpi)
    output.save_figure(
        figures.weak_stability_vs_trapping(
            eta_curve, length_curve, etas, fraction, critical.eta,
            reference_eta=ws["reference_eta"], reference_length=reference_length,
            criterion=ws["criterion"],
        ),
        "figure2_weak_stability",
        dpi=dpi,
    )
    output.save_figure(
        figures.basin_map(basin_cfg["region"], basin_status, basin_steps, basin_cfg["eta"],
                          minima_at(basin_cfg["eta"])),
        "basin_map",
        dpi=dpi,
    )
    timings["figures"] = time.perf_counter() - tic

    per_eta = [
        {
            "eta": float(eta),
            "converged_fraction": float(fraction[k]),
            "status_fractions": _status_fractions(status[k]),
            "mws_length": float(mws_length[k]),
            "mws_length_normalised": float(mws_length[k] / reference_length),
        }
        for k, eta in enumerate(etas)
    ]
    summary = {
        "eta_E": {
            "computed": critical.eta,
            "closed_form": critical.closed_form,
            "lambda_max_at_witness": critical.lambda_max,
        },
        "weak_stability": {
            "criterion": ws["criterion"],
            "branches": ws["branches"],
            "reference_eta": ws["reference_eta"],
            "reference_length": reference_length,
        },
        "per_eta": per_eta,
        "portraits": portrait_summaries,
        "basin": {"eta": basin_cfg["eta"], "starts": nb * nb,
                  "status_fractions": _status_fractions(basin_status)},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    names = [s.name.lower() for s in TrajectoryStatus]
    headers = ["eta", *names, "|M_WS|", "|M_WS|/ref"]
    rows = [
        [p["eta"], *(p["status_fractions"][s] for s in names), p["mws_length"], p["mws_length_normalised"]]
        for p in per_eta
    ]
    notes = [
        f"eta_E = {critical.eta:.10g} (critical_step_size; closed form {critical.closed_form})",
        f"|M_WS({ws['reference_eta']:g})| = {reference_length:.6g} "
        f"({ws['criterion']}, branches: {ws['branches']})",
        "basin map at eta = {:g}: ".format(basin_cfg["eta"]) + ", ".join(
            f"{k} {v:.1%}" for k, v in _status_fractions(basin_status).items() if v > 0
        ),
    ]
    return RunReport(summary=summary, headers=headers, rows=rows, notes=notes)


EXPERIMENT = Experiment(
    name="two_neuron",
    summary="the worked example 1/2 (1 - xy)^2: Figures 1 and 2 and a basin map",
    schema=SCHEMA,
    run=run,
)
