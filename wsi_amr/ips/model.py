"""Iterative Patch Selection (IPS, Bergner et al., ICLR 2023): whole-slide classification in
memory that does not grow with the number of patches.

One multi-head cross-attention layer with learned query token(s) is both the *scorer* and the
*aggregator*. Selection streams a slide's patch embeddings through it in chunks of ``I``, in eval
mode and without gradients, keeping only the ``M`` patches the current model attends to most
(attention averaged over heads and queries). Training then runs the same layer, with gradients, on
those ``M`` patches only: pre-extracted embeddings are re-used, a built-in encoder re-encodes the
selected raw patches. Peak memory is ``M + I`` embeddings however large the slide.

What differs from the authors' code, on purpose (DESIGN 4.5):

* bags smaller than ``M`` are never padded with fake patches; batches of bags are padded with a
  mask (:func:`pad_bags`) and padded keys get exactly zero attention, so a padded bag gives the
  same logits as the bag alone;
* masks follow this project's convention: ``True`` on *real* patches (the opposite of
  :class:`torch.nn.MultiheadAttention`'s ``key_padding_mask``);
* a slide-wide attention (:func:`score_all`) is normalised over *all* patches with a streaming
  log-sum-exp, for heatmaps, rather than the attention within the final memory only;
* checkpoints are safetensors + JSON (:func:`save_ips` / :func:`load_ips`), never pickles.

Written from the paper's description; no code is taken from the authors' repository.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from wsi_amr.checkpoint import CheckpointError, build_model, check_weights, checkpoint_paths, load_weights, read_config, save_model
from wsi_amr.ips.config import ENCODERS, IPSConfig

__all__ = [
    "FORMAT",
    "VERSION",
    "ENCODERS",
    "IPSConfig",
    "SmallCNN",
    "IPSModel",
    "iter_chunks",
    "select_top_m",
    "score_all",
    "pad_bags",
    "select_then_forward",
    "save_ips",
    "load_ips",
]

FORMAT = "wsi-amr-ips"
VERSION = 1
def _norm_groups(channels: int) -> int:
    return math.gcd(8, channels)


class SmallCNN(nn.Module):
    """A small patch encoder trained from scratch: RGB patches (N, 3, H, W) -> (N, embed_dim).

    Input pixels are in **0-255** (uint8, or float holding 0-255 values, as read from a slide);
    the encoder scales them to about [-2, 2] itself (``(x / 255 - 0.5) / 0.25``, the same as
    :class:`~wsi_amr.segmentation.model.Normalisation`), so callers never normalise. Four stride-2
    3x3 convolutions then global average pooling make any patch size work (16 px and up keeps
    spatial extent through all four). GroupNorm rather than BatchNorm: selection runs in eval
    mode and training in train mode on a handful of patches, and BatchNorm would score patches
    with running statistics but train them with batch statistics, so the two would disagree;
    GroupNorm is the same in both modes and does not depend on the batch.
    """

    def __init__(self, embed_dim: int = 512, channels: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(4):
            c_out = channels * 2**i
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                nn.GroupNorm(_norm_groups(c_out), c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(c_in, embed_dim)

    def forward(self, patches: Tensor) -> Tensor:
        if patches.ndim != 4 or patches.shape[1] != 3:
            raise ValueError(f"SmallCNN expects RGB patches (N, 3, H, W), got shape {tuple(patches.shape)}")
        dtype = self.out.weight.dtype
        x = (patches.to(dtype) / 255.0 - 0.5) / 0.25
        x = self.features(x)
        return self.out(x.mean(dim=(2, 3)))


class IPSModel(nn.Module):
    """Optional encoder, projection to ``width``, one cross-attention layer with learned queries,
    and an MLP head.

    Shapes: embeddings ``(B, N, embed_dim)``; mask ``(B, N)`` bool, ``True`` on real patches;
    attention ``(B, Q, H, N)`` (queries, heads). Each patch's attention logit depends on that
    patch alone (the projection and LayerNorm act per patch), so with one head and one query
    the softmax over any set of patches orders them exactly as their logits do: streaming
    selection then finds the global top M whatever the chunking and order.
    """

    def __init__(self, cfg: IPSConfig = IPSConfig()) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        w, q = cfg.width, cfg.queries
        self.encoder: nn.Module | None = SmallCNN(cfg.embed_dim, cfg.cnn_channels) if cfg.encoder == "small-cnn" else None
        # LayerNorm first: pre-extracted features of different extractors differ wildly in scale.
        self.project = nn.Sequential(nn.LayerNorm(cfg.embed_dim), nn.Linear(cfg.embed_dim, w), nn.GELU())
        self.query = nn.Parameter(torch.randn(q, w) * 0.02)
        self.q_proj = nn.Linear(w, w)
        self.k_proj = nn.Linear(w, w)
        self.v_proj = nn.Linear(w, w)
        self.o_proj = nn.Linear(w, w)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(w)
        self.head = nn.Sequential(
            nn.Linear(q * w, w), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(w, cfg.num_classes)
        )

    # -- pieces -------------------------------------------------------------------------------

    def encode(self, patches: Tensor) -> Tensor:
        """Raw patches (N, 3, H, W), pixels 0-255 -> embeddings (N, embed_dim)."""
        if self.encoder is None:
            raise ValueError("this IPS model has no encoder (encoder='none'): give it embeddings, not patches")
        return self.encoder(patches)

    def _check(self, emb: Tensor, mask: Tensor | None) -> None:
        if emb.ndim != 3 or emb.shape[-1] != self.cfg.embed_dim:
            raise ValueError(f"embeddings must be (B, N, {self.cfg.embed_dim}), got shape {tuple(emb.shape)}")
        if emb.shape[1] == 0:
            raise ValueError("a bag needs at least one patch")
        if mask is not None:
            if mask.shape != emb.shape[:2] or mask.dtype != torch.bool:
                raise ValueError(f"mask must be bool (B, N) = {tuple(emb.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
            if not bool(mask.any(dim=1).all()):
                raise ValueError("every bag needs at least one real (unmasked) patch")

    def _keys_values(self, emb: Tensor) -> tuple[Tensor, Tensor]:
        b, n, _ = emb.shape
        h, dh = self.cfg.heads, self.cfg.width // self.cfg.heads
        x = self.project(emb)
        k = self.k_proj(x).reshape(b, n, h, dh).transpose(1, 2)  # (B, H, N, dh)
        v = self.v_proj(x).reshape(b, n, h, dh).transpose(1, 2)
        return k, v

    def _logits(self, k: Tensor, mask: Tensor | None) -> Tensor:
        h, dh = self.cfg.heads, self.cfg.width // self.cfg.heads
        q = self.q_proj(self.query).reshape(self.cfg.queries, h, dh).transpose(0, 1)  # (H, Q, dh)
        logits = torch.einsum("hqd,bhnd->bqhn", q, k) / math.sqrt(dh)  # (B, Q, H, N)
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        return logits

    def attention_logits(self, emb: Tensor, mask: Tensor | None = None) -> Tensor:
        """Pre-softmax attention (B, Q, H, N) of each patch for each query and head; ``-inf`` on
        padded patches. The ranking and streaming normalisation are built on these."""
        self._check(emb, mask)
        k, _ = self._keys_values(emb)
        return self._logits(k, mask)

    # -- the three uses -----------------------------------------------------------------------

    @torch.no_grad()
    def score(self, emb: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attention of each patch (B, N): softmax over the bag per query and head, averaged over
        heads and queries; 0 on padded patches, sums to 1 per bag. No gradients (scoring only);
        call in eval mode (dropout does not touch it either way)."""
        return self.attention_logits(emb, mask).softmax(dim=-1).mean(dim=(1, 2))

    def aggregate(self, emb: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Logits (B, K) and attention (B, Q, H, N) of a bag (or a padded batch of bags)."""
        self._check(emb, mask)
        b = emb.shape[0]
        k, v = self._keys_values(emb)
        attn = self._logits(k, mask).softmax(dim=-1)  # (B, Q, H, N)
        out = torch.einsum("bqhn,bhnd->bqhd", self.attn_drop(attn), v).reshape(b, self.cfg.queries, self.cfg.width)
        z = self.norm(self.query + self.o_proj(out))  # residual on the query token(s)
        return self.head(z.reshape(b, -1)), attn

    def forward(self, emb: Tensor, mask: Tensor | None = None) -> Tensor:
        """Logits (B, K) of selected embeddings (B, M, embed_dim); ``mask`` True on real patches."""
        return self.aggregate(emb, mask)[0]


# -- streaming ----------------------------------------------------------------------------------


def iter_chunks(
    source: Any, chunk: int, indices: Any = None, *, generator: torch.Generator | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(rows, global indices)`` of ``source`` ``chunk`` rows at a time.

    ``source`` is anything with ``len`` and row indexing: a tensor, a numpy array, an h5py
    dataset (only one chunk is read at a time) — embeddings (N, D) or raw patches (N, 3, H, W).
    ``indices`` (default ``0..N-1``) are the global ids reported back (e.g. rows of a feature
    file whose ``coords`` give the position). With a ``generator`` the order is a random
    permutation, as the paper shuffles before selecting; each chunk's rows are read in
    increasing order (what h5py needs) and then put in the permuted order.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    n = len(source)
    ids = torch.arange(n) if indices is None else torch.as_tensor(np.asarray(indices), dtype=torch.long)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} indices for {n} rows")
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, chunk):
        rows = order[start : start + chunk]
        if isinstance(source, Tensor):
            data = source[rows]
        else:
            sorted_rows, inverse = torch.sort(rows)
            block = np.asarray(source[sorted_rows.numpy()])
            data = torch.from_numpy(block)[torch.argsort(inverse)]
        yield data, ids[rows]


def _split(chunks: Iterable[tuple[Any, Any]], size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The caller's chunks cut to at most ``size`` rows, with their indices checked."""
    for x, idx in chunks:
        x = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
        idx = torch.as_tensor(np.asarray(idx.cpu() if isinstance(idx, Tensor) else idx), dtype=torch.long).reshape(-1)
        if len(idx) != len(x):
            raise ValueError(f"a chunk has {len(x)} rows but {len(idx)} indices")
        for s in range(0, len(x), size):
            yield x[s : s + size], idx[s : s + size]


def _embed(model: IPSModel, x: Tensor) -> Tensor:
    """Chunk rows -> embeddings (n, D) on the model's device: raw patches go through the encoder."""
    p = next(model.parameters())
    if x.ndim == 4:
        return model.encode(x.to(p.device))
    if x.ndim != 2:
        raise ValueError(f"chunk rows must be embeddings (n, D) or patches (n, 3, H, W), got shape {tuple(x.shape)}")
    return x.to(device=p.device, dtype=p.dtype)


def _rank(model: IPSModel, emb: Tensor) -> Tensor:
    """What selection sorts by, (n,): attention averaged over heads and queries, within ``emb``.

    With one head and one query the softmax is monotone in the logit, so the logit itself is
    used: same order, but no ties from exp() underflowing to 0 for very negative logits.
    """
    logits = model.attention_logits(emb[None])[0]  # (Q, H, n)
    if logits.shape[0] * logits.shape[1] == 1:
        return logits[0, 0]
    return logits.softmax(dim=-1).mean(dim=(0, 1))


class _EvalMode:
    """Eval mode and no gradients for the block; the model's previous mode restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def select_top_m(
    model: IPSModel,
    chunks: Iterable[tuple[Any, Any]],
    memory: int | None = None,
    *,
    chunk: int | None = None,
    stats: dict[str, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Stream a bag through the model and keep the M patches it attends to most.

    ``chunks`` yields ``(rows, global indices)``: embeddings (n_i, D), or raw patches
    (n_i, 3, H, W) for a model with an encoder (encoded here, a chunk at a time). Chunks longer
    than ``chunk`` (I, default ``model.cfg.chunk``) are cut, so at most ``M + I`` embeddings are
    held and scored at once; the memory fills with the first M patches, then each piece is
    merged and the top M kept by attention averaged over heads (and queries). Eval mode, no
    gradients; the model's mode is restored after. Shuffle beforehand (:func:`iter_chunks`
    with a generator) if order should not matter: with several heads it can.

    Returns ``(embeddings (M', D), indices (M',), scores (M',))``, M' = min(M, N), sorted by
    decreasing score: embeddings on the model's device (detached), indices on the CPU, scores
    the attention of each kept patch within the kept set (sums to 1). Nothing is padded. If
    ``stats`` is given it receives ``patches`` (N), ``peak_rows`` (most embeddings held in one
    merge) and ``merges``.
    """
    m = model.cfg.memory if memory is None else int(memory)
    size = model.cfg.chunk if chunk is None else int(chunk)
    if m < 1 or size < 1:
        raise ValueError(f"memory and chunk must be at least 1, got memory={m}, chunk={size}")
    mem: Tensor | None = None
    mem_idx = torch.empty(0, dtype=torch.long)
    seen = peak = merges = 0
    with _EvalMode(model):
        for x, idx in _split(chunks, size):
            if len(idx) == 0:
                continue
            emb = _embed(model, x)
            seen += len(idx)
            both = emb if mem is None else torch.cat([mem, emb])
            both_idx = torch.cat([mem_idx, idx])
            peak = max(peak, len(both_idx))
            if len(both_idx) <= m:  # still filling the memory: nothing to drop
                mem, mem_idx = both, both_idx
                continue
            keep = _rank(model, both).topk(m).indices
            merges += 1
            mem, mem_idx = both[keep], both_idx[keep.cpu()]
            del both, emb
        if mem is None:
            raise ValueError("no patches to select from (the bag is empty)")
        scores = model.score(mem[None])[0]
    order = scores.argsort(descending=True)
    if stats is not None:
        stats.update(patches=seen, peak_rows=peak, merges=merges)
    return mem[order], mem_idx[order.cpu()], scores[order]


def score_all(
    model: IPSModel, chunks: Iterable[tuple[Any, Any]], *, chunk: int | None = None, per_head: bool = False
) -> tuple[Tensor, Tensor]:
    """Attention of every patch of a slide, normalised over the whole slide, for heatmaps.

    Each patch is streamed once (chunks cut to ``chunk`` rows, default ``model.cfg.chunk``) and
    its attention logit against each learned query and head is kept; a running log-sum-exp over
    the slide gives, at the end, ``softmax`` over *all* N patches per query and head — what
    :meth:`IPSModel.score` would give on the whole bag at once, were it to fit. Embeddings are
    never held beyond one chunk; only Q x H logits per patch are kept (on the CPU).

    Returns ``(indices (N,), attention)`` in streaming order, on the CPU: attention (N,) averaged
    over heads and queries (sums to 1 over the slide), or (N, Q, H) with ``per_head`` (each
    query-head column sums to 1). Eval mode, no gradients.
    """
    size = model.cfg.chunk if chunk is None else int(chunk)
    lse: Tensor | None = None
    # Two growing buffers rather than a list of small per-chunk tensors: small long-lived blocks
    # allocated between each chunk's large transient ones fragment the C heap, and a large slide's
    # process then grew chunk by chunk (bench/ips_memory.py; docs/benchmarks.md, "IPS: memory").
    logits_buf = _Rows()
    ids_buf = _Rows()
    with _EvalMode(model):
        for x, idx in _split(chunks, size):
            if len(idx) == 0:
                continue
            logits = model.attention_logits(_embed(model, x)[None])[0]  # (Q, H, n)
            part = torch.logsumexp(logits.double(), dim=-1)
            lse = part if lse is None else torch.logaddexp(lse, part)
            logits_buf.append(logits.permute(2, 0, 1).cpu())  # (n, Q, H)
            ids_buf.append(idx)
    if lse is None:
        raise ValueError("no patches to score (the slide is empty)")
    logits = logits_buf.rows()
    attn = torch.exp(logits.double() - lse.cpu()[None])  # (N, Q, H)
    out = attn if per_head else attn.mean(dim=(1, 2))
    return ids_buf.rows(), out.to(logits.dtype)


class _Rows:
    """Rows appended a chunk at a time into one buffer that doubles when full (amortised O(1))."""

    def __init__(self) -> None:
        self.buf: Tensor | None = None
        self.n = 0

    def append(self, rows: Tensor) -> None:
        if self.buf is None:
            self.buf = torch.empty((max(len(rows), 1024), *rows.shape[1:]), dtype=rows.dtype)
        elif self.n + len(rows) > len(self.buf):
            grown = torch.empty((max(2 * len(self.buf), self.n + len(rows)), *self.buf.shape[1:]), dtype=self.buf.dtype)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : self.n + len(rows)] = rows
        self.n += len(rows)

    def rows(self) -> Tensor:
        assert self.buf is not None
        return self.buf[: self.n]


def pad_bags(bags: Sequence[Tensor], length: int | None = None) -> tuple[Tensor, Tensor]:
    """Stack bags (M_i, D) into (B, L, D) with zeros after each bag's rows, and a mask (B, L)
    ``True`` on real rows. ``L`` = the longest bag, or ``length`` (at least that)."""
    if not bags:
        raise ValueError("pad_bags needs at least one bag")
    sizes = [len(b) for b in bags]
    if min(sizes) < 1:
        raise ValueError("every bag needs at least one patch")
    dims = {tuple(b.shape[1:]) for b in bags}
    if len(dims) != 1:
        raise ValueError(f"bags have different row shapes: {sorted(dims)}")
    longest = max(sizes)
    length = longest if length is None else int(length)
    if length < longest:
        raise ValueError(f"length {length} is shorter than the longest bag ({longest})")
    first = bags[0]
    out = first.new_zeros((len(bags), length, *first.shape[1:]))
    mask = torch.zeros(len(bags), length, dtype=torch.bool, device=first.device)
    for i, b in enumerate(bags):
        out[i, : len(b)] = b
        mask[i, : len(b)] = True
    return out, mask


def select_then_forward(
    model: IPSModel,
    chunks: Iterable[tuple[Any, Any]],
    memory: int | None = None,
    chunk: int | None = None,
    *,
    patches_fn: Callable[[Tensor], Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """The paper's training step for one bag: select without gradients, then forward with them.

    1. :func:`select_top_m` streams ``chunks`` (eval mode, no gradients, at most M + I held).
    2. With pre-extracted embeddings (``encoder='none'``) the selected embeddings are re-used
       as inputs; gradients reach the attention layer and head. With an encoder, the selected
       patches' pixels are fetched again with ``patches_fn(indices) -> (M', 3, H, W)`` (e.g.
       read from the slide or the tile file) and re-encoded *with* gradients, so only M patches
       are ever in the autograd graph. Raw patches are not kept during selection, which is what
       keeps its memory at M + I embeddings.

    The forward runs in the model's own mode (call ``model.train()`` to train). Returns
    ``(logits (1, K), indices (M',))``. For a batch, call per bag, then :func:`pad_bags` the
    embeddings and call the model once, or stack the logits.
    """
    emb, idx, _ = select_top_m(model, chunks, memory, chunk=chunk)
    if model.encoder is None:
        return model(emb.detach()[None]), idx
    if patches_fn is None:
        raise ValueError("a model with an encoder needs patches_fn(indices) to re-read the selected patches")
    patches = patches_fn(idx)
    patches = patches if isinstance(patches, Tensor) else torch.as_tensor(np.asarray(patches))
    if len(patches) != len(idx):
        raise ValueError(f"patches_fn returned {len(patches)} patches for {len(idx)} indices")
    p = next(model.parameters())
    return model(model.encode(patches.to(p.device))[None]), idx


# -- checkpoints --------------------------------------------------------------------------------


def save_ips(
    path: str | Path, model: IPSModel, config: IPSConfig | None = None, extra: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write ``NAME.safetensors`` (weights) and ``NAME.json`` (architecture, ``extra`` — class
    names, training settings, metrics — and the weights' SHA-256), each atomically."""
    cfg = model.cfg if config is None else config
    if cfg != model.cfg:
        raise ValueError("config does not match the model's own config (model.cfg)")
    return save_model(path, model, FORMAT, VERSION, {"extra": dict(extra or {})})


def load_ips(path: str | Path, device: str | torch.device = "cpu") -> tuple[IPSModel, IPSConfig, dict[str, Any]]:
    """Rebuild ``(model in eval mode, config, extra)`` from :func:`save_ips`'s files; anything
    that does not match is refused with one :class:`~wsi_amr.checkpoint.CheckpointError` line."""
    weights, cfg_path = checkpoint_paths(path)
    doc = read_config(path, FORMAT, VERSION, "IPS")
    check_weights(path, doc)
    cfg, model = build_model(cfg_path, doc, IPSConfig, IPSModel)
    load_weights(weights, model, FORMAT, "IPS model")
    extra = doc.get("extra") or {}
    if not isinstance(extra, dict):
        raise CheckpointError(f"{cfg_path}: 'extra' must be a JSON object")
    return model.to(device).eval(), cfg, extra
