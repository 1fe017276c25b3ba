"""Tests of gdlr_jax.boundary_dimension on sets of known dimension and on bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gdlr_jax
from gdlr_jax.dynamics._boundary_dimension import boundary_squares, box_counts

LOG4_LOG3 = math.log(4) / math.log(3)


def _centres(n: int) -> np.ndarray:
    return (np.arange(n) + 0.5) / n


def _cantor(x: np.ndarray, level: int) -> np.ndarray:
    """Whether ``x`` lies in the level-``level`` middle-third Cantor set (``[0, 1)``)."""
    inside = (x >= 0) & (x < 1)
    y = np.where(inside, x, 0.0)
    for _ in range(level):
        y = 3 * y
        digit = np.floor(y)
        inside &= digit != 1
        y -= digit
    return inside


def _renderings(rng: np.random.Generator, count: int):
    for _ in range(count):
        yield rng.uniform(0.0, 0.05, 2), rng.uniform(0.85, 0.95)


def test_straight_lines_have_dimension_one():
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(_centres(513), _centres(513))
    covered = 0
    for _ in range(10):
        angle, offset = rng.uniform(0, np.pi), rng.uniform(-0.1, 0.1)
        labels = np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5) > offset
        result = gdlr_jax.boundary_dimension(labels, [0, 1, 0, 1])
        assert abs(result.dimension - 1) < 0.02
        covered += result.interval[0] <= 1 <= result.interval[1]
    assert covered >= 8  # a nominal 95% interval


def test_a_filled_discs_edge_has_dimension_one():
    rng = np.random.default_rng(1)
    x, y = np.meshgrid(_centres(513), _centres(513))
    covered = 0
    for _ in range(10):
        (cx, cy), radius = rng.uniform(0.4, 0.6, 2), rng.uniform(0.3, 0.4)
        labels = ((x - cx) ** 2 + (y - cy) ** 2 < radius**2).astype(np.int32)
        result = gdlr_jax.boundary_dimension(labels, [0, 1, 0, 1])
        assert abs(result.dimension - 1) < 0.02
        covered += result.interval[0] <= 1 <= result.interval[1]
    assert covered >= 8


def test_product_cantor_dust_has_dimension_log4_over_log3():
    """C x C (C the middle-third Cantor set at level 6, 4^6 squares of side ~2.5 cells)
    placed at random offsets and scales on a 2049^2 grid: the box lattice never aligns with
    the construction. Boxes from 4 cells up (above the finest squares, below which the
    rendering's boundary is the squares' smooth edges)."""
    rng = np.random.default_rng(0)
    t = _centres(2049)
    estimates, covered = [], 0
    for (ox, oy), scale in _renderings(rng, 10):
        labels = (
            _cantor((t - oy) / scale, 6)[:, None]
            & _cantor((t - ox) / scale, 6)[None, :]
        )
        result = gdlr_jax.boundary_dimension(labels, [0, 1, 0, 1], min_box=4)
        estimates.append(result.dimension)
        covered += result.interval[0] <= LOG4_LOG3 <= result.interval[1]
        assert 0 < result.standard_error < 0.1
    assert covered >= 8
    assert abs(np.mean(estimates) - LOG4_LOG3) < 0.03


def test_counts_are_the_boxes_the_boundary_crosses():
    # a vertical edge between columns 4 and 5 of a 9 x 9 grid: the unit squares between
    # centres 4 and 5 of every row are crossed, one column of 8 squares
    labels = np.zeros((9, 9), np.int32)
    labels[:, 5:] = 2
    squares = boundary_squares(labels)
    assert squares.shape == (8, 8)
    np.testing.assert_array_equal(np.nonzero(squares.any(axis=0))[0], [4])
    np.testing.assert_array_equal(box_counts(squares, [1, 2, 4, 8]), [8, 4, 2, 1])


def test_result_fields():
    x, y = np.meshgrid(_centres(257), _centres(129))
    labels = np.where(y > 0.3 + 0.1 * x, 3, 1)
    result = gdlr_jax.boundary_dimension(labels, [-1.0, 1.0, 0.0, 1.0], confidence=0.9)
    np.testing.assert_array_equal(result.box_cells, [1, 2, 4, 8, 16])  # 128 / 8 = 16
    assert result.counts.shape == (4, 5) and result.placement_dimensions.shape == (4,)
    np.testing.assert_allclose(result.box_widths, result.box_cells * 2.0 / 257)
    np.testing.assert_allclose(result.box_heights, result.box_cells * 1.0 / 129)
    assert result.confidence == 0.9
    assert result.interval[0] < result.dimension < result.interval[1]
    assert result.dimension == pytest.approx(np.mean(result.placement_dimensions))
    line = result.intercept - result.dimension * np.log(result.box_cells)
    np.testing.assert_allclose(line, np.log(result.counts).mean(axis=0), atol=0.1)


@pytest.mark.parametrize(
    "labels, kwargs, match",
    [
        (np.zeros((64,), np.int32), {}, r"labels must be a 2-D grid .* shape \(64,\)"),
        (np.zeros((4, 64, 64), np.int32), {}, r"labels must be a 2-D grid"),
        (
            np.zeros((64, 64), np.float32),
            {},
            r"integer or boolean class labels, got dtype float32",
        ),
        (np.ones((64, 64), np.int32), {}, r"single class \(1\) everywhere"),
        (np.eye(20, dtype=np.int32), {}, r"shape \(20, 20\) is too small: 3 box sizes"),
        (np.eye(64, dtype=np.int32), {"extent": [0, 1, 1, 0]}, r"y_min < y_max"),
        (np.eye(64, dtype=np.int32), {"extent": [0, 1, 0]}, r"extent must be 4 finite"),
        (
            np.eye(64, dtype=np.int32),
            {"extent": [0, np.nan, 0, 1]},
            r"extent must be 4 finite",
        ),
        (np.eye(64, dtype=np.int32), {"min_box": 3}, r"min_box must be a power of two"),
        (
            np.eye(64, dtype=np.int32),
            {"max_box": 4, "min_box": 2},
            r"max_box = 4 must be >= 8",
        ),
        (np.eye(64, dtype=np.int32), {"max_box": 64}, r"max_box = 64 is too large"),
        (
            np.eye(64, dtype=np.int32),
            {"confidence": 1.0},
            r"confidence must be in \(0, 1\)",
        ),
    ],
)
def test_bad_input_is_one_line_value_error(labels, kwargs, match):
    extent = kwargs.pop("extent", [0, 1, 0, 1])
    with pytest.raises(ValueError, match=match) as info:
        gdlr_jax.boundary_dimension(labels, extent, **kwargs)
    assert "\n" not in str(info.value)


def test_a_boundary_outside_the_tiled_region_is_refused():
    labels = np.zeros((70, 70), np.int32)
    labels[-1, -1] = 1  # beyond the region of 64 squares tiled at every placement
    with pytest.raises(
        ValueError, match=r"single class in the region tiled by the boxes"
    ):
        gdlr_jax.boundary_dimension(labels, [0, 1, 0, 1])
