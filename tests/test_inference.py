"""Streaming blend of overlapping windows and seam-free polygons (synthetic arrays)."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from wsi_amr.polygons import mask_to_polygons
from wsi_amr.segmentation.windows import SeamlessPolygons, blend_stream, ramp, window_starts
from wsi_amr.tiling import Block


def field(h: int, w: int, k: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth class probabilities over a whole image."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(h // 8 + 2, w // 8 + 2, k)).astype(np.float32)
    big = np.kron(logits, np.ones((8, 8, 1), np.float32))[:h, :w]
    e = np.exp(big - big.max(axis=2, keepdims=True))
    return e / e.sum(axis=2, keepdims=True)


def run(width, height, window, overlap, predict, k=3):
    out = np.full((height, width, k), np.nan, np.float32)
    covered = np.zeros((height, width), np.int32)
    blocks = []
    for block, probs, cov in blend_stream(width, height, window, overlap, k, predict):
        sl = np.s_[block.y:block.y + block.h, block.x:block.x + block.w]
        assert np.isnan(out[sl]).all(), "blocks overlap"
        out[sl] = probs
        covered[sl] += cov
        blocks.append(block)
    return out, covered, blocks


def test_window_starts_cover_the_image_with_the_overlap():
    assert window_starts(1000, 1000, 100) == [0]
    assert window_starts(1001, 1000, 100) == [0, 900]
    starts = window_starts(5000, 1024, 128)
    assert all(b - a == 896 for a, b in zip(starts, starts[1:])) and starts[-1] + 1024 >= 5000
    assert 5000 - starts[-1] > 128
    with pytest.raises(ValueError):
        window_starts(100, 64, 64)


def test_ramps_of_neighbours_sum_to_one():
    a, b = ramp(100, 20, False, True), ramp(100, 20, True, False)
    np.testing.assert_allclose(a[80:] + b[:20], 1.0, rtol=1e-6)
    assert (a[:80] == 1).all() and (b[20:] == 1).all()


@pytest.mark.parametrize("size,window,overlap", [((300, 200), 64, 16), ((257, 129), 128, 32), ((90, 70), 128, 16),
                                                 ((500, 260), 100, 0)])
def test_consistent_windows_blend_back_to_the_field_and_blocks_tile_the_image(size, window, overlap):
    width, height = size
    truth = field(height, width)

    def predict(b: Block) -> np.ndarray:
        return truth[b.y:b.y + b.h, b.x:b.x + b.w].copy()  # blend_stream weights it in place

    out, covered, _ = run(width, height, window, overlap, predict)
    assert not np.isnan(out).any() and (covered == 1).all()
    np.testing.assert_allclose(out, truth, atol=1e-5)


@pytest.mark.parametrize("size,window,overlap", [((300, 200), 64, 16), ((150, 97), 40, 20), ((90, 70), 128, 16)])
def test_blend_equals_the_weighted_mean_of_all_windows(size, window, overlap):
    # Independent random windows (some without tissue): each pixel is the ramp-weighted mean of
    # the windows over it, computed here on a whole canvas.
    width, height = size
    rng = np.random.default_rng(1)
    xs, ys = window_starts(width, window, overlap), window_starts(height, window, overlap)
    preds = {}
    num = np.zeros((height, width, 3))
    den = np.zeros((height, width))
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            w, h = min(window, width - x), min(window, height - y)
            if rng.random() < 0.3:
                preds[(x, y)] = None
                continue
            p = rng.dirichlet(np.ones(3), size=(h, w)).astype(np.float32)
            preds[(x, y)] = p
            wt = np.outer(ramp(h, overlap, i > 0, i < len(ys) - 1), ramp(w, overlap, j > 0, j < len(xs) - 1))
            num[y:y + h, x:x + w] += p * wt[..., None]
            den[y:y + h, x:x + w] += wt

    def predict(b: Block) -> np.ndarray | None:
        p = preds[(b.x, b.y)]
        return None if p is None else p.copy()

    out, covered, _ = run(width, height, window, overlap, predict)
    ref = np.zeros_like(num)
    np.divide(num, den[..., None], out=ref, where=den[..., None] > 0)
    ref[den == 0, 0] = 1
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert ((covered == 1) == (den > 0)).all()


def test_overlaps_mix_neighbouring_windows_linearly():
    # Every window says "class 1" or "class 2" by its column parity: the overlap between two
    # windows ramps from one to the other.
    def predict(b: Block) -> np.ndarray:
        p = np.zeros((b.h, b.w, 3), np.float32)
        p[..., 1 + (b.x // 48) % 2] = 1.0
        return p

    out, _, _ = run(160, 64, 64, 16, predict)
    row = out[10, 48:64]  # the overlap of windows at x=0 and x=48
    assert np.all(np.diff(row[:, 1]) < 0) and np.all(np.diff(row[:, 2]) > 0)
    np.testing.assert_allclose(row.sum(axis=1), 1.0, rtol=1e-6)


def test_windows_without_tissue_give_background_and_are_not_covered():
    def predict(b: Block) -> np.ndarray | None:
        return None if b.x >= 100 else np.full((b.h, b.w, 2), 0.5, np.float32)

    out, covered, _ = run(300, 100, 100, 20, predict, k=2)
    assert covered[:, :80].all() and not covered[:, 180:].any()
    assert (out[:, 180:, 0] == 1).all() and (out[:, :80] == 0.5).all()
    # In the overlap with a window that had nothing, the one that predicted counts alone.
    np.testing.assert_allclose(out[:, 80:100], 0.5)


def test_bad_overlap_and_predictions_are_refused():
    with pytest.raises(ValueError, match="half the window"):
        list(blend_stream(100, 100, 64, 40, 2, lambda b: None))
    with pytest.raises(ValueError, match="predict returned"):
        list(blend_stream(100, 100, 64, 16, 2, lambda b: np.zeros((3, 3, 2), np.float32)))


def test_objects_cut_by_blocks_come_out_whole():
    yy, xx = np.mgrid[0:200, 0:300]
    labels = np.zeros((200, 300), np.uint8)
    labels[(xx - 100) ** 2 + (yy - 100) ** 2 < 60**2] = 1  # crosses block borders at 64, 128
    labels[150:190, 200:290] = 2  # a rectangle crossing a border
    labels[5:8, 5:8] = 1  # a small object inside one block
    labels[0, 299] = 2  # one pixel at the image corner
    probs = np.zeros((200, 300, 3), np.float32)
    probs[..., 1] = 0.9
    probs[..., 2] = np.where(xx < 250, 0.6, 0.8)  # the rectangle: 50 px at 0.6, 40 at 0.8 per row
    seam = SeamlessPolygons(scale=2.0, offset=(10.0, 20.0))
    for y in range(0, 200, 64):
        for x in range(0, 300, 64):
            b = Block(x, y, min(64, 300 - x), min(64, 200 - y))
            seam.add(b, labels[b.y:b.y + b.h, b.x:b.x + b.w], probs[b.y:b.y + b.h, b.x:b.x + b.w])
    result = seam.finish()
    got = {label: [p for p, _ in items] for label, items in result.items()}
    assert all(m == pytest.approx(0.9) for _, m in result[1])
    rect = max(result[2], key=lambda item: item[0].area)
    assert rect[1] == pytest.approx((50 * 0.6 + 40 * 0.8) / 90)
    want = {v: mask_to_polygons(labels == v, scale=2.0, offset=(10.0, 20.0)) for v in (1, 2)}
    assert sorted(got) == [1, 2]
    for label in (1, 2):
        assert len(got[label]) == len(want[label])
        union_got, union_want = shapely.unary_union(got[label]), shapely.unary_union(want[label])
        assert union_got.symmetric_difference(union_want).area == 0
        assert all(p.is_valid for p in got[label])
    assert sum(p.area for p in got[1]) == (labels == 1).sum() * 4.0
