"""The figures and the report of the two-neuron study (layer 5), from what its ``compute``
gives: Figure 1, Figure 2 and the basin map; ``summary.json`` and the terminal table."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from gdlr_jax.experiments import _skeleton, figures
from gdlr_jax.experiments._skeleton import status_cells, status_fractions
from gdlr_jax.experiments._two_neuron_minima import MinimaProfile
from gdlr_jax.experiments._two_neuron_plan import _SweepSpec
from gdlr_jax.experiments.runner import RunReport


class _Computed(NamedTuple):
    """What the sweeps of the study give its figures and report."""

    arrays: dict[str, Any]  # results.npz
    profile: MinimaProfile
    critical: Any  # gdlr_jax.CriticalStepSize
    reference_length: float
    portraits: list[dict]  # per panel of Figure 1: eta and status fractions


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
