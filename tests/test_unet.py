"""The U-Net baseline (`--arch unet`): shapes and padding on synthetic arrays, its config and
checkpoint (round trip, refusals), its window predictor and batches; then training through
`wsi-amr train segment --arch unet` on GlaS crops and `wsi-amr segment` of the sample slide."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import copy_glas, invoke
from typer.testing import CliRunner

from wsi_amr.checkpoint import CheckpointError, file_sha256, save_checkpoint
from wsi_amr.cli.train import train_app
from wsi_amr.errors import TrainingInputError
from wsi_amr.geojson import validate_geojson
from wsi_amr.labels import IGNORE
from wsi_amr.segmentation.augment import make_image_batch
from wsi_amr.segmentation.config import SegmenterConfig, TrainConfig, UNetConfig
from wsi_amr.segmentation.data import resample_labelled
from wsi_amr.segmentation.model import ModelCard, TokenSegmenter, load_checkpoint
from wsi_amr.segmentation.predict import UNetWindows, window_predictor
from wsi_amr.segmentation.unet import UNet, pad_to_multiple

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = UNetConfig(widths=(4, 8), bottleneck=8)


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(TINY).eval()


# -- the network on synthetic arrays ------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 3, 37, 50), (2, 3, 64, 64), (1, 3, 5, 3), (1, 3, 1, 1)])
def test_logits_have_the_input_size_whatever_it_is(shape):
    with torch.no_grad():
        out = tiny_unet()(torch.randn(*shape))
    assert out.shape == (shape[0], TINY.num_classes, *shape[2:])


def test_inputs_are_padded_to_a_multiple_of_two_to_the_levels():
    assert UNetConfig(widths=(8, 16, 32, 64)).multiple == 16 and TINY.multiple == 4
    padded, h, w = pad_to_multiple(torch.zeros(1, 3, 37, 50), 16)
    assert padded.shape == (1, 3, 48, 64) and (h, w) == (37, 50)
    same, _, _ = pad_to_multiple(torch.zeros(1, 3, 32, 16), 16)
    assert same.shape == (1, 3, 32, 16)
    tiny, h, w = pad_to_multiple(torch.arange(6.0).reshape(1, 1, 2, 3), 16)  # too small to mirror: edge repeated
    assert tiny.shape == (1, 1, 16, 16) and (h, w) == (2, 3) and float(tiny[0, 0, -1, -1]) == 5.0


def test_odd_sized_input_equals_the_mirrored_multiple_cropped_back():
    model = tiny_unet()
    x = torch.randn(1, 3, 37, 50)
    with torch.no_grad():
        direct = model(x)
        mirrored = model(F.pad(x, (0, 2, 0, 3), mode="reflect"))[..., :37, :50]  # 40 x 52: multiples of 4
    torch.testing.assert_close(direct, mirrored)


def test_default_unet_is_the_issue_baseline_size():
    n = sum(p.numel() for p in UNet().parameters())
    assert UNet().cfg == UNetConfig(widths=(8, 16, 32, 64), bottleneck=256)
    assert 1.0e6 < n < 1.1e6


def test_config_reads_widths_back_from_json_and_refuses_bad_ones():
    cfg = UNetConfig(**json.loads(json.dumps(TINY.as_dict())))
    assert cfg == TINY and cfg.widths == (4, 8) and cfg.arch == "unet" and "arch" not in cfg.as_dict()
    for bad in ((), (8, 0)):
        with pytest.raises(ValueError, match="widths"):
            UNet(UNetConfig(widths=bad))
    with pytest.raises(ValueError, match="bottleneck"):
        UNet(UNetConfig(bottleneck=0))


@pytest.mark.parametrize(("changes", "field"), [({"widths": (8, 0)}, "widths"), ({"widths": ()}, "widths"),
                                                ({"arch": "vit"}, "arch"), ({"bottleneck": 0}, "bottleneck")])
def test_training_options_name_the_bad_field(tmp_path, changes, field):
    cfg = TrainConfig(out=tmp_path, images=["x.png"], **{"arch": "unet", **changes})
    with pytest.raises(TrainingInputError) as info:
        cfg.validate()
    assert info.value.fields[0] == field


def test_model_config_follows_arch():
    cfg = TrainConfig(out=Path("x"), arch="unet", widths=(4, 8), classes=["B", "G", "T"])
    assert cfg.model_config() == UNetConfig(num_classes=3, widths=(4, 8), bottleneck=32)
    assert isinstance(TrainConfig(out=Path("x")).model_config(), SegmenterConfig)


# -- checkpoints -------------------------------------------------------------------------------
def test_unet_round_trips_through_safetensors_and_json_and_predicts_the_same(tmp_path):
    model = tiny_unet()
    with torch.no_grad():  # BatchNorm running statistics are part of what must survive
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    card = ModelCard(mpp=1.24)
    save_checkpoint(tmp_path / "u", model, card)
    doc = json.loads((tmp_path / "u.json").read_text())
    assert doc["arch"] == "unet" and doc["architecture"] == {"channels": 3, "num_classes": 2, "widths": [4, 8],
                                                             "bottleneck": 8}
    loaded, loaded_card = load_checkpoint(tmp_path / "u.safetensors")
    assert isinstance(loaded, UNet) and loaded.cfg == TINY and loaded_card.mpp == 1.24
    image = np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    before = window_predictor(model, card).image(image)
    after = window_predictor(loaded, loaded_card).image(image)
    np.testing.assert_array_equal(before, after)
    assert before.shape == (45, 61, 2) and np.allclose(before.sum(axis=2), 1, atol=1e-5)


def test_token_checkpoints_record_their_arch_and_old_ones_without_it_still_load(tmp_path):
    save_checkpoint(tmp_path / "t", TokenSegmenter(SegmenterConfig(width=32, depth=1)), ModelCard())
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["arch"] == "token"
    del doc["arch"]
    (tmp_path / "t.json").write_text(json.dumps(doc))
    assert isinstance(load_checkpoint(tmp_path / "t.safetensors")[0], TokenSegmenter)


def _one_line(exc: CheckpointError) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


def test_mismatched_or_unknown_checkpoints_are_refused_with_one_line(tmp_path):
    save_checkpoint(tmp_path / "u", tiny_unet(), ModelCard())
    save_checkpoint(tmp_path / "t", TokenSegmenter(SegmenterConfig(width=32, depth=1)), ModelCard())
    unet_doc = json.loads((tmp_path / "u.json").read_text())

    # The U-Net's JSON over token weights (their own checksum, so only the architecture disagrees).
    shutil.copy(tmp_path / "t.safetensors", tmp_path / "mixed.safetensors")
    mixed = {**unet_doc, "weights": "mixed.safetensors", "weights_sha256": file_sha256(tmp_path / "mixed.safetensors")}
    (tmp_path / "mixed.json").write_text(json.dumps(mixed))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "mixed.safetensors")
    assert "mixed.safetensors" in _one_line(info.value) and "do not fit the architecture" in str(info.value)

    # Widths that are not the weights'.
    wide = {**unet_doc, "architecture": {**unet_doc["architecture"], "widths": [4, 16]}}
    (tmp_path / "u.json").write_text(json.dumps(wide))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "u.safetensors")
    assert "shape" in _one_line(info.value)

    # An architecture this version does not know; and the token fields under arch unet.
    (tmp_path / "u.json").write_text(json.dumps({**unet_doc, "arch": "vit"}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "u.safetensors")
    assert "unknown segmentation architecture 'vit'" in _one_line(info.value) and "token, unet" in str(info.value)
    token_doc = json.loads((tmp_path / "t.json").read_text())
    (tmp_path / "t.json").write_text(json.dumps({**token_doc, "arch": "unet"}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "t.safetensors")
    assert "unknown architecture fields" in _one_line(info.value)


# -- prediction and batches ----------------------------------------------------------------------
def test_window_predictor_runs_a_unet_on_every_pixel():
    predictor = window_predictor(tiny_unet(), ModelCard())
    assert isinstance(predictor, UNetWindows) and predictor.unit == "pixels"
    image = np.full((30, 20, 3), 200, np.uint8)
    plan = predictor.prepare(image, np.ones((30, 20), bool))
    assert plan.leaves is None and predictor.units(image, plan) == (600, 600)
    probs = predictor.predict(image, plan)
    assert probs.shape == (30, 20, 2) and probs.dtype == np.float32
    with pytest.raises(ValueError, match="RGB uint8"):
        predictor.predict(image.astype(np.float32), plan)


class _Source:
    """A crop source of one synthetic image whose right half is unlabelled."""

    name, area = "s", 1.0

    def sample(self, rng, crop):
        image = np.zeros((crop, crop, 3), np.uint8)
        labels = np.zeros((crop, crop), np.uint8)
        labels[: crop // 2, : crop // 2] = 1
        labels[:, crop // 2:] = IGNORE
        return image, labels


def test_image_batches_are_whole_crops_with_one_hot_targets_and_nothing_where_unlabelled(tmp_path):
    cfg = TrainConfig(out=tmp_path, arch="unet", crop=32, jitter=0.0, glass=0.0, mosaic=0.0)
    batch = make_image_batch([_Source()], np.array([1.0]), cfg, [np.random.default_rng(i) for i in range(3)])
    assert batch.images.shape == (3, 32, 32, 3) and batch.images.dtype == torch.uint8
    assert batch.targets.shape == (3, 32, 32, 2)
    per_pixel = batch.targets.sum(dim=3)
    assert set(per_pixel.unique().tolist()) == {0.0, 1.0}
    assert int((per_pixel == 0).sum()) == 3 * 32 * 16  # half of every crop is IGNORE, wherever it was turned
    assert int(batch.targets[..., 1].sum()) == 3 * 16 * 16


def test_resampling_to_the_working_mpp_halves_images_and_keeps_label_ids():
    image = np.random.default_rng(0).integers(0, 256, (522, 775, 3), dtype=np.uint8)
    labels = np.zeros((522, 775), np.uint8)
    labels[100:300, 200:500] = 3
    labels[400:, :] = IGNORE
    small_image, small_labels = resample_labelled(image, labels, 0.5)
    assert small_image.shape == (261, 388, 3) and small_labels.shape == (261, 388)
    assert set(np.unique(small_labels).tolist()) == {0, 3, IGNORE}
    assert resample_labelled(image, labels, 1.0)[1] is labels


# -- through the command line (slow) ----------------------------------------------------------------
GLAS_FEW = ["train_1", "train_2", "train_3", "train_4"]
TRAIN = ["--arch", "unet", "--widths", "4,8", "--crop", "64", "--batch-size", "2", "--device", "cpu",
         "--threads", "1", "--log-every", "1"]


def train(*args: object):
    return CliRunner().invoke(train_app, ["segment", *[str(a) for a in args]], catch_exceptions=False)


@pytest.fixture
def glas_few(glas_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    return copy_glas(glas_dir, GLAS_FEW, tmp_path / "data")


@pytest.mark.slow
def test_cli_trains_a_half_resolution_unet_and_segment_runs_it_on_the_sample_slide(glas_few, slides_dir, tmp_path,
                                                                                   runner):
    images, masks = glas_few
    out = tmp_path / "run"
    res = train("--images", images, "--masks", masks, "--val-images", "train_4", "--image-mpp", 0.62, "--mpp", 1.24,
                "--steps", 4, "--val-every", 2, "-o", out, *TRAIN)
    assert res.exit_code == 0, res.stderr
    assert "best validation foreground Dice" in res.stderr and "max_size" not in res.stderr
    doc = json.loads((out / "best.json").read_text())
    assert doc["arch"] == "unet" and doc["architecture"]["widths"] == [4, 8] and doc["architecture"]["bottleneck"] == 32
    assert doc["mpp"] == 1.24 and doc["patching"] == {} and doc["training"]["data"]["image_mpp"] == 0.62
    model, card = load_checkpoint(out / "best.safetensors")
    assert isinstance(model, UNet) and card.mpp == 1.24
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["event"] == "train"] == [1, 2, 3, 4]
    assert all(r["pixels_per_crop"] == 64 * 64 and np.isfinite(r["loss"]) for r in rows if r["event"] == "train")
    val = [r for r in rows if r["event"] == "val"]
    assert [r["step"] for r in val] == [2, 4] and val[0]["val_pixels_per_image"] == 388 * 261  # half of 775 x 522

    slide = slides_dir / "aperio" / "CMU-1-Small-Region.svs"
    res = invoke(runner, "segment", slide, "-o", tmp_path / "seg", "--model", out / "best.safetensors", "--window",
                 512, "--overlap", 32, "--json")
    assert res.exit_code == 0, res.stderr
    row = json.loads(res.stdout.splitlines()[0])
    assert row["status"] in ("done", "empty"), row["message"]
    stats = row["stats"]
    assert stats["arch"] == "unet" and stats["pixels"] > 0 and "tokens" not in stats
    assert stats["mpp"] == pytest.approx(1.24, rel=1e-3)
    seg = Path(row["out_dir"])
    assert validate_geojson(seg / row["outputs"]["geojson"]) == [] and (seg / "overlay.png").exists()

    res = invoke(runner, "segment", slide, "-o", tmp_path / "seg2", "--model", out / "best.safetensors",
                 "--context", 128)
    assert res.exit_code == 2 and "--context: for token models" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("widths", ["8,x", "8,,16", "0,8", ""])
def test_bad_widths_are_refused_naming_the_flag(tmp_path, widths):
    res = train("--images", tmp_path / "none.png", "-o", tmp_path / "run", "--arch", "unet", "--widths", widths)
    assert res.exit_code == 2
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error:") and "--widths" in line


@pytest.mark.slow
def test_segment_refuses_a_mismatched_unet_checkpoint_with_one_line(runner, rect_slide, tmp_path):
    slide, _ = rect_slide
    save_checkpoint(tmp_path / "u", tiny_unet(), ModelCard())
    doc = json.loads((tmp_path / "u.json").read_text())
    (tmp_path / "u.json").write_text(json.dumps({**doc, "arch": "vit"}))
    res = invoke(runner, "segment", slide, "-o", tmp_path / "out", "--model", tmp_path / "u.safetensors")
    assert res.exit_code == 2 and "unknown segmentation architecture 'vit'" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
