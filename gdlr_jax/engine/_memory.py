"""Memory of a sweep, estimated before any compute: device memory of a chunk, host memory
of the results, and the errors that say how to reduce them (layer 4: engine; the formulas are
in ``docs/engine.md``)."""

from __future__ import annotations

import gc
import math
import pathlib
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import psutil

from gdlr_jax.curvature._lanczos import state_dtype
from gdlr_jax.engine._minibatches import Minibatches
from gdlr_jax.engine._problem import EngineConfig, transform
from gdlr_jax.problems._pytree import PyTree


def tree_bytes(tree: PyTree) -> int:
    """Bytes of the leaves of a pytree of arrays or ``jax.ShapeDtypeStruct`` s."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def one_trajectory(params: PyTree) -> PyTree:
    """The shapes of one initialisation: ``params`` leaves without their leading axis."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params)


def bytes_per_trajectory(
    config: EngineConfig, params: PyTree, source: Minibatches | None
) -> int:
    """Rough device memory of one trajectory (lane) of a chunk, in bytes.

    Parameters are held about six times (iterate, rollback copy, step, gradient, the
    gradient kept from the evaluation), the optimiser state twice, plus the final-window
    history, the recordings and, with per-initialisation batches, a shuffle and a batch,
    with sharpness tracking the Lanczos basis, and with the Lyapunov exponent the snapshot at
    ``steps - lyapunov_steps``, the tangent replay (iterate, tangent, their JVP: about four
    copies) and the Lanczos basis of the fixed points. Activations of ``loss_fn`` are not
    counted: lower the budget for large models.
    """
    single = one_trajectory(params)
    param_bytes = tree_bytes(single)
    opt_bytes = 0
    if config.optimizer is not None:
        opt_bytes = tree_bytes(
            jax.eval_shape(
                lambda p: transform(config.optimizer, jnp.ones((), jnp.float32)).init(p), single
            )
        )
    scalar = np.dtype(jax.tree_util.tree_leaves(single)[0].dtype).itemsize
    total = (6 + config.window) * param_bytes + 2 * opt_bytes + 16 * scalar
    total += config.num_records * (2 * scalar + (param_bytes if config.record_params else 0))
    if config.sharpness_every is not None:  # Lanczos basis, warm start, recordings
        state = np.dtype(state_dtype()).itemsize
        num_params = param_bytes // scalar
        total += (config.sharpness_iterations + 3) * num_params * state
        total += config.num_sharpness * scalar
    if config.lyapunov_steps:  # snapshot, tangent replay, fixed-point Lanczos, exponent
        state = np.dtype(state_dtype()).itemsize
        num_params = param_bytes // scalar
        total += 5 * param_bytes + (config.sharpness_iterations + 3) * num_params * state
        total += scalar
    if source is not None and not config.same_batches:
        example_bytes = sum(
            math.prod(x.shape[1:]) * x.dtype.itemsize
            for x in jax.tree_util.tree_leaves(source.data)
        )
        total += 4 * source.num_examples + source.batch_size * example_bytes
    return int(total)


def result_bytes_per_trajectory(config: EngineConfig, params: PyTree) -> int:
    """Host memory of one trajectory's results in a :class:`SweepResult`, in bytes: the
    per-trajectory fields, the final parameters and the recordings."""
    param_bytes = tree_bytes(one_trajectory(params))
    scalar = np.dtype(jax.tree_util.tree_leaves(params)[0].dtype).itemsize
    total = 3 * 4 + 4 * scalar + param_bytes  # status, steps, period; losses and norms
    total += config.num_records * (2 * scalar + (param_bytes if config.record_params else 0))
    if config.sharpness_every is not None:
        total += (config.num_sharpness + 1) * scalar
    if config.lyapunov_steps:
        total += scalar
    return int(total)


class ChunkMemoryError(ValueError):
    """A chunk of a sweep, or one trajectory, needs more memory than a device can allocate.

    Raised by :func:`plan_sweep` before any compute; a ``ValueError`` like every bad argument.

    Attributes:
        per_trajectory: the estimated bytes of one trajectory.
        limit: the bytes one device can allocate.
        fit: the largest ``chunk_size`` that fits (0: not even one trajectory per device).
    """

    def __init__(self, message: str, *, per_trajectory: int, limit: int, fit: int):
        super().__init__(message)
        self.per_trajectory, self.limit, self.fit = per_trajectory, limit, fit


class HostMemoryError(ValueError):
    """The grid and results of a sweep need more host memory than is available.

    Raised by :func:`plan_sweep` before any compute; a ``ValueError`` like every bad argument.

    Attributes:
        needed: the estimated peak host bytes of the sweep (:attr:`SweepPlan.peak_host_bytes`).
        limit: the host's available bytes.
        per_trajectory: the estimated host bytes of one trajectory's results.
        fit: the most trajectories whose results fit beside the rest (0: none).
    """

    def __init__(self, message: str, *, needed: int, limit: int, per_trajectory: int, fit: int):
        super().__init__(message)
        self.needed, self.limit = needed, limit
        self.per_trajectory, self.fit = per_trajectory, fit


def host_available_bytes() -> int | None:
    """The host memory available to new allocations without swapping:
    ``psutil.virtual_memory().available`` (Linux ``MemAvailable``; macOS and Windows their
    own estimate); ``None`` when the platform does not report it."""
    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError, NotImplementedError):
        return None


#: Above this share of the kernel's limit on a process's memory mappings, the compiled programs
#: JAX keeps are released before a sweep compiles another (:func:`release_compiled_programs`).
MAPPINGS_SHARE = 0.75


def memory_mappings() -> tuple[int, int] | None:
    """``(held, limit)``: the memory mappings this process holds (lines of
    ``/proc/self/maps``) and the kernel's limit ``vm.max_map_count``; ``None`` off Linux.

    XLA:CPU places each compiled program's kernels in mappings of their own (code, constants,
    data: ~250 for one sweep's program), and JAX keeps up to 8192 programs alive; a process
    that compiles a few hundred sweeps reaches the default limit of 65530, and the next
    compile fails inside LLVM ("Cannot allocate memory") with a segmentation fault."""
    try:
        limit = int(pathlib.Path("/proc/sys/vm/max_map_count").read_text())
        with open("/proc/self/maps", "rb") as maps:
            held = sum(1 for _ in maps)
    except (OSError, ValueError):
        return None
    return held, limit


def release_compiled_programs(share: float = MAPPINGS_SHARE, *, warn: bool = True) -> bool:
    """Frees JAX's compiled programs (``jax.clear_caches()``) when this process holds more
    than ``share`` of the kernel's memory mappings (:func:`memory_mappings`): what is
    compiled again costs a compile, where the next compile would crash the process. Returns
    whether it released them; warns that it did unless ``warn`` is false."""
    mappings = memory_mappings()
    if mappings is None or mappings[0] <= share * mappings[1]:
        return False
    jax.clear_caches()
    gc.collect()
    if warn:
        after = memory_mappings()
        warnings.warn(
            f"gdlr_jax: this process held {mappings[0]} of the kernel's {mappings[1]} memory "
            f"mappings (vm.max_map_count), mostly XLA's compiled programs; released them with "
            f"jax.clear_caches() ({after[0] if after else '?'} held now) so that the next "
            "compile does not crash. Raise vm.max_map_count to keep them.",
            RuntimeWarning,
            stacklevel=3,
        )
    return True


def allocatable_bytes(device: jax.Device) -> int | None:
    """What ``device`` can allocate: its allocator's ``bytes_limit`` where it reports one (GPU,
    TPU), else for a CPU device :func:`host_available_bytes`; ``None`` when unknown."""
    stats = device.memory_stats()
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return host_available_bytes() if device.platform == "cpu" else None


DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes per CPU device, and the least on an accelerator
ACCELERATOR_MEMORY_SHARE = 4  # an accelerator's default budget: 1/4 of what it can allocate


def default_memory_budget(devices: Sequence[jax.Device]) -> int:
    """The default ``memory_budget_bytes``: 1 GiB per device on CPU (cache-sized chunks are
    capped lower anyway); on GPU and TPU a quarter of the least any of ``devices`` can
    allocate (the activations of ``loss_fn`` are not in the estimate), at least 1 GiB."""
    if all(d.platform == "cpu" for d in devices):
        return DEFAULT_MEMORY_BUDGET
    limits = [b for b in map(allocatable_bytes, devices) if b is not None]
    if not limits:
        return DEFAULT_MEMORY_BUDGET
    return max(DEFAULT_MEMORY_BUDGET, min(limits) // ACCELERATOR_MEMORY_SHARE)


def readable_size(num_bytes: float) -> str:
    """``num_bytes`` in the largest binary unit it reaches (``"1.5 GiB"``)."""
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if num_bytes >= 1 << shift:
            return f"{num_bytes / 2**shift:.3g} {unit}"
    return f"{int(num_bytes)} B"


def check_chunk_memory(
    per_trajectory: int,
    chunk_size: int,
    devices: Sequence[jax.Device],
    requested: int | None,
    memory_budget_bytes: int,
) -> None:
    """Raises :class:`ChunkMemoryError` when a device's share of a chunk does not fit.

    A device runs ``m = chunk_size / n_dev`` lanes of about ``per_trajectory`` bytes each
    (:func:`bytes_per_trajectory`); ``m * per_trajectory`` must not exceed
    :func:`allocatable_bytes` of any device (CPU devices share the host's memory, so each
    gets ``1 / n_dev`` of it). ``requested`` is the ``chunk_size`` argument (``None``: sized
    from ``memory_budget_bytes``); the message says which one to lower, and to what.
    """
    n_dev = len(devices)
    if all(d.platform == "cpu" for d in devices):
        host = allocatable_bytes(devices[0])
        limits = [] if host is None else [host // n_dev]
    else:
        limits = [b for b in map(allocatable_bytes, devices) if b is not None]
    if not limits:
        return
    limit = min(limits)
    lanes = chunk_size // n_dev
    if lanes * per_trajectory <= limit:
        return
    fit = limit // per_trajectory * n_dev
    sizes = dict(per_trajectory=per_trajectory, limit=limit, fit=fit)
    one, available = readable_size(per_trajectory), readable_size(limit)
    if fit == 0:
        raise ChunkMemoryError(
            f"one trajectory needs about {one} (an estimate: parameters, final window, "
            f"recordings), more than the {available} a {devices[0].platform} "
            "device can allocate: record less (record_every, record_params), take fewer "
            "steps or use a smaller model.",
            **sizes,
        )
    given = (
        f"chunk_size = {requested}"
        if requested is not None
        else f"memory_budget_bytes = {memory_budget_bytes}"
    )
    how = (
        f"pass chunk_size <= {fit}, or chunk_size=None to size chunks from memory_budget_bytes"
        if requested is not None
        else f"pass memory_budget_bytes <= {limit} or chunk_size <= {fit}"
    )
    raise ChunkMemoryError(
        f"{given}: {lanes} trajectories per device need about "
        f"{readable_size(lanes * per_trajectory)} ({one} each, an estimate), more than the "
        f"{available} a {devices[0].platform} device can allocate; {how}.",
        **sizes,
    )


def check_host_memory(peak: int, per_trajectory: int, total: int) -> None:
    """Raises :class:`HostMemoryError` when ``peak`` bytes exceed
    :func:`host_available_bytes`; ``total`` trajectories of ``per_trajectory`` bytes each
    are part of it, and the message says how many would fit."""
    limit = host_available_bytes()
    if limit is None or peak <= limit:
        return
    fit = max(0, (limit - (peak - total * per_trajectory)) // per_trajectory)
    how = (
        f"sweep at most {fit} trajectories per call (fewer step sizes or initialisations)"
        if fit
        else "shrink the grid of initialisations or the data"
    )
    raise HostMemoryError(
        f"the sweep needs about {readable_size(peak)} of host memory (the results of {total} "
        f"trajectories, {readable_size(per_trajectory)} each, with parameters, data and a "
        f"chunk; an estimate), more than the {readable_size(limit)} available: {how}, or "
        "record less (record_every, record_params).",
        needed=peak,
        limit=limit,
        per_trajectory=per_trajectory,
        fit=fit,
    )
