"""Running a config: finding it, choosing the output folder, writing every file (layer 5).

A run of config ``NAME`` writes into one folder (default ``runs/NAME/``) through
:class:`RunOutput`, the single place that writes files, each atomically (a temporary file
renamed into place, so an interrupted run never leaves a half-written file):

* ``config.yaml``: the resolved config (every key, defaults filled in); running it again
  reproduces the run;
* the experiment's arrays (``results.npz``) and figures (``<figure>.png`` and ``.pdf``);
* ``summary.json``, written last: the experiment's summary plus the run's metadata (config
  fingerprint, gdlr_jax version, overrides, wall time, files). A folder without it holds an
  unfinished run;
* while running, ``checkpoints/<sweep>/``: the finished chunks of each sweep
  (``gdlr_jax.engine._checkpoint``), removed once ``summary.json`` is written.

A previous run is never overwritten silently: without ``--out`` a taken ``runs/NAME`` becomes
``runs/NAME-2``, ``runs/NAME-3``, ...; an explicit ``--out`` that is not empty is an error
unless ``overwrite=True``, which replaces it only when it holds a previous run (a
``config.yaml``). ``resume=True`` continues the unfinished run in the folder instead (default
``runs/NAME`` itself): its sweeps load their saved chunks and run the others, giving the
results of an uninterrupted run; a folder holding a run of another config fingerprint is
refused.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, NamedTuple

import numpy as np
import yaml
from tqdm.auto import tqdm

from gdlr_jax import __version__
from gdlr_jax.engine._checkpoint import write_atomically
from gdlr_jax.engine._memory import host_available_bytes, readable_size
from gdlr_jax.experiments.config import Config, ConfigError, get_experiment

#: the config that ``gdlr run`` runs when none is named.
DEFAULT_CONFIG = "two_neuron"
#: where default output folders go, relative to the working directory.
RUNS_DIR = pathlib.Path("runs")
_RUN_MARKER = "config.yaml"
_CHECKPOINTS = "checkpoints"


# ----- finding configs ----------------------------------------------------------------------
def config_dirs() -> list[pathlib.Path]:
    """Folders searched for configs by name: ``./configs``, then the repository's ``configs/``."""
    candidates = [
        pathlib.Path.cwd() / "configs",
        pathlib.Path(__file__).resolve().parents[2] / "configs",
    ]
    out: list[pathlib.Path] = []
    for path in candidates:
        if path.is_dir() and all(path.resolve() != p.resolve() for p in out):
            out.append(path)
    return out


def find_config(name_or_path: str | os.PathLike) -> pathlib.Path:
    """A config file: an existing path as given, else ``<name>.yaml`` in :func:`config_dirs`.

    Raises:
        ConfigError: when neither exists (the message lists the shipped configs).
    """
    path = pathlib.Path(name_or_path)
    if path.is_file():
        return path
    stem = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    if path.parent == pathlib.Path("."):
        for folder in config_dirs():
            if (folder / f"{stem}.yaml").is_file():
                return folder / f"{stem}.yaml"
    names = ", ".join(name for name, _, _ in list_configs()) or "none found"
    raise ConfigError(f"config not found: {name_or_path} (shipped configs: {names})")


def list_configs() -> list[tuple[str, pathlib.Path, str]]:
    """``(name, path, description)`` of each ``*.yaml`` in :func:`config_dirs` (first wins)."""
    seen: dict[str, tuple[str, pathlib.Path, str]] = {}
    for folder in config_dirs():
        for path in sorted(folder.glob("*.yaml")):
            if path.stem in seen:
                continue
            try:
                raw = yaml.safe_load(path.read_text())
                description = str(raw.get("description", "")) if isinstance(raw, dict) else ""
            except yaml.YAMLError:
                description = "(not valid YAML)"
            seen[path.stem] = (path.stem, path, description)
    return sorted(seen.values())


# ----- the output folder --------------------------------------------------------------------
def _is_empty_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _replace_previous_run(path: pathlib.Path) -> None:
    if not (path / _RUN_MARKER).is_file():
        raise ConfigError(
            f"output folder {path} is not empty and holds no previous run (no {_RUN_MARKER}); "
            "refusing to delete it with --overwrite: choose another --out"
        )
    shutil.rmtree(path)


def output_dir_for(
    config_name: str,
    out: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    runs_dir: str | os.PathLike = RUNS_DIR,
    resume: bool = False,
) -> pathlib.Path:
    """The folder a run writes to; never one holding a previous run unless ``overwrite`` or
    ``resume``.

    Args:
        config_name: the config's name.
        out: an explicit folder (``--out``); default ``runs_dir / config_name``.
        overwrite: replace a previous run in the chosen folder (only a folder holding a
            ``config.yaml`` is ever deleted).
        runs_dir: the parent of default folders.
        resume: the folder to continue a run in: ``out``, or ``runs_dir / config_name``
            itself (never a numbered one), whatever it holds (:func:`run_config` checks it).

    Returns:
        A path that does not exist yet or is an empty folder (nothing is created or deleted
        here unless ``overwrite`` replaces a previous run); with ``resume``, the folder.

    Raises:
        ConfigError: when ``out`` is a file, or is a non-empty folder without ``overwrite``
            or ``resume``, or when both ``overwrite`` and ``resume`` are given.
    """
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume exclude each other: choose one")
    if resume:
        path = pathlib.Path(runs_dir) / config_name if out is None else pathlib.Path(out)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {path}: exists and is not a folder")
        return path
    if out is not None:
        path = pathlib.Path(out)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {path}: exists and is not a folder")
        if path.exists() and not _is_empty_dir(path):
            if not overwrite:
                raise ConfigError(
                    f"output folder {path} already exists and is not empty; pass --overwrite "
                    "to replace the run in it, or choose another --out"
                )
            _replace_previous_run(path)
        return path
    base = pathlib.Path(runs_dir) / config_name
    if not base.exists() or _is_empty_dir(base):
        return base
    if overwrite:
        _replace_previous_run(base)
        return base
    n = 2
    while (candidate := base.with_name(f"{base.name}-{n}")).exists() and not _is_empty_dir(
        candidate
    ):
        n += 1
    return candidate


class RunOutput:
    """The output folder of one run: every file of a run is written through it, atomically.

    Args:
        path: the folder (created if missing).

    Attributes:
        files: names of the files written so far, in order.

    Raises:
        ConfigError: when the folder cannot be created or written to (nothing is left behind).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(
                f"cannot create the output folder {self.path}: {err.strerror or err}; "
                "choose another --out"
            ) from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            if created:
                self.path.rmdir()
            raise ConfigError(f"output folder {self.path} is not writable; choose another --out")
        self.files: list[str] = []

    def _write(self, name: str, write: Callable[[IO[bytes]], None]) -> pathlib.Path:
        target = write_atomically(self.path / name, write)
        if name not in self.files:
            self.files.append(name)
        return target

    def checkpoint_dir(self, sweep: str) -> pathlib.Path:
        """The checkpoint folder of the sweep named ``sweep`` (``checkpoints/<sweep>``), for
        ``gdlr_jax.sweep(..., checkpoint_dir=...)``."""
        return self.path / _CHECKPOINTS / sweep

    def remove_checkpoints(self) -> None:
        """Deletes the checkpoint folders (once the run's results are written)."""
        shutil.rmtree(self.path / _CHECKPOINTS, ignore_errors=True)

    def remove(self) -> None:
        """Deletes the files written so far and the checkpoints, and the folder if that
        leaves it empty."""
        for name in self.files:
            (self.path / name).unlink(missing_ok=True)
        self.files.clear()
        self.remove_checkpoints()
        if _is_empty_dir(self.path):
            self.path.rmdir()

    def write_bytes(self, name: str, data: bytes) -> pathlib.Path:
        """Writes a file from bytes."""
        return self._write(name, lambda handle: handle.write(data))

    def write_text(self, name: str, text: str) -> pathlib.Path:
        """Writes a UTF-8 text file."""
        return self.write_bytes(name, text.encode())

    def write_json(self, name: str, obj: Any) -> pathlib.Path:
        """Writes ``obj`` as indented JSON (numpy scalars and arrays become numbers/lists)."""
        return self.write_text(name, json.dumps(obj, indent=2, default=_to_json) + "\n")

    def write_arrays(self, name: str, arrays: Mapping[str, Any]) -> pathlib.Path:
        """Writes arrays to ``<name>.npz`` (compressed; read back with ``numpy.load``)."""

        def write(handle: IO[bytes]) -> None:
            np.savez_compressed(handle, **{k: np.asarray(v) for k, v in arrays.items()})

        return self._write(f"{name}.npz", write)

    def save_figure(self, fig: Any, stem: str, *, dpi: float) -> list[pathlib.Path]:
        """Saves a matplotlib figure as ``<stem>.png`` (at ``dpi``) and ``<stem>.pdf``.

        The PNG is exactly ``figsize * dpi`` pixels (no tight bounding box).
        """
        paths = []
        for fmt in ("png", "pdf"):
            buffer = io.BytesIO()
            fig.savefig(buffer, format=fmt, dpi=dpi)
            paths.append(self.write_bytes(f"{stem}.{fmt}", buffer.getvalue()))
        return paths


def _to_json(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, pathlib.Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ----- reports ------------------------------------------------------------------------------
@dataclasses.dataclass
class RunReport:
    """What an experiment returns to the runner.

    Attributes:
        summary: JSON-compatible results, written to ``summary.json``.
        headers: column names of the terminal table.
        rows: its rows (numbers are formatted with 4 significant digits).
        notes: lines printed after the table.
    """

    summary: dict
    headers: Sequence[str]
    rows: Sequence[Sequence[Any]]
    notes: Sequence[str] = ()


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: numeric columns right-aligned (4 significant digits), others left."""

    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return f"{v:.4g}"
        return str(v)

    def numeric(i: int) -> bool:
        return all(isinstance(row[i], (int, float, np.number)) for row in rows)

    cells = [[str(h) for h in headers]] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = [str.rjust if numeric(i) else str.ljust for i in range(len(headers))]
    lines = [
        "  ".join(a(c, w) for c, w, a in zip(r, widths, align, strict=True)).rstrip() for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class MemoryNeed(NamedTuple):
    """Host memory that one part of a run needs, and the config keys that size it.

    Attributes:
        kept_bytes: held from when the part is made to the end of the run (its results).
        peak_bytes: held while it is made (``kept_bytes`` included).
        sizes: ``(key, value, exponent)`` of each config key that sizes the part, the one to
            name first: its bytes grow as ``value ** exponent`` (2 for the resolution of a
            grid).
    """

    kept_bytes: int
    peak_bytes: int
    sizes: tuple[tuple[str, int, int], ...]


def check_host_memory(needs: Sequence[MemoryNeed], limit: int | None = None) -> None:
    """Checks that the parts of a run, made in the order of ``needs``, fit in host memory.

    The run peaks at ``max_i (sum_{j < i} kept_j + peak_i)``. When that exceeds ``limit``
    (default :func:`gdlr_jax.engine._sweep.host_available_bytes`; unknown: no check), the part that
    needs most at that moment is blamed, and for each of its keys a value that would fit is
    suggested (its bytes growing as ``value ** exponent``, the other parts unchanged).

    Raises:
        ConfigError: in one line naming the part's first key, before any compute.
    """
    limit = host_available_bytes() if limit is None else limit
    if limit is None or not needs:
        return
    kept_before = np.cumsum([0] + [n.kept_bytes for n in needs[:-1]])
    totals = [int(k) + n.peak_bytes for k, n in zip(kept_before, needs, strict=True)]
    worst = int(np.argmax(totals))
    if totals[worst] <= limit:
        return
    shares = [n.kept_bytes for n in needs[:worst]] + [needs[worst].peak_bytes]
    blamed = int(np.argmax(shares))
    room = max(0, limit - (totals[worst] - shares[blamed]))
    fits = [  # (1 + 1e-9): a ratio like (4 / 9) ** 0.5 rounds to just under 2 / 3
        (key, int(value * (room / shares[blamed]) ** (1 / exponent) * (1 + 1e-9)))
        for key, value, exponent in needs[blamed].sizes
    ]
    fits = [f"{key} to about {fit}" for key, fit in fits if fit >= 1]
    how = "lower " + (" or ".join(fits) if fits else "the sizes of the other parts first")
    parts = ", ".join(
        f"{n.sizes[0][0]} {readable_size(b)}"
        for n, b in sorted(zip(needs[: worst + 1], shares, strict=True), key=lambda nb: -nb[1])
    )
    key, value, _ = needs[blamed].sizes[0]
    raise ConfigError(
        f"config key '{key}' has value {value}: the run would need about "
        f"{readable_size(totals[worst])} of host memory (an estimate: {parts}), more than the "
        f"{readable_size(limit)} available; {how}.",
        key,
    )


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A tqdm progress bar on stderr (silent when ``enabled`` is false)."""
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False)


@dataclasses.dataclass(frozen=True)
class RunOutcome:
    """A finished run: its folder and the contents of its ``summary.json``."""

    path: pathlib.Path
    summary: dict


class RunInterrupted(Exception):
    """A run stopped by Ctrl-C (``KeyboardInterrupt``) in its experiment.

    The chunks its sweeps finished are saved in ``path``; ``run_config(config, out=path,
    resume=True)`` continues it.
    """

    def __init__(self, path: pathlib.Path):
        super().__init__(f"interrupted; finished chunks are saved in {path}")
        self.path = path


def _dotted(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"sweep.steps": 2000, "portraits.0.eta": 0.4, ...}``."""
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, sub in items:
        out.update(_dotted(sub, f"{prefix}.{key}" if prefix else key))
    return out


def _difference(saved_yaml: str, config: Config) -> str:
    """The keys of a saved resolved config that differ from ``config``, in a few words."""
    try:
        saved = _dotted(yaml.safe_load(saved_yaml))
    except yaml.YAMLError:
        return f"its {_RUN_MARKER} is not valid YAML"
    now = _dotted(config.resolved())
    keys = [
        k
        for k in dict.fromkeys([*saved, *now])
        if k != "description" and saved.get(k) != now.get(k)
    ]
    if not keys:
        return f"same keys, written by another gdlr_jax version than {__version__}"
    shown = "; ".join(f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in keys[:3])
    return shown + (f"; and {len(keys) - 3} more keys" if len(keys) > 3 else "")


def _previous_run(path: pathlib.Path, config: Config) -> dict | None:
    """Checks that the run in ``path`` (if any) is one of ``config``, so that it can be resumed.

    Returns:
        The contents of its ``summary.json`` when that run is finished, else ``None``.

    Raises:
        ConfigError: when ``path`` holds files but no run, or a run whose config fingerprint
            (``config.yaml``) is not ``config.fingerprint``; the message says which keys differ.
    """
    if not path.exists() or _is_empty_dir(path):
        return None
    marker = path / _RUN_MARKER
    if not marker.is_file():
        raise ConfigError(
            f"cannot resume in {path}: it is not empty and holds no gdlr run (no {_RUN_MARKER}); "
            "choose another --out"
        )
    text = marker.read_text()
    found = re.search(r"fingerprint ([0-9a-f]{64})", text.partition("\n")[0])
    if found is None or found.group(1) != config.fingerprint:
        raise ConfigError(
            f"cannot resume in {path}: it holds a run of a different config "
            f"({_difference(text, config)}); choose another --out, or replace that run with "
            "--overwrite"
        )
    summary = path / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else None


def run_config(
    config: Config,
    *,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    stream: IO[str] | None = None,
    runs_dir: str | os.PathLike = RUNS_DIR,
    resume: bool = False,
) -> RunOutcome:
    """Runs a validated config and writes its output folder (see the module docstring).

    Args:
        config: from :func:`gdlr_jax.experiments.config.load_config`.
        out: the output folder (default ``runs_dir / config.name``, numbered if taken).
        overwrite: replace a previous run in ``out``.
        progress: show progress bars (stderr).
        stream: where the summary table goes (default stdout).
        runs_dir: the parent of default output folders.
        resume: continue the unfinished run of ``config`` in ``out`` (default
            ``runs_dir / config.name``): sweeps load the chunks saved in its ``checkpoints/``
            and run the others. A finished run is returned as it is; an empty or missing
            folder starts a new run.

    Returns:
        A :class:`RunOutcome`.

    Raises:
        ConfigError: on a config found impossible by the experiment's ``plan`` (before
            any folder is made) or while computing (the run's files are removed), or with
            ``resume``, on a folder holding another config's run.
        RunInterrupted: on ``KeyboardInterrupt`` during the experiment (the saved chunks are
            kept).
    """
    stream = sys.stdout if stream is None else stream
    experiment = get_experiment(config.experiment)
    start = time.perf_counter()
    planned = experiment.plan(config.params)  # before any folder or compute
    path = output_dir_for(config.name, out, overwrite=overwrite, runs_dir=runs_dir, resume=resume)
    resuming = resume and (path / _RUN_MARKER).is_file()
    if resume:
        finished = _previous_run(path, config)
        if finished is not None:
            note = f"gdlr: {path} holds the finished run of this config; nothing to resume"
            print(note, file=stream)
            return RunOutcome(path, finished)
    output = RunOutput(path)
    fingerprint = config.fingerprint
    output.write_text(
        _RUN_MARKER, f"# gdlr resolved config; fingerprint {fingerprint}\n" + config.to_yaml()
    )
    if resuming:
        print(f"gdlr: resuming {config.name} ({config.experiment}) in {path}", file=stream)
    else:
        print(f"gdlr: running {config.name} ({config.experiment}) into {path}", file=stream)
    try:
        report = experiment.run(config.params, planned, output, progress=progress)
    except ConfigError:  # a config found impossible while computing: leave no partial run
        output.remove()
        raise
    except KeyboardInterrupt:
        raise RunInterrupted(path) from None
    summary = {
        "config": config.name,
        "experiment": config.experiment,
        "description": config.description,
        "fingerprint": fingerprint,
        "gdlr_jax_version": __version__,
        "source": str(config.source) if config.source is not None else None,
        "overrides": list(config.overrides),
        "wall_time_s": round(time.perf_counter() - start, 3),  # of this session only
        "resumed": resuming,
        "files": output.files + ["summary.json"],
        **report.summary,
    }
    output.write_json("summary.json", summary)
    output.remove_checkpoints()  # the run is complete: results.npz holds what they held
    print(format_table(report.headers, report.rows), file=stream)
    for line in report.notes:
        print(line, file=stream)
    print(
        f"gdlr: wrote {len(summary['files'])} files to {path} in {summary['wall_time_s']:.1f} s",
        file=stream,
    )
    return RunOutcome(path, summary)
