"""The skeleton every experiment shares (layer 5): the common config sections, the run steps,
and the writing of the results, figures and summary.

An experiment module holds only what is its own, its config sections and four steps:

* ``plan(params) -> planned``: what the keys alone cannot check (the data, the memory of
  every sweep), raising :class:`~gdlr_jax.experiments.config.ConfigError` before the output
  folder is made and before any compute; returns what the other steps need;
* ``compute(params, planned, steps) -> computed``: the sweeps (:class:`RunSteps` gives them
  checkpoints, progress bars and timings); ``computed.arrays`` is what ``results.npz`` holds;
* ``figures(params, planned, computed)``: ``(stem, figure)`` pairs, each saved as
  ``<stem>.png`` and ``<stem>.pdf`` at ``figures.dpi`` as soon as it is drawn;
* ``report(params, planned, computed) -> RunReport``: the summary and the terminal table.

:func:`experiment` joins them into the :class:`~gdlr_jax.experiments.config.Experiment` that
:func:`~gdlr_jax.experiments.runner.run_config` runs, in that order, with float64 enabled
throughout when the experiment asks for it, and the wall time of each timed part (and of
the figures) in ``summary.json: timings_s``. Every config has the sections ``dtype`` first
and ``engine`` and ``figures`` last (:func:`schema`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import jax
import numpy as np
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from gdlr_jax.engine import ConvergenceCriteria, SweepResult, sweep
from gdlr_jax.experiments.config import ConfigError, Experiment, Scalar, Section
from gdlr_jax.experiments.figures import STATUS_STYLE, status_shares
from gdlr_jax.experiments.runner import RunOutput, RunReport, progress_bar


# ----- the sections every config has --------------------------------------------------------
def dtype_key(default: str, help: str) -> Scalar:
    """The ``dtype`` key: ``float32`` or ``float64``."""
    return Scalar(str, help, default, choices=("float32", "float64"))


# ----- a key type of several experiments' sections ----------------------------------------
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


FIGURES = Section(
    "figure output",
    {"dpi": Scalar(int, "resolution of the PNG files", 150, ge=20, le=1200)},
)

_DEFAULT = ConvergenceCriteria()  # the engine's default tolerances
_CRITERIA_KEYS = {
    "grad_tol": Scalar(float, "converged: ||grad L|| <= grad_tol", _DEFAULT.grad_tol, ge=0.0),
    "step_tol": Scalar(
        float, "converged: eta ||grad L|| <= step_tol", _DEFAULT.step_tol, ge=0.0
    ),
    "loss_tol": Scalar(
        float, "a minimum: loss <= loss_tol (the minimum value is 0)", _DEFAULT.loss_tol, ge=0.0
    ),
    "divergence_bound": Scalar(
        float,
        "diverged: max |theta_i| > divergence_bound",
        _DEFAULT.divergence_bound,
        gt=0.0,
    ),
    "window": Scalar(int, "final steps searched for a periodic orbit", _DEFAULT.window, ge=2),
    "max_period": Scalar(int, "largest period looked for", _DEFAULT.max_period, ge=1),
    "period_tol": Scalar(
        float, "relative tolerance of the period test", _DEFAULT.period_tol, ge=0.0
    ),
    "lyapunov_tol": Scalar(
        float,
        "chaotic (sweeps with lyapunov=True): Lyapunov exponent > lyapunov_tol",
        _DEFAULT.lyapunov_tol,
        ge=0.0,
    ),
}


def criteria(engine: Mapping[str, Any]) -> ConvergenceCriteria:
    """The :class:`~gdlr_jax.ConvergenceCriteria` of a resolved ``engine`` section."""
    return ConvergenceCriteria(**{k: engine[k] for k in ConvergenceCriteria._fields})


def _check_criteria(engine: dict) -> str | None:
    try:
        criteria(engine).validate()
    except ValueError as err:
        return str(err)
    return None


def engine_section(chunking: Mapping[str, Scalar], *, chunking_last: bool = False) -> Section:
    """The ``engine`` section: ``check_every``, the experiment's keys sizing the chunks of its
    sweeps (``chunking``; after ``check_every``, or last with ``chunking_last``) and the
    convergence criteria (:class:`~gdlr_jax.ConvergenceCriteria`, checked together)."""
    check_every = {"check_every": Scalar(int, "steps between convergence checks", 64, ge=1)}
    keys = (
        {**check_every, **_CRITERIA_KEYS, **chunking}
        if chunking_last
        else {**check_every, **chunking, **_CRITERIA_KEYS}
    )
    return Section(
        "gdlr_jax.sweep settings and the convergence criteria of a trajectory (docs/engine.md)",
        keys,
        check=_check_criteria,
    )


def schema(help: str, dtype: Scalar, own: Mapping[str, Any], engine: Section) -> Section:
    """An experiment's config schema: ``dtype``, its own sections, ``engine``, ``figures``."""
    return Section(help, {"dtype": dtype, **own, "engine": engine, "figures": FIGURES})


# ----- the tables -----------------------------------------------------------------------------
#: the status columns of a run's table, in the order of ``figures.STATUS_STYLE``.
STATUS_HEADERS = tuple(style.short for style in STATUS_STYLE.values())


def status_fractions(status: np.ndarray) -> dict[str, float]:
    """The share of the trajectories ``status`` (any shape) with each status, by name."""
    return {k: float(v) for k, v in status_shares(np.reshape(status, -1)).items()}


def status_cells(fractions: Mapping[str, float]) -> list[float]:
    """The :data:`STATUS_HEADERS` cells of a row, from :func:`status_fractions`."""
    return [fractions[code.name.lower()] for code in STATUS_STYLE]


# ----- the run steps --------------------------------------------------------------------------
class RunSteps:
    """What an experiment's ``compute`` step is given.

    Attributes:
        output: the run's folder.
        progress: whether progress bars are shown.
        timings: seconds of each part timed with :meth:`timed` (``summary.json: timings_s``).
    """

    def __init__(self, output: RunOutput, progress: bool):
        self.output = output
        self.progress = progress
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Records the wall time of the block as ``timings[name]``."""
        tic = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - tic

    def progress_bar(self, total: int, desc: str) -> tqdm:
        """A progress bar over ``total`` trajectories (stderr; silent without ``progress``)."""
        return progress_bar(total, desc, self.progress)

    def sweep(self, name: str, bar: tqdm, *args: Any, **kwargs: Any) -> SweepResult:
        """:func:`gdlr_jax.sweep` ``(*args, **kwargs)``, its finished chunks counted on ``bar``
        and saved in the run's checkpoint folder ``name`` (so that the run can be resumed)."""
        return sweep(
            *args,
            **kwargs,
            on_chunk=lambda index, chunk: bar.update(chunk.stop - chunk.start),
            checkpoint_dir=self.output.checkpoint_dir(name),
        )


class Computed(Protocol):
    """What ``compute`` returns: at least the arrays of ``results.npz``."""

    arrays: Mapping[str, Any]


def uses_float64(params: Mapping[str, Any]) -> bool:
    """Whether the config's ``dtype`` is ``float64``."""
    return params["dtype"] == "float64"


def experiment(
    *,
    name: str,
    summary: str,
    schema: Section,
    plan: Callable[[Mapping[str, Any]], Any],
    compute: Callable[[Mapping[str, Any], Any, RunSteps], Computed],
    figures: Callable[[Mapping[str, Any], Any, Any], Iterable[tuple[str, Figure]]],
    report: Callable[[Mapping[str, Any], Any, Any], RunReport],
    enable_x64: Callable[[Mapping[str, Any]], bool] = uses_float64,
    describe: Callable[[Mapping[str, Any], Any], list[Any]] | None = None,
) -> Experiment:
    """The :class:`~gdlr_jax.experiments.config.Experiment` made of an experiment's steps
    (see the module docstring); ``enable_x64(params)`` says whether float64 is enabled while
    they run (default: when ``dtype`` is ``float64``); ``describe(params, planned)`` lists the
    sweeps for ``gdlr run --dry-run`` (:class:`~gdlr_jax.experiments.runner.PlannedSweep`)."""

    def planned(params: Mapping[str, Any]) -> Any:
        with jax.enable_x64(enable_x64(params)):
            return plan(params)

    def run(
        params: Mapping[str, Any], planned: Any, output: RunOutput, progress: bool = True
    ) -> RunReport:
        steps = RunSteps(output, progress)
        with jax.enable_x64(enable_x64(params)):
            computed = compute(params, planned, steps)
            output.write_arrays("results", computed.arrays)
            with steps.timed("figures"):
                for stem, fig in figures(params, planned, computed):
                    output.save_figure(fig, stem, dpi=params["figures"]["dpi"])
            done = report(params, planned, computed)
        timings = {k: round(v, 3) for k, v in steps.timings.items()}
        return dataclasses.replace(done, summary={**done.summary, "timings_s": timings})

    return Experiment(
        name=name, summary=summary, schema=schema, plan=planned, run=run, describe=describe
    )
