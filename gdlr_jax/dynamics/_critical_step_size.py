"""The critical step size ``eta_E`` of a linear network, computed (layer 3; beyond the paper).

For ``eta > eta_E = 2 / min_{theta in M} lambda_max(H_L(theta))`` no global minimum is weakly
stable (Def. 16 with the ``lambda_max`` criterion), and almost no initialisation converges to
one (Thm. 18, 21). The paper gives ``eta_E = 1`` for ``1/2 (1 - xy)^2``; here it is computed
for any architecture and data by minimising ``lambda_max`` over M, and compared with the closed
forms that exist (``docs/theory.md``):

* depth 1: M is one point and ``eta_E = 1 / (scale * lambda_max(X X^T))``;
* filling networks with whitened data, ``X X^T = c I`` (every network with ``d_0 = 1``):
  ``eta_E = 1 / (scale * c * h * sigma_1(W*)^(2 - 2/h))``, attained at balanced points
  (``W_i^T W_i = W_{i-1} W_{i-1}^T`` with equal singular values ``sigma_1^(1/h)``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from gdlr_jax.curvature._hessian import hessian
from gdlr_jax.problems.linear import LinearNetwork


class CriticalStepSize(NamedTuple):
    """The result of :func:`critical_step_size`.

    Attributes:
        eta: ``2 / lambda_max``: the critical step size found. Because ``params`` is an actual
            point of M, ``eta`` is a certified lower bound of the exact ``eta_E`` (up to the
            rounding with which ``params`` lies on M); the optimisation makes it tight.
        lambda_max: ``lambda_max(H_L(params))``, the smallest sharpness found on M.
        params: the minimiser found, ``[W_1, ..., W_h]`` on M.
        closed_form: the exact ``eta_E`` when a closed form is known for this network and
            data (see the module docstring), else None.
        restart_lambda_max: ``(restarts,)`` the best ``lambda_max`` of each restart (their
            spread shows whether the landscape has several local minima).
    """

    eta: float
    lambda_max: float
    params: list
    closed_form: float | None
    restart_lambda_max: Float[Array, " restarts"]


def closed_form_critical_step_size(network: "LinearNetwork") -> float | None:
    """``eta_E`` in closed form where one is known, else None (see the module docstring)."""
    x = np.asarray(network.X, np.float64)
    xxt = x @ x.T
    s, h = network.scale, network.depth
    if h == 1:
        return 1.0 / (s * float(np.linalg.eigvalsh(xxt)[-1]))
    c = float(np.trace(xxt)) / xxt.shape[0]
    whitened = np.allclose(xxt, c * np.eye(xxt.shape[0]), rtol=1e-12, atol=0.0)
    if not (network.is_filling and whitened):
        return None
    sigma_1 = float(np.linalg.norm(np.asarray(network.target(), np.float64), 2))
    return 1.0 / (s * c * h * sigma_1 ** (2.0 - 2.0 / h))


def critical_step_size(
    network: "LinearNetwork",
    *,
    key: PRNGKeyArray | None = None,
    restarts: int = 8,
    steps: int = 1500,
    learning_rate: float = 0.03,
    spread: float = 0.5,
) -> CriticalStepSize:
    """``eta_E = 2 / min_{theta in M} lambda_max(H_L(theta))`` for a linear network.

    Minimises ``lambda_max(H_L(theta))`` over M through the chart
    :meth:`LinearNetwork.minimum_from_coordinates` (so every iterate lies on M exactly, up to
    rounding): Adam on the coordinates, ``restarts`` random starts run in parallel (vmap).
    ``lambda_max`` is not differentiable where the top eigenvalues cross, which is typical at
    the optimum; the objective is its soft maximum
    ``sum_i w_i lambda_i, w = softmax((lambda - lambda_max) / tau)`` with gradient
    ``sum_i w_i v_i^T dH v_i`` (Hellmann-Feynman) and a temperature ``tau`` annealed from
    ``1e-1`` to ``1e-6`` times ``lambda_max``. The best exact ``lambda_max`` seen over all
    iterates and restarts is returned with its point.

    Args:
        network: a :class:`gdlr_jax.linear.LinearNetwork` with ``rank W* = r``.
        key: PRNG key for the starts (default ``PRNGKey(0)``).
        restarts: number of random starts (``>= 1``).
        steps: Adam steps per start (``>= 1``).
        learning_rate: peak Adam learning rate (cosine decay to 1% of it).
        spread: spread of the random starts, as in :meth:`LinearNetwork.sample_minimum`.

    Returns:
        A :class:`CriticalStepSize`; ``closed_form`` holds the exact value where known.

    Raises:
        ValueError: before any compute, on a ``network`` that is not a ``LinearNetwork``, or
            ``restarts``, ``steps``, ``learning_rate`` or ``spread`` out of range.
    """
    if not isinstance(network, LinearNetwork):
        raise ValueError(
            f"network must be a gdlr_jax.linear.LinearNetwork, got {type(network).__name__}."
        )
    for name, value in (("restarts", restarts), ("steps", steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not (
        isinstance(learning_rate, (int, float))
        and math.isfinite(learning_rate)
        and learning_rate > 0
    ):
        raise ValueError(f"learning_rate must be positive and finite, got {learning_rate!r}.")
    key = jax.random.PRNGKey(0) if key is None else key
    closed_form = closed_form_critical_step_size(network)
    if network.depth == 1:  # M is the single point W_1 = W*
        params = [network.target()]
        lam = float(jnp.linalg.eigvalsh(hessian(network.loss, params))[-1])
        return CriticalStepSize(2.0 / lam, lam, params, closed_form, jnp.array([lam]))

    start_keys = jax.random.split(key, restarts)

    def hessian_at(coords: Any) -> Float[Array, "d d"]:
        return hessian(network.loss, network.minimum_from_coordinates(coords))

    schedule = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.01)
    optimizer = optax.adam(schedule)
    log_tau = jnp.linspace(math.log(1e-1), math.log(1e-6), steps)

    def one_start(k: PRNGKeyArray) -> tuple[Float[Array, ""], Any]:
        coords0 = network.sample_coordinates(k, spread=spread)

        def step(carry, log_tau_t):
            coords, opt_state, best_lam, best_coords = carry
            h = hessian_at(coords)
            lam, vecs = jnp.linalg.eigh(h)
            lam_max = lam[-1]
            weights = jax.nn.softmax((lam - lam_max) / (jnp.exp(log_tau_t) * lam_max))
            projector = jax.lax.stop_gradient((vecs * weights[None, :]) @ vecs.T)
            grads = jax.grad(lambda c: jnp.sum(hessian_at(c) * projector))(coords)
            updates, opt_state = optimizer.update(grads, opt_state, coords)
            better = lam_max < best_lam
            best_lam = jnp.where(better, lam_max, best_lam)
            best_coords = jax.tree_util.tree_map(
                lambda b, c: jnp.where(better, c, b), best_coords, coords
            )
            return (optax.apply_updates(coords, updates), opt_state, best_lam, best_coords), None

        init = (coords0, optimizer.init(coords0), jnp.array(jnp.inf, network.dtype), coords0)
        (_, _, best_lam, best_coords), _ = jax.lax.scan(step, init, log_tau)
        return best_lam, best_coords

    best_lams, best_coords = jax.jit(jax.vmap(one_start))(start_keys)
    i = int(jnp.argmin(jnp.where(jnp.isfinite(best_lams), best_lams, jnp.inf)))
    coords = jax.tree_util.tree_map(lambda c: c[i], best_coords)
    params = network.minimum_from_coordinates(coords)
    lam = float(jnp.linalg.eigvalsh(hessian(network.loss, params))[-1])
    return CriticalStepSize(2.0 / lam, lam, params, closed_form, best_lams)

