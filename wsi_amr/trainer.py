from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wsi_amr.checkpoint import file_sha256
from wsi_amr.ddp import Group
from wsi_amr.devices import DeviceError, resolve_device
from wsi_amr.errors import TrainingDataError, TrainingError, TrainingInputError
from wsi_amr.outputs import OutputFolderError, atomic_path, check_output_folder, write_json_atomic, write_text_atomic
from wsi_amr.params import carry, naming

STATE_FORMAT = "wsi-amr-training-state"
STATE_VERSION = 1


def split_names(names: Sequence[str], fraction: float, seed: int) -> set[str]:
    """Names held out for validation: a share ``fraction`` of them (at least one when there are
    two or more), chosen by ``seed``; the same set for the same names and seed."""
    ordered = sorted(names)
    n = len(ordered)
    if fraction <= 0 or n < 2:
        return set()
    n_val = min(n - 1, max(1, int(round(fraction * n))))
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    return {ordered[i] for i in perm[:n_val].tolist()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def learning_rate(step: int, cfg: Any) -> float:
    """Learning rate for the step after ``step`` done: linear warm-up, then cosine to lr / 100
    (``cfg``: any run config with ``lr``, ``steps`` and ``warmup_steps``)."""
    warm = cfg.warmup_steps
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    floor = cfg.lr / 100
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(model: torch.nn.Module, cfg: Any) -> torch.optim.AdamW:
    """AdamW at ``cfg.lr``, ``cfg.weight_decay`` on weight matrices only."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # biases and norms
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


# ---------------------------------------------------------------------------------------------
# Training state (resume): safetensors + JSON, never pickle
# ---------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def save_training_state(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        rng: np.random.Generator, meta: dict[str, Any]) -> None:
    """``OUT/last-state.safetensors`` (weights, optimizer moments, torch RNG) and
    ``OUT/last-state.json`` (step, numpy/Python RNG, optimizer settings, config)."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for name, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    groups = [{k: _plain(v) for k, v in g.items()} for g in opt["param_groups"]]
    weights = out / "last-state.safetensors"
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp), metadata={"format": STATE_FORMAT})
    py_state = random.getstate()
    doc = {
        "format": STATE_FORMAT, "version": STATE_VERSION, **meta,
        "numpy_rng": rng.bit_generator.state,
        "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
        "optimizer_param_groups": groups,
        "tensors": weights.name, "tensors_sha256": file_sha256(weights),
    }
    write_json_atomic(out / "last-state.json", doc)


def load_training_state(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,  # noqa: C901 - one refusal per field of a state that does not match
                        rng: np.random.Generator, expect: dict[str, Any]) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote; returns its JSON. Refuses a state whose
    architecture, classes or patching differ from ``expect``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    doc_path, weights = out / "last-state.json", out / "last-state.safetensors"
    if not doc_path.exists():
        raise naming(TrainingInputError(f"resume: nothing to resume in {out} (no last-state.json); run without it"),
                     "resume")
    try:
        doc = json.loads(doc_path.read_text())
    except (OSError, ValueError) as exc:
        raise TrainingDataError(f"{doc_path}: not readable JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or doc.get("version") != STATE_VERSION:
        raise TrainingDataError(f"{doc_path}: not a wsi-amr training state (version {STATE_VERSION})")
    if not weights.exists() or file_sha256(weights) != doc.get("tensors_sha256"):
        raise naming(TrainingDataError(f"{weights}: missing or does not match {doc_path.name} (interrupted while saving?); "
                                "start again with overwrite"), "overwrite")
    for key, value in expect.items():
        if doc.get(key) != value:
            raise naming(TrainingInputError(f"resume: {out} was trained with {key} {doc.get(key)!r}, this command "
                                     f"gives {value!r}; use the same options, or overwrite to start again"), "resume", "overwrite")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise TrainingDataError(f"{weights}: not a readable safetensors file ({exc})") from None
    device = next(model.parameters()).device
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = doc["optimizer_param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for s in optimizer.state.values():  # moments live with their parameters; 'step' stays on the CPU
        for name, value in s.items():
            if isinstance(value, Tensor) and name != "step":
                s[name] = value.to(device)
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(64) if f"rng.cuda.{i}" in tensors]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    rng.bit_generator.state = doc["numpy_rng"]
    version, internal, gauss = doc["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return doc


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
ProgressFn = Callable[[int, int, dict[str, Any]], None]


def check_output(out: Path) -> None:
    """Create OUT and make sure it can be written to."""
    try:
        check_output_folder(out)
    except OutputFolderError as exc:
        raise carry(TrainingInputError(str(exc)), exc) from None


RUN_FILES = ("last-state.json", "last-state.safetensors", "last.json", "last.safetensors",
             "best.json", "best.safetensors", "metrics.jsonl")


def check_previous_run(cfg: Any) -> None:
    """Refuse an OUT that holds another run unless resuming it; on overwrite remove its files."""
    previous = [n for n in RUN_FILES if (cfg.out / n).exists()]
    if previous and not cfg.resume and not cfg.overwrite:
        raise naming(TrainingInputError(f"{cfg.out}: already holds a training run ({previous[0]}); continue it with "
                                 "resume, or start again with overwrite"), "resume", "overwrite")
    if cfg.overwrite:
        for name in previous:
            with contextlib.suppress(FileNotFoundError):
                (cfg.out / name).unlink()


def trim_metrics(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the state being resumed was saved)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue
    write_text_atomic(path, "".join(line + "\n" for line in keep))


@contextlib.contextmanager
def graceful_interrupt() -> Any:
    """The first Ctrl-C asks the loop to stop after the current step (so the saved state is a
    whole step); a second one interrupts at once."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def run_folder(cfg: Any) -> Iterator[tuple[torch.device, Group]]:
    """Hold a training run's output folder for the block; yield this process's device and its
    place among the training processes (:mod:`wsi_amr.ddp`; alone unless started by torchrun).

    ``cfg`` (any run config with ``out``, ``device``, ``threads``, ``resume``, ``overwrite``,
    ``batch_size``): the device must exist, OUT must be writable and not locked by another run,
    and hold no other run unless resuming (``overwrite`` clears it); torch uses ``threads`` inside
    the block. Under torchrun, rank 0 checks and holds OUT and every process stops on its error.
    """
    from wsi_amr.ddp import GroupError, group_from_env, process_device, process_group
    from wsi_amr.locks import slide_lock

    try:
        group = group_from_env()
        device = process_device(resolve_device(cfg.device), cfg.device, group)
    except (GroupError, DeviceError) as exc:
        raise carry(TrainingInputError(str(exc)), exc) from None
    if cfg.batch_size < group.world:
        raise naming(TrainingInputError(f"batch_size {cfg.batch_size} is the batch of the whole step, shared by "
                                 f"{group.world} processes: give at least {group.world}"), "batch_size")
    with process_group(group, device), contextlib.ExitStack() as stack:
        error: TrainingError | None = None
        if group.is_main:
            try:
                check_output(cfg.out)
                if not stack.enter_context(slide_lock(cfg.out)):
                    raise TrainingInputError(f"{cfg.out}: another training run is writing to this folder")
                check_previous_run(cfg)
            except TrainingError as exc:
                error = exc
        message = group.broadcast_error(None if error is None else str(error))
        if message is not None:
            raise error if error is not None else TrainingInputError(message)
        threads_before = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            yield device, group
        finally:
            torch.set_num_threads(threads_before)
