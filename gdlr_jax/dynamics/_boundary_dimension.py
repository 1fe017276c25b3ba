"""The box-counting dimension of the boundary between classes of a 2-D grid (layer 3; beyond the
paper).

A grid of trajectory statuses over a plane of initialisations or of step sizes (``(eta_1,
eta_2)`` of two layers) splits the plane into classes -- converged, diverged, periodic, ... --
and the boundary between them can be fractal (Sohl-Dickstein 2024, "The boundary of neural
network trainability is fractal"). Its box-counting dimension is

    D = lim_{s -> 0} log N(s) / log(1 / s),

``N(s)`` the number of boxes of side ``s`` that meet the boundary. On a grid of ``ny x nx``
cells read as samples at their centres, a box of ``b x b`` cell spacings meets the boundary
when its ``(b + 1)^2`` samples hold two different classes, so ``N(b)`` is counted for box sides
``b = 1, 2, 4, ...`` (powers of two, non-overlapping boxes tiling the same region) and ``D`` is the negated slope of the least-squares
line through ``(log b, log N(b))`` (:func:`boundary_dimension`). NumPy only: the grid is data,
no engine is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from jaxtyping import Bool, Float, Int


class BoundaryDimension(NamedTuple):
    """The result of :func:`boundary_dimension`.

    Attributes:
        dimension: ``D``, minus the least-squares slope of the mean over the box placements of
            ``log N`` against ``log b`` (the mean of the placements' slopes).
        standard_error: ``sqrt(mean_p se_p^2 + var_p D_p)``: ``se_p`` the standard error of
            the slope ``D_p`` fitted for placement ``p`` (``sqrt(sum r_k^2 / (K - 2) / sum
            (log b_k - mean)^2)``, ``r_k`` the residuals of the ``K`` scales), ``var_p`` the
            sample variance of the slopes over the placements. It covers the scatter of the
            counts about a power law over the fitted range (finite-size wobble, lacunarity) and
            the placement of the box lattice on the set; not a bias of the range itself (a
            boundary that is smooth at the resolution of the grid reads as ``D = 1``, whatever
            it does at finer scales).
        interval: ``(low, high)``, ``D -/+ t_{K-2} * standard_error``, ``t_{K-2}`` the
            two-sided Student quantile of ``confidence`` (nominal: over the sets of the tests
            the 95% interval held the known dimension in about 9 of 10 renderings).
        confidence: the level of ``interval`` (default 0.95).
        intercept: ``c`` of the fit ``mean_p log N_p = c - D log b`` (to draw the line).
        box_cells: ``(K,)`` box sides ``b`` in unit squares (cell spacings).
        box_widths: ``(K,)`` box widths in the units of ``extent`` (``b * cell width``).
        box_heights: ``(K,)`` box heights in the units of ``extent``.
        counts: ``(4, K)`` ``N_p(b)``: boxes crossed by the boundary, for each placement ``p``
            of the box lattice (offsets ``(0, 0), (0, h), (h, 0), (h, h)`` unit squares, rows
            then columns, ``h = max_box / 2``).
        placement_dimensions: ``(4,)`` the slopes ``D_p``.
        region_cells: ``(R, C)`` unit squares of the region tiled by every box size at every
            placement.
    """

    dimension: float
    standard_error: float
    interval: tuple[float, float]
    confidence: float
    intercept: float
    box_cells: Int[np.ndarray, " K"]
    box_widths: Float[np.ndarray, " K"]
    box_heights: Float[np.ndarray, " K"]
    counts: Int[np.ndarray, "4 K"]
    placement_dimensions: Float[np.ndarray, " 4"]
    region_cells: tuple[int, int]


#: a slope and its standard error need K - 2 >= 1 residual degrees of freedom
MIN_SCALES = 3


def _check_extent(extent: Any) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in extent)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(
            f"extent must be 4 finite numbers [x_min, x_max, y_min, y_max], got {extent!r}."
        )
    if not (values[0] < values[1] and values[2] < values[3]):
        raise ValueError(
            f"extent must have x_min < x_max and y_min < y_max, got {list(values)}."
        )
    return values


def _check_box(name: str, value: Any) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < 1 or value & (value - 1):
        raise ValueError(
            f"{name} must be a power of two (box side in cells), got {value!r}."
        )
    return int(value)


def boundary_squares(
    labels: Int[np.ndarray, "rows cols"],
) -> Bool[np.ndarray, "rows-1 cols-1"]:
    """The unit squares between cell centres that the boundary crosses: ``(rows - 1, cols - 1)``
    booleans, true where the square's four corner cells do not all have one class.

    Reading the labels as samples at the cell centres, a smooth boundary between the samples
    crosses a unit square exactly when it separates two of its corners, so the count of these
    squares is the number of unit boxes the boundary meets, whatever its direction (a boundary
    drawn through whole cells instead, one cell thick, meets only about half as many boxes
    along a diagonal as along an axis, which biases the slope at the smallest scales).
    """
    corners = np.stack(
        [labels[:-1, :-1], labels[:-1, 1:], labels[1:, :-1], labels[1:, 1:]]
    )
    return np.any(corners != corners[:1], axis=0)


def box_counts(
    boundary: Bool[np.ndarray, "rows cols"], box_cells: Sequence[int]
) -> Int[np.ndarray, " K"]:
    """``N(b)`` for each ``b``: the non-overlapping ``b x b`` boxes of unit squares tiling
    ``boundary`` from its top-left corner (its shape a multiple of every ``b``) that hold a
    square the boundary crosses (:func:`boundary_squares`)."""
    rows, cols = boundary.shape
    return np.asarray(
        [
            int(
                np.count_nonzero(
                    boundary.reshape(rows // b, b, cols // b, b).any(axis=(1, 3))
                )
            )
            for b in box_cells
        ],
        np.int64,
    )


def boundary_dimension(
    labels: Any,
    extent: Sequence[float],
    *,
    min_box: int = 1,
    max_box: int | None = None,
    confidence: float = 0.95,
) -> BoundaryDimension:
    """The box-counting dimension of the boundary between the classes of a 2-D grid.

    The labels are read as samples at the cell centres; ``N(b)`` is the number of boxes of
    ``b x b`` unit squares (the squares between four neighbouring centres) that the boundary
    crosses, i.e. whose ``(b + 1) x (b + 1)`` samples hold two or more classes (any two
    different values of ``labels``), for ``b = min_box, 2 min_box, ..., max_box``. The
    dimension is minus the least-squares slope

        D = - sum_k (x_k - x_bar)(y_k - y_bar) / sum_k (x_k - x_bar)^2,
        x_k = log b_k,  y_k = log N(b_k),

    averaged over four placements of the box lattice (shifted by half the largest box along
    each axis), with a standard error that covers both the fit and the placement, and a
    Student-t interval (:class:`BoundaryDimension`). Every box size tiles the same region at
    each placement: ``R x C`` unit squares, ``R`` and ``C`` the largest multiples of ``max_box``
    that fit after the shift. A smooth curve gives
    ``D = 1``; a boundary that fills the plane, ``D -> 2``. Cells need not be square (the
    dimension is unchanged by a linear rescaling of either axis).

    The default range is ``b = 1 .. max_box``, ``max_box`` the largest power of two with at
    least 8 boxes along the shorter side (``(min(rows, cols) - 1) / 8``; raise ``min_box`` above
    the finest structure a rendering resolves, where the boundary reads as smooth): boxes small enough to
    resolve the boundary, and many enough that ``N(b)`` is not dominated by the handful of
    boxes of the coarsest scale. Check that the points lie on a line (the ``fractal_boundary``
    experiment draws them): a bend means the boundary is not self-similar over the range.

    Args:
        labels: ``(rows, cols)`` integer or boolean class labels, e.g. the ``status`` of a
            sweep over a grid of initialisations reshaped to the grid (rows along ``y``), or
            ``status == TrajectoryStatus.CONVERGED_MINIMUM``.
        extent: ``[x_min, x_max, y_min, y_max]`` of the grid (``cols`` cells along ``x``,
            ``rows`` along ``y``), for the box sides in its units.
        min_box: smallest box side in unit squares, a power of two.
        max_box: largest box side, a power of two ``>= 4 min_box`` (at least
            :data:`MIN_SCALES` scales) and ``<= (min(rows, cols) - 1) * 2 / 3`` (the
            shifted placements must fit); default as above.
        confidence: level of ``interval``, in ``(0, 1)``.

    Returns:
        A :class:`BoundaryDimension`.

    Raises:
        ValueError: before any compute, on ``labels`` that are not a 2-D integer or boolean
            array, a grid too small for :data:`MIN_SCALES` box sizes, a single class (no
            boundary), a malformed ``extent``, box sizes that are not powers of two or give
            fewer than :data:`MIN_SCALES` scales, or ``confidence`` outside ``(0, 1)``; and when
            the region tiled by the boxes holds no boundary.
    """
    grid = np.asarray(labels)
    if grid.ndim != 2:
        raise ValueError(
            f"labels must be a 2-D grid (rows, cols), got shape {grid.shape}."
        )
    if not (np.issubdtype(grid.dtype, np.integer) or grid.dtype == np.bool_):
        raise ValueError(
            f"labels must be integer or boolean class labels, got dtype {grid.dtype}."
        )
    x_min, x_max, y_min, y_max = _check_extent(extent)
    min_box = _check_box("min_box", min_box)
    smallest_max = min_box << (MIN_SCALES - 1)
    side = min(grid.shape) - 1  # unit squares along the shorter side
    if max_box is None:
        if side < 8 * smallest_max:
            raise ValueError(
                f"labels of shape {grid.shape} is too small: {MIN_SCALES} box sizes from "
                f"min_box = {min_box} with 8 boxes per side need min(rows, cols) >= "
                f"{8 * smallest_max + 1}."
            )
        max_box = 1 << int(math.log2(side // 8))
    max_box = _check_box("max_box", max_box)
    if max_box < smallest_max:
        raise ValueError(
            f"max_box = {max_box} must be >= {smallest_max} (min_box * "
            f"{1 << (MIN_SCALES - 1)}) for {MIN_SCALES} box sizes."
        )
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")
    half = max_box // 2
    region = tuple((n - 1 - half) // max_box * max_box for n in grid.shape)
    if min(region) < max_box:
        raise ValueError(
            f"max_box = {max_box} is too large for labels of shape {grid.shape}: a box lattice "
            f"shifted by max_box / 2 must fit, max_box <= (min(rows, cols) - 1) * 2 / 3."
        )
    first = grid.flat[0]
    if np.all(grid == first):
        raise ValueError(
            f"labels has a single class ({first.item()!r}) everywhere: there is no boundary to measure."
        )

    boundary = boundary_squares(grid)
    box_cells = min_box << np.arange(int(math.log2(max_box // min_box)) + 1)
    counts = np.stack(
        [
            box_counts(boundary[dy : dy + region[0], dx : dx + region[1]], box_cells)
            for dy in (0, half)
            for dx in (0, half)
        ]
    )
    if np.any(counts[:, 0] == 0):
        raise ValueError(
            f"labels of shape {grid.shape} has a single class in the region tiled by the boxes "
            f"({region[0]} x {region[1]} unit squares from an offset of 0 or {half}): no "
            f"boundary to measure there."
        )
    x = np.log(box_cells.astype(np.float64))
    import scipy.stats  # here: importing gdlr_jax does not import scipy.stats (~1 s)

    fits = [scipy.stats.linregress(x, np.log(c.astype(np.float64))) for c in counts]
    slopes = -np.array([fit.slope for fit in fits])
    dimension = float(np.mean(slopes))
    error = math.sqrt(np.mean([fit.stderr**2 for fit in fits]) + np.var(slopes, ddof=1))
    t = float(scipy.stats.t.ppf(0.5 + confidence / 2, len(x) - 2))
    return BoundaryDimension(
        dimension=dimension,
        standard_error=error,
        interval=(dimension - t * error, dimension + t * error),
        confidence=float(confidence),
        intercept=float(np.mean([fit.intercept for fit in fits])),
        box_cells=box_cells,
        box_widths=box_cells * (x_max - x_min) / grid.shape[1],
        box_heights=box_cells * (y_max - y_min) / grid.shape[0],
        counts=counts,
        placement_dimensions=slopes,
        region_cells=region,
    )
