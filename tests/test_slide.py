"""Slide reading: both backends on real files, region reads, mpp handling, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import textured, write_pyramid_tiff

from wsi_amr.params import flag_text
from wsi_amr.slide import MissingMppError, Resolution, SlideError, open_slide, slide_stem

# (relative path, backend, width, height, levels, mpp_x or None) — from ../shared/data/README.md
REAL = [
    ("aperio/CMU-1-Small-Region.svs", "openslide", 2220, 2967, 1, 0.499),
    ("aperio/tcga-cr-7395-01a-01-ts1.svs", "openslide", 4443, 3567, 2, None),
    ("ome-tiff/OS-1-detail.ome.tif", "tifffile", 1101, 1101, 1, 0.2271),
    ("ome-tiff/OS-2-ndpi.ome.tif", "tifffile", 2202, 2202, 1, 0.2271),
    ("ome-tiff/OS-2-vsi.ome.tif", "tifffile", 1445, 1445, 1, 0.3461),
    ("generic-tiff/boxes.tiff", "openslide", 300, 250, 4, 352.78),
    ("dicom/openslide-boxes/boxes_0.dcm", "openslide", 16, 16, 1, 0.499),
    ("plain-tiff/kidney-48-5.tif", "tifffile", 1493, 901, 1, None),
    ("qptiff/small_vectra.qptiff", "tifffile", 1920, 1440, 1, 0.4965),
]


@pytest.mark.parametrize("rel,backend,width,height,levels,mpp", REAL, ids=[r[0] for r in REAL])
def test_real_slides_report_size_levels_and_mpp(slides_dir: Path, rel, backend, width, height, levels, mpp):
    with open_slide(slides_dir / rel) as slide:
        info = slide.info()
        assert info["backend"] == backend
        assert (info["width"], info["height"]) == (width, height)
        assert info["level_count"] == levels
        if mpp is None:
            assert info["mpp_x"] is None
        else:
            assert info["mpp_x"] == pytest.approx(mpp, rel=1e-3)
        thumb, ds = slide.thumbnail(256)
        assert thumb.dtype == np.uint8 and thumb.ndim == 3 and thumb.shape[2] == 3
        assert max(thumb.shape[:2]) <= 256


@pytest.mark.parametrize("name", ["broken.svs", "unopenable.tiff", "unreadable.svs"])
def test_broken_files_are_refused_with_the_file_name(slides_dir: Path, name: str):
    with pytest.raises(SlideError) as exc:
        open_slide(slides_dir / "negative" / name)
    msg = str(exc.value)
    assert name in msg and "\n" not in msg


def test_missing_file_and_folder_and_text_file_are_refused(tmp_path: Path):
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SlideError, match="folder"):
        open_slide(tmp_path)
    fake = tmp_path / "notes.svs"
    fake.write_text("this is not a slide\n")
    with pytest.raises(SlideError, match="not a readable slide"):
        open_slide(fake)


def test_tifffile_backend_reads_exact_pixels(slides_dir: Path):
    path = slides_dir / "ome-tiff" / "OS-2-ndpi.ome.tif"
    full = tifffile.imread(path)
    with open_slide(path) as slide:
        assert slide.backend == "tifffile"
        region = slide.read_level(0, 700, 300, 600, 517)  # crosses 512-px tile borders
        np.testing.assert_array_equal(region, full[300:817, 700:1300])
        # Outside the image reads as white glass.
        edge = slide.read_level(0, 2150, 2150, 100, 100)
        np.testing.assert_array_equal(edge[:52, :52], full[2150:, 2150:])
        assert (edge[60:, :] == 255).all() and (edge[:, 60:] == 255).all()


def test_stripped_tiff_reads_exact_pixels(slides_dir: Path):
    path = slides_dir / "plain-tiff" / "kidney-48-5.tif"
    full = tifffile.imread(path)
    with open_slide(path) as slide:
        np.testing.assert_array_equal(slide.read_level(0, 10, 20, 300, 200), full[20:220, 10:310])


def test_region_read_at_downsample_uses_pyramid_and_resizes(tmp_path: Path):
    img = np.full((1024, 1536, 3), 240, np.uint8)
    img[200:800, 300:1200] = textured(600, 900)
    path = write_pyramid_tiff(tmp_path / "s.tiff", img, mpp=0.25, tile=128)
    with open_slide(path) as slide:
        assert slide.level_count == 3
        assert slide.best_level_for_downsample(3.0) == 1
        # A level's own downsample reads that level exactly.
        direct = slide.read_level(1, 0, 0, 768, 512)
        np.testing.assert_array_equal(slide.read_region(0, 0, 768, 512, 2.0), direct)
        # In between levels: read the finer one and resize; close to an area-resized level 0.
        got = slide.read_region(0, 0, 512, 341, slide.downsample_for(Resolution(mpp=0.75)))
        assert got.shape == (341, 512, 3)
        import cv2

        ref = cv2.resize(img[: 341 * 3, : 512 * 3], (512, 341), interpolation=cv2.INTER_AREA)
        assert np.abs(got.astype(int) - ref).mean() < 3.0


def test_missing_mpp_names_slide_mpp_and_override_works(tmp_path: Path):
    path = write_pyramid_tiff(tmp_path / "nompp.tiff", textured(512, 512), mpp=None, levels=1)
    with open_slide(path) as slide:
        assert slide.mpp is None
        with pytest.raises(MissingMppError, match="slide_mpp") as info:
            slide.downsample_for(Resolution(mpp=1.0))
        assert "give it with --slide-mpp" in flag_text(info.value)  # as the CLI prints it
    with open_slide(path, slide_mpp=0.25) as slide:
        assert slide.mpp == (0.25, 0.25)
        assert slide.downsample_for(Resolution(mpp=1.0)) == pytest.approx(4.0)
        assert slide.info()["mpp_source"] == "--slide-mpp"


def test_resolution_by_magnification_and_upsampling_refused(slides_dir: Path):
    with open_slide(slides_dir / "aperio" / "CMU-1-Small-Region.svs") as slide:
        assert slide.objective_power == 20
        assert slide.downsample_for(Resolution(magnification=10)) == pytest.approx(2.0)
        assert slide.downsample_for(Resolution(mpp=0.499)) == pytest.approx(1.0)
        with pytest.raises(SlideError, match="finer than"):
            slide.downsample_for(Resolution(mpp=0.25))
    with pytest.raises(ValueError):
        Resolution(mpp=0.5, magnification=20)
    with pytest.raises(ValueError):
        Resolution(mpp=-1)


def test_bad_slide_mpp_value_is_refused(slides_dir: Path):
    with pytest.raises(SlideError, match="slide_mpp") as info:
        open_slide(slides_dir / "aperio" / "CMU-1-Small-Region.svs", slide_mpp=0.0)
    assert flag_text(info.value).startswith("--slide-mpp must be a positive number")


def test_slide_stem_strips_multi_part_extensions():
    assert slide_stem("a/b/OS-1.ome.tif") == "OS-1"
    assert slide_stem("x.svs") == "x"
    assert slide_stem("x.y.tiff") == "x.y"


def test_direct_tile_decoding_matches_openslide_exactly(tmp_path: Path):
    img = np.full((1536, 2048, 3), 240, np.uint8)
    img[100:1400, 200:1900] = textured(1300, 1700)
    path = write_pyramid_tiff(tmp_path / "d.tiff", img, mpp=0.5, tile=256, compression="jpeg")
    with open_slide(path) as slide:
        assert slide.backend == "openslide" and slide._direct is not None
        assert 0 in slide._direct_levels
        for level in range(slide.level_count):
            for x, y in [(0, 0), (512, 256), (1900, 1400), (1000, 700)]:
                got = slide.read_level(level, x, y, 300, 200)
                ref = slide._read_openslide(level, x, y, 300, 200)
                np.testing.assert_array_equal(got, ref)


def test_small_tiles_stay_on_openslide(slides_dir: Path):
    # CMU-1-Small-Region has 240-px tiles: below the size where direct decoding pays off.
    with open_slide(slides_dir / "aperio" / "CMU-1-Small-Region.svs") as slide:
        assert slide._direct is None
