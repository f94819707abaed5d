"""Whole-slide images behind one interface.

:class:`Slide` is what the rest of the package sees. Two backends implement it: OpenSlide (every
vendor format OpenSlide knows, via the native library in the ``openslide-bin`` wheel) and tifffile
(OME-TIFF, plain or stripped TIFF, QPTIFF and other TIFFs OpenSlide refuses). :func:`open_slide`
picks by trying, in that order, and checks that pixels decode before handing the slide out.

Coordinates are level-0 pixels, x right, y down. Nothing outside this module imports openslide or
tifffile for slide reading.
"""

from __future__ import annotations

import ctypes
import math
import re
import sys
import threading
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsi_amr.params import naming, require, require_positive

# Extensions searched for when a folder is given as input.
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
    ".dcm", ".qptiff", ".btf", ".ome.tif", ".ome.tiff",
)

#: How a "finer than level 0" message ends by default (it names the parameters mpp and magnification).
COARSER_OPTION = "choose a coarser mpp or magnification"


# A target resolution this much finer than level 0 is refused rather than silently upsampled.
_UPSAMPLE_TOLERANCE = 1.05


class SlideError(Exception):
    """A slide that cannot be used; the message is one line naming the file and the fix."""


class MissingMppError(SlideError):
    """The slide records no pixel size and the command needs one."""


#: The working resolution of the per-slide commands when neither mpp nor magnification is given.
DEFAULT_MPP = 0.5


@dataclass(frozen=True)
class Resolution:
    """A requested working resolution: microns per pixel, or an objective magnification."""

    mpp: float | None = None
    magnification: float | None = None

    def __post_init__(self) -> None:
        require(self.mpp is None or self.magnification is None, "give either mpp or magnification, not both",
                "mpp", "magnification")
        require_positive("mpp", self.mpp)
        require_positive("magnification", self.magnification)

    def describe(self) -> str:
        if self.mpp is not None:
            return f"{self.mpp:g} µm/px"
        if self.magnification is not None:
            return f"{self.magnification:g}x"
        return "level 0"


class Slide(ABC):
    """A pyramidal slide image read by level-0 coordinates.

    Subclasses fill the metadata attributes in ``__init__`` and implement :meth:`_read_level`.
    """

    backend: str = ""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.vendor: str | None = None
        self.level_dimensions: tuple[tuple[int, int], ...] = ()
        self.level_downsamples: tuple[float, ...] = ()
        self.file_mpp: tuple[float, float] | None = None
        self.mpp_override: float | None = None
        self.objective_power: float | None = None
        # Offset of the scanned area that QuPath's OpenSlide reader crops to (openslide.bounds-x/y).
        self.bounds_offset: tuple[int, int] = (0, 0)
        self.associated_images: tuple[str, ...] = ()
        self.properties: dict[str, str] = {}

    # -- metadata -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def stem(self) -> str:
        return slide_stem(self.path)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def mpp(self) -> tuple[float, float] | None:
        """Level-0 (mpp_x, mpp_y) in µm/px: ``slide_mpp`` (the override) when given, else the file's value."""
        if self.mpp_override is not None:
            return (self.mpp_override, self.mpp_override)
        return self.file_mpp

    def require_mpp(self) -> float:
        """Mean level-0 µm/px, or :class:`MissingMppError` naming the ``slide_mpp`` override."""
        mpp = self.mpp
        if mpp is None:
            raise naming(MissingMppError(
                f"{self.name}: the slide records no pixel size (mpp); "
                "give it with slide_mpp (e.g. 0.25 µm/px for 40x, 0.5 for 20x)"
            ), "slide_mpp")
        return (mpp[0] + mpp[1]) / 2.0

    def downsample_for(self, resolution: Resolution, remedy: str = COARSER_OPTION) -> float:
        """Level-0 pixels per working pixel for ``resolution``; ``remedy`` ends the message when it
        is finer than level 0 (what the command's user can change)."""
        if resolution.mpp is not None:
            ds = resolution.mpp / self.require_mpp()
        elif resolution.magnification is not None:
            if self.objective_power:
                ds = self.objective_power / resolution.magnification
            elif self.mpp is not None:
                # Without a recorded objective, use the usual scanner convention 10x ~ 1 µm/px.
                ds = (10.0 / resolution.magnification) / self.require_mpp()
            else:
                raise naming(MissingMppError(
                    f"{self.name}: the slide records neither objective power nor pixel size; "
                    "give slide_mpp, or choose the resolution with mpp"
                ), "slide_mpp", "mpp")
        else:
            ds = 1.0
        if ds < 1.0 / _UPSAMPLE_TOLERANCE:
            finest = f"{self.mpp[0]:.4g} µm/px" if self.mpp else "level 0"
            raise naming(SlideError(
                f"{self.name}: {resolution.describe()} is finer than the slide's level 0 "
                f"({finest}); {remedy}"
            ), "mpp", "magnification")
        # Within the tolerance, read level 0 as is rather than resample by a few percent.
        return max(ds, 1.0)

    def info(self) -> dict[str, Any]:
        """Metadata as one JSON-ready dict (what ``wsi-amr info --json`` prints)."""
        mpp = self.mpp
        return {
            "path": str(self.path),
            "backend": self.backend,
            "vendor": self.vendor,
            "width": self.dimensions[0],
            "height": self.dimensions[1],
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "downsamples": [round(d, 6) for d in self.level_downsamples],
            "mpp_x": mpp[0] if mpp else None,
            "mpp_y": mpp[1] if mpp else None,
            "mpp_source": "--slide-mpp" if self.mpp_override is not None else ("file" if mpp else None),
            "objective_power": self.objective_power,
            "bounds_offset": list(self.bounds_offset),
            "associated_images": list(self.associated_images),
        }

    # -- pixels ---------------------------------------------------------------------------
    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (no upsampling)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * 1.001:
                best = i
        return best

    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) from ``level``, top-left at level-0 (x, y).

        Areas outside the image come back white, as an empty glass slide would.
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range 0..{self.level_count - 1}")
        if width <= 0 or height <= 0:
            return np.full((max(height, 0), max(width, 0), 3), 255, np.uint8)
        return self._read_level(level, int(x), int(y), int(width), int(height))

    def read_region(
        self, x: float, y: float, width: int, height: int, downsample: float = 1.0
    ) -> np.ndarray:
        """RGB uint8 (height, width, 3) of the level-0 box at (x, y) sized width*downsample.

        Reads from the best pyramid level and resizes the rest of the way (area interpolation).
        ``downsample`` is level-0 pixels per output pixel; see :meth:`downsample_for`.
        """
        level = self.best_level_for_downsample(downsample)
        level_ds = self.level_downsamples[level]
        x0, y0 = int(math.floor(x)), int(math.floor(y))
        if abs(level_ds - downsample) < 1e-6 * max(1.0, downsample):
            return self.read_level(level, x0, y0, width, height)
        scale = downsample / level_ds
        lw = max(1, int(math.ceil(width * scale)))
        lh = max(1, int(math.ceil(height * scale)))
        region = self.read_level(level, x0, y0, lw, lh)
        interp = cv2.INTER_AREA if scale >= 1 else cv2.INTER_LINEAR
        return cv2.resize(region, (width, height), interpolation=interp)

    def thumbnail(self, max_size: int = 2048) -> tuple[np.ndarray, float]:
        """Whole-slide RGB image whose longer side is at most ``max_size``; and its downsample."""
        w, h = self.dimensions
        ds = max(1.0, max(w, h) / max_size)
        tw, th = max(1, int(round(w / ds))), max(1, int(round(h / ds)))
        ds_x, ds_y = w / tw, h / th
        return self.read_region(0, 0, tw, th, max(ds_x, ds_y)), max(ds_x, ds_y)

    @abstractmethod
    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027 - optional override
        pass

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"{type(self).__name__}({str(self.path)!r}, {w}x{h}, levels={self.level_count})"


def slide_stem(path: str | Path) -> str:
    """The slide's name without its slide extension (``a.ome.tif`` -> ``a``)."""
    name = Path(path).name
    lower = name.lower()
    for ext in sorted(SLIDE_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


# ---------------------------------------------------------------------------------------------
# OpenSlide backend
# ---------------------------------------------------------------------------------------------
class OpenSlideSlide(Slide):
    """Vendor formats through OpenSlide."""

    backend = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        super().__init__(path)
        self._osr = openslide.OpenSlide(str(path))
        props = dict(self._osr.properties)
        self.properties = props
        self.vendor = props.get(openslide.PROPERTY_NAME_VENDOR)
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._osr.level_dimensions)  # type: ignore[misc]
        self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        self.file_mpp = _openslide_mpp(props)
        self.objective_power = _positive_float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        self.bounds_offset = (
            int(_positive_float(props.get(openslide.PROPERTY_NAME_BOUNDS_X)) or 0),
            int(_positive_float(props.get(openslide.PROPERTY_NAME_BOUNDS_Y)) or 0),
        )
        self.associated_images = tuple(sorted(self._osr.associated_images))
        self._direct: TiffSlide | None = None
        self._direct_levels: frozenset[int] = frozenset()
        if self.vendor in _DIRECT_VENDORS:
            self._enable_direct_reads()

    def _enable_direct_reads(self) -> None:
        """Decode TIFF tiles ourselves where that gives OpenSlide's pixels exactly.

        OpenSlide composites every read through a paint path that costs ~17 ns a pixel even when
        the tile is cached; decoding the file's own tiles (cached, tifffile + imagecodecs) is ~4x
        faster on 512-px JPEG tiles. Used only for levels with an exact integer downsample and
        large tiles, and only after a test read matches OpenSlide's pixel for pixel.
        """
        try:
            direct = TiffSlide(self.path)
        except Exception:
            return
        if direct.level_dimensions != self.level_dimensions:
            direct.close()
            return
        w0, h0 = self.dimensions
        levels = set()
        for i, (w, h) in enumerate(self.level_dimensions):
            page = direct._levels[i][0] if len(direct._levels[i]) == 1 else None
            ds = round(self.level_downsamples[i])
            if page is None or not page.is_tiled or min(page.tilewidth, page.tilelength) < _DIRECT_MIN_TILE:
                continue
            if w * ds == w0 and h * ds == h0 and abs(self.level_downsamples[i] - ds) < 1e-9:
                levels.add(i)
        if 0 not in levels:
            direct.close()
            return
        try:
            x, y = (w0 // 2) & ~63, (h0 // 2) & ~63
            probe = min(128, w0 - x, h0 - y)
            same = np.array_equal(
                direct.read_level(0, x, y, probe, probe), self._read_openslide(0, x, y, probe, probe)
            )
        except Exception:
            same = False
        if not same:
            direct.close()
            return
        self._direct, self._direct_levels = direct, frozenset(levels)

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        if self._direct is not None and level in self._direct_levels:
            ds = round(self.level_downsamples[level])
            if x % ds == 0 and y % ds == 0:
                return self._direct.read_level(level, x, y, width, height)
        return self._read_openslide(level, x, y, width, height)

    def _read_openslide(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        if _RAW_READ is None:
            return self._read_level_pil(level, x, y, width, height)
        # Straight into a numpy buffer: premultiplied ARGB words, B,G,R,A bytes on little-endian.
        # Skips openslide-python's PIL round trip, which costs as much as a quarter of a read.
        buf = np.empty((height, width), np.uint32)
        _RAW_READ(self._osr._osr, buf.ctypes.data_as(_UINT32_P), x, y, level, width, height)
        bgra = buf.view(np.uint8).reshape(height, width, 4)
        rgb = cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGB)
        if buf.min() < 0xFF000000:
            # Transparent outside the scanned area: composite the premultiplied colour onto white.
            rgb += (255 - bgra[..., 3])[..., None]
        return rgb

    def _read_level_pil(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        rgba = np.asarray(self._osr.read_region((x, y), level, (width, height)))
        rgb = rgba[..., :3].copy()
        alpha = rgba[..., 3]
        if alpha.min() < 255:
            a = alpha[..., None].astype(np.float32) / 255.0
            rgb = (rgb.astype(np.float32) * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)
        return rgb

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
        self._osr.close()


def _raw_reader() -> Any:
    """openslide_read_region itself, when this openslide-python exposes it on a little-endian host."""
    if sys.byteorder != "little":
        return None
    try:
        from openslide import lowlevel

        return lowlevel._read_region
    except (ImportError, AttributeError):
        return None


_RAW_READ = _raw_reader()
# TIFF-based formats whose levels are plain tiled TIFF pages, eligible for direct tile decoding.
_DIRECT_VENDORS = frozenset({"generic-tiff", "aperio"})
_DIRECT_MIN_TILE = 256
_UINT32_P = ctypes.POINTER(ctypes.c_uint32)


def _positive_float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _openslide_mpp(props: dict[str, str]) -> tuple[float, float] | None:
    mx = _positive_float(props.get("openslide.mpp-x"))
    my = _positive_float(props.get("openslide.mpp-y"))
    if mx and my:
        return (mx, my)
    # Generic TIFFs: OpenSlide exposes the resolution tags even when it sets no mpp.
    return _mpp_from_resolution(
        props.get("tiff.XResolution"), props.get("tiff.YResolution"), props.get("tiff.ResolutionUnit")
    )


def _mpp_from_resolution(xres: Any, yres: Any, unit: Any) -> tuple[float, float] | None:
    """µm/px from TIFF resolution tags (pixels per unit); None when absent or unit-less."""
    per_um = {"centimeter": 1e4, "inch": 25400.0, "3": 1e4, "2": 25400.0}
    unit_name = str(unit).lower().split(".")[-1] if unit is not None else ""
    factor = per_um.get(unit_name)
    rx, ry = _positive_float(xres), _positive_float(yres if yres is not None else xres)
    if factor is None or rx is None or ry is None:
        return None
    return (factor / rx, factor / ry)


# ---------------------------------------------------------------------------------------------
# tifffile backend
# ---------------------------------------------------------------------------------------------
class TiffSlide(Slide):
    """TIFFs OpenSlide refuses (OME-TIFF, plain/stripped TIFF, QPTIFF), decoded chunk by chunk.

    Only the tiles or strips a region touches are read and decoded; recently decoded chunks are
    cached, so a stripped TIFF with one huge strip is decoded once, not per read.
    """

    backend = "tifffile"
    _CACHE_CHUNKS = 128

    def __init__(self, path: Path) -> None:
        import tifffile

        super().__init__(path)
        self._tif = tifffile.TiffFile(str(path))
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        tif = self._tif
        series = _main_series(tif)
        self._channel_colors: list[tuple[int, int, int]] | None = None
        self.vendor = _tiff_vendor(tif)
        # Each level: list of pages (one per channel for planar multi-page series such as QPTIFF).
        self._levels: list[list[Any]] = []
        for lvl in series.levels:
            pages = [p for p in lvl.pages if p is not None]
            axes = lvl.axes
            if "C" in axes and "S" not in axes and len(pages) > 1:
                pages = pages[: lvl.shape[axes.index("C")]]
            else:
                pages = pages[:1]
            self._levels.append(pages)
        dims = []
        for pages in self._levels:
            p = pages[0]
            dims.append((int(p.imagewidth), int(p.imagelength)))
        # Keep only levels that shrink (some files repeat a level).
        keep = [0] + [i for i in range(1, len(dims)) if dims[i][0] < dims[i - 1][0]]
        self._levels = [self._levels[i] for i in keep]
        self.level_dimensions = tuple(dims[i] for i in keep)
        w0 = self.level_dimensions[0][0]
        h0 = self.level_dimensions[0][1]
        self.level_downsamples = tuple(
            ((w0 / w) + (h0 / h)) / 2.0 for (w, h) in self.level_dimensions
        )
        self.file_mpp = _tiff_mpp(tif, self._levels[0][0])
        self.objective_power = _tiff_objective(tif)
        if tif.is_qpi:
            self._channel_colors = _qpi_channel_colors(self._levels[0])
        self.associated_images = tuple(
            s.name.lower() for s in tif.series if s is not series and s.name
        )
        first = self._levels[0][0]
        self.properties = {
            "tiff.ImageDescription": (first.description or "")[:1000],
            "tiff.Software": str(first.software or ""),
        }

    def _chunk(self, level: int, page_index: int, chunk: int) -> np.ndarray:
        key = (level, page_index, chunk)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            page = self._levels[level][page_index]
            fh = self._tif.filehandle
            offset, count = page.dataoffsets[chunk], page.databytecounts[chunk]
            fh.seek(offset)
            data = fh.read(count)
        segment, _, _ = page.decode(data, chunk, jpegtables=page.jpegtables)
        if segment is None:
            raise SlideError(f"{self.name}: chunk {chunk} of level {level} is empty")
        arr = np.asarray(segment)
        arr = arr.reshape(arr.shape[-3:])  # (h, w, samples)
        with self._lock:
            self._cache[key] = arr
            while len(self._cache) > self._CACHE_CHUNKS:
                self._cache.popitem(last=False)
        return arr

    def _read_page(self, level: int, page_index: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        page = self._levels[level][page_index]
        ih, iw = int(page.imagelength), int(page.imagewidth)
        samples = int(page.samplesperpixel)
        out = np.zeros((h, w, samples), dtype=page.dtype)
        if page.is_tiled:
            ch, cw = int(page.tilelength), int(page.tilewidth)
        else:
            ch, cw = int(page.rowsperstrip or ih), iw
            ch = min(ch, ih)
        across = (iw + cw - 1) // cw
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, iw), min(y + h, ih)
        if x0 >= x1 or y0 >= y1:
            return out
        for r in range(y0 // ch, (y1 - 1) // ch + 1):
            for c in range(x0 // cw, (x1 - 1) // cw + 1):
                seg = self._chunk(level, page_index, r * across + c)
                sy, sx = r * ch, c * cw
                ay0, ay1 = max(y0, sy), min(y1, sy + seg.shape[0])
                ax0, ax1 = max(x0, sx), min(x1, sx + seg.shape[1])
                out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = seg[ay0 - sy : ay1 - sy, ax0 - sx : ax1 - sx]
        return out

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        lx, ly = int(math.floor(x / ds)), int(math.floor(y / ds))
        planes = [
            self._read_page(level, i, lx, ly, width, height) for i in range(len(self._levels[level]))
        ]
        data = planes[0] if len(planes) == 1 else np.concatenate(planes, axis=2)
        rgb = self._to_rgb(data)
        # Outside the image: white, like glass (data there was left zero).
        lw, lh = self.level_dimensions[level]
        if lx < 0 or ly < 0 or lx + width > lw or ly + height > lh:
            inside = np.zeros((height, width), bool)
            inside[max(0, -ly) : max(0, lh - ly), max(0, -lx) : max(0, lw - lx)] = True
            rgb[~inside] = 255
        return rgb

    def _to_rgb(self, data: np.ndarray) -> np.ndarray:
        if data.dtype != np.uint8:
            info = np.iinfo(data.dtype) if data.dtype.kind in "ui" else None
            top = float(info.max) if info else float(max(data.max(), 1e-6))
            data = np.clip(data.astype(np.float32) * (255.0 / top), 0, 255).astype(np.uint8)
        n = data.shape[2]
        if self._channel_colors is not None and n == len(self._channel_colors):
            # Fluorescence: add each channel in its display colour, as viewers do.
            colors = np.asarray(self._channel_colors, np.float32) / 255.0  # (C, 3)
            rgb = np.tensordot(data.astype(np.float32), colors, axes=([2], [0]))
            return np.clip(rgb, 0, 255).astype(np.uint8)
        if n >= 3:
            return np.ascontiguousarray(data[..., :3])
        return np.repeat(data[..., :1], 3, axis=2)

    def close(self) -> None:
        self._tif.close()


def _main_series(tif: Any) -> Any:
    series = [s for s in tif.series if s.name.lower() not in ("thumbnail", "label", "macro", "overview")]
    if not series:
        series = list(tif.series)
    # The largest image is the slide; associated images are smaller.
    return max(series, key=lambda s: int(np.prod(s.shape)))


def _tiff_vendor(tif: Any) -> str | None:
    if tif.is_ome:
        return "ome-tiff"
    if tif.is_qpi:
        return "qptiff"
    return "tiff"


def _tiff_mpp(tif: Any, page: Any) -> tuple[float, float] | None:
    if tif.is_ome and tif.ome_metadata:
        mpp = _ome_mpp(tif.ome_metadata)
        if mpp:
            return mpp
    tags = page.tags
    xres, yres, unit = tags.get("XResolution"), tags.get("YResolution"), tags.get("ResolutionUnit")
    if xres is None or unit is None:
        return None

    def ratio(v: Any) -> float | None:
        num, den = v.value if isinstance(v.value, tuple) else (v.value, 1)
        return num / den if den else None

    return _mpp_from_resolution(
        ratio(xres), ratio(yres) if yres is not None else None, getattr(unit.value, "name", unit.value)
    )


_OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}


def _ome_mpp(xml: str) -> tuple[float, float] | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("}Pixels") or el.tag == "Pixels":
            px, py = _positive_float(el.get("PhysicalSizeX")), _positive_float(el.get("PhysicalSizeY"))
            if px is None:
                return None
            fx = _OME_UNITS_UM.get(el.get("PhysicalSizeXUnit", "µm"), 1.0)
            fy = _OME_UNITS_UM.get(el.get("PhysicalSizeYUnit", "µm"), 1.0)
            return (px * fx, (py or px) * fy)
    return None


def _tiff_objective(tif: Any) -> float | None:
    desc = tif.pages[0].description or ""
    m = re.search(r"<Objective>\s*(\d+(?:\.\d+)?)\s*x", desc, re.I) or re.search(
        r'NominalMagnification="(\d+(?:\.\d+)?)"', desc
    )
    return _positive_float(m.group(1)) if m else None


def _qpi_channel_colors(pages: list[Any]) -> list[tuple[int, int, int]] | None:
    colors = []
    for p in pages:
        m = re.search(r"<Color>\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*</Color>", p.description or "")
        if not m:
            return None
        colors.append((int(m.group(1)), int(m.group(2)), int(m.group(3))))
    return colors


# ---------------------------------------------------------------------------------------------
# Opening
# ---------------------------------------------------------------------------------------------
def open_slide(path: str | Path, *, slide_mpp: float | None = None) -> Slide:
    """Open ``path`` with the first backend that can decode it.

    ``slide_mpp`` (µm/px) overrides the pixel size the file records, for slides whose scanner wrote
    none. Raises :class:`SlideError` with one line naming the file and why it cannot be used.
    """
    p = Path(path)
    if not p.exists():
        raise SlideError(f"{p}: no such file")
    if p.is_dir() and p.suffix.lower() not in (".mrxs",):
        raise SlideError(f"{p}: is a folder, not a slide")
    if slide_mpp is not None and not (math.isfinite(slide_mpp) and slide_mpp > 0):
        raise naming(SlideError(f"slide_mpp must be a positive number of µm/px, got {slide_mpp}"), "slide_mpp")
    reasons: list[str] = []
    for backend in (OpenSlideSlide, TiffSlide):
        try:
            slide = backend(p)
        except SlideError:
            raise
        except PermissionError as exc:
            raise SlideError(f"{p}: permission denied ({exc.strerror})") from exc
        except Exception as exc:  # each backend raises its own types
            reasons.append(f"{backend.backend}: {_short(exc)}")
            continue
        try:
            _check_decodes(slide)
        except Exception as exc:
            slide.close()
            reasons.append(f"{backend.backend}: opens but pixels do not decode ({_short(exc)})")
            continue
        slide.mpp_override = slide_mpp
        return slide
    raise SlideError(f"{p}: not a readable slide ({'; '.join(reasons)})")


def _check_decodes(slide: Slide) -> None:
    # One small read at level 0 and one at the coarsest level catch truncated or corrupt files
    # (a bad JPEG marker, an unknown compression) at open time rather than mid-batch.
    w, h = slide.dimensions
    if w <= 0 or h <= 0:
        raise SlideError("image has no pixels")
    slide.read_level(0, 0, 0, min(w, 16), min(h, 16))
    last = slide.level_count - 1
    lw, lh = slide.level_dimensions[last]
    slide.read_level(last, 0, 0, min(lw, 16), min(lh, 16))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
