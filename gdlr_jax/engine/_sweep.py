"""Batched GD/SGD trajectories over (step size x initialisation) grids (layer 4: engine).

For every pair ``(eta_i, theta_0^(j))`` of a grid, the engine runs

    theta_{t+1} = theta_t - eta_i * grad L(theta_t)                    (plain GD, default)

or the update of an optax optimiser with learning rate ``eta_i`` (minibatch gradients when a
data source is given), for at most ``steps`` steps, and says what happened
(:class:`~gdlr_jax.TrajectoryStatus`). The kernel is written for one trajectory and vmapped over
all of them, step sizes traced: the whole grid compiles once.

How it runs (details and every default in ``docs/engine.md``):

* the flattened grid (index ``k = i * n_init + j``) is cut into chunks sized from a memory
  budget; each chunk is sharded over the local devices (``shard_map`` over a 1-D ``Mesh``) and
  each device runs its lanes independently;
* trajectories are stepped without per-step bookkeeping between *evaluation times* (0, 1, 2,
  4, ... up to ``check_every``, then every ``check_every`` steps, every ``record_every`` steps,
  the start of the final window and ``steps``); at each one the full-batch loss and gradient
  decide convergence or divergence, finished trajectories are frozen, and the device stops
  as soon as none of its trajectories is running (early exit);
* a trajectory found diverged is rolled back to its previous evaluation and, after the loop,
  replayed step by step (only the diverged ones, in compact blocks) to stop it at its last
  iterate inside the bound: ``steps_taken`` is then the exact step of divergence;
* the final ``window`` iterates of the trajectories still running are kept to measure their
  asymptotic step length and to look for periodic orbits;
* with ``lyapunov=True``, the maximal Lyapunov exponent of the GD map: a tangent vector is
  carried through the last ``lyapunov_steps`` steps of the trajectories still running
  (replayed from their iterates at ``steps - lyapunov_steps``), the fixed point's
  ``max_i log|1 - eta lambda_i|`` for converged ones; bounded, non-periodic trajectories
  with an exponent above ``criteria.lyapunov_tol`` are ``CHAOTIC``;
* with ``sharpness_every = K``, the sharpness ``lambda_max`` of the full-batch Hessian is
  estimated every ``K`` steps for every trajectory by a few Lanczos iterations
  (Hessian-vector products), each warm-started from the trajectory's previous Ritz vector.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from gdlr_jax.engine._checkpoint import ChunkStore
from gdlr_jax.engine._distributed import run_distributed
from gdlr_jax.engine._minibatches import Minibatches
from gdlr_jax.engine._plan import plan_sweep
from gdlr_jax.engine._problem import LossFn, OptimizerFactory
from gdlr_jax.engine._results import SweepChunk, SweepResult
from gdlr_jax.engine._trajectory_status import ConvergenceCriteria
from gdlr_jax.problems._pytree import PyTree


def sweep(
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
    progress: bool = False,
    on_chunk: Callable[[int, SweepChunk], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    step_block: int | None = None,
    stop_at_convergence: bool = True,
    lyapunov: bool = False,
    lyapunov_steps: int | None = None,
) -> SweepResult:
    """Runs GD (or SGD, or an optax optimiser) from every initialisation at every step size.

    Trajectory ``(i, j)`` starts at ``params0[j]`` and takes at most ``steps`` steps
    ``theta <- theta - etas[i] * grad L(theta)`` (or the optimiser's update with learning rate
    ``etas[i]``). Each is classified (:class:`~gdlr_jax.TrajectoryStatus`) with the criteria
    of :class:`~gdlr_jax.ConvergenceCriteria`, evaluated on the full-batch loss and gradient
    at the evaluation times ``0, 1, 2, 4, ...`` (powers of two below ``check_every``), every
    ``check_every`` steps, every ``record_every`` steps, at the start of the final window and
    at ``steps`` (``docs/engine.md``).

    Args:
        loss_fn: ``loss_fn(params) -> scalar`` (full batch), or ``loss_fn(params, batch) ->
            scalar`` with ``batch_source``, the mean of a per-example loss over the batch. Pass
            the same function object again to reuse the compilation.
        params0: pytree of initialisations, every leaf ``(n_init, ...)``.
        etas: step sizes ``(n_eta,)``, positive and finite; traced (new values of the same
            shape do not recompile). Or, for plain GD, one step size per parameter leaf: a
            pytree with the structure of one initialisation whose leaves are ``(n_eta,)``;
            trajectory ``(i, j)`` then steps ``theta_l <- theta_l - etas_l[i] grad_l L(theta)``
            for every leaf ``l`` (e.g. a grid over the step sizes of two layers).
        steps: maximum number of steps, ``>= 1``.
        batch_source: ``(data, batch_size)`` or :class:`~gdlr_jax.Minibatches` for minibatch
            SGD: data leaves ``(n, ...)``; batches are consecutive blocks of a per-epoch shuffle
            drawn from ``key`` (see ``gdlr_jax.engine._minibatches``). ``None``: full-batch GD.
        optimizer: an optax factory taking ``learning_rate`` (e.g. ``optax.sgd``,
            ``functools.partial(optax.sgd, momentum=0.9)``, ``optax.adam``), built per
            trajectory with ``learning_rate = eta``. ``None``: plain GD.
        key: PRNG key of the minibatch sequence (required with ``batch_source``, otherwise
            must be ``None``).
        min_loss_value: the known minimum value of the loss (e.g. 0 for the two-neuron loss),
            to tell minima from other critical points; ``None`` if unknown.
        criteria: tolerances and window (:class:`~gdlr_jax.ConvergenceCriteria`).
        check_every: steps between regular evaluations (after the early powers of two). Larger
            values cost less per step, smaller ones exit sooner and replay less on divergence.
        record_every: record the full-batch loss and ``eta ||grad L||`` every this many steps
            (``None``: no recordings).
        record_params: also record the iterates (needs ``record_every``).
        sharpness_every: measure the sharpness ``lambda_max`` of the full-batch Hessian every
            this many steps (``None``: never), into ``recorded_sharpness`` and
            ``final_sharpness``. Each measurement is ``sharpness_iterations`` Lanczos steps
            (Hessian-vector products) per trajectory, warm-started from its previous Ritz
            vector, so it tracks the top eigenvalue as it drifts (``docs/engine.md``).
        sharpness_iterations: Lanczos steps per measurement, ``<= d`` (default
            ``min(20, d)``, ``d`` the number of parameters); also those of the exponent of a
            converged trajectory with ``lyapunov=True``.
        dtype: floating dtype of parameters, step sizes and floating data (float32 default;
            float64 needs ``jax_enable_x64``).
        chunk_size: trajectories per chunk (rounded up to a multiple of the device count); by
            default as many per device as fit ``memory_budget_bytes``, and at most 16384 per
            device on CPU (cache-sized chunks run faster).
        memory_budget_bytes: memory of one device allowed for its share of a chunk (the
            estimate is in ``docs/engine.md``); ``None``: 1 GiB per CPU device, and on GPU and
            TPU a quarter of what the device can allocate (at least 1 GiB).
        devices: devices to shard trajectories over (default ``jax.local_devices()``).
        same_batches: every trajectory sees the same minibatch sequence (default); ``False``:
            initialisation ``j`` uses the key ``fold_in(key, j)`` (shared by all step sizes).
        progress: show a progress bar over chunks.
        on_chunk: called as ``on_chunk(index, chunk)`` after each chunk (e.g. to persist it),
            loaded ones included.
        checkpoint_dir: a folder where each finished chunk is saved atomically as it
            completes; a chunk already saved there is loaded instead of run, so a sweep
            interrupted at any moment resumes where it stopped, with identical results
            (``gdlr_jax.engine._checkpoint``, ``docs/engine.md``). ``None``: nothing is saved.
            Required under ``jax.distributed`` (``jax.process_count() > 1``): there every
            process runs its share of the chunks on its local devices and saves them in this
            folder, which every process must see; each then returns the whole result,
            bit-identical to a one-process sweep (``gdlr_jax.engine._distributed``,
            ``docs/distributed.md``).
        step_block: steps per unrolled block of the step loop (plain GD: the same results
            for every value, only the speed differs; with an optax optimiser the last bits
            can differ). ``None``: the measured default of the devices' backend, 1 with an
            optimiser on CPU (``docs/engine.md``).
        stop_at_convergence: ``True`` (default): a trajectory found converged is frozen there
            (its recordings then hold its final values). ``False``: it keeps its status, its
            first convergence time goes to ``SweepResult.converged_at``, and it is stepped and
            recorded on to ``steps`` (Figures 5-6: the asymptotic ``eta ||grad L||``), unless it
            leaves the bound, where it stops at its last iterate inside.
        lyapunov: measure the maximal Lyapunov exponent of the GD map ``G(theta) = theta -
            eta grad L(theta)`` (plain full-batch GD only) into
            ``SweepResult.lyapunov_exponent``: for a trajectory still running at the end the
            finite-time exponent ``(1/L) sum_t log ||DG(theta_t) v_t||`` over its last ``L =
            lyapunov_steps`` steps, ``DG v = v - eta H v`` (``v_l - eta_l (H v)_l`` with step
            sizes per leaf) by a JVP of the step, the tangent ``v_t`` renormalised every step;
            for a converged one ``max_i log|1 - eta lambda_i|`` over the Hessian's eigenvalues
            at its fixed point (of ``D^1/2 H D^1/2``, ``D`` the step sizes, per leaf); NaN for
            a diverged one. A running trajectory without a period whose exponent exceeds
            ``criteria.lyapunov_tol`` becomes ``CHAOTIC``. Costs about one Hessian-vector
            product per step of the ``L`` replayed steps, and adds the evaluation time
            ``steps - L`` (``docs/engine.md``, "Lyapunov exponents").
        lyapunov_steps: ``L``, the final steps of the exponent, ``1 <= L <= steps`` (only
            with ``lyapunov=True``); default ``min(steps, max(256, window))``.

    Returns:
        A :class:`SweepResult` with arrays ``(n_eta, n_init)``.

    Raises:
        ValueError: before any compute, on bad arguments: non-positive, non-finite, empty or
            non-1-D ``etas``; ``params0`` leaves without a common leading axis; NaN or inf in
            ``params0`` or the ``batch_source`` data (the message names the leaf and the
            index); ``steps < 1``; a ``loss_fn`` that does not return a scalar; a malformed
            ``batch_source``; a missing or superfluous ``key``; bad tolerances; a chunk (or one
            trajectory) estimated to need more memory than a device can allocate
            (``ChunkMemoryError``), or results estimated not to fit in the host's available
            memory (``HostMemoryError``): the message says how to reduce it;
            ``jax.ShapeDtypeStruct`` leaves in ``params0`` (those only plan, see
            :func:`plan_sweep`); ``lyapunov=True`` with an ``optimizer`` or a
            ``batch_source``, or ``lyapunov_steps`` without it or above ``steps``.
        gdlr_jax.engine._checkpoint.CheckpointMismatchError: (a ``ValueError``) when
            ``checkpoint_dir`` holds chunks of a sweep with other arguments; the message names
            what differs.
    """
    plan = plan_sweep(
        loss_fn,
        params0,
        etas,
        steps=steps,
        batch_source=batch_source,
        optimizer=optimizer,
        key=key,
        min_loss_value=min_loss_value,
        criteria=criteria,
        check_every=check_every,
        record_every=record_every,
        record_params=record_params,
        sharpness_every=sharpness_every,
        sharpness_iterations=sharpness_iterations,
        dtype=dtype,
        chunk_size=chunk_size,
        memory_budget_bytes=memory_budget_bytes,
        devices=devices,
        same_batches=same_batches,
        step_block=step_block,
        stop_at_convergence=stop_at_convergence,
        lyapunov=lyapunov,
        lyapunov_steps=lyapunov_steps,
    )
    if plan.abstract:
        raise ValueError(
            "params0 has jax.ShapeDtypeStruct leaves: sweep needs arrays (plan_sweep sizes a "
            "sweep from shapes)."
        )
    if jax.process_count() > 1:  # a jax.distributed job: each process runs its share
        if checkpoint_dir is None:
            raise ValueError(
                f"sweep under jax.distributed ({jax.process_count()} processes) needs "
                "checkpoint_dir: a folder shared by every process, where each saves its chunks."
            )
        return run_distributed(plan, checkpoint_dir, progress=progress, on_chunk=on_chunk)
    indices: Iterable[int] = range(plan.num_chunks)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="sweep", unit="chunk")

    if checkpoint_dir is None:
        results = plan.run_chunks(indices)
    else:
        results = map(ChunkStore(checkpoint_dir, plan).load_or_run, indices)

    def chunks():
        for index, chunk in zip(range(plan.num_chunks), results):
            if on_chunk is not None:
                on_chunk(index, chunk)
            yield chunk

    return plan.assemble(chunks())
