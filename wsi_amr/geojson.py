"""QuPath GeoJSON: write features QuPath 0.4-0.7 imports, read what QuPath exports.

Coordinates are level-0 pixels, y down, no CRS. QuPath imports a file all or nothing, and since 0.6
it snaps every geometry to a 0.01 px grid and rejects the file when a snapped geometry is invalid
or empty, so every geometry written here goes through :func:`clean_geometry` first.
See DESIGN.md section 5 for the rules this module enforces.
"""

from __future__ import annotations

import gzip as gzip_module
import json
import math
import numbers
import os
import uuid
import warnings
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, cast

import geojson
import numpy as np
import shapely
from shapely.errors import GEOSException, ShapelyError
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry

from wsi_amr.outputs import atomic_path
from wsi_amr.polygons import polygonal_parts

PathLike = Union[str, "os.PathLike[str]"]

#: QuPath's default grid (px) for geometries read from GeoJSON (0.6+).
QUPATH_GRID = 0.01
#: Decimals written for coordinates: the 0.01 px grid.
COORDINATE_DECIMALS = 2
OBJECT_TYPES = frozenset({"annotation", "detection", "cell"})
# Geometry types QuPath imports; we only write polygons, but points and lines are legal input.
GEOMETRY_TYPES = frozenset(
    {"Polygon", "MultiPolygon", "Point", "MultiPoint", "LineString", "MultiLineString"}
)
# QuPath 0.2/0.3 put the object's Java class into the Feature "id".
_LEGACY_OBJECT_TYPES = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
    "TMACoreObject": "tma_core",
}
_GZIP_MAGIC = b"\x1f\x8b"
# What shapely's shape() raises on malformed GeoJSON geometry.
_UNPARSABLE = (GEOSException, ShapelyError, ValueError, TypeError, KeyError, AttributeError, IndexError)


class GeoJSONError(ValueError):
    """A GeoJSON file cannot be read; the one-line message names the file and the problem."""


@dataclass(frozen=True)
class PathClass:
    """A QuPath classification: a name and its display colour (RGB, 0-255 each)."""

    name: str
    color: tuple[int, int, int]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"PathClass name must be a non-empty string, got {self.name!r}")
        try:
            rgb = tuple(_as_channel(c) for c in self.color)
        except (TypeError, ValueError):
            rgb = ()
        if len(rgb) != 3:
            raise ValueError(f"PathClass color must be 3 integers 0..255, got {self.color!r}")
        object.__setattr__(self, "color", rgb)  # normalise numpy ints and lists to a plain tuple

    def to_json(self) -> dict[str, Any]:
        """The ``properties.classification`` object QuPath 0.4+ reads."""
        return {"name": self.name, "color": list(self.color)}


def _as_channel(value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(value)
    if not 0 <= int(value) <= 255:
        raise ValueError(value)
    return int(value)


# --------------------------------------------------------------------------- geometry


def _join_polygons(parts: list[Polygon]) -> Polygon | MultiPolygon | None:
    """One Polygon or a valid MultiPolygon; overlapping or touching parts are merged."""
    parts = [p for p in parts if not p.is_empty]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    multi = MultiPolygon(parts)
    if multi.is_valid:
        return multi
    merged = polygonal_parts(shapely.union_all(parts))  # a union's parts never overlap
    if not merged:
        return None
    return merged[0] if len(merged) == 1 else MultiPolygon(merged)


def _repair(geom: BaseGeometry) -> Polygon | MultiPolygon | None:
    """Make a polygonal geometry valid: the area its shells enclose, minus its holes.

    Each shell and each hole ring is repaired on its own (a bowtie becomes two triangles, a
    zero-width spur disappears), then holes are subtracted from their shell. A hole lying outside
    its shell therefore removes nothing, where GEOS ``make_valid`` would turn it into extra area.
    Overlapping parts are merged. Lines and points are dropped.
    """
    pieces: list[Polygon] = []
    for poly in polygonal_parts(geom):
        shell = _valid_area(Polygon(poly.exterior.coords))
        if shell is None:
            continue
        repaired_holes = (_valid_area(Polygon(ring.coords)) for ring in poly.interiors)
        holes = [h for h in repaired_holes if h is not None]
        if holes:
            shell = shell.difference(shapely.union_all(holes))
        pieces.extend(polygonal_parts(shell))
    return _join_polygons(pieces)


def _valid_area(poly: Polygon) -> Polygon | MultiPolygon | None:
    """The valid polygonal area enclosed by a single ring, or None when it encloses none."""
    if poly.is_valid:
        return None if poly.is_empty else poly
    fixed = shapely.make_valid(poly, method="structure", keep_collapsed=False)
    return _join_polygons(polygonal_parts(fixed))


def _is_polygonal(geom: BaseGeometry) -> bool:
    return isinstance(geom, (Polygon, MultiPolygon))


def _snap(geom: BaseGeometry, grid: float) -> Polygon | MultiPolygon | None:
    """``set_precision`` the way QuPath does, keeping only a valid non-empty polygonal result."""
    try:
        snapped = shapely.set_precision(geom, grid)
    except (GEOSException, ShapelyError):
        return None
    result = _join_polygons(polygonal_parts(snapped))
    if result is None or result.is_empty or not result.is_valid:
        return None
    return result


def clean_geometry(
    geom: BaseGeometry | Mapping[str, Any] | None, grid: float | None = QUPATH_GRID
) -> Polygon | MultiPolygon | None:
    """Return a valid polygonal geometry that QuPath's grid snapping leaves non-empty and valid.

    Args:
        geom: a shapely geometry or a GeoJSON geometry mapping, in level-0 px.
        grid: QuPath's precision grid in px (0.01 for 0.6+). ``None`` or 0 only repairs validity,
            without snapping.

    Repairs with per-ring ``make_valid`` (see ``_repair``), keeps only polygonal parts (points and
    lines from GeometryCollections are dropped), snaps to ``grid`` with ``shapely.set_precision``
    (as QuPath does on import) and keeps the result only when it is valid and non-empty; a
    geometry on the grid is its own snapped form, so QuPath's snapping leaves it as it is. The
    input object is returned unchanged when it was already valid and on the grid (so vertex order
    survives a read-write round trip); otherwise the repaired, snapped geometry. ``None`` when
    nothing polygonal survives.
    """
    if geom is None:
        return None
    if isinstance(geom, Mapping):
        try:
            geom = cast(BaseGeometry, shape(geom))
        except _UNPARSABLE:
            return None
    g: BaseGeometry = geom
    if g.is_empty:
        return None
    if _is_polygonal(g) and g.is_valid:
        if grid and _on_grid(g, grid):
            return cast(Polygon | MultiPolygon, g)  # snapping would change nothing
        fixed: Polygon | MultiPolygon | None = cast(Polygon | MultiPolygon, g)
    else:
        fixed = _repair(g)
    if fixed is None or fixed.is_empty:
        return None
    if not grid:
        return fixed
    snapped = _snap(fixed, grid)
    if snapped is None:
        # Snapping can break a valid geometry in corner cases (slivers); repair and retry once.
        repaired = _repair(shapely.set_precision(fixed, grid, mode="pointwise"))
        snapped = _snap(repaired, grid) if repaired is not None else None
    if snapped is None:
        return None
    if fixed is g and _same_geometry(snapped, g):
        return cast(Polygon | MultiPolygon, g)
    return snapped


def _on_grid(geom: BaseGeometry, grid: float) -> bool:
    """All coordinates are multiples of ``grid`` (up to float noise)."""
    steps = shapely.get_coordinates(geom) / grid
    return bool(np.all(np.abs(steps - np.round(steps)) <= 1e-6))


def _same_geometry(a: BaseGeometry, b: BaseGeometry) -> bool:
    """Equal up to vertex order and float noise well below the 0.01 px grid."""
    return bool(shapely.equals_exact(shapely.normalize(a), shapely.normalize(b), tolerance=1e-6))


def _geometry_json(geom: BaseGeometry) -> dict[str, Any]:
    """GeoJSON geometry mapping with coordinates rounded to the 0.01 px grid."""
    rounded = shapely.transform(geom, lambda xy: np.round(xy, COORDINATE_DECIMALS))
    return json.loads(shapely.to_geojson(rounded))


# --------------------------------------------------------------------------- features


def _is_uuid(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _measurement_value(name: str, value: Any) -> float | None:
    """A finite float, None for a missing value (NaN, inf, None); TypeError for anything else."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.number)):
        raise TypeError(f"measurement {name!r} must be a number, got {type(value).__name__}")
    v = float(value)
    return v if math.isfinite(v) else None


def make_feature(
    geometry: BaseGeometry | Mapping[str, Any],
    *,
    object_type: str = "annotation",
    classification: PathClass | None = None,
    name: str | None = None,
    measurements: Mapping[str, float | None] | None = None,
    feature_id: str | None = None,
) -> dict[str, Any] | None:
    """Build one GeoJSON Feature the way QuPath reads it.

    Args:
        geometry: polygonal geometry (shapely or GeoJSON mapping) in level-0 px; it is cleaned
            with :func:`clean_geometry` and written with 2 decimals.
        object_type: ``"annotation"`` (few large editable regions), ``"detection"`` (many small
            objects; QuPath handles them faster) or ``"cell"``.
        classification: class name and colour; omitted when None.
        name: the object's name; omitted when None.
        measurements: name -> number. numpy scalars become floats; NaN, inf and None are left
            out (QuPath rejects them); bools and non-numbers raise TypeError.
        feature_id: a UUID string; a random UUID4 when None.

    Returns:
        The Feature dict, or None when the geometry has no valid polygonal area at 0.01 px.
    """
    properties = _properties(object_type, classification, name, measurements, feature_id)
    cleaned = clean_geometry(geometry)
    if cleaned is None:
        return None
    return _clean_feature(_geometry_json(cleaned), properties, feature_id)


def make_box_feature(
    x0: float,
    y0: float,
    x1: float,
    y1: float,
    *,
    object_type: str = "annotation",
    classification: PathClass | None = None,
    name: str | None = None,
    measurements: Mapping[str, float | None] | None = None,
    feature_id: str | None = None,
) -> dict[str, Any] | None:
    """The Feature :func:`make_feature` makes of ``shapely.geometry.box(x0, y0, x1, y1)``, built
    without shapely: an axis-aligned rectangle (level-0 px, ``x0 < x1``, ``y0 < y1``) is valid
    whenever it keeps some width and height on the 0.01 px grid, so it needs no repair. About 20x
    faster, for the hundreds of thousands of squares a tile or patch grid gives.

    Returns None when the rectangle is empty at 0.01 px (``make_feature`` drops it too). Other
    arguments as :func:`make_feature`.
    """
    properties = _properties(object_type, classification, name, measurements, feature_id)
    a, b, c, d = (round(float(v), COORDINATE_DECIMALS) for v in (x0, y0, x1, y1))
    if not (c > a and d > b) or not all(map(math.isfinite, (a, b, c, d))):
        return None
    # shapely's box ring: counter-clockwise (in x right, y up), from the (x1, y0) corner.
    ring = [[c, b], [c, d], [a, d], [a, b], [c, b]]
    return _clean_feature({"type": "Polygon", "coordinates": [ring]}, properties, feature_id)


def _properties(object_type: str, classification: PathClass | None, name: str | None,
                measurements: Mapping[str, float | None] | None, feature_id: str | None) -> dict[str, Any]:
    """A Feature's checked ``properties`` (the arguments of :func:`make_feature`)."""
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {sorted(OBJECT_TYPES)}, got {object_type!r}")
    if feature_id is not None and not _is_uuid(feature_id):
        raise ValueError(f"feature_id must be a UUID string, got {feature_id!r}")
    if classification is not None and not isinstance(classification, PathClass):
        raise TypeError(f"classification must be a PathClass, got {type(classification).__name__}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    properties: dict[str, Any] = {"objectType": object_type}
    if classification is not None:
        properties["classification"] = classification.to_json()
    if name is not None:
        properties["name"] = name
    if measurements:
        values = {}
        for key, value in measurements.items():
            v = _measurement_value(str(key), value)
            if v is not None:
                values[str(key)] = v
        if values:
            properties["measurements"] = values
    return properties


def _clean_feature(geometry_json: dict[str, Any], properties: dict[str, Any], feature_id: str | None) -> _CleanFeature:
    feature = _CleanFeature(type="Feature", id=feature_id if feature_id is not None else str(uuid.uuid4()),
                            geometry=geometry_json, properties=properties)
    feature.clean_geometry = geometry_json
    return feature


class _CleanFeature(dict):
    """A Feature from :func:`make_feature`: its geometry was cleaned when it was made, so the
    writer need not parse and check it again while it is still that same geometry object."""

    clean_geometry: Any = None


# --------------------------------------------------------------------------- writing


@dataclass
class WriteReport:
    """What :func:`write_geojson` did: features written, of which repaired, and dropped."""

    written: int
    repaired: int
    dropped: int


def _json_default(obj: Any) -> Any:
    # numpy values that slipped into properties; NaN still fails through allow_nan=False.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_geojson(
    path: PathLike, features: Iterable[dict[str, Any]], *, gzip: bool | None = None
) -> WriteReport:
    """Write features as a QuPath-importable FeatureCollection, atomically.

    Features are streamed one by one (a generator is fine; the file is never built in memory).
    Each geometry is checked again with :func:`clean_geometry`: a repaired one is written
    repaired, one with no valid area left (or none at all) is dropped, since a single bad
    geometry makes QuPath reject the whole file. Compact JSON; NaN or inf anywhere raise
    ValueError and leave no file behind.

    Args:
        path: output file, ``.geojson`` or ``.geojson.gz``.
        features: Feature dicts, e.g. from :func:`make_feature`.
        gzip: compress; ``None`` means compress when ``path`` ends with ``.gz``.
    """
    path = Path(path)
    if gzip is None:
        gzip = path.name.endswith(".gz")
    report = WriteReport(written=0, repaired=0, dropped=0)
    encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=_json_default)
    with atomic_path(path) as tmp:
        if gzip:
            # Level 6: most of level 9's size at a fraction of its time on large detection sets.
            out = gzip_module.open(tmp, "wt", encoding="utf-8", compresslevel=6)
        else:
            out = open(tmp, "w", encoding="utf-8")
        with out:
            out.write('{"type":"FeatureCollection","features":[')
            for feature in features:
                checked = _checked_feature(feature, report)
                if checked is None:
                    continue
                if report.written:
                    out.write(",")
                out.write(encoder.encode(checked))
                report.written += 1
            out.write("]}\n")
    return report


def _checked_feature(feature: dict[str, Any], report: WriteReport) -> dict[str, Any] | None:
    """The feature with a QuPath-safe geometry, or None (counted as dropped)."""
    geometry = feature.get("geometry") if isinstance(feature, Mapping) else None
    if geometry is None:
        report.dropped += 1
        return None
    if isinstance(feature, _CleanFeature) and geometry is feature.clean_geometry:
        return feature
    try:
        original = geometry if isinstance(geometry, BaseGeometry) else shape(geometry)
    except _UNPARSABLE:
        report.dropped += 1
        return None
    cleaned = clean_geometry(original)
    if cleaned is None:
        report.dropped += 1
        return None
    if cleaned is original and isinstance(geometry, Mapping):
        return feature
    if cleaned is not original:
        report.repaired += 1
    return {**feature, "geometry": _geometry_json(cleaned)}


# --------------------------------------------------------------------------- validating


def _structure_problems(geometry: Mapping[str, Any]) -> list[str]:
    """What the ``geojson`` package's RFC 7946 checks find wrong with a geometry's structure:
    rings that do not close or have fewer than 4 positions, positions that are not 2 or 3 numbers.
    shapely would close such a ring silently; QuPath's reader refuses it."""
    try:
        errors = geojson.GeoJSON.to_instance(dict(geometry), strict=True).errors()
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        return [f"geometry cannot be parsed: {exc}"]
    found: list[str] = []

    def collect(e: Any) -> None:
        if isinstance(e, str) and e:
            found.append(e)
        elif isinstance(e, (list, tuple)):
            for item in e:
                collect(item)
        elif isinstance(e, Mapping):
            for item in e.values():
                collect(item)

    collect(errors)
    return [f"geometry is not valid GeoJSON: {e[0].lower() + e[1:]}" for e in dict.fromkeys(found)]


def _geometry_problems(geometry: Any, grid: float) -> list[str]:
    if geometry is None:
        return ["geometry is missing or null"]
    if not isinstance(geometry, Mapping):
        return [f"geometry is a {type(geometry).__name__}, not a GeoJSON geometry object"]
    gtype = geometry.get("type")
    if gtype not in GEOMETRY_TYPES:
        return [f"geometry type {gtype!r} is not one of {sorted(GEOMETRY_TYPES)}"]
    try:
        geom = shape(geometry)
    except _UNPARSABLE as exc:
        return [f"geometry cannot be parsed: {exc}"]
    structure = _structure_problems(geometry)
    if structure:
        return structure
    if geom.is_empty:
        return ["geometry is empty"]
    if not geom.is_valid:
        return [f"geometry is invalid: {shapely.is_valid_reason(geom)}"]
    try:
        snapped = shapely.set_precision(geom, grid)
    except (GEOSException, ShapelyError) as exc:
        return [f"geometry fails snapping to the {grid} px grid: {exc}"]
    if snapped.is_empty:
        return [f"geometry collapses to empty on the {grid} px grid"]
    if not snapped.is_valid:
        return [f"geometry is invalid on the {grid} px grid: {shapely.is_valid_reason(snapped)}"]
    return []


def _classification_problems(value: Any) -> list[str]:
    if not isinstance(value, Mapping):
        return [f"classification is {_describe(value)}, not an object with name and color"]
    problems = []
    names = value.get("names")
    has_names = isinstance(names, list) and bool(names)
    has_names = has_names and all(isinstance(n, str) and n for n in cast(list, names))
    if not (isinstance(value.get("name"), str) and value["name"]) and not has_names:
        problems.append("classification has no name")
    if "color" not in value:
        problems.append("classification has no color (QuPath throws on a class without a color)")
    else:
        color = value["color"]
        ok = isinstance(color, list) and len(color) == 3
        ok = ok and all(type(c) is int and 0 <= c <= 255 for c in color)  # bool is not a channel
        if not ok:
            problems.append(f"classification color {color!r} is not 3 integers 0..255")
    return problems


def _measurement_problems(value: Any) -> list[str]:
    if not isinstance(value, Mapping):
        return [f"measurements is {_describe(value)}, not an object of numbers"]
    bad = [
        key
        for key, v in value.items()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
    ]
    if bad:
        shown = ", ".join(repr(k) for k in bad[:5]) + (" ..." if len(bad) > 5 else "")
        return [f"measurements not finite numbers: {shown}"]
    return []


def _describe(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def validate_feature(feature: Any, grid: float = QUPATH_GRID) -> list[str]:
    """Problems a QuPath import would hit with this Feature dict; empty when it is fine.

    Checks: a ``"type": "Feature"`` object; geometry present, of a type QuPath reads, valid and
    still valid and non-empty after snapping to ``grid`` px; ``properties`` an object;
    ``objectType`` inside properties (not at Feature level) and one of annotation, detection,
    cell; classification with a name and a ``color`` of 3 ints 0..255; measurements an object
    of finite numbers; ``id`` absent or a UUID string; ``name`` absent or a string.
    """
    if not isinstance(feature, Mapping) or feature.get("type") != "Feature":
        return ["not a GeoJSON Feature (needs \"type\": \"Feature\")"]
    problems = _geometry_problems(feature.get("geometry"), grid)
    if "objectType" in feature:
        problems.append("objectType at Feature level; QuPath reads it only inside properties")
    if "id" in feature and not _is_uuid(feature["id"]):
        problems.append(f"id {feature['id']!r} is not a UUID string")
    props = feature.get("properties")
    if not isinstance(props, Mapping):
        problems.append(f"properties is {_describe(props)}, not an object")
        return problems
    object_type = props.get("objectType")
    if object_type is None:
        problems.append("properties.objectType is missing or null")
    elif object_type not in OBJECT_TYPES:
        problems.append(f"objectType {object_type!r} is not one of {sorted(OBJECT_TYPES)}")
    if "classification" in props:
        problems.extend(_classification_problems(props["classification"]))
    if "measurements" in props:
        problems.extend(_measurement_problems(props["measurements"]))
    if "name" in props and not isinstance(props["name"], str):
        problems.append(f"name is {_describe(props['name'])}, not a string")
    return problems


def validate_geojson(path: PathLike, grid: float = QUPATH_GRID) -> list[str]:
    """All problems QuPath would hit importing ``path`` (``.geojson`` or gzipped); [] when fine.

    Each problem is one line, prefixed with ``feature <index>:`` or ``file:``. Raises
    :class:`GeoJSONError` when the file is missing or not JSON.
    """
    data = _load_json(Path(path))
    try:
        features = _feature_list(data, Path(path))
    except GeoJSONError as exc:
        return [f"file: {exc}"]
    problems: list[str] = []
    seen: set[str] = set()
    for i, feature in enumerate(features):
        problems.extend(f"feature {i}: {p}" for p in validate_feature(feature, grid))
        fid = feature.get("id") if isinstance(feature, Mapping) else None
        if isinstance(fid, str):
            if fid in seen:
                problems.append(f"feature {i}: duplicate id {fid}")
            seen.add(fid)
    return problems


# --------------------------------------------------------------------------- reading


@dataclass
class QuPathObject:
    """One object read from QuPath GeoJSON; geometry in level-0 px."""

    geometry: BaseGeometry
    class_name: str | None
    color: tuple[int, int, int] | None
    object_type: str  # "annotation" when the file does not say
    name: str | None
    measurements: dict[str, float] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)  # raw, as in the file


def _load_json(path: Path) -> Any:
    """Parse a (possibly gzipped) JSON file; GeoJSONError with one line for every failure."""
    if not path.is_file():
        raise GeoJSONError(f"{path}: no such file")
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:  # by content, not suffix: QuPath users rename files
            raw = gzip_module.decompress(raw)
        # Python's parser accepts NaN/Infinity, which QuPath writes for missing measurements.
        return json.loads(raw.decode("utf-8-sig"))
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise GeoJSONError(f"{path}: cannot read: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GeoJSONError(f"{path}: not JSON ({detail})") from exc


def _feature_list(data: Any, path: Path) -> list[Any]:
    """The features of a FeatureCollection, a bare list of Features or a single Feature."""
    if isinstance(data, Mapping):
        kind = data.get("type")
        if kind == "FeatureCollection":
            features = data.get("features")
            if not isinstance(features, list):
                raise GeoJSONError(f"{path}: FeatureCollection without a \"features\" list")
            return features
        if kind == "Feature":
            return [data]
        raise GeoJSONError(
            f"{path}: not GeoJSON features (top-level object has type {kind!r}, "
            "expected FeatureCollection or Feature)"
        )
    if isinstance(data, list):
        if data and not any(isinstance(f, Mapping) and f.get("type") == "Feature" for f in data):
            raise GeoJSONError(f"{path}: not GeoJSON features (a list without any Feature)")
        return data
    raise GeoJSONError(f"{path}: not GeoJSON features (top level is {_describe(data)})")


def _unpack_rgb(packed: Any) -> tuple[int, int, int] | None:
    """RGB from QuPath's packed ARGB int (Java signed, e.g. -3670016 is 200, 0, 0)."""
    if isinstance(packed, bool) or not isinstance(packed, int):
        return None
    v = packed & 0xFFFFFF
    return (v >> 16) & 0xFF, (v >> 8) & 0xFF, v & 0xFF


def _read_classification(value: Any) -> tuple[str | None, tuple[int, int, int] | None]:
    if isinstance(value, str):  # some tools write the bare class name
        return (value or None), None
    if not isinstance(value, Mapping):
        return None, None
    name = value.get("name")
    names = value.get("names")  # derived classes in QuPath 0.4+: ["Tumor", "Positive"]
    if not (isinstance(name, str) and name) and isinstance(names, list) and names:
        name = ": ".join(str(n) for n in names)  # QuPath's own spelling of a derived class
    color: tuple[int, int, int] | None = None
    rgb = value.get("color")
    if isinstance(rgb, list) and len(rgb) >= 3:
        try:
            color = tuple(_as_channel(c) for c in rgb[:3])  # type: ignore[assignment]
        except (TypeError, ValueError):
            color = None
    if color is None:
        color = _unpack_rgb(value.get("colorRGB"))
    return (name if isinstance(name, str) and name else None), color


def _read_measurements(value: Any) -> dict[str, float]:
    """Measurements as a dict (0.3+) or a list of ``{"name", "value"}`` (0.2); numbers only."""
    if isinstance(value, list):
        value = {m.get("name"): m.get("value") for m in value if isinstance(m, Mapping)}
    if not isinstance(value, Mapping):
        return {}
    out = {}
    for key, v in value.items():
        if isinstance(key, str) and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def _read_object(feature: Any) -> QuPathObject | str:
    """A QuPathObject, or the reason the feature was skipped."""
    if not isinstance(feature, Mapping) or feature.get("type") != "Feature":
        return "not a Feature"
    geometry = feature.get("geometry")
    if not isinstance(geometry, Mapping):
        return "no geometry"
    try:
        geom = shape(geometry)
    except _UNPARSABLE:
        return "unreadable geometry"
    if geom.is_empty:
        return "empty geometry"
    if _is_polygonal(geom) and not geom.is_valid:
        geom = clean_geometry(geom, grid=None)
        if geom is None:
            return "invalid geometry with no area"
    props = feature.get("properties")
    props = dict(props) if isinstance(props, Mapping) else {}
    object_type = props.get("objectType") or feature.get("objectType")
    if not isinstance(object_type, str):
        object_type = _LEGACY_OBJECT_TYPES.get(str(feature.get("id")), "annotation")
    class_name, color = _read_classification(props.get("classification"))
    name = props.get("name")
    return QuPathObject(
        geometry=geom,
        class_name=class_name,
        color=color,
        object_type=object_type,
        name=name if isinstance(name, str) else None,
        measurements=_read_measurements(props.get("measurements")),
        properties=props,
    )


def read_geojson(path: PathLike) -> list[QuPathObject]:
    """Read objects from GeoJSON as QuPath 0.2-0.7 exports it (``.geojson`` or gzipped).

    Accepts a FeatureCollection, a bare list of Features or a single Feature. Classification
    colours come from ``color`` ([r, g, b], 0.4+) or ``colorRGB`` (packed int, older versions);
    ``objectType`` falls back to the 0.2-style Feature id (``"PathAnnotationObject"``) and then to
    ``"annotation"``. Invalid polygons are repaired (validity only, no grid snapping); features
    without usable geometry are skipped with one warning for the file.

    Raises:
        GeoJSONError: the file is missing, not JSON, or JSON that is not GeoJSON features.
    """
    path = Path(path)
    features = _feature_list(_load_json(path), path)
    objects: list[QuPathObject] = []
    skipped: dict[str, int] = {}
    for feature in features:
        obj = _read_object(feature)
        if isinstance(obj, str):
            skipped[obj] = skipped.get(obj, 0) + 1
        else:
            objects.append(obj)
    if skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in skipped.items())
        warnings.warn(f"{path}: skipped {sum(skipped.values())} features ({reasons})", stacklevel=2)
    return objects
