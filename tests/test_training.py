"""Training the token segmenter: CLI smoke runs on GlaS, resume, reproducibility, slides with
QuPath GeoJSON, prediction on whole images, and every bad input (CPU, tiny models)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import copy_glas, textured, write_pyramid_tiff
from shapely.geometry import Polygon, box
from typer.testing import CliRunner

from wsi_amr.cli.train import parse_colors, train_app
from wsi_amr.errors import TrainingInterrupted
from wsi_amr.geojson import PathClass, make_feature, write_geojson
from wsi_amr.metrics import dice_counts, dice_scores
from wsi_amr.quadtree import QuadtreeParams
from wsi_amr.segmentation.augment import augment, colour_jitter, composite, label_fractions
from wsi_amr.segmentation.config import IGNORE, SegmenterConfig, TrainConfig
from wsi_amr.segmentation.data import mask_to_labels
from wsi_amr.segmentation.model import ModelCard, TokenSegmenter, load_checkpoint
from wsi_amr.segmentation.predict import make_leaves, predict_image
from wsi_amr.segmentation.train import segmentation_loss, train_segmenter
from wsi_amr.trainer import split_names

pytestmark = pytest.mark.slow  # runs the CLI or trains: not in `make test-fast`

TINY = ["--width", "32", "--depth", "1", "--heads", "4", "--crop", "128", "--batch-size", "2",
        "--device", "cpu", "--log-every", "1", "--threads", "1"]
GLAS_FEW = ["train_1", "train_2", "train_3", "train_4", "train_5"]


def run(*args: object):
    res = CliRunner().invoke(train_app, ["segment", *[str(a) for a in args]], catch_exceptions=False)
    return res


def metrics(out: Path, event: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == event]


def error_lines(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture
def glas_few(glas_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Five GlaS training images and their masks in their own folders."""
    return copy_glas(glas_dir, GLAS_FEW, tmp_path / "data")


def synthetic_images(root: Path, n: int = 3, size: int = 96, binary: bool = True) -> tuple[Path, Path]:
    """Pink discs on white, masks 0/255 (or 0/1)."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        disc = (xx - size // 2 - 5 * i) ** 2 + (yy - size // 2) ** 2 < (size // 4) ** 2
        img = np.where(disc[..., None], np.array([200, 80, 160]), np.array([240, 235, 238])).astype(np.uint8)
        cv2.imwrite(str(images / f"im{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(masks / f"im{i}.png"), (disc * (255 if binary else 1)).astype(np.uint8))
    return images, masks


# -- smoke training through the CLI, both patching modes ---------------------------------------
@pytest.mark.parametrize("patching", ["adaptive", "uniform"])
def test_cli_trains_on_glas_and_writes_loadable_checkpoints(glas_few, tmp_path, patching):
    images, masks = glas_few
    out = tmp_path / "run"
    res = run("--images", images, "--masks", masks, "-o", out, "--patching", patching, "--steps", 12,
              "--val-every", 6, "--val-fraction", 0.2, *TINY)
    assert res.exit_code == 0, res.stderr
    assert "best validation foreground Dice" in res.stderr
    for name in ("best", "last"):
        model, card = load_checkpoint(out / f"{name}.safetensors")
        assert model.cfg == SegmenterConfig(token_size=8, num_classes=2, width=32, depth=1, heads=4)
        assert card.class_names == ["Background", "Gland"] and card.mpp == 0.62
        assert card.patching["mode"] == patching and card.patching["token_size"] == 8
        assert card.training["seed"] == 0 and card.training["total_steps"] == 12
    train, val = metrics(out), metrics(out, "val")
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["step"] for r in val] == [6, 12]
    assert all(np.isfinite(r["loss"]) and r["lr"] > 0 and r["tokens_per_crop"] > 0 for r in train)
    assert 0 <= val[-1]["val_foreground_dice"] <= 1 and set(val[-1]["val_dice"]) == {"Background", "Gland"}
    best = json.loads((out / "best.json").read_text())["training"]
    assert best["best_val_dice"] == max(r["val_foreground_dice"] for r in val)
    assert best["data"]["val_names"] == sorted(split_names(GLAS_FEW, 0.2, 0)) and len(best["data"]["val_names"]) == 1
    if patching == "uniform":  # 128-px crops at 8-px leaves
        assert all(r["tokens_per_crop"] == 256 for r in train)
    else:
        assert all(r["tokens_per_crop"] < 256 for r in train)


def test_same_seed_gives_the_same_loss_curve_and_another_seed_does_not(tmp_path):
    images, masks = synthetic_images(tmp_path / "data")
    curves = []
    for i, seed in enumerate([3, 3, 4]):
        out = tmp_path / f"run{i}"
        res = run("--images", images, "--masks", masks, "-o", out, "--steps", 4, "--val-fraction", 0,
                  "--seed", seed, *TINY)
        assert res.exit_code == 0, res.stderr
        curves.append([r["loss"] for r in metrics(out)])
    assert curves[0] == curves[1]
    assert curves[0] != curves[2]


def test_resume_after_ctrl_c_continues_the_same_run(tmp_path):
    images, masks = synthetic_images(tmp_path / "data", n=4)
    base = dict(images=[str(images)], masks=str(masks), crop=64, batch_size=2, steps=8, width=32, depth=1,
                heads=4, device="cpu", log_every=1, val_every=4, val_fraction=0.25, seed=1,
                quadtree=QuadtreeParams(min_size=8, max_size=64))
    straight = train_segmenter(TrainConfig(out=tmp_path / "straight", **base))
    assert straight["steps"] == 8

    def stop_at_5(step, total, info):
        if step == 5:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(TrainingInterrupted) as exc:
        train_segmenter(TrainConfig(out=out, **base), progress=stop_at_5)
    assert exc.value.step == 5
    assert json.loads((out / "last-state.json").read_text())["step"] == 5
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]
    result = train_segmenter(TrainConfig(out=out, resume=True, **base))
    assert result["steps"] == 8
    # Steps continue (6, 7, 8), and the resumed run is the uninterrupted one, loss for loss.
    assert [r["step"] for r in metrics(out)] == list(range(1, 9))
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(tmp_path / "straight")]
    a, _ = load_checkpoint(out / "last")
    b, _ = load_checkpoint(tmp_path / "straight" / "last")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k


def test_cli_resume_continues_from_last_step_and_reports_interrupts(tmp_path, monkeypatch):
    images, masks = synthetic_images(tmp_path / "data")
    out = tmp_path / "run"
    args = ["--images", images, "--masks", masks, "-o", out, "--val-fraction", 0, *TINY]
    assert run(*args, "--steps", 3).exit_code == 0
    res = run(*args, "--steps", 3)
    assert res.exit_code == 2 and "--resume" in error_lines(res)[0]
    res = run(*args, "--steps", 5, "--resume")
    assert res.exit_code == 0, res.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]
    assert load_checkpoint(out / "last")[1].training["steps"] == 5
    # Ctrl-C: OUT/last is saved, exit 130 with a line saying how to continue.
    import wsi_amr.segmentation.train as training

    real = training.make_batch
    calls = {"n": 0}

    def interrupting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(training, "make_batch", interrupting)
    res = run(*args, "--steps", 10, "--resume")
    assert res.exit_code == 130
    assert "--resume" in res.stderr and "step 7" in res.stderr
    assert json.loads((out / "last-state.json").read_text())["step"] == 7


def test_val_images_by_name_pattern_overwrite_and_busy_folder(tmp_path):
    import os
    import socket

    images, masks = synthetic_images(tmp_path / "data", n=4)
    out = tmp_path / "run"
    args = ["--images", images, "--masks", masks, "-o", out, "--steps", 2, *TINY]
    res = run(*args, "--val-images", "im2*")
    assert res.exit_code == 0, res.stderr
    card = load_checkpoint(out / "best")[1]
    assert card.training["data"]["val_names"] == ["im2"] and card.training["data"]["train_items"] == 3
    res = run(*args, "--overwrite", "--steps", 1)
    assert res.exit_code == 0, res.stderr
    assert [r["step"] for r in metrics(out)] == [1]
    (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    res = run(*args, "--resume", "--steps", 3)
    assert res.exit_code == 2 and "another training run" in error_lines(res)[0]


# -- slides with QuPath GeoJSON ------------------------------------------------------------------
def gland_slide(tmp_path: Path) -> tuple[Path, Path]:
    """A 1024 x 768 slide at 0.5 µm/px with pink glands on white, and their GeoJSON."""
    img = np.full((768, 1024, 3), 240, np.uint8)
    glands = [box(100, 100, 300, 260), box(500, 300, 700, 600), Polygon([(750, 80), (950, 120), (900, 300)])]
    mask = np.zeros(img.shape[:2], np.uint8)
    from wsi_amr.polygons import rasterize_polygons

    rasterize_polygons(glands, mask.shape, out=mask)
    img[mask == 1] = textured(768, 1024)[mask == 1]
    slide = write_pyramid_tiff(tmp_path / "glands.tiff", img, mpp=0.5, levels=2)
    gland = PathClass("Gland", (0, 160, 0))
    features = [make_feature(g, classification=gland) for g in glands]
    features.append(make_feature(box(20, 20, 1000, 740)))  # unclassified: the annotated region
    geojson = tmp_path / "glands.geojson"
    write_geojson(geojson, features)
    return slide, geojson


def test_cli_trains_from_a_slide_and_qupath_geojson(tmp_path):
    slide, geojson = gland_slide(tmp_path)
    out = tmp_path / "run"
    res = run("--slides", slide, "--annotations", geojson, "-o", out, "--steps", 4, "--mpp", 1.0, *TINY)
    assert res.exit_code == 0, res.stderr
    assert "no validation images" in res.stderr  # one slide: nothing to hold out
    model, card = load_checkpoint(out / "best")
    assert card.mpp == 1.0 and card.class_names == ["Background", "Gland"]
    assert card.training["data"]["slides"] == [str(slide)]
    # The same through a CSV of pairs, at the slide's own mpp.
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"slide,annotations\n{slide.name},{geojson.name}\n")
    res = run("--pairs", pairs, "-o", tmp_path / "run2", "--steps", 2, *TINY)
    assert res.exit_code == 0, res.stderr
    assert load_checkpoint(tmp_path / "run2" / "last")[1].mpp == pytest.approx(0.5)


def test_slide_crops_are_labelled_from_the_annotations(tmp_path):
    from wsi_amr.segmentation.data import SlideAnnotations

    slide, geojson = gland_slide(tmp_path)
    src = SlideAnnotations(slide, geojson, ["Background", "Gland"], 1.0, None, "background")
    try:
        item = src.whole()
        # Region 20..1000 x 20..740 level 0 at 2 level-0 px per working px.
        assert item.labels.shape == (360, 490)
        assert item.labels[(200 - 20) // 2, (200 - 20) // 2] == 1  # inside the first gland
        assert item.labels[5, 5] == 0
        pink = item.image[item.labels == 1].mean(axis=0)
        assert pink[1] < 150  # gland pixels are the pink ones
        image, labels = src.sample(np.random.default_rng(0), 64)
        assert image.shape == (64, 64, 3) and labels.shape == (64, 64)
    finally:
        src.close()
    ignore = SlideAnnotations(slide, geojson, ["Background", "Gland"], 1.0, None, "ignore")
    try:
        assert (ignore.whole().labels != IGNORE).all()  # the unclassified region covers the box
    finally:
        ignore.close()
    # A self-intersecting (bowtie) annotation, as hand-drawn QuPath files can hold, is repaired.
    bowtie = tmp_path / "bowtie.geojson"
    bowtie.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[100, 100], [300, 300], [300, 100],
                                                                            [100, 300], [100, 100]]]},
        "properties": {"objectType": "annotation", "classification": {"name": "Gland", "color": [0, 160, 0]}}}]}))
    repaired = SlideAnnotations(slide, bowtie, ["Background", "Gland"], 1.0, None, "background")
    try:
        labels = repaired.whole().labels  # the bowtie's box, 100 x 100 working px
        assert labels.shape == (100, 100) and 0.4 < labels.mean() < 0.6  # two triangles: half the box
    finally:
        repaired.close()


# -- the library pieces ------------------------------------------------------------------------
def test_predict_image_covers_the_image_and_chunks_long_sequences():
    torch.manual_seed(0)
    model = TokenSegmenter(SegmenterConfig(token_size=4, width=32, depth=1, heads=4)).eval()
    card = ModelCard(patching={"mode": "uniform", "token_size": 4, "quadtree": {"min_size": 8, "max_size": 32}})
    img = np.random.default_rng(0).integers(0, 255, (70, 90, 3)).astype(np.uint8)
    labels, probs = predict_image(model, card, img)
    assert labels.shape == (70, 90) and probs.shape == (70, 90, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=2), 1.0, atol=1e-5)
    assert np.array_equal(labels, probs.argmax(axis=2))
    # Uniform 8-px leaves: 9 x 12 = 108 tokens; chunks of 50 still give a probability per pixel.
    _, chunked = predict_image(model, card, img, max_sequence=50)
    np.testing.assert_allclose(chunked.sum(axis=2), 1.0, atol=1e-5)
    # A 1000 x 1000 image at 8-px leaves is one sequence (15,625 tokens < MAX_SEQUENCE).
    from wsi_amr.segmentation.config import MAX_SEQUENCE

    assert len(make_leaves(np.zeros((1000, 1000, 3), np.uint8), QuadtreeParams(min_size=8), "uniform")) <= MAX_SEQUENCE


@pytest.mark.parametrize("width", [600, 603])
def test_leaves_over_tissue_equal_a_tree_over_the_whole_edge_map(width):
    # make_leaves finds edges only in the tissue's bounding box (columns read 8 px at a time when
    # the width allows); the leaves must be those of edges found over the whole image.
    from wsi_amr.quadtree import build_quadtree, params_edge_map

    rng = np.random.default_rng(width)
    img = cv2.GaussianBlur(rng.integers(0, 255, (500, width, 3)).astype(np.uint8), (0, 0), 2)
    params = QuadtreeParams(min_size=8, max_size=64, split_threshold=20, edge_downsample=2)
    for box in ((130, 75, 260, 341), (0, 0, 500, width), (499, width - 1, 500, width), (7, 9, 8, 10)):  # noqa: F402
        tissue = np.zeros((500, width), bool)
        tissue[box[0]:box[2], box[1]:box[3]] = True
        got = make_leaves(img, params, "adaptive", tissue)
        want = build_quadtree(params_edge_map(img, params), params, tissue)
        assert len(got) and all(np.array_equal(getattr(got, k), getattr(want, k)) for k in ("x", "y", "size"))


def test_augmentation_moves_labels_with_pixels_and_jitter_keeps_dtype():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)
    labels = (img[..., 0] > 128).astype(np.uint8)
    for _ in range(8):
        a_img, a_lab = augment(img, labels, rng, jitter=0.0)
        assert np.array_equal(a_lab, (a_img[..., 0] > 128).astype(np.uint8))
    jittered = colour_jitter(img, np.random.default_rng(1), 0.2)
    assert jittered.dtype == np.uint8 and jittered.shape == img.shape and not np.array_equal(jittered, img)
    assert np.array_equal(colour_jitter(img, rng, 0.0), img)


def test_soft_targets_and_losses():
    leaves = make_leaves(np.zeros((16, 16, 3), np.uint8), QuadtreeParams(min_size=16, max_size=16), "uniform")
    labels = np.zeros((16, 16), np.uint8)
    labels[:, 8:] = 1
    labels[0, 0] = IGNORE
    frac = label_fractions(labels, leaves, 4, 2)  # one 16-px leaf -> 4 x 4 cells of 4 x 4 pixels
    assert frac.shape == (1, 4, 4, 2)
    assert frac[0, 0, 0].sum() == pytest.approx(15 / 16)  # one ignored pixel in the corner cell
    assert (frac[0, :, 2:, 1] == 1).all()
    targets = torch.from_numpy(frac)[None]
    perfect = torch.log(targets.permute(0, 1, 4, 2, 3).clamp(min=1e-6)) * 20
    bad = -perfect
    assert segmentation_loss(perfect, targets, 0.5)[0] < 0.01 < segmentation_loss(bad, targets, 0.5)[0]


def test_dice_counts_ignore_unlabelled_pixels():
    truth = np.array([[0, 1, 1, IGNORE]], np.uint8)
    pred = np.array([[0, 1, 0, 1]], np.uint8)
    per, fg = dice_scores(dice_counts(pred, truth, 2), ["Background", "Gland"])
    assert per["Gland"] == pytest.approx(2 / 3) and fg == pytest.approx(2 / 3)
    assert per["Background"] == pytest.approx(2 / 3)


def test_masks_binary_or_label_ids():
    assert mask_to_labels(np.array([[0, 255]], np.uint8), 2, "m").tolist() == [[0, 1]]
    assert mask_to_labels(np.array([[0, 2]], np.uint8), 3, "m").tolist() == [[0, 2]]
    assert parse_colors("#000000,#00a000") == [[0, 0, 0], [0, 160, 0]]
    assert parse_colors("0,0,0;0,160,0") == [[0, 0, 0], [0, 160, 0]]


def test_validation_split_is_stable_and_by_image():
    names = [f"im{i}" for i in range(20)]
    a = split_names(names, 0.2, 7)
    assert a == split_names(list(reversed(names)), 0.2, 7) and len(a) == 4
    assert a != split_names(names, 0.2, 8)


# -- bad input: one line naming the problem, non-zero exit ---------------------------------------
def bad_inputs(tmp_path: Path) -> dict[str, tuple[list, int, str]]:
    images, masks = synthetic_images(tmp_path / "ok")
    cases: dict[str, tuple[list, int, str]] = {}
    # Images without masks.
    lonely = tmp_path / "lonely"
    shutil.copytree(images, lonely / "images")
    (lonely / "masks").mkdir()
    shutil.copy(masks / "im0.png", lonely / "masks")
    cases["no masks"] = (["--images", lonely / "images"], 2, "2 of 3 images have no mask")
    # Masks with labels outside the classes.
    odd = tmp_path / "odd"
    shutil.copytree(tmp_path / "ok", odd)
    cv2.imwrite(str(odd / "masks" / "im1.png"), np.full((96, 96), 7, np.uint8))
    cases["unknown labels"] = (["--images", odd / "images"], 1, "label values 7 outside 0..1")
    # Mask size not matching its image.
    small = tmp_path / "small"
    shutil.copytree(tmp_path / "ok", small)
    cv2.imwrite(str(small / "masks" / "im2.png"), np.zeros((50, 60), np.uint8))
    cases["size"] = (["--images", small / "images"], 1, "mask is 60x50 but its image im2.png is 96x96")
    # Empty image set.
    empty = tmp_path / "empty"
    empty.mkdir()
    cases["empty folder"] = (["--images", empty], 2, "folder holds no images")
    cases["glob"] = (["--images", str(tmp_path / "ok" / "images" / "nothing_*.png")], 2, "matches no image files")
    cases["nothing"] = ([], 2, "no training data")
    # GeoJSON: unknown class, unreadable.
    slide, geojson = gland_slide(tmp_path)
    tumour = tmp_path / "tumour.geojson"
    write_geojson(tumour, [make_feature(box(10, 10, 90, 90), classification=PathClass("Tumor", (200, 0, 0)))])
    cases["unknown class"] = (["--slides", slide, "--annotations", tumour], 1, "unknown class 'Tumor'")
    broken = tmp_path / "broken.geojson"
    broken.write_text('{"type": "FeatureCollection", "features": [')
    cases["unreadable geojson"] = (["--slides", slide, "--annotations", broken], 1, "not JSON")
    cases["unpaired"] = (["--slides", slide], 2, "pair up")
    # Options.
    ok = ["--images", images]
    cases["token size"] = ([*ok, "--token-size", 6], 2, "--token-size must be a power of two")
    cases["min size"] = ([*ok, "--min-size", 12], 2, "--min-size must be a power of two")
    cases["patching"] = ([*ok, "--patching", "grid"], 2, "--patching must be adaptive or uniform")
    cases["device"] = ([*ok, "--device", "tpu"], 2, "--device must be")
    cases["heads"] = ([*ok, "--width", 30], 2, "divisible by --heads")
    cases["colors"] = ([*ok, "--colors", "#00ff00"], 2, "--colors gives 1 colours for 2 classes")
    cases["val fraction"] = ([*ok, "--val-fraction", 1.5], 2, "--val-fraction")
    # An output folder that is a file: cannot be written to.
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    cases["unwritable out"] = ([*ok, "-o", not_a_dir / "run"], 2, "cannot write to the output folder")
    return cases


def test_bad_inputs_fail_with_one_line(tmp_path):
    for name, (args, code, message) in bad_inputs(tmp_path).items():
        out = ["-o", tmp_path / f"out-{name.replace(' ', '-')}"] if "-o" not in args else []
        res = run(*TINY, "--steps", 1, *args, *out)
        assert res.exit_code == code, (name, res.exit_code, res.stderr)
        errors = error_lines(res)
        assert len(errors) == 1 and message in errors[0], (name, res.stderr)
        assert "Traceback" not in res.stderr, name


def test_glass_and_mosaic_crops_keep_image_and_labels_together():
    rng = np.random.default_rng(0)
    image = np.zeros((64, 64, 3), np.uint8)
    image[..., 0] = 200  # red tissue, all class 1
    labels = np.ones((64, 64), np.uint8)
    other = np.zeros((64, 64, 3), np.uint8)
    other[..., 2] = 200  # blue tissue, class 2
    other_labels = np.full((64, 64), 2, np.uint8)
    glass_cfg = TrainConfig(out="x", glass=1.0, mosaic=0.0)
    for _ in range(10):  # blobs of tissue with glass around them, or straight cuts
        img, lab = composite(image, labels, rng, glass_cfg, lambda: (other, other_labels))
        glass = img[..., 0] != 200
        assert 0.1 < glass.mean() < 0.99
        assert (lab[glass] == 0).all() and (lab[~glass] == 1).all()
        assert (img[glass].min(axis=1) > 200).all()  # pale grey
    mosaic_cfg = TrainConfig(out="x", glass=0.0, mosaic=1.0)
    img, lab = composite(image, labels, rng, mosaic_cfg, lambda: (other, other_labels))
    blue = img[..., 2] == 200
    assert 0.15 < blue.mean() < 0.75 and (lab[blue] == 2).all() and (lab[~blue] == 1).all()
    off = TrainConfig(out="x", glass=0.0, mosaic=0.0)
    img, lab = composite(image, labels, rng, off, lambda: (other, other_labels))
    assert img is image and lab is labels


@pytest.mark.parametrize("args,needle", [(["--glass", "1.5"], "--glass"), (["--mosaic", "-0.1"], "--mosaic"),
                                         (["--glass", "0.7", "--mosaic", "0.5"], "must not exceed 1")])
def test_bad_glass_and_mosaic_fractions(tmp_path, args, needle):
    res = run(*TINY, "--steps", 1, "--images", tmp_path / "x.png", *args, "-o", tmp_path / "o")
    assert res.exit_code == 2 and needle in res.stderr


def test_help_has_an_example():
    res = CliRunner().invoke(train_app, ["segment", "--help"])
    assert res.exit_code == 0 and "Example: wsi-amr train segment" in res.stdout


def test_geojson_with_invalid_geometry_is_repaired_or_skipped_with_a_warning(tmp_path):
    slide, geojson = gland_slide(tmp_path)
    doc = json.loads(geojson.read_text())
    bowtie = {"type": "Polygon", "coordinates": [[[400, 400], [480, 480], [480, 400], [400, 480], [400, 400]]]}
    doc["features"].append({"type": "Feature", "geometry": bowtie,
                            "properties": {"objectType": "annotation", "classification": {"name": "Gland"}}})
    doc["features"].append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[1, 2]]]},
                            "properties": {"objectType": "annotation"}})
    geojson.write_text(json.dumps(doc))
    res = run("--slides", slide, "--annotations", geojson, "-o", tmp_path / "run", "--steps", 2, "--mpp", 1.0, *TINY)
    assert res.exit_code == 0, res.stderr
    assert "skipped 1 features (1 unreadable geometry)" in res.stderr and "warning:" in res.stderr
    assert (tmp_path / "run" / "best.safetensors").exists()


def test_shifted_context_grids_are_averaged():
    from wsi_amr.quadtree import uniform_leaves
    from wsi_amr.segmentation.predict import context_blocks, predict_leaves

    torch.manual_seed(0)
    model = TokenSegmenter(SegmenterConfig(token_size=8, width=32, depth=1, heads=4)).eval()
    card = ModelCard()
    image = np.random.default_rng(1).integers(0, 255, (96, 160, 3), dtype=np.uint8)
    leaves = uniform_leaves(image.shape[:2], 16)
    blocks = context_blocks(leaves, 64, shift=32)  # squares start at -32, 32, 96, ...
    assert sorted(np.concatenate(blocks).tolist()) == list(range(len(leaves)))
    for idx in blocks:
        assert len({((int(x) + 32) // 64, (int(y) + 32) // 64) for x, y in zip(leaves.x[idx], leaves.y[idx])}) == 1
    a = predict_leaves(model, card, image, leaves, context=64)
    b = predict_leaves(model, card, image, leaves, context=64, shifts=(32,))
    both = predict_leaves(model, card, image, leaves, context=64, shifts=(0, 32))
    assert not np.allclose(a, b, atol=1e-4)  # the grids differ
    np.testing.assert_allclose(both, (a + b) / 2, atol=1e-5)
    np.testing.assert_allclose(predict_leaves(model, card, image, leaves, context=64, shifts=(0,)), a)


def test_context_squares_partition_the_leaves_and_run_as_separate_sequences():
    from wsi_amr.quadtree import uniform_leaves
    from wsi_amr.segmentation.predict import context_blocks, predict_leaves

    torch.manual_seed(0)
    model = TokenSegmenter(SegmenterConfig(token_size=8, width=32, depth=1, heads=4)).eval()
    card = ModelCard()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (96, 160, 3), dtype=np.uint8)
    leaves = uniform_leaves(image.shape[:2], 16)
    blocks = context_blocks(leaves, 64)
    assert sorted(np.concatenate(blocks).tolist()) == list(range(len(leaves)))
    for idx in blocks:  # one square each
        assert len({(int(x) // 64, int(y) // 64) for x, y in zip(leaves.x[idx], leaves.y[idx])}) == 1
    batched = predict_leaves(model, card, image, leaves, context=64, batch_tokens=64)
    # The same as running every square alone, its positions from its own corner.
    for idx in blocks:
        sub = leaves.take(idx)
        ox, oy = int(sub.x.min()) // 64 * 64, int(sub.y.min()) // 64 * 64
        crop = image[oy:oy + 64, ox:ox + 64]
        shifted = type(sub)(sub.x - ox, sub.y - oy, sub.size, sub.depth, sub.detail)
        alone = predict_leaves(model, card, crop, shifted)
        np.testing.assert_allclose(batched[oy:oy + crop.shape[0], ox:ox + crop.shape[1]], alone, atol=1e-5)
