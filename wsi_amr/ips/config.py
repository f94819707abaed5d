"""IPS settings: the model architecture and selection sizes saved beside the weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from wsi_amr.params import from_fields, require
from wsi_amr.tissue import TissueParams

__all__ = ["ENCODERS", "IPSConfig"]


#: ``"none"``: the model takes pre-extracted embeddings (CLAM/TRIDENT ``features``);
#: ``"small-cnn"``: a :class:`SmallCNN` trained from scratch with the rest of the model.
ENCODERS = ("none", "small-cnn")


@dataclass(frozen=True)
class IPSConfig:
    """Architecture and selection sizes of :class:`IPSModel`; saved beside the weights.

    ``memory`` (M) and ``chunk`` (I) are not weights but belong to how the model was trained: the
    paper used M = I = 5000 on CAMELYON16 with frozen features; the defaults here suit a CPU or a
    from-scratch encoder, which must re-encode all M selected patches with gradients every step.
    """

    embed_dim: int = 512
    width: int = 128
    heads: int = 8
    num_classes: int = 2
    memory: int = 512
    chunk: int = 512
    queries: int = 1
    dropout: float = 0.0
    encoder: str = "none"
    cnn_channels: int = 32

    def validate(self) -> None:
        """Raise ValueError with one line naming the first bad value."""
        for name in ("embed_dim", "width", "heads", "num_classes", "queries", "cnn_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.memory, int) or isinstance(self.memory, bool) or self.memory < 1:
            raise ValueError(f"memory (M, patches kept) must be at least 1, got {self.memory!r}")
        if not isinstance(self.chunk, int) or isinstance(self.chunk, bool) or self.chunk < 1:
            raise ValueError(f"chunk (I, patches scored per step) must be at least 1, got {self.chunk!r}")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClassifyParams:
    """What ``wsi-amr classify`` does to each slide: the IPS checkpoint (``model``, with its hash),
    how embeddings are made (``encoder``, a TorchScript file, or ``features``, a folder of
    ``<stem>.h5``; neither: the model's own CNN), the feature patches' side in level-0 px
    (``patch_size``, None: from the file), ``memory`` M and ``chunk`` I (None: the model's), and
    ``top`` K patches written to attention.geojson (None: all)."""

    model: str
    model_sha256: str | None = None
    tissue: TissueParams = TissueParams()
    encoder: str | None = None
    encoder_sha256: str | None = None
    features: str | None = None
    patch_size: float | None = None
    memory: int | None = None
    chunk: int | None = None
    top: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        require(self.patch_size is None or self.patch_size > 0,
                f"patch_size must be a positive number of level-0 px, got {self.patch_size}", "patch_size")
        for name in ("memory", "chunk", "top"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"{name} must be at least 1, got {value}", name)
        require(self.encoder is None or self.features is None,
                "give encoder (to encode slide patches) or features (pre-extracted), not both", "encoder", "features")

    def as_dict(self) -> dict[str, Any]:
        own = {k: v for k, v in asdict(self).items() if k != "tissue"}
        return {"tissue": self.tissue.as_dict(), "classify": own}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifyParams:
        return from_fields(cls, {**data["classify"], "tissue": TissueParams.from_dict(data["tissue"])})
