"""``wsi-amr tile``: a uniform tile grid over the tissue of one slide, optionally with images."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsi_amr.jobs.tissue import load_or_detect, overlay_image
from wsi_amr.outputs import TMP_PREFIX, write_png_atomic
from wsi_amr.run.resources import opencv_threads
from wsi_amr.run.task import EmptySlide, JobContext
from wsi_amr.run.worker import spawning_without_main
from wsi_amr.slide import Slide, open_slide
from wsi_amr.tiling import TileGrid, TileParams, read_order, tile_grid, write_tiles_h5

IMAGE_FORMATS = {"png": ".png", "jpeg": ".jpg"}


def tile_image_name(x: int, y: int, fmt: str) -> str:
    """File name of the tile at level-0 (x, y)."""
    return f"{int(x)}_{int(y)}{IMAGE_FORMATS[fmt]}"


def encode_tile(rgb: np.ndarray, fmt: str, quality: int) -> bytes:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if fmt == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    else:
        # Level 1: most of PNG's size gain at a fraction of the default level's time.
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise OSError("could not encode tile image")
    return buf.tobytes()


def save_tile_images(
    slide: Slide, grid: TileGrid, folder: Path, fmt: str, quality: int, workers: int, progress: Any,
    pool: ProcessPoolExecutor | None = None,
) -> int:
    """Read and write every tile image not already on disk; returns how many were written.

    Each image goes to a temporary name and is renamed into place, so a file that exists is whole
    and a re-run after an interruption only does the missing ones. With one worker, reads stay on
    this thread while encoding and writing run on a second one, overlapping the next read. Given
    ``pool`` (see :func:`start_tile_pool`), chunks of tiles go to its processes (threads share one
    interpreter lock and scaled poorly here); otherwise ``workers`` threads are used.
    """
    folder.mkdir(parents=True, exist_ok=True)
    existing = {p.name for p in folder.iterdir() if not p.name.startswith(TMP_PREFIX)}
    # Visit block by block so that neighbouring tiles hit the slide decoder's cache.
    order = read_order(grid.coords, read_block(grid.size, grid.downsample))
    todo = [(int(x), int(y)) for x, y in grid.coords[order] if tile_image_name(x, y, fmt) not in existing]
    total = len(grid.coords)
    done = total - len(todo)
    progress(done, total)
    spec = _TileSpec(str(slide.path), slide.mpp_override, grid.size, grid.downsample, str(folder), fmt, quality)
    if pool is not None and len(todo) > _CHUNK:
        chunks = [todo[i : i + _CHUNK] for i in range(0, len(todo), _CHUNK)]
        for n in pool.map(_write_chunk, [spec] * len(chunks), chunks):
            done += n
            progress(done, total)
        return len(todo)
    for n in _write_tiles(slide, spec, todo, threads=workers):
        done += n
        progress(done, total)
    return len(todo)


_CHUNK = 256  # tiles per unit of work handed to a process


@dataclass(frozen=True)
class _TileSpec:
    slide: str
    slide_mpp: float | None
    size: int
    downsample: float
    folder: str
    fmt: str
    quality: int


_worker_slides: dict[tuple[str, float | None], Slide] = {}


def _worker_slide(path: str, slide_mpp: float | None) -> Slide:
    # One open slide per worker process, kept across chunks: opening costs tens of ms on a big
    # pyramid and would start every chunk with a cold decode cache.
    key = (path, slide_mpp)
    slide = _worker_slides.get(key)
    if slide is None:
        slide = _worker_slides[key] = open_slide(path, slide_mpp=slide_mpp)
    return slide


def _write_chunk(spec: _TileSpec, coords: list[tuple[int, int]]) -> int:
    slide = _worker_slide(spec.slide, spec.slide_mpp)
    # Every core already runs one of these processes: encode inline, no writer thread.
    return sum(_write_tiles(slide, spec, coords, threads=0))


@contextlib.contextmanager
def start_tile_pool(workers: int, slide: Path, slide_mpp: float | None) -> Iterator[ProcessPoolExecutor]:
    """A pool of ``workers`` processes that open ``slide`` now, while the caller detects tissue:
    their start-up (interpreter, imports, opening the slide) overlaps that work."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        with spawning_without_main():
            for _ in range(workers):
                pool.submit(_worker_slide, str(slide), slide_mpp).add_done_callback(lambda f: None)
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_tiles(slide: Slide, spec: _TileSpec, coords: list[tuple[int, int]], threads: int) -> Iterator[int]:
    """Write the tiles at ``coords``; yields counts of finished tiles as they complete.

    ``threads`` 0: all on this thread; 1: reads here, encoding and writing on one helper thread;
    more: reads here, encoding and writing on that many threads.
    """
    folder = Path(spec.folder)

    def write(xy: tuple[int, int], rgb: np.ndarray) -> None:
        final = folder / tile_image_name(xy[0], xy[1], spec.fmt)
        tmp = folder / f"{TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{final.name}"
        tmp.write_bytes(encode_tile(rgb, spec.fmt, spec.quality))
        tmp.replace(final)

    # One read per tile: reading a whole block and slicing it measured slower with OpenSlide.
    tiles = ((xy, slide.read_region(xy[0], xy[1], spec.size, spec.size, spec.downsample)) for xy in coords)
    if threads <= 0:
        for i, (xy, rgb) in enumerate(tiles, 1):
            write(xy, rgb)
            if i % 64 == 0:
                yield 64
        yield len(coords) % 64
        return
    with ThreadPoolExecutor(threads) as pool:
        window: deque[Future[None]] = deque()
        finished = 0
        for xy, rgb in tiles:
            window.append(pool.submit(write, xy, rgb))
            # Bound the tiles in flight so memory does not grow with the tile count.
            while len(window) > 4 * threads:
                window.popleft().result()
                finished += 1
                if finished == 64:
                    yield finished
                    finished = 0
        while window:
            window.popleft().result()
            finished += 1
        yield finished


def read_block(size: int, downsample: float) -> float:
    """Side, level-0 px, of the blocks tiles are visited in: about 4 x 4 tiles, at least 1024 px."""
    return max(1024.0, 4 * size * downsample)


def draw_tiles(rgb: np.ndarray, coords: np.ndarray, span0: float, downsample: float) -> np.ndarray:
    """``rgb`` (the slide at ``downsample``) with each tile's outline drawn."""
    out = rgb.copy()
    if len(coords) == 0:
        return out
    s = span0 / downsample
    xy = np.round(coords / downsample).astype(np.int32)
    wh = max(1, int(round(s)))
    for x, y in xy:
        cv2.rectangle(out, (int(x), int(y)), (int(x) + wh - 1, int(y) + wh - 1), (0, 90, 255), 1)
    return out


def run(ctx: JobContext[TileParams]) -> dict[str, Any]:
    tp = ctx.params
    # Several workers for one slide (a batch smaller than --jobs): processes, started early.
    use_pool = tp.save_images and ctx.threads > 1 and multiprocessing.parent_process() is None
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(start_tile_pool(ctx.threads, ctx.slide_path, ctx.slide_mpp)) if use_pool else None
        stack.enter_context(opencv_threads(1))  # small images: parallelism comes from our threads
        return _run(ctx, tp, pool)


def _run(ctx: JobContext[TileParams], tp: TileParams, pool: ProcessPoolExecutor | None) -> dict[str, Any]:
    res = tp.resolution
    with open_slide(ctx.slide_path, slide_mpp=ctx.slide_mpp) as slide:
        ds = slide.downsample_for(res)
        w, h = slide.dimensions
        tm = load_or_detect(ctx, slide, tp.tissue) if tp.tissue is not None else None
        grid, frac = tile_grid(
            w, h, size=tp.size, overlap=tp.overlap, downsample=ds,
            tissue_mask=tm.mask if tm is not None else None,
            mask_downsample=tm.downsample if tm is not None else 1.0,
            min_tissue=tp.min_tissue,
        )
        level = slide.best_level_for_downsample(ds)
        mpp0 = slide.mpp
        attrs = {
            "patch_level": level,
            "downsample": np.array([slide.level_downsamples[level]] * 2, np.float64),
            "level_dim": np.array(slide.level_dimensions[level], np.int64),
            "downsampled_level_dim": np.array(slide.level_dimensions[level], np.int64),
            "name": slide.stem,
            "mpp": float(mpp0[0] * ds) if mpp0 else None,
            "level0_mpp": float(mpp0[0]) if mpp0 else None,
            "level0_magnification": slide.objective_power,
            "target_magnification": (slide.objective_power / ds) if slide.objective_power else None,
            "bounds_offset": np.array(slide.bounds_offset, np.int64),
        }
        write_tiles_h5(ctx.out_dir / "tiles.h5", grid, frac, attrs)
        outputs = {"coords": "tiles.h5", "overlay": "tiles.png"}
        if tm is not None:
            base, f = overlay_image(tm.image)
            odown = tm.downsample / f
        else:
            base, odown = slide.thumbnail(2048)
        write_png_atomic(ctx.out_dir / "tiles.png", draw_tiles(base, grid.coords, grid.size_level0, odown))
        written = 0
        if tp.save_images:
            written = save_tile_images(
                slide, grid, ctx.out_dir / "tiles", tp.image_format, tp.quality,
                ctx.threads, ctx.progress, pool,
            )
            outputs["images"] = "tiles"
        stats = {
            "tiles": int(len(grid.coords)),
            "images_written": written,
            "downsample": round(ds, 6),
            "patch_level": level,
            "mpp": attrs["mpp"],
            "tissue_fraction": float(tm.mask.mean()) if tm is not None else None,
        }
        if len(grid.coords) == 0:
            raise EmptySlide(
                f"{slide.name}: no tile has tissue >= {tp.min_tissue} at {res.describe()} "
                f"(slide {w}x{h} px); wrote an empty tiles.h5", outputs, stats,
            )
        return {"outputs": outputs, "stats": stats, "slide": slide.info()}
