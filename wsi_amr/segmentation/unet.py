"""A compact U-Net on pixels: the standard CNN baseline beside the token segmenter.

The same checkpoint format, card, data, augmentation, loss and windows as the token model; it
sees every pixel at the working mpp (no quadtree), so it is the reference the adaptive models are
measured against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsi_amr.segmentation.config import UNetConfig


def double_conv(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 convolutions, each followed by BatchNorm and ReLU (bias-free: BatchNorm has one)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


def pad_to_multiple(images: Tensor, multiple: int) -> tuple[Tensor, int, int]:
    """``images`` (B, C, H, W) padded at the bottom and right up to multiples of ``multiple`` px
    by mirroring (by repeating the edge where the image is too small to mirror); returns it with
    the original H and W."""
    h, w = images.shape[-2:]
    dh, dw = -h % multiple, -w % multiple
    if dh or dw:
        mode = "reflect" if dh < h and dw < w else "replicate"
        images = F.pad(images, (0, dw, 0, dh), mode=mode)
    return images, h, w


class UNet(nn.Module):
    """Normalised images (B, C, H, W), any H and W -> logits (B, K, H, W).

    Inputs are padded up to a multiple of ``cfg.multiple`` px and the logits cropped back, so a
    slide window of any size runs as it is."""

    def __init__(self, cfg: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        widths = list(cfg.widths)
        self.down = nn.ModuleList()
        c = cfg.channels
        for w in widths:
            self.down.append(double_conv(c, w))
            c = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = double_conv(c, cfg.bottleneck)
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        c = cfg.bottleneck
        for w in reversed(widths):
            self.up.append(nn.ConvTranspose2d(c, w, 2, stride=2))
            self.merge.append(double_conv(2 * w, w))
            c = w
        self.head = nn.Conv2d(c, cfg.num_classes, 1)

    def forward(self, images: Tensor) -> Tensor:
        x, h, w = pad_to_multiple(images, self.cfg.multiple)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)[..., :h, :w]

