"""Adaptive quadtree patching (the AMR step of Zhang et al., SC 2024), as pure array functions.

An image at the working resolution is split with a quadtree that refines only where there is
detail. Detail is the count of Canny edge pixels in a node (Gaussian blur, then Canny, as the
authors' code does), read in O(1) per node from an integral image, so building the tree costs
about one pass over the edge map. Two modes:

- threshold: split a node while its detail exceeds ``split_threshold`` (optionally per pixel, so
  the threshold means the same at every node size) and it is larger than ``min_size``;
- budget: split the most detailed splittable leaf until ``max_tokens`` leaves exist.

Leaves entirely outside the tissue mask are dropped: they produce no tokens. Leaves come out in
Z-order (Morton order of their top-left corners), with their geometry (x, y, size).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import cv2
import numpy as np

from wsi_amr.labels import MaskRef
from wsi_amr.params import ParameterError, from_fields, require
from wsi_amr.slide import DEFAULT_MPP, Resolution
from wsi_amr.tissue import TissueParams


class QuadtreeError(ValueError):
    """Parameters or inputs the quadtree cannot work with; one line for the user."""


class QuadtreeParameterError(QuadtreeError, ParameterError):
    """A :class:`QuadtreeParams` value out of range; names the field."""


def is_power_of_two(n: int) -> bool:
    return isinstance(n, (int, np.integer)) and n > 0 and (n & (n - 1)) == 0


@dataclass(frozen=True)
class QuadtreeParams:
    """Quadtree settings. Sizes in working pixels (powers of two)."""

    # Defaults: the GlaS operating point at its native ~0.62 µm/px, chosen by bench/tune_quadtree.py
    # (token reduction and round-trip Dice in docs/benchmarks.md, "Adaptive quadtree"). Edges at
    # half resolution cost blur and Canny a quarter of the full-resolution point for leaves of the
    # same quality. Model cards written before edge_downsample existed mean 1 (patching_from_card).
    min_size: int = 8
    max_size: int = 256
    blur_kernel: int = 21  # Gaussian kernel (odd) at full resolution; 0 or 1: no blur. Wide, so nuclei blur away and gland borders stay
    canny_low: float = 60.0  # on the half-resolution image, whose gradients per pixel are twice as steep
    canny_high: float = 120.0
    split_threshold: float = 104.0  # edge pixels per pixel when normalise, else edge pixels (at edge resolution)
    # Counts: a border stops splitting at ~32-px leaves. Per pixel, a border's density grows as the
    # node shrinks, so it splits down to min_size or not at all.
    normalise: bool = False
    max_tokens: int | None = None  # budget mode when set
    # Edges found on the image area-averaged by this factor (a power of two, at most min_size),
    # with the blur narrowed to match: 4x fewer pixels for blur and Canny per halving. Detail
    # (and split_threshold) then counts edge pixels at that resolution. 1: full resolution.
    edge_downsample: int = 2

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """:class:`QuadtreeParameterError` naming the field unless every value is usable."""
        def check(ok: bool, message: str, *fields: str) -> None:
            if not ok:
                raise QuadtreeParameterError(message, *fields)

        check(is_power_of_two(self.min_size), f"min_size must be a power of two, got {self.min_size}", "min_size")
        check(is_power_of_two(self.max_size), f"max_size must be a power of two, got {self.max_size}", "max_size")
        check(self.min_size <= self.max_size, f"min_size ({self.min_size}) is larger than max_size ({self.max_size})",
              "min_size", "max_size")
        check(self.blur_kernel >= 0 and (self.blur_kernel <= 1 or self.blur_kernel % 2 == 1),
              f"blur_kernel must be 0, 1 or an odd number of pixels, got {self.blur_kernel}", "blur_kernel")
        check(0 <= self.canny_low <= self.canny_high,
              f"Canny thresholds must satisfy 0 <= canny_low <= canny_high, got {self.canny_low}/{self.canny_high}",
              "canny_low", "canny_high")
        check(self.split_threshold >= 0, f"split_threshold must not be negative, got {self.split_threshold}",
              "split_threshold")
        check(self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}",
              "max_tokens")
        check(is_power_of_two(self.edge_downsample) and self.edge_downsample <= self.min_size,
              f"edge_downsample must be a power of two no larger than min_size ({self.min_size}), "
              f"got {self.edge_downsample}", "edge_downsample", "min_size")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuadtreeParams:
        return from_fields(cls, data)


@dataclass(frozen=True)
class QuadtreeJobParams:
    """What ``wsi-amr quadtree`` does to each slide: the tree, the token side for the mask round
    trip, the window the slide is read in, the working resolution, tissue (None: the whole slide)
    and an optional reference mask."""

    tree: QuadtreeParams = QuadtreeParams()
    token_size: int = 8  # the APF paper's main setting
    window: int = 4096  # working px: ~50 MB of RGB per window, ~0.6 GB peak while its tree is built
    mpp: float | None = None  # with magnification also None: DEFAULT_MPP
    magnification: float | None = None
    tissue: TissueParams | None = TissueParams()
    mask: MaskRef | None = None

    def __post_init__(self) -> None:
        if self.mpp is None and self.magnification is None:
            object.__setattr__(self, "mpp", DEFAULT_MPP)
        Resolution(self.mpp, self.magnification)
        require(is_power_of_two(self.token_size), f"token_size must be a power of two, got {self.token_size}",
                "token_size")
        m = self.tree.max_size
        require(self.window >= m and self.window % m == 0,
                f"window ({self.window}) must be a positive multiple of max_size ({m})", "window", "max_size")

    @property
    def resolution(self) -> Resolution:
        return Resolution(self.mpp, self.magnification)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tissue": self.tissue.as_dict() if self.tissue is not None else None,
            "quadtree": {**self.tree.as_dict(), "token_size": self.token_size, "window": self.window, "mpp": self.mpp,
                         "magnification": self.magnification},
            "mask": asdict(self.mask) if self.mask is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuadtreeJobParams:
        q = data["quadtree"]
        own = {f.name for f in fields(cls)}
        return from_fields(cls, {
            **{k: v for k, v in q.items() if k in own},
            "tree": QuadtreeParams.from_dict(q),
            "tissue": TissueParams.from_dict(data["tissue"]) if data.get("tissue") is not None else None,
            "mask": MaskRef(**data["mask"]) if data.get("mask") else None,
        })


@dataclass
class Leaves:
    """Quadtree leaves in Z-order. Coordinates and sizes in working pixels."""

    x: np.ndarray  # (N,) int64, top-left
    y: np.ndarray  # (N,) int64
    size: np.ndarray  # (N,) int64
    depth: np.ndarray  # (N,) int16, 0 = max_size
    detail: np.ndarray  # (N,) float32, edge pixels (or per pixel when normalised)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, index: np.ndarray) -> Leaves:
        return Leaves(self.x[index], self.y[index], self.size[index], self.depth[index], self.detail[index])

    def boxes(self) -> np.ndarray:
        """(N, 3) int64 of (x, y, size)."""
        return np.stack([self.x, self.y, self.size], axis=1)

    @staticmethod
    def empty() -> Leaves:
        z = np.zeros(0, np.int64)
        return Leaves(z, z.copy(), z.copy(), np.zeros(0, np.int16), np.zeros(0, np.float32))


def blur_sigma(kernel: int) -> float:
    """The Gaussian sigma OpenCV derives from an odd kernel size (sigma 0)."""
    return 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8


def edge_map(rgb: np.ndarray, blur_kernel: int = 3, low: float = 100.0, high: float = 200.0,
             downsample: int = 1) -> np.ndarray:
    """Canny edges (uint8, 1 on an edge) of an RGB or grey uint8 image, after a Gaussian blur.

    As the APF authors do: grey image, Gaussian blur with sigma derived from the kernel size,
    Canny with thresholds ``low``/``high``. With ``downsample`` f > 1 the grey image is first
    area-averaged by f (its far edges padded by replication to a multiple of f) and blurred with
    sigma / f over a kernel about 1 / f as wide, so the edges are those of the same blurred image
    at 1 / f the resolution: the map is (ceil(H / f), ceil(W / f)).
    """
    if rgb.dtype != np.uint8:
        raise QuadtreeError("edge_map expects a uint8 image")
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb
    if downsample > 1:
        h, w = grey.shape
        ph, pw = -h % downsample, -w % downsample
        if ph or pw:
            grey = cv2.copyMakeBorder(grey, 0, ph, 0, pw, cv2.BORDER_REPLICATE)
        grey = cv2.resize(grey, ((w + pw) // downsample, (h + ph) // downsample), interpolation=cv2.INTER_AREA)
        if blur_kernel > 1:
            k = (blur_kernel // downsample) | 1
            grey = cv2.GaussianBlur(grey, (k, k), blur_sigma(blur_kernel) / downsample)
    elif blur_kernel > 1:
        grey = cv2.GaussianBlur(grey, (blur_kernel, blur_kernel), 0)
    edges = cv2.Canny(grey, low, high)
    return (edges > 0).astype(np.uint8)


def params_edge_map(rgb: np.ndarray, params: QuadtreeParams) -> np.ndarray:
    """:func:`edge_map` with a quadtree's blur, Canny thresholds and edge downsampling."""
    return edge_map(rgb, params.blur_kernel, params.canny_low, params.canny_high, params.edge_downsample)


#: Largest cell side whose pixel counts cv2's area resize gives exactly (16 is not: tests check).
AREA_RESIZE_MAX_CELL = 8

#: numpy 2 counts set bits in one pass; with it, cells of up to 8 px are counted by reading each
#: row of cells as one 1- to 8-byte word (a byte per pixel), several times faster than the resize.
_BITWISE_COUNT = getattr(np, "bitwise_count", None)


def _words(a: np.ndarray, cell: int, rows: int, cols: int) -> np.ndarray:
    """A (H, W) uint8 map padded with zeros to (rows, cols) and read as one word per ``cell`` px
    of each row: (rows, cols / cell) of uint<8 x cell> (``cell`` 1, 2, 4 or 8)."""
    h, w = a.shape
    if (h, w) != (rows, cols) or not a.flags.c_contiguous:
        padded = np.zeros((rows, cols), np.uint8)
        padded[:h, :w] = a
        a = padded
    return a.view(np.dtype(f"<u{cell}")) if cell > 1 else a


def _integral(cells: np.ndarray) -> np.ndarray:
    """(r + 1, c + 1) int64 integral of uint8 per-cell counts."""
    depth = cv2.CV_32S if cells.size * 255 < 2**31 else cv2.CV_64F
    return cv2.integral(cells, sdepth=depth).astype(np.int64)


def _cell_integral(a: np.ndarray | None, shape: tuple[int, int], cell: int, rows: int, cols: int) -> np.ndarray:
    """Integral of a 0/255 uint8 (H, W) mask's pixel counts over ``cell``-px cells.

    Returns (rows/cell + 1, cols/cell + 1) int64: entry (i, j) counts the set pixels above and left
    of cell corner (i * cell, j * cell), over an area of ``rows`` x ``cols`` px (multiples of
    ``cell``) whose part past the mask is empty. ``a`` None means every pixel of (H, W) is set.
    Counts per cell come from set bits (numpy 2, cells up to 8 px), from one area resize (exact
    for cells up to 8 px: a 0/255 mask's cell mean, rounded to uint8, still tells its count), or
    for larger cells from a full integral image sampled at cell corners. Either way the mask is
    read once and nothing full-size is widened, so building the tree costs a small fraction of the
    edge detection.
    """
    h, w = shape
    r, c = rows // cell, cols // cell
    ys = np.minimum(np.arange(0, rows + 1, cell), h)  # cell corners, clipped to the mask
    xs = np.minimum(np.arange(0, cols + 1, cell), w)
    if a is None:
        return np.outer(ys, xs).astype(np.int64)
    if cell <= AREA_RESIZE_MAX_CELL and _BITWISE_COUNT is not None:
        # A 0/255 pixel has 8 set bits: a word's bit count / 8 is its cell row's pixel count.
        per_row = _BITWISE_COUNT(_words(a, cell, rows, cols))  # (rows, c): 8 x count, <= 64
        counts = per_row.reshape(r, cell, c).sum(axis=1, dtype=np.int32) >> 3
        return _integral(counts.astype(np.uint8))  # at most 64
    if cell <= AREA_RESIZE_MAX_CELL:
        if (h, w) != (rows, cols):
            a = cv2.copyMakeBorder(a, 0, rows - h, 0, cols - w, cv2.BORDER_CONSTANT, value=0)
        mean = cv2.resize(a, (c, r), interpolation=cv2.INTER_AREA) if cell > 1 else a
        counts = np.rint(mean * (cell * cell / 255.0)).astype(np.int64)
        out = np.zeros((r + 1, c + 1), np.int64)
        np.cumsum(np.cumsum(counts, axis=0), axis=1, out=out[1:, 1:])
        return out
    depth = cv2.CV_32S if a.size < 2**31 else cv2.CV_64F
    full = cv2.integral(a, sdepth=depth)
    return (full[np.ix_(ys, xs)] // 255).astype(np.int64)


def _cell_any(a: np.ndarray | None, shape: tuple[int, int], cell: int, rows: int, cols: int) -> np.ndarray:
    """Integral over ``cell``-px cells of whether a cell holds any set pixel of a mask (bool, or
    uint8 with any non-zero value set; None: all of (H, W) set), shaped as :func:`_cell_integral`'s.
    A box's sum is above 0 exactly when its pixel count is, at a fraction of the cost: each cell row
    is one 1- to 8-byte word, non-zero when any of its pixels is."""
    if a is None or cell > 8 or a.dtype not in (np.bool_, np.uint8):
        return _cell_integral(None if a is None else _binary(a), shape, cell, rows, cols)
    r, c = rows // cell, cols // cell
    words = _words(a.view(np.uint8), cell, rows, cols)  # (rows, c)
    cells = (words != 0).reshape(r, cell, c).any(axis=1)
    return _integral(cells.view(np.uint8))


def _binary(a: np.ndarray) -> np.ndarray:
    """A 0/255 uint8 copy of a mask or edge map (any non-zero value set)."""
    if a.dtype == bool:
        a = a.view(np.uint8)
    elif a.dtype != np.uint8:
        a = (a > 0).astype(np.uint8)
    return cv2.threshold(a, 0, 255, cv2.THRESH_BINARY)[1]


def box_sums(integral: np.ndarray, x: np.ndarray, y: np.ndarray, s: np.ndarray, cell: int) -> np.ndarray:
    """Sums over squares (x, y, s) in px, all multiples of ``cell``, from a cell-corner integral."""
    x0, y0, x1, y1 = x // cell, y // cell, (x + s) // cell, (y + s) // cell
    return integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """Each bit i of a uint64 below 2**32 moved to bit 2i (the zeros between for the other axis)."""
    v = v & np.uint64(0xFFFFFFFF)
    for shift, mask in ((16, 0x0000FFFF0000FFFF), (8, 0x00FF00FF00FF00FF), (4, 0x0F0F0F0F0F0F0F0F),
                        (2, 0x3333333333333333), (1, 0x5555555555555555)):
        v = (v | (v << np.uint64(shift))) & np.uint64(mask)
    return v


def morton_order(x: np.ndarray, y: np.ndarray, unit: int) -> np.ndarray:
    """Indices that sort squares by the Morton (Z-order) code of their top-left corner / ``unit``."""
    xs = (np.asarray(x) // unit).astype(np.uint64)
    ys = (np.asarray(y) // unit).astype(np.uint64)
    code = _spread_bits(xs) | (_spread_bits(ys) << np.uint64(1))
    return np.argsort(code, kind="stable")


def build_quadtree(
    edges: np.ndarray, params: QuadtreeParams = QuadtreeParams(), tissue: np.ndarray | None = None,
    shape: tuple[int, int] | None = None,
) -> Leaves:
    """Quadtree leaves over an edge map at the working resolution.

    ``edges`` is (H, W), or with ``params.edge_downsample`` f > 1 the (ceil(H / f), ceil(W / f))
    map :func:`params_edge_map` gives. ``tissue`` (H, W) bool, at the working resolution: leaves
    with no tissue pixel are dropped. Without it every leaf that overlaps the image is kept, and
    (H, W) is ``shape``, which may be left out only when f is 1. The image is covered by a grid of
    ``max_size`` roots from its top-left corner; roots past the right and bottom edges are padded
    (no edges, no tissue there). ``params`` checked itself when it was made.
    """
    if edges.ndim != 2:
        raise QuadtreeError("edges must be a 2-D array")
    f = params.edge_downsample
    if tissue is not None:
        shape = tissue.shape
    if shape is None and f > 1:  # a full-resolution edge map would pass silently as half the image
        raise QuadtreeError(f"edges found at 1/{f} resolution need the image's shape (or a tissue mask)")
    h, w = shape if shape is not None else edges.shape
    if edges.shape != (-(-h // f), -(-w // f)):
        at = f" at edge downsample {f}" if f > 1 else ""
        raise QuadtreeError(f"{'tissue mask' if tissue is not None else 'image'} is {w}x{h}, "
                            f"edge map is {edges.shape[1]}x{edges.shape[0]}{at}")
    if h == 0 or w == 0:
        return Leaves.empty()
    top = params.max_size
    rows, cols = -(-h // top) * top, -(-w // top) * top
    cell = params.min_size
    e_int = _cell_integral(_binary(edges), edges.shape, cell // f, rows // f, cols // f)
    t_int = _cell_any(tissue, (h, w), cell, rows, cols)  # only ever tested for > 0
    if t_int[-1, -1] == 0:
        return Leaves.empty()
    gy, gx = np.mgrid[0:rows:top, 0:cols:top]
    x, y = gx.ravel().astype(np.int64), gy.ravel().astype(np.int64)
    if params.max_tokens is None:
        leaves = _threshold_tree(e_int, t_int, x, y, params)
    else:
        leaves = _budget_tree(e_int, t_int, x, y, params)
    return leaves.take(morton_order(leaves.x, leaves.y, params.min_size))


def detail_score(count: np.ndarray, size: np.ndarray, normalise: bool) -> np.ndarray:
    return count / (size * size).astype(np.float64) if normalise else count.astype(np.float64)


def _threshold_tree(e_int: np.ndarray, t_int: np.ndarray, x: np.ndarray, y: np.ndarray, p: QuadtreeParams) -> Leaves:
    out: list[tuple[np.ndarray, ...]] = []
    size, depth = p.max_size, 0
    while len(x):
        s = np.full(len(x), size, np.int64)
        keep = box_sums(t_int, x, y, s, p.min_size) > 0
        x, y, s = x[keep], y[keep], s[keep]
        score = detail_score(box_sums(e_int, x, y, s, p.min_size), s, p.normalise)
        split = (score > p.split_threshold) if size > p.min_size else np.zeros(len(x), bool)
        leaf = ~split
        out.append((x[leaf], y[leaf], s[leaf], np.full(int(leaf.sum()), depth, np.int16), score[leaf]))
        h = size // 2
        xs, ys = x[split], y[split]
        x = np.concatenate([xs, xs + h, xs, xs + h])
        y = np.concatenate([ys, ys, ys + h, ys + h])
        size, depth = h, depth + 1
    if not out:
        return Leaves.empty()
    cat = [np.concatenate(parts) for parts in zip(*out)]
    return Leaves(cat[0], cat[1], cat[2], cat[3], cat[4].astype(np.float32))


def _budget_tree(e_int: np.ndarray, t_int: np.ndarray, x: np.ndarray, y: np.ndarray, p: QuadtreeParams) -> Leaves:
    """Split the most detailed splittable leaf until ``max_tokens`` leaves exist.

    A split replaces one leaf by its children that hold tissue (1 to 4), so the count grows by 0
    to 3. The tree stops before a split would pass the budget: it returns exactly ``max_tokens``
    leaves when that count is reachable, otherwise the largest reachable count below it (at most
    2 short), or every leaf at ``min_size`` when the budget exceeds that.
    """
    assert p.max_tokens is not None
    leaves, _, _ = greedy_budget(e_int, t_int, x, y, p, p.max_tokens)
    if not leaves:
        return Leaves.empty()
    arr = np.array(leaves, np.float64)
    return Leaves(arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2].astype(np.int64),
                  arr[:, 3].astype(np.int16), arr[:, 4].astype(np.float32))


def greedy_budget(
    e_int: np.ndarray, t_int: np.ndarray, x: np.ndarray, y: np.ndarray, p: QuadtreeParams, cap: int,
    max_splits: int | None = None, stop_below: float = -math.inf,
) -> tuple[list[tuple[int, int, int, int, float]], list[float], list[int]]:
    """The budget process from the ``max_size`` roots at (x, y): split the most detailed
    splittable leaf (ties: the earlier leaf) while fewer than ``cap`` leaves exist, for at most
    ``max_splits`` splits, while the running minimum of the split scores stays at or above
    ``stop_below``. ``e_int``/``t_int`` are integrals of edge pixels and tissue per ``min_size``
    cell. Returns the leaves (x, y, size, depth, detail), each split's score and leaf-count change;
    a split that was due but would pass ``cap`` ends the lists with a change of ``cap + 1``."""
    m = p.min_size
    s = np.full(len(x), p.max_size, np.int64)
    keep = box_sums(t_int, x, y, s, m) > 0
    x, y, s = x[keep], y[keep], s[keep]
    score = detail_score(box_sums(e_int, x, y, s, m), s, p.normalise)
    # Leaves live in a dict keyed by an id; the heap holds splittable ones by -score.
    leaves: dict[int, tuple[int, int, int, int, float]] = {}
    heap: list[tuple[float, int]] = []
    next_id = 0
    for xi, yi, si, sc in zip(x.tolist(), y.tolist(), s.tolist(), score.tolist()):
        leaves[next_id] = (xi, yi, si, 0, sc)
        if si > m:
            heapq.heappush(heap, (-sc, next_id))
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
        has = box_sums(t_int, cx, cy, cs, m) > 0
        n_children = int(has.sum())
        if len(leaves) - 1 + n_children > cap:
            scores.append(-neg)
            deltas.append(cap + 1)
            break
        heapq.heappop(heap)
        del leaves[lid]
        scores.append(-neg)
        deltas.append(n_children - 1)
        csc = detail_score(box_sums(e_int, cx, cy, cs, m), cs, p.normalise)
        for k in np.flatnonzero(has).tolist():
            leaves[next_id] = (int(cx[k]), int(cy[k]), h, di + 1, float(csc[k]))
            if h > m:
                heapq.heappush(heap, (-float(csc[k]), next_id))
            next_id += 1
    return list(leaves.values()), scores, deltas


def uniform_leaves(shape: tuple[int, int], size: int, tissue: np.ndarray | None = None) -> Leaves:
    """Every leaf at ``size`` over the image (H, W), those with tissue only: uniform patching as a
    degenerate quadtree, so both modes share one code path downstream."""
    if not is_power_of_two(size):
        raise QuadtreeError(f"patch size must be a power of two, got {size}")
    params = QuadtreeParams(min_size=size, max_size=size, split_threshold=0.0, edge_downsample=1)
    return build_quadtree(np.zeros(shape, np.uint8), params, tissue, shape=shape)


def uniform_token_count(shape: tuple[int, int], size: int, tissue: np.ndarray | None = None) -> int:
    """How many tokens uniform patching at ``size`` would make over the tissue of an image: the
    ``size``-px cells holding tissue, counted without building their leaves."""
    if not is_power_of_two(size):
        raise QuadtreeError(f"patch size must be a power of two, got {size}")
    h, w = shape
    rows, cols = -(-h // size), -(-w // size)
    if tissue is None:
        return rows * cols
    if tissue.shape != (h, w):
        raise QuadtreeError(f"tissue mask is {tissue.shape[1]}x{tissue.shape[0]}, image is {w}x{h}")
    corners = _cell_any(tissue, (h, w), size, rows * size, cols * size)
    cells = corners[1:, 1:] - corners[:-1, 1:] - corners[1:, :-1] + corners[:-1, :-1]
    return int(np.count_nonzero(cells))


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
