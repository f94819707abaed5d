"""``wsi-amr classify``: IPS slide classification of one slide, with its attention drawn back.

Per slide: the bag (the slide's tissue patches at the model's patch size and mpp, an image's
covering grid, or the slide's feature file), one streamed pass (:func:`wsi_amr.ips.predict.
predict_bag`: top-M selection and the slide-wide attention of every patch, at most M + I
embeddings and I patch images held), then ``classification.json`` (class probabilities and the
predicted class), ``heatmap.png`` (every patch's attention over the slide's thumbnail, no blur)
and ``attention.geojson`` (every patch, or the ``top`` K, as a QuPath detection square carrying
its attention).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsi_amr.geojson import PathClass, make_box_feature, write_geojson
from wsi_amr.ips.bags import BagError
from wsi_amr.ips.config import ClassifyParams
from wsi_amr.ips.model import load_ips
from wsi_amr.ips.predict import (
    Bag,
    ClassifierCard,
    EncoderError,
    TorchScriptEncoder,
    is_feature_file,
    is_image_file,
    open_feature_bag,
    open_image_bag,
    predict_bag,
    read_rgb,
    slide_bag,
    slide_patch_grid,
)
from wsi_amr.jobs import coarser_model
from wsi_amr.jobs.tissue import OVERLAY_SIDE, load_or_detect, overlay_image
from wsi_amr.outputs import write_json_atomic, write_png_atomic
from wsi_amr.run.task import EmptySlide, JobContext
from wsi_amr.slide import SlideError, open_slide, slide_stem

RESULT_FILE = "classification.json"
HEATMAP_FILE = "heatmap.png"
GEOJSON_FILE = "attention.geojson"
ATTENTION_CLASS = PathClass("Attention", (255, 96, 0))
#: OpenCV colour map of the heatmap: blue (little attention) through green and yellow to red (the most).
COLORMAP = cv2.COLORMAP_JET
TOP_PATCHES = 10  # listed in classification.json


def draw_attention(base: np.ndarray, coords: np.ndarray, size0: float, attention: np.ndarray,
                   downsample: float, alpha: float = 0.5) -> np.ndarray:
    """``base`` (the slide at ``downsample`` level-0 px per px) with every patch (level-0 top-left
    ``coords``, side ``size0``) filled in the colour (:data:`COLORMAP`) of its attention scaled
    over the slide, the lowest blue and the highest red, blended ``alpha`` over the image; no
    blur. Where patches overlap, the higher attention shows."""
    h, w = base.shape[:2]
    heat = np.zeros((h, w), np.float32)
    covered = np.zeros((h, w), bool)
    low, high = (float(attention.min()), float(attention.max())) if len(attention) else (0.0, 0.0)
    rel = (attention - low) / (high - low) if high > low else np.full(len(attention), 0.5)
    x0 = np.clip(np.floor(coords[:, 0] / downsample), 0, w).astype(np.int64)
    y0 = np.clip(np.floor(coords[:, 1] / downsample), 0, h).astype(np.int64)
    x1 = np.clip(np.maximum(x0 + 1, np.ceil((coords[:, 0] + size0) / downsample)), 0, w).astype(np.int64)
    y1 = np.clip(np.maximum(y0 + 1, np.ceil((coords[:, 1] + size0) / downsample)), 0, h).astype(np.int64)
    for i in np.argsort(rel, kind="stable"):  # increasing: the highest is painted last
        heat[y0[i]:y1[i], x0[i]:x1[i]] = rel[i]
        covered[y0[i]:y1[i], x0[i]:x1[i]] = True
    colour = cv2.cvtColor(cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), COLORMAP), cv2.COLOR_BGR2RGB)
    del heat
    # Blended in uint8 by OpenCV: float copies of a 2048-px canvas cost about 160 MiB at the peak.
    blended = cv2.addWeighted(np.ascontiguousarray(base), 1 - alpha, colour, alpha, 0.0)
    out = base.copy()
    np.copyto(out, blended, where=covered[..., None])
    return out


def blank_canvas(coords: np.ndarray, size0: float, max_side: int = OVERLAY_SIDE) -> tuple[np.ndarray, float]:
    """A white image covering every patch (no slide to draw on), and its downsample."""
    extent = coords.max(axis=0) + size0 if len(coords) else np.array([1.0, 1.0])
    ds = max(1.0, float(extent.max()) / max_side)
    w, h = (max(1, int(math.ceil(v / ds))) for v in extent)
    return np.full((h, w, 3), 255, np.uint8), ds


def attention_features(coords: np.ndarray, size0: float, attention: np.ndarray, selected: np.ndarray,
                       offset: tuple[int, int], top: int | None) -> Iterator[dict[str, Any]]:
    """QuPath detections, one square per patch (all, or the ``top`` highest), in level-0 px minus
    ``offset``, highest attention first, with measurements ``Attention`` (slide-normalised: sums to
    1 over all patches), ``Attention / max`` (0-1) and ``Selected`` (1 for the M patches the
    prediction used)."""
    order = np.argsort(-attention, kind="stable")
    if top is not None:
        order = order[:top]
    chosen = np.zeros(len(attention), bool)
    chosen[selected] = True
    top_value = float(attention.max())
    for i in order:
        x, y = float(coords[i, 0]) - offset[0], float(coords[i, 1]) - offset[1]
        a = float(attention[i])
        feature = make_box_feature(x, y, x + size0, y + size0, object_type="detection",
                                   classification=ATTENTION_CLASS,
                                   measurements={"Attention": float(f"{a:.6g}"),
                                                 "Attention / max": round(a / top_value, 6) if top_value > 0 else 0.0,
                                                 "Selected": 1.0 if chosen[i] else 0.0})
        if feature is not None:
            yield feature


@contextlib.contextmanager
def open_for_classify(ctx: JobContext[ClassifyParams], card: ClassifierCard,
                      embed_dim: int) -> Iterator[tuple[Bag, np.ndarray, float]]:
    """The slide's bag and the image its heatmap is drawn on (with that image's downsample)."""
    cp = ctx.params
    path = ctx.slide_path
    features = Path(cp.features) if cp.features else None
    with contextlib.ExitStack() as stack:
        if features is not None or is_feature_file(path):
            file = path if features is None or is_feature_file(path) else features / f"{slide_stem(path)}.h5"
            if not file.exists():
                raise BagError(f"{path.name}: no feature file {file} (features are looked up as <slide stem>.h5)")
            bag = stack.enter_context(open_feature_bag(file, embed_dim, cp.patch_size))
            if bag.patch_level0 is None:
                raise BagError(f"{file}: its coords carry no patch size (patch_size_level0, or patch_size with "
                               "downsample); give the patch side in level-0 px with --patch-size")
            if is_feature_file(path):
                base, ds = blank_canvas(bag.coords, bag.patch_level0)
            elif is_image_file(path):
                base, f = overlay_image(read_rgb(path))
                ds = 1.0 / f
            else:
                slide = stack.enter_context(open_slide(path, slide_mpp=ctx.slide_mpp))
                bag.offset = (int(slide.bounds_offset[0]), int(slide.bounds_offset[1]))
                base, ds = slide.thumbnail(OVERLAY_SIDE)
            yield bag, base, ds
            return
        patch = card.require_patching(path)
        mpp = card.mpp
        assert mpp is not None  # require_patching checked it
        if is_image_file(path):
            image = read_rgb(path)
            bag = open_image_bag(path, patch, image)
            base, f = overlay_image(image)
            yield bag, base, 1.0 / f
            return
        slide = stack.enter_context(open_slide(path, slide_mpp=ctx.slide_mpp))
        tm = load_or_detect(ctx, slide, cp.tissue)
        coords, ds = slide_patch_grid(slide, patch, mpp, tm, card.min_tissue,
                                      remedy=coarser_model("classify", mpp, "reads patches"))
        base, base_ds = slide.thumbnail(OVERLAY_SIDE)
        yield slide_bag(slide, coords, patch, ds), base, base_ds


def run(ctx: JobContext[ClassifyParams]) -> dict[str, Any]:
    import torch

    from wsi_amr.devices import resolve_device

    t_start = time.perf_counter()
    cp = ctx.params
    torch.set_num_threads(max(1, ctx.threads))
    device = resolve_device(cp.device)
    model, cfg, extra = load_ips(cp.model, device)
    card = ClassifierCard.from_extra(extra, cfg, Path(cp.model))
    try:
        encoder = TorchScriptEncoder(cp.encoder, device) if cp.encoder else None
        with open_for_classify(ctx, card, cfg.embed_dim) as (bag, base, base_ds):
            outputs = {"classification": RESULT_FILE, "heatmap": HEATMAP_FILE, "geojson": GEOJSON_FILE}
            if len(bag) == 0:
                raise EmptySlide(f"{ctx.slide_path.name}: no patch with tissue >= {card.min_tissue} at "
                                 f"{card.patch_size} px, {card.mpp} µm/px; nothing to classify", {})
            memory, chunk = cp.memory or cfg.memory, cp.chunk or cfg.chunk
            ctx.progress(0, 1)
            pred = predict_bag(model, bag.rows, memory=memory, chunk=chunk, encoder=encoder, attention=True)
            ctx.progress(1, 1)
            assert pred.attention is not None and bag.patch_level0 is not None
            k = int(np.argmax(pred.probabilities))
            names = card.class_names
            probabilities = {n: round(float(p), 6) for n, p in zip(names, pred.probabilities)}
            ranked = pred.selected[np.argsort(-pred.attention[pred.selected], kind="stable")]
            result = {
                "slide": str(ctx.slide_path), "stem": slide_stem(ctx.slide_path), "classes": names,
                "probabilities": probabilities, "predicted": names[k], "predicted_index": k,
                "patches": pred.patches, "selected": len(pred.selected), "memory": memory, "chunk": chunk,
                "patch_size_level0": round(float(bag.patch_level0), 3), "input": bag.kind,
                "model": {"path": cp.model, "sha256": cp.model_sha256},
                "encoder": {"path": cp.encoder, "sha256": encoder.sha256} if encoder is not None else None,
                "top_patches": [{"x": int(bag.coords[i, 0]), "y": int(bag.coords[i, 1]),
                                 "attention": float(f"{pred.attention[i]:.6g}")} for i in ranked[:TOP_PATCHES]],
            }
            write_json_atomic(ctx.out_dir / RESULT_FILE, result)
            t0 = time.perf_counter()
            write_png_atomic(ctx.out_dir / HEATMAP_FILE,
                             draw_attention(base, bag.coords, bag.patch_level0, pred.attention, base_ds))
            t1 = time.perf_counter()
            report = write_geojson(ctx.out_dir / GEOJSON_FILE,
                                   attention_features(bag.coords, bag.patch_level0, pred.attention, pred.selected,
                                                      bag.offset, cp.top))
            seconds = {**pred.seconds, "heatmap": t1 - t0, "geojson": time.perf_counter() - t1}
    except (BagError, EncoderError) as exc:
        raise SlideError(str(exc)) from None
    if encoder is not None and card.encoder.get("sha256") not in (None, encoder.sha256):
        ctx.warn(f"{Path(str(cp.encoder)).name} is not the encoder file the model was trained with (SHA-256 differs)")
    stats = {
        "predicted": names[k], "probabilities": probabilities, "patches": pred.patches,
        "selected": len(pred.selected), "memory": memory, "chunk": chunk, "detections": report.written,
        "peak_embeddings": pred.peak_embeddings,
        **{f"seconds_{part}": round(v, 3) for part, v in seconds.items()},
        "seconds_total": round(time.perf_counter() - t_start, 3),
    }
    slide_info = {"path": str(ctx.slide_path)}
    return {"outputs": outputs, "stats": stats, "slide": slide_info}
