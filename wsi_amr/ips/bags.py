"""Bags of patches for IPS classification: feature files, images cut into patches, label lists.

A bag is what IPS streams: rows (pre-extracted embeddings, or RGB patches for the built-in
encoder) with the position of each. Sources:

- **Feature files** as CLAM and TRIDENT write them: an HDF5 file per slide with ``features``
  (N, D) and ``coords`` (N, 2, level-0 top-left of each patch). Rows are read a chunk at a time
  (:func:`wsi_amr.ips.model.iter_chunks`), never the whole file; coordinates are kept beside them (the
  authors' code dropped them, so attention could not be drawn back on the slide).
- **Slides**: square patches on the tissue-filtered tile grid (:func:`wsi_amr.tiling.tile_grid`)
  at a working mpp, read from the slide only when their chunk is streamed (:class:`SlidePatches`).
- **Images** (e.g. GlaS, each image one bag) cut into a grid of square patches that covers the
  whole image, the last row and column flush with its edges (:func:`image_patches`, or
  :class:`ImagePatches` to cut them a chunk at a time).
- **Labels**: a CSV with ``slide,label`` rows (slide paths or feature files, relative to the CSV,
  or slide names looked up as ``<stem>.h5`` in a features folder).

Every problem a user can cause is one :class:`BagError` line naming the file.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wsi_amr.ips.model import iter_chunks
from wsi_amr.slide import Slide, slide_stem
from wsi_amr.tiling import plain_attr


class BagError(ValueError):
    """Bad bag input: one line naming the file and what is wrong."""


class FeatureBag:
    """A feature file (``features`` (N, D) + ``coords`` (N, 2)), open for streaming.

    Use as a context manager; ``chunks(I)`` yields ``(embeddings, row ids)`` I rows at a time and
    ``coords[row ids]`` gives their level-0 positions. ``expected_dim`` (e.g. a checkpoint's
    embedding width) is checked on opening."""

    def __init__(self, path: str | Path, expected_dim: int | None = None) -> None:
        import h5py

        self.path = Path(path)
        try:
            self._file = h5py.File(self.path, "r")
        except (OSError, ValueError) as exc:
            raise BagError(f"{self.path}: not a readable HDF5 feature file ({exc})") from None
        try:
            if "features" not in self._file:
                raise BagError(f"{self.path}: no 'features' dataset (expected features (N, D) and coords (N, 2), "
                               "as CLAM and TRIDENT write them)")
            if "coords" not in self._file:
                raise BagError(f"{self.path}: no 'coords' dataset: patch positions are needed to draw attention "
                               "back on the slide (CLAM and TRIDENT write coords beside features)")
            self.features = self._file["features"]
            coords = np.asarray(self._file["coords"])
            if self.features.ndim == 3 and self.features.shape[0] == 1:  # some writers keep a batch axis
                self.features = self.features[0]
            if self.features.ndim != 2:
                raise BagError(f"{self.path}: 'features' is {self.features.shape}, expected (N, D)")
            if coords.ndim == 3 and coords.shape[0] == 1:
                coords = coords[0]
            if coords.ndim != 2 or coords.shape[1] != 2:
                raise BagError(f"{self.path}: 'coords' is {coords.shape}, expected (N, 2)")
            if len(coords) != len(self.features):
                raise BagError(f"{self.path}: {len(self.features)} feature rows but {len(coords)} coords")
            if len(coords) == 0:
                raise BagError(f"{self.path}: the bag is empty (0 patches)")
            self.dim = int(self.features.shape[1])
            if expected_dim is not None and self.dim != expected_dim:
                raise BagError(f"{self.path}: features are {self.dim}-dimensional, the model expects {expected_dim}")
            self.coords = coords.astype(np.int64)
            self.attrs = {k: plain_attr(v) for k, v in self._file["coords"].attrs.items()}
        except BaseException:
            self._file.close()
            raise

    def patch_size_level0(self) -> float | None:
        """Side of each patch in level-0 px from the ``coords`` attributes, or None when they do not
        say: ``patch_size_level0`` (TRIDENT, ``wsi-amr tile``), else ``patch_size`` times the read
        level's ``downsample`` (CLAM's patching attributes)."""
        size0 = self.attrs.get("patch_size_level0")
        if size0 is not None:
            return float(size0)
        size, downsample = self.attrs.get("patch_size"), self.attrs.get("downsample")
        if size is None:
            return None
        if isinstance(downsample, list):
            downsample = downsample[0] if downsample else None
        return float(size) * float(downsample if downsample is not None else 1.0)

    def __len__(self) -> int:
        return len(self.coords)

    def __enter__(self) -> FeatureBag:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def chunks(self, chunk: int, generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """``(embeddings (n, D) float32, row ids (n,))``, ``chunk`` rows at a time (shuffled with
        a ``generator``)."""
        for rows, ids in iter_chunks(self.features, chunk, generator=generator):
            yield rows.float(), ids


def write_feature_file(path: str | Path, features: np.ndarray, coords: np.ndarray) -> Path:
    """Write a CLAM/TRIDENT-style feature file (``features`` float32, ``coords`` int64)."""
    import h5py

    path = Path(path)
    with h5py.File(path, "w") as fh:
        fh.create_dataset("features", data=np.asarray(features, np.float32))
        fh.create_dataset("coords", data=np.asarray(coords, np.int64))
    return path


def covering_grid(width: int, height: int, patch: int, stride: int | None = None) -> np.ndarray:
    """Top-left (x, y) of square ``patch``-px patches covering a ``width`` x ``height`` image.

    Steps of ``stride`` (default ``patch``: no overlap); the last row and column are placed flush
    with the image's bottom and right edges, so every pixel is in some patch and no patch is
    padded. Row-major, (N, 2) int64.
    """
    stride = patch if stride is None else stride
    if patch < 1 or stride < 1:
        raise BagError(f"patch and stride must be at least 1 px, got {patch} and {stride}")
    if height < patch or width < patch:
        raise BagError(f"image is {width}x{height} px, smaller than one {patch}-px patch")

    def starts(n: int) -> list[int]:
        out = list(range(0, n - patch + 1, stride))
        if out[-1] != n - patch:
            out.append(n - patch)
        return out

    return np.array([(x, y) for y in starts(height) for x in starts(width)], np.int64)


def _check_rgb(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise BagError(f"image patches need an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")


def image_patches(image: np.ndarray, patch: int, stride: int | None = None) -> tuple[Tensor, np.ndarray]:
    """Cut an RGB uint8 image (H, W, 3) into square patches on a grid that covers it
    (:func:`covering_grid`). Returns ``(patches (N, 3, patch, patch) uint8, coords (N, 2) x, y
    top-left)``."""
    _check_rgb(image)
    coords = covering_grid(image.shape[1], image.shape[0], patch, stride)
    return torch.from_numpy(ImagePatches(image, coords, patch)[np.arange(len(coords))]), coords


class ImagePatches:
    """The patches of an in-memory RGB image at ``coords``, cut when indexed: ``patches[rows]`` is
    (n, 3, size, size) uint8. Streams like a feature file (:func:`~wsi_amr.ips.model.iter_chunks`)
    without a second copy of the image in patches."""

    def __init__(self, image: np.ndarray, coords: np.ndarray, size: int) -> None:
        _check_rgb(image)
        self.image, self.coords, self.size = image, np.asarray(coords, np.int64), int(size)

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, rows: Any) -> np.ndarray:
        s = self.size
        out = np.empty((len(np.atleast_1d(rows)), 3, s, s), np.uint8)
        for i, (x, y) in enumerate(self.coords[np.atleast_1d(rows)]):
            out[i] = self.image[y:y + s, x:x + s].transpose(2, 0, 1)
        return out


class SlidePatches:
    """Square patches of a slide, read when indexed: ``patches[rows]`` is (n, 3, size, size) uint8,
    ``size`` px at ``downsample`` level-0 px per px, top-left at level-0 ``coords[rows]``.

    Only the rows asked for are read, so streaming it a chunk at a time
    (:func:`~wsi_amr.ips.model.iter_chunks`) holds at most one chunk of patch images; the selected
    patches are read again by index for re-encoding."""

    def __init__(self, slide: Slide, coords: np.ndarray, size: int, downsample: float) -> None:
        self.slide, self.coords = slide, np.asarray(coords, np.int64)
        self.size, self.downsample = int(size), float(downsample)

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def size_level0(self) -> float:
        return self.size * self.downsample

    def __getitem__(self, rows: Any) -> np.ndarray:
        s = self.size
        out = np.empty((len(np.atleast_1d(rows)), 3, s, s), np.uint8)
        for i, (x, y) in enumerate(self.coords[np.atleast_1d(rows)]):
            out[i] = self.slide.read_region(int(x), int(y), s, s, self.downsample).transpose(2, 0, 1)
        return out


@dataclass(frozen=True)
class LabelledBag:
    """One training or test item: a name, its source (slide, image or feature file) and label."""

    name: str
    source: Path
    label: int


def read_labels_csv(
    path: str | Path, classes: Sequence[str] | None = None, *, features: str | Path | None = None,
    check_files: bool = True,
) -> tuple[list[LabelledBag], list[str]]:
    """Bags from a ``slide,label`` CSV (a header row; paths relative to the CSV's folder).

    Labels are class names; ``classes`` fixes them and their order (an unknown label is an
    error), otherwise they are the sorted distinct labels. With ``features`` (a folder), each
    slide is the feature file ``<features>/<slide stem>.h5``, so the column may hold slide paths or
    bare names. Missing files (unless ``check_files`` is False), a missing column, a duplicate
    slide or an empty list are errors. A bag's name is the slide's stem (``a.ome.tif`` -> ``a``).
    Returns ``(bags, class names)``.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise BagError(f"{path}: cannot read the labels CSV ({exc.strerror or exc})") from None
    rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise BagError(f"{path}: no rows (expected a header 'slide,label' and one row per slide)")
    header = {k.strip().lower(): k for k in rows[0] if k}
    if "slide" not in header or "label" not in header:
        raise BagError(f"{path}: columns must include 'slide' and 'label', found {sorted(header)}")
    pairs = [((r[header["slide"]] or "").strip(), (r[header["label"]] or "").strip()) for r in rows]
    if any(not s or not lab for s, lab in pairs):
        line = next(i for i, (s, lab) in enumerate(pairs, start=2) if not s or not lab)
        raise BagError(f"{path}: line {line} has an empty slide or label")
    names = sorted({lab for _, lab in pairs}) if classes is None else list(classes)
    unknown = sorted({lab for _, lab in pairs} - set(names))
    if unknown:
        raise BagError(f"{path}: unknown labels {unknown[:5]} (classes: {', '.join(names)})")
    if len(names) < 2:
        raise BagError(f"{path}: only one class ({names[0]}); classification needs at least two")
    bags, seen, missing = [], set(), []
    for slide, lab in pairs:
        stem = slide_stem(slide)
        if features is not None:
            src = Path(features) / f"{stem}.h5"
        else:
            src = Path(slide) if Path(slide).is_absolute() else path.parent / slide
        if src in seen:
            raise BagError(f"{path}: {slide} is listed twice")
        seen.add(src)
        if check_files and not src.exists():
            missing.append(slide if features is None else str(src))
        bags.append(LabelledBag(stem, src, names.index(lab)))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise BagError(f"{path}: {len(missing)} listed files do not exist: {', '.join(missing[:3])}{more}")
    return bags, names
