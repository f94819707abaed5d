"""The budget quadtree over slide windows: split the most detailed cells first until a token budget
is spent, merging window results in one order."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from wsi_amr.quadtree import QuadtreeParams, greedy_budget


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
                     np.asarray(t.reshape(r, m, c, m).any(axis=(1, 3))))


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
    leaves (as :func:`wsi_amr.quadtree.build_quadtree` does in budget mode: the same
    :func:`~wsi_amr.quadtree.greedy_budget`, same order, same ties), for at most ``max_splits``
    splits, and only while the scores of the leaves split so far stay at or above ``stop_below``.
    Coordinates in working px relative to the window."""
    m, top = params.min_size, params.max_size
    rows, cols = cells.edges.shape[0] * m, cells.edges.shape[1] * m
    gy, gx = np.mgrid[0:rows:top, 0:cols:top]
    leaves, scores, deltas = greedy_budget(_integral_of_cells(cells.edges), _integral_of_cells(cells.tissue),
                                           gx.ravel().astype(np.int64), gy.ravel().astype(np.int64), params, cap,
                                           max_splits, stop_below)
    out = Splits(np.asarray(scores, np.float64), np.asarray(deltas, np.int64))
    for xi, yi, si, di, v in leaves:
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
