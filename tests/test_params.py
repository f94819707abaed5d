"""Job parameters: typed, frozen, checked once, named by field in the library and by flag in the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from wsi_amr.cli import app
from wsi_amr.ips.config import ClassifyParams
from wsi_amr.labels import MaskRef
from wsi_amr.params import ParameterError, flag_text
from wsi_amr.quadtree import QuadtreeJobParams, QuadtreeParams
from wsi_amr.segmentation.config import SegmentParams
from wsi_amr.tiling import TileParams
from wsi_amr.tissue import TissueParams


def _examples(tmp_path):
    mask = tmp_path / "mask.png"
    mask.write_bytes(b"not read here")
    return [
        TissueParams(modality="brightfield", threshold=20.0),
        TileParams(),
        TileParams(tissue=None, magnification=20.0, size=512, overlap=32, image_format="jpg"),
        QuadtreeJobParams(),
        QuadtreeJobParams(tree=QuadtreeParams(min_size=8, max_tokens=100), tissue=None, mask=MaskRef.of(mask)),
        SegmentParams("model.safetensors"),
        SegmentParams("model.safetensors", "abc", context=256, shifts=(0, 128), object_type="detection"),
        ClassifyParams("ips.safetensors", features="/data/features", top=10),
    ]


def test_every_job_parameter_set_round_trips_through_the_manifest_json(tmp_path):
    for params in _examples(tmp_path):
        stored = json.loads(json.dumps(params.as_dict()))
        assert type(params).from_dict(stored) == params, type(params).__name__


def test_parameters_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TileParams().size = 1  # type: ignore[misc]


def test_defaults_are_filled_in_once():
    assert TileParams().mpp == 0.5 and TileParams(magnification=20).mpp is None
    assert TileParams(image_format="jpg").image_format == "jpeg"


@pytest.mark.parametrize(("make", "field"), [
    (lambda: TileParams(size=0), "size"),
    (lambda: TileParams(overlap=256, size=256), "overlap"),
    (lambda: TileParams(min_tissue=1.5), "min_tissue"),
    (lambda: TileParams(mpp=0.5, magnification=20), "mpp"),
    (lambda: TileParams(mpp=-1), "mpp"),
    (lambda: TileParams(image_format="gif"), "image_format"),
    (lambda: TissueParams(modality="xray"), "modality"),
    (lambda: TissueParams(threshold=300), "threshold"),
    (lambda: TissueParams(min_area_um2=-1), "min_area_um2"),
    (lambda: QuadtreeParams(min_size=6), "min_size"),
    (lambda: QuadtreeJobParams(token_size=6), "token_size"),
    (lambda: QuadtreeJobParams(window=100), "window"),
    (lambda: SegmentParams("m", window=32), "window"),
    (lambda: SegmentParams("m", patching="random"), "patching"),
    (lambda: SegmentParams("m", context=0, shifts=(0, 64)), "shifts"),
    (lambda: SegmentParams("m", context=128, shifts=(0, 128)), "shifts"),
    (lambda: ClassifyParams("m", top=0), "top"),
    (lambda: ClassifyParams("m", encoder="e.pt", features="f"), "encoder"),
])
def test_a_bad_value_is_a_value_error_naming_its_field_and_no_flag(make, field):
    with pytest.raises(ParameterError) as info:
        make()
    assert isinstance(info.value, ValueError)
    assert field in info.value.fields and field in str(info.value)
    assert "--" not in str(info.value)


def test_a_missing_mask_is_refused_by_name(tmp_path):
    with pytest.raises(ParameterError, match="no such file"):
        MaskRef.of(tmp_path / "absent.png")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ParameterError, match="label image"):
        MaskRef.of(tmp_path / "m.txt")


def test_the_cli_names_the_flag_of_the_refused_field():
    exc = ParameterError("min_area_um2 must not be negative, got -1", "min_area_um2")
    assert flag_text(exc, {"min_area_um2": "--min-area"}) == "--min-area must not be negative, got -1"
    exc = ParameterError("min_size (64) is larger than max_size (32)", "min_size", "max_size")
    assert flag_text(exc) == "--min-size (64) is larger than --max-size (32)"


@pytest.mark.parametrize(("args", "needle"), [
    (["tile", "x.svs", "--min-tissue", "2"], "--min-tissue must be between 0 and 1, got 2.0"),
    (["tile", "x.svs", "--size", "64", "--overlap", "64"], "--overlap (64) must be from 0 to below --size (64)"),
    (["tissue", "x.svs", "--min-area", "-5"], "--min-area must not be negative"),
    (["tissue", "x.svs", "--tissue-threshold", "400"], "--tissue-threshold must be between 0 and 255"),
    (["quadtree", "x.svs", "--blur", "4"], "--blur must be 0, 1 or an odd number"),
    (["quadtree", "x.svs", "--window", "1000"], "--window (1000) must be a positive multiple of --max-size"),
])
def test_cli_usage_errors_are_one_line_with_the_flag_and_exit_2(args, needle):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines == [f"error: {lines[0][7:]}"] and needle in lines[0]
