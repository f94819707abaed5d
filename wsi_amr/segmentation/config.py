from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from wsi_amr.errors import TrainingInputError
from wsi_amr.labels import IGNORE
from wsi_amr.params import from_fields, naming, require, require_one_of
from wsi_amr.quadtree import QuadtreeParams, is_power_of_two
from wsi_amr.tissue import TissueParams

#: Crop geometry is shifted by a random offset below this many working px, so the model learns
#: positions over a whole inference window (DESIGN 4.4: 4096^2 windows), not only 0..crop.
POSITION_RANGE = 4096
#: Longest token sequence :func:`predict_image` runs at once; a 1000 x 1000 image at 8 px leaves
#: (15,625 tokens) is one sequence.
MAX_SEQUENCE = 16384
#: Validation regions read from slides are at most this many working px a side.
MAX_VALIDATION_SIDE = 4096
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: A mask is found by the image's stem plus one of these (``train_1.png`` -> ``train_1_anno.bmp``).
MASK_SUFFIXES = ("", "_mask", "-mask", "_masks", "_anno", "_label", "_labels", "_gt")
PATCHING_MODES = ("adaptive", "uniform")
#: Segmentation architectures: the token transformer on quadtree leaves, and a U-Net on pixels.
ARCHITECTURES = ("token", "unet")
UNANNOTATED_MODES = ("background", "ignore")
#: Class colours used when none are given (RGB); background first.
DEFAULT_COLORS = [[0, 0, 0], [0, 160, 0], [200, 0, 0], [0, 90, 220], [230, 160, 0], [150, 0, 200],
                  [0, 190, 190], [240, 100, 170], [120, 80, 40], [128, 128, 128]]



@dataclass(frozen=True)
class SegmenterConfig:
    """Architecture of :class:`TokenSegmenter`; saved beside the weights, enough to rebuild it."""

    token_size: int = 8
    channels: int = 3
    num_classes: int = 2
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    position_frequencies: int = 12  # wavelengths 4 px .. 4 * 2**11 px
    size_frequencies: int = 4

    #: Recorded as the checkpoint's ``arch`` (a checkpoint without one is a token model).
    arch: ClassVar[str] = "token"

    def validate(self) -> None:  # noqa: C901 - one check per option, in the order --help lists them
        if self.token_size < 1 or self.token_size & (self.token_size - 1):
            raise ValueError(f"token_size must be a power of two, got {self.token_size}")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.num_classes < 2:
            raise ValueError("num_classes must be at least 2 (background and one class)")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of :class:`~wsi_amr.segmentation.unet.UNet`: one level per entry of ``widths``
    (two 3x3 convolutions with BatchNorm, then 2x2 max pooling), a ``bottleneck``-channel level at
    1 / 2**len(widths) of the input, and a decoder back up through the same widths."""

    arch: ClassVar[str] = "unet"

    channels: int = 3
    num_classes: int = 2
    widths: tuple[int, ...] = (8, 16, 32, 64)
    bottleneck: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(self.widths))  # a JSON list reads back as a tuple

    @property
    def multiple(self) -> int:
        """Input sides are padded up to a multiple of this (px): one halving per level."""
        return 2 ** len(self.widths)

    def validate(self) -> None:
        if not self.widths or any(not isinstance(w, int) or w < 1 for w in self.widths):
            raise ValueError(f"widths must be one or more positive channel counts, got {list(self.widths)}")
        if self.bottleneck < 1:
            raise ValueError(f"bottleneck must be at least 1 channel, got {self.bottleneck}")
        if self.num_classes < 2:
            raise ValueError("num_classes must be at least 2 (background and one class)")

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["widths"] = list(self.widths)
        return doc


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything a training run needs. Sizes in working px; ``steps`` is the training budget."""

    out: Path
    images: list[str] = field(default_factory=list)  # files, folders or globs
    masks: str | None = None  # folder of label masks; default: a "masks" folder beside the images
    val_images: list[str] = field(default_factory=list)  # files/folders/globs, or name patterns
    slides: list[str] = field(default_factory=list)
    annotations: list[str] = field(default_factory=list)  # one GeoJSON per slide, same order
    pairs: str | None = None  # CSV with columns slide,annotations
    classes: list[str] = field(default_factory=lambda: ["Background", "Gland"])
    colors: list[list[int]] | None = None
    unannotated: str = "background"  # slide pixels outside every annotation: class 0, or ignored
    mpp: float | None = None  # working µm/px: images are taken to be at it (default 0.62)
    image_mpp: float | None = None  # µm/px of the images when not the working mpp: resampled to it
    slide_mpp: float | None = None  # level-0 µm/px for slides that record none
    arch: str = "token"
    widths: tuple[int, ...] = UNetConfig.widths
    bottleneck: int | None = None  # default: 4 x the last of widths
    patching: str = "adaptive"
    token_size: int = 8
    quadtree: QuadtreeParams = field(default_factory=QuadtreeParams)
    crop: int = 256
    batch_size: int = 8
    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int | None = None  # default: 5% of steps
    dice_weight: float = 0.5
    jitter: float = 0.1
    glass: float = 0.25  # fraction of crops given a margin of empty glass (class 0)
    mosaic: float = 0.1  # fraction of crops joined to a crop of another image along a seam
    val_fraction: float = 0.15
    val_every: int = 100
    log_every: int = 10
    width: int = SegmenterConfig.width
    depth: int = SegmenterConfig.depth
    heads: int = SegmenterConfig.heads
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    resume: bool = False
    overwrite: bool = False
    command_line: str = ""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.widths = tuple(self.widths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.steps // 20)

    def model_config(self) -> SegmenterConfig | UNetConfig:
        """The architecture ``arch`` names, built from this run's options."""
        if self.arch == "unet":
            bottleneck = self.bottleneck if self.bottleneck is not None else 4 * self.widths[-1]
            return UNetConfig(num_classes=self.num_classes, widths=self.widths, bottleneck=bottleneck)
        return SegmenterConfig(token_size=self.token_size, num_classes=self.num_classes,
                               width=self.width, depth=self.depth, heads=self.heads)

    def crop_quadtree(self) -> QuadtreeParams:
        """The quadtree parameters used for training and recorded in the model card: leaves no
        larger than the crop (a root larger than the crop would be mostly padding and never split)."""
        fit = 1 << (max(1, self.crop).bit_length() - 1)
        if self.quadtree.max_size <= fit:
            return self.quadtree
        return replace(self.quadtree, max_size=max(fit, self.quadtree.min_size))

    def validate(self) -> None:  # noqa: C901 - one check per option, in the order --help lists them
        """Raise :class:`TrainingInputError` with one line for the first bad field, naming it."""
        def bad(message: str, *fields: str) -> TrainingInputError:
            return naming(TrainingInputError(message), *fields)

        if not self.images and not self.slides and not self.pairs:
            raise bad("no training data: give images (with masks) or slides with annotations (or pairs)",
                      "images", "masks", "slides", "annotations", "pairs")
        if len(self.slides) != len(self.annotations):
            raise bad(f"slides and annotations pair up in order: got {len(self.slides)} slide files "
                      f"and {len(self.annotations)} annotation files", "slides", "annotations")
        if len(self.classes) < 2:
            raise bad("classes needs at least two names (background first), e.g. Background,Gland", "classes")
        if len(set(self.classes)) != len(self.classes) or any(not c for c in self.classes):
            raise bad(f"classes must be distinct non-empty names, got {','.join(self.classes)}", "classes")
        if len(self.classes) > IGNORE:
            raise bad(f"classes: at most {IGNORE} names", "classes")
        if self.colors is not None and len(self.colors) != len(self.classes):
            raise bad(f"colors gives {len(self.colors)} colours for {len(self.classes)} classes", "colors")
        if self.unannotated not in UNANNOTATED_MODES:
            raise bad(f"unannotated must be background or ignore, not {self.unannotated!r}", "unannotated")
        if self.arch not in ARCHITECTURES:
            raise bad(f"arch must be {' or '.join(ARCHITECTURES)}, not {self.arch!r}", "arch")
        if not self.widths or any(w < 1 for w in self.widths):
            raise bad(f"widths must be one or more positive channel counts, got {','.join(map(str, self.widths))}",
                      "widths")
        if self.bottleneck is not None and self.bottleneck < 1:
            raise bad(f"bottleneck must be at least 1, got {self.bottleneck}", "bottleneck")
        if self.patching not in PATCHING_MODES:
            raise bad(f"patching must be adaptive or uniform, not {self.patching!r}", "patching")
        if not is_power_of_two(self.token_size):
            raise bad(f"token_size must be a power of two, got {self.token_size}", "token_size")
        if self.token_size > self.quadtree.max_size:
            raise bad(f"token_size ({self.token_size}) is larger than max_size ({self.quadtree.max_size})",
                      "token_size", "max_size")
        if self.crop < self.quadtree.min_size or self.crop < self.token_size:
            raise bad(f"crop ({self.crop}) is smaller than min_size ({self.quadtree.min_size})", "crop", "min_size")
        for name in ("mpp", "image_mpp", "slide_mpp"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise bad(f"{name} must be a positive number of µm/px, got {value}", name)
        for name in ("steps", "batch_size", "val_every", "log_every", "width", "depth", "heads"):
            if getattr(self, name) < 1:
                raise bad(f"{name} must be at least 1, got {getattr(self, name)}", name)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad(f"lr must be a positive number, got {self.lr}", "lr")
        if self.weight_decay < 0 or self.dice_weight < 0 or self.jitter < 0:
            raise bad("weight_decay, dice_weight and jitter must not be negative", "weight_decay", "dice_weight",
                      "jitter")
        if self.jitter > 1:
            raise bad(f"jitter is a fraction (0-1), got {self.jitter}", "jitter")
        for name in ("glass", "mosaic"):
            if not 0 <= getattr(self, name) <= 1:
                raise bad(f"{name} is a fraction of crops (0-1), got {getattr(self, name)}", name)
        if self.glass + self.mosaic > 1:
            raise bad(f"glass + mosaic is a fraction of crops and must not exceed 1, got {self.glass + self.mosaic}",
                      "glass", "mosaic")
        if self.warmup is not None and not 0 <= self.warmup < self.steps:
            raise bad(f"warmup must be between 0 and steps - 1, got {self.warmup}", "warmup", "steps")
        if not 0 <= self.val_fraction < 1:
            raise bad(f"val_fraction must be at least 0 and below 1, got {self.val_fraction}", "val_fraction")
        if self.width % self.heads:
            raise bad(f"width ({self.width}) must be divisible by heads ({self.heads})", "width", "heads")
        if self.threads is not None and self.threads < 1:
            raise bad(f"threads must be at least 1, got {self.threads}", "threads")
        if self.resume and self.overwrite:
            raise bad("resume and overwrite contradict each other; give one", "resume", "overwrite")

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["out"] = str(self.out)
        doc["quadtree"] = self.quadtree.as_dict()
        return doc


@dataclass(frozen=True)
class SegmentParams:
    """What ``wsi-amr segment`` does to each slide. ``model`` is the weights file and ``model_sha256``
    its hash (so that new weights make old outputs out of date); ``patching`` and ``context`` None
    take the model's own; ``shifts`` are the attention squares' offsets, one pass each (None: 0 and
    half the square)."""

    model: str
    model_sha256: str | None = None
    tissue: TissueParams = TissueParams()
    patching: str | None = None
    window: int = 2048
    overlap: int = 128
    context: int | None = None
    shifts: tuple[int, ...] | None = None
    simplify_um: float = 0.5
    min_area_um2: float = 50.0
    object_type: str = "annotation"
    gzip: bool = False
    mask_tiff: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.shifts is not None:
            object.__setattr__(self, "shifts", tuple(int(v) for v in self.shifts))
        require(self.patching in (None, "adaptive", "uniform"), f"patching must be adaptive or uniform, got {self.patching!r}",
                "patching")
        require_one_of("object_type", self.object_type, ("annotation", "detection"))
        require(self.window >= 64 and 0 <= self.overlap <= self.window // 2,
                f"window must be at least 64 px and overlap between 0 and half of it, got {self.window} and {self.overlap}",
                "window", "overlap")
        require(self.context is None or self.context >= 0,
                f"context must be 0 or a positive number of px, got {self.context}", "context")
        for name in ("simplify_um", "min_area_um2"):
            value = getattr(self, name)
            require(value >= 0, f"{name} must not be negative, got {value}", name)
        if self.shifts is not None:
            self._check_shifts(self.shifts)

    def _check_shifts(self, s: tuple[int, ...]) -> None:
        require(bool(s) and list(s) == sorted(set(s)) and s[0] >= 0,
                f"shifts must be distinct offsets of 0 px or more in increasing order, got {list(s)}", "shifts")
        require(s == (0,) or self.context != 0, "shifts moves the attention squares; with context 0 there are none",
                "shifts", "context")
        require(not self.context or s[-1] < self.context,
                f"shifts must be below the attention square's side (context {self.context}), got {list(s)}",
                "shifts", "context")

    def as_dict(self) -> dict[str, Any]:
        own = {k: v for k, v in asdict(self).items() if k != "tissue"}
        own["shifts"] = list(self.shifts) if self.shifts is not None else None
        order = ("model", "model_sha256", "patching", "window", "overlap", "context", "shifts", "simplify_um",
                 "min_area_um2", "object_type", "gzip", "mask_tiff", "device")
        return {"tissue": self.tissue.as_dict(), "segment": {k: own[k] for k in order}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmentParams:
        return from_fields(cls, {**data["segment"], "tissue": TissueParams.from_dict(data["tissue"])})
