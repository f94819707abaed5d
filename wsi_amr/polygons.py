"""Masks to polygons and back: pure functions, numpy arrays in, shapely geometries out.

Coordinates follow the pixel-edge convention: mask pixel ``(c, r)`` (column, row) covers the square
``[c, c+1) x [r, r+1)`` in mask pixels, so a single pixel at ``(0, 0)`` becomes the unit square.
Output coordinates are ``x = c * scale_x + offset_x`` and ``y = r * scale_y + offset_y``; with
``scale`` set to the mask's downsample factor and ``offset`` to its level-0 origin they are level-0
pixels (y down), which is what QuPath GeoJSON wants.

Outlines are traced on pixel edges, not through pixel centres, so a polygon's area equals its
pixel count times ``scale_x * scale_y`` exactly (before simplification) and
``rasterize_polygons(mask_to_polygons(m)) == m``.
"""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np
import shapely
from shapely.geometry import GeometryCollection, MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

Scale = float | tuple[float, float]

# Rows of spans rasterised at once: bounds the coverage buffer to _BAND_ROWS * width int32.
_BAND_ROWS = 1024


def polygonal_parts(geom: BaseGeometry | None) -> list[Polygon]:
    """Return the non-empty Polygons inside ``geom`` (Polygon, MultiPolygon or GeometryCollection).

    Points and lines (for example the collapsed leftovers of ``make_valid``) are dropped.
    """
    if geom is None or geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    if isinstance(geom, (MultiPolygon, GeometryCollection)):
        out: list[Polygon] = []
        for part in geom.geoms:
            out.extend(polygonal_parts(part))
        return out
    return []


def _scale_xy(scale: Scale) -> tuple[float, float]:
    pair = (scale, scale) if np.isscalar(scale) else scale
    sx, sy = (float(v) for v in pair)  # type: ignore[union-attr, arg-type]
    if not (np.isfinite(sx) and np.isfinite(sy) and sx > 0 and sy > 0):
        raise ValueError(f"scale must be positive and finite, got {scale!r}")
    return sx, sy


def _offset_xy(offset: tuple[float, float]) -> tuple[float, float]:
    ox, oy = (float(v) for v in offset)
    if not (np.isfinite(ox) and np.isfinite(oy)):
        raise ValueError(f"offset must be finite, got {offset!r}")
    return ox, oy


def _cyclic_neighbours(ring_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the previous and next point of each point in concatenated closed rings.

    ``ring_id`` gives the ring of each point; points of one ring are contiguous.
    """
    n = ring_id.size
    first = np.flatnonzero(np.r_[True, ring_id[1:] != ring_id[:-1]])
    last = np.r_[first[1:], n] - 1
    nxt = np.arange(1, n + 1)
    nxt[last] = first
    prev = np.arange(-1, n - 1)
    prev[first] = last
    return prev, nxt


def _lattice_rings(points: np.ndarray, ring_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Turn cv2 contours traced on the edge lattice into exact pixel-edge rings.

    ``points`` are the (x, y) lattice coordinates of all contours concatenated (from
    ``cv2.CHAIN_APPROX_NONE``: one 8-neighbour step apart) and ``ring_id`` the contour of each.
    On the lattice, pixel edges and corners sit at odd coordinates and pixel centres at even ones
    (see ``_edge_lattice``). cv2's 8-connected tracing cuts concave corners with a diagonal step;
    the true boundary goes through the corner, which of the two candidate points is the one with
    both coordinates odd (the other is a pixel centre and never lies on a boundary).
    Returns the rings' corner vertices (collinear points removed) and their ring ids.
    """
    p = points.astype(np.int64)
    _, nxt_i = _cyclic_neighbours(ring_id)
    nxt = p[nxt_i]
    step = nxt - p
    diagonal = (np.abs(step[:, 0]) == 1) & (np.abs(step[:, 1]) == 1)
    if diagonal.any():
        # Candidate corners: (next.x, this.y) or (this.x, next.y); keep the one with odd x.
        take_next_x = nxt[:, 0] % 2 == 1
        corner = np.where(
            take_next_x[:, None],
            np.stack([nxt[:, 0], p[:, 1]], axis=1),
            np.stack([p[:, 0], nxt[:, 1]], axis=1),
        )
        # Interleave each point with its corner, then keep the points and the real corners.
        both = np.empty((2 * len(p), 2), dtype=np.int64)
        both[0::2] = p
        both[1::2] = corner
        keep = np.ones(2 * len(p), dtype=bool)
        keep[1::2] = diagonal
        p = both[keep]
        ring_id = np.repeat(ring_id, 2)[keep]
    # Keep only points where the direction changes: every step is axis-aligned by now.
    prev_i, nxt_i = _cyclic_neighbours(ring_id)
    turn = np.any(np.sign(p - p[prev_i]) != np.sign(p[nxt_i] - p), axis=1)
    return p[turn].astype(np.float64), ring_id[turn]


def _edge_lattice(binary: np.ndarray) -> np.ndarray:
    """Rasterise the union of closed pixel squares on a 2x lattice, padded by one lattice cell.

    Lattice point ``(2r + 2, 2c + 2)`` is the centre of pixel ``(r, c)``; its edges and corners lie
    at ``2r + 1 .. 2r + 3``. A lattice point is set when any foreground pixel's closed square
    contains it, so a one-pixel object becomes a 3x3 block and a one-pixel line a 3-wide band: both
    trace to non-degenerate outlines. The one-cell zero padding keeps every object off the array
    border, which cv2 border following treats specially.
    """
    h, w = binary.shape
    lat = np.zeros((2 * h + 3, 2 * w + 3), dtype=np.uint8)
    lat[2 : 2 * h + 2 : 2, 2 : 2 * w + 2 : 2] = binary
    return cv2.dilate(lat, np.ones((3, 3), dtype=np.uint8))


def _trace(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact pixel-edge polygons of a 2-D uint8 mask, in its own pixel-edge coordinates.

    Returns an object array of Polygons (shell plus holes; not yet made valid, see
    ``_split_invalid``) and, for each, the (column, row) of the pixel at its bounding box's
    top-left corner, which the label atlas uses to tell which slot a polygon came from.
    """
    lat = _edge_lattice(binary)
    contours, hierarchy = cv2.findContours(lat, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return np.empty(0, dtype=object), np.empty((0, 2), dtype=np.int64)
    parent = hierarchy.reshape(-1, 4)[:, 3]
    # RETR_CCOMP has two levels: outer borders (no parent) and holes (parent is an outer border),
    # so islands inside holes come back as outer borders of their own.
    is_hole = parent != -1
    poly_of = np.where(is_hole, parent, np.arange(len(contours)))
    # Ring order for shapely.polygons: each polygon's shell first, then its holes.
    ring_order = np.lexsort((is_hole, poly_of))
    lengths = np.array([len(contours[i]) for i in ring_order], dtype=np.int64)
    points = np.concatenate([contours[i].reshape(-1, 2) for i in ring_order])
    vertices, ring_id = _lattice_rings(points, np.repeat(np.arange(len(contours)), lengths))
    # Lattice coordinate L is pixel-edge coordinate (L - 1) / 2: exact small integers.
    xy = (vertices - 1.0) / 2.0
    rings = shapely.linearrings(xy, indices=ring_id)
    _, dense = np.unique(poly_of[ring_order], return_inverse=True)  # shapely wants 0..n-1
    polys = shapely.polygons(rings, indices=dense)
    # The top-left corner of a shell's bounding box is a vertex's x and y: a pixel edge, so the
    # pixel starting there lies inside the bounding box.
    corner = shapely.bounds(polys)[:, :2].astype(np.int64)
    return polys, corner


def _made_valid(polys: np.ndarray) -> np.ndarray:
    """Valid versions of pixel outlines that touch themselves at corners, same area.

    A zero buffer rebuilds them an order of magnitude faster than ``make_valid`` (whose linework
    method took seconds per window on large predicted masks); it is kept wherever it is valid and
    covers exactly the outline's area (shell minus holes, which ``area`` computes for any ring),
    and ``make_valid`` takes the rest."""
    fixed = shapely.buffer(polys, 0)
    ok = shapely.is_valid(fixed) & np.isclose(shapely.area(fixed), shapely.area(polys), rtol=0, atol=1e-6)
    if not ok.all():
        fixed[~ok] = shapely.make_valid(polys[~ok])
    return fixed


def _split_invalid(polys: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep valid polygons; replace invalid ones by their valid polygonal parts.

    Pixel outlines are invalid only where 8-connectivity joins pixels at a single corner (a shell
    touching itself, or a hole touching its shell twice); ``make_valid`` splits them there without
    changing the covered area. ``groups`` (one id per polygon) follows the split.
    """
    if polys.size == 0:
        return polys, groups
    bad = ~shapely.is_valid(polys)
    if not bad.any():
        return polys, groups
    parts, idx = shapely.get_parts(_made_valid(polys[bad]), return_index=True)
    keep = (shapely.get_type_id(parts) == shapely.GeometryType.POLYGON) & ~shapely.is_empty(parts)
    keep &= shapely.is_valid(parts)
    good = ~bad
    return (
        np.concatenate([polys[good], parts[keep]]),
        np.concatenate([groups[good], groups[bad][idx[keep]]]),
    )


def _place(
    polys: np.ndarray,
    shift: np.ndarray,
    sx: float,
    sy: float,
    ox: float,
    oy: float,
) -> np.ndarray:
    """Move polygons from crop pixel-edge coordinates to output coordinates.

    ``shift`` is the (column, row) of each polygon's crop origin in the full mask, shape (n, 2),
    so that ``x = (x_crop + column) * scale_x + offset_x``, computed the same way whatever the crop.
    """
    if polys.size == 0:
        return polys
    coords, idx = shapely.get_coordinates(polys, return_index=True)
    coords = coords + shift[idx]
    coords[:, 0] = coords[:, 0] * sx + ox
    coords[:, 1] = coords[:, 1] * sy + oy
    return shapely.set_coordinates(polys.copy(), coords)


def _finish(
    polys: np.ndarray, groups: np.ndarray, simplify: float, min_area: float
) -> tuple[np.ndarray, np.ndarray]:
    """Simplify, drop small polygons and orient; ``groups`` follows the polygons."""
    if simplify > 0 and polys.size:
        polys = shapely.simplify(polys, simplify, preserve_topology=True)
        # Topology-preserving simplification keeps polygons valid in practice; make sure.
        polys, groups = _split_invalid(polys, groups)
        keep = ~shapely.is_empty(polys)
        polys, groups = polys[keep], groups[keep]
    if min_area > 0 and polys.size:
        keep = shapely.area(polys) >= min_area
        polys, groups = polys[keep], groups[keep]
    if polys.size:
        # RFC 7946 orientation (exterior counter-clockwise in x/y values); QuPath accepts either.
        polys = shapely.orient_polygons(polys, exterior_cw=False)
    return polys, groups


def _check_mask(mask: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {arr.shape}")
    return arr


def mask_to_polygons(
    mask: np.ndarray,
    *,
    scale: Scale = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
    simplify: float = 0.0,
    min_area: float = 0.0,
) -> list[Polygon]:
    """Outline the foreground of a 2-D mask as valid polygons with holes.

    Args:
        mask: 2-D array, non-zero = inside, in mask pixels.
        scale: output units per mask pixel, one value or ``(scale_x, scale_y)``; the mask's
            downsample to get level-0 px.
        offset: output coordinates ``(x, y)`` of the mask's top-left corner (level-0 px).
        simplify: Douglas-Peucker tolerance in output units (topology preserving); 0 keeps the
            exact pixel outline.
        min_area: polygons smaller than this (output units squared) are dropped.

    Returns:
        One polygon per 8-connected component, holes included; islands inside holes are separate
        polygons. Where 8-connectivity joins pixels only at a corner the component is split there,
        because a polygon pinched to a point is invalid. Before simplification each polygon's area
        is exactly its pixel count * scale_x * scale_y.
    """
    arr = _check_mask(mask, "mask")
    sx, sy = _scale_xy(scale)
    ox, oy = _offset_xy(offset)
    binary = (arr != 0).astype(np.uint8)
    rows = np.flatnonzero(binary.any(axis=1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(binary.any(axis=0))
    r0, c0 = int(rows[0]), int(cols[0])
    # Tracing the bounding-box crop keeps the 4x lattice small for sparse masks.
    polys, _ = _trace(binary[r0 : int(rows[-1]) + 1, c0 : int(cols[-1]) + 1])
    groups = np.zeros(polys.size, dtype=np.int64)
    polys, groups = _split_invalid(polys, groups)
    polys = _place(polys, np.array([[c0, r0]], dtype=np.float64)[groups], sx, sy, ox, oy)
    polys, _ = _finish(polys, groups, float(simplify), float(min_area))
    return list(polys)


def _iter_polygons(geoms: BaseGeometry | Iterable[BaseGeometry] | None) -> list[Polygon]:
    if geoms is None:
        return []
    if isinstance(geoms, BaseGeometry):
        return polygonal_parts(geoms)
    out: list[Polygon] = []
    for g in geoms:
        out.extend(polygonal_parts(g))
    return out


def rasterize_polygons(
    geoms: BaseGeometry | Iterable[BaseGeometry],
    shape: tuple[int, int],
    *,
    scale: Scale = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
    value: int = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Paint polygons (output units, e.g. level-0 px) into a mask of ``shape`` (h, w) mask pixels.

    The inverse of :func:`mask_to_polygons` with the same ``scale`` and ``offset``: a pixel is
    inside when its centre ``((c + 0.5) * scale_x + offset_x, (r + 0.5) * scale_y + offset_y)`` is
    inside a polygon (holes excluded, even-odd within each polygon; a centre exactly on a left or
    top edge counts as inside, on a right or bottom edge as outside). Overlapping polygons are
    united. Non-polygonal geometries are ignored.

    Pixels inside are set to ``value`` in ``out`` (a new zeroed uint8 array when None), which is
    returned; other pixels are left untouched.
    """
    h, w = int(shape[0]), int(shape[1])
    if out is None:
        out = np.zeros((h, w), dtype=np.uint8)
    elif out.shape[:2] != (h, w):
        raise ValueError(f"out has shape {out.shape}, expected {(h, w)}")
    sx, sy = _scale_xy(scale)
    ox, oy = _offset_xy(offset)
    polys = _iter_polygons(geoms)
    if not polys or h == 0 or w == 0:
        return out

    rings, ring_poly = shapely.get_rings(np.asarray(polys, dtype=object), return_index=True)
    coords, coord_ring = shapely.get_coordinates(rings, return_index=True)
    # Mask-pixel coordinates shifted so that pixel centres sit on integers.
    x = (coords[:, 0] - ox) / sx - 0.5
    y = (coords[:, 1] - oy) / sy - 0.5
    edge = coord_ring[:-1] == coord_ring[1:]  # closed rings: consecutive points of one ring
    x0, y0, x1, y1 = x[:-1][edge], y[:-1][edge], x[1:][edge], y[1:][edge]
    group = ring_poly[coord_ring[:-1][edge]]

    # Scanline crossings: row r (centre at integer y = r) crosses an edge when
    # min(y0, y1) <= r < max(y0, y1); half-open so each vertex counts once and flat edges never.
    ylo, yhi = np.minimum(y0, y1), np.maximum(y0, y1)
    r_first = np.clip(np.ceil(ylo), 0, h).astype(np.int64)
    r_stop = np.clip(np.ceil(yhi), 0, h).astype(np.int64)
    n = np.maximum(r_stop - r_first, 0)
    total = int(n.sum())
    if total == 0:
        return out
    e_idx = np.repeat(np.arange(n.size), n)
    within = np.arange(total) - np.repeat(np.cumsum(n) - n, n)
    rows = r_first[e_idx] + within
    t = (rows - y0[e_idx]) / (y1[e_idx] - y0[e_idx])
    xs = x0[e_idx] + t * (x1[e_idx] - x0[e_idx])
    grp = group[e_idx]

    # Within one polygon and row, crossings pair up into inside spans (even-odd rule).
    order = np.lexsort((xs, rows, grp))
    xs, rows = xs[order], rows[order]
    x_in, x_out, span_rows = xs[0::2], xs[1::2], rows[0::2]
    # Pixel c is inside when x_in <= c < x_out (c is its centre in shifted coordinates).
    c_first = np.clip(np.ceil(x_in), 0, w).astype(np.int64)
    c_stop = np.clip(np.ceil(x_out), 0, w).astype(np.int64)
    keep = c_stop > c_first
    span_rows, c_first, c_stop = span_rows[keep], c_first[keep], c_stop[keep]
    if span_rows.size == 0:
        return out

    # Difference-array coverage, one band of rows at a time to bound memory; a pixel is inside
    # when at least one span covers it, which also unites overlapping polygons.
    band_of = span_rows // _BAND_ROWS
    order = np.argsort(band_of, kind="stable")
    span_rows, c_first, c_stop = span_rows[order], c_first[order], c_stop[order]
    band_of = band_of[order]
    bounds = np.flatnonzero(np.r_[True, band_of[1:] != band_of[:-1], True])
    for s, e in zip(bounds[:-1], bounds[1:]):
        top = int(band_of[s]) * _BAND_ROWS
        bottom = min(top + _BAND_ROWS, h)
        diff = np.zeros((bottom - top, w + 1), dtype=np.int32)
        local = span_rows[s:e] - top
        np.add.at(diff, (local, c_first[s:e]), 1)
        np.add.at(diff, (local, c_stop[s:e]), -1)
        inside = np.cumsum(diff[:, :w], axis=1) > 0
        out[top:bottom][inside] = value
    return out
