"""Adaptive quadtree and tokeniser on synthetic arrays."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_amr.metrics import dice
from wsi_amr.quadtree import Leaves, QuadtreeError, QuadtreeParams, build_quadtree, edge_map, morton_order, uniform_leaves, uniform_token_count
from wsi_amr.tokens import detokenise, labels_round_trip, pad_tokens, token_geometry, tokenise


def coverage(leaves: Leaves, shape) -> np.ndarray:
    """How many leaves cover each pixel of a canvas big enough for all of them."""
    h = max(shape[0], int((leaves.y + leaves.size).max()))
    w = max(shape[1], int((leaves.x + leaves.size).max()))
    cov = np.zeros((h, w), np.int32)
    for x, y, s in leaves.boxes():
        cov[y : y + s, x : x + s] += 1
    return cov


def test_blank_image_gives_max_size_leaves_over_tissue_only():
    edges = np.zeros((256, 512), np.uint8)
    tissue = np.zeros_like(edges, bool)
    tissue[:, :200] = True  # covers roots 0 and 1 (of 64 px) fully, root 3 partly
    p = QuadtreeParams(edge_downsample=1, min_size=8, max_size=64, split_threshold=0.0)
    leaves = build_quadtree(edges, p, tissue)
    assert (leaves.size == 64).all() and (leaves.depth == 0).all()
    assert sorted(set(leaves.x.tolist())) == [0, 64, 128, 192]
    assert len(leaves) == 4 * 4  # 4 columns touching tissue x 4 rows
    assert not (leaves.x >= 256).any()


def test_straight_edge_refines_only_along_the_edge():
    edges = np.zeros((256, 256), np.uint8)
    edges[:, 100] = 1  # a vertical line at x = 100
    p = QuadtreeParams(edge_downsample=1, min_size=4, max_size=64, split_threshold=0.0)
    leaves = build_quadtree(edges, p)
    small = leaves.size == 4
    assert small.any()
    # Minimum-size leaves only in the 8-px column around the line (the line's leaves and their
    # siblings), and every leaf on the line is minimum size.
    assert set(leaves.x[small].tolist()) == {96, 100}
    on_line = (leaves.x <= 100) & (100 < leaves.x + leaves.size)
    assert (leaves.size[on_line] == 4).all()
    # Away from the line the leaves stay as large as the tree allows.
    far = (leaves.x + leaves.size <= 64) | (leaves.x >= 128)
    assert (leaves.size[far] == 64).all()
    assert (coverage(leaves, edges.shape) == 1).all()


def test_threshold_normalised_by_area_means_the_same_at_every_size():
    edges = np.zeros((128, 128), np.uint8)
    edges[::4, :] = 1  # density 0.25 everywhere
    split = build_quadtree(edges, QuadtreeParams(edge_downsample=1, min_size=8, max_size=128, split_threshold=0.2, normalise=True))
    keep = build_quadtree(edges, QuadtreeParams(edge_downsample=1, min_size=8, max_size=128, split_threshold=0.3, normalise=True))
    assert (split.size == 8).all() and (keep.size == 128).all()


@pytest.mark.parametrize("budget", [1, 7, 50, 100, 333, 1000])
def test_budget_mode_returns_the_requested_number_of_tokens(budget):
    rng = np.random.default_rng(budget)
    edges = (rng.random((512, 512)) < 0.05).astype(np.uint8)
    p = QuadtreeParams(edge_downsample=1, min_size=4, max_size=128, max_tokens=budget)
    leaves = build_quadtree(edges, p)
    roots = 16
    if budget <= roots:
        assert len(leaves) == roots  # cannot make fewer leaves than roots
    else:
        # Each split adds 3 leaves here (all children hold tissue): the count lands on
        # roots + 3k, the largest such count not above the budget.
        assert budget - 2 <= len(leaves) <= budget
        assert (len(leaves) - roots) % 3 == 0
    assert (coverage(leaves, edges.shape) == 1).all()


def test_budget_mode_splits_the_most_detailed_leaf_first():
    edges = np.zeros((256, 256), np.uint8)
    edges[10:20, 10:20] = 1  # detail in the top-left root only
    leaves = build_quadtree(edges, QuadtreeParams(edge_downsample=1, min_size=8, max_size=128, max_tokens=7))
    assert len(leaves) == 7
    top_left = (leaves.x < 128) & (leaves.y < 128)
    assert top_left.sum() == 4 and (leaves.size[top_left] == 64).all()


def test_budget_larger_than_possible_gives_every_min_size_leaf():
    edges = np.ones((64, 64), np.uint8)
    leaves = build_quadtree(edges, QuadtreeParams(edge_downsample=1, min_size=16, max_size=64, max_tokens=10_000))
    assert len(leaves) == 16 and (leaves.size == 16).all()


def test_leaves_come_in_z_order():
    edges = np.ones((64, 64), np.uint8)
    leaves = build_quadtree(edges, QuadtreeParams(edge_downsample=1, min_size=16, max_size=64, split_threshold=0.0))
    got = list(zip(leaves.x.tolist(), leaves.y.tolist()))
    assert got[:8] == [(0, 0), (16, 0), (0, 16), (16, 16), (32, 0), (48, 0), (32, 16), (48, 16)]
    mixed = np.zeros((128, 128), np.uint8)
    mixed[:64, 64:] = 1  # only the top-right root splits
    leaves = build_quadtree(mixed, QuadtreeParams(edge_downsample=1, min_size=32, max_size=64, split_threshold=0.0))
    assert list(zip(leaves.x.tolist(), leaves.y.tolist(), leaves.size.tolist())) == [
        (0, 0, 64), (64, 0, 32), (96, 0, 32), (64, 32, 32), (96, 32, 32), (0, 64, 64), (64, 64, 64)]


def test_morton_order_of_a_grid():
    x = np.array([1, 0, 1, 0])
    y = np.array([1, 1, 0, 0])
    assert morton_order(x, y, 1).tolist() == [3, 2, 1, 0]


def test_morton_order_interleaves_every_bit():
    rng = np.random.default_rng(0)
    for high in (4, 2**16, 2**32):
        x, y = rng.integers(0, high, 500) * 8, rng.integers(0, high, 500) * 8
        code = [sum(((int(a) // 8 >> b & 1) << 2 * b) | ((int(c) // 8 >> b & 1) << 2 * b + 1) for b in range(32))
                for a, c in zip(x, y)]
        assert morton_order(x, y, 8).tolist() == sorted(range(500), key=lambda i: code[i])


def test_leaves_tile_the_tissue_with_no_gap_and_no_overlap():
    rng = np.random.default_rng(0)
    h, w = 300, 470  # not a multiple of the root size
    edges = (rng.random((h, w)) < 0.02).astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    tissue = (xx - 200) ** 2 + (yy - 150) ** 2 < 130**2
    leaves = build_quadtree(edges, QuadtreeParams(edge_downsample=1, min_size=4, max_size=64, split_threshold=0.01), tissue)
    cov = coverage(leaves, (h, w))
    assert cov.max() == 1  # no overlap
    assert (cov[:h, :w][tissue] == 1).all()  # no gap over tissue
    # No leaf lies wholly outside the tissue.
    for x, y, s in leaves.boxes():
        assert tissue[y : y + s, x : x + s].any()


def test_empty_tissue_mask_gives_no_leaves():
    edges = np.ones((64, 64), np.uint8)
    assert len(build_quadtree(edges, QuadtreeParams(edge_downsample=1, min_size=8, max_size=32), np.zeros((64, 64), bool))) == 0


@pytest.mark.parametrize("kwargs,needle", [
    ({"min_size": 6}, "min_size"),
    ({"max_size": 100}, "max_size"),
    ({"min_size": 64, "max_size": 32}, "larger than"),
    ({"blur_kernel": 4}, "blur_kernel"),
    ({"canny_low": 200, "canny_high": 100}, "Canny"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"split_threshold": -1}, "split_threshold"),
])
def test_bad_parameters_are_refused(kwargs, needle):
    with pytest.raises(QuadtreeError, match=needle):
        build_quadtree(np.zeros((64, 64), np.uint8), QuadtreeParams(**kwargs))


def test_downsampled_edges_without_a_shape_are_refused():
    # A full-resolution map given where half-resolution edges are expected would cover twice the image.
    with pytest.raises(QuadtreeError, match="shape"):
        build_quadtree(np.zeros((64, 64), np.uint8), QuadtreeParams(edge_downsample=2))


def test_half_resolution_edges_give_leaves_over_the_whole_image():
    rng = np.random.default_rng(5)
    img = np.full((200, 300, 3), 235, np.uint8)
    img[40:160, 60:220] = (150, 60, 140)  # one dark block: edges along its border only
    img = np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)
    p = QuadtreeParams(min_size=8, max_size=64, blur_kernel=5, canny_low=60, canny_high=120,
                       split_threshold=4, edge_downsample=2)
    edges = edge_map(img, p.blur_kernel, p.canny_low, p.canny_high, downsample=2)
    assert edges.shape == (100, 150)
    leaves = build_quadtree(edges, p, shape=img.shape[:2])
    assert int((leaves.size ** 2).sum()) == 256 * 320  # the padded root grid, tiled
    small = leaves.size == 8
    assert small.any() and (leaves.size == 64).any()
    # Small leaves lie along the block's border, none deep inside it or far out on the glass.
    cx, cy = leaves.x[small] + 4, leaves.y[small] + 4
    near = (np.minimum(np.abs(cx - 60), np.abs(cx - 220)) < 24) | (np.minimum(np.abs(cy - 40), np.abs(cy - 160)) < 24)
    assert near.all()


def test_tissue_of_the_wrong_size_is_refused():
    with pytest.raises(QuadtreeError, match="tissue mask"):
        build_quadtree(np.zeros((64, 64), np.uint8), QuadtreeParams(edge_downsample=1), np.ones((32, 64), bool))


def test_edge_map_finds_a_step():
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 32:] = 255
    e = edge_map(img)
    assert e.dtype == np.uint8 and e[:, 30:34].any(axis=1).all() and not e[:, :25].any()


# -- tokeniser ------------------------------------------------------------------------------------
def test_round_trip_is_exact_when_all_leaves_are_at_token_size():
    rng = np.random.default_rng(1)
    labels = (rng.random((96, 160)) < 0.3).astype(np.uint8) + (rng.random((96, 160)) < 0.1)
    leaves = uniform_leaves(labels.shape, 8)
    back = labels_round_trip(labels, leaves, token_size=8, num_classes=3)
    np.testing.assert_array_equal(back, labels)


def test_tokenise_box_averages_and_detokenise_pastes_back():
    img = np.arange(16 * 16, dtype=np.float32).reshape(16, 16)
    leaves = Leaves(np.array([0, 8]), np.array([0, 0]), np.array([8, 8]), np.zeros(2, np.int16), np.zeros(2, np.float32))
    tok = tokenise(img, leaves, token_size=4)
    assert tok.shape == (2, 4, 4, 1)
    assert tok[0, 0, 0, 0] == img[0:2, 0:2].mean()
    back = detokenise(tok[..., 0], leaves, (16, 16), fill=-1, interpolation="nearest")
    assert back[0, 0] == img[0:2, 0:2].mean() and back[0, 1] == back[0, 0]
    assert (back[8:] == -1).all()


@pytest.mark.parametrize("shape,channels,reach", [((300, 520), 3, 0), ((257, 129), 1, 0), ((64, 64), 4, 128),
                                                  ((1000, 90), 3, 0), ((300, 200), 3, 128)])
def test_tokens_of_large_leaves_are_exact_box_averages(shape, channels, reach):
    # Aligned leaves of every size at random places (leaves need not tile for the tokeniser),
    # some in the rows below the last whole 128-px strip and, with ``reach``, past the image's
    # edge: each token equals the mean of its leaf's pixels over each token cell.
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (*shape, channels), dtype=np.uint8)
    xs, ys, ss = [], [], []
    for s in (4, 8, 16, 32, 64, 128):
        for _ in range(12):
            xs.append(int(rng.integers(0, max(1, (shape[1] + reach - s) // s + 1))) * s)
            ys.append(int(rng.integers(0, max(1, (shape[0] + reach - s) // s + 1))) * s)
            ss.append(s)
    n = len(ss)
    leaves = Leaves(np.array(xs), np.array(ys), np.array(ss), np.zeros(n, np.int16), np.zeros(n, np.float32))
    tok = tokenise(img, leaves, token_size=8)
    padded = np.full((shape[0] + 128, shape[1] + 128, channels), 255, np.float64)
    padded[: shape[0], : shape[1]] = img
    for i in range(len(leaves)):
        x, y, s = int(leaves.x[i]), int(leaves.y[i]), int(leaves.size[i])
        patch = padded[y:y + s, x:x + s]
        ref = patch.reshape(8, s // 8, 8, s // 8, channels).mean(axis=(1, 3)) if s >= 8 else \
            np.repeat(np.repeat(patch, 8 // s, axis=0), 8 // s, axis=1)
        np.testing.assert_allclose(tok[i], ref, atol=1e-3)


def test_linear_detokenise_interpolates_within_each_leaf_only():
    # A ramp token: linear interpolation reproduces a linear ramp inside the leaf (away from its
    # clamped edge pixels) and never reads the neighbouring leaf.
    ramp = np.tile(np.arange(4, dtype=np.float32), (4, 1))  # values 0..3 along x
    maps = np.stack([ramp, np.full((4, 4), 100, np.float32)])
    leaves = Leaves(np.array([0, 16]), np.array([0, 0]), np.array([16, 16]), np.zeros(2, np.int16), np.zeros(2, np.float32))
    back = detokenise(maps, leaves, (16, 32))
    assert back[:, :2].max() == 0 and back[:, 14:16].min() == 3  # clamped at the leaf's edges
    np.testing.assert_allclose(np.diff(back[0, 2:14]), 0.25, rtol=1e-5)  # 4 px per token cell
    assert (back[:, 16:] == 100).all()
    # Integer maps (labels) are repeated, never interpolated.
    labels = detokenise(np.arange(2 * 16, dtype=np.int32).reshape(2, 4, 4), leaves, (16, 32))
    assert labels[0, 0] == labels[3, 3] == 0 and labels[0, 4] == 1


def test_linear_round_trip_of_a_disc_beats_nearest():
    yy, xx = np.mgrid[0:64, 0:64]
    disc = ((xx - 30.3) ** 2 + (yy - 33.7) ** 2 < 20**2).astype(np.uint8)
    leaves = uniform_leaves(disc.shape, 32)
    linear = dice(disc, labels_round_trip(disc, leaves, 8))
    nearest = dice(disc, labels_round_trip(disc, leaves, 8, interpolation="nearest"))
    assert linear > nearest > 0.9


def test_tokens_smaller_than_token_size_are_repeated_and_averaged_back():
    img = np.random.default_rng(2).random((8, 8)).astype(np.float32)
    leaves = uniform_leaves((8, 8), 2)
    tok = tokenise(img, leaves, token_size=4)
    assert tok.shape == (16, 4, 4, 1)
    np.testing.assert_allclose(detokenise(tok, leaves, (8, 8))[..., 0], img, rtol=1e-6)


def test_uniform_mode_uses_the_same_arrays():
    shape = (64, 96)
    leaves = uniform_leaves(shape, 16)
    assert len(leaves) == uniform_token_count(shape, 16) == 4 * 6
    assert (leaves.size == 16).all()
    geom = token_geometry(leaves)
    assert geom.shape == (24, 3) and geom[0].tolist() == [8.0, 8.0, 16.0]


def test_padding_returns_an_attention_mask():
    a, b = np.ones((3, 4, 4, 3), np.float32), np.ones((5, 4, 4, 3), np.float32)
    toks, geom, mask = pad_tokens([a, b], [np.ones((3, 3)), np.ones((5, 3))])
    assert toks.shape == (2, 5, 4, 4, 3) and geom.shape == (2, 5, 3)
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert (toks[0, 3:] == 0).all()
    with pytest.raises(ValueError):
        pad_tokens([a, b], [np.ones((3, 3)), np.ones((5, 3))], length=4)


def test_bad_token_size_is_refused():
    leaves = uniform_leaves((16, 16), 8)
    with pytest.raises(QuadtreeError, match="token_size"):
        tokenise(np.zeros((16, 16)), leaves, token_size=6)


def test_dice():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    assert dice(a, a) == 1.0 and dice(a, ~a) == 0.0 and dice(np.zeros(3), np.zeros(3)) == 1.0


@pytest.mark.parametrize("bit_count", [True, False], ids=["bit-count", "area-resize"])
@pytest.mark.parametrize("cell", [1, 2, 4, 8, 16, 32])
def test_cell_counts_are_exact(cell, bit_count, monkeypatch):
    from wsi_amr import quadtree
    from wsi_amr.quadtree import _binary, _cell_any, _cell_integral

    if bit_count and quadtree._BITWISE_COUNT is None:
        pytest.skip("numpy < 2 has no bitwise_count")
    if not bit_count:
        monkeypatch.setattr(quadtree, "_BITWISE_COUNT", None)
    rng = np.random.default_rng(cell)
    for p in (0.0, 0.01, 0.5, 0.99, 1.0):
        a = rng.random((100, 150)) < p
        rows, cols = -(-100 // 64) * 64, -(-150 // 64) * 64
        got = _cell_integral(_binary(a), a.shape, cell, rows, cols)
        padded = np.zeros((rows, cols), np.int64)
        padded[:100, :150] = a
        cells = padded.reshape(rows // cell, cell, cols // cell, cell).sum(axis=(1, 3))
        want = np.zeros((rows // cell + 1, cols // cell + 1), np.int64)
        want[1:, 1:] = cells.cumsum(0).cumsum(1)
        np.testing.assert_array_equal(got, want)
        # Whether a box holds any set pixel, from the mask as bool and as labels of any value.
        for mask in (a, (a * rng.integers(1, 256, a.shape)).astype(np.uint8)):
            has = _cell_any(mask, a.shape, cell, rows, cols)
            for i0, i1, j0, j1 in rng.integers(0, [rows // cell] * 2 + [cols // cell] * 2, (50, 4)):
                i0, i1 = sorted((i0, i1 + 1))
                j0, j1 = sorted((j0, j1 + 1))
                box = lambda t: t[i1, j1] - t[i0, j1] - t[i1, j0] + t[i0, j0]  # noqa: E731, B023 (called at once)
                assert (box(has) > 0) == (box(want) > 0)
