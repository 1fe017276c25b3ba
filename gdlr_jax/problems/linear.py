"""Linear networks and their manifold of global minima (layer 1: problems).

The loss of a linear network of depth ``h`` and widths ``d = (d_0, ..., d_h)`` (paper, eq. 4-6)
is

    L(theta) = scale * || Y - W_h ... W_1 X ||_F^2,      theta = [W_1, ..., W_h],

with ``W_i`` of shape ``(d_i, d_{i-1})``, data ``X (d_0, n)`` and targets ``Y (d_h, n)``. The
product ``mu_d(theta) = W_h ... W_1`` has rank at most ``r = min_i d_i``; the network is
*filling* when ``r = min(d_0, d_h)`` (every ``d_h x d_0`` matrix is a product) and
*non-filling* otherwise. With ``X X^T`` invertible, the global minimum of ``L`` is attained
exactly on

    M = { theta : mu_d(theta) = W* },

where ``W*`` is the minimiser of ``l(W) = scale * ||Y - W X||^2`` over matrices of rank
``<= r`` (:meth:`LinearNetwork.target`). When ``rank W* = r``, ``M`` is a smooth manifold of
dimension ``d_theta - r (d_0 + d_h - r)`` (Prop. 9).

Default ``scale = 1/2``: widths ``(1, 1, 1)`` with ``X = Y = [[1]]`` is exactly the paper's
worked example ``L(x, y) = 1/2 (1 - x y)^2`` (:func:`two_neuron`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray


__all__ = ["Coordinates", "LinearNetwork", "Params", "deep_scalar", "two_neuron"]

Params = list  # [W_1 (d_1, d_0), ..., W_h (d_h, d_{h-1})]
Coordinates = Any  # nested lists/dicts of arrays, see LinearNetwork.coordinate_shapes


def _as_width_tuple(widths: Sequence[int]) -> tuple[int, ...]:
    try:
        out = tuple(int(w) for w in widths)
    except (TypeError, ValueError):
        raise ValueError(f"widths must be a sequence of positive integers, got {widths!r}.")
    if len(out) < 2 or any(w < 1 for w in out) or any(int(w) != w for w in widths):
        raise ValueError(
            f"widths must be a sequence of at least two positive integers (d_0, ..., d_h), "
            f"got {widths!r}."
        )
    return out


class LinearNetwork:
    """The loss ``scale * ||Y - W_h ... W_1 X||_F^2`` of a linear network and its minima.

    Args:
        widths: ``(d_0, d_1, ..., d_h)``, ``h >= 1``.
        X: inputs, shape ``(d_0, n)``; ``X X^T`` must be invertible (``n >= d_0``).
        Y: targets, shape ``(d_h, n)``.
        scale: the positive factor in front of the squared norm (1/2 by default; use ``1/n``
            or ``1/(2n)`` for a mean).

    Raises:
        ValueError: on a malformed ``widths``, shapes of ``X``/``Y`` that do not match it,
            non-finite data, a singular ``X X^T`` or a non-positive ``scale``.
    """

    def __init__(
        self,
        widths: Sequence[int],
        X: Float[Array, "d0 n"],
        Y: Float[Array, "dh n"],
        scale: float = 0.5,
    ):
        self.widths = _as_width_tuple(widths)
        x = np.asarray(X, dtype=np.float64)
        y = np.asarray(Y, dtype=np.float64)
        d0, dh = self.widths[0], self.widths[-1]
        if x.ndim != 2 or x.shape[0] != d0:
            raise ValueError(f"X must have shape (d_0, n) = ({d0}, n), got {x.shape}.")
        if y.ndim != 2 or y.shape != (dh, x.shape[1]):
            raise ValueError(
                f"Y must have shape (d_h, n) = ({dh}, {x.shape[1]}), got {y.shape}."
            )
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise ValueError("X and Y must be finite; found NaN or inf.")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}.")
        xxt = x @ x.T
        if np.linalg.matrix_rank(xxt) < d0:
            raise ValueError(
                f"X X^T must be invertible (X of full row rank d_0 = {d0}, so n >= d_0); "
                f"X has shape {x.shape} and rank {np.linalg.matrix_rank(x)}."
            )
        self.scale = float(scale)
        dtype = jnp.result_type(jnp.asarray(X).dtype, jnp.asarray(Y).dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            dtype = jnp.result_type(float)
        self.dtype = dtype
        self.X = jnp.asarray(x, dtype)
        self.Y = jnp.asarray(y, dtype)
        target = self._target_float64(x, y, xxt)
        self._target = jnp.asarray(target, dtype)
        self.target_rank = int(np.linalg.matrix_rank(target))
        self.min_loss = float(self.scale * np.sum((y - target @ x) ** 2))
        self._target_row_basis = jnp.asarray(
            np.linalg.svd(target)[2][: self.rank], dtype
        )  # (r, d_0), orthonormal rows spanning the row space of W*

    # ----- the architecture ------------------------------------------------------------
    @property
    def depth(self) -> int:
        """``h``, the number of weight matrices."""
        return len(self.widths) - 1

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Shapes ``(d_i, d_{i-1})`` of ``W_1, ..., W_h``."""
        return [(self.widths[i + 1], self.widths[i]) for i in range(self.depth)]

    @property
    def num_params(self) -> int:
        """``d_theta = sum_i d_i d_{i-1}``."""
        return sum(a * b for a, b in self.shapes)

    @property
    def rank(self) -> int:
        """``r = min_i d_i``, the largest rank of a product ``W_h ... W_1``."""
        return min(self.widths)

    @property
    def is_filling(self) -> bool:
        """Whether ``r = min(d_0, d_h)`` (every ``d_h x d_0`` matrix is a product)."""
        return self.rank == min(self.widths[0], self.widths[-1])

    @property
    def num_nonzero_eigenvalues(self) -> int:
        """``r (d_0 + d_h - r)``: the number of positive Hessian eigenvalues on M (Prop. 10)."""
        r = self.rank
        return r * (self.widths[0] + self.widths[-1] - r)

    @property
    def minima_dim(self) -> int:
        """``dim M = d_theta - r (d_0 + d_h - r)`` (Prop. 9).

        Raises:
            ValueError: if ``rank W* < r`` (degenerate data): then ``M`` is not the manifold of
                Prop. 9 and the formula does not apply.
        """
        self._require_full_rank_target("minima_dim")
        return self.num_params - self.num_nonzero_eigenvalues

    def _require_full_rank_target(self, what: str) -> None:
        if self.target_rank != self.rank:
            raise ValueError(
                f"{what}: the target W* has rank {self.target_rank} < r = {self.rank} "
                "(degenerate data); Prop. 9 and the sampler need rank W* = r."
            )

    # ----- the loss ----------------------------------------------------------------------
    def _check_params(self, params: Params) -> None:
        if not isinstance(params, (list, tuple)) or len(params) != self.depth:
            raise ValueError(
                f"params must be a list of {self.depth} matrices [W_1, ..., W_h], "
                f"got {type(params).__name__}"
                + (f" of length {len(params)}" if isinstance(params, (list, tuple)) else "")
                + "."
            )
        for i, (w, shape) in enumerate(zip(params, self.shapes)):
            if tuple(jnp.shape(w)) != shape:
                raise ValueError(
                    f"params[{i}] (W_{i + 1}) must have shape {shape}, got {jnp.shape(w)}."
                )

    def product(self, params: Params) -> Float[Array, "dh d0"]:
        """The matrix multiplication map ``mu_d(theta) = W_h ... W_1``, shape ``(d_h, d_0)``."""
        self._check_params(params)
        out = params[0]
        for w in params[1:]:
            out = w @ out
        return out

    def loss(self, params: Params) -> Float[Array, ""]:
        """``L(theta) = scale * ||Y - W_h ... W_1 X||_F^2`` (eq. 4-6)."""
        residual = self.Y - self.product(params) @ self.X
        return self.scale * jnp.sum(residual**2)

    def __call__(self, params: Params) -> Float[Array, ""]:
        return self.loss(params)

    # ----- the minima --------------------------------------------------------------------
    def _target_float64(self, x: np.ndarray, y: np.ndarray, xxt: np.ndarray) -> np.ndarray:
        w_ls = np.linalg.solve(xxt, x @ y.T).T  # Y X^T (X X^T)^{-1}
        if self.is_filling:
            return w_ls
        # Non-filling: min over rank <= r of ||(W - W_ls) S||_F with S = (X X^T)^{1/2}:
        # Eckart-Young on W_ls S, then undo S.
        evals, evecs = np.linalg.eigh(xxt)
        s_half = (evecs * np.sqrt(evals)) @ evecs.T
        s_inv_half = (evecs / np.sqrt(evals)) @ evecs.T
        u, sv, vt = np.linalg.svd(w_ls @ s_half)
        r = self.rank
        if r < len(sv) and sv[r - 1] - sv[r] <= 1e-12 * max(sv[0], 1e-300):
            raise ValueError(
                f"the best rank-{r} approximation is not unique: singular values "
                f"{sv[r - 1]:.6g} and {sv[r]:.6g} of W_ls (X X^T)^(1/2) coincide."
            )
        return (u[:, :r] * sv[:r]) @ vt[:r] @ s_inv_half

    def target(self) -> Float[Array, "dh d0"]:
        """The matrix ``W*`` with ``M = {theta : mu_d(theta) = W*}``.

        Filling case: the least-squares solution ``W_ls = Y X^T (X X^T)^{-1}``. Non-filling
        case: the best rank-``r`` approximation of ``W_ls`` in the ``X``-weighted norm
        ``||A||_X = ||A (X X^T)^{1/2}||_F``, i.e. ``[W_ls S]_r S^{-1}`` with
        ``S = (X X^T)^{1/2}`` and ``[.]_r`` the truncated SVD (Eckart-Young), since
        ``||Y - W X||^2 = ||(W - W_ls) S||^2 + const``.

        Note: ``Y X^T (X X^T)^{-1/2}`` (which appears in some write-ups) is ``W_ls S``, not the
        minimiser; it agrees with ``W_ls`` only when ``X X^T = I``.
        """
        return self._target

    def coordinate_shapes(self) -> Coordinates:
        """Shapes of the coordinates of :meth:`minimum_from_coordinates` (a nested pytree)."""
        return _coordinate_shapes(self.widths)

    def minimum_from_coordinates(self, coords: Coordinates) -> Params:
        """A point of M from unconstrained coordinates: a smooth, generically onto chart.

        The product ``W* = W_h ... W_1`` is factored recursively: at the narrowest interior
        width ``d_j`` the chain splits as ``W* = A B`` with ``B = H [R; S]`` (``d_j x d_0``;
        ``R`` spans the row space of ``W*``, ``S`` adds random rows, ``H`` mixes them) and
        ``A = W* B^+ + Z (I - B B^+)``; ``B`` and ``A`` are factored the same way through
        ``d_0..d_j`` and ``d_j..d_h``. Every point of M whose partial products have generic
        rank is reached (take ``H, S, Z`` from the point itself), so sampling or optimising
        the coordinates covers M up to a null set.

        Args:
            coords: a pytree with the structure and shapes of :meth:`coordinate_shapes`.

        Returns:
            ``[W_1, ..., W_h]`` with ``W_h ... W_1 = W*`` (to rounding).
        """
        self._require_full_rank_target("minimum_from_coordinates")
        return _factor(self._target, self.widths, self._target_row_basis, coords)

    def sample_coordinates(
        self, key: PRNGKeyArray, shape: Sequence[int] = (), spread: float = 0.5
    ) -> Coordinates:
        """Random coordinates for :meth:`minimum_from_coordinates`.

        Each mixing matrix is the identity plus Gaussian noise of size 1/2 (well conditioned)
        times a log-normal scale ``exp(spread * u)``, and the free rows ``S, Z`` are standard
        normal, so that both nearly balanced points and points far out along M (large
        ``||theta||``) are drawn.

        Args:
            key: a PRNG key.
            shape: leading batch shape.
            spread: standard deviation of the log-scale of each factor (``0``: unit scale).
        """
        if not (isinstance(spread, (int, float)) and math.isfinite(spread) and spread >= 0):
            raise ValueError(f"spread must be a non-negative finite number, got {spread!r}.")
        leaves, treedef = jax.tree_util.tree_flatten(
            self.coordinate_shapes(), is_leaf=lambda s: isinstance(s, tuple)
        )
        keys = jax.random.split(key, len(leaves))
        shape = tuple(shape)
        draws = [jax.random.normal(k, shape + s, self.dtype) for k, s in zip(keys, leaves)]
        return _sampled_coordinates(jax.tree_util.tree_unflatten(treedef, draws), spread)

    def sample_minimum(
        self, key: PRNGKeyArray, shape: Sequence[int] = (), spread: float = 0.5
    ) -> Params:
        """Random points of M, spread over the manifold (not only balanced points).

        :meth:`minimum_from_coordinates` of :meth:`sample_coordinates`.

        Returns:
            ``[W_1, ..., W_h]`` with leaves of shape ``(*shape, d_i, d_{i-1})``.
        """
        coords = self.sample_coordinates(key, shape, spread)
        chart = self.minimum_from_coordinates
        for _ in tuple(shape):
            chart = jax.vmap(chart)
        return chart(coords)

    def __repr__(self) -> str:
        kind = "filling" if self.is_filling else "non-filling"
        return (
            f"LinearNetwork(widths={self.widths}, n={self.X.shape[1]}, scale={self.scale}, "
            f"{kind}, r={self.rank})"
        )


# ----- the chart of M ------------------------------------------------------------------------
def _split_index(widths: tuple[int, ...]) -> int:
    interior = widths[1:-1]
    return 1 + interior.index(min(interior))


def _coordinate_shapes(widths: tuple[int, ...]) -> Coordinates:
    if len(widths) == 2:
        return {}
    j = _split_index(widths)
    d0, dj, dm = widths[0], widths[j], widths[-1]
    m = min(dj, d0)
    rho = min(widths)
    node = {
        "log_scale": (),
        "H": (dj, m),
        "S": (m - rho, d0),
        "left": _coordinate_shapes(widths[: j + 1]),
        "right": _coordinate_shapes(widths[j:]),
    }
    if dj > d0:
        node["Z"] = (dm, dj)
    return node


def _sampled_coordinates(normal: Coordinates, spread: float) -> Coordinates:
    """Standard normal draws -> sampling coordinates: each mixing matrix ``H`` is a random
    perturbation of the identity (well conditioned, so that sampled points are not needlessly
    extreme) and each log-scale has standard deviation ``spread``."""
    if not normal:
        return normal
    out = dict(normal)
    dj, m = normal["H"].shape[-2:]
    eye = jnp.broadcast_to(jnp.eye(dj, m, dtype=normal["H"].dtype), normal["H"].shape)
    out["H"] = eye + 0.5 * normal["H"] / math.sqrt(m)
    out["log_scale"] = spread * normal["log_scale"]
    out["left"] = _sampled_coordinates(normal["left"], spread)
    out["right"] = _sampled_coordinates(normal["right"], spread)
    return out


def _factor(
    target: Float[Array, "dm d0"],
    widths: tuple[int, ...],
    row_basis: Float[Array, "rho d0"],
    coords: Coordinates,
) -> Params:
    """Factors ``target`` (rank ``min(widths)``) through ``widths``; see the chart above."""
    if len(widths) == 2:
        return [target]
    j = _split_index(widths)
    d0, dj, dm = widths[0], widths[j], widths[-1]
    mixing = jnp.exp(coords["log_scale"]) * coords["H"]
    row_basis_b = jnp.concatenate([row_basis, coords["S"]], axis=0)  # (min(dj, d0), d0)
    b = mixing @ row_basis_b  # (dj, d0), row space contains that of target
    b_pinv = jnp.linalg.pinv(b)
    a = target @ b_pinv  # (dm, dj)
    if dj > d0:  # B has a left null space: A is free there
        a = a + coords["Z"] @ (jnp.eye(dj, dtype=b.dtype) - b @ b_pinv)
    row_basis_a = a if dm < dj else jnp.eye(dj, dtype=a.dtype)
    return _factor(b, widths[: j + 1], row_basis_b, coords["left"]) + _factor(
        a, widths[j:], row_basis_a, coords["right"]
    )


# ----- special cases ---------------------------------------------------------------------
def deep_scalar(
    depth: int, x: float = 1.0, y: float = 1.0, scale: float = 0.5, dtype: Any = None
) -> LinearNetwork:
    """The scalar chain ``L(theta) = scale * (y - theta_h ... theta_1 x)^2``, widths ``(1,)*(h+1)``.

    Its minima are ``{prod_i theta_i = y / x}`` and
    ``eta_E = 1 / (scale x^2 h |y/x|^(2 - 2/h))`` (see ``docs/theory.md``).
    """
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive integer, got {depth!r}.")
    dtype = dtype or jnp.result_type(float)
    return LinearNetwork(
        (1,) * (depth + 1),
        jnp.full((1, 1), x, dtype),
        jnp.full((1, 1), y, dtype),
        scale=scale,
    )


def two_neuron(dtype: Any = None) -> LinearNetwork:
    """The paper's worked example ``L(x, y) = 1/2 (1 - x y)^2``; params ``[[[x]], [[y]]]``.

    On ``M = {x y = 1}``: ``lambda_max = x^2 + y^2`` and ``eta_E = 1``.
    """
    return deep_scalar(2, dtype=dtype)
