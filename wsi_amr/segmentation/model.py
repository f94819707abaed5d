"""The segmentation networks, their card and loading a checkpoint.

:class:`TokenSegmenter`, a transformer that segments adaptive-patch tokens (APF's model, with
geometry and masks): each token is a leaf's pixels resized to p x p (see :mod:`wsi_amr.tokens`)
and its geometry (centre x, centre y, size in working px). The model embeds the pixels linearly,
adds a 2-D position and scale embedding built from the geometry (sinusoids of the centre, of log2
size), runs a transformer encoder that ignores padded tokens, and predicts p x p class logits per
token; the detokeniser pastes them back onto the image. The same model runs on uniform patches
(every leaf at the minimum size), same weights class, same code path.

:class:`~wsi_amr.segmentation.unet.UNet`, the CNN baseline on every pixel. A checkpoint's ``arch``
says which (:data:`ARCHITECTURES`); :func:`load_checkpoint` builds that class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from wsi_amr.checkpoint import FORMAT, CheckpointError, build_model, check_weights, checkpoint_paths, load_weights, read_config
from wsi_amr.segmentation.config import SegmenterConfig, UNetConfig
from wsi_amr.segmentation.unet import UNet


def fourier_features(values: Tensor, n: int, shortest: float) -> Tensor:
    """sin/cos of ``values`` at ``n`` wavelengths doubling from ``shortest``: (..., 2n)."""
    wavelengths = shortest * (2.0 ** torch.arange(n, device=values.device, dtype=values.dtype))
    angles = values[..., None] * (2 * math.pi / wavelengths)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class GeometryEmbedding(nn.Module):
    """Token position and scale from (cx, cy, size): sinusoids of the centre in px and of
    log2(size), mixed by a linear layer."""

    def __init__(self, cfg: SegmenterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n_in = 4 * cfg.position_frequencies + 2 * cfg.size_frequencies
        self.proj = nn.Linear(n_in, cfg.width)

    def forward(self, geometry: Tensor) -> Tensor:
        c = self.cfg
        pos = torch.cat(
            [fourier_features(geometry[..., 0], c.position_frequencies, 4.0),
             fourier_features(geometry[..., 1], c.position_frequencies, 4.0)], dim=-1)
        scale = fourier_features(torch.log2(geometry[..., 2].clamp(min=1.0)), c.size_frequencies, 2.0)
        return self.proj(torch.cat([pos, scale], dim=-1))


class TokenSegmenter(nn.Module):
    """Tokens (B, L, p, p, C), geometry (B, L, 3) and a mask (B, L), True on real tokens ->
    logits (B, L, K, p, p)."""

    def __init__(self, cfg: SegmenterConfig = SegmenterConfig()) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        p, c, w = cfg.token_size, cfg.channels, cfg.width
        self.embed = nn.Linear(p * p * c, w)
        self.geometry = GeometryEmbedding(cfg)
        layer = nn.TransformerEncoderLayer(
            d_model=w, nhead=cfg.heads, dim_feedforward=int(w * cfg.mlp_ratio), dropout=cfg.dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        # enable_nested_tensor off: outputs at padded positions stay defined (and ignored).
        self.encoder = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(w)
        # The head sees the token's own pixels again, so boundaries inside a token can be placed
        # finer than the token's embedding alone would allow.
        self.head = nn.Sequential(
            nn.Linear(w + p * p * c, w), nn.GELU(), nn.Linear(w, p * p * cfg.num_classes)
        )

    def forward(self, tokens: Tensor, geometry: Tensor, mask: Tensor) -> Tensor:
        b, length, p, _, c = tokens.shape
        flat = tokens.reshape(b, length, p * p * c)
        x = self.embed(flat) + self.geometry(geometry)
        # Without padding there is nothing to mask: no mask lets attention use its fused,
        # memory-efficient kernels (faster on CPU at thousands of tokens, same outputs).
        padding = None if bool(mask.all()) else ~mask
        x = self.encoder(x, src_key_padding_mask=padding)
        x = self.norm(x)
        logits = self.head(torch.cat([x, flat], dim=-1))
        return logits.reshape(b, length, self.cfg.num_classes, p, p)


@dataclass
class Normalisation:
    """Pixel normalisation applied to tokens: (x / 255 - mean) / std per channel."""

    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)

    def apply(self, tokens: Tensor) -> Tensor:
        mean = torch.tensor(self.mean, dtype=tokens.dtype, device=tokens.device)
        std = torch.tensor(self.std, dtype=tokens.dtype, device=tokens.device)
        return (tokens / 255.0 - mean) / std


@dataclass
class ModelCard:
    """What a checkpoint says about itself beyond the architecture (saved in its JSON)."""

    class_names: list[str] = field(default_factory=lambda: ["Background", "Gland"])
    class_colors: list[list[int]] = field(default_factory=lambda: [[0, 0, 0], [0, 160, 0]])
    mpp: float = 0.62
    normalisation: dict[str, list[float]] = field(
        default_factory=lambda: {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    )
    patching: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)


#: Each segmentation architecture by the ``arch`` its checkpoint records: (config class, network).
#: A checkpoint without ``arch`` was written before there was a choice: a token model.
ARCHITECTURES: dict[str, tuple[type, type[nn.Module]]] = {
    SegmenterConfig.arch: (SegmenterConfig, TokenSegmenter),
    UNetConfig.arch: (UNetConfig, UNet),
}


def checkpoint_arch(config: Path, doc: dict[str, Any]) -> str:
    """The architecture a checkpoint's JSON names, or one :class:`CheckpointError` line."""
    arch = doc.get("arch", SegmenterConfig.arch)
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{config}: unknown segmentation architecture {arch!r} "
                              f"(this wsi-amr reads {', '.join(ARCHITECTURES)})")
    return str(arch)


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """Rebuild the model (the class its ``arch`` names) and its card from a checkpoint, refusing
    anything that does not match with one :class:`CheckpointError` line."""
    weights, config = checkpoint_paths(path)
    doc = read_config(path)
    config_cls, model_cls = ARCHITECTURES[checkpoint_arch(config, doc)]
    check_weights(path, doc)
    cfg, model = build_model(config, doc, config_cls, model_cls)
    load_weights(weights, model, FORMAT, "segmentation model", device)
    card_fields = {f.name for f in fields(ModelCard)}
    card = ModelCard(**{k: v for k, v in doc.items() if k in card_fields})
    if len(card.class_names) != cfg.num_classes or len(card.class_colors) != cfg.num_classes:
        raise CheckpointError(f"{config}: {cfg.num_classes} classes but {len(card.class_names)} names / {len(card.class_colors)} colours")
    return model.to(device).eval(), card
