"""wsi-amr: adaptive quadtree patching and Iterative Patch Selection for whole-slide images.

The public API, in the order of the flow (see docs/architecture.md)::

    from wsi_amr import open_slide, detect_slide_tissue, build_quadtree, tokenise, mask_to_polygons

Names are imported when first used, so ``import wsi_amr`` stays cheap (the command line and every
worker process import it) and PyTorch loads only with a model.
"""

from __future__ import annotations

import importlib as _importlib
import os as _os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module, in the order of the flow: slide -> tissue -> tiles / quadtree -> tokens -> model
# -> polygons -> GeoJSON.
_API = {
    "open_slide": "wsi_amr.slide", "Slide": "wsi_amr.slide", "Resolution": "wsi_amr.slide",
    "SlideError": "wsi_amr.slide",
    "TissueParams": "wsi_amr.tissue", "detect_tissue": "wsi_amr.tissue", "detect_slide_tissue": "wsi_amr.tissue",
    "TileParams": "wsi_amr.tiling", "tile_grid": "wsi_amr.tiling",
    "QuadtreeParams": "wsi_amr.quadtree", "edge_map": "wsi_amr.quadtree", "build_quadtree": "wsi_amr.quadtree",
    "uniform_leaves": "wsi_amr.quadtree",
    "tokenise": "wsi_amr.tokens", "detokenise": "wsi_amr.tokens",
    "SegmentParams": "wsi_amr.segmentation.config", "load_checkpoint": "wsi_amr.segmentation.model",
    "ClassifyParams": "wsi_amr.ips.config",
    "mask_to_polygons": "wsi_amr.polygons",
    "PathClass": "wsi_amr.geojson", "make_feature": "wsi_amr.geojson", "write_geojson": "wsi_amr.geojson",
    "read_geojson": "wsi_amr.geojson", "validate_geojson": "wsi_amr.geojson",
    "ParameterError": "wsi_amr.params",
}

__all__ = [
    "__version__",
    "open_slide", "Slide", "Resolution", "SlideError", "TissueParams", "detect_tissue", "detect_slide_tissue",
    "TileParams", "tile_grid", "QuadtreeParams", "edge_map", "build_quadtree", "uniform_leaves", "tokenise",
    "detokenise", "SegmentParams", "load_checkpoint", "ClassifyParams", "mask_to_polygons", "PathClass",
    "make_feature", "write_geojson", "read_geojson", "validate_geojson", "ParameterError",
]

if TYPE_CHECKING:
    from wsi_amr.geojson import PathClass, make_feature, read_geojson, validate_geojson, write_geojson
    from wsi_amr.ips.config import ClassifyParams
    from wsi_amr.params import ParameterError
    from wsi_amr.polygons import mask_to_polygons
    from wsi_amr.quadtree import QuadtreeParams, build_quadtree, edge_map, uniform_leaves
    from wsi_amr.segmentation.config import SegmentParams
    from wsi_amr.segmentation.model import load_checkpoint
    from wsi_amr.slide import Resolution, Slide, SlideError, open_slide
    from wsi_amr.tiling import TileParams, tile_grid
    from wsi_amr.tissue import TissueParams, detect_slide_tissue, detect_tissue
    from wsi_amr.tokens import detokenise, tokenise


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(_importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'wsi_amr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


#: True in a process forked from one that had imported wsi-amr (see run.resources.opencv_threads).
forked = False


def _note_fork() -> None:
    global forked
    forked = True


_os.register_at_fork(after_in_child=_note_fork)
