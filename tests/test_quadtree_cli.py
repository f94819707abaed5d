"""``wsi-amr quadtree`` end to end: outputs, seamless windows, budget per slide, masks, bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from conftest import invoke, real_slides, textured, write_pyramid_tiff

from wsi_amr.quadtree import QuadtreeParams, build_quadtree, params_edge_map, uniform_token_count
from wsi_amr.slide import Resolution, Slide, open_slide
from wsi_amr.tiling import Window, sample_mask
from wsi_amr.tissue import TissueParams, detect_slide_tissue

pytestmark = pytest.mark.slow  # runs the CLI or trains: not in `make test-fast`

# Explicit tree settings, so these tests do not move when the defaults are tuned.
EDGES = ["--min-size", "8", "--max-size", "128", "--blur", "3", "--canny-low", "100", "--canny-high", "200"]
TREE = [*EDGES, "--normalise"]
COUNTS = [*EDGES, "--no-normalise"]


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "failed:", "warning:"))]


def read_h5(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in f}, dict(f.attrs)


@pytest.fixture
def detail_slide(tmp_path: Path) -> Path:
    """1700 x 1500 px at 0.5 µm/px: an elliptic piece of tissue with dark nuclei-like blobs (edges
    for the tree to refine on), on glass."""
    h, w = 1500, 1700
    rng = np.random.default_rng(0)
    img = np.full((h, w, 3), 243, np.uint8)
    tissue = np.zeros((h, w), np.uint8)
    cv2.ellipse(tissue, (w // 2, h // 2), (w * 2 // 5, h * 2 // 5), 20, 0, 360, 1, -1)
    img[tissue > 0] = textured(h, w)[tissue > 0]
    for _ in range(150):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if tissue[y, x]:
            cv2.circle(img, (x, y), int(rng.integers(3, 12)), (90, 40, 120), -1)
    return write_pyramid_tiff(tmp_path / "detail.tiff", img)


def whole_image_leaves(path: Path, mpp: float, params: QuadtreeParams):
    """The reference: one tree over the whole working image read in one piece."""
    with open_slide(path) as slide:
        ds = slide.downsample_for(Resolution(mpp=mpp))
        w, h = (round(d / ds) for d in slide.dimensions)
        rgb = slide.read_region(0, 0, w, h, ds)
        tm = detect_slide_tissue(slide, TissueParams())
    tissue = sample_mask(tm.mask, tm.downsample, ds, Window(0, 0, w, h))
    edges = params_edge_map(rgb, params)
    leaves = build_quadtree(edges, params, tissue)
    return leaves, uniform_token_count((h, w), params.min_size, tissue), ds, edges


# -- outputs ------------------------------------------------------------------------------------
def test_outputs_h5_layout_and_stats_on_a_synthetic_slide(runner, detail_slide, tmp_path):
    out = tmp_path / "out"
    res = invoke(runner, "quadtree", detail_slide, "-o", out, *TREE, "--split-threshold", "0.004", "--json")
    assert res.exit_code == 0, res.stderr
    (row,) = json_lines(res.stdout)
    assert row["status"] == "done" and row["outputs"] == {"quadtree": "quadtree.h5", "overlay": "quadtree.png"}
    folder = out / "detail"
    data, attrs = read_h5(folder / "quadtree.h5")
    leaves, level0, depth, detail = data["leaves"], data["leaves_level0"], data["depth"], data["detail"]
    n = len(leaves)
    assert leaves.dtype == np.int64 and leaves.shape == (n, 3) and n > 100
    assert level0.dtype == np.float64 and level0.shape == (n, 3)
    assert depth.dtype == np.int16 and depth.shape == (n,)
    assert detail.dtype == np.float32 and detail.shape == (n,)
    assert set(np.unique(leaves[:, 2])) <= {8, 16, 32, 64, 128} and (leaves[:, 2] == 8).any() and (leaves[:, 2] == 128).any()
    np.testing.assert_array_equal(leaves[:, 2], 128 >> depth.astype(np.int64))
    np.testing.assert_array_equal(level0, leaves * attrs["downsample"])
    for f in dataclasses.fields(QuadtreeParams):
        assert f.name in attrs, f.name
    assert attrs["min_size"] == 8 and attrs["max_size"] == 128 and attrs["split_threshold"] == pytest.approx(0.004)
    assert attrs["max_tokens"] == 0 and attrs["mode"] == "threshold"
    for key in ("token_size", "mpp", "downsample", "level0_width", "level0_height", "window", "uniform_tokens",
                "reduction"):
        assert key in attrs, key
    assert (attrs["level0_width"], attrs["level0_height"]) == (1700, 1500) and attrs["mpp"] == pytest.approx(0.5)
    stats = row["stats"]
    assert stats["leaves"] == n
    assert stats["reduction"] == pytest.approx(stats["uniform_tokens"] / n, rel=1e-3)
    assert attrs["reduction"] == pytest.approx(attrs["uniform_tokens"] / n) and attrs["uniform_tokens"] == stats["uniform_tokens"]
    for key in ("seconds_read", "seconds_edges", "seconds_tree"):
        assert stats[key] >= 0
    # Fine leaves where there is detail: the smallest leaves hold more edges per pixel.
    assert detail[leaves[:, 2] == 8].mean() > detail[leaves[:, 2] == 128].mean()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["steps"]["quadtree"]["status"] == "done"
    assert manifest["steps"]["quadtree"]["stats"]["uniform_tokens"] == stats["uniform_tokens"]
    png = cv2.imread(str(folder / "quadtree.png"))
    assert png is not None and png.ndim == 3 and max(png.shape[:2]) <= 2048
    again = json_lines(invoke(runner, "quadtree", detail_slide, "-o", out, *TREE, "--split-threshold", "0.004",
                              "--json").stdout)
    assert again[0]["status"] == "skipped"


@pytest.mark.parametrize("mpp", [0.5, 1.0])
def tree_params(normalise: bool, split_threshold: float = 0.0, max_tokens: int | None = None,
                edge_downsample: int = QuadtreeParams.edge_downsample) -> QuadtreeParams:
    return QuadtreeParams(min_size=8, max_size=128, blur_kernel=3, canny_low=100, canny_high=200,
                          normalise=normalise, split_threshold=split_threshold, max_tokens=max_tokens,
                          edge_downsample=edge_downsample)


# The budget stops before every detailed leaf is at --min-size: past that point the splits are
# among leaves without edges, all tied, and which of them split first is arbitrary.
@pytest.mark.parametrize("mpp", [0.5, 1.0])
@pytest.mark.parametrize("args,params", [
    ([*TREE, "--split-threshold", "0.004"], tree_params(True, 0.004)),
    ([*COUNTS, "--split-threshold", "20"], tree_params(False, 20)),
    ([*TREE, "--max-tokens", "1000"], tree_params(True, max_tokens=1000)),
    ([*COUNTS, "--split-threshold", "40", "--edge-downsample", "1"], tree_params(False, 40, edge_downsample=1)),
], ids=["threshold-per-pixel", "threshold-counts", "budget-per-pixel", "full-resolution-edges"])
def test_windowed_leaves_equal_one_tree_over_the_whole_image(runner, detail_slide, tmp_path, mpp, args, params):
    res = invoke(runner, "quadtree", detail_slide, "-o", tmp_path / "out", *args, "--mpp", str(mpp),
                 "--window", "256", "--json")
    assert res.exit_code == 0, res.stderr
    stats = json_lines(res.stdout)[0]["stats"]
    assert stats["windows"] > 4 and stats["windows_read"] < stats["windows"]  # glass-only windows skipped
    data, attrs = read_h5(tmp_path / "out" / "detail" / "quadtree.h5")
    ref, uniform, ds, _ = whole_image_leaves(detail_slide, mpp, params)
    assert attrs["downsample"] == ds
    assert len(np.unique(ref.size)) >= 3  # a real tree, not a grid
    # Same leaves, same Z-order, same depth and detail.
    np.testing.assert_array_equal(data["leaves"], ref.boxes())
    np.testing.assert_array_equal(data["depth"], ref.depth)
    np.testing.assert_allclose(data["detail"], ref.detail)
    assert stats["uniform_tokens"] == uniform
    if params.max_tokens:
        assert params.max_tokens - 2 <= stats["leaves"] <= params.max_tokens


def split_scores(boxes: np.ndarray, edges: np.ndarray, max_size: int) -> list[int]:
    """Edge counts of the nodes a tree split (every ancestor of a leaf), largest first."""
    nodes = set()
    for x, y, s in boxes.tolist():
        while s < max_size:
            s *= 2
            x, y = x - x % s, y - y % s
            nodes.add((x, y, s))
    padded = np.zeros((edges.shape[0] + max_size, edges.shape[1] + max_size), np.int64)
    padded[: edges.shape[0], : edges.shape[1]] = edges
    return sorted((int(padded[y:y + s, x:x + s].sum()) for x, y, s in nodes), reverse=True)


def test_budget_of_edge_counts_differs_from_one_tree_only_among_tied_leaves(runner, detail_slide, tmp_path):
    # Edge counts tie often; where the budget runs out inside a group of equal counts, the windows
    # and the single tree may pick different members of the group, nothing else.
    res = invoke(runner, "quadtree", detail_slide, "-o", tmp_path / "out", *COUNTS, "--max-tokens", "1000",
                 "--window", "256", "--edge-downsample", "1", "--json")
    assert res.exit_code == 0, res.stderr
    data, _ = read_h5(tmp_path / "out" / "detail" / "quadtree.h5")
    ref, _, _, edges = whole_image_leaves(detail_slide, 0.5, tree_params(False, max_tokens=1000, edge_downsample=1))
    assert 998 <= len(data["leaves"]) <= 1000 and 998 <= len(ref) <= 1000
    got, want = split_scores(data["leaves"], edges, 128), split_scores(ref.boxes(), edges, 128)
    cut = want[-1]
    assert got[-1] == cut
    assert [s for s in got if s > cut] == [s for s in want if s > cut]


def test_windows_are_read_one_at_a_time_within_the_margin(runner, detail_slide, tmp_path, monkeypatch):
    reads: list[tuple[int, int, float]] = []
    original = Slide.read_region

    def spy(self, x, y, width, height, downsample=1.0):
        reads.append((width, height, downsample))
        return original(self, x, y, width, height, downsample)

    monkeypatch.setattr(Slide, "read_region", spy)
    res = invoke(runner, "quadtree", detail_slide, "-o", tmp_path / "out", *TREE, "--window", "256", "--json")
    assert res.exit_code == 0, res.stderr
    stats = json_lines(res.stdout)[0]["stats"]
    # Tissue detection reads coarser; the overlay reads the whole (small) slide.
    working = [r for r in reads if r[2] == 1.0 and r[:2] != (1700, 1500)]
    assert len(working) == stats["windows_read"]
    # Margin: 16 px plus half the blur (3 px), rounded up to a multiple of the edge downsampling (2).
    assert max(w * h for w, h, _ in working) <= (256 + 2 * 18) ** 2


def test_no_tissue_covers_the_whole_slide(runner, rect_slide, tmp_path):
    path, _ = rect_slide
    res = invoke(runner, "quadtree", path, "-o", tmp_path / "out", *TREE, "--no-tissue", "--window", "512", "--json")
    assert res.exit_code == 0, res.stderr
    stats = json_lines(res.stdout)[0]["stats"]
    assert stats["uniform_tokens"] == (3072 // 8) * (2048 // 8) and stats["windows_read"] == stats["windows"] == 24
    data, _ = read_h5(tmp_path / "out" / "rect" / "quadtree.h5")
    assert int((data["leaves"][:, 2] ** 2).sum()) == 3072 * 2048  # the leaves tile the slide


def test_budget_is_per_slide_and_reaches_the_budget(runner, detail_slide, tmp_path):
    res = invoke(runner, "quadtree", detail_slide, "-o", tmp_path / "out", *TREE, "--max-tokens", "800",
                 "--window", "128", "--json")
    assert res.exit_code == 0, res.stderr
    stats = json_lines(res.stdout)[0]["stats"]
    assert stats["mode"] == "budget" and 798 <= stats["leaves"] <= 800
    _, attrs = read_h5(tmp_path / "out" / "detail" / "quadtree.h5")
    assert attrs["max_tokens"] == 800 and attrs["mode"] == "budget"


# -- --mask -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [["--split-threshold", "0.004"], ["--max-tokens", "600"]], ids=["threshold", "budget"])
def test_mask_equal_to_the_tissue_round_trips_with_dice_near_one(runner, detail_slide, tmp_path, mode):
    out = tmp_path / "out"
    assert invoke(runner, "tissue", detail_slide, "-o", out).exit_code == 0
    tissue_png = out / "detail" / "tissue_mask.png"  # 0/255 at an integer downsample of level 0
    res = invoke(runner, "quadtree", detail_slide, "-o", out, *TREE, *mode, "--window", "512",
                 "--mask", tissue_png, "--json")
    assert res.exit_code == 0, res.stderr
    stats = json_lines(res.stdout)[0]["stats"]
    assert 0.97 < stats["mask_dice"] <= 1.0
    assert stats["mask_classes"] == {"255": 1} and stats["mask_dice_per_class"]["255"] == stats["mask_dice"]


def test_mask_of_another_size_fails_the_slide_with_one_line(runner, detail_slide, tmp_path):
    bad = tmp_path / "bad.png"
    cv2.imwrite(str(bad), np.zeros((100, 130), np.uint8))
    res = invoke(runner, "quadtree", detail_slide, "-o", tmp_path / "out", "--mask", bad)
    assert res.exit_code == 1
    (line,) = error_lines(res.stderr)
    assert "130x100" in line and "1700x1500" in line and "Traceback" not in res.stderr


def test_geojson_mask_reports_dice_per_class(runner, rect_slide, tmp_path):
    path, (x, y, w, h) = rect_slide
    half = x + w // 2

    def feature(x0, x1, name, color):
        ring = [[x0, y], [x1, y], [x1, y + h], [x0, y + h], [x0, y]]
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "annotation", "classification": {"name": name, "color": color}}}

    gj = tmp_path / "labels.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [
        feature(x, half, "Tumor", [200, 0, 0]), feature(half, x + w, "Stroma", [0, 200, 0])]}))
    res = invoke(runner, "quadtree", path, "-o", tmp_path / "out", *TREE, "--mask", gj, "--window", "512",
                 "--no-tissue", "--json")
    assert res.exit_code == 0, res.stderr
    stats = json_lines(res.stdout)[0]["stats"]
    assert stats["mask_classes"] == {"Tumor": 1, "Stroma": 2}
    # Leaves cover the slide and the rectangle's halves lie on the root grid: the round trip is exact.
    assert stats["mask_dice"] == pytest.approx(1.0)
    assert stats["mask_dice_per_class"] == {"Tumor": pytest.approx(1.0), "Stroma": pytest.approx(1.0)}


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--min-size", "6"], "--min-size"),
    (["--max-size", "100"], "--max-size"),
    (["--min-size", "64", "--max-size", "32"], "--min-size"),
    (["--token-size", "6"], "--token-size"),
    (["--blur", "4"], "--blur"),
    (["--canny-low", "200", "--canny-high", "100"], "Canny"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--split-threshold", "-1"], "--split-threshold"),
    (["--window", "1000"], "--window"),
    (["--mpp", "-1"], "--mpp"),
    (["--mpp", "0.5", "--magnification", "20"], "either"),
    (["--mask", "no-such-mask.png"], "--mask"),
])
def test_bad_option_values_exit_2_with_one_line(runner, rect_slide, tmp_path, args, needle):
    path, _ = rect_slide
    res = invoke(runner, "quadtree", path, "-o", tmp_path / "out", *args)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.stderr


def test_mask_of_an_unknown_kind_is_a_usage_error(runner, rect_slide, tmp_path):
    path, _ = rect_slide
    labels = tmp_path / "labels.txt"
    labels.write_text("1 2 3")
    res = invoke(runner, "quadtree", path, "-o", tmp_path / "out", "--mask", labels)
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "--mask" in res.stderr and "labels.txt" in res.stderr


def test_token_size_need_not_be_at_most_min_size(runner, rect_slide, tmp_path):
    path, _ = rect_slide
    res = invoke(runner, "quadtree", path, "-o", tmp_path / "out", "--token-size", "32", "--min-size", "8")
    assert res.exit_code == 0, res.stderr


def test_slide_without_tissue_warns_and_writes_an_empty_quadtree(runner, tmp_path):
    blank = write_pyramid_tiff(tmp_path / "blank.tiff", np.full((1024, 1024, 3), 243, np.uint8))
    res = invoke(runner, "quadtree", blank, "-o", tmp_path / "out", "--json")
    assert res.exit_code == 1
    assert json_lines(res.stdout)[0]["status"] == "empty"
    (line,) = error_lines(res.stderr)
    assert line.startswith("warning:") and "no tissue" in line and "blank.tiff" in line
    data, attrs = read_h5(tmp_path / "out" / "blank" / "quadtree.h5")
    assert data["leaves"].shape == (0, 3) and data["leaves_level0"].shape == (0, 3) and len(data["depth"]) == 0
    assert attrs["uniform_tokens"] == 0
    assert cv2.imread(str(tmp_path / "out" / "blank" / "quadtree.png")) is not None


# -- real slides ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", real_slides() or [None], ids=lambda p: p.name if p else "no-data")
def test_every_readable_real_slide_gives_done_or_empty_and_a_png(runner, slides_dir, tmp_path, path):
    with open_slide(path) as slide:
        mpp = slide.mpp
    if mpp is None:
        args: tuple[str, ...] = ("--slide-mpp", "0.5", "--mpp", "2")
    elif mpp[0] > 2.0:  # coarser than the working resolution here: work at level 0
        args = ("--mpp", f"{mpp[0] * 1.001:.6g}")
    else:
        args = ("--mpp", "2")
    res = invoke(runner, "quadtree", path, "-o", tmp_path / "out", "--json", *args)
    assert "Traceback" not in res.stderr
    (row,) = json_lines(res.stdout)
    assert row["status"] in ("done", "empty"), row["message"]
    assert res.exit_code == (0 if row["status"] == "done" else 1)
    png = cv2.imread(str(Path(row["out_dir"]) / "quadtree.png"))
    assert png is not None and png.ndim == 3
    data, _ = read_h5(Path(row["out_dir"]) / "quadtree.h5")
    assert len(data["leaves"]) == row["stats"]["leaves"]
    if path.name == "CMU-1-Small-Region.svs":
        assert row["status"] == "done" and row["stats"]["leaves"] > 0


def test_sample_slide_refines_on_tissue_detail(runner, slides_dir, tmp_path):
    cmu = slides_dir / "aperio" / "CMU-1-Small-Region.svs"
    # A low split threshold, so that nuclei-level detail reaches the minimum leaf size (at the
    # default, borders stop at 32-px leaves).
    res = invoke(runner, "quadtree", cmu, "-o", tmp_path / "out", "--json", "--split-threshold", "24")
    assert res.exit_code == 0, res.stderr
    stats = json_lines(res.stdout)[0]["stats"]
    assert stats["leaves"] > 0 and stats["uniform_tokens"] >= stats["leaves"]
    data, attrs = read_h5(tmp_path / "out" / "CMU-1-Small-Region" / "quadtree.h5")
    sizes = data["leaves"][:, 2]
    assert sizes.min() == attrs["min_size"]
    # Leaves stay inside the slide (level-0 px), and refine where the edges are.
    level0 = data["leaves_level0"]
    assert level0[:, 0].min() >= 0 and level0[:, 1].min() >= 0
    assert level0[:, 0].max() < 2220 and level0[:, 1].max() < 2967
    small, large = sizes == sizes.min(), sizes == sizes.max()
    assert large.any() and sizes.max() > sizes.min()
    density = data["detail"] if attrs["normalise"] else data["detail"] / sizes.astype(np.float32) ** 2
    assert density[small].mean() > density[large].mean()
