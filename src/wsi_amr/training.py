"""Training the token segmenter: labelled data, augmentation, the loop, validation, checkpoints.

Data come from images with label masks (PNG; small ints 0..K-1, or binary 0/255) or from slides
with QuPath GeoJSON annotations rasterised at the working mpp. Training draws random crops
(working px), flips and rotates them, jitters their colour, gives some a margin of empty glass or
a seam to another crop (what slides have and labelled images lack), splits each crop with the adaptive
quadtree (or a uniform grid at the minimum leaf size: same model, same code path) and turns the
leaves into tokens. Targets are the class fractions of each token's p x p cells (the one-hot label
map tokenised like the image), so a large leaf that straddles a boundary is a soft target.

Runs are seeded (Python, numpy, torch) and resumable: ``OUT/last-state.*`` holds the weights,
optimizer moments, RNG states and step as safetensors + JSON (nothing is pickled). Validation
predicts whole images (quadtree on the whole image, attention within crop-sized squares as
``wsi-amr segment`` runs it, detokenised) and scores Dice per class at full resolution; the best by
foreground Dice is kept as ``OUT/best.safetensors/.json``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import json
import math
import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import __version__
from .checkpoint import file_sha256, save_checkpoint
from .ddp import Group
from .outputs import atomic_path, write_json_atomic, write_text_atomic
from .quadtree import Leaves, QuadtreeError, QuadtreeParams, build_quadtree, is_power_of_two, params_edge_map, uniform_leaves
from .segmentation import ModelCard, Normalisation, SegmenterConfig, TokenSegmenter
from .tokens import detokenise, leaf_coverage, pad_tokens, token_geometry, tokenise

#: Label value of pixels that carry no label (padding, unannotated slide area with
#: ``unannotated="ignore"``); they add nothing to the loss or the Dice.
IGNORE = 255
#: Crop geometry is shifted by a random offset below this many working px, so the model learns
#: positions over a whole inference window (DESIGN 4.4: 4096^2 windows), not only 0..crop.
POSITION_RANGE = 4096
#: Longest token sequence :func:`predict_image` runs at once; a 1000 x 1000 image at 8 px leaves
#: (15,625 tokens) is one sequence.
MAX_SEQUENCE = 16384
#: Validation regions read from slides are at most this many working px a side.
MAX_VALIDATION_SIDE = 4096
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: A mask is found by the image's stem plus one of these (``train_1.png`` -> ``train_1_anno.bmp``).
MASK_SUFFIXES = ("", "_mask", "-mask", "_masks", "_anno", "_label", "_labels", "_gt")
PATCHING_MODES = ("adaptive", "uniform")
UNANNOTATED_MODES = ("background", "ignore")
STATE_FORMAT = "wsi-amr-training-state"
STATE_VERSION = 1
#: Class colours used when none are given (RGB); background first.
DEFAULT_COLORS = [[0, 0, 0], [0, 160, 0], [200, 0, 0], [0, 90, 220], [230, 160, 0], [150, 0, 200],
                  [0, 190, 190], [240, 100, 170], [120, 80, 40], [128, 128, 128]]


class TrainingError(Exception):
    """Training cannot start or continue; one line naming the file or option and the fix."""

    exit_code = 2


class TrainingInputError(TrainingError):
    """Bad options or missing inputs (a usage error: exit status 2)."""

    exit_code = 2


class TrainingDataError(TrainingError):
    """Inputs that exist but whose contents cannot be used (found while loading: exit status 1)."""

    exit_code = 1


class TrainingInterrupted(Exception):
    """Training stopped on request (Ctrl-C) after saving ``OUT/last``; ``step`` steps are done."""

    def __init__(self, step: int, out: Path) -> None:
        super().__init__(f"interrupted at step {step}; saved {out / 'last.safetensors'}")
        self.step = step
        self.out = out


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything a training run needs. Sizes in working px; ``steps`` is the training budget."""

    out: Path
    images: list[str] = field(default_factory=list)  # files, folders or globs
    masks: str | None = None  # folder of label masks; default: a "masks" folder beside the images
    val_images: list[str] = field(default_factory=list)  # files/folders/globs, or name patterns
    slides: list[str] = field(default_factory=list)
    annotations: list[str] = field(default_factory=list)  # one GeoJSON per slide, same order
    pairs: str | None = None  # CSV with columns slide,annotations
    classes: list[str] = field(default_factory=lambda: ["Background", "Gland"])
    colors: list[list[int]] | None = None
    unannotated: str = "background"  # slide pixels outside every annotation: class 0, or ignored
    mpp: float | None = None  # working µm/px: images are taken to be at it (default 0.62)
    slide_mpp: float | None = None  # level-0 µm/px for slides that record none
    patching: str = "adaptive"
    token_size: int = 8
    quadtree: QuadtreeParams = field(default_factory=QuadtreeParams)
    crop: int = 256
    batch_size: int = 8
    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int | None = None  # default: 5% of steps
    dice_weight: float = 0.5
    jitter: float = 0.1
    glass: float = 0.25  # fraction of crops given a margin of empty glass (class 0)
    mosaic: float = 0.1  # fraction of crops joined to a crop of another image along a seam
    val_fraction: float = 0.15
    val_every: int = 100
    log_every: int = 10
    width: int = SegmenterConfig.width
    depth: int = SegmenterConfig.depth
    heads: int = SegmenterConfig.heads
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    resume: bool = False
    overwrite: bool = False
    command_line: str = ""

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.steps // 20)

    def model_config(self) -> SegmenterConfig:
        return SegmenterConfig(token_size=self.token_size, num_classes=self.num_classes,
                               width=self.width, depth=self.depth, heads=self.heads)

    def crop_quadtree(self) -> QuadtreeParams:
        """The quadtree parameters used for training and recorded in the model card: leaves no
        larger than the crop (a root larger than the crop would be mostly padding and never split)."""
        fit = 1 << (max(1, self.crop).bit_length() - 1)
        if self.quadtree.max_size <= fit:
            return self.quadtree
        return replace(self.quadtree, max_size=max(fit, self.quadtree.min_size))

    def validate(self) -> None:
        """Raise :class:`TrainingInputError` with one line for the first bad option."""
        def bad(message: str) -> TrainingInputError:
            return TrainingInputError(message)

        if not self.images and not self.slides and not self.pairs:
            raise bad("no training data: give --images (with --masks) or --slides with --annotations (or --pairs)")
        if len(self.slides) != len(self.annotations):
            raise bad(f"--slides and --annotations pair up in order: got {len(self.slides)} slides "
                      f"and {len(self.annotations)} annotation files")
        if len(self.classes) < 2:
            raise bad("--classes needs at least two names (background first), e.g. Background,Gland")
        if len(set(self.classes)) != len(self.classes) or any(not c for c in self.classes):
            raise bad(f"--classes must be distinct non-empty names, got {','.join(self.classes)}")
        if len(self.classes) > IGNORE:
            raise bad(f"--classes: at most {IGNORE} classes")
        if self.colors is not None and len(self.colors) != len(self.classes):
            raise bad(f"--colors gives {len(self.colors)} colours for {len(self.classes)} classes")
        if self.unannotated not in UNANNOTATED_MODES:
            raise bad(f"--unannotated must be background or ignore, not {self.unannotated!r}")
        if self.patching not in PATCHING_MODES:
            raise bad(f"--patching must be adaptive or uniform, not {self.patching!r}")
        if not is_power_of_two(self.token_size):
            raise bad(f"--token-size must be a power of two, got {self.token_size}")
        try:
            self.quadtree.validate()
        except QuadtreeError as exc:
            raise bad(str(exc)) from None
        if self.token_size > self.quadtree.max_size:
            raise bad(f"--token-size ({self.token_size}) is larger than --max-size ({self.quadtree.max_size})")
        if self.crop < self.quadtree.min_size or self.crop < self.token_size:
            raise bad(f"--crop ({self.crop}) is smaller than --min-size ({self.quadtree.min_size})")
        for name, value in (("--mpp", self.mpp), ("--slide-mpp", self.slide_mpp)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise bad(f"{name} must be a positive number of µm/px, got {value}")
        for name, value in (("--steps", self.steps), ("--batch-size", self.batch_size),
                            ("--val-every", self.val_every), ("--log-every", self.log_every),
                            ("--width", self.width), ("--depth", self.depth), ("--heads", self.heads)):
            if value < 1:
                raise bad(f"{name} must be at least 1, got {value}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad(f"--lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0 or self.dice_weight < 0 or self.jitter < 0:
            raise bad("--weight-decay, --dice-weight and --jitter must not be negative")
        if self.jitter > 1:
            raise bad(f"--jitter is a fraction (0-1), got {self.jitter}")
        for name, value in (("--glass", self.glass), ("--mosaic", self.mosaic)):
            if not 0 <= value <= 1:
                raise bad(f"{name} is a fraction of crops (0-1), got {value}")
        if self.glass + self.mosaic > 1:
            raise bad(f"--glass + --mosaic is a fraction of crops and must not exceed 1, got {self.glass + self.mosaic}")
        if self.warmup is not None and not 0 <= self.warmup < self.steps:
            raise bad(f"--warmup must be between 0 and --steps - 1, got {self.warmup}")
        if not 0 <= self.val_fraction < 1:
            raise bad(f"--val-fraction must be at least 0 and below 1, got {self.val_fraction}")
        if self.width % self.heads:
            raise bad(f"--width ({self.width}) must be divisible by --heads ({self.heads})")
        if self.threads is not None and self.threads < 1:
            raise bad(f"--threads must be at least 1, got {self.threads}")
        if self.resume and self.overwrite:
            raise bad("--resume and --overwrite contradict each other; give one")

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["out"] = str(self.out)
        doc["quadtree"] = self.quadtree.as_dict()
        return doc


# ---------------------------------------------------------------------------------------------
# Labelled data
# ---------------------------------------------------------------------------------------------
@dataclass
class LabelledImage:
    """An RGB uint8 image at the working mpp and its label map (uint8, IGNORE where unlabelled)."""

    name: str
    image: np.ndarray
    labels: np.ndarray


class CropSource(Protocol):
    """Something training crops are drawn from: an in-memory image, or a slide's annotations."""

    name: str
    area: float  # labelled area in working px^2: crops are drawn in proportion

    def sample(self, rng: np.random.Generator, crop: int) -> tuple[np.ndarray, np.ndarray]: ...


class ImageCrops:
    """Random crops of an in-memory labelled image; crops larger than it are padded."""

    def __init__(self, item: LabelledImage) -> None:
        self.item = item
        self.name = item.name
        self.area = float(item.labels.size)

    def sample(self, rng: np.random.Generator, crop: int) -> tuple[np.ndarray, np.ndarray]:
        img, lab = self.item.image, self.item.labels
        h, w = lab.shape
        y = int(rng.integers(0, h - crop + 1)) if h > crop else 0
        x = int(rng.integers(0, w - crop + 1)) if w > crop else 0
        return pad_crop(img[y:y + crop, x:x + crop], lab[y:y + crop, x:x + crop], crop)


def pad_crop(image: np.ndarray, labels: np.ndarray, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad a crop to crop x crop: white pixels labelled IGNORE."""
    h, w = labels.shape
    if (h, w) == (crop, crop):
        return image, labels
    img = np.full((crop, crop, 3), 255, np.uint8)
    lab = np.full((crop, crop), IGNORE, np.uint8)
    img[:h, :w], lab[:h, :w] = image, labels
    return img, lab


class SlideAnnotations:
    """Random windows around a slide's annotations, labels rasterised at the working mpp.

    Classified objects paint their class; unclassified ones mark labelled regions (class 0 inside
    unless a classified object covers it). Larger objects are painted first, so a small object
    drawn inside a large one keeps its class. Outside every object pixels are class 0, or IGNORE
    with ``unannotated="ignore"``.
    """

    def __init__(self, slide_path: Path, geojson_path: Path, classes: Sequence[str], mpp: float | None,
                 slide_mpp: float | None, unannotated: str) -> None:
        import shapely

        from .geojson import GeoJSONError, read_geojson
        from .polygons import polygonal_parts
        from .slide import MissingMppError, Resolution, SlideError, open_slide

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                objects = read_geojson(geojson_path)
        except GeoJSONError as exc:
            raise TrainingDataError(str(exc)) from None
        self.warnings = [str(w.message) for w in caught]
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted({o.class_name for o in objects if o.class_name is not None and o.class_name not in index})
        if unknown:
            raise TrainingDataError(
                f"{geojson_path}: unknown class{'es' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(u) for u in unknown)} (--classes is {','.join(classes)}); add "
                f"{'them' if len(unknown) > 1 else 'it'} to --classes")
        geoms, labels = [], []
        for obj in objects:
            parts = polygonal_parts(obj.geometry)
            if parts:
                geoms.append(shapely.union_all(parts) if len(parts) > 1 else parts[0])
                labels.append(index[obj.class_name] if obj.class_name is not None else 0)
        if not geoms:
            raise TrainingDataError(f"{geojson_path}: no polygon annotations to train on")
        try:
            self.slide = open_slide(slide_path, slide_mpp=slide_mpp)
        except SlideError as exc:
            raise TrainingDataError(str(exc)) from None
        try:
            self.mpp = mpp if mpp is not None else self.slide.require_mpp()
            self.downsample = self.slide.downsample_for(Resolution(mpp=self.mpp))
        except MissingMppError as exc:
            self.slide.close()
            raise TrainingInputError(str(exc)) from None
        except SlideError as exc:
            self.slide.close()
            raise TrainingInputError(str(exc)) from None
        areas = np.array([g.area for g in geoms])
        order = np.argsort(-areas, kind="stable")  # paint large first
        self.geoms = [geoms[i] for i in order]
        self.labels = [labels[i] for i in order]
        self.tree = shapely.STRtree(self.geoms)
        self.bounds = np.array([g.bounds for g in self.geoms])  # level-0 minx, miny, maxx, maxy
        self.weights = areas[order] / areas.sum()
        self.name = self.slide.stem
        self.area = float(areas.sum()) / self.downsample**2
        self.fill = 0 if unannotated == "background" else IGNORE

    def _labels(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        from shapely.geometry import box

        from .polygons import rasterize_polygons

        ds = self.downsample
        out = np.full((height, width), self.fill, np.uint8)
        hits = np.sort(self.tree.query(box(x0, y0, x0 + width * ds, y0 + height * ds)))
        for i in hits.tolist():  # sorted indices keep the large-first painting order
            rasterize_polygons(self.geoms[i], (height, width), scale=ds, offset=(x0, y0),
                               value=self.labels[i], out=out)
        return out

    def sample(self, rng: np.random.Generator, crop: int) -> tuple[np.ndarray, np.ndarray]:
        i = int(rng.choice(len(self.geoms), p=self.weights))
        minx, miny, maxx, maxy = self.bounds[i]
        side = crop * self.downsample
        cx, cy = rng.uniform(minx, maxx), rng.uniform(miny, maxy)
        w0, h0 = self.slide.dimensions
        x0 = int(np.clip(cx - side / 2, 0, max(0.0, w0 - side)))
        y0 = int(np.clip(cy - side / 2, 0, max(0.0, h0 - side)))
        image = self.slide.read_region(x0, y0, crop, crop, self.downsample)
        return image, self._labels(x0, y0, crop, crop)

    def whole(self) -> LabelledImage:
        """The annotated area (bounding box of all objects, centre at most MAX_VALIDATION_SIDE)."""
        ds = self.downsample
        minx, miny = self.bounds[:, 0].min(), self.bounds[:, 1].min()
        maxx, maxy = self.bounds[:, 2].max(), self.bounds[:, 3].max()
        width = min(MAX_VALIDATION_SIDE, max(1, int(math.ceil((maxx - minx) / ds))))
        height = min(MAX_VALIDATION_SIDE, max(1, int(math.ceil((maxy - miny) / ds))))
        x0 = int((minx + maxx) / 2 - width * ds / 2)
        y0 = int((miny + maxy) / 2 - height * ds / 2)
        image = self.slide.read_region(max(0, x0), max(0, y0), width, height, ds)
        return LabelledImage(self.name, image, self._labels(max(0, x0), max(0, y0), width, height))

    def close(self) -> None:
        self.slide.close()


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) from an image file; TrainingDataError when it cannot be decoded."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise TrainingDataError(f"{path}: not a readable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_mask(path: Path) -> np.ndarray:
    """The raw values of a label image (H, W); palette PNGs give their palette indices."""
    raw: np.ndarray | None
    try:
        from PIL import Image
    except ImportError:  # Pillow is optional: OpenCV expands palettes, so indices need Pillow
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    else:
        try:
            with Image.open(path) as im:
                if im.mode in ("LA", "PA"):  # grey or palette index plus alpha: keep the first
                    im = im.getchannel(0)
                elif im.mode == "RGBA":
                    im = im.convert("RGB")
                raw = np.asarray(im)
        except (OSError, ValueError):
            raw = None
    if raw is None:
        raise TrainingDataError(f"{path}: not a readable mask image")
    if raw.ndim == 3:
        if not (np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2])):
            raise TrainingDataError(f"{path}: colour mask; masks must be single-channel label images "
                                    "(0..K-1 per pixel, or 0/255 for binary)")
        raw = raw[..., 0]
    return raw


def mask_to_labels(raw: np.ndarray, num_classes: int, path: Path | str) -> np.ndarray:
    """Label ids (uint8) from mask values: 0..K-1 as they are, binary 0/255 as 0/1."""
    values = np.unique(raw)
    if values.size and values.max() == 255 and set(values.tolist()) <= {0, 255}:
        return (raw == 255).astype(np.uint8)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:5].tolist()) + (" ..." if bad.size > 5 else "")
        raise TrainingDataError(
            f"{path}: mask has label values {shown} outside 0..{num_classes - 1} ({num_classes} classes); "
            "give --classes with one name per label, or use a binary 0/255 mask")
    return raw.astype(np.uint8)


def _has_magic(s: str) -> bool:
    return any(ch in s for ch in "*?[")


def resolve_images(specs: Sequence[str]) -> list[Path]:
    """Image files from files, folders (their images, not recursive) and globs; sorted, unique."""
    found: list[Path] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if _has_magic(spec):
            hits = [Path(h) for h in sorted(glob.glob(str(p), recursive=True))]
            hits = [h for h in hits if h.is_file() and h.suffix.lower() in IMAGE_EXTENSIONS]
            if not hits:
                raise TrainingInputError(f"--images {spec}: matches no image files")
            found.extend(hits)
        elif p.is_dir():
            hits = sorted(h for h in p.iterdir() if h.is_file() and h.suffix.lower() in IMAGE_EXTENSIONS)
            if not hits:
                raise TrainingInputError(f"--images {spec}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            found.extend(hits)
        elif p.is_file():
            found.append(p)
        else:
            raise TrainingInputError(f"--images {spec}: no such file or folder")
    seen: dict[Path, None] = {}
    for f in found:
        seen.setdefault(f.resolve(), None)
    return list(seen)


def _mask_index(folder: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
            index.setdefault(f.stem, f)
            index.setdefault(f.name, f)
    return index


def match_masks(images: Sequence[Path], masks: str | None) -> list[tuple[Path, Path]]:
    """(image, mask) pairs. Masks live in ``masks`` (default: a ``masks`` folder beside the
    images' folder) under the image's name or its stem plus a suffix such as ``_mask``."""
    pairs: list[tuple[Path, Path]] = []
    missing: list[Path] = []
    indexes: dict[Path, dict[str, Path]] = {}
    for img in images:
        folder = Path(masks).expanduser() if masks is not None else img.parent.parent / "masks"
        if folder not in indexes:
            if not folder.is_dir():
                if masks is not None:
                    raise TrainingInputError(f"--masks {masks}: no such folder")
                raise TrainingInputError(f"{img}: no --masks folder given and none at {folder}; "
                                         "give --masks DIR")
            indexes[folder] = _mask_index(folder)
        index = indexes[folder]
        hit = index.get(img.name) if folder.resolve() != img.parent.resolve() else None
        for suffix in MASK_SUFFIXES:
            if hit is not None:
                break
            if suffix or folder.resolve() != img.parent.resolve():
                hit = index.get(img.stem + suffix)
        if hit is None:
            missing.append(img)
        else:
            pairs.append((img, hit))
    if missing:
        shown = ", ".join(m.name for m in missing[:3]) + (" ..." if len(missing) > 3 else "")
        where = masks if masks is not None else str(missing[0].parent.parent / "masks")
        raise TrainingInputError(f"{len(missing)} of {len(images)} images have no mask in {where}: {shown} "
                                 "(a mask has the image's name, or its stem plus _mask)")
    return pairs


def load_labelled_image(image_path: Path, mask_path: Path, num_classes: int) -> LabelledImage:
    image = read_image(image_path)
    labels = mask_to_labels(read_mask(mask_path), num_classes, mask_path)
    if labels.shape != image.shape[:2]:
        raise TrainingDataError(f"{mask_path}: mask is {labels.shape[1]}x{labels.shape[0]} but its image "
                                f"{image_path.name} is {image.shape[1]}x{image.shape[0]}")
    return LabelledImage(image_path.stem, image, labels)


def read_pairs_csv(path: str) -> tuple[list[str], list[str]]:
    """Slide and annotation paths from a CSV with a ``slide,annotations`` header; relative paths
    are taken from the CSV's folder."""
    import csv

    p = Path(path).expanduser()
    if not p.is_file():
        raise TrainingInputError(f"--pairs {path}: no such file")
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TrainingInputError(f"--pairs {path}: not a readable CSV ({exc})") from None
    if not rows or not {"slide", "annotations"} <= {(k or "").strip() for k in rows[0]}:
        raise TrainingInputError(f"--pairs {path}: needs a header 'slide,annotations' and at least one row")
    slides, annotations = [], []
    for row in rows:
        clean = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        slides.append(str(p.parent / clean["slide"]))
        annotations.append(str(p.parent / clean["annotations"]))
    return slides, annotations


@dataclass
class TrainingData:
    """Crop sources for training, whole images for validation, and what they were."""

    train: list[Any]  # CropSource
    val: list[LabelledImage]
    mpp: float
    description: dict[str, Any]
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for close in self.closers:
            close()


def split_names(names: Sequence[str], fraction: float, seed: int) -> set[str]:
    """Names held out for validation: a share ``fraction`` of them (at least one when there are
    two or more), chosen by ``seed``; the same set for the same names and seed."""
    ordered = sorted(names)
    n = len(ordered)
    if fraction <= 0 or n < 2:
        return set()
    n_val = min(n - 1, max(1, int(round(fraction * n))))
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    return {ordered[i] for i in perm[:n_val].tolist()}


def load_training_data(cfg: TrainConfig) -> TrainingData:
    """Find, read and check every input; split off validation. Raises TrainingError subclasses."""
    k = cfg.num_classes
    image_pairs = match_masks(resolve_images(cfg.images), cfg.masks) if cfg.images else []
    val_pairs: list[tuple[Path, Path]] = []
    val_patterns: list[str] = []
    if cfg.val_images:
        files = [s for s in cfg.val_images if os.sep in s or "/" in s or Path(s).exists()]
        val_patterns = [s for s in cfg.val_images if s not in files]
        if files:
            val_pairs = match_masks(resolve_images(files), cfg.masks)
        if val_patterns:
            named = [p for p in image_pairs if any(fnmatch.fnmatch(p[0].name, pat) or fnmatch.fnmatch(p[0].stem, pat)
                                                   for pat in val_patterns)]
            if not named:
                raise TrainingInputError(f"--val-images {' '.join(val_patterns)}: matches none of the training images")
            val_pairs += named
        held = {p[0].resolve() for p in val_pairs}
        image_pairs = [p for p in image_pairs if p[0].resolve() not in held]

    slides, annotations = list(cfg.slides), list(cfg.annotations)
    if cfg.pairs:
        s, a = read_pairs_csv(cfg.pairs)
        slides, annotations = slides + s, annotations + a
    for path in (*slides, *annotations):
        if not Path(path).expanduser().exists():
            raise TrainingInputError(f"{path}: no such file")
    if not image_pairs and not slides:
        raise TrainingInputError("no training images left (every image is a validation image)" if val_pairs
                                 else "no training images found")

    # Validation split by image or slide, before anything big is read.
    names = [p[0].stem for p in image_pairs] + [f"slide:{Path(s).name}" for s in slides]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise TrainingInputError(f"two training inputs share the name {dupes[0]!r}; names must be unique")
    held_out = set() if cfg.val_images else split_names(names, cfg.val_fraction, cfg.seed)

    closers: list[Callable[[], None]] = []
    train: list[Any] = []
    val: list[LabelledImage] = []
    try:
        for img, mask in image_pairs:
            item = load_labelled_image(img, mask, k)
            (val.append(item) if item.name in held_out else train.append(ImageCrops(item)))
        for img, mask in val_pairs:
            val.append(load_labelled_image(img, mask, k))
        slide_mpp_used: float | None = None
        warned: list[str] = []
        for slide_path, geojson_path in zip(slides, annotations):
            working = cfg.mpp if cfg.mpp is not None else slide_mpp_used
            src = SlideAnnotations(Path(slide_path).expanduser(), Path(geojson_path).expanduser(),
                                   cfg.classes, working, cfg.slide_mpp, cfg.unannotated)
            closers.append(src.close)
            warned.extend(src.warnings)
            slide_mpp_used = src.mpp
            if f"slide:{Path(slide_path).name}" in held_out:
                val.append(src.whole())
            else:
                train.append(src)
    except BaseException:
        for close in closers:
            close()
        raise
    if not train:
        raise TrainingInputError("no training data left after the validation split")
    mpp = cfg.mpp if cfg.mpp is not None else (slide_mpp_used if slides else 0.62)
    description = {
        "images": cfg.images, "masks": cfg.masks, "slides": slides, "annotations": annotations,
        "train_items": len(train), "train_names": [s.name for s in train][:1000],
        "val_names": [v.name for v in val], "unannotated": cfg.unannotated, "warnings": warned,
    }
    return TrainingData(train, val, float(mpp), description, closers)


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


def make_leaves(image: np.ndarray, params: QuadtreeParams, patching: str,
                tissue: np.ndarray | None = None) -> Leaves:
    """Leaves of an RGB image at the working mpp: adaptive quadtree, or uniform at min_size."""
    if patching == "uniform":
        return uniform_leaves(image.shape[:2], params.min_size, tissue)
    if tissue is None:
        return build_quadtree(params_edge_map(image, params), params, shape=image.shape[:2])
    # Edges only where a leaf can be: the bounding box of the quadtree roots that hold tissue,
    # with a margin for the blur and Canny's gradients (windows of a slide are often mostly glass).
    # Its corners sit on multiples of the edge downsampling, so its edge map drops into place.
    h, w = tissue.shape
    top, f = params.max_size, params.edge_downsample
    # Rows and columns with tissue, the columns in groups of 8 when that is cheaper: only the
    # roots they fall in matter, and roots are multiples of 8 px.
    words = top % 8 == 0 and w % 8 == 0 and tissue.dtype == np.bool_ and tissue.flags.c_contiguous
    cells = tissue.view(np.uint64) != 0 if words else tissue
    rows_any = np.flatnonzero(cells.any(axis=1))
    if rows_any.size == 0:
        return Leaves.empty()
    cols_any = np.flatnonzero(cells.any(axis=0))
    if words:
        cols_any = np.array([cols_any[0] * 8, cols_any[-1] * 8 + 7])
    margin = -(-(params.blur_kernel + 8) // f) * f
    y0 = max(0, int(rows_any[0]) // top * top - margin)
    x0 = max(0, int(cols_any[0]) // top * top - margin)
    y1 = min(h, -(-(int(rows_any[-1]) + 1) // top) * top + margin)
    x1 = min(w, -(-(int(cols_any[-1]) + 1) // top) * top + margin)
    edges = np.zeros((-(-h // f), -(-w // f)), np.uint8)
    edges[y0 // f:-(-y1 // f), x0 // f:-(-x1 // f)] = params_edge_map(image[y0:y1, x0:x1], params)
    return build_quadtree(edges, params, tissue)


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


def make_batch(sources: Sequence[Any], weights: np.ndarray, cfg: TrainConfig,
               rngs: Sequence[np.random.Generator]) -> Batch:
    """One augmented crop per generator in ``rngs`` (all its randomness drawn from it), tokenised
    and padded to one length."""
    toks, geoms, targets = [], [], []
    p, k = cfg.token_size, cfg.num_classes

    for rng in rngs:
        def crop(rng: np.random.Generator = rng) -> tuple[np.ndarray, np.ndarray]:
            src = sources[int(rng.choice(len(sources), p=weights))]
            image, labels = src.sample(rng, cfg.crop)
            return augment(image, labels, rng, cfg.jitter)

        image, labels = composite(*crop(), rng, cfg, crop)
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


# ---------------------------------------------------------------------------------------------
# Inference and validation
# ---------------------------------------------------------------------------------------------
def patching_from_card(card: ModelCard) -> tuple[QuadtreeParams, str]:
    """The quadtree parameters and patching mode a model was trained with (its card's
    ``patching``: ``{"mode", "token_size", "quadtree": QuadtreeParams fields}``)."""
    info = card.patching or {}
    fields = set(QuadtreeParams.__dataclass_fields__)
    # Cards written before edge_downsample existed found their edges at full resolution.
    saved = {"edge_downsample": 1, **(info.get("quadtree") or {})}
    params = QuadtreeParams(**{k: v for k, v in saved.items() if k in fields})
    return params, str(info.get("mode", "adaptive"))


@contextlib.contextmanager
def _no_fastpath() -> Any:
    """Turn off PyTorch's fused eval-mode encoder path while inside: with a key padding mask it
    runs several times slower on CPU than the regular scaled-dot-product path (same outputs)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def predict_image(
    model: TokenSegmenter,
    card: ModelCard,
    image_rgb: np.ndarray,
    params: QuadtreeParams | None = None,
    patching: str | None = None,
    *,
    tissue: np.ndarray | None = None,
    max_sequence: int = MAX_SEQUENCE,
) -> tuple[np.ndarray, np.ndarray]:
    """Segment a whole RGB uint8 image (H, W, 3) at the model's working mpp.

    Splits the image into leaves (adaptive quadtree, or uniform at ``params.min_size``; both
    default to what the card records), runs the model in eval mode without gradients and pastes
    the per-token class probabilities back. Images with more than ``max_sequence`` leaves run as
    several sequences of consecutive leaves in Z-order (spatially compact chunks), each with its
    geometry relative to its own top-left. ``tissue`` (H, W) bool drops leaves outside it.

    Returns ``(labels, probabilities)``: (H, W) uint8 class ids and (H, W, K) float32 that sum to
    one per pixel (pixels under no leaf are background).
    """
    labels, probs, _ = _predict(model, card, image_rgb, params, patching, tissue, max_sequence)
    return labels, probs


@torch.no_grad()
def _predict(model: TokenSegmenter, card: ModelCard, image_rgb: np.ndarray, params: QuadtreeParams | None,
             patching: str | None, tissue: np.ndarray | None, max_sequence: int,
             context: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"predict_image needs an RGB uint8 (H, W, 3) image, got {image_rgb.dtype} {image_rgb.shape}")
    card_params, card_mode = patching_from_card(card)
    params = params or card_params
    patching = patching or card_mode
    if patching not in PATCHING_MODES:
        raise ValueError(f"patching must be adaptive or uniform, not {patching!r}")
    if max_sequence < 1:
        raise ValueError(f"max_sequence must be at least 1, got {max_sequence}")
    leaves = make_leaves(image_rgb, params, patching, tissue)
    out = predict_leaves(model, card, image_rgb, leaves, max_sequence=max_sequence, relative_to=params.max_size,
                         context=context)
    return out.argmax(axis=2).astype(np.uint8), out, len(leaves)


def training_context(training: dict[str, Any] | None) -> int:
    """Side of the attention squares a model runs with by default: its training crop, the area it
    learnt to attend over (256 px when its card does not say)."""
    return int((training or {}).get("crop") or 256)


def default_shifts(context: int | None) -> list[int]:
    """Offsets of the attention squares by default: 0 and half a square, so every pixel is once
    well inside a square; [0] when there are no squares."""
    return [0, context // 2] if context else [0]


def context_blocks(leaves: Leaves, context: int, shift: int = 0) -> list[np.ndarray]:
    """Indices of the leaves in each ``context``-px square of the image (a grid from the image's
    corner, moved left and up by ``shift`` px), in raster order of the squares; a leaf belongs to
    the square holding its top-left corner."""
    if len(leaves) == 0:
        return []
    gx, gy = (leaves.x + shift) // context, (leaves.y + shift) // context
    key = gy * (int(gx.max()) + 1) + gx
    order = np.argsort(key, kind="stable")
    bounds = np.flatnonzero(np.diff(key[order])) + 1
    return np.split(order, bounds)


def _sequences(leaves: Leaves, max_sequence: int, context: int | None, relative_to: int,
               shift: int = 0) -> list[tuple[np.ndarray, float, float]]:
    """(leaf indices, x origin, y origin) of each sequence the model runs on."""
    if context:
        groups = context_blocks(leaves, context, shift)
        out = []
        for idx in groups:
            for part in np.array_split(idx, -(-len(idx) // max_sequence)):
                sub_x, sub_y = leaves.x[part].min(), leaves.y[part].min()
                out.append((part, float((sub_x + shift) // context * context - shift),
                            float((sub_y + shift) // context * context - shift)))
        return out
    n_chunks = -(-len(leaves) // max_sequence)
    if n_chunks == 1:
        return [(np.arange(len(leaves)), 0.0, 0.0)]
    out = []
    for idx in np.array_split(np.arange(len(leaves)), n_chunks):  # each with positions from its own corner
        out.append((idx, float(leaves.x[idx].min() // relative_to * relative_to),
                    float(leaves.y[idx].min() // relative_to * relative_to)))
    return out


@torch.no_grad()
def predict_leaves(model: TokenSegmenter, card: ModelCard, image_rgb: np.ndarray, leaves: Leaves, *,
                   max_sequence: int = MAX_SEQUENCE, relative_to: int = 256, context: int | None = None,
                   batch_tokens: int = MAX_SEQUENCE, shifts: Sequence[int] = (0,)) -> np.ndarray:
    """(H, W, K) float32 class probabilities of an image from given leaves: tokens, the model in
    eval mode without gradients, and the per-token probabilities pasted back (linear inside each
    leaf). Pixels under no leaf are background.

    Sequences: with ``context`` (px), the leaves of each ``context``-px square form one sequence
    (positions from the square's corner), so the model attends over about the area it was trained
    on whatever the image size; squares run in padded batches of about ``batch_tokens`` tokens.
    With several ``shifts`` (px) the squares are laid out once per shift (the grid moved left and
    up by it) and each leaf's probabilities averaged over them, so no object is seen only cut by
    a square's border. Without ``context``, the whole image is one sequence, or, past
    ``max_sequence`` leaves, consecutive Z-order chunks with positions from their own corner
    (rounded down to ``relative_to``).
    """
    cfg = model.cfg
    p, k = cfg.token_size, cfg.num_classes
    h, w = image_rgb.shape[:2]
    probs = np.zeros((len(leaves), p, p, k), np.float32)
    if len(leaves):
        device = next(model.parameters()).device
        norm = Normalisation(**{key: tuple(v) for key, v in card.normalisation.items()})
        was_training = model.training
        model.eval()
        grids = list(shifts) if context else [0]
        seqs = [seq for shift in grids for seq in _sequences(leaves, max_sequence, context, relative_to, shift)]
        seqs.sort(key=lambda s: len(s[0]))  # similar lengths together: little padding
        batches: list[list[tuple[np.ndarray, float, float]]] = [[]]
        for seq in seqs:
            if batches[-1] and (len(batches[-1]) + 1) * len(seq[0]) > batch_tokens:
                batches.append([])
            batches[-1].append(seq)
        all_tokens = tokenise(image_rgb, leaves, p)  # once, vectorised; sequences index into it
        all_geometry = token_geometry(leaves)
        try:
            with _no_fastpath():
                for batch in batches:
                    toks, geoms = [], []
                    for idx, ox, oy in batch:
                        geom = all_geometry[idx]
                        geom[:, 0] -= ox
                        geom[:, 1] -= oy
                        toks.append(all_tokens[idx])
                        geoms.append(geom)
                    t, g, m = pad_tokens(toks, geoms)
                    logits = model(norm.apply(torch.from_numpy(t).to(device)), torch.from_numpy(g).to(device),
                                   torch.from_numpy(m).to(device))  # (B, L, K, p, p)
                    out = logits.float().softmax(dim=2).permute(0, 1, 3, 4, 2).cpu().numpy()
                    for row, (idx, _, _) in enumerate(batch):
                        probs[idx] += out[row, : len(idx)]
            if len(grids) > 1:
                probs /= len(grids)
        finally:
            model.train(was_training)
    out = detokenise(probs, leaves, (h, w), fill=0) if len(leaves) else np.zeros((h, w, k), np.float32)
    out = np.ascontiguousarray(out, dtype=np.float32)
    if len(leaves):  # uncovered pixels: background (covered ones sum to one already)
        out[..., 0] += ~leaf_coverage(leaves, (h, w))
    else:
        out[..., 0] = 1.0
    return out


def dice_counts(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, 3) int64 per class: intersection, predicted and true pixel counts (IGNORE excluded)."""
    keep = truth != IGNORE
    p, t = pred[keep].astype(np.int64), truth[keep].astype(np.int64)
    inter = np.bincount(t[p == t], minlength=num_classes)[:num_classes]
    return np.stack([inter, np.bincount(p, minlength=num_classes)[:num_classes],
                     np.bincount(t, minlength=num_classes)[:num_classes]], axis=1)


def dice_scores(counts: np.ndarray, class_names: Sequence[str]) -> tuple[dict[str, float | None], float]:
    """Dice per class (None where neither prediction nor truth has the class) and the foreground
    Dice: the mean over the non-background classes that occur."""
    per: dict[str, float | None] = {}
    for name, (inter, pred, true) in zip(class_names, counts.tolist()):
        per[name] = None if pred + true == 0 else 2.0 * inter / (pred + true)
    fg = [v for name, v in list(per.items())[1:] if v is not None]
    return per, float(np.mean(fg)) if fg else 1.0


def validate(model: TokenSegmenter, card: ModelCard, images: Sequence[LabelledImage],
             params: QuadtreeParams, patching: str, context: int | None = None) -> dict[str, Any]:
    """Dice per class at full resolution over whole validation images, pooled over pixels.

    With ``context`` (px) the model attends within squares of that side, as ``wsi-amr segment``
    runs it (training passes its crop size), so the best checkpoint is chosen the way it will be
    used; without it each image is one sequence."""
    k = model.cfg.num_classes
    counts = np.zeros((k, 3), np.int64)
    tokens = 0
    t0 = time.perf_counter()
    for item in images:
        pred, _, n = _predict(model, card, item.image, params, patching, None, MAX_SEQUENCE, context)
        counts += dice_counts(pred, item.labels, k)
        tokens += n
    per, fg = dice_scores(counts, card.class_names)
    return {"val_dice": per, "val_foreground_dice": fg, "val_tokens_per_image": tokens / max(1, len(images)),
            "val_seconds": round(time.perf_counter() - t0, 3)}


# ---------------------------------------------------------------------------------------------
# Devices, seeds, schedule
# ---------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """A torch device from ``auto|cpu|cuda|cuda:N|mps``; TrainingInputError when absent."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise TrainingInputError("--device mps: Apple Metal (MPS) is not available here")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise TrainingInputError(f"--device {name}: no CUDA GPU is available (use --device cpu or auto)")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise TrainingInputError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices (0..)")
        return torch.device(name)
    raise TrainingInputError(f"--device must be auto, cpu, cuda, cuda:N or mps, not {name!r}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def learning_rate(step: int, cfg: Any) -> float:
    """Learning rate for the step after ``step`` done: linear warm-up, then cosine to lr / 100
    (``cfg``: any run config with ``lr``, ``steps`` and ``warmup_steps``)."""
    warm = cfg.warmup_steps
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    floor = cfg.lr / 100
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(model: torch.nn.Module, cfg: Any) -> torch.optim.AdamW:
    """AdamW at ``cfg.lr``, ``cfg.weight_decay`` on weight matrices only."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # biases and norms
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


# ---------------------------------------------------------------------------------------------
# Training state (resume): safetensors + JSON, never pickle
# ---------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def save_training_state(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        rng: np.random.Generator, meta: dict[str, Any]) -> None:
    """``OUT/last-state.safetensors`` (weights, optimizer moments, torch RNG) and
    ``OUT/last-state.json`` (step, numpy/Python RNG, optimizer settings, config)."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for name, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    groups = [{k: _plain(v) for k, v in g.items()} for g in opt["param_groups"]]
    weights = out / "last-state.safetensors"
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp), metadata={"format": STATE_FORMAT})
    py_state = random.getstate()
    doc = {
        "format": STATE_FORMAT, "version": STATE_VERSION, **meta,
        "numpy_rng": rng.bit_generator.state,
        "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
        "optimizer_param_groups": groups,
        "tensors": weights.name, "tensors_sha256": file_sha256(weights),
    }
    write_json_atomic(out / "last-state.json", doc)


def load_training_state(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        rng: np.random.Generator, expect: dict[str, Any]) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote; returns its JSON. Refuses a state whose
    architecture, classes or patching differ from ``expect``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    doc_path, weights = out / "last-state.json", out / "last-state.safetensors"
    if not doc_path.exists():
        raise TrainingInputError(f"--resume: nothing to resume in {out} (no last-state.json); run without --resume")
    try:
        doc = json.loads(doc_path.read_text())
    except (OSError, ValueError) as exc:
        raise TrainingDataError(f"{doc_path}: not readable JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or doc.get("version") != STATE_VERSION:
        raise TrainingDataError(f"{doc_path}: not a wsi-amr training state (version {STATE_VERSION})")
    if not weights.exists() or file_sha256(weights) != doc.get("tensors_sha256"):
        raise TrainingDataError(f"{weights}: missing or does not match {doc_path.name} (interrupted while saving?); "
                                "start again with --overwrite")
    for key, value in expect.items():
        if doc.get(key) != value:
            raise TrainingInputError(f"--resume: {out} was trained with {key} {doc.get(key)!r}, this command "
                                     f"gives {value!r}; use the same options, or --overwrite to start again")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise TrainingDataError(f"{weights}: not a readable safetensors file ({exc})") from None
    device = next(model.parameters()).device
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = doc["optimizer_param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for s in optimizer.state.values():  # moments live with their parameters; 'step' stays on the CPU
        for name, value in s.items():
            if isinstance(value, Tensor) and name != "step":
                s[name] = value.to(device)
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(64) if f"rng.cuda.{i}" in tensors]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    rng.bit_generator.state = doc["numpy_rng"]
    version, internal, gauss = doc["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return doc


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
ProgressFn = Callable[[int, int, dict[str, Any]], None]


def check_output(out: Path) -> None:
    """Create OUT and make sure it can be written to."""
    from .batch import InputError, check_output_folder

    try:
        check_output_folder(out)
    except InputError as exc:
        raise TrainingInputError(str(exc)) from None


RUN_FILES = ("last-state.json", "last-state.safetensors", "last.json", "last.safetensors",
             "best.json", "best.safetensors", "metrics.jsonl")


def check_previous_run(cfg: Any) -> None:
    """Refuse an OUT that holds another run unless resuming it; on overwrite remove its files."""
    previous = [n for n in RUN_FILES if (cfg.out / n).exists()]
    if previous and not cfg.resume and not cfg.overwrite:
        raise TrainingInputError(f"{cfg.out}: already holds a training run ({previous[0]}); continue it with "
                                 "--resume, or start again with --overwrite")
    if cfg.overwrite:
        for name in previous:
            with contextlib.suppress(FileNotFoundError):
                (cfg.out / name).unlink()


def trim_metrics(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the state being resumed was saved)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue
    write_text_atomic(path, "".join(line + "\n" for line in keep))


@contextlib.contextmanager
def graceful_interrupt() -> Any:
    """The first Ctrl-C asks the loop to stop after the current step (so the saved state is a
    whole step); a second one interrupts at once."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def make_card(cfg: TrainConfig, data: TrainingData, training: dict[str, Any]) -> ModelCard:
    colors = cfg.colors or [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(cfg.num_classes)]
    norm = Normalisation()
    return ModelCard(
        class_names=list(cfg.classes), class_colors=[list(c) for c in colors], mpp=data.mpp,
        normalisation={"mean": list(norm.mean), "std": list(norm.std)},
        patching={"mode": cfg.patching, "token_size": cfg.token_size, "quadtree": cfg.quadtree.as_dict()},
        training=training,
    )


def train_segmenter(cfg: TrainConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train a :class:`TokenSegmenter` as ``cfg`` says; returns ``{"best_dice", "best_step",
    "steps", "paths"}``.

    Writes ``OUT/best.*`` (best validation foreground Dice; the last model when there is no
    validation split), ``OUT/last.*`` and ``OUT/last-state.*`` (for ``resume``) and
    ``OUT/metrics.jsonl``. ``progress(step, total, info)`` is called after every step.

    Raises :class:`TrainingInputError` / :class:`TrainingDataError` for unusable inputs, and
    :class:`TrainingInterrupted` after saving ``OUT/last`` when stopped by Ctrl-C.
    """
    cfg.validate()
    notes = []
    if cfg.crop_quadtree() != cfg.quadtree:
        notes.append(f"--max-size {cfg.quadtree.max_size} is larger than --crop {cfg.crop}: leaves are at most "
                     f"{cfg.crop_quadtree().max_size} px (recorded in the model card)")
        cfg = replace(cfg, quadtree=cfg.crop_quadtree())
    with run_folder(cfg) as (device, group):
        data = load_training_data(cfg)
        data.description["warnings"] = notes + data.description["warnings"]
        try:
            return _train(cfg, data, device, group, progress)
        finally:
            data.close()


@contextlib.contextmanager
def run_folder(cfg: Any) -> Iterator[tuple[torch.device, Group]]:
    """Hold a training run's output folder for the block; yield this process's device and its
    place among the training processes (:mod:`wsi_amr.ddp`; alone unless started by torchrun).

    ``cfg`` (any run config with ``out``, ``device``, ``threads``, ``resume``, ``overwrite``,
    ``batch_size``): the device must exist, OUT must be writable and not locked by another run,
    and hold no other run unless resuming (``overwrite`` clears it); torch uses ``threads`` inside
    the block. Under torchrun, rank 0 checks and holds OUT and every process stops on its error.
    """
    from .batch import slide_lock
    from .ddp import GroupError, group_from_env, process_device, process_group

    try:
        group = group_from_env()
        device = process_device(resolve_device(cfg.device), cfg.device, group)
    except GroupError as exc:
        raise TrainingInputError(str(exc)) from None
    if cfg.batch_size < group.world:
        raise TrainingInputError(f"--batch-size {cfg.batch_size} is the batch of the whole step, shared by "
                                 f"{group.world} processes: give at least {group.world}")
    with process_group(group, device), contextlib.ExitStack() as stack:
        error: TrainingError | None = None
        if group.is_main:
            try:
                check_output(cfg.out)
                if not stack.enter_context(slide_lock(cfg.out)):
                    raise TrainingInputError(f"{cfg.out}: another training run is writing to this folder")
                check_previous_run(cfg)
            except TrainingError as exc:
                error = exc
        message = group.broadcast_error(None if error is None else str(error))
        if message is not None:
            raise error if error is not None else TrainingInputError(message)
        threads_before = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            yield device, group
        finally:
            torch.set_num_threads(threads_before)


def _train(cfg: TrainConfig, data: TrainingData, device: torch.device, group: Group,
           progress: ProgressFn | None) -> dict[str, Any]:
    out = cfg.out
    seed_everything(cfg.seed)
    model_cfg = cfg.model_config()
    model = TokenSegmenter(model_cfg).to(device)
    group.broadcast_parameters(model)
    optimizer = make_optimizer(model, cfg)
    rng = np.random.default_rng(cfg.seed)
    norm = Normalisation()
    identity = {"architecture": model_cfg.as_dict(), "classes": list(cfg.classes),
                "patching": cfg.patching, "quadtree": cfg.quadtree.as_dict()}
    step, best_dice, best_step, seconds_before = 0, -1.0, 0, 0.0
    metrics = out / "metrics.jsonl"
    if cfg.resume:
        doc = load_training_state(out, model, optimizer, rng, identity)
        step, best_dice, best_step = int(doc["step"]), float(doc["best_dice"]), int(doc["best_step"])
        seconds_before = float(doc.get("seconds", 0.0))
        if step >= cfg.steps:
            raise TrainingInputError(f"--resume: {out} has already done {step} steps; give a larger --steps to go on")
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
                    batch = make_batch(data.train, weights, cfg, [np.random.default_rng(int(seeds[i])) for i in mine])
                    window["data"] += time.perf_counter() - t_data
                    tokens = norm.apply(batch.tokens.to(device))
                    logits = model(tokens, batch.geometry.to(device), batch.mask.to(device))
                    loss, ce, dl = segmentation_loss(logits, batch.targets.to(device), cfg.dice_weight,
                                                     total=group.global_sum)
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
                    window["tokens"] += group.sum_values(batch.tokens_per_crop * len(mine))[0] / cfg.batch_size
                    window["n"] += 1
                    if step % cfg.log_every == 0 or step == cfg.steps:
                        n = window["n"]
                        elapsed = time.perf_counter() - window["t0"]
                        write_metric({"event": "train", "step": step, "loss": window["loss"] / n,
                                      "cross_entropy": window["ce"] / n, "dice_loss": window["dice"] / n,
                                      "lr": lr, "tokens_per_crop": window["tokens"] / n,
                                      "steps_per_s": n / max(elapsed, 1e-9),
                                      "data_fraction": window["data"] / max(elapsed, 1e-9),
                                      "seconds": round(seconds_before + time.perf_counter() - t_start, 3)})
                        window.update(loss=0.0, ce=0.0, dice=0.0, tokens=0.0, n=0, data=0.0, t0=time.perf_counter())
                    if has_val and group.is_main and (step % cfg.val_every == 0 or step == cfg.steps):
                        card = make_card(cfg, data, training_info())
                        last_val = validate(model, card, data.val, cfg.quadtree, cfg.patching, cfg.crop)
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
        + ([] if has_val else ["no validation images (one image or slide, or --val-fraction 0): "
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


__all__ = [
    "IGNORE", "LabelledImage", "TrainConfig", "TrainingDataError", "TrainingError", "TrainingInputError",
    "TrainingInterrupted", "augment", "colour_jitter", "dice_counts", "dice_scores", "label_fractions",
    "load_training_data", "make_leaves", "patching_from_card", "predict_image", "resolve_device",
    "segmentation_loss", "train_segmenter", "validate",
]
