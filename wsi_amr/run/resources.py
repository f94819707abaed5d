"""What a job's process shares: OpenCV's thread count, a background thread at lower priority,
and giving freed C heap back to the system between windows."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

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


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (other C libraries, other systems)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: musl has no malloc_trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def trim_heap() -> bool:
    """Give the free pages of the C heap back to the kernel (glibc ``malloc_trim``; elsewhere
    nothing). glibc serves blocks below a threshold that grows with the largest block freed (up to
    32 MiB) from its heaps, one per thread that allocates at once, and a heap keeps what is freed in
    its middle: a segment run, whose per-window arrays of 10-50 MiB are freed and allocated again by
    three threads, grew by the slide's size without this (peak RSS 1.6x from a 20k to a 60k px
    slide). Called once per window it costs a few ms. Returns whether it ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
