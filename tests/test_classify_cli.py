"""`wsi-amr train classify`, `wsi-amr classify` and `wsi-amr evaluate` on classifications: GlaS
images, synthetic feature files, TorchScript encoders, the sample slide and the real slides, resume,
and every bad input (CPU, tiny models, few steps)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import PINK, SLIDES, bench_module, invoke, real_slides, textured
from test_classification import save_encoder

from wsi_amr.errors import TrainingInterrupted
from wsi_amr.geojson import validate_geojson
from wsi_amr.ips.bags import write_feature_file
from wsi_amr.ips.model import load_ips
from wsi_amr.ips.train import ClassifyTrainConfig, train_classifier

SAMPLE = SLIDES / "aperio" / "CMU-1-Small-Region.svs"
TINY = ["--embed-dim", "16", "--width", "16", "--heads", "2", "-M", "4", "-I", "16", "--batch-size", "2",
        "--device", "cpu", "--threads", "1", "--log-every", "1"]


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def error_lines(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("error:")]


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def metrics(out: Path, event: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


def write_labels(path: Path, rows: list[tuple[object, str]]) -> Path:
    path.write_text("slide,label\n" + "".join(f"{s},{lab}\n" for s, lab in rows))
    return path


def synthetic_images(folder: Path, n: int = 6, size: int = 96) -> Path:
    """Pink tissue; odd images carry a dark purple blob ("tumour"). Returns a labels CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img = textured(size, size, PINK, seed=i)
        if i % 2:
            img[20:50, 30:60] = textured(30, 30, (90, 40, 120), seed=100 + i)
        cv2.imwrite(str(folder / f"im{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        rows.append((f"im{i}.png", "tumour" if i % 2 else "normal"))
    return write_labels(folder / "labels.csv", rows)


def synthetic_features(folder: Path, n: int = 8, dim: int = 16, seed: int = 0) -> Path:
    """Feature files s0..s{n-1}.h5 (tumour ones with a few outlying rows); labels list slide names."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        count = 20 + 3 * i
        feats = rng.normal(0, 1, (count, dim)).astype(np.float32)
        if i % 2:
            feats[:3, 0] += 5
        coords = np.stack([np.arange(count) % 5 * 512, np.arange(count) // 5 * 512], axis=1)
        write_feature_file(folder / f"s{i}.h5", feats, coords)
        rows.append((f"s{i}.svs", "tumour" if i % 2 else "normal"))
    return write_labels(folder.parent / "labels.csv", rows)


@pytest.fixture(scope="module")
def slide_model(tmp_path_factory) -> Path:
    """A small freshly trained built-in-CNN model: 64-px patches at 1 µm/px."""
    root = tmp_path_factory.mktemp("model")
    labels = synthetic_images(root / "images")
    cfg = ClassifyTrainConfig(out=root / "run", labels=labels, patch_size=64, mpp=1.0, memory=4, chunk=16,
                              embed_dim=16, width=16, heads=2, steps=3, batch_size=2, val_fraction=0,
                              device="cpu", threads=1)
    train_classifier(cfg)
    return root / "run" / "best.safetensors"


def check_slide_outputs(out_dir: Path, stats: dict) -> dict:
    """Every classify output is there and sound; returns classification.json."""
    result = json.loads((out_dir / "classification.json").read_text())
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert result["predicted"] == max(result["probabilities"], key=result["probabilities"].get)
    assert stats["predicted"] == result["predicted"] and stats["patches"] == result["patches"]
    parts = ("read", "encode", "select", "score", "aggregate", "heatmap", "geojson")
    assert all(stats[f"seconds_{p}"] >= 0 for p in parts)
    assert sum(stats[f"seconds_{p}"] for p in parts) <= stats["seconds_total"] + 0.01
    heat = cv2.imread(str(out_dir / "heatmap.png"), cv2.IMREAD_COLOR)
    assert heat is not None and heat.ndim == 3 and min(heat.shape[:2]) > 0
    assert validate_geojson(out_dir / "attention.geojson") == []
    features = json.loads((out_dir / "attention.geojson").read_text())["features"]
    assert len(features) == result["patches"] == stats["detections"]
    assert sum(f["properties"]["measurements"]["Selected"] for f in features) == result["selected"]
    assert all(f["properties"]["objectType"] == "detection" for f in features)
    return result


# -- training ------------------------------------------------------------------------------


def test_train_on_glas_images_then_classify_and_evaluate(glas_dir, tmp_path, runner):
    grades = bench_module("glas").glas_grades(glas_dir / "grade.csv")
    train = [n for n in sorted(grades) if n.startswith("train_")]
    picked = [n for n in train if grades[n] == "benign"][:3] + [n for n in train if grades[n] == "malignant"][:3]
    labels = write_labels(tmp_path / "train.csv", [(glas_dir / "images" / f"{n}.png", grades[n]) for n in picked])
    out = tmp_path / "run"
    res = invoke(runner, "train", "classify", labels, "-o", out, "--patch-size", 96, "--mpp", 0.62, "--steps", 4,
                 "--val-every", 2, "--val-fraction", 0.34, *TINY)
    assert res.exit_code == 0, res.stderr
    assert "best validation AUC" in res.stderr
    model, cfg, extra = load_ips(out / "best.safetensors")
    assert cfg.encoder == "small-cnn" and cfg.memory == 4 and cfg.chunk == 16 and cfg.embed_dim == 16
    assert extra["class_names"] == ["benign", "malignant"] and extra["patch_size"] == 96 and extra["mpp"] == 0.62
    assert extra["training"]["selection_metric"] == "val_auc" and len(extra["training"]["data"]["val_names"]) == 2
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4] and [r["step"] for r in metrics(out, "val")] == [2, 4]
    assert all(np.isfinite(r["loss"]) for r in metrics(out))
    val = metrics(out, "val")
    assert extra["training"]["best_value"] == max(r["val_auc"] for r in val)
    for name in ("last.safetensors", "last.json", "last-state.json", "last-state.safetensors"):
        assert (out / name).exists()

    tests = ["testA_1", "testA_2", "testA_3"]
    pred = tmp_path / "pred"
    res = invoke(runner, "classify", *[glas_dir / "images" / f"{n}.png" for n in tests], "-o", pred,
                 "--model", out / "best.safetensors", "--json")
    assert res.exit_code == 0, res.stderr
    rows = json_lines(res.stdout)
    for row in rows:
        result = check_slide_outputs(pred / row["stem"], row["stats"])
        assert result["selected"] == 4 and result["input"] == "patches"
    with open(pred / "summary.csv", newline="") as fh:
        summary = list(csv.DictReader(fh))
    assert [r["predicted"] for r in summary] == [r["stats"]["predicted"] for r in rows]
    assert json.loads(summary[0]["probabilities"]) == rows[0]["stats"]["probabilities"]

    truth = write_labels(tmp_path / "test.csv", [(f"{n}.png", grades[n]) for n in tests])
    res = invoke(runner, "evaluate", pred, truth, "--json")
    assert res.exit_code == 0, res.stderr
    lines = json_lines(res.stdout)
    right = sum(line["correct"] for line in lines[:-1])
    assert lines[-1]["name"] == "all" and lines[-1]["n"] == 3 and lines[-1]["accuracy"] == round(right / 3, 6)
    table = invoke(runner, "evaluate", pred / "summary.csv", truth)
    assert table.exit_code == 0 and "balanced accuracy" in table.stdout and "Confusion matrix" in table.stdout


def test_train_on_feature_files_by_slide_name(tmp_path, runner):
    labels = synthetic_features(tmp_path / "features")
    out = tmp_path / "run"
    res = invoke(runner, "train", "classify", labels, "--features", tmp_path / "features", "-o", out,
                 "--steps", 6, "--val-every", 3, "--classes", "normal,tumour", *TINY)
    assert res.exit_code == 0, res.stderr
    _, cfg, extra = load_ips(out / "best.safetensors")
    assert cfg.encoder == "none" and cfg.embed_dim == 16
    assert extra["encoder"] == {"kind": "features"} and extra["patch_size"] is None
    assert extra["training"]["data"]["per_class"] == {"normal": 4, "tumour": 4}
    held = extra["training"]["data"]["val_names"]
    assert len(held) == 2 and {int(n[1:]) % 2 for n in held} == {0, 1}  # one of each class


def test_resume_after_ctrl_c_is_the_uninterrupted_run(tmp_path):
    labels = synthetic_features(tmp_path / "features")
    base = dict(labels=labels, features=tmp_path / "features", memory=4, chunk=8, width=16, heads=2, steps=6,
                batch_size=2, val_every=3, log_every=1, device="cpu", threads=1, seed=5)
    train_classifier(ClassifyTrainConfig(out=tmp_path / "straight", **base))

    def stop_at_4(step, total, info):
        if step == 4:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(TrainingInterrupted) as exc:
        train_classifier(ClassifyTrainConfig(out=out, **base), progress=stop_at_4)
    assert exc.value.step == 4 and json.loads((out / "last-state.json").read_text())["step"] == 4
    result = train_classifier(ClassifyTrainConfig(out=out, resume=True, **base))
    assert result["steps"] == 6
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(tmp_path / "straight")]
    assert [r["val_auc"] for r in metrics(out, "val")] == [r["val_auc"] for r in metrics(tmp_path / "straight", "val")]
    a, _, _ = load_ips(out / "last")
    b, _, _ = load_ips(tmp_path / "straight" / "last")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k


def test_cli_resume_refuses_other_options_and_reruns_need_a_flag(tmp_path, runner):
    labels = synthetic_features(tmp_path / "features")
    args = ["train", "classify", labels, "--features", tmp_path / "features", "-o", tmp_path / "run", *TINY]
    assert invoke(runner, *args, "--steps", 2).exit_code == 0
    res = invoke(runner, *args, "--steps", 2)
    assert res.exit_code == 2 and "--resume" in error_lines(res)[0]
    res = invoke(runner, *args, "--steps", 3, "--resume", "--width", "32")
    assert res.exit_code == 2 and "architecture" in error_lines(res)[0]
    res = invoke(runner, *args, "--steps", 3, "--resume")
    assert res.exit_code == 0, res.stderr
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3]


def test_torchscript_encoder_train_classify_and_width_mismatch(tmp_path, runner):
    labels = synthetic_images(tmp_path / "images")
    encoder = save_encoder(tmp_path / "enc.pt", dim=12)
    out = tmp_path / "run"
    res = invoke(runner, "train", "classify", labels, "--encoder", encoder, "-o", out, "--patch-size", 32,
                 "--steps", 2, "--val-fraction", 0, *TINY)
    assert res.exit_code == 0, res.stderr
    _, cfg, extra = load_ips(out / "best.safetensors")
    from wsi_amr.checkpoint import file_sha256

    assert cfg.encoder == "none" and cfg.embed_dim == 12
    assert extra["encoder"]["kind"] == "torchscript" and extra["encoder"]["sha256"] == file_sha256(encoder)
    image = tmp_path / "images" / "im1.png"
    res = invoke(runner, "classify", image, "-o", tmp_path / "pred", "--model", out / "best", "--encoder", encoder,
                 "--json")
    assert res.exit_code == 0, res.stderr
    check_slide_outputs(tmp_path / "pred" / "im1", json_lines(res.stdout)[0]["stats"])
    # The model needs the encoder (or feature files), and one of its width.
    res = invoke(runner, "classify", image, "-o", tmp_path / "pred", "--model", out / "best")
    assert res.exit_code == 2 and "--encoder" in error_lines(res)[0] and "enc.pt" in error_lines(res)[0]
    wide = save_encoder(tmp_path / "wide.pt", dim=20)
    res = invoke(runner, "classify", image, "-o", tmp_path / "pred", "--model", out / "best", "--encoder", wide)
    (line,) = error_lines(res)
    assert res.exit_code == 2 and "20-dimensional" in line and "expects 12" in line and "best.safetensors" in line
    # Resuming with another encoder file is refused.
    res = invoke(runner, "train", "classify", labels, "--encoder", wide, "-o", out, "--patch-size", 32,
                 "--steps", 3, "--val-fraction", 0, "--resume", *TINY)
    assert res.exit_code == 2 and "--resume" in error_lines(res)[0]


# -- classify on slides --------------------------------------------------------------------


def test_classify_the_sample_slide_within_m_plus_i(slide_model, slides_dir, tmp_path, runner):
    out = tmp_path / "out"
    res = invoke(runner, "classify", SAMPLE, "-o", out, "--model", slide_model, "-M", 3, "-I", 20, "--json")
    assert res.exit_code == 0, res.stderr
    (row,) = json_lines(res.stdout)
    stats = row["stats"]
    result = check_slide_outputs(out / "CMU-1-Small-Region", stats)
    assert stats["patches"] > 100 and result["selected"] == 3 and stats["peak_embeddings"] <= 3 + 20
    heat = cv2.imread(str(out / "CMU-1-Small-Region" / "heatmap.png"))
    assert max(heat.shape[:2]) == 2048  # the thumbnail
    # Patches lie on the tissue grid at the model's 1 µm/px: 64-px patches are 128 level-0 px.
    assert result["patch_size_level0"] == pytest.approx(128, abs=0.5)
    again = invoke(runner, "classify", SAMPLE, "-o", out, "--model", slide_model, "-M", 3, "-I", 20, "--json")
    (row,) = json_lines(again.stdout)
    assert row["status"] == "skipped" and row["stats"]["predicted"] == stats["predicted"]
    top = invoke(runner, "classify", SAMPLE, "-o", out, "--model", slide_model, "-M", 3, "-I", 20, "--top", 5)
    assert top.exit_code == 0
    assert len(json.loads((out / "CMU-1-Small-Region" / "attention.geojson").read_text())["features"]) == 5


def test_classify_every_real_slide(slide_model, slides_dir, tmp_path, runner):
    out = tmp_path / "out"
    res = invoke(runner, "classify", *real_slides(), "-o", out, "--model", slide_model, "-I", 64, "--json")
    rows = json_lines(res.stdout)
    assert len(rows) == len(real_slides())
    status = {r["stem"]: r["status"] for r in rows}
    assert status["CMU-1-Small-Region"] == status["OS-1-detail"] == status["small_vectra"] == "done"
    for row in rows:
        if row["status"] == "done":
            check_slide_outputs(Path(row["out_dir"]), row["stats"])
        elif row["status"] == "failed":  # no mpp, or a slide coarser than the model's 1 µm/px
            assert "--slide-mpp" in row["message"] or "finer than the slide's level 0" in row["message"], row
            assert "\n" not in row["message"]
            if "finer than" in row["message"]:  # classify has no --mpp or --magnification to suggest
                assert "model reads patches at 1 µm/px" in row["message"] and "coarser --mpp" not in row["message"]
        else:
            assert row["status"] == "empty" and "nothing to classify" in row["message"]
    assert res.exit_code == (1 if any(r["status"] != "done" for r in rows) else 0)


def test_classify_feature_files_with_and_without_their_slide(slides_dir, tmp_path, runner):
    labels = synthetic_features(tmp_path / "features")
    run = tmp_path / "run"
    assert invoke(runner, "train", "classify", labels, "--features", tmp_path / "features", "-o", run, "--steps", 1,
                  "--val-fraction", 0, *TINY).exit_code == 0
    # Without slides: every <stem>.h5 of the folder, drawn on a blank canvas; patch side from --patch-size.
    out = tmp_path / "out"
    res = invoke(runner, "classify", "-o", out, "--model", run / "best.safetensors", "--features",
                 tmp_path / "features", "--patch-size", 512, "--json")
    assert res.exit_code == 0, res.stderr
    rows = json_lines(res.stdout)
    assert sorted(r["stem"] for r in rows) == [f"s{i}" for i in range(8)]
    for row in rows:
        check_slide_outputs(Path(row["out_dir"]), row["stats"])
    # With the slide: the feature file named after it, drawn over its thumbnail; the patch side
    # from the file's attributes.
    import h5py

    feats = tmp_path / "cmu"
    feats.mkdir()
    coords = np.array([[x, y] for y in range(0, 2900, 256) for x in range(0, 2200, 256)])
    with h5py.File(write_feature_file(feats / "CMU-1-Small-Region.h5", np.random.default_rng(0).normal(
            size=(len(coords), 16)), coords), "a") as fh:
        fh["coords"].attrs["patch_size_level0"] = 256
    res = invoke(runner, "classify", SAMPLE, "-o", out, "--model", run / "best.safetensors", "--features", feats,
                 "--json")
    assert res.exit_code == 0, res.stderr
    (row,) = json_lines(res.stdout)
    result = check_slide_outputs(out / "CMU-1-Small-Region", row["stats"])
    assert result["patches"] == len(coords) and result["patch_size_level0"] == 256
    assert max(cv2.imread(str(out / "CMU-1-Small-Region" / "heatmap.png")).shape[:2]) == 2048
    # A slide without a feature file fails alone, naming the file it looked for.
    res = invoke(runner, "classify", SAMPLE, slides_dir / "ome-tiff" / "OS-1-detail.ome.tif", "-o", out, "--model",
                 run / "best.safetensors", "--features", feats, "--json", "--overwrite")
    status = {r["stem"]: r for r in json_lines(res.stdout)}
    assert res.exit_code == 1 and status["CMU-1-Small-Region"]["status"] == "done"
    assert status["OS-1-detail"]["status"] == "failed" and "OS-1-detail.h5" in status["OS-1-detail"]["message"]


# -- bad input -----------------------------------------------------------------------------


def test_dropout_reaches_the_model_and_a_bad_value_is_one_line(tmp_path, runner):
    labels = synthetic_features(tmp_path / "features")
    args = ["train", "classify", labels, "--features", tmp_path / "features", "--steps", 2, *TINY]
    res = invoke(runner, *args, "-o", tmp_path / "run", "--dropout", 0.25)
    assert res.exit_code == 0, res.stderr
    assert load_ips(tmp_path / "run" / "best.safetensors")[1].dropout == 0.25
    for bad in (1, -0.1):
        res = invoke(runner, *args, "-o", tmp_path / f"bad{bad}", "--dropout", bad)
        (line,) = error_lines(res)
        assert res.exit_code == 2 and "--dropout must be at least 0 and below 1" in line


def test_balance_is_recorded_in_the_checkpoint(tmp_path, runner):
    labels = synthetic_features(tmp_path / "features")
    args = ["train", "classify", labels, "--features", tmp_path / "features", "--steps", 3, "--val-fraction", 0, *TINY]
    for flag in ("--balance", "--no-balance"):
        res = invoke(runner, *args, "-o", tmp_path / flag, flag)
        assert res.exit_code == 0, res.stderr
    cards = {flag: json.loads((tmp_path / flag / "best.json").read_text()) for flag in ("--balance", "--no-balance")}
    training = {flag: card["extra"]["training"] for flag, card in cards.items()}
    assert training["--balance"]["balance"] is True and training["--no-balance"]["balance"] is False


def test_labels_with_missing_files_or_unknown_labels_are_one_line(tmp_path, runner):
    labels = synthetic_images(tmp_path / "images", n=4)
    args = ["train", "classify", "-o", tmp_path / "run", "--steps", 1, *TINY]
    missing = write_labels(tmp_path / "images" / "missing.csv", [("im0.png", "normal"), ("gone.png", "tumour")])
    res = invoke(runner, *args[:2], missing, *args[2:])
    (line,) = error_lines(res)
    assert res.exit_code == 2 and "1 listed files do not exist: gone.png" in line
    res = invoke(runner, *args[:2], labels, *args[2:], "--classes", "normal,benign")
    (line,) = error_lines(res)
    assert res.exit_code == 2 and "unknown labels ['tumour']" in line
    res = invoke(runner, *args[:2], labels, "--features", tmp_path / "nowhere", *args[2:])
    assert res.exit_code == 2 and "no such folder" in error_lines(res)[0]
    res = invoke(runner, *args[:2], labels, *args[2:], "--patch-size", 500)
    (line,) = error_lines(res)
    assert res.exit_code == 1 and "im0.png" in line and "smaller than one 500-px patch" in line


def test_feature_files_without_coords_or_of_other_widths_are_one_line(tmp_path, runner):
    import h5py

    labels = synthetic_features(tmp_path / "features", n=4)
    args = ["train", "classify", labels, "--features", tmp_path / "features", "-o", tmp_path / "run", "--steps", 1,
            *TINY]
    write_feature_file(tmp_path / "features" / "s2.h5", np.zeros((5, 24)), np.zeros((5, 2)))
    res = invoke(runner, *args)
    (line,) = error_lines(res)
    assert res.exit_code == 1 and "s2.h5" in line and "24-dimensional" in line and "expects 16" in line
    with h5py.File(tmp_path / "features" / "s2.h5", "w") as fh:
        fh["features"] = np.zeros((5, 16), np.float32)
    res = invoke(runner, *args)
    (line,) = error_lines(res)
    assert res.exit_code == 1 and "s2.h5" in line and "no 'coords' dataset" in line
    # At classify time: the file of one slide is wrong, that slide fails alone, in one line.
    synthetic_features(tmp_path / "good", n=4)
    assert invoke(runner, "train", "classify", labels, "--features", tmp_path / "good", "-o", tmp_path / "ok",
                  "--steps", 1, "--val-fraction", 0, *TINY).exit_code == 0
    res = invoke(runner, "classify", tmp_path / "features" / "s1.h5", tmp_path / "features" / "s2.h5", "-o",
                 tmp_path / "out", "--model", tmp_path / "ok" / "best", "--patch-size", 512, "--json")
    rows = {r["stem"]: r for r in json_lines(res.stdout)}
    assert res.exit_code == 1 and rows["s1"]["status"] == "done" and rows["s2"]["status"] == "failed"
    assert "no 'coords' dataset" in rows["s2"]["message"] and "\n" not in rows["s2"]["message"]


def test_memory_larger_than_the_patch_count_uses_every_patch(slide_model, tmp_path, runner):
    image = tmp_path / "small.png"
    cv2.imwrite(str(image), textured(130, 200, PINK))  # a 4 x 3 grid of 64-px patches (flush with the edges)
    res = invoke(runner, "classify", image, "-o", tmp_path / "out", "--model", slide_model, "-M", 100, "--json")
    assert res.exit_code == 0, res.stderr
    result = check_slide_outputs(tmp_path / "out" / "small", json_lines(res.stdout)[0]["stats"])
    assert result["patches"] == result["selected"] == 12 and result["memory"] == 100


def test_classify_usage_errors(slide_model, tmp_path, runner):
    res = invoke(runner, "classify", SAMPLE, "-o", tmp_path / "out")
    assert res.exit_code == 2 and "--model" in error_lines(res)[0]
    res = invoke(runner, "classify", SAMPLE, "-o", tmp_path / "out", "--model", tmp_path / "none.safetensors")
    assert res.exit_code == 2 and "missing" in error_lines(res)[0]
    res = invoke(runner, "classify", SAMPLE, "-o", tmp_path / "out", "--model", slide_model, "--features", tmp_path)
    assert res.exit_code == 2 and "built-in CNN" in error_lines(res)[0]
    res = invoke(runner, "classify", "-o", tmp_path / "out", "--model", slide_model)
    assert res.exit_code == 2 and "give slides" in error_lines(res)[0]
    from wsi_amr.checkpoint import save_checkpoint
    from wsi_amr.segmentation.config import SegmenterConfig
    from wsi_amr.segmentation.model import ModelCard, TokenSegmenter

    save_checkpoint(tmp_path / "seg", TokenSegmenter(SegmenterConfig(width=32, depth=1, heads=4)), ModelCard())
    res = invoke(runner, "classify", SAMPLE, "-o", tmp_path / "out", "--model", tmp_path / "seg.safetensors")
    assert res.exit_code == 2 and "not a wsi-amr IPS checkpoint" in error_lines(res)[0]


def test_evaluate_classification_by_hand(tmp_path, runner):
    pred = tmp_path / "pred"
    probs = {"a": 0.1, "b": 0.6, "c": 0.7, "d": 0.4, "e": 0.9, "extra": 0.5}  # P(tumour)
    for stem, p in probs.items():
        (pred / stem).mkdir(parents=True)
        (pred / stem / "classification.json").write_text(json.dumps({
            "stem": stem, "classes": ["normal", "tumour"], "probabilities": {"normal": 1 - p, "tumour": p}}))
    truth = write_labels(tmp_path / "labels.csv", [("a.svs", "normal"), ("b.svs", "normal"), ("c.svs", "tumour"),
                                                   ("d.svs", "tumour"), ("e.svs", "tumour"), ("f.svs", "tumour")])
    res = invoke(runner, "evaluate", pred, truth, "--json")
    assert res.exit_code == 0, res.stderr
    total = json_lines(res.stdout)[-1]
    assert total == {"name": "all", "classes": ["normal", "tumour"], "n": 5, "accuracy": 0.6,
                     "balanced_accuracy": round((1 / 2 + 2 / 3) / 2, 6), "auc": round(5 / 6, 6),
                     "auc_per_class": {"tumour": round(5 / 6, 6)}, "confusion_matrix": [[1, 1], [1, 2]]}
    assert "extra: on one side only" in res.stderr and "f: on one side only" in res.stderr
    bad = write_labels(tmp_path / "bad.csv", [("a.svs", "normal"), ("b.svs", "benign")])
    res = invoke(runner, "evaluate", pred, bad)
    assert res.exit_code == 1 and "['benign'] are not classes" in error_lines(res)[0]
    res = invoke(runner, "evaluate", tmp_path / "labels.csv", truth)
    assert res.exit_code == 1 and "no classify results" in error_lines(res)[0]


def test_help_has_an_example(runner):
    for args in (["classify", "--help"], ["train", "classify", "--help"]):
        res = invoke(runner, *args)
        assert res.exit_code == 0 and "Example: wsi-amr" in res.stdout
