#!/usr/bin/env python
"""Quadtree scaling: read, edge detection and tree building over whole slides, window by window.

Benchmark-maker slides (real GlaS H&E, bench/make_slide.py) of four sizes, square at the working
mpp (default 0.62 µm/px, GlaS native, so the sweep of bench/tune_quadtree.py holds), are read
whole at that mpp in ``--window`` px windows (a multiple of max_size, so quadtree roots never
cross a window). Per window, timed apart:

- read: ``Slide.read_region`` of the window plus a margin (the blur and Canny see across the
  window's borders, as the ``wsi-amr quadtree`` command does);
- edges: ``quadtree.params_edge_map`` on it (at the edge downsampling), cropped back to the window;
- tree: ``quadtree.build_quadtree`` on the window's edge map (default ``QuadtreeParams``).

The tree is built with the window's tissue mask, as the command builds it (``tissue.detect_tissue``
on an 8 µm/px thumbnail, sampled at the working resolution; detection itself is not timed with the
stages). Leaves are counted with it and, from a second untimed tree, without it, against uniform
patching at the min leaf size over the same area. Each size runs in its
own process, so its peak memory is its own; nothing is ever held at slide size.

    python bench/quadtree.py                             # makes bench/out/slides/qt-*.tiff if missing
    python bench/quadtree.py --sizes 4096,16384 --json bench/out/quadtree.json

Checks printed at the end: tree building <= 25% of edge detection at every size, and total
seconds per megapixel roughly constant (linear in pixel count).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from wsi_amr.quadtree import QuadtreeParams, build_quadtree, params_edge_map, uniform_token_count
from wsi_amr.slide import open_slide  # noqa: E402
from wsi_amr.tissue import detect_tissue  # noqa: E402

SLIDES = REPO / "bench" / "out" / "slides"
WORKING_MPP = 0.62
MARGIN = 32  # working px read around a window: blur radius (10 at kernel 21) + Sobel + hysteresis
TISSUE_MPP = 8.0
TREE_SHARE = 0.25  # tree building may cost at most this fraction of edge detection


def slide_path(size: int, mpp: float) -> Path:
    """The benchmark slide of ``size`` px square at ``mpp``; made (once) when missing."""
    name = f"qt-{size}" if mpp == WORKING_MPP else f"qt-{size}-{mpp:g}"
    path = SLIDES / f"{name}.tiff"
    if not path.exists():
        from make_slide import make_slide

        print(f"making {path} ...", file=sys.stderr, flush=True)
        make_slide(SLIDES, size, mpp=mpp, name=name, workers=2, geojson=False)
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def tissue_mask(slide: Any, downsample: float) -> tuple[np.ndarray, float]:
    """Tissue of the whole slide at about TISSUE_MPP, and that mask's level-0 px per px."""
    mpp = slide.require_mpp()
    w, h = slide.dimensions
    ds = max(downsample, TISSUE_MPP / mpp)
    rgb = slide.read_region(0, 0, max(1, round(w / ds)), max(1, round(h / ds)), ds)
    mask, _ = detect_tissue(rgb, mpp * ds)
    return mask, ds


def window_tissue(mask: np.ndarray, mask_ds: float, ds: float, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The mask under each working pixel's centre of the window (nearest neighbour)."""
    f = ds / mask_ds
    cols = np.minimum(((x + np.arange(w) + 0.5) * f).astype(np.int64), mask.shape[1] - 1)
    rows = np.minimum(((y + np.arange(h) + 0.5) * f).astype(np.int64), mask.shape[0] - 1)
    return mask[rows[:, None], cols[None, :]]


def measure(path: Path, mpp: float, window: int, params: QuadtreeParams) -> dict[str, Any]:
    """Stage times and counts of one slide, read whole at ``mpp`` in ``window`` px windows."""
    times = {"read": 0.0, "edges": 0.0, "tree": 0.0}
    counts = {"leaves": 0, "uniform": 0, "leaves_tissue": 0, "uniform_tissue": 0, "windows": 0}
    with open_slide(path) as slide:
        ds = mpp / slide.require_mpp()
        width, height = (int(round(d / ds)) for d in slide.dimensions)
        t = time.perf_counter()
        tissue, tissue_ds = tissue_mask(slide, ds)
        tissue_seconds = time.perf_counter() - t
        # A process's first window pays for first touches of its buffers (several hundred MB at
        # 4096 px); warm up on one synthetic window so that a one-window slide is not all that.
        noise = np.random.default_rng(0).integers(0, 256, (window + 2 * MARGIN, window + 2 * MARGIN, 3), np.uint8)
        f = params.edge_downsample  # MARGIN is a multiple of it, so edge cells line up with the window's
        warm = params_edge_map(noise, params)[MARGIN // f:-MARGIN // f, MARGIN // f:-MARGIN // f]
        build_quadtree(warm, params, shape=(window, window))
        del noise, warm
        for y in range(0, height, window):
            for x in range(0, width, window):
                w, h = min(window, width - x), min(window, height - y)
                left, top = min(MARGIN, x), min(MARGIN, y)
                right, bottom = min(MARGIN, width - x - w), min(MARGIN, height - y - h)
                t0 = time.perf_counter()
                rgb = slide.read_region((x - left) * ds, (y - top) * ds, w + left + right, h + top + bottom, ds)
                t1 = time.perf_counter()
                edges = params_edge_map(rgb, params)[top // f:(top + h + f - 1) // f, left // f:(left + w + f - 1) // f]
                t2 = time.perf_counter()
                tis = window_tissue(tissue, tissue_ds, ds, x, y, w, h)
                t2b = time.perf_counter()
                leaves_t = build_quadtree(edges, params, tis)
                t3 = time.perf_counter()
                leaves = build_quadtree(edges, params, shape=(h, w))
                times["read"] += t1 - t0
                times["edges"] += t2 - t1
                times["tree"] += t3 - t2b
                counts["windows"] += 1
                counts["leaves"] += len(leaves)
                counts["uniform"] += uniform_token_count((h, w), params.min_size)
                counts["leaves_tissue"] += len(leaves_t)
                counts["uniform_tissue"] += uniform_token_count((h, w), params.min_size, tis)
    megapixels = width * height / 1e6
    total = sum(times.values())
    return {
        "slide": str(path), "width": width, "height": height, "mpp": mpp, "window": window,
        "megapixels": megapixels, **{f"{k}_s": v for k, v in times.items()}, "total_s": total,
        "s_per_mp": total / megapixels, "tree_over_edges": times["tree"] / times["edges"],
        "tissue_s": tissue_seconds, "tissue_fraction": float(tissue.mean()), **counts,
        "reduction": counts["uniform"] / counts["leaves"],
        "reduction_tissue": counts["uniform_tissue"] / max(counts["leaves_tissue"], 1),
        "peak_rss_mb": peak_rss_mb(),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'size':>6} {'MP':>7} {'read s':>8} {'edges s':>8} {'tree s':>7} {'tree/edg':>8} {'total s':>8} "
            f"{'s/MP':>7} {'leaves':>9} {'uniform':>10} {'reduct':>7} {'leaves.t':>9} {'unif.t':>10} "
            f"{'red.t':>6} {'rss MB':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['width']:>6} {r['megapixels']:>7.0f} {r['read_s']:>8.1f} {r['edges_s']:>8.1f} {r['tree_s']:>7.2f} "
            f"{r['tree_over_edges']:>7.1%} {r['total_s']:>8.1f} {r['s_per_mp']:>7.4f} {r['leaves']:>9} "
            f"{r['uniform']:>10} {r['reduction']:>6.1f}x {r['leaves_tissue']:>9} {r['uniform_tissue']:>10} "
            f"{r['reduction_tissue']:>5.1f}x {r['peak_rss_mb']:>7.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4096,16384,32768,65536", help="slide sides, working px")
    ap.add_argument("--mpp", type=float, default=WORKING_MPP, help="working resolution, µm/px (slides are made at it)")
    ap.add_argument("--window", type=int, default=4096, help="window side, working px (a multiple of max_size)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # internal: measure this slide, print JSON
    args = ap.parse_args(argv)
    params = QuadtreeParams()
    if args.window % params.max_size:
        ap.error(f"--window must be a multiple of max_size ({params.max_size})")
    if args.one:
        print(json.dumps(measure(args.one, args.mpp, args.window, params)))
        return 0

    rows = []
    for size in (int(s) for s in args.sizes.split(",") if s):
        path = slide_path(size, args.mpp)
        res = subprocess.run([sys.executable, __file__, "--one", str(path), "--mpp", str(args.mpp),
                              "--window", str(args.window)], check=True, capture_output=True, text=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"{path.name}: {rows[-1]['total_s']:.1f} s", file=sys.stderr, flush=True)
    p = params
    print(f"quadtree over whole slides at {args.mpp:g} µm/px, {args.window}-px windows (+{MARGIN} px margin), "
          f"one process; min {p.min_size}, max {p.max_size}, blur {p.blur_kernel}, Canny {p.canny_low:g}/"
          f"{p.canny_high:g}, split > {p.split_threshold:g} {'per px' if p.normalise else 'edge px'}; "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(format_table(rows))
    print("reduct: uniform tokens at the min leaf size over leaves, whole slide; .t: within the tissue mask "
          "(the tree timed)")
    tree_ok = all(r["tree_over_edges"] <= TREE_SHARE for r in rows)
    print(f"tree building <= {TREE_SHARE:.0%} of edge detection at every size: {'yes' if tree_ok else 'NO'} "
          f"(max {max(r['tree_over_edges'] for r in rows):.1%})")
    spm = [r["s_per_mp"] for r in rows]
    print(f"total s/MP from {min(spm):.4f} to {max(spm):.4f} (max/min {max(spm) / min(spm):.2f}) over "
          f"{rows[0]['megapixels']:.0f} to {rows[-1]['megapixels']:.0f} MP "
          f"({rows[-1]['megapixels'] / rows[0]['megapixels']:.0f}x the pixels, "
          f"{rows[-1]['total_s'] / rows[0]['total_s']:.0f}x the time)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"params": p.as_dict(), "margin": MARGIN, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
