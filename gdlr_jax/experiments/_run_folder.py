"""The output folder of a run (layer 5): its marker, the checks before anything in it is
replaced or resumed, and :class:`RunOutput`, the single place that writes a run's files, each
atomically; under ``jax.distributed`` the folder process 0 owns and the others share. The layout
of a run folder is described in :mod:`gdlr_jax.experiments.runner`."""


from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import re
import secrets
import shlex
import shutil
from collections.abc import Callable, Mapping
from typing import IO, Any

import numpy as np

from gdlr_jax._version import __version__
from gdlr_jax.engine._checkpoint import write_atomically
from gdlr_jax.engine._distributed import ProcessGroup
from gdlr_jax.experiments.config import ConfigError

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


# ----- the output folder --------------------------------------------------------------------
def _is_empty_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


_LEGACY_HEADER = re.compile(r"# gdlr resolved config; fingerprint [0-9a-f]{64}$")
# estimate.npz: a depth's finished estimate (experiments/critical_step_size.py)
_CHUNK_ENTRY = re.compile(
    r"sweep\.json|chunk-\d{5}\.npz|estimate\.npz"
    r"|\.(sweep\.json|chunk-\d{5}\.npz|estimate\.npz)\..+\.tmp"
)


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
    only ``sweep.json``, chunk files, an ``estimate.npz`` and their temporary files). Links
    count as foreign."""
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


