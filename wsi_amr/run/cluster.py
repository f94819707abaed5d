"""Slides on a Dask cluster: ``--scheduler tcp://host:port``, a scheduler file, or ``local:N``.

Dask is an optional extra (``pip install "wsi-amr[dask]"``), imported here only, and only when a
run asks for a scheduler. What travels to a worker is a :class:`~wsi_amr.run.task.SlideTask` (plain
data); the worker opens the slide itself and runs :func:`~wsi_amr.run.worker.run_task`, as a local pool
process does, so locks, manifests, results and ``summary.csv`` are the same whichever ran a slide.
Workers need the same wsi-amr installed, and the slides and the output folder at the same paths.
"""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from wsi_amr.run.task import InputError, SlideResult, SlideTask
from wsi_amr.run.worker import run_task_in_worker, spawning_without_main, worker_failed

#: Seconds to wait for a scheduler before giving up with one line.
CONNECT_TIMEOUT_S = 10.0
MISSING = 'Dask is not installed: pip install "wsi-amr[dask]" (or give --jobs N to use this machine only)'
_LOCAL = re.compile(r"local:(\d+)")
#: Dask settings for the ``local:N`` clusters this module starts. A slide task runs for seconds to
#: minutes, so the worker's statistical profiler (a stack sample every 10 ms) and the 20 ms
#: event-loop ticks buy nothing and cost CPU: an idle two-worker cluster used 0.21 of a core with
#: Dask's defaults and 0.03 with these. Workers started by hand can be given the same in a Dask
#: config file (docs/cluster.md).
LOCAL_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    # Dask sets MALLOC_TRIM_THRESHOLD_ in its workers, which also turns off glibc's adaptive mmap
    # threshold: every image-sized array then costs an mmap, page faults and an munmap (tiling
    # measured slower in those workers: docs/benchmarks.md, "Batch throughput").
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,  # None: not set at all
}


def check_scheduler(address: str) -> None:
    """:class:`InputError` (one line) unless ``address`` is ``local:N`` (N >= 1), a URL such as
    ``tcp://host:8786``, or an existing scheduler file (JSON, as ``dask scheduler
    --scheduler-file`` writes); and unless Dask can be imported."""
    local = _LOCAL.fullmatch(address)
    if address.startswith("local") and (local is None or int(local[1]) < 1):
        raise InputError(f"--scheduler {address}: give local:N with N worker processes (at least 1), e.g. local:4")
    if local is None and "://" not in address and not Path(address).is_file():
        raise InputError(f"--scheduler {address}: give a scheduler address (tcp://HOST:PORT), a scheduler file, "
                         "or local:N")
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise InputError(MISSING) from None


@contextlib.contextmanager
def connect(address: str) -> Iterator[Any]:
    """A ``distributed.Client`` for ``address`` for the block: ``local:N`` starts a LocalCluster of
    N single-threaded worker processes on loopback and stops it afterwards. An unreachable
    scheduler is an :class:`InputError` after :data:`CONNECT_TIMEOUT_S`."""
    check_scheduler(address)
    import dask
    from distributed import Client, LocalCluster

    with contextlib.ExitStack() as stack:
        local = _LOCAL.fullmatch(address)
        try:
            if local is not None:
                stack.enter_context(dask.config.set(LOCAL_CONFIG))
                with spawning_without_main():
                    cluster = stack.enter_context(LocalCluster(
                        n_workers=int(local[1]), threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address=":0", silence_logs=logging.ERROR))
                client = stack.enter_context(Client(cluster))
            elif "://" in address:
                client = stack.enter_context(Client(address, timeout=CONNECT_TIMEOUT_S))
            else:
                client = stack.enter_context(Client(scheduler_file=address, timeout=CONNECT_TIMEOUT_S))
        except (OSError, TimeoutError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"--scheduler {address}: cannot reach the Dask scheduler ({reason})") from None
        yield client


def run_on_cluster(address: str, tasks: Sequence[SlideTask], finish: Callable[[int, SlideResult], None]) -> None:
    """Run every task on the cluster at ``address``; ``finish(i, result)`` as each one ends.

    A task whose worker fails (dies, or cannot import wsi-amr) is a failed result for that slide
    only. Ctrl-C cancels what has not started; slides already finished stay finished.
    """
    from distributed import as_completed

    run = uuid.uuid4().hex[:12]  # keys are global on a scheduler: another run's slides must not match
    with connect(address) as client:
        futures = {client.submit(run_task_in_worker, task, pure=False,
                                 key=f"wsi-amr-{task.command}-{Path(task.slide).name}-{run}-{i}"): i
                   for i, task in enumerate(tasks)}
        try:
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    res = fut.result()
                except Exception as exc:  # KilledWorker, or the task could not be unpickled there
                    res = worker_failed(tasks[i], exc)
                finish(i, res)
        except BaseException:
            client.cancel(list(futures))
            raise
