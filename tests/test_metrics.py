"""wsi_amr.metrics: one core of per-class pixel counts, and each variant's convention for absent
classes and out-of-range labels."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_amr.metrics import (
    DiceTally,
    EvaluationError,
    binary_counts,
    class_counts,
    class_dice,
    class_iou,
    classification_scores,
    confusion_matrix,
    dice,
    dice_counts,
    dice_scores,
    scores_from_confusion,
)
from wsi_amr.segmentation.config import IGNORE


def labels(seed: int, k: int, shape=(24, 32)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, k, shape).astype(np.uint8), rng.integers(0, k, shape).astype(np.uint8)


def test_counts_of_a_confusion_matrix():
    ref = np.array([[0, 1, 1, 2]])
    pred = np.array([[0, 1, 2, 2]])
    conf = confusion_matrix(pred, ref, 3)
    assert conf.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    # intersection, predicted, reference
    assert class_counts(conf).tolist() == [[1, 1, 1], [1, 1, 2], [1, 2, 1]]
    assert class_dice(class_counts(conf)) == [1.0, pytest.approx(2 / 3), pytest.approx(2 / 3)]
    assert class_iou(class_counts(conf)) == [1.0, 0.5, 0.5]


def test_absent_class_conventions():
    ref = np.zeros((4, 4), np.uint8)
    ref[0, 0] = 1  # class 1 in the reference only; class 2 nowhere
    pred = np.zeros((4, 4), np.uint8)
    # evaluate: absent 1.0 (Dice and IoU), on one side only 0.0
    s = scores_from_confusion(confusion_matrix(pred, ref, 3), ["A", "B"])
    assert s.dice == [0.0, 1.0] and s.iou == [0.0, 1.0]
    # training validation: absent None, left out of the foreground mean
    per, fg = dice_scores(dice_counts(pred, ref, 3), ["Background", "A", "B"])
    assert per == {"Background": pytest.approx(2 * 15 / 31), "A": 0.0, "B": None} and fg == 0.0
    per, fg = dice_scores(dice_counts(pred, pred, 3), ["Background", "A", "B"])
    assert per["A"] is None and per["B"] is None and fg == 1.0  # no foreground class occurs
    # quadtree --mask: absent 1.0 per class
    tally = DiceTally(3)
    tally.add(ref, pred)
    assert tally.per_class({"A": 1, "B": 2}) == {"A": 0.0, "B": 1.0} and tally.foreground() == 0.0
    # binary masks: two empty ones agree perfectly
    assert dice(np.zeros(3), np.zeros(3)) == 1.0 and dice(np.ones(3), np.zeros(3)) == 0.0
    assert class_dice(np.zeros((1, 3), np.int64), absent=0.0) == [0.0]


def test_unlabelled_and_out_of_range_pixels():
    ref = np.array([[0, 1, IGNORE, 1]], np.uint8)
    pred = np.array([[0, 1, 1, 0]], np.uint8)
    # IGNORE in the reference: the pixel counts nowhere
    assert dice_counts(pred, ref, 2).tolist() == [[1, 2, 1], [1, 1, 2]]
    # out of range (3 with 2 classes): counted on its own side only
    ref = np.array([[0, 3, 1, 1]], np.uint8)
    pred = np.array([[3, 1, 1, 0]], np.uint8)
    assert dice_counts(pred, ref, 2).tolist() == [[0, 1, 1], [1, 2, 2]]
    # evaluate clips into range instead
    assert confusion_matrix(pred, ref, 2).tolist() == [[0, 1], [1, 2]]
    with pytest.raises(EvaluationError, match="prediction is 4x1, reference 3x1"):
        confusion_matrix(pred, ref[:, :3], 2)


@pytest.mark.parametrize("seed", range(4))
def test_pooled_and_tally_forms_agree(seed):
    k = 4
    truth, pred = labels(seed, k)
    names = [f"c{i}" for i in range(k)]
    counts = dice_counts(pred, truth, k)
    conf = confusion_matrix(pred, truth, k)
    assert np.array_equal(counts, class_counts(conf))
    tally = DiceTally(k)
    for rows in (slice(0, 10), slice(10, 24)):  # window by window
        for cols in (slice(0, 16), slice(16, 32)):
            tally.add(truth[rows, cols], pred[rows, cols])
    per, _ = dice_scores(counts, names)
    scores = scores_from_confusion(conf, names[1:])
    by_tally = tally.per_class({n: i for i, n in enumerate(names)})
    for i, n in enumerate(names):
        assert by_tally[n] == round(per[n], 6)
        if i:
            assert scores.dice[i - 1] == pytest.approx(per[n])
    assert tally.foreground() == pytest.approx(dice(truth > 0, pred > 0))


def test_tally_counts_windows_without_prediction_as_missed():
    truth = np.ones((4, 4), np.uint8)
    tally = DiceTally(2)
    tally.add(truth, truth)
    tally.add(truth, None)
    assert tally.foreground() == pytest.approx(2 * 16 / (32 + 16))
    assert tally.per_class({"x": 1}) == {"x": round(2 * 16 / 48, 6)}


def test_binary_counts():
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([1, 0, 1, 0], np.uint8) * 255
    assert binary_counts(a, b).tolist() == [1, 2, 2]
    assert dice(a, b) == 0.5


def test_classification_confusion_is_the_same_matrix():
    y = np.array([0, 1, 1, 2])
    p = np.eye(3)[[0, 2, 1, 2]]
    s = classification_scores(y, p, ["a", "b", "c"])
    assert np.array_equal(s.confusion, confusion_matrix(p.argmax(1), y, 3))
    assert s.accuracy == 0.75 and s.balanced_accuracy == pytest.approx((1 + 0.5 + 1) / 3)


# -- objects (GlaS definitions) ----------------------------------------------------------------
def _discs(shape, centres, radius):
    import cv2

    m = np.zeros(shape, np.uint8)
    for c in centres:
        cv2.circle(m, c, radius, 1, -1)
    return m


def test_object_scores_of_identical_masks_are_perfect():
    from wsi_amr.metrics import object_scores

    ref = _discs((100, 100), [(20, 20), (70, 70)], 10)
    s = object_scores(ref, ref)
    assert (s.true_positives, s.false_positives, s.false_negatives) == (2, 0, 0)
    assert s.f1 == 1.0 and s.object_dice == pytest.approx(1.0)


def test_object_scores_count_misses_and_false_objects():
    from wsi_amr.metrics import object_scores

    ref = _discs((100, 100), [(20, 20), (70, 70)], 10)
    pred = _discs((100, 100), [(20, 20), (20, 75)], 10)  # one found, one missed, one false
    s = object_scores(pred, ref)
    assert (s.true_positives, s.false_positives, s.false_negatives) == (1, 1, 1)
    assert s.f1 == pytest.approx(0.5)
    assert s.object_dice == pytest.approx(0.5)  # half of each side's area matched perfectly, half not at all


def test_a_prediction_mostly_outside_its_reference_is_not_a_true_positive():
    from wsi_amr.metrics import object_scores

    ref = np.zeros((50, 50), np.uint8)
    ref[10:20, 10:20] = 1
    pred = np.zeros_like(ref)
    pred[10:20, 15:40] = 1  # 50 of its 250 pixels in the reference object
    s = object_scores(pred, ref)
    assert (s.true_positives, s.false_positives, s.false_negatives) == (0, 1, 1)
    assert 0 < s.object_dice < 1


def test_empty_masks_and_pooling():
    from wsi_amr.metrics import ObjectScores, object_scores

    empty = np.zeros((10, 10), np.uint8)
    assert object_scores(empty, empty).f1 == 1.0 and object_scores(empty, empty).object_dice == 1.0
    one = empty.copy()
    one[2:5, 2:5] = 1
    assert object_scores(empty, one).object_dice == 0.0 and object_scores(one, empty).f1 == 0.0
    pooled = ObjectScores.pooled([object_scores(one, one), object_scores(empty, one)])
    assert pooled["object_f1"] == pytest.approx(2 / 3) and pooled["object_dice"] == pytest.approx(0.5)
