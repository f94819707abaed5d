"""What ``evaluate`` compares: predictions and references read onto one pixel grid, paired by
file. The scores themselves are computed by :mod:`wsi_amr.metrics`.

Segmentation predictions and references can each be a label image (read by
:func:`wsi_amr.labels.read_label_image`, which lists the files accepted; binary 0/255 masks read
as 0/1) or a GeoJSON of polygons in level-0 px (rasterised with class names mapped to label ids).
Both are compared on one pixel grid: the label image's, or level 0 divided by ``downsample``.
Classification compares class probabilities per slide (``classify`` outputs) with reference labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wsi_amr.geojson import GeoJSONError, read_geojson
from wsi_amr.images import ImageError
from wsi_amr.labels import label_ids, read_label_image
from wsi_amr.metrics import EvaluationError, Scores, confusion_matrix, scores_from_confusion
from wsi_amr.params import naming
from wsi_amr.polygons import rasterize_polygons

GEOJSON_SUFFIXES = (".geojson", ".json", ".geojson.gz", ".json.gz")

def is_geojson(path: Path) -> bool:
    return path.name.lower().endswith(GEOJSON_SUFFIXES)


def _label_image(path: Path) -> np.ndarray:
    """A label image's label ids as int32 (a binary 0/255 mask as 0/1); EvaluationError when refused."""
    try:
        return label_ids(read_label_image(path)).astype(np.int32)
    except ImageError as exc:
        raise EvaluationError(str(exc)) from None


def _read(path: Path) -> list[Any]:
    try:
        return read_geojson(path)
    except GeoJSONError as exc:
        raise EvaluationError(str(exc)) from exc


def geojson_classes(path: Path) -> list[str]:
    """Class names in a GeoJSON, in order of first appearance (unclassified objects excluded)."""
    names: list[str] = []
    for obj in _read(path):
        if obj.class_name and obj.class_name not in names:
            names.append(obj.class_name)
    return names


def classes_of(paths: list[Path]) -> list[str]:
    """Class names of the GeoJSON files among ``paths``, in order of first appearance."""
    names: list[str] = []
    for p in paths:
        if is_geojson(p):
            names += [c for c in geojson_classes(p) if c not in names]
    return names


def rasterise_geojson(path: Path, shape: tuple[int, int], downsample: float, classes: list[str]) -> np.ndarray:
    """Label image (H, W) int32 of a GeoJSON: class ``classes[i]`` -> label i + 1.

    Objects without a class count as the first class; objects of other classes are ignored.
    """
    objs = _read(path)
    out = np.zeros(shape, np.uint8)
    for label, name in enumerate(classes, start=1):
        geoms = [o.geometry for o in objs if (o.class_name or classes[0]) == name]
        if geoms:
            mask = rasterize_polygons(geoms, shape, scale=downsample)
            out[mask > 0] = label
    return out.astype(np.int32)


def load_labels(path: Path, *, shape: tuple[int, int], downsample: float, classes: list[str]) -> np.ndarray:
    """Labels of ``path`` on the comparison grid (``shape`` rows x cols, level 0 / ``downsample``)."""
    if not path.exists():
        raise EvaluationError(f"{path}: no such file")
    if is_geojson(path):
        return rasterise_geojson(path, shape, downsample, classes)
    labels = _label_image(path)
    if labels.shape != shape:
        raise EvaluationError(f"{path}: label image is {labels.shape[1]}x{labels.shape[0]}, the other input is {shape[1]}x{shape[0]}")
    return labels


def _geojson_extent(path: Path) -> tuple[float, float]:
    maxx = maxy = 0.0
    for obj in _read(path):
        if not obj.geometry.is_empty:
            b = obj.geometry.bounds
            maxx, maxy = max(maxx, b[2]), max(maxy, b[3])
    return maxx, maxy


def evaluate_pair(
    pred_path: Path, ref_path: Path, *, classes: list[str] | None = None, downsample: float = 1.0,
    size: tuple[int, int] | None = None,
) -> tuple[Scores, np.ndarray]:
    """Scores of one prediction against one reference, and the confusion matrix.

    The pixel grid: a label image's own (GeoJSON is rasterised onto it, ``downsample`` level-0
    px per label pixel); with two GeoJSON files, level 0 of ``size`` (width, height; default:
    the extent of the objects) divided by ``downsample``.
    """
    if not downsample > 0:
        raise naming(EvaluationError(f"downsample (level-0 px per compared pixel) must be positive, got {downsample}"),
                     "downsample")
    for p in (pred_path, ref_path):
        if not p.exists():
            raise EvaluationError(f"{p}: no such file")
    images = [p for p in (ref_path, pred_path) if not is_geojson(p)]
    if images:
        shape = _label_image(images[0]).shape
    else:
        if size is None:
            extents = [_geojson_extent(p) for p in (ref_path, pred_path)]
            size = (int(np.ceil(max(e[0] for e in extents))), int(np.ceil(max(e[1] for e in extents))))
        shape = (max(1, int(round(size[1] / downsample))), max(1, int(round(size[0] / downsample))))
    if classes is None:
        classes = classes_of([ref_path, pred_path])
    ref = load_labels(ref_path, shape=shape, downsample=downsample, classes=classes)
    pred = load_labels(pred_path, shape=shape, downsample=downsample, classes=classes)
    k = max(int(ref.max()), int(pred.max()), len(classes)) + 1
    k = max(k, 2)
    names = [classes[i - 1] if i - 1 < len(classes) else f"class {i}" for i in range(1, k)]
    conf = confusion_matrix(pred, ref, k)
    return scores_from_confusion(conf, names), conf


def read_predictions(pred: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Class names and ``{slide stem: probabilities (K,)}`` from ``wsi-amr classify`` outputs: an
    output folder (its ``*/classification.json``, searched recursively), one
    ``classification.json``, or a batch ``summary.csv`` (its classify rows; a later row of a slide
    replaces an earlier one). EvaluationError when there are none, or the class lists differ."""
    import csv
    import json

    found: list[tuple[str, list[str], list[float]]] = []
    if not pred.exists():
        raise EvaluationError(f"{pred}: no such file or folder")
    try:
        if pred.is_dir() or pred.suffix.lower() == ".json":
            files = sorted(pred.rglob("classification.json")) if pred.is_dir() else [pred]
            for f in files:
                doc = json.loads(f.read_text())
                classes = list(doc["classes"])
                found.append((str(doc.get("stem") or f.parent.name), classes,
                              [float(doc["probabilities"][c]) for c in classes]))
        elif pred.suffix.lower() == ".csv":
            with open(pred, encoding="utf-8", newline="") as fh:
                for row in csv.DictReader(fh):
                    if row.get("command") == "classify" and row.get("probabilities"):
                        probs = json.loads(row["probabilities"])
                        found.append((row["stem"], list(probs), [float(v) for v in probs.values()]))
        else:
            raise EvaluationError(f"{pred}: give a classify output folder, a classification.json or a summary.csv")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EvaluationError(f"{pred}: not readable classify output ({type(exc).__name__}: {exc})") from None
    if not found:
        raise EvaluationError(f"{pred}: holds no classify results (classification.json, or classify rows of "
                              "summary.csv)")
    classes = found[0][1]
    for stem, other, _ in found:
        if other != classes:
            raise EvaluationError(f"{pred}: {stem} has classes {other}, others {classes}; compare one model's "
                                  "predictions at a time")
    return classes, {stem: np.array(probs) for stem, _, probs in found}
