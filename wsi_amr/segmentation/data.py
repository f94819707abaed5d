"""Labelled training data for the segmenter: image/mask pairs, slides with GeoJSON annotations,
and the crops drawn from them."""

from __future__ import annotations

import fnmatch
import glob
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from wsi_amr.errors import TrainingDataError, TrainingInputError
from wsi_amr.images import ImageError, read_rgb
from wsi_amr.labels import label_ids, read_label_image
from wsi_amr.params import carry, naming
from wsi_amr.segmentation.config import IGNORE, IMAGE_EXTENSIONS, MASK_SUFFIXES, MAX_VALIDATION_SIDE, TrainConfig
from wsi_amr.trainer import split_names


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

        from wsi_amr.geojson import GeoJSONError, read_geojson
        from wsi_amr.polygons import polygonal_parts
        from wsi_amr.slide import MissingMppError, Resolution, SlideError, open_slide

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                objects = read_geojson(geojson_path)
        except GeoJSONError as exc:
            raise carry(TrainingDataError(str(exc)), exc) from None
        self.warnings = [str(w.message) for w in caught]
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted({o.class_name for o in objects if o.class_name is not None and o.class_name not in index})
        if unknown:
            raise naming(TrainingDataError(
                f"{geojson_path}: unknown {'class names' if len(unknown) > 1 else 'class'} "
                f"{', '.join(repr(u) for u in unknown)}: add {'them' if len(unknown) > 1 else 'it'} to classes "
                f"(now {','.join(classes)})"), "classes")
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
            raise carry(TrainingDataError(str(exc)), exc) from None
        try:
            self.mpp = mpp if mpp is not None else self.slide.require_mpp()
            self.downsample = self.slide.downsample_for(Resolution(mpp=self.mpp))
        except MissingMppError as exc:
            self.slide.close()
            raise carry(TrainingInputError(str(exc)), exc) from None
        except SlideError as exc:
            self.slide.close()
            raise carry(TrainingInputError(str(exc)), exc) from None
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

        from wsi_amr.polygons import rasterize_polygons

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


def mask_to_labels(raw: np.ndarray, num_classes: int, path: Path | str) -> np.ndarray:
    """Label ids (uint8) from mask values: 0..K-1 as they are, binary 0/255 as 0/1."""
    ids = label_ids(raw)
    values = np.unique(ids)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:5].tolist()) + (" ..." if bad.size > 5 else "")
        raise naming(TrainingDataError(
            f"{path}: mask has label values {shown} outside 0..{num_classes - 1} ({num_classes} class names); "
            "give classes with one name per label, or use a binary 0/255 mask"), "classes")
    return ids.astype(np.uint8)


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
                raise naming(TrainingInputError(f"images {spec}: matches no image files"), "images")
            found.extend(hits)
        elif p.is_dir():
            hits = sorted(h for h in p.iterdir() if h.is_file() and h.suffix.lower() in IMAGE_EXTENSIONS)
            if not hits:
                raise naming(TrainingInputError(f"images {spec}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})"),
                             "images")
            found.extend(hits)
        elif p.is_file():
            found.append(p)
        else:
            raise naming(TrainingInputError(f"images {spec}: no such file or folder"), "images")
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
                    raise naming(TrainingInputError(f"masks {masks}: no such folder"), "masks")
                raise naming(TrainingInputError(f"{img}: masks (a folder of label masks) not given and none at "
                                                f"{folder}"), "masks")
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


def resample_labelled(image: np.ndarray, labels: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """An image and its labels resized by ``scale`` (0.5: half the side): the image by area
    averaging (or bilinear when enlarging), the labels by nearest neighbour so no new ids appear."""
    import cv2

    h, w = labels.shape
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    if size == (w, h):
        return image, labels
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return (cv2.resize(image, size, interpolation=interp),
            cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST))


def load_labelled_image(image_path: Path, mask_path: Path, num_classes: int, scale: float = 1.0) -> LabelledImage:
    """An image and its mask as class ids, both resized by ``scale`` (image µm/px over working
    µm/px) to the working mpp."""
    try:
        image = read_rgb(image_path)
        raw = read_label_image(mask_path)
    except ImageError as exc:
        raise TrainingDataError(str(exc)) from None
    labels = mask_to_labels(raw, num_classes, mask_path)
    if labels.shape != image.shape[:2]:
        raise TrainingDataError(f"{mask_path}: mask is {labels.shape[1]}x{labels.shape[0]} but its image "
                                f"{image_path.name} is {image.shape[1]}x{image.shape[0]}")
    if scale != 1.0:
        image, labels = resample_labelled(image, labels, scale)
    return LabelledImage(image_path.stem, image, labels)


def read_pairs_csv(path: str) -> tuple[list[str], list[str]]:
    """Slide and annotation paths from a CSV with a ``slide,annotations`` header; relative paths
    are taken from the CSV's folder."""
    import csv

    p = Path(path).expanduser()
    if not p.is_file():
        raise naming(TrainingInputError(f"pairs {path}: no such file"), "pairs")
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise naming(TrainingInputError(f"pairs {path}: not a readable CSV ({exc})"), "pairs") from None
    if not rows or not {"slide", "annotations"} <= {(k or "").strip() for k in rows[0]}:
        raise naming(TrainingInputError(f"pairs {path}: needs a header 'slide,annotations' and at least one row"), "pairs")
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


def load_training_data(cfg: TrainConfig) -> TrainingData:  # noqa: C901 - each input kind checked in turn, one message per failure
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
                raise naming(TrainingInputError(f"val_images {' '.join(val_patterns)}: matches none of the training images"), "val_images")
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
    # Images at image_mpp are resampled to the working mpp (e.g. GlaS at 0.62 trained at 1.24).
    scale = cfg.image_mpp / cfg.mpp if cfg.image_mpp is not None and cfg.mpp is not None else 1.0
    try:
        for img, mask in image_pairs:
            item = load_labelled_image(img, mask, k, scale)
            (val.append(item) if item.name in held_out else train.append(ImageCrops(item)))
        for img, mask in val_pairs:
            val.append(load_labelled_image(img, mask, k, scale))
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
    mpp = cfg.mpp if cfg.mpp is not None else (slide_mpp_used if slides else (cfg.image_mpp or 0.62))
    description = {
        "images": cfg.images, "masks": cfg.masks,
        **({"image_mpp": cfg.image_mpp} if cfg.image_mpp is not None else {}), "slides": slides, "annotations": annotations,
        "train_items": len(train), "train_names": [s.name for s in train][:1000],
        "val_names": [v.name for v in val], "unannotated": cfg.unannotated, "warnings": warned,
    }
    return TrainingData(train, val, float(mpp or 0.62), description, closers)
