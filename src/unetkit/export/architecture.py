"""The U-Net of Ronneberger, Fischer & Brox (2015) in plain PyTorch, returning class probabilities.

This file is copied into bioimage.io model packages written by unetkit, where it is the
architecture of the `pytorch_state_dict` weights: it imports nothing but torch, and its parameter
names are those of `unetkit.UNet`, so a unetkit state dict loads into it unchanged.

With `any_size`, the network takes images of any size and returns probabilities of the same
size: it mirror-pads the input (without repeating the edge pixel, as `unetkit.tiling` does) to the
one legal tile that unetkit's prediction would use for the whole image, and crops the result.

Example:
    >>> import torch
    >>> net = UNet(depth=3, base_channels=4).eval()
    >>> net(torch.rand(1, 1, 44, 44)).shape
    torch.Size([1, 2, 4, 4])
    >>> UNet(depth=3, base_channels=4, any_size=[20, 44, 4, 0]).eval()(torch.rand(1, 1, 37, 50)).shape
    torch.Size([1, 2, 37, 50])
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn


def _at_least(value, low: int):
    # Sizes are tensors while torch.jit.trace runs, symbolic integers under torch.export.
    return torch.clamp(value, min=low) if isinstance(value, torch.Tensor) else torch.sym_max(value, low)


def padded_size(size, before: int, base: int, step: int):
    """The smallest `base + k * step` that holds `size + 2 * before` pixels.

    Example:
        >>> padded_size(100, 20, 44, 4)
        140
    """
    extra = _at_least(size + 2 * before - base, 0)
    return base + (extra + step - 1) // step * step


def mirror_indices(start, length, size) -> torch.Tensor:
    """Indices `start .. start+length-1` mirrored into `[0, size)` without repeating the edge
    (NumPy's "reflect"), at any distance from the image.

    Example:
        >>> mirror_indices(-3, 9, 4).tolist()
        [3, 2, 1, 0, 1, 2, 3, 2, 1]
    """
    index = torch.arange(length) + start
    period = _at_least(2 * (size - 1), 1)
    if not isinstance(period, torch.Tensor):
        period = torch.full((), period, dtype=torch.long)  # the ONNX exporter needs a tensor here
    index = torch.remainder(index, period)
    return torch.where(index >= size, period - index, index)


def run_any_size(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, before: int, base: int,
                 step: int, keep: int) -> torch.Tensor:
    """`forward` on `x` mirror-padded by `before` pixels at the top and left (more at the bottom and
    right, up to a size `base + k * step`), cropped from `keep` to the size of `x`."""
    h, w = x.shape[-2], x.shape[-1]
    ys = mirror_indices(-before, padded_size(h, before, base, step), h)
    xs = mirror_indices(-before, padded_size(w, before, base, step), w)
    y = forward(x.index_select(-2, ys).index_select(-1, xs))
    return y[..., keep : keep + h, keep : keep + w]


def _double_conv(c_in: int, c_out: int, padding: str, batch_norm: bool) -> nn.Sequential:
    layers = []
    for channels in (c_in, c_out):
        layers.append(nn.Conv2d(channels, c_out, 3, padding=1 if padding == "same" else 0, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """U-Net with `depth` levels of two 3x3 convolutions; input (N, in_channels, H, W) at a legal
    size, output the softmax over `n_classes` (N, n_classes, h, w).

    `any_size` = (before, base, step, keep) makes it take any size and return the same size (see
    `run_any_size`; unetkit writes these numbers from the network's geometry)."""

    def __init__(self, in_channels: int = 1, n_classes: int = 2, depth: int = 5, base_channels: int = 64,
                 padding: str = "valid", dropout: float = 0.0, batch_norm: bool = False,
                 any_size: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.any_size = None if any_size is None else tuple(int(v) for v in any_size)
        widths = [base_channels * 2**level for level in range(depth)]
        self.down = nn.ModuleList()
        c_in = in_channels
        for width in widths:
            self.down.append(_double_conv(c_in, width, padding, batch_norm))
            c_in = width
        self.pool = nn.MaxPool2d(2, 2)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(2 * width, width, 2, stride=2))
            self.up_conv.append(_double_conv(2 * width, width, padding, batch_norm))
        self.head = nn.Conv2d(widths[0], n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.any_size is not None:
            return run_any_size(self._forward, x, *self.any_size)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        last = len(self.down) - 1
        for level, block in enumerate(self.down):
            x = block(x)
            if level >= last - 1:
                x = self.dropout(x)
            if level < last:
                skips.append(x)
                x = self.pool(x)
        for up, block in zip(self.up, self.up_conv):
            x = up(x)
            skip = skips.pop()
            dy = (skip.shape[-2] - x.shape[-2]) // 2
            dx = (skip.shape[-1] - x.shape[-1]) // 2
            skip = skip[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]
            x = block(torch.cat([skip, x], dim=1))
        return torch.softmax(self.head(x), dim=1)
