"""Geometry of a U-Net: which tile sizes are legal and how many pixels a tile loses.

A U-Net with unpadded ("valid") 3x3 convolutions is fully described, for tiling purposes, by two
numbers: the border it loses on each side (92 pixels for the paper's network) and the step between
legal input sizes (2^poolings = 16). Every 2x2 max-pooling must see an even size, so the legal input
sizes of the paper's net are 188, 204, 220, ..., 572, ... = 16k + 188. Tiling, training crops and
memory budgeting all ask this object; none re-derives the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import InputError

Padding = Literal["valid", "same"]


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
    def step(self) -> int:
        return 2 ** (self.depth - 1)

    @property
    def _loss_per_level(self) -> int:
        return 2 * self.convs_per_level  # each 3x3 valid convolution loses one pixel per side

    @property
    def border(self) -> int:
        # Down path loses c*(2^L - 1) pixels in total (in input scale), the bottom c*2^L, the up path
        # c*(2^L - 1) again; half of it on each side. c = pixels lost per level, L = poolings.
        c, scale = self._loss_per_level, self.step
        return (c * (scale - 1) + c * scale + c * (scale - 1)) // 2

    @property
    def min_size(self) -> int:
        """Smallest legal input size."""
        if self.padding == "same":
            return self.step
        size = self._first_congruent
        while self._simulate(size) is None:
            size += self.step
        return size

    @property
    def _first_congruent(self) -> int:
        # Input sizes whose every pooling sees an even size: s = 2^L * m + c * (2^L - 1).
        c, scale = self._loss_per_level, self.step
        return c * (scale - 1) % scale or scale

    def _simulate(self, size: int) -> int | None:
        """Output size of a valid network for input `size`, or None if a layer is odd or empty."""
        c = self._loss_per_level
        for _ in range(self.depth - 1):
            size -= c
            if size <= 0 or size % 2:
                return None
            size //= 2
        size -= c
        if size <= 0:
            return None
        for _ in range(self.depth - 1):
            size = size * 2 - c
            if size <= 0:
                return None
        return size

    def is_legal(self, size: int) -> bool:
        """Whether an input tile of `size` pixels keeps every pooling on even sizes and a non-empty output."""
        if int(size) != size or size < 1:
            return False
        if self.padding == "same":
            return size % self.step == 0
        return self._simulate(int(size)) is not None

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

    def check(self, size: int, what: str = "tile size") -> int:
        """Return `size` if legal, else raise an `InputError` naming the two nearest legal sizes."""
        if self.is_legal(size):
            return int(size)
        lower, upper = self.nearest_legal(int(size))
        options = f"{lower} or {upper}" if lower is not None else f"{upper} (the smallest legal size)"
        raise InputError(
            f"{what} {size} is not legal for this network (depth {self.depth}, padding {self.padding!r}): "
            f"use {options}; legal sizes are {self.min_size} + k*{self.step}"
        )

    def output_size(self, input_size: int) -> int:
        """Output size for a legal input size."""
        self.check(input_size, "input size")
        if self.padding == "same":
            return int(input_size)
        out = self._simulate(int(input_size))
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

    @property
    def margin(self) -> int:
        """Context each output pixel needs on each side (the tiling overlap for padding='same')."""
        return self.border
