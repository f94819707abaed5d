"""Pick the torch device a command asked for (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""

from __future__ import annotations

import torch

from wsi_amr.params import naming


class DeviceError(ValueError):
    """The device asked for does not exist on this machine (one line naming it)."""


def resolve_device(name: str) -> torch.device:
    """A torch device from ``auto|cpu|cuda|cuda:N|mps``; DeviceError when absent."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise naming(DeviceError("device mps: Apple Metal (MPS) is not available here"), "device")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise naming(DeviceError(f"device {name}: no CUDA GPU is available (use cpu or auto)"), "device")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise naming(DeviceError(f"device {name}: there are {torch.cuda.device_count()} CUDA devices (0..)"), "device")
        return torch.device(name)
    raise naming(DeviceError(f"device must be auto, cpu, cuda, cuda:N or mps, not {name!r}"), "device")
