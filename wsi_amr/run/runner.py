from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_amr.locks import _now
from wsi_amr.run.manifest import is_current
from wsi_amr.run.task import SUMMARY, SUMMARY_FIELDS, InputError, JobParams, SlideResult, SlideTask
from wsi_amr.run.worker import _skipped, run_task, run_task_in_worker, spawning_without_main, worker_failed
from wsi_amr.slide import slide_stem


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
    scheduler: str | None = None  # a Dask scheduler (see wsi_amr.run.cluster); None: this machine


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


def make_tasks(command: str, slides: Sequence[Path], params: JobParams, opts: BatchOptions) -> tuple[list[SlideTask], list[SlideResult]]:
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
    ``scheduler`` (:mod:`wsi_amr.run.cluster`); results in input order, the same whatever ran them.

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
            from wsi_amr.run.cluster import run_on_cluster

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
            header = next(csv.reader(fh), []) or SUMMARY_FIELDS
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
