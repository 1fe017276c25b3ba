"""Spectral density of a Hessian by stochastic Lanczos quadrature (layer 2: curvature).

The empirical spectral measure ``phi(t) = (1/d) sum_i delta(t - lambda_i)`` is estimated from
random probes ``v``: for a unit vector ``u = v / ||v||`` uniform on the sphere (Gaussian
probes) or a normalised Rademacher vector, ``E[u^T f(H) u] = (1/d) tr f(H)``, and ``m`` Lanczos
steps from ``u`` give the ``m``-node Gauss quadrature of the measure ``u^T delta(t - H) u``:
nodes the Ritz values ``theta_i`` and weights ``tau_i^2``, the squared first components of the
eigenvectors of the tridiagonal ``T`` (exact for polynomials of degree ``< 2m``; Golub & Meurant,
Ubaru, Chen & Saad 2017, Ghorbani, Krishnan & Xiao 2019). Averaging over probes and broadening
each node by a Gaussian of width ``sigma`` gives a smooth density that integrates to 1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from gdlr_jax.curvature._hessian import PyTree
from gdlr_jax.curvature._lanczos_core import run_core
from gdlr_jax.curvature._lanczos_inputs import (
    CoreSpec,
    Operator,
    check_num_iterations,
    default_rtol,
    prepare_operator,
)

PROBES = ("rademacher", "gaussian")


class SpectralQuadrature(NamedTuple):
    """Gauss quadrature rules of the spectral measure, one per probe.

    Attributes:
        nodes: ``(num_probes, m)`` Ritz values of each probe's Lanczos run.
        weights: ``(num_probes, m)`` squared first components ``tau_i^2``; each row sums to 1.
    """

    nodes: Float[Array, "probes m"]
    weights: Float[Array, "probes m"]


def stochastic_lanczos_quadrature(
    operator: Operator,
    params: PyTree | None = None,
    *,
    num_iterations: int,
    num_probes: int,
    key: PRNGKeyArray | None = None,
    probe: str = "rademacher",
    float64_state: bool = False,
) -> SpectralQuadrature:
    """Quadrature nodes and weights of ``H``'s spectral measure from random probes.

    ``num_probes`` single-vector Lanczos runs (full reorthogonalisation, as
    :func:`gdlr_jax.lanczos`) advanced together in one loop, each iteration one product per
    probe (the probes' products batched by ``jax.vmap``, so a loss's primal pass is shared).
    Cost: ``num_probes * num_iterations`` Hessian-vector products. Compiled once per
    (function, shapes, options).

    Args:
        operator, params: a dense matrix, a loss with its params, or a matvec with a flat
            ``(d,)`` vector (``gdlr_jax.curvature._lanczos``).
        num_iterations: ``m``, Lanczos steps per probe (static, ``1 <= m <= d``); 80-100 resolve
            the outliers and the bulk of a network's Hessian.
        num_probes: number of probes (static); the variance of the density falls as
            ``1 / (num_probes d)``.
        key: PRNG key of the probes (``jax.random.split(key)[0]``) and of the breakdown
            restarts; None means ``jax.random.key(0)`` (as in every curvature routine).
        probe: ``"rademacher"`` (entries +-1) or ``"gaussian"``.
        float64_state: accumulate the Lanczos state in float64 (needs x64) instead of the
            products' dtype (static).

    Returns:
        A :class:`SpectralQuadrature` in the state dtype.

    Raises:
        ValueError: on a malformed operator, counts or probe kind.
    """
    op = prepare_operator(operator, params)
    m = check_num_iterations(num_iterations, 1, op.dim)
    if (
        isinstance(num_probes, bool)
        or not isinstance(num_probes, (int, np.integer))
        or num_probes < 1
    ):
        raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}.")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}.")
    spec = CoreSpec.of(
        op,
        float64_state,
        num_iterations=m,
        block_size=1,
        lanes=int(num_probes),
        start="rademacher" if probe == "rademacher" else "normal",
        wanted=(0, 0),
        stop=False,
        output="quadrature",
        return_vectors=False,
        flat_vectors=True,
    )
    nodes, weights = run_core(spec, op.operand, None, key, default_rtol(op.dtype))
    return SpectralQuadrature(nodes, weights)


def _gaussian_mixture(
    grid: Float[Array, " g"],
    centres: Float[Array, "probes m"],
    weights: Float[Array, "probes m"],
    sigma: float,
) -> Float[Array, " g"]:
    """``(1 / P) sum_{l, i} w_li N(x; c_li, sigma^2)`` on the grid."""
    z = (grid[:, None, None] - centres[None]) / sigma
    kernel = jnp.exp(-0.5 * z**2) / (sigma * np.sqrt(2 * np.pi))
    return jnp.sum(kernel * weights[None], axis=(1, 2)) / centres.shape[0]


def _check_grid_sigma(grid: ArrayLike, sigma: float) -> Float[Array, " g"]:
    grid = jnp.asarray(grid)
    if grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(f"grid must be a 1-D array of at least 2 points, got shape {grid.shape}.")
    if not (isinstance(sigma, (int, float, np.floating)) and np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}.")
    return grid


def spectral_density(
    quadrature: SpectralQuadrature, grid: Float[Array, " g"], sigma: float
) -> Float[Array, " g"]:
    """Gaussian-broadened spectral density on a grid of eigenvalues.

    ``phi_sigma(t) = (1 / P) sum_l sum_i tau_li^2 N(t; theta_li, sigma^2)``: an estimate of
    ``(1/d) sum_j N(t; lambda_j, sigma^2)``, which integrates to 1 over the real line.

    Args:
        quadrature: from :func:`stochastic_lanczos_quadrature`.
        grid: ``(g,)`` points ``t``.
        sigma: the broadening width, in units of eigenvalues (a few grid spacings).

    Returns:
        ``(g,)`` density values.
    """
    grid = _check_grid_sigma(grid, sigma)
    return _gaussian_mixture(grid, quadrature.nodes, quadrature.weights, sigma)


def log_spectral_density(
    quadrature: SpectralQuadrature, log10_grid: Float[Array, " g"], sigma: float
) -> tuple[Float[Array, " g"], Float[Array, " g"]]:
    """The log-scale view: densities of ``s = log10 |lambda|`` for positive and negative parts.

    Near a minimum most eigenvalues crowd near 0 over several orders of magnitude, which a
    linear grid cannot show; on ``s = log10 |lambda|`` the bulk spreads out. Each node is
    broadened by ``N(s; log10 |theta|, sigma^2)`` (``sigma`` in decades) and put in the positive
    or the negative part by its sign; nodes equal to 0 fall out. Together the two parts
    integrate to the fraction of non-zero spectral mass, ``<= 1``.

    The view is only as fine as the quadrature: the ``m`` nodes of a probe are spaced on the
    linear scale (about ``||H|| / m^2`` apart near an end of the spectrum -- at a minimum 0 is
    the bottom end -- and ``||H|| / m`` inside it), so eigenvalues closer to 0 than that are
    not placed individually; their mass shows up at the nodes nearest 0, and when ``H`` is
    indefinite possibly on the wrong side of 0.

    Args:
        quadrature: from :func:`stochastic_lanczos_quadrature`.
        log10_grid: ``(g,)`` points ``s`` (decades), e.g. ``jnp.linspace(-8, 2, 400)``.
        sigma: broadening width in decades.

    Returns:
        ``(positive, negative)``, each ``(g,)``: the densities of ``log10 lambda`` over
        ``lambda > 0`` and of ``log10 (-lambda)`` over ``lambda < 0``.
    """
    grid = _check_grid_sigma(log10_grid, sigma)
    nodes, weights = quadrature
    nonzero = nodes != 0
    logs = jnp.log10(jnp.where(nonzero, jnp.abs(nodes), 1))
    positive = _gaussian_mixture(grid, logs, jnp.where(nodes > 0, weights, 0), sigma)
    negative = _gaussian_mixture(grid, logs, jnp.where(nodes < 0, weights, 0), sigma)
    return positive, negative
