"""Leaves to tokens and back: the tokeniser of adaptive patching, vectorised.

Every leaf's pixels are resized to one token size p x p: leaves larger than p are box-averaged
(an exact area filter, leaves and p being powers of two), smaller ones repeated. Leaves of one
size are aligned to a grid of that size, so each size group is gathered (and pasted back) with
one reshaped view of the image and fancy indexing: no Python loop over leaves or pixels.

Tokens carry geometry, (centre x, centre y, size) in working pixels, so a model sees real 2-D
position and scale. Batches of different lengths are padded with an attention mask.
"""

from __future__ import annotations

import cv2
import numpy as np

from wsi_amr.quadtree import Leaves, QuadtreeError, QuadtreeParameterError, is_power_of_two


def _check_token_size(p: int) -> None:
    if not is_power_of_two(p):
        raise QuadtreeParameterError(f"token_size must be a power of two, got {p}", "token_size")


def _padded(image: np.ndarray, leaves: Leaves, fill: float) -> np.ndarray:
    h, w = image.shape[:2]
    if len(leaves) == 0:
        return image
    rows = max(h, int((leaves.y + leaves.size).max()))
    cols = max(w, int((leaves.x + leaves.size).max()))
    if (rows, cols) == (h, w):
        return image
    out = np.full((rows, cols, *image.shape[2:]), fill, image.dtype)
    out[:h, :w] = image
    return out


def tokenise(image: np.ndarray, leaves: Leaves, token_size: int = 8, fill: float = 255) -> np.ndarray:
    """(N, p, p, C) float32 tokens of an (H, W, C) or (H, W) image, one per leaf, in leaf order.

    Areas past the image edge (leaves of padded roots) read as ``fill``.
    """
    _check_token_size(token_size)
    img = image if image.ndim == 3 else image[..., None]
    img = _padded(img, leaves, fill)
    p, c = token_size, img.shape[2]
    out = np.empty((len(leaves), p, p, c), np.float32)
    sizes = np.unique(leaves.size).tolist()
    big = [sz for sz in sizes if sz > p] if c <= 4 else []
    levels = _box_levels(img, p, max(big)) if big else {}
    for s in sizes:
        idx = np.flatnonzero(leaves.size == s)
        rows, cols = img.shape[0] // s * s, img.shape[1] // s * s
        if s in levels:
            # A leaf of size s is a p x p block of its level, at (y / s * p, x / s * p).
            small = levels[s][: rows // s * p, : cols // s * p].reshape(rows // s, p, cols // s, p, c)
            out[idx] = small[leaves.y[idx] // s, :, leaves.x[idx] // s, :, :]
            continue
        view = img[:rows, :cols].reshape(rows // s, s, cols // s, s, c)
        patches = view[leaves.y[idx] // s, :, leaves.x[idx] // s, :, :].astype(np.float32)  # (n, s, s, c)
        out[idx] = _resize_square(patches, p)
    return out


def _box_levels(img: np.ndarray, p: int, largest: int) -> dict[int, np.ndarray]:
    """For each leaf size s = 2p, 4p, .. ``largest``: the (H / s * p, W / s * p, C) float32 box
    averages of the image over (s / p)-px squares, so a leaf of size s reads as a p x p block.

    A pyramid (each level the 2 x 2 box average of the one before; nested box averages are box
    averages, exact in float), built in strips of ``largest`` rows: the float copy of the image
    is one strip at a time, small enough to stay in cache and out of fresh pages."""
    h, w, c = img.shape
    levels: dict[int, np.ndarray] = {}
    s = 2 * p
    while s <= largest:
        levels[s] = np.empty((h // s * p, w // s * p, c), np.float32)
        s *= 2
    for y0 in range(0, h, largest):  # the last strip may be shorter: it holds smaller leaves only
        level: np.ndarray = img[y0:y0 + largest, : w // 2 * 2].astype(np.float32)
        y1 = y0 + level.shape[0]
        s = p
        while s < largest and level.shape[0] >= 2:
            r, q = level.shape[0] // 2, level.shape[1] // 2
            level = cv2.resize(level[: 2 * r, : 2 * q], (q, r), interpolation=cv2.INTER_AREA).reshape(r, q, c)
            s *= 2
            start, stop = y0 // s * p, y1 // s * p  # this strip's rows of level s
            if stop > start:
                levels[s][start:stop] = level[: stop - start, : w // s * p]
    return levels


def _resize_square(patches: np.ndarray, p: int) -> np.ndarray:
    n, s = patches.shape[0], patches.shape[1]
    if s == p:
        return patches
    if s > p:
        f = s // p
        return patches.reshape(n, p, f, p, f, -1).mean(axis=(2, 4))
    f = p // s
    return np.repeat(np.repeat(patches, f, axis=1), f, axis=2)


def token_geometry(leaves: Leaves) -> np.ndarray:
    """(N, 3) float32: centre x, centre y and size of each leaf, working pixels."""
    half = leaves.size / 2.0
    return np.stack([leaves.x + half, leaves.y + half, leaves.size.astype(np.float64)], axis=1).astype(np.float32)


def leaf_coverage(leaves: Leaves, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the pixels under some leaf. Marked on a grid of the smallest leaf size (every
    leaf is aligned to its own size, so to that grid), then repeated up to pixels."""
    h, w = shape
    if len(leaves) == 0:
        return np.zeros(shape, bool)
    g = int(leaves.size.min())
    rows = max(-(-h // g), int(((leaves.y + leaves.size) // g).max()))
    cols = max(-(-w // g), int(((leaves.x + leaves.size) // g).max()))
    grid = np.zeros((rows, cols), bool)
    for s in np.unique(leaves.size).tolist():
        idx = np.flatnonzero(leaves.size == s)
        f = s // g
        view = grid[:rows // f * f, :cols // f * f].reshape(rows // f, f, cols // f, f)
        view[leaves.y[idx] // s, :, leaves.x[idx] // s, :] = True
    return np.repeat(np.repeat(grid, g, axis=0)[:h], g, axis=1)[:, :w]


def _upsample_matrix(s: int, p: int) -> np.ndarray:
    """(s, p) weights of linear interpolation from p to s samples over one leaf: pixel centres
    aligned, clamped at the leaf's own edges (no leaf reads its neighbours)."""
    centres = np.clip((np.arange(s) + 0.5) * (p / s) - 0.5, 0, p - 1)
    lo = np.floor(centres).astype(np.int64)
    hi = np.minimum(lo + 1, p - 1)
    frac = (centres - lo).astype(np.float32)
    out = np.zeros((s, p), np.float32)
    np.add.at(out, (np.arange(s), lo), 1 - frac)
    np.add.at(out, (np.arange(s), hi), frac)
    return out


def _upsample_linear(maps: np.ndarray, s: int) -> np.ndarray:
    """(n, p, p, k) maps to (n, s, s, k) by separable linear interpolation: two batched matmuls."""
    n, p, _, k = maps.shape
    u = _upsample_matrix(s, p)
    m = np.ascontiguousarray(maps, dtype=np.float32)
    rows = np.matmul(u, m.reshape(n, p, p * k))  # (n, s, p*k): along y
    cols = np.matmul(rows.reshape(n * s, p, k).transpose(0, 2, 1), u.T)  # (n*s, k, s): along x
    return cols.reshape(n, s, k, s).transpose(0, 1, 3, 2)


def detokenise(maps: np.ndarray, leaves: Leaves, shape: tuple[int, int], fill: float = 0,
               interpolation: str = "auto") -> np.ndarray:
    """Paste per-token (N, p, p) or (N, p, p, K) maps back into an (H, W[, K]) image.

    Each map is resized to its leaf and written in place; pixels under no leaf keep ``fill``.
    Leaves smaller than p are box-averaged. Leaves larger than p are interpolated: ``linear``
    (pixel centres aligned, within the leaf only) suits probabilities and class fractions, as it
    puts a border between token cells where the values cross instead of on the cell grid;
    ``nearest`` repeats each value. ``auto``: linear for float maps, nearest for integer ones
    (labels).
    """
    if interpolation not in ("auto", "linear", "nearest"):
        raise ValueError(f"interpolation must be auto, linear or nearest, got {interpolation!r}")
    if maps.ndim not in (3, 4) or maps.shape[0] != len(leaves) or maps.shape[1] != maps.shape[2]:
        raise QuadtreeError(f"maps of shape {maps.shape} do not match {len(leaves)} leaves")
    squeeze = maps.ndim == 3
    m = maps[..., None] if squeeze else maps
    p, k = m.shape[1], m.shape[3]
    _check_token_size(p)
    linear = interpolation == "linear" or (interpolation == "auto" and np.issubdtype(m.dtype, np.floating))
    h, w = shape
    rows = max(h, int((leaves.y + leaves.size).max())) if len(leaves) else h
    cols = max(w, int((leaves.x + leaves.size).max())) if len(leaves) else w
    out = np.full((rows, cols, k), fill, m.dtype)
    for s in np.unique(leaves.size).tolist():
        idx = np.flatnonzero(leaves.size == s)
        r, c = rows // s * s, cols // s * s
        view = out[:r, :c].reshape(r // s, s, c // s, s, k)
        pasted = _upsample_linear(m[idx], s) if linear and s > p else _resize_square(m[idx], s)
        view[leaves.y[idx] // s, :, leaves.x[idx] // s, :, :] = pasted.astype(m.dtype)
    out = out[:h, :w]
    return out[..., 0] if squeeze else out


def pad_tokens(
    tokens: list[np.ndarray], geometry: list[np.ndarray], length: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack sequences of different lengths into (B, L, ...) arrays with zero padding.

    Returns tokens, geometry and a (B, L) bool mask that is True on real tokens; a model must
    ignore the padded positions (the APF authors padded with zeros and no mask).
    """
    if len(tokens) != len(geometry):
        raise ValueError("tokens and geometry lists differ in length")
    n = max((len(t) for t in tokens), default=0)
    length = n if length is None else length
    if length < n:
        raise ValueError(f"length {length} is shorter than the longest sequence ({n})")
    b = len(tokens)
    shape = tokens[0].shape[1:] if tokens else ()
    out_t = np.zeros((b, length, *shape), np.float32)
    out_g = np.zeros((b, length, 3), np.float32)
    mask = np.zeros((b, length), bool)
    for i, (t, g) in enumerate(zip(tokens, geometry)):
        out_t[i, : len(t)] = t
        out_g[i, : len(g)] = g
        mask[i, : len(t)] = True
    return out_t, out_g, mask


def labels_round_trip(labels: np.ndarray, leaves: Leaves, token_size: int, num_classes: int | None = None,
                      interpolation: str = "linear") -> np.ndarray:
    """A label mask pushed through the tokeniser and back.

    Each token holds the class fractions of its p x p cells, as a model's token holds class
    probabilities; they are pasted back with ``interpolation`` (linear by default, as
    :func:`detokenise` does for probabilities) and each pixel takes the most likely class. Exact
    where leaves are no larger than the token size.
    """
    k = int(labels.max()) + 1 if num_classes is None else num_classes
    k = max(k, 2)
    onehot = (labels[..., None] == np.arange(k)).astype(np.float32)
    fractions = tokenise(onehot, leaves, token_size, fill=0)
    # Pixels under no leaf keep fractions of zero everywhere, so argmax gives them background (0).
    back = detokenise(fractions, leaves, labels.shape, fill=0, interpolation=interpolation)
    return back.argmax(axis=2).astype(labels.dtype)
