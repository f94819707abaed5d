#!/usr/bin/env python
"""Benchmark slide maker: a large pyramidal JPEG TIFF of real H&E (GlaS) with exact ground truth.

GlaS images (colon H&E, about 0.62 um/px) are rescaled to the slide's mpp and packed edge to edge
in tissue-like clusters on a near-white background. Beside the slide go the matching gland mask
as a pyramidal label TIFF and as QuPath GeoJSON annotations, plus a JSON with the parameters and
the placement list. Nothing is ever held at full slide size: every pyramid level is rendered tile
by tile, straight from the placement list (through a per-level bucket grid), and streamed into
``tifffile.TiffWriter.write``; memory depends on the tile size and the GlaS set, not the slide.

Usage::

    python bench/make_slide.py --size 20000 --out bench/out/slides
    python bench/make_slide.py --size 60000 --height 40000 --images all --seed 1

Importable: ``make_slide(out_dir, width, height=None, ...) -> dict`` (paths and stats),
``plan_layout(...)`` (the placements only), ``verify_slide(result)`` (re-reads what was written).

Files written (``NAME`` defaults to ``glas-{width}`` or ``glas-{width}x{height}``):

- ``NAME.tiff``: RGB, tiled, JPEG (YCbCr 4:2:0 as scanners write it), one top-level IFD a level,
  each level half the previous until the smaller side is below 1024, reduced levels marked
  ``subfiletype=1``; XResolution/YResolution in pixels per cm (1e4 / mpp) with ResolutionUnit
  CENTIMETER, and ``ImageDescription`` "wsi-amr benchmark slide|mpp=0.5". OpenSlide opens it
  with its generic-tiff driver.
- ``NAME.mask.tiff``: uint8 labels (0 background, 1 gland), same levels and resolution, deflate.
- ``NAME.geojson``: one QuPath annotation per gland (class "Gland", colour [0, 160, 0]),
  pixel-edge polygons in level-0 pixels, so rasterising it gives the mask's level 0 exactly.
- ``NAME.json``: parameters, levels, placements, tissue fraction, gland pixel count, timings.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import json
import math
import os
import resource
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

REPO_ROOT = Path(__file__).resolve().parents[1]

DESCRIPTION = "wsi-amr benchmark slide|mpp={mpp:g}"
MASK_DESCRIPTION = "wsi-amr benchmark gland mask (0 background, 1 gland)|mpp={mpp:g}"
GLAND_CLASS = ("Gland", (0, 160, 0))
BACKGROUND = 248  # mean grey of the empty glass
BACKGROUND_NOISE = 1.0  # std of the background noise; kept within 245..255
MIN_LEVEL_SIDE = 1024  # stop adding levels once the smaller side is below this
IMAGE_SETS = ("testA", "train", "all")
CACHE_BYTES = 256 * 2**20  # resized GlaS images kept per level (LRU)


def default_data_dir() -> Path:
    """The project's shared data folder: ``$WSI_AMR_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("WSI_AMR_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def default_glas_dir() -> Path:
    return default_data_dir() / "glas"


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


# --------------------------------------------------------------------------------------------
# GlaS sources


@dataclass
class Sources:
    """GlaS images (RGB uint8) and masks (uint8 0/1), index-aligned, sorted by name."""

    names: list[str]
    images: list[np.ndarray]
    masks: list[np.ndarray]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """(width, height) of each source."""
        return [(im.shape[1], im.shape[0]) for im in self.images]


def _natural_key(name: str) -> tuple[str, int]:
    stem = Path(name).stem
    prefix, _, num = stem.rpartition("_")
    return (prefix, int(num)) if num.isdigit() else (stem, -1)


def list_sources(glas_dir: str | os.PathLike[str], images: str = "testA", exclude: Sequence[str] = ()) -> list[str]:
    """Names of the GlaS images of one set (``testA``, ``train`` or ``all``), in natural order,
    less those named in ``exclude`` (file names or stems, e.g. a model's validation images)."""
    if images not in IMAGE_SETS:
        raise ValueError(f"images must be one of {IMAGE_SETS}, not {images!r}")
    img_dir = Path(glas_dir) / "images"
    if not img_dir.is_dir():
        raise FileNotFoundError(f"GlaS images folder not found: {img_dir}")
    names = [p.name for p in img_dir.glob("*.png")]
    if images != "all":
        names = [n for n in names if n.startswith(images + "_")]
    names.sort(key=_natural_key)
    if not names:
        raise FileNotFoundError(f"no GlaS {images} images in {img_dir}")
    drop = {Path(n).stem for n in exclude}
    unknown = sorted(drop - {Path(n).stem for n in names})
    if unknown:
        raise ValueError(f"--exclude names {', '.join(unknown)}, not among the GlaS {images} images")
    names = [n for n in names if Path(n).stem not in drop]
    if not names:
        raise ValueError(f"every GlaS {images} image is excluded")
    return names


def load_sources(glas_dir: str | os.PathLike[str], images: str = "testA", exclude: Sequence[str] = ()) -> Sources:
    from wsi_amr.images import read_rgb
    from wsi_amr.labels import read_label_image

    glas_dir = Path(glas_dir)
    names = list_sources(glas_dir, images, exclude)
    imgs, masks = [], []
    for name in names:
        rgb = read_rgb(glas_dir / "images" / name)
        mask = read_label_image(glas_dir / "masks" / name)
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"GlaS mask {name} is {mask.shape}, image {rgb.shape[:2]}")
        imgs.append(rgb)
        masks.append((mask > 127).astype(np.uint8))
    return Sources(names, imgs, masks)


# --------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class Placement:
    """One GlaS image on the slide: level-0 rectangle (after orientation) and its orientation.

    The source is rotated by ``rot`` quarter turns (``numpy.rot90``), then mirrored left-right
    when ``flip``; ``w`` x ``h`` are the oriented size in level-0 pixels.
    """

    x: int
    y: int
    w: int
    h: int
    src: int
    rot: int
    flip: bool
    cluster: int


def orient(a: np.ndarray, rot: int, flip: bool) -> np.ndarray:
    """View of ``a`` rotated by ``rot`` quarter turns then mirrored left-right if ``flip``."""
    a = np.rot90(a, rot)
    return a[:, ::-1] if flip else a


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def layout_params(width: int, height: int, mpp: float, image_gap: int = 0) -> dict[str, int]:
    """Margins and gaps in level-0 pixels for a slide of this size."""
    short = min(width, height)
    return {
        "margin": max(32, round(0.02 * short)),
        "cluster_gap": max(round(60 / mpp), round(0.008 * short)),
        "max_inner_gap": 3,  # white seam between neighbouring images of a cluster, px
        "image_gap": image_gap,  # glass added between neighbouring images of a cluster, px
        "cell": max(16, math.ceil(max(width, height) / 1024)),  # occupancy grid cell, px
    }


def _build_cluster(
    rng: np.random.Generator,
    n: int,
    sizes0: Sequence[tuple[int, int]],
    next_src: Iterator[int],
    max_width: int,
    max_inner_gap: int,
    image_gap: int = 0,
) -> list[tuple[int, int, int, int, int, int, bool]]:
    """Pack ``n`` images into a blob: rows of images edge to edge, row lengths following an ellipse.

    Returns (x, y, w, h, src, rot, flip) with the blob's top-left at (0, 0).
    """
    aspect = rng.uniform(0.6, 1.7)  # blob width / height in images
    nrows = max(1, round(math.sqrt(n / aspect)))
    t = (np.arange(nrows) + 0.5) / nrows * 2 - 1
    weights = np.sqrt(np.clip(1 - t**2, 0.05, None)) * rng.uniform(0.8, 1.2, nrows)
    # images per row: largest-remainder apportionment of n over the ellipse's row widths
    share = n * weights / weights.sum()
    counts = np.floor(share).astype(int)
    for i in np.argsort(-(share - counts), kind="stable")[: n - int(counts.sum())]:
        counts[i] += 1
    counts = counts[counts > 0]

    out: list[tuple[int, int, int, int, int, int, bool]] = []
    y = 0
    mean_w = float(np.mean([s[0] for s in sizes0]))
    for k in counts:
        portrait = bool(rng.random() < 0.5)
        row: list[tuple[int, int, int, int, bool]] = []
        row_w = 0
        for _ in range(int(k)):
            src = next(next_src)
            rot = int(rng.integers(0, 2)) * 2 + (1 if portrait else 0)
            flip = bool(rng.random() < 0.5)
            w, h = sizes0[src]
            if rot % 2:
                w, h = h, w
            gap = image_gap + int(rng.integers(0, max_inner_gap + 1)) if row else 0
            if row and row_w + gap + w > max_width:
                break  # the row would not fit the slide: end it here
            row.append((row_w + gap, w, h, src, rot, flip))
            row_w += gap + w
        if not row:
            continue
        row_h = max(r[2] for r in row)
        x0 = round(rng.normal(0.0, 0.12 * mean_w) - row_w / 2)
        for dx, w, h, src, rot, flip in row:
            dy = int(rng.integers(0, row_h - h + 1))
            out.append((x0 + dx, y + dy, w, h, src, rot, flip))
        y += row_h + image_gap + int(rng.integers(0, max_inner_gap + 1))
    if not out:
        return out
    minx = min(p[0] for p in out)
    miny = min(p[1] for p in out)
    return [(x - minx, y - miny, w, h, s, r, f) for x, y, w, h, s, r, f in out]


def plan_layout(
    width: int,
    height: int,
    source_sizes: Sequence[tuple[int, int]],
    *,
    mpp: float = 0.5,
    glas_mpp: float = 0.62,
    seed: int = 0,
    fill: float = 0.35,
    image_gap: int = 0,
) -> list[Placement]:
    """Place GlaS images (given as source (w, h) sizes) in clusters covering about ``fill``.

    Deterministic in its arguments. Images never overlap each other; clusters keep a white gap
    between them and a margin from the slide edges. Inside a cluster images abut (seams of 0-3
    px) unless ``image_gap`` (level-0 px) puts glass between them: separate tissue fragments.
    """
    if not source_sizes:
        raise ValueError("no source images")
    if not 0 < fill < 1:
        raise ValueError(f"fill must be in (0, 1), not {fill}")
    rng = np.random.default_rng(seed)
    scale = glas_mpp / mpp
    sizes0 = [scaled_size(s, scale) for s in source_sizes]
    p = layout_params(width, height, mpp, image_gap)
    margin, gap, cell = p["margin"], p["cluster_gap"], p["cell"]
    inner_w, inner_h = width - 2 * margin, height - 2 * margin
    min_side = min(min(s) for s in sizes0)
    if inner_w < min_side or inner_h < min_side:
        raise ValueError(
            f"slide {width}x{height} is too small for GlaS images of about "
            f"{sizes0[0][0]}x{sizes0[0][1]} px at mpp {mpp}"
        )

    def source_cycle() -> Iterator[int]:
        while True:
            yield from (int(i) for i in rng.permutation(len(sizes0)))

    next_src = source_cycle()
    mean_area = float(np.mean([w * h for w, h in sizes0]))
    target = fill * width * height
    n_total = max(1.0, target / mean_area)
    n_clusters = max(1, round(1.2 * math.sqrt(n_total)))
    mean_n = n_total / n_clusters
    n_cap = max(1, int(inner_w * inner_h / mean_area * 0.5))

    gh, gw = math.ceil(height / cell), math.ceil(width / cell)
    occupied = np.zeros((gh, gw), dtype=bool)
    placements: list[Placement] = []
    area = 0
    failures = 0
    cluster_id = 0
    while area < target and failures < 40:
        n = int(np.clip(round(mean_n * rng.lognormal(0.0, 0.5)), 1, n_cap))
        n = min(n, max(1, math.ceil((target - area) / mean_area)))
        placed = False
        while not placed:
            rects = _build_cluster(rng, n, sizes0, next_src, inner_w, p["max_inner_gap"], image_gap)
            bw = max(r[0] + r[2] for r in rects)
            bh = max(r[1] + r[3] for r in rects)
            if bw <= inner_w and bh <= inner_h:
                for _ in range(60):
                    cx = margin + int(rng.integers(0, inner_w - bw + 1))
                    cy = margin + int(rng.integers(0, inner_h - bh + 1))
                    if not any(
                        occupied[
                            max(0, (cy + y - gap) // cell) : -(-(cy + y + h + gap) // cell),
                            max(0, (cx + x - gap) // cell) : -(-(cx + x + w + gap) // cell),
                        ].any()
                        for x, y, w, h, *_ in rects
                    ):
                        placed = True
                        break
            if placed:
                break
            if n == 1:
                break
            n = max(1, int(n * 0.6))
        if not placed:
            failures += 1
            continue
        for x, y, w, h, src, rot, flip in rects:
            x, y = cx + x, cy + y
            occupied[y // cell : -(-(y + h) // cell), x // cell : -(-(x + w) // cell)] = True
            placements.append(Placement(x, y, w, h, src, rot, flip, cluster_id))
            area += w * h
        cluster_id += 1
    return placements


# --------------------------------------------------------------------------------------------
# Pyramid rendering


def level_shapes(width: int, height: int, min_side: int = MIN_LEVEL_SIDE) -> list[tuple[int, int]]:
    """(width, height) per level: halve (rounding up) until the smaller side is < ``min_side``."""
    shapes = [(width, height)]
    while min(shapes[-1]) >= min_side:
        d = 2 ** len(shapes)
        shapes.append((-(-width // d), -(-height // d)))
    return shapes


def level_rect(p: Placement, d: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a placement at downsample ``d``: edges rounded half up, so images that
    abut at level 0 abut at every level, never overlap, and every level lines up with level 0."""
    h2 = d // 2
    return (
        (p.x + h2) // d,
        (p.y + h2) // d,
        (p.x + p.w + h2) // d,
        (p.y + p.h + h2) // d,
    )


class _LRU:
    """Thread-safe byte-capped LRU cache of arrays."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._d: collections.OrderedDict[Any, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, make: Any) -> np.ndarray:
        with self._lock:
            a = self._d.get(key)
            if a is not None:
                self._d.move_to_end(key)
                return a
        a = make()
        with self._lock:
            if key not in self._d:
                self._d[key] = a
                self.nbytes += a.nbytes
                while self.nbytes > self.max_bytes and len(self._d) > 1:
                    _, old = self._d.popitem(last=False)
                    self.nbytes -= old.nbytes
        return a


class LevelRenderer:
    """Renders tiles of one pyramid level of the slide (``kind="rgb"``) or mask (``"mask"``)."""

    def __init__(
        self,
        placements: Sequence[Placement],
        sources: Sources,
        level: int,
        shape: tuple[int, int],
        tile: int,
        kind: str,
        seed: int = 0,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.d = 2**level
        self.width, self.height = shape
        self.tile = tile
        self.kind = kind
        self.sources = sources
        self.ntx = -(-self.width // tile)
        self.nty = -(-self.height // tile)
        self.placements = placements
        self.rects = [level_rect(p, self.d) for p in placements]
        # bucket grid: tile (ty, tx) -> placements intersecting it
        self.buckets: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
        for i, (x0, y0, x1, y1) in enumerate(self.rects):
            if x1 <= x0 or y1 <= y0:
                continue
            for ty in range(y0 // tile, (y1 - 1) // tile + 1):
                for tx in range(x0 // tile, (x1 - 1) // tile + 1):
                    self.buckets[ty, tx].append(i)
        self.cache = _LRU(cache_bytes)
        if kind == "rgb":
            rng = np.random.default_rng([seed, level, 7])
            self.backgrounds = [
                np.clip(
                    np.round(rng.normal(BACKGROUND, BACKGROUND_NOISE, (tile, tile, 1)))
                    + np.array([0, -1, 1]),
                    245,
                    255,
                ).astype(np.uint8)
                for _ in range(4)
            ]
        elif kind == "mask":
            self.backgrounds = [np.zeros((tile, tile), np.uint8)]
        else:
            raise ValueError(kind)

    def _resized(self, p: Placement, w: int, h: int) -> np.ndarray:
        """Source of ``p`` resized to oriented size (w, h), then oriented (a view)."""
        if p.rot % 2:
            w, h = h, w

        def make() -> np.ndarray:
            if self.kind == "rgb":
                src = self.sources.images[p.src]
                sh, sw = src.shape[:2]
                interp = cv2.INTER_AREA if w < sw and h < sh else cv2.INTER_LINEAR
            else:
                src = self.sources.masks[p.src]
                interp = cv2.INTER_NEAREST
            return cv2.resize(src, (w, h), interpolation=interp)

        return orient(self.cache.get((p.src, w, h), make), p.rot, p.flip)

    def render(self, ty: int, tx: int) -> np.ndarray:
        t = self.tile
        bg = self.backgrounds[(ty * 7 + tx * 13) % len(self.backgrounds)]
        out = bg.copy()
        tx0, ty0 = tx * t, ty * t
        for i in self.buckets.get((ty, tx), ()):
            x0, y0, x1, y1 = self.rects[i]
            ix0, iy0 = max(x0, tx0), max(y0, ty0)
            ix1, iy1 = min(x1, tx0 + t), min(y1, ty0 + t)
            if ix1 <= ix0 or iy1 <= iy0:
                continue
            img = self._resized(self.placements[i], x1 - x0, y1 - y0)
            out[iy0 - ty0 : iy1 - ty0, ix0 - tx0 : ix1 - tx0] = img[
                iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0
            ]
        return out  # beyond the level's right/bottom edge the tile stays padded with background

    def tiles(self, workers: int = 1) -> Iterator[np.ndarray]:
        """All tiles in row-major order, rendered by ``workers`` threads with bounded lookahead."""
        idx = ((ty, tx) for ty in range(self.nty) for tx in range(self.ntx))
        if workers <= 1:
            for ty, tx in idx:
                yield self.render(ty, tx)
            return
        with concurrent.futures.ThreadPoolExecutor(workers) as ex:
            pending: collections.deque[concurrent.futures.Future[np.ndarray]] = collections.deque()
            for ty, tx in idx:
                pending.append(ex.submit(self.render, ty, tx))
                if len(pending) >= 4 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


def _write_pyramid(
    path: Path,
    placements: Sequence[Placement],
    sources: Sources,
    shapes: Sequence[tuple[int, int]],
    *,
    kind: str,
    mpp: float,
    tile: int,
    quality: int,
    seed: int,
    workers: int,
    ycbcr: bool = True,
) -> None:
    width, height = shapes[0]
    samples = 3 if kind == "rgb" else 1
    bigtiff = width * height * samples > 2**31
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for level, shape in enumerate(shapes):
            d = 2**level
            r = LevelRenderer(placements, sources, level, shape, tile, kind, seed=seed)
            res = 1e4 / (mpp * d)  # pixels per centimetre at this level
            kw: dict[str, Any] = {
                "shape": (shape[1], shape[0], 3) if kind == "rgb" else (shape[1], shape[0]),
                "dtype": np.uint8,
                "tile": (tile, tile),
                "resolution": (res, res),
                "resolutionunit": "CENTIMETER",
                "subfiletype": 1 if level else 0,
                "metadata": None,
                "maxworkers": workers,
                "buffersize": 32 * 2**20,
            }
            if level == 0:
                kw["description"] = (DESCRIPTION if kind == "rgb" else MASK_DESCRIPTION).format(
                    mpp=mpp
                )
            if kind == "rgb":
                kw["photometric"] = "rgb"
                kw["compression"] = "jpeg"
                if ycbcr:
                    kw["compressionargs"] = {"level": quality}
                    kw["subsampling"] = (2, 2)  # stored as YCbCr 4:2:0, like scanners
                else:
                    kw["compressionargs"] = {"level": quality, "outcolorspace": "RGB"}
                    kw["subsampling"] = (1, 1)
            else:
                kw["photometric"] = "minisblack"
                kw["compression"] = "zlib"
                kw["compressionargs"] = {"level": 6}
            tw.write(r.tiles(workers), **kw)


# --------------------------------------------------------------------------------------------
# GeoJSON


def _gland_features(placements: Sequence[Placement], sources: Sources) -> Iterator[Any]:
    """QuPath annotations of every gland, pixel-edge polygons in level-0 pixels."""
    from wsi_amr.geojson import PathClass, make_feature
    from wsi_amr.polygons import mask_to_polygons

    cls = PathClass(*GLAND_CLASS)
    resized: dict[int, np.ndarray] = {}
    for p in placements:
        w, h = (p.h, p.w) if p.rot % 2 else (p.w, p.h)
        m = resized.get(p.src)
        if m is None or m.shape != (h, w):
            m = cv2.resize(sources.masks[p.src], (w, h), interpolation=cv2.INTER_NEAREST)
            resized[p.src] = m
        polys = mask_to_polygons(orient(m, p.rot, p.flip), scale=1.0, offset=(p.x, p.y))
        for g in polys:
            feature = make_feature(g, object_type="annotation", classification=cls)
            if feature is not None:
                yield feature


# --------------------------------------------------------------------------------------------
# Main entry


def _atomic(path: Path) -> contextlib.AbstractContextManager[Path]:
    try:
        from wsi_amr.outputs import atomic_path
    except ImportError:  # pragma: no cover - the package is always installed in this repo
        return contextlib.nullcontext(path)
    return atomic_path(path)


def default_name(width: int, height: int) -> str:
    return f"glas-{width}" if width == height else f"glas-{width}x{height}"


def make_slide(
    out_dir: str | os.PathLike[str],
    width: int,
    height: int | None = None,
    *,
    name: str | None = None,
    mpp: float = 0.5,
    glas_dir: str | os.PathLike[str] | None = None,
    glas_mpp: float = 0.62,
    images: str = "testA",
    exclude: Sequence[str] = (),
    seed: int = 0,
    tile: int = 512,
    quality: int = 85,
    fill: float = 0.35,
    image_gap: int = 0,
    workers: int | None = None,
    geojson: bool = True,
    ycbcr: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """Write ``NAME.tiff``, ``NAME.mask.tiff``, ``NAME.geojson`` and ``NAME.json`` into ``out_dir``.

    Returns a dict with the paths (``slide``, ``mask``, ``geojson``, ``json``), ``width``,
    ``height``, ``levels`` ([w, h] per level), ``mpp``, ``placements`` (count),
    ``tissue_fraction``, ``gland_pixels`` (level 0), per-file ``sizes`` (bytes) and ``seconds``,
    ``peak_rss_mb`` and ``params``. The placement list itself is in the JSON file
    (``placement_list``: x, y, w, h, src, rot, flip, cluster per image; ``sources``: names).

    Beyond the CLI's options: ``workers`` threads render and encode tiles (default: CPU count,
    at most 8); ``geojson=False`` skips the GeoJSON; ``ycbcr=False`` stores RGB JPEG instead of
    YCbCr 4:2:0; ``verbose`` prints one line per file.
    """
    t_start = time.perf_counter()
    height = width if height is None else height
    if width < 1 or height < 1:
        raise ValueError(f"bad slide size {width}x{height}")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16, not {tile}")
    name = name or default_name(width, height)
    glas_dir = Path(glas_dir) if glas_dir is not None else default_glas_dir()
    workers = workers or min(8, os.cpu_count() or 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "slide": out / f"{name}.tiff",
        "mask": out / f"{name}.mask.tiff",
        "geojson": out / f"{name}.geojson",
        "json": out / f"{name}.json",
    }

    def say(msg: str) -> None:
        if verbose:
            print(msg, flush=True)

    sources = load_sources(glas_dir, images, exclude)
    t0 = time.perf_counter()
    placements = plan_layout(
        width, height, sources.sizes, mpp=mpp, glas_mpp=glas_mpp, seed=seed, fill=fill,
        image_gap=image_gap,
    )
    t_layout = time.perf_counter() - t0
    shapes = level_shapes(width, height)
    tissue = sum(p.w * p.h for p in placements)
    scale = glas_mpp / mpp
    gland_by_src = {
        i: int(
            cv2.resize(m, scaled_size(sources.sizes[i], scale), interpolation=cv2.INTER_NEAREST).sum()
        )
        for i, m in enumerate(sources.masks)
    }
    gland_pixels = sum(gland_by_src[p.src] for p in placements)
    say(
        f"layout: {len(placements)} images in {len({p.cluster for p in placements})} clusters, "
        f"tissue {tissue / (width * height):.3f}, {len(shapes)} levels ({t_layout:.1f}s)"
    )

    seconds: dict[str, float] = {"layout": t_layout}
    sizes: dict[str, int] = {}
    for key, kind in (("slide", "rgb"), ("mask", "mask")):
        t0 = time.perf_counter()
        with _atomic(paths[key]) as tmp:
            _write_pyramid(
                tmp, placements, sources, shapes, kind=kind, mpp=mpp, tile=tile,
                quality=quality, seed=seed, workers=workers, ycbcr=ycbcr,
            )  # fmt: skip
        seconds[key] = time.perf_counter() - t0
        sizes[key] = paths[key].stat().st_size
        say(f"{paths[key]}: {sizes[key] / 2**20:.1f} MiB in {seconds[key]:.1f}s")

    n_features = 0
    if geojson:
        from wsi_amr.geojson import write_geojson

        t0 = time.perf_counter()
        # streamed: features are made and written one by one, never all in memory
        report = write_geojson(paths["geojson"], _gland_features(placements, sources))
        n_features = report.written
        seconds["geojson"] = time.perf_counter() - t0
        sizes["geojson"] = paths["geojson"].stat().st_size
        say(
            f"{paths['geojson']}: {sizes['geojson'] / 2**20:.1f} MiB, {n_features} glands "
            f"({report.repaired} repaired, {report.dropped} dropped) in {seconds['geojson']:.1f}s"
        )
    else:
        paths.pop("geojson")

    params = {
        "width": width, "height": height, "name": name, "mpp": mpp, "glas_dir": str(glas_dir),
        "glas_mpp": glas_mpp, "images": images, "exclude": sorted(exclude), "seed": seed, "tile": tile, "quality": quality,
        "fill": fill, "ycbcr": ycbcr, "image_gap": image_gap,
    }  # fmt: skip
    seconds["total"] = time.perf_counter() - t_start
    result: dict[str, Any] = {
        **{k: str(v) for k, v in paths.items()},
        "width": width,
        "height": height,
        "levels": [list(s) for s in shapes],
        "mpp": mpp,
        "placements": len(placements),
        "clusters": len({p.cluster for p in placements}),
        "tissue_fraction": tissue / (width * height),
        "gland_pixels": gland_pixels,
        "gland_features": n_features,
        "sizes": sizes,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "params": params,
    }
    doc = {
        **result,
        "layout": layout_params(width, height, mpp, image_gap),
        "sources": sources.names,
        "placement_fields": list(Placement.__dataclass_fields__),
        "placement_list": [list(asdict(p).values()) for p in placements],
    }
    with _atomic(paths["json"]) as tmp:
        tmp.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    return result


def load_placements(json_path: str | os.PathLike[str]) -> tuple[list[Placement], list[str]]:
    """Placements and source names from a ``NAME.json`` written by :func:`make_slide`."""
    doc = json.loads(Path(json_path).read_text())
    fields = doc["placement_fields"]
    pl = [Placement(**dict(zip(fields, row, strict=True))) for row in doc["placement_list"]]
    for i, p in enumerate(pl):
        pl[i] = Placement(p.x, p.y, p.w, p.h, p.src, p.rot, bool(p.flip), p.cluster)
    return pl, doc["sources"]


def expected_region(
    placement: Placement, source_image: np.ndarray, level: int = 0
) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """Level rectangle (x0, y0, x1, y1) of a placement and the RGB pixels rendered there."""
    d = 2**level
    x0, y0, x1, y1 = level_rect(placement, d)
    w, h = x1 - x0, y1 - y0
    if placement.rot % 2:
        w, h = h, w
    sh, sw = source_image.shape[:2]
    interp = cv2.INTER_AREA if w < sw and h < sh else cv2.INTER_LINEAR
    img = cv2.resize(source_image, (w, h), interpolation=interp)
    return (x0, y0, x1, y1), np.ascontiguousarray(orient(img, placement.rot, placement.flip))


# --------------------------------------------------------------------------------------------
# Verification


def _open(path: str) -> Any:
    """Open with the project's slide layer when present, else OpenSlide (wrapped alike)."""
    try:
        from wsi_amr.slide import open_slide
    except ImportError:
        open_slide = None
    if open_slide is not None:
        return open_slide(path)
    import openslide

    class _OS:  # the few Slide attributes verify_slide uses
        backend = "openslide (direct)"

        def __init__(self, path: str) -> None:
            self.osr = openslide.OpenSlide(path)
            self.dimensions = self.osr.dimensions
            self.level_dimensions = self.osr.level_dimensions
            self.level_count = self.osr.level_count
            props = self.osr.properties
            if "openslide.mpp-x" in props:
                self.mpp = (float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"]))
            elif props.get("tiff.ResolutionUnit") == "centimeter":
                self.mpp = (1e4 / float(props["tiff.XResolution"]),) * 2
            else:
                self.mpp = None

        def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
            return np.asarray(self.osr.read_region((x, y), level, (w, h)).convert("RGB"))

        def close(self) -> None:
            self.osr.close()

    return _OS(path)


def verify_slide(
    result: dict[str, Any], n_check: int = 4, glas_dir: Any = None, levels: Sequence[int] = (0, 1)
) -> dict[str, Any]:
    """Re-open what :func:`make_slide` wrote and check it; returns a small report.

    Through ``wsi_amr.slide.open_slide`` (OpenSlide directly when that layer is missing): level-0
    size, level count and sizes, mpp; pixels of ``n_check`` random placements at ``levels``
    against the GlaS source resized the same way (mean abs diff < 6 at level 0, < 8 below: JPEG
    error only);
    OpenSlide's own ``openslide.mpp-x``; and the mask TIFF's levels through tifffile.
    """
    import openslide

    from wsi_amr.images import read_rgb

    placements, names = load_placements(result["json"])
    glas = Path(glas_dir or result["params"]["glas_dir"])
    want_levels = [tuple(s) for s in result["levels"]]
    report: dict[str, Any] = {}
    with openslide.OpenSlide(result["slide"]) as osr:
        report["openslide_mpp_x"] = osr.properties.get("openslide.mpp-x")
        report["openslide_levels"] = osr.level_count
        if osr.level_dimensions != tuple(want_levels):
            raise AssertionError(f"OpenSlide levels {osr.level_dimensions} != {want_levels}")
    slide = _open(result["slide"])
    try:
        report["opened_with"] = getattr(slide, "backend", type(slide).__name__)
        if tuple(slide.dimensions) != (result["width"], result["height"]):
            raise AssertionError(f"dimensions {slide.dimensions}")
        if slide.level_count != len(want_levels):
            raise AssertionError(f"level count {slide.level_count} != {len(want_levels)}")
        if slide.mpp is None or abs(slide.mpp[0] - result["mpp"]) > 1e-3 * result["mpp"]:
            raise AssertionError(f"mpp {slide.mpp} != {result['mpp']}")
        report["mpp"] = list(slide.mpp)
        rng = np.random.default_rng(1)
        diffs: dict[int, list[float]] = {lv: [] for lv in levels if lv < len(want_levels)}
        for i in rng.choice(len(placements), min(n_check, len(placements)), replace=False):
            p = placements[int(i)]
            rgb = read_rgb(glas / "images" / names[p.src])
            for lv in diffs:
                (x0, y0, x1, y1), want = expected_region(p, rgb, lv)
                d = 2**lv
                got = slide.read_level(lv, x0 * d, y0 * d, x1 - x0, y1 - y0)
                diffs[lv].append(round(float(np.abs(got.astype(int) - want.astype(int)).mean()), 2))
        report["mean_abs_diff"] = diffs
        # JPEG 4:2:0 at quality 85 alone gives ~3.5 at level 0 (an upscale of GlaS) and ~5-6.5 at
        # level 1 (a downscale: finer detail); a misplaced or wrongly coloured image gives > 20
        if any(max(v) >= (6 if lv == 0 else 8) for lv, v in diffs.items()):
            raise AssertionError(f"pixels differ from the GlaS sources: {diffs}")
    finally:
        slide.close()
    with tifffile.TiffFile(result["mask"]) as tf:
        got_levels = [(pg.shape[1], pg.shape[0]) for pg in tf.pages]
        if got_levels != want_levels:
            raise AssertionError(f"mask levels {got_levels} != {want_levels}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, required=True, help="slide width (and height) in px")
    ap.add_argument("--height", type=int, default=None, help="slide height (default: --size)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out" / "slides")
    ap.add_argument("--name", default=None, help="file stem (default glas-SIZE)")
    ap.add_argument("--mpp", type=float, default=0.5, help="slide microns per pixel")
    ap.add_argument("--glas-dir", type=Path, default=None, help="GlaS folder (images/, masks/)")
    ap.add_argument("--glas-mpp", type=float, default=0.62, help="GlaS microns per pixel")
    ap.add_argument("--images", choices=IMAGE_SETS, default="testA")
    ap.add_argument("--exclude", default="",
                    help="comma-separated image names to leave out (e.g. a model's validation images)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--quality", type=int, default=85, help="JPEG quality")
    ap.add_argument("--fill", type=float, default=0.35, help="tissue fraction of the slide area")
    ap.add_argument("--image-gap", type=int, default=0,
                    help="glass between neighbouring images of a cluster, px (default 0: images abut)")
    ap.add_argument("--workers", type=int, default=None, help="threads (default: CPU count)")
    ap.add_argument("--rgb-jpeg", action="store_true", help="store RGB JPEG, not YCbCr 4:2:0")
    ap.add_argument("--no-geojson", action="store_true")
    ap.add_argument("--no-verify", action="store_true")
    a = ap.parse_args(argv)
    try:
        res = make_slide(
            a.out, a.size, a.height, name=a.name, mpp=a.mpp, glas_dir=a.glas_dir,
            glas_mpp=a.glas_mpp, images=a.images,
            exclude=[n.strip() for n in a.exclude.split(",") if n.strip()], seed=a.seed, tile=a.tile, quality=a.quality,
            fill=a.fill, image_gap=a.image_gap, workers=a.workers, geojson=not a.no_geojson, ycbcr=not a.rgb_jpeg,
            verbose=True,
        )  # fmt: skip
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"make_slide: error: {e}", file=sys.stderr)
        return 2
    if not a.no_verify:
        t0 = time.perf_counter()
        rep = verify_slide(res)
        print(f"verified in {time.perf_counter() - t0:.1f}s: {json.dumps(rep)}")
    print(
        f"done: {res['width']}x{res['height']}, {len(res['levels'])} levels, "
        f"{res['placements']} images, tissue {res['tissue_fraction']:.3f}, "
        f"total {res['seconds']['total']:.1f}s, peak RSS {peak_rss_mb():.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
