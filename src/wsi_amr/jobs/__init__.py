"""Per-slide jobs: what one command does to one slide, run by :mod:`wsi_amr.batch`.

Each module has ``run(ctx: JobContext) -> dict`` returning ``{"outputs": {role: file name},
"stats": {...}, "slide": {...}}``; it opens the slide itself (inside the worker).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
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


#: How much lower than the rest of the process a background thread runs (Linux nice steps).
BACKGROUND_NICE = 10


def background_thread() -> bool:
    """Lower the calling thread's CPU priority by :data:`BACKGROUND_NICE` (Linux, where nice is per
    thread; elsewhere nothing). For a pool's ``initializer``: work that may lag (tracing outlines
    behind the model) then yields the cores to the threads on the critical path (the model and
    the read-ahead that feeds it) instead of taking turns with them. Returns whether it did.
    """
    if not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))
    except OSError:
        return False
    return True
