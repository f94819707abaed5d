"""Compare two output folders of wsi-amr (e.g. `make demo` before and after a change).

    python bench/compare_outputs.py OLD/demo-out NEW/demo-out

Every file under OLD must exist under NEW and hold the same content:
- GeoJSON (.geojson, .geojson.gz): byte-equal once each feature's random uuid4 "id" is masked
  (ids are drawn afresh on every run, so two runs of the same code differ only there);
- .h5: the same datasets with equal values, and the same attributes;
- images (.png, .jpg): the same bytes;
- manifest.json: the same steps, parameters, outputs and stats (times, dates, the command line
  and where the checkout lies left out);
- anything else: the same bytes.
Prints one line per file and exits 1 when any differs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

import numpy as np

UUID = re.compile(rb'"id": ?"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"')
VOLATILE = {"finished", "seconds", "started", "mtime", "version", "command", "command_line", "tool"}


def _geojson_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return UUID.sub(b'"id": "<uuid>"', data)


def _h5_equal(a: Path, b: Path) -> str | None:
    import h5py

    with h5py.File(a) as fa, h5py.File(b) as fb:
        if sorted(fa.keys()) != sorted(fb.keys()):
            return f"datasets {sorted(fa.keys())} != {sorted(fb.keys())}"
        for key in fa:
            if not np.array_equal(fa[key][()], fb[key][()]):
                return f"dataset {key} differs"
            if dict(fa[key].attrs).keys() != dict(fb[key].attrs).keys():
                return f"attributes of {key} differ"
        for key in set(fa.attrs) | set(fb.attrs):
            va, vb = fa.attrs.get(key), fb.attrs.get(key)
            if not np.array_equal(np.asarray(va), np.asarray(vb)):
                return f"attribute {key}: {va!r} != {vb!r}"
    return None


def _stable(doc: object) -> object:
    if isinstance(doc, dict):
        return {k: _stable(v) for k, v in doc.items()
                if k not in VOLATILE and not k.startswith(("seconds", "cpu_seconds"))}
    if isinstance(doc, list):
        return [_stable(v) for v in doc]
    if isinstance(doc, str) and doc.startswith("/") and doc.endswith(".safetensors"):
        return Path(doc).name  # the checkout's location, not the model
    return doc


def compare(old: Path, new: Path) -> int:
    bad = 0
    for a in sorted(p for p in old.rglob("*") if p.is_file()):
        rel = a.relative_to(old)
        b = new / rel
        if not b.exists():
            print(f"MISSING {rel}")
            bad += 1
            continue
        name = a.name.lower()
        if name.endswith((".geojson", ".geojson.gz")):
            problem = None if _geojson_bytes(a) == _geojson_bytes(b) else "content differs (ids masked)"
        elif name.endswith(".h5"):
            problem = _h5_equal(a, b)
        elif name == "manifest.json":
            sa, sb = _stable(json.loads(a.read_text())), _stable(json.loads(b.read_text()))
            problem = None if sa == sb else "steps, parameters, outputs or stats differ"
        elif name == "summary.csv":
            problem = None  # one row per run, with times: not comparable
        else:
            problem = None if a.read_bytes() == b.read_bytes() else "bytes differ"
        print(f"{'DIFFERS' if problem else 'same   '} {rel}{': ' + problem if problem else ''}")
        bad += problem is not None
    print(f"{bad} of the files under {old} differ" if bad else f"all files under {old} are the same in {new}")
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    args = ap.parse_args()
    sys.exit(compare(args.old, args.new))


if __name__ == "__main__":
    main()
