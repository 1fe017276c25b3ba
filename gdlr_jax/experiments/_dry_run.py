"""The dry run: :func:`plan_run` makes every check :func:`~gdlr_jax.experiments.runner.run_config`
makes before compute (config, data, memory plan, output folder), touches nothing, and returns the
:class:`RunPlan` that ``gdlr run --dry-run`` prints (layer 5)."""


from __future__ import annotations

import dataclasses
import errno
import json
import os
import pathlib
import re
from collections.abc import Sequence

from gdlr_jax.engine._memory import readable_size
from gdlr_jax.experiments._run_folder import (
    _RUN_CONFIG,
    RUNS_DIR,
    _is_empty_dir,
    output_dir_for,
)
from gdlr_jax.experiments.config import Config, ConfigError, get_experiment
from gdlr_jax.experiments.runner import (
    _HOST_ESTIMATES,
    PlannedSweep,
    _naming_keywords,
    _previous_run,
    format_table,
    run_name,
)


# ----- the dry run --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A run checked by :func:`plan_run` and not made: what :func:`run_config` would do.

    Attributes:
        config: the config, named as its run (:func:`run_name`).
        path: the output folder.
        folder: what the run would do with it, in a few words.
        sweeps: the experiment's sweeps, in the order they run (empty when it does not say).
        host_peak_bytes: the host memory at the run's peak, estimated by the experiment's
            plan (:func:`check_host_memory`), or ``None`` when it makes no estimate.
        host_available_bytes: the host memory available now, or ``None`` when unknown.
        previous: ``(wall time in s, folder)`` of a finished, uninterrupted run of the same
            config fingerprint (the time estimate), or ``None``.
    """

    config: Config
    path: pathlib.Path
    folder: str
    sweeps: Sequence[PlannedSweep]
    host_peak_bytes: int | None
    host_available_bytes: int | None
    previous: tuple[float, pathlib.Path] | None

    def describe(self) -> str:
        """The plan as ``# ``-comment lines (so that with the resolved config after them the
        output of ``gdlr run --dry-run`` is still a YAML config)."""
        config = self.config
        source = config.source if config.source is not None else "(built in Python)"
        lines = [
            f"gdlr run {config.name} (experiment {config.experiment}): a dry run, nothing "
            + "computed or written",
            "checked: the config, the data, the memory plan and the output folder",
            f"config: {source}",
            f"fingerprint: {config.fingerprint}",
            f"output folder: {self.path} ({self.folder})",
        ]
        if self.sweeps:
            rows = [(s.name, s.trajectories, s.steps, s.note) for s in self.sweeps]
            total = sum(s.trajectories for s in self.sweeps)
            rows.append(("total", total, max(s.steps for s in self.sweeps), ""))
            table = format_table(("sweep", "trajectories", "max steps", ""), rows)
            lines += ["sweeps:"] + ["  " + line for line in table.splitlines()]
        if self.host_peak_bytes is not None:
            available = (
                "available unknown" if self.host_available_bytes is None
                else f"{readable_size(self.host_available_bytes)} available"
            )
            lines.append(
                f"host memory: about {readable_size(self.host_peak_bytes)} at the peak (an "
                f"estimate), {available}"
            )
        if self.previous is not None:
            seconds, folder = self.previous
            lines.append(f"time: about {seconds:.1f} s (a finished run of this config: {folder})")
        else:
            lines.append("time: unknown (no finished run of this config to go by)")
        return "".join(f"# {line}".rstrip() + "\n" for line in lines)


def _check_creatable(path: pathlib.Path) -> None:
    """Checks, touching nothing, that :class:`RunOutput` can make and write the folder
    ``path``: it is a writable folder, or the nearest folder above it that exists is.

    Raises:
        ConfigError: in one line, as :class:`RunOutput` would.
    """
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"output folder {path} is not writable; choose another --out")
        return
    above = path.absolute().parent
    while not above.exists():
        above = above.parent
    problem = (
        errno.ENOTDIR if not above.is_dir()
        else errno.EACCES if not os.access(above, os.W_OK | os.X_OK)
        else None
    )
    if problem is not None:  # what mkdir would say
        raise ConfigError(
            f"cannot create the output folder {path}: {os.strerror(problem)}; choose another "
            "--out"
        )


def _previous_wall_time(
    config: Config, path: pathlib.Path, runs_dir: pathlib.Path
) -> tuple[float, pathlib.Path] | None:
    """``(wall_time_s, folder)`` of a finished run of ``config``'s fingerprint that was not
    resumed, in ``path`` or in ``runs_dir / <name>[-N]``; ``None`` when there is none."""
    numbered = re.compile(re.escape(config.name) + r"(-\d+)?")
    folders = [path]
    if runs_dir.is_dir():
        folders += sorted(f for f in runs_dir.iterdir() if numbered.fullmatch(f.name))
    for folder in folders:
        try:
            summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        seconds = summary.get("wall_time_s") if isinstance(summary, dict) else None
        if (
            summary.get("fingerprint") == config.fingerprint
            and not summary.get("resumed")
            and isinstance(seconds, (int, float))
        ):
            return float(seconds), folder
    return None


@_naming_keywords
def plan_run(
    config: Config,
    *,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    runs_dir: str | os.PathLike = RUNS_DIR,
    resume: bool = False,
) -> RunPlan:
    """Makes every check that :func:`run_config` makes before it computes, and nothing else
    (``gdlr run --dry-run``): no compute, no file or folder written or deleted.

    The checks, in the order of the run: the config (validated when it was loaded); the
    experiment's ``plan`` (the data, each sweep's chunks against device memory and the whole
    run against host memory); the output folder (:func:`output_dir_for`; with ``resume``,
    that the run in it is one of this config; that it can be made and written).

    Args:
        config, out, overwrite, runs_dir, resume: as for :func:`run_config`.

    Returns:
        A :class:`RunPlan` (:meth:`RunPlan.describe` prints it).

    Raises:
        ConfigError: where :func:`run_config` would refuse, with its message.
    """
    config = dataclasses.replace(config, name=run_name(config))
    experiment = get_experiment(config.experiment)
    estimates: list[tuple[int, int | None]] = []
    token = _HOST_ESTIMATES.set(estimates)
    try:
        planned = experiment.plan(config.params)
    finally:
        _HOST_ESTIMATES.reset(token)
    path = output_dir_for(config.name, out, overwrite=overwrite, runs_dir=runs_dir, resume=resume)
    default = pathlib.Path(runs_dir) / config.name
    if resume and _previous_run(path, config) is not None:
        folder = "holds the finished run of this config: nothing to resume"
    elif resume and (path / _RUN_CONFIG).is_file():
        folder = "resumes the unfinished run in it"
    elif path.is_dir() and not _is_empty_dir(path):
        folder = "its previous run is replaced, --overwrite"
    elif out is None and path != default:
        folder = f"a new folder: {default} holds a previous run"
    else:
        folder = "an empty folder" if path.is_dir() else "a new folder"
    _check_creatable(path)
    sweeps = [] if experiment.describe is None else experiment.describe(config.params, planned)
    peak, available = max(estimates) if estimates else (None, None)
    return RunPlan(
        config=config,
        path=path,
        folder=folder,
        sweeps=sweeps,
        host_peak_bytes=peak,
        host_available_bytes=available,
        previous=_previous_wall_time(config, path, pathlib.Path(runs_dir)),
    )
