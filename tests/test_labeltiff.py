"""mask.tiff: a label image streamed block by block into a pyramidal TIFF."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from wsi_amr.labeltiff import LabelTiff, read_label_tiff


def test_blocks_in_any_order_make_the_image_and_its_pyramid(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (700, 1000)).astype(np.uint8)
    blocks = [(x, y) for y in range(0, 700, 300) for x in range(0, 1000, 400)]
    rng.shuffle(blocks)
    with LabelTiff(tmp_path / "mask.tiff", 1000, 700, 0.62, classes=["a", "b", "c", "d"]) as mt:
        for x, y in blocks:
            mt.add(x, y, labels[y:y + 300, x:x + 400])
        mt.close()
    back, info = read_label_tiff(tmp_path / "mask.tiff")
    np.testing.assert_array_equal(back, labels)
    assert info["mpp"] == 0.62 and info["classes"] == ["a", "b", "c", "d"]
    for level in (1, 2):
        d = 2**level
        np.testing.assert_array_equal(read_label_tiff(tmp_path / "mask.tiff", level)[0], labels[::d, ::d])
    with tifffile.TiffFile(tmp_path / "mask.tiff") as tif:
        assert [p.shape for p in tif.pages] == [(700, 1000), (350, 500), (175, 250)]
        assert [int(p.subfiletype) for p in tif.pages] == [0, 1, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["mask.tiff"]


def test_pixels_never_added_are_background_and_whole_rows_work(tmp_path):
    mt = LabelTiff(tmp_path / "m.tiff", 300, 200, 1.0)
    mt.add(0, 50, np.full((10, 300), 2, np.uint8))  # whole rows
    mt.close()
    back, _ = read_label_tiff(tmp_path / "m.tiff")
    assert (back[50:60] == 2).all() and not back[:50].any() and not back[60:].any()


def test_a_failed_run_leaves_nothing_and_bad_blocks_are_refused(tmp_path):
    with pytest.raises(RuntimeError):
        with LabelTiff(tmp_path / "m.tiff", 100, 100, 1.0) as mt:
            mt.add(0, 0, np.ones((10, 10), np.uint8))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    mt = LabelTiff(tmp_path / "m.tiff", 100, 100, 1.0)
    with pytest.raises(ValueError, match="outside"):
        mt.add(95, 0, np.ones((10, 10), np.uint8))
    mt.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="size"):
        LabelTiff(tmp_path / "m.tiff", 0, 100, 1.0)
