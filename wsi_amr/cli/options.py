"""Every option more than one command shares, defined once; the batch and tissue options as groups;
one way to fail with a usage error.

A group is a frozen dataclass whose fields carry their Typer option in ``Annotated``; a command
decorated with :func:`with_group` gains the group's options at the end of its signature and receives
them as one object (``batch: BatchArgs``). Library parameter errors name dataclass fields
(:class:`wsi_amr.params.ParameterError`); :func:`build` turns them into the command's flags.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import shlex
import sys
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from wsi_amr.params import ParameterError, flag_text
from wsi_amr.quadtree import QuadtreeParams
from wsi_amr.tissue import TissueParams


def fail(message: str, code: int) -> NoReturn:
    """Print ``error: message`` on stderr and exit with status ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def fail_usage(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with status 2 (a usage error)."""
    fail(message, 2)


def command_line() -> str:
    """This process's command line as a user could paste it (recorded in manifests and model cards)."""
    return " ".join(shlex.quote(a) for a in ["wsi-amr", *sys.argv[1:]])


P = TypeVar("P")


def build(cls: Callable[..., P], flags: Mapping[str, str] | None = None, /, **values: Any) -> P:
    """``cls(**values)``, or a usage error naming the flag of the field it refuses."""
    try:
        return cls(**values)
    except ParameterError as exc:
        fail_usage(flag_text(exc, flags))


# How every Typer app of the CLI behaves: help on no arguments, -h, plain one-line errors.
APP_SETTINGS: dict[str, Any] = {
    "no_args_is_help": True,
    "add_completion": False,
    "pretty_exceptions_enable": False,
    "context_settings": {"help_option_names": ["-h", "--help"]},
}


# -- shared options -------------------------------------------------------------------------------
Inputs = Annotated[
    list[str],
    typer.Argument(help="Slides, folders (searched recursively), globs, or - to read paths from stdin.",
                   show_default=False),
]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder; each slide gets OUT/<slide-stem>/.")]
RunOut = Annotated[Path, typer.Option("--out", "-o", help="Output folder: best.*, last.*, last-state.*, "
                                      "metrics.jsonl.")]
SlideMpp = Annotated[float | None, typer.Option("--slide-mpp", help="Level-0 µm/px for slides whose "
                                                   "scanner recorded none (overrides the file).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show full tracebacks for unexpected errors.")]
Device = Annotated[str, typer.Option("--device", help="Where the model runs: auto (a GPU when there is one), cpu, "
                                   "cuda, cuda:N or mps. One process per GPU: --device cuda:K in each (see --shard).")]
Mpp = Annotated[float | None, typer.Option("--mpp", help="Working resolution in µm/px \\[default: 0.5].")]
Magnification = Annotated[float | None, typer.Option("--magnification", "--mag",
                                                        help="Working resolution as objective magnification (e.g. 20).")]
NoTissue = Annotated[bool, typer.Option("--no-tissue", help="Use the whole slide, no tissue detection.")]
JsonLines = Annotated[bool, typer.Option("--json", help="Write one JSON line per slide on stdout.")]

# The adaptive quadtree, for every command that patches with it; defaults from QuadtreeParams.
MinSize = Annotated[int, typer.Option("--min-size", help="Smallest leaf, working px (a power of two); the "
                                      "uniform patch size.")]
MaxSize = Annotated[int, typer.Option("--max-size", help="Largest leaf (the root), working px (a power of two).")]
TokenSize = Annotated[int, typer.Option("--token-size", help="Side every leaf is resized to, px (a power of two).")]
SplitThreshold = Annotated[float, typer.Option("--split-threshold", help="Split a leaf while its edge pixels "
                                               "exceed this (a count, or per pixel of the leaf with --normalise).")]
Normalise = Annotated[bool, typer.Option("--normalise/--no-normalise", help="Divide a leaf's edge count by its "
                                         "area, so --split-threshold means the same at every size.")]
MaxTokens = Annotated[int | None, typer.Option("--max-tokens", help="Budget mode: split the most detailed leaf "
                                                  "until N leaves exist (instead of --split-threshold). One "
                                                  "budget for the whole slide, as one tree over it would give, "
                                                  "however many windows it is read in.", show_default=False)]
Blur = Annotated[int, typer.Option("--blur", help="Gaussian blur before Canny, px (odd; 0 or 1: none).")]
CannyLow = Annotated[float, typer.Option("--canny-low", help="Canny lower hysteresis threshold.")]
CannyHigh = Annotated[float, typer.Option("--canny-high", help="Canny upper hysteresis threshold.")]
EdgeDownsample = Annotated[int, typer.Option("--edge-downsample", help="Find edges at 1/N resolution (power of "
                                             "two, at most --min-size): blur and Canny cost 1/N^2; edge "
                                             "counts, and --split-threshold, are at that resolution.")]
QUADTREE_FLAGS = {"blur_kernel": "--blur"}


# -- option groups --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BatchArgs:
    """How a batch of slides runs and reports: the options every per-slide command takes."""

    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Slides processed in parallel (extra workers "
                                      "speed up a single slide's tile reads).")] = 1
    shard: Annotated[str | None, typer.Option(
        "--shard", metavar="I/N", help="Process only share I of N (counted from 0) of the sorted slide list, so that "
        "N runs split a batch: e.g. --shard 0/4 on one machine, 1/4 on another. Default: the Slurm job-array task "
        "(SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT) when set; --shard 0/1 processes every slide.",
        show_default=False)] = None
    scheduler: Annotated[str | None, typer.Option(
        "--scheduler", metavar="ADDRESS", help="Send slides to a Dask cluster (pip install \"wsi-amr[dask]\"): "
        "tcp://HOST:PORT of a running scheduler, its scheduler file, or local:N to start N worker processes here. "
        "Example: --scheduler tcp://10.0.0.5:8786", show_default=False)] = None
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo slides whose outputs are already "
                                            "complete.")] = False
    json_lines: JsonLines = False
    slide_mpp: SlideMpp = None
    debug: Debug = False


@dataclasses.dataclass(frozen=True)
class TissueArgs:
    """Tissue detection, for every command that finds tissue first."""

    modality: Annotated[str, typer.Option("--modality", help="brightfield (stained, white background), "
                                          "fluorescence (dark background), or auto.")] = "auto"
    tissue_threshold: Annotated[float | None, typer.Option(
        "--tissue-threshold", help="Fixed threshold (0-255) on saturation/brightness instead of Otsu.")] = None
    min_area: Annotated[float, typer.Option("--min-area", help="Drop tissue pieces smaller than this "
                                            "(µm²).")] = TissueParams.min_area_um2
    min_hole: Annotated[float, typer.Option("--min-hole", help="Fill holes in tissue smaller than this "
                                            "(µm²).")] = TissueParams.min_hole_um2

    def params(self) -> TissueParams:
        """The detection settings; a usage error naming the flag of a bad value."""
        return build(TissueParams, {"threshold": "--tissue-threshold", "min_area_um2": "--min-area",
                                    "min_hole_um2": "--min-hole"},
                     modality=self.modality, threshold=self.tissue_threshold, min_area_um2=self.min_area,
                     min_hole_um2=self.min_hole)


G = TypeVar("G")


def with_group(name: str, group: type[G]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the options of ``group`` (after its own) and pass them as ``name=group(...)``."""
    hints = typing.get_type_hints(group, include_extras=True)
    members = [f for f in dataclasses.fields(group)]  # type: ignore[arg-type]

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = typing.get_type_hints(command, include_extras=True)
        sig = inspect.signature(command)
        kept = [p.replace(annotation=own.get(p.name, p.annotation)) for p in sig.parameters.values() if p.name != name]
        added = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
                 for f in members]

        @functools.wraps(command)
        def run(**values: Any) -> None:
            args = group(**{f.name: values.pop(f.name) for f in members})
            command(**values, **{name: args})

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in kept] + added
        run.__signature__ = sig.replace(parameters=params, return_annotation=None)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        del run.__wrapped__  # Typer must read the new signature
        return run

    return decorate


def quadtree_params(**values: Any) -> QuadtreeParams:
    """:class:`QuadtreeParams` from option values; a usage error naming the flag of a bad one."""
    return build(QuadtreeParams, QUADTREE_FLAGS, **values)
