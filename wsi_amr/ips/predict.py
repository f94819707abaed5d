"""IPS slide classification: bags of patches, patch encoders, and one bag's prediction with the
attention of every patch.

A **bag** is one slide (or image, or feature file) as IPS streams it: indexable rows (RGB patches
or pre-extracted embeddings), the level-0 position of each, and the patch side. Three encoders
turn patch rows into embeddings (DESIGN 4.5):

- the model's built-in :class:`~wsi_amr.ips.SmallCNN` (``encoder="small-cnn"``), trained with it;
- a user's **TorchScript** module (:class:`TorchScriptEncoder`), frozen: ``(N, 3, H, W)`` float
  pixels 0-255, RGB, ``H = W`` = the patch size, to ``(N, D)``; D must be the model's
  ``embed_dim``. Loaded with :func:`torch.jit.load` only: nothing is unpickled;
- none: feature files hold the embeddings already (CLAM/TRIDENT ``features`` + ``coords``).

:func:`predict_bag` streams a bag once: each chunk of ``I`` rows is encoded once, merged into the
top-``M`` memory (:func:`~wsi_amr.ips.model.select_top_m`, the same merge as training's selection) and
scored for the slide-wide attention (:func:`~wsi_amr.ips.model.score_all`), so at most ``M + I``
embeddings and ``I`` patch images are held however large the slide.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wsi_amr import images
from wsi_amr.checkpoint import CheckpointError, file_sha256
from wsi_amr.ips.bags import BagError, FeatureBag, ImagePatches, SlidePatches, covering_grid
from wsi_amr.ips.model import IPSConfig, IPSModel, iter_chunks, score_all, select_top_m
from wsi_amr.params import naming
from wsi_amr.slide import COARSER_OPTION, Resolution, Slide, open_slide, slide_stem
from wsi_amr.tiling import tile_grid

#: Files read as one image each (not as slides): cut into a covering grid of patches at their own
#: pixel size, which is taken to be the working mpp.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
FEATURE_SUFFIX = ".h5"


class EncoderError(ValueError):
    """A TorchScript encoder that cannot be used; one line naming the file and the problem."""


class TorchScriptEncoder:
    """A frozen patch encoder from a TorchScript file: ``(N, 3, H, W)`` float32 holding RGB pixels
    0-255 (the module normalises them itself) -> embeddings ``(N, D)``.

    Export one with ``torch.jit.save(torch.jit.script(model), "encoder.pt")`` (or
    ``torch.jit.trace``). ``sha256`` identifies the file in checkpoints and manifests.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise EncoderError(f"{self.path}: no such encoder file")
        self.device = torch.device(device)
        try:
            with warnings.catch_warnings():
                # torch 2.9+ marks TorchScript deprecated; it is still the pickle-free format asked for.
                warnings.simplefilter("ignore", DeprecationWarning)
                self.module = torch.jit.load(str(self.path), map_location=self.device)
        except (RuntimeError, ValueError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EncoderError(f"{self.path}: not a TorchScript module ({first}); export the encoder with "
                               "torch.jit.save(torch.jit.script(model), path)") from None
        self.module.eval()
        self.sha256 = file_sha256(self.path)

    def __call__(self, patches: Tensor) -> Tensor:
        """Embeddings (N, D) float32 of patches (N, 3, H, W) uint8 or float 0-255, no gradients."""
        with torch.no_grad():
            try:
                out = self.module(patches.to(self.device, torch.float32))
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise EncoderError(f"{self.path}: fails on patches {tuple(patches.shape)} ({first})") from None
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != patches.shape[0]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise EncoderError(f"{self.path}: returns {shape} for {patches.shape[0]} patches; an encoder must "
                               "return one embedding per patch, (N, D)")
        return out.float()

    def width(self, patch: int) -> int:
        """D, from one blank ``patch``-px patch."""
        return int(self(torch.full((1, 3, patch, patch), 255.0)).shape[1])

    def check_width(self, patch: int, embed_dim: int, model_name: str) -> None:
        """EncoderError naming both when the encoder's D is not the model's ``embed_dim``."""
        d = self.width(patch)
        if d != embed_dim:
            raise EncoderError(f"{self.path}: outputs {d}-dimensional embeddings, but {model_name} expects "
                               f"{embed_dim} (its embed_dim)")


# -- what a classifier checkpoint records beside its architecture ---------------------------------


@dataclass(frozen=True)
class ClassifierCard:
    """The ``extra`` of an IPS checkpoint written by ``wsi-amr train classify``: class names, the
    encoder the embeddings come from, and how slides and images were cut into patches.

    ``encoder``: ``{"kind": "small-cnn"}`` (inside the model), ``{"kind": "torchscript", "file",
    "sha256"}`` (a frozen TorchScript file, which ``classify --encoder`` must supply again) or
    ``{"kind": "features"}`` (trained on feature files). ``patch_size`` (px) at ``mpp`` (µm/px),
    tiles kept with tissue fraction at least ``min_tissue``; None for a model trained on features.
    """

    class_names: list[str]
    encoder: dict[str, Any]
    patch_size: int | None = None
    mpp: float | None = None
    min_tissue: float = 0.5
    training: dict[str, Any] = field(default_factory=dict)

    def as_extra(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_extra(cls, extra: dict[str, Any], cfg: IPSConfig, where: Path) -> ClassifierCard:
        """The card of a loaded checkpoint; CheckpointError when it lacks what classification needs."""
        known = {f.name for f in fields(cls)}
        try:
            card = cls(**{k: v for k, v in extra.items() if k in known})
        except TypeError as exc:
            raise CheckpointError(f"{where}: not a classifier from `wsi-amr train classify` ({exc})") from None
        if not isinstance(card.class_names, list) or len(card.class_names) != cfg.num_classes:
            raise CheckpointError(f"{where}: {cfg.num_classes} classes but class_names {card.class_names!r}")
        if not isinstance(card.encoder, dict) or card.encoder.get("kind") not in ("small-cnn", "torchscript", "features"):
            raise CheckpointError(f"{where}: unknown encoder {card.encoder!r}")
        return card

    def require_patching(self, source: Path) -> int:
        """The patch size for cutting ``source`` into patches; BagError for a model that never did."""
        if self.patch_size is None or self.mpp is None:
            raise naming(BagError(f"{source.name}: the model was trained on feature files and has no patch size or mpp; "
                                  "classify its features instead (features, a folder of <stem>.h5)"), "features")
        return int(self.patch_size)


# -- bags ---------------------------------------------------------------------------------------


@dataclass
class Bag:
    """One slide's patches as IPS streams them.

    ``rows``: indexable rows, RGB patches (n, 3, P, P) uint8 (``kind="patches"``) or embeddings
    (n, D) (``kind="features"``). ``coords``: level-0 (x, y) top-left of each row (image px for an
    image). ``patch_level0``: patch side in level-0 px (None when a feature file does not say).
    ``offset``: the slide's bounds offset, subtracted for QuPath. ``size``: level-0 (width,
    height) of the slide or image, when known.
    """

    name: str
    rows: Any
    coords: np.ndarray
    patch_level0: float | None
    kind: str
    offset: tuple[int, int] = (0, 0)
    size: tuple[int, int] | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.coords)

    def close(self) -> None:
        for close in self.closers:
            close()

    def __enter__(self) -> Bag:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def is_image_file(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES)


def is_feature_file(path: Path) -> bool:
    return path.name.lower().endswith(FEATURE_SUFFIX)


def read_rgb(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an image file (:func:`wsi_amr.images.read_rgb`); BagError, as every
    bag reader raises, when it cannot be decoded."""
    try:
        return images.read_rgb(path)
    except images.ImageError as exc:
        raise BagError(str(exc)) from None


def open_feature_bag(path: Path, expected_dim: int | None = None, patch_level0: float | None = None) -> Bag:
    """A feature file as a bag; ``patch_level0`` (e.g. ``--patch-size``) overrides its attributes."""
    fb = FeatureBag(path, expected_dim)
    size0 = patch_level0 if patch_level0 is not None else fb.patch_size_level0()
    return Bag(slide_stem(path), fb.features, fb.coords, size0, "features", closers=[fb.close])


def open_image_bag(path: Path, patch: int, image: np.ndarray | None = None) -> Bag:
    """An image cut into a covering grid of ``patch``-px patches (cut a chunk at a time)."""
    image = read_rgb(path) if image is None else image
    coords = covering_grid(image.shape[1], image.shape[0], patch)
    return Bag(slide_stem(path), ImagePatches(image, coords, patch), coords, float(patch), "patches",
               size=(image.shape[1], image.shape[0]))


def slide_patch_grid(slide: Slide, patch: int, mpp: float, tissue_map: Any, min_tissue: float,
                     remedy: str = COARSER_OPTION) -> tuple[np.ndarray, float]:
    """Level-0 top-left corners of the ``patch``-px patches at ``mpp`` whose tissue fraction is at
    least ``min_tissue`` (the ``wsi-amr tile`` grid, no overlap), and the downsample they are read
    at. ``tissue_map``: a :class:`~wsi_amr.tissue.TissueMap`, or None for every patch.
    ``remedy``: the end of the message when ``mpp`` is finer than the slide's level 0."""
    ds = slide.downsample_for(Resolution(mpp=mpp), remedy)
    w, h = slide.dimensions
    grid, _ = tile_grid(w, h, size=patch, overlap=0, downsample=ds,
                        tissue_mask=None if tissue_map is None else tissue_map.mask,
                        mask_downsample=1.0 if tissue_map is None else tissue_map.downsample,
                        min_tissue=min_tissue)
    return grid.coords, ds


def slide_bag(slide: Slide, coords: np.ndarray, patch: int, downsample: float) -> Bag:
    """Patches of an open slide at ``coords``, read a chunk at a time (the caller closes the slide)."""
    return Bag(slide.stem, SlidePatches(slide, coords, patch, downsample), coords, patch * downsample, "patches",
               offset=(int(slide.bounds_offset[0]), int(slide.bounds_offset[1])), size=slide.dimensions)


@contextlib.contextmanager
def opened_slide_bag(path: Path, patch: int, mpp: float, slide_mpp: float | None,
                     coords: np.ndarray | None, tissue: Callable[[Slide], Any] | None,
                     min_tissue: float) -> Iterator[Bag]:
    """Open ``path`` and yield its patch bag; the grid is ``coords`` when given (cached from an
    earlier opening), else found with ``tissue(slide)`` (None: the whole slide)."""
    with open_slide(path, slide_mpp=slide_mpp) as slide:
        if coords is None:
            coords, ds = slide_patch_grid(slide, patch, mpp, tissue(slide) if tissue else None, min_tissue)
        else:
            ds = slide.downsample_for(Resolution(mpp=mpp))
        yield slide_bag(slide, coords, patch, ds)


# -- streaming a bag through the model ---------------------------------------------------------


def embedder(model: IPSModel, encoder: TorchScriptEncoder | None = None) -> Callable[[Tensor], Tensor]:
    """Chunk rows -> embeddings on the model's device: through ``encoder`` when given, the model's
    own encoder for patches, or as they are for embeddings."""
    p = next(model.parameters())

    def embed(x: Tensor) -> Tensor:
        if encoder is not None:
            if x.ndim != 4:
                raise EncoderError(f"{encoder.path}: an encoder takes patches, got rows of shape {tuple(x.shape)}")
            emb = encoder(x)
            if emb.shape[1] != model.cfg.embed_dim:
                raise EncoderError(f"{encoder.path}: outputs {emb.shape[1]}-dimensional embeddings, the model "
                                   f"expects {model.cfg.embed_dim} (its embed_dim)")
            return emb.to(device=p.device, dtype=p.dtype)
        if x.ndim == 4:
            return model.encode(x.to(p.device))
        return x.to(device=p.device, dtype=p.dtype)

    return embed


@dataclass
class BagPrediction:
    """What :func:`predict_bag` found: class probabilities (K,), the selected rows (M' = min(M, N),
    by decreasing attention within them), and with ``attention=True`` every row's slide-wide
    attention (N,) in row order (sums to 1).

    ``seconds``: wall time by part of the pass: ``read`` (rows fetched: slide reads, patch cutting,
    feature file reads), ``encode`` (the patch encoder; about 0 for embeddings), ``select`` (the
    top-M merges), ``score`` (the slide-wide attention: each chunk's attention logits and the
    final normalisation) and ``aggregate`` (the prediction from the M kept)."""

    probabilities: np.ndarray
    selected: np.ndarray
    selected_attention: np.ndarray
    attention: np.ndarray | None
    patches: int
    peak_embeddings: int
    seconds: dict[str, float] = field(default_factory=dict)


def predict_bag(model: IPSModel, rows: Any, *, memory: int | None = None, chunk: int | None = None,
                encoder: TorchScriptEncoder | None = None, attention: bool = False) -> BagPrediction:
    """Classify one bag in a single pass over its rows, in eval mode without gradients.

    Rows are read ``chunk`` (I) at a time in row order and encoded once; each chunk is merged into
    the memory of the ``memory`` (M) rows attended to most, exactly as
    :func:`~wsi_amr.ips.model.select_top_m` streams (the same function does the merge), and, with
    ``attention``, scored by :func:`~wsi_amr.ips.model.score_all` for the slide-wide attention. The
    model then aggregates the M kept embeddings. A bag of fewer than M rows uses them all, with no
    padding. Holds at most M + I embeddings and I patch images.
    """
    m = model.cfg.memory if memory is None else int(memory)
    i = model.cfg.chunk if chunk is None else int(chunk)
    embed = embedder(model, encoder)
    kept: tuple[Tensor, Tensor] | None = None
    peak = 0
    device = next(model.parameters()).device
    # Kernels on an accelerator run asynchronously: wait for them, or time lands in the wrong part.
    sync: Callable[[], None] = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    seconds = dict.fromkeys(("read", "encode", "select", "score", "aggregate"), 0.0)

    def stream() -> Iterator[tuple[Tensor, Tensor]]:
        nonlocal kept, peak
        chunks = iter_chunks(rows, i)
        while True:
            t0 = time.perf_counter()
            item = next(chunks, None)
            if item is None:
                return
            x, ids = item
            t1 = time.perf_counter()
            emb = embed(x)
            sync()
            t2 = time.perf_counter()
            pieces = [(emb, ids)] if kept is None else [kept, (emb, ids)]
            peak = max(peak, sum(len(p[1]) for p in pieces))
            e, idx, _ = select_top_m(model, pieces, m, chunk=m + i)
            kept = (e, idx)
            sync()
            t3 = time.perf_counter()
            seconds["read"] += t1 - t0
            seconds["encode"] += t2 - t1
            seconds["select"] += t3 - t2
            yield emb, ids

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = None
            t_pass = time.perf_counter()
            if attention:
                order, attn = score_all(model, stream(), chunk=i)
                full = np.empty(len(order), np.float64)
                full[order.numpy()] = attn.double().numpy()
            else:
                for _ in stream():
                    pass
            sync()
            t_agg = time.perf_counter()
            seconds["score"] = max(0.0, t_agg - t_pass - seconds["read"] - seconds["encode"] - seconds["select"])
            if kept is None:
                raise BagError("the bag is empty (0 patches)")
            emb, idx = kept
            logits, attn_kept = model.aggregate(emb[None])
            probs = logits.softmax(-1)[0].double().cpu().numpy()
            kept_attention = attn_kept.mean(dim=(1, 2))[0].double().cpu().numpy()
            seconds["aggregate"] = time.perf_counter() - t_agg
    finally:
        model.train(was_training)
    return BagPrediction(probs, idx.numpy(), kept_attention, full, len(full) if full is not None else int(len(rows)),
                         peak, seconds)
