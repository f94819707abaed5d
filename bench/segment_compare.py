#!/usr/bin/env python
"""Adaptive against uniform patching for segmentation: same model, same training budget, one run.

1. Trains the token segmentation transformer twice on GlaS ``train_*`` with ``wsi-amr train
   segment``, once with ``--patching adaptive`` and once with ``--patching uniform``, with the
   same architecture, minimum patch size, seed and number of steps (both at once, one CPU thread
   each, unless ``--sequential``). Skipped when ``OUT/<mode>/best.safetensors`` exists (unless
   ``--retrain``).
2. Evaluates both best checkpoints on GlaS ``testA``: Dice of the gland class pooled over all
   pixels and the mean of per-image Dice; inference time per image, adaptive and uniform
   interleaved image by image.
3. Times inference of both models on square windows of a benchmark slide (``bench/make_slide.py``)
   read at the model's mpp, tissue-aware, sizes ``--windows`` (4096 px and larger), interleaved.

Speed is reported as ratios measured in the same run. Everything goes to ``OUT/compare.json``.

    python bench/segment_compare.py --steps 1000 --out bench/out/compare
    python bench/segment_compare.py --out bench/out/compare --windows 1024,2048,4096 --skip-test --max-sequence 0
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
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GLAS = Path(os.environ.get("WSI_AMR_DATA", REPO.parent / "shared" / "data")) / "glas"
MODES = ("adaptive", "uniform")


def train(args: argparse.Namespace) -> dict[str, Any]:
    exe = str(Path(sys.executable).with_name("wsi-amr"))
    common = [exe, "train", "segment", "--images", str(GLAS / "images" / "train_*.png"), "--masks",
              str(GLAS / "masks"), "--steps", str(args.steps), "--seed", str(args.seed), "--threads",
              str(args.train_threads), "--val-every", str(args.val_every), "--batch-size", str(args.batch_size),
              *args.train_args.split()]
    procs: dict[str, tuple[subprocess.Popen, float, list[str]]] = {}
    out: dict[str, Any] = {}
    for mode in MODES:
        run_dir = args.out / mode
        if (run_dir / "best.safetensors").exists() and not args.retrain:
            print(f"{mode}: using {run_dir / 'best.safetensors'}")
            continue
        cmd = [*common, "--patching", mode, "-o", str(run_dir), "--overwrite"]
        print("$ " + " ".join(cmd[1:]), flush=True)
        procs[mode] = (subprocess.Popen(cmd), time.perf_counter(), cmd)
        if args.sequential:
            procs[mode][0].wait()
    for mode, (proc, t0, cmd) in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"{mode} training failed (exit {proc.returncode})")
        out[mode] = {"seconds": round(time.perf_counter() - t0, 1), "command": " ".join(["wsi-amr", *cmd[1:]])}
    for mode in MODES:
        metrics = [json.loads(x) for x in (args.out / mode / "metrics.jsonl").read_text().splitlines() if x.strip()]
        vals = [m for m in metrics if m.get("val_foreground_dice") is not None]
        out.setdefault(mode, {})["curve"] = [(m["step"], round(m["val_foreground_dice"], 4)) for m in vals]
        out[mode]["best_val_dice"] = max((v for _, v in out[mode]["curve"]), default=None)
        rates = [m["steps_per_s"] for m in metrics if m.get("event") == "train" and "steps_per_s" in m]
        if rates:
            out[mode]["steps_per_s"] = round(float(np.median(rates)), 3)
        out[mode]["tokens_per_crop"] = round(float(np.mean([m["tokens_per_crop"] for m in metrics
                                                           if m.get("event") == "train"])), 1)
    return out


def load_models(args: argparse.Namespace) -> dict[str, Any]:
    from wsi_amr.segmentation.model import load_checkpoint

    return {mode: load_checkpoint(args.out / mode / "best.safetensors") for mode in MODES}


def test_a(models: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from wsi_amr.metrics import dice_counts, dice_scores
    from wsi_amr.segmentation.data import load_labelled_image
    from wsi_amr.segmentation.predict import predict_image

    images = sorted((GLAS / "images").glob("testA_*.png"), key=lambda p: int(p.stem.split("_")[1]))
    if args.limit:
        images = images[: args.limit]
    res: dict[str, Any] = {m: {"counts": 0, "per_image": [], "seconds": 0.0, "tokens": 0} for m in MODES}
    for i, path in enumerate(images):
        item = load_labelled_image(path, GLAS / "masks" / path.name, 2)
        for mode in (MODES if i % 2 == 0 else MODES[::-1]):  # alternate who goes first
            model, card = models[mode]
            t0 = time.perf_counter()
            pred, _ = predict_image(model, card, item.image, patching=mode)
            res[mode]["seconds"] += time.perf_counter() - t0
            counts = dice_counts(pred, item.labels, 2)
            res[mode]["counts"] = res[mode]["counts"] + counts
            res[mode]["per_image"].append(dice_scores(counts, card.class_names)[1])
    out: dict[str, Any] = {"images": len(images)}
    for mode in MODES:
        r = res[mode]
        out[mode] = {"dice_pooled": round(dice_scores(r["counts"], ["Background", "Gland"])[1], 4),
                     "dice_mean_per_image": round(float(np.mean(r["per_image"])), 4),
                     "seconds": round(r["seconds"], 2)}
    out["speedup"] = round(out["uniform"]["seconds"] / out["adaptive"]["seconds"], 2)
    return out


def windows(models: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    from wsi_amr.quadtree import uniform_token_count
    from wsi_amr.segmentation.predict import make_leaves, patching_from_card, predict_image
    from wsi_amr.slide import Resolution, open_slide
    from wsi_amr.tissue import TissueParams, detect_slide_tissue

    rows = []
    with open_slide(args.slide) as slide:
        card = models["adaptive"][1]
        ds = slide.downsample_for(Resolution(mpp=card.mpp))
        tm = detect_slide_tissue(slide, TissueParams())
        w0, h0 = slide.dimensions
        for side in args.windows:
            # The window with the most tissue among a few candidates around the centre.
            x0 = max(0.0, (w0 - side * ds) / 2)
            y0 = max(0.0, (h0 - side * ds) / 2)
            rgb = slide.read_region(x0, y0, side, side, ds)
            f = ds / tm.downsample
            rows_i = np.minimum(((y0 / ds + np.arange(side) + 0.5) * f).astype(int), tm.mask.shape[0] - 1)
            cols_i = np.minimum(((x0 / ds + np.arange(side) + 0.5) * f).astype(int), tm.mask.shape[1] - 1)
            tissue = tm.mask[rows_i[:, None], cols_i[None, :]]
            row: dict[str, Any] = {"window": side, "tissue": round(float(tissue.mean()), 3)}
            times: dict[str, list[float]] = {m: [] for m in MODES}
            for r in range(args.repeat):
                for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                    model, card = models[mode]
                    t0 = time.perf_counter()
                    predict_image(model, card, rgb, patching=mode, tissue=tissue, max_sequence=args.max_sequence)
                    times[mode].append(time.perf_counter() - t0)
            for mode in MODES:
                params, _ = patching_from_card(models[mode][1])
                row[f"{mode}_tokens"] = len(make_leaves(rgb, params, mode, tissue))
                row[f"{mode}_seconds"] = round(float(np.median(times[mode])), 2)
            params, _ = patching_from_card(models["uniform"][1])
            assert row["uniform_tokens"] == uniform_token_count(tissue.shape, params.min_size, tissue)
            row["token_ratio"] = round(row["uniform_tokens"] / max(1, row["adaptive_tokens"]), 2)
            row["speedup"] = round(row["uniform_seconds"] / row["adaptive_seconds"], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "compare")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-args", default="", help="more options for both trainings, as one string")
    ap.add_argument("--train-threads", type=int, default=1)
    ap.add_argument("--sequential", action="store_true", help="train one mode after the other")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--skip-test", action="store_true", help="no testA evaluation")
    ap.add_argument("--limit", type=int, default=0, help="first N testA images only")
    ap.add_argument("--slide", type=Path, default=REPO / "bench" / "out" / "slides" / "glas-20000.tiff")
    ap.add_argument("--windows", default="4096,8192", help="window sides, working px ('' to skip)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--max-sequence", type=int, default=16384,
                    help="longest token sequence in one attention (0: the whole window, global attention)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for inference")
    args = ap.parse_args(argv)
    args.windows = [int(v) for v in args.windows.split(",") if v.strip()]
    args.max_sequence = args.max_sequence or 2**62
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    result: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                              "torch": torch.__version__, "steps": args.steps}
    result["training"] = train(args)
    torch.set_num_threads(args.threads)
    models = load_models(args)
    if not args.skip_test:
        result["testA"] = test_a(models, args)
        print(json.dumps(result["testA"]), flush=True)
    if args.windows:
        result["windows"] = windows(models, args)
    name = "compare.json" if args.max_sequence == 16384 else f"compare-seq{args.max_sequence}.json"
    (args.out / name).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
