"""The ``wsi-amr`` command line: a thin layer that parses options and calls the library.

Options shared by several commands are defined once below and reused, so every subcommand spells
``--out``, ``--jobs``, ``--mpp`` the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from wsi_amr import __version__
from wsi_amr.cli.evaluate import evaluate
from wsi_amr.cli.options import (
    APP_SETTINGS,
    QUADTREE_FLAGS,
    BatchArgs,
    Blur,
    CannyHigh,
    CannyLow,
    Device,
    EdgeDownsample,
    Inputs,
    JsonLines,
    Magnification,
    MaxSize,
    MaxTokens,
    MinSize,
    Mpp,
    Normalise,
    NoTissue,
    Out,
    SlideMpp,
    SplitThreshold,
    TissueArgs,
    build,
    command_line,
    fail_usage,
    quadtree_params,
    with_group,
)
from wsi_amr.cli.train import train_app
from wsi_amr.labels import MaskRef
from wsi_amr.outputs import OutputFolderError, check_output_folder
from wsi_amr.params import flag_text
from wsi_amr.quadtree import QuadtreeJobParams, QuadtreeParams
from wsi_amr.run.inputs import resolve_inputs
from wsi_amr.run.progress import BatchProgress
from wsi_amr.run.runner import BatchOptions, append_summary, make_tasks, parse_shard, run_batch, shard_from_env
from wsi_amr.run.task import InputError, JobParams, SlideResult
from wsi_amr.slide import SlideError, open_slide
from wsi_amr.tiling import TileParams

app = typer.Typer(
    name="wsi-amr",
    help="Adaptive patching and Iterative Patch Selection for whole-slide images.\n\n"
    "Example: wsi-amr tile slides/ -o out --mpp 0.5 --size 256",
    **APP_SETTINGS,
)

WindowSize = Annotated[int, typer.Option("--window", help="Process the slide in windows of this many working px "
                                     "(a multiple of --max-size); bounds memory.")]

DEFAULT_OUT = Path("wsi-amr-out")
_QUADTREE_JOB = QuadtreeJobParams()


def run_slides(command: str, inputs: list[str], params: JobParams, *, out: Path, batch: BatchArgs) -> None:
    """Resolve inputs, run ``command`` on every slide of this run's shard (locally, or on the Dask
    cluster at ``scheduler``), report, and exit with the batch status."""
    jobs, scheduler, slide_mpp = batch.jobs, batch.scheduler, batch.slide_mpp
    if slide_mpp is not None and not slide_mpp > 0:
        fail_usage(f"--slide-mpp must be a positive number of µm/px, got {slide_mpp}")
    try:
        share = parse_shard(batch.shard) if batch.shard is not None else shard_from_env()
        if scheduler is not None:
            if jobs > 1:
                raise InputError("give --jobs (processes on this machine) or --scheduler (a Dask cluster), not both")
            from wsi_amr.run.cluster import check_scheduler

            check_scheduler(scheduler)
    except InputError as exc:
        fail_usage(flag_text(exc))
    slides, problems = resolve_inputs(inputs, exclude=out)
    for p in problems:
        typer.echo(f"error: {p}", err=True)
    if not slides:
        typer.echo("error: no slides to process", err=True)
        raise typer.Exit(2)
    try:
        check_output_folder(out)
    except OutputFolderError as exc:
        fail_usage(flag_text(exc))
    opts = BatchOptions(out=out, jobs=jobs, overwrite=batch.overwrite, slide_mpp=slide_mpp, debug=batch.debug,
                        command_line=command_line(), shard=share, scheduler=scheduler)
    tasks, clashes = make_tasks(command, slides, params, opts)
    label = command if share is None else f"{command} (shard {share[0]}/{share[1]} of {len(slides)} slides)"
    if not tasks and not clashes:
        typer.echo(f"wsi-amr {label}: no slides in this shard", err=True)
        raise typer.Exit(1 if problems else 0)

    def report(res: SlideResult) -> None:
        if batch.json_lines:
            sys.stdout.write(json.dumps(res.to_json(), default=str) + "\n")
            sys.stdout.flush()

    for res in clashes:
        report(res)
    try:
        results = run_batch(tasks, jobs=jobs, scheduler=scheduler, on_result=report,
                            progress_factory=lambda n: BatchProgress(command, n))
    except KeyboardInterrupt:
        typer.echo("interrupted: finished slides are kept; run the same command again to continue", err=True)
        raise typer.Exit(130) from None
    except InputError as exc:  # the scheduler could not be reached: nothing ran
        fail_usage(flag_text(exc))
    results = clashes + results
    append_summary(out, results)
    n_bad = _print_summary(label, results, problems, out)
    raise typer.Exit(1 if n_bad or problems else 0)


SUMMARY_SLIDES = 10  # up to this many finished slides get a line of their own


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _print_summary(command: str, results: list[SlideResult], problems: list[str], out: Path) -> int:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    bad = [r for r in results if not r.ok]
    for r in bad:
        label = {"empty": "warning", "locked": "busy"}.get(r.status, "failed")
        typer.echo(f"{label}: {r.message}", err=True)
    done = [r for r in results if r.status == "done"]
    for r in done:
        if r.message:
            typer.echo(f"warning: {r.message}", err=True)
    if len(done) <= SUMMARY_SLIDES:
        for r in done:
            stats = " ".join(f"{k}={_fmt(v)}" for k, v in r.stats.items() if isinstance(v, (int, float, str)))
            typer.echo(f"done: {r.stem} ({r.seconds:.1f}s) {stats}", err=True)
    parts = [f"{v} {k}" for k, v in sorted(counts.items())]
    if problems:
        parts.append(f"{len(problems)} bad input{'s' if len(problems) > 1 else ''}")
    typer.echo(f"wsi-amr {command}: {', '.join(parts)} -> {out}", err=True)
    return len(bad)


# -- commands -------------------------------------------------------------------------------------
@app.command()
def info(
    inputs: Inputs,
    json_out: JsonLines = False,
    slide_mpp: SlideMpp = None,
) -> None:
    """Show format, size, levels, mpp and associated images of slides.

    Example: wsi-amr info slide.svs --json
    """
    from rich.console import Console
    from rich.table import Table

    slides, problems = resolve_inputs(inputs)
    for p in problems:
        typer.echo(f"error: {p}", err=True)
    failed = 0
    console = Console(stderr=False, soft_wrap=True)
    for path in slides:
        try:
            with open_slide(path, slide_mpp=slide_mpp) as slide:
                meta = slide.info()
        except SlideError as exc:
            typer.echo(f"error: {flag_text(exc)}", err=True)
            failed += 1
            continue
        if json_out:
            sys.stdout.write(json.dumps(meta) + "\n")
            continue
        table = Table(title=str(path), show_header=False, title_justify="left")
        table.add_column("key", style="bold")
        table.add_column("value")
        for key in ("backend", "vendor", "width", "height", "level_count", "level_dimensions",
                    "downsamples", "mpp_x", "mpp_y", "objective_power", "bounds_offset", "associated_images"):
            table.add_row(key, str(meta[key]))
        console.print(table)
    if not slides:
        raise typer.Exit(2)
    raise typer.Exit(1 if failed or problems else 0)


@app.command()
@with_group("batch", BatchArgs)
@with_group("tissue", TissueArgs)
def tissue(
    inputs: Inputs,
    out: Out = DEFAULT_OUT,
    *,
    tissue: TissueArgs,
    batch: BatchArgs,
) -> None:
    """Detect tissue: OUT/<stem>/tissue.geojson (QuPath annotations) and tissue.png.

    Example: wsi-amr tissue slides/*.svs -o out
    """
    run_slides("tissue", inputs, tissue.params(), out=out, batch=batch)


@app.command()
@with_group("batch", BatchArgs)
@with_group("tissue", TissueArgs)
def tile(
    inputs: Inputs,
    out: Out = DEFAULT_OUT,
    mpp: Mpp = None,
    magnification: Magnification = None,
    size: Annotated[int, typer.Option("--size", min=1, help="Tile side in pixels at the working resolution.")] = 256,
    overlap: Annotated[int, typer.Option("--overlap", min=0, help="Overlap between neighbouring tiles, pixels.")] = 0,
    min_tissue: Annotated[float, typer.Option("--min-tissue", help="Keep tiles with at least this tissue "
                                              "fraction (0-1).")] = 0.5,
    no_tissue: Annotated[bool, typer.Option("--no-tissue", help="Tile the whole slide, no tissue detection.")] = False,
    save_images: Annotated[bool, typer.Option("--save-images", help="Also write every tile as an image "
                                              "in OUT/<stem>/tiles/<x>_<y>.<ext>.")] = False,
    image_format: Annotated[str, typer.Option("--image-format", help="jpeg (fast, small) or png (lossless).")] = "jpeg",
    quality: Annotated[int, typer.Option("--quality", min=1, max=100, help="JPEG quality.")] = 90,
    *,
    tissue: TissueArgs,
    batch: BatchArgs,
) -> None:
    """Uniform tiles over tissue: OUT/<stem>/tiles.h5 (CLAM/TRIDENT coords) and tiles.png.

    Example: wsi-amr tile slides/ -o out --mpp 0.5 --size 256 --save-images
    """
    params = build(TileParams, None, tissue=None if no_tissue else tissue.params(), mpp=mpp,
                   magnification=magnification, size=size, overlap=overlap, min_tissue=min_tissue,
                   save_images=save_images, image_format=image_format, quality=quality)
    run_slides("tile", inputs, params, out=out, batch=batch)


@app.command()
@with_group("batch", BatchArgs)
@with_group("tissue", TissueArgs)
def quadtree(
    inputs: Inputs,
    out: Out = DEFAULT_OUT,
    mpp: Mpp = None,
    magnification: Magnification = None,
    min_size: MinSize = QuadtreeParams.min_size,
    max_size: MaxSize = QuadtreeParams.max_size,
    token_size: Annotated[int, typer.Option("--token-size", help="Side every leaf is resized to, px (a power of "
                                            "two); used by the --mask round trip.")] = _QUADTREE_JOB.token_size,
    split_threshold: SplitThreshold = QuadtreeParams.split_threshold,
    normalise: Normalise = QuadtreeParams.normalise,
    max_tokens: MaxTokens = QuadtreeParams.max_tokens,
    blur: Blur = QuadtreeParams.blur_kernel,
    canny_low: CannyLow = QuadtreeParams.canny_low,
    canny_high: CannyHigh = QuadtreeParams.canny_high,
    edge_downsample: EdgeDownsample = QuadtreeParams.edge_downsample,
    window: WindowSize = _QUADTREE_JOB.window,
    mask: Annotated[Path | None, typer.Option(
        "--mask", help="Reference labels to check the leaves against: a label image (PNG/TIFF) of the "
        "slide's level-0 size or an integer downsample of it, or QuPath GeoJSON. Reports mask_dice, "
        "the Dice of the mask pushed through the tokens and back.", show_default=False)] = None,
    no_tissue: NoTissue = False,
    *,
    tissue: TissueArgs,
    batch: BatchArgs,
) -> None:
    """Adaptive quadtree patching of tissue: OUT/<stem>/quadtree.h5 (leaves) and quadtree.png.

    Leaves split where Canny finds edges: detailed tissue gets small leaves, flat areas large ones.

    Stats: leaves, uniform_tokens (uniform patching at --min-size), reduction, seconds per stage.

    The slide is read in --window windows, so memory does not grow with its size.

    Example: wsi-amr quadtree slides/ -o out --mpp 1.0 --max-tokens 4096
    """
    tree = quadtree_params(min_size=min_size, max_size=max_size, blur_kernel=blur, canny_low=canny_low,
                           canny_high=canny_high, split_threshold=split_threshold, normalise=normalise,
                           max_tokens=max_tokens, edge_downsample=edge_downsample)
    params = build(QuadtreeJobParams, QUADTREE_FLAGS, tree=tree, token_size=token_size, window=window, mpp=mpp,
                   magnification=magnification, tissue=None if no_tissue else tissue.params(),
                   mask=build(MaskRef.of, None, path=mask) if mask is not None else None)
    run_slides("quadtree", inputs, params, out=out, batch=batch)


BUNDLED_MODELS = Path(__file__).resolve().parents[1] / "models"


def bundled_models() -> list[Path]:
    """Checkpoints shipped inside the package (``wsi_amr/models/*.safetensors``), by name."""
    return sorted(BUNDLED_MODELS.glob("*.safetensors")) if BUNDLED_MODELS.is_dir() else []


def _list_models() -> None:
    from wsi_amr.checkpoint import read_config

    models = bundled_models()
    if not models:
        typer.echo("no model is bundled with this installation; train one with `wsi-amr train segment` and "
                   "pass it with --model")
        return
    for path in models:
        doc = read_config(path)
        card = doc
        training = doc.get("training", {})
        typer.echo(f"{path.stem}{'  (default)' if path == models[0] else ''}")
        typer.echo(f"  file: {path}")
        typer.echo(f"  classes: {', '.join(card.get('class_names', []))}; working mpp {card.get('mpp')}")
        data = training.get("data") or {}
        for key in ("description", "data", "data_licence", "command", "test_dice"):
            value = training.get(key)
            if key == "data" and isinstance(value, dict):
                sources = [*(data.get("images") or []), *(data.get("slides") or [])]
                value = (f"{' '.join(map(str, sources))}: {data.get('train_items')} for training, "
                         f"{len(data.get('val_names') or [])} for validation")
            if value:
                typer.echo(f"  {key.replace('_', ' ')}: {value}")


@app.command()
@with_group("batch", BatchArgs)
@with_group("tissue", TissueArgs)
def segment(
    inputs: Annotated[list[str] | None, typer.Argument(
        help="Slides, folders (searched recursively), globs, or - to read paths from stdin.",
        show_default=False)] = None,
    out: Out = DEFAULT_OUT,
    model: Annotated[Path | None, typer.Option(
        "--model", "-m", help="A checkpoint from `wsi-amr train segment` (NAME.safetensors with NAME.json "
        "beside it) \\[default: the bundled model, see --list-models].", show_default=False)] = None,
    list_models: Annotated[bool, typer.Option("--list-models", help="Show the bundled models and exit.")] = False,
    patching: Annotated[str | None, typer.Option(
        "--patching", help="adaptive or uniform \\[default: as the model was trained].", show_default=False)] = None,
    window: Annotated[int, typer.Option("--window", help="Window side, working px.")] = 2048,
    overlap: Annotated[int, typer.Option("--overlap", help="Overlap of neighbouring windows, working px "
                                         "(probabilities are blended across it).")] = 128,
    context: Annotated[int | None, typer.Option(
        "--context", help="Attention context, working px: the model attends within squares of this side "
        "\\[default: the model's training crop]; 0: the whole window.", show_default=False)] = None,
    shifts: Annotated[str | None, typer.Option(
        "--shifts", help="Offsets of the attention squares, working px, comma-separated: the model runs once "
        "per offset and the probabilities are averaged, so no object is seen only where a square's border "
        "cuts it; 0: one pass, 1.2-1.4x faster \\[default: 0 and half the square, e.g. 0,128].",
        show_default=False)] = None,
    simplify: Annotated[float, typer.Option("--simplify", help="Polygon simplification tolerance, µm "
                                            "(0: exact pixel outlines).")] = 0.5,
    min_object: Annotated[float, typer.Option("--min-object", help="Drop objects smaller than this, µm².")] = 50.0,
    object_type: Annotated[str, typer.Option("--object-type", help="QuPath object type: annotation "
                                             "(editable) or detection (faster with many objects).")] = "annotation",
    gzip: Annotated[bool, typer.Option("--gzip", help="Write <stem>.geojson.gz.")] = False,
    mask_tiff: Annotated[bool, typer.Option("--mask-tiff", help="Also write mask.tiff: the class of every "
                                            "pixel at the working mpp, a pyramidal label TIFF.")] = False,
    device: Device = "auto",
    *,
    tissue: TissueArgs,
    batch: BatchArgs,
) -> None:
    """Segment slides with a segmentation model: OUT/<stem>/<stem>.geojson (QuPath) and overlay.png.

    Windows at the model's mpp (those with tissue), an adaptive quadtree per window for a token model
    (a U-Net sees every pixel), the model, probabilities blended in the overlaps, polygons with holes
    in level-0 px, whole across windows.

    Example: wsi-amr segment slide.svs   (the bundled gland model; see --list-models)

    Example: wsi-amr segment slides/ -o out --model runs/glas/best.safetensors --object-type detection --mask-tiff
    """
    if list_models:
        _list_models()
        raise typer.Exit(0)
    if not inputs:
        fail_usage("give slides to segment (or --list-models)")
    if model is None:
        found = bundled_models()
        if not found:
            fail_usage("no bundled model in this installation; give --model (a checkpoint from "
                        "`wsi-amr train segment`)")
        model = found[0]
    from wsi_amr.checkpoint import CheckpointError, checkpoint_paths, read_config

    try:
        weights, config = checkpoint_paths(model)
        doc = read_config(model)
    except CheckpointError as exc:
        fail_usage(flag_text(exc))
    from wsi_amr.segmentation.config import SegmentParams
    from wsi_amr.segmentation.model import checkpoint_arch
    from wsi_amr.segmentation.predict import default_shifts, training_context

    try:
        arch = checkpoint_arch(config, doc)
    except CheckpointError as exc:
        fail_usage(flag_text(exc))
    token_only = [flag for flag, value in (("--patching", patching), ("--context", context), ("--shifts", shifts))
                  if value is not None]
    if arch != "token" and token_only:
        fail_usage(f"{', '.join(token_only)}: for token models; {weights.name} is a {arch} model (no leaves, no "
                   "attention squares)")
    flags = {"simplify_um": "--simplify", "min_area_um2": "--min-object"}
    params = build(SegmentParams, flags, model=str(weights.resolve()), model_sha256=doc.get("weights_sha256"),
                   tissue=tissue.params(), patching=patching, window=window, overlap=overlap, context=context,
                   simplify_um=simplify, min_area_um2=min_object, object_type=object_type, gzip=gzip,
                   mask_tiff=mask_tiff, device=device)
    _check_device(device)
    if arch == "token":
        square = context if context is not None else training_context(doc.get("training"))
        offsets = _parse_shifts(shifts, square) if shifts is not None else default_shifts(square)
        params = build(functools.partial(dataclasses.replace, params), flags, shifts=tuple(offsets))
    run_slides("segment", inputs, params, out=out, batch=batch)


def _parse_shifts(text: str, context: int | None) -> list[int]:
    """--shifts as a sorted list of distinct offsets; a usage error unless each is a whole number of px
    from 0 up to the attention square (which must exist for more than one)."""
    try:
        offsets = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        fail_usage(f"--shifts must be comma-separated whole numbers of px, got {text!r}")
    if not offsets or offsets[0] < 0:
        fail_usage(f"--shifts must be offsets of 0 px or more, got {text!r}")
    if offsets != [0] and context == 0:
        fail_usage("--shifts moves the attention squares; with --context 0 there are none")
    if context and offsets[-1] >= context:
        fail_usage(f"--shifts must be below the attention square's side (--context {context}), got {text!r}")
    return offsets


def _check_device(device: str) -> None:
    """A usage error unless ``device`` names a device this machine has."""
    from wsi_amr.devices import DeviceError, resolve_device

    try:
        resolve_device(device)
    except DeviceError as exc:
        fail_usage(flag_text(exc))


def _check_classifier(model: Path, encoder: Path | None, features: Path | None,
                      inputs: list[str]) -> tuple[str, str | None]:
    """Check the checkpoint and how its embeddings will be made before any slide is read; returns
    the weights' path and SHA-256. Every mismatch is a usage error naming both sides. Inputs that
    are all feature files (.h5) bring their own embeddings."""
    from wsi_amr.checkpoint import CheckpointError, checkpoint_paths, read_config
    from wsi_amr.ips.model import FORMAT, VERSION, load_ips
    from wsi_amr.ips.predict import ClassifierCard, EncoderError, TorchScriptEncoder

    try:
        weights, _ = checkpoint_paths(model)
        sha = read_config(model, FORMAT, VERSION, "IPS").get("weights_sha256")
        _, cfg, extra = load_ips(model)
        card = ClassifierCard.from_extra(extra, cfg, weights)
    except CheckpointError as exc:
        fail_usage(flag_text(exc))
    if features is not None and not features.is_dir():
        fail_usage(f"--features {features}: no such folder")
    if encoder is not None and features is not None:
        fail_usage("give --encoder (to encode slide patches) or --features (pre-extracted), not both")
    if cfg.encoder != "none" and (encoder is not None or features is not None):
        fail_usage(f"{weights.name} encodes patches with its own built-in CNN; --encoder and --features are for "
                    "models trained on embeddings")
    feature_inputs = bool(inputs) and all(i.lower().endswith(".h5") for i in inputs)
    if cfg.encoder == "none" and encoder is None and features is None and not feature_inputs:
        hint = (f" (it was trained with the encoder {card.encoder.get('file')})"
                if card.encoder.get("kind") == "torchscript" else "")
        fail_usage(f"{weights.name} takes embeddings: give --features DIR or --encoder FILE.pt{hint}")
    if encoder is not None:
        try:
            patch = card.require_patching(encoder)
            TorchScriptEncoder(encoder).check_width(patch, cfg.embed_dim, weights.name)
        except (EncoderError, ValueError) as exc:
            fail_usage(flag_text(exc))
    return str(weights.resolve()), sha


@app.command()
@with_group("batch", BatchArgs)
@with_group("tissue", TissueArgs)
def classify(
    inputs: Annotated[list[str] | None, typer.Argument(
        help="Slides, images (.png/.jpg), folders (searched recursively for slides), globs, or - to read paths "
        "from stdin. With --features they may be left out: every <stem>.h5 in the folder is classified.",
        show_default=False)] = None,
    model: Annotated[Path | None, typer.Option(
        "--model", "-m", help="An IPS checkpoint from `wsi-amr train classify` (NAME.safetensors with NAME.json "
        "beside it).", show_default=False)] = None,
    out: Out = DEFAULT_OUT,
    encoder: Annotated[Path | None, typer.Option(
        "--encoder", help="The TorchScript patch encoder of a model trained on its embeddings: (N, 3, H, W) "
        "float32 RGB 0-255, H = W = the model's patch size, to (N, D), D the model's embed_dim.",
        show_default=False)] = None,
    features: Annotated[Path | None, typer.Option(
        "--features", help="Folder of pre-extracted feature files, <slide stem>.h5 (features + coords, level-0 "
        "px), for a model trained on them.", show_default=False)] = None,
    patch_size: Annotated[float | None, typer.Option(
        "--patch-size", help="Side of each feature-file patch in level-0 px, for the heatmap and GeoJSON "
        "\\[default: the file's coords attributes: patch_size_level0, or patch_size x downsample].",
        show_default=False)] = None,
    memory: Annotated[int | None, typer.Option(
        "--memory", "-M", min=1, help="M: patches the prediction aggregates \\[default: the model's]; a slide with "
        "fewer uses them all, unpadded.", show_default=False)] = None,
    chunk: Annotated[int | None, typer.Option(
        "--chunk", "-I", min=1, help="I: patches read and scored at a time \\[default: the model's].",
        show_default=False)] = None,
    top: Annotated[int | None, typer.Option(
        "--top", min=1, help="Write only the K patches with the most attention to attention.geojson "
        "\\[default: every patch].", show_default=False)] = None,
    device: Device = "auto",
    *,
    tissue: TissueArgs,
    batch: BatchArgs,
) -> None:
    """Classify slides with an IPS model: OUT/<stem>/classification.json, heatmap.png, attention.geojson.

    Patches are streamed I at a time; the M the model attends to most give the class probabilities,
    and every patch's attention (normalised over the slide) is drawn over the thumbnail and written
    as QuPath detections. Memory holds M + I embeddings however large the slide.

    Example: wsi-amr classify slides/ -o out --model runs/ips/best.safetensors

    Example: wsi-amr classify -o out --model runs/ips-features/best.safetensors --features trident/features --top 500
    """
    from wsi_amr.checkpoint import file_sha256
    from wsi_amr.ips.config import ClassifyParams

    if model is None:
        fail_usage("give the model to classify with: --model runs/NAME/best.safetensors (from `wsi-amr train classify`)")
    weights, sha = _check_classifier(model, encoder, features, inputs or [])
    _check_device(device)
    if not inputs:
        if features is None:
            fail_usage("give slides to classify (or --features DIR to classify every feature file in it)")
        inputs = [str(p) for p in sorted(features.glob("*.h5"))] or [str(features / "*.h5")]
    params = build(ClassifyParams, None, model=weights, model_sha256=sha, tissue=tissue.params(),
                   encoder=str(encoder.resolve()) if encoder else None,
                   encoder_sha256=file_sha256(encoder) if encoder else None,
                   features=str(features.resolve()) if features else None, patch_size=patch_size,
                   memory=memory, chunk=chunk, top=top, device=device)
    run_slides("classify", inputs, params, out=out, batch=batch)


app.command()(evaluate)
app.add_typer(train_app, name="train")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"wsi-amr {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Adaptive patching and Iterative Patch Selection for whole-slide images."""


def main() -> None:
    app()

