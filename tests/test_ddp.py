"""Training under torchrun: two CPU processes (gloo) against one process at the same global batch,
for `train segment` and `train classify`; rank 0 alone writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, invoke
from safetensors.torch import load_file
from test_classify_cli import synthetic_features
from test_training import synthetic_images

from wsi_amr.ddp import Group

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

STEPS = 3
# A global batch of 4: one process makes all 4 crops (bags), each of two processes makes 2.
SEGMENT = ["--steps", STEPS, "--val-fraction", 0, "--width", 32, "--depth", 1, "--heads", 4, "--crop", 64,
           "--min-size", 8, "--max-size", 64, "--batch-size", 4, "--device", "cpu", "--log-every", 1,
           "--threads", 1]
CLASSIFY = ["--steps", STEPS, "--val-fraction", 0, "--embed-dim", 16, "--width", 16, "--heads", 2, "-M", 4, "-I", 8,
            "--batch-size", 4, "--device", "cpu", "--log-every", 1, "--threads", 1]
def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == "train"]


def test_torchrun_two_processes_train_as_one_at_the_same_global_batch(runner, tmp_path):
    images, masks = synthetic_images(tmp_path / "images", n=4)
    labels = synthetic_features(tmp_path / "features")
    commands = {
        "segment": ["train", "segment", "--images", images, "--masks", masks, *SEGMENT],
        "classify": ["train", "classify", labels, "--features", tmp_path / "features", *CLASSIFY],
    }
    for name, args in commands.items():
        res = invoke(runner, *args, "-o", tmp_path / f"{name}-1")
        assert res.exit_code == 0, res.stderr
    # Both commands under torchrun at once (one torchrun each: a process joins one process group).
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "wsi_amr.cli", *[str(a) for a in args], "-o", str(tmp_path / f"{name}-2")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
             for name, args in commands.items()]
    try:
        stderr = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:  # torchrun and its workers, should a run hang
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in stderr)
    # Rank 0 alone reports and writes: one result line per command, one log line per step.
    for name, err in zip(commands, stderr):
        assert [line for line in err.splitlines() if line.startswith("trained")] == [
            f"trained {STEPS} steps (no validation split) -> {tmp_path / f'{name}-2' / 'best.safetensors'}"]
    for name in commands:
        one, two = tmp_path / f"{name}-1", tmp_path / f"{name}-2"
        assert len(losses(two)) == STEPS
        assert losses(two) == pytest.approx(losses(one), rel=1e-5, abs=1e-6), name
        a, b = load_file(str(one / "last.safetensors")), load_file(str(two / "last.safetensors"))
        assert a.keys() == b.keys()
        # Adam moves every weight by up to lr (1e-3) a step; the runs differ by rounding only.
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst < 2e-4, (name, worst)


def test_each_process_takes_a_share_of_the_global_batch():
    for n, world in ((4, 2), (5, 2), (8, 3), (3, 3)):
        shares = [Group(rank, world).share(n) for rank in range(world)]
        assert [i for share in shares for i in share] == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_global_batch_smaller_than_the_processes_is_a_usage_error(runner, tmp_path, monkeypatch):
    images, masks = synthetic_images(tmp_path / "images", n=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    res = invoke(runner, "train", "segment", "--images", images, "--masks", masks, "-o", tmp_path / "run",
                 *[str(a) for a in SEGMENT[:-6]], "--batch-size", "1", "--device", "cpu")
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == ["error: --batch-size 1 is the batch of the whole step, shared by 2 "
                                               "processes: give at least 2"]
