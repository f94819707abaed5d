"""Iterative Patch Selection: streamed selection equals the global top M, memory stays at M + I,
padding is masked, slide-wide attention is a softmax over all patches, the paper's training
recipe, checkpoints and config checks. CPU only, seconds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from wsi_amr.checkpoint import CheckpointError
from wsi_amr.ips.model import IPSConfig, IPSModel, SmallCNN, iter_chunks, load_ips, pad_bags, save_ips, score_all, select_then_forward, select_top_m

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: threads only add overhead, and on a busy 2-core machine spinning worker
    threads make these tests 10-50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(seed: int = 0, **kw) -> IPSModel:
    torch.manual_seed(seed)
    cfg = dict(embed_dim=12, width=16, heads=1, num_classes=3, memory=8, chunk=8, queries=1)
    cfg.update(kw)
    return IPSModel(IPSConfig(**cfg))


def random_chunks(emb: torch.Tensor, rng: random.Random, largest: int):
    """The bag's rows in a random order, cut into random sizes 1..largest (last one partial)."""
    order = list(range(len(emb)))
    rng.shuffle(order)
    out, start = [], 0
    while start < len(order):
        n = rng.randint(1, largest)
        rows = torch.tensor(order[start : start + n])
        out.append((emb[rows], rows))
        start += n
    return out


# -- selection ------------------------------------------------------------------------------


@pytest.mark.parametrize("memory", [1, 5, 17])
def test_streamed_selection_is_global_top_m_with_one_head(memory):
    model = make_model(seed=memory, heads=1, queries=1).double()
    rng = random.Random(memory)
    for trial in range(8):
        n = rng.randint(memory + 1, 6 * memory + 40)
        emb = torch.randn(n, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(trial))
        expected = set(model.score(emb[None])[0].topk(memory).indices.tolist())
        # Chunks both smaller and larger than M, in a random order; I either large (the
        # caller's chunks as they come) or small (cut further inside).
        chunks = random_chunks(emb, rng, largest=3 * memory + 2)
        for i in (10_000, rng.randint(1, 2 * memory)):
            sel, idx, scores = select_top_m(model, chunks, memory, chunk=i)
            assert set(idx.tolist()) == expected, (trial, i)
            assert len(idx) == memory and len(set(idx.tolist())) == memory
            assert torch.equal(sel, emb[idx])
            assert torch.all(scores[:-1] >= scores[1:])
            assert float(scores.sum()) == pytest.approx(1.0)


def test_streamed_selection_with_several_heads_keeps_m_real_patches():
    """Several heads and queries: not order-invariant in general, but still M distinct patches
    of the bag with their own embeddings, and the model's training mode restored."""
    model = make_model(heads=4, queries=2)
    model.train()
    emb = torch.randn(101, 12)
    sel, idx, scores = select_top_m(model, iter_chunks(emb, 7, generator=torch.Generator().manual_seed(1)), 8, chunk=7)
    assert model.training
    assert len(set(idx.tolist())) == 8 and torch.equal(sel, emb[idx])
    assert torch.allclose(scores, model.score(sel[None])[0])


def test_selection_memory_never_exceeds_m_plus_i():
    model = make_model(heads=2, queries=1)
    m, i, n = 8, 16, 500
    emb = torch.randn(n, 12)
    yielded = {"rows": 0}
    sizes, yielded_at_call = [], []

    def source():
        # Caller's chunks of 3 I: longer than I, so select must cut them itself.
        for s in range(0, n, 3 * i):
            rows = torch.arange(s, min(n, s + 3 * i))
            yielded["rows"] += len(rows)
            yield emb[rows], rows

    original = model.attention_logits

    def recording(e, mask=None):
        sizes.append(e.shape[1])
        yielded_at_call.append(yielded["rows"])
        return original(e, mask)

    model.attention_logits = recording  # instance attribute: select_top_m calls this
    stats: dict[str, int] = {}
    _, idx, _ = select_top_m(model, source(), m, chunk=i, stats=stats)
    assert len(idx) == m
    assert max(sizes) <= m + i, sizes
    assert stats["peak_rows"] <= m + i and stats["patches"] == n
    assert stats["merges"] >= (n - m) // i
    # Lazy: the first merge happened after one source chunk, not after reading the whole bag.
    assert yielded_at_call[0] <= 3 * i < n


def test_bag_smaller_than_memory_is_not_padded_and_padding_is_masked():
    model = make_model(heads=4, queries=2, memory=8).eval()
    emb = torch.randn(5, 12)
    sel, idx, scores = select_top_m(model, [(emb[:2], torch.arange(2)), (emb[2:], torch.arange(2, 5))])
    assert sorted(idx.tolist()) == [0, 1, 2, 3, 4] and sel.shape == (5, 12)
    with torch.no_grad():
        alone = model(emb[None])
        assert torch.allclose(model(sel[None]), alone, atol=1e-6)  # order does not matter
        padded, mask = pad_bags([sel], length=8)
        assert padded.shape == (1, 8, 12) and mask.tolist() == [[True] * 5 + [False] * 3]
        padded[0, 5:] = 1e3 * torch.randn(3, 12)  # garbage in the padding must not matter
        assert torch.allclose(model(padded, mask), alone, atol=1e-6)
        assert not torch.allclose(model(padded), alone, atol=1e-3)  # ...because of the mask
        assert torch.all(model.score(padded, mask)[0, 5:] == 0)

        a, b = torch.randn(3, 12), torch.randn(7, 12)
        batch, bmask = pad_bags([a, b])
        assert batch.shape == (2, 7, 12)
        batch[0, 3:] = 50.0
        both = model(batch, bmask)
        assert torch.allclose(both[0], model(a[None])[0], atol=1e-6)
        assert torch.allclose(both[1], model(b[None])[0], atol=1e-6)


def test_score_all_is_softmax_over_the_whole_slide():
    model = make_model(heads=4, queries=2, chunk=9)
    emb = torch.randn(103, 12) * 3
    chunks = random_chunks(emb, random.Random(3), largest=20)
    idx, attn = score_all(model, chunks, per_head=True)
    assert attn.shape == (103, 2, 4)
    assert torch.allclose(attn.sum(dim=0), torch.ones(2, 4), atol=1e-5)  # per query and head
    order = idx.argsort()
    assert torch.equal(idx[order], torch.arange(103))
    with torch.no_grad():
        direct = model.attention_logits(emb[None])[0].softmax(dim=-1).permute(2, 0, 1)  # (N, Q, H)
        assert torch.allclose(attn[order], direct, atol=1e-6)
        idx2, mean = score_all(model, iter_chunks(emb, 10))
        assert torch.equal(idx2, torch.arange(103))
        assert float(mean.sum()) == pytest.approx(1.0, abs=1e-5)
        assert torch.allclose(mean, model.score(emb[None])[0], atol=1e-6)


def test_iter_chunks_reads_feature_files_shuffled(tmp_path):
    """Rows of an HDF5 feature file (float16, as extractors write them), shuffled: every row
    once, with its own global index, and selection on it matches selection on the tensor."""
    import h5py

    feats = torch.randn(37, 12).half()
    with h5py.File(tmp_path / "f.h5", "w") as fh:
        fh["features"] = feats.numpy()
    model = make_model(heads=1)
    with h5py.File(tmp_path / "f.h5", "r") as fh:
        got = list(iter_chunks(fh["features"], 5, indices=range(100, 137), generator=torch.Generator().manual_seed(0)))
        assert [len(i) for _, i in got] == [5] * 7 + [2]
        idx = torch.cat([i for _, i in got])
        assert sorted(idx.tolist()) == list(range(100, 137)) and idx.tolist() != list(range(100, 137))
        assert torch.equal(torch.cat([x for x, _ in got]), feats[idx - 100])
        _, sel, _ = select_top_m(model, iter_chunks(fh["features"], 5, indices=range(100, 137)), 6)
    _, ref, _ = select_top_m(model, iter_chunks(feats.float(), 37), 6)
    assert set(sel.tolist()) == {int(i) + 100 for i in ref}


# -- encoder and training --------------------------------------------------------------------


def test_small_cnn_shapes_and_input_range():
    torch.manual_seed(0)
    cnn = SmallCNN(embed_dim=20, channels=8)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert cnn(x).shape == (4, 20)
    assert torch.allclose(cnn(x), cnn(x.float()))  # uint8 and float 0-255 are the same input
    assert cnn(torch.rand(2, 3, 48, 40) * 255).shape == (2, 20)  # any patch size
    with pytest.raises(ValueError, match="RGB patches"):
        cnn(torch.zeros(2, 32, 32, 3))


def test_select_then_forward_gradients_reach_only_selected_patches():
    torch.manual_seed(0)
    model = IPSModel(IPSConfig(embed_dim=16, width=16, heads=2, memory=4, chunk=6, encoder="small-cnn", cnn_channels=8))
    model.train()
    patches = (torch.rand(15, 3, 16, 16) * 255).requires_grad_(True)
    logits, idx = select_then_forward(model, iter_chunks(patches, 6), patches_fn=lambda i: patches[i])
    assert logits.shape == (1, 2) and len(idx) == 4
    logits.sum().backward()
    grad = patches.grad.abs().sum(dim=(1, 2, 3))
    chosen = torch.zeros(15, dtype=torch.bool)
    chosen[idx] = True
    assert torch.all(grad[chosen] > 0) and torch.all(grad[~chosen] == 0)
    assert all(p.grad is not None for p in model.encoder.parameters())
    with pytest.raises(ValueError, match="patches_fn"):
        select_then_forward(model, iter_chunks(patches.detach(), 6))

    # Pre-extracted embeddings: re-used as they are; gradients go to the attention and head.
    model2 = make_model(heads=2, memory=4)
    emb = torch.randn(30, 12)
    logits, idx = select_then_forward(model2, iter_chunks(emb, 8))
    logits.sum().backward()
    assert model2.query.grad is not None and len(idx) == 4


def test_tiny_overfit_bright_patches():
    """Positive bags hide 3 bright patches among 13 dark ones; 20 Adam steps learn it."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    bags, labels = [], []
    for b in range(12):
        x = torch.randint(10, 70, (16, 3, 16, 16), generator=gen, dtype=torch.uint8)
        if b % 2:
            x[torch.randperm(16, generator=gen)[:3]] = torch.randint(190, 255, (3, 3, 16, 16), generator=gen, dtype=torch.uint8)
        bags.append(x)
        labels.append(b % 2)
    y = torch.tensor(labels)
    model = IPSModel(IPSConfig(embed_dim=16, width=16, heads=2, memory=4, chunk=8, encoder="small-cnn", cnn_channels=8))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def predict(train: bool) -> torch.Tensor:
        model.train(train)
        return torch.cat([
            select_then_forward(model, iter_chunks(x, 8, generator=gen), patches_fn=lambda i, x=x: x[i])[0] for x in bags
        ])

    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(predict(True), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (predict(False).argmax(dim=1) == y).float().mean().item()
    assert acc > 0.9, (acc, loss.item())


# -- checkpoints and config --------------------------------------------------------------------


def test_save_load_round_trip_and_bad_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = IPSModel(IPSConfig(embed_dim=16, width=16, heads=2, encoder="small-cnn", cnn_channels=8)).eval()
    weights, js = save_ips(tmp_path / "ips", model, model.cfg, {"class_names": ["neg", "pos"], "epoch": 3})
    loaded, cfg, extra = load_ips(tmp_path / "ips.json")
    assert cfg == model.cfg and extra == {"class_names": ["neg", "pos"], "epoch": 3}
    patches = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(loaded(loaded.encode(patches)[None]), model(model.encode(patches)[None]))
    assert not loaded.training

    with pytest.raises(ValueError, match="does not match"):
        save_ips(tmp_path / "other", model, IPSConfig(embed_dim=16, width=16, heads=2))

    # Architecture in the JSON does not fit the weights.
    doc = json.loads(js.read_text())
    doc["architecture"]["embed_dim"] = 32
    js.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="shape"):
        load_ips(weights)
    doc["architecture"]["encoder"] = "none"
    doc["architecture"]["embed_dim"] = 16
    js.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_ips(weights)
    doc["architecture"] = {**doc["architecture"], "heads": 3, "encoder": "small-cnn"}
    js.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="divisible"):
        load_ips(weights)
    doc["architecture"] = {**model.cfg.as_dict(), "colour": 1}
    js.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="unknown architecture"):
        load_ips(weights)

    # Truncated weights: caught by the checksum, and without one by safetensors.
    doc["architecture"] = model.cfg.as_dict()
    js.write_text(json.dumps(doc))
    load_ips(weights)  # restored: loads again
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="checksum"):
        load_ips(weights)
    del doc["weights_sha256"]
    js.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_ips(weights)
    js.write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        load_ips(weights)
    with pytest.raises(CheckpointError, match="missing"):
        load_ips(tmp_path / "nothing.safetensors")


def test_segmentation_checkpoint_is_refused(tmp_path):
    seg = REPO / "wsi_amr" / "models" / "glas-gland.json"
    if not seg.exists():
        pytest.skip("bundled segmentation model not present")
    with pytest.raises(CheckpointError, match="not a wsi-amr IPS checkpoint"):
        load_ips(seg)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(width=30, heads=4), "divisible by heads"),
        (dict(heads=0), "heads must be a positive"),
        (dict(memory=0), "memory"),
        (dict(chunk=0), "chunk"),
        (dict(queries=0), "queries"),
        (dict(num_classes=1), "num_classes"),
        (dict(dropout=1.0), "dropout"),
        (dict(encoder="resnet"), "encoder must be one of"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match) as err:
        IPSConfig(**kw).validate()
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=match):
        IPSModel(IPSConfig(**kw))
