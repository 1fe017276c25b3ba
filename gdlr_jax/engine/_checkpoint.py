"""Finished chunks of a sweep saved to a folder, so that an interrupted sweep resumes (layer 4).

A checkpoint folder of one sweep holds

* ``sweep.json``: the sweep's fingerprint (:func:`sweep_fingerprint`), written before any
  chunk; a folder is only ever resumed by a sweep with the same fingerprint;
* ``chunk-00000.npz``, ``chunk-00001.npz``, ...: the :class:`~gdlr_jax.SweepChunk` of each
  finished chunk of the plan, every field flattened to its leaves.

Every file is written atomically (:func:`write_atomically`: a temporary file in the same
folder, flushed and fsynced, then renamed over the target), so a crash or a kill at any moment
leaves either the complete file or none. A chunk file that cannot be read back or does not
match the plan (bounds, fields, dtypes, shapes, status codes, step counts) is reported with a
warning and recomputed, never used. A folder that cannot hold chunks (``checkpoints`` a file,
a chunk path a folder, a ``sweep.json`` of another schema) is refused in one line.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from typing import IO, Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from gdlr_jax._version import __version__
from gdlr_jax.engine._plan import SweepPlan
from gdlr_jax.engine._results import SweepChunk
from gdlr_jax.engine._sharding import run_sharded
from gdlr_jax.engine._trajectory_status import TrajectoryStatus
from gdlr_jax.problems._pytree import PyTree

_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FORMAT = 1  # version of the layout of sweep.json and of the chunk files
_LAYOUT = "__layout__"  # the npz entry describing the fields of a chunk file
#: engine options and chunk fields added after checkpoints were first written: an option at
#: its default is left out of the fingerprint and a field missing from a file is None, so
#: those checkpoints still resume
_ADDED_FIELDS = frozenset(
    {"stop_at_convergence", "converged_at", "lyapunov_steps", "lyapunov_exponent"}
)
#: engine options that change how fast the chunks are computed, never their values (the step
#: loop's block length and the packing of its columns: ``tests/engine/test_sweep_layouts.py``
#: checks results bit for bit across their values), so a folder resumes with any value of
#: them; with an optax optimiser the block length is fingerprinted (its update, unrolled, can
#: round differently: momentum did, in the last bits)
_SPEED_ONLY_FIELDS = frozenset({"step_block", "pack_pairs"})
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # memory addresses in reprs differ run to run
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


class CheckpointMismatchError(ValueError):
    """A checkpoint folder holds chunks of a different sweep, or cannot be used (not a folder,
    a damaged ``sweep.json``, a chunk path that is a folder); the message says what is wrong."""


def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> pathlib.Path:
    """Writes a file all at once or not at all.

    ``write(handle)`` fills a temporary file ``.<name>.*.tmp`` in the same folder, which is
    flushed, fsynced, given the usual permissions (``0666 & ~umask``) and renamed to ``path``
    (``os.replace``: atomic). On any exception (``KeyboardInterrupt`` included) the temporary
    file is removed and ``path`` is left as it was.

    Returns:
        ``path``.
    """
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    return path


# ----- the fingerprint of a sweep ---------------------------------------------------------
def _digest(tree: PyTree) -> str | None:
    """sha256 of a pytree of arrays: its structure, and every leaf's dtype, shape and bytes."""
    if tree is None:
        return None
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    digest = hashlib.sha256(str(treedef).encode())
    for leaf in leaves:
        leaf = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{leaf.dtype.str}{leaf.shape}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


def _describe(value: Any) -> str:
    """A description of a static setting that is the same in every process.

    Functions are named by module and qualified name, ``functools.partial`` objects by their
    function and arguments; other values by ``repr`` (memory addresses removed).
    """
    if isinstance(value, functools.partial):
        args = [_describe(a) for a in value.args]
        args += [f"{k}={_describe(v)}" for k, v in sorted(value.keywords.items())]
        return f"partial({_describe(value.func)}, {', '.join(args)})"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    return _ADDRESS.sub("", repr(value))


def _loss_digest(plan: SweepPlan) -> str:
    """sha256 of the jaxpr of ``loss_fn`` at one initialisation (and one batch) and of its
    constants: a change to the loss (its code or the arrays it closes over) changes it."""
    config = plan._config

    def spec(x: Any, leading: tuple[int, ...]) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(leading + x.shape[1:], x.dtype)

    args = [jax.tree_util.tree_map(lambda x: spec(x, ()), plan._params0)]
    if plan._data is not None:
        args.append(jax.tree_util.tree_map(lambda x: spec(x, (config.batch_size,)), plan._data))
    closed = jax.make_jaxpr(config.loss_fn)(*args)
    digest = hashlib.sha256(_ADDRESS.sub("", str(closed.jaxpr)).encode())
    digest.update((_digest(list(closed.consts)) or "").encode())
    return digest.hexdigest()


@functools.cache
def _engine_source_digest() -> str:
    """sha256 of the source of layers 1-4 (problems, curvature, dynamics, engine): every module
    a sweep's numbers can depend on. The experiments layer is not part of it."""
    digest = hashlib.sha256()
    package = pathlib.Path(__file__).parent.parent
    for layer in ("problems", "curvature", "dynamics", "engine"):
        for path in sorted((package / layer).rglob("*.py")):
            digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def sweep_fingerprint(plan: SweepPlan) -> dict[str, Any]:
    """Everything that determines the chunks of a planned sweep, as a JSON-compatible mapping.

    Two plans with equal fingerprints compute the same chunks, bit for bit on the same
    platform: the grid and its cutting into chunks, sha256 digests of the step sizes, the
    initialisations, the minibatch keys and the data (dtypes, shapes and bytes), of the loss
    (its jaxpr and constants, :func:`_loss_digest`), every static setting of the engine
    (steps, criteria, optimiser, recordings, ...), the platform, the versions of gdlr_jax and
    jax, and a digest of the engine's source (an edited working tree is another code
    version), and the number and kind of the devices: statuses do not depend on them, but
    values of matmul losses differ in the last bits between chunk sizes and device counts
    (``docs/engine.md``), so chunks of different layouts are never mixed. Options that only
    change the speed (``step_block`` without an optimiser, ``pack_pairs``: the chunks are
    bit-identical for every value) are left out, so a folder resumes with another value of
    them.
    """
    config = plan._config
    keys = None if plan._keys is None else jax.random.key_data(plan._keys)
    fingerprint: dict[str, Any] = {
        "gdlr_jax": __version__,
        "engine_source": _engine_source_digest(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "platform": plan._mesh.devices.flat[0].platform,
        "devices": int(plan._mesh.size),
        "device_kind": plan._mesh.devices.flat[0].device_kind,
        "grid_shape": list(plan.grid_shape),
        "chunk_size": plan.chunk_size,
        "etas": _digest(plan._etas),
        "params0": _digest(plan._params0),
        "key": _digest(keys),
        "data": _digest(plan._data),
        "loss_fn": _describe(config.loss_fn),
        "loss_jaxpr": _loss_digest(plan),
    }
    speed_only = _SPEED_ONLY_FIELDS if config.optimizer is None else {"pack_pairs"}
    for field in dataclasses.fields(config):
        if field.name in _ADDED_FIELDS and getattr(config, field.name) == field.default:
            continue  # at its default, a field added later fingerprints like its absence
        if field.name not in speed_only | {"loss_fn"}:
            fingerprint[f"engine.{field.name}"] = _describe(getattr(config, field.name))
    return fingerprint


def _short(value: Any) -> str:
    """A fingerprint entry for a message: digests cut to 12 hex digits."""
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return value[:12] + "..."
    return json.dumps(value)


# ----- the folder -------------------------------------------------------------------------
class ChunkStore:
    """The checkpoint folder of one planned sweep: finished chunks saved and loaded back.

    Opening it creates the folder, writes ``sweep.json`` (the :func:`sweep_fingerprint` of
    ``plan``) or checks the one there, and removes temporary files left by a killed writer.

    Args:
        folder: the checkpoint folder (created if missing).
        plan: the sweep whose chunks it holds.

    Raises:
        CheckpointMismatchError: when ``sweep.json`` holds another fingerprint (the message
            names the entries that differ), cannot be read, or is missing beside chunk files.
    """

    def __init__(self, folder: str | os.PathLike, plan: SweepPlan):
        self.folder = pathlib.Path(folder)
        self._plan = plan
        self._params_treedef = jax.tree_util.tree_structure(plan._params0)
        self._spec: dict[str, Any] | None = None
        advice = f"pass another checkpoint folder, or delete {self.folder} to start over"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CheckpointMismatchError(
                f"checkpoint folder {self.folder} cannot be made: {err.strerror or err}"
                + (f" ({err.filename})" if err.filename else "")
                + f"; {advice}"
            ) from None
        for stale in self.folder.glob(".chunk-*.tmp"):
            if stale.is_file():
                stale.unlink(missing_ok=True)
        fingerprint = sweep_fingerprint(plan)
        meta = self.folder / "sweep.json"
        if not meta.exists():
            if any(self.folder.glob("chunk-*.npz")):
                raise CheckpointMismatchError(
                    f"checkpoint folder {self.folder} holds chunk files but no sweep.json, so "
                    f"they cannot be checked; {advice}"
                )
            text = json.dumps({"format": _FORMAT, "fingerprint": fingerprint}, indent=2) + "\n"
            write_atomically(meta, lambda handle: handle.write(text.encode()))
            return
        try:
            saved = json.loads(meta.read_bytes().decode("utf-8"))
            if not isinstance(saved, dict) or "format" not in saved:
                raise ValueError("not a mapping with a format")
            if saved["format"] != _FORMAT:
                raise ValueError(f"format {saved['format']!r}, expected {_FORMAT}")
            saved = saved.get("fingerprint")
            if not isinstance(saved, dict):
                raise ValueError("its fingerprint is not a mapping")  # noqa: TRY004 - caught
        except (*_UNREADABLE, TypeError) as err:
            raise CheckpointMismatchError(f"cannot read {meta} ({err}); {advice}") from None
        names = dict.fromkeys([*saved, *fingerprint])  # every entry, in order
        differ = [k for k in names if saved.get(k) != fingerprint.get(k)]
        if differ:
            details = "; ".join(
                f"{k}: saved {_short(saved.get(k))}, now {_short(fingerprint.get(k))}"
                for k in differ
            )
            raise CheckpointMismatchError(
                f"checkpoint folder {self.folder} holds chunks of a different sweep ({details}); "
                + advice
            )

    def path(self, index: int) -> pathlib.Path:
        """The file of chunk ``index``."""
        return self.folder / f"chunk-{index:05d}.npz"

    def save(self, index: int, chunk: SweepChunk) -> pathlib.Path:
        """Writes chunk ``index`` atomically: each field's leaves, and a layout naming the
        fields, their structure (``None``, an array or a pytree like the parameters) and the
        chunk's bounds."""
        layout: dict[str, Any] = {"start": chunk.start, "stop": chunk.stop, "fields": {}}
        arrays: dict[str, np.ndarray] = {}
        for name in chunk._fields[2:]:
            value = getattr(chunk, name)
            if value is None:
                layout["fields"][name] = None
                continue
            leaves, treedef = jax.tree_util.tree_flatten(value)
            layout["fields"][name] = str(treedef)
            arrays.update({f"{name}.{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
        arrays[_LAYOUT] = np.array(json.dumps(layout))
        return write_atomically(self.path(index), lambda handle: np.savez(handle, **arrays))

    def load(self, index: int) -> SweepChunk | None:
        """Chunk ``index`` as saved, or ``None`` when it has no file or its file is unusable
        (unreadable, truncated, a field missing, other bounds or lengths than the plan's):
        then a warning names the file and the chunk is to be recomputed."""
        path = self.path(index)
        if not path.exists() and not path.is_symlink():
            return None
        if path.is_dir():
            raise CheckpointMismatchError(
                f"checkpoint {path} is a folder, not a chunk file, so chunk {index} cannot be "
                f"saved; remove it, or pass another checkpoint folder"
            )
        try:
            return self._read(path, self._plan.chunk_bounds(index))
        except (*_UNREADABLE, TypeError) as err:
            warnings.warn(
                f"checkpoint {path} is unusable ({type(err).__name__}: {err}); "
                f"recomputing chunk {index}",
                stacklevel=2,
            )
            return None

    def load_or_run(self, index: int) -> SweepChunk:
        """Chunk ``index`` from its file, or run by the plan and saved."""
        chunk = self.load(index)
        if chunk is None:
            chunk = self._plan.run_chunk(index)
            self.save(index, chunk)
        return chunk

    def _expected(self) -> dict[str, Any]:
        """The chunk fields the plan makes: for each, ``None`` or the ``(dtype, trailing
        shape)`` of each leaf (``jax.eval_shape`` of the kernel, computed once)."""
        if self._spec is None:
            plan = self._plan
            out = jax.eval_shape(
                run_sharded,
                plan._params0,
                plan._device_etas,
                plan._keys,
                plan._data,
                jnp.int32(0),
                config=plan._config,
                mesh=plan._mesh,
                lanes_per_device=plan.chunk_size // plan._mesh.size,
            )
            self._spec = {
                name: None
                if value is None
                else [(np.dtype(x.dtype), x.shape[1:]) for x in jax.tree_util.tree_leaves(value)]
                for name, value in out._asdict().items()
            }
        return self._spec

    def _check_values(self, fields: dict[str, Any]) -> None:
        """Status codes and step counts in their ranges."""
        codes = np.array([int(s) for s in TrajectoryStatus])
        if not np.isin(fields["status"], codes).all():
            raise ValueError(f"field status holds codes outside {codes.tolist()}")
        steps, steps_max = fields["steps_taken"], self._plan._config.steps
        if steps.size and not (0 <= steps.min() and steps.max() <= steps_max):
            raise ValueError(f"field steps_taken holds counts outside 0..{steps_max}")

    def _read(self, path: pathlib.Path, bounds: tuple[int, int]) -> SweepChunk:
        leaf = jax.tree_util.tree_structure(0)
        structures = {str(leaf): leaf, str(self._params_treedef): self._params_treedef}
        with open(path, "rb") as handle:
            data = np.load(handle, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz file")
            layout = json.loads(str(data[_LAYOUT]))
            if (layout["start"], layout["stop"]) != bounds:
                raise ValueError(
                    f"it holds trajectories {layout['start']}..{layout['stop']}, the plan's "
                    f"chunk {bounds[0]}..{bounds[1]}"
                )
            names = SweepChunk._fields[2:]
            for name in _ADDED_FIELDS & set(names):  # files written before it existed: None
                layout["fields"].setdefault(name, None)
            missing = [name for name in names if name not in layout["fields"]]
            unknown = [name for name in layout["fields"] if name not in names]
            if missing or unknown:
                raise ValueError(f"fields missing: {missing}, unknown: {unknown}")
            fields: dict[str, Any] = {}
            for name in names:
                spec = layout["fields"][name]
                if spec is None:
                    fields[name] = None
                    continue
                if spec not in structures:
                    raise ValueError(f"field {name} has an unknown structure {spec}")
                treedef = structures[spec]
                leaves = [data[f"{name}.{i}"] for i in range(treedef.num_leaves)]
                if any(x.shape[:1] != (bounds[1] - bounds[0],) for x in leaves):
                    raise ValueError(f"field {name} does not have {bounds[1] - bounds[0]} rows")
                fields[name] = jax.tree_util.tree_unflatten(treedef, leaves)
        for name, want in self._expected().items():
            value = fields.get(name)
            if (value is None) != (want is None):
                raise ValueError(f"field {name} is {'missing' if value is None else 'not planned'}")
            got = [(x.dtype, x.shape[1:]) for x in jax.tree_util.tree_leaves(value)]
            if value is not None and got != want:
                shown = ", ".join(f"{d} {s}" for d, s in got)
                planned = ", ".join(f"{d} {s}" for d, s in want)
                raise ValueError(f"field {name} holds {shown}, the plan makes {planned}")
        self._check_values(fields)
        return SweepChunk(*bounds, **fields)
