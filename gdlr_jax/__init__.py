"""gdlr_jax: gradient descent with large step sizes, in JAX.

Layers (each imports only the ones listed before it):

1. problems   -- ``gdlr_jax.linear`` (linear networks, two-neuron, deep scalar),
                 ``gdlr_jax.mlp`` (Flax MLPs as pure losses), ``gdlr_jax.data`` (MNIST);
2. curvature  -- dense Hessians and spectra, Hessian-vector products, Lanczos;
3. dynamics   -- the GD map, its Jacobian, stability of fixed points, M_WS, eta_E;
4. engine     -- batched trajectories over (initialisation x step size) grids;
5. experiments -- configs, runs, results files and figures; the ``gdlr`` command line.

The whole public API is re-exported here.
"""

__version__ = "0.1.0"  # before the imports: submodules read it

from gdlr_jax import linear as linear
from gdlr_jax import data as data
from gdlr_jax import mlp as mlp

# --- curvature (layer 2) ---
from gdlr_jax._hessian import hessian as hessian
from gdlr_jax._hessian import hessian_spectrum as hessian_spectrum
from gdlr_jax._hessian import spectrum_counts as spectrum_counts

# --- dynamics (layer 3) ---
from gdlr_jax._gd_map import gd_map as gd_map
from gdlr_jax._gd_map import gd_map_eigenvalues as gd_map_eigenvalues
from gdlr_jax._gd_map import gd_map_jacobian as gd_map_jacobian
from gdlr_jax._gd_map import gd_map_slogdet as gd_map_slogdet
from gdlr_jax._gd_map import gd_map_spectral_radius as gd_map_spectral_radius
from gdlr_jax._stability import FixedPointStability as FixedPointStability
from gdlr_jax._stability import classify_fixed_point as classify_fixed_point
from gdlr_jax._stability import weak_stability_threshold as weak_stability_threshold
from gdlr_jax._stability import weakly_stable as weakly_stable
from gdlr_jax._critical_step_size import CriticalStepSize as CriticalStepSize
from gdlr_jax._critical_step_size import critical_step_size as critical_step_size

# --- matrix-free curvature (layer 2, issue 6) ---
from gdlr_jax._hvp import hvp as hvp
from gdlr_jax._hvp import hessian_matvec as hessian_matvec
from gdlr_jax._lanczos import LanczosResult as LanczosResult
from gdlr_jax._lanczos import lanczos as lanczos
from gdlr_jax._extreme_eigenvalues import GdMapSpectrum as GdMapSpectrum
from gdlr_jax._extreme_eigenvalues import bottom_eigenvalues as bottom_eigenvalues
from gdlr_jax._extreme_eigenvalues import gd_map_spectrum as gd_map_spectrum
from gdlr_jax._extreme_eigenvalues import (
    smallest_nonzero_eigenvalue as smallest_nonzero_eigenvalue,
)
from gdlr_jax._extreme_eigenvalues import top_eigenvalues as top_eigenvalues
from gdlr_jax._spectral_density import SpectralQuadrature as SpectralQuadrature
from gdlr_jax._spectral_density import log_spectral_density as log_spectral_density
from gdlr_jax._spectral_density import spectral_density as spectral_density
from gdlr_jax._spectral_density import (
    stochastic_lanczos_quadrature as stochastic_lanczos_quadrature,
)

# --- engine (layer 4, issue 3) ---
from gdlr_jax._checkpoint import CheckpointMismatchError as CheckpointMismatchError
from gdlr_jax._minibatches import Minibatches as Minibatches
from gdlr_jax._sweep import ChunkMemoryError as ChunkMemoryError
from gdlr_jax._sweep import HostMemoryError as HostMemoryError
from gdlr_jax._sweep import SweepChunk as SweepChunk
from gdlr_jax._sweep import SweepPlan as SweepPlan
from gdlr_jax._sweep import SweepResult as SweepResult
from gdlr_jax._sweep import plan_sweep as plan_sweep
from gdlr_jax._sweep import sweep as sweep
from gdlr_jax._trajectory_status import ConvergenceCriteria as ConvergenceCriteria
from gdlr_jax._trajectory_status import TrajectoryStatus as TrajectoryStatus

