"""Tissue detection on synthetic arrays (no slide files)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import textured

from wsi_amr.tissue import TissueParams, detect_tissue, is_fluorescence, remove_small_objects

MPP = 8.0  # µm/px of the detection image, the default


def glass(h: int = 300, w: int = 400) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.clip(240 + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8)


def test_blank_glass_has_no_tissue():
    mask, info = detect_tissue(glass(), MPP)
    assert not mask.any()
    assert info["fluorescence"] is False


def test_stained_rectangle_is_found():
    img = glass()
    img[50:250, 100:300] = textured(200, 200)
    mask, _ = detect_tissue(img, MPP)
    truth = np.zeros(mask.shape, bool)
    truth[50:250, 100:300] = True
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95


def test_small_specks_are_removed_and_big_pieces_kept():
    img = glass()
    img[20:24, 20:24] = textured(4, 4)  # 16 px * 64 µm² = 1024 µm² < 5,000 µm²
    img[100:200, 100:200] = textured(100, 100)
    mask, _ = detect_tissue(img, MPP)
    assert not mask[15:30, 15:30].any()
    assert mask[120:180, 120:180].all()


def test_small_holes_filled_large_holes_kept():
    img = glass()
    img[20:280, 20:380] = textured(260, 360)
    img[60:63, 60:63] = 242  # 9 px hole: filled
    img[120:220, 150:300] = 242  # 15,000 px hole = 960,000 µm²: kept
    mask, _ = detect_tissue(img, MPP, TissueParams(close_um=0))
    assert mask[61, 61]
    assert not mask[170, 220]


def test_fluorescence_detected_and_inverted():
    img = np.zeros((200, 200, 3), np.uint8) + 5
    img[50:150, 60:160, 2] = 180  # DAPI-blue tissue on a dark background
    assert is_fluorescence(img)
    mask, info = detect_tissue(img, MPP)
    assert info["fluorescence"] is True
    assert mask[60:140, 70:150].all() and not mask[:40].any()
    # Forcing brightfield on a dark image finds nothing sensible as tissue background.
    bf, _ = detect_tissue(img, MPP, TissueParams(modality="brightfield"))
    assert not bf[:40].all()


def test_fixed_threshold_overrides_otsu():
    img = glass()
    img[50:250, 100:300] = textured(200, 200)
    mask, info = detect_tissue(img, MPP, TissueParams(threshold=250))
    assert info["threshold"] == 250 and not mask.any()


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        detect_tissue(np.zeros((10, 10), np.uint8), MPP)
    with pytest.raises(ValueError):
        detect_tissue(glass(), 0.0)


def test_remove_small_objects_keeps_border_components_when_asked():
    m = np.zeros((10, 10), bool)
    m[0, 0] = True
    m[5, 5] = True
    assert not remove_small_objects(m, 2).any()
    kept = remove_small_objects(m, 2, keep_border=True)
    assert kept[0, 0] and not kept[5, 5]
