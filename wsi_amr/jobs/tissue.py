from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from shapely import clip_by_rect

from wsi_amr.geojson import PathClass, make_feature, write_geojson
from wsi_amr.outputs import write_png_atomic
from wsi_amr.polygons import mask_to_polygons, polygonal_parts
from wsi_amr.run.manifest import is_current_step
from wsi_amr.run.task import EmptySlide, JobContext
from wsi_amr.slide import Slide, open_slide
from wsi_amr.tissue import ASSUMED_MPP, TissueMap, TissueParams, detect_slide_tissue, tissue_fraction

TISSUE_CLASS = PathClass("Tissue", (0, 200, 0))
MASK_FILE = "tissue_mask.png"
OVERLAY_SIDE = 2048


def load_or_detect(ctx: JobContext[Any], slide: Slide, params: TissueParams) -> TissueMap:
    """Reuse the mask ``wsi-amr tissue`` wrote for this slide when it is current, else detect."""
    if is_current_step(ctx, "tissue", params.as_dict()):
        path = ctx.out_dir / MASK_FILE
        mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if mask is not None:
            w, h = slide.dimensions
            ds = max(w / mask.shape[1], h / mask.shape[0])
            rgb = slide.read_region(0, 0, mask.shape[1], mask.shape[0], ds)
            mpp = (slide.require_mpp() if slide.mpp else ASSUMED_MPP) * ds
            return TissueMap(mask > 0, rgb, ds, mpp, {"reused": True})
    return detect_slide_tissue(slide, params)


def overlay_image(rgb: np.ndarray, max_side: int = OVERLAY_SIDE) -> tuple[np.ndarray, float]:
    """A copy of ``rgb`` no larger than ``max_side``, and the factor it was shrunk by."""
    h, w = rgb.shape[:2]
    f = min(1.0, max_side / max(h, w))
    if f < 1.0:
        rgb = cv2.resize(rgb, (max(1, int(w * f)), max(1, int(h * f))), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb.copy()), f


def draw_mask_outline(rgb: np.ndarray, mask: np.ndarray, color=(0, 200, 0)) -> np.ndarray:
    """``rgb`` with the outline of ``mask`` (resized to it) drawn on top."""
    h, w = rgb.shape[:2]
    m = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    out = rgb.copy()
    cv2.drawContours(out, contours, -1, color, thickness=max(1, max(h, w) // 600))
    return out


def run(ctx: JobContext[TissueParams]) -> dict[str, Any]:
    params = ctx.params
    with open_slide(ctx.slide_path, slide_mpp=ctx.slide_mpp) as slide:
        tm = detect_slide_tissue(slide, params)
        if tm.info.get("mpp_assumed"):
            ctx.warn(f"{slide.name}: no mpp recorded; area filters assume {ASSUMED_MPP} µm/px (set --slide-mpp)")
        bx, by = slide.bounds_offset
        polys = mask_to_polygons(
            tm.mask, scale=tm.downsample, offset=(-bx, -by), simplify=tm.downsample * 0.5
        )
        # The low-resolution read may run a fraction of a pixel past the slide edge: clip to it.
        w, h = slide.dimensions
        polys = [p for q in polys for p in polygonal_parts(clip_by_rect(q, -bx, -by, w - bx, h - by))]
        px_um2 = (tm.mpp / tm.downsample) ** 2
        features = [
            make_feature(p, object_type="annotation", classification=TISSUE_CLASS,
                         measurements={"Area µm^2": round(p.area * px_um2, 1)})
            for p in polys
        ]
        report = write_geojson(ctx.out_dir / "tissue.geojson", [f for f in features if f is not None])
        write_png_atomic(ctx.out_dir / MASK_FILE, tm.mask.astype(np.uint8) * 255)
        thumb, _ = overlay_image(tm.image)
        write_png_atomic(ctx.out_dir / "tissue.png", draw_mask_outline(thumb, tm.mask))
        stats = {
            "tissue_fraction": round(tissue_fraction(tm.mask), 5),
            "regions": report.written,
            "dropped_invalid": report.dropped,
            "mask_downsample": round(tm.downsample, 6),
            "threshold": tm.info["threshold"],
            "fluorescence": tm.info["fluorescence"],
        }
        outputs = {"geojson": "tissue.geojson", "mask": MASK_FILE, "overlay": "tissue.png"}
        if report.written == 0:
            raise EmptySlide(f"{slide.name}: no tissue found; wrote an empty tissue.geojson", outputs, stats)
        return {"outputs": outputs, "stats": stats, "slide": slide.info()}
