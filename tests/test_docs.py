"""Every `wsi-amr` example in the README and docs/ runs, and writes what it promises: the docs cannot rot.

The examples are collected from ```console blocks (`$ ` lines) and ```sh blocks (backslash
continuations joined, trailing `# comments` dropped), and one ```python block that calls wsi-amr.
Each runs in a shell, in a sandbox holding every path the examples name (the sample slide as
`sample_data/`, `slides/`, `slide.svs`, `a.svs`; small crops of real GlaS images standing in for
`../shared/data/glas`; labels CSVs, CLAM/TRIDENT-style feature files, a TorchScript encoder), with
`wsi-amr` on PATH running `python -m wsi_amr.cli` of this checkout (not whatever is installed).
Training examples get tiny budgets (BUDGET, below); examples that read a model or an output of
another example run in a copy of that example's sandbox, so each model is trained once. Examples
that need what this machine lacks (CUDA, Slurm, a remote Dask cluster, a package index) are
skipped with the reason. Then the outputs the command promises are checked (`check_outputs`).
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import tifffile
from conftest import GLAS, REPO, SLIDES, bench_module, write_pyramid_tiff
from safetensors import safe_open

from wsi_amr.geojson import read_geojson, validate_geojson

pytestmark = pytest.mark.slow  # runs the CLI and trains: not in `make test-fast`

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SAMPLE = "CMU-1-Small-Region.svs"
STEM = "CMU-1-Small-Region"
GLAS_SLIDE = "glas-slide"
SHELL_LANGS = ("sh", "bash", "shell")
CLI_SERVER = Path(__file__).resolve().parent / "docs_cli"


@dataclass(frozen=True)
class Example:
    doc: str
    line: int
    lang: str
    command: str

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def _strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _runs_wsi_amr(command: str) -> bool:
    """True when a shell word of ``command`` is the wsi-amr program (or its package name)."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    return any(w == "wsi-amr" or w.startswith("wsi-amr[") for w in words)


def examples() -> list[Example]:
    found = []
    for doc in DOCS:
        lang, joined, start = None, "", 0
        for no, line in enumerate(doc.read_text().splitlines(), 1):
            if line.startswith("```"):
                lang = (line[3:].strip() or "text") if lang is None else None
                block, block_line = [], no + 1
                continue
            if lang == "console" and line.startswith("$ ") and _runs_wsi_amr(line[2:]):
                found.append(Example(doc.name, no, lang, line[2:].strip()))
            elif lang in SHELL_LANGS:
                if not joined:
                    start = no
                joined = f"{joined} {line.strip()}" if joined else line
                if joined.endswith("\\"):
                    joined = joined[:-1].rstrip()
                    continue
                command, joined = _strip_comment(joined), ""
                if command and not command.lstrip().startswith("#") and _runs_wsi_amr(command):
                    found.append(Example(doc.name, start, lang, command.strip()))
            elif lang == "python":
                block.append(line)
                if '"wsi-amr"' in line:  # a Python driver that runs wsi-amr: one example, the block
                    found.append(Example(doc.name, block_line, lang, "\n".join(block)))
    return found


EXAMPLES = examples()


def test_docs_have_examples():
    assert len(EXAMPLES) >= 60
    assert len({e.id for e in EXAMPLES}) == len(EXAMPLES)


# -- what cannot run here ---------------------------------------------------------------------


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def skip_reason(ex: Example) -> str | None:
    c = ex.command
    if ex.lang == "python":
        return "a dask-jobqueue driver: needs the dask_jobqueue package and a Slurm cluster to submit worker jobs to"
    if c.startswith("pip install"):
        return "installs from a package index (not reachable from the tests); the dask extra it installs is what " \
               "`--scheduler local:1` (cluster.md) uses, and that example runs"
    if c.startswith("srun "):
        return "a multi-node torchrun launched by Slurm's srun inside an sbatch job: needs Slurm, 2 nodes and 8 CUDA GPUs"
    if "/data/slides" in c and "$SLURM_ARRAY_TASK_ID" in c:
        return "the body of a Slurm job-array script: needs sbatch, /data/slides and a CUDA GPU (--device cuda)"
    if "tcp://" in c:
        return "needs a running Dask scheduler at tcp://head:8786 (a remote cluster)"
    if "dask-scheduler.json" in c:
        return "needs the scheduler file of a running Dask cluster (dask scheduler + workers started by sbatch)"
    if "$S/train72-16000" in c:
        return ("needs the four 16,000-px training slides bench/make_slide.py writes (bench/out/slides/"
                "train72-16000-s*.tiff) and the shell variables EX, S, VAL set by the lines before it in its block")
    gpus = re.search(r"--nproc-per-node (\d+) .*--device cuda\b", c)
    if gpus and _cuda_count() < int(gpus.group(1)):
        return f"needs {gpus.group(1)} CUDA GPUs (one torchrun process per GPU, --device cuda)"
    if "--device cuda:1" in c and _cuda_count() < 2:
        return "needs a second CUDA GPU (--device cuda:1)"
    if re.search(r"--device cuda\b", c) and _cuda_count() < 1:
        return "needs a CUDA GPU (--device cuda)"
    return None


# -- budgets and placeholders -----------------------------------------------------------------

# Training examples run with a tiny budget: only these flags are rewritten (added where the
# example leaves them at a default too big for a test). Everything else stays as the docs say.
SEGMENT_BUDGET = {"--steps": "2", "--val-every": "1", "--batch-size": "2"}
CLASSIFY_BUDGET = {"--steps": "2", "--val-every": "1", "--batch-size": "2", "-M": "4", "-I": "8"}
# Placeholders a reader fills in: `--seed S` (any seed), and `...` in the --resume example
# (the arguments of the run it resumes: cli.md's `-o runs/glas` example).
RESUMED = "wsi-amr train segment --images '../shared/data/glas/images/train_*.png' --masks ../shared/data/glas/masks " \
          "-o runs/glas --steps 2000"


def _set_flag(command: str, flag: str, value: str) -> str:
    pattern = rf"(?<!\S){re.escape(flag)} \S+"
    if re.search(pattern, command):
        return re.sub(pattern, f"{flag} {value}", command)
    return f"{command} {flag} {value}"


def budgeted(command: str) -> str:
    """The command as the test runs it: tiny training budgets, placeholders filled in."""
    if command.startswith("wsi-amr train segment ... "):
        command = RESUMED.replace(" -o runs/glas --steps 2000", "") + command[len("wsi-amr train segment ..."):]
    command = re.sub(r"--seed S\b", "--seed 0", command)
    budget = {}
    if " train segment " in f" {command} " and "--help" not in command:
        budget = SEGMENT_BUDGET
    elif " train classify " in f" {command} " and "--help" not in command:
        budget = CLASSIFY_BUDGET
    for flag, value in budget.items():
        command = _set_flag(command, flag, value)
    if "--resume" in command:  # resume the 2-step run for one step more
        command = _set_flag(command, "--steps", "3")
    return command


# Examples that read what another example writes (a model, a classify output folder) run in a
# copy of that example's sandbox after it: consumer (a prefix of its command) -> producer.
PRODUCERS = {
    "wsi-amr classify slides/ -o out --model runs/ips/": "wsi-amr train classify labels.csv -o runs/ips ",
    "wsi-amr evaluate out/ test-labels.csv": "wsi-amr classify slides/ -o out --model runs/ips/best",
    "wsi-amr classify -o out --model runs/ips-uni/": "wsi-amr train classify labels.csv --features trident/features",
    "wsi-amr classify slides/ -o out --model runs/ips-uni/": "wsi-amr train classify labels.csv --features trident/",
    "wsi-amr classify slides/ -o out --model runs/ips-enc/": "wsi-amr train classify labels.csv --encoder encoder.pt",
    "wsi-amr classify ../shared/data/glas/images/testA_*.png": "wsi-amr train classify glas-train.csv",
    "wsi-amr evaluate glas-out glas-test.csv": "wsi-amr classify ../shared/data/glas/images/testA_*.png",
    "wsi-amr segment slide.svs -o out --model runs/glas/": RESUMED,
    "wsi-amr train segment ... -o runs/glas --resume": RESUMED,
    "wsi-amr classify bench/out/ips-glas-seg/features/testA_": "wsi-amr train classify bench/out/ips-glas-seg/",
    "wsi-amr evaluate bench/out/ips-glas-seg/pred": "wsi-amr classify bench/out/ips-glas-seg/features/testA_",
}


def producer_of(ex: Example) -> Example | None:
    for consumer, producer in PRODUCERS.items():
        if ex.command.startswith(consumer):
            matches = [e for e in EXAMPLES if e.command.startswith(producer) and e != ex]
            assert len(matches) == 1, f"{ex.id}: the example it depends on ({producer!r}) is {len(matches)} examples"
            return matches[0]
    return None


# -- the sandbox ------------------------------------------------------------------------------

CROP = 256  # GlaS crops: >= every --patch-size the examples use (256), so each image is one bag or more


def _glas_subset() -> dict[str, str]:
    """A few GlaS images, both grades in each split: name -> benign/malignant."""
    grades = bench_module("glas").glas_grades(GLAS / "grade.csv")
    chosen = {}
    for split, per_class in (("train", 3), ("testA", 2)):
        for grade in ("benign", "malignant"):
            names = sorted((n for n, g in grades.items() if n.startswith(f"{split}_") and g == grade),
                           key=lambda n: int(n.split("_")[1]))
            chosen.update({n: grade for n in names[:per_class]})
    return chosen


def _write_features(folder: Path, stem: str, count: int, rng, dim: int = 32, tumour: bool = False,
                    step: int = 256, columns: int = 4) -> None:
    feats = rng.normal(0, 1, (count, dim)).astype(np.float32)
    if tumour:
        feats[:3, 0] += 4
    coords = np.stack([np.arange(count) % columns * step, np.arange(count) // columns * step], axis=1)
    with h5py.File(folder / f"{stem}.h5", "w") as fh:
        fh.create_dataset("features", data=feats)
        fh.create_dataset("coords", data=coords.astype(np.int64))
        fh["coords"].attrs["patch_size"] = step
        fh["coords"].attrs["patch_size_level0"] = step


def _geojson(path: Path, boxes: list[tuple[int, int, int, int]], name: str = "Gland") -> None:
    from wsi_amr.geojson import PathClass, make_box_feature

    cls = PathClass(name, (0, 160, 0))
    features = [make_box_feature(*b, classification=cls) for b in boxes]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


def build_sandbox(root: Path, sample: Path) -> Path:
    """``root/shared/data/glas`` (crops of real GlaS images: the examples' ``../shared/data/glas``)
    and ``root/work``, the folder every example starts from. Returns ``root/work``."""
    import torch
    from test_classification import save_encoder

    glas = root / "shared" / "data" / "glas"
    (glas / "images").mkdir(parents=True)
    (glas / "masks").mkdir()
    subset = _glas_subset()
    for name in subset:
        img = cv2.imread(str(GLAS / "images" / f"{name}.png"))
        mask = cv2.imread(str(GLAS / "masks" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
        y, x = (img.shape[0] - CROP) // 2, (img.shape[1] - CROP) // 2
        cv2.imwrite(str(glas / "images" / f"{name}.png"), img[y:y + CROP, x:x + CROP])
        cv2.imwrite(str(glas / "masks" / f"{name}.png"), mask[y:y + CROP, x:x + CROP])
    work = root / "work"
    work.mkdir()
    for folder in ("sample_data", "slides"):
        (work / folder).mkdir()
        os.symlink(sample, work / folder / SAMPLE)
    # A second slide in slides/ (so a classification has two classes to score): a GlaS test image
    # as a one-level TIFF, declared at 0.5 µm/px (the classify examples' models read slides at 0.5).
    test = [(n, g) for n, g in subset.items() if n.startswith("testA_")]
    rgb = cv2.cvtColor(cv2.imread(str(GLAS / "images" / f"{test[0][0]}.png")), cv2.COLOR_BGR2RGB)
    write_pyramid_tiff(work / "slides" / f"{GLAS_SLIDE}.tiff", rgb, mpp=0.5, levels=1)
    os.symlink(sample, work / "slide.svs")
    os.symlink(sample, work / "a.svs")
    _geojson(work / "a.geojson", [(600, 700, 900, 1000), (1200, 1500, 1500, 1900), (300, 2200, 700, 2500)])
    os.symlink("../shared/data/glas", work / "glas")  # cluster.md's torchrun example says glas/images

    train = [(n, g) for n, g in subset.items() if n.startswith("train_")]

    def labels(path: Path, rows) -> None:
        path.write_text("slide,label\n" + "".join(f"{s},{g}\n" for s, g in rows))

    labels(work / "labels.csv", [(f"glas/images/{n}.png", g) for n, g in train])
    labels(work / "glas-train.csv", [(f"../shared/data/glas/images/{n}.png", g) for n, g in train])
    labels(work / "glas-test.csv", [(f"../shared/data/glas/images/{n}.png", g) for n, g in test])
    labels(work / "test-labels.csv", [(STEM, "malignant"), (GLAS_SLIDE, test[0][1])])
    labels(work / "train.csv", train)  # benchmarks.md's cross-validation recipes: bare names + --features

    rng = np.random.default_rng(0)
    feats = work / "trident" / "features"
    feats.mkdir(parents=True)
    for n, g in [*train, *test]:
        _write_features(feats, n, 12, rng, tumour=g == "malignant")
    _write_features(feats, STEM, 88, rng, columns=8)  # a 256-px grid over the 2220x2967 sample slide
    _write_features(feats, GLAS_SLIDE, 6, rng, columns=3)  # and over the GlaS slide
    os.symlink("trident/features", work / "feats")  # cluster.md's torchrun example: --features feats
    bench = work / "bench" / "out"
    (bench / "ips-glas-seg").mkdir(parents=True)
    shutil.copytree(feats, bench / "ips-glas-seg" / "features")
    for stem in (STEM, GLAS_SLIDE):
        (bench / "ips-glas-seg" / "features" / f"{stem}.h5").unlink()
    labels(bench / "ips-glas-seg" / "features" / "train.csv", [(f"{n}.h5", g) for n, g in train])
    labels(bench / "ips-glas-seg" / "features" / "testA.csv", [(f"{n}.h5", g) for n, g in test])
    (bench / "ips-glas-rein").mkdir()
    os.symlink("../ips-glas-seg/features", bench / "ips-glas-rein" / "features")

    torch.manual_seed(0)
    save_encoder(work / "encoder.pt", dim=12)
    # cli.md's evaluate examples: predicted masks (the GlaS crops' masks, eroded) and two GeoJSON files.
    (work / "predictions").mkdir()
    for mask in sorted((glas / "masks").glob("*.png")):
        m = cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(work / "predictions" / mask.name), cv2.erode(m, np.ones((9, 9), np.uint8)))
    _geojson(work / "out" / "slide" / "slide.geojson", [(1000, 1000, 9000, 9000), (12000, 12000, 19000, 18000)])
    _geojson(work / "truth" / "slide.geojson", [(1200, 1000, 9000, 9400), (12000, 11000, 19500, 18000)])
    return work


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    example: Example
    command: str  # as run
    cwd: Path
    stdout: str
    stderr: str
    source: Path  # the sandbox it started from (a copy of)


class Sandboxes:
    """Runs each example once, in a fresh copy of the sandbox (or of its producer's)."""

    def __init__(self, factory) -> None:
        self.factory = factory
        sample = REPO / "sample_data" / SAMPLE
        self.sample = sample if sample.exists() else SLIDES / "aperio" / SAMPLE
        self.runs: dict[Example, Run] = {}
        self._template: Path | None = None
        self.server: subprocess.Popen | None = None
        bindir = factory.mktemp("bin")
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        path = os.pathsep.join([str(bindir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {**os.environ, "PATH": path, "PYTHONPATH": pythonpath, "NO_COLOR": "1", "COLUMNS": "200"}
        # `wsi-amr` on PATH: this checkout's CLI, whatever `wsi-amr` is installed. By default a client
        # of a pre-warmed server that forks one process per call (tests/docs_cli/server.py: the
        # imports, seconds of torch, are paid once); WSI_AMR_DOCS_SUBPROCESS=1: a fresh
        # `python -m wsi_amr.cli` per call.
        shim = bindir / "wsi-amr"
        if os.environ.get("WSI_AMR_DOCS_SUBPROCESS") == "1":
            shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m wsi_amr.cli "$@"\n')
        else:
            sock = Path(tempfile.mkdtemp(prefix="wsi-amr-docs-")) / "cli.sock"  # AF_UNIX paths are short
            self.env["WSI_AMR_DOCS_SOCKET"] = str(sock)
            self.server = subprocess.Popen([sys.executable, str(CLI_SERVER / "server.py"), str(sock)], env=self.env,
                                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
            assert self.server.stdout.readline().strip() == "ready", "the docs CLI server did not start"
            shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{CLI_SERVER / "client.py"}" "$@"\n')
        shim.chmod(0o755)

    def close(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
            shutil.rmtree(Path(self.env["WSI_AMR_DOCS_SOCKET"]).parent, ignore_errors=True)

    def template(self) -> Path:
        if self._template is None:
            if not self.sample.exists():
                pytest.skip(f"sample slide missing: run `make demo` or provide ../shared/data ({self.sample})")
            if not GLAS.is_dir():
                pytest.skip(f"GlaS images missing at {GLAS}")
            self._template = build_sandbox(self.factory.mktemp("sandbox"), self.sample)
        return self._template

    def run(self, ex: Example) -> Run:
        if ex in self.runs:
            return self.runs[ex]
        producer = producer_of(ex)
        source = self.run(producer).cwd if producer else self.template()
        root = self.factory.mktemp(re.sub(r"\W", "_", ex.id))
        os.symlink(source.parent / "shared", root / "shared")
        cwd = root / "work"
        shutil.copytree(source, cwd, symlinks=True)
        command = budgeted(ex.command)
        env = {**self.env, "PET_MASTER_PORT": str(_free_port())}  # torchrun: no clash with another run
        res = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"{ex.id}: `{command}` exited {res.returncode}\n{res.stderr[-4000:]}"
        assert "Traceback" not in res.stderr, f"{ex.id}: `{command}`\n{res.stderr[-4000:]}"
        self.runs[ex] = Run(ex, command, cwd, res.stdout, res.stderr, source)
        return self.runs[ex]


@pytest.fixture(scope="session")
def sandboxes(tmp_path_factory):
    boxes = Sandboxes(tmp_path_factory)
    yield boxes
    boxes.close()


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_doc_example(example: Example, sandboxes: Sandboxes):
    reason = skip_reason(example)
    if reason:
        pytest.skip(reason)
    run = sandboxes.run(example)
    calls = split_commands(run.command)
    assert calls, f"{example.id}: no wsi-amr call found in `{run.command}`"
    for call in calls:
        check_outputs(call, run)



# -- what each example promises ---------------------------------------------------------------

# Options that take no value (every other option takes one).
FLAGS = {"--json", "--overwrite", "--debug", "--help", "-h", "--save-images", "--no-tissue", "--gzip", "--mask-tiff",
         "--list-models", "--normalise", "--resume", "--balance", "--no-balance", "--augment", "--no-augment"}
SLIDE_COMMANDS = {"tissue", "tile", "quadtree", "segment", "classify"}
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".dcm", ".png", ".jpg", ".h5")
SUMMARY = ["finished", "command", "slide", "stem", "status", "seconds", "message", "out_dir", "predicted",
           "probabilities"]
JSON_LINE = {"slide", "stem", "command", "status", "seconds", "message", "out_dir", "outputs", "stats"}
PER_SLIDE_OUTPUTS = {  # README's table and docs/outputs.md
    "tissue": ["tissue.geojson", "tissue.png", "tissue_mask.png"],
    "tile": ["tiles.h5", "tiles.png"],
    "quadtree": ["quadtree.h5", "quadtree.png"],
    "segment": ["overlay.png"],
    "classify": ["classification.json", "heatmap.png", "attention.geojson"],
}
COORDS_ATTRS = {"patch_size", "patch_level", "downsample", "level_dim", "downsampled_level_dim", "name", "mpp",
                "patch_size_level0", "overlap", "target_downsample", "bounds_offset"}
QUADTREE_ATTRS = {"min_size", "max_size", "blur_kernel", "canny_low", "canny_high", "split_threshold", "normalise",
                  "max_tokens", "mode", "token_size", "mpp", "level0_mpp", "downsample", "level0_width",
                  "level0_height", "width", "height", "window", "margin", "uniform_tokens", "reduction", "tissue",
                  "name", "bounds_offset"}
QUADTREE_STATS = {"leaves", "uniform_tokens", "reduction", "seconds_read", "seconds_edges", "seconds_tree",
                  "seconds_uniform", "mode", "mpp", "downsample", "windows", "windows_read", "smallest_leaves"}
INFO_KEYS = {"backend", "vendor", "width", "height", "level_count", "level_dimensions", "downsamples", "mpp_x",
             "mpp_y", "objective_power", "bounds_offset", "associated_images"}


@dataclass
class Call:
    """One wsi-amr invocation inside an example's shell line."""

    words: list[str]  # after `wsi-amr`
    command: str  # "tissue", "train segment", ...
    options: dict[str, str | bool]
    inputs: list[str]
    stdin_from: str | None  # the shell command piped into it


def split_commands(line: str) -> list[Call]:
    calls = []
    for part in line.split("&&"):
        stages = part.split("|")
        for k, stage in enumerate(stages):
            words = shlex.split(stage)
            if "wsi-amr" not in words:
                continue
            words = words[words.index("wsi-amr") + 1:]
            n = 2 if words and words[0] == "train" else 1
            command, rest = " ".join(words[:n]), words[n:]
            options: dict[str, str | bool] = {}
            inputs = []
            i = 0
            while i < len(rest):
                w = rest[i]
                if w.startswith("-") and w != "-":
                    if w in FLAGS:
                        options[w] = True
                    else:
                        options[w] = rest[i + 1]
                        i += 1
                else:
                    inputs.append(w)
                i += 1
            calls.append(Call(words, command, options, inputs, stages[k - 1] if k else None))
    return calls


def _opt(call: Call, *names: str, default=None):
    return next((call.options[n] for n in names if n in call.options), default)


def expected_stems(call: Call, cwd: Path) -> list[str]:
    """The slide stems the call's inputs name (folders searched, globs expanded, stdin listed)."""
    import glob

    paths: list[Path] = []
    for arg in call.inputs:
        if arg == "-":
            listed = subprocess.run(call.stdin_from, shell=True, cwd=cwd, capture_output=True, text=True).stdout
            paths += [cwd / p for p in listed.split()]
        elif (cwd / arg).is_dir():
            paths += [p for p in sorted((cwd / arg).rglob("*")) if p.suffix.lower() in SLIDE_SUFFIXES]
        else:
            paths += [Path(p) for p in sorted(glob.glob(str(cwd / arg)))]
    if call.command == "classify" and not call.inputs:
        paths = sorted((cwd / str(call.options["--features"])).glob("*.h5"))
    stems = sorted({p.name.split(".")[0] for p in paths})
    assert stems, f"no input slides for {call.words}"
    return stems


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def check_image(path: Path) -> np.ndarray:
    assert path.is_file(), f"missing {path}"
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.size, f"not an image: {path}"
    return img


def check_geojson(path: Path, object_type: str | None = None) -> list:
    assert path.is_file(), f"missing {path}"
    problems = validate_geojson(path)
    assert problems == [], f"{path}: {problems[:5]}"
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        assert json.load(fh)["type"] == "FeatureCollection"
    objects = read_geojson(path)
    if object_type:
        assert {o.object_type for o in objects} <= {object_type}, path
    return objects


def check_tissue(d: Path, call: Call, stats: dict) -> None:
    objects = check_geojson(d / "tissue.geojson", "annotation")
    assert objects and {o.class_name for o in objects} == {"Tissue"}
    assert all("Area µm^2" in o.measurements for o in objects)
    assert check_image(d / "tissue_mask.png").ndim == 2


def check_tile(d: Path, call: Call, stats: dict) -> None:
    with h5py.File(d / "tiles.h5") as fh:
        coords = fh["coords"][:]
        assert coords.ndim == 2 and coords.shape[1] == 2 and len(coords) > 0
        assert fh["tissue_fraction"].shape == (len(coords),)
        attrs = dict(fh["coords"].attrs)
    assert COORDS_ATTRS <= set(attrs), COORDS_ATTRS - set(attrs)
    assert attrs["patch_size"] == int(_opt(call, "--size", default=256))
    if "--mpp" in call.options:
        assert attrs["mpp"] == pytest.approx(float(call.options["--mpp"]))
    assert attrs["overlap"] == int(_opt(call, "--overlap", default=0))
    min_tissue = float(_opt(call, "--min-tissue", default=0))
    with h5py.File(d / "tiles.h5") as fh:
        assert (fh["tissue_fraction"][:] >= min_tissue - 1e-6).all()
    tiles = d / "tiles"
    if call.options.get("--save-images"):
        ext = {"png": "png", "jpg": "jpg", "jpeg": "jpg"}[str(_opt(call, "--image-format", default="jpg"))]
        names = sorted(p.name for p in tiles.iterdir())
        assert names == sorted(f"{x}_{y}.{ext}" for x, y in coords)
        img = check_image(tiles / names[0])
        assert img.shape[:2] == (attrs["patch_size"], attrs["patch_size"])
    else:
        assert not tiles.exists()


def check_quadtree(d: Path, call: Call, stats: dict) -> None:
    with h5py.File(d / "quadtree.h5") as fh:
        leaves, level0 = fh["leaves"][:], fh["leaves_level0"][:]
        depth, detail = fh["depth"][:], fh["detail"][:]
        attrs = dict(fh.attrs)
    n = len(leaves)
    assert n > 0 and leaves.shape == (n, 3) and level0.shape == (n, 3) and depth.shape == detail.shape == (n,)
    assert QUADTREE_ATTRS <= set(attrs), QUADTREE_ATTRS - set(attrs)
    assert np.allclose(level0, leaves * attrs["downsample"])
    max_size, min_size = int(_opt(call, "--max-size", default=attrs["max_size"])), int(attrs["min_size"])
    assert attrs["max_size"] == max_size and (leaves[:, 2] == max_size >> depth).all()
    assert ((leaves[:, 2] >= min_size) & (leaves[:, 2] <= max_size)).all()
    for flag, attr in (("--min-size", "min_size"), ("--token-size", "token_size"), ("--window", "window"),
                       ("--canny-low", "canny_low"), ("--canny-high", "canny_high"), ("--blur", "blur_kernel")):
        if flag in call.options:
            assert attrs[attr] == int(call.options[flag]), flag
    if "--max-tokens" in call.options:  # the budget: N leaves, or up to 2 below
        budget = int(call.options["--max-tokens"])
        assert attrs["mode"] == "budget" and budget - 2 <= n <= budget
    assert QUADTREE_STATS <= set(stats) and stats["leaves"] == n
    if "--mask" in call.options:
        assert 0 < stats["mask_dice"] <= 1 and "mask_dice_per_class" in stats and "mask_classes" in stats


def check_segment(d: Path, call: Call, stats: dict) -> None:
    name = d.name + (".geojson.gz" if call.options.get("--gzip") else ".geojson")
    check_geojson(d / name, str(_opt(call, "--object-type", default="annotation")))
    if call.options.get("--mask-tiff"):
        with tifffile.TiffFile(d / "mask.tiff") as tif:
            assert tif.pages[0].is_tiled and tif.pages[0].asarray().ndim == 2
    else:
        assert not (d / "mask.tiff").exists()


def check_classify(d: Path, call: Call, stats: dict) -> dict:
    result = json.loads((d / "classification.json").read_text())
    probs = result["probabilities"]
    assert result["predicted"] in probs and sum(probs.values()) == pytest.approx(1, abs=1e-4)
    objects = check_geojson(d / "attention.geojson", "detection")
    assert objects and all("Attention" in o.measurements for o in objects)
    return result


CHECKS = {"tissue": check_tissue, "tile": check_tile, "quadtree": check_quadtree, "segment": check_segment,
          "classify": check_classify}


def check_slide_command(call: Call, run: Run) -> None:
    out = run.cwd / str(_opt(call, "-o", "--out", default="wsi-amr-out"))
    stems = expected_stems(call, run.cwd)
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and list(rows[0]) == SUMMARY
    mine = [r for r in rows if r["command"] == call.command]
    shard = _opt(call, "--shard")
    if shard:  # share I of N of the (sorted) slides
        i, n = map(int, str(shard).split("/"))
        stems = stems[i::n]
    assert sorted({r["stem"] for r in mine}) == stems
    assert {r["status"] for r in mine} <= {"done", "skipped"}
    if call.command == "classify":
        assert all(r["predicted"] and json.loads(r["probabilities"]) for r in mine)
    lines = [j for j in json_lines(run.stdout) if j.get("command") == call.command]
    if call.options.get("--json"):
        assert sorted(j["stem"] for j in lines) == stems
        for j in lines:
            assert JSON_LINE <= set(j) and j["status"] in ("done", "skipped")
    for stem in stems:
        d = out / stem
        manifest = json.loads((d / "manifest.json").read_text())
        entry = manifest["steps"][call.command]
        assert entry["status"] in ("done", "skipped"), entry
        for name in entry["outputs"].values():  # every output the manifest lists is there
            assert (d / name).exists(), f"{d / name} is in manifest.json but missing"
        for name in PER_SLIDE_OUTPUTS[call.command]:
            assert (d / name).is_file(), f"{call.command} did not write {d / name}"
            if name.endswith(".png"):
                check_image(d / name)
        CHECKS[call.command](d, call, entry.get("stats") or {})


def check_training(call: Call, run: Run) -> None:
    out = run.cwd / str(_opt(call, "-o", "--out"))
    for name in ("best", "last"):
        with safe_open(str(out / f"{name}.safetensors"), "pt") as fh:
            assert len(list(fh.keys())) > 0
        card = json.loads((out / f"{name}.json").read_text())
        assert card
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = int(_opt(call, "--steps"))
    assert max(r["step"] for r in records if r["event"] == "train") == steps
    if "(no validation split)" in run.stderr:  # a single slide: none to hold out; best is the last model
        assert not any(r["event"] == "val" for r in records)
    else:
        assert any(r["event"] == "val" for r in records)
    assert f"trained {steps} steps" in run.stderr
    if call.options.get("--resume"):  # continued the producer's run: its log, then the steps after it
        logged = (run.source / out.relative_to(run.cwd) / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in logged] == records[:len(logged)]
        assert [r["step"] for r in records[len(logged):] if r["event"] == "train"] == list(range(3, steps + 1))


def check_evaluate(call: Call, run: Run) -> None:
    reference = call.inputs[1]
    text = run.stdout
    if reference.endswith(".csv"):  # classifications against labels
        if call.options.get("--json"):
            lines = json_lines(text)
            assert lines[-1]["name"] == "all"
            assert {"accuracy", "balanced_accuracy", "auc", "confusion_matrix"} <= set(lines[-1])
            assert all({"label", "predicted", "correct", "probabilities"} <= set(j) for j in lines[:-1])
        else:
            for shown in ("accuracy", "balanced accuracy", "AUC", "Confusion matrix", "label \\ predicted"):
                assert shown in text, shown
        return
    classes = str(_opt(call, "--classes", default="")).split(",") if "--classes" in call.options else []
    if call.options.get("--json"):
        lines = json_lines(text)
        assert lines[-1]["name"] == "all" and len(lines) >= 2
        for j in lines:
            assert {"dice", "iou", "mean_dice", "mean_iou"} <= set(j) and 0 < j["mean_dice"] <= 1
        if classes:
            assert set(lines[-1]["dice"]) == set(classes)
    else:
        pooled = ["all (pooled pixels)", "mean Dice per pair"] if (run.cwd / call.inputs[0]).is_dir() else []
        for column in ("pair", "mean Dice", "mean IoU", *[f"{c} Dice" for c in classes], *pooled):
            assert column in text, column


def check_outputs(call: Call, run: Run) -> None:
    """What the call promises: its files exist and parse, its stdout has the keys or columns."""
    if call.options.get("--help") or call.options.get("-h"):
        assert "Usage:" in run.stdout and "Example:" in run.stdout
    elif call.options.get("--list-models"):
        assert "glas-gland" in run.stdout and "classes:" in run.stdout and "command:" in run.stdout
    elif call.command == "info":
        stems = expected_stems(call, run.cwd)
        if call.options.get("--json"):
            lines = json_lines(run.stdout)
            assert len(lines) == len(stems) and all(INFO_KEYS <= set(j) for j in lines)
        else:
            for key in INFO_KEYS:
                assert key in run.stdout, key
    elif call.command in SLIDE_COMMANDS:
        check_slide_command(call, run)
    elif call.command.startswith("train "):
        check_training(call, run)
    elif call.command == "evaluate":
        check_evaluate(call, run)
    else:
        raise AssertionError(f"no promise known for `wsi-amr {call.command}`: add its check to this test")
