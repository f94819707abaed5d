"""Shared fixtures: where the real data lives, synthetic slides, and a CLI runner."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]


def bench_module(name: str):
    """A module of ``bench/`` (benchmark helpers are not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
DATA = Path(os.environ.get("WSI_AMR_DATA", REPO.parent / "shared" / "data"))
SLIDES = DATA / "slides"
GLAS = DATA / "glas"
NO_DATA = f"real test data not found at {DATA} (set WSI_AMR_DATA or put ../shared/data beside the repo)"

PINK = (200, 110, 170)


def real_slides() -> list[Path]:
    """Every slide file under the shared slides folder except the deliberately bad ones."""
    if not SLIDES.is_dir():
        return []
    return [p for p in sorted(SLIDES.rglob("*")) if p.is_file() and "negative" not in p.parts
            and "licenses" not in p.parts and p.suffix != ".md"]


@pytest.fixture
def slides_dir() -> Path:
    if not SLIDES.is_dir():
        pytest.skip(NO_DATA)
    return SLIDES


@pytest.fixture
def glas_dir() -> Path:
    if not GLAS.is_dir():
        pytest.skip(NO_DATA)
    return GLAS


def copy_glas(glas: Path, names: list[str], into: Path) -> tuple[Path, Path]:
    """GlaS images ``names`` and their masks copied into ``into``/images and ``into``/masks."""
    images, masks = into / "images", into / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for name in names:
        shutil.copy(glas / "images" / f"{name}.png", images)
        shutil.copy(glas / "masks" / f"{name}.png", masks)
    return images, masks


def write_pyramid_tiff(path: Path, image: np.ndarray, mpp: float | None = 0.5, tile: int = 256,
                       levels: int = 3, compression: str = "zlib") -> Path:
    """A tiled pyramidal RGB TIFF that OpenSlide's generic-tiff driver opens (levels as IFDs)."""
    kwargs = {}
    if mpp is not None:
        kwargs = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tw:
        level = image
        for i in range(levels):
            tw.write(level, tile=(tile, tile), compression=compression, photometric="rgb",
                     subfiletype=1 if i else 0, **kwargs)
            if min(level.shape[:2]) < 2 * tile:
                break
            level = level[: level.shape[0] // 2 * 2, : level.shape[1] // 2 * 2]
            level = level.reshape(level.shape[0] // 2, 2, level.shape[1] // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
    return path


def textured(h: int, w: int, color=PINK, seed: int = 0) -> np.ndarray:
    """A stained-looking texture: a colour with noise, so it has saturation and detail."""
    rng = np.random.default_rng(seed)
    base = np.empty((h, w, 3), np.float32)
    base[:] = color
    base += rng.normal(0, 12, (h, w, 1))
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.fixture
def rect_slide(tmp_path: Path) -> tuple[Path, tuple[int, int, int, int]]:
    """A 3072x2048 slide at 0.5 µm/px: white glass with one tissue rectangle aligned to a 256 grid.

    Returns the path and the rectangle (x, y, w, h) in level-0 px.
    """
    img = np.full((2048, 3072, 3), 245, np.uint8)
    rect = (512, 256, 1536, 1280)  # x, y, w, h: 6 x 5 tiles of 256
    x, y, w, h = rect
    img[y : y + h, x : x + w] = textured(h, w)
    return write_pyramid_tiff(tmp_path / "rect.tiff", img), rect


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: torch's worker threads only add overhead, and on a busy 2-core machine they
    make small tensor work many times slower. Use as ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str, input: str | None = None):
    from wsi_amr.cli import app

    return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)
