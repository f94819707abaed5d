"""Segment an image or a slide window with a segmentation model: for the token segmenter,
quadtree (or uniform) leaves, attention in squares at shifted offsets; for the U-Net, every pixel.
:func:`window_predictor` gives either behind one interface (:class:`WindowPredictor`), so the
segment job, validation and the benchmarks run any architecture the same way. Never imports the
trainer."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from wsi_amr.quadtree import Leaves, QuadtreeParams, build_quadtree, params_edge_map, uniform_leaves, uniform_token_count
from wsi_amr.segmentation.config import MAX_SEQUENCE, PATCHING_MODES
from wsi_amr.segmentation.model import ModelCard, Normalisation, TokenSegmenter
from wsi_amr.segmentation.unet import UNet
from wsi_amr.tokens import detokenise, leaf_coverage, pad_tokens, token_geometry, tokenise


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


# ---------------------------------------------------------------------------------------------
# One window (or whole image) through any architecture
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WindowPlan:
    """What :meth:`WindowPredictor.prepare` found for a window: the token model's leaves (None
    for a model on pixels)."""

    leaves: Leaves | None = None


class WindowPredictor:
    """A model and how it runs on one RGB uint8 window (H, W, 3) at the working mpp.

    :meth:`prepare` is the part that can run ahead on another thread (the token model's
    quadtree), :meth:`predict` the model itself; :meth:`units` counts what the model processed
    (``unit``: tokens or pixels) and what uniform patching would have."""

    unit = "pixels"

    def __init__(self, model: Any, card: ModelCard) -> None:
        self.model = model
        self.card = card
        self.num_classes = int(model.cfg.num_classes)

    def prepare(self, image_rgb: np.ndarray, tissue: np.ndarray | None = None) -> WindowPlan:
        return WindowPlan()

    def units(self, image_rgb: np.ndarray, plan: WindowPlan, tissue: np.ndarray | None = None) -> tuple[int, int]:
        n = int(image_rgb.shape[0] * image_rgb.shape[1])
        return n, n

    def predict(self, image_rgb: np.ndarray, plan: WindowPlan) -> np.ndarray:
        """(H, W, K) float32 class probabilities, summing to one per pixel."""
        raise NotImplementedError

    def image(self, image_rgb: np.ndarray) -> np.ndarray:
        """A whole image's (H, W, K) float32 class probabilities."""
        return self.predict(image_rgb, self.prepare(image_rgb))


class TokenWindows(WindowPredictor):
    """The token segmenter: leaves (the card's quadtree, or uniform), then :func:`predict_leaves`
    with attention in ``context``-px squares at ``shifts`` (None: the whole window at once)."""

    unit = "tokens"

    def __init__(self, model: TokenSegmenter, card: ModelCard, patching: str | None = None,
                 context: int | None = None, shifts: Sequence[int] = (0,), max_sequence: int = MAX_SEQUENCE) -> None:
        super().__init__(model, card)
        self.params, mode = patching_from_card(card)
        self.patching = patching or mode
        if self.patching not in PATCHING_MODES:
            raise ValueError(f"patching must be adaptive or uniform, not {self.patching!r}")
        self.context = context or None
        self.shifts = tuple(shifts) if self.context else (0,)
        self.max_sequence = max_sequence

    def prepare(self, image_rgb: np.ndarray, tissue: np.ndarray | None = None) -> WindowPlan:
        return WindowPlan(make_leaves(image_rgb, self.params, self.patching, tissue))

    def units(self, image_rgb: np.ndarray, plan: WindowPlan, tissue: np.ndarray | None = None) -> tuple[int, int]:
        leaves = plan.leaves
        n = len(leaves) if leaves is not None else 0
        if self.patching != "adaptive":
            return n, n
        shape = image_rgb.shape[:2] if tissue is None else tissue.shape
        return n, uniform_token_count(shape, self.params.min_size, tissue)

    def predict(self, image_rgb: np.ndarray, plan: WindowPlan) -> np.ndarray:
        leaves = plan.leaves if plan.leaves is not None else self.prepare(image_rgb).leaves
        assert leaves is not None
        return predict_leaves(self.model, self.card, image_rgb, leaves, max_sequence=self.max_sequence,
                              relative_to=self.params.max_size, context=self.context, shifts=self.shifts)


class UNetWindows(WindowPredictor):
    """The U-Net on every pixel of the window (padded inside the model to its multiple)."""

    @torch.no_grad()
    def predict(self, image_rgb: np.ndarray, plan: WindowPlan) -> np.ndarray:
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
            raise ValueError(f"a window is an RGB uint8 (H, W, 3) image, got {image_rgb.dtype} {image_rgb.shape}")
        model = self.model
        device = next(model.parameters()).device
        norm = Normalisation(**{key: tuple(v) for key, v in self.card.normalisation.items()})
        was_training = model.training
        model.eval()
        try:
            x = norm.apply(torch.from_numpy(np.ascontiguousarray(image_rgb)).to(device).float())
            logits = model(x.permute(2, 0, 1)[None])  # (1, K, H, W)
            probs = logits.float().softmax(dim=1)[0].permute(1, 2, 0).cpu().numpy()
        finally:
            model.train(was_training)
        return np.ascontiguousarray(probs, dtype=np.float32)


def window_predictor(model: Any, card: ModelCard, *, patching: str | None = None, context: int | None = None,
                     shifts: Sequence[int] = (0,), max_sequence: int = MAX_SEQUENCE) -> WindowPredictor:
    """How ``model`` (any architecture :func:`~wsi_amr.segmentation.model.load_checkpoint` builds)
    runs on a window. ``patching``, ``context``, ``shifts`` and ``max_sequence`` are the token
    model's (see :func:`predict_leaves`); a U-Net has none of them."""
    if isinstance(model, UNet):
        return UNetWindows(model, card)
    if isinstance(model, TokenSegmenter):
        return TokenWindows(model, card, patching, context, shifts, max_sequence)
    raise TypeError(f"no window predictor for {type(model).__name__}")
