#!/usr/bin/env python
"""Does a model trained from a slide's QuPath GeoJSON segment that slide? Dice on its windows.

Trains (unless ``--model`` is given) with ``wsi-amr train segment --slides SLIDE --annotations
GEOJSON``, then segments ``--windows`` random tissue windows of ``--size`` working px of the same
slide with the model (``training.predict_image``: quadtree, tokens, model, detokenised
probabilities, tissue-aware) and compares them with the annotations rasterised at the working
resolution. Prints the pooled Dice of the annotated class and the per-window figures.

    python bench/make_slide.py --size 20000
    python bench/slide_training.py --slide bench/out/slides/glas-20000.tiff \\
        --annotations bench/out/slides/glas-20000.geojson --steps 600 --out bench/out/slide-train
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", type=Path, required=True)
    ap.add_argument("--annotations", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "slide-train")
    ap.add_argument("--model", type=Path, help="a checkpoint; skips training")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--mpp", type=float, default=0.62)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-tissue", action="store_true", help="segment whole windows, not only their tissue")
    args = ap.parse_args(argv)

    from wsi_amr.labels import load_label_mask
    from wsi_amr.metrics import dice_counts, dice_scores
    from wsi_amr.segmentation.model import load_checkpoint
    from wsi_amr.segmentation.predict import predict_image
    from wsi_amr.slide import Resolution, open_slide
    from wsi_amr.tiling import Window, sample_mask
    from wsi_amr.tissue import TissueParams, detect_slide_tissue

    model_path = args.model
    if model_path is None:
        cmd = [str(Path(sys.executable).with_name("wsi-amr")), "train", "segment", "--slides", str(args.slide),
               "--annotations", str(args.annotations), "--classes", "Background,Gland", "--mpp", str(args.mpp),
               "--steps", str(args.steps), "-o", str(args.out), "--overwrite"]
        print("$ " + " ".join(["wsi-amr", *cmd[1:]]), flush=True)
        subprocess.run(cmd, check=True)
        model_path = args.out / "best.safetensors"
    model, card = load_checkpoint(model_path)
    rng = np.random.default_rng(args.seed)
    counts = np.zeros((2, 3), np.int64)
    rows = []
    with open_slide(args.slide) as slide:
        ds = slide.downsample_for(Resolution(mpp=card.mpp))
        tm = detect_slide_tissue(slide, TissueParams())
        truth_map, _ = load_label_mask(args.annotations, slide)
        w0, h0 = slide.dimensions
        width, height = int(w0 / ds), int(h0 / ds)
        candidates = [Window(x, y, args.size, args.size) for y in range(0, height - args.size, args.size)
                      for x in range(0, width - args.size, args.size)]
        candidates = [c for c in candidates if sample_mask(tm.mask, tm.downsample, ds, c).mean() > 0.5]
        picked = [candidates[i] for i in rng.choice(len(candidates), min(args.windows, len(candidates)), replace=False)]
        for win in picked:
            rgb = slide.read_region(win.x * ds, win.y * ds, win.w, win.h, ds)
            tissue = sample_mask(tm.mask, tm.downsample, ds, win)
            pred, _ = predict_image(model, card, rgb, tissue=None if args.no_tissue else tissue)
            truth = (truth_map.window(win, ds) > 0).astype(np.uint8)
            c = dice_counts(pred, truth, 2)
            counts += c
            rows.append({"x": win.x, "y": win.y, "dice": round(dice_scores(c, card.class_names)[1], 4)})
    result = {"model": str(model_path), "slide": str(args.slide), "mpp": card.mpp, "window": args.size,
              "windows": rows, "dice_pooled": round(dice_scores(counts, card.class_names)[1], 4)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
