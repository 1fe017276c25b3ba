"""The two-neuron study: the paper's worked example ``L(x, y) = 1/2 (1 - xy)^2`` (layer 5).

Its minima are the hyperbola ``M = {xy = 1}`` (two branches), with one non-zero Hessian
eigenvalue ``x^2 + y^2`` on M, so ``M_WS(eta) = {xy = 1, x^2 + y^2 < 2/eta}`` and
``eta_E = 1``. The study computes, from a config (``configs/two_neuron.yaml``):

* Figure 1 (``phase_portraits``): GD trajectories from a grid of starts for each step size of
  ``portraits`` (the paper: ``eta = 0.4`` over ``R = [-0.2, 2.5] x [0, 2.5]``, trajectories
  converging onto ``M_WS``; ``eta = 1.1`` over ``[0.7, 1.2] x [0.6, 1.2]``, none converging),
  from the engine's recordings of the iterates, each panel grown beyond its region to show
  where every trajectory that did not diverge ends;
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

The figures are drawn by :mod:`gdlr_jax.experiments.figures.two_neuron`; the run's steps
(plan, sweeps, results, figures, summary) are those of :mod:`gdlr_jax.experiments._skeleton`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from gdlr_jax.dynamics import critical_step_size
from gdlr_jax.dynamics._stability import CRITERIA, weak_stability_threshold
from gdlr_jax.engine import (
    ChunkMemoryError,
    HostMemoryError,
    SweepResult,
    TrajectoryStatus,
    plan_sweep,
)
from gdlr_jax.engine._memory import readable_size
from gdlr_jax.experiments import _skeleton, figures
from gdlr_jax.experiments._shared_problems import initial_grid, two_neuron_loss
from gdlr_jax.experiments._skeleton import RunSteps, status_cells, status_fractions
from gdlr_jax.experiments.config import ConfigError, Numbers, Repeated, Scalar, Section
from gdlr_jax.experiments.runner import (
    MemoryNeed,
    PlannedSweep,
    RunReport,
    check_host_memory,
)
from gdlr_jax.problems import linear


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


R = [-0.2, 2.5, 0.0, 2.5]  # the region R of the paper's Figure 1 (left)

SCHEMA = _skeleton.schema(
    "the two-neuron study",
    _skeleton.dtype_key(
        "float64", "floating dtype of the GD trajectories (curvature is always float64)"
    ),
    {
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
                    str,
                    "eigenvalue of Def. 16 (they coincide for this loss)",
                    "lambda_max",
                    choices=CRITERIA,
                ),
                "branches": Scalar(
                    str,
                    "branches of M measured: x, y > 0 only, or both",
                    "both",
                    choices=("positive", "both"),
                ),
                "log_extent": Scalar(
                    float,
                    "each branch is x = +-e^t, y = +-e^-t with |t| <= log_extent",
                    4.0,
                    gt=0.0,
                ),
                "points": Scalar(int, "points per branch", 8001, ge=3),
                "reference_eta": _eta(0.1, "lengths are normalised by |M_WS(reference_eta)|"),
                "curve_points": Scalar(
                    int, "step sizes on the length curve of Figure 2", 300, ge=2, le=100_000
                ),
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
                    "region": Numbers(
                        4,
                        "region of the starts, shown grown to hold every last iterate of a "
                        "trajectory that did not diverge: [x_min, x_max, y_min, y_max]",
                        check=_check_region,
                    ),
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
                "region": _region([-2.5, 2.5, -2.5, 2.5], "initialisations"),
                "resolution": Scalar(int, "initialisations per axis", 200, ge=1),
                "steps": _steps(3000),
            },
        ),
    },
    _skeleton.engine_section(
        {
            "memory_budget_mb": Scalar(
                int, "memory for one chunk of trajectories (MiB)", 1024, ge=1
            ),
        }
    ),
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

    xy: Float[np.ndarray, "branches points 2"]
    arclength: Float[np.ndarray, "branches points"]
    thresholds: Float[np.ndarray, "branches points"]


@functools.partial(jax.jit, static_argnames=("loss", "criterion"))
def _thresholds(
    loss: Any, x: Float[Array, " n"], y: Float[Array, " n"], criterion: str
) -> Float[Array, " n"]:
    return jax.vmap(
        lambda a, b: weak_stability_threshold(
            loss, [a.reshape(1, 1), b.reshape(1, 1)], criterion=criterion
        )
    )(x, y)


def weak_stability_thresholds(
    x: ArrayLike, y: ArrayLike, criterion: str = "lambda_max", *, block: int = 1 << 20
) -> Float[np.ndarray, " n"]:
    """``2 / lambda`` of the two-neuron loss at the points ``(x_i, y_i)``, in float64.

    :func:`gdlr_jax.weak_stability_threshold` vmapped over the points, in blocks of ``block``
    points (bounded memory). On M, ``(x, y) in M_WS(eta)`` iff ``eta < threshold``.

    Args:
        x, y: ``(n,)`` coordinates.
        criterion: the eigenvalue of Def. 16.

    Returns:
        ``(n,)`` thresholds.
    """
    with jax.enable_x64(True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        loss = two_neuron_loss("float64")
        return np.concatenate(
            [
                np.asarray(_thresholds(loss, x[i : i + block], y[i : i + block], criterion))
                for i in range(0, x.size, block)
            ]
            or [np.zeros(0)]
        )


def minima_profile(
    *,
    branches: str = "both",
    log_extent: float = 4.0,
    points: int = 8001,
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
        thresholds = weak_stability_thresholds(
            np.asarray(x).ravel(), np.asarray(y).ravel(), criterion
        )
        xy = np.stack([np.asarray(x), np.asarray(y)], axis=-1)
    segment = np.hypot(*np.moveaxis(np.diff(xy, axis=1), -1, 0))
    arclength = np.concatenate([np.zeros((xy.shape[0], 1)), np.cumsum(segment, axis=1)], axis=1)
    return MinimaProfile(xy, arclength, thresholds.reshape(x.shape))


def weakly_stable_length(profile: MinimaProfile, etas: ArrayLike) -> Float[np.ndarray, " k"]:
    """Arclength of ``M_WS(eta) = {theta in M : eta < threshold(theta)}`` for each ``eta``.

    The threshold is interpolated linearly between consecutive points of each branch, so the
    part of a segment above ``eta`` is exact for that interpolation (the error is second order
    in the spacing of the points); branches are summed.

    Args:
        profile: from :func:`minima_profile`.
        etas: ``(k,)`` step sizes.

    Returns:
        ``(k,)`` lengths.
    """
    etas = np.asarray(etas, np.float64).reshape(-1)
    return np.concatenate(
        [_lengths(profile, etas[i : i + _ETA_BLOCK]) for i in range(0, etas.size, _ETA_BLOCK)]
        or [np.zeros(0)]
    )


_ETA_BLOCK = 32  # step sizes per block of weakly_stable_length (bounds its memory)


def _lengths(profile: MinimaProfile, etas: np.ndarray) -> np.ndarray:
    etas = etas[:, None, None]
    a, b = profile.thresholds[None, :, :-1], profile.thresholds[None, :, 1:]
    ds = np.diff(profile.arclength, axis=1)[None]
    above_a, above_b = a > etas, b > etas
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing = np.clip((etas - a) / (b - a), 0.0, 1.0)  # where the segment meets eta
    share = np.where(above_a & above_b, 1.0, 0.0)
    share = np.where(above_a & ~above_b, crossing, share)
    share = np.where(~above_a & above_b, 1.0 - crossing, share)
    return np.sum(share * ds, axis=(1, 2))


def _check_extent(params: Mapping[str, Any], etas: np.ndarray) -> None:
    """Raises :class:`ConfigError` when an end of a parametrised branch of M is still in
    ``M_WS(eta)`` for the smallest ``eta`` of the study: its length would be truncated."""
    ws = params["weak_stability"]
    portraits = [panel["eta"] for panel in params["portraits"]]
    smallest = min(etas[0], ws["reference_eta"], params["basin"]["eta"], *portraits)
    end = np.exp(ws["log_extent"])
    signs = [1.0] if ws["branches"] == "positive" else [1.0, -1.0]
    x = np.array([s * e for s in signs for e in (end, 1 / end)])
    ends = weak_stability_thresholds(x, 1 / x, ws["criterion"])
    if np.any(ends > smallest):
        raise ConfigError(
            f"config key 'weak_stability.log_extent' has value {ws['log_extent']}: too short, "
            f"the ends of the parametrised branches are still in M_WS(eta = {smallest:g}) "
            f"(threshold {float(ends.max()):.4g}), so its length would be truncated; increase "
            "it.",
            "weak_stability.log_extent",
        )


# ----- grids of initialisations -------------------------------------------------------------
class _SweepSpec(NamedTuple):
    """One sweep of the study: a ``starts x starts`` grid of cell centres over ``region``
    (:func:`initial_grid`) at the step sizes ``etas``."""

    name: str  # its checkpoint folder
    desc: str  # its progress bar
    key: str  # the config section of its grid: "sweep", "basin" or "portraits.<i>"
    size_key: str  # the key of its starts per axis
    region: list[float]
    starts: int
    etas: np.ndarray
    steps: int
    record: bool  # record every iterate (the portraits)

    def abstract_grid(self, dtype: Any) -> list[jax.ShapeDtypeStruct]:
        """The shapes of ``params0`` (:func:`initial_grid`), for :func:`gdlr_jax.plan_sweep`."""
        return [jax.ShapeDtypeStruct((self.starts**2, 1, 1), dtype)] * 2


def _sweep_specs(params: Mapping[str, Any], etas: np.ndarray) -> list[_SweepSpec]:
    """The sweeps of the study, in the order they run: portraits, Figure 2, basin map."""
    specs = [
        _SweepSpec(
            f"portrait{i}",
            f"portrait eta={panel['eta']:g}",
            f"portraits.{i}",
            f"portraits.{i}.starts",
            panel["region"],
            panel["starts"],
            np.array([panel["eta"]]),
            panel["steps"],
            record=True,
        )
        for i, panel in enumerate(params["portraits"])
    ]
    sw, basin = params["sweep"], params["basin"]
    specs.append(
        _SweepSpec(
            "trapping_region", "trapping region", "sweep", "sweep.resolution", sw["region"],
            sw["resolution"], etas, sw["steps"], record=False,
        )
    )
    specs.append(
        _SweepSpec(
            "basin_map", f"basin map eta={basin['eta']:g}", "basin", "basin.resolution",
            basin["region"], basin["resolution"], np.array([basin["eta"]]), basin["steps"],
            record=False,
        )
    )
    return specs


def _sweep_arguments(spec: _SweepSpec, params0: Any, dtype: Any, engine: Mapping[str, Any]):
    """The arguments ``(args, kwargs)`` of :func:`gdlr_jax.plan_sweep` and
    :func:`gdlr_jax.sweep` for ``spec`` from ``params0``."""
    args = (two_neuron_loss(dtype.name), params0, jnp.asarray(spec.etas, dtype))
    return args, dict(
        steps=spec.steps,
        min_loss_value=0.0,
        criteria=_skeleton.criteria(engine),
        check_every=engine["check_every"],
        memory_budget_bytes=engine["memory_budget_mb"] << 20,
        dtype=dtype,
        record_every=1 if spec.record else None,
        record_params=spec.record,
    )


def _profile_need(ws: Mapping[str, Any]) -> MemoryNeed:
    """Host memory of :func:`minima_profile` and :func:`weakly_stable_length`: four arrays
    per point kept, and about six per point and step size of a block while measuring."""
    per_point = 8 * (2 if ws["branches"] == "both" else 1)
    kept = 4 * per_point * ws["points"]
    measuring = 6 * _ETA_BLOCK * per_point * ws["points"]
    return MemoryNeed(kept, kept + measuring, (("weak_stability.points", ws["points"], 1),))


def plan(params: Mapping[str, Any]) -> list[_SweepSpec]:
    """Plans every sweep of the study (:func:`gdlr_jax.plan_sweep` on abstract grids) and
    the host memory of the whole run, before any compute.

    Returns:
        The sweeps, in the order they run.

    Raises:
        ConfigError: in one line naming the key to change, when a sweep's chunk is estimated
            not to fit in a device's memory, the run not to fit in the host's, or
            ``weak_stability.log_extent`` would truncate ``M_WS``.
    """
    with jax.enable_x64(True):
        etas = _eta_grid(params["sweep"]["eta"])
        _check_extent(params, etas)
        dtype = jnp.dtype(params["dtype"])
        specs = _sweep_specs(params, etas)
        needs, limit = [_profile_need(params["weak_stability"])], None
        for spec in specs:
            grid = spec.abstract_grid(dtype)
            args, kwargs = _sweep_arguments(spec, grid, dtype, params["engine"])
            try:
                sweep_plan = plan_sweep(*args, **kwargs)
                needs.append(_sweep_need(spec, sweep_plan.result_bytes, sweep_plan.peak_host_bytes))
            except ChunkMemoryError as err:
                raise _chunk_memory_error(err, spec, params) from None
            except HostMemoryError as err:  # alone too large: named by the check below
                needs.append(_sweep_need(spec, err.needed, err.needed))
                limit = err.limit
        check_host_memory(needs, limit)
        return specs


def _sweep_need(spec: _SweepSpec, result_bytes: int, peak_bytes: int) -> MemoryNeed:
    """The host memory of ``spec``'s sweep: its result kept, and while it runs also the
    float64 grid that :func:`initial_grid` builds (two coordinates per start). A portrait
    records every step (its steps are named first); its paths and the figure drawing them
    each hold a copy of the recordings to the end of the run."""
    grid = 2 * 8 * spec.starts**2
    sizes = ((spec.size_key, spec.starts, 2),)
    if not spec.record:
        return MemoryNeed(result_bytes, peak_bytes + grid, sizes)
    sizes = ((f"{spec.key}.steps", spec.steps, 1),) + sizes
    return MemoryNeed(2 * result_bytes, peak_bytes + grid + result_bytes, sizes)


def _chunk_memory_error(err: ChunkMemoryError, spec: _SweepSpec, params: Mapping[str, Any]):
    """The :class:`ConfigError` of a sweep whose chunk does not fit: which key to lower."""
    key, value = "engine.memory_budget_mb", params["engine"]["memory_budget_mb"]
    how = f"use engine.memory_budget_mb <= {err.limit >> 20}"
    if not err.fit:  # one trajectory does not fit: only a portrait records enough for this
        key, value = f"{spec.key}.steps", spec.steps
        how = "take fewer steps (each step of a portrait is recorded)"
    return ConfigError(
        f"config key '{key}' has value {value}: a chunk of the {spec.desc} sweep does not fit "
        f"in memory: about {readable_size(err.per_trajectory)} per trajectory (an estimate), "
        f"a device can allocate {readable_size(err.limit)}; {how}.",
        key,
    )


class _Sweeping(NamedTuple):
    """What every sweep of the study shares."""

    dtype: Any  # of the trajectories
    engine: Mapping[str, Any]  # the config's engine section
    criterion: str  # the eigenvalue of Def. 16


def _run_sweep(
    spec: _SweepSpec, ctx: _Sweeping, steps: RunSteps
) -> tuple[np.ndarray, np.ndarray, SweepResult]:
    """:func:`gdlr_jax.sweep` of ``spec`` with a progress bar over trajectories; its finished
    chunks are saved in the run's checkpoint folder ``spec.name`` (resumable).

    Returns:
        The grid's ``xs (starts,)``, ``ys (starts,)`` and the sweep's result.
    """
    xs, ys, params0 = initial_grid(spec.region, spec.starts, spec.starts, ctx.dtype)
    args, kwargs = _sweep_arguments(spec, params0, ctx.dtype, ctx.engine)
    with steps.progress_bar(len(spec.etas) * spec.starts**2, spec.desc) as bar:
        result = steps.sweep(spec.name, bar, *args, **kwargs)
    return xs, ys, result


def unstable_convergence_fraction(
    result: SweepResult, criterion: str = "lambda_max"
) -> Float[np.ndarray, " n_eta"]:
    """Per step size, the share of the initialisations that :func:`gdlr_jax.sweep` classified
    as converged to a minimum whose final point is *not* weakly stable (``eta >= 2 / lambda``).

    Only a null set of initialisations can converge to such a minimum (Thm. 17: it is
    unstable): a start on it (a fixed point), or a trajectory mapped exactly onto it. A
    larger share means trajectories that passed within the engine's tolerances of M and were
    classified at that moment (``docs/reproduction.md``).

    Args:
        result: a sweep of the two-neuron loss.
        criterion: the eigenvalue of Def. 16.

    Returns:
        ``(n_eta,)`` shares.
    """
    status = np.asarray(result.status)
    eta_index, init_index = np.nonzero(status == int(TrajectoryStatus.CONVERGED_MINIMUM))
    w1, w2 = (np.asarray(w)[eta_index, init_index, 0, 0] for w in result.final_params)
    unstable = weak_stability_thresholds(w1, w2, criterion) <= np.asarray(result.etas)[eta_index]
    counts = np.bincount(eta_index[unstable], minlength=status.shape[0])
    return counts / status.shape[1]


def _eta_grid(eta: Mapping[str, Any]) -> np.ndarray:
    """``linspace(start, stop, num)``, rounded so that e.g. 1.05 is reported as 1.05, not
    1.0499999999999998."""
    return np.round(np.linspace(eta["start"], eta["stop"], eta["num"]), 12)


# ----- the study ----------------------------------------------------------------------------
class _Computed(NamedTuple):
    """What the sweeps of the study give its figures and report."""

    arrays: dict[str, Any]  # results.npz
    profile: MinimaProfile
    critical: Any  # gdlr_jax.CriticalStepSize
    reference_length: float
    portraits: list[dict]  # per panel of Figure 1: eta and status fractions


def _phase_portraits(
    specs: list[_SweepSpec], ctx: _Sweeping, steps: RunSteps
) -> tuple[dict, list]:
    """Figure 1 from the engine's recordings of the iterates: (arrays, summaries)."""
    arrays, summaries = {}, []
    for i, spec in enumerate(specs):
        _, _, result = _run_sweep(spec, ctx, steps)
        w1, w2 = (np.asarray(w)[0, :, :, 0, 0] for w in result.recorded_params)
        status = np.asarray(result.status)[0]
        arrays[f"portrait{i}_paths"] = np.stack([w1, w2], axis=-1)  # (starts^2, steps + 1, 2)
        arrays[f"portrait{i}_status"] = status
        summaries.append({"eta": float(spec.etas[0]), "status_fractions": status_fractions(status)})
    return arrays, summaries


def _trapping_region(spec: _SweepSpec, ctx: _Sweeping, steps: RunSteps) -> dict:
    """The sweep of Figure 2: every initialisation of the grid at every step size."""
    xs, ys, result = _run_sweep(spec, ctx, steps)
    return {
        "sweep_eta": spec.etas,
        "sweep_x0": xs,
        "sweep_y0": ys,
        "sweep_status": np.asarray(result.status),
        "sweep_steps_taken": np.asarray(result.steps_taken),
        "sweep_final_loss": np.asarray(result.final_loss),
        "sweep_asymptotic_step_norm": np.asarray(result.asymptotic_step_norm),
        "sweep_period": np.asarray(result.period),
        "sweep_converged_fraction": np.asarray(result.converged_fraction(), np.float64),
        "sweep_converged_outside_mws": unstable_convergence_fraction(result, ctx.criterion),
    }


def _basin_map(spec: _SweepSpec, ctx: _Sweeping, steps: RunSteps) -> dict:
    """The status and steps of every initialisation of a fine grid at one step size."""
    xs, ys, result = _run_sweep(spec, ctx, steps)
    n = spec.starts
    return {
        "basin_x0": xs,
        "basin_y0": ys,
        "basin_status": np.asarray(result.status)[0].reshape(n, n),
        "basin_steps_taken": np.asarray(result.steps_taken)[0].reshape(n, n),
        "basin_converged_outside_mws": unstable_convergence_fraction(result, ctx.criterion),
    }


def compute(params: Mapping[str, Any], specs: list[_SweepSpec], steps: RunSteps) -> _Computed:
    """The study's computations from resolved config keys (see :data:`SCHEMA`) and its sweeps
    ``specs`` (from :func:`plan`): ``M_WS`` along M, ``eta_E``, then the sweeps of Figure 1,
    Figure 2 and the basin map. Runs with float64 enabled (the run's ``compute`` step):
    curvature and ``eta_E`` are always float64; the trajectories use ``params["dtype"]``."""
    ws = params["weak_stability"]
    *portrait_specs, trapping_spec, basin_spec = specs
    etas = trapping_spec.etas

    with steps.timed("weak_stability"):
        profile = minima_profile(
            branches=ws["branches"],
            log_extent=ws["log_extent"],
            points=ws["points"],
            criterion=ws["criterion"],
        )
        eta_curve = np.linspace(min(etas[0], ws["reference_eta"]), etas[-1], ws["curve_points"])
        reference_length = float(weakly_stable_length(profile, [ws["reference_eta"]])[0])
        length_curve = weakly_stable_length(profile, eta_curve) / reference_length
        mws_length = weakly_stable_length(profile, etas)
    with steps.timed("critical_step_size"):
        critical = critical_step_size(
            linear.two_neuron(jnp.float64), **params["critical_step_size"]
        )

    ctx = _Sweeping(jnp.dtype(params["dtype"]), params["engine"], ws["criterion"])
    arrays: dict[str, Any] = {
        "minima_xy": profile.xy,
        "minima_arclength": profile.arclength,
        "minima_thresholds": profile.thresholds,
        "curve_eta": eta_curve,
        "curve_mws_length_normalised": length_curve,
        "sweep_mws_length": mws_length,
        "sweep_mws_length_normalised": mws_length / reference_length,
    }
    with steps.timed("portraits"):
        portrait_arrays, portrait_summaries = _phase_portraits(portrait_specs, ctx, steps)
        arrays.update(portrait_arrays)
    with steps.timed("sweep"):
        arrays.update(_trapping_region(trapping_spec, ctx, steps))
    with steps.timed("basin"):
        arrays.update(_basin_map(basin_spec, ctx, steps))
    return _Computed(arrays, profile, critical, reference_length, portrait_summaries)


def _minima_at(profile: MinimaProfile, eta: float) -> figures.MinimaCurve:
    return figures.MinimaCurve(profile.xy, profile.thresholds > eta)


def draw_figures(
    params: Mapping[str, Any], specs: list[_SweepSpec], computed: _Computed
) -> Iterator[tuple[str, Any]]:
    """Figure 1 (``figure1_phase_portraits``), Figure 2 (``figure2_weak_stability``) and the
    basin map (``basin_map``), each drawn when the run saves it."""
    arrays, profile, ws = computed.arrays, computed.profile, params["weak_stability"]
    panels = [
        figures.PortraitPanel(
            float(spec.etas[0]),
            spec.region,
            arrays[f"portrait{i}_paths"],
            arrays[f"portrait{i}_status"],
            _minima_at(profile, float(spec.etas[0])),
        )
        for i, spec in enumerate(specs[:-2])
    ]
    yield "figure1_phase_portraits", figures.phase_portraits(panels)
    yield "figure2_weak_stability", figures.weak_stability_vs_trapping(
        arrays["curve_eta"],
        arrays["curve_mws_length_normalised"],
        arrays["sweep_eta"],
        arrays["sweep_converged_fraction"],
        computed.critical.eta,
        reference_eta=ws["reference_eta"],
        reference_length=computed.reference_length,
        criterion=ws["criterion"],
    )
    basin = params["basin"]
    yield "basin_map", figures.basin_map(
        basin["region"],
        arrays["basin_status"],
        arrays["basin_steps_taken"],
        basin["eta"],
        _minima_at(profile, basin["eta"]),
    )


def report(params: Mapping[str, Any], specs: list[_SweepSpec], computed: _Computed) -> RunReport:
    """``summary.json`` and the terminal table: per step size of Figure 2, the status
    fractions and ``|M_WS(eta)|``; ``eta_E``; the portraits and the basin map."""
    ws, basin, arrays = params["weak_stability"], params["basin"], computed.arrays
    critical, reference_length = computed.critical, computed.reference_length
    etas, mws_length = arrays["sweep_eta"], arrays["sweep_mws_length"]
    fraction, status = arrays["sweep_converged_fraction"], arrays["sweep_status"]
    per_eta = [
        {
            "eta": float(eta),
            "converged_fraction": float(fraction[k]),
            "status_fractions": status_fractions(status[k]),
            "mws_length": float(mws_length[k]),
            "mws_length_normalised": float(mws_length[k] / reference_length),
            "converged_outside_mws_fraction": float(arrays["sweep_converged_outside_mws"][k]),
        }
        for k, eta in enumerate(etas)
    ]
    basin_fractions = status_fractions(arrays["basin_status"])
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
        "portraits": computed.portraits,
        "basin": {
            "eta": basin["eta"],
            "starts": int(arrays["basin_status"].size),
            "status_fractions": basin_fractions,
            "converged_outside_mws_fraction": float(arrays["basin_converged_outside_mws"][0]),
        },
    }
    rows = [
        [
            p["eta"],
            *status_cells(p["status_fractions"]),
            p["mws_length"],
            p["mws_length_normalised"],
        ]
        for p in per_eta
    ]
    notes = [
        f"eta_E = {critical.eta:.10g} (critical_step_size; closed form {critical.closed_form})",
        f"|M_WS({ws['reference_eta']:g})| = {reference_length:.6g} "
        f"({ws['criterion']}, branches: {ws['branches']})",
        f"basin map at eta = {basin['eta']:g}: "
        + ", ".join(f"{k} {figures.share(v)}" for k, v in basin_fractions.items() if v > 0),
    ]
    outside = arrays["sweep_converged_outside_mws"] * status.shape[1]
    if outside.any():
        notes.append(
            f"note: {int(outside.sum())} trajectories of the sweep were classified as converged "
            "to a minimum outside M_WS(eta) (at eta = "
            + ", ".join(f"{e:g}" for e in etas[outside > 0])
            + "): they passed within the engine's tolerances of M; see docs/reproduction.md"
        )
    headers = ["eta", *_skeleton.STATUS_HEADERS, "|M_WS|", "|M_WS|/ref"]
    return RunReport(summary=summary, headers=headers, rows=rows, notes=notes)


def describe(params: Mapping[str, Any], specs: list[_SweepSpec]) -> list[PlannedSweep]:
    """The sweeps of the study, from :func:`plan` (for ``gdlr run --dry-run``)."""
    return [
        PlannedSweep(
            spec.name, spec.etas.size * spec.starts**2, spec.steps,
            f"{spec.etas.size} step size{'s' * (spec.etas.size > 1)} x {spec.starts}^2 starts",
        )
        for spec in specs
    ]


EXPERIMENT = _skeleton.experiment(
    name="two_neuron",
    summary="the worked example 1/2 (1 - xy)^2: Figures 1 and 2 and a basin map",
    schema=SCHEMA,
    plan=plan,
    compute=compute,
    figures=draw_figures,
    report=report,
    enable_x64=lambda params: True,  # curvature and eta_E are always float64
    describe=describe,
)
