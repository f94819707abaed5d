"""Label images and annotation masks: the one reader of label images (``evaluate``, ``train
segment``, ``quadtree --mask``, the benchmarks), and a label image or a GeoJSON as a class mask at a
slide's level 0.

:func:`read_label_image` accepts a file holding one channel of non-negative integer labels
(0 = background), and returns the values as stored:

- PNG, BMP, JPEG or anything else OpenCV decodes, 1-, 8- or 16-bit; TIFF (read with tifffile:
  the first page, level 0 of a pyramid, e.g. ``segment``'s ``mask.tiff``), 8-, 16- or 32-bit;
- palette images (palette PNG, TIFF or BMP): their palette indices, not the colours;
- grey with alpha, and RGB or RGBA whose three colour channels are equal (grey saved as colour):
  that grey; alpha is ignored.

It refuses, with :class:`~wsi_amr.images.ImageError` (one line naming the file): a missing file,
one that cannot be decoded (corrupt, truncated, not an image), a colour image (channels that
differ: labels are not colours), floating-point pixels, negative labels, and arrays that are not
one plane (more than four channels, several planes).

What the values mean is each command's: :func:`label_ids` (``evaluate``, ``train segment``) reads a
binary 0/255 mask as 0/1 and every other value as its label id; ``quadtree --mask`` renumbers the
values present 1..K in increasing order and names each class by its value.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsi_amr.images import ImageError
from wsi_amr.params import require
from wsi_amr.slide import Slide, SlideError
from wsi_amr.tiling import Window, sample_mask

#: Label value of pixels that carry no label (padding, unannotated slide area with
#: ``unannotated="ignore"``); they add nothing to a loss or a Dice.
IGNORE = 255

LABEL_TIFF_SUFFIXES = (".tif", ".tiff")


class MaskError(SlideError):
    """A reference mask that cannot be used with this slide; one line for the user."""


# -------------------------------------------------------------------------------------------------
# Label images
# -------------------------------------------------------------------------------------------------
def _palette_indices(path: Path) -> np.ndarray | None:
    """The palette indices of a palette image (Pillow); None for any other image."""
    from PIL import Image

    with warnings.catch_warnings():  # a large image is no attack here: OpenCV reads it below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                if im.mode not in ("P", "PA"):
                    return None
                return np.asarray(im.getchannel(0) if im.mode == "PA" else im)
        except Image.DecompressionBombError:
            return None
        except (OSError, ValueError, SyntaxError):  # not a format Pillow knows: OpenCV may
            return None


def _decode_labels(path: Path) -> np.ndarray | None:
    if path.name.lower().endswith(LABEL_TIFF_SUFFIXES):
        import tifffile

        return np.asarray(tifffile.imread(path, level=0))
    indices = _palette_indices(path)
    return indices if indices is not None else cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def read_label_image(path: Path) -> np.ndarray:
    """The labels of a label image file, (H, W) integers as stored (1-bit images as 0/255 uint8);
    ImageError naming the file when it is refused (the module docstring lists what is accepted)."""
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    try:
        arr = _decode_labels(path)
    except MemoryError:
        raise
    except Exception as exc:  # decoders raise many kinds; each is "not readable" to the user
        raise ImageError(f"{path}: not a readable label image ({type(exc).__name__}: {exc})") from None
    if arr is None or arr.size == 0:
        raise ImageError(f"{path}: not a readable label image")
    if arr.ndim == 3 and arr.shape[2] in (2, 4):  # grey or colour plus alpha: alpha is no label
        arr = arr[..., :-1]
    if arr.ndim == 3 and arr.shape[2] in (1, 3):
        if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, arr.shape[2])):
            raise ImageError(f"{path}: colour image; a label image has one channel of label ids "
                             "(0..K-1 per pixel, or 0/255 for binary; a palette image gives its indices)")
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ImageError(f"{path}: image of shape {arr.shape}; a label image is one plane of label ids")
    if arr.dtype == bool:  # 1-bit, as OpenCV reads a 1-bit PNG
        arr = arr.astype(np.uint8) * np.uint8(255)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ImageError(f"{path}: label image holds {arr.dtype} values; labels are integers")
    if np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
        raise ImageError(f"{path}: label image holds negative values ({int(arr.min())}); labels are 0..K-1")
    return arr


def label_ids(raw: np.ndarray) -> np.ndarray:
    """Label ids of label-image values: a binary 0/255 mask as 0/1, any other values as they are."""
    values = np.unique(raw)
    if values.size and values.max() == 255 and set(values.tolist()) <= {0, 255}:
        return (raw == 255).astype(np.uint8)
    return raw


# -------------------------------------------------------------------------------------------------
# Reference masks over a slide
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
    """Read a reference mask for ``slide``; :class:`MaskError` with one line when it cannot be used.

    Returns the mask and warnings (features a GeoJSON reader skipped)."""
    name = path.name.lower()
    if name.endswith(MASK_GEOJSON_SUFFIXES):
        return _geojson_mask(path, slide)
    if name.endswith(MASK_IMAGE_SUFFIXES):
        return _image_mask(path, slide), []
    raise MaskError(f"{path}: a mask must be a label image (.png, .tif) or QuPath GeoJSON (.geojson)")


def _image_mask(path: Path, slide: Slide) -> LabelMask:
    try:
        img = read_label_image(path)
    except ImageError as exc:
        raise MaskError(str(exc)) from None
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
        raise MaskError(f"{path}: the mask has {len(values)} distinct labels; give class labels, not instances")
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
            raise MaskError(f"{exc} (reference mask)") from exc
    classes: dict[str, int] = {}
    polygons: list[tuple[int, Any]] = []
    for obj in objects:
        if not polygonal_parts(obj.geometry):
            continue
        cls = obj.class_name or "Unclassified"
        label = classes.setdefault(cls, len(classes) + 1)
        polygons.append((label, obj.geometry))
    if not polygons:
        raise MaskError(f"{path}: the mask GeoJSON holds no polygon to use as a label")
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
