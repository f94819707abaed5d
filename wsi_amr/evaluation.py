"""Metrics: Dice and IoU per class for segmentation; accuracy, balanced accuracy, AUC and the
confusion matrix for slide classification.

Segmentation predictions and references can each be a label image (read by
:func:`wsi_amr.labels.read_label_image`, which lists the files accepted; binary 0/255 masks read
as 0/1) or a GeoJSON of polygons in level-0 px (rasterised with class names mapped
to label ids). Both are compared on one pixel grid: the label image's, or level 0 divided by
``downsample``. Classification compares class probabilities per slide with reference labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_amr.geojson import GeoJSONError, read_geojson
from wsi_amr.images import ImageError
from wsi_amr.labels import label_ids, read_label_image
from wsi_amr.polygons import rasterize_polygons

GEOJSON_SUFFIXES = (".geojson", ".json", ".geojson.gz", ".json.gz")


class EvaluationError(ValueError):
    """Inputs that cannot be compared; one line for the user."""


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


@dataclass
class Scores:
    """Per-class and mean Dice / IoU, from a confusion matrix of pixel counts."""

    classes: list[str]
    dice: list[float]
    iou: list[float]
    pixels_reference: list[int]
    pixels_prediction: list[int]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_dice(self) -> float:
        return float(np.mean(self.dice)) if self.dice else float("nan")

    @property
    def mean_iou(self) -> float:
        return float(np.mean(self.iou)) if self.iou else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "dice": dict(zip(self.classes, self.dice)),
            "iou": dict(zip(self.classes, self.iou)),
            "mean_dice": self.mean_dice,
            "mean_iou": self.mean_iou,
            "pixels_reference": dict(zip(self.classes, self.pixels_reference)),
            "pixels_prediction": dict(zip(self.classes, self.pixels_prediction)),
            **self.extra,
        }


def confusion_matrix(pred: np.ndarray, ref: np.ndarray, k: int) -> np.ndarray:
    """(k, k) int64 counts, rows = reference label, columns = predicted label."""
    if pred.shape != ref.shape:
        raise EvaluationError(f"prediction is {pred.shape[1]}x{pred.shape[0]}, reference {ref.shape[1]}x{ref.shape[0]}")
    p = np.clip(pred.ravel(), 0, k - 1).astype(np.int64)
    r = np.clip(ref.ravel(), 0, k - 1).astype(np.int64)
    return np.bincount(r * k + p, minlength=k * k).reshape(k, k)


def scores_from_confusion(conf: np.ndarray, classes: list[str]) -> Scores:
    """Dice and IoU of every foreground class (label 1..k-1); a class absent from both is 1.0."""
    dice, iou, n_ref, n_pred = [], [], [], []
    for c in range(1, conf.shape[0]):
        tp = int(conf[c, c])
        ref = int(conf[c].sum())
        pred = int(conf[:, c].sum())
        union = ref + pred - tp
        dice.append(1.0 if ref + pred == 0 else 2 * tp / (ref + pred))
        iou.append(1.0 if union == 0 else tp / union)
        n_ref.append(ref)
        n_pred.append(pred)
    return Scores(classes, dice, iou, n_ref, n_pred)


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
        raise EvaluationError(f"downsample (level-0 px per compared pixel) must be positive, got {downsample}")
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


# -- classification ---------------------------------------------------------------------------


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for the ``positive`` (bool) items: the probability
    that a positive scores above a negative, ties counting half (Mann-Whitney U). None when
    either side is empty."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    # Every positive-negative pair: plain and exact for the slide counts of a study.
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


@dataclass
class ClassificationScores:
    """Slide classification against reference labels.

    ``confusion`` (K, K): rows the reference class, columns the predicted (most probable) one.
    ``balanced_accuracy``: mean recall over the classes that occur in the reference. ``auc``:
    binary, the AUC of the second class's probability; multi-class, the one-vs-rest AUC averaged
    over classes (macro) that have both positives and negatives; None when no class has.
    """

    classes: list[str]
    confusion: np.ndarray
    accuracy: float
    balanced_accuracy: float
    auc: float | None
    auc_per_class: dict[str, float | None]

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    def as_dict(self) -> dict[str, Any]:
        return {"classes": self.classes, "n": self.n, "accuracy": self.accuracy,
                "balanced_accuracy": self.balanced_accuracy, "auc": self.auc,
                "auc_per_class": self.auc_per_class, "confusion_matrix": self.confusion.tolist()}


def classification_scores(labels: Any, probabilities: Any, classes: list[str]) -> ClassificationScores:
    """Scores of class ``probabilities`` (n, K) against reference ``labels`` (n,) ids 0..K-1."""
    y = np.asarray(labels, np.int64).reshape(-1)
    p = np.asarray(probabilities, np.float64).reshape(len(y), -1)
    k = len(classes)
    if p.shape[1] != k:
        raise EvaluationError(f"{p.shape[1]} probabilities per item for {k} classes")
    if len(y) == 0:
        raise EvaluationError("no items to score")
    if y.min() < 0 or y.max() >= k:
        raise EvaluationError(f"labels must be class ids 0..{k - 1}")
    pred = p.argmax(axis=1)
    conf = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    present = conf.sum(axis=1) > 0
    recall = np.diag(conf)[present] / conf.sum(axis=1)[present]
    if k == 2:
        per_class = {classes[1]: roc_auc(p[:, 1], y == 1)}
        auc = per_class[classes[1]]
    else:
        per_class = {c: roc_auc(p[:, i], y == i) for i, c in enumerate(classes)}
        defined = [v for v in per_class.values() if v is not None]
        auc = float(np.mean(defined)) if defined else None
    return ClassificationScores(list(classes), conf, float((pred == y).mean()), float(recall.mean()), auc, per_class)


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
