"""`wsi-amr evaluate`: pairs of files or folders, table and JSON, and bad input."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from conftest import invoke
from shapely.geometry import box

from wsi_amr.geojson import PathClass, make_feature, write_geojson

pytestmark = pytest.mark.slow  # runs the CLI or trains: not in `make test-fast`


def _mask(path, rows, cols, shape=(60, 80)):
    m = np.zeros(shape, np.uint8)
    m[rows, cols] = 255
    cv2.imwrite(str(path), m)
    return path


def test_two_files_give_dice_and_iou_as_json(tmp_path, runner):
    ref = _mask(tmp_path / "ref.png", slice(10, 30), slice(20, 50))  # 600 px
    pred = _mask(tmp_path / "pred.png", slice(10, 30), slice(20, 35))  # 300 px inside
    res = invoke(runner, "evaluate", pred, ref, "--classes", "Gland", "--json")
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert lines[0]["dice"]["Gland"] == round(600 / 900, 6) and lines[0]["iou"]["Gland"] == 0.5
    assert lines[-1]["name"] == "all" and lines[-1]["pairs"] == 1


def test_folders_are_matched_by_stem_and_geojson_meets_label_images(tmp_path, runner):
    (tmp_path / "pred" / "a").mkdir(parents=True)
    (tmp_path / "ref").mkdir()
    _mask(tmp_path / "ref" / "a.png", slice(10, 30), slice(20, 50))
    _mask(tmp_path / "ref" / "b.png", slice(0, 10), slice(0, 10))
    _mask(tmp_path / "ref" / "only-ref.png", slice(0, 10), slice(0, 10))
    # a: a GeoJSON prediction in OUT/<stem>/<stem>.geojson, exact; b: a label image, empty.
    write_geojson(tmp_path / "pred" / "a" / "a.geojson",
                  [make_feature(box(20, 10, 50, 30), classification=PathClass("Gland", (0, 160, 0)))])
    cv2.imwrite(str(tmp_path / "pred" / "b.png"), np.zeros((60, 80), np.uint8))
    res = invoke(runner, "evaluate", tmp_path / "pred", tmp_path / "ref", "--json")
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in map(json.loads, res.stdout.splitlines())}
    assert rows["a"]["dice"] == {"Gland": 1.0} and rows["b"]["dice"] == {"Gland": 0.0}
    assert rows["all"]["mean_dice_per_pair"] == 0.5
    assert rows["all"]["dice"]["Gland"] == round(2 * 600 / (600 + 700), 6)  # pooled pixels
    assert "only-ref: on one side only" in res.stderr
    table = invoke(runner, "evaluate", tmp_path / "pred", tmp_path / "ref")
    assert table.exit_code == 0 and "mean Dice" in table.stdout and "2 pairs" in table.stdout


def test_bad_input_is_one_line(tmp_path, runner):
    ref = _mask(tmp_path / "ref.png", slice(10, 30), slice(20, 50))
    small = _mask(tmp_path / "small.png", slice(0, 5), slice(0, 5), shape=(30, 40))
    res = invoke(runner, "evaluate", small, ref)
    assert res.exit_code == 1 and "40x30" in res.stderr and "80x60" in res.stderr
    res = invoke(runner, "evaluate", tmp_path / "missing.png", ref)
    assert res.exit_code == 1 and "no such file" in res.stderr
    res = invoke(runner, "evaluate", tmp_path, ref)
    assert res.exit_code == 1 and "two files or two folders" in res.stderr
    res = invoke(runner, "evaluate", ref, ref, "--classes", "Gland,Gland")
    assert res.exit_code == 2 and "--classes" in res.stderr
    res = invoke(runner, "evaluate", ref, ref, "--size", "big")
    assert res.exit_code == 2 and "WIDTHxHEIGHT" in res.stderr
    (tmp_path / "empty").mkdir()
    res = invoke(runner, "evaluate", tmp_path / "empty", tmp_path / "empty")
    assert res.exit_code == 1 and "no file" in res.stderr
