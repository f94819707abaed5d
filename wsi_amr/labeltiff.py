"""A label image streamed block by block into a pyramidal, tiled TIFF (``mask.tiff``).

Blocks (any rectangles tiling the image, in any order) go into a raw file of the full level
beside the output, one row at a time, so memory stays at one block whatever the slide's size.
``close`` writes the TIFF from it: level 0 at the working resolution, then levels halved until
the image fits one tile, each a page of its own (``subfiletype`` 1, as OpenSlide's generic TIFF
reader and QuPath expect), nearest-neighbour downsampled (labels are not averaged), deflate
compressed, with resolution tags in pixels per centimetre and a JSON description (class names,
µm per pixel). The raw file is removed and the TIFF appears under its name only when complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

TILE = 256


class LabelTiff:
    """Write a ``width`` x ``height`` uint8 label image at ``mpp`` µm/px to ``path``.

    ``add(x, y, labels)`` places a block; ``close()`` writes the pyramid; ``abort()`` (or leaving
    a ``with`` block on an exception) removes the partial files. Pixels never added are 0."""

    def __init__(self, path: Path, width: int, height: int, mpp: float, *, classes: list[str] | None = None,
                 extra: dict[str, Any] | None = None, tile: int = TILE) -> None:
        if width < 1 or height < 1:
            raise ValueError(f"bad label image size {width}x{height}")
        self.path = Path(path)
        self.width, self.height, self.mpp, self.tile = width, height, float(mpp), tile
        self.description = json.dumps({"wsi-amr": "labels", "mpp": self.mpp, "classes": classes or [],
                                       **(extra or {})})
        self.raw = self.path.with_name(f".{self.path.name}.raw.tmp")
        self.fd = os.open(self.raw, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, width * height)  # sparse: never-added pixels read as 0

    def __enter__(self) -> LabelTiff:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, x: int, y: int, labels: np.ndarray) -> None:
        h, w = labels.shape
        if x < 0 or y < 0 or x + w > self.width or y + h > self.height:
            raise ValueError(f"block {w}x{h} at ({x}, {y}) is outside the {self.width}x{self.height} image")
        rows = np.ascontiguousarray(labels, dtype=np.uint8)
        if w == self.width:  # whole rows are contiguous in the file
            os.pwrite(self.fd, rows.tobytes(), y * self.width)
            return
        for r in range(h):
            os.pwrite(self.fd, rows[r].tobytes(), (y + r) * self.width + x)

    def levels(self) -> list[tuple[int, int]]:
        """(width, height) of each level: halved until one tile holds it."""
        out = [(self.width, self.height)]
        while max(out[-1]) > self.tile:
            w, h = out[-1]
            out.append((-(-w // 2), -(-h // 2)))
        return out

    def _rows(self, d: int, first: int, count: int) -> np.ndarray:
        """``count`` rows of the level downsampled by ``d`` from its row ``first``: every d-th row
        and column of level 0 (nearest neighbour)."""
        w = -(-self.width // d)
        out = np.zeros((count, w), np.uint8)
        for i in range(count):
            y = (first + i) * d
            if y >= self.height:
                break
            row = np.frombuffer(os.pread(self.fd, self.width, y * self.width), np.uint8)
            out[i] = row[::d]
        return out

    def _tiles(self, d: int, shape: tuple[int, int]) -> Iterator[np.ndarray]:
        w, h = shape
        t = self.tile
        for ty in range(0, h, t):
            band = self._rows(d, ty, min(t, h - ty))
            for tx in range(0, w, t):
                yield band[:, tx:tx + t]

    def close(self) -> None:
        """Write the TIFF (atomically) and remove the raw file."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with tifffile.TiffWriter(tmp, bigtiff=self.width * self.height > 2**31) as tw:
                for level, shape in enumerate(self.levels()):
                    d = 2**level
                    res = 1e4 / (self.mpp * d)  # pixels per centimetre
                    tw.write(self._tiles(d, shape), shape=(shape[1], shape[0]), dtype=np.uint8,
                             tile=(self.tile, self.tile), photometric="minisblack", compression="zlib",
                             resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=1 if level else 0,
                             description=self.description if level == 0 else None, metadata=None)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            self.abort()
            raise
        self._drop_raw()

    def abort(self) -> None:
        self._drop_raw()

    def _drop_raw(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.raw.unlink(missing_ok=True)


def read_label_tiff(path: Path, level: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """The labels of one level of a ``mask.tiff`` and its description (class names, mpp)."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level]
        first = tif.pages.first
        try:
            info = json.loads(first.description or "{}")
        except json.JSONDecodeError:
            info = {}
        return page.asarray(), info
