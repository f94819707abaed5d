"""The token segmentation model and its checkpoints (CPU, small sizes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wsi_amr.checkpoint import CheckpointError, save_checkpoint
from wsi_amr.metrics import dice
from wsi_amr.quadtree import QuadtreeParams, build_quadtree, edge_map, uniform_leaves
from wsi_amr.segmentation.config import SegmenterConfig
from wsi_amr.segmentation.model import ModelCard, TokenSegmenter, load_checkpoint
from wsi_amr.tokens import detokenise, pad_tokens, token_geometry, tokenise

SMALL = SegmenterConfig(token_size=4, width=32, depth=2, heads=4)


def batch(n: int, p: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.rand(1, n, p, p, 3, generator=g)
    geom = torch.cat([torch.rand(1, n, 2, generator=g) * 256, torch.full((1, n, 1), 8.0)], dim=-1)
    return tokens, geom, torch.ones(1, n, dtype=torch.bool)


def test_output_shape():
    model = TokenSegmenter(SMALL).eval()
    t, g, m = batch(10)
    assert model(t, g, m).shape == (1, 10, 2, 4, 4)


def test_padding_does_not_change_real_token_outputs():
    torch.manual_seed(0)
    model = TokenSegmenter(SMALL).eval()
    t, g, m = batch(7)
    with torch.no_grad():
        ref = model(t, g, m)
        pad_t = torch.cat([t, torch.rand(1, 5, 4, 4, 3) * 9], dim=1)
        pad_g = torch.cat([g, torch.rand(1, 5, 3) * 999], dim=1)
        pad_m = torch.cat([m, torch.zeros(1, 5, dtype=torch.bool)], dim=1)
        out = model(pad_t, pad_g, pad_m)
    torch.testing.assert_close(out[:, :7], ref, rtol=1e-5, atol=1e-5)


def test_batches_of_different_lengths_match_single_runs():
    torch.manual_seed(1)
    model = TokenSegmenter(SMALL).eval()
    a, b = np.random.rand(3, 4, 4, 3).astype(np.float32), np.random.rand(6, 4, 4, 3).astype(np.float32)
    ga, gb = np.random.rand(3, 3).astype(np.float32) * 100 + 1, np.random.rand(6, 3).astype(np.float32) * 100 + 1
    toks, geom, mask = pad_tokens([a, b], [ga, gb])
    with torch.no_grad():
        both = model(torch.from_numpy(toks), torch.from_numpy(geom), torch.from_numpy(mask))
        only_a = model(torch.from_numpy(a)[None], torch.from_numpy(ga)[None], torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(both[0, :3], only_a[0], rtol=1e-5, atol=1e-5)


def test_position_embedding_tells_apart_same_pixels_at_other_places_and_sizes():
    torch.manual_seed(2)
    model = TokenSegmenter(SMALL).eval()
    pixels = torch.rand(1, 1, 4, 4, 3).expand(1, 3, 4, 4, 3).contiguous()
    geom = torch.tensor([[[16.0, 16.0, 8.0], [80.0, 16.0, 8.0], [16.0, 16.0, 32.0]]])
    with torch.no_grad():
        emb = model.geometry(geom)[0]
        out = model(pixels, geom, torch.ones(1, 3, dtype=torch.bool))[0]
    assert not torch.allclose(emb[0], emb[1]) and not torch.allclose(emb[0], emb[2])
    assert (out[0] - out[1]).abs().max() > 1e-4 and (out[0] - out[2]).abs().max() > 1e-4


def test_one_batch_overfit_reaches_near_perfect_dice():
    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    h = w = 48
    yy, xx = np.mgrid[0:h, 0:w]
    labels = (((xx - 22) ** 2 + (yy - 25) ** 2) < 14**2).astype(np.int64)
    image = np.where(labels[..., None] == 1, [200, 80, 160], [240, 235, 238]).astype(np.float32)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    leaves = build_quadtree(edge_map(image), QuadtreeParams(min_size=4, max_size=32, split_threshold=0.0, edge_downsample=1))
    tok = torch.from_numpy(tokenise(image, leaves, 4) / 255.0)[None]
    target = torch.from_numpy(tokenise(labels.astype(np.float32), leaves, 4, fill=0)[..., 0].round().astype(np.int64))[None]
    geom = torch.from_numpy(token_geometry(leaves))[None]
    mask = torch.ones(1, len(leaves), dtype=torch.bool)
    model = TokenSegmenter(SMALL)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(60):
        logits = model(tok, geom, mask)
        loss = torch.nn.functional.cross_entropy(logits.permute(0, 1, 3, 4, 2).reshape(-1, 2), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(tok, geom, mask).argmax(2)[0].numpy()
    back = detokenise(pred, leaves, labels.shape)
    score = dice(back == 1, labels == 1)
    assert score > 0.97, score


def test_uniform_and_adaptive_leaves_run_through_the_same_model():
    model = TokenSegmenter(SMALL).eval()
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3)).astype(np.uint8)
    for leaves in (uniform_leaves((32, 32), 4), build_quadtree(edge_map(img), QuadtreeParams(min_size=4, max_size=16, edge_downsample=1))):
        t = torch.from_numpy(tokenise(img, leaves, 4))[None]
        out = model(t, torch.from_numpy(token_geometry(leaves))[None], torch.ones(1, len(leaves), dtype=torch.bool))
        assert out.shape[1] == len(leaves)


# -- checkpoints ---------------------------------------------------------------------------------
def test_checkpoint_round_trips_exactly(tmp_path):
    torch.manual_seed(4)
    model = TokenSegmenter(SMALL).eval()
    card = ModelCard(mpp=0.5, training={"command": "wsi-amr train segment ..."})
    w, c = save_checkpoint(tmp_path / "m", model, card)
    assert w.name == "m.safetensors" and c.name == "m.json"
    loaded, card2 = load_checkpoint(tmp_path / "m.safetensors")
    assert card2 == card and loaded.cfg == model.cfg
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    t, g, m = batch(5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(t, g, m), model(t, g, m), rtol=0, atol=0)


def test_corrupt_and_foreign_checkpoints_are_refused(tmp_path):
    model = TokenSegmenter(SMALL)
    w, c = save_checkpoint(tmp_path / "m", model, ModelCard())
    # Truncated weights: checksum mismatch.
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(w)
    # Garbage weights with the checksum updated: not safetensors.
    w.write_bytes(b"\x00" * 64)
    doc = json.loads(c.read_text())
    import hashlib

    doc["weights_sha256"] = hashlib.sha256(w.read_bytes()).hexdigest()
    c.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(w)
    # A JSON of something else.
    other = tmp_path / "o.json"
    other.write_text(json.dumps({"format": "something-else"}))
    (tmp_path / "o.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a wsi-amr"):
        load_checkpoint(other)
    # Missing JSON.
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    # Weights of another architecture under a valid JSON.
    save_checkpoint(tmp_path / "a", TokenSegmenter(SMALL), ModelCard())
    save_checkpoint(tmp_path / "b", TokenSegmenter(SegmenterConfig(token_size=4, width=64, depth=2, heads=4)), ModelCard())
    doc_a = json.loads((tmp_path / "a.json").read_text())
    doc_b = json.loads((tmp_path / "b.json").read_text())
    doc_a["weights_sha256"] = doc_b["weights_sha256"]
    (tmp_path / "a.json").write_text(json.dumps(doc_a))
    (tmp_path / "a.safetensors").write_bytes((tmp_path / "b.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tmp_path / "a.json")
