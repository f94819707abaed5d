"""IPS bags: feature files (CLAM/TRIDENT layout), images cut into patches, label CSVs."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, bench_module

from wsi_amr.ips.bags import BagError, FeatureBag, image_patches, read_labels_csv, write_feature_file

GLAS_GRADES = REPO.parent / "shared" / "data" / "glas" / "grade.csv"


def test_feature_file_streams_every_row_once_with_its_coords(tmp_path):
    rng = np.random.default_rng(0)
    feats, coords = rng.normal(size=(103, 16)).astype(np.float32), rng.integers(0, 9999, (103, 2))
    path = write_feature_file(tmp_path / "s.h5", feats, coords)
    with FeatureBag(path, expected_dim=16) as bag:
        assert len(bag) == 103 and bag.dim == 16
        seen = []
        for rows, ids in bag.chunks(10, generator=torch.Generator().manual_seed(1)):
            assert len(ids) <= 10
            np.testing.assert_array_equal(rows.numpy(), feats[ids.numpy()])
            np.testing.assert_array_equal(bag.coords[ids.numpy()], coords[ids.numpy()])
            seen += ids.tolist()
    assert sorted(seen) == list(range(103)) and seen != list(range(103))  # shuffled, all once


def test_feature_files_with_a_batch_axis_are_read(tmp_path):
    with h5py.File(tmp_path / "b.h5", "w") as fh:  # some extractors keep a leading batch axis
        fh["features"] = np.ones((1, 5, 8), np.float32)
        fh["coords"] = np.zeros((1, 5, 2), np.int64)
    with FeatureBag(tmp_path / "b.h5") as bag:
        assert len(bag) == 5 and bag.dim == 8


@pytest.mark.parametrize("content,needle", [
    ({"features": np.ones((4, 8))}, "no 'coords'"),
    ({"coords": np.zeros((4, 2))}, "no 'features'"),
    ({"features": np.ones((4, 8)), "coords": np.zeros((3, 2))}, "4 feature rows but 3 coords"),
    ({"features": np.ones((4, 8)), "coords": np.zeros((4, 3))}, "expected (N, 2)"),
    ({"features": np.ones((0, 8)), "coords": np.zeros((0, 2))}, "empty"),
])
def test_bad_feature_files_are_one_line(tmp_path, content, needle):
    with h5py.File(tmp_path / "bad.h5", "w") as fh:
        for key, value in content.items():
            fh[key] = value
    with pytest.raises(BagError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        FeatureBag(tmp_path / "bad.h5")


def test_feature_width_must_match_the_model_and_files_must_be_hdf5(tmp_path):
    path = write_feature_file(tmp_path / "s.h5", np.ones((3, 8)), np.zeros((3, 2)))
    with pytest.raises(BagError, match="8-dimensional, the model expects 16"):
        FeatureBag(path, expected_dim=16)
    (tmp_path / "x.h5").write_bytes(b"not hdf5")
    with pytest.raises(BagError, match="not a readable HDF5"):
        FeatureBag(tmp_path / "x.h5")


def test_image_patches_cover_the_image_flush_with_its_edges():
    image = np.random.default_rng(0).integers(0, 255, (522, 775, 3), dtype=np.uint8)
    patches, coords = image_patches(image, 128)
    assert patches.shape[1:] == (3, 128, 128) and patches.dtype == torch.uint8
    covered = np.zeros(image.shape[:2], bool)
    for (x, y), p in zip(coords, patches.numpy()):
        np.testing.assert_array_equal(p.transpose(1, 2, 0), image[y:y + 128, x:x + 128])
        covered[y:y + 128, x:x + 128] = True
    assert covered.all()
    assert coords[:, 0].max() == 775 - 128 and coords[:, 1].max() == 522 - 128
    assert len(image_patches(image, 128, 64)[1]) > len(coords)
    with pytest.raises(BagError, match="smaller than one"):
        image_patches(image[:100], 128)


def test_labels_csv_and_its_errors(tmp_path):
    for name in ("a.h5", "b.h5", "c.h5"):
        (tmp_path / name).write_bytes(b"")
    good = tmp_path / "labels.csv"
    good.write_text("slide,label\na.h5,tumour\nb.h5,normal\nc.h5,tumour\n")
    bags, classes = read_labels_csv(good)
    assert classes == ["normal", "tumour"] and [b.label for b in bags] == [1, 0, 1]
    assert bags[0].source == tmp_path / "a.h5" and bags[0].name == "a"
    bags, classes = read_labels_csv(good, classes=["tumour", "normal"])
    assert [b.label for b in bags] == [0, 1, 0]
    cases = {
        "slide,label\na.h5,tumour\nmissing.h5,normal\n": "1 listed files do not exist: missing.h5",
        "slide,label\na.h5,tumour\nb.h5,other\n": "unknown labels ['other']",
        "slide,grade\na.h5,tumour\n": "columns must include 'slide' and 'label'",
        "slide,label\n": "no rows",
        "slide,label\na.h5,tumour\nb.h5,tumour\n": "only one class",
        "slide,label\na.h5,tumour\na.h5,normal\n": "listed twice",
        "slide,label\na.h5,\nb.h5,normal\n": "line 2 has an empty slide or label",
    }
    for text, needle in cases.items():
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(BagError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            read_labels_csv(bad, classes=["tumour", "normal"] if "other" in text else None)
    with pytest.raises(BagError, match="cannot read"):
        read_labels_csv(tmp_path / "nope.csv")


def test_glas_grades():
    if not GLAS_GRADES.exists():
        pytest.skip(f"GlaS data missing: {GLAS_GRADES}")
    grades = bench_module("glas").glas_grades(GLAS_GRADES)
    assert len(grades) == 145 and set(grades.values()) == {"benign", "malignant"}  # train_* and testA_*
    assert grades["testA_1"] == "benign" and grades["testA_12"] == "malignant"


def test_grades_file_must_look_like_glas(tmp_path):
    (tmp_path / "g.csv").write_text("a,b\n1,2\n")
    with pytest.raises(BagError, match="not GlaS"):
        bench_module("glas").glas_grades(tmp_path / "g.csv")
