"""Stability of fixed points of the GD map and the weakly stable minima M_WS (layer 3).

A fixed point ``theta`` of ``G`` is linearly stable when every eigenvalue of
``DG = I - eta H`` lies inside the unit disc and unstable when one lies outside (Remark 2);
for ``eta > 0`` the eigenvalues are ``1 - eta lambda_i``.

At a minimum on a manifold M of minima, ``H`` has ``dim M`` zero eigenvalues (Prop. 10), so
``DG`` has the eigenvalue 1 along M and Remark 2 can never say "stable". The transversal
eigenvalues decide instead: ``|1 - eta lambda| < 1`` for every non-zero ``lambda`` iff
``eta < 2 / lambda_max``. This is the criterion used by the paper's proofs (Thm. 17,
Lemma 47) and our default for Def. 16:

    M_WS(eta) = { theta in M : eta < 2 / lambda_max(H(theta)) }          (criterion="lambda_max")

The paper's Def. 16 is written with the smallest non-zero eigenvalue instead,

    M_WS(eta) = { theta in M : eta < 2 / lambda_min^+(H(theta)) }   (criterion="lambda_min_nonzero"),

a weaker condition (a larger set): it only says that *some* transversal direction is
contracting. Thm. 17 (a minimum outside M_WS is unstable) holds for both, and is sharp only
for ``lambda_max``. The paper writes ``<=`` where we write ``<`` (they differ only on the
boundary ``eta = 2 / lambda``); ``weakly_stable(..., inclusive=True)`` is its version. See
``docs/theory.md``.
"""

from __future__ import annotations

import enum
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from gdlr_jax.curvature._hessian import LossFn, PyTree, hessian_spectrum, zero_tolerance

Criterion = Literal["lambda_max", "lambda_min_nonzero"]
CRITERIA = ("lambda_max", "lambda_min_nonzero")


class FixedPointStability(enum.IntEnum):
    """Linear stability of a fixed point of ``G`` (Remark 2)."""

    STABLE = 0  # rho(DG) < 1
    UNSTABLE = 1  # rho(DG) > 1
    UNDECIDED = 2  # rho(DG) = 1 within tolerance (always so on a manifold of minima)


def classify_fixed_point(
    loss_fn: LossFn, params: PyTree, eta: ArrayLike, *, atol: float | None = None
) -> Int[Array, ""]:
    """Classifies a fixed point of ``G`` by the spectral radius of ``DG`` (Remark 2).

    ``STABLE`` if ``rho(DG) < 1 - atol``, ``UNSTABLE`` if ``rho(DG) > 1 + atol``, else
    ``UNDECIDED``; ``rho(DG) = max_i |1 - eta lambda_i|``. The default ``atol`` is
    ``eta`` times the zero tolerance of the Hessian spectrum
    (:func:`gdlr_jax.curvature._hessian.zero_tolerance`), i.e. an eigenvalue of ``H`` that counts as
    zero gives ``UNDECIDED``. ``params`` is assumed to be a fixed point (``grad L = 0``); this
    is not checked.

    Returns:
        An int32 scalar, a :class:`FixedPointStability` value (jit/vmap-able).
    """
    lam = hessian_spectrum(loss_fn, params)
    tol = eta * zero_tolerance(lam) if atol is None else atol
    rho = jnp.max(jnp.abs(1.0 - eta * lam))
    return jnp.where(
        rho < 1.0 - tol,
        FixedPointStability.STABLE,
        jnp.where(rho > 1.0 + tol, FixedPointStability.UNSTABLE, FixedPointStability.UNDECIDED),
    ).astype(jnp.int32)


def _check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")


def weak_stability_threshold(
    loss_fn: LossFn,
    params: PyTree,
    *,
    criterion: Criterion = "lambda_max",
    rtol: float | None = None,
) -> Float[Array, ""]:
    """The step size ``2 / lambda`` below which the minimum ``theta`` is weakly stable (Def. 16).

    ``lambda = lambda_max(H(theta))`` by default, or the smallest non-zero eigenvalue with
    ``criterion="lambda_min_nonzero"`` (zero decided by ``rtol`` as in
    :func:`gdlr_jax.spectrum_counts`). ``theta in M_WS(eta)`` iff ``eta < threshold``
    (``eta <= threshold`` with :func:`weakly_stable`'s ``inclusive=True``, the paper's letter).
    Returns ``inf`` when the Hessian has no positive (non-zero) eigenvalue.
    """
    _check_criterion(criterion)
    lam = hessian_spectrum(loss_fn, params)
    if criterion == "lambda_max":
        chosen = lam[-1]
    else:
        positive = lam > zero_tolerance(lam, rtol)
        chosen = jnp.min(jnp.where(positive, lam, jnp.inf))
    return jnp.where(chosen > 0, 2.0 / jnp.where(chosen > 0, chosen, 1.0), jnp.inf)


def weakly_stable(
    loss_fn: LossFn,
    params: PyTree,
    eta: ArrayLike,
    *,
    criterion: Criterion = "lambda_max",
    rtol: float | None = None,
    inclusive: bool = False,
) -> Bool[Array, ""]:
    """Whether the minimum ``theta`` lies in ``M_WS(eta)`` (Def. 16): ``eta < 2 / lambda``.

    ``inclusive=True`` is the paper's Def. 16 to the letter, ``eta <= 2 / lambda``. The two
    differ only on the boundary ``eta = 2 / lambda``, where ``DG`` has the eigenvalue ``-1``:
    Remark 2 decides nothing there (``classify_fixed_point`` says ``UNDECIDED``), and the
    default strict ``<`` keeps ``M_WS(eta)`` to minima whose transversal eigenvalues are all
    strictly inside the unit disc.

    Args:
        loss_fn: ``params -> scalar``.
        params: a global minimum (a point of M; not checked).
        eta: the step size (traced).
        criterion: ``"lambda_max"`` (default: every transversal eigenvalue of ``DG`` in
            ``(-1, 1)``, the condition of Thm. 17) or ``"lambda_min_nonzero"`` (the paper's
            literal Def. 16).
        rtol: zero tolerance for ``"lambda_min_nonzero"``.
        inclusive: ``eta <= 2 / lambda`` (the paper's Def. 16) instead of ``<`` (default).

    Returns:
        A boolean scalar (jit/vmap-able over params and eta).

    Raises:
        ValueError: when a concrete ``eta`` is not a positive number (a step size ``<= 0``
            or NaN would otherwise count as weakly stable); a traced ``eta`` is not checked;
            when ``inclusive`` is not a bool.
    """
    if not isinstance(inclusive, bool):
        raise ValueError(f"inclusive must be a bool, got {inclusive!r}.")
    if not isinstance(eta, jax.core.Tracer):
        values = np.asarray(eta)
        real = np.issubdtype(values.dtype, np.number) and not np.iscomplexobj(values)
        if not real or not np.all(values > 0):
            raise ValueError(f"eta must be a positive step size, got {eta!r}.")
    threshold = weak_stability_threshold(loss_fn, params, criterion=criterion, rtol=rtol)
    return eta <= threshold if inclusive else eta < threshold
