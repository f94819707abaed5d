"""``wsi-amr train``: training commands (a Typer sub-app the main CLI mounts as ``train``).

A thin layer: options are parsed and checked here, everything else is
:func:`wsi_amr.segmentation.train.train_segmenter`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from wsi_amr.cli.options import (
    APP_SETTINGS,
    Blur,
    Debug,
    Device,
    EdgeDownsample,
    MaxSize,
    MinSize,
    RunOut,
    SlideMpp,
    SplitThreshold,
    TokenSize,
    command_line,
    fail_usage,
    quadtree_params,
)
from wsi_amr.ips.config import IPSConfig
from wsi_amr.params import flag_text
from wsi_amr.quadtree import QuadtreeParams
from wsi_amr.segmentation.config import ARCHITECTURES, SegmenterConfig, UNetConfig

train_app = typer.Typer(
    name="train",
    help="Train models on your own labelled data.\n\n"
    "Example: wsi-amr train segment --images 'glas/images/train_*.png' --masks glas/masks -o runs/glas",
    **APP_SETTINGS,
)



@train_app.callback()
def _train_group() -> None:
    """Train models on your own labelled data."""


_QT = QuadtreeParams()
_ARCH = SegmenterConfig()
_UNET_WIDTHS = ",".join(str(w) for w in UNetConfig.widths)

# -- options of the training commands (those shared with other commands are in cli/options.py) ---
Images = Annotated[list[str], typer.Option("--images", help="Training images: files, folders or globs "
                                           "(quote globs: 'glas/images/train_*.png'). Repeatable.",
                                           metavar="PATH|GLOB", show_default=False)]
Masks = Annotated[str | None, typer.Option("--masks", help="Folder of label masks named like the images "
                                              "(train_1.png or train_1_mask.png); values 0..K-1, or 0/255 for "
                                              "binary. Default: a 'masks' folder beside the images' folder.")]
ValImages = Annotated[list[str], typer.Option("--val-images", help="Validation images instead of --val-fraction: "
                                              "files, folders or globs, or name patterns of training images "
                                              "('train_8*'). Repeatable.", metavar="PATH|GLOB",
                                              show_default=False)]
Slides = Annotated[list[str], typer.Option("--slides", help="Training slides, each with one --annotations "
                                           "file (same order). Repeatable.", metavar="SLIDE",
                                           show_default=False)]
Annotations = Annotated[list[str], typer.Option("--annotations", help="QuPath GeoJSON annotations of each "
                                                "--slides slide (level-0 px). Repeatable.",
                                                metavar="GEOJSON", show_default=False)]
Pairs = Annotated[str | None, typer.Option("--pairs", help="CSV of slides and annotations: header "
                                              "'slide,annotations', paths relative to the CSV.")]
Classes = Annotated[str, typer.Option("--classes", help="Class names, background first; label id = position. "
                                      "For GeoJSON these are QuPath class names.")]
Colors = Annotated[str | None, typer.Option("--colors", help="Class colours for QuPath, one per class: "
                                               "'#000000,#00a000' or '0,0,0;0,160,0'.")]
Unannotated = Annotated[str, typer.Option("--unannotated", help="Slide pixels outside every annotation: "
                                          "background (class 0) or ignore (no loss).")]
Mpp = Annotated[float | None, typer.Option("--mpp", help="Working µm/px. Images are taken to be at it "
                                              "\\[default: 0.62, GlaS]; slides are read at it \\[default: the "
                                              "first slide's own].")]
ImageMpp = Annotated[float | None, typer.Option("--image-mpp", help="µm/px of the --images when it is not "
                                                  "--mpp: they and their masks are resampled to --mpp (GlaS at "
                                                  "half resolution: --image-mpp 0.62 --mpp 1.24) \\[default: "
                                                  "--mpp].", show_default=False)]
Arch = Annotated[str, typer.Option("--arch", help="Architecture: token (the adaptive-patch transformer on "
                                   "quadtree leaves) or unet (a U-Net on every pixel, the CNN baseline).")]
Widths = Annotated[str, typer.Option("--widths", help="U-Net channels per level, comma-separated, one level "
                                     "each (windows are padded to a multiple of 2^levels px).")]
Bottleneck = Annotated[int | None, typer.Option("--bottleneck", help="U-Net bottleneck channels "
                                                   "\\[default: 4 x the last --widths].", show_default=False)]
Patching = Annotated[str, typer.Option("--patching", help="adaptive (quadtree) or uniform (every leaf at "
                                       "--min-size): same model, same code.")]
Crop = Annotated[int, typer.Option("--crop", help="Training crop side, working px (smaller images are padded).")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Crops per optimisation step.")]
Steps = Annotated[int, typer.Option("--steps", help="Optimisation steps: the training budget (compare "
                                    "patching modes at equal steps).")]
Lr = Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW; linear warm-up, cosine decay).")]
WeightDecay = Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay (not on biases, norms).")]
Warmup = Annotated[int | None, typer.Option("--warmup", help="Warm-up steps \\[default: 5% of --steps].")]
DiceWeight = Annotated[float, typer.Option("--dice-weight", help="Weight of the soft Dice loss added to "
                                           "cross-entropy (0: cross-entropy only).")]
Jitter = Annotated[float, typer.Option("--jitter", help="Colour jitter strength: brightness, contrast, "
                                       "saturation +-j, hue +-j x 90 degrees (0: off).")]
Glass = Annotated[float, typer.Option("--glass", help="Share of crops given a margin of empty slide glass "
                                     "labelled background, so the model learns tissue edges (0: off).")]
Mosaic = Annotated[float, typer.Option("--mosaic", help="Share of crops joined along a random seam to a crop "
                                       "of another image (0: off).")]
ValFraction = Annotated[float, typer.Option("--val-fraction", help="Share of images (or slides) held out for "
                                            "validation, chosen by --seed.")]
ValEvery = Annotated[int, typer.Option("--val-every", help="Validate (and save OUT/last) every this many steps.")]
LogEvery = Annotated[int, typer.Option("--log-every", help="Write a metrics.jsonl line every this many steps.")]
Width = Annotated[int, typer.Option("--width", help="Transformer width (--arch token).")]
Depth = Annotated[int, typer.Option("--depth", help="Transformer layers (--arch token).")]
Heads = Annotated[int, typer.Option("--heads", help="Attention heads, dividing --width (--arch token).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for Python, numpy and torch: same seed, same run on CPU.")]
Threads = Annotated[int | None, typer.Option("--threads", help="CPU threads for torch \\[default: torch's].")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from OUT/last-state.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Start again in an --out that holds a run.")]


def parse_widths(text: str) -> tuple[int, ...]:
    """'8,16,32,64' -> (8, 16, 32, 64); ValueError unless every part is a whole number."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"{text!r} is not whole numbers separated by commas, e.g. 8,16,32,64")
    return tuple(int(p) for p in parts)


def parse_colors(text: str) -> list[list[int]]:
    """'#000000,#00a000' or '0,0,0;0,160,0' -> [[0, 0, 0], [0, 160, 0]]; ValueError otherwise."""
    if "#" in text:
        out = []
        for part in text.split(","):
            m = re.fullmatch(r"\s*#([0-9a-fA-F]{6})\s*", part)
            if not m:
                raise ValueError(f"{part.strip()!r} is not a #rrggbb colour")
            h = m.group(1)
            out.append([int(h[i:i + 2], 16) for i in (0, 2, 4)])
        return out
    out = []
    for part in text.split(";"):
        values = [v.strip() for v in part.split(",")]
        if len(values) != 3 or not all(v.isdigit() and int(v) <= 255 for v in values):
            raise ValueError(f"{part.strip()!r} is not r,g,b with values 0..255")
        out.append([int(v) for v in values])
    return out


class _TrainProgress:
    """A rich progress bar on stderr; draws only on a terminal."""

    def __init__(self, total: int, start: int = 0) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not console.is_terminal,
        )
        self._task = self._progress.add_task("train", total=total, completed=start, info="")
        self._progress.start()

    def __call__(self, step: int, total: int, info: dict[str, Any]) -> None:
        text = f"loss {info['loss']:.4f}"
        if info.get("val") is not None:
            text += f" {VAL_LABELS.get(info.get('val_name', ''), 'val')} {info['val']:.4f}"
        self._progress.update(self._task, completed=step, total=total, info=text)

    def close(self) -> None:
        self._progress.stop()


VAL_LABELS = {"val_foreground_dice": "val Dice", "val_auc": "val AUC", "val_balanced_accuracy": "val bal. acc."}


def _run_training(train: Callable[[Callable[[int, int, dict[str, Any]], None]], dict[str, Any]], out: Path,
                  describe: Callable[[dict[str, Any]], str], debug: bool) -> None:
    """Run ``train(progress)`` with a progress bar; report its result, or turn what stopped it into
    one line and an exit status (2 bad options, 1 bad data or a bug, 130 Ctrl-C). Under torchrun
    only rank 0 reports (every process meets the same bad options and data); the others say only
    what is theirs alone, an unexpected error, prefixed by their rank."""
    from wsi_amr.errors import TrainingError, TrainingInterrupted

    rank = os.environ.get("RANK", "0")
    main = rank in ("", "0")

    def say(line: str) -> None:
        if main:
            typer.echo(line, err=True)

    bar: _TrainProgress | None = None

    def progress(step: int, total: int, info: dict[str, Any]) -> None:
        nonlocal bar
        if bar is None:
            bar = _TrainProgress(total, step - 1)
        bar(step, total, info)

    try:
        result = train(progress)
    except TrainingInterrupted as exc:
        say(f"interrupted at step {exc.step}: saved {exc.out / 'last.safetensors'}; continue with the "
            "same command plus --resume")
        raise typer.Exit(130) from None
    except TrainingError as exc:
        say(f"error: {flag_text(exc)}")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        saved = (out / "last-state.json").exists()
        say("interrupted" + (f"; {out / 'last.safetensors'} holds the last saved step: continue with the "
                             "same command plus --resume" if saved else " before any step was saved"))
        raise typer.Exit(130) from None
    except Exception as exc:
        if debug:
            raise
        where = "" if main else f" (rank {rank})"
        typer.echo(f"error{where}: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True)
        raise typer.Exit(1) from None
    finally:
        if bar is not None:
            bar.close()
    for warning in result.get("warnings", []):
        say(f"warning: {warning}")
    say(describe(result))


@train_app.command("segment")
def segment(
    out: RunOut,
    images: Images = [],  # noqa: B006 - Typer reads list defaults, never mutates them
    masks: Masks = None,
    val_images: ValImages = [],  # noqa: B006
    slides: Slides = [],  # noqa: B006
    annotations: Annotations = [],  # noqa: B006
    pairs: Pairs = None,
    classes: Classes = "Background,Gland",
    colors: Colors = None,
    unannotated: Unannotated = "background",
    mpp: Mpp = None,
    image_mpp: ImageMpp = None,
    slide_mpp: SlideMpp = None,
    arch: Arch = "token",
    widths: Widths = _UNET_WIDTHS,
    bottleneck: Bottleneck = None,
    patching: Patching = "adaptive",
    token_size: TokenSize = 8,
    min_size: MinSize = _QT.min_size,
    max_size: MaxSize = _QT.max_size,
    split_threshold: SplitThreshold = _QT.split_threshold,
    blur: Blur = _QT.blur_kernel,
    edge_downsample: EdgeDownsample = _QT.edge_downsample,
    crop: Crop = 256,
    batch_size: BatchSize = 8,
    steps: Steps = 1000,
    lr: Lr = 1e-3,
    weight_decay: WeightDecay = 0.05,
    warmup: Warmup = None,
    dice_weight: DiceWeight = 0.5,
    jitter: Jitter = 0.1,
    glass: Glass = 0.25,
    mosaic: Mosaic = 0.1,
    val_fraction: ValFraction = 0.15,
    val_every: ValEvery = 100,
    log_every: LogEvery = 10,
    width: Width = _ARCH.width,
    depth: Depth = _ARCH.depth,
    heads: Heads = _ARCH.heads,
    seed: Seed = 0,
    device: Device = "auto",
    threads: Threads = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    debug: Debug = False,
) -> None:
    """Train a segmentation model (the token transformer, or --arch unet) on images + masks or slides + QuPath annotations.

    Writes OUT/best.safetensors + best.json (best validation Dice), OUT/last.* and
    last-state.* (for --resume) and OUT/metrics.jsonl. Ctrl-C saves OUT/last and exits 130.

    Example: wsi-amr train segment --images 'glas/images/train_*.png' --masks glas/masks -o runs/glas --steps 2000

    Example: wsi-amr train segment --slides a.svs --annotations a.geojson --classes Background,Tumor -o runs/t

    Example: wsi-amr train segment --arch unet --images 'glas/images/train_*.png' --image-mpp 0.62 --mpp 1.24 -o runs/unet
    """
    from wsi_amr.segmentation.config import TrainConfig
    from wsi_amr.segmentation.train import describe_result, train_segmenter

    class_names = [c.strip() for c in classes.split(",")]
    color_list = None
    if colors is not None:
        try:
            color_list = parse_colors(colors)
        except ValueError as exc:
            fail_usage(f"--colors: {exc}")
    if arch not in ARCHITECTURES:
        fail_usage(f"--arch must be {' or '.join(ARCHITECTURES)}, not {arch!r}")
    try:
        width_list = parse_widths(widths)
    except ValueError as exc:
        fail_usage(f"--widths: {exc}")
    params = quadtree_params(min_size=min_size, max_size=max_size, split_threshold=split_threshold,
                             blur_kernel=blur, canny_low=_QT.canny_low, canny_high=_QT.canny_high,
                             normalise=_QT.normalise, edge_downsample=edge_downsample)
    cfg = TrainConfig(
        out=out, images=list(images), masks=masks, val_images=list(val_images), slides=list(slides),
        annotations=list(annotations), pairs=pairs, classes=class_names, colors=color_list,
        unannotated=unannotated, mpp=mpp, image_mpp=image_mpp, slide_mpp=slide_mpp, arch=arch, widths=width_list,
        bottleneck=bottleneck, patching=patching, token_size=token_size,
        quadtree=params, crop=crop, batch_size=batch_size, steps=steps, lr=lr, weight_decay=weight_decay,
        warmup=warmup, dice_weight=dice_weight, jitter=jitter, glass=glass, mosaic=mosaic,
        val_fraction=val_fraction, val_every=val_every,
        log_every=log_every, width=width, depth=depth, heads=heads, seed=seed, device=device, threads=threads,
        resume=resume, overwrite=overwrite, command_line=command_line(),
    )
    _run_training(lambda progress: train_segmenter(cfg, progress=progress), out, describe_result, debug)


# -- train classify ------------------------------------------------------------------------------
_IPS = IPSConfig()
Labels = Annotated[Path, typer.Argument(help="CSV with a header 'slide,label': slide paths (relative to the CSV), "
                                        "images (.png/.jpg: one bag each) or, with --features, slide names.",
                                        show_default=False)]
Features = Annotated[Path | None, typer.Option("--features", help="Folder of pre-extracted feature files, "
                                                  "<slide stem>.h5 with features (N, D) and coords (N, 2), as "
                                                  "CLAM and TRIDENT write them.", show_default=False)]
Encoder = Annotated[Path | None, typer.Option("--encoder", help="A TorchScript patch encoder (frozen): takes "
                                                 "(N, 3, H, W) float32 RGB pixels 0-255, H = W = --patch-size, "
                                                 "returns (N, D). Default: the built-in small CNN, trained from "
                                                 "scratch.", show_default=False)]
ClassOrder = Annotated[str | None, typer.Option("--classes", help="Class names in order (comma-separated); "
                                                   "labels outside them are an error \\[default: the sorted labels].",
                                                   show_default=False)]
PatchSize = Annotated[int, typer.Option("--patch-size", help="Patch side in px at --mpp (slides) or in image px "
                                        "(images).")]
PatchMpp = Annotated[float, typer.Option("--mpp", help="µm/px slides are read at (images are used as they are).")]
MinTissue = Annotated[float, typer.Option("--min-tissue", help="Keep slide patches with at least this tissue "
                                          "fraction (0-1).")]
Memory = Annotated[int | None, typer.Option("--memory", "-M", help=f"M: patches kept per slide, the only ones "
                                               f"trained with gradients \\[default: {_IPS.memory}].",
                                               show_default=False)]
Chunk = Annotated[int | None, typer.Option("--chunk", "-I", help=f"I: patches scored per streaming step "
                                              f"\\[default: {_IPS.chunk}].", show_default=False)]
EmbedDim = Annotated[int | None, typer.Option("--embed-dim", help=f"Embedding width of the built-in CNN "
                                                 f"\\[default: {_IPS.embed_dim}]; feature files and encoders set "
                                                 "their own.", show_default=False)]
AttnWidth = Annotated[int | None, typer.Option("--width", help=f"Attention width \\[default: {_IPS.width}].",
                                                  show_default=False)]
AttnHeads = Annotated[int | None, typer.Option("--heads", help=f"Attention heads, dividing --width "
                                                  f"\\[default: {_IPS.heads}].", show_default=False)]
AttnDropout = Annotated[float | None, typer.Option("--dropout", help=f"Dropout on the attention weights and "
                                                     f"in the head while training \\[default: {_IPS.dropout}].",
                                                     show_default=False)]
BagBatch = Annotated[int, typer.Option("--batch-size", "-b", help="Slides per optimisation step (gradients "
                                       "accumulated).")]
Augment = Annotated[bool, typer.Option("--augment/--no-augment", help="Rotate (90-degree steps) and flip each "
                                       "slide's patches at random.")]
Balance = Annotated[bool, typer.Option("--balance/--no-balance", help="Draw each step's slides class by class, "
                                       "every class equally often (for unbalanced labels).")]
BagValFraction = Annotated[float, typer.Option("--val-fraction", help="Share of each class's slides held out for "
                                               "validation, chosen by --seed.")]


@train_app.command("classify")
def classify(
    labels: Labels,
    out: RunOut,
    features: Features = None,
    encoder: Encoder = None,
    classes: ClassOrder = None,
    patch_size: PatchSize = 256,
    mpp: PatchMpp = 0.5,
    min_tissue: MinTissue = 0.5,
    slide_mpp: SlideMpp = None,
    memory: Memory = None,
    chunk: Chunk = None,
    embed_dim: EmbedDim = None,
    width: AttnWidth = None,
    heads: AttnHeads = None,
    dropout: AttnDropout = None,
    steps: Steps = 500,
    batch_size: BagBatch = 8,
    lr: Lr = 1e-3,
    weight_decay: WeightDecay = 1e-4,
    warmup: Warmup = None,
    augment: Augment = True,
    balance: Balance = False,
    val_fraction: BagValFraction = 0.2,
    val_every: ValEvery = 50,
    log_every: LogEvery = 10,
    seed: Seed = 0,
    device: Device = "auto",
    threads: Threads = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    debug: Debug = False,
) -> None:
    """Train an IPS slide classifier (Iterative Patch Selection) from a labels CSV.

    Each step streams a slide's patches without gradients keeping the M it attends to most, then
    trains on those M only: memory stays at M + I patches however large the slide. Writes
    OUT/best.safetensors + best.json (best validation AUC, or balanced accuracy with more than two
    classes; ties go to the lower validation loss), OUT/last.*, last-state.* (for --resume) and
    OUT/metrics.jsonl.

    Example: wsi-amr train classify labels.csv -o runs/ips --patch-size 256 --mpp 0.5 -M 64 -I 256

    Example: wsi-amr train classify labels.csv --features trident/features -o runs/ips-features
    """
    from wsi_amr.ips.train import ClassifyTrainConfig, describe_result, train_classifier

    names = [c.strip() for c in classes.split(",")] if classes else None
    cfg = ClassifyTrainConfig(
        out=out, labels=labels, features=features, encoder=encoder, classes=names, patch_size=patch_size, mpp=mpp,
        min_tissue=min_tissue, slide_mpp=slide_mpp, memory=memory, chunk=chunk, embed_dim=embed_dim, width=width,
        heads=heads, dropout=dropout, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        warmup=warmup, augment=augment, balance=balance, val_fraction=val_fraction, val_every=val_every,
        log_every=log_every, seed=seed,
        device=device, threads=threads, resume=resume, overwrite=overwrite, command_line=command_line(),
    )
    _run_training(lambda progress: train_classifier(cfg, progress=progress), out, describe_result, debug)
