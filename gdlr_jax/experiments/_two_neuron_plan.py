"""The plan of the two-neuron study (layer 5): its sweeps (grids of initialisations at step
sizes), the device and host memory of each and of the whole run, and the extent of M, all
checked before any compute; and the sweeps as ``gdlr run --dry-run`` lists them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gdlr_jax.engine import ChunkMemoryError, HostMemoryError, plan_sweep
from gdlr_jax.engine._memory import readable_size
from gdlr_jax.experiments import _skeleton
from gdlr_jax.experiments._shared_problems import two_neuron_loss
from gdlr_jax.experiments._two_neuron_minima import (
    _ETA_BLOCK,
    weak_stability_thresholds,
)
from gdlr_jax.experiments.config import ConfigError
from gdlr_jax.experiments.runner import MemoryNeed, PlannedSweep, check_host_memory


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


def _eta_grid(eta: Mapping[str, Any]) -> np.ndarray:
    """``linspace(start, stop, num)``, rounded so that e.g. 1.05 is reported as 1.05, not
    1.0499999999999998."""
    return np.round(np.linspace(eta["start"], eta["stop"], eta["num"]), 12)


def describe(params: Mapping[str, Any], specs: list[_SweepSpec]) -> list[PlannedSweep]:
    """The sweeps of the study, from :func:`plan` (for ``gdlr run --dry-run``)."""
    return [
        PlannedSweep(
            spec.name, spec.etas.size * spec.starts**2, spec.steps,
            f"{spec.etas.size} step size{'s' * (spec.etas.size > 1)} x {spec.starts}^2 starts",
        )
        for spec in specs
    ]
