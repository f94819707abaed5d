"""Scores: Dice and IoU from pixel counts, AUC and accuracy for slide labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wsi_amr.segmentation.config import IGNORE


def dice_counts(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, 3) int64 per class: intersection, predicted and true pixel counts (IGNORE excluded)."""
    keep = truth != IGNORE
    p, t = pred[keep].astype(np.int64), truth[keep].astype(np.int64)
    inter = np.bincount(t[p == t], minlength=num_classes)[:num_classes]
    return np.stack([inter, np.bincount(p, minlength=num_classes)[:num_classes],
                     np.bincount(t, minlength=num_classes)[:num_classes]], axis=1)


def dice_scores(counts: np.ndarray, class_names: Sequence[str]) -> tuple[dict[str, float | None], float]:
    """Dice per class (None where neither prediction nor truth has the class) and the foreground
    Dice: the mean over the non-background classes that occur."""
    per: dict[str, float | None] = {}
    for name, (inter, pred, true) in zip(class_names, counts.tolist()):
        per[name] = None if pred + true == 0 else 2.0 * inter / (pred + true)
    fg = [v for name, v in list(per.items())[1:] if v is not None]
    return per, float(np.mean(fg)) if fg else 1.0


class DiceTally:
    """Per-class intersections and sizes over a slide, window by window."""

    def __init__(self, num_classes: int) -> None:
        self.inter = np.zeros(num_classes, np.int64)
        self.total = np.zeros(num_classes, np.int64)
        self.fg_inter = 0
        self.fg_total = 0

    def add(self, truth: np.ndarray, pred: np.ndarray | None) -> None:
        """``pred`` None: no leaf there (nothing predicted)."""
        k = len(self.total)
        t_counts = np.bincount(truth.ravel(), minlength=k)[:k]
        self.total += t_counts
        self.fg_total += int(t_counts[1:].sum())
        if pred is None:
            return
        p_counts = np.bincount(pred.ravel(), minlength=k)[:k]
        both = np.bincount(truth[truth == pred].ravel(), minlength=k)[:k]
        self.total += p_counts
        self.inter += both
        self.fg_total += int(p_counts[1:].sum())
        self.fg_inter += int(((truth > 0) & (pred > 0)).sum())

    def foreground(self) -> float:
        return 1.0 if self.fg_total == 0 else 2.0 * self.fg_inter / self.fg_total

    def per_class(self, classes: dict[str, int]) -> dict[str, float]:
        return {
            name: (1.0 if self.total[i] == 0 else round(2.0 * float(self.inter[i]) / float(self.total[i]), 6))
            for name, i in classes.items()
        }
