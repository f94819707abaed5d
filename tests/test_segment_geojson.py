"""`wsi-amr segment` after the model, end to end on synthetic label images: blended windows ->
class map -> seam-free polygons -> QuPath GeoJSON (plain and gzipped) -> read back and rasterised.

No model and no slide: ``predict`` cuts windows out of a known probability image, so what comes
out of the chain can be compared with the label image pixel for pixel. Windows are small (64 px,
16 px overlap: final blocks every 48 px) so objects cross many of them.
"""

from __future__ import annotations

import gzip
import json
import math
import uuid
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from shapely.geometry import LineString, shape

from wsi_amr.geojson import GeoJSONError, read_geojson, validate_geojson
from wsi_amr.jobs.segment import finish_objects, write_objects
from wsi_amr.polygons import rasterize_polygons
from wsi_amr.segmentation.windows import SeamlessPolygons, blend_stream, class_map, touching_groups
from wsi_amr.tiling import Block

WINDOW, OVERLAP = 64, 16
STRIDE = WINDOW - OVERLAP  # final blocks start every 48 px
NAMES = ["Background", "Gland", "Stroma", "Tumour"]
COLORS = [[0, 0, 0], [200, 30, 40], [20, 160, 60], [40, 60, 220]]
ODD_SCALE, ODD_OFFSET = 1.24, (-100.0, 37.0)
# Mapping each block to output coordinates on its own (``offset + block.x * scale``) once put the
# border two neighbouring blocks share one ulp apart at scales like 1.24 (78.55999999999999 vs
# 78.56 at x = 144), and the pieces were never merged; pieces are now unioned in working px.
SEAM_NOTE = "pieces of one object must merge across blocks at any scale, e.g. 1.24"


@dataclass
class Chain:
    objects: dict            # finish_objects' output: {label: [(polygon, mean probability), ...]}
    seam: SeamlessPolygons
    plain: Path              # .geojson
    gz: Path                 # .geojson.gz
    reports: tuple           # write_objects' reports (plain, gz)
    expected: np.ndarray     # the label image the chain should reproduce (background where no window predicted)
    blocks: list[Block]
    scale: float
    offset: tuple[float, float]
    object_type: str


def run_chain(tmp_path: Path, labels: np.ndarray, k: int, *, probs: np.ndarray | None = None,
              scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0), no_tissue=lambda b: False,
              simplify: float = 0.0, min_area: float = 0.0, names=NAMES, colors=COLORS,
              object_type: str = "annotation", px_um2: float = 1.0, stem: str = "slide",
              flush: bool = True) -> Chain:
    """Blend windows cut from ``probs`` (one-hot ``labels`` by default; windows where ``no_tissue``
    is true return None), outline, merge (flushing finished rows as the command does, unless
    ``flush`` is false), finish and write both .geojson and .geojson.gz."""
    h, w = labels.shape
    if probs is None:
        probs = np.eye(k, dtype=np.float32)[labels]
    predicted = np.zeros((h, w), bool)

    def predict(b: Block) -> np.ndarray | None:
        if no_tissue(b):
            return None
        predicted[b.y:b.y + b.h, b.x:b.x + b.w] = True
        return probs[b.y:b.y + b.h, b.x:b.x + b.w].copy()  # fresh: blend_stream weights it in place

    seam = SeamlessPolygons(scale=scale, offset=offset, simplify=simplify, min_area=min_area)
    tiled = np.zeros((h, w), np.int32)
    blocks = []
    for block, p, _ in blend_stream(w, h, WINDOW, OVERLAP, k, predict):
        tiled[block.y:block.y + block.h, block.x:block.x + block.w] += 1
        blocks.append(block)
        if flush and block.x == 0 and block.y > 0:  # as the command does at each new row
            seam.flush(block.y)
        seam.add(block, class_map(p), p)
    assert (tiled == 1).all(), "final blocks must tile the image"
    objects = finish_objects(seam)
    out = tmp_path / stem
    out.mkdir(parents=True, exist_ok=True)
    plain, gz = out / f"{stem}.geojson", out / f"{stem}.geojson.gz"
    reports = tuple(write_objects(p, objects, names, colors, object_type, px_um2) for p in (plain, gz))
    expected = np.where(predicted, labels, 0)
    return Chain(objects, seam, plain, gz, reports, expected, blocks, scale, offset, object_type)


# --------------------------------------------------------------------------- checks


def load_features(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == path.name.endswith(".gz"), "gzip exactly when the name ends in .gz"
    text = (gzip.decompress(raw) if path.name.endswith(".gz") else raw).decode("utf-8")
    data = json.loads(text)
    assert data["type"] == "FeatureCollection" and isinstance(data["features"], list)
    return data["features"]


def _no_nulls(value, where: str) -> None:
    assert value is not None, f"null at {where}"
    if isinstance(value, dict):
        for key, v in value.items():
            _no_nulls(v, f"{where}.{key}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _no_nulls(v, f"{where}[{i}]")


def _coordinates(geometry: dict) -> list[list[list[float]]]:
    """The rings of a Polygon or MultiPolygon mapping."""
    polys = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    return [ring for poly in polys for ring in poly]


def check_qupath_rules(path: Path, object_type: str = "annotation") -> list[dict]:
    """DESIGN.md section 5, checked on the file independently of validate_geojson (which must agree)."""
    assert validate_geojson(path) == []
    features = load_features(path)
    ids = set()
    for f in features:
        assert f["type"] == "Feature" and set(f) <= {"type", "id", "geometry", "properties"}
        assert "objectType" not in f  # inside properties only
        _no_nulls(f, "feature")
        assert isinstance(f["id"], str) and str(uuid.UUID(f["id"])) == f["id"].lower() and f["id"] not in ids
        ids.add(f["id"])
        props = f["properties"]
        assert props["objectType"] == object_type
        cls = props["classification"]
        assert isinstance(cls["name"], str) and cls["name"]
        assert len(cls["color"]) == 3 and all(type(c) is int and 0 <= c <= 255 for c in cls["color"])
        m = props["measurements"]
        assert set(m) == {"Area µm^2", "Mean probability"}
        assert all(type(v) in (int, float) and math.isfinite(v) for v in m.values())
        geometry = f["geometry"]
        assert geometry["type"] in ("Polygon", "MultiPolygon")
        for ring in _coordinates(geometry):
            assert len(ring) >= 4 and ring[0] == ring[-1], "closed rings"
            xy = np.asarray(ring, dtype=np.float64)
            assert np.all(np.abs(xy * 100 - np.round(xy * 100)) < 1e-6), "two decimals (QuPath's 0.01 px grid)"
        geom = shape(geometry)
        assert geom.is_valid and not geom.is_empty and geom.area > 0
        snapped = shapely.set_precision(geom, 0.01)
        assert snapped.is_valid and not snapped.is_empty
        # On the grid already: QuPath's snapping changes nothing.
        assert shapely.equals_exact(shapely.normalize(snapped), shapely.normalize(geom), tolerance=1e-9)
    return features


def read_back(chain: Chain, gz: bool = False):
    """The objects of one written file, after checking it against the QuPath rules."""
    path = chain.gz if gz else chain.plain
    check_qupath_rules(path, chain.object_type)
    return read_geojson(path)


def polygons_by_class(objects) -> dict[str, list]:
    out: dict[str, list] = {}
    for o in objects:
        out.setdefault(o.class_name, []).append(o.geometry)
    return out


def assert_rasterises_to(polys_by_label: dict[int, list], expected: np.ndarray, scale, offset) -> None:
    """Each label's polygons rasterise to exactly that label's pixels (so no pixel is claimed twice)."""
    for label in range(1, int(expected.max(initial=0)) + 1):
        got = rasterize_polygons(polys_by_label.get(label, []), expected.shape, scale=scale, offset=offset)
        want = expected == label
        assert (got.astype(bool) == want).all(), (
            f"label {label}: {(got.astype(bool) != want).sum()} pixels differ")
    stray = set(polys_by_label) - set(range(1, int(expected.max(initial=0)) + 1))
    assert not any(polys_by_label[s] for s in stray), f"polygons for labels not in the image: {stray}"


def components4(mask: np.ndarray) -> tuple[int, np.ndarray]:
    n, comp = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)
    return n - 1, comp


def pixels_of(poly, shape_hw, scale, offset) -> tuple[tuple[slice, slice], np.ndarray]:
    """The pixels a polygon covers, rasterised in its bounding box only."""
    h, w = shape_hw
    minx, miny, maxx, maxy = poly.bounds
    c0 = max(int(math.floor((minx - offset[0]) / scale)) - 1, 0)
    r0 = max(int(math.floor((miny - offset[1]) / scale)) - 1, 0)
    c1 = min(int(math.ceil((maxx - offset[0]) / scale)) + 1, w)
    r1 = min(int(math.ceil((maxy - offset[1]) / scale)) + 1, h)
    m = rasterize_polygons(poly, (r1 - r0, c1 - c0), scale=scale,
                           offset=(offset[0] + c0 * scale, offset[1] + r0 * scale))
    return (slice(r0, r1), slice(c0, c1)), m.astype(bool)


def assert_one_polygon_per_component(polys, mask: np.ndarray, scale, offset) -> np.ndarray:
    """mask_to_polygons promises one polygon per 8-connected component, split where pixels meet
    only at a corner: that is one polygon per 4-connected component. Each polygon must cover
    exactly one component, every component once, with area = pixels * scale^2.
    Returns the component id of each polygon."""
    n, comp = components4(mask)
    ids = []
    for poly in polys:
        sl, m = pixels_of(poly, mask.shape, scale, offset)
        under = np.unique(comp[sl][m])
        assert under.size == 1 and under[0] != 0, f"polygon covers components {under.tolist()}"
        cid = int(under[0])
        assert ((comp[sl] == cid) == m).all(), f"polygon does not cover all of component {cid}"
        assert poly.area == pytest.approx(m.sum() * scale**2, rel=1e-12, abs=1e-9)
        ids.append(cid)
    assert sorted(ids) == list(range(1, n + 1)), f"{len(polys)} polygons for {n} components"
    return np.asarray(ids)


def polys_of(objects, label: int) -> list:
    return [p for p, _ in objects.get(label, [])]


def hole_count(geom) -> int:
    return sum(len(p.interiors) for p in getattr(geom, "geoms", [geom]))


# --------------------------------------------------------------------------- synthetic images


def blobs(h: int, w: int, k: int, seed: int, cell: int = 6, noise: float = 0.05) -> np.ndarray:
    """Blocky random classes with single-pixel noise: holes, islands, corner touches everywhere."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, k, size=(h // cell + 1, w // cell + 1)).astype(np.uint8)
    labels = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    flip = rng.random((h, w)) < noise
    labels[flip] = rng.integers(0, k, size=int(flip.sum()))
    return labels


def nested_holes() -> np.ndarray:
    """A ring with islands in its hole (one with a hole holding an island), and a two-hole block."""
    labels = np.zeros((160, 200), np.uint8)
    labels[20:140, 20:140] = 1       # ring: crosses block borders at 48 and 96 both ways
    labels[40:120, 40:120] = 0       # its hole
    labels[60:100, 60:75] = 1        # a class-1 island in the hole
    labels[60:100, 85:100] = 2       # a class-2 island in the hole ...
    labels[70:90, 89:96] = 0         # ... with a hole ...
    labels[78:82, 91:94] = 1         # ... holding a class-1 island
    labels[20:60, 150:195] = 1       # a block with two holes, across the borders at 48 and 192
    labels[25:35, 155:165] = 0
    labels[40:55, 170:190] = 0
    return labels


# --------------------------------------------------------------------------- 1. holes and islands


@pytest.mark.parametrize("gaps", [False, True], ids=["all-windows", "windows-without-tissue"])
def test_holes_and_islands_come_back_pixel_exact(tmp_path, gaps):
    labels = nested_holes()
    # Windows without tissue: (48, 48) leaves [64, 96)^2 unpredicted (background), cutting the
    # islands; (144, 0) leaves [160, 200) x [0, 48), cutting the two-hole block.
    skip = (lambda b: (b.x, b.y) in {(48, 48), (144, 0)}) if gaps else (lambda b: False)
    chain = run_chain(tmp_path, labels, 3, no_tissue=skip)
    if gaps:
        assert (chain.expected != labels).any() and (chain.expected[64:96, 64:96] == 0).all()
    else:
        assert (chain.expected == labels).all()
    for gz in (False, True):
        objs = read_back(chain, gz)
        by_class = polygons_by_class(objs)
        assert set(by_class) <= {"Gland", "Stroma"}
        assert_rasterises_to({1: by_class.get("Gland", []), 2: by_class.get("Stroma", [])}, chain.expected, 1.0, (0, 0))
    if gaps:
        return
    # Interior rings: the ring (1 hole), the two-hole block, the class-2 island (1 hole); islands
    # inside holes are polygons of their own, lying in their container's hole.
    objs = read_back(chain)
    by_class = polygons_by_class(objs)
    assert sorted(hole_count(g) for g in by_class["Gland"]) == [0, 0, 1, 2]
    assert [hole_count(g) for g in by_class["Stroma"]] == [1]
    ring = next(g for g in by_class["Gland"] if hole_count(g) == 1)
    hole = shapely.Polygon(ring.interiors[0])
    assert hole.equals(shapely.box(40, 40, 120, 120))
    inside = [g for g in by_class["Gland"] + by_class["Stroma"] if g is not ring and hole.contains(g)]
    assert len(inside) == 3  # the class-1 island, the class-2 island and the island in its hole
    two = next(g for g in by_class["Gland"] if hole_count(g) == 2)
    assert sorted(shapely.Polygon(r).area for r in two.interiors) == [100, 300]
    for label in (1, 2):
        assert_one_polygon_per_component(polys_of(chain.objects, label), labels == label, 1.0, (0, 0))


def test_random_topology_round_trips_pixel_exact(tmp_path):
    # Blocky classes with 5 % single-pixel noise: every kind of hole, island and corner contact.
    labels = blobs(150, 230, 3, seed=0)
    chain = run_chain(tmp_path, labels, 3)
    assert any(hole_count(p) for p in polys_of(chain.objects, 1))
    by_class = polygons_by_class(read_back(chain))
    assert_rasterises_to({1: by_class["Gland"], 2: by_class["Stroma"]}, labels, 1.0, (0, 0))
    for label in (1, 2):
        assert_one_polygon_per_component(polys_of(chain.objects, label), labels == label, 1.0, (0, 0))


# --------------------------------------------------------------------------- 2. touching objects


def touching() -> np.ndarray:
    labels = np.zeros((200, 220), np.uint8)
    labels[10:90, 10:60] = 1       # R1 | R2 share x = 60, across the row border at 48
    labels[10:90, 60:100] = 2
    labels[150:190, 70:96] = 1     # share x = 96, itself a block border
    labels[150:190, 96:120] = 2
    labels[100:144, 100:144] = 1   # A and B meet at one corner, (144, 144): a corner of four blocks
    labels[144:190, 144:200] = 1
    labels[20:40, 150:170] = 2     # C and D meet at one corner, (170, 40), inside a block
    labels[40:60, 170:190] = 2
    yy, xx = np.mgrid[140:150, 43:53]  # a 1-px checkerboard over the block corner (48, 144)
    labels[140:150, 43:53] = 1 + (yy + xx) % 2
    return labels


def test_touching_objects_stay_apart_valid_and_exact(tmp_path):
    labels = touching()
    chain = run_chain(tmp_path, labels, 3)
    objs = read_back(chain)
    by_class = polygons_by_class(objs)
    assert_rasterises_to({1: by_class["Gland"], 2: by_class["Stroma"]}, labels, 1.0, (0, 0))
    for label in (1, 2):
        polys = polys_of(chain.objects, label)
        assert all(p.is_valid for p in polys)
        assert sum(p.area for p in polys) == (labels == label).sum()
        assert_one_polygon_per_component(polys, labels == label, 1.0, (0, 0))
    # Checkerboard: 50 single pixels per class, plus the named objects.
    assert len(by_class["Gland"]) == 4 + 50 and len(by_class["Stroma"]) == 4 + 50
    gland = {round(g.area): g for g in by_class["Gland"]}
    stroma = {round(g.area): g for g in by_class["Stroma"]}
    # Two classes share their border exactly: no gap, no overlap.
    r1, r2 = gland[80 * 50], stroma[80 * 40]
    assert r1.intersection(r2).area == 0 and r1.intersection(r2).length == 80
    assert r1.boundary.intersection(r2.boundary).equals(LineString([(60, 10), (60, 90)]))
    s1, s2 = gland[40 * 26], stroma[40 * 24]
    assert s1.intersection(s2).area == 0 and s1.intersection(s2).length == 40
    # Same class, corner to corner: two polygons meeting in one point.
    a, b = gland[44 * 44], gland[46 * 56]
    assert a.equals(shapely.box(100, 100, 144, 144)) and b.equals(shapely.box(144, 144, 200, 190))
    assert a.intersection(b).equals(shapely.Point(144, 144))
    (c,) = [g for g in by_class["Stroma"] if g.bounds == (150, 20, 170, 40)]
    (d,) = [g for g in by_class["Stroma"] if g.bounds == (170, 40, 190, 60)]
    assert c.area == d.area == 400 and c.intersection(d).equals(shapely.Point(170, 40))


# --------------------------------------------------------------------------- 3. one-pixel objects


@pytest.mark.parametrize("scale,offset", [(1.0, (0.0, 0.0)), (2.0, (10.0, -20.0))])
def test_one_pixel_objects_and_lines_survive(tmp_path, scale, offset):
    h, w = 150, 170
    labels = np.zeros((h, w), np.uint8)
    labels[5:145, 130] = 1                   # a 1-px column, cut in two by ...
    labels[100, :] = 2                       # ... a 1-px line over the whole width (3 block borders)
    diag = np.arange(30, 66)
    labels[diag, diag] = 1                   # a staircase: 36 pixels meeting at corners, through (48, 48)
    singles = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (47, 10), (48, 13), (10, 47), (13, 48),
               (95, 96), (144, 60), (142, 63), (20, 144)]
    rng = np.random.default_rng(3)
    free = np.ones((h, w), bool)
    free[cv2.dilate((labels > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0] = False
    for r, c in singles:
        assert free[r, c]
        labels[r, c] = 1 + (r + c) % 2
        free[max(r - 2, 0):r + 3, max(c - 2, 0):c + 3] = False
    while len(singles) < 60:                 # random isolated pixels
        r, c = int(rng.integers(0, h)), int(rng.integers(0, w))
        if free[r, c]:
            labels[r, c] = 1 + len(singles) % 2
            free[max(r - 2, 0):r + 3, max(c - 2, 0):c + 3] = False
            singles.append((r, c))
    px_um2 = 0.25
    chain = run_chain(tmp_path, labels, 3, scale=scale, offset=offset, px_um2=px_um2)
    for label in (1, 2):
        polys = polys_of(chain.objects, label)
        assert_one_polygon_per_component(polys, labels == label, scale, offset)
        assert all(p.is_valid for p in polys)
    gland = polys_of(chain.objects, 1)
    stroma = polys_of(chain.objects, 2)
    unit = scale**2
    assert sum(p.area == unit for p in gland) == 36 + sum(1 for r, c in singles if labels[r, c] == 1)
    assert sum(p.area == unit for p in stroma) == sum(1 for r, c in singles if labels[r, c] == 2)
    line = [p for p in stroma if p.area > unit]
    assert len(line) == 1 and line[0].equals(shapely.box(offset[0], offset[1] + 100 * scale,
                                                        offset[0] + w * scale, offset[1] + 101 * scale))
    column = sorted(p.area / unit for p in gland if p.area > unit)
    assert column == [44, 95]
    objs = read_back(chain)
    areas = [o.geometry.area for o in objs]
    assert sorted(areas) == sorted(p.area for lab in (1, 2) for p in polys_of(chain.objects, lab))
    for o in objs:
        assert o.geometry.is_valid
        assert o.measurements["Area µm^2"] == pytest.approx(o.geometry.area * px_um2, abs=0.005)
        assert o.measurements["Mean probability"] == 1.0
    assert sum(a == unit for a in areas) == 36 + len(singles)


# --------------------------------------------------------------------------- 4. image edges


def edge_objects(h: int = 130, w: int = 170) -> np.ndarray:
    labels = np.zeros((h, w), np.uint8)
    labels[:, 120:123] = 1             # the full height
    labels[75:80, :] = 2               # the full width
    labels[30:60, 0:20] = 1            # left
    labels[0:15, 60:90] = 1            # top
    labels[40:70, 150:] = 1            # right
    labels[115:, 60:100] = 1           # bottom
    labels[0:10, 0:10] = 2             # corners
    labels[0:12, 160:] = 2
    labels[120:, 0:8] = 2
    labels[118:, 155:] = 2
    return labels


def _border_lengths(geoms, box_: tuple[float, float, float, float]) -> dict[str, float]:
    x0, y0, x1, y1 = box_
    # A hair's width around each side: float outlines may sit an ulp off the computed border.
    union = shapely.union_all(geoms).boundary
    sides = {"left": LineString([(x0, y0), (x0, y1)]), "right": LineString([(x1, y0), (x1, y1)]),
             "top": LineString([(x0, y0), (x1, y0)]), "bottom": LineString([(x0, y1), (x1, y1)])}
    return {k: union.intersection(s.buffer(1e-7, cap_style="flat")).length for k, s in sides.items()}


@pytest.mark.parametrize("scale,offset", [(1.0, (0.0, 0.0)), (ODD_SCALE, ODD_OFFSET)], ids=["unit", "odd"])
@pytest.mark.parametrize("image", ["edges", "full"])
def test_objects_cut_by_the_image_edge_end_on_it(tmp_path, scale, offset, image):
    h, w = 130, 170  # the last windows are narrow (x from 144, y from 96)
    labels = edge_objects(h, w) if image == "edges" else np.ones((h, w), np.uint8)
    chain = run_chain(tmp_path, labels, 3, scale=scale, offset=offset)
    x0, y0 = offset
    x1, y1 = x0 + w * scale, y0 + h * scale
    tol = 0 if scale == 1.0 else 1e-9
    want = {"left": (labels[:, 0] > 0).sum() * scale, "right": (labels[:, -1] > 0).sum() * scale,
            "top": (labels[0] > 0).sum() * scale, "bottom": (labels[-1] > 0).sum() * scale}
    every = [p for lab in chain.objects for p, _ in chain.objects[lab]]
    b = shapely.total_bounds(every)
    assert b[0] >= x0 - tol and b[1] >= y0 - tol and b[2] <= x1 + tol and b[3] <= y1 + tol
    assert b == pytest.approx([x0, y0, x1, y1], abs=tol)
    assert _border_lengths(every, (x0, y0, x1, y1)) == pytest.approx(want, abs=1e-5)
    # In the file: coordinates on the 0.01 grid, the border's rounded value exactly.
    objs = read_back(chain)
    rx0, ry0, rx1, ry1 = (round(v, 2) for v in (x0, y0, x1, y1))
    rb = shapely.total_bounds([o.geometry for o in objs])
    assert rb == pytest.approx([rx0, ry0, rx1, ry1], abs=1e-9)
    assert _border_lengths([o.geometry for o in objs], (rx0, ry0, rx1, ry1)) == pytest.approx(want, abs=1e-5)
    if image == "full":  # one polygon at every scale (see SEAM_NOTE)
        assert shapely.union_all([o.geometry for o in objs]).equals(shapely.box(rx0, ry0, rx1, ry1))
        assert len(objs) == 1
    by_class = polygons_by_class(objs)
    assert_rasterises_to({1: by_class.get("Gland", []), 2: by_class.get("Stroma", [])}, labels, scale, offset)


# --------------------------------------------------------------------------- 5. many windows, one object


def big_objects(h: int = 200, w: int = 260):
    """Objects crossing many blocks, each with its own probability; one with a gradient."""
    yy, xx = np.mgrid[0:h, 0:w]
    labels = np.zeros((h, w), np.uint8)
    p1 = np.full((h, w), 0.2, np.float32)  # background: class 1 at 0.2
    shapes = [
        ((xx - 80) ** 2 + (yy - 90) ** 2 < 65**2) & ((xx - 80) ** 2 + (yy - 90) ** 2 >= 20**2),  # a ring
        (np.abs(yy - (175 + 12 * np.sin(xx / 15))) < 4) & (xx > 5),                              # a snake
        (xx >= 160) & (xx < 250) & (yy >= 10) & (yy < 130) & ~((xx > 190) & (xx < 220) & (yy > 40) & (yy < 100)),
        (xx >= 75) & (xx < 85) & (yy >= 85) & (yy < 95),                                          # in the ring's hole
    ]
    values = [0.7, 0.85, None, 0.6]
    for s, v in zip(shapes, values):
        labels[s] = 1
        p1[s] = (0.55 + 0.4 * xx[s] / w) if v is None else v
    probs = np.stack([1 - p1, p1], axis=2).astype(np.float32)
    return labels, probs, shapes


@pytest.mark.parametrize("scale,offset", [
    (1.0, (0.0, 0.0)),
    (2.0, (7.0, 3.0)),
    (ODD_SCALE, ODD_OFFSET),
], ids=["unit", "two", "odd"])
def test_objects_across_many_windows_are_one_polygon_with_the_true_mean(tmp_path, scale, offset):
    labels, probs, shapes = big_objects()
    chain = run_chain(tmp_path, labels, 2, probs=probs, scale=scale, offset=offset)
    for s in shapes[:3]:  # the large ones cross at least 6 final blocks
        assert sum(1 for b in chain.blocks if s[b.y:b.y + b.h, b.x:b.x + b.w].any()) >= 6
    items = chain.objects[1]
    polys = [p for p, _ in items]
    ids = assert_one_polygon_per_component(polys, labels == 1, scale, offset)
    n, comp = components4(labels == 1)
    assert n == len(shapes)
    truth = {cid: float(probs[..., 1][comp == cid].astype(np.float64).mean()) for cid in range(1, n + 1)}
    for (_, mean), cid in zip(items, ids):
        assert mean == pytest.approx(truth[cid], abs=1e-5)
    # The written measurement: the same mean, rounded to 4 decimals.
    objs = read_back(chain)
    assert len(objs) == n
    for o in objs:
        sl, m = pixels_of(o.geometry, labels.shape, scale, offset)
        (cid,) = np.unique(comp[sl][m])
        assert o.measurements["Mean probability"] == pytest.approx(truth[int(cid)], abs=5e-5 + 1e-6)


def test_ulp_seams_between_blocks_do_not_split_objects():
    # A bar over five blocks at scale 1.24: mapped to output coordinates block by block, the
    # borders at x = 144 were 78.55999999999999 and 78.56 and the bar came out in two pieces
    # (SEAM_NOTE); pieces are now unioned in working px and mapped once.
    labels = np.zeros((10, 200), np.uint8)
    labels[2:5, :] = 1
    for scale, offset in [(1.0, (0.0, 0.0)), (ODD_SCALE, ODD_OFFSET)]:
        seam = SeamlessPolygons(scale=scale, offset=offset)
        for x in range(0, 200, STRIDE):
            b = Block(x, 0, min(STRIDE, 200 - x), 10)
            seam.add(b, labels[:, b.x:b.x + b.w])
        polys = [p for p, _ in finish_objects(seam)[1]]
        assert len(polys) == 1, f"scale {scale}: {[round(p.area / scale**2, 6) for p in polys]} px"


# --------------------------------------------------------------------------- 6. scale and offset


def test_scale_and_offset_map_coordinates_and_areas(tmp_path):
    labels = blobs(130, 170, 3, seed=5, cell=9, noise=0.01)
    px_um2 = 0.0625  # 0.25 µm/px level 0
    scale, offset = ODD_SCALE, ODD_OFFSET
    chain = run_chain(tmp_path, labels, 3, scale=scale, offset=offset, px_um2=px_um2)
    objs = read_back(chain)
    by_class = polygons_by_class(objs)
    # Checked per component, not per object, so it holds whatever the scale (each piece is exact).
    # Pixel-exact at the odd scale (pixel centres are 0.62 units from any edge).
    assert_rasterises_to({1: by_class["Gland"], 2: by_class["Stroma"]}, labels, scale, offset)
    total = 0.0
    for label, name in ((1, "Gland"), (2, "Stroma")):
        mask = labels == label
        n, comp = components4(mask)
        covered = np.zeros(n + 1, np.int64)
        bounds = {}
        for o in (o for o in objs if o.class_name == name):
            sl, m = pixels_of(o.geometry, labels.shape, scale, offset)
            (cid,) = np.unique(comp[sl][m]).tolist()  # every polygon lies in one component
            covered[cid] += m.sum()
            # Area µm^2: the (exact) polygon area in level-0 px^2 times µm^2 per px^2, 2 decimals.
            assert o.measurements["Area µm^2"] == pytest.approx(m.sum() * scale**2 * px_um2, abs=0.005 + 1e-9)
            assert o.measurements["Area µm^2"] == pytest.approx(o.geometry.area * px_um2, rel=1e-3, abs=0.01)
            total += o.measurements["Area µm^2"]
            b = np.asarray(o.geometry.bounds)
            old = bounds.get(cid)
            bounds[cid] = b if old is None else np.r_[np.minimum(old[:2], b[:2]), np.maximum(old[2:], b[2:])]
        assert (covered[1:] == np.bincount(comp.ravel(), minlength=n + 1)[1:]).all()
        for cid, b in bounds.items():  # a component's outline spans its pixels' edges, mapped
            rows, cols = np.nonzero(comp == cid)
            want = [cols.min() * scale + offset[0], rows.min() * scale + offset[1],
                    (cols.max() + 1) * scale + offset[0], (rows.max() + 1) * scale + offset[1]]
            assert b == pytest.approx(want, abs=0.005 + 1e-9)
    assert total == pytest.approx((labels > 0).sum() * scale**2 * px_um2, abs=0.005 * len(objs) + 1e-6)
    # The overall extent.
    rows, cols = np.nonzero(labels)
    got = shapely.total_bounds([o.geometry for o in objs])
    want = [cols.min() * scale + offset[0], rows.min() * scale + offset[1],
            (cols.max() + 1) * scale + offset[0], (rows.max() + 1) * scale + offset[1]]
    assert got == pytest.approx(want, abs=0.005 + 1e-9)


# --------------------------------------------------------------------------- 7. gzip


def test_gzip_file_holds_the_same_features(tmp_path):
    labels = blobs(140, 180, 3, seed=7)
    chain = run_chain(tmp_path, labels, 3, scale=2.0, offset=(5.0, 9.0), object_type="detection")
    assert chain.reports[0].written == chain.reports[1].written > 100
    assert chain.reports[0].dropped == chain.reports[1].dropped == 0
    plain = check_qupath_rules(chain.plain, "detection")
    packed = check_qupath_rules(chain.gz, "detection")
    assert len(plain) == len(packed) == chain.reports[0].written
    assert chain.gz.stat().st_size < chain.plain.stat().st_size
    # Ids are fresh UUIDs per write; everything else is identical, in the same order.
    strip = lambda fs: [{k: v for k, v in f.items() if k != "id"} for f in fs]  # noqa: E731
    assert strip(plain) == strip(packed)
    a, b = read_geojson(chain.plain), read_geojson(chain.gz)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert shapely.equals_exact(shapely.normalize(x.geometry), shapely.normalize(y.geometry), tolerance=0)
        assert (x.class_name, x.color, x.object_type, x.measurements) == (y.class_name, y.color, y.object_type,
                                                                          y.measurements)
    # Neither file lies: a truncated gzip is refused, not read as fewer features.
    broken = tmp_path / "broken.geojson.gz"
    broken.write_bytes(chain.gz.read_bytes()[:-20])
    with pytest.raises(GeoJSONError):
        read_geojson(broken)


# --------------------------------------------------------------------------- 8. classes


def test_class_names_and_colours_and_no_background(tmp_path):
    labels = blobs(120, 160, 4, seed=11, cell=8, noise=0.02)
    k = 4
    chain = run_chain(tmp_path, labels, k, object_type="detection")
    feats = check_qupath_rules(chain.plain, "detection")
    want_count = sum(components4(labels == c)[0] for c in range(1, k))
    assert len(feats) == want_count
    seen = set()
    for f in feats:
        cls = f["properties"]["classification"]
        label = NAMES.index(cls["name"])
        assert label > 0, "background is never written"
        assert cls == {"name": NAMES[label], "color": COLORS[label]}
        seen.add(label)
    assert seen == {1, 2, 3}
    objs = read_geojson(chain.plain)
    for o in objs:
        assert o.color == tuple(COLORS[NAMES.index(o.class_name)]) and o.object_type == "detection"
    # Everything written is foreground, and all of it: areas add up to the non-background pixels.
    assert sum(o.geometry.area for o in objs) == (labels > 0).sum()
    by_class = polygons_by_class(objs)
    assert_rasterises_to({c: by_class[NAMES[c]] for c in range(1, k)}, labels, 1.0, (0, 0))


def test_nothing_but_background_writes_an_empty_valid_file(tmp_path):
    labels = blobs(100, 120, 3, seed=2)
    chain = run_chain(tmp_path, labels, 3, no_tissue=lambda b: True)  # no window has tissue
    assert chain.objects == {} or not any(chain.objects.values())
    for path in (chain.plain, chain.gz):
        assert check_qupath_rules(path) == [] and read_geojson(path) == []
    zeros = run_chain(tmp_path, np.zeros((100, 120), np.uint8), 3, stem="zeros")
    assert load_features(zeros.plain) == []


# --------------------------------------------------------------------------- 9. simplify, min_area


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_simplify_and_min_area(tmp_path, scale):
    labels = blobs(160, 200, 3, seed=13, cell=10, noise=0.03)
    yy, xx = np.mgrid[0:160, 0:200]
    disk = (xx - 100) ** 2 + (yy - 80) ** 2 < 50**2  # a round object: many vertices to simplify
    labels[disk] = 1
    labels[75:85, 20:180] = 2  # a thick bar crossing the disk and 3 block borders
    labels[27:34, :] = 0
    labels[30, 10:190] = 2     # a 1-px line on its own: simplified it must not vanish
    simplify, min_area = 1.5 * scale, 20.0 * scale**2
    offset = (3.0, 4.0)
    chain = run_chain(tmp_path, labels, 3, scale=scale, offset=offset, simplify=simplify, min_area=min_area,
                      px_um2=0.25)
    # The same chain without simplifying or dropping: the exact outlines.
    original = run_chain(tmp_path / "exact", labels, 3, scale=scale, offset=offset, px_um2=0.25).objects
    for label in (1, 2):
        mask = labels == label
        n, comp = components4(mask)
        sizes = np.bincount(comp.ravel())[1:] * scale**2
        kept = [(p, m) for p, m in original[label] if p.area >= min_area]
        assert len(chain.objects[label]) == len(kept) == int((sizes >= min_area).sum())
        assert len(kept) < n  # small objects (noise pixels) were removed
        for (s, _), (p, _) in zip(chain.objects[label], kept):
            assert s.is_valid and not s.is_empty and s.area > 0
            # Near the tolerance (GEOS's topology-preserving simplifier, which may also move a
            # ring's start, keeps original vertices within about 1.2x of it here; 2x is the bound).
            assert shapely.hausdorff_distance(s, p) <= 2 * simplify
        assert sum(len(shapely.get_coordinates(s)) for s, _ in chain.objects[label]) < \
            sum(len(shapely.get_coordinates(p)) for p, _ in kept)
    plain, packed = chain.reports
    assert plain.dropped == packed.dropped == 0
    assert plain.written == packed.written == sum(len(v) for v in chain.objects.values())
    feats = check_qupath_rules(chain.plain)
    objs = read_geojson(chain.plain)
    assert len(feats) == len(objs) == plain.written
    for o in objs:
        assert not o.geometry.is_empty and o.geometry.area > 0
        assert o.measurements["Area µm^2"] == pytest.approx(o.geometry.area * 0.25, rel=1e-3, abs=0.01)
    # The 1-px line is thinner than the tolerance: it may thin to a sliver (a triangle of half its
    # area) but keeps its extent and stays a valid, non-empty polygon.
    line = [o.geometry for o in objs if o.class_name == "Stroma"
            and o.geometry.bounds[1] == pytest.approx(offset[1] + 30 * scale)]
    assert len(line) == 1
    assert line[0].bounds == pytest.approx((offset[0] + 10 * scale, offset[1] + 30 * scale,
                                            offset[0] + 190 * scale, offset[1] + 31 * scale))
    assert 0.4 * 180 * scale**2 <= line[0].area <= 180 * scale**2


def test_flushing_finished_rows_changes_nothing_and_keeps_few_pieces_waiting(tmp_path):
    labels, probs, _ = big_objects()
    flushed = run_chain(tmp_path / "a", labels, 2, probs=probs, scale=ODD_SCALE, offset=ODD_OFFSET)
    whole = run_chain(tmp_path / "b", labels, 2, probs=probs, scale=ODD_SCALE, offset=ODD_OFFSET, flush=False)

    def canon(objects):
        return sorted((round(p.area, 6), p.bounds, round(m, 6)) for p, m in objects[1])

    assert canon(flushed.objects) == canon(whole.objects)
    # Flushing before the last row leaves only pieces on the last row's top border waiting.
    seam = SeamlessPolygons()
    last_row = max(b.y for b in flushed.blocks)
    for b in flushed.blocks:
        if b.x == 0 and b.y > 0:
            seam.flush(b.y)
        if b.y < last_row:
            seam.add(b, labels[b.y:b.y + b.h, b.x:b.x + b.w], probs[b.y:b.y + b.h, b.x:b.x + b.w])
    before = len(seam.waiting.get(1, []))
    seam.flush(last_row)
    waiting = np.array([p for p, _, _ in seam.waiting.get(1, [])], dtype=object)
    assert 0 < len(waiting) <= before
    group = touching_groups(waiting)  # every piece still waiting is joined to one on that border
    reaching = set(group[shapely.bounds(waiting)[:, 3] >= last_row].tolist())
    assert set(group.tolist()) <= reaching
