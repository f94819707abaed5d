#!/usr/bin/env python
"""Batch throughput: slides per minute for ``wsi-amr tile`` on one process, ``--jobs 2``, and a
two-worker Dask LocalCluster, on the same slide set in one run.

Two workloads, each run four ways:

- ``coords``: ``wsi-amr tile SLIDES -o OUT --mpp 0.5 --size 256``, the default job (tissue, tile
  grid, ``tiles.h5``, thumbnail), one core per slide, on ``--slides`` slides (default 288: hard
  links to the 12 generated slides, so they are separate slides to the runner but take no disk:
  a batch of a few hundred, over which start-up costs weigh as little as in real use);
- ``images``: the same with ``--save-images`` (every tile as a JPEG) on ``--image-slides`` of them. One
  process already reads on one thread while a second encodes and writes, so it uses about 1.5
  cores by itself and two processes can add at most 2 / 1.5 on two cores.

The four ways:

- ``--jobs 1``: one process, slide after slide (the reference);
- ``--jobs 2``: a local pool of two worker processes;
- ``--scheduler local:2``: the command starts a two-worker LocalCluster, and stops it at the end;
- ``--scheduler tcp://...``: a two-worker LocalCluster started beforehand (outside the timing), as
  a cluster that is already up.

Each time is the whole command's wall clock (process start, pool or cluster start included), into
an empty output folder under ``--out-root`` (default: a temporary folder). Runs are interleaved and
repeated; each figure is the median over rounds, and each ratio the median of the per-round ratios
to ``--jobs 1`` (same round, same machine state). Beside each time: the CPU time the run got (the
command, its pool or cluster workers) divided by its wall clock, and how idle the machine was just
before it (the share of CPU time idle over 3 s). ``--wait-idle 0.9`` starts each run only once the
machine has been at least 90% idle for 3 s (giving up after ``--max-wait`` seconds).

Writing many small files is kernel work that does not scale across processes on every file
system (on this project's ext4 virtual disk, creating a file costs about 1 ms of system time and
two writers slow each other down); ``--out-root /dev/shm`` takes the disk out of the figure.

    python bench/scale.py                      # makes 12 slides of 24000 px in bench/out/scale if missing
    python bench/scale.py --slides 96 --json bench/out/scale.json
    python bench/scale.py --wait-idle 0.9      # on a shared machine: each run waits for a quiet moment
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil  # comes with distributed

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "wsi_amr.cli"]
TILE_ARGS = ["--mpp", "0.5", "--size", "256"]
MODES = {"coords": [], "images": ["--save-images"]}
BACKENDS = {"jobs 1": ["--jobs", "1"], "jobs 2": ["--jobs", "2"], "local:2": ["--scheduler", "local:2"],
            "tcp (running)": None}
BASE = 12  # generated slides


def base_slides(size: int) -> list[Path]:
    """``BASE`` benchmark slides of ``size`` px (GlaS tissue, one seed each), made once."""
    folder = REPO / "bench" / "out" / "scale"
    paths = [folder / f"scale-{size}-s{i}.tiff" for i in range(BASE)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        sys.path.insert(0, str(REPO / "bench"))
        from make_slide import make_slide

        for i in missing:
            make_slide(folder, size, name=paths[i].stem, seed=i, geojson=False)
    return paths


def linked_slides(base: list[Path], n: int) -> list[Path]:
    """``n`` slides, hard links to ``base`` in turn: distinct paths (and stems) to the runner,
    which treats them as distinct slides, at no disk cost. Copies where links are refused."""
    folder = base[0].parent / f"linked-{base[0].stem.rsplit('-', 1)[0]}-{n}"
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"slide{i:04d}.tiff"
        if not path.exists():
            try:
                os.link(base[i % len(base)], path)
            except OSError:
                shutil.copyfile(base[i % len(base)], path)
        paths.append(path)
    return paths


def cpu_seconds(workers: list[psutil.Process]) -> float:
    """CPU time of this process's finished children (and theirs), and of running ``workers``."""
    own = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime
    for w in workers:
        with contextlib.suppress(psutil.Error):
            t = w.cpu_times()
            total += t.user + t.system
    return total


def run_tile(slides: list[Path], out: Path, extra: list[str], workers: list[psutil.Process]) -> tuple[float, float]:
    """Wall-clock seconds of the command, and the CPU cores it had on average."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*CLI, "tile", *map(str, slides), "-o", str(out), *TILE_ARGS, *extra]
    cpu = cpu_seconds(workers)
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{res.stderr[-2000:]}")
    return seconds, (cpu_seconds(workers) - cpu) / seconds


def idle_fraction(seconds: float = 3.0) -> float:
    """Share of all CPUs' time spent idle over the next ``seconds``."""
    a = psutil.cpu_times()
    time.sleep(seconds)
    b = psutil.cpu_times()
    total = sum(b) - sum(a)
    return (b.idle - a.idle) / total if total > 0 else 1.0


def wait_for_idle(threshold: float, max_wait: float) -> float:
    """Wait until the machine is at least ``threshold`` idle (at most ``max_wait`` s); returns the
    last idle fraction measured."""
    deadline = time.monotonic() + max_wait
    idle = idle_fraction()
    while idle < threshold and time.monotonic() < deadline:
        idle = idle_fraction()
    return idle


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=[*MODES, "both"], default="both", help="workload(s) to time")
    ap.add_argument("--slides", type=int, default=288, help="slides in the coords set (hard links to 12)")
    ap.add_argument("--image-slides", type=int, default=4, help="slides in the images set (of the 12)")
    ap.add_argument("--make-size", type=int, default=24000, help="side of each generated slide, px")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out-root", type=Path, help="folder for the outputs (default: a temporary folder)")
    ap.add_argument("--wait-idle", type=float, default=0.0, help="start each run once the CPUs are this idle (0-1)")
    ap.add_argument("--max-wait", type=float, default=1800.0, help="seconds to wait for --wait-idle at most")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    sys.path.insert(0, str(REPO))
    # Bytecode for wsi-amr's own modules, as an installed package has: without it (a source
    # checkout run with PYTHONDONTWRITEBYTECODE set) every process, each pool and cluster worker
    # included, compiles them again at start.
    compileall.compile_dir(REPO / "wsi_amr", quiet=1)
    base = base_slides(args.make_size)
    sets = {"coords": linked_slides(base, args.slides), "images": base[:args.image_slides]}
    modes = list(MODES) if args.mode == "both" else [args.mode]
    import dask
    from distributed import LocalCluster

    from wsi_amr.run.cluster import LOCAL_CONFIG

    work = Path(tempfile.mkdtemp(prefix="wsi-amr-bench-scale-", dir=args.out_root))
    keys = [(m, b) for b in BACKENDS for m in modes]  # the running cluster's runs last in a round
    seconds: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    cores: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    idles: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    try:
        run_tile(base[:1], work / "warm", MODES["images"], [])  # page cache, imports
        for r in range(args.repeat):
            with contextlib.ExitStack() as stack:
                backends, workers = dict(BACKENDS), []
                for mode, name in keys:
                    if BACKENDS[name] is None and not workers:
                        # Started only now, outside the timing: an idle cluster takes some CPU,
                        # which the other runs should not pay. Same settings as local:N.
                        stack.enter_context(dask.config.set(LOCAL_CONFIG))
                        cluster = stack.enter_context(LocalCluster(
                            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                            dashboard_address=":0", silence_logs=logging.ERROR))
                        backends[name] = ["--scheduler", cluster.scheduler_address]
                        workers = psutil.Process().children(recursive=True)
                    idles[mode, name].append(wait_for_idle(args.wait_idle, args.max_wait))
                    s, used = run_tile(sets[mode], work / "out", MODES[mode] + backends[name],
                                       workers if BACKENDS[name] is None else [])
                    seconds[mode, name].append(s)
                    cores[mode, name].append(used)
                    print(f"round {r + 1} {mode:<7}{name:<14} {s:7.1f} s  {used:4.2f} cores  "
                          f"({idles[mode, name][-1]:.0%} idle before)", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = []
    for mode, name in keys:
        n = len(sets[mode])
        report.append({
            "mode": mode, "backend": name, "slides": n,
            "slides_per_min": statistics.median(n * 60 / s for s in seconds[mode, name]),
            "ratio_to_one_process": statistics.median(
                seconds[mode, "jobs 1"][i] / seconds[mode, name][i] for i in range(args.repeat)),
            "seconds": seconds[mode, name], "cores": cores[mode, name], "idle_before": idles[mode, name]})
    print(f"tile {' '.join(TILE_ARGS)} [--save-images]; slides of {args.make_size} px; median of {args.repeat} "
          f"rounds; {os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}; "
          f"outputs under {args.out_root or tempfile.gettempdir()}")
    print(f"{'workload':<16}{'run':<16}{'slides/min':>11}{'x 1 process':>13}{'seconds':>9}{'cores':>7}"
          f"{'idle before':>13}")
    for row in sorted(report, key=lambda row: modes.index(row["mode"])):
        label = f"{row['mode']} ({row['slides']})"
        print(f"{label:<16}{row['backend']:<16}{row['slides_per_min']:>11.1f}{row['ratio_to_one_process']:>13.2f}"
              f"{statistics.median(row['seconds']):>9.1f}{statistics.median(row['cores']):>7.2f}"
              f"{statistics.median(row['idle_before']):>13.0%}")
    if args.json:
        args.json.write_text(json.dumps({"size": args.make_size, "tile_args": TILE_ARGS, "runs": report,
                                         "cpus": os.cpu_count(), "cpu": cpu_model(),
                                         "out_root": str(args.out_root or tempfile.gettempdir())}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
