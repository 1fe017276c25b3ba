"""What one device runs (:func:`run_lanes`: start, step loop, final window, divergence replay,
results) and how a chunk of the grid is split over devices (:func:`run_sharded`, a
``shard_map`` over a 1-D mesh) (layer 4: engine)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Float, Int, PRNGKeyArray

from gdlr_jax.engine._divergence import pinpoint_divergence
from gdlr_jax.engine._evaluation import (
    fill_recordings,
    final_sharpness,
    final_values,
    record,
    record_sharpness,
)
from gdlr_jax.engine._lanes import RUNNING, LaneResults, StepSizes, select, start_lanes
from gdlr_jax.engine._lyapunov import lyapunov_exponents
from gdlr_jax.engine._problem import EngineConfig, Layout, Problem, uses_columns
from gdlr_jax.engine._stepping import final_window, run_phase
from gdlr_jax.engine._trajectory_status import TrajectoryStatus
from gdlr_jax.problems._pytree import PyTree

LANES = "lanes"  # the mesh axis along which trajectories are sharded


def run_lanes(
    config: EngineConfig,
    params: PyTree,
    etas: PyTree,
    keys: PRNGKeyArray | None,
    data: PyTree | None,
) -> LaneResults:
    """Runs the ``m`` trajectories of one device to the end and summarises them.

    ``params`` has leaves ``(m, ...)``; ``etas`` is ``(m,)``, or with ``per_leaf_etas`` a
    pytree like the params with ``(m,)`` leaves.
    """
    num_params = sum(math.prod(x.shape[1:]) for x in jax.tree_util.tree_leaves(params))
    layout = Layout.of(params, uses_columns(config, num_params, data is not None))
    problem = Problem(config, layout, data)
    step_sizes = StepSizes.of(etas, problem)
    start = layout.state_of(params)
    lanes = start_lanes(problem, start, step_sizes)
    lanes = record(config, lanes, start, jnp.int32(0), lanes.final_loss, lanes.final_step_norm)
    lanes = record_sharpness(problem, lanes, start, jnp.int32(0))
    window = config.window
    window_start = config.steps - window
    # with lyapunov_steps, the iterates at steps - lyapunov_steps (an evaluation time) are kept
    # for the tangent replay of the lanes still running at the end
    lyapunov_start = config.steps - config.lyapunov_steps if config.lyapunov_steps else None
    snapshot = lanes.state
    if lyapunov_start is not None and lyapunov_start < window_start:
        t, lanes, _ = run_phase(
            problem, lanes, jnp.int32(0), lyapunov_start, None, step_sizes, keys
        )
        snapshot = lanes.state
        t, lanes, _ = run_phase(problem, lanes, t, window_start, None, step_sizes, keys)
    else:
        t, lanes, _ = run_phase(
            problem, lanes, jnp.int32(0), window_start, None, step_sizes, keys
        )
    if lyapunov_start == window_start:
        snapshot = lanes.state
    inside = lyapunov_start if (lyapunov_start or 0) > window_start else None
    lanes, period, mean_step, window_snapshot = final_window(
        problem, lanes, t, step_sizes, keys, inside
    )
    snapshot = snapshot if inside is None else window_snapshot
    still_running = (lanes.status == RUNNING) | (period > 0)
    diverged_at_start = (lanes.status == TrajectoryStatus.DIVERGED) & (lanes.detected_at == 0)
    lanes = lanes._replace(state=select(diverged_at_start, start, lanes.state))
    lanes = final_values(problem, lanes, step_sizes)
    lanes = pinpoint_divergence(problem, lanes, step_sizes, keys)
    exponent = None
    if config.lyapunov_steps:
        lanes, exponent = lyapunov_exponents(
            problem, lanes, snapshot, still_running, period, step_sizes
        )
    lanes = fill_recordings(config, lanes)
    final_sharpness_, recorded_sharpness = final_sharpness(problem, lanes)
    diverged = lanes.status == TrajectoryStatus.DIVERGED
    asymptotic = jnp.where(
        still_running, mean_step, jnp.where(diverged, jnp.inf, lanes.final_step_norm)
    )
    recorded_params = None
    if config.record_params:
        recorded_params = layout.params_of(lanes.recorded_state)
    return LaneResults(
        status=lanes.status,
        steps_taken=lanes.steps_taken,
        final_loss=lanes.final_loss,
        final_grad_norm=lanes.final_grad_norm,
        asymptotic_step_norm=asymptotic.astype(lanes.final_loss.dtype),
        min_loss=lanes.min_loss,
        period=period.astype(jnp.int32),
        final_params=layout.params_of(lanes.state),
        recorded_loss=lanes.recorded_loss,
        recorded_step_norm=lanes.recorded_step_norm,
        recorded_params=recorded_params,
        recorded_sharpness=recorded_sharpness,
        final_sharpness=final_sharpness_,
        converged_at=lanes.converged_at,
        lyapunov_exponent=exponent,
    )


@functools.partial(jax.jit, static_argnames=("config", "mesh", "lanes_per_device"))
def run_sharded(
    params0: PyTree,
    etas: Float[Array, " n_eta"] | PyTree,
    keys: PRNGKeyArray | None,
    data: PyTree | None,
    start: Int[Array, ""],
    *,
    config: EngineConfig,
    mesh: Mesh,
    lanes_per_device: int,
) -> LaneResults:
    """Runs the trajectories ``start, start + 1, ...`` of the flattened grid on ``mesh``.

    Every device gathers its ``lanes_per_device`` trajectories (``k = i * n_init + j``; past
    the end of the grid the last one is repeated) from the replicated ``params0 (n_init, ...)``
    and ``etas`` (``(n_eta,)``, or a pytree of ``(n_eta,)`` leaves), runs them with
    :func:`run_lanes` and stops on its own: devices do not communicate, so a trajectory's
    results do not depend on the device count. ``start`` is traced: all chunks share one
    compilation.
    """
    n_init = jax.tree_util.tree_leaves(params0)[0].shape[0]
    total = jax.tree_util.tree_leaves(etas)[0].shape[0] * n_init

    def run_device(params0, etas, keys, data, start):
        first = start + lax.axis_index(LANES) * lanes_per_device
        flat = jnp.minimum(first + jnp.arange(lanes_per_device), total - 1)
        init_index = flat % n_init
        params = jax.tree_util.tree_map(lambda x: x[init_index], params0)
        lane_etas = jax.tree_util.tree_map(lambda e: e[flat // n_init], etas)
        lane_keys = keys if config.same_batches or keys is None else keys[init_index]
        return run_lanes(config, params, lane_etas, lane_keys, data)

    replicated = PartitionSpec()
    run = jax.shard_map(
        run_device,
        mesh=mesh,
        in_specs=(replicated,) * 5,
        out_specs=PartitionSpec(LANES),
        check_vma=False,
    )
    return run(params0, etas, keys, data, start)
