"""wsi-amr: adaptive quadtree patching and Iterative Patch Selection for whole-slide images."""

__version__ = "0.1.0"

__all__ = ["__version__"]
