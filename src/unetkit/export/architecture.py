"""The U-Net of Ronneberger, Fischer & Brox (2015) in plain PyTorch, returning class probabilities.

This file is copied into bioimage.io model packages written by unetkit, where it is the
architecture of the `pytorch_state_dict` weights: it imports nothing but torch, and its parameter
names are those of `unetkit.UNet`, so a unetkit state dict loads into it unchanged.

Example:
    >>> import torch
    >>> net = UNet(depth=3, base_channels=4).eval()
    >>> net(torch.rand(1, 1, 44, 44)).shape
    torch.Size([1, 2, 4, 4])
"""

from __future__ import annotations

import torch
from torch import nn


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
    size, output the softmax over `n_classes` (N, n_classes, h, w)."""

    def __init__(self, in_channels: int = 1, n_classes: int = 2, depth: int = 5, base_channels: int = 64,
                 padding: str = "valid", dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
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
