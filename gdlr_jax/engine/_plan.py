"""Planning a sweep: :func:`plan_sweep` validates every argument, sizes the chunks and
checks memory; :class:`SweepPlan` runs one chunk at a time and assembles the result (layer 4:
engine)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, PRNGKeyArray

from gdlr_jax.engine._lanes import LaneResults
from gdlr_jax.engine._memory import (
    bytes_per_trajectory,
    check_chunk_memory,
    check_host_memory,
    default_memory_budget,
    host_available_bytes,
    release_compiled_programs,
    result_bytes_per_trajectory,
    tree_bytes,
)
from gdlr_jax.engine._minibatches import (
    Minibatches,
    as_minibatches,
)
from gdlr_jax.engine._problem import (
    PACK_PAIRS,
    SHARPNESS_ITERATIONS,
    STEP_BLOCK,
    EngineConfig,
    LossFn,
    OptimizerFactory,
)
from gdlr_jax.engine._results import SweepChunk, SweepResult
from gdlr_jax.engine._sharding import LANES, run_sharded
from gdlr_jax.engine._trajectory_status import ConvergenceCriteria
from gdlr_jax.engine._validation import (
    check_cast_criteria,
    check_dtype,
    check_etas,
    check_grid_size,
    check_key,
    check_loss,
    check_lyapunov,
    check_optimizer,
    check_params,
    check_positive_int,
)
from gdlr_jax.problems._pytree import PyTree

# On CPU, chunks of at most this many trajectories per device: the packed state of a small
# model (12 bytes a lane) stays in the cores' L2 caches, and the fixed costs of a chunk (its
# evaluations are ~50 small XLA kernels) are spread over more lanes: 1.4x faster than 16384
# in benchmarks/bench_sweep.py (docs/benchmarks.md).
CPU_LANES_PER_DEVICE = 65536


def default_step_block(platform: str, optimizer: OptimizerFactory | None) -> int:
    """Steps per unrolled block when ``step_block`` is not given: ``STEP_BLOCK`` of the
    backend for plain GD; with an optax optimiser 1 on CPU, where its unrolled update can round
    differently from the step-by-step one (momentum did, in the last bits), so that the
    default keeps the values of earlier versions."""
    if optimizer is not None and platform == "cpu":
        return 1
    return STEP_BLOCK.get(platform, 1)


class SweepPlan:
    """A validated sweep, its grid cut into chunks that can be run one at a time.

    :func:`sweep` is ``plan_sweep`` followed by :meth:`run_chunk` for every chunk and
    :meth:`assemble`. A runner that checkpoints a long sweep runs the chunks it has not saved
    yet and assembles the saved ones. A plan made from ``jax.ShapeDtypeStruct`` leaves
    (``abstract``) has every attribute but cannot run: it sizes a sweep without allocating
    its grid.

    Attributes:
        grid_shape: ``(n_eta, n_init)``.
        num_trajectories: ``n_eta * n_init``.
        chunk_size: trajectories per chunk (a multiple of the number of devices).
        num_chunks: ``ceil(num_trajectories / chunk_size)``.
        record_steps: the recorded times ``(n_rec,)`` or ``None``.
        sharpness_steps: the times of the sharpness measurements ``(n_sharp,)`` or ``None``.
        chunk_bytes: estimated device memory of one chunk, all devices together.
        result_bytes: estimated host memory of the :class:`SweepResult`.
        peak_host_bytes: estimated host memory while the sweep runs: the result, the host
            copy of ``params0`` and, on CPU devices (which live in host memory), the
            replicated ``params0`` and data and one chunk.
        abstract: made from ``jax.ShapeDtypeStruct`` leaves (cannot run).
    """

    def __init__(
        self,
        config: EngineConfig,
        params0: PyTree,
        etas: np.ndarray | PyTree,
        n_init: int,
        key: PRNGKeyArray | None,
        source: Minibatches | None,
        chunk_size: int,
        mesh: Mesh,
        *,
        chunk_bytes: int,
        result_bytes: int,
        peak_host_bytes: int,
        pipelined: bool = False,
    ):
        self._config = config
        self._mesh = mesh
        self.abstract = isinstance(jax.tree_util.tree_leaves(params0)[0], jax.ShapeDtypeStruct)
        replicated = NamedSharding(mesh, PartitionSpec())

        def put(x: PyTree) -> PyTree:
            return x if self.abstract else jax.device_put(x, replicated)

        self._params0 = put(params0)  # leaves (n_init, ...)
        self._etas = etas
        self._device_etas = put(etas)
        self._data = None if source is None else put(source.data)
        self._keys = None
        if key is not None:
            if not config.same_batches:
                key = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(n_init))
            self._keys = put(key)
        self.chunk_bytes = int(chunk_bytes)
        self.result_bytes = int(result_bytes)
        self.peak_host_bytes = int(peak_host_bytes)
        self.pipelined = bool(pipelined)
        self.grid_shape = (int(jax.tree_util.tree_leaves(etas)[0].shape[0]), int(n_init))
        self.num_trajectories = self.grid_shape[0] * self.grid_shape[1]
        self.chunk_size = int(chunk_size)
        self.num_chunks = -(-self.num_trajectories // self.chunk_size)
        self.record_steps = (
            None
            if config.record_every is None
            else np.arange(config.num_records) * config.record_every
        )
        self.sharpness_steps = (
            None
            if config.sharpness_every is None
            else np.arange(config.num_sharpness) * config.sharpness_every
        )

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        """``(start, stop)`` of chunk ``index`` in the flattened grid."""
        if not 0 <= index < self.num_chunks:
            raise ValueError(f"index must be in [0, {self.num_chunks}), got {index!r}.")
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.num_trajectories)

    def run_chunk(self, index: int) -> SweepChunk:
        """Runs the trajectories of chunk ``index`` and returns their results on the host."""
        return self._fetch(index, self._start(index))

    def run_chunks(self, indices: Iterable[int]) -> Iterator[SweepChunk]:
        """:meth:`run_chunk` of each of ``indices`` in turn; with ``pipelined`` the next chunk
        is started (JAX dispatches asynchronously) before this one is copied to the host, so
        that the devices do not wait for the host between chunks."""
        if not self.pipelined:
            yield from map(self.run_chunk, indices)
            return
        pending = None
        for index in indices:
            started = (index, self._start(index))
            if pending is not None:
                yield self._fetch(*pending)
            pending = started
        if pending is not None:
            yield self._fetch(*pending)

    def _start(self, index: int) -> LaneResults:
        """Dispatches chunk ``index`` (its results stay on the devices, maybe not ready)."""
        start, _ = self.chunk_bounds(index)
        if self.abstract:
            raise ValueError(
                "this plan was made from jax.ShapeDtypeStruct leaves (it sizes a sweep, it "
                "cannot run one): plan_sweep with arrays as params0 to run it."
            )
        return run_sharded(
            self._params0,
            self._device_etas,
            self._keys,
            self._data,
            jnp.int32(start),
            config=self._config,
            mesh=self._mesh,
            lanes_per_device=self.chunk_size // self._mesh.size,
        )

    def _fetch(self, index: int, out: LaneResults) -> SweepChunk:
        """The results of chunk ``index`` on the host (waits for them)."""
        start, stop = self.chunk_bounds(index)
        host = jax.tree_util.tree_map(lambda x: x[: stop - start], jax.device_get(out))
        return SweepChunk(start, stop, **host._asdict())

    def assemble(self, chunks: Iterable[SweepChunk]) -> SweepResult:
        """Puts chunk results together into a :class:`SweepResult`.

        Raises:
            ValueError: if the chunks do not cover every trajectory exactly once.
        """
        n = self.num_trajectories
        covered = np.zeros(n, bool)
        arrays: dict[str, Any] = {}
        for chunk in chunks:
            if covered[chunk.start : chunk.stop].any():
                raise ValueError(f"chunks: trajectories {chunk.start}..{chunk.stop} seen twice.")
            covered[chunk.start : chunk.stop] = True
            for name in chunk._fields[2:]:
                value = getattr(chunk, name)
                if value is None:
                    continue
                if name not in arrays:
                    arrays[name] = jax.tree_util.tree_map(
                        lambda x: np.empty((n,) + x.shape[1:], x.dtype), value
                    )
                jax.tree_util.tree_map(
                    lambda out, x: out.__setitem__(slice(chunk.start, chunk.stop), x),
                    arrays[name],
                    value,
                )
        if not covered.all():
            missing = int(np.flatnonzero(~covered)[0])
            raise ValueError(f"chunks: trajectory {missing} (and maybe more) is missing.")
        grid = self.grid_shape

        def as_grid(x):
            return x.reshape(grid + x.shape[1:])

        fields = {name: jax.tree_util.tree_map(as_grid, value) for name, value in arrays.items()}
        return SweepResult(
            etas=self._etas,
            record_steps=self.record_steps,
            sharpness_steps=self.sharpness_steps,
            **fields,
        )


def plan_sweep(
    loss_fn: LossFn,
    params0: PyTree,
    etas: Float[Array, " n_eta"] | PyTree,
    *,
    steps: int,
    batch_source: Minibatches | tuple[PyTree, int] | None = None,
    optimizer: OptimizerFactory | None = None,
    key: PRNGKeyArray | None = None,
    min_loss_value: float | None = None,
    criteria: ConvergenceCriteria = ConvergenceCriteria(),
    check_every: int = 128,
    record_every: int | None = None,
    record_params: bool = False,
    sharpness_every: int | None = None,
    sharpness_iterations: int | None = None,
    dtype: Any = jnp.float32,
    chunk_size: int | None = None,
    memory_budget_bytes: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    same_batches: bool = True,
    step_block: int | None = None,
    stop_at_convergence: bool = True,
    lyapunov: bool = False,
    lyapunov_steps: int | None = None,
) -> SweepPlan:
    """Validates the arguments of :func:`sweep` and cuts its grid into chunks.

    Takes the arguments of :func:`sweep` (except ``progress``, ``on_chunk`` and
    ``checkpoint_dir``); raises the same ``ValueError`` s, before any compute. ``params0``
    may also have ``jax.ShapeDtypeStruct`` leaves ``(n_init, ...)``: the plan is then
    ``abstract``, it checks the arguments and the memory of a sweep without allocating its
    grid, and cannot run (like ``jax.eval_shape``).

    Example, whether a grid of 10^8 starts of the two-neuron loss fits in host memory::

        grid = [jax.ShapeDtypeStruct((10**8, 1, 1), jnp.float32)] * 2
        plan = plan_sweep(two_neuron().loss, grid, etas, steps=1000)  # HostMemoryError if not
        plan.peak_host_bytes, plan.num_chunks
    """
    dt = check_dtype(dtype)
    params_host, n_init = check_params(params0, dt)
    per_leaf_etas = is_per_leaf(etas)
    if per_leaf_etas:
        etas_host = check_per_leaf_etas(etas, params_host, dt, optimizer)
    else:
        etas_host = check_etas(etas, dt)
    check_positive_int("step_block", step_block, allow_none=True)
    if not isinstance(stop_at_convergence, (bool, np.bool_)):
        raise ValueError(f"stop_at_convergence must be a bool, got {stop_at_convergence!r}.")
    check_positive_int("steps", steps)
    check_positive_int("check_every", check_every)
    check_positive_int("record_every", record_every, allow_none=True)
    check_positive_int("sharpness_every", sharpness_every, allow_none=True)
    check_positive_int("sharpness_iterations", sharpness_iterations, allow_none=True)
    check_positive_int("chunk_size", chunk_size, allow_none=True)
    check_positive_int("memory_budget_bytes", memory_budget_bytes, allow_none=True)
    if not isinstance(criteria, ConvergenceCriteria):
        raise ValueError(
            f"criteria must be a ConvergenceCriteria, got {type(criteria).__name__}."
        )
    criteria.validate()
    check_cast_criteria(criteria, min_loss_value, dt)
    if min_loss_value is not None and not (
        isinstance(min_loss_value, (int, float, np.floating)) and math.isfinite(min_loss_value)
    ):
        raise ValueError(f"min_loss_value must be a finite number or None, got {min_loss_value!r}.")
    if record_params and record_every is None:
        raise ValueError("record_params=True needs record_every (the recording interval).")
    lyapunov_steps = check_lyapunov(
        lyapunov,
        lyapunov_steps,
        steps=int(steps),
        window=min(criteria.window, int(steps)),
        optimizer=optimizer,
        batch_source=batch_source,
    )
    if sharpness_iterations is not None and sharpness_every is None and not lyapunov:
        raise ValueError(
            "sharpness_iterations needs sharpness_every (the measuring interval) or "
            "lyapunov=True (the Lanczos steps at converged trajectories)."
        )
    num_params = sum(
        math.prod(leaf.shape[1:]) for leaf in jax.tree_util.tree_leaves(params_host)
    )
    if sharpness_iterations is None:
        sharpness_iterations = min(SHARPNESS_ITERATIONS, num_params)
    elif sharpness_iterations > num_params:
        raise ValueError(
            f"sharpness_iterations = {sharpness_iterations} exceeds the number of parameters "
            f"d = {num_params}: a Krylov space has at most d dimensions."
        )
    source = None if batch_source is None else as_minibatches(batch_source, dt)
    key = check_key(key, batch_source)
    check_optimizer(optimizer)
    check_loss(loss_fn, params_host, source)
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise ValueError(f"devices must be a non-empty sequence of jax devices, got {devices!r}.")

    config = EngineConfig(
        loss_fn=loss_fn,
        optimizer=optimizer,
        criteria=criteria,
        min_loss_value=None if min_loss_value is None else float(min_loss_value),
        steps=int(steps),
        check_every=int(check_every),
        record_every=None if record_every is None else int(record_every),
        record_params=bool(record_params),
        batch_size=None if source is None else source.batch_size,
        same_batches=bool(same_batches),
        sharpness_every=None if sharpness_every is None else int(sharpness_every),
        sharpness_iterations=(
            0 if sharpness_every is None and not lyapunov else int(sharpness_iterations)
        ),
        step_block=(
            default_step_block(devices[0].platform, optimizer)
            if step_block is None
            else int(step_block)
        ),
        per_leaf_etas=per_leaf_etas,
        stop_at_convergence=bool(stop_at_convergence),
        lyapunov_steps=lyapunov_steps,
        pack_pairs=devices[0].platform in PACK_PAIRS,
    )
    n_dev = len(devices)
    total = jax.tree_util.tree_leaves(etas_host)[0].shape[0] * n_init
    requested = chunk_size
    per_trajectory = bytes_per_trajectory(config, params_host, source)
    budget = memory_budget_bytes or default_memory_budget(devices)
    on_host = all(d.platform == "cpu" for d in devices)  # device buffers are host memory
    if chunk_size is None:
        per_device = max(1, budget // per_trajectory)
        if on_host:
            per_device = min(per_device, CPU_LANES_PER_DEVICE)
        chunk_size = per_device * n_dev
    chunk_size = min(int(chunk_size), total)
    chunk_size = -(-chunk_size // n_dev) * n_dev  # a multiple of the device count
    # at least 2 per device: XLA's dot for a single trajectory rounds differently from the
    # batched one (docs/engine.md, Precision and reproducibility)
    chunk_size = max(chunk_size, 2 * n_dev)
    check_chunk_memory(per_trajectory, chunk_size, devices, requested, budget)
    result_per_trajectory = result_bytes_per_trajectory(config, params_host)
    chunk_bytes = chunk_size * per_trajectory
    inputs = tree_bytes(params_host) + (0 if source is None else tree_bytes(source.data))
    peak = total * result_per_trajectory + inputs
    if on_host:
        peak += n_dev * inputs + chunk_bytes
    check_host_memory(peak, result_per_trajectory, total)
    # the next chunk is started before this one is fetched where two fit in the budget (and,
    # on CPU, in the host memory left)
    limit = host_available_bytes()
    pipelined = 2 * (chunk_size // n_dev) * per_trajectory <= budget and (
        not on_host or limit is None or peak + chunk_bytes <= limit
    )
    check_grid_size(total // n_init, n_init)  # after the memory checks, which name keys
    release_compiled_programs()  # before this sweep compiles one more program
    mesh = Mesh(np.array(devices), (LANES,))
    return SweepPlan(
        config,
        params_host,
        etas_host,
        n_init,
        key,
        source,
        chunk_size,
        mesh,
        chunk_bytes=chunk_bytes,
        result_bytes=total * result_per_trajectory,
        peak_host_bytes=peak + (chunk_bytes if pipelined and on_host else 0),
        pipelined=pipelined,
    )


def is_per_leaf(etas: Any) -> bool:
    """Whether ``etas`` gives one step size per parameter leaf: a pytree (not one array)
    whose leaves are all 1-D arrays ``(n_eta,)``. A list of numbers is one array of step
    sizes."""
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(etas)):
        return False
    return all(np.ndim(leaf) == 1 for leaf in jax.tree_util.tree_leaves(etas))


def check_per_leaf_etas(
    etas: PyTree, params: PyTree, dtype: Any, optimizer: OptimizerFactory | None
) -> PyTree:
    """``etas`` per leaf, checked and cast to ``dtype`` on the host: the structure of one
    trajectory's params, every leaf ``(n_eta,)`` of one common length, positive and finite,
    and plain GD (the step ``theta_l - eta_l grad_l L`` has no optax counterpart)."""
    if optimizer is not None:
        raise ValueError(
            f"etas per parameter leaf need plain GD (optimizer=None), got optimizer={optimizer!r}."
        )
    expected = jax.tree_util.tree_structure(params)
    got = jax.tree_util.tree_structure(etas)
    if got != expected:
        raise ValueError(
            f"etas per leaf must have the structure of the params {expected}, got {got}."
        )
    checked = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(etas):
        try:
            checked.append(check_etas(leaf, dtype))
        except ValueError as error:
            raise ValueError(f"etas{jax.tree_util.keystr(path)}: {error}") from None
    lengths = {x.shape[0] for x in checked}
    if len(lengths) != 1:
        raise ValueError(
            "etas per leaf must all have the same length n_eta, got lengths "
            f"{[x.shape[0] for x in checked]}."
        )
    return jax.tree_util.tree_unflatten(got, checked)
