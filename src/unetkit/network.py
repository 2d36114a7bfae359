"""The U-Net of Ronneberger, Fischer & Brox (2015), Fig. 1."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from .config import PAPER
from .errors import InputError
from .geometry import Geometry, Padding, VolumeGeometry

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_UP_CONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_DROPOUT = {2: nn.Dropout2d, 3: nn.Dropout3d}
_LAYOUT = {2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


class _DoubleConv(nn.Sequential):
    """Two convolutions (3x3, or `kernel` in 3D), each followed by ReLU (optionally batch norm before the ReLU)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        padding: Padding,
        batch_norm: bool,
        dims: int = 2,
        kernel: int | tuple[int, ...] = 3,
    ) -> None:
        layers: list[nn.Module] = []
        same = tuple(k // 2 for k in kernel) if isinstance(kernel, tuple) else kernel // 2
        for c_in in (in_channels, out_channels):
            layers.append(_CONV[dims](c_in, out_channels, kernel, padding=same if padding == "same" else 0, bias=not batch_norm))
            if batch_norm:
                layers.append(_NORM[dims](out_channels))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def center_crop(features: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop the spatial centre of `features` (N, C, *spatial) to `size` (one value per spatial axis)."""
    # No int() on the sizes: exporters trace them as symbolic values that must stay symbolic.
    index = tuple(
        slice((have - want) // 2, (have - want) // 2 + want) for have, want in zip(features.shape[-len(size) :], size)
    )
    return features[(..., *index)]


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
        dims: 2 (images, the paper) or 3 (volumes: the 3D U-Net of Cicek et al., MICCAI 2016, with
            3D convolutions, max-pooling and up-convolutions).
        pool_kernels: 3D only: one (z, y, x) pooling kernel per down-sampling, values 1 or 2, e.g.
            ((1, 2, 2), (2, 2, 2)) to pool only in-plane first on anisotropic stacks (see
            `unetkit.geometry.plan_kernels`); default 2x2x2 everywhere.
        conv_kernels: 3D only: one (z, y, x) convolution kernel per level, values 1 or 3, e.g.
            (1, 3, 3) where z is much coarser than x and y; default 3x3x3 everywhere.

    Returns:
        `forward(x)` maps (N, in_channels, H, W) to logits (N, n_classes, h, w), where
        h = `geometry.output_size(H)`; with dims=3, (N, in_channels, D, H, W) to
        (N, n_classes, d, h, w) = `geometry.output_shape((D, H, W))`.

    Example:
        >>> import torch
        >>> net = UNet(depth=3, base_channels=4)
        >>> net.geometry.output_size(44)
        4
        >>> net(torch.zeros(1, 1, 44, 44)).shape
        torch.Size([1, 2, 4, 4])
        >>> net3d = UNet(dims=3, depth=2, base_channels=4, pool_kernels=[(1, 2, 2)], conv_kernels=[(1, 3, 3), (3, 3, 3)])
        >>> net3d.geometry.min_shape, net3d(torch.zeros(1, 1, 5, 20, 20)).shape
        ((5, 18, 18), torch.Size([1, 2, 1, 4, 4]))
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
        dims: int = 2,
        pool_kernels: Sequence[int | Sequence[int]] | None = None,
        conv_kernels: Sequence[int | Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise InputError(f"dims must be 2 (images) or 3 (volumes), got {dims!r}")
        if dims == 2 and (pool_kernels is not None or conv_kernels is not None):
            raise InputError("pool_kernels and conv_kernels are for volumes: use them with dims=3")
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
        self.dims = dims
        self.geometry: Geometry | VolumeGeometry
        if dims == 2:
            self.geometry = Geometry(depth=depth, padding=padding)
            pools: list[Any] = [2] * (depth - 1)
            kernels: list[Any] = [3] * depth
        else:
            if depth < 2:
                raise InputError(f"depth must be >= 2 (got {depth}); the paper uses 5")
            for name, given, count in (("pool_kernels", pool_kernels, depth - 1), ("conv_kernels", conv_kernels, depth)):
                if given is not None and len(given) != count:
                    raise InputError(f"{name} has {len(given)} kernels; give {count} (one per {'down-sampling' if count < depth else 'level'}, depth {depth})")
            default = VolumeGeometry.isotropic(depth, padding)
            self.geometry = VolumeGeometry(
                default.pool_kernels if pool_kernels is None else tuple(pool_kernels),  # type: ignore[arg-type]
                default.conv_kernels if conv_kernels is None else tuple(conv_kernels),  # type: ignore[arg-type]
                padding,
            )
            pools, kernels = list(self.geometry.pool_kernels), list(self.geometry.conv_kernels)
            self.config.update(
                dims=3,
                pool_kernels=[list(k) for k in self.geometry.pool_kernels],
                conv_kernels=[list(k) for k in self.geometry.conv_kernels],
            )
        widths = [base_channels * 2**level for level in range(depth)]

        self.down = nn.ModuleList()
        c_in = in_channels
        for width, kernel in zip(widths, kernels):
            self.down.append(_DoubleConv(c_in, width, padding, batch_norm, dims, kernel))
            c_in = width
        if dims == 2:
            self.pool = nn.MaxPool2d(2, 2)
        else:
            self.pools = nn.ModuleList(nn.MaxPool3d(k, k) for k in pools)
        self.dropout = _DROPOUT[dims](dropout) if dropout > 0 else nn.Identity()
        self.up = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for width, pool, kernel in zip(reversed(widths[:-1]), reversed(pools), reversed(kernels[:-1])):
            self.up.append(_UP_CONV[dims](2 * width, width, pool, stride=pool))
            self.up_conv.append(_DoubleConv(2 * width, width, padding, batch_norm, dims, kernel))
        self.head = _CONV[dims](widths[0], n_classes, 1)
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
            if isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
                fan_in = module.in_channels * math.prod(module.kernel_size) // math.prod(module.stride)
            elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
                fan_in = module.in_channels * math.prod(module.kernel_size)
            else:
                continue
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_in))
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exporters (ONNX, TorchScript) trace with symbolic sizes; checking them would fix the sizes.
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self._check_input(x)
        skips = []
        last = len(self.down) - 1
        for level, block in enumerate(self.down):
            x = block(x)
            if level >= last - 1:  # end of the contracting path
                x = self.dropout(x)
            if level < last:
                skips.append(x)
                x = self.pool(x) if self.dims == 2 else self.pools[level](x)
        for up, block in zip(self.up, self.up_conv):
            x = up(x)
            skip = skips.pop()
            x = block(torch.cat([center_crop(skip, x.shape[2:]), x], dim=1))
        return self.head(x)

    def _check_input(self, x: torch.Tensor) -> None:
        layout = _LAYOUT[self.dims].replace("C", str(self.in_channels))
        got = tuple(x.shape)
        if x.ndim == 5 and self.dims == 2:
            raise InputError(f"UNet(dims=2) expects input {layout}, got a volume (5D) {got}: use a UNet(dims=3) model for volumes")
        if x.ndim == 4 and self.dims == 3:
            raise InputError(
                f"UNet(dims=3) expects input {layout}, got an image (4D) {got}: use a UNet(dims=2) model for images, "
                "or add the batch axis to a single volume (x[None])"
            )
        if x.ndim == self.dims + 1 and x.shape[0] == self.in_channels:
            raise InputError(f"UNet expects input {layout}, got {got}: add the batch axis (x[None])")
        if x.ndim != self.dims + 2 or x.shape[1] != self.in_channels:
            raise InputError(f"UNet expects input {layout}, got {got}")
        if self.dims == 2:
            for size in x.shape[-2:]:
                self.geometry.check(int(size), "input size")  # type: ignore[arg-type]
        else:
            self.geometry.check(tuple(int(s) for s in x.shape[2:]), "input shape")  # type: ignore[arg-type]

    def count_convolutions(self) -> int:
        """Number of convolution layers (including up-convolutions and the final 1x1): 23 in the paper."""
        return sum(isinstance(m, _CONVOLUTIONS) for m in self.modules())

    def flops(self, input_size: int | Sequence[int]) -> float:
        """Multiply-add FLOPs (2 per MAC) of one forward pass on a single tile of `input_size`
        (one size for every axis, or one per axis: (h, w), or (d, h, w) with dims=3).

        Counted on a copy of the network built on the "meta" device, so no memory is used and the
        network's own state (batch-norm statistics, training mode) is left alone.
        """
        shape = (int(input_size),) * self.dims if isinstance(input_size, int) else tuple(int(s) for s in input_size)
        with torch.device("meta"):
            shadow = UNet(**self.config).eval()
        total = 0.0

        def count(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            nonlocal total
            k = math.prod(module.kernel_size)
            # An up-convolution does its k MACs per input voxel, a convolution per output voxel.
            voxels = _inputs[0].shape[2:] if isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d)) else output.shape[2:]
            total += 2.0 * module.in_channels * module.out_channels * k * math.prod(voxels)

        for module in shadow.modules():
            if isinstance(module, _CONVOLUTIONS):
                module.register_forward_hook(count)
        with torch.no_grad():
            shadow(torch.zeros(1, self.in_channels, *shape, device="meta"))
        return total


_CONVOLUTIONS = (nn.Conv2d, nn.ConvTranspose2d, nn.Conv3d, nn.ConvTranspose3d)
