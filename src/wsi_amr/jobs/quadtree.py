"""``wsi-amr quadtree``: adaptive quadtree leaves over the tissue of one slide, window by window.

A whole slide at the working resolution does not fit in memory, so it is processed in square
windows of ``window`` working px, aligned to the quadtree's root grid from the slide's top-left
corner (``window`` is a multiple of ``max_size``, so no root crosses a window). Each window is read
with a margin so that the blur and Canny see across its borders, and its edge map is cropped back
to the window: the leaves are the same as those of one tree over the whole working image. Windows
without tissue are never read. Memory is bounded by the window, whatever the slide size.

Threshold mode builds each window's tree with :func:`wsi_amr.quadtree.build_quadtree`. Budget mode
(``max_tokens``) is per slide and exact: it gives the leaves that splitting the most detailed leaf
of the whole slide until the budget is reached would give (see :class:`BudgetMerge`), in two passes
over the windows, keeping only each window's edge counts at ``min_size`` cells (on disk) between
them.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..batch import EmptySlide, JobContext
from ..inference import Block
from ..outputs import TMP_PREFIX, atomic_path, write_png_atomic
from ..quadtree import (Leaves, QuadtreeParams, box_sums, detail_score, build_quadtree, morton_order, params_edge_map,
                        uniform_token_count)
from ..slide import Resolution, Slide, SlideError, open_slide
from ..tokens import labels_round_trip
from .tissue import ASSUMED_MPP, load_or_detect, tissue_params

QUADTREE_FILE = "quadtree.h5"
OVERLAY_FILE = "quadtree.png"
OVERLAY_SIDE = 2048
# Working px read around each window: Gaussian blur, Sobel and non-maximum suppression reach
# 1-2 px; the rest covers Canny's hysteresis, which follows weak edges across the border.
EDGE_MARGIN = 16
MASK_IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
MASK_GEOJSON_SUFFIXES = (".geojson", ".json", ".geojson.gz", ".json.gz")
MASK_SUFFIXES = MASK_IMAGE_SUFFIXES + MASK_GEOJSON_SUFFIXES


class MaskError(SlideError):
    """A ``--mask`` that cannot be used with this slide; one line for the user."""


# -------------------------------------------------------------------------------------------------
# Windows
# -------------------------------------------------------------------------------------------------
#: A window of the working image: top-left (x, y) and size (w, h), working px (the rectangle
#: type that whole-slide inference uses too).
Window = Block

def window_grid(width: int, height: int, window: int) -> list[Window]:
    """Windows of ``window`` px covering a ``width`` x ``height`` working image, row by row from
    the top-left; the last column and row are cut at the image edge."""
    return [
        Window(x, y, min(window, width - x), min(window, height - y))
        for y in range(0, height, window)
        for x in range(0, width, window)
    ]


def sample_mask(mask: np.ndarray, mask_downsample: float, downsample: float, win: Window) -> np.ndarray:
    """A low-resolution mask (``mask_downsample`` level-0 px per px) sampled at the working
    resolution (``downsample``) over ``win``: nearest neighbour, the mask pixel under each working
    pixel's centre. Past the mask's edge the last row or column repeats."""
    f = downsample / mask_downsample
    cols = np.minimum(((win.x + np.arange(win.w) + 0.5) * f).astype(np.int64), mask.shape[1] - 1)
    rows = np.minimum(((win.y + np.arange(win.h) + 0.5) * f).astype(np.int64), mask.shape[0] - 1)
    return mask[rows[:, None], cols[None, :]]


def read_window(slide: Slide, win: Window, downsample: float, size: tuple[int, int], margin: int) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB of ``win`` plus up to ``margin`` working px on each side (never past the working image
    of ``size`` (w, h), so the slide's own edges are treated as in one whole-image read); and the
    offset (left, top) of the window inside it."""
    left, top = min(margin, win.x), min(margin, win.y)
    right = min(margin, size[0] - win.x - win.w)
    bottom = min(margin, size[1] - win.y - win.h)
    rgb = slide.read_region((win.x - left) * downsample, (win.y - top) * downsample,
                            win.w + left + right, win.h + top + bottom, downsample)
    return rgb, (left, top)


# -------------------------------------------------------------------------------------------------
# Budget mode over windows
# -------------------------------------------------------------------------------------------------
@dataclass
class Cells:
    """Edge pixels and tissue of a window's padded root grid, summed over ``min_size`` cells: all a
    budget tree needs (every node is a whole number of cells)."""

    edges: np.ndarray  # (rows, cols) int32 edge pixels per cell
    tissue: np.ndarray  # (rows, cols) bool, any tissue in the cell

    @staticmethod
    def of(edges: np.ndarray, tissue: np.ndarray | None, params: QuadtreeParams, shape: tuple[int, int]) -> Cells:
        """Cells of a (H, W) = ``shape`` window from its edge map (at ``params.edge_downsample``)."""
        h, w = shape
        f, m = params.edge_downsample, params.min_size
        rows, cols = -(-h // params.max_size) * params.max_size, -(-w // params.max_size) * params.max_size
        r, c = rows // m, cols // m
        e = np.zeros((rows // f, cols // f), np.uint8)
        e[:edges.shape[0], :edges.shape[1]] = edges > 0
        t = np.zeros((rows, cols), bool)
        t[:h, :w] = True if tissue is None else tissue
        return Cells(e.reshape(r, m // f, c, m // f).sum(axis=(1, 3), dtype=np.int32),
                     t.reshape(r, m, c, m).any(axis=(1, 3)))


def _integral_of_cells(a: np.ndarray) -> np.ndarray:
    out = np.zeros((a.shape[0] + 1, a.shape[1] + 1), np.int64)
    np.cumsum(np.cumsum(a, axis=0, dtype=np.int64), axis=1, out=out[1:, 1:])
    return out


@dataclass
class Splits:
    """The greedy budget process of one window: each split's score and leaf-count change, and the
    leaves after the last split. A split that was due but not taken (the window's budget was
    reached) ends the list with a change larger than any budget, so that the slide stops there."""

    scores: np.ndarray  # (n,) float64, score of the leaf split
    deltas: np.ndarray  # (n,) int64, children with tissue - 1 (or the stop marker)
    x: list[int] = field(default_factory=list)
    y: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    detail: list[float] = field(default_factory=list)


def greedy_splits(cells: Cells, params: QuadtreeParams, cap: int, max_splits: int | None = None,
                  stop_below: float = -math.inf) -> Splits:
    """Split the most detailed splittable leaf of one window while it has fewer than ``cap``
    leaves (as :func:`wsi_amr.quadtree.build_quadtree` does in budget mode, same order, same
    ties), for at most ``max_splits`` splits, and only while the scores of the leaves split so far
    stay at or above ``stop_below``. Coordinates in working px relative to the window."""
    m, top = params.min_size, params.max_size
    e_int, t_int = _integral_of_cells(cells.edges), _integral_of_cells(cells.tissue)

    def sums(integral: np.ndarray, x: np.ndarray, y: np.ndarray, s: np.ndarray) -> np.ndarray:
        return box_sums(integral, x, y, s, m)

    def score(count: np.ndarray, s: np.ndarray) -> np.ndarray:
        return detail_score(count, s, params.normalise)

    rows, cols = cells.edges.shape[0] * m, cells.edges.shape[1] * m
    gy, gx = np.mgrid[0:rows:top, 0:cols:top]
    x, y = gx.ravel().astype(np.int64), gy.ravel().astype(np.int64)
    s = np.full(len(x), top, np.int64)
    keep = sums(t_int, x, y, s) > 0
    x, y, s = x[keep], y[keep], s[keep]
    sc = score(sums(e_int, x, y, s), s)
    leaves: dict[int, tuple[int, int, int, int, float]] = {}
    heap: list[tuple[float, int]] = []
    next_id = 0
    for xi, yi, si, v in zip(x.tolist(), y.tolist(), s.tolist(), sc.tolist()):
        leaves[next_id] = (xi, yi, si, 0, v)
        if si > m:
            heapq.heappush(heap, (-v, next_id))
        next_id += 1
    scores: list[float] = []
    deltas: list[int] = []
    lowest = math.inf  # the running minimum: a split's rank among all windows' splits
    while heap and (max_splits is None or len(scores) < max_splits):
        neg, lid = heap[0]
        lowest = min(lowest, -neg)
        if lowest < stop_below:
            break
        if len(leaves) >= cap:
            scores.append(-neg)
            deltas.append(cap + 1)
            break
        xi, yi, si, di, _ = leaves[lid]
        h = si // 2
        cx = np.array([xi, xi + h, xi, xi + h], np.int64)
        cy = np.array([yi, yi, yi + h, yi + h], np.int64)
        cs = np.full(4, h, np.int64)
        has = sums(t_int, cx, cy, cs) > 0
        n_children = int(has.sum())
        if len(leaves) - 1 + n_children > cap:
            scores.append(-neg)
            deltas.append(cap + 1)
            break
        heapq.heappop(heap)
        del leaves[lid]
        scores.append(-neg)
        deltas.append(n_children - 1)
        csc = score(sums(e_int, cx, cy, cs), cs)
        for k in np.flatnonzero(has).tolist():
            leaves[next_id] = (int(cx[k]), int(cy[k]), h, di + 1, float(csc[k]))
            if h > m:
                heapq.heappush(heap, (-float(csc[k]), next_id))
            next_id += 1
    out = Splits(np.asarray(scores, np.float64), np.asarray(deltas, np.int64))
    for xi, yi, si, di, v in leaves.values():
        out.x.append(xi)
        out.y.append(yi)
        out.size.append(si)
        out.depth.append(di)
        out.detail.append(v)
    return out


@dataclass
class BudgetMerge:
    """The budget process of a whole slide, assembled from its windows' processes.

    Splitting the slide's most detailed leaf first is, window by window, the same as letting each
    window split its own most detailed leaf and always advancing the window whose next split
    scores highest (no root crosses a window). That interleaving equals a stable sort of all
    windows' splits by each split's running minimum score within its window, descending (a
    window's later splits cannot overtake its earlier ones). The slide stops at the first split
    that would start at ``budget`` leaves or pass it. Splits past that point can never come back
    as more windows are merged (they only add splits in front), so only the kept prefix is held:
    memory O(budget), not O(windows x budget).
    """

    budget: int
    roots: int  # tissue roots of the whole slide
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    deltas: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    windows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    cutoff: float = -math.inf  # a window's splits scoring below this cannot be kept

    def add(self, window: int, splits: Splits) -> None:
        keys = np.minimum.accumulate(splits.scores) if len(splits.scores) else splits.scores
        k = np.concatenate([self.keys, keys])
        d = np.concatenate([self.deltas, splits.deltas])
        w = np.concatenate([self.windows, np.full(len(keys), window, np.int64)])
        seq = np.arange(len(k))  # earlier windows (and earlier splits) first on ties
        order = np.lexsort((seq, w, -k))
        k, d, w = k[order], d[order], w[order]
        after = self.roots + np.cumsum(d)
        stop = ((after - d) >= self.budget) | (after > self.budget)
        if stop.any():
            cut = int(np.argmax(stop))
            self.cutoff = max(self.cutoff, float(k[cut]))
            k, d, w = k[:cut], d[:cut], w[:cut]
        self.keys, self.deltas, self.windows = k, d, w

    def splits_of(self, window: int) -> int:
        """How many of ``window``'s own splits the slide takes."""
        return int((self.windows == window).sum())


# -------------------------------------------------------------------------------------------------
# Reference masks (--mask)
# -------------------------------------------------------------------------------------------------
@dataclass
class LabelMask:
    """A reference label mask over the slide: a label image at an integer downsample of level 0, or
    polygons in level-0 px (QuPath coordinates, i.e. minus the slide's bounds offset)."""

    classes: dict[str, int]  # class name (or label value) -> label id, 1..K-1; 0 is background
    image: np.ndarray | None = None
    downsample: float = 1.0
    polygons: list[tuple[int, Any]] = field(default_factory=list)  # (label id, geometry)
    offset: tuple[float, float] = (0.0, 0.0)  # added to polygon coordinates to get level-0 px

    @property
    def num_classes(self) -> int:
        return max(self.classes.values(), default=0) + 1

    def window(self, win: Window, downsample: float) -> np.ndarray:
        dtype = np.uint8 if self.num_classes <= 256 else np.int32
        if self.image is not None:
            return sample_mask(self.image, self.downsample, downsample, win).astype(dtype, copy=False)
        from shapely import box

        from ..polygons import rasterize_polygons

        out = np.zeros((win.h, win.w), np.uint8)
        ox, oy = win.x * downsample - self.offset[0], win.y * downsample - self.offset[1]
        bounds = box(ox, oy, ox + win.w * downsample, oy + win.h * downsample)
        for label, geom in self.polygons:  # later classes paint over earlier ones
            if geom.intersects(bounds):
                rasterize_polygons(geom, (win.h, win.w), scale=downsample, offset=(ox, oy), value=label, out=out)
        return out.astype(dtype, copy=False)


def load_label_mask(path: Path, slide: Slide) -> tuple[LabelMask, list[str]]:
    """Read ``--mask`` for ``slide``; :class:`MaskError` with one line when it cannot be used.

    Returns the mask and warnings (features a GeoJSON reader skipped)."""
    name = path.name.lower()
    if name.endswith(MASK_GEOJSON_SUFFIXES):
        return _geojson_mask(path, slide)
    if name.endswith(MASK_IMAGE_SUFFIXES):
        return _image_mask(path, slide), []
    raise MaskError(f"{path}: --mask must be a label image (.png, .tif) or QuPath GeoJSON (.geojson)")


def _image_mask(path: Path, slide: Slide) -> LabelMask:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise MaskError(f"{path}: cannot read the --mask image (PNG or TIFF label image expected)")
    if img.ndim == 3:
        if not all(np.array_equal(img[..., 0], img[..., c]) for c in range(1, img.shape[2])):
            raise MaskError(f"{path}: --mask has colour channels; give a single-channel label image")
        img = img[..., 0]
    if not np.issubdtype(img.dtype, np.integer):
        raise MaskError(f"{path}: --mask must hold integer labels, not {img.dtype}")
    w0, h0 = slide.dimensions
    mh, mw = img.shape
    f = max(1, round(w0 / mw))
    if mw not in (w0 // f, -(-w0 // f)) or mh not in (h0 // f, -(-h0 // f)):
        raise MaskError(
            f"{path}: mask is {mw}x{mh} px but {slide.name} is {w0}x{h0} px at level 0; "
            "give a mask of the slide's level-0 size or an exact integer downsample of it"
        )
    # Compact label ids (a 0/255 mask becomes 0/1): background stays 0.
    values = np.unique(img)
    values = values[values != 0]
    if len(values) > 65535:
        raise MaskError(f"{path}: --mask has {len(values)} distinct labels; give class labels, not instances")
    ids = np.searchsorted(values, img) + 1
    ids[img == 0] = 0
    classes = {str(int(v)): i + 1 for i, v in enumerate(values.tolist())}
    dtype = np.uint8 if len(values) < 256 else np.uint16
    return LabelMask(classes, image=ids.astype(dtype), downsample=float(f))


def _geojson_mask(path: Path, slide: Slide) -> tuple[LabelMask, list[str]]:
    from ..geojson import GeoJSONError, read_geojson
    from ..polygons import polygonal_parts

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            objects = read_geojson(path)
        except GeoJSONError as exc:
            raise MaskError(f"{exc} (--mask)") from exc
    classes: dict[str, int] = {}
    polygons: list[tuple[int, Any]] = []
    for obj in objects:
        if not polygonal_parts(obj.geometry):
            continue
        cls = obj.class_name or "Unclassified"
        label = classes.setdefault(cls, len(classes) + 1)
        polygons.append((label, obj.geometry))
    if not polygons:
        raise MaskError(f"{path}: --mask GeoJSON holds no polygon to use as a label")
    polygons.sort(key=lambda p: p[0])
    bx, by = slide.bounds_offset
    return LabelMask(classes, polygons=polygons, offset=(float(bx), float(by))), [str(w.message) for w in caught]


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


# -------------------------------------------------------------------------------------------------
# Outputs
# -------------------------------------------------------------------------------------------------
def depth_colors(depth: np.ndarray, max_depth: int) -> np.ndarray:
    """(N, 3) uint8 RGB per depth: large leaves blue through green and yellow to the smallest red."""
    t = depth.astype(np.float64) / max(1, max_depth)
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0, ::-1]
    # Skip JET's dark ends so both extremes stay readable on tissue.
    return lut[np.round(32 + t * 192).astype(np.int64)]


def draw_leaves(rgb: np.ndarray, boxes: np.ndarray, colors: np.ndarray, scale: float) -> np.ndarray:
    """``rgb`` with each leaf's border in its colour, blended so the tissue stays visible; leaves
    under 3 px there are filled instead (their borders would only make a solid carpet).
    ``boxes`` (N, 3) (x, y, size) in units of ``1 / scale`` px of ``rgb``; ``colors`` (N, 3) RGB."""
    out = rgb.copy()
    if len(boxes) == 0:
        return out
    h, w = out.shape[:2]
    x0 = np.floor(boxes[:, 0] * scale).astype(np.int64)
    y0 = np.floor(boxes[:, 1] * scale).astype(np.int64)
    x1 = np.maximum(x0 + 1, np.round((boxes[:, 0] + boxes[:, 2]) * scale).astype(np.int64))
    y1 = np.maximum(y0 + 1, np.round((boxes[:, 1] + boxes[:, 2]) * scale).astype(np.int64))
    side = boxes[:, 2] * scale
    # Drawn on a black layer (the colour map has no black), then blended where drawn.
    layer = np.zeros_like(out)
    dot = np.flatnonzero(side < 1.5)  # about one pixel each: no loop, millions are fine
    layer[np.clip(y0[dot], 0, h - 1), np.clip(x0[dot], 0, w - 1)] = colors[dot]
    for i in np.flatnonzero((side >= 1.5) & (side < 3.0)).tolist():
        layer[y0[i]:y1[i], x0[i]:x1[i]] = colors[i]
    for i in np.flatnonzero(side >= 3.0).tolist():
        c = tuple(int(v) for v in colors[i])
        cv2.rectangle(layer, (int(x0[i]), int(y0[i])), (int(x1[i]) - 1, int(y1[i]) - 1), c, 1)
    drawn = layer.any(axis=2)
    out[drawn] = (0.3 * out[drawn] + 0.7 * layer[drawn]).astype(np.uint8)
    return out


def write_quadtree_h5(path: Path, boxes: np.ndarray, depth: np.ndarray, detail: np.ndarray,
                      downsample: float, attrs: dict[str, Any]) -> None:
    """Write ``quadtree.h5``: ``leaves`` (N, 3) int64 (x, y, size) in working px,
    ``leaves_level0`` (N, 3) float64 in level-0 px, ``depth`` (N,) int16, ``detail`` (N,) float32;
    ``attrs`` on the file (None values left out)."""
    import h5py

    boxes = np.asarray(boxes, np.int64).reshape(-1, 3)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("leaves", data=boxes)
        f.create_dataset("leaves_level0", data=boxes.astype(np.float64) * float(downsample))
        f.create_dataset("depth", data=np.asarray(depth, np.int16))
        f.create_dataset("detail", data=np.asarray(detail, np.float32))
        for key, value in attrs.items():
            if value is not None:
                f.attrs[key] = value


# -------------------------------------------------------------------------------------------------
# The job
# -------------------------------------------------------------------------------------------------
def quadtree_params(params: dict[str, Any]) -> QuadtreeParams:
    return QuadtreeParams(**{k: v for k, v in params.items() if k in QuadtreeParams.__dataclass_fields__})


@dataclass
class _Tally:
    read: float = 0.0
    edges: float = 0.0
    tree: float = 0.0
    uniform_seconds: float = 0.0
    uniform: int = 0
    windows_read: int = 0
    boxes: list[np.ndarray] = field(default_factory=list)
    depth: list[np.ndarray] = field(default_factory=list)
    detail: list[np.ndarray] = field(default_factory=list)

    def count_uniform(self, win: Window, tissue: np.ndarray | None, min_size: int) -> None:
        t0 = time.perf_counter()
        self.uniform += uniform_token_count((win.h, win.w), min_size, tissue)
        self.uniform_seconds += time.perf_counter() - t0

    def add_leaves(self, win: Window, leaves: Leaves) -> None:
        self.boxes.append(np.stack([leaves.x + win.x, leaves.y + win.y, leaves.size], axis=1).astype(np.int64))
        self.depth.append(np.asarray(leaves.depth, np.int16))
        self.detail.append(np.asarray(leaves.detail, np.float32))


def root_count(win: Window, tissue: np.ndarray | None, max_size: int) -> int:
    """Roots (``max_size`` squares from the window's top-left) holding tissue; all without a mask."""
    rows, cols = -(-win.h // max_size), -(-win.w // max_size)
    if tissue is None:
        return rows * cols
    padded = np.zeros((rows * max_size, cols * max_size), bool)
    padded[: win.h, : win.w] = tissue
    return int(padded.reshape(rows, max_size, cols, max_size).any(axis=(1, 3)).sum())


def _leaves_of(s: Splits) -> Leaves:
    return Leaves(np.asarray(s.x, np.int64), np.asarray(s.y, np.int64), np.asarray(s.size, np.int64),
                  np.asarray(s.depth, np.int16), np.asarray(s.detail, np.float32))


def run(ctx: JobContext) -> dict[str, Any]:
    qp = ctx.params["quadtree"]
    params = quadtree_params(qp)
    params.validate()
    token_size, window = int(qp["token_size"]), int(qp["window"])
    res = Resolution(mpp=qp.get("mpp"), magnification=qp.get("magnification"))
    f = params.edge_downsample
    margin = -(-(EDGE_MARGIN + params.blur_kernel // 2) // f) * f  # a multiple of f: edge cells line up
    with open_slide(ctx.slide_path, slide_mpp=ctx.slide_mpp) as slide:
        ds = slide.downsample_for(res)
        w0, h0 = slide.dimensions
        size = (max(1, int(round(w0 / ds))), max(1, int(round(h0 / ds))))
        mask = None
        if ctx.params.get("mask"):
            mask, mask_warnings = load_label_mask(Path(ctx.params["mask"]["path"]), slide)
            for message in mask_warnings:
                ctx.warn(message)
        tm = None
        if ctx.params.get("tissue") is not None:
            tm = load_or_detect(ctx, slide, tissue_params(ctx.params["tissue"]))
            if slide.mpp is None and not tm.info.get("reused"):
                ctx.warn(f"{slide.name}: no mpp recorded; tissue area filters assume {ASSUMED_MPP} µm/px (set --slide-mpp)")
        windows = window_grid(size[0], size[1], window)

        def tissue_of(win: Window) -> np.ndarray | None:
            return None if tm is None else sample_mask(tm.mask, tm.downsample, ds, win)

        def edges_of(win: Window) -> np.ndarray:
            t0 = time.perf_counter()
            rgb, (left, top) = read_window(slide, win, ds, size, margin)
            t1 = time.perf_counter()
            e = params_edge_map(rgb, params)[top // f:(top + win.h + f - 1) // f, left // f:(left + win.w + f - 1) // f]
            tally.read += t1 - t0
            tally.edges += time.perf_counter() - t1
            tally.windows_read += 1
            return np.ascontiguousarray(e)

        tally = _Tally()
        dice = DiceTally(mask.num_classes) if mask is not None else None
        t_mask = 0.0

        def score_mask(win: Window, leaves: Leaves) -> None:
            nonlocal t_mask
            if mask is None or dice is None:
                return
            t0 = time.perf_counter()
            truth = mask.window(win, ds)
            pred = labels_round_trip(truth, leaves, token_size, mask.num_classes) if len(leaves) else None
            dice.add(truth, pred)
            t_mask += time.perf_counter() - t0

        if params.max_tokens is None:
            for i, win in enumerate(windows):
                tissue = tissue_of(win)
                if tissue is None or tissue.any():
                    edges = edges_of(win)
                    t0 = time.perf_counter()
                    leaves = build_quadtree(edges, params, tissue, shape=(win.h, win.w))
                    tally.tree += time.perf_counter() - t0
                    tally.count_uniform(win, tissue, params.min_size)
                    tally.add_leaves(win, leaves)
                    score_mask(win, leaves)
                else:
                    score_mask(win, Leaves.empty())
                ctx.progress(i + 1, len(windows))
        else:
            _run_budget(ctx, windows, params, tissue_of, edges_of, tally, score_mask)

        t0 = time.perf_counter()
        boxes = np.concatenate(tally.boxes) if tally.boxes else np.zeros((0, 3), np.int64)
        depth = np.concatenate(tally.depth) if tally.depth else np.zeros(0, np.int16)
        detail = np.concatenate(tally.detail) if tally.detail else np.zeros(0, np.float32)
        order = morton_order(boxes[:, 0], boxes[:, 1], params.min_size)
        boxes, depth, detail = boxes[order], depth[order], detail[order]
        tally.tree += time.perf_counter() - t0

        n = len(boxes)
        reduction = tally.uniform / n if n else None
        mpp0 = slide.mpp
        attrs: dict[str, Any] = {
            **{f.name: getattr(params, f.name) for f in fields(params)},
            "max_tokens": params.max_tokens or 0,  # 0: threshold mode
            "mode": "threshold" if params.max_tokens is None else "budget",
            "token_size": token_size,
            "mpp": float((mpp0[0] + mpp0[1]) / 2 * ds) if mpp0 else None,
            "level0_mpp": float((mpp0[0] + mpp0[1]) / 2) if mpp0 else None,
            "downsample": float(ds),
            "level0_width": w0,
            "level0_height": h0,
            "width": size[0],
            "height": size[1],
            "window": window,
            "margin": margin,
            "uniform_tokens": tally.uniform,
            "reduction": reduction,
            "tissue": tm is not None,
            "name": slide.stem,
            "bounds_offset": np.array(slide.bounds_offset, np.int64),
        }
        write_quadtree_h5(ctx.out_dir / QUADTREE_FILE, boxes, depth, detail, ds, attrs)
        thumb, tds = slide.thumbnail(OVERLAY_SIDE)
        max_depth = int(round(math.log2(params.max_size // params.min_size)))
        overlay = draw_leaves(thumb, boxes, depth_colors(depth, max_depth), ds / tds)
        write_png_atomic(ctx.out_dir / OVERLAY_FILE, overlay)

        stats: dict[str, Any] = {
            "leaves": n,
            "uniform_tokens": tally.uniform,
            "reduction": round(reduction, 4) if reduction is not None else None,
            "seconds_read": round(tally.read, 3),
            "seconds_edges": round(tally.edges, 3),
            "seconds_tree": round(tally.tree, 3),
            "seconds_uniform": round(tally.uniform_seconds, 3),
            "mode": attrs["mode"],
            "mpp": round(attrs["mpp"], 6) if attrs["mpp"] else None,
            "downsample": round(ds, 6),
            "windows": len(windows),
            "windows_read": tally.windows_read,
            "smallest_leaves": int((boxes[:, 2] == params.min_size).sum()) if n else 0,
        }
        if mask is not None and dice is not None:
            stats["mask_dice"] = round(dice.foreground(), 6)
            stats["mask_dice_per_class"] = dice.per_class(mask.classes)
            stats["mask_classes"] = mask.classes
            stats["seconds_mask"] = round(t_mask, 3)
        outputs = {"quadtree": QUADTREE_FILE, "overlay": OVERLAY_FILE}
        if n == 0:
            raise EmptySlide(f"{slide.name}: no tissue found; wrote an empty {QUADTREE_FILE}", outputs, stats)
        return {"outputs": outputs, "stats": stats, "slide": slide.info()}


def _run_budget(
    ctx: JobContext,
    windows: list[Window],
    params: QuadtreeParams,
    tissue_of: Callable[[Window], np.ndarray | None],
    edges_of: Callable[[Window], np.ndarray],
    tally: _Tally,
    score_mask: Callable[[Window, Leaves], None],
) -> None:
    """Budget mode: pass 1 reads each window once, keeps its cells on disk and its splits in a
    :class:`BudgetMerge`; pass 2 replays each window's share of the slide's splits from its cells."""
    # Tissue roots of every window, from the tissue mask alone: the slide's leaf count before any
    # split, which bounds how many splits any one window can contribute.
    roots = [root_count(win, tissue_of(win), params.max_size) for win in windows]
    total_roots = sum(roots)
    merge = BudgetMerge(int(params.max_tokens), total_roots)
    steps = 2 * len(windows)
    with _cell_store(ctx.out_dir) as store:
        for i, win in enumerate(windows):
            if roots[i]:
                tissue = tissue_of(win)
                edges = edges_of(win)
                t0 = time.perf_counter()
                cells = Cells.of(edges, tissue, params, (win.h, win.w))
                del edges
                np.save(store / f"{i}-edges.npy", cells.edges)
                np.save(store / f"{i}-tissue.npy", cells.tissue)
                cap = merge.budget - (total_roots - roots[i])
                merge.add(i, greedy_splits(cells, params, cap, stop_below=merge.cutoff))
                tally.tree += time.perf_counter() - t0
                tally.count_uniform(win, tissue, params.min_size)
            ctx.progress(i + 1, steps)
        for i, win in enumerate(windows):
            leaves = Leaves.empty()
            if roots[i]:
                t0 = time.perf_counter()
                cells = Cells(np.load(store / f"{i}-edges.npy"), np.load(store / f"{i}-tissue.npy"))
                cap = merge.budget - (total_roots - roots[i])
                leaves = _leaves_of(greedy_splits(cells, params, cap, max_splits=merge.splits_of(i)))
                tally.tree += time.perf_counter() - t0
                tally.add_leaves(win, leaves)
            score_mask(win, leaves)
            ctx.progress(len(windows) + i + 1, steps)


@contextlib.contextmanager
def _cell_store(out_dir: Path) -> Iterator[Path]:
    # In the slide's folder, under the temporary prefix: an interrupted run's leftovers are
    # removed by the next run of any command on this slide.
    with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}quadtree-cells-", dir=out_dir) as d:
        yield Path(d)
