"""Running a config: finding it, choosing the output folder, writing every file (layer 5).

A run of config ``NAME`` writes into one folder (default ``runs/NAME/``) through
:class:`RunOutput`, the single place that writes files, each atomically (a temporary file
renamed into place, so an interrupted run never leaves a half-written file):

* ``.gdlr-run``: the folder's marker (:data:`RUN_MARKER`), written first: the names of the
  files gdlr wrote there, with a fingerprint;
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
unless ``overwrite=True``, which empties it only when gdlr made it (its marker, intact) and
it holds nothing gdlr did not write, never through a link, never the current directory or a
folder above it, and only once the new run's plan has passed; otherwise one line, nothing
touched. ``resume=True`` continues the unfinished run in the folder instead (default
``runs/NAME`` itself): its sweeps load their saved chunks and run the others, giving the
results of an uninterrupted run; a folder holding a run of another config fingerprint is
refused.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import os
import pathlib
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, NamedTuple

import jax
import numpy as np
import yaml
from tqdm.auto import tqdm

from gdlr_jax._version import __version__
from gdlr_jax.engine._distributed import FINISH_TIMEOUT_S, ProcessGroup
from gdlr_jax.engine._memory import host_available_bytes, readable_size
from gdlr_jax.experiments._run_folder import (
    _RUN_CONFIG,
    RUN_MARKER,
    RUNS_DIR,
    RunOutput,
    RunWriteError,
    _is_empty_dir,
    _read_marker,
    _remove_previous_run,
    _shared_output,
    output_dir_for,
)
from gdlr_jax.experiments.config import Config, ConfigError, get_experiment, read_yaml

#: the config that ``gdlr run`` runs when none is named.
DEFAULT_CONFIG = "two_neuron"
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
    """``(name, path, description)`` of each ``*.yaml`` in :func:`config_dirs` (first wins).

    An entry that cannot be read gets a description in parentheses saying why (``(a folder,
    not a config file)``, ``(not UTF-8 text)``, ``(not valid YAML)``, ``(cannot be read:
    ...)``); the others are listed all the same.
    """
    seen: dict[str, tuple[str, pathlib.Path, str]] = {}
    for folder in config_dirs():
        for path in sorted(folder.glob("*.yaml")):
            if path.stem in seen:
                continue
            if not path.is_file():
                description = "(a folder, not a config file)" if path.is_dir() else "(not a file)"
                seen[path.stem] = (path.stem, path, description)
                continue
            try:
                raw = yaml.safe_load(path.read_text(encoding="utf-8"))
                description = str(raw.get("description", "")) if isinstance(raw, dict) else ""
            except UnicodeDecodeError:
                description = "(not UTF-8 text)"
            except yaml.YAMLError:
                description = "(not valid YAML)"
            except OSError as err:
                description = f"(cannot be read: {err.strerror or err})"
            seen[path.stem] = (path.stem, path, description)
    return sorted(seen.values())


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


class PlannedSweep(NamedTuple):
    """One sweep of a planned run (an experiment's ``describe``), for ``gdlr run --dry-run``.

    Attributes:
        name: the sweep (its checkpoint folder).
        trajectories: ``n_eta * n_init``, the trajectories it runs.
        steps: the most steps (updates) one of them takes.
        note: a few words on its grid (step sizes, initialisations, batch).
    """

    name: str
    trajectories: int
    steps: int
    note: str = ""


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


#: while :func:`plan_run` plans a run: the ``(peak_bytes, available_bytes)`` estimates that
#: :func:`check_host_memory` made (``available_bytes`` None when unknown).
_HOST_ESTIMATES: contextvars.ContextVar[list[tuple[int, int | None]] | None] = (
    contextvars.ContextVar("gdlr_host_estimates", default=None)
)


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
    if not needs:
        return
    kept_before = np.cumsum([0] + [n.kept_bytes for n in needs[:-1]])
    totals = [int(k) + n.peak_bytes for k, n in zip(kept_before, needs, strict=True)]
    worst = int(np.argmax(totals))
    estimates = _HOST_ESTIMATES.get()
    if estimates is not None:  # plan_run (gdlr run --dry-run) reports it
        estimates.append((totals[worst], limit))
    if limit is None or totals[worst] <= limit:
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
        saved = _dotted(read_yaml(saved_yaml, _RUN_CONFIG))
    except ConfigError as err:
        return str(err)
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


def _read_run_file(path: pathlib.Path, name: str, limit: int = 1 << 24) -> str:
    """The UTF-8 text of the file ``name`` of the run folder ``path``, for ``--resume``.

    Raises:
        ConfigError: when it is not a plain file, is larger than ``limit`` bytes or is not
            UTF-8 text, in one line saying how to go on.
    """
    file = path / name
    problem = None
    if file.is_symlink() or not file.is_file():
        problem = "is not a plain file"
    elif file.stat().st_size > limit:
        problem = f"is larger than {readable_size(limit)}"
    else:
        try:
            return file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            problem = f"is not UTF-8 text ({err.reason} at byte {err.start})"
        except OSError as err:
            problem = f"cannot be read ({err.strerror or err})"
    raise ConfigError(
        f"cannot resume in {path}: its {name} {problem}, so the run is damaged; remove "
        f"{file} to compute it again, or choose another --out"
    )


def _previous_run(path: pathlib.Path, config: Config) -> dict | None:
    """Checks that the run in ``path`` (if any) is one of ``config``, so that it can be resumed.

    A run is recognised by its ``config.yaml`` (whose first line holds the config
    fingerprint; runs of older gdlr versions without the marker :data:`RUN_MARKER` are
    resumed too), or by a valid marker alone (a run killed before its ``config.yaml``).

    Returns:
        The contents of its ``summary.json`` when that run is finished, else ``None``.

    Raises:
        ConfigError: when ``path`` holds files but no run, a run whose config fingerprint
            (``config.yaml``) is not ``config.fingerprint`` (the message says which keys
            differ), or damaged files (a ``config.yaml`` or ``summary.json`` that is
            truncated, not UTF-8 or not JSON): one line each.
    """
    if not path.exists() or _is_empty_dir(path):
        return None
    try:
        marked = _read_marker(path) is not None
    except (OSError, ValueError):
        marked = False
    config_file = path / _RUN_CONFIG
    if not config_file.exists() and not config_file.is_symlink():
        if marked:
            return None
        raise ConfigError(
            f"cannot resume in {path}: it is not empty and holds no gdlr run (no {_RUN_CONFIG}); "
            "choose another --out"
        )
    text = _read_run_file(path, _RUN_CONFIG)
    found = re.search(r"fingerprint ([0-9a-f]{64})", text.partition("\n")[0])
    if found is None or found.group(1) != config.fingerprint:
        raise ConfigError(
            f"cannot resume in {path}: it holds a run of a different config "
            f"({_difference(text, config)}); choose another --out, or replace that run with "
            "--overwrite"
        )
    if not (path / "summary.json").exists():
        return None
    text = _read_run_file(path, "summary.json")
    try:
        summary = json.loads(text)
    except json.JSONDecodeError as err:
        summary = f"is not JSON ({err.msg} at line {err.lineno}, column {err.colno})"
    if not isinstance(summary, dict):
        problem = summary if isinstance(summary, str) else "is not a JSON object"
        raise ConfigError(
            f"cannot resume in {path}: its summary.json {problem}, so the run is damaged; "
            f"remove {path / 'summary.json'} to compute it again, or choose another --out"
        )
    return summary


# ----- names: of a run, and of the options in errors ---------------------------------------
_RUN_NAME_LINE = re.compile(r"# run of config (.+)$")
_HEADER_START = "# gdlr resolved config; fingerprint "


def run_name(config: Config) -> str:
    """The name of ``config``'s run, which names its default folder ``runs/<name>``.

    The config's own name (its file's stem), except for a ``config.yaml`` that a run saved
    (its first line ``# gdlr resolved config; fingerprint ...``): then the name of that run's
    config, from its second line ``# run of config NAME`` (for a file saved before that line,
    the name of the folder holding it). So ``gdlr run runs/two_neuron/config.yaml`` is a run
    of ``two_neuron`` again, into ``runs/two_neuron-2``, not a run named ``config``.
    """
    source = config.source
    if source is None or source.name != _RUN_CONFIG:
        return config.name
    try:
        with open(source, "rb") as handle:
            first, second = (handle.readline(400).decode("utf-8", "replace") for _ in range(2))
    except OSError:
        return config.name
    if not first.startswith(_HEADER_START):
        return config.name
    found = _RUN_NAME_LINE.match(second.rstrip("\n"))
    name = found.group(1).strip() if found else source.resolve().parent.name
    return name if name and "/" not in name and name not in (".", "..") else config.name


_CLI_NAMES: contextvars.ContextVar[bool] = contextvars.ContextVar("gdlr_cli_names", default=False)
# the command-line flags of run_config's keywords, as messages spell them, and their keywords
_KEYWORD_NAMES = (
    (re.compile(r"another --out\b"), "another out folder"),
    (re.compile(r"--out\b ?"), "out="),
    (re.compile(r"--overwrite\b"), "overwrite=True"),
    (re.compile(r"--resume\b"), "resume=True"),
)


@contextlib.contextmanager
def command_line_names() -> Any:
    """Within it, the errors of :func:`run_config` and :func:`plan_run` name ``gdlr run``'s
    flags (``--overwrite``, ``--out DIR``), as the command line wants; outside it, the
    Python keywords (``overwrite=True``, ``out=DIR``)."""
    token = _CLI_NAMES.set(True)
    try:
        yield
    finally:
        _CLI_NAMES.reset(token)


def _naming_keywords(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, its ``ConfigError`` messages naming Python keywords instead of flags
    (unless within :func:`command_line_names`); the error keeps its type and key."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except ConfigError as err:
            if not _CLI_NAMES.get() and err.args and isinstance(err.args[0], str):
                message = err.args[0]
                for flag, keyword in _KEYWORD_NAMES:
                    message = flag.sub(keyword, message)
                err.args = (message, *err.args[1:])
            raise

    return wrapper


@_naming_keywords
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
        out: the output folder (default ``runs_dir / <name>``, numbered if taken; the name
            is :func:`run_name`: the config's, or for a saved ``config.yaml`` its run's).
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
            ``resume``, on a folder holding another config's run. The message names this
            function's keywords (``overwrite=True``), ``gdlr run`` its flags (``--overwrite``).
        RunInterrupted: on ``KeyboardInterrupt`` during the experiment (the saved chunks are
            kept).
    """
    stream = sys.stdout if stream is None else stream
    config = dataclasses.replace(config, name=run_name(config))
    experiment = get_experiment(config.experiment)
    start = time.perf_counter()
    planned = experiment.plan(config.params)  # before any folder or compute
    fingerprint = config.fingerprint
    resuming = False

    def prepare() -> RunOutput | pathlib.Path:
        """The output folder, checked and emptied or resumed, with ``config.yaml``; or the
        folder of the finished run of this config when resuming it."""
        nonlocal resuming
        path = output_dir_for(
            config.name, out, overwrite=overwrite, runs_dir=runs_dir, resume=resume
        )
        resuming = resume and (path / _RUN_CONFIG).is_file()
        if resume and _previous_run(path, config) is not None:
            return path
        if overwrite and path.is_dir() and not _is_empty_dir(path):
            _remove_previous_run(path, out)  # the new run's plan has passed
        output = RunOutput(path)
        output.write_text(
            _RUN_CONFIG,
            f"# gdlr resolved config; fingerprint {fingerprint}\n# run of config {config.name}\n"
            + config.to_yaml(),
        )
        return output

    # Under jax.distributed every process runs this function; process 0 owns the folder.
    group = ProcessGroup("run") if jax.process_count() > 1 else None
    prepared = prepare() if group is None else _shared_output(group, fingerprint, prepare)
    if isinstance(prepared, pathlib.Path):
        note = f"gdlr: {prepared} holds the finished run of this config; nothing to resume"
        print(note, file=stream)
        return RunOutcome(prepared, _previous_run(prepared, config))
    output, path = prepared, prepared.path
    if group is not None and group.index > 0:
        progress = False  # one set of progress bars: process 0's
    if resuming:
        print(f"gdlr: resuming {config.name} ({config.experiment}) in {path}", file=stream)
    else:
        print(f"gdlr: running {config.name} ({config.experiment}) into {path}", file=stream)
    try:
        report = experiment.run(config.params, planned, output, progress=progress)
    except RunWriteError:
        raise
    except ConfigError:  # a config found impossible while computing: leave no partial run
        output.remove()
        raise
    except KeyboardInterrupt:
        raise RunInterrupted(path) from None
    except OSError as err:  # a checkpoint that could not be written (a full disk, ...)
        raise RunWriteError(path, err) from None
    if group is not None:
        group.barrier("run-done", FINISH_TIMEOUT_S)  # every process has read every chunk
        if group.index > 0:
            print(f"gdlr: process {group.index} of {group.count} done; process 0 writes "
                  f"the results to {path}", file=stream)
            return RunOutcome(path, {})
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
        "files": list(dict.fromkeys([RUN_MARKER, *output.files, "summary.json"])),
        "table": {  # what is printed at the end (gdlr show prints it again)
            "headers": list(report.headers),
            "rows": [list(row) for row in report.rows],
            "notes": list(report.notes),
        },
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
