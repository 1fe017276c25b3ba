"""Sweeps under JAX's multi-controller runtime, ``jax.distributed`` (layer 4: engine).

When a program runs as ``P = jax.process_count() > 1`` processes (started by SLURM, Open MPI,
a TPU pod, Kubernetes, or by hand with a coordinator address; ``docs/distributed.md``), every
process calls :func:`~gdlr_jax.sweep` with the same arguments and

1. the processes exchange the :func:`~gdlr_jax.engine._checkpoint.sweep_fingerprint` of their
   plans through the runtime's key-value store, and refuse to start, all of them with the same
   message, when any two differ (another config, other data, another device count);
2. process 0 opens the checkpoint folder and leaves a token file in it; every other process
   must see that file, or the folder is not shared and the sweep is refused;
3. process ``p`` runs the chunks ``p, p + P, p + 2P, ...`` on its local devices (chunks already
   saved are loaded, not run), saving each as it completes;
4. a barrier of the runtime waits for every process's share; then each process assembles the
   whole result from the shared folder.

The chunks are the ones a one-process sweep computes, on the same device count per process, so
the result is bit-identical to a one-process run of the same sweep, and a sweep interrupted on
any number of processes resumes on any other number. A process killed mid-run loses only the
chunk it was computing.

The key-value store and barriers are those of ``jax.distributed`` (its coordination service);
JAX exposes them only through ``jax._src.distributed``, which this module alone touches.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import secrets
import socket
import time
from collections.abc import Callable, Iterable

import jax

from gdlr_jax.engine._checkpoint import ChunkStore, sweep_fingerprint
from gdlr_jax.engine._plan import SweepPlan
from gdlr_jax.engine._results import SweepChunk, SweepResult

#: seconds a process waits for the others at the start of a sweep (fingerprints, folder).
START_TIMEOUT_S = 600
#: seconds a process that finished its share waits for the others (their chunks may be long).
FINISH_TIMEOUT_S = 7 * 24 * 3600


class DistributedError(ValueError):
    """The processes of a ``jax.distributed`` job cannot start, or cannot run one sweep
    together: a bad coordinator address, a coordinator that does not answer, plans that
    differ between processes, or a folder that is not shared between them."""


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: float = 60.0,
) -> None:
    """Starts ``jax.distributed`` with checks that fail in one line instead of the runtime's
    abort: ``jax.distributed.initialize(coordinator, num_processes, process_id)``, or with no
    arguments its cluster auto-detection (SLURM, Open MPI, TPU pods, Kubernetes).

    Before the runtime starts, process 0 checks that it can listen on the coordinator's port,
    and every other process waits at most ``timeout_s`` seconds for the coordinator to accept a
    connection. ``timeout_s`` is also the runtime's ``initialization_timeout``: a process that
    is never started makes the others fail after it (with JAX's own message: the runtime ends
    the process itself).

    Raises:
        DistributedError: (a ``ValueError``) a malformed address or process numbers, a port
            process 0 cannot listen on, a coordinator that does not answer within
            ``timeout_s``, or no cluster detected when no address is given.
    """
    if not (isinstance(timeout_s, (int, float)) and 0 < timeout_s <= 24 * 3600):
        raise DistributedError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}.")
    if coordinator is None:
        if num_processes is not None or process_id is not None:
            raise DistributedError("num_processes and process_id need a coordinator address HOST:PORT.")
        try:
            jax.distributed.initialize(initialization_timeout=int(math.ceil(timeout_s)))
        except (ValueError, RuntimeError) as err:
            raise DistributedError(
                f"no cluster detected for jax.distributed (SLURM, Open MPI, TPU pod, Kubernetes: "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}); give the "
                "coordinator HOST:PORT, the number of processes and this process's id instead"
            ) from None
        return
    host, sep, port_text = str(coordinator).rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise DistributedError(
            f"coordinator must be HOST:PORT with a port in 1..65535, got {coordinator!r}."
        )
    port = int(port_text)
    if not (isinstance(num_processes, int) and num_processes >= 1):
        raise DistributedError(f"num_processes must be an integer >= 1, got {num_processes!r}.")
    if not (isinstance(process_id, int) and 0 <= process_id < num_processes):
        raise DistributedError(
            f"process_id must be an integer in 0..{num_processes - 1}, got {process_id!r}."
        )
    if process_id == 0:
        with socket.socket() as probe:
            try:
                probe.bind(("", port))
            except OSError as err:
                raise DistributedError(
                    f"process 0 cannot listen on the coordinator port {port} "
                    f"({err.strerror or err}); choose a free port"
                ) from None
    else:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection((host, port), timeout=1.0).close()
                break
            except OSError:
                if time.monotonic() >= deadline:
                    raise DistributedError(
                        f"coordinator {coordinator} did not answer within {timeout_s:g} s; start "
                        "process 0 there (it is the coordinator), or check the address"
                    ) from None
                time.sleep(0.2)  # the coordinator's process may still be importing jax
    jax.distributed.initialize(
        coordinator, num_processes=num_processes, process_id=process_id,
        initialization_timeout=int(math.ceil(timeout_s)),
    )


def process_share(num_chunks: int, process_index: int, process_count: int) -> range:
    """The chunk indices process ``process_index`` of ``process_count`` runs:
    ``process_index, process_index + process_count, ...`` below ``num_chunks`` (round robin, so
    shares differ by at most one chunk and neighbouring chunks run at the same time)."""
    return range(process_index, num_chunks, process_count)


class ProcessGroup:
    """The processes of this ``jax.distributed`` job, through the runtime's key-value store
    and barriers. ``name`` tags one collective step: every process must make the same steps
    in the same order with the same names (as with JAX's collectives), e.g. the n-th sweep of
    each process is the same sweep."""

    _steps: dict[str, int] = {}  # how often this process made each named step

    def __init__(self, name: str) -> None:
        from jax._src import distributed  # the runtime's client: not in JAX's public API

        self.client = distributed.global_state.client
        if self.client is None:
            raise RuntimeError("jax.distributed is not initialised in this process")
        self.index = jax.process_index()
        self.count = jax.process_count()
        count = ProcessGroup._steps[name] = ProcessGroup._steps.get(name, 0) + 1
        self.tag = f"gdlr_jax/{name}-{count}"

    def all_gather(self, name: str, value: str, timeout_s: float = START_TIMEOUT_S) -> list[str]:
        """``value`` of every process, in process order."""
        self.client.key_value_set(f"{self.tag}/{name}/{self.index}", value)
        timeout = int(timeout_s * 1000)
        return [
            self.client.blocking_key_value_get(f"{self.tag}/{name}/{p}", timeout)
            for p in range(self.count)
        ]

    def broadcast(self, name: str, value: str, timeout_s: float = START_TIMEOUT_S) -> str:
        """Process 0's ``value`` (the others' are ignored)."""
        if self.index == 0:
            self.client.key_value_set(f"{self.tag}/{name}", value)
            return value
        return self.client.blocking_key_value_get(f"{self.tag}/{name}", int(timeout_s * 1000))

    def barrier(self, name: str, timeout_s: float = START_TIMEOUT_S) -> None:
        """Returns once every process has reached this barrier."""
        self.client.wait_at_barrier(f"{self.tag}/{name}", int(timeout_s * 1000))


def _check_same_plan(group: ProcessGroup, plan: SweepPlan) -> None:
    fingerprint = sweep_fingerprint(plan)
    prints = [json.loads(text) for text in group.all_gather("fingerprint", json.dumps(fingerprint))]
    differ = [p for p in range(group.count) if prints[p] != prints[0]]
    if differ:
        other = prints[differ[0]]
        keys = [k for k in dict.fromkeys([*prints[0], *other]) if prints[0].get(k) != other.get(k)]
        raise DistributedError(
            f"the processes of this jax.distributed job plan different sweeps: process "
            f"{differ[0]} (and {len(differ) - 1} more) differs from process 0 in "
            f"{', '.join(keys)}; start every process with the same config, data and devices"
        )


def _check_shared_folder(group: ProcessGroup, folder: pathlib.Path) -> None:
    token = f".process-0-{secrets.token_hex(8)}" if group.index == 0 else ""
    if group.index == 0:
        (folder / token).touch()
    token = group.all_gather("token", token)[0]
    seen = group.all_gather("seen", "1" if (folder / token).exists() else "0")
    group.barrier("token-checked")
    if group.index == 0:
        (folder / token).unlink(missing_ok=True)
    blind = [p for p in range(group.count) if seen[p] != "1"]
    if blind:
        raise DistributedError(
            f"checkpoint folder {folder} is not shared between the processes of this "
            f"jax.distributed job: process {blind[0]} (and {len(blind) - 1} more) does not see "
            f"the file process 0 wrote there; give every process the same folder on a shared "
            f"file system"
        )


def run_distributed(
    plan: SweepPlan,
    checkpoint_dir: str | os.PathLike,
    *,
    progress: bool = False,
    on_chunk: Callable[[int, SweepChunk], None] | None = None,
) -> SweepResult:
    """Runs ``plan`` over the processes of a ``jax.distributed`` job (this module's docstring);
    called by :func:`~gdlr_jax.sweep` when ``jax.process_count() > 1``. Every process returns the
    whole result.

    Raises:
        DistributedError: (a ``ValueError``, on every process alike, before any compute)
            when the processes' plans differ or ``checkpoint_dir`` is not shared.
        CheckpointMismatchError: when the folder holds chunks of another sweep.
    """
    group = ProcessGroup("sweep")
    _check_same_plan(group, plan)
    folder = pathlib.Path(checkpoint_dir)
    if group.index == 0:
        folder.mkdir(parents=True, exist_ok=True)
    group.barrier("folder-made")
    _check_shared_folder(group, folder)
    # Process 0 writes or checks sweep.json and removes stale temporary files before any other
    # process opens the folder (opening it elsewhere then only reads sweep.json).
    store = ChunkStore(folder, plan) if group.index == 0 else None
    group.barrier("store-opened")
    if store is None:
        store = ChunkStore(folder, plan)
    group.barrier("stores-opened")

    share: Iterable[int] = process_share(plan.num_chunks, group.index, group.count)
    if progress:
        from tqdm.auto import tqdm

        share = tqdm(share, desc=f"sweep (process {group.index})", unit="chunk")
    for index in share:
        store.load_or_run(index)
    group.barrier("chunks-done", FINISH_TIMEOUT_S)

    def chunks():
        for index in range(plan.num_chunks):
            chunk = store.load_or_run(index)  # run here only if its file was damaged since
            if on_chunk is not None:
                on_chunk(index, chunk)
            yield chunk

    return plan.assemble(chunks())
