#!/usr/bin/env python
"""IPS on GlaS, benign vs malignant: each image a bag of patches, the built-in small CNN trained
from scratch with the paper's recipe (select the top M without gradients, re-encode only those).

A first real-data measurement for the IPS issue, before `wsi-amr train classify` exists: trains on
``train_*`` (a seeded validation split kept aside), reports testA accuracy, balanced accuracy and
AUC, and the validation curve, as JSON lines.

    python bench/ips_glas.py --steps 400 --batch 8 --json bench/out/ips-glas.json
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
    ap.add_argument("--glas", type=Path, default=REPO.parent / "shared" / "data" / "glas")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--memory", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=8, help="bags per optimisation step (gradients accumulated)")
    ap.add_argument("--val-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import torch
    from glas import glas_grades  # bench/glas.py

    from wsi_amr.images import read_rgb
    from wsi_amr.ips.bags import image_patches
    from wsi_amr.ips.model import IPSConfig, IPSModel, iter_chunks, select_then_forward
    from wsi_amr.metrics import roc_auc

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    grades = glas_grades(args.glas / "grade.csv")
    bags = {}
    for name, grade in grades.items():
        patches, _ = image_patches(read_rgb(args.glas / "images" / f"{name}.png"), args.patch)
        bags[name] = (patches, int(grade == "malignant"))
    train = sorted(n for n in bags if n.startswith("train_"))
    val = set(rng.choice(train, size=len(train) // 6, replace=False).tolist())
    train = [n for n in train if n not in val]
    test = sorted(n for n in bags if n.startswith("testA_"))
    cfg = IPSConfig(embed_dim=128, width=128, heads=4, num_classes=2, memory=args.memory, chunk=args.chunk,
                    encoder="small-cnn", cnn_channels=24)
    model = IPSModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)

    def augment(p: torch.Tensor) -> torch.Tensor:
        k = int(rng.integers(4))
        p = torch.rot90(p, k, dims=(2, 3))
        return p.flip(3) if rng.random() < 0.5 else p

    def predict(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        model.eval()
        probs, labels = [], []
        with torch.no_grad():
            for n in names:
                patches, label = bags[n]
                logits, _ = select_then_forward(model, iter_chunks(patches, cfg.chunk), patches_fn=lambda i, p=patches: p[i])
                probs.append(float(logits.softmax(-1)[0, 1]))
                labels.append(label)
        return np.array(probs), np.array(labels)

    def scores(names: list[str]) -> dict:
        p, y = predict(names)
        pred = (p >= 0.5).astype(int)
        sens = (pred[y == 1] == 1).mean() if (y == 1).any() else float("nan")
        spec = (pred[y == 0] == 0).mean() if (y == 0).any() else float("nan")
        auc = roc_auc(p, y == 1)
        return {"accuracy": round(float((pred == y).mean()), 4), "balanced_accuracy": round(float((sens + spec) / 2), 4),
                "auc": round(float("nan") if auc is None else auc, 4)}

    out = []
    t0 = time.perf_counter()
    best, best_state = -1.0, None
    losses = []
    for step in range(1, args.steps + 1):
        model.train()
        opt.zero_grad()
        total = 0.0
        for _ in range(args.batch):
            n = train[int(rng.integers(len(train)))]
            patches, label = bags[n]
            patches = augment(patches)
            logits, _ = select_then_forward(model, iter_chunks(patches, cfg.chunk, generator=gen),
                                            patches_fn=lambda i, p=patches: p[i])
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor([label])) / args.batch
            loss.backward()
            total += loss.item()
        opt.step()
        losses.append(total)
        if step % args.val_every == 0 or step == args.steps:
            v = scores(sorted(val))
            row = {"step": step, "loss": round(float(np.mean(losses[-args.val_every:])), 4), **{f"val_{k}": x for k, x in v.items()},
                   "seconds": round(time.perf_counter() - t0, 1)}
            print(json.dumps(row), flush=True)
            out.append(row)
            key = v["auc"] + v["balanced_accuracy"]
            if key > best:
                best, best_state = key, {k: t.clone() for k, t in model.state_dict().items()}
    model.load_state_dict(best_state)
    result = {"testA": scores(test), "train_bags": len(train), "val_bags": len(val), "test_bags": len(test),
              "patch": args.patch, "memory": args.memory, "chunk": args.chunk, "steps": args.steps, "batch": args.batch,
              "lr": args.lr,
              "seconds": round(time.perf_counter() - t0, 1), "curve": out}
    print(json.dumps({"testA": result["testA"], "seconds": result["seconds"]}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
