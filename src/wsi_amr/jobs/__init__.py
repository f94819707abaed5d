"""Per-slide jobs: what one command does to one slide, run by :mod:`wsi_amr.batch`.

Each module has ``run(ctx: JobContext) -> dict`` returning ``{"outputs": {role: file name},
"stats": {...}, "slide": {...}}``; it opens the slide itself (inside the worker).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import wsi_amr


@contextlib.contextmanager
def opencv_threads(n: int) -> Iterator[None]:
    """OpenCV on ``n`` threads inside the block (its own pool, one thread per core by default).

    Jobs whose OpenCV calls are small (thumbnails, single tiles) or that run beside threads of
    their own gain nothing from that pool and pay for waking it: ``tile`` on 96 slides took the
    same wall time on 1.00 core as on 1.14.

    Left alone in a process forked from one that had imported wsi-amr: if the parent had started
    OpenCV's pool, its threads did not survive the fork and ``cv2.setNumThreads`` would wait for
    them for ever. (Our own pools and Dask workers are spawned, not forked.)
    """
    import cv2

    if wsi_amr.forked:
        yield
        return
    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(before)
