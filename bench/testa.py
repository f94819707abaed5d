#!/usr/bin/env python
"""A segmentation checkpoint's gland Dice on GlaS testA (the bundled model's card figure).

Each image is segmented twice: with attention in squares of the training crop (``--context``),
averaged over the squares at offsets 0 and half a square (``--shifts``), how ``wsi-amr segment``
runs a model; and as one sequence per image. Dice of the Gland class
(every non-background class together for models with more), pooled over all pixels and the mean
per image.

A model on pixels (``arch`` unet) has neither attention squares nor leaves: each image is
resampled from ``--image-mpp`` to the model's mpp, segmented in one pass (the ``whole_*``
figures), and its probabilities resampled back, so Dice is counted at the images' own resolution.

``--placed``: each image is also segmented as a slide presents it, pasted on empty glass at a
random offset from the leaf grid (as the benchmark slide maker places them), with the image as
the tissue mask: the ``placed_*`` figures. GlaS images are 775 x 522 px, nearly whole 256-px
squares, so at the origin almost no quadtree root straddles an image edge; placed anywhere else
a band along every edge does.

    python bench/testa.py --model wsi_amr/models/glas-gland.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--glas", type=Path, default=REPO.parent / "shared" / "data" / "glas")
    ap.add_argument("--images", default="testA_*.png")
    ap.add_argument("--context", type=int, default=None, help="attention squares, px [default: the training crop]")
    ap.add_argument("--shifts", default=None,
                    help="context grid shifts, px, averaged [default: 0 and half the context, as wsi-amr segment]")
    ap.add_argument("--placed", action="store_true", help="also segment each image placed on glass at a random offset")
    ap.add_argument("--image-mpp", type=float, default=0.62, help="µm/px of the images (GlaS: 0.62)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)
    import torch

    from wsi_amr.images import read_rgb
    from wsi_amr.labels import read_label_image
    from wsi_amr.metrics import binary_counts, class_dice
    from wsi_amr.segmentation.model import load_checkpoint
    from wsi_amr.segmentation.predict import default_shifts, make_leaves, patching_from_card, predict_leaves, training_context

    torch.set_num_threads(args.threads)
    model, card = load_checkpoint(args.model)
    if model.cfg.arch != "token":
        return pixel_model(args, model, card)
    params, mode = patching_from_card(card)
    context = args.context or training_context(card.training)
    shifts = tuple(int(v) for v in args.shifts.split(",")) if args.shifts else tuple(default_shifts(context))
    paths = sorted((args.glas / "images").glob(args.images))
    if not paths:
        print(f"testa: no images {args.glas / 'images' / args.images}", file=sys.stderr)
        return 2
    counts: dict[str, list] = {"context": [], "whole": [], **({"placed": []} if args.placed else {})}
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    for path in paths:
        image = read_rgb(path)
        truth = read_label_image(args.glas / "masks" / path.name) > 0
        leaves = make_leaves(image, params, mode)
        for key, ctx in (("context", context), ("whole", None)):
            pred = predict_leaves(model, card, image, leaves, relative_to=params.max_size, context=ctx,
                                  shifts=shifts).argmax(2) > 0
            counts[key].append(binary_counts(pred, truth))
        if args.placed:
            h, w = truth.shape
            ox, oy = (int(v) for v in rng.integers(0, params.max_size, 2))
            canvas = np.full((h + 2 * params.max_size, w + 2 * params.max_size, 3), 248, np.uint8)
            canvas[oy:oy + h, ox:ox + w] = image
            tissue = np.zeros(canvas.shape[:2], bool)
            tissue[oy:oy + h, ox:ox + w] = True
            placed = make_leaves(canvas, params, mode, tissue)
            pred = predict_leaves(model, card, canvas, placed, relative_to=params.max_size, context=context,
                                  shifts=shifts).argmax(2)[oy:oy + h, ox:ox + w] > 0
            counts["placed"].append(binary_counts(pred, truth))
    out = {"model": str(args.model), "images": len(paths), "context": context, "shifts": list(shifts), "seconds": round(time.perf_counter() - t0, 1)}
    for key, rows in counts.items():
        c = np.array(rows, np.int64)  # per image: pixels in both, predicted, true
        out[f"{key}_pooled"] = round(class_dice(c.sum(axis=0, keepdims=True))[0], 4)
        out[f"{key}_per_image"] = round(float(np.mean(class_dice(c, absent=0.0))), 4)  # an empty image: 0
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


def pixel_model(args: argparse.Namespace, model, card) -> int:
    """testA Dice of a model on pixels (a U-Net): each image at the model's mpp, one pass, the
    probabilities resampled back to the image's own resolution."""
    import cv2

    from wsi_amr.images import read_rgb
    from wsi_amr.labels import read_label_image
    from wsi_amr.metrics import binary_counts, class_dice
    from wsi_amr.segmentation.predict import window_predictor

    if args.placed or args.context or args.shifts:
        print("testa: --placed, --context and --shifts are for token models", file=sys.stderr)
        return 2
    predictor = window_predictor(model, card)
    scale = args.image_mpp / card.mpp
    paths = sorted((args.glas / "images").glob(args.images))
    if not paths:
        print(f"testa: no images {args.glas / 'images' / args.images}", file=sys.stderr)
        return 2
    rows = []
    t0 = time.perf_counter()
    for path in paths:
        image = read_rgb(path)
        truth = read_label_image(args.glas / "masks" / path.name) > 0
        h, w = truth.shape
        small = image if scale == 1 else cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                    interpolation=cv2.INTER_AREA)
        probs = predictor.image(small)
        if probs.shape[:2] != (h, w):
            probs = cv2.resize(probs, (w, h), interpolation=cv2.INTER_LINEAR)
            probs = probs[..., None] if probs.ndim == 2 else probs
        rows.append(binary_counts(probs.argmax(2) > 0, truth))
    c = np.array(rows, np.int64)
    out = {"model": str(args.model), "arch": model.cfg.arch, "images": len(paths), "mpp": card.mpp,
           "seconds": round(time.perf_counter() - t0, 1),
           "whole_pooled": round(class_dice(c.sum(axis=0, keepdims=True))[0], 4),
           "whole_per_image": round(float(np.mean(class_dice(c, absent=0.0))), 4)}
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
