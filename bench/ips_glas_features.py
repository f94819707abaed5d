#!/usr/bin/env python
"""IPS on GlaS benign vs malignant with a frozen encoder made from our own gland segmenter.

The small CNN trained from scratch on 71 GlaS bags does not generalise (bench/ips_glas.py). Here
the patch encoder is the bundled gland segmentation model (trained by ``wsi-amr train segment`` on
GlaS ``train_*`` masks only, so nothing of testA is seen), frozen: each 256-px patch is cut into
uniform ``--leaf``-px leaves, tokenised as the segmenter tokenises (area average to 8 x 8), run
through its transformer, and the hidden states pooled over the patch's tokens (``--pool``: their
maximum, or mean and maximum) beside the mean and spread of its gland probability.

Two steps keep the features from telling patients apart rather than grades (GlaS patients share
a stain, and in ``train_*`` most patients have one grade only): each image is stain-normalised
first (``--stain reinhard``: its CIELAB mean and spread mapped to those of the training images),
and each feature is standardised with the mean and spread over the training images' patches.

The script exports the encoder with the standardisation as TorchScript (``OUT/glas-seg-encoder.pt``,
usable as ``wsi-amr train classify --encoder`` / ``wsi-amr classify --encoder`` on stain-normalised
images), writes one CLAM-style feature file per GlaS image (``OUT/features/<name>.h5``) and
``train.csv`` / ``testA.csv``, then runs the product commands on them once (a seeded validation
split picks the checkpoint; ``bench/ips_glas_cv.py`` chooses the recipe by cross-validation):

    wsi-amr train classify OUT/features/train.csv --features OUT/features -o OUT/run ...
    wsi-amr classify OUT/features/testA_*.h5 -m OUT/run/best.safetensors -o OUT/pred --patch-size 256
    wsi-amr evaluate OUT/pred OUT/features/testA.csv --json

    python bench/ips_glas_features.py --out bench/out/ips-glas-rein -- -M 16 -I 16 -b 8 --lr 3e-4 --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def segmenter_encoder(model_path: Path, patch: int, leaf: int, pool: str = "max"):
    """The frozen encoder module (eval mode) around a segmentation checkpoint."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from wsi_amr.segmentation.model import load_checkpoint

    seg, card = load_checkpoint(model_path)
    seg.eval()
    p = seg.cfg.token_size
    if patch % leaf or leaf % p:
        raise SystemExit(f"--patch must be a multiple of --leaf, and --leaf of the token size {p}")

    class SegEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seg = seg
            n = patch // leaf
            ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            geom = torch.stack([xs.flatten() * leaf + leaf / 2, ys.flatten() * leaf + leaf / 2,
                                torch.full((n * n,), float(leaf))], dim=1).float()
            self.register_buffer("geom", geom)
            self.register_buffer("mean", torch.tensor(card.normalisation["mean"]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(card.normalisation["std"]).view(1, 3, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n = x.shape[0], patch // leaf
            x = (x.float() / 255.0 - self.mean) / self.std
            x = F.avg_pool2d(x, leaf // p)  # each leaf -> p x p, as tokenise's area average
            t = x.reshape(b, 3, n, p, n, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n * n, p * p * 3)
            h = self.seg.embed(t) + self.seg.geometry(self.geom.unsqueeze(0).expand(b, -1, -1))
            h = self.seg.norm(self.seg.encoder(h))
            logits = self.seg.head(torch.cat([h, t], dim=-1)).reshape(b, n * n, self.seg.cfg.num_classes, p * p)
            gland = logits.softmax(dim=2)[:, :, 1:].sum(dim=2).mean(dim=2)  # (B, L) gland fraction per token
            spread = [gland.mean(dim=1, keepdim=True), gland.std(dim=1, keepdim=True)]
            if pool == "max":
                return torch.cat([h.amax(dim=1), *spread], dim=1)
            return torch.cat([h.mean(dim=1), h.amax(dim=1), *spread], dim=1)

    return SegEncoder().eval()


def standardised(encoder, shift, scale):
    """``encoder`` with each output feature shifted and scaled: ``(encoder(x) - shift) / scale``."""
    from torch import nn

    class _Standardised(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.register_buffer("shift", shift)
            self.register_buffer("scale", scale)

        def forward(self, x):
            return (self.encoder(x) - self.shift) / self.scale

    return _Standardised().eval()


def lab_stats(rgb: np.ndarray, lab: np.ndarray | None = None) -> np.ndarray:
    """Mean and standard deviation of each channel of OpenCV's 8-bit CIELAB: (6,). ``lab``: the
    image already converted, if the caller has it."""
    import cv2

    if lab is None:
        lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    lab = lab.reshape(-1, 3).astype(np.float64)
    return np.concatenate([lab.mean(axis=0), lab.std(axis=0)])


def reinhard(rgb: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Reinhard et al. (2001) colour transfer as stain normalisation: each CIELAB channel of the
    image shifted and scaled to the ``target`` mean and spread (:func:`lab_stats`)."""
    import cv2

    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    own = lab_stats(rgb, lab)
    lab = (lab.astype(np.float32) - own[:3]) / (own[3:] + 1e-3) * target[3:] + target[:3]
    return cv2.cvtColor(np.clip(np.round(lab), 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="Options after -- go to wsi-amr train classify.")
    ap.add_argument("--glas", type=Path, default=REPO.parent / "shared" / "data" / "glas")
    ap.add_argument("--model", type=Path, default=REPO / "wsi_amr" / "models" / "glas-gland.safetensors")
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--leaf", type=int, default=32)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "ips-glas-rein")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stain", choices=("none", "reinhard"), default="reinhard",
                    help="stain normalisation of each image before the encoder: 'reinhard' maps its "
                         "CIELAB mean and spread to the mean of the train_* images' (default)")
    ap.add_argument("--pool", choices=("max", "mean-max"), default="max",
                    help="hidden states pooled over a patch's tokens by their maximum (default), or by "
                         "their mean and maximum side by side")
    ap.add_argument("--no-standardise", dest="standardise", action="store_false",
                    help="write the encoder's outputs as they are, not each feature standardised with the "
                         "mean and spread of the training images' patches")
    ap.add_argument("train_args", nargs="*")
    args = ap.parse_args(argv)
    import torch
    from glas import glas_grades  # bench/glas.py

    from wsi_amr.images import read_rgb
    from wsi_amr.ips.bags import image_patches, write_feature_file

    torch.set_num_threads(args.threads)
    feats = args.out / "features"
    feats.mkdir(parents=True, exist_ok=True)
    encoder = segmenter_encoder(args.model, args.patch, args.leaf, args.pool)
    t0 = time.perf_counter()
    rows: dict[str, list[str]] = {"train": [], "testA": []}
    grades = sorted(glas_grades(args.glas / "grade.csv").items())
    target = None
    if args.stain == "reinhard":  # the reference colour comes from the training images only
        target = np.mean([lab_stats(read_rgb(args.glas / "images" / f"{name}.png"))
                          for name, _ in grades if name.startswith("train_")], axis=0)
    bags = {}
    with torch.no_grad():
        for name, grade in grades:
            image = read_rgb(args.glas / "images" / f"{name}.png")
            if target is not None:
                image = reinhard(image, target)
            patches, coords = image_patches(image, args.patch)
            bags[name] = encoder(patches.float()).numpy().astype(np.float64), coords
            rows[name.split("_")[0]].append(f"{name},{grade}")
    shift, scale = 0.0, 1.0
    if args.standardise:  # each feature to mean 0 and spread 1 over the training images' patches
        seen = np.concatenate([f for name, (f, _) in bags.items() if name.startswith("train_")])
        shift, scale = seen.mean(axis=0), seen.std(axis=0) + 1e-6
    for name, (f, coords) in bags.items():
        write_feature_file(feats / f"{name}.h5", ((f - shift) / scale).astype(np.float32), coords)
    # The same features as one TorchScript encoder (stain normalisation is per image, so not in it).
    exported = standardised(encoder, torch.as_tensor(shift).float(), torch.as_tensor(scale).float())
    with torch.no_grad():
        torch.jit.trace(exported, torch.zeros(2, 3, args.patch, args.patch),
                        check_trace=False).save(str(args.out / "glas-seg-encoder.pt"))
    for split, lines in rows.items():
        (feats / f"{split}.csv").write_text("slide,label\n" + "\n".join(lines) + "\n")
    extract_s = time.perf_counter() - t0
    exe = shutil.which("wsi-amr") or "wsi-amr"
    run, pred = args.out / "run", args.out / "pred"
    env = {**os.environ}
    subprocess.run([exe, "train", "classify", str(feats / "train.csv"), "--features", str(feats), "-o", str(run),
                    "--threads", str(args.threads), "--overwrite", *args.train_args], check=True, env=env)
    shutil.rmtree(pred, ignore_errors=True)
    tests = sorted(str(p) for p in feats.glob("testA_*.h5"))
    subprocess.run([exe, "classify", *tests, "-m", str(run / "best.safetensors"), "-o", str(pred),
                    "--patch-size", str(args.patch)], check=True, env=env, stdout=subprocess.DEVNULL)
    res = subprocess.run([exe, "evaluate", str(pred), str(feats / "testA.csv"), "--json"], check=True, env=env,
                         capture_output=True, text=True)
    scores = json.loads(res.stdout.strip().splitlines()[-1])
    curve = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    out = {"testA": {k: scores[k] for k in ("accuracy", "balanced_accuracy", "auc", "confusion_matrix")},
           "patch": args.patch, "leaf": args.leaf, "stain": args.stain, "pool": args.pool,
           "standardise": args.standardise,
           "train_args": args.train_args,
           "extract_seconds": round(extract_s, 1),
           "curve": [{k: d[k] for k in ("step", "val_accuracy", "val_balanced_accuracy", "val_auc", "val_loss")}
                     for d in curve]}
    (args.out / "result.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["testA"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
