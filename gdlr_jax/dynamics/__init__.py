"""Layer 3, dynamics: the GD map ``G(theta) = theta - eta grad L(theta)``, its Jacobian, the
stability of its fixed points, weakly stable minima ``M_WS(eta)`` and ``eta_E``.

* ``_gd_map``: ``G``, ``DG = I - eta H``, its eigenvalues, spectral radius and ``slogdet``
  (Thm. 15, 20);
* ``_stability``: stability of fixed points, ``weak_stability_threshold`` and ``weakly_stable``
  (Def. 16, Thm. 17);
* ``_critical_step_size``: ``eta_E = 2 / min_M lambda_max`` of linear networks (Thm. 18, 21);
* ``_boundary_dimension``: the box-counting dimension of the boundary between the classes of
  a 2-D grid of statuses (fractal trainability boundaries; beyond the paper).

Imports only layers 1-2.
"""

from gdlr_jax.dynamics._boundary_dimension import BoundaryDimension as BoundaryDimension
from gdlr_jax.dynamics._boundary_dimension import boundary_dimension as boundary_dimension
from gdlr_jax.dynamics._critical_step_size import CriticalStepSize as CriticalStepSize
from gdlr_jax.dynamics._critical_step_size import critical_step_size as critical_step_size
from gdlr_jax.dynamics._gd_map import gd_map as gd_map
from gdlr_jax.dynamics._gd_map import gd_map_eigenvalues as gd_map_eigenvalues
from gdlr_jax.dynamics._gd_map import gd_map_jacobian as gd_map_jacobian
from gdlr_jax.dynamics._gd_map import gd_map_slogdet as gd_map_slogdet
from gdlr_jax.dynamics._gd_map import gd_map_spectral_radius as gd_map_spectral_radius
from gdlr_jax.dynamics._stability import FixedPointStability as FixedPointStability
from gdlr_jax.dynamics._stability import classify_fixed_point as classify_fixed_point
from gdlr_jax.dynamics._stability import weak_stability_threshold as weak_stability_threshold
from gdlr_jax.dynamics._stability import weakly_stable as weakly_stable
