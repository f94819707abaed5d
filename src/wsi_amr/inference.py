"""Whole-slide inference building blocks: overlapping windows blended in a stream, and polygons
without seams.

A slide at the working resolution is segmented window by window (windows of ``window`` px that
overlap by ``overlap`` px). Each window's class probabilities are weighted by a ramp that rises
across the overlaps it shares with its neighbours (the weights of overlapping windows sum to one),
and :func:`blend_stream` hands back final blocks in raster order as soon as no later window can
change them. Only the overlaps still waiting for their next window are held: one band of
``overlap`` rows over the slide's width, and one of ``overlap`` columns beside the current window,
so memory grows with the slide's width times the overlap, not with its area.

Blocks tile the working image exactly. Their label maps are outlined on pixel edges
(:func:`wsi_amr.polygons.labels_to_polygons`), so two pieces of one object in neighbouring blocks
share their border exactly; :class:`SeamlessPolygons` keeps pieces that touch a block border
apart and unions them at the end, so objects that cross windows come out whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np
import shapely
from shapely.geometry import Polygon, box

from .polygons import labels_to_polygons, polygonal_parts


@dataclass(frozen=True)
class Block:
    """A rectangle of the working image: top-left (x, y) and size (w, h), working px."""

    x: int
    y: int
    w: int
    h: int


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """Window origins along one axis: every ``window - overlap`` px until the image is covered.

    The last window is cut at the image's end; it is always wider than the overlap."""
    if window <= 0 or not 0 <= overlap < window:
        raise ValueError(f"need 0 <= overlap ({overlap}) < window ({window})")
    starts = [0]
    while starts[-1] + window < length:
        starts.append(starts[-1] + window - overlap)
    return starts


def ramp(n: int, overlap: int, rise: bool, fall: bool) -> np.ndarray:
    """(n,) weights: rising across the first ``overlap`` px (``rise``) and falling across the last
    (``fall``), 1 between. A rise and the fall of the window before it sum to one everywhere."""
    out = np.ones(n, np.float32)
    if overlap:
        t = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        if rise:
            out[:overlap] = t
        if fall:
            out[n - overlap:] *= t[::-1]
    return out


def blend_stream(
    width: int,
    height: int,
    window: int,
    overlap: int,
    num_classes: int,
    predict: Callable[[Block], np.ndarray | None],
) -> Iterator[tuple[Block, np.ndarray, np.ndarray]]:
    """Segment a ``width`` x ``height`` image window by window and yield final blocks.

    ``predict(window)`` returns (h, w, K) class probabilities for a window, or None where it has
    nothing to segment (no tissue). Windows run in raster order. Yields ``(block, probabilities,
    covered)`` in raster order: the blended (h, w, K) float32 probabilities of each block and a
    (h, w) bool of the pixels any window predicted (elsewhere the probabilities are background).
    """
    if overlap and window < 2 * overlap:
        raise ValueError(f"--overlap ({overlap}) must be at most half the window ({window})")
    k = num_classes
    xs, ys = window_starts(width, window, overlap), window_starts(height, window, overlap)
    bottom = np.zeros((overlap, width, k + 1), np.float32)  # carry to the next row of windows
    for i, y in enumerate(ys):
        h = min(window, height - y)
        last_row = i == len(ys) - 1
        emit_h = h if last_row else h - overlap
        next_bottom = np.zeros_like(bottom)
        right: np.ndarray | None = None  # carry to the next window of this row
        y_ramp = ramp(h, overlap, i > 0, not last_row)
        for j, x in enumerate(xs):
            w = min(window, width - x)
            last_col = j == len(xs) - 1
            emit_w = w if last_col else w - overlap
            acc = np.zeros((h, w, k + 1), np.float32)
            probs = predict(Block(x, y, w, h))
            if probs is not None:
                if probs.shape != (h, w, k):
                    raise ValueError(f"predict returned {probs.shape} for a {w}x{h} window with {k} classes")
                weight = y_ramp[:, None] * ramp(w, overlap, j > 0, not last_col)[None, :]
                np.multiply(probs, weight[..., None], out=acc[..., :k])
                acc[..., k] = weight
            if right is not None:  # the previous window's share of this window's left columns
                acc[:emit_h, :overlap] += right
            if i > 0:  # the row above's share of the top rows (its left columns came with `right`)
                c0 = overlap if j > 0 else 0
                acc[:overlap, c0:w] += bottom[:, x + c0:x + w]
            if not last_col:
                right = acc[:emit_h, emit_w:w].copy()
            if not last_row:
                next_bottom[:, x:x + w] += acc[emit_h:h]
            block = acc[:emit_h, :emit_w]
            yield Block(x, y, emit_w, emit_h), *_normalised(block, k)
        bottom = next_bottom


def _normalised(acc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    weight = acc[..., k]
    covered = weight > 0
    probs = np.zeros(acc.shape[:2] + (k,), np.float32)
    np.divide(acc[..., :k], weight[..., None], out=probs, where=covered[..., None])
    probs[~covered, 0] = 1.0
    return probs, covered


@dataclass
class SeamlessPolygons:
    """Polygons of a label image that arrives block by block, with objects whole across blocks.

    ``add`` outlines one block's labels (working px) and maps them to output coordinates
    (``x * scale + offset``), with each piece's sum of its class probability and pixel count when
    probabilities are given. Pieces that touch the block's border are kept apart; ``finish``
    unions them per class, so a gland cut by two windows is one polygon, and returns every
    class's polygons with their mean class probability. Interior pieces are final at once; only
    border pieces wait (a thin band of any slide), so memory follows the objects on window
    borders, not the slide."""

    scale: float = 1.0
    offset: tuple[float, float] = (0.0, 0.0)
    done: dict[int, list[tuple[Polygon, float, int]]] = field(default_factory=dict)
    waiting: dict[int, list[tuple[Polygon, float, int]]] = field(default_factory=dict)

    def add(self, block: Block, labels: np.ndarray, probs: np.ndarray | None = None) -> None:
        ox = self.offset[0] + block.x * self.scale
        oy = self.offset[1] + block.y * self.scale
        edge = box(ox, oy, ox + block.w * self.scale, oy + block.h * self.scale).exterior
        h, w = labels.shape
        for label, polys in labels_to_polygons(labels, scale=self.scale, offset=(ox, oy)).items():
            if not polys:
                continue
            sums, counts = np.zeros(len(polys)), np.zeros(len(polys), np.int64)
            if probs is not None:
                # 4-connected components are the traced pieces; a point inside each piece finds it.
                fg = labels == label
                n, comp = cv2.connectedComponents(fg.view(np.uint8), connectivity=4)
                ids = comp[fg]
                comp_sums = np.bincount(ids, weights=probs[..., label][fg], minlength=n)
                comp_counts = np.bincount(ids, minlength=n)
                inside = shapely.point_on_surface(polys)
                px = np.clip(np.floor((shapely.get_x(inside) - ox) / self.scale).astype(np.int64), 0, w - 1)
                py = np.clip(np.floor((shapely.get_y(inside) - oy) / self.scale).astype(np.int64), 0, h - 1)
                ids = comp[py, px]
                sums, counts = comp_sums[ids], comp_counts[ids]
            touching = shapely.intersects(polys, edge)
            for poly, waits, total, count in zip(polys, touching.tolist(), sums.tolist(), counts.tolist()):
                (self.waiting if waits else self.done).setdefault(label, []).append((poly, total, count))

    def finish(self) -> dict[int, list[tuple[Polygon, float | None]]]:
        """``{label: [(polygon, mean class probability or None), ...]}`` in label order."""
        out: dict[int, list[tuple[Polygon, float | None]]] = {}
        for label, pieces in self.done.items():
            out.setdefault(label, []).extend((p, t / c if c else None) for p, t, c in pieces)
        for label, pieces in self.waiting.items():
            parts = polygonal_parts(shapely.unary_union([p for p, _, _ in pieces]))
            totals, counts = np.zeros(len(parts)), np.zeros(len(parts), np.int64)
            tree = shapely.STRtree(parts)
            points = shapely.point_on_surface([p for p, _, _ in pieces])
            piece_idx, part_idx = tree.query(points, predicate="within")
            for i, j in zip(piece_idx.tolist(), part_idx.tolist()):
                totals[j] += pieces[i][1]
                counts[j] += pieces[i][2]
            out.setdefault(label, []).extend(
                (p, float(t / c) if c else None) for p, t, c in zip(parts, totals.tolist(), counts.tolist()))
        return dict(sorted(out.items()))
