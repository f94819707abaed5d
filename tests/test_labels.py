"""The one label-image reader (wsi_amr.labels.read_label_image) and RGB reader
(wsi_amr.images.read_rgb): which files are accepted and refused, the same for evaluate, train
segment and quadtree --mask."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from wsi_amr.errors import TrainingDataError
from wsi_amr.evaluation import EvaluationError, evaluate_pair
from wsi_amr.images import ImageError, read_rgb
from wsi_amr.labels import MaskError, label_ids, load_label_mask, read_label_image
from wsi_amr.labeltiff import LabelTiff
from wsi_amr.segmentation.data import load_labelled_image

LABELS = np.array([[0, 1, 2, 2], [0, 0, 1, 3], [3, 3, 0, 0]], np.uint8)


def palette_png(path: Path, labels: np.ndarray = LABELS) -> Path:
    im = Image.fromarray(labels, "P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 160, 0, 20, 20, 200])  # colours that are not the labels
    im.save(path)
    return path


def test_grey_and_palette_png_give_their_labels(tmp_path):
    cv2.imwrite(str(tmp_path / "grey.png"), LABELS)
    got = read_label_image(tmp_path / "grey.png")
    assert got.dtype == np.uint8 and np.array_equal(got, LABELS)
    assert np.array_equal(read_label_image(palette_png(tmp_path / "palette.png")), LABELS)


def test_binary_255_masks_read_as_0_1():
    assert label_ids(np.array([[0, 255]], np.uint8)).tolist() == [[0, 1]]
    assert label_ids(np.array([[255, 255]], np.uint8)).tolist() == [[1, 1]]
    assert label_ids(np.array([[0, 2, 255]], np.uint8)).tolist() == [[0, 2, 255]]  # not binary: as stored


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_labels_as_stored(tmp_path, suffix):
    labels = (LABELS.astype(np.uint16) * 1000)
    path = tmp_path / f"l16{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, labels)
    else:
        cv2.imwrite(str(path), labels)
    got = read_label_image(path)
    assert got.dtype == np.uint16 and np.array_equal(got, labels)


def test_pyramidal_label_tiff_reads_level_0(tmp_path):
    labels = np.zeros((300, 520), np.uint8)
    labels[40:200, 100:400] = 2
    with LabelTiff(tmp_path / "mask.tiff", 520, 300, 0.5, classes=["A", "B"], tile=64) as lt:
        lt.add(0, 0, labels)
        lt.close()
    assert np.array_equal(read_label_image(tmp_path / "mask.tiff"), labels)


def test_grey_saved_as_colour_and_alpha_are_accepted(tmp_path):
    cv2.imwrite(str(tmp_path / "rgb.png"), np.dstack([LABELS] * 3))
    cv2.imwrite(str(tmp_path / "rgba.png"), np.dstack([LABELS] * 3 + [np.full_like(LABELS, 255)]))
    Image.fromarray(np.dstack([LABELS, np.full_like(LABELS, 128)]), "LA").save(tmp_path / "la.png")
    for name in ("rgb.png", "rgba.png", "la.png"):
        assert np.array_equal(read_label_image(tmp_path / name), LABELS), name


def test_one_bit_image_reads_as_0_255(tmp_path):
    Image.fromarray(LABELS > 1).save(tmp_path / "bits.png")
    assert read_label_image(tmp_path / "bits.png").tolist() == ((LABELS > 1) * 255).tolist()


def refused(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    colour = np.dstack([LABELS, LABELS, LABELS * 0 + 7])
    cases = {}
    cv2.imwrite(str(tmp_path / "colour.png"), colour)
    cases["colour"] = (tmp_path / "colour.png", "colour image")
    cv2.imwrite(str(tmp_path / "colour_alpha.png"), np.dstack([colour, np.full_like(LABELS, 255)]))
    cases["colour alpha"] = (tmp_path / "colour_alpha.png", "colour image")
    tifffile.imwrite(tmp_path / "float.tif", LABELS.astype(np.float32))
    cases["float"] = (tmp_path / "float.tif", "float32 values; labels are integers")
    tifffile.imwrite(tmp_path / "negative.tif", LABELS.astype(np.int16) - 1)
    cases["negative"] = (tmp_path / "negative.tif", "negative values")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"rubbish" * 10)
    cases["corrupt"] = (tmp_path / "corrupt.png", "not a readable label image")
    (tmp_path / "corrupt.tif").write_bytes(b"II*\x00" + b"rubbish" * 10)
    cases["corrupt tiff"] = (tmp_path / "corrupt.tif", "not a readable label image")
    cases["missing"] = (tmp_path / "missing.png", "no such file")
    return cases


def test_refused_files_raise_one_line_naming_the_file(tmp_path):
    for name, (path, needle) in refused(tmp_path).items():
        with pytest.raises(ImageError) as err:
            read_label_image(path)
        message = str(err.value)
        assert needle in message and message.startswith(str(path)) and "\n" not in message, (name, message)
        assert "--" not in message, name  # the library names no command-line option


def test_evaluate_train_and_quadtree_accept_and_refuse_the_same_files(tmp_path):
    """Each command raises its own error type with the reader's message, and reads the same labels."""
    image = tmp_path / "image.png"
    cv2.imwrite(str(image), np.full((*LABELS.shape, 3), 200, np.uint8))
    slide = SimpleNamespace(dimensions=(LABELS.shape[1], LABELS.shape[0]), name="slide")
    for name, (path, needle) in refused(tmp_path).items():
        if name == "missing":
            continue
        with pytest.raises(EvaluationError, match=needle):
            evaluate_pair(path, path)
        with pytest.raises(TrainingDataError, match=needle):
            load_labelled_image(image, path, 4)
        with pytest.raises(MaskError, match=needle):
            load_label_mask(path, slide)
    palette = palette_png(tmp_path / "palette.png")
    scores, conf = evaluate_pair(palette, palette)
    assert np.diag(conf).tolist() == np.bincount(LABELS.ravel()).tolist() and scores.dice == [1.0, 1.0, 1.0]
    assert np.array_equal(load_labelled_image(image, palette, 4).labels, LABELS)
    mask, _ = load_label_mask(palette, slide)
    assert mask.classes == {"1": 1, "2": 2, "3": 3} and mask.image is not None and np.array_equal(mask.image, LABELS)


def test_read_rgb(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    cv2.imwrite(str(tmp_path / "grey.png"), grey)
    rgb = read_rgb(tmp_path / "grey.png")
    assert rgb.shape == (3, 4, 3) and np.array_equal(rgb[..., 1], grey)
    bgr = np.zeros((2, 2, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV's order
    cv2.imwrite(str(tmp_path / "blue.png"), bgr)
    assert read_rgb(tmp_path / "blue.png")[0, 0].tolist() == [0, 0, 255]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="bad.png: not a readable image"):
        read_rgb(tmp_path / "bad.png")
