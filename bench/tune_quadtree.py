#!/usr/bin/env python
"""Quadtree operating point: token reduction against round-trip Dice over images with masks.

For every setting of the grid (Gaussian blur, Canny thresholds, split threshold as edge pixels
per pixel or per node, min and max leaf size, token size) every image is split with the adaptive
quadtree (threshold mode, no tissue mask: the whole image is tissue), and per image:

- leaves, and the tokens of uniform patching at the same minimum leaf size
  (``quadtree.uniform_token_count``); the reduction is their ratio over the whole set (the mean
  and geometric mean of the per-image ratios are printed too);
- round-trip Dice: the gland mask pushed through the tokeniser and back
  (``tokens.labels_round_trip``), Dice of the foreground against the original mask.

With ``--oracle`` the edge map is the true gland outline instead of Canny's: what no edge detector
can beat at that split threshold. The same is measured for uniform patching at every leaf size, which gives a second, stricter
reference: the coarsest uniform grid whose Dice is at least the setting's (``eq.dice``). Rows are
means over the images, with the Pareto front (per min leaf and token size) and the settings
meeting the target marked. The sweep runs at the images' native resolution (GlaS: about
0.62 µm/px, 20x).

    python bench/tune_quadtree.py --json docs/quadtree-sweep.json     # GlaS testA, default grid
    python bench/tune_quadtree.py --blur 15,21 --canny 30/60 --threshold '' --count-threshold 32,48,64 \\
        --min-size 4,8 --token-size 8
    python bench/tune_quadtree.py --images '../shared/data/glas/images/train_*.png' \\
        --masks ../shared/data/glas/masks

Edge maps are computed once per image and (blur, Canny) pair, and round trips once per distinct
set of leaves; images are spread over ``--jobs`` worker processes (default 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wsi_amr.images import read_rgb
from wsi_amr.labels import read_label_image
from wsi_amr.metrics import dice
from wsi_amr.quadtree import Leaves, QuadtreeParams, build_quadtree, edge_map, uniform_leaves, uniform_token_count
from wsi_amr.tokens import labels_round_trip  # noqa: E402

GLAS = REPO.parent / "shared" / "data" / "glas"
GLAS_MPP = 0.62

DEFAULT_BLUR = "1,3,7,11,15,21,31"
DEFAULT_CANNY = "100/200,50/100,30/60,20/40"
DEFAULT_THRESHOLD = "0.002,0.01,0.03"
DEFAULT_COUNT_THRESHOLD = "16,32,48,64,96"


@dataclass(frozen=True)
class Setting:
    """One point of the grid. Sizes in working pixels."""

    blur: int
    canny_low: float
    canny_high: float
    threshold: float
    min_size: int
    max_size: int
    token_size: int
    normalise: bool = True
    edge_downsample: int = 1

    def params(self) -> QuadtreeParams:
        return QuadtreeParams(min_size=self.min_size, max_size=self.max_size, blur_kernel=self.blur,
                              canny_low=self.canny_low, canny_high=self.canny_high,
                              split_threshold=self.threshold, normalise=self.normalise,
                              edge_downsample=self.edge_downsample)


def make_grid(blurs: Sequence[int], cannys: Sequence[tuple[float, float]], thresholds: Sequence[float],
              min_sizes: Sequence[int], max_sizes: Sequence[int], token_sizes: Sequence[int] | None,
              count_thresholds: Sequence[float] = (), edge_downsamples: Sequence[int] = (1,)) -> list[Setting]:
    """Every combination; token size follows the min leaf size when ``token_sizes`` is None.

    ``thresholds`` are edge pixels per pixel (normalised); ``count_thresholds`` edge pixels per
    node (not normalised).
    """
    split = [(t, True) for t in thresholds] + [(t, False) for t in count_thresholds]
    grid = []
    for b, (lo, hi), (t, norm), mn, mx, f in itertools.product(blurs, cannys, split, min_sizes, max_sizes,
                                                                edge_downsamples):
        if mn > mx or f > mn:
            continue
        for p in (token_sizes or [mn]):
            grid.append(Setting(b, lo, hi, t, mn, mx, p, norm, f))
    return grid


def load_pair(image: str, masks: Path) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 image and its 0/1 mask (mask files: same name, 0 background, >127 foreground)."""
    return read_rgb(Path(image)), (read_label_image(masks / Path(image).name) > 127).astype(np.uint8)


def uniform_references(grid: list[Setting]) -> list[tuple[int, int]]:
    """(leaf size, token size) of the uniform grids to compare with: every power of two from the
    smallest min leaf size to the largest max leaf size, with each token size of the grid."""
    lo, hi = min(s.min_size for s in grid), max(s.max_size for s in grid)
    sizes = [1 << k for k in range(lo.bit_length() - 1, hi.bit_length())]
    return [(size, p) for p in sorted({s.token_size for s in grid}) for size in sizes]


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """The pixels on either side of the mask's boundary (uint8 0/1): the edge map of an ideal
    detector, which finds gland borders and nothing else."""
    return cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((2, 2), np.uint8))


def measure_image(job: tuple[str, Path, list[Setting], bool]) -> tuple[np.ndarray, np.ndarray]:
    """Figures of one image: (n_settings, 3) leaves, uniform tokens at the min leaf size and
    round-trip Dice per setting; (n_references, 2) tokens and round-trip Dice per uniform grid.
    With ``oracle`` the edge map is the mask's outline (blur and Canny unused)."""
    image, masks, grid, oracle = job
    rgb, mask = load_pair(image, masks)
    truth = mask.astype(bool)
    edges: dict[tuple[int, float, float, int], np.ndarray] = {}
    round_trips: dict[tuple[bytes, int], float] = {}

    def round_trip(leaves: Leaves, token_size: int) -> float:
        # Many settings give the same leaves (all roots, or all min-size leaves): one round trip each.
        key = (hashlib.blake2b(leaves.boxes().tobytes(), digest_size=16).digest(), token_size)
        if key not in round_trips:
            back = labels_round_trip(mask, leaves, token_size, num_classes=2)
            round_trips[key] = dice(back == 1, truth)
        return round_trips[key]

    out = np.zeros((len(grid), 3))
    for i, s in enumerate(grid):
        key = (s.blur, s.canny_low, s.canny_high, s.edge_downsample)
        if key not in edges:
            f = s.edge_downsample
            edges[key] = (mask_outline(mask[::f, ::f]) if oracle
                          else edge_map(rgb, s.blur, s.canny_low, s.canny_high, f))
        leaves = build_quadtree(edges[key], s.params(), shape=mask.shape)
        out[i] = (len(leaves), uniform_token_count(mask.shape, s.min_size), round_trip(leaves, s.token_size))
    refs = uniform_references(grid)
    ref = np.zeros((len(refs), 2))
    for j, (size, p) in enumerate(refs):
        leaves = uniform_leaves(mask.shape, size)
        ref[j] = (len(leaves), round_trip(leaves, p))
    return out, ref


def pareto(reduction: np.ndarray, dice_: np.ndarray) -> np.ndarray:
    """Bool mask of settings no other setting beats on both reduction and Dice (ties kept)."""
    front = np.ones(len(reduction), bool)
    for i in range(len(reduction)):
        better = (reduction >= reduction[i]) & (dice_ >= dice_[i]) & ((reduction > reduction[i]) | (dice_ > dice_[i]))
        front[i] = not better.any()
    return front


def summarise_references(refs: list[tuple[int, int]], per_image: np.ndarray) -> list[dict[str, Any]]:
    """One row per uniform grid from (n_images, n_references, 2) figures."""
    return [{"leaf_size": size, "token_size": p, "tokens": float(per_image[:, j, 0].mean()),
             "dice": float(per_image[:, j, 1].mean()), "dice_min": float(per_image[:, j, 1].min())}
            for j, (size, p) in enumerate(refs)]


def equal_dice_uniform(references: list[dict[str, Any]], token_size: int, dice_: float) -> dict[str, Any] | None:
    """The coarsest uniform grid with these tokens whose mean round-trip Dice is at least ``dice_``."""
    fits = [r for r in references if r["token_size"] == token_size and r["dice"] >= dice_]
    return max(fits, key=lambda r: r["leaf_size"], default=None)


def summarise(grid: list[Setting], per_image: np.ndarray, references: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setting from (n_images, n_settings, 3) figures."""
    leaves, uniform, dices = per_image[..., 0], per_image[..., 1], per_image[..., 2]
    ratio = uniform / leaves
    rows = []
    for i, s in enumerate(grid):
        row = {
            "blur": s.blur, "canny_low": s.canny_low, "canny_high": s.canny_high, "threshold": s.threshold,
            "edge_downsample": s.edge_downsample,
            "normalise": s.normalise, "min_size": s.min_size, "max_size": s.max_size, "token_size": s.token_size,
            # Tokens over the whole set; the mean of per-image ratios is inflated by the few images
            # whose tree barely splits, so it is reported but not used.
            "reduction": float(uniform[:, i].sum() / leaves[:, i].sum()),
            "reduction_geomean": float(np.exp(np.log(ratio[:, i]).mean())),
            "reduction_mean": float(ratio[:, i].mean()),
            "reduction_min": float(ratio[:, i].min()),
            "dice": float(dices[:, i].mean()),
            "dice_min": float(dices[:, i].min()),
            "leaves": float(leaves[:, i].mean()),
            "uniform": float(uniform[:, i].mean()),
        }
        # The reduction at the min leaf size depends on that reference alone: leaves that never get
        # that small still count it. Against uniform patching of the same quality it does not.
        eq = equal_dice_uniform(references, s.token_size, row["dice"])
        row["equal_dice_leaf_size"] = eq["leaf_size"] if eq else None
        row["reduction_equal_dice"] = eq["tokens"] / row["leaves"] if eq else None
        rows.append(row)
    return rows


def format_references(references: list[dict[str, Any]]) -> str:
    head = f"{'leaf':>5} {'tok':>3} {'tokens':>7} {'dice':>7} {'dice.min':>8}"
    lines = ["uniform patching (every leaf at one size), same images:", head, "-" * len(head)]
    for r in references:
        lines.append(f"{r['leaf_size']:>5} {r['token_size']:>3} {r['tokens']:>7.0f} {r['dice']:>7.4f} {r['dice_min']:>8.4f}")
    return "\n".join(lines)


def format_table(rows: list[dict[str, Any]], min_reduction: float, min_dice: float) -> str:
    head = (f"{'f':>1} {'blur':>4} {'canny':>7} {'thresh':>8} {'min':>3} {'max':>4} {'tok':>3} "
            f"{'leaves':>7} {'uniform':>7} {'reduct':>7} {'geomean':>7} {'mean':>7} {'eq.dice':>11} "
            f"{'dice':>7} {'dice.min':>8}  flag")
    lines = [head, "-" * len(head)]
    for r in rows:
        flag = ("P" if r["pareto"] else " ") + (" ok" if r["meets"] else "")
        eq = (f"{r['reduction_equal_dice']:>5.1f}x@{r['equal_dice_leaf_size']:<4}" if r["equal_dice_leaf_size"]
              else f"{'-':>11}")
        lines.append(
            f"{r.get('edge_downsample', 1):>1} {r['blur']:>4} {r['canny_low']:>3g}/{r['canny_high']:<3g} {_threshold(r):>8} {r['min_size']:>3} "
            f"{r['max_size']:>4} {r['token_size']:>3} {r['leaves']:>7.0f} {r['uniform']:>7.0f} "
            f"{r['reduction']:>6.1f}x {r['reduction_geomean']:>6.1f}x {r['reduction_mean']:>6.1f}x {eq} "
            f"{r['dice']:>7.4f} {r['dice_min']:>8.4f}  {flag}"
        )
    lines.append(
        "reduct: uniform tokens at the min leaf size over adaptive leaves, whole set; geomean, mean: of the "
        "per-image ratios;\neq.dice: uniform tokens at the coarsest uniform leaf size (after @) whose Dice is "
        "at least as high, over adaptive leaves;\nthresh: edge pixels per pixel, or per node with #; "
        f"P: Pareto front (reduct vs Dice, per min/token size); ok: reduct >= {min_reduction:g}x and Dice >= {min_dice:g}"
    )
    return "\n".join(lines)


def _threshold(row: dict[str, Any]) -> str:
    """Normalised thresholds as they are, edge-pixel counts with a ``#`` suffix."""
    return f"{row['threshold']:g}" if row["normalise"] else f"{row['threshold']:g}#"


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _cannys(text: str) -> list[tuple[float, float]]:
    out = []
    for pair in text.split(","):
        lo, _, hi = pair.partition("/")
        out.append((float(lo), float(hi)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default=str(GLAS / "images" / "testA_*.png"), help="glob of RGB images")
    ap.add_argument("--masks", type=Path, default=GLAS / "masks", help="folder of masks with the images' names")
    ap.add_argument("--blur", default=DEFAULT_BLUR, help="Gaussian kernel sizes, comma-separated")
    ap.add_argument("--canny", default=DEFAULT_CANNY, help="Canny low/high pairs, comma-separated")
    ap.add_argument("--threshold", default=DEFAULT_THRESHOLD, help="split thresholds (edge pixels per pixel)")
    ap.add_argument("--count-threshold", default=DEFAULT_COUNT_THRESHOLD,
                    help="split thresholds in edge pixels per node (normalise=False), comma-separated")
    ap.add_argument("--edge-downsample", default="1", help="edge map downsampling factors (powers of two)")
    ap.add_argument("--min-size", default="8", help="min leaf sizes, px")
    ap.add_argument("--max-size", default="256", help="max leaf sizes, px")
    ap.add_argument("--token-size", default="", help="token sizes, px (default: the min leaf size)")
    ap.add_argument("--oracle", action="store_true",
                    help="use the masks' outlines as edge maps (an upper bound for any edge detector)")
    ap.add_argument("--target-reduction", type=float, default=20.0)
    ap.add_argument("--target-dice", type=float, default=0.99)
    ap.add_argument("--sort", choices=("reduction", "dice", "grid"), default="reduction")
    ap.add_argument("--front", action="store_true", help="print only the Pareto front and the settings meeting the target")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", type=Path, help="also write every row here")
    args = ap.parse_args(argv)

    images = sorted(glob.glob(args.images))
    if not images:
        ap.error(f"no images match {args.images}")
    grid = make_grid(_ints(args.blur), _cannys(args.canny), _floats(args.threshold), _ints(args.min_size),
                     _ints(args.max_size), _ints(args.token_size) or None, _floats(args.count_threshold),
                     _ints(args.edge_downsample))
    t0 = time.perf_counter()
    if args.oracle:
        grid = list({dataclasses.replace(g, blur=0, canny_low=0.0, canny_high=0.0): None for g in grid})
    jobs = [(im, args.masks, grid, args.oracle) for im in images]
    if args.jobs > 1:
        with multiprocessing.Pool(args.jobs) as pool:
            results = pool.map(measure_image, jobs, chunksize=1)
    else:
        results = [measure_image(j) for j in jobs]
    seconds = time.perf_counter() - t0
    references = summarise_references(uniform_references(grid), np.stack([r[1] for r in results]))
    rows = summarise(grid, np.stack([r[0] for r in results]), references)
    # Reductions are comparable only against one reference: a front per (min leaf, token) size.
    for key in {(r["min_size"], r["token_size"]) for r in rows}:
        group = [r for r in rows if (r["min_size"], r["token_size"]) == key]
        front = pareto(np.array([r["reduction"] for r in group]), np.array([r["dice"] for r in group]))
        for r, f in zip(group, front):
            r["pareto"] = bool(f)
    for r in rows:
        r["meets"] = r["reduction"] >= args.target_reduction and r["dice"] >= args.target_dice
    if args.sort == "reduction":
        rows.sort(key=lambda r: (-r["reduction"], -r["dice"]))
    elif args.sort == "dice":
        rows.sort(key=lambda r: (-r["dice"], -r["reduction"]))
    shown = [r for r in rows if r["pareto"] or r["meets"]] if args.front else rows
    print(f"{len(images)} images ({args.images}), {len(grid)} settings, threshold mode, "
          f"{'edges: mask outlines (oracle), ' if args.oracle else ''}"
          f"whole image as tissue; {seconds:.0f} s on {args.jobs} processes "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)")
    print(format_table(shown, args.target_reduction, args.target_dice))
    print()
    print(format_references(references))
    meeting = [r for r in rows if r["meets"]]
    if meeting:
        best = max(meeting, key=lambda r: (r["reduction"], r["dice"]))
        print(f"{len(meeting)} settings meet the target; the most reducing: blur {best['blur']}, "
              f"Canny {best['canny_low']:g}/{best['canny_high']:g}, threshold {_threshold(best)}, "
              f"min {best['min_size']}, max {best['max_size']}, token {best['token_size']}: "
              f"{best['reduction']:.1f}x, Dice {best['dice']:.4f}")
    else:
        print("no setting meets the target; see the Pareto front (P)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"images": args.images, "n_images": len(images), "mpp": GLAS_MPP,
                                         "seconds": seconds, "rows": rows,
                                         "uniform": references}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
