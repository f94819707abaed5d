"""``wsi-amr segment``: whole-slide segmentation to QuPath GeoJSON with a segmentation model.

Per slide: tissue (reused when current), then windows at the model's working mpp (``window`` px,
``overlap`` px shared with each neighbour) in raster order, those without tissue skipped; per window
the model's :class:`~wsi_amr.segmentation.predict.WindowPredictor` (the token model: an adaptive
quadtree over its tissue, or uniform leaves, and the model on its tokens; the U-Net: every pixel),
the probabilities blended in the overlaps (:func:`wsi_amr.segmentation.windows.blend_stream`), and
the final blocks outlined on pixel edges and merged across blocks
(:class:`wsi_amr.segmentation.windows.SeamlessPolygons`). The next window is read, and prepared
(its quadtree built), on a second thread while the model works, and finished blocks are outlined
on a third. Memory is bounded by a few windows and one overlap band across the slide's width.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsi_amr.geojson import PathClass, make_feature, write_geojson
from wsi_amr.jobs import coarser_model
from wsi_amr.jobs.tissue import load_or_detect
from wsi_amr.labeltiff import LabelTiff
from wsi_amr.outputs import write_png_atomic
from wsi_amr.run.resources import background_thread, opencv_threads, trim_heap
from wsi_amr.run.task import EmptySlide, JobContext
from wsi_amr.segmentation.config import SegmentParams
from wsi_amr.segmentation.model import load_checkpoint
from wsi_amr.segmentation.predict import default_shifts, training_context, window_predictor
from wsi_amr.segmentation.windows import SeamlessPolygons, blend_stream, class_map, window_starts
from wsi_amr.slide import Resolution, open_slide
from wsi_amr.tiling import Block, sample_mask
from wsi_amr.tissue import ASSUMED_MPP

OVERLAY_FILE = "overlay.png"
MASK_FILE = "mask.tiff"


def geojson_name(stem: str, gzip: bool) -> str:
    return f"{stem}.geojson" + (".gz" if gzip else "")


def _class_overlay(thumb: np.ndarray, objects: dict[int, list[tuple[Any, float | None]]], colors: list[list[int]],
                   scale: float, offset: tuple[float, float]) -> np.ndarray:
    """The thumbnail with each object filled (translucent) and outlined in its class colour.
    ``scale``: thumbnail px per output coordinate unit; ``offset`` added to coordinates first."""
    fill = thumb.copy()
    lines = []
    for label, items in objects.items():
        color = tuple(int(c) for c in colors[label]) if label < len(colors) else (255, 0, 0)
        for poly, _ in items:
            rings = [poly.exterior, *poly.interiors]
            pts = [np.round((np.asarray(r.coords)[:, :2] + offset) * scale).astype(np.int32) for r in rings]
            cv2.fillPoly(fill, [pts[0]], color)
            for hole in pts[1:]:
                cv2.fillPoly(fill, [hole], (0, 0, 0))
            lines.append((pts, color))
    out = cv2.addWeighted(thumb, 0.6, fill, 0.4, 0)
    for pts, color in lines:
        cv2.polylines(out, pts, True, color, 1)
    return out


Objects = dict[int, list[tuple[Any, float | None]]]


def finish_objects(seam: SeamlessPolygons) -> Objects:
    """The seam's objects per class, background dropped: ``{label: [(polygon, mean class
    probability), ...]}`` (simplified and filtered by area as the seam was told)."""
    return {label: items for label, items in seam.finish().items() if label != 0 and items}


def _rgb(color: list[int]) -> tuple[int, int, int]:
    r, g, b = color
    return r, g, b


def write_objects(path: Path, objects: Objects, names: list[str], colors: list[list[int]], object_type: str,
                  px_um2: float):
    """Write ``objects`` as QuPath GeoJSON (``.gz`` by the name): one feature per object with its
    class name and colour, area in µm^2 (``px_um2``: µm^2 per output unit squared) and mean class
    probability. Streams the features; returns the writer's report."""
    def features():
        for label, items in objects.items():
            cls = PathClass(names[label] if label < len(names) else f"class {label}",
                            _rgb(colors[label]) if label < len(colors) else (255, 0, 0))
            for poly, mean_prob in items:
                f = make_feature(poly, object_type=object_type, classification=cls, measurements={
                    "Area µm^2": round(poly.area * px_um2, 2),
                    "Mean probability": None if mean_prob is None else round(mean_prob, 4)})
                if f is not None:
                    yield f

    return write_geojson(path, features())


def run(ctx: JobContext[SegmentParams]) -> dict[str, Any]:
    t_start = time.perf_counter()
    sp = ctx.params
    from wsi_amr.devices import resolve_device

    model, card = load_checkpoint(sp.model)
    model.to(resolve_device(sp.device))
    import torch

    torch.set_num_threads(max(1, ctx.threads))
    # OpenCV's own worker threads would compete with the model's: its work (quadtree edges,
    # outlines) already runs on threads of ours beside the model.
    with opencv_threads(1):
        return _run(ctx, model, card, t_start)


def _run(ctx: JobContext[SegmentParams], model: Any, card: Any, t_start: float) -> dict[str, Any]:  # noqa: C901 - the window stream: read, predict, blend, outline and write in one pass for bounded memory
    sp = ctx.params
    window, overlap = sp.window, sp.overlap
    arch = model.cfg.arch
    context: int | None = None
    shifts = [0]
    if arch == "token":
        # Attention context: squares of the training crop's size by default, the area the model
        # learnt to attend over (one sequence per window drifts from it as windows grow).
        context = sp.context
        if context is None:
            context = training_context(card.training)
        context = context or None  # 0: the whole window is one sequence
        # Square offsets whose probabilities are averaged: by default a second pass moved by half a
        # square (objects cut by a square's border lose).
        shifts = list(sp.shifts) if sp.shifts is not None else default_shifts(context)
        if context and max(shifts) >= context:
            raise ValueError(f"shifts {shifts} must be below the attention square's side ({context} px)")
    # The job knows windows, not architectures: each window is prepared (the token model's
    # quadtree) on the read-ahead thread and predicted on this one.
    predictor = window_predictor(model, card, patching=sp.patching, context=context, shifts=shifts)
    patching = getattr(predictor, "patching", None)
    k = predictor.num_classes
    timing = {"read": 0.0, "tissue": 0.0, "quadtree": 0.0, "model": 0.0, "blend": 0.0, "polygons": 0.0, "write": 0.0}
    tokens = {"uniform": 0, "used": 0}
    cpu = {"quadtree": 0.0}
    with open_slide(ctx.slide_path, slide_mpp=ctx.slide_mpp) as slide:
        t0 = time.perf_counter()
        tm = load_or_detect(ctx, slide, sp.tissue)
        timing["tissue"] += time.perf_counter() - t0
        if slide.mpp is None:
            ctx.warn(f"{slide.name}: no mpp recorded; assuming {ASSUMED_MPP} µm/px (set --slide-mpp)")
        ds = slide.downsample_for(Resolution(mpp=card.mpp), coarser_model("segment", card.mpp))
        w0, h0 = slide.dimensions
        width, height = max(1, int(round(w0 / ds))), max(1, int(round(h0 / ds)))
        mpp0 = slide.mpp or (ASSUMED_MPP, ASSUMED_MPP)
        px_um2 = mpp0[0] * mpp0[1]  # per level-0 px^2
        bx, by = slide.bounds_offset
        # Simplification tolerance (µm) and smallest object (µm^2) in level-0 px.
        seam = SeamlessPolygons(scale=ds, offset=(-float(bx), -float(by)),
                                simplify=sp.simplify_um / float(np.mean(mpp0)),
                                min_area=sp.min_area_um2 / px_um2)
        mask = None
        if sp.mask_tiff:
            mask = LabelTiff(ctx.out_dir / MASK_FILE, width, height, float(np.mean(mpp0)) * ds,
                             classes=list(card.class_names),
                             extra={"downsample": ds, "level0_offset": [-float(bx), -float(by)],
                                    "slide": slide.name})
        order = [Block(x, y, min(window, width - x), min(window, height - y))
                 for y in window_starts(height, window, overlap) for x in window_starts(width, window, overlap)]
        n_windows = len(order)

        def tissue_of(b: Block) -> np.ndarray:
            return sample_mask(tm.mask, tm.downsample, ds, b)

        def read(b: Block) -> tuple[np.ndarray | None, Any, tuple[int, int], float, float]:
            # On the read-ahead thread: the window's pixels and its plan (the quadtree; OpenCV
            # releases the GIL), ready when the model comes to it; with the uniform token count to compare.
            tissue = tissue_of(b)
            if not tissue.any():
                return None, None, (0, 0), 0.0, 0.0
            t = time.perf_counter()
            rgb = slide.read_region(b.x * ds, b.y * ds, b.w, b.h, ds)
            t_read = time.perf_counter() - t
            t, c = time.perf_counter(), time.thread_time()
            plan = predictor.prepare(rgb, tissue)
            cpu["quadtree"] += time.thread_time() - c
            t_tree = time.perf_counter() - t
            return rgb, plan, predictor.units(rgb, plan, tissue), t_read, t_tree

        done = 0
        waited = {"read": 0.0, "outline": 0.0}

        def outline(block: Block, probs: np.ndarray) -> None:
            # On its own thread: tracing is single-threaded numpy/OpenCV/GEOS work that releases
            # the GIL, so it runs beside the model on the next window.
            t = time.perf_counter()
            if block.x == 0 and block.y > 0:  # a new row: the rows above are complete
                seam.flush(block.y)
            # Uncovered pixels are background in probs already (blend_stream sets them so).
            labels = class_map(probs)
            seam.add(block, labels, probs)
            timing["polygons"] += time.perf_counter() - t
            if mask is not None:
                t = time.perf_counter()
                mask.add(block.x, block.y, labels)
                timing["write"] += time.perf_counter() - t

        try:
            with ThreadPoolExecutor(1, thread_name_prefix="read") as reader, \
                    ThreadPoolExecutor(1, thread_name_prefix="outline",
                                       initializer=background_thread) as outliner:
                pending: dict[Block, Future] = {}
                outlines: deque[Future] = deque()
                position = {b: i for i, b in enumerate(order)}

                def predict(b: Block) -> np.ndarray | None:
                    nonlocal done
                    i = position[b]
                    for nb in order[i:i + 2]:  # this window and the next one, read ahead
                        if nb not in pending:
                            pending[nb] = reader.submit(read, nb)
                    t = time.perf_counter()
                    rgb, plan, (n_used, n_uniform), t_read, t_tree = pending.pop(b).result()
                    waited["read"] += time.perf_counter() - t
                    timing["read"] += t_read
                    timing["quadtree"] += t_tree
                    done += 1
                    ctx.progress(done, n_windows)
                    if rgb is None:
                        return None
                    tokens["used"] += n_used
                    tokens["uniform"] += n_uniform
                    t = time.perf_counter()
                    probs = predictor.predict(rgb, plan)
                    timing["model"] += time.perf_counter() - t
                    trim_heap()  # the model's and last window's freed blocks: memory flat over slide size
                    return probs

                t_loop = time.perf_counter()
                for block, probs, _ in blend_stream(width, height, window, overlap, k, predict):
                    outlines.append(outliner.submit(outline, block, probs))
                    while len(outlines) > 2 or (outlines and outlines[0].done()):
                        t = time.perf_counter()
                        outlines.popleft().result()  # raises what the outline raised
                        waited["outline"] += time.perf_counter() - t
                t = time.perf_counter()
                while outlines:
                    outlines.popleft().result()
                waited["outline"] += time.perf_counter() - t
                # Blending: the loop's own time, less what it spent in the model or waiting for
                # reads (with their quadtrees) and outlines.
                timing["blend"] = (time.perf_counter() - t_loop - timing["model"] - waited["read"]
                                   - waited["outline"])
            t = time.perf_counter()
            kept = finish_objects(seam)
            timing["polygons"] += time.perf_counter() - t

            t = time.perf_counter()
            names, colors = card.class_names, card.class_colors
            out_name = geojson_name(slide.stem, sp.gzip)
            report = write_objects(ctx.out_dir / out_name, kept, names, colors, sp.object_type, px_um2)
            thumb, tds = slide.thumbnail(2048)
            overlay = _class_overlay(thumb, kept, colors, 1.0 / tds, (float(bx), float(by)))
            write_png_atomic(ctx.out_dir / OVERLAY_FILE, overlay)
            if mask is not None:
                mask.close()
            timing["write"] += time.perf_counter() - t
        except BaseException:
            if mask is not None:
                mask.abort()
            raise
        info, name = slide.info(), slide.name

    counts = {names[c] if c < len(names) else f"class {c}": len(v) for c, v in kept.items()}
    stats: dict[str, Any] = {
        "objects": report.written,
        "objects_per_class": counts,
        "dropped_invalid": report.dropped,
        "arch": arch,
        "patching": patching,
        # What the model processed: tokens (with uniform patching's count to compare), or pixels.
        **({"tokens": tokens["used"], "uniform_tokens": tokens["uniform"],
            "token_reduction": (round(tokens["uniform"] / tokens["used"], 3)
                                if patching == "adaptive" and tokens["used"] else None)}
           if predictor.unit == "tokens" else {predictor.unit: tokens["used"]}),
        "windows": n_windows,
        "context": context or 0,
        "shifts": shifts if context else [0],
        "mpp": round(float(np.mean(mpp0)) * ds, 6),
        "downsample": round(ds, 6),
        **{f"seconds_{name}": round(v, 3) for name, v in timing.items()},
        # Reading with the quadtree, and outlining, run on threads of their own beside the model:
        # stages overlap, and their sum exceeds the total. waited_*: what the model's thread
        # spent waiting for them.
        "seconds_total": round(time.perf_counter() - t_start, 3),
        "seconds_waited_read": round(waited["read"], 3),
        "cpu_seconds_quadtree": round(cpu["quadtree"], 3),
        "seconds_waited_outline": round(waited["outline"], 3),
    }
    outputs = {"geojson": out_name, "overlay": OVERLAY_FILE}
    if sp.mask_tiff:
        outputs["mask"] = MASK_FILE
    if tokens["used"] == 0:
        raise EmptySlide(f"{name}: no tissue found; wrote an empty {out_name}", outputs, stats)
    stats["model"] = Path(sp.model).name
    return {"outputs": outputs, "stats": stats, "slide": info}
