"""Masks to polygons and back: exact pixel-edge outlines, holes, transforms, round trips."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon, box

from wsi_amr.polygons import mask_to_polygons, rasterize_polygons


def _blob_mask(seed: int, size: int = 160) -> np.ndarray:
    """Random ellipses, holes cut into them, islands inside the holes, and a sprinkle of pixels."""
    rng = np.random.default_rng(seed)
    m = np.zeros((size, size), np.uint8)

    def ellipse(value: int, lo: int, hi: int) -> None:
        centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        axes = (int(rng.integers(lo, hi)), int(rng.integers(lo, hi)))
        cv2.ellipse(m, centre, axes, float(rng.integers(0, 180)), 0, 360, value, -1)

    for _ in range(12):
        ellipse(1, 6, 30)
    for _ in range(10):
        ellipse(0, 2, 8)
    for _ in range(6):
        ellipse(1, 1, 3)
    m[rng.random(m.shape) < 0.01] ^= 1  # single pixels, corner contacts, pinched holes
    return m


def _assert_exact(mask: np.ndarray, polys: list[Polygon]) -> None:
    assert all(isinstance(p, Polygon) and p.is_valid and not p.is_empty for p in polys)
    assert sum(p.area for p in polys) == int(np.count_nonzero(mask))
    np.testing.assert_array_equal(rasterize_polygons(polys, mask.shape), (mask != 0).astype(np.uint8))


def test_ring_gives_one_polygon_with_one_hole_and_exact_area() -> None:
    m = np.zeros((10, 10), np.uint8)
    m[2:8, 1:9] = 1
    m[4:6, 3:6] = 0
    (poly,) = mask_to_polygons(m)
    assert len(poly.interiors) == 1
    assert poly.area == m.sum() == 48 - 6
    assert Polygon(poly.interiors[0]).equals(box(3, 4, 6, 6))
    assert Polygon(poly.exterior).equals(box(1, 2, 9, 8))


def test_one_pixel_object_is_the_unit_square_of_that_pixel() -> None:
    m = np.zeros((5, 6), bool)
    m[2, 3] = True  # row 2, column 3
    (poly,) = mask_to_polygons(m)
    assert poly.equals(box(3, 2, 4, 3))
    assert len(poly.exterior.coords) == 5  # four corners, no collinear points


def test_one_pixel_wide_line_is_a_thin_rectangle() -> None:
    m = np.zeros((5, 9), np.uint8)
    m[2, 1:8] = 1
    (poly,) = mask_to_polygons(m)
    assert poly.equals(box(1, 2, 8, 3))


def test_pixels_touching_only_at_a_corner_become_two_valid_squares() -> None:
    m = np.array([[1, 0], [0, 1]], np.uint8)
    polys = mask_to_polygons(m)
    assert sorted(p.bounds for p in polys) == [(0, 0, 1, 1), (1, 1, 2, 2)]
    _assert_exact(m, polys)


def test_object_touching_the_image_edge_is_closed_along_the_edge() -> None:
    m = np.ones((3, 4), np.uint8)
    (poly,) = mask_to_polygons(m)
    assert poly.equals(box(0, 0, 4, 3))
    corner = np.zeros((4, 4), np.uint8)
    corner[2:, 3] = 1
    (poly,) = mask_to_polygons(corner)
    assert poly.equals(box(3, 2, 4, 4))


def test_island_inside_a_hole_is_a_separate_polygon() -> None:
    m = np.zeros((9, 9), np.uint8)
    m[1:8, 1:8] = 1
    m[2:7, 2:7] = 0
    m[4, 4] = 1
    polys = sorted(mask_to_polygons(m), key=lambda p: p.area)
    assert [len(p.interiors) for p in polys] == [0, 1]
    assert polys[0].equals(box(4, 4, 5, 5))
    _assert_exact(m, polys)


def test_scale_and_offset_map_pixel_edges_to_level0() -> None:
    m = np.zeros((4, 4), np.uint8)
    m[2, 1] = 1
    (poly,) = mask_to_polygons(m, scale=(2.0, 3.0), offset=(10.0, 20.0))
    assert poly.equals(box(12, 26, 14, 29))
    assert poly.area == 6.0
    back = rasterize_polygons([poly], m.shape, scale=(2.0, 3.0), offset=(10.0, 20.0))
    np.testing.assert_array_equal(back, m)


def test_uniform_scale_scales_area_exactly() -> None:
    m = _blob_mask(3, size=64)
    polys = mask_to_polygons(m, scale=4.0, offset=(100.0, 50.0))
    assert sum(p.area for p in polys) == m.sum() * 16
    np.testing.assert_array_equal(rasterize_polygons(polys, m.shape, scale=4.0, offset=(100.0, 50.0)), m)


@pytest.mark.parametrize("seed", range(6))
def test_rasterize_inverts_mask_to_polygons_on_random_blobs(seed: int) -> None:
    _assert_exact(m := _blob_mask(seed), mask_to_polygons(m))


def test_rasterize_inverts_mask_to_polygons_on_random_pixel_noise() -> None:
    # Small noise masks hit every local configuration of pinches and one-pixel holes.
    rng = np.random.default_rng(7)
    for _ in range(300):
        m = (rng.random(tuple(rng.integers(1, 10, 2))) < rng.random()).astype(np.uint8)
        _assert_exact(m, mask_to_polygons(m))


def test_empty_mask_gives_no_polygons() -> None:
    assert mask_to_polygons(np.zeros((5, 5), np.uint8)) == []


def test_mask_must_be_2d_and_scale_positive() -> None:
    with pytest.raises(ValueError, match="2-D"):
        mask_to_polygons(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="scale"):
        mask_to_polygons(np.ones((2, 2), np.uint8), scale=0.0)


def test_simplify_reduces_vertices_within_tolerance_and_stays_valid() -> None:
    m = np.zeros((200, 200), np.uint8)
    cv2.circle(m, (100, 100), 80, 1, -1)
    (exact,) = mask_to_polygons(m)
    (simple,) = mask_to_polygons(m, simplify=2.0)
    assert simple.is_valid
    assert len(simple.exterior.coords) < len(exact.exterior.coords) / 3
    assert exact.hausdorff_distance(simple) <= 2.0 + 1e-9


def test_min_area_is_in_output_units() -> None:
    m = np.zeros((20, 20), np.uint8)
    m[1, 1] = 1  # 1 px -> area 4 at scale 2
    m[5:15, 5:15] = 1
    assert len(mask_to_polygons(m, scale=2.0, min_area=4.0)) == 2
    (kept,) = mask_to_polygons(m, scale=2.0, min_area=4.5)
    assert kept.area == 400.0


def test_polygons_are_oriented_counter_clockwise() -> None:
    m = np.zeros((8, 8), np.uint8)
    m[1:7, 1:7] = 1
    m[3:5, 3:5] = 0
    (poly,) = mask_to_polygons(m)
    assert poly.exterior.is_ccw
    assert not poly.interiors[0].is_ccw


def test_rasterize_uses_pixel_centres() -> None:
    # Centre (0.5, 0.5) inside; centre (1.5, 0.5) on the right edge counts as outside.
    np.testing.assert_array_equal(rasterize_polygons([box(0, 0, 1.5, 1)], (1, 3)), [[1, 0, 0]])
    np.testing.assert_array_equal(rasterize_polygons([box(0.4, 0, 0.6, 1)], (1, 3)), [[1, 0, 0]])
    np.testing.assert_array_equal(rasterize_polygons([box(0.6, 0, 1.4, 1)], (1, 3)), [[0, 0, 0]])


def test_rasterize_respects_holes_unites_overlaps_and_paints_into_out() -> None:
    ring = box(0, 0, 6, 6).difference(box(2, 2, 4, 4))
    other = box(5, 0, 8, 2)  # overlaps the ring
    out = np.full((6, 8), 9, np.uint8)
    result = rasterize_polygons(shapely.MultiPolygon([ring]), (6, 8), out=out, value=3)
    assert result is out
    expected = np.full((6, 8), 9, np.uint8)
    expected[:, :6] = 3
    expected[2:4, 2:4] = 9  # the hole keeps what was there
    np.testing.assert_array_equal(out, expected)
    both = rasterize_polygons([ring, other], (6, 8))
    assert both[0:2, 5:8].all() and both.sum() == 32 + 4


def test_rasterize_clips_to_the_mask() -> None:
    assert rasterize_polygons([box(-5, -5, 2, 2)], (3, 3)).sum() == 4
    assert rasterize_polygons([box(10, 10, 20, 20)], (3, 3)).sum() == 0


def test_large_mask_with_many_objects_round_trips() -> None:
    rng = np.random.default_rng(0)
    m = np.zeros((3000, 3000), np.uint8)
    for _ in range(2000):
        centre = (int(rng.integers(0, 3000)), int(rng.integers(0, 3000)))
        cv2.circle(m, centre, int(rng.integers(3, 30)), 1, -1)
    polys = mask_to_polygons(m, scale=4.0)
    back = rasterize_polygons(polys, m.shape, scale=4.0)
    np.testing.assert_array_equal(back, m)
