from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wsi_amr import __version__
from wsi_amr.checkpoint import save_checkpoint
from wsi_amr.ddp import Group
from wsi_amr.errors import TrainingInputError, TrainingInterrupted
from wsi_amr.metrics import dice_counts, dice_scores
from wsi_amr.params import naming
from wsi_amr.segmentation.augment import Batch, ImageBatch, make_batch, make_image_batch
from wsi_amr.segmentation.config import DEFAULT_COLORS, TrainConfig
from wsi_amr.segmentation.data import LabelledImage, TrainingData, load_training_data
from wsi_amr.segmentation.model import ARCHITECTURES, ModelCard, Normalisation
from wsi_amr.segmentation.predict import window_predictor
from wsi_amr.trainer import (
    ProgressFn,
    graceful_interrupt,
    learning_rate,
    load_training_state,
    make_optimizer,
    run_folder,
    save_training_state,
    seed_everything,
    trim_metrics,
)


def segmentation_loss(logits: Tensor, targets: Tensor, dice_weight: float,
                      total: Callable[[Tensor], Tensor] = lambda t: t) -> tuple[Tensor, Tensor, Tensor]:
    """Soft cross-entropy per token cell plus ``dice_weight`` x soft Dice loss of the foreground
    classes, pooled over the batch. ``logits`` (B, L, K, p, p), ``targets`` (B, L, p, p, K) class
    fractions; cells weigh by how much of them is labelled, so padding and IGNORE count for
    nothing. ``total`` sums each pooled quantity over the whole batch when it is split over
    processes (:meth:`wsi_amr.ddp.Group.global_sum`). Returns (total, cross-entropy, Dice loss)."""
    t = targets.permute(0, 1, 4, 2, 3)  # (B, L, K, p, p)
    weight = t.sum(dim=2)
    logp = F.log_softmax(logits.float(), dim=2)
    ce = -total((t * logp).sum()) / total(weight.sum()).clamp(min=1e-6)
    if dice_weight <= 0:
        return ce, ce, torch.zeros((), device=ce.device)
    prob = logp.exp()[:, :, 1:] * weight[:, :, None]
    tf = t[:, :, 1:]
    dims = (0, 1, 3, 4)
    inter = total((prob * tf).sum(dims))
    denom = total(prob.sum(dims) + tf.sum(dims))
    dice_loss = 1 - ((2 * inter + 1.0) / (denom + 1.0)).mean()
    return ce + dice_weight * dice_loss, ce, dice_loss


def validate(model: torch.nn.Module, card: ModelCard, images: Sequence[LabelledImage],
             context: int | None = None) -> dict[str, Any]:
    """Dice per class at the working mpp over whole validation images, pooled over pixels.

    With ``context`` (px) a token model attends within squares of that side, as ``wsi-amr
    segment`` runs it (training passes its crop size), so the best checkpoint is chosen the way it
    will be used; without it each image is one sequence. Its leaves are the card's."""
    predictor = window_predictor(model, card, context=context)
    k = predictor.num_classes
    counts = np.zeros((k, 3), np.int64)
    units = 0
    t0 = time.perf_counter()
    for item in images:
        plan = predictor.prepare(item.image)
        pred = predictor.predict(item.image, plan).argmax(axis=2).astype(np.uint8)
        counts += dice_counts(pred, item.labels, k)
        units += predictor.units(item.image, plan)[0]
    per, fg = dice_scores(counts, card.class_names)
    return {"val_dice": per, "val_foreground_dice": fg, f"val_{predictor.unit}_per_image": units / max(1, len(images)),
            "val_seconds": round(time.perf_counter() - t0, 3)}


def make_card(cfg: TrainConfig, data: TrainingData, training: dict[str, Any]) -> ModelCard:
    colors = cfg.colors or [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(cfg.num_classes)]
    norm = Normalisation()
    return ModelCard(
        class_names=list(cfg.classes), class_colors=[list(c) for c in colors], mpp=data.mpp,
        normalisation={"mean": list(norm.mean), "std": list(norm.std)},
        # A U-Net sees every pixel: no leaves to record.
        patching=({"mode": cfg.patching, "token_size": cfg.token_size, "quadtree": cfg.quadtree.as_dict()}
                  if cfg.arch == "token" else {}),
        training=training,
    )


def training_batch(cfg: TrainConfig, sources: Sequence[Any], weights: np.ndarray,
                   rngs: Sequence[np.random.Generator]) -> ImageBatch | Batch:
    """One augmented batch as the architecture ``cfg.arch`` takes it: whole crops for a U-Net,
    tokens for the token segmenter."""
    if cfg.arch == "unet":
        return make_image_batch(sources, weights, cfg, rngs)
    return make_batch(sources, weights, cfg, rngs)


def batch_logits(model: torch.nn.Module, batch: ImageBatch | Batch, device: torch.device) -> tuple[Tensor, Tensor, float]:
    """``(logits, targets, units per crop)`` of a batch shaped for :func:`segmentation_loss`
    (a U-Net's crop is one token of crop x crop cells); the units are pixels or tokens."""
    norm = Normalisation()
    if isinstance(batch, ImageBatch):
        x = norm.apply(batch.images.to(device).float()).permute(0, 3, 1, 2)
        return model(x)[:, None], batch.targets.to(device)[:, None], float(x.shape[2] * x.shape[3])
    logits = model(norm.apply(batch.tokens.to(device)), batch.geometry.to(device), batch.mask.to(device))
    return logits, batch.targets.to(device), batch.tokens_per_crop


def train_segmenter(cfg: TrainConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train the segmentation model ``cfg.arch`` names (the token segmenter or a U-Net) as ``cfg`` says; returns ``{"best_dice", "best_step",
    "steps", "paths"}``.

    Writes ``OUT/best.*`` (best validation foreground Dice; the last model when there is no
    validation split), ``OUT/last.*`` and ``OUT/last-state.*`` (for ``resume``) and
    ``OUT/metrics.jsonl``. ``progress(step, total, info)`` is called after every step.

    Raises :class:`TrainingInputError` / :class:`TrainingDataError` for unusable inputs, and
    :class:`TrainingInterrupted` after saving ``OUT/last`` when stopped by Ctrl-C.
    """
    cfg.validate()
    notes = []
    if cfg.arch == "token" and cfg.crop_quadtree() != cfg.quadtree:
        notes.append(f"max_size {cfg.quadtree.max_size} is larger than the crop ({cfg.crop} px): leaves are at most "
                     f"{cfg.crop_quadtree().max_size} px (recorded in the model card)")
        cfg = replace(cfg, quadtree=cfg.crop_quadtree())
    with run_folder(cfg) as (device, group):
        data = load_training_data(cfg)
        data.description["warnings"] = notes + data.description["warnings"]
        try:
            return _train(cfg, data, device, group, progress)
        finally:
            data.close()


def _train(cfg: TrainConfig, data: TrainingData, device: torch.device, group: Group,  # noqa: C901 - one training step loop: resume, schedule, DDP, validation and checkpoints read in order
           progress: ProgressFn | None) -> dict[str, Any]:
    out = cfg.out
    seed_everything(cfg.seed)
    model_cfg = cfg.model_config()
    model = ARCHITECTURES[cfg.arch][1](model_cfg).to(device)
    group.broadcast_parameters(model)
    optimizer = make_optimizer(model, cfg)
    rng = np.random.default_rng(cfg.seed)
    unit = "pixels" if cfg.arch == "unet" else "tokens"
    identity = {"architecture": model_cfg.as_dict(), "classes": list(cfg.classes),
                "patching": cfg.patching, "quadtree": cfg.quadtree.as_dict()}
    step, best_dice, best_step, seconds_before = 0, -1.0, 0, 0.0
    metrics = out / "metrics.jsonl"
    if cfg.resume:
        doc = load_training_state(out, model, optimizer, rng, identity)
        step, best_dice, best_step = int(doc["step"]), float(doc["best_dice"]), int(doc["best_step"])
        seconds_before = float(doc.get("seconds", 0.0))
        if step >= cfg.steps:
            raise naming(TrainingInputError(f"resume: {out} has already done {step} steps; give a larger number of "
                                            "steps to go on"), "resume")
        if group.is_main:
            trim_metrics(metrics, step)
    weights = np.array([s.area for s in data.train], np.float64)
    weights /= weights.sum()
    has_val = bool(data.val)
    last_val: dict[str, Any] = {}

    def training_info() -> dict[str, Any]:
        return {
            "command": cfg.command_line, "wsi_amr_version": __version__, "data": data.description,
            "steps": step, "total_steps": cfg.steps, "seed": cfg.seed, "batch_size": cfg.batch_size,
            "crop": cfg.crop, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "dice_weight": cfg.dice_weight,
            "jitter": cfg.jitter, "glass": cfg.glass, "mosaic": cfg.mosaic, "best_val_dice": best_dice if best_dice >= 0 else None,
            "best_step": best_step if best_dice >= 0 else None,
        }

    saved_step = -1

    def save_last() -> None:
        nonlocal saved_step
        if saved_step == step or not group.is_main:
            return
        saved_step = step
        card = make_card(cfg, data, training_info())
        save_checkpoint(out / "last", model, card)
        save_training_state(out, model, optimizer, rng, {
            "step": step, "best_dice": best_dice, "best_step": best_step,
            "seconds": seconds_before + (time.perf_counter() - t_start), **identity, "config": cfg.to_json()})

    log = open(metrics, "a", encoding="utf-8") if group.is_main else None

    def write_metric(row: dict[str, Any]) -> None:
        if log is not None:
            log.write(json.dumps(row) + "\n")
            log.flush()

    t_start = time.perf_counter()
    window: dict[str, float] = {"loss": 0.0, "ce": 0.0, "dice": 0.0, "tokens": 0.0, "n": 0, "data": 0.0,
                                "t0": time.perf_counter()}
    model.train()
    try:
        with graceful_interrupt() as interrupt:
            try:
                while step < cfg.steps:
                    if group.any(interrupt["stop"]):
                        raise KeyboardInterrupt
                    lr = learning_rate(step, cfg)
                    for g in optimizer.param_groups:
                        g["lr"] = lr
                    t_data = time.perf_counter()
                    # One generator per crop of the global batch, so any process makes any crop.
                    seeds = rng.integers(2**62, size=cfg.batch_size)
                    mine = group.share(cfg.batch_size)
                    batch = training_batch(cfg, data.train, weights, [np.random.default_rng(int(seeds[i])) for i in mine])
                    window["data"] += time.perf_counter() - t_data
                    logits, targets, units = batch_logits(model, batch, device)
                    loss, ce, dl = segmentation_loss(logits, targets, cfg.dice_weight, total=group.global_sum)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    group.sum_gradients(model.parameters())
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    step += 1
                    loss_value = loss.item()
                    window["loss"] += loss_value
                    window["ce"] += ce.item()
                    window["dice"] += dl.item()
                    window["tokens"] += group.sum_values(units * len(mine))[0] / cfg.batch_size
                    window["n"] += 1
                    if step % cfg.log_every == 0 or step == cfg.steps:
                        n = window["n"]
                        elapsed = time.perf_counter() - window["t0"]
                        write_metric({"event": "train", "step": step, "loss": window["loss"] / n,
                                      "cross_entropy": window["ce"] / n, "dice_loss": window["dice"] / n,
                                      "lr": lr, f"{unit}_per_crop": window["tokens"] / n,
                                      "steps_per_s": n / max(elapsed, 1e-9),
                                      "data_fraction": window["data"] / max(elapsed, 1e-9),
                                      "seconds": round(seconds_before + time.perf_counter() - t_start, 3)})
                        window.update(loss=0.0, ce=0.0, dice=0.0, tokens=0.0, n=0, data=0.0, t0=time.perf_counter())
                    if has_val and group.is_main and (step % cfg.val_every == 0 or step == cfg.steps):
                        card = make_card(cfg, data, training_info())
                        last_val = validate(model, card, data.val, cfg.crop)
                        improved = last_val["val_foreground_dice"] > best_dice
                        if improved:
                            best_dice, best_step = last_val["val_foreground_dice"], step
                            save_checkpoint(out / "best", model, make_card(cfg, data, training_info()))
                        write_metric({"event": "val", "step": step, **last_val, "best": improved,
                                      "seconds": round(seconds_before + time.perf_counter() - t_start, 3)})
                        save_last()
                        window["t0"] = time.perf_counter()  # validation is not training time
                    if progress is not None and group.is_main:
                        progress(step, cfg.steps, {"loss": loss_value, "lr": lr,
                                                   "val": last_val.get("val_foreground_dice"),
                                                   "val_name": "val_foreground_dice"})
            except KeyboardInterrupt:
                save_last()
                raise TrainingInterrupted(step, out) from None
        save_last()
        if not has_val:
            if group.is_main:
                save_checkpoint(out / "best", model, make_card(cfg, data, training_info()))
            best_step = step
        group.barrier()  # every process returns once rank 0 has written the run
    finally:
        if log is not None:
            log.close()
    return {
        "best_dice": best_dice if best_dice >= 0 else None,
        "best_step": best_step,
        "steps": step,
        "validation": has_val,
        "warnings": list(data.description.get("warnings", []))
        + ([] if has_val else ["no validation images (one image or slide, or a validation fraction of 0): "
                               "best.* is the last model"]),
        "paths": {"best": str(out / "best.safetensors"), "last": str(out / "last.safetensors"),
                  "state": str(out / "last-state.safetensors"), "metrics": str(metrics)},
    }


def describe_result(result: dict[str, Any]) -> str:
    """One line summing up :func:`train_segmenter`'s result."""
    if result["best_dice"] is None:
        return f"trained {result['steps']} steps (no validation split) -> {result['paths']['best']}"
    return (f"trained {result['steps']} steps; best validation foreground Dice {result['best_dice']:.4f} "
            f"at step {result['best_step']} -> {result['paths']['best']}")
