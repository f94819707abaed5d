"""Output files: atomic writes and the per-slide output folder layout.

Every file the tool writes goes to a temporary name beside its final name and is renamed into
place only once complete, so an interrupted run never leaves a half-written file that looks done.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    The temporary name keeps the final suffix (``.tmp-XXXX-tiles.h5``) so libraries that pick a
    format by extension still work. On error the temporary file is removed and ``path`` is left
    untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-" + final.name, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; give the file the permissions a plain open() would have.
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_png_atomic(path: str | os.PathLike[str], rgb: Any) -> None:
    """Encode an RGB (H, W, 3) or grey (H, W) uint8 array as PNG and write it atomically."""
    import cv2
    import numpy as np

    arr = np.asarray(rgb)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise OSError(f"could not encode PNG for {path}")
    write_bytes_atomic(path, buf.tobytes())


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> int:
    """Delete temporary files an interrupted run left in ``folder``; return how many."""
    n = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in folder.rglob(TMP_PREFIX + "*"):
        with contextlib.suppress(OSError):
            if p.is_dir():
                import shutil

                shutil.rmtree(p)
            else:
                p.unlink()
            n += 1
    return n


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class OutputFolderError(Exception):
    """An output folder that cannot be created or written to (one line naming it)."""


def check_output_folder(out: Path) -> None:
    """Create ``out`` and make sure we can write there; :class:`OutputFolderError` otherwise."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputFolderError(f"{out}: cannot write to the output folder ({exc.strerror or exc})") from exc
