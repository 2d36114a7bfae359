"""Overlap-tile plans, mirror extrapolation and stitching (paper Fig. 2).

A tile plan is a pure function of (image shape, geometry, tile size): it lists, for every tile,
where its input window starts in image coordinates (possibly outside the image: those pixels are
mirrored) and which output pixels it contributes. Because nothing here touches pixel data except
`extract_region`, the same plan serves NumPy arrays, memory maps and chunked arrays (zarr, Dask).

Exactness: tiles start at multiples of the geometry's `step` from the origin of the mirror-padded
image, so every 2x2 pooling of a tile sees the same windows as one pass over the whole padded image.
Output tiles therefore stitch into exactly the whole-image result, with no seams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .errors import InputError
from .geometry import Geometry


def reflect_indices(start: int, length: int, size: int) -> np.ndarray:
    """Indices `start .. start+length-1` folded into `[0, size)` by mirroring without repeating the edge.

    This is NumPy's "reflect" padding mode as an index map, valid for any distance from the image.

    Example:
        >>> reflect_indices(-3, 9, 4).tolist()
        [3, 2, 1, 0, 1, 2, 3, 2, 1]
    """
    index = np.arange(start, start + length)
    if size == 1:
        return np.zeros(length, dtype=np.intp)
    period = 2 * (size - 1)
    index = np.mod(index, period)
    return np.where(index >= size, period - index, index).astype(np.intp)


def with_channel_axis(image):
    """A (C, H, W) image as it is; a 2D one as (1, H, W): a NumPy array as a view, a lazy array
    (zarr, Dask, memmap) wrapped so that it still reads only the windows asked for.

    Example:
        >>> with_channel_axis(np.zeros((4, 5))).shape
        (1, 4, 5)
    """
    if image.ndim != 2:
        return image
    return image[None] if isinstance(image, np.ndarray) else _AddChannel(image)


class _AddChannel:
    """A view of a 2D array-like (zarr, Dask, memmap) as (1, H, W) that reads lazily."""

    def __init__(self, array) -> None:
        self.array = array
        self.shape = (1, *array.shape)
        self.ndim = 3

    def __getitem__(self, key):
        if not isinstance(key, tuple) or key[0] is not Ellipsis:
            raise IndexError("only [..., rows, cols] indexing is supported")
        return np.asarray(self.array[key])[None]


def extract_region(array, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """The window [y0:y0+height, x0:x0+width] of the last two axes, mirrored where it leaves the array.

    Works on anything indexable like a NumPy array (memory maps; zarr and Dask arrays read only the
    window). Windows inside the array are plain slices.

    Example:
        >>> extract_region(np.arange(5)[None], -2, -2, 1, 6).tolist()
        [[2, 1, 0, 1, 2, 3]]
    """
    h, w = array.shape[-2:]
    if y0 >= 0 and x0 >= 0 and y0 + height <= h and x0 + width <= w:
        return np.asarray(array[..., y0 : y0 + height, x0 : x0 + width])
    ys = reflect_indices(y0, height, h)
    xs = reflect_indices(x0, width, w)
    # Read the bounding box of the needed pixels once, then mirror inside it.
    y_lo, y_hi, x_lo, x_hi = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = np.asarray(array[..., y_lo:y_hi, x_lo:x_hi])
    return box[..., ys - y_lo, :][..., xs - x_lo]


@dataclass(frozen=True)
class Tile:
    """One tile of a plan, in image coordinates.

    The input window is `[in_y : in_y + in_h, in_x : in_x + in_w]` (may extend past the image:
    mirrored). The tile's output, cropped to `[crop_y : crop_y + out_h, crop_x : crop_x + out_w]`,
    is written to the image region `[out_y : out_y + out_h, out_x : out_x + out_w]`.
    """

    in_y: int
    in_x: int
    out_y: int
    out_x: int
    out_h: int
    out_w: int
    crop_y: int
    crop_x: int


@dataclass(frozen=True)
class TilePlan:
    """How an image of `image_shape` is cut into tiles of `tile_shape` (see `plan_tiles`)."""

    image_shape: tuple[int, int]
    tile_shape: tuple[int, int]
    output_shape: tuple[int, int]
    stride: tuple[int, int]
    tiles: tuple[Tile, ...]

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self) -> Iterator[Tile]:
        return iter(self.tiles)

    def batches(self, batch_size: int) -> Iterator[Sequence[Tile]]:
        """Tiles in groups of at most `batch_size`."""
        for start in range(0, len(self.tiles), batch_size):
            yield self.tiles[start : start + batch_size]


def as_pair(size: int | Sequence[int], name: str = "tile_size") -> tuple[int, int]:
    """`n` -> `(n, n)`; `(h, w)` unchanged; InputError for anything else.

    Example:
        >>> as_pair(572), as_pair((188, 204))
        ((572, 572), (188, 204))
    """
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    try:
        height, width = size  # type: ignore[misc]
        return int(height), int(width)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be an int or (height, width), got {size!r}") from None


def same_margin(geometry: Geometry) -> int:
    """Overlap kept on each side of a tile for padding="same": the margin rounded up to the step."""
    return -(-geometry.margin // geometry.step) * geometry.step


@dataclass(frozen=True)
class AxisLayout:
    """How one image axis of `size` pixels is covered by tiles of `tile` input pixels."""

    size: int
    tile: int
    output: int  # output pixels of one tile
    stride: int  # distance between consecutive tiles (a multiple of the geometry's step)
    context: int  # input pixels before the first output pixel of a tile
    keep: int  # offset of the kept region inside the tile's output

    @property
    def count(self) -> int:
        """Number of tiles along the axis (a very large number if the tile cannot tile the axis)."""
        if self.size <= self.output:
            return 1
        if self.stride == 0:
            return 2**62
        return 1 + -(-(self.size - self.output) // self.stride)

    def starts(self) -> list[int]:
        if self.count == 2**62:
            raise InputError(
                f"tile size {self.tile} gives only {self.output} output pixels, fewer than the pooling step, "
                f"so tiles cannot cover {self.size} pixels on the pooling grid; use a larger tile size"
            )
        return [k * self.stride for k in range(self.count)]


def smallest_tile(geometry: Geometry) -> int:
    """The smallest legal input size that can tile an image: its output (valid padding) or its
    kept centre (same padding) spans at least one pooling step.

    Example:
        >>> from unetkit.geometry import Geometry
        >>> Geometry(depth=5).min_size, smallest_tile(Geometry(depth=5))
        (188, 204)
    """
    size = geometry.min_size
    while (geometry.output_size(size) if geometry.padding == "valid" else size - 2 * same_margin(geometry)) < geometry.step:
        size += geometry.step
    return size


def check_tile(geometry: Geometry, tile: int, what: str = "tile size") -> int:
    """`tile` if it is legal and can tile an image (see `smallest_tile`), else InputError naming the fix.

    Example:
        >>> from unetkit.geometry import Geometry
        >>> check_tile(Geometry(depth=5), 188, "--tile-size")
        Traceback (most recent call last):
        ...
        unetkit.errors.InputError: --tile-size 188 is legal for the network but too small to tile an image (its output tiles would be narrower than the pooling step, 16 pixels); use 204 or larger
    """
    geometry.check(tile, what)
    smallest = smallest_tile(geometry)
    if tile < smallest:
        raise InputError(f"{what} {tile} is legal for the network but too small to tile an image (its output tiles would be "
                         f"narrower than the pooling step, {geometry.step} pixels); use {smallest} or larger")
    return int(tile)


def axis_layout(size: int, tile: int, geometry: Geometry) -> AxisLayout:
    """Tiling arithmetic along one axis; `tile` must be legal for `geometry`."""
    geometry.check(tile, "tile size")
    if geometry.padding == "valid":
        output, context, keep = geometry.output_size(tile), geometry.border, 0
    else:
        margin = same_margin(geometry)
        output, context, keep = tile - 2 * margin, margin, margin
        if output < 1:
            raise InputError(
                f"tile size {tile} leaves no centre after the {margin}-pixel overlap on each side; "
                f"use a tile of at least {2 * margin + geometry.step}"
            )
    stride = output // geometry.step * geometry.step
    return AxisLayout(int(size), int(tile), output, stride, context, keep)


def plan_tiles(image_shape: Sequence[int], geometry: Geometry, tile_size: int | Sequence[int]) -> TilePlan:
    """Cut an image of `image_shape` (H, W) into tiles whose outputs cover it without gaps.

    Output tiles are laid out with a stride that is a multiple of `geometry.step`, so every input
    window starts on the pooling grid of the mirror-padded image; the last row and column of tiles
    reach past the image (mirrored input) rather than being pulled inward, which would shift them off
    the grid. For `padding="valid"` the input window of an output tile is the tile grown by
    `geometry.border` on each side. For `padding="same"` neighbouring tiles overlap by
    `geometry.margin` (rounded up to the step) on each side and only their centres are kept.

    Example:
        >>> plan = plan_tiles((500, 300), Geometry(depth=5), 572)
        >>> plan.output_shape, plan.stride, len(plan)
        ((388, 388), (384, 384), 2)
    """
    height, width = (int(s) for s in image_shape[-2:])
    if height < 1 or width < 1:
        raise InputError(f"image must not be empty (got shape {tuple(image_shape)})")
    tile_h, tile_w = as_pair(tile_size)
    rows = axis_layout(height, tile_h, geometry)
    cols = axis_layout(width, tile_w, geometry)

    def extents(layout: AxisLayout) -> list[tuple[int, int]]:
        # Each tile writes `stride` pixels, the last one everything up to the image edge.
        starts = layout.starts()
        ends = starts[1:] + [layout.size]
        return [(start, end - start) for start, end in zip(starts, ends)]

    tiles = tuple(
        Tile(
            in_y=oy - rows.context,
            in_x=ox - cols.context,
            out_y=oy,
            out_x=ox,
            out_h=out_h,
            out_w=out_w,
            crop_y=rows.keep,
            crop_x=cols.keep,
        )
        for oy, out_h in extents(rows)
        for ox, out_w in extents(cols)
    )
    return TilePlan(
        image_shape=(height, width),
        tile_shape=(tile_h, tile_w),
        output_shape=(rows.output, cols.output),
        stride=(rows.stride, cols.stride),
        tiles=tiles,
    )
