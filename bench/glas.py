"""GlaS helpers for the benchmarks (not part of the package): the benign/malignant grade of each
image, from the dataset's ``grade.csv``."""

from __future__ import annotations

import csv
from pathlib import Path

from wsi_amr.ips.bags import BagError


def glas_grades(path: str | Path) -> dict[str, str]:
    """``{image name: 'benign' | 'malignant'}`` from GlaS's ``grade.csv``
    (columns: name, patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015))."""
    path = Path(path)
    try:
        rows = list(csv.reader(path.read_text().splitlines()))
    except OSError as exc:
        raise BagError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not rows or len(rows[0]) < 3 or "grade" not in rows[0][2].lower():
        raise BagError(f"{path}: not GlaS's grade.csv (name, patient ID, grade (GlaS), ...)")
    out = {}
    for row in rows[1:]:
        if len(row) >= 3 and row[0].strip():
            grade = row[2].strip().lower()
            if grade not in ("benign", "malignant"):
                raise BagError(f"{path}: {row[0]}: grade {row[2].strip()!r} is neither benign nor malignant")
            out[row[0].strip()] = grade
    return out
