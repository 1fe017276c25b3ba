"""Layer 4, engine: batched GD/SGD trajectories over (step size x initialisation) grids.

* ``_sweep``: :func:`sweep`, the entry point (plan, run every chunk, assemble);
* ``_plan``: :func:`plan_sweep` and :class:`SweepPlan` (chunks, memory, every check);
* ``_validation``: the checks of a sweep's arguments, before any compute;
* ``_memory``: device and host memory estimates and their errors;
* ``_problem``: the static settings (:class:`EngineConfig`), the layouts of the lanes and one
  trajectory's loss, gradient and step; ``_scalar_loss``: a tiny model's loss unrolled into
  scalars;
* ``_lanes``, ``_stepping``, ``_evaluation``, ``_divergence``: the lanes of a device, the
  step loop, the evaluations and freezing, the divergence replay; ``_sharding``: one
  device's run and a chunk over devices; ``_distributed``: multi-process sweeps;
* ``_trajectory_status``: :class:`TrajectoryStatus`, :class:`ConvergenceCriteria` and the
  classification of an evaluation and of the final window;
* ``_lyapunov``: the maximal Lyapunov exponent of the GD map (``sweep(..., lyapunov=True)``)
  and the ``CHAOTIC`` status;
* ``_minibatches``: minibatch schedules for SGD;
* ``_results``: :class:`SweepResult` and :class:`SweepChunk`;
* ``_critical_step_estimate``: :func:`estimate_critical_step_size`, the step size where
  convergence collapses, bracketed and bisected with batched sweeps;
* ``_checkpoint``: finished chunks saved atomically and resumed (fingerprints).

Imports only layers 1-3.
"""

from gdlr_jax.engine._checkpoint import CheckpointMismatchError as CheckpointMismatchError
from gdlr_jax.engine._critical_step_estimate import (
    CriticalStepEstimate as CriticalStepEstimate,
)
from gdlr_jax.engine._critical_step_estimate import (
    estimate_critical_step_size as estimate_critical_step_size,
)
from gdlr_jax.engine._memory import ChunkMemoryError as ChunkMemoryError
from gdlr_jax.engine._memory import HostMemoryError as HostMemoryError
from gdlr_jax.engine._minibatches import Minibatches as Minibatches
from gdlr_jax.engine._plan import SweepPlan as SweepPlan
from gdlr_jax.engine._plan import plan_sweep as plan_sweep
from gdlr_jax.engine._results import SweepChunk as SweepChunk
from gdlr_jax.engine._results import SweepResult as SweepResult
from gdlr_jax.engine._sweep import sweep as sweep
from gdlr_jax.engine._trajectory_status import ConvergenceCriteria as ConvergenceCriteria
from gdlr_jax.engine._trajectory_status import TrajectoryStatus as TrajectoryStatus
