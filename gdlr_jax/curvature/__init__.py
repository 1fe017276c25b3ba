"""Layer 2, curvature: dense Hessians and their spectra, Hessian-vector products, Lanczos.

* ``_hessian``: dense Hessians, spectra and eigenvalue counts (small models, float64);
* ``_hvp``: Hessian-vector products (forward over reverse) and matvecs of flat vectors;
* ``_lanczos``: the Lanczos tridiagonalisation with full reorthogonalisation, compiled once per
  (operator function, shapes, options); its inputs checked in ``_lanczos_inputs``, its loop
  in ``_lanczos_core``, its Ritz pairs and results in ``_lanczos_ritz``;
* ``_extreme_eigenvalues``: top/bottom eigenpairs with residual bounds and a tolerance stop,
  and the spectrum of ``DG = I - eta H``;
* ``_spectral_density``: stochastic Lanczos quadrature and the spectral density.

Imports only layer 1 (problems).
"""

from gdlr_jax.curvature._extreme_eigenvalues import Eigenpairs as Eigenpairs
from gdlr_jax.curvature._extreme_eigenvalues import GdMapSpectrum as GdMapSpectrum
from gdlr_jax.curvature._extreme_eigenvalues import bottom_eigenvalues as bottom_eigenvalues
from gdlr_jax.curvature._extreme_eigenvalues import extreme_eigenpairs as extreme_eigenpairs
from gdlr_jax.curvature._extreme_eigenvalues import gd_map_spectrum as gd_map_spectrum
from gdlr_jax.curvature._extreme_eigenvalues import (
    smallest_nonzero_eigenvalue as smallest_nonzero_eigenvalue,
)
from gdlr_jax.curvature._extreme_eigenvalues import top_eigenvalues as top_eigenvalues
from gdlr_jax.curvature._hessian import hessian as hessian
from gdlr_jax.curvature._hessian import hessian_spectrum as hessian_spectrum
from gdlr_jax.curvature._hessian import spectrum_counts as spectrum_counts
from gdlr_jax.curvature._hvp import hessian_matvec as hessian_matvec
from gdlr_jax.curvature._hvp import hvp as hvp
from gdlr_jax.curvature._lanczos import LanczosResult as LanczosResult
from gdlr_jax.curvature._lanczos import lanczos as lanczos
from gdlr_jax.curvature._spectral_density import SpectralQuadrature as SpectralQuadrature
from gdlr_jax.curvature._spectral_density import log_spectral_density as log_spectral_density
from gdlr_jax.curvature._spectral_density import spectral_density as spectral_density
from gdlr_jax.curvature._spectral_density import (
    stochastic_lanczos_quadrature as stochastic_lanczos_quadrature,
)
