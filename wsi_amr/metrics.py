"""Every score of the package: Dice, IoU and confusion matrices of label maps (``evaluate``,
segmentation validation, ``quadtree --mask``, the benchmarks); accuracy, balanced accuracy and AUC
of slide classes.

One core: every Dice and IoU comes from the per-class pixel counts (intersection, predicted,
reference) of :func:`class_counts`, read off a matrix of (reference, prediction) pixel counts
(rows the reference label, columns the predicted one), through :func:`class_dice`. The variants
differ only in what they do with labels outside 0..K-1 and with a class that is absent:

- Labels outside 0..K-1: :func:`confusion_matrix` (``evaluate``) clips them into range;
  :func:`dice_counts` and :class:`DiceTally` count them on their own side only (they lower the
  Dice as missed pixels, never as an intersection), as they do a window without prediction.
  :func:`dice_counts` leaves out pixels whose reference is IGNORE (unlabelled).
- A class in neither prediction nor reference (nothing to find, nothing found) scores 1.0 in
  :func:`scores_from_confusion` (Dice and IoU), :class:`DiceTally` and :func:`dice` (two empty
  binary masks); ``None`` in :func:`dice_scores` (training validation), which leaves it out of
  the foreground mean (1.0 when no foreground class occurs). A class on one side only scores 0.0
  everywhere.
- Foreground Dice: :func:`dice_scores` averages the Dice of the classes 1..K-1 that occur;
  :meth:`DiceTally.foreground` is the Dice of one merged class "any label > 0".

Objects (GlaS challenge definitions, on connected components of a binary mask):
:func:`object_scores` gives object-level precision, recall and F1 (a predicted object is a true
positive when more than half of it lies in one reference object) and object Dice (each reference
object against the predicted object overlapping it most, and each predicted object against the
reference object overlapping it most, weighted by area).

Classification: :func:`classification_scores` (the confusion matrix of the most probable class,
accuracy, balanced accuracy, AUC) and :func:`roc_auc`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np

from wsi_amr.labels import IGNORE


class EvaluationError(ValueError):
    """Inputs that cannot be compared; one line for the user."""


# -------------------------------------------------------------------------------------------------
# The core: pixel counts per class
# -------------------------------------------------------------------------------------------------
def _pair_counts(pred: np.ndarray | None, ref: np.ndarray, k: int) -> np.ndarray:
    """(k + 1, k + 1) int64 counts of (reference, prediction) label pairs; row and column k
    collect labels outside 0..k-1, and ``pred`` None (nothing predicted) puts every pixel in column k."""
    n = k + 1
    dtype = np.uint8 if n * n <= 256 else np.uint16 if n * n <= 65536 else np.int64  # a window's worth stays small
    index = _label_index(ref, k, dtype)
    index *= n
    index += k if pred is None else _label_index(pred, k, dtype)
    return np.bincount(index, minlength=n * n).reshape(n, n)


def _label_index(labels: np.ndarray, k: int, dtype: Any) -> np.ndarray:
    """Labels, flat, as ``dtype``; those outside 0..k-1 become k."""
    flat = labels.ravel()
    inside = (flat >= 0) & (flat < k)
    out = np.full(flat.shape, k, dtype)
    out[inside] = flat[inside]
    return out


def class_counts(conf: np.ndarray, k: int | None = None) -> np.ndarray:
    """(k, 3) int64 per class of a (reference x prediction) count matrix: intersection, predicted and
    reference pixels. ``k`` (default: all rows) leaves further rows and columns out as classes
    but keeps them in the other side's totals."""
    k = conf.shape[0] if k is None else k
    return np.stack([np.diag(conf)[:k], conf.sum(axis=0)[:k], conf.sum(axis=1)[:k]], axis=1).astype(np.int64)


@overload
def class_dice(counts: np.ndarray, absent: float = 1.0) -> list[float]: ...
@overload
def class_dice(counts: np.ndarray, absent: None) -> list[float | None]: ...
def class_dice(counts: np.ndarray, absent: float | None = 1.0) -> list[float] | list[float | None]:
    """Dice of each row of (K, 3) counts (intersection, predicted, reference); ``absent`` for a
    class in neither."""
    return [absent if pred + ref == 0 else 2.0 * inter / (pred + ref) for inter, pred, ref in counts.tolist()]


def class_iou(counts: np.ndarray, absent: float = 1.0) -> list[float]:
    """IoU of each row of (K, 3) counts; ``absent`` for a class in neither."""
    return [absent if pred + ref - inter == 0 else inter / (pred + ref - inter) for inter, pred, ref in counts.tolist()]


def binary_counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(3,) int64 of two binary masks: pixels in both, in ``a``, in ``b``."""
    return class_counts(_pair_counts(a.astype(bool).astype(np.uint8), b.astype(bool).astype(np.uint8), 2), 2)[1]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks (1.0 when both are empty)."""
    return class_dice(binary_counts(a, b)[None])[0]


# -------------------------------------------------------------------------------------------------
# Segmentation validation (training) and the quadtree's label round trip
# -------------------------------------------------------------------------------------------------
def dice_counts(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, 3) int64 per class: intersection, predicted and true pixel counts (IGNORE excluded)."""
    keep = truth != IGNORE
    return class_counts(_pair_counts(pred[keep], truth[keep], num_classes), num_classes)


def dice_scores(counts: np.ndarray, class_names: Sequence[str]) -> tuple[dict[str, float | None], float]:
    """Dice per class (None where neither prediction nor truth has the class) and the foreground
    Dice: the mean over the non-background classes that occur."""
    per = dict(zip(class_names, class_dice(counts, absent=None)))
    fg = [v for v in list(per.values())[1:] if v is not None]
    return per, float(np.mean(fg)) if fg else 1.0


class DiceTally:
    """Per-class pixel counts over a slide, window by window."""

    def __init__(self, num_classes: int) -> None:
        self.k = num_classes
        self.conf = np.zeros((num_classes + 1, num_classes + 1), np.int64)

    def add(self, truth: np.ndarray, pred: np.ndarray | None) -> None:
        """``pred`` None: no leaf there (nothing predicted)."""
        self.conf += _pair_counts(pred, truth, self.k)

    def foreground(self) -> float:
        """Dice of every label > 0 as one class."""
        fg = slice(1, self.k)  # index k (outside labels, no prediction) is never an intersection
        merged = np.array([[self.conf[fg, fg].sum(), self.conf[:, fg].sum(), self.conf[fg, :].sum()]])
        return class_dice(merged)[0]

    def per_class(self, classes: dict[str, int]) -> dict[str, float]:
        """Dice of each class (1.0 for one absent from every window), rounded to 6 decimals."""
        dices = class_dice(class_counts(self.conf, self.k))
        return {name: round(dices[i], 6) for name, i in classes.items()}


# -------------------------------------------------------------------------------------------------
# Objects: connected components of binary masks
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectScores:
    """Object-level scores of one image (or pooled counts of several, see :meth:`pooled`)."""

    true_positives: int
    false_positives: int
    false_negatives: int
    object_dice: float

    @property
    def f1(self) -> float:
        tp, fp, fn = self.true_positives, self.false_positives, self.false_negatives
        return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)

    @staticmethod
    def pooled(scores: Sequence[ObjectScores]) -> dict[str, float]:
        """F1 of the summed counts, and the mean object Dice per image."""
        tp = sum(s.true_positives for s in scores)
        fp = sum(s.false_positives for s in scores)
        fn = sum(s.false_negatives for s in scores)
        total = ObjectScores(tp, fp, fn, 0.0)
        mean_dice = float(np.mean([s.object_dice for s in scores])) if scores else float("nan")
        return {"object_f1": total.f1, "object_dice": mean_dice, "objects_tp": tp, "objects_fp": fp, "objects_fn": fn}


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    import cv2

    n, labels = cv2.connectedComponents(np.asarray(mask, bool).astype(np.uint8), connectivity=8)
    return labels, n - 1


def object_scores(pred: np.ndarray, ref: np.ndarray) -> ObjectScores:
    """Object-level scores of a binary prediction against a binary reference (2-D, same shape),
    objects being 8-connected components (GlaS: the reference may be an instance map; pass
    ``ref > 0`` for a class map, or use instance labels via :func:`object_scores_of_labels`)."""
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    p, n_p = _components(pred)
    r, n_r = _components(ref)
    return object_scores_of_labels(p, n_p, r, n_r)


def object_scores_of_labels(p: np.ndarray, n_p: int, r: np.ndarray, n_r: int) -> ObjectScores:
    """:func:`object_scores` of instance maps: ``p`` labels 1..n_p (0 background), ``r`` 1..n_r."""
    overlap = np.bincount(r.ravel().astype(np.int64) * (n_p + 1) + p.ravel(),
                          minlength=(n_r + 1) * (n_p + 1)).reshape(n_r + 1, n_p + 1)
    ref_area, pred_area = overlap.sum(axis=1), overlap.sum(axis=0)
    inner = overlap[1:, 1:]  # (n_r, n_p) pixels shared by reference i and prediction j
    tp = int((inner.max(axis=0) * 2 > pred_area[1:]).sum()) if n_r and n_p else 0
    matched_ref = int(((inner * 2 > pred_area[None, 1:]).any(axis=1)).sum()) if n_r and n_p else 0

    def side(areas: np.ndarray, other: np.ndarray, shared: np.ndarray) -> float:
        # Each object against the object of the other side it overlaps most (none: Dice 0), by area.
        if areas.size == 0:
            return 1.0 if other.size == 0 else 0.0
        best = shared.argmax(axis=1) if shared.shape[1] else np.zeros(areas.size, np.int64)
        inter = shared[np.arange(areas.size), best] if shared.shape[1] else np.zeros(areas.size)
        dice_each = np.where(inter > 0, 2 * inter / (areas + (other[best] if other.size else 0)), 0.0)
        return float((dice_each * areas).sum() / areas.sum())

    d = 0.5 * (side(ref_area[1:], pred_area[1:], inner) + side(pred_area[1:], ref_area[1:], inner.T))
    return ObjectScores(tp, n_p - tp, n_r - matched_ref, d)


# -------------------------------------------------------------------------------------------------
# Evaluation of label images against references
# -------------------------------------------------------------------------------------------------
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
    """(k, k) int64 counts, rows = reference label, columns = predicted label; labels outside
    0..k-1 are clipped into range."""
    if pred.shape != ref.shape:
        raise EvaluationError(f"prediction is {pred.shape[1]}x{pred.shape[0]}, reference {ref.shape[1]}x{ref.shape[0]}")
    return _pair_counts(np.clip(pred, 0, k - 1), np.clip(ref, 0, k - 1), k)[:k, :k]


def scores_from_confusion(conf: np.ndarray, classes: list[str]) -> Scores:
    """Dice and IoU of every foreground class (label 1..k-1); a class absent from both is 1.0."""
    counts = class_counts(conf)[1:]
    return Scores(classes, class_dice(counts), class_iou(counts), counts[:, 2].tolist(), counts[:, 1].tolist())


# -------------------------------------------------------------------------------------------------
# Classification
# -------------------------------------------------------------------------------------------------
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
    conf = confusion_matrix(pred, y, k)
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
