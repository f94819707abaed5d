"""Segmentation metrics on label images and GeoJSON."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from shapely.geometry import box

from wsi_amr.evaluation import EvaluationError, evaluate_pair
from wsi_amr.geojson import PathClass, make_feature, write_geojson
from wsi_amr.metrics import confusion_matrix, scores_from_confusion


def test_dice_and_iou_from_counts():
    ref = np.zeros((10, 10), np.int32)
    pred = np.zeros((10, 10), np.int32)
    ref[:5] = 1  # 50 px
    pred[:4] = 1  # 40 px, all inside
    s = scores_from_confusion(confusion_matrix(pred, ref, 2), ["Gland"])
    assert s.dice == [pytest.approx(80 / 90)] and s.iou == [pytest.approx(40 / 50)]


def test_absent_class_counts_as_perfect_and_missed_class_as_zero():
    ref = np.zeros((4, 4), np.int32)
    ref[0, 0] = 2
    pred = np.zeros((4, 4), np.int32)
    s = scores_from_confusion(confusion_matrix(pred, ref, 3), ["A", "B"])
    assert s.dice == [1.0, 0.0]


def test_label_images_binary_255_and_geojson_agree(tmp_path):
    mask = np.zeros((60, 80), np.uint8)
    mask[10:30, 20:50] = 255
    cv2.imwrite(str(tmp_path / "ref.png"), mask)
    cls = PathClass("Gland", (0, 160, 0))
    write_geojson(tmp_path / "pred.geojson", [make_feature(box(20, 10, 50, 30), classification=cls)])
    s, _ = evaluate_pair(tmp_path / "pred.geojson", tmp_path / "ref.png")
    assert s.classes == ["Gland"] and s.dice == [1.0]
    write_geojson(tmp_path / "half.geojson", [make_feature(box(20, 10, 35, 30), classification=cls)])
    s, _ = evaluate_pair(tmp_path / "half.geojson", tmp_path / "ref.png")
    assert s.dice[0] == pytest.approx(2 * 300 / (600 + 300))


def test_two_geojson_files_at_a_downsample(tmp_path):
    cls = PathClass("Gland", (0, 160, 0))
    write_geojson(tmp_path / "a.geojson", [make_feature(box(0, 0, 400, 400), classification=cls)])
    write_geojson(tmp_path / "b.geojson", [make_feature(box(0, 0, 400, 200), classification=cls)])
    s, _ = evaluate_pair(tmp_path / "a.geojson", tmp_path / "b.geojson", downsample=4)
    assert s.dice[0] == pytest.approx(2 * 0.5 / 1.5)


def test_mismatched_sizes_and_missing_files_are_clear_errors(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((10, 10), np.uint8))
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((12, 10), np.uint8))
    with pytest.raises(EvaluationError, match="10x12"):
        evaluate_pair(tmp_path / "b.png", tmp_path / "a.png")
    with pytest.raises(EvaluationError, match="no such file"):
        evaluate_pair(tmp_path / "x.png", tmp_path / "a.png")
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(EvaluationError, match="bad.geojson"):
        evaluate_pair(tmp_path / "bad.geojson", tmp_path / "a.png")
