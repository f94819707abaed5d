"""Label images and annotation masks: read a label image or a GeoJSON as a class mask at a slide's
level 0."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsi_amr.params import require
from wsi_amr.slide import Slide, SlideError
from wsi_amr.tiling import Window, sample_mask


class MaskError(SlideError):
    """A ``--mask`` that cannot be used with this slide; one line for the user."""


# -------------------------------------------------------------------------------------------------
# Reference masks (--mask)
# -------------------------------------------------------------------------------------------------
@dataclass
class LabelMask:
    """A reference label mask over the slide: a label image at an integer downsample of level 0, or
    polygons in level-0 px (QuPath coordinates, i.e. minus the slide's bounds offset)."""

    classes: dict[str, int]  # class name (or label value) -> label id, 1..K-1; 0 is background
    image: np.ndarray | None = None
    downsample: float = 1.0
    polygons: list[tuple[int, Any]] = field(default_factory=list)  # (label id, geometry)
    offset: tuple[float, float] = (0.0, 0.0)  # added to polygon coordinates to get level-0 px

    @property
    def num_classes(self) -> int:
        return max(self.classes.values(), default=0) + 1

    def window(self, win: Window, downsample: float) -> np.ndarray:
        dtype = np.uint8 if self.num_classes <= 256 else np.int32
        if self.image is not None:
            return sample_mask(self.image, self.downsample, downsample, win).astype(dtype, copy=False)
        from shapely import box

        from wsi_amr.polygons import rasterize_polygons

        out = np.zeros((win.h, win.w), np.uint8)
        ox, oy = win.x * downsample - self.offset[0], win.y * downsample - self.offset[1]
        bounds = box(ox, oy, ox + win.w * downsample, oy + win.h * downsample)
        for label, geom in self.polygons:  # later classes paint over earlier ones
            if geom.intersects(bounds):
                rasterize_polygons(geom, (win.h, win.w), scale=downsample, offset=(ox, oy), value=label, out=out)
        return out.astype(dtype, copy=False)


def load_label_mask(path: Path, slide: Slide) -> tuple[LabelMask, list[str]]:
    """Read ``--mask`` for ``slide``; :class:`MaskError` with one line when it cannot be used.

    Returns the mask and warnings (features a GeoJSON reader skipped)."""
    name = path.name.lower()
    if name.endswith(MASK_GEOJSON_SUFFIXES):
        return _geojson_mask(path, slide)
    if name.endswith(MASK_IMAGE_SUFFIXES):
        return _image_mask(path, slide), []
    raise MaskError(f"{path}: --mask must be a label image (.png, .tif) or QuPath GeoJSON (.geojson)")


def _image_mask(path: Path, slide: Slide) -> LabelMask:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise MaskError(f"{path}: cannot read the --mask image (PNG or TIFF label image expected)")
    if img.ndim == 3:
        if not all(np.array_equal(img[..., 0], img[..., c]) for c in range(1, img.shape[2])):
            raise MaskError(f"{path}: --mask has colour channels; give a single-channel label image")
        img = img[..., 0]
    if not np.issubdtype(img.dtype, np.integer):
        raise MaskError(f"{path}: --mask must hold integer labels, not {img.dtype}")
    w0, h0 = slide.dimensions
    mh, mw = img.shape
    f = max(1, round(w0 / mw))
    if mw not in (w0 // f, -(-w0 // f)) or mh not in (h0 // f, -(-h0 // f)):
        raise MaskError(
            f"{path}: mask is {mw}x{mh} px but {slide.name} is {w0}x{h0} px at level 0; "
            "give a mask of the slide's level-0 size or an exact integer downsample of it"
        )
    # Compact label ids (a 0/255 mask becomes 0/1): background stays 0.
    values = np.unique(img)
    values = values[values != 0]
    if len(values) > 65535:
        raise MaskError(f"{path}: --mask has {len(values)} distinct labels; give class labels, not instances")
    ids = np.searchsorted(values, img) + 1
    ids[img == 0] = 0
    classes = {str(int(v)): i + 1 for i, v in enumerate(values.tolist())}
    dtype = np.uint8 if len(values) < 256 else np.uint16
    return LabelMask(classes, image=ids.astype(dtype), downsample=float(f))


def _geojson_mask(path: Path, slide: Slide) -> tuple[LabelMask, list[str]]:
    from wsi_amr.geojson import GeoJSONError, read_geojson
    from wsi_amr.polygons import polygonal_parts

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            objects = read_geojson(path)
        except GeoJSONError as exc:
            raise MaskError(f"{exc} (--mask)") from exc
    classes: dict[str, int] = {}
    polygons: list[tuple[int, Any]] = []
    for obj in objects:
        if not polygonal_parts(obj.geometry):
            continue
        cls = obj.class_name or "Unclassified"
        label = classes.setdefault(cls, len(classes) + 1)
        polygons.append((label, obj.geometry))
    if not polygons:
        raise MaskError(f"{path}: --mask GeoJSON holds no polygon to use as a label")
    polygons.sort(key=lambda p: p[0])
    bx, by = slide.bounds_offset
    return LabelMask(classes, polygons=polygons, offset=(float(bx), float(by))), [str(w.message) for w in caught]


MASK_IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
MASK_GEOJSON_SUFFIXES = (".geojson", ".json", ".geojson.gz", ".json.gz")
MASK_SUFFIXES = MASK_IMAGE_SUFFIXES + MASK_GEOJSON_SUFFIXES


@dataclass(frozen=True)
class MaskRef:
    """A reference mask file and its identity (size, mtime), so that a changed mask makes a slide's
    outputs out of date."""

    path: str
    bytes: int
    mtime: float

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> MaskRef:
        p = Path(path)
        require(p.is_file(), f"mask {p}: no such file", "mask")
        require(p.name.lower().endswith(MASK_SUFFIXES),
                f"mask {p}: give a label image ({', '.join(MASK_SUFFIXES[:3])}) or QuPath GeoJSON (.geojson)", "mask")
        st = p.stat()
        return cls(str(p.resolve()), st.st_size, round(st.st_mtime, 3))
