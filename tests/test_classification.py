"""IPS classification pieces: one-pass prediction equals the streamed selection, the three encoders
agree on the same embeddings, TorchScript encoders and their errors, classification metrics on
hand-computed examples, heatmap and attention detections. CPU, tiny models, seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from wsi_amr.geojson import validate_feature
from wsi_amr.ips.bags import FeatureBag, LabelledBag, write_feature_file
from wsi_amr.ips.model import IPSConfig, IPSModel, iter_chunks, score_all, select_top_m
from wsi_amr.ips.predict import EncoderError, TorchScriptEncoder, open_feature_bag, predict_bag
from wsi_amr.ips.train import draw_bags, is_better, stratified_split
from wsi_amr.jobs.classify import attention_features, draw_attention
from wsi_amr.metrics import classification_scores, roc_auc

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(seed: int = 0, **kw) -> IPSModel:
    torch.manual_seed(seed)
    cfg = dict(embed_dim=12, width=16, heads=2, num_classes=3, memory=8, chunk=16)
    cfg.update(kw)
    return IPSModel(IPSConfig(**cfg)).eval()


class TinyEncoder(torch.nn.Module):
    """A patch encoder of the documented convention: float RGB 0-255 (N, 3, H, W) -> (N, D)."""

    def __init__(self, dim: int = 12, out_shape: str = "2d") -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, dim, 3, padding=1)
        self.flat = out_shape == "2d"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x / 255.0).mean(dim=(2, 3))
        return y if self.flat else y[:, :, None]


def save_encoder(path, dim: int = 12, out_shape: str = "2d", seed: int = 0):
    torch.manual_seed(seed)
    torch.jit.save(torch.jit.script(TinyEncoder(dim, out_shape)), str(path))
    return path


# -- one pass: selection, prediction, attention ---------------------------------------------


def test_predict_bag_selects_as_select_top_m_and_holds_at_most_m_plus_i():
    model = make_model(heads=2)
    emb = torch.randn(150, 12)
    pred = predict_bag(model, emb, memory=8, chunk=16, attention=True)
    _, idx, _ = select_top_m(model, iter_chunks(emb, 16), 8, chunk=16)
    assert pred.selected.tolist() == idx.tolist()
    assert pred.peak_embeddings <= 8 + 16 and pred.patches == 150
    with torch.no_grad():
        expected = model(emb[idx][None]).softmax(-1)[0].numpy()
        order, attn = score_all(model, iter_chunks(emb, 16))
    assert np.allclose(pred.probabilities, expected, atol=1e-6)
    assert np.allclose(pred.attention[order.numpy()], attn.numpy(), atol=1e-7)
    assert pred.attention.sum() == pytest.approx(1.0, abs=1e-5)


def test_predict_bag_times_each_part_of_the_pass():
    torch.manual_seed(0)
    model = IPSModel(IPSConfig(embed_dim=12, width=16, heads=2, memory=8, chunk=16, encoder="small-cnn",
                               cnn_channels=8)).eval()
    pred = predict_bag(model, torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), attention=True)
    assert set(pred.seconds) == {"read", "encode", "select", "score", "aggregate"}
    assert all(v >= 0 for v in pred.seconds.values()) and pred.seconds["encode"] > 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the process's RSS from /proc")
def test_slide_wide_attention_does_not_fragment_memory_over_many_chunks():
    """Scoring every patch once kept one small tensor per chunk; allocated between each chunk's
    large transient ones, they fragmented the C heap, and a 100k-patch slide's process grew by
    about 1.5 MiB a chunk at 1,024 values a row (bench/ips_memory.py). Here, at 256 values a row,
    the same code grew 65-71 MiB over 100,000 rows; the growing buffers 8-10 MiB. A fresh process,
    so the heap starts clean."""
    script = textwrap.dedent("""
        import re, numpy as np, torch
        from wsi_amr.ips.predict import predict_bag
        from wsi_amr.ips.model import IPSConfig, IPSModel
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = IPSModel(IPSConfig(embed_dim=256, memory=512, chunk=512)).eval()
        block = np.random.default_rng(0).standard_normal((512, 256)).astype(np.float32)
        class Rows:  # a feature file's rows: a fresh array per chunk
            n = 2048
            def __len__(self): return self.n
            def __getitem__(self, rows): return block[: len(rows)].copy()
        def rss(): return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
        predict_bag(model, Rows(), attention=True)  # first-use allocations
        Rows.n = 100_000
        before = rss()
        predict_bag(model, Rows(), attention=True)
        print(rss() - before)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert float(out.stdout.split()[-1]) < 32


def test_memory_larger_than_the_bag_uses_every_patch_unpadded():
    model = make_model(memory=1000)
    emb = torch.randn(30, 12)
    pred = predict_bag(model, emb, chunk=7)
    assert sorted(pred.selected.tolist()) == list(range(30))
    with torch.no_grad():
        assert np.allclose(pred.probabilities, model(emb[None]).softmax(-1)[0].numpy(), atol=1e-6)


def test_torchscript_encoder_feature_file_and_builtin_cnn_give_the_same_prediction(tmp_path):
    """The same embeddings three ways: the model's own small CNN on patches, that CNN exported as
    TorchScript in front of an embeddings model with the same attention weights, and a feature
    file of the embeddings. Same selection, same probabilities, same attention."""
    torch.manual_seed(0)
    builtin = IPSModel(IPSConfig(embed_dim=12, width=16, heads=2, num_classes=2, memory=6, chunk=10,
                                 encoder="small-cnn", cnn_channels=8)).eval()
    on_embeddings = IPSModel(IPSConfig(embed_dim=12, width=16, heads=2, num_classes=2, memory=6, chunk=10)).eval()
    on_embeddings.load_state_dict({k: v for k, v in builtin.state_dict().items() if not k.startswith("encoder.")})
    patches = torch.randint(0, 256, (45, 3, 16, 16), dtype=torch.uint8)
    torch.jit.save(torch.jit.trace(builtin.encoder, torch.zeros(2, 3, 16, 16)), str(tmp_path / "cnn.pt"))
    with torch.no_grad():
        emb = builtin.encoder(patches)
    write_feature_file(tmp_path / "s.h5", emb.numpy(), np.zeros((45, 2), np.int64))

    a = predict_bag(builtin, patches, attention=True)
    b = predict_bag(on_embeddings, patches, encoder=TorchScriptEncoder(tmp_path / "cnn.pt"), attention=True)
    with open_feature_bag(tmp_path / "s.h5", 12) as bag:
        c = predict_bag(on_embeddings, bag.rows, attention=True)
    d = predict_bag(on_embeddings, emb, attention=True)
    for other in (b, c, d):
        assert other.selected.tolist() == a.selected.tolist()
        assert np.allclose(other.probabilities, a.probabilities, atol=1e-5)
        assert np.allclose(other.attention, a.attention, atol=1e-6)


def test_torchscript_encoder_errors_are_one_line(tmp_path):
    enc = TorchScriptEncoder(save_encoder(tmp_path / "e.pt", dim=12))
    assert enc.width(32) == 12 and len(enc.sha256) == 64
    assert enc(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)).shape == (3, 12)
    with pytest.raises(EncoderError, match=r"outputs 12-dimensional embeddings, but m\.safetensors expects 64"):
        enc.check_width(32, 64, "m.safetensors")
    model = make_model(embed_dim=64)
    with pytest.raises(EncoderError, match="outputs 12-dimensional embeddings, the model expects 64"):
        predict_bag(model, torch.zeros(4, 3, 32, 32, dtype=torch.uint8), encoder=enc)
    torch.save(TinyEncoder().state_dict(), tmp_path / "weights.pt")  # a pickle, not TorchScript
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    for name in ("weights.pt", "junk.pt"):
        with pytest.raises(EncoderError, match="not a TorchScript module") as exc:
            TorchScriptEncoder(tmp_path / name)
        assert "\n" not in str(exc.value)
    with pytest.raises(EncoderError, match="no such encoder file"):
        TorchScriptEncoder(tmp_path / "missing.pt")
    bad = TorchScriptEncoder(save_encoder(tmp_path / "3d.pt", out_shape="3d"))
    with pytest.raises(EncoderError, match=r"one embedding per patch, \(N, D\)"):
        bad.width(16)


def test_feature_patch_size_comes_from_coords_attributes(tmp_path):
    import h5py

    def write(name, **attrs):
        path = write_feature_file(tmp_path / name, np.zeros((2, 4)), np.zeros((2, 2)))
        with h5py.File(path, "a") as fh:
            fh["coords"].attrs.update(attrs)
        return FeatureBag(path)

    assert write("trident.h5", patch_size=256, patch_size_level0=512).patch_size_level0() == 512
    assert write("clam.h5", patch_size=256, patch_level=1, downsample=np.array([4.0, 4.0])).patch_size_level0() == 1024
    assert write("plain.h5", patch_size=224).patch_size_level0() == 224
    assert write("none.h5").patch_size_level0() is None


# -- metrics -----------------------------------------------------------------------------------


def test_binary_scores_by_hand():
    labels = [0, 0, 1, 1, 1]
    p1 = np.array([0.1, 0.6, 0.7, 0.4, 0.9])
    s = classification_scores(labels, np.stack([1 - p1, p1], axis=1), ["normal", "tumour"])
    # Predicted 0, 1, 1, 0, 1: three right; recall 1/2 (normal) and 2/3 (tumour).
    assert s.accuracy == pytest.approx(0.6)
    assert s.balanced_accuracy == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert s.confusion.tolist() == [[1, 1], [1, 2]]
    # Positive-negative pairs ordered right: (0.7 > 0.1, 0.6), (0.4 > 0.1), (0.9 > 0.1, 0.6) = 5 of 6.
    assert s.auc == pytest.approx(5 / 6)
    assert roc_auc([0.5, 0.5], [True, False]) == 0.5 and roc_auc([0.2], [True]) is None


def test_multiclass_scores_by_hand():
    labels = [0, 1, 2, 2]
    probs = [[0.7, 0.2, 0.1], [0.3, 0.4, 0.3], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]
    s = classification_scores(labels, probs, ["a", "b", "c"])
    assert s.accuracy == pytest.approx(0.75)  # predicted a, b, b, c
    assert s.balanced_accuracy == pytest.approx((1 + 1 + 0.5) / 3)
    assert s.confusion.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    # One-vs-rest: a 1.0; b 0.4 against 0.2, 0.5, 0.1 = 2/3; c (0.3, 0.8) against (0.1, 0.3) = 3.5/4.
    assert s.auc_per_class == pytest.approx({"a": 1.0, "b": 2 / 3, "c": 0.875})
    assert s.auc == pytest.approx((1 + 2 / 3 + 0.875) / 3)
    # A class no slide has: left out of balanced accuracy, its AUC undefined.
    s = classification_scores([0, 1], [[0.9, 0.1, 0.0], [0.2, 0.7, 0.1]], ["a", "b", "c"])
    assert s.balanced_accuracy == 1.0 and s.auc_per_class["c"] is None and s.auc == 1.0


def test_validation_split_is_stratified_and_seeded():
    bags = [LabelledBag(f"s{i}", None, int(i < 4)) for i in range(20)]  # 4 of class 1, 16 of class 0
    held = stratified_split(bags, 0.25, seed=3)
    assert sum(b.name in held for b in bags if b.label == 1) == 1
    assert sum(b.name in held for b in bags if b.label == 0) == 4
    assert held == stratified_split(bags, 0.25, seed=3) != stratified_split(bags, 0.25, seed=4)
    assert stratified_split(bags, 0.0, seed=3) == set()


# -- drawing ---------------------------------------------------------------------------------


def test_best_checkpoint_ties_go_to_the_lower_validation_loss():
    assert is_better(0.9, 0.5, -float("inf"), float("inf"))  # the first validation
    assert is_better(0.95, 0.9, 0.9, 0.1)  # a higher metric wins whatever its loss
    assert not is_better(0.85, 0.01, 0.9, 0.5)
    assert is_better(1.0, 0.2, 1.0, 0.3)  # a saturated AUC: the surer model wins
    assert not is_better(1.0, 0.3, 1.0, 0.3)
    assert not is_better(1.0, None, 1.0, 0.3)


def test_balanced_drawing_draws_every_class_equally_often():
    labels = np.array([0] * 90 + [1] * 10)
    plain = draw_bags(np.random.default_rng(0), labels, 20000, balance=False)
    balanced = draw_bags(np.random.default_rng(0), labels, 20000, balance=True)
    assert abs((labels[plain] == 1).mean() - 0.1) < 0.01
    assert abs((labels[balanced] == 1).mean() - 0.5) < 0.02
    assert set(balanced[labels[balanced] == 1].tolist()) == set(range(90, 100))  # every bag of the class
    three = np.array([2, 0, 0, 0, 0, 0, 5, 5])  # labels need not be 0..K-1 in the drawing
    drawn = three[draw_bags(np.random.default_rng(1), three, 9000, balance=True)]
    np.testing.assert_allclose([(drawn == c).mean() for c in (0, 2, 5)], 1 / 3, atol=0.02)


def test_heatmap_colours_each_patch_by_its_attention_without_blur():
    base = np.full((40, 60, 3), 200, np.uint8)
    coords = np.array([[0, 0], [40, 0], [80, 40]])  # level-0 px; drawn at downsample 2
    out = draw_attention(base, coords, 40, np.array([0.1, 0.6, 0.3]), downsample=2.0)
    low, high, mid = out[5, 5], out[5, 25], out[25, 45]
    assert low[2] > low[0] and high[0] > high[2]  # the least attention blue, the most red
    assert (out[:20, :20] == low).all() and (out[:20, 20:40] == high).all()  # flat squares, no blur
    assert (out[25:, :20] == 200).all()  # no patch there: the slide as it was
    assert not (mid == low).all() and not (mid == high).all()


def test_heatmap_blends_half_and_half_rounded_to_the_nearest_level():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    out = draw_attention(base, np.array([[0, 0], [40, 0]]), 40, np.array([0.2, 0.7]), downsample=2.0)
    colour = cv2.cvtColor(cv2.applyColorMap(np.array([[0, 255]], np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)[0]
    for cols, c in ((slice(0, 20), colour[0]), (slice(20, 40), colour[1])):  # lowest blue, highest red
        expected = np.round(0.5 * base[:20, cols].astype(np.float32) + 0.5 * c.astype(np.float32))
        assert (out[:20, cols] == expected.astype(np.uint8)).all()
    assert (out[20:] == base[20:]).all()


def test_attention_detections_are_level0_squares_minus_the_bounds_offset():
    coords = np.array([[1000, 2000], [1256, 2000], [1000, 2256]])
    attention = np.array([0.2, 0.5, 0.3])
    feats = list(attention_features(coords, 256.0, attention, np.array([1]), (1000, 2000), top=None))
    assert [f["properties"]["measurements"]["Attention"] for f in feats] == [0.5, 0.3, 0.2]  # highest first
    first = feats[0]
    assert first["properties"]["objectType"] == "detection" and validate_feature(first) == []
    assert first["properties"]["measurements"] == {"Attention": 0.5, "Attention / max": 1.0, "Selected": 1.0}
    xs = [x for x, _ in first["geometry"]["coordinates"][0]]
    ys = [y for _, y in first["geometry"]["coordinates"][0]]
    assert (min(xs), max(xs), min(ys), max(ys)) == (256, 512, 0, 256)
    top = list(attention_features(coords, 256.0, attention, np.array([1]), (0, 0), top=2))
    assert len(top) == 2 and top[1]["properties"]["measurements"]["Selected"] == 0.0
