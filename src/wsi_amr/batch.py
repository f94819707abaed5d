"""Batch runs: one slide is the unit of work, every per-slide command goes through here.

The runner takes the resolved slide list and the name of a per-slide job, and for each slide:
skips it when its outputs are complete and current (unless ``overwrite``), takes the slide's lock,
runs the job, and records the outcome in ``OUT/<stem>/manifest.json`` and ``OUT/summary.csv``.
A failing slide fails alone; the caller gets every result back and turns them into an exit status.

The same tasks run serially, on a local process pool (``--jobs``), or on a Dask cluster
(``--scheduler``, :mod:`wsi_amr.cluster`); a run may take only its shard of the list (``--shard``,
or the Slurm job-array task it runs in). The per-slide lock keeps any two runs, on any hosts, off
the same slide at once, so shards, concurrent runs and retried cluster tasks are all safe.
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
import re
import socket
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from .outputs import TMP_PREFIX, remove_stale_temporaries, write_json_atomic
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


#: A lock is refreshed (its mtime touched) this often while held, so that runs on other hosts,
#: which cannot ask whether the holder's process is alive, can tell a live lock from a dead one.
LOCK_REFRESH_S = 30.0
#: A lock from another host not refreshed for this long is stale (its holder died or was cut off).
LOCK_STALE_S = 300.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_identity(pid: int) -> str | None:
    """Boot id and start time of process ``pid`` (Linux), or None where unknown: with the pid it
    names one process, so a lock's pid reused by an unrelated process does not look alive."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return None


def lock_is_stale(holder: dict[str, Any], age_s: float) -> bool:
    """Whether a lock whose file says ``holder`` and was last refreshed ``age_s`` ago belongs to no
    live run: on this host its process is gone (or the pid now names another process); from
    another host, or unreadable, it has not been refreshed for :data:`LOCK_STALE_S`."""
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        if not _pid_alive(pid):
            return True
        recorded, now = holder.get("process"), process_identity(pid)
        return recorded is not None and now is not None and recorded != now
    return age_s > LOCK_STALE_S


def _create_lock(lock: Path, text: str) -> bool:
    """Create ``lock`` holding ``text`` unless it exists; the file never appears empty (written
    aside and hard-linked into place; O_EXCL where links are not supported)."""
    tmp = lock.with_name(f"{TMP_PREFIX}{lock.name}-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(text)
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some FUSE and FAT file systems)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return True
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _break_stale_lock(lock: Path) -> bool:
    """Remove ``lock`` if it is stale; True when it was (or is gone). Breakers take a short guard
    file first and re-read the lock under it, so two runs never both break the same lock and one
    of them delete the other's fresh lock."""
    try:
        text = lock.read_text()
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return True
    if not lock_is_stale(_lock_holder(text), age):
        return False
    guard = lock.with_name(lock.name + ".break")
    if not _create_lock(guard, text):
        with contextlib.suppress(OSError):  # a breaker that died holding the guard
            if time.time() - guard.stat().st_mtime > LOCK_REFRESH_S:
                guard.unlink()
        return False
    try:
        with contextlib.suppress(FileNotFoundError):
            if lock.read_text() == text:
                lock.unlink()
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            guard.unlink()


def _lock_holder(text: str) -> dict[str, Any]:
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def read_lock(out_dir: Path) -> dict[str, Any] | None:
    """What ``OUT/<stem>/.lock`` says (host, pid, time, ...; empty when unreadable), or None when
    there is no lock."""
    try:
        return _lock_holder((out_dir / LOCK).read_text())
    except FileNotFoundError:
        return None
    except OSError:
        return {}


@contextlib.contextmanager
def slide_lock(out_dir: Path) -> Iterator[bool]:
    """Hold ``OUT/<stem>/.lock`` (host, pid, process identity, time) while a slide is worked on.

    Yields False when a live run holds it. A stale lock (:func:`lock_is_stale`) is taken over.
    While held, a background thread refreshes the file's mtime every :data:`LOCK_REFRESH_S`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = out_dir / LOCK
    pid = os.getpid()
    text = json.dumps({"host": socket.gethostname(), "pid": pid, "process": process_identity(pid), "time": _now()})
    for _ in range(5):
        if _create_lock(lock, text):
            break
        if not _break_stale_lock(lock):
            yield False
            return
    else:
        yield False
        return
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(LOCK_REFRESH_S):
            with contextlib.suppress(OSError):
                os.utime(lock)

    beat = threading.Thread(target=refresh, name=f"lock {out_dir.name}", daemon=True)
    beat.start()
    try:
        yield True
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(OSError):
            if lock.read_text() == text:  # still ours (not broken by a run that found it stale)
                lock.unlink()


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
    from .jobs import opencv_threads

    with opencv_threads(max(1, task.threads)):
        return run_task(task)


def worker_failed(task: SlideTask, exc: BaseException) -> SlideResult:
    """The result of a task whose worker failed under it: the process died (killed, out of
    memory), or could not run it at all (wsi-amr missing on a cluster worker)."""
    return SlideResult(task.slide, slide_stem(task.slide), task.command, "failed",
                       message=f"{Path(task.slide).name}: its worker failed ({type(exc).__name__}: {exc})",
                       out_dir=task.out_dir)


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
    shard: tuple[int, int] | None = None  # (index, count): this run's share of the slides
    scheduler: str | None = None  # a Dask scheduler (see wsi_amr.cluster); None: this machine


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N; :class:`InputError` (one line) otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise InputError(f"--shard must be I/N (share I of N, counted from 0), e.g. 0/4, not {text!r}")
    index, count = int(m[1]), int(m[2])
    if count < 1 or index >= count:
        raise InputError(f"--shard {text}: N must be at least 1 and I one of 0..N-1 (the shards of 4 are 0/4 to 3/4)")
    return index, count


def shard_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The shard of a Slurm job-array task, or None outside a job array.

    The task's place among ``SLURM_ARRAY_TASK_COUNT`` tasks: ``SLURM_ARRAY_TASK_ID`` counted from
    ``SLURM_ARRAY_TASK_MIN`` in steps of ``SLURM_ARRAY_TASK_STEP`` (``--array=0-9`` and
    ``--array=1-20:2`` both work; a list such as ``--array=1,5,7`` needs ``--shard``).
    """
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return None
    try:
        task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
        first = int(env.get("SLURM_ARRAY_TASK_MIN") or 0)
        step = max(1, int(env.get("SLURM_ARRAY_TASK_STEP") or 1))
    except ValueError:
        raise InputError("SLURM_ARRAY_TASK_ID/_COUNT/_MIN/_STEP are not whole numbers; give --shard I/N") from None
    index, off = divmod(task - first, step)
    if off or not 0 <= index < count:
        raise InputError(f"SLURM_ARRAY_TASK_ID {task} is not one of {count} array tasks from {first} in steps of "
                         f"{step}; use a range (--array=0-{count - 1}) or give --shard I/N")
    return index, count


def in_shard(items: Sequence[Any], index: int, count: int, key: Callable[[Any], Any]) -> list[Any]:
    """The items of shard ``index`` of ``count``: the items sorted by ``key`` are dealt out in turn,
    so every item is in exactly one shard and shards differ in size by at most one, whatever order
    each shard's run was given them in. Input order is kept within the shard."""
    order = sorted(range(len(items)), key=lambda i: key(items[i]))
    mine = set(order[index::count])
    return [item for i, item in enumerate(items) if i in mine]


def make_tasks(command: str, slides: Sequence[Path], params: dict[str, Any], opts: BatchOptions) -> tuple[list[SlideTask], list[SlideResult]]:
    """One task per slide of this run's shard (all slides without one); slides whose output folder
    would collide with another's fail. Collisions are found over the whole list, so every shard
    agrees on them."""
    items: list[SlideTask | SlideResult] = []
    seen: dict[str, Path] = {}
    for path in slides:
        stem = slide_stem(path)
        if stem in seen:
            items.append(
                SlideResult(str(path), stem, command, "failed",
                            message=f"{path}: same name as {seen[stem]}; both would write {opts.out / stem} (rename one)")
            )
            continue
        seen[stem] = path
        items.append(SlideTask(command, str(path), str(opts.out / stem), params, opts.slide_mpp, opts.overwrite,
                               1, opts.debug, opts.command_line))
    if opts.shard is not None:
        items = in_shard(items, *opts.shard,
                         key=lambda item: (slide_stem(item.slide), str(Path(item.slide).resolve())))
    tasks = [item for item in items if isinstance(item, SlideTask)]
    # Spare local processes speed up one slide's tile reads; a cluster worker runs one slide alone.
    threads = 1 if opts.scheduler else max(1, opts.jobs // max(1, len(tasks)))
    for task in tasks:
        task.threads = threads
    return tasks, [item for item in items if isinstance(item, SlideResult)]


def run_batch(
    tasks: Sequence[SlideTask],
    *,
    jobs: int = 1,
    scheduler: str | None = None,
    on_result: Callable[[SlideResult], None] | None = None,
    progress_factory: Callable[[int], Any] | None = None,
) -> list[SlideResult]:
    """Run ``tasks`` serially, on a pool of ``jobs`` local processes, or on the Dask cluster at
    ``scheduler`` (:mod:`wsi_amr.cluster`); results in input order, the same whatever ran them.

    Slides another run held locked are looked at again once the rest are done: those it finished
    meanwhile count as skipped. ``on_result`` sees every result once, locked ones last.
    """
    results: dict[int, SlideResult] = {}
    progress = progress_factory(len(tasks)) if progress_factory else None

    def finish(i: int, res: SlideResult) -> None:
        results[i] = res
        if on_result and res.status != "locked":
            on_result(res)
        if progress is not None:
            progress.slide_done(res)

    try:
        workers = min(jobs, len(tasks))
        if scheduler is not None:
            from .cluster import run_on_cluster

            run_on_cluster(scheduler, tasks, finish)
        elif workers <= 1:
            for i, task in enumerate(tasks):
                cb = progress.slide_progress(task) if progress is not None else None
                finish(i, run_task(task, cb))
        else:
            _run_on_pool(tasks, workers, finish)
    finally:
        if progress is not None:
            progress.close()
    for i, res in sorted(results.items()):
        if res.status == "locked":
            task = tasks[i]
            if not task.overwrite and is_current(task, Path(task.out_dir)):
                results[i] = _skipped(res, Path(task.out_dir), "finished by another run while this one ran")
            if on_result:
                on_result(results[i])
    return [results[i] for i in sorted(results)]


@contextlib.contextmanager
def spawning_without_main() -> Iterator[None]:
    """Worker processes spawned inside the block skip re-importing this program's ``__main__``.

    A spawned process first imports its parent's main module: for ``wsi-amr`` the whole command
    line (and, under ``python -m`` or a script, whatever that imports), where a slide task needs
    only :mod:`wsi_amr.batch` and its job module. Tasks never refer to ``__main__``.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _run_on_pool(tasks: Sequence[SlideTask], workers: int, finish: Callable[[int, SlideResult], None]) -> None:
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        with spawning_without_main():  # the pool starts its processes as tasks are submitted
            pending: dict[Future[SlideResult], int] = {pool.submit(run_task_in_worker, t): i
                                                       for i, t in enumerate(tasks)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                try:
                    res = fut.result()
                except Exception as exc:  # a worker died (killed, out of memory)
                    res = worker_failed(tasks[i], exc)
                finish(i, res)


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
