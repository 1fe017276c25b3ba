"""gdlr_jax: gradient descent with large step sizes, in JAX.

Layers, one subpackage each; each imports only the ones listed before it
(``docs/architecture.md``; ``tests/test_architecture.py`` keeps the rule):

1. ``problems``    -- ``gdlr_jax.linear`` (linear networks, two-neuron, deep scalar),
                      ``gdlr_jax.mlp`` (Flax MLPs as pure losses), ``gdlr_jax.data`` (MNIST);
2. ``curvature``   -- dense Hessians and spectra, Hessian-vector products, Lanczos;
3. ``dynamics``    -- the GD map, its Jacobian, stability of fixed points, M_WS, eta_E;
4. ``engine``      -- batched trajectories over (initialisation x step size) grids;
5. ``experiments`` -- configs, runs, results files and figures; the ``gdlr`` command line.

The whole public API is re-exported here. ``gdlr_jax.mlp`` is imported on first use (module
``__getattr__``, PEP 562): it imports Flax, about a second, which curvature-only or two-neuron
use never needs.
"""

import importlib as _importlib
from typing import Any as _Any

from gdlr_jax._version import __version__ as __version__

# --- problems (layer 1) ---
from gdlr_jax import data as data
from gdlr_jax import linear as linear

# --- curvature (layer 2) ---
from gdlr_jax.curvature import Eigenpairs as Eigenpairs
from gdlr_jax.curvature import GdMapSpectrum as GdMapSpectrum
from gdlr_jax.curvature import LanczosResult as LanczosResult
from gdlr_jax.curvature import SpectralQuadrature as SpectralQuadrature
from gdlr_jax.curvature import bottom_eigenvalues as bottom_eigenvalues
from gdlr_jax.curvature import extreme_eigenpairs as extreme_eigenpairs
from gdlr_jax.curvature import gd_map_spectrum as gd_map_spectrum
from gdlr_jax.curvature import hessian as hessian
from gdlr_jax.curvature import hessian_matvec as hessian_matvec
from gdlr_jax.curvature import hessian_spectrum as hessian_spectrum
from gdlr_jax.curvature import hvp as hvp
from gdlr_jax.curvature import lanczos as lanczos
from gdlr_jax.curvature import log_spectral_density as log_spectral_density
from gdlr_jax.curvature import smallest_nonzero_eigenvalue as smallest_nonzero_eigenvalue
from gdlr_jax.curvature import spectral_density as spectral_density
from gdlr_jax.curvature import spectrum_counts as spectrum_counts
from gdlr_jax.curvature import stochastic_lanczos_quadrature as stochastic_lanczos_quadrature
from gdlr_jax.curvature import top_eigenvalues as top_eigenvalues

# --- dynamics (layer 3) ---
from gdlr_jax.dynamics import BoundaryDimension as BoundaryDimension
from gdlr_jax.dynamics import CriticalStepSize as CriticalStepSize
from gdlr_jax.dynamics import FixedPointStability as FixedPointStability
from gdlr_jax.dynamics import boundary_dimension as boundary_dimension
from gdlr_jax.dynamics import classify_fixed_point as classify_fixed_point
from gdlr_jax.dynamics import critical_step_size as critical_step_size
from gdlr_jax.dynamics import gd_map as gd_map
from gdlr_jax.dynamics import gd_map_eigenvalues as gd_map_eigenvalues
from gdlr_jax.dynamics import gd_map_jacobian as gd_map_jacobian
from gdlr_jax.dynamics import gd_map_slogdet as gd_map_slogdet
from gdlr_jax.dynamics import gd_map_spectral_radius as gd_map_spectral_radius
from gdlr_jax.dynamics import weak_stability_threshold as weak_stability_threshold
from gdlr_jax.dynamics import weakly_stable as weakly_stable

# --- engine (layer 4) ---
from gdlr_jax.engine import CheckpointMismatchError as CheckpointMismatchError
from gdlr_jax.engine import ChunkMemoryError as ChunkMemoryError
from gdlr_jax.engine import ConvergenceCriteria as ConvergenceCriteria
from gdlr_jax.engine import CriticalStepEstimate as CriticalStepEstimate
from gdlr_jax.engine import HostMemoryError as HostMemoryError
from gdlr_jax.engine import Minibatches as Minibatches
from gdlr_jax.engine import SweepChunk as SweepChunk
from gdlr_jax.engine import SweepPlan as SweepPlan
from gdlr_jax.engine import SweepResult as SweepResult
from gdlr_jax.engine import TrajectoryStatus as TrajectoryStatus
from gdlr_jax.engine import estimate_critical_step_size as estimate_critical_step_size
from gdlr_jax.engine import plan_sweep as plan_sweep
from gdlr_jax.engine import sweep as sweep


def __getattr__(name: str) -> _Any:
    """``gdlr_jax.mlp``, imported on first access (it imports Flax)."""
    if name == "mlp":
        return _importlib.import_module("gdlr_jax.mlp")
    raise AttributeError(f"module 'gdlr_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "mlp"])
