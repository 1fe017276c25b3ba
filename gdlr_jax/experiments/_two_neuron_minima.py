"""``M_WS(eta)`` along the minima ``M = {xy = 1}`` of the two-neuron loss (layer 5): the
weak-stability thresholds ``2 / lambda`` at points of M and the arclength of ``M_WS(eta)``, as
the study :mod:`gdlr_jax.experiments.two_neuron` measures them."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from gdlr_jax.dynamics._stability import weak_stability_threshold
from gdlr_jax.experiments._shared_problems import two_neuron_loss


class MinimaProfile(NamedTuple):
    """Points of ``M = {xy = 1}`` with their weak-stability thresholds.

    Attributes:
        xy: ``(branches, points, 2)`` points of each branch, ordered along it.
        arclength: ``(branches, points)`` arclength from the first point of the branch.
        thresholds: ``(branches, points)`` ``2 / lambda`` (Def. 16): the point is in
            ``M_WS(eta)`` iff ``eta < threshold``.
    """

    xy: Float[np.ndarray, "branches points 2"]
    arclength: Float[np.ndarray, "branches points"]
    thresholds: Float[np.ndarray, "branches points"]


@functools.partial(jax.jit, static_argnames=("loss", "criterion"))
def _thresholds(
    loss: Any, x: Float[Array, " n"], y: Float[Array, " n"], criterion: str
) -> Float[Array, " n"]:
    return jax.vmap(
        lambda a, b: weak_stability_threshold(
            loss, [a.reshape(1, 1), b.reshape(1, 1)], criterion=criterion
        )
    )(x, y)


def weak_stability_thresholds(
    x: ArrayLike, y: ArrayLike, criterion: str = "lambda_max", *, block: int = 1 << 20
) -> Float[np.ndarray, " n"]:
    """``2 / lambda`` of the two-neuron loss at the points ``(x_i, y_i)``, in float64.

    :func:`gdlr_jax.weak_stability_threshold` vmapped over the points, in blocks of ``block``
    points (bounded memory). On M, ``(x, y) in M_WS(eta)`` iff ``eta < threshold``.

    Args:
        x, y: ``(n,)`` coordinates.
        criterion: the eigenvalue of Def. 16.

    Returns:
        ``(n,)`` thresholds.
    """
    with jax.enable_x64(True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        loss = two_neuron_loss("float64")
        return np.concatenate(
            [
                np.asarray(_thresholds(loss, x[i : i + block], y[i : i + block], criterion))
                for i in range(0, x.size, block)
            ]
            or [np.zeros(0)]
        )


def minima_profile(
    *,
    branches: str = "both",
    log_extent: float = 4.0,
    points: int = 8001,
    criterion: str = "lambda_max",
) -> MinimaProfile:
    """Thresholds ``2 / lambda`` of the two-neuron loss along ``M = {xy = 1}``, in float64.

    Each branch is parametrised by ``x = s e^t, y = s e^{-t}``, ``t`` uniform in
    ``[-log_extent, log_extent]`` (``s = 1``, and ``s = -1`` when ``branches="both"``);
    :func:`gdlr_jax.weak_stability_threshold` is vmapped over the points.
    """
    with jax.enable_x64(True):
        t = jnp.linspace(-log_extent, log_extent, points, dtype=jnp.float64)
        signs = jnp.array([1.0] if branches == "positive" else [1.0, -1.0], jnp.float64)
        x = signs[:, None] * jnp.exp(t)[None, :]
        y = signs[:, None] * jnp.exp(-t)[None, :]
        thresholds = weak_stability_thresholds(
            np.asarray(x).ravel(), np.asarray(y).ravel(), criterion
        )
        xy = np.stack([np.asarray(x), np.asarray(y)], axis=-1)
    arclength = np.concatenate(
        [np.zeros((xy.shape[0], 1)), np.cumsum(_segments(xy), axis=1)], axis=1
    )
    return MinimaProfile(xy, arclength, thresholds.reshape(x.shape))


def _segments(xy: Float[np.ndarray, "branches points 2"]) -> Float[np.ndarray, "branches segments"]:
    """Lengths of the segments between consecutive points of each branch."""
    return np.hypot(*np.moveaxis(np.diff(xy, axis=1), -1, 0))


def weakly_stable_length(profile: MinimaProfile, etas: ArrayLike) -> Float[np.ndarray, " k"]:
    """Arclength of ``M_WS(eta) = {theta in M : eta < threshold(theta)}`` for each ``eta``.

    The threshold is interpolated linearly between consecutive points of each branch, so the
    part of a segment above ``eta`` is exact for that interpolation (the error is second order
    in the spacing of the points); branches are summed.

    Args:
        profile: from :func:`minima_profile`.
        etas: ``(k,)`` step sizes.

    Returns:
        ``(k,)`` lengths.
    """
    etas = np.asarray(etas, np.float64).reshape(-1)
    return np.concatenate(
        [_lengths(profile, etas[i : i + _ETA_BLOCK]) for i in range(0, etas.size, _ETA_BLOCK)]
        or [np.zeros(0)]
    )


_ETA_BLOCK = 32  # step sizes per block of weakly_stable_length (bounds its memory)


def _lengths(profile: MinimaProfile, etas: np.ndarray) -> np.ndarray:
    etas = etas[:, None, None]
    a, b = profile.thresholds[None, :, :-1], profile.thresholds[None, :, 1:]
    # each segment's own length: differences of the cumulated arclength lose the short
    # segments near xy = (1, 1) beside the e^log_extent of the far end (all of them past ~30)
    ds = _segments(profile.xy)[None]
    above_a, above_b = a > etas, b > etas
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing = np.clip((etas - a) / (b - a), 0.0, 1.0)  # where the segment meets eta
    share = np.where(above_a & above_b, 1.0, 0.0)
    share = np.where(above_a & ~above_b, crossing, share)
    share = np.where(~above_a & above_b, 1.0 - crossing, share)
    return np.sum(share * ds, axis=(1, 2))
