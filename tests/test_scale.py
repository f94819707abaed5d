"""One batch runner, many backends: a real Dask LocalCluster, static shards (Slurm job arrays),
concurrent runs on one output folder, and the per-slide lock (stale locks taken over)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import SLIDES, invoke, textured, write_pyramid_tiff

from wsi_amr.locks import LOCK, LOCK_STALE_S, process_identity, slide_lock
from wsi_amr.run.runner import in_shard, parse_shard, shard_from_env

pytestmark = pytest.mark.slow  # runs the CLI or trains: not in `make test-fast`

# Real slides of four formats that tile and quadtree finish (done or empty) quickly, and a corrupt one.
REAL = ["aperio/CMU-1-Small-Region.svs", "ome-tiff/OS-2-ndpi.ome.tif", "ome-tiff/OS-2-vsi.ome.tif",
        "qptiff/small_vectra.qptiff"]
CORRUPT = "negative/broken.svs"
VARYING = {"finished", "seconds", "command"}  # manifest fields that differ between any two runs


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def small_slides(folder: Path, n: int, size: int = 512) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_pyramid_tiff(folder / f"s{i}.tiff", textured(size, size, seed=i), levels=1) for i in range(n)]


def h5_content(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        content = {f"attr:{k}": np.asarray(v).tolist() for k, v in f.attrs.items()}
        for name, ds in f.items():
            content[name] = ds[:].tolist()
            content.update({f"{name}.attr:{k}": np.asarray(v).tolist() for k, v in ds.attrs.items()})
    return content


def manifest_content(path: Path) -> dict:
    doc = json.loads(path.read_text())
    for step in doc["steps"].values():
        for key in VARYING:
            step.pop(key, None)
        step["stats"] = {k: v for k, v in step["stats"].items() if not k.startswith("seconds")}
    return doc


def assert_same_outputs(a: Path, b: Path) -> None:
    """Every file of two output folders: HDF5 and manifests equal in content (timings aside),
    everything else byte for byte."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "summary.csv")
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "summary.csv")
    assert files_a == files_b
    for rel in files_a:
        if rel.suffix == ".h5":
            assert h5_content(a / rel) == h5_content(b / rel), rel
        elif rel.name == "manifest.json":
            assert manifest_content(a / rel) == manifest_content(b / rel), rel
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


# -- Dask ----------------------------------------------------------------------------------------
def test_dask_cluster_gives_the_serial_outputs_and_a_corrupt_slide_fails_alone(runner, tmp_path):
    distributed = pytest.importorskip("distributed", reason='Dask is an optional extra: pip install "wsi-amr[dask]"')
    if not SLIDES.is_dir():
        pytest.skip(f"real slides not found at {SLIDES}")
    import logging

    slides = [SLIDES / name for name in [*REAL, CORRUPT]]
    commands = {"tile": ["--mpp", "1.0", "--size", "128"],
                "quadtree": ["--mpp", "4.0", "--max-size", "256", "--window", "1024"]}
    # A real cluster: two single-threaded worker processes on loopback, reached by its address.
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=":0", silence_logs=logging.ERROR) as cluster:
        for command, args in commands.items():
            serial = invoke(runner, command, *slides, "-o", tmp_path / "serial", "--json", *args)
            dask = invoke(runner, command, *slides, "-o", tmp_path / "dask", "--json", "--scheduler",
                          cluster.scheduler_address, *args)
            assert serial.exit_code == dask.exit_code == 1  # the corrupt slide
            status = {r["stem"]: r["status"] for r in json_lines(dask.stdout)}
            assert status == {r["stem"]: r["status"] for r in json_lines(serial.stdout)}
            assert status.pop("broken") == "failed" and set(status.values()) <= {"done", "empty"}
            assert "done" in status.values()
            assert [line for line in dask.stderr.splitlines() if "broken.svs" in line] == \
                [line for line in serial.stderr.splitlines() if "broken.svs" in line]
    assert_same_outputs(tmp_path / "serial", tmp_path / "dask")
    # The summary has the same rows, in the same (input) order, whichever backend ran the slides.
    rows = [(tmp_path / run / "summary.csv").read_text().splitlines() for run in ("serial", "dask")]
    assert [r.split(",")[1:5] for r in rows[0]] == [r.split(",")[1:5] for r in rows[1]]


def test_scheduler_local_n_starts_its_own_cluster(runner, tmp_path):
    pytest.importorskip("distributed")
    (slide,) = small_slides(tmp_path / "slides", 1)
    res = invoke(runner, "tissue", slide, "-o", tmp_path / "out", "--scheduler", "local:1", "--json")
    assert res.exit_code == 0, res.stderr
    assert [(r["stem"], r["status"]) for r in json_lines(res.stdout)] == [("s0", "done")]


def _worker_settings() -> tuple:
    import dask

    return (os.environ.get("MALLOC_TRIM_THRESHOLD_"), dask.config.get("distributed.worker.profile.enabled"),
            os.environ.get("OMP_NUM_THREADS"))


def test_local_clusters_run_workers_without_the_profiler_or_malloc_trimming(monkeypatch):
    pytest.importorskip("distributed")
    from wsi_amr.run.cluster import connect

    # A nanny sets its variables in its own process too: an earlier test's cluster leaves it here.
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)

    with connect("local:1") as client:
        assert list(client.run(_worker_settings).values()) == [(None, False, "1")]


def test_unreachable_scheduler_and_missing_dask_are_one_line(runner, tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    import wsi_amr.run.cluster

    monkeypatch.setattr(wsi_amr.run.cluster, "CONNECT_TIMEOUT_S", 1.0)
    (slide,) = small_slides(tmp_path / "slides", 1)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = invoke(runner, "tissue", slide, "-o", tmp_path / "out", "--scheduler", f"tcp://127.0.0.1:{port}")
    assert res.exit_code == 2 and "Traceback" not in res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error: --scheduler tcp://127.0.0.1:") and "cannot reach" in line
    assert not (tmp_path / "out" / "s0").exists()
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if Dask were not installed
    res = invoke(runner, "tissue", slide, "-o", tmp_path / "out", "--scheduler", "local:2")
    assert res.exit_code == 2 and res.stderr.strip().splitlines() == [
        'error: Dask is not installed: pip install "wsi-amr[dask]" (or give --jobs N to use this machine only)']


@pytest.mark.parametrize("args,needle", [
    (["--shard", "3/3"], "--shard 3/3"),
    (["--shard", "0/0"], "--shard 0/0"),
    (["--shard", "-1/2"], "--shard must be I/N"),
    (["--shard", "1"], "--shard must be I/N"),
    (["--scheduler", "local:0"], "local:N"),
    (["--scheduler", "somewhere"], "scheduler address"),
    (["--scheduler", "local:2", "--jobs", "2"], "not both"),
])
def test_bad_shard_and_scheduler_values_are_usage_errors(runner, tmp_path, args, needle):
    (slide,) = small_slides(tmp_path / "slides", 1)
    res = invoke(runner, "tissue", slide, "-o", tmp_path / "out", *args)
    assert res.exit_code == 2 and "Traceback" not in res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error:") and needle in line


# -- shards ----------------------------------------------------------------------------------------
def test_shards_process_every_slide_exactly_once(runner, tmp_path, monkeypatch):
    slides = small_slides(tmp_path / "slides", 7)
    out = tmp_path / "out"
    done: list[str] = []
    for i in range(3):
        # Each shard's run gets the inputs in another order: the split must not depend on it.
        order = slides[i:] + slides[:i]
        res = invoke(runner, "tissue", *order, "-o", out, "--shard", f"{i}/3", "--json")
        assert res.exit_code == 0, res.stderr
        rows = json_lines(res.stdout)
        assert all(r["status"] == "done" for r in rows) and len(rows) in (2, 3)
        assert f"(shard {i}/3 of 7 slides)" in res.stderr
        done += [r["stem"] for r in rows]
    assert sorted(done) == [f"s{i}" for i in range(7)]
    assert len((out / "summary.csv").read_text().splitlines()) == 1 + 7
    # A Slurm array task takes its shard from the environment: task 11 of 10..12 is shard 1/3.
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "11")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    res = invoke(runner, "tissue", *slides, "-o", tmp_path / "env", "--json")
    shard1 = [r["stem"] for r in json_lines(invoke(runner, "tissue", *slides, "-o", tmp_path / "explicit",
                                                   "--shard", "1/3", "--json").stdout)]
    assert [r["stem"] for r in json_lines(res.stdout)] == shard1
    res = invoke(runner, "tissue", *slides, "-o", tmp_path / "all", "--shard", "0/1", "--json")
    assert len(json_lines(res.stdout)) == 7  # --shard 0/1 overrides the environment
    res = invoke(runner, "tissue", *slides[:2], "-o", tmp_path / "few", "--shard", "2/3")
    assert res.exit_code == 0 and "no slides in this shard" in res.stderr


def test_shard_split_and_slurm_environment():
    items = [f"slide{i:02d}" for i in range(10)]
    shards = [in_shard(items, i, 4, key=str) for i in range(4)]
    assert sorted(sum(shards, [])) == items and [len(s) for s in shards] == [3, 3, 2, 2]
    assert in_shard(items[::-1], 1, 4, key=str) == shards[1][::-1]  # same members, input order kept
    assert parse_shard(" 2 / 5 ") == (2, 5)
    assert shard_from_env({}) is None
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "5"}) == (4, 5)
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
                           "SLURM_ARRAY_TASK_STEP": "2"}) == (2, 3)  # --array=1-5:2
    from wsi_amr.run.task import InputError

    with pytest.raises(InputError, match="--shard"):  # --array=1,5,7 is not a range
        shard_from_env({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"})


# -- locks and concurrent runs ---------------------------------------------------------------------
def write_lock(folder: Path, age_s: float = 0.0, **holder) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK
    lock.write_text(json.dumps(holder))
    t = time.time() - age_s
    os.utime(lock, (t, t))
    return lock


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_locks_are_taken_over_and_live_ones_respected(tmp_path):
    here = socket.gethostname()
    me = {"host": here, "pid": os.getpid(), "process": process_identity(os.getpid())}
    cases = {
        "dead process here": (dict(host=here, pid=dead_pid()), 0.0, True),
        "pid reused by another process": (dict(host=here, pid=os.getpid(), process="other-boot:1"), 0.0, True),
        "live process here": (me, 0.0, False),
        "other host, refreshed": (dict(host="node-7", pid=1), 10.0, False),
        "other host, silent too long": (dict(host="node-7", pid=1), LOCK_STALE_S + 60, True),
        "garbage, fresh": ({}, 1.0, False),
    }
    for name, (holder, age, stale) in cases.items():
        folder = tmp_path / name.replace(" ", "-").replace(",", "")
        lock = write_lock(folder, age, **holder)
        with slide_lock(folder) as got:
            assert got == stale, name
            if got:
                assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert lock.exists() != stale, name  # ours is removed on release; another's is left alone
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]


def test_locked_slide_is_left_alone_and_counted_once_its_holder_finishes(runner, tmp_path):
    slides = small_slides(tmp_path / "slides", 2)
    out = tmp_path / "out"
    holder = write_lock(out / "s1", host=socket.gethostname(), pid=os.getpid(),
                        process=process_identity(os.getpid()))
    res = invoke(runner, "tissue", *slides, "-o", out, "--json")
    assert res.exit_code == 1
    rows = {r["stem"]: r for r in json_lines(res.stdout)}
    assert rows["s0"]["status"] == "done" and rows["s1"]["status"] == "locked"
    assert "another run is working on this slide" in rows["s1"]["message"] and str(os.getpid()) in res.stderr
    assert sorted(p.name for p in (out / "s1").iterdir()) == [LOCK]  # nothing written beside the lock
    holder.unlink()
    res = invoke(runner, "tissue", *slides, "-o", out, "--json")
    assert res.exit_code == 0 and [r["status"] for r in json_lines(res.stdout)] == ["skipped", "done"]


def run_cli_in_child(args: list[str], stdout: Path) -> None:
    """In a forked child (its own pid, wsi-amr already imported): run the CLI, keep its stdout."""
    from typer.testing import CliRunner

    from wsi_amr.cli import app

    stdout.write_text(CliRunner().invoke(app, args).stdout)
    os._exit(0)


def test_two_concurrent_runs_never_process_a_slide_twice(tmp_path):
    import multiprocessing

    (tmp_path / "slides").mkdir()
    slides = [write_pyramid_tiff(tmp_path / "slides" / f"c{i}.tiff", textured(768, 768, seed=i), levels=1)
              for i in range(4)]
    out = tmp_path / "out"
    args = ["tile", *map(str, slides), "-o", str(out), "--mpp", "0.5", "--size", "32", "--min-tissue", "0",
            "--save-images", "--image-format", "png", "--json"]
    # Two processes of their own on one output folder, the same slides in the same order.
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=run_cli_in_child, args=(args, tmp_path / f"run{i}.jsonl")) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    rows = [json_lines((tmp_path / f"run{i}.jsonl").read_text()) for i in range(2)]
    for run in rows:
        assert len(run) == len(slides) and {r["status"] for r in run} <= {"done", "skipped", "locked"}
    # Every slide was processed by exactly one of the runs; the other skipped it, or found it locked.
    done = sorted(r["stem"] for run in rows for r in run if r["status"] == "done")
    assert done == sorted(s.stem for s in slides)
    for s in slides:
        folder = out / s.stem
        assert json.loads((folder / "manifest.json").read_text())["steps"]["tile"]["status"] == "done"
        with h5py.File(folder / "tiles.h5") as f:
            assert len(list((folder / "tiles").iterdir())) == len(f["coords"]) == 24 * 24
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-") or p.name == LOCK]
