"""Training IPS slide classifiers (``wsi-amr train classify``): bags from a labels CSV, the paper's
step, validation, the best checkpoint, a metrics log and resume.

Bags are slides (patches on the tissue-filtered tile grid at ``mpp``), images (a covering grid of
patches; GlaS), or feature files (``--features DIR``: ``<stem>.h5`` per slide). Each step takes
``batch_size`` bags; per bag, the paper's recipe (:func:`~wsi_amr.ips.model.select_then_forward`):
stream the shuffled patches through the model in eval mode without gradients keeping the top M,
then run the model with gradients on those M only (the built-in CNN re-encodes their pixels, read
again; a TorchScript encoder is frozen and its embeddings are re-used; feature rows are re-used).
Gradients are accumulated over the bags of a step.

A seeded, stratified validation split (``val_fraction`` of each class) is scored every
``val_every`` steps as ``wsi-amr classify`` predicts (:func:`~wsi_amr.ips.predict.predict_bag`);
the best by AUC (two classes) or balanced accuracy (more), ties going to the lower validation
loss, is kept as ``OUT/best.*``. As for
``train segment``: ``OUT/last.*`` and ``OUT/last-state.*`` (resume; Ctrl-C saves them),
``OUT/metrics.jsonl``, safetensors + JSON only.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wsi_amr import __version__
from wsi_amr.checkpoint import file_sha256
from wsi_amr.ddp import Group
from wsi_amr.errors import TrainingDataError, TrainingInputError, TrainingInterrupted
from wsi_amr.ips.bags import BagError, LabelledBag, covering_grid, read_labels_csv
from wsi_amr.ips.model import IPSConfig, IPSModel, iter_chunks, save_ips, select_then_forward
from wsi_amr.ips.predict import (
    Bag,
    ClassifierCard,
    EncoderError,
    TorchScriptEncoder,
    is_feature_file,
    is_image_file,
    open_feature_bag,
    open_image_bag,
    opened_slide_bag,
    predict_bag,
    read_rgb,
    slide_patch_grid,
)
from wsi_amr.metrics import classification_scores
from wsi_amr.params import carry, naming
from wsi_amr.slide import MissingMppError, SlideError, open_slide
from wsi_amr.tissue import TissueParams
from wsi_amr.trainer import (
    ProgressFn,
    graceful_interrupt,
    learning_rate,
    load_training_state,
    make_optimizer,
    run_folder,
    save_training_state,
    seed_everything,
    split_names,
    trim_metrics,
)


@dataclass
class ClassifyTrainConfig:
    """Everything a ``train classify`` run needs; ``steps`` (of ``batch_size`` bags) is the budget."""

    out: Path
    labels: Path
    features: Path | None = None  # folder of <stem>.h5 feature files
    encoder: Path | None = None  # TorchScript patch encoder (frozen)
    classes: list[str] | None = None  # class order; default: the sorted labels
    patch_size: int = 256  # px at mpp (slides) or image px (images)
    mpp: float = 0.5
    min_tissue: float = 0.5
    slide_mpp: float | None = None
    memory: int | None = None  # M; default IPSConfig's
    chunk: int | None = None  # I
    embed_dim: int | None = None  # built-in CNN only
    width: int | None = None
    heads: int | None = None
    dropout: float | None = None  # on attention weights and in the head; default IPSConfig's
    steps: int = 500
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int | None = None
    augment: bool = True  # random 90-degree rotations and flips of each bag's patches
    balance: bool = False  # draw each step's bags class by class (every class equally often)
    val_fraction: float = 0.2
    val_every: int = 50
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    resume: bool = False
    overwrite: bool = False
    command_line: str = ""

    def __post_init__(self) -> None:
        self.out, self.labels = Path(self.out), Path(self.labels)
        self.features = Path(self.features) if self.features is not None else None
        self.encoder = Path(self.encoder) if self.encoder is not None else None

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.steps // 20)

    def validate(self) -> None:
        """Raise :class:`TrainingInputError` with one line for the first bad field, naming it."""
        def bad(message: str, *fields: str) -> TrainingInputError:
            return naming(TrainingInputError(message), *fields)

        if self.features is not None and self.encoder is not None:
            raise bad("give features (pre-extracted embeddings) or encoder (a patch encoder), not both",
                      "features", "encoder")
        if self.features is not None and not self.features.is_dir():
            raise bad(f"features {self.features}: no such folder", "features")
        if self.classes is not None and (len(set(self.classes)) != len(self.classes) or not all(self.classes)):
            raise bad(f"classes must be distinct non-empty names, got {','.join(self.classes)}", "classes")
        for name in ("patch_size", "steps", "batch_size", "val_every", "log_every", "memory", "chunk", "embed_dim",
                     "width", "heads", "threads"):
            count = getattr(self, name)
            if count is not None and count < 1:
                raise bad(f"{name} must be at least 1, got {count}", name)
        for name in ("mpp", "slide_mpp", "lr"):
            number = getattr(self, name)
            if number is not None and not (math.isfinite(number) and number > 0):
                raise bad(f"{name} must be a positive number, got {number}", name)
        if not 0 <= self.min_tissue <= 1:
            raise bad(f"min_tissue is a fraction (0-1), got {self.min_tissue}", "min_tissue")
        if self.weight_decay < 0:
            raise bad(f"weight_decay must not be negative, got {self.weight_decay}", "weight_decay")
        if self.warmup is not None and not 0 <= self.warmup < self.steps:
            raise bad(f"warmup must be between 0 and steps - 1, got {self.warmup}", "warmup", "steps")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise bad(f"dropout must be at least 0 and below 1, got {self.dropout}", "dropout")
        if not 0 <= self.val_fraction < 1:
            raise bad(f"val_fraction must be at least 0 and below 1, got {self.val_fraction}", "val_fraction")
        if self.resume and self.overwrite:
            raise bad("resume and overwrite contradict each other; give one", "resume", "overwrite")

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


# ---------------------------------------------------------------------------------------------
# Bags
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainingBag:
    """A labelled bag and how to read it: ``kind`` features, image or slide; a slide's patch grid
    (level-0 corners) is found once and kept in ``coords``."""

    name: str
    source: Path
    label: int
    kind: str
    coords: np.ndarray | None = None


@dataclass
class ClassifyData:
    train: list[TrainingBag]
    val: list[TrainingBag]
    classes: list[str]
    input: str  # "features" or "patches"
    feature_dim: int | None
    description: dict[str, Any] = field(default_factory=dict)


def draw_bags(rng: np.random.Generator, labels: np.ndarray, n: int, balance: bool) -> np.ndarray:
    """Indices of ``n`` training bags drawn with replacement: uniformly, or with ``balance`` a class
    first (each class present equally likely) and then one of its bags, so a minority class
    weighs in the loss as much as the majority (CLAM's weighted sampling does the same)."""
    if not balance:
        return rng.integers(len(labels), size=n)
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    which = rng.integers(len(classes), size=n)
    return np.array([members[c][rng.integers(len(members[c]))] for c in which], np.int64)


def stratified_split(bags: list[LabelledBag], fraction: float, seed: int) -> set[str]:
    """Names held out for validation: ``fraction`` of each class's bags (at least one from a class
    with two or more), chosen by ``seed``; the same set for the same bags and seed."""
    held: set[str] = set()
    for label in sorted({b.label for b in bags}):
        held |= split_names([b.name for b in bags if b.label == label], fraction, seed)
    return held


def _bag_kind(bag: LabelledBag, features: bool) -> str:
    if features or is_feature_file(bag.source):
        return "features"
    return "image" if is_image_file(bag.source) else "slide"


def load_classify_data(cfg: ClassifyTrainConfig) -> ClassifyData:
    """Read the labels, check every bag can be read (a slide's tissue grid is found here, once),
    split off validation. Raises TrainingInputError / TrainingDataError with one line."""
    try:
        labelled, classes = read_labels_csv(cfg.labels, cfg.classes, features=cfg.features)
    except BagError as exc:
        raise carry(TrainingInputError(str(exc)), exc) from None
    kinds = {b.name: _bag_kind(b, cfg.features is not None) for b in labelled}
    if "features" in kinds.values() and set(kinds.values()) != {"features"}:
        raise naming(TrainingInputError(f"{cfg.labels}: lists feature files and slides or images together; train on one "
                                 "kind (feature files with features DIR)"), "features")
    names = [b.name for b in labelled]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise TrainingInputError(f"{cfg.labels}: two entries are named {dup} (bags are named by file stem)")
    bags = [TrainingBag(b.name, b.source, b.label, kinds[b.name]) for b in labelled]
    dim = None
    tissue = TissueParams()
    from wsi_amr.tissue import detect_slide_tissue

    for bag in bags:
        try:
            if bag.kind == "features":
                with open_feature_bag(bag.source, dim) as fb:
                    dim = int(fb.rows.shape[1])
            elif bag.kind == "image":
                image = read_rgb(bag.source)
                covering_grid(image.shape[1], image.shape[0], cfg.patch_size)
            else:
                with open_slide(bag.source, slide_mpp=cfg.slide_mpp) as slide:
                    bag.coords, _ = slide_patch_grid(slide, cfg.patch_size, cfg.mpp,
                                                     detect_slide_tissue(slide, tissue), cfg.min_tissue)
                if len(bag.coords) == 0:
                    raise naming(TrainingDataError(f"{bag.source}: no {cfg.patch_size}-px patch at {cfg.mpp} µm/px has "
                                            f"tissue >= {cfg.min_tissue}; remove it from the labels or lower "
                                            "min_tissue"), "min_tissue")
        except MissingMppError as exc:
            raise carry(TrainingInputError(str(exc)), exc) from None
        except (BagError, SlideError) as exc:
            message = str(exc) if bag.source.name in str(exc) else f"{bag.source}: {exc}"
            raise TrainingDataError(message) from None
    held = stratified_split(labelled, cfg.val_fraction, cfg.seed)
    train = [b for b in bags if b.name not in held]
    val = [b for b in bags if b.name in held]
    counts = {c: sum(b.label == i for b in bags) for i, c in enumerate(classes)}
    description = {
        "labels": str(cfg.labels.resolve()), "labels_sha256": file_sha256(cfg.labels),
        "features": str(cfg.features.resolve()) if cfg.features else None,
        "kinds": sorted(set(kinds.values())), "bags": len(bags), "per_class": counts,
        "train_bags": len(train), "val_names": sorted(held),
    }
    kind = "features" if dim is not None else "patches"
    return ClassifyData(train, val, classes, kind, dim, description)


@contextlib.contextmanager
def open_bag(bag: TrainingBag, cfg: ClassifyTrainConfig, embed_dim: int | None) -> Iterator[Bag]:
    """The rows of a training bag, open for the block."""
    if bag.kind == "features":
        with open_feature_bag(bag.source, embed_dim) as fb:
            yield fb
    elif bag.kind == "image":
        yield open_image_bag(bag.source, cfg.patch_size)
    else:
        with opened_slide_bag(bag.source, cfg.patch_size, cfg.mpp, cfg.slide_mpp, bag.coords, None,
                              cfg.min_tissue) as sb:
            yield sb


def patch_transform(rng: np.random.Generator) -> Callable[[Tensor], Tensor]:
    """One random 90-degree rotation and flip, for every patch of a bag (N, 3, H, W)."""
    k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)

    def apply(patches: Tensor) -> Tensor:
        out = torch.rot90(patches, k, dims=(2, 3))
        return out.flip(3) if flip else out

    return apply


def bag_logits(model: IPSModel, bag: Bag, encoder: TorchScriptEncoder | None, rng: np.random.Generator,
               augment: bool) -> Tensor:
    """The training forward of one bag (1, K): shuffled streaming selection without gradients,
    then the M selected with gradients (:func:`~wsi_amr.ips.model.select_then_forward`)."""
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    chunks = iter_chunks(bag.rows, model.cfg.chunk, generator=generator)
    if bag.kind == "features":
        return select_then_forward(model, ((x.float(), i) for x, i in chunks))[0]
    transform = patch_transform(rng) if augment else (lambda p: p)
    if encoder is not None:
        return select_then_forward(model, ((encoder(transform(x)), i) for x, i in chunks))[0]

    def reread(idx: Tensor) -> Tensor:
        return transform(torch.from_numpy(bag.rows[idx.numpy()]))

    return select_then_forward(model, ((transform(x), i) for x, i in chunks), patches_fn=reread)[0]


def validate_bags(model: IPSModel, bags: list[TrainingBag], cfg: ClassifyTrainConfig,
                  encoder: TorchScriptEncoder | None, classes: list[str]) -> dict[str, Any]:
    """Scores of the validation bags, predicted as ``wsi-amr classify`` predicts them."""
    t0 = time.perf_counter()
    probs = []
    for bag in bags:
        with open_bag(bag, cfg, model.cfg.embed_dim) as rows:
            probs.append(predict_bag(model, rows.rows, encoder=encoder).probabilities)
    labels = np.array([b.label for b in bags])
    p = np.stack(probs)
    scores = classification_scores(labels, p, classes)
    loss = float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1.0))))
    return {"val_accuracy": scores.accuracy, "val_balanced_accuracy": scores.balanced_accuracy,
            "val_auc": scores.auc, "val_loss": loss, "val_bags": len(bags),
            "val_seconds": round(time.perf_counter() - t0, 3)}


def selection_value(val: dict[str, Any], num_classes: int) -> tuple[str, float]:
    """What picks the best checkpoint: AUC with two classes (balanced accuracy when the split
    lacks a class), balanced accuracy with more."""
    if num_classes == 2 and val["val_auc"] is not None:
        return "val_auc", float(val["val_auc"])
    return "val_balanced_accuracy", float(val["val_balanced_accuracy"])


def is_better(value: float, loss: float | None, best: float, best_loss: float) -> bool:
    """Whether a validation result beats the best so far: a higher metric, or the same metric at
    a lower validation loss. A few dozen validation slides soon put AUC at 1.0 and keep it there;
    without the tie-break the first checkpoint to get there would stay the best, however much
    later ones separate the classes more surely."""
    if value != best:
        return value > best
    return loss is not None and loss < best_loss


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def model_config(cfg: ClassifyTrainConfig, data: ClassifyData, encoder: TorchScriptEncoder | None) -> IPSConfig:
    """The architecture: embed_dim from the feature files or the encoder's output, else the CNN's."""
    arch: dict[str, Any] = {"num_classes": len(data.classes), "memory": cfg.memory, "chunk": cfg.chunk,
                            "width": cfg.width, "heads": cfg.heads, "dropout": cfg.dropout}
    if data.input == "features":
        arch.update(embed_dim=data.feature_dim, encoder="none")
    elif encoder is not None:
        arch.update(embed_dim=encoder.width(cfg.patch_size), encoder="none")
    else:
        arch.update(embed_dim=cfg.embed_dim, encoder="small-cnn")
    try:
        model_cfg = IPSConfig(**{k: v for k, v in arch.items() if v is not None})
        model_cfg.validate()
    except (TypeError, ValueError) as exc:
        raise TrainingInputError(f"model options: {exc}") from None
    return model_cfg


def train_classifier(cfg: ClassifyTrainConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train an IPS classifier as ``cfg`` says; returns ``{"best", "metric", "best_step", "steps",
    "validation", "warnings", "paths"}``.

    Writes ``OUT/best.*`` (best validation metric; the last model without a validation split),
    ``OUT/last.*``, ``OUT/last-state.*`` and ``OUT/metrics.jsonl``; ``progress(step, total,
    info)`` after every step. Raises :class:`~wsi_amr.errors.TrainingInputError` /
    :class:`~wsi_amr.errors.TrainingDataError` for unusable inputs and
    :class:`~wsi_amr.errors.TrainingInterrupted` after saving ``OUT/last`` on Ctrl-C.
    """
    cfg.validate()
    with run_folder(cfg) as (device, group):
        try:
            encoder = TorchScriptEncoder(cfg.encoder, device) if cfg.encoder is not None else None
            data = load_classify_data(cfg)
            model_cfg = model_config(cfg, data, encoder)
        except EncoderError as exc:
            raise carry(TrainingInputError(str(exc)), exc) from None
        try:
            return _train(cfg, data, model_cfg, encoder, device, group, progress)
        except (BagError, SlideError, EncoderError) as exc:
            raise carry(TrainingDataError(str(exc)), exc) from None


def _card(cfg: ClassifyTrainConfig, data: ClassifyData, encoder: TorchScriptEncoder | None,
          training: dict[str, Any]) -> ClassifierCard:
    if data.input == "features":
        enc: dict[str, Any] = {"kind": "features"}
    elif encoder is not None:
        enc = {"kind": "torchscript", "file": encoder.path.name, "sha256": encoder.sha256,
               "input": "(N, 3, H, W) float32 RGB 0-255"}
    else:
        enc = {"kind": "small-cnn"}
    patches = data.input == "patches"
    return ClassifierCard(class_names=list(data.classes), encoder=enc, patch_size=cfg.patch_size if patches else None,
                          mpp=cfg.mpp if patches else None, min_tissue=cfg.min_tissue, training=training)


def _train(cfg: ClassifyTrainConfig, data: ClassifyData, model_cfg: IPSConfig, encoder: TorchScriptEncoder | None,  # noqa: C901 - one training step loop: resume, schedule, DDP, validation and checkpoints read in order
           device: torch.device, group: Group, progress: ProgressFn | None) -> dict[str, Any]:
    out = cfg.out
    seed_everything(cfg.seed)
    model = IPSModel(model_cfg).to(device)
    group.broadcast_parameters(model)
    optimizer = make_optimizer(model, cfg)
    rng = np.random.default_rng(cfg.seed)
    train_labels = np.array([bag.label for bag in data.train])
    identity = {"architecture": model_cfg.as_dict(), "classes": list(data.classes), "input": data.input,
                "patch_size": cfg.patch_size, "mpp": cfg.mpp,
                "encoder_sha256": encoder.sha256 if encoder is not None else None}
    step, best, best_step, seconds_before = 0, -math.inf, 0, 0.0
    best_loss = math.inf  # validation loss at the best step: breaks ties of a saturated metric
    metric_name = "val_auc" if len(data.classes) == 2 else "val_balanced_accuracy"
    metrics = out / "metrics.jsonl"
    if cfg.resume:
        doc = load_training_state(out, model, optimizer, rng, identity)
        step, best_step = int(doc["step"]), int(doc["best_step"])
        best = float(doc["best"]) if doc.get("best") is not None else -math.inf
        best_loss = float(doc["best_loss"]) if doc.get("best_loss") is not None else math.inf
        metric_name = doc.get("metric", metric_name)
        seconds_before = float(doc.get("seconds", 0.0))
        if step >= cfg.steps:
            raise naming(TrainingInputError(f"resume: {out} has already done {step} steps; give a larger number of "
                                            "steps to go on"), "resume")
        if group.is_main:
            trim_metrics(metrics, step)
    has_val = bool(data.val)
    last_val: dict[str, Any] = {}
    t_start = time.perf_counter()

    def seconds() -> float:
        return round(seconds_before + time.perf_counter() - t_start, 3)

    def card() -> ClassifierCard:
        return _card(cfg, data, encoder, {
            "command": cfg.command_line, "wsi_amr_version": __version__, "data": data.description,
            "steps": step, "total_steps": cfg.steps, "seed": cfg.seed, "batch_size": cfg.batch_size,
            "lr": cfg.lr, "weight_decay": cfg.weight_decay, "augment": cfg.augment, "balance": cfg.balance,
            "selection_metric": metric_name, "best_value": best if best > -math.inf else None,
            "best_step": best_step if best > -math.inf else None,
        })

    saved_step = -1

    def save_last() -> None:
        nonlocal saved_step
        if saved_step == step or not group.is_main:
            return
        saved_step = step
        save_ips(out / "last", model, extra=card().as_extra())
        save_training_state(out, model, optimizer, rng, {
            "step": step, "best": best if best > -math.inf else None, "best_step": best_step, "metric": metric_name,
            "best_loss": best_loss if best_loss < math.inf else None, "seconds": seconds(), **identity,
            "config": cfg.to_json()})

    window = {"loss": 0.0, "n": 0, "t0": time.perf_counter()}
    model.train()
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(metrics, "a", encoding="utf-8")) if group.is_main else None
        interrupt = stack.enter_context(graceful_interrupt())

        def write_metric(row: dict[str, Any]) -> None:
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()

        try:
            while step < cfg.steps:
                if group.any(interrupt["stop"]):
                    raise KeyboardInterrupt
                lr = learning_rate(step, cfg)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                loss_value = 0.0
                # The step's bags and one generator per bag, drawn alike in every process; each
                # process takes its share of the bags.
                picks = draw_bags(rng, train_labels, cfg.batch_size, cfg.balance)
                seeds = rng.integers(2**62, size=cfg.batch_size)
                for j in group.share(cfg.batch_size):
                    bag = data.train[int(picks[j])]
                    with open_bag(bag, cfg, model_cfg.embed_dim) as rows:
                        logits = bag_logits(model, rows, encoder, np.random.default_rng(int(seeds[j])), cfg.augment)
                    loss = F.cross_entropy(logits, torch.tensor([bag.label], device=device)) / cfg.batch_size
                    loss.backward()
                    loss_value += loss.item()
                group.sum_gradients(model.parameters())
                loss_value = group.sum_values(loss_value)[0]
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                step += 1
                window["loss"] += loss_value
                window["n"] += 1
                if step % cfg.log_every == 0 or step == cfg.steps:
                    elapsed = time.perf_counter() - window["t0"]
                    write_metric({"event": "train", "step": step, "loss": window["loss"] / window["n"], "lr": lr,
                                  "bags_per_s": window["n"] * cfg.batch_size / max(elapsed, 1e-9),
                                  "seconds": seconds()})
                    window.update(loss=0.0, n=0, t0=time.perf_counter())
                if has_val and group.is_main and (step % cfg.val_every == 0 or step == cfg.steps):
                    last_val = validate_bags(model, data.val, cfg, encoder, data.classes)
                    model.train()
                    metric_name, value = selection_value(last_val, len(data.classes))
                    improved = is_better(value, last_val.get("val_loss"), best, best_loss)
                    if improved:
                        best, best_step = value, step
                        best_loss = last_val["val_loss"] if last_val.get("val_loss") is not None else math.inf
                        save_ips(out / "best", model, extra=card().as_extra())
                    write_metric({"event": "val", "step": step, **last_val, "metric": metric_name, "best": improved,
                                  "seconds": seconds()})
                    save_last()
                    window["t0"] = time.perf_counter()  # validation is not training time
                if progress is not None and group.is_main:
                    progress(step, cfg.steps, {"loss": loss_value, "lr": lr, "val": last_val.get(metric_name),
                                               "val_name": metric_name})
        except KeyboardInterrupt:
            save_last()
            raise TrainingInterrupted(step, out) from None
        save_last()
        if not has_val:
            best_step = step
            if group.is_main:
                save_ips(out / "best", model, extra=card().as_extra())
        group.barrier()  # every process returns once rank 0 has written the run
    warnings = [] if has_val else ["no validation bags (a validation fraction of 0, or too few bags per class): "
                                   "best.* is the last model"]
    return {
        "best": best if best > -math.inf else None, "metric": metric_name, "best_step": best_step, "steps": step,
        "validation": has_val, "warnings": warnings,
        "paths": {"best": str(out / "best.safetensors"), "last": str(out / "last.safetensors"),
                  "state": str(out / "last-state.safetensors"), "metrics": str(metrics)},
    }


def describe_result(result: dict[str, Any]) -> str:
    """One line summing up :func:`train_classifier`'s result."""
    if result["best"] is None:
        return f"trained {result['steps']} steps (no validation split) -> {result['paths']['best']}"
    name = {"val_auc": "AUC", "val_balanced_accuracy": "balanced accuracy"}.get(result["metric"], result["metric"])
    return (f"trained {result['steps']} steps; best validation {name} {result['best']:.4f} at step "
            f"{result['best_step']} -> {result['paths']['best']}")
