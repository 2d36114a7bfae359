"""Volumes: exact 3D overlap-tile prediction and one training step of a 3D U-Net.

The overlap-tile strategy of the paper (Fig. 2) carries over to volumes axis by axis: along each
of z, y and x the tiles are laid out by `unetkit.tiling.axis_layout` with that axis's own geometry
(`unetkit.geometry.VolumeGeometry.axes`), so every tile starts on the pooling grid of the
mirror-padded volume and the stitched output equals one pass of the network over the whole padded
volume, to float rounding. Only `extract_volume` touches voxels: it reads the bounding box of a
tile's window (a plain slice inside the volume) and mirrors it where it leaves the volume, so zarr,
Dask and memory-mapped volumes are read tile by tile.

Test-time augmentation uses the symmetries that respect anisotropy: flips of z, y and x, and
90-degree rotations in the xy plane only (16 transforms), each undone before averaging.

Example:
    >>> import numpy as np
    >>> from unetkit.network import UNet
    >>> net = UNet(dims=3, depth=2, base_channels=4, pool_kernels=[(1, 2, 2)], conv_kernels=[(1, 3, 3), (3, 3, 3)])
    >>> predict_volume(net, np.random.rand(9, 37, 41).astype("float32")).shape
    (2, 9, 37, 41)
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .errors import InputError
from .geometry import VOLUME_AXES, VolumeGeometry
from .loss import IGNORE_INDEX, weighted_cross_entropy
from .network import UNet
from .predict import LIVE_FLOATS_PER_PIXEL_AND_CHANNEL, DEFAULT_MEMORY_BUDGET
from .tiling import AxisLayout, axis_layout, reflect_indices, smallest_tile

Shape3 = tuple[int, int, int]

#: Number of test-time transforms: z flip x (identity, 3 xy rotations, and their x-flipped versions).
TTA_TRANSFORMS = 16


def extract_volume(array, start: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """The window `start` .. `start + shape` of the last three axes, mirrored where it leaves the array.

    `array` is (Z, Y, X) or (C, Z, Y, X) and anything indexable like a NumPy array (zarr, Dask,
    memory maps): only the bounding box of the voxels the window needs is read.

    Example:
        >>> extract_volume(np.arange(4)[None, None], (0, 0, -2), (1, 1, 7)).tolist()
        [[[2, 1, 0, 1, 2, 3, 2]]]
    """
    sizes = [int(s) for s in array.shape[-3:]]
    index = [reflect_indices(int(s0), int(n), size) for s0, n, size in zip(start, shape, sizes)]
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in index)
    window = np.asarray(array[(..., *box)])
    inside = all(0 <= s0 and s0 + n <= size for s0, n, size in zip(start, shape, sizes))
    if inside:
        return window
    local = [i - b.start for i, b in zip(index, box)]
    return window[..., local[0], :, :][..., local[1], :][..., local[2]]


@dataclass(frozen=True)
class VolumeTile:
    """One tile: its input window starts at `start` (volume coordinates, may be outside: mirrored);
    its output, cropped at `crop` to `size`, is written at `out_start`."""

    start: Shape3
    out_start: Shape3
    size: Shape3
    crop: Shape3


@dataclass(frozen=True)
class VolumePlan:
    """How a volume of `volume_shape` is cut into tiles of `tile_shape` (see `plan_volume`)."""

    volume_shape: Shape3
    tile_shape: Shape3
    output_shape: Shape3
    stride: Shape3
    tiles: tuple[VolumeTile, ...]

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self) -> Iterator[VolumeTile]:
        return iter(self.tiles)


def _as_shape(value: int | Sequence[int], name: str) -> Shape3:
    if isinstance(value, (int, np.integer)):
        return (int(value),) * 3  # type: ignore[return-value]
    try:
        z, y, x = (int(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be an int or (z, y, x), got {value!r}") from None
    return z, y, x


def smallest_volume_tile(geometry: VolumeGeometry) -> Shape3:
    """The smallest tile (z, y, x) that can tile a volume: per axis, the smallest legal size whose
    output spans at least one pooling step (`unetkit.tiling.smallest_tile` of each axis).

    Example:
        >>> smallest_volume_tile(VolumeGeometry(((1, 2, 2),), ((1, 3, 3), (3, 3, 3))))
        (5, 18, 18)
    """
    return tuple(smallest_tile(axis) for axis in geometry.axes)  # type: ignore[arg-type, return-value]


def thin_axis(volume_shape: Sequence[int], geometry: VolumeGeometry) -> tuple[int, int, int] | None:
    """(axis index, size, smallest tile) of the first axis along which a volume of `volume_shape`
    is thinner than the network's smallest tile (`smallest_volume_tile`), or None.

    Example:
        >>> thin_axis((4, 40, 44), VolumeGeometry(((1, 2, 2),), ((1, 3, 3), (3, 3, 3))))
        (0, 4, 5)
    """
    for axis, (size, need) in enumerate(zip(volume_shape, smallest_volume_tile(geometry))):
        if int(size) < need:
            return axis, int(size), need
    return None


def _check_extent(volume_shape: Sequence[int], geometry: VolumeGeometry) -> None:
    thin = thin_axis(volume_shape, geometry)
    if thin is not None:
        axis, size, need = thin
        name, step = VOLUME_AXES[axis], geometry.step[axis]
        raise InputError(
                f"the volume has {size} voxels along {name} but this network's smallest tile has {need} "
                f"(it pools {name} by {step} in all): plan the network for the volume's spacing "
                f"(unetkit.geometry.plan_kernels pools {name} less), or mirror-pad the volume to {need} along {name}"
            )


def plan_volume(volume_shape: Sequence[int], geometry: VolumeGeometry, tile_shape: int | Sequence[int]) -> VolumePlan:
    """Cut a volume of `volume_shape` (Z, Y, X) into tiles whose outputs cover it without gaps.

    Along each axis the layout is `unetkit.tiling.axis_layout` with that axis's geometry: outputs
    advance by a multiple of the axis's pooling step and the last tile reaches past the volume
    (mirrored input) instead of being pulled inward, which would leave the pooling grid.

    Example:
        >>> g = VolumeGeometry(((1, 2, 2),), ((1, 3, 3), (3, 3, 3)))
        >>> plan = plan_volume((9, 37, 41), g, (6, 20, 22))
        >>> plan.output_shape, plan.stride, len(plan)
        ((2, 4, 6), (2, 4, 6), 350)
    """
    shape = _as_shape(tuple(volume_shape)[-3:], "volume shape")
    if min(shape) < 1:
        raise InputError(f"the volume must not be empty (got shape {tuple(volume_shape)})")
    tile = geometry.check(_as_shape(tile_shape, "tile_shape"), "tile shape")
    _check_extent(shape, geometry)
    layouts: list[AxisLayout] = [axis_layout(size, t, axis) for size, t, axis in zip(shape, tile, geometry.axes)]

    def extents(layout: AxisLayout) -> list[tuple[int, int]]:
        starts = layout.starts()
        ends = starts[1:] + [layout.size]
        return [(start, end - start) for start, end in zip(starts, ends)]

    tiles = tuple(
        VolumeTile(
            start=tuple(o - layout.context for (o, _), layout in zip(parts, layouts)),  # type: ignore[arg-type]
            out_start=tuple(o for o, _ in parts),  # type: ignore[arg-type]
            size=tuple(n for _, n in parts),  # type: ignore[arg-type]
            crop=tuple(layout.keep for layout in layouts),  # type: ignore[arg-type]
        )
        for parts in itertools.product(*(extents(layout) for layout in layouts))
    )
    return VolumePlan(
        volume_shape=shape,
        tile_shape=tile,
        output_shape=tuple(layout.output for layout in layouts),  # type: ignore[arg-type]
        stride=tuple(layout.stride for layout in layouts),  # type: ignore[arg-type]
        tiles=tiles,
    )


def volume_activation_bytes(model: UNet, tile_shape: Sequence[int], batch_size: int = 1) -> int:
    """Estimated peak activation memory of an inference pass over `batch_size` tiles of `tile_shape`
    (the 2D estimate of `unetkit.predict` per voxel instead of per pixel)."""
    base = int(model.config["base_channels"])
    return 4 * LIVE_FLOATS_PER_PIXEL_AND_CHANNEL * base * math.prod(int(s) for s in tile_shape) * int(batch_size)


def choose_volume_tile(
    model: UNet, volume_shape: Sequence[int], *, memory_budget: int | None = None, batch_size: int = 1
) -> Shape3:
    """The legal tile (z, y, x) that needs the least computation for `volume_shape` within the budget.

    The cost of a plan is its number of tiles times the tile volume (larger tiles recompute less
    of their context); tiles never grow past what covers the volume in one pass. `memory_budget`
    (bytes of activations, `volume_activation_bytes`) defaults to 1 GiB, or a quarter of the
    available memory if that is less; if even the smallest tile exceeds it, the smallest is used.

    Example:
        >>> net = UNet(dims=3, depth=2, base_channels=4, pool_kernels=[(1, 2, 2)], conv_kernels=[(1, 3, 3), (3, 3, 3)])
        >>> choose_volume_tile(net, (9, 37, 41)), choose_volume_tile(net, (9, 37, 41), memory_budget=2_000_000)
        ((13, 54, 58), (13, 36, 38))
    """
    geometry = _volume_geometry(model)
    if memory_budget is None:
        memory_budget = DEFAULT_MEMORY_BUDGET
        with contextlib.suppress(Exception):
            import psutil

            memory_budget = min(memory_budget, psutil.virtual_memory().available // 4)
    per_voxel = volume_activation_bytes(model, (1, 1, 1), batch_size)
    smallest = smallest_volume_tile(geometry)
    sizes, counts = [], []
    for size, axis, low in zip(volume_shape, geometry.axes, smallest):
        options = [s for s in axis.legal_sizes(axis.input_size(int(size))) if s >= low]
        sizes.append(np.array(options, dtype=np.float64))
        counts.append(np.array([axis_layout(int(size), s, axis).count for s in options], dtype=np.float64))
    voxels = sizes[0][:, None, None] * sizes[1][None, :, None] * sizes[2][None, None, :]
    cost = counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :] * voxels
    cost[voxels * per_voxel > memory_budget] = np.inf
    if not np.isfinite(cost).any():
        return smallest
    i, j, k = np.unravel_index(np.argmin(cost), cost.shape)
    return int(sizes[0][i]), int(sizes[1][j]), int(sizes[2][k])


def tta_transforms(geometry: VolumeGeometry) -> list[int]:
    """Indices of the test-time transforms that respect `geometry`: all 16 when y and x have the
    same geometry; else the 8 flips, because an xy rotation would swap axes pooled differently."""
    alike = geometry.axes[1] == geometry.axes[2]
    return [t for t in range(TTA_TRANSFORMS) if alike or t % 4 == 0]


def transform_volume(x: torch.Tensor, index: int, inverse: bool = False) -> torch.Tensor:
    """The `index`-th of 16 transforms of the last three axes (z, y, x), or its inverse.

    index = 8 * zflip + 4 * xflip + k: flip z if zflip, flip x if xflip, then rotate by k * 90
    degrees in the yx plane. Index 0 is the identity.

    Example:
        >>> x = torch.arange(24.0).reshape(2, 3, 4)
        >>> all(torch.equal(transform_volume(transform_volume(x, t), t, inverse=True), x) for t in range(16))
        True
    """
    k, flip_x, flip_z = index % 4, (index // 4) % 2 == 1, index >= 8
    flips = tuple(d for d, on in ((-3, flip_z), (-1, flip_x)) if on)
    if not inverse:
        x = torch.flip(x, dims=flips) if flips else x
        return torch.rot90(x, k, dims=(-2, -1)) if k else x
    x = torch.rot90(x, -k, dims=(-2, -1)) if k else x
    return torch.flip(x, dims=flips) if flips else x


def _volume_geometry(model: UNet) -> VolumeGeometry:
    if not isinstance(model, UNet):
        raise TypeError(f"model must be a unetkit.UNet, got {type(model).__name__}")
    if not isinstance(model.geometry, VolumeGeometry):
        raise InputError(
            "the model is a 2D UNet: use unetkit.predict on each slice, or a UNet(dims=3) for volumes"
        )
    return model.geometry


def _as_czyx(volume, in_channels: int):
    """Validate a volume (Z, Y, X) or (C, Z, Y, X); returns it (lazily indexable arrays stay lazy)."""
    if isinstance(volume, torch.Tensor):
        volume = volume.detach().cpu().numpy()
    if not hasattr(volume, "shape") or not hasattr(volume, "ndim"):
        volume = np.asarray(volume)
    if volume.ndim == 2:
        raise InputError(
            f"got a 2D image {tuple(volume.shape)} but the model is 3D: use a 2D UNet with unetkit.predict, "
            "or give a volume (Z, Y, X)"
        )
    if volume.ndim not in (3, 4) or (volume.ndim == 3 and in_channels != 1):
        layout = "(Z, Y, X) or (C, Z, Y, X)" if in_channels == 1 else f"({in_channels}, Z, Y, X)"
        raise InputError(f"the volume must be {layout}, got shape {tuple(volume.shape)}")
    if volume.ndim == 4 and int(volume.shape[0]) != in_channels:
        raise InputError(f"the volume has {volume.shape[0]} channel(s) but the model expects {in_channels}")
    if any(int(s) == 0 for s in volume.shape):
        raise InputError(f"the volume is empty (shape {tuple(volume.shape)})")
    return volume


def predict_volume(
    model: UNet,
    volume,
    *,
    tile_shape: int | Sequence[int] | None = None,
    batch_size: int = 1,
    tta: bool = False,
    device: str | torch.device | None = None,
    memory_budget: int | None = None,
    out=None,
    pad_thin: bool = False,
    tiles: Sequence[int] | None = None,
    on_batch: Callable[[list[int]], None] | None = None,
) -> np.ndarray:
    """Class probabilities for a volume of any size, by seamless 3D overlap-tile prediction.

    The volume is mirrored at its borders and cut into tiles (`plan_volume`) whose softmax outputs
    are stitched into one array; the result equals one pass of the network over the whole
    mirror-padded volume to float rounding (valid padding).

    Args:
        model: a `UNet(dims=3)`; its training/eval mode is restored afterwards.
        volume: (Z, Y, X) or (C, Z, Y, X), a NumPy array, torch tensor or lazily indexable array
            (zarr, Dask, memory map: read tile by tile), normalised as in training.
        tile_shape: legal input tile (z, y, x) or one size for all axes; None picks the cheapest
            tile within `memory_budget` (`choose_volume_tile`).
        batch_size: tiles per forward pass (>= 1).
        tta: average over the transforms of `tta_transforms` (flips of z, y, x and xy rotations),
            each undone before averaging.
        device: where to run; None uses the model's device. The model is moved there.
        memory_budget: bytes of activations allowed when `tile_shape` is None.
        out: writable array-like (n_classes, Z, Y, X) to write into (zarr, memmap) instead of a
            new array.
        pad_thin: mirror a volume thinner than the network's smallest tile along an axis out to
            that size first (its voxels are then predicted from mirrored context); without it
            such a volume is refused with a message that says so.
        tiles: indices into the tile plan (`plan_volume`) to predict (default all): with `out`,
            this resumes a partial result.
        on_batch: called with the plan indices of each batch once it is written to `out`.

    Returns:
        float32 array (n_classes, Z, Y, X), or `out` when given.

    Example:
        >>> net = UNet(dims=3, depth=2, base_channels=4, pool_kernels=[(1, 2, 2)], conv_kernels=[(1, 3, 3), (3, 3, 3)])
        >>> probs = predict_volume(net, np.random.rand(5, 20, 21).astype(np.float32), tta=True)
        >>> probs.shape, bool(np.allclose(probs.sum(0), 1.0, atol=1e-5))
        ((2, 5, 20, 21), True)
    """
    geometry = _volume_geometry(model)
    if int(batch_size) != batch_size or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1 (got {batch_size})")
    volume = _as_czyx(volume, model.in_channels)
    shape: Shape3 = tuple(int(s) for s in volume.shape[-3:])  # type: ignore[assignment]
    smallest = smallest_volume_tile(geometry)
    if pad_thin and any(s < n for s, n in zip(shape, smallest)):
        if tiles is not None:
            raise InputError("tiles= selects tiles of the volume's own plan; give a volume at least the smallest tile, "
                             "without pad_thin")
        grown = tuple(max(s, n) for s, n in zip(shape, smallest))
        before = tuple((g - s) // 2 for g, s in zip(grown, shape))
        padded = extract_volume(volume, tuple(-b for b in before), grown)
        probs = predict_volume(model, padded, tile_shape=tile_shape, batch_size=batch_size, tta=tta, device=device,
                               memory_budget=memory_budget)
        inner = probs[(slice(None), *(slice(b, b + s) for b, s in zip(before, shape)))]
        if out is None:
            return np.ascontiguousarray(inner)
        out[...] = inner
        return out
    _check_extent(shape, geometry)
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    tile = (
        _as_shape(tile_shape, "tile_shape")
        if tile_shape is not None
        else choose_volume_tile(model, shape, memory_budget=memory_budget, batch_size=int(batch_size))
    )
    plan = plan_volume(shape, geometry, tile)
    if out is not None and tuple(out.shape) != (model.n_classes, *shape):
        raise InputError(f"out has shape {tuple(out.shape)}; it must be (n_classes, Z, Y, X) = {(model.n_classes, *shape)}")
    output = np.empty((model.n_classes, *shape), dtype=np.float32) if out is None else out
    transforms = tta_transforms(geometry) if tta else [0]
    todo = list(range(len(plan))) if tiles is None else [int(i) for i in tiles]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for first in range(0, len(todo), int(batch_size)):
                indices = todo[first : first + int(batch_size)]
                batch = [plan.tiles[i] for i in indices]
                windows = [extract_volume(volume, t.start, plan.tile_shape) for t in batch]
                array = np.stack([w if w.ndim == 4 else w[None] for w in windows]).astype(np.float32, copy=False)
                if not np.isfinite(array).all():
                    raise InputError("the volume contains NaN or infinite values; replace them before predicting")
                x = torch.from_numpy(array).to(device)
                total = None
                for index in transforms:
                    p = transform_volume(torch.softmax(model(transform_volume(x, index)), dim=1), index, inverse=True)
                    total = p if total is None else total + p
                assert total is not None
                probs = (total / len(transforms)).float().cpu().numpy()
                for t, p in zip(batch, probs):
                    (z, y, x0), (dz, dy, dx), (cz, cy, cx) = t.out_start, t.size, t.crop
                    output[:, z : z + dz, y : y + dy, x0 : x0 + dx] = p[:, cz : cz + dz, cy : cy + dy, cx : cx + dx]
                if on_batch is not None:
                    on_batch(indices)
    finally:
        model.train(was_training)
    return output


def sparse_target(target: np.ndarray, unlabelled: np.ndarray) -> np.ndarray:
    """`target` (int) with `IGNORE_INDEX` where `unlabelled` is True: the input of a sparse-annotation loss.

    Example:
        >>> sparse_target(np.array([[0, 1, 1]]), np.array([[False, True, False]])).tolist()
        [[0, -1, 1]]
    """
    target = np.asarray(target)
    unlabelled = np.asarray(unlabelled, dtype=bool)
    if target.shape != unlabelled.shape:
        raise InputError(f"target {target.shape} and unlabelled mask {unlabelled.shape} differ in shape")
    return np.where(unlabelled, IGNORE_INDEX, target).astype(np.int64)


def train_step(
    model: UNet,
    optimizer: torch.optim.Optimizer,
    image: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> float:
    """One optimisation step on a batch: forward, weighted cross-entropy ignoring unlabelled voxels, backward, step.

    Voxels whose target is `IGNORE_INDEX` (sparse annotation, Cicek et al. 2016) get no loss and
    no gradient; the loss is the mean over the labelled voxels.

    Args:
        model: a UNet (2D or 3D); it is put in training mode.
        optimizer: over the model's parameters.
        image: (N, C, D, H, W) float input tiles (legal shape).
        target: (N, d, h, w) int64 classes of the output window, `IGNORE_INDEX` where unlabelled.
        weights: (N, d, h, w) weight map (`unetkit.targets.make_targets_3d`), or None.

    Returns:
        The loss before the step.

    Example:
        >>> net = UNet(dims=3, depth=2, base_channels=4, pool_kernels=[(1, 2, 2)], conv_kernels=[(1, 3, 3), (3, 3, 3)])
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99)
        >>> loss = train_step(net, opt, torch.rand(1, 1, 5, 18, 18), torch.ones(1, 1, 2, 2, dtype=torch.long))
        >>> loss > 0
        True
    """
    model.train()
    logits = model(image)
    if tuple(logits.shape[2:]) != tuple(target.shape[1:]):
        raise InputError(
            f"target {tuple(target.shape)} does not match the network's output {tuple(logits.shape)}: "
            "crop the target to the output window (geometry.output_shape of the input)"
        )
    loss = weighted_cross_entropy(logits, target, weights, ignore_index=IGNORE_INDEX)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
