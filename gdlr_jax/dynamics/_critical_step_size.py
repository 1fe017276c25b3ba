"""The critical step size ``eta_E`` of a linear network, computed (layer 3; beyond the paper).

For ``eta > eta_E = 2 / min_{theta in M} lambda_max(H_L(theta))`` no global minimum is weakly
stable (Def. 16 with the ``lambda_max`` criterion), and almost no initialisation converges to
one (Thm. 18, 21). The paper gives ``eta_E = 1`` for ``1/2 (1 - xy)^2``; here it is computed
for any architecture and data by minimising ``lambda_max`` over M, and compared with the closed
forms that exist (``docs/theory.md``):

* depth 1: M is one point and ``eta_E = 1 / (scale * lambda_max(X X^T))``;
* whitened data, ``X X^T = c I`` (every network with ``d_0 = 1``), filling or not:
  ``eta_E = 1 / (scale * c * h * sigma_1(W*)^(2 - 2/h))``, attained at balanced points
  (``W_i = O_i Sigma_r^(1/h) O_{i-1}^T`` from the truncated SVD of ``W*``); proof sketch in
  ``docs/theory.md``.

Elsewhere the minimisation over M is numerical: Adam on a soft maximum of the eigenvalues
(first order, robust from random starts), then a second-order polish of every restart
(:func:`_polish`: damped Newton on ``tau log tr exp(H / tau)`` with ``tau -> 0``), then SLSQP
on the epigraph ``min t s.t. t >= lambda_i`` from the best restart (:func:`_epigraph_polish`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
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
        restart_lambda_max: ``(restarts,)`` the best ``lambda_max`` of each restart, after
            its polish (their spread shows whether the landscape has several local minima).
        restart_spread: ``max / min - 1`` of ``restart_lambda_max`` (0 for one restart).
            :func:`critical_step_size` warns when it exceeds ``restart_rtol`` (no closed form).
    """

    eta: float
    lambda_max: float
    params: list
    closed_form: float | None
    restart_lambda_max: Float[Array, " restarts"]
    restart_spread: float


def closed_form_critical_step_size(network: "LinearNetwork") -> float | None:
    """``eta_E`` in closed form where one is known, else None (see the module docstring).

    Depth 1: ``1 / (scale * lambda_max(X X^T))``. Whitened data ``X X^T = c I`` (every entry
    within ``1e-12 c``), any depth and any widths, filling or not:
    ``1 / (scale * c * h * sigma_1(W*)^(2 - 2/h))``. Otherwise None.
    """
    x = np.asarray(network.X, np.float64)
    xxt = x @ x.T
    s, h = network.scale, network.depth
    if h == 1:
        return 1.0 / (s * float(np.linalg.eigvalsh(xxt)[-1]))
    c = float(np.trace(xxt)) / xxt.shape[0]
    # entrywise relative to c: the off-diagonal round-off of a whitened X is not exactly 0
    whitened = bool(np.max(np.abs(xxt - c * np.eye(xxt.shape[0]))) <= 1e-12 * c)
    if not whitened:
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
    polish: bool = True,
    restart_rtol: float = 1e-8,
) -> CriticalStepSize:
    """``eta_E = 2 / min_{theta in M} lambda_max(H_L(theta))`` for a linear network.

    Minimises ``lambda_max(H_L(theta))`` over M through the chart
    :meth:`LinearNetwork.minimum_from_coordinates` (so every iterate lies on M exactly, up to
    rounding): Adam on the coordinates, ``restarts`` random starts run in parallel (vmap).
    ``lambda_max`` is not differentiable where the top eigenvalues cross, which is typical at
    the optimum; the objective is its soft maximum
    ``sum_i w_i lambda_i, w = softmax((lambda - lambda_max) / tau)`` with gradient
    ``sum_i w_i v_i^T dH v_i`` (Hellmann-Feynman) and a temperature ``tau`` annealed from
    ``1e-1`` to ``1e-6`` times ``lambda_max``. Adam converges only to about ``1e-5``
    (relative) on this non-smooth objective, so each restart is then polished to second order
    (``polish``), and the best restart once more on the epigraph of its top eigenvalues. The best
    exact ``lambda_max`` seen over all iterates and restarts, at a point on M, is returned with
    its point.

    Args:
        network: a :class:`gdlr_jax.linear.LinearNetwork` with ``rank W* = r``.
        key: PRNG key for the starts (default ``PRNGKey(0)``).
        restarts: number of random starts (``>= 1``).
        steps: Adam steps per start (``>= 1``).
        learning_rate: peak Adam learning rate (cosine decay to 1% of it).
        spread: spread of the random starts, as in :meth:`LinearNetwork.sample_minimum`.
        polish: after Adam, polish every restart to second order (:func:`_polish`): damped
            Newton in the chart coordinates on the smooth ``F_tau = tau log tr exp(H / tau)``
            (``lambda_max <= F_tau <= lambda_max + tau log d``), ``tau`` from ``1e-4`` down to
            ``1e-12`` times ``lambda_max``. In float64 this brings ``eta`` to ``1e-12``
            relative of a non-degenerate local optimum; it can stall ``~5e-8`` above the
            optimum in a flat valley where top eigenvalues coalesce (measured,
            ``docs/theory.md``), so the best restart is then polished once more by SLSQP on
            the epigraph ``min t s.t. t - lambda_i(H) >= 0`` for the top eigenvalues
            (:func:`_epigraph_polish`, ``scipy.optimize``), which walks such valleys; the
            better of the two points is kept. Skipped where a
            closed form is known (it is exact; Adam alone matches it to ``1e-7`` or better),
            since its compilation (third derivatives through the chart) costs seconds.
        restart_rtol: a ``RuntimeWarning`` is issued when the restarts' ``lambda_max``
            disagree by more than this (relative): several local minima, a restart stalled in
            a flat valley, or too few steps. Polished restarts that reach the same optimum
            agree to ``~1e-11`` (measured), so the default ``1e-8`` flags every disagreement
            at the accuracy the polish aims for. Only where no closed form is known
            (elsewhere ``closed_form`` is the check, and the unpolished restarts differ by
            ``~1e-5``).

    Returns:
        A :class:`CriticalStepSize`; ``closed_form`` holds the exact value where known,
        ``restart_spread`` the relative spread of the restarts.

    Raises:
        ValueError: before any compute, on a ``network`` that is not a ``LinearNetwork``, or
            ``restarts``, ``steps``, ``learning_rate``, ``spread``, ``polish`` or
            ``restart_rtol`` out of range.

    Warns:
        RuntimeWarning: when ``restart_spread > restart_rtol`` and no closed form is known.
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
    if not isinstance(polish, bool):
        raise ValueError(f"polish must be a bool, got {polish!r}.")
    if not (
        isinstance(restart_rtol, (int, float))
        and not isinstance(restart_rtol, bool)
        and restart_rtol >= 0
    ):
        raise ValueError(f"restart_rtol must be a non-negative number, got {restart_rtol!r}.")
    key = jax.random.PRNGKey(0) if key is None else key
    closed_form = closed_form_critical_step_size(network)
    if network.depth == 1:  # M is the single point W_1 = W*
        params = [network.target()]
        lam = float(jnp.linalg.eigvalsh(hessian(network.loss, params))[-1])
        return CriticalStepSize(2.0 / lam, lam, params, closed_form, jnp.array([lam]), 0.0)

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
    if polish and closed_form is None:
        unravel = ravel_pytree(jax.tree_util.tree_map(lambda c: c[0], best_coords))[1]
        flats = np.asarray(jax.vmap(lambda c: ravel_pytree(c)[0])(best_coords))
        terms = _soft_max_terms(network, unravel)
        polished = [_polish(terms, x) for x in flats]
        j = int(np.argmin([lam if np.isfinite(lam) else np.inf for lam, _ in polished]))
        if np.isfinite(polished[j][0]):
            polished[j] = _epigraph_polish(network, unravel, polished[j][1])
        best_lams = jnp.array([lam for lam, _ in polished], network.dtype)
        best_coords = jax.vmap(unravel)(jnp.asarray(np.stack([x for _, x in polished])))
    finite = jnp.where(jnp.isfinite(best_lams), best_lams, jnp.inf)
    i = int(jnp.argmin(finite))
    coords = jax.tree_util.tree_map(lambda c: c[i], best_coords)
    params = network.minimum_from_coordinates(coords)
    lam = float(jnp.linalg.eigvalsh(hessian(network.loss, params))[-1])
    spread_ = float(jnp.max(finite) / jnp.min(finite) - 1.0)
    if closed_form is None and not spread_ <= restart_rtol:
        warnings.warn(
            f"critical_step_size: the {restarts} restarts disagree: lambda_max from "
            f"{float(jnp.min(finite)):.10g} to {float(jnp.max(finite)):.10g} (relative spread "
            f"{spread_:.3g} > restart_rtol={restart_rtol:g}); lambda_max has several local "
            "minima on M (or a restart stalled or did not converge). The best is returned "
            "(eta is still a certified lower bound of eta_E); more restarts make it more "
            "likely global.",
            RuntimeWarning,
            stacklevel=2,
        )
    return CriticalStepSize(2.0 / lam, lam, params, closed_form, best_lams, spread_)


# ----- the second-order polish -----------------------------------------------------------------
#: temperatures of the polish, relative to lambda_max: the soft maximum F_tau overestimates
#: lambda_max by at most tau log d, so the last one bounds the error of a converged polish.
_POLISH_TAUS = (1e-4, 1e-6, 1e-8, 1e-10, 1e-12)


def _chart_maps(
    network: LinearNetwork, unravel: Callable[[Float[Array, " p"]], Any]
) -> tuple[Callable[..., Array], Callable[..., Array]]:
    """``x -> H(x)``, the Hessian of the loss at the point ``chart(unravel(x))`` of M, and
    ``x -> off_M = ||W_h ... W_1 - W*|| / ||W*||`` there (the chart uses pseudo-inverses: near
    a rank drop of its factors it leaves M, and such points are no witnesses)."""

    def hessian_at(x: Float[Array, " p"]) -> Float[Array, "d d"]:
        return hessian(network.loss, network.minimum_from_coordinates(unravel(x)))

    def off_m(x: Float[Array, " p"]) -> Float[Array, ""]:
        target = network.target()
        point = network.minimum_from_coordinates(unravel(x))
        return jnp.linalg.norm(network.product(point) - target) / jnp.linalg.norm(target)

    return hessian_at, off_m


def _soft_max_terms(
    network: LinearNetwork, unravel: Callable[[Float[Array, " p"]], Any]
) -> Callable[..., tuple[Array, Array, Array, Array, Array]]:
    """``(x, tau) -> (F, grad F, Hess F, lambda_max, off_M)`` for
    ``F = tau log tr exp(H(x) / tau)``, ``H(x)`` and ``off_M`` as in :func:`_chart_maps`.

    ``F`` is smooth, ``lambda_max <= F <= lambda_max + tau log d``. With ``H = V diag(lam) V^T``,
    ``w = softmax(lam / tau)`` and ``A_k = V^T (dH/dx_k) V``, the Daleckii-Krein formula gives
    ``grad_k = sum_i w_i (A_k)_ii`` and
    ``Hess_kl = tr(W d^2H/dx_k dx_l) + sum_ij G_ij (A_k)_ij (A_l)_ij - grad_k grad_l / tau``,
    ``W = V diag(w) V^T``, ``G_ij = (w_i - w_j) / (lam_i - lam_j)`` (``(w_i + w_j) / (2 tau)``
    for ``|lam_i - lam_j| <= 1e-4 tau``, the limit ``w_i / tau``). No derivative of an
    eigenvector is taken, so degenerate eigenvalues (the ``dim M`` zeros) are harmless.
    """

    hessian_at, off_m_at = _chart_maps(network, unravel)

    def terms(x: Float[Array, " p"], tau: Float[Array, ""]):
        off_m = off_m_at(x)
        h = hessian_at(x)
        lam, vecs = jnp.linalg.eigh(h)
        top = lam[-1]
        w = jax.nn.softmax((lam - top) / tau)
        f = top + tau * jnp.log(jnp.sum(jnp.exp((lam - top) / tau)))
        weight = (vecs * w[None, :]) @ vecs.T
        a = jnp.einsum("ji,jkp,kl->ilp", vecs, jax.jacfwd(hessian_at)(x), vecs)
        grad = jnp.einsum("iip,i->p", a, w)
        diff = lam[:, None] - lam[None, :]
        close = jnp.abs(diff) <= 1e-4 * tau
        gamma = jnp.where(
            close,
            (w[:, None] + w[None, :]) / (2.0 * tau),
            (w[:, None] - w[None, :]) / jnp.where(close, 1.0, diff),
        )
        second = jax.hessian(lambda y: jnp.sum(weight * hessian_at(y)))(x)
        hess = second + jnp.einsum("ij,ijp,ijq->pq", gamma, a, a) - jnp.outer(grad, grad) / tau
        return f, grad, 0.5 * (hess + hess.T), top, off_m

    return jax.jit(terms)


def _polish(
    terms: Callable[..., tuple[Array, Array, Array, Array, Array]],
    x: np.ndarray,
    iterations: int = 100,
    radius: float = 0.5,
) -> tuple[float, np.ndarray]:
    """Damped Newton on ``F_tau`` (:func:`_soft_max_terms`) for the temperatures
    ``_POLISH_TAUS`` (times ``lambda_max``), warm-started, at most ``iterations`` steps each;
    saddle-free: the Hessian's eigenvalues are replaced by their absolute values plus a damping
    (raised tenfold on a step that does not decrease ``F`` or leaves M, lowered after one that
    succeeds), so negative curvature is descended, and steps longer than ``radius`` are
    shortened. The best exact ``lambda_max`` seen at a point on M (to
    ``sqrt(eps)``), returned with its coordinates, is a valid witness: never worse than ``x``.
    """
    dtype = x.dtype
    on_m_tol = math.sqrt(float(np.finfo(dtype).eps))
    best_lam, best_x = float(terms(x, jnp.asarray(1.0, dtype))[3]), x
    for tau_rel in _POLISH_TAUS:
        tau = jnp.asarray(tau_rel * best_lam, dtype)
        x = best_x
        f, g, hh, _, _ = (np.asarray(v) for v in terms(x, tau))
        damping = 0.0
        for _ in range(iterations):
            ev, evecs = np.linalg.eigh(hh)
            scale = max(float(np.max(np.abs(ev))), float(np.finfo(dtype).tiny))
            step = -evecs @ ((evecs.T @ g) / (np.abs(ev) + damping + 1e-14 * scale))
            step *= min(1.0, radius / max(float(np.linalg.norm(step)), 1e-300))
            f_new, g_new, hh_new, top, off_m = (np.asarray(v) for v in terms(x + step, tau))
            on_m = bool(off_m <= on_m_tol)
            if on_m and np.isfinite(top) and float(top) < best_lam:
                best_lam, best_x = float(top), x + step
            if on_m and np.isfinite(f_new) and f_new <= f:
                converged = f - f_new <= 4 * np.finfo(dtype).eps * abs(f)
                x, f, g, hh = x + step, f_new, g_new, hh_new
                damping /= 10.0
                if converged:
                    break
            else:
                damping = max(10.0 * damping, 1e-8 * scale)
                if damping > 1e8 * scale:
                    break
    return best_lam, best_x


# ----- the final epigraph polish ---------------------------------------------------------------
#: the k eigenvalues within this fraction of lambda_max at the start of the epigraph polish
#: become its constraints; they are the k largest by order (not by label), so lambda_max itself
#: is always constrained and every feasible (c, t) has t >= lambda_max(H(c))
_EPIGRAPH_WINDOW = 0.5


def _epigraph_polish(
    network: LinearNetwork,
    unravel: Callable[[Float[Array, " p"]], Any],
    x: np.ndarray,
    maxiter: int = 3000,
) -> tuple[float, np.ndarray]:
    """SLSQP (``scipy.optimize``) on the epigraph ``min_{c, t} t`` s.t.
    ``t - lambda_i(H(c)) >= 0`` for the ``k`` largest eigenvalues, ``k`` the number within
    ``_EPIGRAPH_WINDOW`` of ``lambda_max(H(x))``, over the chart coordinates ``c`` from ``x``.

    Each constraint is smooth where its eigenvalue is simple, with the exact gradient
    ``d lambda_i / dc = v_i^T (dH/dc) v_i`` (Hellmann-Feynman; jitted, ``dH/dc`` by forward
    differentiation through the chart). Unlike the soft maximum of :func:`_polish`, coalesced
    top eigenvalues keep separate multipliers, and SLSQP's quasi-Newton steps on the
    Lagrangian walk along flat valleys of ``lambda_max`` where the polish stalls (measured,
    ``docs/theory.md``). Returns the best exact ``lambda_max`` evaluated at a point on M (to
    ``sqrt(eps)``) with its coordinates: never worse than ``x``.
    """
    import scipy.optimize  # here: importing gdlr_jax does not import scipy.optimize

    dtype = x.dtype
    on_m_tol = math.sqrt(float(np.finfo(dtype).eps))
    hessian_at, off_m = _chart_maps(network, unravel)
    lam0 = np.asarray(jnp.linalg.eigvalsh(hessian_at(jnp.asarray(x))))
    k = int(np.sum(lam0 >= (1.0 - _EPIGRAPH_WINDOW) * lam0[-1]))

    @jax.jit
    def top_terms(y: Float[Array, " p"]):
        lam, vecs = jnp.linalg.eigh(hessian_at(y))
        v = vecs[:, -k:]
        grads = jnp.einsum("ji,jkp,ki->ip", v, jax.jacfwd(hessian_at)(y), v)
        return lam[-k:], grads, off_m(y)

    best = [float(lam0[-1]), x]
    cache: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

    def evaluate(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key_ = z[:-1].tobytes()
        if key_ not in cache:
            lam, grads, off = (np.asarray(v) for v in top_terms(jnp.asarray(z[:-1], dtype)))
            if off <= on_m_tol and np.isfinite(lam[-1]) and float(lam[-1]) < best[0]:
                best[:] = [float(lam[-1]), z[:-1].copy()]
            cache.clear()
            cache[key_] = (lam, grads)
        return cache[key_]

    unit_t = np.eye(x.size + 1, dtype=dtype)[-1]
    constraint = {
        "type": "ineq",
        "fun": lambda z: z[-1] - evaluate(z)[0],
        "jac": lambda z: np.hstack([-evaluate(z)[1], np.ones((k, 1), dtype)]),
    }
    with warnings.catch_warnings():  # an ill-conditioned step is answered by the fallback
        warnings.simplefilter("ignore", RuntimeWarning)
        scipy.optimize.minimize(
            lambda z: z[-1],
            np.append(x, lam0[-1]),
            jac=lambda z: unit_t,
            constraints=[constraint],
            method="SLSQP",
            options={"maxiter": maxiter, "ftol": 1e-15},
        )
    return best[0], best[1]
