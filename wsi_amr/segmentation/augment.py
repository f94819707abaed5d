"""Training batches: augmented crops (flips, colour jitter, glass and mosaics), with their leaves
and per-token label fractions for the token model, or as whole images for the U-Net."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from wsi_amr.quadtree import Leaves
from wsi_amr.segmentation.config import IGNORE, POSITION_RANGE, TrainConfig
from wsi_amr.segmentation.predict import make_leaves
from wsi_amr.tokens import pad_tokens, token_geometry, tokenise

# ---------------------------------------------------------------------------------------------
# Augmentation and tokens
# ---------------------------------------------------------------------------------------------
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def colour_jitter(rgb: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random brightness, contrast and saturation (each 1 +- ``strength``) and hue (+- strength x
    90 degrees), composed into one 3x3 colour matrix and applied in a single pass."""
    if strength <= 0:
        return rgb
    b, c, s = 1.0 + rng.uniform(-strength, strength, 3)
    theta = rng.uniform(-strength, strength) * math.pi / 2
    rot = np.array([[1, 0, 0], [0, math.cos(theta), -math.sin(theta)], [0, math.sin(theta), math.cos(theta)]])
    hue = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ
    luma = _RGB_TO_YIQ[0]
    sat = s * np.eye(3) + (1 - s) * np.outer(np.ones(3), luma)
    if rgb.size == 0:
        return rgb
    mean = float(np.mean(cv2.mean(rgb)[:3]))
    affine = np.empty((3, 4), np.float64)
    affine[:, :3] = (b * c) * (sat @ hue)
    affine[:, 3] = b * (1 - c) * mean  # contrast about the crop's mean grey, then brightness
    return cv2.transform(np.ascontiguousarray(rgb), affine)  # rounds and saturates to uint8


def augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
            jitter: float) -> tuple[np.ndarray, np.ndarray]:
    """A random one of the 8 flips/rotations (image and labels together), then colour jitter."""
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    if flip:
        image, labels = image[:, ::-1], labels[:, ::-1]
    image, labels = np.rot90(image, k), np.rot90(labels, k)
    return colour_jitter(np.ascontiguousarray(image), rng, jitter), np.ascontiguousarray(labels)


def label_fractions(labels: np.ndarray, leaves: Leaves, token_size: int, num_classes: int) -> np.ndarray:
    """(N, p, p, K) float32: the share of each class in every token cell (IGNORE counts for none,
    so cells over unlabelled pixels sum to less than one)."""
    onehot = (labels[..., None] == np.arange(num_classes, dtype=np.uint8)).astype(np.float32)
    return tokenise(onehot, leaves, token_size, fill=0)


@dataclass
class Batch:
    tokens: Tensor  # (B, L, p, p, 3) raw 0..255
    geometry: Tensor  # (B, L, 3)
    mask: Tensor  # (B, L) True on real tokens
    targets: Tensor  # (B, L, p, p, K) class fractions
    tokens_per_crop: float


def blob(rng: np.random.Generator, size: int, keep: float) -> np.ndarray:
    """(size, size) bool: a random smooth blob covering about ``keep`` of the square, the shape of
    a tissue fragment's edge (thresholded low-frequency noise)."""
    n = int(rng.integers(2, 6))
    noise = cv2.resize(rng.random((n, n)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    return noise >= np.quantile(noise, 1.0 - keep)


def glass_like(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) uint8 empty slide glass: a pale grey with a slight tint and noise."""
    base = rng.uniform(215, 252) + rng.uniform(-6, 6, 3)
    img = base + rng.normal(0, rng.uniform(0.5, 3.0), (*shape, 1))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def composite(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, cfg: TrainConfig,
              other: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """What whole slides have and labelled crops lack: with probability ``cfg.glass`` the crop
    outside a random blob (a tissue edge) or past a straight cut at a random place (the edge of a
    scanned region, met at any offset from the leaf grid) becomes empty glass labelled background;
    with probability ``cfg.mosaic`` it becomes another crop (``other()``) with its labels (a seam
    between unlike tissue). Otherwise the crop is returned as it is."""
    u = rng.random()
    if u >= cfg.glass + cfg.mosaic:
        return image, labels
    h, w = labels.shape
    if rng.random() < 0.5:
        inside = blob(rng, max(h, w), rng.uniform(0.3, 0.8))[:h, :w]
    else:  # a straight cut along x and/or y at a random place: an edge of a scanned region
        inside = np.ones((h, w), bool)
        axes = int(rng.integers(3))  # rows, columns or both
        for axis, n in ((0, h), (1, w)):
            if axes in (axis, 2):
                cut = int(rng.integers(n // 8, n - n // 8))
                keep = np.arange(n) < cut if rng.random() < 0.5 else np.arange(n) >= cut
                inside &= keep[:, None] if axis == 0 else keep[None, :]
    if u < cfg.glass:
        fill_img, fill_lab = glass_like(rng, (h, w)), np.zeros((h, w), labels.dtype)
    else:
        fill_img, fill_lab = other()
    return np.where(inside[..., None], image, fill_img), np.where(inside, labels, fill_lab)


def make_crops(sources: Sequence[Any], weights: np.ndarray, cfg: TrainConfig,
               rngs: Sequence[np.random.Generator]) -> list[tuple[np.ndarray, np.ndarray]]:
    """One augmented crop (image, labels) per generator in ``rngs``, its source drawn by
    ``weights``: flipped or rotated, colour jittered, given glass or a mosaic seam
    (:func:`composite`); what every architecture trains on."""
    out = []
    for rng in rngs:
        def crop(rng: np.random.Generator = rng) -> tuple[np.ndarray, np.ndarray]:
            src = sources[int(rng.choice(len(sources), p=weights))]
            image, labels = src.sample(rng, cfg.crop)
            return augment(image, labels, rng, cfg.jitter)

        out.append(composite(*crop(), rng, cfg, crop))
    return out


def make_batch(sources: Sequence[Any], weights: np.ndarray, cfg: TrainConfig,
               rngs: Sequence[np.random.Generator]) -> Batch:
    """One augmented crop per generator in ``rngs`` (all its randomness drawn from it), tokenised
    and padded to one length."""
    toks, geoms, targets = [], [], []
    p, k = cfg.token_size, cfg.num_classes
    for rng, (image, labels) in zip(rngs, make_crops(sources, weights, cfg, rngs)):
        labelled = labels != IGNORE
        tissue = None if labelled.all() else labelled
        leaves = make_leaves(image, cfg.quadtree, cfg.patching, tissue)
        geom = token_geometry(leaves)
        geom[:, :2] += rng.integers(0, max(1, POSITION_RANGE - cfg.crop), size=2).astype(np.float32)
        toks.append(tokenise(image, leaves, p))
        geoms.append(geom)
        targets.append(label_fractions(labels, leaves, p, k))
    t, g, m = pad_tokens(toks, geoms)
    tgt = np.zeros((*t.shape[:4], k), np.float32)
    for i, f in enumerate(targets):
        tgt[i, : len(f)] = f
    return Batch(torch.from_numpy(t), torch.from_numpy(g), torch.from_numpy(m), torch.from_numpy(tgt),
                 float(np.mean([len(x) for x in toks])))


@dataclass
class ImageBatch:
    images: Tensor  # (B, H, W, 3) raw 0..255 uint8
    targets: Tensor  # (B, H, W, K) one-hot, all zero where IGNORE


def make_image_batch(sources: Sequence[Any], weights: np.ndarray, cfg: TrainConfig,
                     rngs: Sequence[np.random.Generator]) -> ImageBatch:
    """The crops of :func:`make_crops` as whole images with one-hot targets, for models on pixels."""
    crops = make_crops(sources, weights, cfg, rngs)
    images = np.stack([image for image, _ in crops])
    labels = np.stack([lab for _, lab in crops])
    onehot = (labels[..., None] == np.arange(cfg.num_classes, dtype=np.uint8)).astype(np.float32)
    return ImageBatch(torch.from_numpy(images), torch.from_numpy(onehot))
