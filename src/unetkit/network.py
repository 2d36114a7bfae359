"""The U-Net of Ronneberger, Fischer & Brox (2015), Fig. 1."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import PAPER
from .errors import InputError
from .geometry import Geometry, Padding


class _DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by ReLU (optionally batch norm before the ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, padding: Padding, batch_norm: bool) -> None:
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            layers.append(nn.Conv2d(c_in, out_channels, 3, padding=1 if padding == "same" else 0, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def center_crop(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop the spatial centre of `features` (N, C, H, W) to `size` (h, w)."""
    dy = (features.shape[-2] - size[0]) // 2
    dx = (features.shape[-1] - size[1]) // 2
    return features[..., dy : dy + size[0], dx : dx + size[1]]


class UNet(nn.Module):
    """U-Net: a contracting path that captures context and a symmetric expanding path that localises.

    Each level of the contracting path applies two 3x3 convolutions with ReLU and a 2x2 max-pooling
    (stride 2) that halves the size, while the number of channels doubles. Each level of the expanding
    path up-samples with a 2x2 up-convolution that halves the channels, concatenates the centre-cropped
    feature map of the same contracting level, and applies two 3x3 convolutions with ReLU. A final 1x1
    convolution maps the features to class scores (logits; the softmax is applied by the loss and by
    prediction). With the defaults this is exactly the network of the paper: 23 convolutions,
    64-128-256-512-1024 channels, a 572x572 input gives 388x388 outputs, dropout at the end of the
    contracting path (after the last two contracting levels, as in the authors' released model) and
    Gaussian initialisation with std sqrt(2/N), N the number of incoming connections of one unit.

    Args:
        in_channels: image channels (1 for grayscale). Default 1.
        n_classes: output classes (2: background and foreground). Default 2.
        depth: resolution levels, >= 2 (the paper: 5, i.e. four poolings).
        base_channels: channels of the first level, >= 1 (the paper: 64).
        padding: "valid" (the paper; output smaller than input, tiles are seamless) or "same".
        dropout: dropout probability at the end of the contracting path (the paper: 0.5); 0 disables.
        batch_norm: add batch normalisation after each 3x3 convolution (not in the paper).

    Returns:
        `forward(x)` maps (N, in_channels, H, W) to logits (N, n_classes, h, w), where
        h = `geometry.output_size(H)`.

    Example:
        >>> import torch
        >>> net = UNet(depth=3, base_channels=4)
        >>> net.geometry.output_size(44)
        4
        >>> net(torch.zeros(1, 1, 44, 44)).shape
        torch.Size([1, 2, 4, 4])
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 2,
        depth: int = PAPER.depth,
        base_channels: int = PAPER.base_channels,
        padding: Padding = "valid",
        dropout: float = PAPER.dropout,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if in_channels < 1 or n_classes < 1:
            raise InputError(f"in_channels and n_classes must be >= 1 (got {in_channels}, {n_classes})")
        if base_channels < 1:
            raise InputError(f"base_channels must be >= 1 (got {base_channels}); the paper uses 64")
        if not 0.0 <= dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1) (got {dropout})")
        self.config: dict[str, Any] = dict(
            in_channels=in_channels,
            n_classes=n_classes,
            depth=depth,
            base_channels=base_channels,
            padding=padding,
            dropout=dropout,
            batch_norm=batch_norm,
        )
        self.geometry = Geometry(depth=depth, padding=padding)
        widths = [base_channels * 2**level for level in range(depth)]

        self.down = nn.ModuleList()
        c_in = in_channels
        for width in widths:
            self.down.append(_DoubleConv(c_in, width, padding, batch_norm))
            c_in = width
        self.pool = nn.MaxPool2d(2, 2)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(2 * width, width, 2, stride=2))
            self.up_conv.append(_DoubleConv(2 * width, width, padding, batch_norm))
        self.head = nn.Conv2d(widths[0], n_classes, 1)
        self.reset_parameters()

    @property
    def in_channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def n_classes(self) -> int:
        return int(self.config["n_classes"])

    def reset_parameters(self) -> None:
        """He initialisation: weights ~ N(0, 2/N), N = incoming connections of one unit; zero biases.

        For a KxK convolution over C input channels N = K*K*C (9*64 = 576 for a 3x3 convolution
        over 64 channels); for the 2x2 stride-2 up-convolution each output unit receives exactly one
        input pixel per channel, so N = C.
        """
        for module in self.modules():
            if isinstance(module, nn.ConvTranspose2d):
                fan_in = module.in_channels * math.prod(module.kernel_size) // math.prod(module.stride)
            elif isinstance(module, nn.Conv2d):
                fan_in = module.in_channels * math.prod(module.kernel_size)
            else:
                continue
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_in))
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exporters (ONNX, TorchScript) trace with symbolic sizes; checking them would fix the sizes.
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            if x.ndim != 4 or x.shape[1] != self.in_channels:
                raise InputError(
                    f"UNet expects input (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
                )
            for size in x.shape[-2:]:
                self.geometry.check(int(size), "input size")
        skips = []
        last = len(self.down) - 1
        for level, block in enumerate(self.down):
            x = block(x)
            if level >= last - 1:  # end of the contracting path
                x = self.dropout(x)
            if level < last:
                skips.append(x)
                x = self.pool(x)
        for up, block in zip(self.up, self.up_conv):
            x = up(x)
            skip = skips.pop()
            x = block(torch.cat([center_crop(skip, x.shape[-2:]), x], dim=1))
        return self.head(x)

    def count_convolutions(self) -> int:
        """Number of convolution layers (including up-convolutions and the final 1x1): 23 in the paper."""
        return sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in self.modules())

    def flops(self, input_size: int | tuple[int, int]) -> float:
        """Multiply-add FLOPs (2 per MAC) of one forward pass on a single tile of `input_size`.

        Counted on a copy of the network built on the "meta" device, so no memory is used and the
        network's own state (batch-norm statistics, training mode) is left alone.
        """
        h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
        with torch.device("meta"):
            shadow = UNet(**self.config).eval()
        total = 0.0

        def count(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            nonlocal total
            k = math.prod(module.kernel_size)
            if isinstance(module, nn.ConvTranspose2d):
                total += 2.0 * module.in_channels * module.out_channels * k * _inputs[0].shape[-2] * _inputs[0].shape[-1]
            else:
                total += 2.0 * module.in_channels * module.out_channels * k * output.shape[-2] * output.shape[-1]

        for module in shadow.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                module.register_forward_hook(count)
        with torch.no_grad():
            shadow(torch.zeros(1, self.in_channels, h, w, device="meta"))
        return total
