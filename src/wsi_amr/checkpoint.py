"""Model checkpoints: a safetensors file of weights and a JSON config beside it.

``NAME.safetensors`` holds the tensors (and the format name in its metadata); ``NAME.json`` holds
the architecture, class names and colours, working mpp, normalisation, patching parameters and
how the model was trained, plus the weights' SHA-256. Loading checks every one of these before a
model is built: a file that is not what it claims is refused with one line. Nothing is ever
unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from .outputs import atomic_path, write_json_atomic

FORMAT = "wsi-amr-segmenter"
VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be used; one line naming the file and the problem."""


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, config) paths for a checkpoint given by either file or their common stem."""
    p = Path(path)
    if p.is_dir():
        candidates = sorted(p.glob("*.safetensors"))
        if len(candidates) != 1:
            raise CheckpointError(f"{p}: expected one .safetensors checkpoint in the folder, found {len(candidates)}")
        p = candidates[0]
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(path: str | Path, model: Any, card: Any) -> tuple[Path, Path]:
    """Write ``model`` (a :class:`~wsi_amr.segmentation.TokenSegmenter`) and ``card`` atomically."""
    from safetensors.torch import save_file

    weights, config = checkpoint_paths(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": model.cfg.as_dict(),
        **asdict(card),
        "weights": weights.name,
        "weights_sha256": file_sha256(weights),
    }
    write_json_atomic(config, doc)
    return weights, config


def read_config(path: str | Path) -> dict[str, Any]:
    """The checkpoint's JSON, checked for format and version."""
    weights, config = checkpoint_paths(path)
    if not config.exists():
        raise CheckpointError(f"{config}: missing (a checkpoint is NAME.safetensors plus NAME.json)")
    try:
        doc = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config}: not readable JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{config}: not a wsi-amr segmentation checkpoint (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{config}: checkpoint version {doc.get('version')!r}; this wsi-amr reads version {VERSION}")
    return doc


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """Rebuild the model and its card from a checkpoint, refusing anything that does not match."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .segmentation import ModelCard, SegmenterConfig, TokenSegmenter

    weights, config = checkpoint_paths(path)
    doc = read_config(path)
    if not weights.exists():
        raise CheckpointError(f"{weights}: missing weights for {config.name}")
    if doc.get("weights_sha256") and file_sha256(weights) != doc["weights_sha256"]:
        raise CheckpointError(f"{weights}: contents do not match the checksum in {config.name} (truncated or replaced?)")
    arch_fields = {f.name for f in fields(SegmenterConfig)}
    arch = doc.get("architecture")
    if not isinstance(arch, dict) or set(arch) - arch_fields:
        raise CheckpointError(f"{config}: unknown architecture fields {sorted(set(arch or {}) - arch_fields)}")
    try:
        cfg = SegmenterConfig(**arch)
        model = TokenSegmenter(cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config}: invalid architecture ({exc})") from exc
    try:
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(weights), device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{weights}: safetensors file is not a wsi-amr segmentation model")
    expected = model.state_dict()
    missing, extra = set(expected) - set(state), set(state) - set(expected)
    if missing or extra:
        raise CheckpointError(f"{weights}: weights do not fit the architecture (missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{weights}: {key} has shape {tuple(state[key].shape)}, architecture needs {tuple(tensor.shape)}")
    model.load_state_dict(state)
    card_fields = {f.name for f in fields(ModelCard)}
    card = ModelCard(**{k: v for k, v in doc.items() if k in card_fields})
    if len(card.class_names) != cfg.num_classes or len(card.class_colors) != cfg.num_classes:
        raise CheckpointError(f"{config}: {cfg.num_classes} classes but {len(card.class_names)} names / {len(card.class_colors)} colours")
    return model.to(device).eval(), card
