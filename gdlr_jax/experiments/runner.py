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
import hashlib
import io
import json
import os
import pathlib
import re
import secrets
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, NamedTuple

import jax
import numpy as np
import yaml
from tqdm.auto import tqdm

from gdlr_jax._version import __version__
from gdlr_jax.engine._checkpoint import write_atomically
from gdlr_jax.engine._distributed import FINISH_TIMEOUT_S, ProcessGroup
from gdlr_jax.engine._memory import host_available_bytes, readable_size
from gdlr_jax.experiments.config import Config, ConfigError, get_experiment, read_yaml

#: the config that ``gdlr run`` runs when none is named.
DEFAULT_CONFIG = "two_neuron"
#: where default output folders go, relative to the working directory.
RUNS_DIR = pathlib.Path("runs")
#: the marker file of a run folder (:class:`RunOutput`): what ``--overwrite`` recognises.
RUN_MARKER = ".gdlr-run"
_MARKER_FORMAT = 1
_RUN_CONFIG = "config.yaml"
_CHECKPOINTS = "checkpoints"


class RunWriteError(ConfigError):
    """A file of the run could not be written (a full disk, a quota, a read-only mount).

    The files and chunks written so far are kept: once there is room, ``--resume``
    continues the run.
    """

    def __init__(self, path: pathlib.Path, err: OSError):
        super().__init__(
            f"cannot write into the output folder {path}: {err.strerror or err}"
            + (f" ({err.filename})" if err.filename else "")
            + "; the finished chunks are kept: make room, then resume with --resume"
        )


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


# ----- the output folder --------------------------------------------------------------------
def _is_empty_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


_LEGACY_HEADER = re.compile(r"# gdlr resolved config; fingerprint [0-9a-f]{64}$")
_CHUNK_ENTRY = re.compile(r"sweep\.json|chunk-\d{5}\.npz|\.(sweep\.json|chunk-\d{5}\.npz)\..+\.tmp")


def _marker_fingerprint(fields: Mapping[str, Any]) -> str:
    """sha256 of a marker's fields (all but ``fingerprint``): a marker gdlr wrote, unedited."""
    payload = {k: v for k, v in fields.items() if k != "fingerprint"}
    text = "gdlr run folder\0" + json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _read_marker(path: pathlib.Path) -> dict | None:
    """The marker of the run folder ``path`` (:data:`RUN_MARKER`): ``None`` when there is
    none, raises ``ValueError`` when it is not one gdlr wrote (unreadable, edited, a link)."""
    marker = path / RUN_MARKER
    if not marker.exists() and not marker.is_symlink():
        return None
    if marker.is_symlink() or not marker.is_file():
        raise ValueError(f"{marker} is not a plain file")
    if marker.stat().st_size > 1 << 20:
        raise ValueError(f"{marker} is larger than 1 MiB")
    try:
        fields = json.loads(marker.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{marker} is not JSON ({err})") from None
    files = fields.get("files") if isinstance(fields, dict) else None
    if (
        not isinstance(fields, dict)
        or fields.get("format") != _MARKER_FORMAT
        or not isinstance(files, list)
        or not all(isinstance(f, str) and f not in ("", ".", "..") and "/" not in f for f in files)
        or fields.get("fingerprint") != _marker_fingerprint(fields)
    ):
        raise ValueError(f"{marker} was not written by this gdlr (or was edited)")
    return fields


def _foreign_entries(path: pathlib.Path, marker: Mapping[str, Any]) -> list[str]:
    """The entries of the run folder ``path`` that gdlr did not write: anything but the
    marker, the files it lists, their temporary files and the checkpoint folders (which hold
    only ``sweep.json``, chunk files and their temporary files). Links count as foreign."""
    ours = {RUN_MARKER, *marker["files"]}
    foreign = []
    for entry in sorted(path.iterdir()):
        name = entry.name
        if entry.is_symlink():
            foreign.append(name)
        elif name == _CHECKPOINTS and entry.is_dir():
            for sweep in sorted(entry.iterdir()):
                if sweep.is_symlink() or not sweep.is_dir():
                    foreign.append(f"{name}/{sweep.name}")
                    continue
                foreign += [
                    f"{name}/{sweep.name}/{f.name}"
                    for f in sorted(sweep.iterdir())
                    if f.is_symlink() or not f.is_file() or not _CHUNK_ENTRY.fullmatch(f.name)
                ]
        elif not entry.is_file() or not any(
            name == own or (name.startswith(f".{own}.") and name.endswith(".tmp"))
            for own in ours
        ):
            foreign.append(name)
    return foreign


def _check_removable(path: pathlib.Path, out: Any) -> None:
    """Checks that ``--overwrite`` may empty ``path``: a folder gdlr made for a run (its
    marker :data:`RUN_MARKER`, with a valid fingerprint), holding nothing gdlr did not write,
    not a link, not the current directory nor a folder above it.

    Raises:
        ConfigError: in one line saying why not (nothing is touched).
    """
    shown = str(out) if out is not None else str(path)
    if path.is_symlink():
        raise ConfigError(
            f"--out {shown} is a symbolic link; --overwrite does not delete through links: "
            "name the folder itself, or choose another --out"
        )
    here = pathlib.Path.cwd().resolve()
    resolved = path.resolve()
    if resolved == here or resolved in here.parents:
        raise ConfigError(
            f"--out {shown} is the current directory or a folder above it; --overwrite never "
            "deletes it: choose another --out"
        )
    try:
        marker = _read_marker(path)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"output folder {shown}: its run marker {RUN_MARKER} cannot be trusted ({err}); "
            "refusing to delete it with --overwrite: remove it by hand "
            f"(rm -r {shlex.quote(shown)}) if it is a run you no longer need, or choose another "
            "--out"
        ) from None
    if marker is None:
        config = path / _RUN_CONFIG
        legacy = False
        if config.is_file() and not config.is_symlink():
            with open(config, "rb") as handle:
                first = handle.readline(200).decode("utf-8", "replace").rstrip("\n")
            legacy = _LEGACY_HEADER.match(first) is not None
        if legacy:
            raise ConfigError(
                f"output folder {shown} holds a run of an older gdlr, without the run marker "
                f"{RUN_MARKER}; --overwrite deletes only folders that carry it: remove it by "
                f"hand (rm -r {shlex.quote(shown)}) if you no longer need it, or choose another "
                "--out"
            )
        raise ConfigError(
            f"output folder {shown} is not empty and was not made by gdlr (no {RUN_MARKER}); "
            "refusing to delete it with --overwrite: choose another --out"
        )
    foreign = _foreign_entries(path, marker)
    if foreign:
        listed = ", ".join(repr(f) for f in foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise ConfigError(
            f"output folder {shown} holds files gdlr did not write ({listed}); refusing to "
            "delete it with --overwrite: move them out, or choose another --out"
        )


def _remove_previous_run(path: pathlib.Path, out: Any) -> None:
    """Empties the run folder ``path`` for ``--overwrite`` (checked again just before):
    deletes the files its marker lists, their temporary files and the checkpoints, then the
    marker; the folder itself is kept."""
    _check_removable(path, out)
    try:
        for entry in sorted(path.iterdir()):
            if entry.name == _CHECKPOINTS:
                shutil.rmtree(entry)
            elif entry.name != RUN_MARKER:
                entry.unlink()
        (path / RUN_MARKER).unlink()
    except OSError as err:
        raise ConfigError(
            f"cannot empty the output folder {out if out is not None else path} for "
            f"--overwrite: {err.strerror or err} ({err.filename}); choose another --out"
        ) from None


def _checked_out(out: str | os.PathLike) -> pathlib.Path:
    if not str(os.fspath(out)).strip():
        raise ConfigError("--out '': an empty path; name the output folder")
    return pathlib.Path(out)


def output_dir_for(
    config_name: str,
    out: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    runs_dir: str | os.PathLike = RUNS_DIR,
    resume: bool = False,
) -> pathlib.Path:
    """The folder a run writes to, checked; touches nothing (``gdlr run --dry-run`` calls it).

    Never a folder holding a previous run unless ``overwrite`` or ``resume``. With
    ``overwrite`` the folder is only *checked* here (:func:`run_config` empties it once the
    new run's plan has passed): it must be a folder gdlr made (its marker
    :data:`RUN_MARKER` with a valid fingerprint), hold nothing gdlr did not write, and be
    neither a link nor the current directory or a folder above it.

    Args:
        config_name: the config's name.
        out: an explicit folder (``--out``); default ``runs_dir / config_name``.
        overwrite: the previous run in the chosen folder is to be replaced.
        runs_dir: the parent of default folders.
        resume: the folder to continue a run in: ``out``, or ``runs_dir / config_name``
            itself (never a numbered one), whatever it holds (:func:`run_config` checks it).

    Returns:
        A path that does not exist yet or is an empty folder, or with ``overwrite`` a
        previous run that may be replaced; with ``resume``, the folder.

    Raises:
        ConfigError: when ``out`` is ``""`` or a file, or is a non-empty folder without
            ``overwrite`` or ``resume``, when ``overwrite`` may not replace it (above), or
            when both ``overwrite`` and ``resume`` are given.
    """
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume exclude each other: choose one")
    path = pathlib.Path(runs_dir) / config_name if out is None else _checked_out(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path}: exists and is not a folder")
    if resume or not path.exists() or _is_empty_dir(path):
        return path
    if overwrite:
        _check_removable(path, out)
        return path
    if out is not None:
        raise ConfigError(
            f"output folder {path} already exists and is not empty; pass --overwrite "
            "to replace the run in it, or choose another --out"
        )
    n = 2
    while (candidate := path.with_name(f"{path.name}-{n}")).exists() and not _is_empty_dir(
        candidate
    ):
        n += 1
    return candidate


class RunOutput:
    """The output folder of one run: every file of a run is written through it, atomically.

    The folder carries the marker :data:`RUN_MARKER` (JSON: a format number, the gdlr_jax
    version, a random token, the names of the files written, and a sha256 fingerprint of
    those fields), written before any other file and updated before each new one: it is how
    ``--overwrite`` recognises a folder gdlr made, and the list of what it may delete.

    Args:
        path: the folder (created if missing); a marker already there (a resumed run) is
            kept and extended.

    Attributes:
        files: names of the files written so far, in order (the marker's list).

    Raises:
        ConfigError: when the folder cannot be created or written to (nothing is left behind).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(
                f"cannot create the output folder {self.path}: {err.strerror or err}; "
                "choose another --out"
            ) from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            if self._created:
                self.path.rmdir()
            raise ConfigError(f"output folder {self.path} is not writable; choose another --out")
        try:
            marker = _read_marker(self.path)
        except (OSError, ValueError):
            marker = None
        if marker is None:
            marker = {
                "format": _MARKER_FORMAT,
                "gdlr_jax": __version__,
                "token": secrets.token_hex(16),
                "files": [],
            }
        self._marker = marker
        self.files: list[str] = list(marker["files"])
        self._write_marker()

    def _write_marker(self) -> None:
        fields = {**self._marker, "files": list(self.files)}
        fields["fingerprint"] = _marker_fingerprint(fields)
        text = json.dumps(fields, indent=2) + "\n"
        try:
            write_atomically(self.path / RUN_MARKER, lambda handle: handle.write(text.encode()))
        except OSError as err:
            raise RunWriteError(self.path, err) from None

    def _write(self, name: str, write: Callable[[IO[bytes]], None]) -> pathlib.Path:
        if name not in self.files:  # listed in the marker before it exists
            self.files.append(name)
            self._write_marker()
        try:
            return write_atomically(self.path / name, write)
        except OSError as err:
            raise RunWriteError(self.path, err) from None

    def checkpoint_dir(self, sweep: str) -> pathlib.Path:
        """The checkpoint folder of the sweep named ``sweep`` (``checkpoints/<sweep>``), for
        ``gdlr_jax.sweep(..., checkpoint_dir=...)``."""
        return self.path / _CHECKPOINTS / sweep

    def remove_checkpoints(self) -> None:
        """Deletes the checkpoint folders (once the run's results are written)."""
        shutil.rmtree(self.path / _CHECKPOINTS, ignore_errors=True)

    def remove(self) -> None:
        """Deletes the files written so far, the checkpoints and the marker, and the folder
        if this :class:`RunOutput` created it and that leaves it empty."""
        for name in self.files:
            (self.path / name).unlink(missing_ok=True)
        self.files.clear()
        self.remove_checkpoints()
        (self.path / RUN_MARKER).unlink(missing_ok=True)
        if self._created and _is_empty_dir(self.path):
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


class _SharedRunOutput(RunOutput):
    """The output folder as a process other than 0 of a ``jax.distributed`` run sees it: its
    sweeps save their chunks in ``checkpoints/`` (through :func:`gdlr_jax.sweep`); every other
    file is written by process 0 alone, so here writing a file does nothing."""

    def __init__(self, path: pathlib.Path):  # the folder process 0 made; nothing is written
        self.path = path
        self._created = False
        self.files = []

    def _write(self, name: str, write: Callable[[IO[bytes]], None]) -> pathlib.Path:
        return self.path / name

    def save_figure(self, fig: Any, stem: str, *, dpi: float) -> list[pathlib.Path]:
        return [self.path / f"{stem}.{fmt}" for fmt in ("png", "pdf")]

    def remove_checkpoints(self) -> None:
        pass

    def remove(self) -> None:
        pass


def _shared_output(
    group: ProcessGroup, fingerprint: str, prepare: Callable[[], RunOutput | pathlib.Path]
) -> RunOutput | pathlib.Path:
    """The output folder of a ``jax.distributed`` run, the same for every process.

    Every process must run the config of ``fingerprint`` (else every process refuses, before
    any compute); process 0 prepares the folder (``prepare``: checks, removal, ``config.yaml``);
    every process then gets it: a :class:`RunOutput` on process 0, a
    :class:`_SharedRunOutput` elsewhere, or a path when process 0 found the run finished.
    An error of process 0 is raised by every process; a folder that another process cannot
    see is refused by every process (and process 0 removes what it wrote there)."""
    prints = group.all_gather("config", fingerprint)
    differ = [p for p in range(group.count) if prints[p] != prints[0]]
    if differ:
        raise ConfigError(
            f"the processes of this jax.distributed run have different configs: process "
            f"{differ[0]} (and {len(differ) - 1} more) has fingerprint "
            f"{prints[differ[0]][:12]}..., process 0 {prints[0][:12]}...; start every process "
            "with the same config and --set"
        )
    if group.index == 0:
        try:
            prepared = prepare()
        except ConfigError as err:
            group.broadcast("folder", json.dumps({"error": str(err)}))
            raise
        path = prepared if isinstance(prepared, pathlib.Path) else prepared.path
        finished = isinstance(prepared, pathlib.Path)
        group.broadcast("folder", json.dumps({"path": str(path), "finished": finished}))
    else:
        message = json.loads(group.broadcast("folder", ""))
        if "error" in message:
            raise ConfigError(message["error"])
        path, finished = pathlib.Path(message["path"]), message["finished"]
        prepared = path if finished else _SharedRunOutput(path)
    seen = group.all_gather("seen", "1" if (path / RUN_MARKER).is_file() else "0")
    blind = [p for p in range(group.count) if seen[p] != "1"]
    if blind:
        if group.index == 0 and isinstance(prepared, RunOutput):
            prepared.remove()
        raise ConfigError(
            f"output folder {path} is not shared between the processes of this "
            f"jax.distributed run: process {blind[0]} (and {len(blind) - 1} more) does not see "
            "it; give every process the same --out on a shared file system"
        )
    return prepared


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
