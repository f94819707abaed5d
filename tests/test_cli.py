"""The command line end to end: real slides, batch conventions, bad input, resumption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from conftest import REPO, invoke, textured, write_pyramid_tiff

from wsi_amr.geojson import read_geojson, validate_geojson
from wsi_amr.slide import Resolution, open_slide

pytestmark = pytest.mark.slow  # runs the CLI or trains: not in `make test-fast`

CLI = [sys.executable, "-m", "wsi_amr.cli"]


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "failed:"))]


# -- info ---------------------------------------------------------------------------------------
def test_info_json_on_every_readable_real_slide(runner, slides_dir):
    good = [p for p in sorted(slides_dir.rglob("*")) if p.is_file() and "negative" not in p.parts
            and "licenses" not in p.parts and p.suffix not in (".md",)]
    res = invoke(runner, "info", "--json", *good)
    assert res.exit_code == 0, res.stderr
    rows = {Path(r["path"]).name: r for r in json_lines(res.stdout)}
    assert len(rows) == len(good)
    cmu = rows["CMU-1-Small-Region.svs"]
    assert (cmu["width"], cmu["height"], cmu["mpp_x"], cmu["objective_power"]) == (2220, 2967, 0.499, 20.0)
    assert set(cmu["associated_images"]) == {"label", "macro", "thumbnail"}
    for key in ("path", "backend", "vendor", "width", "height", "level_count", "downsamples",
                "mpp_x", "mpp_y", "objective_power", "associated_images"):
        assert key in cmu
    ome = rows["OS-1-detail.ome.tif"]
    assert ome["backend"] == "tifffile" and ome["mpp_x"] == pytest.approx(0.2271, rel=1e-3)


def test_info_table_and_bad_files(runner, slides_dir, tmp_path):
    fake = tmp_path / "fake.svs"
    fake.write_text("hello")
    res = invoke(runner, "info", slides_dir / "aperio" / "CMU-1-Small-Region.svs", fake)
    assert res.exit_code == 1
    assert "CMU-1-Small-Region" in res.stdout and "0.499" in res.stdout
    errs = error_lines(res.stderr)
    assert len(errs) == 1 and "fake.svs" in errs[0]


# -- tissue -------------------------------------------------------------------------------------
def test_tissue_on_sample_slide_writes_valid_qupath_geojson(runner, slides_dir, tmp_path):
    out = tmp_path / "out"
    res = invoke(runner, "tissue", slides_dir / "aperio" / "CMU-1-Small-Region.svs", "-o", out, "--json")
    assert res.exit_code == 0, res.stderr
    folder = out / "CMU-1-Small-Region"
    assert validate_geojson(folder / "tissue.geojson") == []
    objs = read_geojson(folder / "tissue.geojson")
    assert objs and all(o.class_name == "Tissue" and o.object_type == "annotation" for o in objs)
    total = sum(o.geometry.area for o in objs)
    assert 0.15 * 2220 * 2967 < total < 0.7 * 2220 * 2967  # the sample is about a third tissue
    minx, miny, maxx, maxy = objs[0].geometry.bounds
    assert minx >= 0 and miny >= 0 and maxx <= 2220 and maxy <= 2967
    png = cv2.imread(str(folder / "tissue.png"))
    assert png is not None and png.ndim == 3
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["steps"]["tissue"]["status"] == "done"
    assert manifest["slide"]["mpp_x"] == 0.499
    assert json_lines(res.stdout)[0]["status"] == "done"


def test_no_tissue_gives_warning_and_empty_feature_collection(runner, tmp_path):
    blank = write_pyramid_tiff(tmp_path / "blank.tiff", np.full((1024, 1024, 3), 243, np.uint8))
    res = invoke(runner, "tissue", blank, "-o", tmp_path / "out")
    assert res.exit_code == 1
    assert "no tissue" in res.stderr
    data = json.loads((tmp_path / "out" / "blank" / "tissue.geojson").read_text())
    assert data == {"type": "FeatureCollection", "features": []}


def test_fluorescence_option(runner, tmp_path):
    img = np.full((1024, 1024, 3), 4, np.uint8)
    img[200:800, 300:900, 2] = 170
    path = write_pyramid_tiff(tmp_path / "fluo.tiff", img)
    out = tmp_path / "out"
    res = invoke(runner, "tissue", path, "-o", out, "--modality", "fluorescence")
    assert res.exit_code == 0, res.stderr
    (obj,) = read_geojson(out / "fluo" / "tissue.geojson")
    assert obj.geometry.area == pytest.approx(600 * 600, rel=0.05)


# -- tile ---------------------------------------------------------------------------------------
def test_tile_count_exact_on_known_tissue_rectangle(runner, rect_slide, tmp_path):
    path, (x, y, w, h) = rect_slide
    out = tmp_path / "out"
    res = invoke(runner, "tile", path, "-o", out, "--mpp", "0.5", "--size", "256", "--json")
    assert res.exit_code == 0, res.stderr
    coords, attrs = _read_tiles(out / "rect" / "tiles.h5")
    assert len(coords) == (w // 256) * (h // 256)
    assert coords[:, 0].min() == x and coords[:, 1].min() == y
    assert coords[:, 0].max() == x + w - 256 and coords[:, 1].max() == y + h - 256
    # At 1.0 µm/px (tiles of 512 level-0 px from the origin) the rectangle fully covers 3 x 2 tiles
    # and half covers 3 more, which --min-tissue 0.75 leaves out.
    res = invoke(runner, "tile", path, "-o", tmp_path / "out2", "--mpp", "1.0", "--size", "256",
                 "--min-tissue", "0.75")
    coords2, attrs2 = _read_tiles(tmp_path / "out2" / "rect" / "tiles.h5")
    assert attrs2["patch_size_level0"] == 512 and attrs2["patch_level"] == 1
    assert len(coords2) == 3 * 2


def _read_tiles(path: Path):
    with h5py.File(path) as f:
        ds = f["coords"]
        return ds[:], dict(ds.attrs)


def test_tiles_h5_has_clam_attributes_and_images_match_reads(runner, slides_dir, tmp_path):
    slide_path = slides_dir / "aperio" / "CMU-1-Small-Region.svs"
    out = tmp_path / "out"
    res = invoke(runner, "tile", slide_path, "-o", out, "--mpp", "1.0", "--size", "128", "--save-images",
                 "--image-format", "png")
    assert res.exit_code == 0, res.stderr
    coords, attrs = _read_tiles(out / "CMU-1-Small-Region" / "tiles.h5")
    assert coords.dtype == np.int64 and coords.ndim == 2 and coords.shape[1] == 2 and len(coords) > 20
    for key in ("patch_size", "patch_level", "downsample", "level_dim", "downsampled_level_dim", "name",
                "mpp", "patch_size_level0", "overlap"):
        assert key in attrs, key
    assert attrs["patch_size"] == 128 and attrs["mpp"] == pytest.approx(1.0, rel=0.01)
    assert attrs["patch_size_level0"] == round(128 * 1.0 / 0.499)
    images = sorted((out / "CMU-1-Small-Region" / "tiles").glob("*.png"))
    assert len(images) == len(coords)
    with open_slide(slide_path) as slide:
        for x, y in coords[:: max(1, len(coords) // 5)]:
            saved = cv2.cvtColor(cv2.imread(str(out / "CMU-1-Small-Region" / "tiles" / f"{x}_{y}.png")), cv2.COLOR_BGR2RGB)
            again = slide.read_region(x, y, 128, 128, slide.downsample_for(Resolution(mpp=1.0)))
            np.testing.assert_array_equal(saved, again)
    assert (out / "CMU-1-Small-Region" / "tiles.png").exists()


def test_rerun_skips_finished_slides_and_overwrite_redoes(runner, rect_slide, tmp_path):
    path, _ = rect_slide
    out = tmp_path / "out"
    first = json_lines(invoke(runner, "tile", path, "-o", out, "--json").stdout)
    assert first[0]["status"] == "done"
    second = json_lines(invoke(runner, "tile", path, "-o", out, "--json").stdout)
    assert second[0]["status"] == "skipped"
    changed = json_lines(invoke(runner, "tile", path, "-o", out, "--json", "--size", "128").stdout)
    assert changed[0]["status"] == "done"  # other parameters: not current any more
    again = json_lines(invoke(runner, "tile", path, "-o", out, "--json", "--size", "128", "--overwrite").stdout)
    assert again[0]["status"] == "done"
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("finished,command,slide") and len(rows) == 5


def test_tcga_without_mpp_names_slide_mpp_and_works_with_it(runner, slides_dir, tmp_path):
    tcga = slides_dir / "aperio" / "tcga-cr-7395-01a-01-ts1.svs"
    res = invoke(runner, "tile", tcga, "-o", tmp_path / "out")
    assert res.exit_code == 1
    (line,) = error_lines(res.stderr)
    assert "--slide-mpp" in line and "tcga-cr-7395" in line
    res = invoke(runner, "tile", tcga, "-o", tmp_path / "out", "--slide-mpp", "0.25", "--mpp", "1.0", "--json")
    assert res.exit_code == 0, res.stderr
    assert json_lines(res.stdout)[0]["stats"]["tiles"] > 0


# -- inputs and bad input -------------------------------------------------------------------------
def test_every_negative_file_fails_alone_and_good_slides_finish(runner, slides_dir, tmp_path):
    fake = tmp_path / "text.svs"
    fake.write_text("not a slide")
    empty_dir = tmp_path / "no-slides"
    empty_dir.mkdir()
    good = slides_dir / "aperio" / "CMU-1-Small-Region.svs"
    bad = sorted((slides_dir / "negative").glob("*"))
    res = invoke(runner, "tile", good, *bad, fake, tmp_path / "missing.svs", empty_dir, "-o", tmp_path / "out", "--json")
    assert res.exit_code == 1
    status = {Path(r["slide"]).name: r["status"] for r in json_lines(res.stdout)}
    assert status["CMU-1-Small-Region.svs"] == "done"
    for p in bad + [fake]:
        assert status[p.name] in ("failed", "empty"), p.name
    lines = res.stderr.splitlines()
    for name in [p.name for p in bad] + ["text.svs", "missing.svs", "no-slides"]:
        hits = [line for line in lines if name in line and line.split(":")[0] in ("error", "failed", "warning")]
        assert len(hits) == 1, (name, hits)
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("name", ["broken.svs", "unopenable.tiff", "unreadable.svs", "small.svs"])
def test_each_negative_file_alone_exits_non_zero_with_one_line(runner, slides_dir, tmp_path, name):
    res = invoke(runner, "tile", slides_dir / "negative" / name, "-o", tmp_path / "out")
    assert res.exit_code != 0
    named = [line for line in res.stderr.splitlines() if name in line]
    assert len(named) == 1


def test_missing_path_and_empty_folder_are_usage_errors(runner, tmp_path):
    res = invoke(runner, "tissue", tmp_path / "nothing.svs", "-o", tmp_path / "out")
    assert res.exit_code == 2 and "nothing.svs: no such file" in res.stderr
    (tmp_path / "empty").mkdir()
    res = invoke(runner, "tissue", tmp_path / "empty", "-o", tmp_path / "out")
    assert res.exit_code == 2 and "holds no slides" in res.stderr


def test_unwritable_output_folder_is_one_clear_line(runner, rect_slide, tmp_path):
    path, _ = rect_slide
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = invoke(runner, "tile", path, "-o", blocker / "out")
    assert res.exit_code == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "cannot write" in res.stderr


@pytest.mark.parametrize("args,needle", [
    (["--size", "256", "--overlap", "256"], "--overlap"),
    (["--min-tissue", "1.5"], "--min-tissue"),
    (["--mpp", "0.5", "--magnification", "20"], "either"),
    (["--mpp", "-1"], "--mpp"),
    (["--image-format", "bmp"], "--image-format"),
    (["--slide-mpp", "0"], "--slide-mpp"),
    (["--modality", "xray"], "--modality"),
])
def test_bad_option_values_are_usage_errors(runner, rect_slide, tmp_path, args, needle):
    path, _ = rect_slide
    res = invoke(runner, "tile", path, "-o", tmp_path / "out", *args)
    assert res.exit_code == 2 and needle in res.stderr and "Traceback" not in res.stderr


def test_inputs_from_stdin_folders_and_globs(runner, rect_slide, tmp_path):
    path, _ = rect_slide
    other = write_pyramid_tiff(tmp_path / "other.tiff", textured(768, 768))
    res = invoke(runner, "tissue", "-", "-o", tmp_path / "a", "--json", input=f"{path}\n{other}\n")
    assert sorted(r["stem"] for r in json_lines(res.stdout)) == ["other", "rect"]
    res = invoke(runner, "tissue", str(tmp_path / "*.tiff"), "-o", tmp_path / "b", "--json")
    assert sorted(r["stem"] for r in json_lines(res.stdout)) == ["other", "rect"]
    res = invoke(runner, "tissue", tmp_path, "-o", tmp_path / "c", "--json")
    assert sorted(r["stem"] for r in json_lines(res.stdout)) == ["other", "rect"]


def test_parallel_jobs_give_the_same_tiles(runner, rect_slide, tmp_path):
    path, _ = rect_slide
    other = write_pyramid_tiff(tmp_path / "other.tiff", textured(768, 768))
    invoke(runner, "tile", path, other, "-o", tmp_path / "serial")
    res = invoke(runner, "tile", path, other, "-o", tmp_path / "par", "--jobs", "2", "--json")
    assert res.exit_code == 0, res.stderr
    for stem in ("rect", "other"):
        a, _ = _read_tiles(tmp_path / "serial" / stem / "tiles.h5")
        b, _ = _read_tiles(tmp_path / "par" / stem / "tiles.h5")
        np.testing.assert_array_equal(a, b)


def test_killed_tile_run_resumes_without_redoing_or_partial_files(tmp_path):
    img = np.full((4096, 4096, 3), 245, np.uint8)
    img[256:3840, 256:3840] = textured(3584, 3584)
    path = write_pyramid_tiff(tmp_path / "big.tiff", img)
    done_slide = write_pyramid_tiff(tmp_path / "done.tiff", textured(768, 768))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [*CLI, "tile", "--mpp", "0.5", "--size", "64", "--save-images", "--image-format", "png", "-o", str(out)]
    subprocess.run([*base, str(done_slide)], check=True, env=env, capture_output=True)
    done_manifest = (out / "done" / "manifest.json").read_text()
    proc = subprocess.Popen([*base, str(done_slide), str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tiles = out / "big" / "tiles"
    deadline = time.time() + 60
    while time.time() < deadline and (not tiles.exists() or len(list(tiles.iterdir())) < 200):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The killed run leaves its lock behind (a dead pid): the next run takes it over.
    assert json.loads((out / "big" / ".lock").read_text())["pid"] == proc.pid
    n_before = len([p for p in tiles.glob("*.png") if not p.name.startswith(".tmp-")])
    assert 0 < n_before < 56 * 56
    manifest = json.loads((out / "big" / "manifest.json").read_text()) if (out / "big" / "manifest.json").exists() else {}
    assert manifest.get("steps", {}).get("tile", {}).get("status") != "done"
    res = subprocess.run([*base, "--json", str(done_slide), str(path)], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    status = {r["stem"]: r for r in json_lines(res.stdout)}
    assert status["done"]["status"] == "skipped"
    assert (out / "done" / "manifest.json").read_text() == done_manifest
    assert status["big"]["status"] == "done"
    assert status["big"]["stats"]["images_written"] == status["big"]["stats"]["tiles"] - n_before
    names = [p.name for p in (out / "big").rglob("*")]
    assert not [n for n in names if n.startswith(".tmp-")] and ".lock" not in names
    coords, _ = _read_tiles(out / "big" / "tiles.h5")
    assert len(list(tiles.glob("*.png"))) == len(coords)
    for p in list(tiles.glob("*.png"))[:: max(1, len(coords) // 50)]:
        assert cv2.imread(str(p)) is not None


def test_one_slide_split_over_worker_processes_gives_the_same_images(runner, rect_slide, tmp_path):
    path, _ = rect_slide
    args = ["--mpp", "0.5", "--size", "64", "--save-images", "--image-format", "png"]
    invoke(runner, "tile", path, "-o", tmp_path / "serial", *args)
    res = invoke(runner, "tile", path, "-o", tmp_path / "par", "--jobs", "2", *args, "--json")
    assert res.exit_code == 0, res.stderr
    a = sorted(p.name for p in (tmp_path / "serial" / "rect" / "tiles").iterdir())
    b = sorted(p.name for p in (tmp_path / "par" / "rect" / "tiles").iterdir())
    assert a == b and len(a) == json_lines(res.stdout)[0]["stats"]["tiles"] > 256
    for name in a[:: len(a) // 10]:
        assert (tmp_path / "serial" / "rect" / "tiles" / name).read_bytes() == (tmp_path / "par" / "rect" / "tiles" / name).read_bytes()


@pytest.mark.parametrize("args,needle", [
    (["--tissue-threshold", "300"], "--tissue-threshold"),
    (["--min-area", "-1"], "--min-area"),
    (["--jobs", "0"], "--jobs"),
])
def test_bad_tissue_option_values_are_usage_errors(runner, rect_slide, tmp_path, args, needle):
    path, _ = rect_slide
    res = invoke(runner, "tissue", path, "-o", tmp_path / "out", *args)
    assert res.exit_code == 2 and needle in res.stderr and "Traceback" not in res.stderr


def test_folder_search_skips_the_output_folder(tmp_path):
    from wsi_amr.run.inputs import resolve_inputs

    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "out" / "a").mkdir(parents=True)
    (tmp_path / "out" / "a" / "mask.tiff").write_bytes(b"x")
    found, problems = resolve_inputs([str(tmp_path)], exclude=tmp_path / "out")
    assert found == [tmp_path / "a.svs"] and problems == []
    found, _ = resolve_inputs([str(tmp_path)])
    assert len(found) == 2


def test_the_command_line_and_the_slide_jobs_start_without_torch():
    # PyTorch takes seconds to import: only the commands that run a model may pay for it, not
    # `wsi-amr tile --help` nor every pool or cluster worker that tiles.
    code = ("import sys, wsi_amr.cli, wsi_amr.run.runner, wsi_amr.run.worker, wsi_amr.jobs.tile, wsi_amr.jobs.quadtree, wsi_amr.jobs.tissue; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "False"


def test_every_written_default_shows_in_the_help(runner):
    # Rich reads an unescaped "[default: ...]" in option help as a markup tag and drops it:
    # "adaptive or uniform ." was all `segment --help` said of --patching.
    import re

    import click
    import typer

    from wsi_amr.cli import app

    def commands(group: click.Group, path: tuple[str, ...] = ()):
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                yield from commands(cmd, (*path, name))
            else:
                yield (*path, name), cmd

    checked = 0
    for path, cmd in commands(typer.main.get_command(app)):
        written = [m for p in cmd.params for m in re.findall(r"\[default: ([^\]]+)\]", p.help or "")]
        if not written:
            continue
        res = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "400"}, catch_exceptions=False)
        assert res.exit_code == 0
        for default in written:
            assert f"[default: {default}]" in res.stdout, (path, default)
            checked += 1
    assert checked >= 10
