"""bench/make_slide.py: the benchmark slide maker (GlaS H&E packed into a pyramidal JPEG TIFF)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

pytestmark = pytest.mark.slow  # runs the CLI or trains: not in `make test-fast`

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("WSI_AMR_DATA") or REPO.parent / "shared" / "data")
GLAS = DATA / "glas"

if not (GLAS / "images").is_dir() or not (GLAS / "masks").is_dir():
    pytest.skip(f"../shared/data/glas not found: {GLAS} (set WSI_AMR_DATA)", allow_module_level=True)


def _load_module():
    spec = importlib.util.spec_from_file_location("make_slide", REPO / "bench" / "make_slide.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_slide"] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


ms = _load_module()

W, H, TILE = 3000, 2500, 256


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    out = tmp_path_factory.mktemp("slides")
    return ms.make_slide(out, W, H, name="small", glas_dir=GLAS, tile=TILE, seed=3, workers=2)


def test_outputs_and_json(slide):
    for key in ("slide", "mask", "geojson", "json"):
        assert Path(slide[key]).is_file(), key
        assert not list(Path(slide[key]).parent.glob(".tmp-*")), "temporary files left behind"
    doc = json.loads(Path(slide["json"]).read_text())
    assert doc["placements"] == len(doc["placement_list"]) == slide["placements"] > 0
    assert 0.1 < doc["tissue_fraction"] < 0.6
    assert doc["gland_pixels"] > 0
    assert doc["params"]["seed"] == 3 and doc["params"]["tile"] == TILE
    assert all(name.startswith("testA_") for name in doc["sources"])


def test_openslide_reads_pyramid(slide):
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(slide["slide"]) as osr:
        assert osr.dimensions == (W, H)
        assert osr.level_count >= 3
        assert osr.level_dimensions[1] == (W // 2, H // 2)
        assert [round(d) for d in osr.level_downsamples] == [2**i for i in range(osr.level_count)]
        assert osr.properties["openslide.vendor"] == "generic-tiff"
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert "mpp=0.5" in osr.properties["tiff.ImageDescription"]


def test_mpp_from_tiff_resolution_tags(slide):
    with tifffile.TiffFile(slide["slide"]) as tf:
        assert len(tf.pages) == len(slide["levels"])
        for level, page in enumerate(tf.pages):
            assert page.is_tiled and page.tilewidth == TILE
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.photometric == tifffile.PHOTOMETRIC.YCBCR
            assert page.tags["NewSubfileType"].value == (1 if level else 0)
            unit = page.tags["ResolutionUnit"].value
            assert unit == tifffile.RESUNIT.CENTIMETER
            num, den = page.tags["XResolution"].value
            assert 1e4 / (num / den) == pytest.approx(0.5 * 2**level, rel=1e-4)


def _worst_placement_diff(slide, level: int) -> float:
    import cv2
    import openslide

    placements, names = ms.load_placements(slide["json"])
    p = max(placements, key=lambda q: q.w * q.h)
    src = cv2.cvtColor(cv2.imread(str(GLAS / "images" / names[p.src])), cv2.COLOR_BGR2RGB)
    (x0, y0, x1, y1), want = ms.expected_region(p, src, level)
    d = 2**level
    with openslide.OpenSlide(slide["slide"]) as osr:
        got = np.asarray(osr.read_region((x0 * d, y0 * d), level, (x1 - x0, y1 - y0)).convert("RGB"))
    return float(np.abs(got.astype(int) - want.astype(int)).mean())


@pytest.mark.parametrize(("level", "tolerance"), [(0, 6), (1, 8)])
def test_pixels_match_glas_source(slide, level, tolerance):
    # JPEG 4:2:0 error only; level 1 is a downscale of the source (finer detail, larger error)
    pytest.importorskip("openslide")
    assert _worst_placement_diff(slide, level) < tolerance


def test_mask_equals_rasterised_geojson(slide):
    from shapely.geometry import shape

    from wsi_amr.polygons import rasterize_polygons

    with tifffile.TiffFile(slide["mask"]) as tf:
        assert len(tf.pages) == len(slide["levels"])
        assert tf.pages[1].shape == (H // 2, W // 2)
        mask = tf.pages[0].asarray()
    assert mask.shape == (H, W) and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) <= {0, 1}
    assert int(mask.sum()) == slide["gland_pixels"]
    assert mask.mean() > 0.02

    doc = json.loads(Path(slide["geojson"]).read_text())
    feats = doc["features"] if isinstance(doc, dict) else doc
    assert len(feats) == slide["gland_features"] > 0
    for f in feats:
        assert f["properties"]["objectType"] == "annotation"
        assert f["properties"]["classification"] == {"name": "Gland", "color": [0, 160, 0]}
    raster = rasterize_polygons([shape(f["geometry"]) for f in feats], (H, W))
    assert np.array_equal(raster, mask)


def test_geojson_valid_for_qupath(slide):
    from wsi_amr.geojson import validate_geojson

    assert validate_geojson(slide["geojson"]) == []


def test_layout_deterministic_and_disjoint():
    sizes = ms.load_sources(GLAS, "testA").sizes
    a = ms.plan_layout(W, H, sizes, seed=5)
    b = ms.plan_layout(W, H, sizes, seed=5)
    c = ms.plan_layout(8000, 6000, sizes, seed=6)
    assert a == b and a
    assert c != ms.plan_layout(8000, 6000, sizes, seed=7)
    margin = ms.layout_params(8000, 6000, 0.5)["margin"]
    occ = np.zeros((6000, 8000), np.uint8)
    for p in c:
        assert margin <= p.x and p.x + p.w <= 8000 - margin
        assert margin <= p.y and p.y + p.h <= 6000 - margin
        occ[p.y : p.y + p.h, p.x : p.x + p.w] += 1
    assert occ.max() == 1  # no two images overlap
    assert 0.25 < sum(p.w * p.h for p in c) / occ.size < 0.5


def test_same_seed_same_files(slide, tmp_path):
    again = ms.make_slide(
        tmp_path, W, H, name="small", glas_dir=GLAS, tile=TILE, seed=3, workers=1, geojson=False
    )
    a = json.loads(Path(slide["json"]).read_text())["placement_list"]
    b = json.loads(Path(again["json"]).read_text())["placement_list"]
    assert a == b
    with tifffile.TiffFile(slide["mask"]) as t1, tifffile.TiffFile(again["mask"]) as t2:
        assert np.array_equal(t1.pages[0].asarray(), t2.pages[0].asarray())


def test_level_rects_line_up():
    p = ms.Placement(x=1001, y=517, w=961, h=647, src=0, rot=0, flip=False, cluster=0)
    q = ms.Placement(x=1001 + 961, y=517, w=647, h=961, src=0, rot=1, flip=True, cluster=0)
    for d in (1, 2, 4, 8, 64):
        a, b = ms.level_rect(p, d), ms.level_rect(q, d)
        assert a[2] == b[0]  # abutting images stay abutting, never overlap
    assert ms.level_rect(p, 1) == (1001, 517, 1962, 1164)


def test_level_shapes():
    assert ms.level_shapes(20000, 20000) == [
        (20000, 20000), (10000, 10000), (5000, 5000), (2500, 2500), (1250, 1250), (625, 625)
    ]  # fmt: skip
    assert ms.level_shapes(3000, 2500)[-1] == (750, 625)
    assert ms.level_shapes(800, 600) == [(800, 600)]


def test_exclude_leaves_images_out():
    every = ms.list_sources(GLAS, "train")
    kept = ms.list_sources(GLAS, "train", exclude=["train_8", "train_19.png"])
    assert len(kept) == len(every) - 2
    assert "train_8.png" not in kept and "train_19.png" not in kept and "train_9.png" in kept
    with pytest.raises(ValueError, match="testA_1"):
        ms.list_sources(GLAS, "train", exclude=["testA_1"])
    with pytest.raises(ValueError, match="every"):
        ms.list_sources(GLAS, "testA", exclude=[f"testA_{i}" for i in range(1, 61)])
