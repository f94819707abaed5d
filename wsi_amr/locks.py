"""Folder locks that survive kill -9: a lock file naming its holder, refreshed while held and
broken when its process is gone or it went stale."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wsi_amr.outputs import TMP_PREFIX

LOCK = ".lock"


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


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
