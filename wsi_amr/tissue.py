"""Tissue detection on a low-resolution image of the slide.

The cheap default the field agrees on: saturation (brightfield) or brightness (fluorescence) of a
thumbnail, median blur, an Otsu threshold with a floor, morphological closing, then small objects
and small holes removed by their area in µm². Pure functions on arrays; the slide I/O lives in the
command that calls them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import cv2
import numpy as np

from wsi_amr.params import from_fields, require, require_one_of, require_positive
from wsi_amr.slide import Slide

Modality = Literal["auto", "brightfield", "fluorescence"]

# Pixel size assumed for area filters when a slide records none (a 20x scan).
ASSUMED_MPP = 0.5


@dataclass(frozen=True)
class TissueParams:
    """Tissue detection settings. Areas in µm², lengths in µm, thresholds on a 0-255 scale."""

    modality: Modality = "auto"
    threshold: float | None = None  # None: Otsu, clipped to [min_threshold, max_threshold]
    min_threshold: float = 12.0
    # Otsu assumes two populations; on an image that is all tissue (or all glass) it splits noise.
    # Clipping keeps it sensible: glass is below ~10 saturation. The cap is low because Otsu on a
    # slide with much well-stained tissue lands between pale and dark tissue (40-60), not between
    # glass and tissue, and drops pale regions whole (faint H&E, IHC counterstain; docs/benchmarks.md,
    # "Tissue detection threshold").
    max_threshold: float = 15.0
    detection_mpp: float = 8.0  # µm/px of the image detection runs on
    blur_um: float = 40.0  # median blur kernel width
    close_um: float = 50.0  # closing (fills gaps between tissue fragments)
    min_area_um2: float = 5_000.0  # drop tissue pieces smaller than this
    min_hole_um2: float = 5_000.0  # fill holes smaller than this

    def __post_init__(self) -> None:
        require_one_of("modality", self.modality, ("auto", "brightfield", "fluorescence"))
        require(self.threshold is None or 0 <= self.threshold <= 255,
                f"threshold must be between 0 and 255, got {self.threshold}", "threshold")
        for name in ("min_area_um2", "min_hole_um2"):
            value = getattr(self, name)
            require(value >= 0, f"{name} must not be negative, got {value}", name)
        for name in ("detection_mpp", "blur_um"):
            require_positive(name, getattr(self, name))
        require(self.close_um >= 0, f"close_um must not be negative, got {self.close_um}", "close_um")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TissueParams:
        return from_fields(cls, data)


def is_fluorescence(rgb: np.ndarray) -> bool:
    """True when the image looks like a dark-background (fluorescence) slide."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return float(np.median(grey)) < 100.0


def tissue_signal(rgb: np.ndarray, fluorescence: bool) -> np.ndarray:
    """The per-pixel tissue evidence (uint8): saturation for stained slides, brightness for fluorescence."""
    if fluorescence:
        return rgb.max(axis=2).astype(np.uint8)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat = hsv[..., 1]
    # Very dark pixels (black ink, out-of-focus debris) read as saturated noise: keep them as tissue
    # only when they are not near-black.
    return np.where(hsv[..., 2] < 25, 0, sat).astype(np.uint8)


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 == 1 else k + 1


def detect_tissue(
    rgb: np.ndarray, mpp: float, params: TissueParams = TissueParams()
) -> tuple[np.ndarray, dict[str, float | bool]]:
    """Boolean tissue mask of ``rgb`` (an image at ``mpp`` µm/px) and what was decided.

    Returns the mask (same height and width as ``rgb``) and a dict with the threshold used and
    whether the fluorescence test was applied.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError("detect_tissue expects an RGB uint8 image")
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be positive, got {mpp}")
    fluo = params.modality == "fluorescence" or (params.modality == "auto" and is_fluorescence(rgb))
    signal = tissue_signal(rgb, fluo)
    blur = _odd(params.blur_um / mpp)
    if blur > 1 and min(signal.shape) > blur:
        signal = cv2.medianBlur(signal, min(blur, 255))
    if params.threshold is not None:
        thr = float(params.threshold)
    else:
        otsu, _ = cv2.threshold(signal, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        thr = min(max(float(otsu), params.min_threshold), params.max_threshold)
    mask = signal > thr
    close = _odd(params.close_um / mpp)
    if close > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (close, close))
        # Pad so closing does not glue tissue to the image border.
        pad = close
        padded = cv2.copyMakeBorder(mask.astype(np.uint8), pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
        padded = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)
        mask = padded[pad:-pad, pad:-pad].astype(bool)
    px_area = mpp * mpp
    mask = remove_small_objects(mask, params.min_area_um2 / px_area)
    mask = ~remove_small_objects(~mask, params.min_hole_um2 / px_area, keep_border=True)
    return mask, {"threshold": thr, "fluorescence": fluo, "blur_px": blur, "close_px": close}


def remove_small_objects(mask: np.ndarray, min_pixels: float, keep_border: bool = False) -> np.ndarray:
    """``mask`` without 8-connected components smaller than ``min_pixels``.

    With ``keep_border`` components touching the image border are kept whatever their size (used
    to fill holes without filling the background around the tissue).
    """
    if min_pixels <= 1 or not mask.any():
        return mask.copy()
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_pixels
    if keep_border:
        h, w = mask.shape
        x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
        bw, bh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
        keep |= (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    keep[0] = False
    return keep[labels]


def tissue_fraction(mask: np.ndarray) -> float:
    """Fraction of pixels that are tissue."""
    return float(mask.mean()) if mask.size else 0.0


# Longest side of the image tissue is detected on; bounds memory and time on huge slides.
MAX_DETECTION_SIDE = 4096


@dataclass
class TissueMap:
    """A tissue mask and where it sits: ``downsample`` level-0 px per mask px."""

    mask: np.ndarray
    image: np.ndarray  # the RGB image detection ran on
    downsample: float
    mpp: float  # µm/px of the mask (assumed when the slide records none)
    info: dict[str, Any]


def detect_slide_tissue(slide: Slide, params: TissueParams) -> TissueMap:
    """Run tissue detection on a low-resolution read of the whole slide."""
    w, h = slide.dimensions
    assumed = slide.mpp is None
    mpp0 = ASSUMED_MPP if assumed else slide.require_mpp()
    ds = max(1.0, params.detection_mpp / mpp0, max(w, h) / MAX_DETECTION_SIDE)
    tw, th = max(1, int(round(w / ds))), max(1, int(round(h / ds)))
    ds = max(w / tw, h / th)
    rgb = slide.read_region(0, 0, tw, th, ds)
    mpp = mpp0 * ds
    mask, info = detect_tissue(rgb, mpp, params)
    info["mpp_assumed"] = assumed
    return TissueMap(mask, rgb, ds, mpp, info)
