from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from wsi_amr.outputs import atomic_path, write_json_atomic

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
    """Write a segmentation ``model`` (any of :data:`wsi_amr.segmentation.model.ARCHITECTURES`)
    and ``card`` atomically; the JSON's ``arch`` names the architecture (``model.cfg.arch``)."""
    return save_model(path, model, FORMAT, VERSION, {"arch": model.cfg.arch, **asdict(card)})


def save_model(path: str | Path, model: Any, fmt: str, version: int, fields_: dict[str, Any]) -> tuple[Path, Path]:
    """``NAME.safetensors`` (the model's tensors, ``fmt`` in the metadata) and ``NAME.json``
    (format, version, the model's ``cfg`` as its architecture, ``fields_``, the weights' name and
    SHA-256), each written atomically. Returns both paths."""
    from safetensors.torch import save_file

    weights, config = checkpoint_paths(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": fmt, "version": str(version)})
    doc = {
        "format": fmt,
        "version": version,
        "architecture": model.cfg.as_dict(),
        **fields_,
        "weights": weights.name,
        "weights_sha256": file_sha256(weights),
    }
    write_json_atomic(config, doc)
    return weights, config


def read_config(path: str | Path, fmt: str = FORMAT, version: int = VERSION,
                kind: str = "segmentation") -> dict[str, Any]:
    """The checkpoint's JSON, checked for format (``fmt``, a wsi-amr ``kind`` checkpoint) and version."""
    weights, config = checkpoint_paths(path)
    if not config.exists():
        raise CheckpointError(f"{config}: missing (a checkpoint is NAME.safetensors plus NAME.json)")
    try:
        doc = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config}: not readable JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise CheckpointError(f"{config}: not a wsi-amr {kind} checkpoint (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != version:
        raise CheckpointError(f"{config}: {kind} checkpoint version {doc.get('version')!r}; this wsi-amr reads version {version}")
    return doc


def check_weights(path: str | Path, doc: dict[str, Any]) -> Path:
    """The checkpoint's weights file: present, and matching the SHA-256 its JSON records."""
    weights, config = checkpoint_paths(path)
    if not weights.exists():
        raise CheckpointError(f"{weights}: missing weights for {config.name}")
    if doc.get("weights_sha256") and file_sha256(weights) != doc["weights_sha256"]:
        raise CheckpointError(f"{weights}: contents do not match the checksum in {config.name} (truncated or replaced?)")
    return weights


def build_model(config: Path, doc: dict[str, Any], config_cls: Any, model_cls: Any) -> tuple[Any, Any]:
    """``(cfg, model)`` from the JSON's ``architecture``: every field known to ``config_cls`` and
    accepted by ``model_cls``, or one :class:`CheckpointError` line naming ``config``."""
    known = {f.name for f in fields(config_cls)}
    arch = doc.get("architecture")
    if not isinstance(arch, dict) or set(arch) - known:
        unknown = sorted(set(arch) - known) if isinstance(arch, dict) else arch
        raise CheckpointError(f"{config}: unknown architecture fields {unknown}")
    try:
        cfg = config_cls(**arch)
        return cfg, model_cls(cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config}: invalid architecture ({exc})") from exc


def load_weights(weights: Path, model: Any, fmt: str, kind: str, device: Any = "cpu") -> None:
    """Load a safetensors file into ``model`` after checking it: readable, written for ``fmt``
    (its metadata), and exactly the model's tensors with the model's shapes; otherwise one
    :class:`CheckpointError` line naming the file (``kind`` says what was expected)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(weights), "pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from exc
    if meta.get("format") != fmt:
        raise CheckpointError(f"{weights}: safetensors file is not a wsi-amr {kind}")
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise CheckpointError(f"{weights}: weights do not fit the architecture "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{weights}: {key} has shape {tuple(state[key].shape)}, architecture needs {tuple(tensor.shape)}")
    model.load_state_dict(state)
