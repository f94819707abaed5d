"""Run one task in this process or a worker: load the job, skip current work, hold the lock,
record the result."""

from __future__ import annotations

import contextlib
import importlib
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

from wsi_amr.locks import LOCK, read_lock, slide_lock
from wsi_amr.outputs import remove_stale_temporaries
from wsi_amr.params import flag_text
from wsi_amr.run.manifest import is_current, read_manifest, update_manifest
from wsi_amr.run.task import JOBS, EmptySlide, JobContext, SlideResult, SlideTask
from wsi_amr.slide import SlideError, slide_stem


# ---------------------------------------------------------------------------------------------
# Running one slide (in this process or a worker)
# ---------------------------------------------------------------------------------------------
def _load_job(command: str) -> Callable[[JobContext], dict[str, Any]]:
    module, func = JOBS[command].split(":")
    return cast(Callable[[JobContext], dict[str, Any]], getattr(importlib.import_module(module), func))


def run_task(task: SlideTask, progress: Callable[[int, int], None] | None = None) -> SlideResult:
    """Process one slide; never raises for a slide problem (returns a failed result)."""
    path = Path(task.slide)
    stem = slide_stem(path)
    out_dir = Path(task.out_dir)
    result = SlideResult(slide=str(path), stem=stem, command=task.command, status="failed", out_dir=str(out_dir))
    if not task.overwrite and is_current(task, out_dir):
        return _skipped(result, out_dir)
    start = time.perf_counter()
    with slide_lock(out_dir) as got:
        if not got:
            return _locked(result, out_dir)
        # Another run may have finished this slide between the check above and the lock.
        if not task.overwrite and is_current(task, out_dir):
            return _skipped(result, out_dir)
        remove_stale_temporaries(out_dir)
        ctx = JobContext(path, out_dir, task.params, task.slide_mpp, max(1, task.threads))
        if progress is not None:
            ctx.progress = progress
        extra: dict[str, Any] = {}
        try:
            job = _load_job(task.command)
            payload = job(ctx)
            result.status = "done"
            result.outputs = payload.get("outputs", {})
            result.stats = payload.get("stats", {})
            extra = payload.get("slide", {})
            if ctx.warnings:
                result.message = "; ".join(ctx.warnings)
        except EmptySlide as exc:
            result.status = "empty"
            result.message = str(exc)
            result.outputs = exc.outputs
            result.stats = exc.stats
        except SlideError as exc:  # MissingMppError too: the message names the options to set
            result.message = flag_text(exc)
        except MemoryError:
            result.message = f"{path.name}: out of memory; try a coarser --mpp or fewer --jobs"
        except OSError as exc:
            where = exc.filename or out_dir
            result.message = f"{path.name}: {exc.strerror or exc} ({where})"
            if exc.errno == 28:
                result.message = f"{path.name}: disk full while writing {where}; free space and re-run"
        except Exception as exc:  # a bug or an unforeseen file problem: keep the batch going
            detail = traceback.format_exc() if task.debug else f"{type(exc).__name__}: {exc}"
            result.message = f"{path.name}: unexpected error ({detail.strip()}); re-run with --debug for details"
        result.seconds = time.perf_counter() - start
        extra["_warnings"] = ctx.warnings
        if result.status in ("done", "empty"):
            update_manifest(out_dir, task, result, extra)
        else:
            with contextlib.suppress(OSError):
                update_manifest(out_dir, task, result, extra)
    return result


def _skipped(result: SlideResult, out_dir: Path, message: str = "outputs complete and current") -> SlideResult:
    step = read_manifest(out_dir)["steps"][result.command]
    result.status, result.message = "skipped", message
    result.outputs, result.stats = step.get("outputs", {}), step.get("stats") or {}
    return result


def _locked(result: SlideResult, out_dir: Path) -> SlideResult:
    holder = read_lock(out_dir) or {}
    who = f" (host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('time')})" if holder else ""
    result.status = "locked"
    result.message = f"{Path(result.slide).name}: another run is working on this slide{who}; {out_dir / LOCK}"
    return result


def run_task_in_worker(task: SlideTask) -> SlideResult:
    """:func:`run_task` without a progress hook: what a pool or cluster worker runs.

    Such a worker shares its machine with others, one slide each: OpenCV gets the threads the
    task was given (one, unless --jobs exceeds the slides) rather than a pool per core in every
    worker, as Dask already does for OpenMP and BLAS.
    """
    from wsi_amr.run.resources import opencv_threads

    with opencv_threads(max(1, task.threads)):
        return run_task(task)


def worker_failed(task: SlideTask, exc: BaseException) -> SlideResult:
    """The result of a task whose worker failed under it: the process died (killed, out of
    memory), or could not run it at all (wsi-amr missing on a cluster worker)."""
    return SlideResult(task.slide, slide_stem(task.slide), task.command, "failed",
                       message=f"{Path(task.slide).name}: its worker failed ({type(exc).__name__}: {exc})",
                       out_dir=task.out_dir)


@contextlib.contextmanager
def spawning_without_main() -> Iterator[None]:
    """Worker processes spawned inside the block skip re-importing this program's ``__main__``.

    A spawned process first imports its parent's main module: for ``wsi-amr`` the whole command
    line (and, under ``python -m`` or a script, whatever that imports), where a slide task needs
    only :mod:`wsi_amr.run.worker` and its job module. Tasks never refer to ``__main__``.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main
