from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from wsi_amr.budget import BudgetMerge, Cells, Splits, greedy_splits
from wsi_amr.jobs.tissue import load_or_detect
from wsi_amr.labels import load_label_mask
from wsi_amr.metrics import DiceTally
from wsi_amr.outputs import TMP_PREFIX, atomic_path, write_png_atomic
from wsi_amr.quadtree import (
    Leaves,
    QuadtreeJobParams,
    QuadtreeParams,
    build_quadtree,
    depth_colors,
    draw_leaves,
    morton_order,
    params_edge_map,
    uniform_token_count,
)
from wsi_amr.run.task import EmptySlide, JobContext
from wsi_amr.slide import open_slide
from wsi_amr.tiling import Window, read_window, sample_mask, window_grid
from wsi_amr.tissue import ASSUMED_MPP
from wsi_amr.tokens import labels_round_trip

QUADTREE_FILE = "quadtree.h5"
OVERLAY_FILE = "quadtree.png"
OVERLAY_SIDE = 2048
# Working px read around each window: Gaussian blur, Sobel and non-maximum suppression reach
# 1-2 px; the rest covers Canny's hysteresis, which follows weak edges across the border.
EDGE_MARGIN = 16


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


def run(ctx: JobContext[QuadtreeJobParams]) -> dict[str, Any]:
    job = ctx.params
    params, token_size, window, res = job.tree, job.token_size, job.window, job.resolution
    f = params.edge_downsample
    margin = -(-(EDGE_MARGIN + params.blur_kernel // 2) // f) * f  # a multiple of f: edge cells line up
    with open_slide(ctx.slide_path, slide_mpp=ctx.slide_mpp) as slide:
        ds = slide.downsample_for(res)
        w0, h0 = slide.dimensions
        size = (max(1, int(round(w0 / ds))), max(1, int(round(h0 / ds))))
        mask = None
        if job.mask is not None:
            mask, mask_warnings = load_label_mask(Path(job.mask.path), slide)
            for message in mask_warnings:
                ctx.warn(message)
        tm = None
        if job.tissue is not None:
            tm = load_or_detect(ctx, slide, job.tissue)
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
    ctx: JobContext[QuadtreeJobParams],
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
    assert params.max_tokens is not None  # budget mode
    merge = BudgetMerge(params.max_tokens, total_roots)
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
