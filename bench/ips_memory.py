#!/usr/bin/env python
"""IPS `wsi-amr classify`: peak memory and patches per second against the patch count.

Against a plain attention-MIL that holds every patch embedding, side by side; and the cost of
selection against the patch encoder's.

    python bench/ips_memory.py --repeat 2 --json bench/out/ips-memory/ips_memory.json

In one run:

1. **Inputs.** CLAM/TRIDENT-style feature files (``features`` (N, D) float32, D = 1,024 as a
   foundation model's, random values; ``coords`` on a square grid of 256-px patches) of 1k, 10k and
   100k patches (``--sizes``); and benchmark slides from ``bench/make_slide.py`` (``--slide-sides``,
   px at 0.5 µm/px; about 1k and 10k tissue patches of 128 px) for the built-in small CNN.
2. **Models.** Nothing is trained: only the weights' shapes matter, so each model is freshly
   initialised (seed 0) and saved with ``ips.save_ips``: an embeddings model (D = 1,024) and a
   small-CNN model (128-px patches at 0.5 µm/px, D = 512), the same M and I (``--memory``,
   ``--chunk``) for every size.
3. **`wsi-amr classify`**, one fresh process per input (one thread, ``--overwrite``): peak RSS
   (``ru_maxrss`` of that process, spawned from a small wrapper as ``bench/segment.py`` does), wall
   time, patches per second, and the seconds by part from its ``--json`` stats (read, encode,
   select, score, aggregate, heatmap, GeoJSON).
4. **Plain attention-MIL**, one fresh process per feature file, side by side: the same model's
   attention and head over *all* the file's embeddings at once (all features read into memory, one
   forward; :func:`plain_mil`), as attention-MIL without selection runs. Peak RSS and time.
5. **Selection overhead**: on the slides, ``seconds_select`` (top-M merges) plus ``seconds_score``
   (every patch's attention) against ``seconds_encode`` (the small CNN), as ``classify`` itself
   times them; on the feature files (no encoder), the selection throughput in patches per second.

Rounds (``--repeat``) interleave every run; reported are the times of the run with the median wall
time (of two, the slower) and the median peak RSS; every round's figures are in the JSON.
Generated files go to ``--out`` (default ``bench/out/ips-memory``; about 420 MB at 100k).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "wsi_amr.cli"]
FEATURE_PATCH = 256  # level-0 px of a feature file's patch (for the heatmap and GeoJSON)
CLASSES = ["negative", "positive"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


# A small parent per run: a child's ru_maxrss starts from the RSS of the process it was spawned
# from (exec records the outgoing address space's high-water mark), and this script holds torch
# and the models; spawned from this wrapper instead, the command's own peak is what is measured.
WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
           "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
           "sys.exit(r.returncode)")


def measured(cmd: list[str]) -> tuple[str, float, float]:
    """Run ``cmd``; ``(stdout, wall seconds, peak RSS MiB)`` of that process alone."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {res.returncode}\n{res.stderr[-3000:]}")
    peak_kib = int(res.stderr.strip().splitlines()[-1].split()[-1])  # Linux: KiB
    return res.stdout, wall, peak_kib / 1024


# -- inputs -------------------------------------------------------------------------------------


def make_models(out: Path, dim: int, memory: int, chunk: int, patch: int, mpp: float) -> dict[str, Path]:
    """Freshly initialised IPS checkpoints (nothing trained: only the shapes matter here)."""
    import torch

    from wsi_amr.ips.model import IPSConfig, IPSModel, save_ips
    from wsi_amr.ips.predict import ClassifierCard

    paths = {}
    torch.manual_seed(0)
    features = IPSModel(IPSConfig(embed_dim=dim, memory=memory, chunk=chunk))
    save_ips(out / "features-model", features,
             extra=ClassifierCard(CLASSES, {"kind": "features"}).as_extra())
    paths["features"] = out / "features-model.safetensors"
    torch.manual_seed(0)
    cnn = IPSModel(IPSConfig(embed_dim=512, memory=memory, chunk=chunk, encoder="small-cnn"))
    save_ips(out / "cnn-model", cnn,
             extra=ClassifierCard(CLASSES, {"kind": "small-cnn"}, patch_size=patch, mpp=mpp).as_extra())
    paths["cnn"] = out / "cnn-model.safetensors"
    return paths


def make_feature_files(out: Path, sizes: list[int], dim: int) -> dict[int, Path]:
    """``f{N}.h5`` per size: random float32 features, coords on a square grid of 256-px patches."""
    import numpy as np

    from wsi_amr.ips.bags import write_feature_file

    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for n in sizes:
        path = out / f"f{n}.h5"
        if not path.exists():
            rng = np.random.default_rng(n)
            side = int(np.ceil(np.sqrt(n)))
            rows = np.arange(n)
            coords = np.stack([rows % side, rows // side], axis=1) * FEATURE_PATCH
            write_feature_file(path, rng.standard_normal((n, dim), dtype=np.float32), coords)
        files[n] = path
    return files


def make_slides(out: Path, sides: list[int]) -> dict[int, Path]:
    """Benchmark slides (``bench/make_slide.py``) of the given sides at 0.5 µm/px, made once."""
    sys.path.insert(0, str(REPO / "bench"))
    from make_slide import make_slide

    slides = {}
    for side in sides:
        path = out / f"glas-{side}.tiff"
        if not path.exists():
            make_slide(out, side, geojson=False)
        slides[side] = path
    return slides


# -- the runs -----------------------------------------------------------------------------------


def run_classify(source: Path, model: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    stdout, wall, rss = measured([*CLI, "classify", str(source), "-o", str(out), "--model", str(model),
                                  "--overwrite", "--json", *extra])
    stats = json.loads(stdout.strip().splitlines()[0])["stats"]
    return {"wall_s": wall, "peak_rss_mib": rss, "patches": stats["patches"], "stats": stats}


def plain_mil(model_path: str, features_path: str) -> dict[str, Any]:
    """Attention-MIL without selection: every embedding of the file in memory, the model's
    attention and head over all of them in one forward (what IPS avoids). Runs in its own process
    (``python bench/ips_memory.py _plain-mil MODEL FEATURES``), one thread like ``classify``."""
    import h5py
    import numpy as np
    import torch

    from wsi_amr.ips.model import load_ips

    torch.set_num_threads(1)
    model, _, _ = load_ips(model_path)
    t0 = time.perf_counter()
    with h5py.File(features_path, "r") as fh:
        features = torch.from_numpy(np.asarray(fh["features"], np.float32))
        coords = np.asarray(fh["coords"])
    t1 = time.perf_counter()
    with torch.no_grad():
        logits, attn = model.aggregate(features[None])
        probabilities = logits.softmax(-1)[0].numpy()
        attention = attn.mean(dim=(1, 2))[0].numpy()  # every patch's attention, as classify gives
    t2 = time.perf_counter()
    return {"patches": len(features), "coords": len(coords), "seconds_load": t1 - t0, "seconds_forward": t2 - t1,
            "probabilities": probabilities.round(6).tolist(), "attention_sum": float(attention.sum())}


def run_plain_mil(model: Path, features: Path) -> dict[str, Any]:
    stdout, wall, rss = measured([sys.executable, str(Path(__file__).resolve()), "_plain-mil", str(model),
                                  str(features)])
    return {"wall_s": wall, "peak_rss_mib": rss, **json.loads(stdout.strip().splitlines()[-1])}


def run_floor() -> dict[str, Any]:
    """A process that imports the CLI, torch and the model code and stops: the fixed part of RSS."""
    _, wall, rss = measured([sys.executable, "-c", "import torch, h5py, wsi_amr.cli, wsi_amr.jobs.classify"])
    return {"wall_s": wall, "peak_rss_mib": rss}


# -- report -------------------------------------------------------------------------------------


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median wall time, with the median peak RSS (both are per-run measurements)."""
    by_wall = sorted(runs, key=lambda r: r["wall_s"])
    row = dict(by_wall[len(by_wall) // 2])
    row["peak_rss_mib"] = statistics.median(r["peak_rss_mib"] for r in runs)
    row["peak_rss_mib_all"] = [round(r["peak_rss_mib"], 1) for r in runs]
    row["wall_s_all"] = [round(r["wall_s"], 2) for r in runs]
    return row


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem = 0
    import torch

    return {"cpu": model, "cpus": os.cpu_count(), "memory_gib": round(mem / 2**20, 1),
            "python": platform.python_version(), "torch": torch.__version__, "load_average": os.getloadavg()}


def print_report(doc: dict[str, Any]) -> None:
    m = doc["machine"]
    print(f"\n{m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']} GiB; M = {doc['memory']}, I = {doc['chunk']}; "
          f"median of {doc['repeat']} rounds; load average {doc['load_average_start']} -> {m['load_average']}")
    print(f"floor (python + imports): {doc['floor']['peak_rss_mib']:.0f} MiB")
    head = f"{'input':<26}{'patches':>9}{'peak MiB':>10}{'x first':>9}{'wall s':>9}{'patches/s':>11}{'pass s':>8}{'pass p/s':>10}"
    print(head)
    for kind in ("classify_features", "plain_mil", "classify_slides"):
        rows = doc[kind]
        if not rows:
            continue
        first = rows[0]["peak_rss_mib"]
        for r in rows:
            label = {"classify_features": "classify, features", "plain_mil": "plain attention-MIL",
                     "classify_slides": f"classify, CNN, {r.get('slide', '')}"}[kind]
            pass_s = r.get("pass_s")
            print(f"{label:<26}{r['patches']:>9}{r['peak_rss_mib']:>10.0f}{r['peak_rss_mib'] / first:>9.3f}"
                  f"{r['wall_s']:>9.1f}{r['patches'] / r['wall_s']:>11.0f}"
                  f"{pass_s if pass_s is not None else float('nan'):>8.2f}"
                  f"{r['patches'] / pass_s if pass_s else float('nan'):>10.0f}")
    print("\nseconds by part (classify stats)")
    print(f"{'input':<26}{'read':>7}{'encode':>8}{'select':>8}{'score':>7}{'aggr':>6}{'heatmap':>8}{'geojson':>8}"
          f"{'overhead':>10}{'select p/s':>11}")
    for kind in ("classify_features", "classify_slides"):
        for r in doc[kind]:
            s = r["stats"]
            label = f"features {r['patches']}" if kind == "classify_features" else f"CNN {r['slide']} {r['patches']}"
            print(f"{label:<26}{s['seconds_read']:>7.2f}{s['seconds_encode']:>8.2f}{s['seconds_select']:>8.2f}"
                  f"{s['seconds_score']:>7.2f}{s['seconds_aggregate']:>6.2f}{s['seconds_heatmap']:>8.2f}"
                  f"{s['seconds_geojson']:>8.2f}{r.get('selection_overhead', float('nan')):>10.3f}"
                  f"{r['selection_patches_per_s']:>11.0f}")
    for line in doc["verdict"]:
        print(line)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_plain-mil"]:
        print(json.dumps(plain_mil(*argv[1:3])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "ips-memory")
    ap.add_argument("--sizes", default="1000,10000,100000", help="patches per feature file")
    ap.add_argument("--dim", type=int, default=1024, help="feature width D")
    ap.add_argument("--slide-sides", default="7000,22000",
                    help="benchmark slides for the small CNN, px at 0.5 µm/px ('' to skip)")
    ap.add_argument("--patch", type=int, default=128, help="small-CNN patch, px at --mpp")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("-M", "--memory", type=int, default=512)
    ap.add_argument("-I", "--chunk", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=1, help="rounds, interleaved; the median is reported")
    ap.add_argument("--skip-plain-mil-above", type=int, default=0,
                    help="leave out plain attention-MIL runs of more patches than this (0: none left out)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO))
    args.out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    sides = [int(s) for s in args.slide_sides.split(",") if s]
    models = make_models(args.out, args.dim, args.memory, args.chunk, args.patch, args.mpp)
    files = make_feature_files(args.out / "features", sizes, args.dim)
    slides = make_slides(args.out / "slides", sides)
    flags = ["-M", str(args.memory), "-I", str(args.chunk)]

    runs: dict[str, dict[Any, list[dict[str, Any]]]] = {"floor": {0: []}, "features": {n: [] for n in sizes},
                                                       "mil": {n: [] for n in sizes}, "slides": {s: [] for s in sides}}
    for r in range(args.repeat):
        print(f"round {r + 1}/{args.repeat}", file=sys.stderr, flush=True)
        runs["floor"][0].append(run_floor())
        for n in sizes:
            runs["features"][n].append(run_classify(files[n], models["features"], args.out / "classify",
                                                    [*flags, "--patch-size", str(FEATURE_PATCH)]))
            print(f"  classify {n}: {runs['features'][n][-1]['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
            if not args.skip_plain_mil_above or n <= args.skip_plain_mil_above:
                runs["mil"][n].append(run_plain_mil(models["features"], files[n]))
                print(f"  plain MIL {n}: {runs['mil'][n][-1]['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
        for side in sides:
            runs["slides"][side].append(run_classify(slides[side], models["cnn"], args.out / "classify", flags))
            print(f"  classify slide {side}: {runs['slides'][side][-1]['patches']} patches", file=sys.stderr, flush=True)

    def pass_seconds(stats: dict[str, float]) -> float:
        return sum(stats[f"seconds_{p}"] for p in ("read", "encode", "select", "score", "aggregate"))

    features = []
    for n in sizes:
        row = median_run(runs["features"][n])
        s = row["stats"]
        row["pass_s"] = pass_seconds(s)
        row["selection_patches_per_s"] = n / max(s["seconds_select"] + s["seconds_score"], 1e-9)
        features.append(row)
    mil = []
    for n in sizes:
        if runs["mil"][n]:
            row = median_run(runs["mil"][n])
            row["pass_s"] = row["seconds_load"] + row["seconds_forward"]
            mil.append(row)
    slide_rows = []
    for side in sides:
        row = median_run(runs["slides"][side])
        s = row["stats"]
        row["slide"] = slides[side].name
        row["pass_s"] = pass_seconds(s)
        row["selection_overhead"] = (s["seconds_select"] + s["seconds_score"]) / max(s["seconds_encode"], 1e-9)
        row["selection_patches_per_s"] = row["patches"] / max(s["seconds_select"] + s["seconds_score"], 1e-9)
        slide_rows.append(row)

    verdict = []
    if len(features) >= 2:
        ratio = features[-1]["peak_rss_mib"] / features[0]["peak_rss_mib"]
        per_round = [runs["features"][sizes[-1]][i]["peak_rss_mib"] / runs["features"][sizes[0]][i]["peak_rss_mib"]
                     for i in range(args.repeat)]
        verdict.append(f"classify peak RSS at {sizes[-1]} patches / at {sizes[0]}: {ratio:.3f}x "
                       f"(per round {', '.join(f'{v:.3f}' for v in per_round)}; target <= 1.1x: "
                       f"{'met' if ratio <= 1.1 else 'NOT met'})")
    if len(mil) >= 2:
        verdict.append(f"plain attention-MIL peak RSS at {mil[-1]['patches']} / at {mil[0]['patches']}: "
                       f"{mil[-1]['peak_rss_mib'] / mil[0]['peak_rss_mib']:.2f}x")
    for row in slide_rows:
        verdict.append(f"selection overhead (select + score) / encode on {row['slide']} ({row['patches']} patches): "
                       f"{100 * row['selection_overhead']:.1f}% (target < 20%: "
                       f"{'met' if row['selection_overhead'] < 0.2 else 'NOT met'})")
    doc = {"command": "python bench/ips_memory.py " + " ".join(argv), "machine": machine(),
           "load_average_start": load_start, "memory": args.memory, "chunk": args.chunk, "dim": args.dim,
           "repeat": args.repeat, "floor": median_run(runs["floor"][0]), "classify_features": features,
           "plain_mil": mil, "classify_slides": slide_rows, "verdict": verdict}
    print_report(doc)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
