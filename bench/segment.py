#!/usr/bin/env python
"""`wsi-amr segment` on one slide, adaptive against uniform patching, same model, one run.

Runs the command twice on the same slide (``--patching adaptive`` then ``--patching uniform``,
each in its own process with ``--overwrite``), and reports wall time, peak memory (RSS of the
process), tokens, and the time per stage from each run's manifest; the speed-up is the ratio of
the two wall times. With ``--reference`` (the slide's ground-truth GeoJSON from
``bench/make_slide.py``) each result is scored with ``wsi-amr evaluate``.

    python bench/segment.py --slide bench/out/slides/glas-20000.tiff --model runs/glas/best.safetensors \\
        --reference bench/out/slides/glas-20000.geojson
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def run_segment(exe: str, slide: Path, model: Path, out: Path, patching: str, extra: list[str]) -> dict:
    cmd = [exe, "segment", str(slide), "-o", str(out), "--model", str(model), "--patching", patching,
           "--overwrite", "--json", *extra]
    # A fresh parent per run, so the peak RSS it reports is this run's alone.
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(r.returncode)")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{patching}: exit {res.returncode}\n{res.stderr}")
    row = json.loads(res.stdout.strip().splitlines()[0])
    peak = int(res.stderr.strip().splitlines()[-1].split()[-1])
    return {"patching": patching, "wall_s": round(wall, 1), "peak_rss_mib": round(peak / 1024),
            "stats": row["stats"], "geojson": str(Path(row["out_dir"]) / row["outputs"]["geojson"])}


def seam_check(geojson: Path, manifest: Path) -> dict:
    """Length of object outline lying exactly on the borders between the run's final blocks,
    against the same measure on control lines 64 working px beside them (the leaf grid puts
    outline on both alike). A seam (an object cut at a block border) adds outline on the borders
    only; objects that came out whole leave the two about equal."""
    import shapely
    from shapely.geometry import LineString

    from wsi_amr.geojson import read_geojson
    from wsi_amr.segmentation.windows import window_starts

    doc = json.loads(manifest.read_text())
    step = doc["steps"]["segment"]
    ds, window, overlap = step["stats"]["downsample"], step["params"]["segment"]["window"], step["params"]["segment"]["overlap"]
    w0, h0 = doc["slide"]["width"], doc["slide"]["height"]
    bx, by = doc["slide"].get("bounds_offset") or (0, 0)
    width, height = round(w0 / ds), round(h0 / ds)
    xs, ys = window_starts(width, window, overlap)[1:], window_starts(height, window, overlap)[1:]
    rings = shapely.boundary(np.array([o.geometry for o in read_geojson(geojson)], dtype=object))
    tree = shapely.STRtree(rings)
    mpp = doc["slide"].get("mpp_x") or 0.5

    def on(shift: int) -> float:
        lines = [LineString([((x + shift) * ds - bx, -1), ((x + shift) * ds - bx, h0 + 1)]) for x in xs]
        lines += [LineString([(-1, (y + shift) * ds - by), (w0 + 1, (y + shift) * ds - by)]) for y in ys]
        total = 0.0
        for line in lines:
            hits = tree.query(line, predicate="intersects")
            if len(hits):
                total += float(shapely.length(shapely.intersection(rings[hits], line)).sum())
        return round(total * mpp, 1)

    return {"outline_um": round(float(shapely.length(rings).sum()) * mpp), "block_borders": len(xs) + len(ys),
            "on_block_borders_um": on(0), "on_lines_64px_before_um": on(-64), "on_lines_64px_after_um": on(64)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--reference", type=Path, help="ground-truth GeoJSON of the slide, to score both results")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "segment")
    ap.add_argument("--modes", default="adaptive,uniform")
    ap.add_argument("--args", default="", help="more options for both runs, as one string")
    args = ap.parse_args(argv)
    exe = str(Path(sys.executable).with_name("wsi-amr"))
    rows = []
    for mode in args.modes.split(","):
        row = run_segment(exe, args.slide, args.model, args.out / mode, mode, args.args.split())
        if args.reference:
            from tifffile import TiffFile

            with TiffFile(args.slide) as tif:
                h, w = tif.pages[0].shape[:2]
            ev = subprocess.run([exe, "evaluate", row["geojson"], str(args.reference), "--size", f"{w}x{h}",
                                 "--downsample", "4", "--json"], capture_output=True, text=True, check=True)
            row["dice"] = json.loads(ev.stdout.strip().splitlines()[-1])["mean_dice"]
        row["seams"] = seam_check(Path(row["geojson"]), Path(row["geojson"]).parent / "manifest.json")
        print(json.dumps(row), flush=True)
        rows.append(row)
    if len(rows) == 2:
        a, u = rows
        print(f"speed-up adaptive over uniform: {u['wall_s'] / a['wall_s']:.2f}x wall, "
              f"{u['stats']['seconds_model'] / max(a['stats']['seconds_model'], 1e-9):.2f}x model; tokens "
              f"{a['stats']['tokens']} vs {u['stats']['tokens']} ({platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "segment.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
