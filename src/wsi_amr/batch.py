"""Batch runs: one slide is the unit of work, every per-slide command goes through here.

The runner takes the resolved slide list and the name of a per-slide job, and for each slide:
skips it when its outputs are complete and current (unless ``overwrite``), takes the slide's lock,
runs the job, and records the outcome in ``OUT/<stem>/manifest.json`` and ``OUT/summary.csv``.
A failing slide fails alone; the caller gets every result back and turns them into an exit status.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import glob
import importlib
import io
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from .outputs import remove_stale_temporaries, write_json_atomic
from .slide import SLIDE_EXTENSIONS, MissingMppError, SlideError, slide_stem

# Per-slide jobs by command name, as "module:function"; imported inside the worker so that the
# task that travels to another process is plain data.
JOBS: dict[str, str] = {
    "tissue": "wsi_amr.jobs.tissue:run",
    "tile": "wsi_amr.jobs.tile:run",
    "quadtree": "wsi_amr.jobs.quadtree:run",
    "segment": "wsi_amr.jobs.segment:run",
    "classify": "wsi_amr.jobs.classify:run",
}

MANIFEST = "manifest.json"
LOCK = ".lock"
SUMMARY = "summary.csv"
SUMMARY_FIELDS = ["finished", "command", "slide", "stem", "status", "seconds", "message", "out_dir", "predicted",
                  "probabilities"]


class InputError(Exception):
    """Bad input paths; one line for the user."""


@dataclass
class SlideTask:
    """Everything a worker needs to process one slide: plain data, so it pickles."""

    command: str
    slide: str
    out_dir: str
    params: dict[str, Any]
    slide_mpp: float | None = None
    overwrite: bool = False
    threads: int = 1
    debug: bool = False
    command_line: str = ""


@dataclass
class SlideResult:
    slide: str
    stem: str
    command: str
    status: str  # done | skipped | empty | failed | locked
    seconds: float = 0.0
    message: str = ""
    out_dir: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in ("done", "skipped")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JobContext:
    """Handed to a per-slide job: where to write, with what parameters, and a progress hook."""

    slide_path: Path
    out_dir: Path
    params: dict[str, Any]
    slide_mpp: float | None
    threads: int
    progress: Callable[[int, int], None] = lambda done, total: None
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


class EmptySlide(Exception):
    """The job finished and wrote its outputs, but the slide had nothing to work on (no tissue)."""

    def __init__(self, message: str, outputs: dict[str, str], stats: dict[str, Any] | None = None):
        super().__init__(message)
        self.outputs = outputs
        self.stats = stats or {}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def is_slide_name(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(SLIDE_EXTENSIONS) and not lower.startswith(".")


def resolve_inputs(items: Sequence[str], stdin: TextIO | None = None,
                   exclude: Path | None = None) -> tuple[list[Path], list[str]]:
    """Slide paths from files, folders (searched recursively), globs and ``-`` (stdin lines).

    Returns the paths in a stable order without duplicates, and one message per input that gave
    nothing (missing path, folder or glob without slides). Folder searches skip ``exclude`` (the
    output folder, whose mask.tiff files would otherwise come back as slides on a rerun).
    """
    skip = exclude.resolve() if exclude is not None else None

    def wanted(q: Path) -> bool:
        if not (q.is_file() and is_slide_name(q.name) and ".tmp-" not in q.name):
            return False
        return skip is None or not q.resolve().is_relative_to(skip)

    paths: list[Path] = []
    problems: list[str] = []
    expanded: list[str] = []
    for item in items:
        if item == "-":
            src = stdin if stdin is not None else sys.stdin
            expanded.extend(line.strip() for line in src if line.strip() and not line.startswith("#"))
        else:
            expanded.append(item)
    for item in expanded:
        p = Path(item).expanduser()
        if p.is_dir() and p.suffix.lower() != ".mrxs":
            found = sorted(q for q in p.rglob("*") if wanted(q))
            if not found:
                problems.append(f"{p}: folder holds no slides ({', '.join(SLIDE_EXTENSIONS[:6])}, ...)")
            paths.extend(found)
        elif p.exists():
            paths.append(p)
        elif glob.has_magic(item):
            found = sorted(Path(m) for m in glob.glob(os.path.expanduser(item), recursive=True) if Path(m).is_file())
            if not found:
                problems.append(f"{item}: no file matches")
            paths.extend(found)
        else:
            problems.append(f"{p}: no such file or folder")
    seen: set[Path] = set()
    unique = []
    for p in paths:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique, problems


def check_output_folder(out: Path) -> None:
    """Create ``out`` and make sure we can write there; :class:`InputError` otherwise."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"{out}: cannot write to the output folder ({exc.strerror or exc})") from exc


# ---------------------------------------------------------------------------------------------
# Manifest, freshness, locks
# ---------------------------------------------------------------------------------------------
def slide_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime": round(st.st_mtime, 3)}


def read_manifest(out_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((out_dir / MANIFEST).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def step_is_current(
    out_dir: Path, slide: Path, command: str, params: dict[str, Any], slide_mpp: float | None
) -> bool:
    """True when ``command`` already finished on this slide, with these parameters, and its
    outputs are all there."""
    manifest = read_manifest(out_dir)
    step = manifest.get("steps", {}).get(command)
    if not step or step.get("status") not in ("done", "empty"):
        return False
    try:
        ident = slide_identity(slide)
    except OSError:
        return False
    old = manifest.get("slide", {})
    if old.get("bytes") != ident["bytes"] or old.get("mtime") != ident["mtime"]:
        return False
    if step.get("slide_mpp") != slide_mpp or step.get("params") != _jsonable(params):
        return False
    return all((out_dir / name).exists() for name in step.get("outputs", {}).values())


def is_current(task: SlideTask, out_dir: Path) -> bool:
    """True when this task's outputs are complete and current (the task can be skipped)."""
    return step_is_current(out_dir, Path(task.slide), task.command, task.params, task.slide_mpp)


def is_current_step(ctx: JobContext, command: str, params: dict[str, Any]) -> bool:
    """For a job: has ``command`` already run on this slide with exactly ``params``?"""
    return step_is_current(ctx.out_dir, ctx.slide_path, command, params, ctx.slide_mpp)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def update_manifest(out_dir: Path, task: SlideTask, result: SlideResult, extra: dict[str, Any]) -> None:
    manifest = read_manifest(out_dir)
    with contextlib.suppress(OSError):
        manifest["slide"] = {**manifest.get("slide", {}), **slide_identity(Path(task.slide)), **extra}
    manifest["tool"] = {"name": "wsi-amr", "version": __version__}
    manifest.setdefault("steps", {})[task.command] = {
        "status": result.status,
        "command": task.command_line,
        "params": _jsonable(task.params),
        "slide_mpp": task.slide_mpp,
        "finished": _now(),
        "seconds": round(result.seconds, 3),
        "outputs": result.outputs,
        "stats": result.stats,
        "error": result.message if result.status == "failed" else None,
        "warnings": extra.get("_warnings", []),
    }
    manifest["slide"].pop("_warnings", None)
    write_json_atomic(out_dir / MANIFEST, manifest)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def slide_lock(out_dir: Path) -> Iterator[bool]:
    """Hold ``OUT/<stem>/.lock`` (host, pid, time) while a slide is worked on.

    Yields False when another live process holds it. A lock left by a dead process on this host
    is taken over.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = out_dir / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid(), "time": _now()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            same_host = holder.get("host") == me["host"]
            pid = holder.get("pid")
            if same_host and isinstance(pid, int) and not _pid_alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                continue  # stale: take it over
            if not holder:  # an empty lock being written right now, or garbage: treat as held
                pass
            yield False
            return
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(me))
        try:
            yield True
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
        return
    yield False


# ---------------------------------------------------------------------------------------------
# Running one slide (in this process or a worker)
# ---------------------------------------------------------------------------------------------
def _load_job(command: str) -> Callable[[JobContext], dict[str, Any]]:
    module, func = JOBS[command].split(":")
    return getattr(importlib.import_module(module), func)  # type: ignore[no-any-return]


def run_task(task: SlideTask, progress: Callable[[int, int], None] | None = None) -> SlideResult:
    """Process one slide; never raises for a slide problem (returns a failed result)."""
    path = Path(task.slide)
    stem = slide_stem(path)
    out_dir = Path(task.out_dir)
    result = SlideResult(slide=str(path), stem=stem, command=task.command, status="failed", out_dir=str(out_dir))
    if not task.overwrite and is_current(task, out_dir):
        result.status = "skipped"
        result.message = "outputs complete and current"
        step = read_manifest(out_dir)["steps"][task.command]
        result.outputs, result.stats = step.get("outputs", {}), step.get("stats") or {}
        return result
    start = time.perf_counter()
    with slide_lock(out_dir) as got:
        if not got:
            result.status = "locked"
            result.message = f"another run is working on this slide ({out_dir / LOCK})"
            return result
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
        except MissingMppError as exc:
            result.message = str(exc)
        except SlideError as exc:
            result.message = str(exc)
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


def _run_task_in_worker(task: SlideTask) -> SlideResult:
    return run_task(task)


# ---------------------------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------------------------
@dataclass
class BatchOptions:
    out: Path
    jobs: int = 1
    overwrite: bool = False
    slide_mpp: float | None = None
    debug: bool = False
    command_line: str = ""


def make_tasks(command: str, slides: Sequence[Path], params: dict[str, Any], opts: BatchOptions) -> tuple[list[SlideTask], list[SlideResult]]:
    """One task per slide; slides whose output folder would collide with another's fail."""
    tasks: list[SlideTask] = []
    clashes: list[SlideResult] = []
    seen: dict[str, Path] = {}
    n_threads = max(1, opts.jobs // max(1, len(slides)))
    for path in slides:
        stem = slide_stem(path)
        if stem in seen:
            clashes.append(
                SlideResult(str(path), stem, command, "failed",
                            message=f"{path}: same name as {seen[stem]}; both would write {opts.out / stem} (rename one)")
            )
            continue
        seen[stem] = path
        tasks.append(
            SlideTask(command, str(path), str(opts.out / stem), params, opts.slide_mpp, opts.overwrite,
                      n_threads, opts.debug, opts.command_line)
        )
    return tasks, clashes


def run_batch(
    tasks: Sequence[SlideTask],
    *,
    jobs: int = 1,
    on_result: Callable[[SlideResult], None] | None = None,
    progress_factory: Callable[[int], Any] | None = None,
) -> list[SlideResult]:
    """Run ``tasks`` serially or on a pool of ``jobs`` processes; results in input order."""
    results: dict[int, SlideResult] = {}
    progress = progress_factory(len(tasks)) if progress_factory else None

    def finish(i: int, res: SlideResult) -> None:
        results[i] = res
        if on_result:
            on_result(res)
        if progress is not None:
            progress.slide_done(res)

    try:
        workers = min(jobs, len(tasks))
        if workers <= 1:
            for i, task in enumerate(tasks):
                cb = progress.slide_progress(task) if progress is not None else None
                finish(i, run_task(task, cb))
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                pending: dict[Future[SlideResult], int] = {
                    pool.submit(_run_task_in_worker, t): i for i, t in enumerate(tasks)
                }
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        i = pending.pop(fut)
                        try:
                            res = fut.result()
                        except Exception as exc:  # a worker died (killed, out of memory)
                            t = tasks[i]
                            res = SlideResult(t.slide, slide_stem(t.slide), t.command, "failed",
                                              message=f"{Path(t.slide).name}: worker process died ({exc})",
                                              out_dir=t.out_dir)
                        finish(i, res)
    finally:
        if progress is not None:
            progress.close()
    return [results[i] for i in sorted(results)]


def append_summary(out: Path, results: Iterable[SlideResult]) -> None:
    """Append one row per slide to ``OUT/summary.csv`` (header written when the file is new).

    ``predicted`` and ``probabilities`` (a JSON object of class name to probability) are filled by
    ``classify`` and empty otherwise. A file begun with other columns (an older wsi-amr) keeps
    them: rows are written with its header.
    """
    rows = list(results)
    if not rows:
        return
    path = out / SUMMARY
    buf = io.StringIO()
    new = not path.exists() or path.stat().st_size == 0
    header = SUMMARY_FIELDS
    if not new:
        with open(path, encoding="utf-8", newline="") as fh:
            header = next(csv.reader(fh), None) or SUMMARY_FIELDS
    writer = csv.DictWriter(buf, header, extrasaction="ignore")
    if new:
        writer.writeheader()
    stamp = _now()
    for r in rows:
        probabilities = r.stats.get("probabilities")
        writer.writerow({
            "finished": stamp, "command": r.command, "slide": r.slide, "stem": r.stem,
            "status": r.status, "seconds": f"{r.seconds:.3f}", "message": r.message, "out_dir": r.out_dir,
            "predicted": r.stats.get("predicted", ""),
            "probabilities": json.dumps(probabilities) if isinstance(probabilities, dict) else "",
        })
    # One write in append mode: concurrent runs interleave whole blocks, not half lines.
    with open(path, "a", encoding="utf-8", newline="") as fh:
        fh.write(buf.getvalue())
