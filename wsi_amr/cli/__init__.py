"""The ``wsi-amr`` command line: a thin layer that parses options and calls the library.

Options shared by several commands are defined once below and reused, so every subcommand spells
``--out``, ``--jobs``, ``--mpp`` the same way.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from wsi_amr import __version__
from wsi_amr.cli.evaluate import evaluate
from wsi_amr.cli.train import train_app
from wsi_amr.labels import MASK_SUFFIXES
from wsi_amr.outputs import OutputFolderError, check_output_folder
from wsi_amr.quadtree import QuadtreeError, QuadtreeParams, is_power_of_two
from wsi_amr.run.inputs import resolve_inputs
from wsi_amr.run.progress import BatchProgress
from wsi_amr.run.runner import BatchOptions, append_summary, make_tasks, parse_shard, run_batch, shard_from_env
from wsi_amr.run.task import InputError, SlideResult
from wsi_amr.slide import SlideError, open_slide
from wsi_amr.tissue import TissueParams

app = typer.Typer(
    name="wsi-amr",
    help="Adaptive patching and Iterative Patch Selection for whole-slide images.\n\n"
    "Example: wsi-amr tile slides/ -o out --mpp 0.5 --size 256",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# -- shared options ---------------------------------------------------------------------------
Inputs = Annotated[
    list[str],
    typer.Argument(help="Slides, folders (searched recursively), globs, or - to read paths from stdin.",
                   show_default=False),
]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder; each slide gets OUT/<slide-stem>/.")]
Jobs = Annotated[int, typer.Option("--jobs", "-j", min=1, help="Slides processed in parallel (extra workers "
                                   "speed up a single slide's tile reads).")]
Shard = Annotated[str | None, typer.Option(
    "--shard", metavar="I/N", help="Process only share I of N (counted from 0) of the sorted slide list, so that N "
    "runs split a batch: e.g. --shard 0/4 on one machine, 1/4 on another. Default: the Slurm job-array task "
    "(SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT) when set; --shard 0/1 processes every slide.",
    show_default=False)]
Scheduler = Annotated[str | None, typer.Option(
    "--scheduler", metavar="ADDRESS", help="Send slides to a Dask cluster (pip install \"wsi-amr[dask]\"): "
    "tcp://HOST:PORT of a running scheduler, its scheduler file, or local:N to start N worker processes here. "
    "Example: --scheduler tcp://10.0.0.5:8786", show_default=False)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Redo slides whose outputs are already complete.")]
JsonLines = Annotated[bool, typer.Option("--json", help="Write one JSON line per slide on stdout.")]
SlideMpp = Annotated[float | None, typer.Option("--slide-mpp", help="Level-0 µm/px for slides whose "
                                                   "scanner recorded none (overrides the file).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show full tracebacks for unexpected errors.")]
Device = Annotated[str, typer.Option("--device", help="Where the model runs: auto (a GPU when there is one), cpu, "
                                   "cuda, cuda:N or mps. One process per GPU: --device cuda:K in each (see --shard).")]
Mpp = Annotated[float | None, typer.Option("--mpp", help="Working resolution in µm/px \\[default: 0.5].")]
Magnification = Annotated[float | None, typer.Option("--magnification", "--mag",
                                                        help="Working resolution as objective magnification (e.g. 20).")]
Modality = Annotated[str, typer.Option("--modality", help="brightfield (stained, white background), "
                                       "fluorescence (dark background), or auto.")]
TissueThreshold = Annotated[float | None, typer.Option("--tissue-threshold", help="Fixed threshold (0-255) "
                                                          "on saturation/brightness instead of Otsu.")]
MinTissueArea = Annotated[float, typer.Option("--min-area", help="Drop tissue pieces smaller than this (µm²).")]
MinHoleArea = Annotated[float, typer.Option("--min-hole", help="Fill holes in tissue smaller than this (µm²).")]
NoTissue = Annotated[bool, typer.Option("--no-tissue", help="Use the whole slide, no tissue detection.")]
# Adaptive quadtree (shared by every command that patches with it); defaults from QuadtreeParams.
MinSize = Annotated[int, typer.Option("--min-size", help="Smallest leaf, working px (a power of two).")]
MaxSize = Annotated[int, typer.Option("--max-size", help="Largest leaf (the root), working px (a power of two).")]
TokenSize = Annotated[int, typer.Option("--token-size", help="Side every leaf is resized to, px (a power of "
                                        "two); used by the --mask round trip.")]
SplitThreshold = Annotated[float, typer.Option("--split-threshold", help="Split a leaf while its edge pixels "
                                               "exceed this (a count, or per pixel of the leaf with --normalise).")]
Normalise = Annotated[bool, typer.Option("--normalise/--no-normalise", help="Divide a leaf's edge count by its "
                                         "area, so --split-threshold means the same at every size.")]
MaxTokens = Annotated[int | None, typer.Option("--max-tokens", help="Budget mode: split the most detailed leaf "
                                                  "until N leaves exist (instead of --split-threshold). One "
                                                  "budget for the whole slide, as one tree over it would give, "
                                                  "however many windows it is read in.", show_default=False)]
BlurKernel = Annotated[int, typer.Option("--blur", help="Gaussian blur before Canny, px (odd; 0 or 1: none).")]
CannyLow = Annotated[float, typer.Option("--canny-low", help="Canny lower hysteresis threshold.")]
CannyHigh = Annotated[float, typer.Option("--canny-high", help="Canny upper hysteresis threshold.")]
EdgeDownsample = Annotated[int, typer.Option("--edge-downsample", help="Find edges at 1/N resolution (power of "
                                             "two, at most --min-size): blur and Canny cost 1/N^2; edge "
                                             "counts, and --split-threshold, are at that resolution.")]
WindowSize = Annotated[int, typer.Option("--window", help="Process the slide in windows of this many working px "
                                     "(a multiple of --max-size); bounds memory.")]

DEFAULT_OUT = Path("wsi-amr-out")
DEFAULT_TOKEN_SIZE = 8  # the APF paper's main setting
DEFAULT_WINDOW = 4096  # working px: ~50 MB of RGB per window, ~0.6 GB peak while its tree is built


def _fail_usage(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["wsi-amr", *sys.argv[1:]])


def _tissue_params(modality: str, threshold: float | None, min_area: float, min_hole: float) -> TissueParams:
    if modality not in ("auto", "brightfield", "fluorescence"):
        _fail_usage(f"--modality must be auto, brightfield or fluorescence, not {modality!r}")
    if threshold is not None and not 0 <= threshold <= 255:
        _fail_usage(f"--tissue-threshold must be between 0 and 255, got {threshold}")
    if min_area < 0 or min_hole < 0:
        _fail_usage("--min-area and --min-hole must not be negative")
    return TissueParams(modality=modality, threshold=threshold, min_area_um2=min_area, min_hole_um2=min_hole)  # type: ignore[arg-type]


def run_slides(
    command: str,
    inputs: list[str],
    params: dict[str, Any],
    *,
    out: Path,
    jobs: int,
    overwrite: bool,
    json_lines: bool,
    slide_mpp: float | None,
    debug: bool,
    shard: str | None = None,
    scheduler: str | None = None,
) -> None:
    """Resolve inputs, run ``command`` on every slide of this run's shard (locally, or on the Dask
    cluster at ``scheduler``), report, and exit with the batch status."""
    if slide_mpp is not None and not slide_mpp > 0:
        _fail_usage(f"--slide-mpp must be a positive number of µm/px, got {slide_mpp}")
    try:
        share = parse_shard(shard) if shard is not None else shard_from_env()
        if scheduler is not None:
            if jobs > 1:
                raise InputError("give --jobs (processes on this machine) or --scheduler (a Dask cluster), not both")
            from wsi_amr.run.cluster import check_scheduler

            check_scheduler(scheduler)
    except InputError as exc:
        _fail_usage(str(exc))
    slides, problems = resolve_inputs(inputs, exclude=out)
    for p in problems:
        typer.echo(f"error: {p}", err=True)
    if not slides:
        typer.echo("error: no slides to process", err=True)
        raise typer.Exit(2)
    try:
        check_output_folder(out)
    except OutputFolderError as exc:
        _fail_usage(str(exc))
    opts = BatchOptions(out=out, jobs=jobs, overwrite=overwrite, slide_mpp=slide_mpp, debug=debug,
                        command_line=_command_line(), shard=share, scheduler=scheduler)
    tasks, clashes = make_tasks(command, slides, params, opts)
    label = command if share is None else f"{command} (shard {share[0]}/{share[1]} of {len(slides)} slides)"
    if not tasks and not clashes:
        typer.echo(f"wsi-amr {label}: no slides in this shard", err=True)
        raise typer.Exit(1 if problems else 0)

    def report(res: SlideResult) -> None:
        if json_lines:
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
        _fail_usage(str(exc))
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
            typer.echo(f"error: {exc}", err=True)
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
def tissue(
    inputs: Inputs,
    out: Out = DEFAULT_OUT,
    modality: Modality = "auto",
    tissue_threshold: TissueThreshold = None,
    min_area: MinTissueArea = TissueParams.min_area_um2,
    min_hole: MinHoleArea = TissueParams.min_hole_um2,
    jobs: Jobs = 1,
    shard: Shard = None,
    scheduler: Scheduler = None,
    overwrite: Overwrite = False,
    json_lines: JsonLines = False,
    slide_mpp: SlideMpp = None,
    debug: Debug = False,
) -> None:
    """Detect tissue: OUT/<stem>/tissue.geojson (QuPath annotations) and tissue.png.

    Example: wsi-amr tissue slides/*.svs -o out
    """
    params = _tissue_params(modality, tissue_threshold, min_area, min_hole).as_dict()
    run_slides("tissue", inputs, params, out=out, jobs=jobs, overwrite=overwrite, json_lines=json_lines,
               slide_mpp=slide_mpp, debug=debug, shard=shard, scheduler=scheduler)


@app.command()
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
    modality: Modality = "auto",
    tissue_threshold: TissueThreshold = None,
    min_area: MinTissueArea = TissueParams.min_area_um2,
    min_hole: MinHoleArea = TissueParams.min_hole_um2,
    jobs: Jobs = 1,
    shard: Shard = None,
    scheduler: Scheduler = None,
    overwrite: Overwrite = False,
    json_lines: JsonLines = False,
    slide_mpp: SlideMpp = None,
    debug: Debug = False,
) -> None:
    """Uniform tiles over tissue: OUT/<stem>/tiles.h5 (CLAM/TRIDENT coords) and tiles.png.

    Example: wsi-amr tile slides/ -o out --mpp 0.5 --size 256 --save-images
    """
    if mpp is not None and magnification is not None:
        _fail_usage("give either --mpp or --magnification, not both")
    for name, value in (("--mpp", mpp), ("--magnification", magnification)):
        if value is not None and not value > 0:
            _fail_usage(f"{name} must be a positive number, got {value}")
    if mpp is None and magnification is None:
        mpp = 0.5
    if overlap >= size:
        _fail_usage(f"--overlap ({overlap}) must be smaller than --size ({size})")
    if not 0.0 <= min_tissue <= 1.0:
        _fail_usage(f"--min-tissue must be between 0 and 1, got {min_tissue}")
    if image_format not in ("png", "jpeg", "jpg"):
        _fail_usage(f"--image-format must be png or jpeg, not {image_format!r}")
    tissue_p = None if no_tissue else _tissue_params(modality, tissue_threshold, min_area, min_hole).as_dict()
    params = {
        "tissue": tissue_p,
        "tile": {
            "mpp": mpp, "magnification": magnification, "size": size, "overlap": overlap,
            "min_tissue": min_tissue, "save_images": save_images,
            "image_format": "jpeg" if image_format == "jpg" else image_format, "quality": quality,
        },
    }
    run_slides("tile", inputs, params, out=out, jobs=jobs, overwrite=overwrite, json_lines=json_lines,
               slide_mpp=slide_mpp, debug=debug, shard=shard, scheduler=scheduler)


def _working_resolution(mpp: float | None, magnification: float | None) -> tuple[float | None, float | None]:
    """(mpp, magnification) after checks; --mpp 0.5 when neither is given."""
    if mpp is not None and magnification is not None:
        _fail_usage("give either --mpp or --magnification, not both")
    for name, value in (("--mpp", mpp), ("--magnification", magnification)):
        if value is not None and not value > 0:
            _fail_usage(f"{name} must be a positive number, got {value}")
    return (0.5 if mpp is None and magnification is None else mpp), magnification


@app.command()
def quadtree(
    inputs: Inputs,
    out: Out = DEFAULT_OUT,
    mpp: Mpp = None,
    magnification: Magnification = None,
    min_size: MinSize = QuadtreeParams.min_size,
    max_size: MaxSize = QuadtreeParams.max_size,
    token_size: TokenSize = DEFAULT_TOKEN_SIZE,
    split_threshold: SplitThreshold = QuadtreeParams.split_threshold,
    normalise: Normalise = QuadtreeParams.normalise,
    max_tokens: MaxTokens = QuadtreeParams.max_tokens,
    blur: BlurKernel = QuadtreeParams.blur_kernel,
    canny_low: CannyLow = QuadtreeParams.canny_low,
    canny_high: CannyHigh = QuadtreeParams.canny_high,
    edge_downsample: EdgeDownsample = QuadtreeParams.edge_downsample,
    window: WindowSize = DEFAULT_WINDOW,
    mask: Annotated[Path | None, typer.Option(
        "--mask", help="Reference labels to check the leaves against: a label image (PNG/TIFF) of the "
        "slide's level-0 size or an integer downsample of it, or QuPath GeoJSON. Reports mask_dice, "
        "the Dice of the mask pushed through the tokens and back.", show_default=False)] = None,
    no_tissue: NoTissue = False,
    modality: Modality = "auto",
    tissue_threshold: TissueThreshold = None,
    min_area: MinTissueArea = TissueParams.min_area_um2,
    min_hole: MinHoleArea = TissueParams.min_hole_um2,
    jobs: Jobs = 1,
    shard: Shard = None,
    scheduler: Scheduler = None,
    overwrite: Overwrite = False,
    json_lines: JsonLines = False,
    slide_mpp: SlideMpp = None,
    debug: Debug = False,
) -> None:
    """Adaptive quadtree patching of tissue: OUT/<stem>/quadtree.h5 (leaves) and quadtree.png.

    Leaves split where Canny finds edges: detailed tissue gets small leaves, flat areas large ones.

    Stats: leaves, uniform_tokens (uniform patching at --min-size), reduction, seconds per stage.

    The slide is read in --window windows, so memory does not grow with its size.

    Example: wsi-amr quadtree slides/ -o out --mpp 1.0 --max-tokens 4096
    """
    mpp, magnification = _working_resolution(mpp, magnification)
    params = QuadtreeParams(min_size=min_size, max_size=max_size, blur_kernel=blur, canny_low=canny_low,
                            canny_high=canny_high, split_threshold=split_threshold, normalise=normalise,
                            max_tokens=max_tokens, edge_downsample=edge_downsample)
    try:
        params.validate()
    except QuadtreeError as exc:
        _fail_usage(str(exc))
    if not is_power_of_two(token_size):
        _fail_usage(f"--token-size must be a power of two, got {token_size}")
    if window < max_size or window % max_size:
        _fail_usage(f"--window ({window}) must be a positive multiple of --max-size ({max_size})")
    mask_p = None
    if mask is not None:
        if not mask.is_file():
            _fail_usage(f"--mask {mask}: no such file")
        if not mask.name.lower().endswith(MASK_SUFFIXES):
            _fail_usage(f"--mask {mask}: give a label image ({', '.join(MASK_SUFFIXES[:3])}) or QuPath GeoJSON "
                        "(.geojson)")
        st = mask.stat()
        # Identity, so that a changed mask makes the slide's outputs out of date.
        mask_p = {"path": str(mask.resolve()), "bytes": st.st_size, "mtime": round(st.st_mtime, 3)}
    tissue_p = None if no_tissue else _tissue_params(modality, tissue_threshold, min_area, min_hole).as_dict()
    run_params = {
        "tissue": tissue_p,
        "quadtree": {**params.as_dict(), "token_size": token_size, "window": window, "mpp": mpp,
                     "magnification": magnification},
        "mask": mask_p,
    }
    run_slides("quadtree", inputs, run_params, out=out, jobs=jobs, overwrite=overwrite, json_lines=json_lines,
               slide_mpp=slide_mpp, debug=debug, shard=shard, scheduler=scheduler)


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
    modality: Modality = "auto",
    tissue_threshold: TissueThreshold = None,
    min_area: MinTissueArea = TissueParams.min_area_um2,
    min_hole: MinHoleArea = TissueParams.min_hole_um2,
    jobs: Jobs = 1,
    shard: Shard = None,
    scheduler: Scheduler = None,
    overwrite: Overwrite = False,
    json_lines: JsonLines = False,
    slide_mpp: SlideMpp = None,
    debug: Debug = False,
) -> None:
    """Segment slides with a token segmentation model: OUT/<stem>/<stem>.geojson (QuPath) and overlay.png.

    Windows at the model's mpp, an adaptive quadtree per window, the model, probabilities blended in
    the overlaps, polygons with holes in level-0 px, whole across windows.

    Example: wsi-amr segment slide.svs   (the bundled gland model; see --list-models)

    Example: wsi-amr segment slides/ -o out --model runs/glas/best.safetensors --object-type detection --mask-tiff
    """
    if list_models:
        _list_models()
        raise typer.Exit(0)
    if not inputs:
        _fail_usage("give slides to segment (or --list-models)")
    if model is None:
        found = bundled_models()
        if not found:
            _fail_usage("no bundled model in this installation; give --model (a checkpoint from "
                        "`wsi-amr train segment`)")
        model = found[0]
    from wsi_amr.checkpoint import CheckpointError, checkpoint_paths, read_config

    try:
        weights, _ = checkpoint_paths(model)
        doc = read_config(model)
    except CheckpointError as exc:
        _fail_usage(str(exc))
    if patching not in (None, "adaptive", "uniform"):
        _fail_usage(f"--patching must be adaptive or uniform, got {patching!r}")
    if object_type not in ("annotation", "detection"):
        _fail_usage(f"--object-type must be annotation or detection, got {object_type!r}")
    if window < 64 or not 0 <= overlap <= window // 2:
        _fail_usage(f"--window must be at least 64 px and --overlap between 0 and half of it, got {window} and {overlap}")
    if context is not None and context < 0:
        _fail_usage(f"--context must be 0 or a positive number of px, got {context}")
    if simplify < 0 or min_object < 0:
        _fail_usage("--simplify and --min-object must not be negative")
    from wsi_amr.segmentation.predict import default_shifts, training_context

    square = context if context is not None else training_context(doc.get("training"))
    offsets = _parse_shifts(shifts, square) if shifts is not None else default_shifts(square)
    _check_device(device)
    params = {
        "tissue": _tissue_params(modality, tissue_threshold, min_area, min_hole).as_dict(),
        "segment": {"model": str(weights.resolve()), "model_sha256": doc.get("weights_sha256"), "patching": patching,
                    "window": window, "overlap": overlap, "context": context, "shifts": offsets, "simplify_um": simplify, "min_area_um2": min_object,
                    "object_type": object_type, "gzip": gzip, "mask_tiff": mask_tiff, "device": device},
    }
    run_slides("segment", inputs, params, out=out, jobs=jobs, overwrite=overwrite, json_lines=json_lines,
               slide_mpp=slide_mpp, debug=debug, shard=shard, scheduler=scheduler)


def _parse_shifts(text: str, context: int | None) -> list[int]:
    """--shifts as a sorted list of distinct offsets; a usage error unless each is a whole number of px
    from 0 up to the attention square (which must exist for more than one)."""
    try:
        offsets = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        _fail_usage(f"--shifts must be comma-separated whole numbers of px, got {text!r}")
    if not offsets or offsets[0] < 0:
        _fail_usage(f"--shifts must be offsets of 0 px or more, got {text!r}")
    if offsets != [0] and context == 0:
        _fail_usage("--shifts moves the attention squares; with --context 0 there are none")
    if context and offsets[-1] >= context:
        _fail_usage(f"--shifts must be below the attention square's side (--context {context}), got {text!r}")
    return offsets


def _check_device(device: str) -> None:
    """A usage error unless ``device`` names a device this machine has."""
    from wsi_amr.devices import DeviceError, resolve_device

    try:
        resolve_device(device)
    except DeviceError as exc:
        _fail_usage(str(exc))


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
        _fail_usage(str(exc))
    if features is not None and not features.is_dir():
        _fail_usage(f"--features {features}: no such folder")
    if encoder is not None and features is not None:
        _fail_usage("give --encoder (to encode slide patches) or --features (pre-extracted), not both")
    if cfg.encoder != "none" and (encoder is not None or features is not None):
        _fail_usage(f"{weights.name} encodes patches with its own built-in CNN; --encoder and --features are for "
                    "models trained on embeddings")
    feature_inputs = bool(inputs) and all(i.lower().endswith(".h5") for i in inputs)
    if cfg.encoder == "none" and encoder is None and features is None and not feature_inputs:
        hint = (f" (it was trained with the encoder {card.encoder.get('file')})"
                if card.encoder.get("kind") == "torchscript" else "")
        _fail_usage(f"{weights.name} takes embeddings: give --features DIR or --encoder FILE.pt{hint}")
    if encoder is not None:
        try:
            patch = card.require_patching(encoder)
            TorchScriptEncoder(encoder).check_width(patch, cfg.embed_dim, weights.name)
        except (EncoderError, ValueError) as exc:
            _fail_usage(str(exc))
    return str(weights.resolve()), sha


@app.command()
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
    modality: Modality = "auto",
    tissue_threshold: TissueThreshold = None,
    min_area: MinTissueArea = TissueParams.min_area_um2,
    min_hole: MinHoleArea = TissueParams.min_hole_um2,
    jobs: Jobs = 1,
    shard: Shard = None,
    scheduler: Scheduler = None,
    overwrite: Overwrite = False,
    json_lines: JsonLines = False,
    slide_mpp: SlideMpp = None,
    debug: Debug = False,
) -> None:
    """Classify slides with an IPS model: OUT/<stem>/classification.json, heatmap.png, attention.geojson.

    Patches are streamed I at a time; the M the model attends to most give the class probabilities,
    and every patch's attention (normalised over the slide) is drawn over the thumbnail and written
    as QuPath detections. Memory holds M + I embeddings however large the slide.

    Example: wsi-amr classify slides/ -o out --model runs/ips/best.safetensors

    Example: wsi-amr classify -o out --model runs/ips-features/best.safetensors --features trident/features --top 500
    """
    from wsi_amr.checkpoint import file_sha256

    if model is None:
        _fail_usage("give the model to classify with: --model runs/NAME/best.safetensors (from `wsi-amr train classify`)")
    if patch_size is not None and not patch_size > 0:
        _fail_usage(f"--patch-size must be a positive number of level-0 px, got {patch_size}")
    weights, sha = _check_classifier(model, encoder, features, inputs or [])
    _check_device(device)
    if not inputs:
        if features is None:
            _fail_usage("give slides to classify (or --features DIR to classify every feature file in it)")
        inputs = [str(p) for p in sorted(features.glob("*.h5"))] or [str(features / "*.h5")]
    params = {
        "tissue": _tissue_params(modality, tissue_threshold, min_area, min_hole).as_dict(),
        "classify": {"model": weights, "model_sha256": sha,
                     "encoder": str(encoder.resolve()) if encoder else None,
                     "encoder_sha256": file_sha256(encoder) if encoder else None,
                     "features": str(features.resolve()) if features else None, "patch_size": patch_size,
                     "memory": memory, "chunk": chunk, "top": top, "device": device},
    }
    run_slides("classify", inputs, params, out=out, jobs=jobs, overwrite=overwrite, json_lines=json_lines,
               slide_mpp=slide_mpp, debug=debug, shard=shard, scheduler=scheduler)


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

