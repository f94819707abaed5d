#!/usr/bin/env python
"""Tiling throughput: ``wsi-amr tile --save-images`` against a bare OpenSlide read loop.

In one run, on one slide, over the same coordinates: a bare ``OpenSlide.read_region`` loop (the
I/O floor: reads only, nothing written), then the whole ``wsi-amr tile --save-images`` command
(tissue detection, tiles.h5, overlay, every tile encoded and written) with ``--jobs 1`` and
``--jobs 2``. Runs are interleaved and repeated; the median of each is reported as tiles per
second and as a ratio to the bare loop measured in the same round.

    python bench/tiling.py                      # makes bench/out/slides/glas-16000.tiff if missing
    python bench/tiling.py --slide my.svs --size 256 --repeat 5

The command's time is its whole wall-clock (process start included); the bare loop's is the loop
alone, so the comparison is conservative.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "wsi_amr.cli"]

BARE_LOOP = r"""
import sys, time, h5py, openslide
path, coords_file, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
with h5py.File(coords_file) as f:
    coords = [(int(x), int(y)) for x, y in f["coords"][:]]
slide = openslide.OpenSlide(path)
t = time.perf_counter()
for x, y in coords:
    slide.read_region((x, y), 0, (size, size))
print(time.perf_counter() - t, len(coords))
"""


def run_tile(slide: Path, out: Path, mpp: float, size: int, jobs: int, fmt: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*CLI, "tile", str(slide), "-o", str(out), "--mpp", str(mpp), "--size", str(size),
           "--save-images", "--image-format", fmt, "--jobs", str(jobs)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=_env())
    return time.perf_counter() - t


def run_bare(slide: Path, coords_file: Path, size: int) -> tuple[float, int]:
    res = subprocess.run([sys.executable, "-c", BARE_LOOP, str(slide), str(coords_file), str(size)],
                         check=True, capture_output=True, text=True, env=_env())
    seconds, n = res.stdout.split()
    return float(seconds), int(n)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def default_slide(size: int) -> Path:
    path = REPO / "bench" / "out" / "slides" / f"glas-{size}.tiff"
    if not path.exists():
        sys.path.insert(0, str(REPO / "bench"))
        from make_slide import make_slide

        make_slide(path.parent, size)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", type=Path, help="slide to tile (default: a 16k benchmark-maker slide)")
    ap.add_argument("--make-size", type=int, default=16000, help="side of the default benchmark slide, px")
    ap.add_argument("--size", type=int, default=256, help="tile size, px at the slide's level-0 mpp")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--formats", default="jpeg,png", help="tile image formats to measure")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    slide = args.slide or default_slide(args.make_size)
    sys.path.insert(0, str(REPO))
    from wsi_amr.slide import open_slide

    with open_slide(slide) as s:
        mpp = s.require_mpp()
        dims = s.dimensions
    work = Path(tempfile.mkdtemp(prefix="wsi-amr-bench-tiling-"))
    try:
        # Warm-up: fills the page cache and gives the coordinates both sides read.
        run_tile(slide, work / "warm", mpp, args.size, 1, "jpeg")
        coords_file = work / "coords.h5"
        stem = next((work / "warm").iterdir(), None)
        shutil.copy(next((work / "warm").glob("*/tiles.h5")), coords_file)
        assert stem is not None
        formats = [f for f in args.formats.split(",") if f]
        rounds: dict[str, list[float]] = {"bare": []}
        for fmt in formats:
            for jobs in (1, 2):
                rounds[f"{fmt}-j{jobs}"] = []
        n_tiles = 0
        for _ in range(args.repeat):
            bare, n_tiles = run_bare(slide, coords_file, args.size)
            rounds["bare"].append(n_tiles / bare)
            for fmt in formats:
                for jobs in (1, 2):
                    t = run_tile(slide, work / f"{fmt}-{jobs}", mpp, args.size, jobs, fmt)
                    rounds[f"{fmt}-j{jobs}"].append(n_tiles / t)
        # Ratios per round (same round, same machine state), then their median.
        ratio = {k: statistics.median(v[i] / rounds["bare"][i] for i in range(args.repeat))
                 for k, v in rounds.items() if k != "bare"}
        tps = {k: statistics.median(v) for k, v in rounds.items()}
        print(f"slide {slide.name} {dims[0]}x{dims[1]} @ {mpp:g} µm/px, {n_tiles} tiles of {args.size} px, "
              f"median of {args.repeat} rounds, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
        print(f"{'run':<28}{'tiles/s':>10}{'x bare':>9}")
        print(f"{'bare read_region loop':<28}{tps['bare']:>10.0f}{1.0:>9.2f}")
        for k in ratio:
            fmt, jobs = k.split("-j")
            label = f"wsi-amr tile {fmt} --jobs {jobs}"
            print(f"{label:<28}{tps[k]:>10.0f}{ratio[k]:>9.2f}")
        if args.json:
            args.json.write_text(json.dumps({"slide": str(slide), "tiles": n_tiles, "tiles_per_s": tps,
                                             "ratio_to_bare": ratio}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
