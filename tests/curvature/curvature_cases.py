"""Small operators with known spectra, shared by the matrix-free curvature tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from gdlr_jax.linear import LinearNetwork
from gdlr_jax.mlp import init_mlp_params, mlp_loss


def symmetric_with_spectrum(eigenvalues, seed: int = 0) -> jnp.ndarray:
    """``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q`` (float64)."""
    eigenvalues = np.asarray(eigenvalues, np.float64)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(eigenvalues.size,) * 2))
    return jnp.asarray((q * eigenvalues) @ q.T)


# Negative, repeated and clustered eigenvalues; |lambda_min| = 12 > lambda_max = 5.
SPECTRUM = np.concatenate([[-12.0, -3.0, -3.0, 0.0, 0.0, 4.0, 4.5, 5.0], np.linspace(-1, 1, 52)])


def small_mlp(n: int = 24, in_features: int = 6, width: int = 5, depth: int = 2, seed: int = 0):
    """A GELU MLP of :mod:`gdlr_jax.mlp` on random data: ``(loss_fn(params, batch), params,
    batch)``, float64, ``d = in*w + w + (depth-1)(w*w + w) + 2w + 2``."""
    graphdef, params = init_mlp_params(
        jax.random.key(seed), 1, depth=depth, width=width, in_features=in_features, out_features=2
    )
    params = jax.tree.map(lambda p: p[0].astype(jnp.float64), params)
    rng = np.random.default_rng(seed)
    batch = (jnp.asarray(rng.normal(size=(n, in_features))), jnp.asarray(rng.integers(0, 2, n)))
    return mlp_loss(graphdef, loss="mse"), params, batch


def linear_network_at_minimum(widths=(4, 3, 3, 2), n: int = 9, seed: int = 0):
    """A point ``theta`` of the minima manifold M of a linear network, its loss, and rows
    spanning the tangent space ``T_theta M`` (= the Hessian's null space, Prop. 10).

    The tangent space is the column space of the Jacobian of the chart of M
    (``LinearNetwork.minimum_from_coordinates``), independent of the Hessian.

    Returns:
        ``(net, params, null_space (dim M, d))``.
    """
    rng = np.random.default_rng(seed)
    net = LinearNetwork(widths, rng.normal(size=(widths[0], n)), rng.normal(size=(widths[-1], n)))
    coords = net.sample_coordinates(jax.random.key(seed))
    flat_coords, unravel = ravel_pytree(coords)
    chart = lambda c: ravel_pytree(net.minimum_from_coordinates(unravel(c)))[0]  # noqa: E731
    jacobian = jax.jit(jax.jacfwd(chart))(flat_coords)
    u, _, _ = np.linalg.svd(np.asarray(jacobian))
    return net, net.minimum_from_coordinates(coords), jnp.asarray(u[:, : net.minima_dim].T)


@contextlib.contextmanager
def count_compilations() -> Iterator[list[float]]:
    """Collects one entry per XLA compilation inside the block (``jax.monitoring``).

    An executable read from the persistent compilation cache (tests/conftest.py) counts too:
    it stands for a compilation the code asked for.
    """
    compilations: list[float] = []

    def listener(event: str, duration: float, **_: object) -> None:
        if event in {
            "/jax/core/compile/backend_compile_duration",
            "/jax/compilation_cache/compile_time_saved_sec",
        }:
            compilations.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compilations
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
