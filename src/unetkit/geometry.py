"""Geometry of a U-Net: which tile sizes are legal and how many pixels a tile loses.

A U-Net with unpadded ("valid") 3x3 convolutions is fully described, for tiling purposes, by two
numbers: the border it loses on each side (92 pixels for the paper's network) and the step between
legal input sizes (2^poolings = 16). Every 2x2 max-pooling must see an even size, so the legal input
sizes of the paper's net are 188, 204, 220, ..., 572, ... = 16k + 188. Tiling, training crops and
memory budgeting all ask this object; none re-derives the numbers.

The arithmetic is done one axis at a time (`AxisGeometry`: a pooling factor per down-sampling and
the pixels lost per level), so the same code serves the square 2D network (`Geometry`) and 3D
networks whose pooling and kernels differ between axes (`VolumeGeometry`, `plan_kernels`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Sequence

from .errors import InputError

Padding = Literal["valid", "same"]

#: Names of the axes of a volume, in array order.
VOLUME_AXES = ("z", "y", "x")


def _simulate(size: int, pools: tuple[int, ...], losses: tuple[int, ...]) -> int | None:
    """Output size of a valid network along one axis for input `size`, or None if a pooling sees a
    size it does not divide or a layer is empty."""
    for factor, loss in zip(pools, losses):
        size -= loss
        if size <= 0 or size % factor:
            return None
        size //= factor
    size -= losses[-1]
    if size <= 0:
        return None
    for factor, loss in zip(reversed(pools), reversed(losses[:-1])):
        size = size * factor - loss
        if size <= 0:
            return None
    return size


@lru_cache(maxsize=256)
def _min_valid_size(pools: tuple[int, ...], losses: tuple[int, ...]) -> int:
    size = 1
    while _simulate(size, pools, losses) is None:
        size += 1
    return size


@dataclass(frozen=True)
class AxisGeometry:
    """Size arithmetic of a U-Net along one axis.

    Level l of the contracting path loses `losses[l]` pixels (both sides together: a valid
    convolution of kernel k loses k - 1) and then pools by `pools[l]`; the expanding path mirrors
    it. Legal input sizes are those where every pooling divides the size it sees and no layer is
    empty; they are `min_size + k * step` with `step` the product of the pooling factors.

    Args:
        pools: pooling factor of each down-sampling (depth - 1 values, each >= 1; 1 = not pooled).
        losses: pixels lost by the convolutions of each level (depth values, even, >= 0).
        padding: "valid" (output smaller than input) or "same" (output = input).

    Example:
        >>> axis = AxisGeometry(pools=(1, 2), losses=(0, 4, 4))  # z of a (1,2,2)-then-(2,2,2) net
        >>> axis.step, axis.border, axis.min_size, axis.output_size(20)
        (2, 8, 18, 4)
    """

    pools: tuple[int, ...]
    losses: tuple[int, ...]
    padding: Padding = "valid"

    def __post_init__(self) -> None:
        object.__setattr__(self, "pools", tuple(int(p) for p in self.pools))
        object.__setattr__(self, "losses", tuple(int(c) for c in self.losses))
        if len(self.losses) != len(self.pools) + 1:
            raise InputError(f"need one loss per level and one pooling factor per down-sampling (got {self.losses}, {self.pools})")
        if any(p < 1 for p in self.pools) or any(c < 0 or c % 2 for c in self.losses):
            raise InputError(f"pooling factors must be >= 1 and losses even and >= 0 (got {self.pools}, {self.losses})")
        if self.padding not in ("valid", "same"):
            raise InputError(f"padding must be 'valid' (the paper) or 'same' (got {self.padding!r})")

    @property
    def step(self) -> int:
        """Distance between consecutive legal sizes: the product of the pooling factors."""
        return math.prod(self.pools)

    @property
    def border(self) -> int:
        """Pixels lost per side ("valid"); for "same" the context margin tiles overlap by."""
        # Level l works at scale s_l = product of the earlier poolings: its convolutions cost
        # losses[l] * s_l input pixels on the way down and again on the way up (once at the bottom).
        total, scale = 0, 1
        for factor, loss in zip(self.pools, self.losses):
            total += 2 * loss * scale
            scale *= factor
        return (total + self.losses[-1] * scale) // 2

    @property
    def margin(self) -> int:
        """Context each output pixel needs on each side (the tiling overlap for padding="same")."""
        return self.border

    @property
    def min_size(self) -> int:
        """Smallest legal input size."""
        if self.padding == "same":
            return self.step
        return _min_valid_size(self.pools, self.losses)

    def is_legal(self, size: int) -> bool:
        """Whether an input of `size` pixels keeps every pooling on divisible sizes and a non-empty output."""
        if int(size) != size or size < 1:
            return False
        if self.padding == "same":
            return size % self.step == 0
        return _simulate(int(size), self.pools, self.losses) is not None

    def nearest_legal(self, size: int) -> tuple[int | None, int]:
        """The legal sizes just below (None if there is none) and just above `size`."""
        lower = None
        low = size - 1
        while low >= self.min_size:
            if self.is_legal(low):
                lower = low
                break
            low -= 1
        upper = max(size + 1, self.min_size)
        while not self.is_legal(upper):
            upper += 1
        return lower, upper

    def describe(self) -> str:
        return f"pooling {self.pools}, padding {self.padding!r}"

    def check(self, size: int, what: str = "tile size", network: str | None = None) -> int:
        """Return `size` if legal, else raise an `InputError` naming the two nearest legal sizes."""
        if self.is_legal(size):
            return int(size)
        lower, upper = self.nearest_legal(int(size))
        options = f"{lower} or {upper}" if lower is not None else f"{upper} (the smallest legal size)"
        raise InputError(
            f"{what} {size} is not legal for this network ({network or self.describe()}): "
            f"use {options}; legal sizes are {self.min_size} + k*{self.step}"
        )

    def output_size(self, input_size: int) -> int:
        """Output size for a legal input size."""
        self.check(input_size, "input size")
        if self.padding == "same":
            return int(input_size)
        out = _simulate(int(input_size), self.pools, self.losses)
        assert out is not None
        return out

    def input_size(self, output_size: int) -> int:
        """Smallest legal input size whose output covers `output_size` pixels."""
        if output_size < 1:
            raise InputError(f"output size must be >= 1 (got {output_size})")
        size = self.min_size
        if self.padding == "same":
            return max(size, -(-output_size // self.step) * self.step)
        needed = output_size + 2 * self.border
        if needed > size:
            size += -(-(needed - size) // self.step) * self.step
        return size

    def legal_sizes(self, up_to: int) -> list[int]:
        """All legal input sizes <= `up_to`."""
        return list(range(self.min_size, int(up_to) + 1, self.step))


@dataclass(frozen=True)
class Geometry:
    """Size arithmetic of a U-Net with `depth` levels, two 3x3 convolutions per level.

    Args:
        depth: number of resolution levels (the paper: 5, i.e. 4 poolings).
        padding: "valid" (the paper: output smaller than input) or "same" (output = input).
        convs_per_level: 3x3 convolutions per level (the paper: 2).

    Attributes:
        step: distance between consecutive legal sizes, 2^(depth-1); tiles start on multiples of it.
        border: pixels lost per side ("valid"); for "same" the context margin tiles overlap by.

    Example:
        >>> g = Geometry(depth=5)
        >>> g.border, g.output_size(572), g.input_size(388), g.legal_sizes(240)
        (92, 388, 572, [188, 204, 220, 236])
    """

    depth: int = 5
    padding: Padding = "valid"
    convs_per_level: int = 2

    def __post_init__(self) -> None:
        if self.depth < 2:
            raise InputError(f"depth must be >= 2 (got {self.depth}); the paper uses 5")
        if self.padding not in ("valid", "same"):
            raise InputError(f"padding must be 'valid' (the paper) or 'same' (got {self.padding!r})")

    @property
    def axis(self) -> AxisGeometry:
        """The arithmetic along either axis: pooling by 2 at every level, 2 pixels lost per 3x3 convolution."""
        return AxisGeometry((2,) * (self.depth - 1), (2 * self.convs_per_level,) * self.depth, self.padding)

    @property
    def step(self) -> int:
        return self.axis.step

    @property
    def border(self) -> int:
        return self.axis.border

    @property
    def margin(self) -> int:
        """Context each output pixel needs on each side (the tiling overlap for padding='same')."""
        return self.axis.margin

    @property
    def min_size(self) -> int:
        """Smallest legal input size."""
        return self.axis.min_size

    def is_legal(self, size: int) -> bool:
        """Whether an input tile of `size` pixels keeps every pooling on even sizes and a non-empty output."""
        return self.axis.is_legal(size)

    def nearest_legal(self, size: int) -> tuple[int | None, int]:
        """The legal sizes just below (None if there is none) and just above `size`."""
        return self.axis.nearest_legal(size)

    def check(self, size: int, what: str = "tile size") -> int:
        """Return `size` if legal, else raise an `InputError` naming the two nearest legal sizes."""
        return self.axis.check(size, what, f"depth {self.depth}, padding {self.padding!r}")

    def output_size(self, input_size: int) -> int:
        """Output size for a legal input size."""
        return self.axis.output_size(input_size)

    def input_size(self, output_size: int) -> int:
        """Smallest legal input size whose output covers `output_size` pixels."""
        return self.axis.input_size(output_size)

    def legal_sizes(self, up_to: int) -> list[int]:
        """All legal input sizes <= `up_to`."""
        return self.axis.legal_sizes(up_to)


Kernel3 = tuple[int, int, int]


def _kernels(values: Sequence[int | Sequence[int]], allowed: tuple[int, ...], what: str) -> tuple[Kernel3, ...]:
    out = []
    for value in values:
        kernel = (int(value),) * 3 if isinstance(value, (int,)) else tuple(int(v) for v in value)
        if len(kernel) != 3 or any(k not in allowed for k in kernel):
            raise InputError(f"each {what} must be an int or (z, y, x) of values in {allowed} (got {value!r})")
        out.append(kernel)
    return tuple(out)  # type: ignore[return-value]


@dataclass(frozen=True)
class VolumeGeometry:
    """Size arithmetic of a 3D U-Net, per axis (z, y, x), with anisotropic pooling and kernels.

    Level l applies `convs_per_level` convolutions of kernel `conv_kernels[l]` and, except at the
    bottom, a max-pooling of kernel and stride `pool_kernels[l]` (up-convolutions mirror it). Each
    axis is an independent `AxisGeometry`, so legal sizes, borders and steps differ between axes:
    a (1, 2, 2) pooling leaves z alone, a (1, 3, 3) kernel loses no slice.

    Args:
        pool_kernels: one (z, y, x) pooling kernel per down-sampling (depth - 1 of them), values 1 or 2.
        conv_kernels: one (z, y, x) convolution kernel per level (depth of them), values 1 or 3.
        padding: "valid" (output smaller than input) or "same".
        convs_per_level: convolutions per level (2 in the U-Net papers).

    Example:
        >>> g = VolumeGeometry(pool_kernels=((1, 2, 2), (2, 2, 2)), conv_kernels=((1, 3, 3), (3, 3, 3), (3, 3, 3)))
        >>> g.step, g.border, g.min_shape
        ((2, 4, 4), (8, 20, 20), (18, 44, 44))
        >>> g.output_shape((20, 52, 52))
        (4, 12, 12)
    """

    pool_kernels: tuple[Kernel3, ...]
    conv_kernels: tuple[Kernel3, ...]
    padding: Padding = "valid"
    convs_per_level: int = 2

    def __post_init__(self) -> None:
        pools = _kernels(self.pool_kernels, (1, 2), "pooling kernel")
        convs = _kernels(self.conv_kernels, (1, 3), "convolution kernel")
        if len(convs) < 2 or len(pools) != len(convs) - 1:
            raise InputError(
                f"give depth >= 2 convolution kernels and depth - 1 pooling kernels (got {len(convs)} and {len(pools)})"
            )
        object.__setattr__(self, "pool_kernels", pools)
        object.__setattr__(self, "conv_kernels", convs)
        if self.padding not in ("valid", "same"):
            raise InputError(f"padding must be 'valid' (the paper) or 'same' (got {self.padding!r})")

    @classmethod
    def isotropic(cls, depth: int, padding: Padding = "valid") -> "VolumeGeometry":
        """2x2x2 pooling and 3x3x3 kernels at every level (the 3D U-Net of Cicek et al. 2016)."""
        if depth < 2:
            raise InputError(f"depth must be >= 2 (got {depth})")
        return cls(((2, 2, 2),) * (depth - 1), ((3, 3, 3),) * depth, padding)

    @property
    def depth(self) -> int:
        return len(self.conv_kernels)

    @property
    def axes(self) -> tuple[AxisGeometry, AxisGeometry, AxisGeometry]:
        """The arithmetic of each axis (z, y, x)."""
        return tuple(  # type: ignore[return-value]
            AxisGeometry(
                tuple(p[a] for p in self.pool_kernels),
                tuple(self.convs_per_level * (k[a] - 1) for k in self.conv_kernels),
                self.padding,
            )
            for a in range(3)
        )

    @property
    def step(self) -> Kernel3:
        return tuple(axis.step for axis in self.axes)  # type: ignore[return-value]

    @property
    def border(self) -> Kernel3:
        return tuple(axis.border for axis in self.axes)  # type: ignore[return-value]

    @property
    def min_shape(self) -> Kernel3:
        """Smallest legal input size along each axis."""
        return tuple(axis.min_size for axis in self.axes)  # type: ignore[return-value]

    def describe(self) -> str:
        return f"pooling {list(self.pool_kernels)}, kernels {list(self.conv_kernels)}, padding {self.padding!r}"

    def is_legal(self, shape: Sequence[int]) -> bool:
        return len(shape) == 3 and all(axis.is_legal(s) for axis, s in zip(self.axes, shape))

    def check(self, shape: Sequence[int], what: str = "tile shape") -> Kernel3:
        """Return `shape` (z, y, x) if legal, else raise an `InputError` naming the axis and its
        two nearest legal sizes."""
        if len(shape) != 3:
            raise InputError(f"{what} must be (z, y, x), got {tuple(shape)}")
        for name, axis, size in zip(VOLUME_AXES, self.axes, shape):
            axis.check(int(size), f"{what} {tuple(int(s) for s in shape)}: {name} size", self.describe())
        return tuple(int(s) for s in shape)  # type: ignore[return-value]

    def output_shape(self, shape: Sequence[int]) -> Kernel3:
        """Output shape for a legal input shape."""
        self.check(shape, "input shape")
        return tuple(axis.output_size(int(s)) for axis, s in zip(self.axes, shape))  # type: ignore[return-value]

    def input_shape(self, output_shape: Sequence[int]) -> Kernel3:
        """Smallest legal input shape whose output covers `output_shape`."""
        return tuple(axis.input_size(int(s)) for axis, s in zip(self.axes, output_shape))  # type: ignore[return-value]


def plan_kernels(
    spacing: Sequence[float], depth: int, anisotropy: float = 2.0
) -> tuple[tuple[Kernel3, ...], tuple[Kernel3, ...]]:
    """Pooling and convolution kernels for voxels of `spacing` (z, y, x), planned level by level.

    The rule of nnU-Net (Isensee et al., Nat. Methods 2021): at each level, an axis whose current
    spacing is within `anisotropy` (2x) of the finest axis is pooled by 2 and convolved with 3;
    a coarser axis is neither pooled nor convolved (kernel 1) until pooling the others has made
    the spacing about isotropic. A kernel 1 along a coarse z is chosen because a 3-wide kernel would
    mix slices physically far apart, relative to the in-plane neighbours, and, with valid
    convolutions, each would consume two of the few slices of an anisotropic stack.

    Args:
        spacing: voxel size along (z, y, x), any unit (only ratios matter).
        depth: resolution levels (depth - 1 poolings).
        anisotropy: how much coarser than the finest an axis may be and still be pooled.

    Returns:
        (pool_kernels, conv_kernels), for `UNet(dims=3, ...)` or `VolumeGeometry`.

    Example:
        >>> plan_kernels((5.0, 1.0, 1.0), depth=4)
        (((1, 2, 2), (1, 2, 2), (2, 2, 2)), ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3)))
        >>> plan_kernels((1.0, 1.0, 1.0), depth=3)[0]
        ((2, 2, 2), (2, 2, 2))
    """
    current = [float(s) for s in spacing]
    if len(current) != 3 or not all(math.isfinite(s) and s > 0 for s in current):
        raise InputError(f"spacing must be three positive numbers (z, y, x), got {tuple(spacing)}")
    if int(depth) != depth or depth < 2:
        raise InputError(f"depth must be an integer >= 2 (got {depth})")
    pools: list[Kernel3] = []
    convs: list[Kernel3] = []
    for level in range(int(depth)):
        finest = min(current)
        near = [s <= anisotropy * finest for s in current]
        convs.append(tuple(3 if n else 1 for n in near))  # type: ignore[arg-type]
        if level < depth - 1:
            pools.append(tuple(2 if n else 1 for n in near))  # type: ignore[arg-type]
            current = [s * 2 if n else s for s, n in zip(current, near)]
    return tuple(pools), tuple(convs)
