"""`wsi-amr segment`: whole-slide inference to QuPath GeoJSON (synthetic slides, stand-in models)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
import torch
from conftest import invoke, real_slides
from shapely.geometry import shape

from wsi_amr.checkpoint import save_checkpoint
from wsi_amr.evaluation import rasterise_geojson
from wsi_amr.geojson import validate_geojson
from wsi_amr.labeltiff import read_label_tiff
from wsi_amr.segmentation.config import SegmenterConfig
from wsi_amr.segmentation.model import ModelCard, TokenSegmenter

pytestmark = pytest.mark.slow  # runs the CLI or trains: not in `make test-fast`

SMALL = SegmenterConfig(token_size=8, width=32, depth=1, heads=4)


def constant_model(path: Path, label: int = 1, mpp: float = 2.0) -> Path:
    """A model that predicts ``label`` for every pixel it sees (head weights zero, bias large)."""
    model = TokenSegmenter(SMALL)
    head = model.head[2]
    p = SMALL.token_size
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[label * p * p:(label + 1) * p * p] = 10.0
    card = ModelCard(mpp=mpp, patching={"mode": "adaptive", "token_size": 8, "quadtree": {"max_size": 64}})
    weights, _ = save_checkpoint(path, model, card)
    return weights


def features(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as fh:
        return json.load(fh)["features"]


def test_one_tissue_region_across_many_windows_is_one_object(runner, rect_slide, tmp_path):
    slide, (x, y, w, h) = rect_slide  # 3072 x 2048 at 0.5 µm/px; at 2 µm/px the rectangle is 384 x 320
    model = constant_model(tmp_path / "m")
    res = invoke(runner, "segment", slide, "-o", tmp_path / "out", "--model", model, "--window", 128,
                 "--overlap", 16, "--simplify", 0, "--json")
    assert res.exit_code == 0, res.stderr
    row = json.loads(res.stdout.splitlines()[0])
    stats = row["stats"]
    assert stats["windows"] > 12 and stats["tokens"] > 0 and stats["uniform_tokens"] >= stats["tokens"]
    assert {"seconds_read", "seconds_tissue", "seconds_quadtree", "seconds_model", "seconds_polygons",
            "seconds_write"} <= set(stats)
    out = tmp_path / "out" / "rect"
    assert validate_geojson(out / "rect.geojson") == []
    feats = features(out / "rect.geojson")
    assert len(feats) == 1  # one object, although the rectangle spans 4 x 3 windows
    props = feats[0]["properties"]
    assert props["classification"]["name"] == "Gland" and props["objectType"] == "annotation"
    assert props["measurements"]["Mean probability"] == pytest.approx(1.0, abs=1e-3)
    poly = shape(feats[0]["geometry"])
    # Leaves holding tissue cover the rectangle (64-px leaves at 2 µm/px: 256 level-0 px, aligned).
    rect = shapely.box(x, y, x + w, y + h)
    assert poly.buffer(1e-6).contains(rect) and poly.area <= rect.buffer(256, join_style=2).area
    assert props["measurements"]["Area µm^2"] == pytest.approx(poly.area * 0.25, rel=1e-3)
    assert (out / "overlay.png").stat().st_size > 0


def test_mask_tiff_holds_the_labels_the_polygons_outline(runner, rect_slide, tmp_path):
    slide, _ = rect_slide
    model = constant_model(tmp_path / "m")  # 2 µm/px: the working image is 768 x 512
    res = invoke(runner, "segment", slide, "-o", tmp_path / "out", "--model", model, "--window", 256,
                 "--overlap", 32, "--simplify", 0, "--min-object", 0, "--mask-tiff", "--json")
    assert res.exit_code == 0, res.stderr
    row = json.loads(res.stdout.splitlines()[0])
    out = tmp_path / "out" / "rect"
    assert row["outputs"]["mask"] == "mask.tiff"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary left
    labels, info = read_label_tiff(out / "mask.tiff")
    assert labels.shape == (512, 768) and info["mpp"] == pytest.approx(2.0) and info["classes"] == ["Background", "Gland"]
    assert set(np.unique(labels).tolist()) == {0, 1}
    # The GeoJSON, drawn back at the working resolution, is the mask pixel for pixel.
    drawn = rasterise_geojson(out / "rect.geojson", labels.shape, 4.0, ["Gland"])
    np.testing.assert_array_equal(drawn, labels)
    with tifffile.TiffFile(out / "mask.tiff") as tif:
        assert [p.shape for p in tif.pages] == [(512, 768), (256, 384), (128, 192)]
        assert tif.pages[0].tags["ResolutionUnit"].value == 3  # centimetre
        assert tif.pages[0].tags["XResolution"].value[0] / tif.pages[0].tags["XResolution"].value[1] == pytest.approx(5000)
    import openslide

    with openslide.OpenSlide(str(out / "mask.tiff")) as osl:
        assert osl.level_dimensions[0] == (768, 512) and float(osl.properties["openslide.mpp-x"]) == pytest.approx(2.0)


def test_detections_gzip_and_a_model_that_finds_nothing(runner, rect_slide, tmp_path):
    slide, _ = rect_slide
    model = constant_model(tmp_path / "m")
    res = invoke(runner, "segment", slide, "-o", tmp_path / "out", "--model", model, "--object-type", "detection",
                 "--gzip")
    assert res.exit_code == 0, res.stderr
    feats = features(tmp_path / "out" / "rect" / "rect.geojson.gz")
    assert feats and all(f["properties"]["objectType"] == "detection" for f in feats)
    assert validate_geojson(tmp_path / "out" / "rect" / "rect.geojson.gz") == []
    background = constant_model(tmp_path / "bg", label=0)
    res = invoke(runner, "segment", slide, "-o", tmp_path / "out2", "--model", background)
    assert res.exit_code == 0, res.stderr
    assert features(tmp_path / "out2" / "rect" / "rect.geojson") == []


def test_rerun_skips_and_corrupt_slide_fails_alone(runner, rect_slide, tmp_path):
    slide, _ = rect_slide
    model = constant_model(tmp_path / "m")
    folder = slide.parent
    (folder / "broken.svs").write_bytes(b"not a slide")
    res = invoke(runner, "segment", folder, "-o", tmp_path / "out", "--model", model, "--json")
    assert res.exit_code == 1
    rows = {json.loads(line)["stem"]: json.loads(line) for line in res.stdout.splitlines()}
    assert rows["rect"]["status"] == "done" and rows["broken"]["status"] == "failed"
    assert "broken.svs" in res.stderr
    again = invoke(runner, "segment", slide, "-o", tmp_path / "out", "--model", model, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout.splitlines()[0])["status"] == "skipped"


def test_interrupted_batch_resumes_where_it_stopped(runner, rect_slide, tmp_path, monkeypatch):
    import shutil

    from wsi_amr.jobs import segment as job

    slide, _ = rect_slide
    shutil.copy(slide, slide.with_name("second.tiff"))
    model = constant_model(tmp_path / "m")
    args = ["segment", slide.parent, "-o", tmp_path / "out", "--model", model, "--mask-tiff", "--json"]
    real_add, calls = job.SeamlessPolygons.add, []

    def add_then_ctrl_c(self, *a, **k):  # Ctrl-C in the middle of the second slide
        calls.append(1)
        if len(calls) > 40:  # 35 blocks a slide
            raise KeyboardInterrupt
        return real_add(self, *a, **k)

    monkeypatch.setattr(job.SeamlessPolygons, "add", add_then_ctrl_c)
    res = invoke(runner, *args, "--window", 128, "--overlap", 16)
    assert res.exit_code == 130
    done = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["status"] for r in done] == ["done"]
    first, second = done[0]["stem"], ({"rect", "second"} - {done[0]["stem"]}).pop()
    half = tmp_path / "out" / second
    # Nothing half-written is left to look finished: no GeoJSON, no mask, no temporaries, no lock.
    assert not half.exists() or sorted(p.name for p in half.iterdir()) == []
    monkeypatch.setattr(job.SeamlessPolygons, "add", real_add)
    again = invoke(runner, *args, "--window", 128, "--overlap", 16)
    assert again.exit_code == 0, again.stderr
    status = {json.loads(line)["stem"]: json.loads(line)["status"] for line in again.stdout.splitlines()}
    assert status == {first: "skipped", second: "done"}
    assert validate_geojson(tmp_path / "out" / second / f"{second}.geojson") == []
    assert (tmp_path / "out" / second / "mask.tiff").exists()


@pytest.mark.parametrize("args,needle", [
    (["--overlap", "100", "--window", "128"], "--overlap"),
    (["--object-type", "cell"], "--object-type"),
    (["--patching", "grid"], "--patching"),
    (["--context", "-1"], "--context"),
    (["--window", "32"], "--window"),
    (["--simplify", "-1"], "--simplify"),
    (["--device", "cuda:99"], "--device"),
    (["--shifts", "0,x"], "--shifts"),
    (["--shifts", "-8"], "--shifts"),
    (["--shifts", "0,256"], "--shifts"),  # the square is the training crop: 256 px
    (["--shifts", "0,32", "--context", "0"], "--shifts"),
])
def test_bad_options_exit_2(runner, rect_slide, tmp_path, args, needle):
    slide, _ = rect_slide
    model = constant_model(tmp_path / "m")
    res = invoke(runner, "segment", slide, "-o", tmp_path / "out", "--model", model, *args)
    assert res.exit_code == 2 and needle in res.stderr


def test_shifts_default_to_half_a_square_and_are_recorded(runner, rect_slide, tmp_path):
    slide, _ = rect_slide
    model = constant_model(tmp_path / "m")
    for args, want in (((), [0, 128]), (("--shifts", "0"), [0]), (("--context", "64", "--shifts", "48,0,16"), [0, 16, 48]),
                       (("--context", "0"), [0])):
        out = tmp_path / f"out{len(want)}{len(args)}"
        res = invoke(runner, "segment", slide, "-o", out, "--model", model, "--json", *args)
        assert res.exit_code == 0, res.stderr
        stats = json.loads(res.stdout.splitlines()[0])["stats"]
        assert stats["shifts"] == want and stats["objects"] == 1


def test_bad_model_is_one_line(runner, rect_slide, tmp_path):
    slide, _ = rect_slide
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    res = invoke(runner, "segment", slide, "-o", tmp_path / "out", "--model", tmp_path / "x.safetensors")
    assert res.exit_code == 2 and "x.json" in res.stderr and "missing" in res.stderr


def test_list_models_runs(runner):
    res = invoke(runner, "segment", "--list-models")
    assert res.exit_code == 0 and res.stdout.strip()


def test_bundled_model_is_listed_and_used_without_model(runner, rect_slide, tmp_path):
    res = invoke(runner, "segment", "--list-models")
    assert res.exit_code == 0 and "glas-gland  (default)" in res.stdout and "research use only" in res.stdout
    assert "test dice: GlaS testA" in res.stdout
    slide, _ = rect_slide
    res = invoke(runner, "segment", slide, "-o", tmp_path / "out", "--json")
    assert res.exit_code == 0, res.stderr
    row = json.loads(res.stdout.splitlines()[0])
    assert row["stats"]["model"] == "glas-gland.safetensors" and row["stats"]["mpp"] == pytest.approx(0.62, rel=1e-3)
    assert validate_geojson(tmp_path / "out" / "rect" / "rect.geojson") == []


@pytest.mark.parametrize("path", real_slides() or [None], ids=lambda p: p.name if p else "no-data")
def test_every_readable_real_slide_is_segmented_with_the_bundled_model(runner, slides_dir, tmp_path, path):
    from wsi_amr.slide import open_slide

    with open_slide(path) as slide:
        mpp = slide.mpp
    args = ("--slide-mpp", "0.5") if mpp is None else ()
    res = invoke(runner, "segment", path, "-o", tmp_path / "out", "--json", *args)
    assert "Traceback" not in res.stderr
    (row,) = [json.loads(line) for line in res.stdout.splitlines()]
    if mpp is not None and mpp[0] > 0.62:  # coarser than the model's 0.62 µm/px: refused, not upsampled
        assert row["status"] == "failed" and "finer than the slide's level 0" in row["message"]
        assert "the model works at 0.62 µm/px" in row["message"] and "coarser --mpp" not in row["message"]
        return
    assert row["status"] in ("done", "empty"), row["message"]
    out = Path(row["out_dir"])
    assert validate_geojson(out / row["outputs"]["geojson"]) == []
    assert (out / "overlay.png").exists()
    if path.name == "CMU-1-Small-Region.svs":
        assert row["status"] == "done" and row["stats"]["objects"] > 0
