"""Uniform tiling: grid arithmetic and tissue fractions on arrays."""

from __future__ import annotations

import os
import platform
import sys

import cv2
import h5py
import numpy as np
import pytest

from wsi_amr.tiling import grid_coords, read_tiles_h5, tile_grid, tissue_fractions, write_tiles_h5


def test_grid_counts_whole_tiles_only():
    c = grid_coords(1000, 600, 256, 0, 1.0)
    assert len(c) == 3 * 2
    assert c[:, 0].max() + 256 <= 1000 and c[:, 1].max() + 256 <= 600
    assert c.dtype == np.int64 and c.shape[1] == 2


def test_grid_with_overlap_and_downsample():
    c = grid_coords(2048, 1024, 256, 64, 2.0)  # span 512 px, step 384 px level 0
    xs = sorted(set(c[:, 0].tolist()))
    assert xs == [0, 384, 768, 1152, 1536]
    assert sorted(set(c[:, 1].tolist())) == [0, 384]


def test_grid_on_slide_smaller_than_a_tile_is_empty():
    assert len(grid_coords(16, 16, 256, 0, 1.0)) == 0


@pytest.mark.parametrize("size,overlap", [(0, 0), (256, 256), (256, -1)])
def test_grid_rejects_bad_sizes(size, overlap):
    with pytest.raises(ValueError):
        grid_coords(1000, 1000, size, overlap, 1.0)


def test_tissue_fractions_are_exact_on_aligned_masks():
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:32] = True  # mask at downsample 16 -> level-0 box 256..768 x 256..512
    coords = np.array([[256, 256], [512, 256], [256, 512], [0, 0], [384, 256]])
    f = tissue_fractions(coords, 256.0, mask, 16.0)
    np.testing.assert_allclose(f, [1.0, 0.0, 1.0, 0.0, 0.5])


def test_tile_grid_filters_by_min_tissue():
    mask = np.zeros((64, 64), bool)
    mask[:, :32] = True
    grid, frac = tile_grid(1024, 1024, size=256, overlap=0, downsample=1.0, tissue_mask=mask,
                           mask_downsample=16.0, min_tissue=0.5)
    assert len(grid.coords) == 8 and (frac == 1.0).all()
    grid_all, _ = tile_grid(1024, 1024, size=256, overlap=0, downsample=1.0, tissue_mask=mask,
                            mask_downsample=16.0, min_tissue=0.0)
    assert len(grid_all.coords) == 16
    with pytest.raises(ValueError):
        tile_grid(1024, 1024, size=256, overlap=0, downsample=1.0, tissue_mask=None, mask_downsample=1, min_tissue=2)


def test_tiles_h5_layout_round_trips(tmp_path):
    grid, frac = tile_grid(1024, 512, size=256, overlap=0, downsample=2.0, tissue_mask=None,
                           mask_downsample=1.0, min_tissue=0.5)
    path = tmp_path / "tiles.h5"
    write_tiles_h5(path, grid, frac, {"patch_level": 1, "downsample": np.array([2.0, 2.0]),
                                      "level_dim": np.array([512, 256]), "downsampled_level_dim": np.array([512, 256]),
                                      "name": "s", "mpp": 1.0})
    coords, attrs = read_tiles_h5(path)
    np.testing.assert_array_equal(coords, grid.coords)
    assert attrs["patch_size"] == 256 and attrs["patch_size_level0"] == 512 and attrs["overlap"] == 0
    assert attrs["name"] == "s" and attrs["mpp"] == 1.0
    with h5py.File(path) as f:
        assert f["coords"].dtype == np.int64 and f["coords"].shape == (2, 2)


def test_atomic_writes_leave_normal_permissions_and_no_temporaries(tmp_path):
    import os

    from wsi_amr.outputs import atomic_path, write_json_atomic

    write_json_atomic(tmp_path / "a.json", {"x": 1})
    mode = (tmp_path / "a.json").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_read_order_is_a_blocked_permutation():
    from wsi_amr.tiling import read_order

    coords = grid_coords(2048, 1024, 256, 0, 1.0)  # 8 x 4 tiles, row-major
    order = read_order(coords, 512)
    assert sorted(order.tolist()) == list(range(len(coords)))
    first_block = coords[order[:4]]
    assert first_block.tolist() == [[0, 0], [256, 0], [0, 256], [256, 256]]
    assert len(read_order(coords[:0], 512)) == 0


def _blur_with_one_opencv_thread(img) -> None:
    from wsi_amr.run.resources import opencv_threads

    with opencv_threads(1):
        cv2.GaussianBlur(img, (15, 15), 3)
    os._exit(0)


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX")
def test_opencv_thread_setting_is_safe_in_a_forked_child():
    # cv2.setNumThreads in a child forked after OpenCV started its pool never returns; the jobs'
    # setting must leave such a child alone (the concurrency tests fork a CLI run, for example).
    import multiprocessing

    img = np.random.default_rng(0).integers(0, 255, (2000, 2000, 3), dtype=np.uint8)
    cv2.GaussianBlur(img, (15, 15), 3)  # the pool exists now
    child = multiprocessing.get_context("fork").Process(target=_blur_with_one_opencv_thread, args=(img,))
    child.start()
    child.join(30)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_a_background_thread_runs_below_the_rest_of_the_process():
    # segment's outline thread: lower priority for itself alone, not for the process or the pool's
    # caller (the model's thread), so the model and the read-ahead get the cores first.
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from wsi_amr.run.resources import BACKGROUND_NICE, background_thread

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = nice()
    with ThreadPoolExecutor(1, initializer=background_thread) as pool:
        inside = pool.submit(nice).result()
    assert inside == min(19, before + BACKGROUND_NICE)
    assert nice() == before and os.getpriority(os.PRIO_PROCESS, 0) == before


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_heap_gives_freed_blocks_back():
    # segment trims once per window: freed per-window arrays held in glibc's heap made its peak
    # memory grow with the slide's size.
    import numpy as np

    from wsi_amr.run.resources import trim_heap

    def rss_mib() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    big = np.ones(4 << 20, np.uint8)  # mmapped; freeing it raises glibc's mmap threshold above 2 MiB
    del big
    blocks = [np.ones(2 << 20, np.uint8) for _ in range(40)]  # now from the heap, pages touched
    last = blocks.pop()  # kept: the heap's top stays in use, so nothing below it is released
    held = rss_mib()
    del blocks
    assert rss_mib() > held - 40  # freed, but still held by the heap
    assert trim_heap()
    assert rss_mib() < held - 60
    del last
