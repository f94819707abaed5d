"""wsi-amr: adaptive quadtree patching and Iterative Patch Selection for whole-slide images."""

import os as _os

__version__ = "0.1.0"

__all__ = ["__version__"]

#: True in a process forked from one that had imported wsi-amr (see run.resources.opencv_threads).
forked = False


def _note_fork() -> None:
    global forked
    forked = True


_os.register_at_fork(after_in_child=_note_fork)
