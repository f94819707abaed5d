"""Image files: the one reader of RGB images (``train segment``, ``train classify``, ``classify``,
the benchmarks) and the error every image or label-image reader raises.

:func:`read_rgb` decodes any format OpenCV reads (PNG, JPEG, TIFF, BMP, ...) to RGB uint8: grey
images are repeated into three channels, alpha is dropped, 16-bit images are scaled to 8 bits.
Label images are read by :func:`wsi_amr.labels.read_label_image`.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


class ImageError(ValueError):
    """An image file that cannot be read or used; one line naming the file."""


def read_rgb(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an image file; ImageError when it cannot be decoded."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageError(f"{path}: not a readable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
