"""One slide's work as the batch runner sees it: the task, its result, the job's context."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

# Per-slide jobs by command name, as "module:function"; imported inside the worker so that the
# task that travels to another process is plain data.
JOBS: dict[str, str] = {
    "tissue": "wsi_amr.jobs.tissue:run",
    "tile": "wsi_amr.jobs.tile:run",
    "quadtree": "wsi_amr.jobs.quadtree:run",
    "segment": "wsi_amr.jobs.segment:run",
    "classify": "wsi_amr.jobs.classify:run",
}

MANIFEST = "manifest.json"
SUMMARY = "summary.csv"
SUMMARY_FIELDS = ["finished", "command", "slide", "stem", "status", "seconds", "message", "out_dir", "predicted",
                  "probabilities"]


class JobParams(Protocol):
    """A job's typed, frozen parameters (``TileParams``, ``SegmentParams``, ...): they travel to the
    worker as they are (they pickle) and into the manifest as :meth:`as_dict`."""

    def as_dict(self) -> dict[str, Any]: ...


P = TypeVar("P", bound=JobParams, covariant=True)


class InputError(Exception):
    """Bad input paths; one line for the user."""


@dataclass
class SlideTask:
    """Everything a worker needs to process one slide: plain data, so it pickles."""

    command: str
    slide: str
    out_dir: str
    params: JobParams
    slide_mpp: float | None = None
    overwrite: bool = False
    threads: int = 1
    debug: bool = False
    command_line: str = ""


@dataclass
class SlideResult:
    slide: str
    stem: str
    command: str
    status: str  # done | skipped | empty | failed | locked
    seconds: float = 0.0
    message: str = ""
    out_dir: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in ("done", "skipped")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JobContext(Generic[P]):
    """Handed to a per-slide job: where to write, with what parameters, and a progress hook."""

    slide_path: Path
    out_dir: Path
    params: P
    slide_mpp: float | None
    threads: int
    progress: Callable[[int, int], None] = lambda done, total: None
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


class EmptySlide(Exception):
    """The job finished and wrote its outputs, but the slide had nothing to work on (no tissue)."""

    def __init__(self, message: str, outputs: dict[str, str], stats: dict[str, Any] | None = None):
        super().__init__(message)
        self.outputs = outputs
        self.stats = stats or {}
