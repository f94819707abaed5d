from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np
import shapely
from shapely.geometry import Polygon, box

from wsi_amr.params import ParameterError
from wsi_amr.polygons import mask_to_polygons, polygonal_parts
from wsi_amr.tiling import Block


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

    ``predict(window)`` returns (h, w, K) class probabilities for a window (float32 arrays are
    weighted in place: hand over a fresh one), or None where it has nothing to segment (no
    tissue). Windows run in raster order. Yields ``(block, probabilities, covered)`` in raster
    order: the blended (h, w, K) float32 probabilities of each block and a (h, w) bool of the
    pixels any window predicted (elsewhere the probabilities are background).

    Only the overlap bands are weighted and normalised: elsewhere a window's weight is one, so
    its probabilities pass through untouched.
    """
    if overlap and window < 2 * overlap:
        raise ParameterError(f"overlap ({overlap}) must be at most half the window ({window} px)", "overlap")
    k, ov = num_classes, overlap
    xs, ys = window_starts(width, window, overlap), window_starts(height, window, overlap)
    bottom = np.zeros((ov, width, k), np.float32)  # carried to the next row of windows
    bottom_w = np.zeros((ov, width), np.float32)
    for i, y in enumerate(ys):
        h = min(window, height - y)
        last_row = i == len(ys) - 1
        emit_h = h if last_row else h - ov
        next_bottom, next_bottom_w = np.zeros_like(bottom), np.zeros_like(bottom_w)
        right = right_w = None  # carried to the next window of this row
        y_ramp = ramp(h, ov, i > 0, not last_row)
        y_band = np.flatnonzero(y_ramp != 1)
        for j, x in enumerate(xs):
            w = min(window, width - x)
            last_col = j == len(xs) - 1
            emit_w = w if last_col else w - ov
            x_ramp = ramp(w, ov, j > 0, not last_col)
            probs = predict(Block(x, y, w, h))
            if probs is None:
                acc = np.zeros((h, w, k), np.float32)
                wgt = np.zeros((h, w), np.float32)
            else:
                if probs.shape != (h, w, k):
                    raise ValueError(f"predict returned {probs.shape} for a {w}x{h} window with {k} classes")
                acc = probs if probs.dtype == np.float32 and probs.flags.writeable else probs.astype(np.float32)
                x_band = np.flatnonzero(x_ramp != 1)
                acc[y_band] *= y_ramp[y_band, None, None]
                acc[:, x_band] *= x_ramp[None, x_band, None]
                wgt = np.outer(y_ramp, x_ramp)
            if right is not None and right_w is not None:  # the previous window's share of its left columns
                acc[:emit_h, :ov] += right
                wgt[:emit_h, :ov] += right_w
            if i > 0:  # the row above's share of the top rows (its left columns came with `right`)
                c0 = ov if j > 0 else 0
                acc[:ov, c0:w] += bottom[:, x + c0:x + w]
                wgt[:ov, c0:w] += bottom_w[:, x + c0:x + w]
            if not last_col:
                right, right_w = acc[:emit_h, emit_w:w].copy(), wgt[:emit_h, emit_w:w].copy()
            if not last_row:
                next_bottom[:, x:x + w] += acc[emit_h:h]
                next_bottom_w[:, x:x + w] += wgt[emit_h:h]
            block, block_w = acc[:emit_h, :emit_w], wgt[:emit_h, :emit_w]
            # Weights differ from one only in the bands shared with earlier windows; past them a
            # window without a prediction leaves background.
            top, left = (ov if i > 0 else 0), (ov if j > 0 else 0)
            _normalise(block[:top], block_w[:top])
            _normalise(block[top:, :left], block_w[top:, :left])
            if probs is None:
                block[top:, left:, 0] = 1.0
            yield Block(x, y, emit_w, emit_h), block, block_w > 0
        bottom, bottom_w = next_bottom, next_bottom_w


def class_map(probs: np.ndarray) -> np.ndarray:
    """(H, W) uint8 (int32 past 255 classes) most probable class of (H, W, K) probabilities, ties
    to the lower class as ``argmax``; two classes by one comparison (argmax over a short last
    axis is an order of magnitude slower)."""
    k = probs.shape[2]
    if k == 2:
        return (probs[..., 1] > probs[..., 0]).view(np.uint8)
    return probs.argmax(axis=2).astype(np.uint8 if k < 256 else np.int32)


def _normalise(acc: np.ndarray, weight: np.ndarray) -> None:
    """Divide weighted sums by their weights in place; pixels of no weight (no window predicted
    them, so their sums are zero) become background."""
    if acc.size == 0:
        return
    covered = weight > 0
    inv = np.zeros_like(weight)
    np.divide(1.0, weight, out=inv, where=covered)
    acc *= inv[..., None]
    acc[..., 0] += ~covered


def touching_groups(polys: np.ndarray) -> np.ndarray:
    """(n,) group ids: polygons that touch or overlap, directly or through others, share one.
    Unions then run per group, each small, instead of one overlay of every piece at once."""
    n = len(polys)
    group = np.arange(n)
    if n < 2:
        return group
    a, b = shapely.STRtree(polys).query(polys, predicate="intersects")
    while True:  # label propagation: each pair takes the smaller id, then ids follow their ids
        low = np.minimum(group[a], group[b])
        np.minimum.at(group, a, low)
        np.minimum.at(group, b, low)
        nxt = group[group]
        if (nxt == group).all() and (group[a] == group[b]).all():
            return group
        group = nxt


@dataclass
class SeamlessPolygons:
    """Polygons of a label image that arrives block by block, with objects whole across blocks.

    ``add`` outlines one block's labels in working px (integer vertices, so two blocks' pieces
    share their border exactly), with each piece's sum of its class probability and pixel count
    when probabilities are given. Pieces that touch the block's border are kept apart; ``finish``
    unions them per class, so a gland cut by two windows is one polygon, maps every polygon to
    output coordinates (``x * scale + offset``, once, after the union: mapped first, a border
    shared by two blocks could land one ulp apart on each side at scales like 1.24) and returns
    every class's polygons with their mean class probability.

    Objects under ``min_area`` (output units squared, measured on the exact outline) are
    dropped and the rest simplified with tolerance ``simplify`` (output units, topology kept) as
    soon as they are final: interior pieces at once, kept as compact WKB, border pieces after
    their union. Only border pieces wait whole (a thin band of any slide), so memory follows the
    objects on window borders and the simplified outlines, not the slide's pixels."""

    scale: float = 1.0
    offset: tuple[float, float] = (0.0, 0.0)
    simplify: float = 0.0
    min_area: float = 0.0
    done: dict[int, list[tuple[bytes, float, int]]] = field(default_factory=dict)
    waiting: dict[int, list[tuple[Polygon, float, int]]] = field(default_factory=dict)

    def _final(self, polys: list[Polygon] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(kept mask, kept polygons simplified) of final polygons in working px."""
        polys = np.asarray(polys, dtype=object)
        keep = shapely.area(polys) * self.scale**2 >= self.min_area if self.min_area > 0 else np.ones(len(polys), bool)
        kept = polys[keep]
        if self.simplify > 0 and len(kept):
            kept = shapely.simplify(kept, self.simplify / self.scale, preserve_topology=True)
            empty = shapely.is_empty(kept)
            if empty.any():
                keep[np.flatnonzero(keep)[empty]] = False
                kept = kept[~empty]
        return keep, kept

    def add(self, block: Block, labels: np.ndarray, probs: np.ndarray | None = None) -> None:
        ox, oy = float(block.x), float(block.y)
        edge = box(ox, oy, ox + block.w, oy + block.h).exterior
        h, w = labels.shape
        k = probs.shape[2] if probs is not None else int(labels.max()) + 1
        for label in range(1, k):
            fg = labels == label
            if not fg.any():
                continue
            polys = mask_to_polygons(fg, offset=(ox, oy))
            if not polys:
                continue
            sums, counts = np.zeros(len(polys)), np.zeros(len(polys), np.int64)
            if probs is not None:
                # 4-connected components are the traced pieces; a point inside each piece finds it.
                n, comp = cv2.connectedComponents(fg.view(np.uint8), connectivity=4)
                rows, cols = np.nonzero(fg)  # the pieces' pixels only: most of a block is something else
                ids = comp[rows, cols]
                comp_sums = np.bincount(ids, weights=probs[rows, cols, label], minlength=n)
                comp_counts = np.bincount(ids, minlength=n)
                inside = shapely.point_on_surface(polys)
                px = np.clip(np.floor(shapely.get_x(inside) - ox).astype(np.int64), 0, w - 1)
                py = np.clip(np.floor(shapely.get_y(inside) - oy).astype(np.int64), 0, h - 1)
                ids = comp[py, px]
                sums, counts = comp_sums[ids], comp_counts[ids]
            touching = shapely.intersects(polys, edge)
            waits = np.flatnonzero(touching)
            for i in waits.tolist():
                self.waiting.setdefault(label, []).append((polys[i], float(sums[i]), int(counts[i])))
            final = np.flatnonzero(~touching)
            if len(final):
                keep, kept = self._final([polys[i] for i in final.tolist()])
                wkb = shapely.to_wkb(kept)
                self.done.setdefault(label, []).extend(
                    (b, float(sums[i]), int(counts[i])) for b, i in zip(wkb.tolist(), final[keep].tolist()))

    def flush(self, y: float) -> None:
        """Blocks above working row ``y`` are all added (blocks come in raster order): join and
        finish the waiting pieces that no later block can reach, those of groups with no piece
        reaching down to ``y``. Keeps the waiting pieces to about one row of blocks."""
        for label, pieces in list(self.waiting.items()):
            if not pieces:
                continue
            polys = np.array([p for p, _, _ in pieces], dtype=object)
            group = touching_groups(polys)
            open_groups = np.unique(group[shapely.bounds(polys)[:, 3] >= y])
            ready = ~np.isin(group, open_groups)
            if not ready.any():
                continue
            idx = np.flatnonzero(ready)
            parts, totals, counts = self._join([pieces[i] for i in idx.tolist()], polys[idx], group[idx])
            if parts:
                keep, kept = self._final(parts)
                self.done.setdefault(label, []).extend(
                    zip(shapely.to_wkb(kept).tolist(), np.asarray(totals)[keep].tolist(), np.asarray(counts)[keep].tolist()))
            self.waiting[label] = [pieces[i] for i in np.flatnonzero(~ready).tolist()]

    @staticmethod
    def _join(pieces: list[tuple[Polygon, float, int]], polys: np.ndarray,
              group: np.ndarray) -> tuple[list[Polygon], list[float], list[int]]:
        """Union each group of touching pieces: the parts, and each part's sum of its class
        probability and pixel count."""
        merged_parts: list[Polygon] = []
        all_totals: list[float] = []
        all_counts: list[int] = []
        for g in np.unique(group).tolist():
            members = np.flatnonzero(group == g)
            merged = polys[members[0]] if len(members) == 1 else shapely.unary_union(polys[members])
            parts = polygonal_parts(merged)
            totals, counts = np.zeros(len(parts)), np.zeros(len(parts), np.int64)
            if len(parts) == 1:
                totals[0] = sum(pieces[i][1] for i in members)
                counts[0] = sum(pieces[i][2] for i in members)
            else:
                tree = shapely.STRtree(parts)
                piece_idx, part_idx = tree.query(shapely.point_on_surface(polys[members]), predicate="within")
                for i, j in zip(members[piece_idx].tolist(), part_idx.tolist()):
                    totals[j] += pieces[i][1]
                    counts[j] += pieces[i][2]
            merged_parts.extend(parts)
            all_totals.extend(totals.tolist())
            all_counts.extend(counts.tolist())
        return merged_parts, all_totals, all_counts

    def finish(self) -> dict[int, list[tuple[Polygon, float | None]]]:
        """``{label: [(polygon, mean class probability or None), ...]}`` in label order. Once:
        the pieces are handed over, not kept."""
        self.flush(math.inf)  # no block is to come: every waiting group is complete
        out: dict[int, list[tuple[Polygon, float | None]]] = {}
        for label, pieces in self.done.items():
            polys = shapely.from_wkb([b for b, _, _ in pieces])
            out[label] = [(p, t / c if c else None) for p, (_, t, c) in zip(polys.tolist(), pieces)]
        self.done, self.waiting = {}, {}
        scale, offset = np.array([self.scale, self.scale]), np.asarray(self.offset, np.float64)
        for label, items in out.items():
            polys = shapely.orient_polygons(np.array([p for p, _ in items], dtype=object), exterior_cw=False)
            if self.scale != 1.0 or offset.any():
                polys = shapely.transform(polys, lambda xy: xy * scale + offset)
            out[label] = [(p, m) for p, (_, m) in zip(polys.tolist(), items)]
        return dict(sorted(out.items()))
