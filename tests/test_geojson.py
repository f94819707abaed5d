"""QuPath GeoJSON: features QuPath 0.6+ imports, and reading what QuPath exports."""

from __future__ import annotations

import copy
import gzip
import json
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon, box, mapping, shape

from wsi_amr.geojson import (
    GeoJSONError,
    PathClass,
    clean_geometry,
    make_box_feature,
    make_feature,
    read_geojson,
    validate_feature,
    validate_geojson,
    write_geojson,
)

TUMOR = PathClass("Tumor", (200, 0, 0))
BOWTIE = Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
HOLE_OUTSIDE = Polygon([(0, 0), (10, 0), (10, 10), (0, 10)], [[(20, 20), (25, 20), (25, 25), (20, 25)]])
SPUR = Polygon([(0, 0), (10, 0), (10, 10), (5, 10), (5, 15), (5, 10), (0, 10)])
SLIVER = Polygon([(0, 0), (10, 0), (10, 0.001)])  # valid, but nothing left on a 0.01 px grid


def _raw_feature(geom: Any, **properties: Any) -> dict[str, Any]:
    """A feature dict that bypasses make_feature, as other code might hand to the writer."""
    return {
        "type": "Feature",
        "geometry": mapping(geom) if geom is not None else None,
        "properties": {"objectType": "annotation", **properties},
    }


def _load(path: Path) -> dict[str, Any]:
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    return json.loads(raw)


def _same(a: Any, b: Any, tol: float = 0.01) -> bool:
    return bool(shapely.equals_exact(shapely.normalize(a), shapely.normalize(b), tolerance=tol))


# --------------------------------------------------------------------------- clean_geometry


def test_clean_geometry_splits_a_bowtie_into_valid_triangles() -> None:
    fixed = clean_geometry(BOWTIE)
    assert fixed is not None and fixed.is_valid
    assert isinstance(fixed, MultiPolygon) and len(fixed.geoms) == 2
    assert fixed.area == pytest.approx(50.0)


def test_clean_geometry_ignores_a_hole_outside_its_shell() -> None:
    fixed = clean_geometry(HOLE_OUTSIDE)
    assert fixed is not None and fixed.equals(box(0, 0, 10, 10))


def test_clean_geometry_removes_a_zero_width_spur() -> None:
    fixed = clean_geometry(SPUR)
    assert fixed is not None and fixed.equals(box(0, 0, 10, 10))
    assert (5.0, 15.0) not in list(fixed.exterior.coords)


def test_clean_geometry_drops_what_collapses_on_the_grid_and_non_polygons() -> None:
    assert clean_geometry(SLIVER) is None
    assert clean_geometry(shapely.Point(1, 2)) is None
    assert clean_geometry(Polygon()) is None
    assert clean_geometry(None) is None


def test_clean_geometry_keeps_polygons_of_a_collection_and_merges_overlaps() -> None:
    line = shapely.LineString([(5, 5), (6, 6)])
    collection = shapely.GeometryCollection([box(0, 0, 2, 2), box(1, 1, 3, 3), line])
    fixed = clean_geometry(collection)
    assert isinstance(fixed, Polygon) and fixed.area == pytest.approx(7.0)


def test_clean_geometry_returns_valid_on_grid_input_unchanged() -> None:
    poly = Polygon([(3.12, 1.5), (10.01, 0), (10, 10.37), (0, 10)])
    assert clean_geometry(poly) is poly


def test_clean_geometry_snaps_to_the_grid() -> None:
    fixed = clean_geometry(Polygon([(0.001, 0), (10.004, 0), (10, 10.0071)]))
    assert fixed is not None
    assert _same(fixed, Polygon([(0, 0), (10, 0), (10, 10.01)]), tol=1e-9)


# --------------------------------------------------------------------------- make_feature


def test_make_feature_has_the_shape_qupath_reads() -> None:
    f = make_feature(box(0, 0, 4, 4), classification=TUMOR, name="r1", measurements={"area": 16.0})
    assert f is not None
    assert f["type"] == "Feature"
    assert uuid.UUID(f["id"]).version == 4
    assert f["properties"] == {
        "objectType": "annotation",
        "classification": {"name": "Tumor", "color": [200, 0, 0]},
        "name": "r1",
        "measurements": {"area": 16.0},
    }
    assert "objectType" not in f
    assert validate_feature(f) == []


def test_make_feature_omits_what_was_not_given() -> None:
    f = make_feature(box(0, 0, 1, 1), object_type="detection", measurements={})
    assert f is not None and f["properties"] == {"objectType": "detection"}


def test_make_feature_rounds_coordinates_to_two_decimals() -> None:
    f = make_feature(Polygon([(0.123456, 0), (10.98765, 0), (5, 7.3333333)]))
    assert f is not None
    coords = [c for ring in f["geometry"]["coordinates"] for xy in ring for c in xy]
    assert all(round(c, 2) == c for c in coords) and 10.99 in coords


def test_make_feature_repairs_and_returns_none_when_nothing_survives() -> None:
    f = make_feature(BOWTIE)
    assert f is not None and shape(f["geometry"]).is_valid
    assert make_feature(SLIVER) is None


def test_make_feature_drops_non_finite_measurements_and_converts_numpy() -> None:
    f = make_feature(
        box(0, 0, 1, 1),
        measurements={
            "nan": float("nan"),
            "inf": np.inf,
            "none": None,
            "f32": np.float32(0.25),
            "i64": np.int64(3),
        },
    )
    assert f is not None
    assert f["properties"]["measurements"] == {"f32": 0.25, "i64": 3.0}
    assert all(type(v) is float for v in f["properties"]["measurements"].values())
    only_nan = make_feature(box(0, 0, 1, 1), measurements={"nan": float("nan")})
    assert only_nan is not None and "measurements" not in only_nan["properties"]


@pytest.mark.parametrize("value", [True, np.bool_(False), "1.0", [1.0]])
def test_make_feature_rejects_non_numeric_measurements(value: Any) -> None:
    with pytest.raises(TypeError, match="measurement"):
        make_feature(box(0, 0, 1, 1), measurements={"m": value})


def test_make_feature_rejects_unknown_object_type_and_bad_id() -> None:
    with pytest.raises(ValueError, match="object_type"):
        make_feature(box(0, 0, 1, 1), object_type="tile")
    with pytest.raises(ValueError, match="UUID"):
        make_feature(box(0, 0, 1, 1), feature_id="roi-1")
    fid = str(uuid.uuid4())
    f = make_feature(box(0, 0, 1, 1), feature_id=fid)
    assert f is not None and f["id"] == fid


@pytest.mark.parametrize("corners", [(0, 0, 256, 256), (1024, 2048, 1341.44, 2365.44), (0.123456, 7.005001, 10.98765, 9.9)])
def test_make_box_feature_is_make_feature_of_a_box(corners: tuple[float, float, float, float]) -> None:
    fast = make_box_feature(*corners, object_type="detection", classification=TUMOR, measurements={"a": 0.5})
    slow = make_feature(box(*corners), object_type="detection", classification=TUMOR, measurements={"a": 0.5})
    assert fast is not None and slow is not None
    assert fast["properties"] == slow["properties"] and uuid.UUID(fast["id"]).version == 4
    assert shapely.equals_exact(shapely.normalize(shape(fast["geometry"])), shapely.normalize(shape(slow["geometry"])),
                                tolerance=1e-9)
    if all(round(c, 2) == c for c in corners):  # on the grid: the very same JSON, vertex order included
        assert fast["geometry"] == slow["geometry"]
    assert validate_feature(fast) == []


def test_make_box_feature_drops_what_is_empty_at_a_hundredth_of_a_pixel() -> None:
    assert make_box_feature(0, 0, 0.004, 10) is None and make_feature(box(0, 0, 0.004, 10)) is None
    assert make_box_feature(5, 5, 5, 6) is None and make_box_feature(0, 0, float("inf"), 1) is None
    with pytest.raises(TypeError, match="measurement"):
        make_box_feature(0, 0, 1, 1, measurements={"m": "1.0"})


@pytest.mark.parametrize("color", [(256, 0, 0), (1, 2), (1.0, 2, 3), (True, 0, 0), "red"])
def test_path_class_requires_a_valid_color(color: Any) -> None:
    with pytest.raises(ValueError, match="color"):
        PathClass("Tumor", color)


def test_path_class_normalises_numpy_channels() -> None:
    assert PathClass("Stroma", np.array([10, 20, 30])).color == (10, 20, 30)


# --------------------------------------------------------------------------- write_geojson


def test_write_repairs_invalid_geometries_and_counts_them(tmp_path: Path) -> None:
    out = tmp_path / "repaired.geojson"
    report = write_geojson(out, [_raw_feature(BOWTIE), _raw_feature(HOLE_OUTSIDE), _raw_feature(SPUR)])
    assert (report.written, report.repaired, report.dropped) == (3, 3, 0)
    geoms = [shape(f["geometry"]) for f in _load(out)["features"]]
    assert geoms[0].area == pytest.approx(50.0)
    assert geoms[1].equals(box(0, 0, 10, 10)) and geoms[2].equals(box(0, 0, 10, 10))
    assert validate_geojson(out) == []


def test_write_drops_geometries_that_collapse_or_are_missing(tmp_path: Path) -> None:
    out = tmp_path / "dropped.geojson"
    good = make_feature(box(0, 0, 5, 5))
    report = write_geojson(out, [_raw_feature(SLIVER), _raw_feature(None), good])
    assert (report.written, report.repaired, report.dropped) == (1, 0, 2)
    assert _load(out)["features"] == [good]
    assert validate_geojson(out) == []


def test_write_is_compact_streaming_json_of_a_feature_collection(tmp_path: Path) -> None:
    out = tmp_path / "objects.geojson"
    features = (make_feature(box(i, 0, i + 1, 1), object_type="detection") for i in range(5))
    report = write_geojson(out, features)
    text = out.read_text()
    assert report.written == 5
    assert text.startswith('{"type":"FeatureCollection","features":[{')
    assert "\n" not in text.rstrip("\n") and ": " not in text
    data = json.loads(text)
    assert len(data["features"]) == 5
    for f in data["features"]:
        assert f["properties"]["objectType"] == "detection" and "objectType" not in f
    ids = [f["id"] for f in data["features"]]
    assert len(set(ids)) == 5 and all(uuid.UUID(i) for i in ids)
    assert validate_geojson(out) == []


def test_write_never_writes_nan(tmp_path: Path) -> None:
    out = tmp_path / "m.geojson"
    measurements = {"a": float("nan"), "b": np.float64(2.5)}
    write_geojson(out, [make_feature(box(0, 0, 1, 1), measurements=measurements)])
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert _load(out)["features"][0]["properties"]["measurements"] == {"b": 2.5}
    # A NaN that bypassed make_feature fails loudly and leaves no file, not one QuPath rejects.
    bad = tmp_path / "bad.geojson"
    with pytest.raises(ValueError):
        write_geojson(bad, [_raw_feature(box(0, 0, 1, 1), measurements={"a": float("nan")})])
    assert not bad.exists() and list(tmp_path.iterdir()) == [out]


def test_write_serialises_numpy_measurements_as_numbers(tmp_path: Path) -> None:
    out = tmp_path / "np.geojson"
    feature = _raw_feature(box(0, 0, 1, 1), measurements={"f": np.float32(0.5), "i": np.int32(4)})
    write_geojson(out, [feature])
    assert _load(out)["features"][0]["properties"]["measurements"] == {"f": 0.5, "i": 4}


def test_write_gz_is_gzipped_and_reads_back(tmp_path: Path) -> None:
    out = tmp_path / "cells.geojson.gz"
    write_geojson(out, [make_feature(box(0, 0, 3, 3), classification=TUMOR, object_type="detection")])
    assert out.read_bytes()[:2] == b"\x1f\x8b"
    (obj,) = read_geojson(out)
    assert obj.geometry.equals(box(0, 0, 3, 3))
    assert (obj.class_name, obj.color) == ("Tumor", (200, 0, 0))
    assert obj.object_type == "detection"
    assert validate_geojson(out) == []
    plain = tmp_path / "plain.geojson.gz"
    write_geojson(plain, [make_feature(box(0, 0, 1, 1))], gzip=False)
    assert plain.read_bytes()[:1] == b"{"


def test_write_failure_midway_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "partial.geojson"

    def features() -> Any:
        yield make_feature(box(0, 0, 1, 1))
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError):
        write_geojson(out, features())
    assert list(tmp_path.iterdir()) == []


def test_write_empty_collection_is_valid(tmp_path: Path) -> None:
    out = tmp_path / "empty.geojson"
    assert write_geojson(out, []).written == 0
    assert _load(out) == {"type": "FeatureCollection", "features": []}


# --------------------------------------------------------------------------- validate_feature


def _good() -> dict[str, Any]:
    return {
        "type": "Feature",
        "id": "7a7f4f0e-3b7e-4f53-9d1c-8f0a3f2d9e11",
        "geometry": mapping(box(0, 0, 10, 10)),
        "properties": {
            "objectType": "annotation",
            "name": "region",
            "classification": {"name": "Tumor", "color": [200, 0, 0]},
            "measurements": {"area": 100.0, "count": 3},
        },
    }


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    *parents, key = path.split(".")

    def apply(f: dict[str, Any]) -> None:
        for p in parents:
            f = f[p]
        f[key] = value

    return apply


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    *parents, key = path.split(".")

    def apply(f: dict[str, Any]) -> None:
        for p in parents:
            f = f[p]
        del f[key]

    return apply


COLOR = "properties.classification.color"
AREA = "properties.measurements.area"
BAD_FEATURES = {
    "not_a_feature": (_set("type", "FeatureCollection"), "not a GeoJSON Feature"),
    "geometry_missing": (_delete("geometry"), "geometry is missing"),
    "geometry_null": (_set("geometry", None), "geometry is missing or null"),
    "geometry_not_object": (_set("geometry", "POLYGON ((0 0, 1 0, 1 1, 0 0))"), "not a GeoJSON geometry"),
    "geometry_empty": (_set("geometry", {"type": "Polygon", "coordinates": []}), "geometry is empty"),
    "geometry_type": (
        _set("geometry", {"type": "GeometryCollection", "geometries": []}),
        "geometry type",
    ),
    "geometry_unparsable": (
        _set("geometry", {"type": "Polygon", "coordinates": [[1, 2]]}),
        "cannot be parsed",
    ),
    # shapely closes an open ring silently; the geojson package's RFC 7946 check (and QuPath) does not.
    "ring_not_closed": (
        _set("geometry", {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10]]]}),
        "must end where it started",
    ),
    "geometry_self_intersecting": (_set("geometry", mapping(BOWTIE)), "geometry is invalid"),
    "geometry_hole_outside": (_set("geometry", mapping(HOLE_OUTSIDE)), "geometry is invalid"),
    "geometry_spur": (_set("geometry", mapping(SPUR)), "geometry is invalid"),
    "geometry_collapses_on_grid": (_set("geometry", mapping(SLIVER)), "collapses"),
    "properties_missing": (_delete("properties"), "properties is null"),
    "properties_null": (_set("properties", None), "properties is null"),
    "object_type_missing": (_delete("properties.objectType"), "objectType is missing"),
    "object_type_null": (_set("properties.objectType", None), "objectType is missing or null"),
    "object_type_unknown": (_set("properties.objectType", "tile"), "objectType 'tile'"),
    "object_type_at_feature_level": (_set("objectType", "annotation"), "Feature level"),
    "classification_without_color": (_delete("properties.classification.color"), "no color"),
    "classification_color_range": (_set(COLOR, [256, 0, 0]), "not 3 integers"),
    "classification_color_length": (_set(COLOR, [1, 2]), "not 3 integers"),
    "classification_color_float": (_set(COLOR, [1.5, 2, 3]), "not 3 integers"),
    "classification_without_name": (_delete("properties.classification.name"), "no name"),
    "classification_null": (_set("properties.classification", None), "classification is null"),
    "measurements_list": (
        _set("properties.measurements", [{"name": "a", "value": 1}]),
        "measurements is a list",
    ),
    "measurement_nan": (_set(AREA, float("nan")), "not finite numbers: 'area'"),
    "measurement_null": (_set(AREA, None), "not finite numbers: 'area'"),
    "measurement_string": (_set(AREA, "1"), "not finite numbers: 'area'"),
    "measurement_bool": (_set(AREA, True), "not finite numbers: 'area'"),
    "id_not_uuid": (_set("id", "PathAnnotationObject"), "not a UUID"),
    "id_number": (_set("id", 42), "not a UUID"),
    "id_null": (_set("id", None), "not a UUID"),
    "name_null": (_set("properties.name", None), "name is null"),
    "name_number": (_set("properties.name", 3), "name is a int"),
}


def test_validate_feature_accepts_a_good_feature_and_other_geometry_types() -> None:
    assert validate_feature(_good()) == []
    for geom in (
        shapely.Point(1, 2),
        shapely.LineString([(0, 0), (5, 5)]),
        shapely.MultiPoint([(0, 0), (1, 1)]),
    ):
        f = _good()
        f["geometry"] = mapping(geom)
        assert validate_feature(f) == []


@pytest.mark.parametrize("case", sorted(BAD_FEATURES))
def test_validate_feature_flags(case: str) -> None:
    breaker, expected = BAD_FEATURES[case]
    feature = copy.deepcopy(_good())
    breaker(feature)
    problems = validate_feature(feature)
    assert any(expected in p for p in problems), problems


def test_validate_geojson_prefixes_feature_index_and_flags_duplicate_ids(tmp_path: Path) -> None:
    bad = _good()
    bad["properties"]["classification"] = {"name": "Tumor"}
    path = tmp_path / "mixed.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [_good(), bad]}))
    problems = validate_geojson(path)
    assert problems[0].startswith("feature 1: classification has no color")
    assert problems[-1] == f"feature 1: duplicate id {bad['id']}"


def test_validate_geojson_reports_a_file_that_is_not_features(tmp_path: Path) -> None:
    path = tmp_path / "geometry.json"
    path.write_text(json.dumps(mapping(box(0, 0, 1, 1))))
    (problem,) = validate_geojson(path)
    assert problem.startswith("file: ") and "not GeoJSON features" in problem


# --------------------------------------------------------------------------- read_geojson

QUPATH_04_EXPORT = """
{
  "type": "FeatureCollection",
  "features": [
    {
      "type": "Feature",
      "id": "0f1c4d3e-2a5b-4c6d-8e9f-0a1b2c3d4e5f",
      "geometry": {
        "type": "Polygon",
        "coordinates": [
          [[1000, 1000], [3000, 1000], [3000, 2500], [1000, 2500], [1000, 1000]],
          [[1500, 1500], [2000, 1500], [2000, 2000], [1500, 2000], [1500, 1500]]
        ]
      },
      "properties": {
        "objectType": "annotation",
        "name": "Region 1",
        "classification": {"name": "Tumor", "color": [200, 0, 0]},
        "isLocked": false
      }
    },
    {
      "type": "Feature",
      "id": "1a2b3c4d-5e6f-4a1b-9c2d-3e4f5a6b7c8d",
      "geometry": {
        "type": "MultiPolygon",
        "coordinates": [
          [[[4000.5, 100.25], [4200, 100.25], [4200, 300], [4000.5, 300], [4000.5, 100.25]]],
          [[[5000, 100], [5100, 100], [5050, 250.75], [5000, 100]]]
        ]
      },
      "properties": {
        "objectType": "annotation",
        "classification": {"name": "Stroma", "color": [150, 200, 150]}
      }
    },
    {
      "type": "Feature",
      "id": "2b3c4d5e-6f7a-4b1c-8d2e-4f5a6b7c8d9e",
      "geometry": {"type": "Polygon", "coordinates": [[[10, 10], [20, 10], [20, 20], [10, 10]]]},
      "properties": {
        "objectType": "detection",
        "measurements": {"Nucleus: Area": 50.5, "Missing": NaN}
      }
    }
  ]
}
"""


def test_read_qupath_04_feature_collection(tmp_path: Path) -> None:
    path = tmp_path / "export.geojson"
    path.write_text(QUPATH_04_EXPORT)
    tumor, stroma, det = read_geojson(path)
    assert isinstance(tumor.geometry, Polygon) and len(tumor.geometry.interiors) == 1
    assert tumor.geometry.area == 2000 * 1500 - 500 * 500
    assert (tumor.class_name, tumor.color, tumor.name) == ("Tumor", (200, 0, 0), "Region 1")
    assert tumor.object_type == "annotation"
    assert tumor.properties["isLocked"] is False
    assert isinstance(stroma.geometry, MultiPolygon) and len(stroma.geometry.geoms) == 2
    assert (stroma.class_name, stroma.color, stroma.name) == ("Stroma", (150, 200, 150), None)
    assert det.object_type == "detection" and det.class_name is None and det.color is None
    assert det.measurements["Nucleus: Area"] == 50.5 and math.isnan(det.measurements["Missing"])


def test_read_bare_list_and_single_feature(tmp_path: Path) -> None:
    feature = _raw_feature(box(0, 0, 2, 2))
    bare = tmp_path / "list.geojson"
    bare.write_text(json.dumps([feature, feature]))
    assert len(read_geojson(bare)) == 2
    single = tmp_path / "one.json"
    single.write_text(json.dumps(feature))
    (obj,) = read_geojson(single)
    assert obj.geometry.equals(box(0, 0, 2, 2)) and obj.class_name is None


def test_read_old_style_packed_color_and_legacy_fields(tmp_path: Path) -> None:
    path = tmp_path / "old.geojson"
    path.write_text(
        json.dumps(
            [
                {
                    "type": "Feature",
                    "id": "PathAnnotationObject",
                    "geometry": mapping(box(0, 0, 5, 5)),
                    "properties": {
                        "classification": {"name": "Tumor", "colorRGB": -3670016},
                        "isLocked": True,
                        "measurements": [{"name": "Area", "value": 25.0}],
                    },
                },
                {
                    "type": "Feature",
                    "id": "PathDetectionObject",
                    "geometry": mapping(box(0, 0, 1, 1)),
                    "properties": {},
                },
                {"type": "Feature", "geometry": mapping(box(0, 0, 1, 1)), "properties": None},
            ]
        )
    )
    ann, det, bare = read_geojson(path)
    assert (ann.class_name, ann.color, ann.object_type) == ("Tumor", (200, 0, 0), "annotation")
    assert ann.measurements == {"Area": 25.0}
    assert det.object_type == "detection"
    assert bare.object_type == "annotation" and bare.properties == {}


def test_read_derived_class_names(tmp_path: Path) -> None:
    path = tmp_path / "derived.geojson"
    feature = {
        "type": "Feature",
        "geometry": mapping(box(0, 0, 1, 1)),
        "properties": {
            "objectType": "cell",
            "classification": {"names": ["Tumor", "Positive"], "color": [1, 2, 3]},
        },
    }
    path.write_text(json.dumps(feature))
    (obj,) = read_geojson(path)
    assert (obj.class_name, obj.color) == ("Tumor: Positive", (1, 2, 3))


def test_read_repairs_invalid_and_skips_unusable_geometry_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "messy.geojson"
    features = [
        _raw_feature(BOWTIE),
        {"type": "Feature", "geometry": None, "properties": {}},
        {"type": "Feature", "geometry": mapping(Polygon([(0, 0), (1, 1), (0, 0)])), "properties": {}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": "junk"}, "properties": {}},
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with pytest.warns(UserWarning, match="skipped 3 features"):
        (obj,) = read_geojson(path)
    assert obj.geometry.is_valid and obj.geometry.area == pytest.approx(50.0)


def test_round_trip_read_write_read_keeps_geometry_and_classes(tmp_path: Path) -> None:
    source = tmp_path / "export.geojson"
    source.write_text(QUPATH_04_EXPORT)
    first = read_geojson(source)
    features = [
        make_feature(
            o.geometry,
            object_type=o.object_type,
            classification=PathClass(o.class_name, o.color) if o.class_name and o.color else None,
            name=o.name,
            measurements=o.measurements,
        )
        for o in first
    ]
    out = tmp_path / "again.geojson.gz"
    report = write_geojson(out, features)
    assert (report.written, report.repaired, report.dropped) == (3, 0, 0)
    assert validate_geojson(out) == []
    second = read_geojson(out)
    assert len(second) == len(first)
    for a, b in zip(first, second):
        assert shapely.equals_exact(a.geometry, b.geometry, tolerance=0.01)
        for attr in ("class_name", "color", "name", "object_type"):
            assert getattr(a, attr) == getattr(b, attr)
    assert second[2].measurements == {"Nucleus: Area": 50.5}  # the NaN is not written back


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file"),
        (b"this is not json {", "not JSON"),
        (b"\x1f\x8b\x08 truncated gzip", "cannot read"),
        (b'{"hello": "world"}', "not GeoJSON features"),
        (b'{"type": "FeatureCollection", "features": {}}', "features"),
        (b"[1, 2, 3]", "not GeoJSON features"),
        (b"42", "not GeoJSON features"),
    ],
    ids=["missing", "not_json", "bad_gzip", "object", "features_not_list", "list_of_numbers", "number"],
)
def test_read_bad_input_raises_geojson_error_naming_the_file(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    path = tmp_path / "input_file.geojson"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(GeoJSONError) as info:
        read_geojson(path)
    message = str(info.value)
    assert "input_file.geojson" in message and expected in message and "\n" not in message


def test_made_features_are_trusted_only_while_their_geometry_is_untouched(tmp_path):
    from shapely.geometry import box as _box

    from wsi_amr.geojson import make_feature, validate_geojson, write_geojson

    good = make_feature(_box(0, 0, 10, 10))
    swapped = make_feature(_box(0, 0, 10, 10))
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    swapped["geometry"] = bowtie  # changed after it was made: checked and repaired again
    report = write_geojson(tmp_path / "a.geojson", [good, swapped])
    assert report.written == 2 and report.repaired == 1
    assert validate_geojson(tmp_path / "a.geojson") == []
