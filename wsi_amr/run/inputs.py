"""The slides a command was given: files, folders, globs and lists, resolved to paths."""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from wsi_amr.slide import SLIDE_EXTENSIONS


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

