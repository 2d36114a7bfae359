"""Random training tiles whose input size is legal for the network's geometry.

Item i of a `TileDataset` is a pure function of (seed, i): its generator is
``np.random.default_rng([seed, i])``. Training can therefore resume exactly at any iteration, and the
number of DataLoader workers does not change what is seen. `get_tile_loader` yields the items
start..stop-1 in order; all randomness lives inside the items.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import InputError
from ..geometry import Geometry
from ..tiling import as_pair, extract_region
from .normalize import Normalization
from .samples import Sample, load_samples

TileSize = int | tuple[int, int]
AugmentFn = Callable[
    [np.ndarray, np.ndarray, np.ndarray | None, np.random.Generator],
    tuple[np.ndarray, np.ndarray, np.ndarray | None],
]


def _as_geometry(geometry: Any) -> Geometry:
    if isinstance(geometry, Geometry):
        return geometry
    inner = getattr(geometry, "geometry", None)  # a UNet carries its geometry
    if isinstance(inner, Geometry):
        return inner
    raise InputError(f"expected a Geometry or a UNet, got {type(geometry).__name__}")


def _takes_out_shape(augmenter: Any) -> bool:
    """Whether `augmenter` accepts an ``out_shape`` keyword (explicitly or through ``**kwargs``)."""
    try:
        parameters = inspect.signature(augmenter).parameters.values()
    except (TypeError, ValueError):  # no signature available (some builtins and extensions)
        return False
    return any(
        (p.name == "out_shape" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        or p.kind is p.VAR_KEYWORD
        for p in parameters
    )


def augment_margin(augmenter: Any, tile_shape: tuple[int, int]) -> int:
    """Extra context (pixels per side) so the augmenter's transforms never sample outside real data.

    For rotations the corners of the tile swing out to half its diagonal; the elastic field moves
    pixels by up to about 3 of its standard deviations; a zoom out by z divides both by z; a shift
    adds its maximum. An augmenter
    without a recognised ``config`` (``AugmentConfig``) gets no margin.

    Example:
        >>> from unetkit.augment import Augmenter, AugmentConfig
        >>> augment_margin(Augmenter(AugmentConfig()), (572, 572))  # 119 + 30 + 10
        159
    """
    if augmenter is None:
        return 0
    config = getattr(augmenter, "config", None)
    if config is None:
        return 0
    height, width = tile_shape
    reach = max(height, width) / 2 if getattr(config, "rotate90", False) else min(height, width) / 2
    if getattr(config, "rotate", False):
        reach = math.hypot(height, width) / 2
    # Zooming out by z samples the source at p / z: every reach grows by 1 / z.
    zoom = min(float(config.scale_range[0]), 1.0) if getattr(config, "scale", False) else 1.0
    elastic = 3 * float(getattr(config, "elastic_sigma", 0.0)) if getattr(config, "elastic", False) else 0.0
    extra = (reach + elastic) / zoom - min(height, width) / 2
    if getattr(config, "shift", False):
        extra += float(getattr(config, "shift_pixels", 0.0))
    return int(math.ceil(extra - 1e-9))


class TileDataset(Dataset):
    """Random tiles from annotated samples: {"image": (C, T, T), "target": (o, o), "weights": (o, o)}.

    Each item picks a sample with probability proportional to its pixel count and a uniformly random
    output window (o = ``geometry.output_size(T)``) inside it (an image smaller than the window is
    mirrored around it). The input window is the output window grown by the network's border on each
    side (``padding="valid"``) or the window itself (``padding="same"``), read with mirroring at
    the image edges. With an augmenter, the input window grown by `augment_margin` is extracted
    and augmented jointly (image, target, weights); target and weights are then centre-cropped to
    the output window. An augmenter that accepts ``out_shape`` (like ``Augmenter``) is called with
    ``out_shape=tile_shape``: its transform (the elastic grid included) spans the input tile, the
    margin is context it may sample from, and only the tile's pixels are resampled. Any other
    callable augments the whole grown window, which is then centre-cropped to the tile. Which of
    the two applies is read from the augmenter's signature once (``augment_window``).

    Args:
        samples: annotated samples (`load_samples`); all with the same number of channels.
        geometry: the model's `Geometry` (or the model itself).
        tile_size: input tile size T, or (height, width); must be legal for the geometry.
        augmenter: ``Augmenter`` or any callable (image, target, weights, rng) -> same, optionally
            taking an ``out_shape`` keyword; None for none.
        length: number of items (``len(dataset)``).
        seed: non-negative; item i uses ``np.random.default_rng([seed, i])``.
        margin: override the augmentation margin (pixels per side).

    Example:
        >>> from unetkit.data import make_sample
        >>> mask = np.zeros((60, 60), np.uint8); mask[20:40, 20:40] = 1
        >>> ds = TileDataset([make_sample(np.random.rand(60, 60), mask)], Geometry(depth=3), 44, length=4)
        >>> item = ds[0]
        >>> tuple(item["image"].shape), tuple(item["target"].shape), item["weights"].dtype
        ((1, 44, 44), (4, 4), torch.float32)
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        geometry: Geometry,
        tile_size: TileSize,
        augmenter: AugmentFn | None = None,
        length: int = 1000,
        seed: int = 0,
        *,
        margin: int | None = None,
    ) -> None:
        self.samples = list(samples)
        if not self.samples:
            raise InputError("no training samples; check the dataset folder and the validation split")
        channels = {s.image.shape[0] for s in self.samples}
        if len(channels) > 1:
            raise InputError(f"samples have different channel counts {sorted(channels)}; use all grayscale or all RGB")
        self.geometry = _as_geometry(geometry)
        height, width = as_pair(tile_size)
        self.tile_shape = (self.geometry.check(height, "tile height"), self.geometry.check(width, "tile width"))
        self.output_shape = (self.geometry.output_size(height), self.geometry.output_size(width))
        self.offset = ((height - self.output_shape[0]) // 2, (width - self.output_shape[1]) // 2)
        if int(length) != length or length < 0:
            raise InputError(f"length must be a non-negative integer, got {length!r}")
        if int(seed) != seed or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        self.length, self.seed = int(length), int(seed)
        self.augmenter = augmenter
        self.augment_window = augmenter is not None and _takes_out_shape(augmenter)
        self.margin = augment_margin(augmenter, self.tile_shape) if margin is None else int(margin)
        if self.margin < 0:
            raise InputError(f"margin must be >= 0, got {margin}")
        pixels = np.array([s.image.shape[1] * s.image.shape[2] for s in self.samples], np.float64)
        self.probabilities = pixels / pixels.sum()
        self._warn_small()

    def _warn_small(self) -> None:
        oh, ow = self.output_shape
        small = [s for s in self.samples if s.image.shape[1] < oh or s.image.shape[2] < ow]
        if small:
            names = ", ".join(f"{s.name} ({s.image.shape[1]}x{s.image.shape[2]})" for s in small[:5])
            more = f" and {len(small) - 5} more" if len(small) > 5 else ""
            warnings.warn(
                f"images smaller than the output tile {oh}x{ow} (tile size {self.tile_shape[0]}x"
                f"{self.tile_shape[1]}) are mirror-padded: {names}{more}. A smaller tile size avoids training "
                f"on mirrored copies (the smallest legal tile is {self.geometry.min_size})",
                UserWarning,
                stacklevel=3,
            )

    def __len__(self) -> int:
        return self.length

    def window(self, index: int) -> tuple[int, int, int]:
        """(sample index, y0, x0) of item `index`'s output window in sample coordinates."""
        rng = np.random.default_rng([self.seed, index])
        return self._window(rng)

    def _window(self, rng: np.random.Generator) -> tuple[int, int, int]:
        k = int(rng.choice(len(self.samples), p=self.probabilities))
        height, width = self.samples[k].image.shape[1:]
        y0 = _position(rng, height, self.output_shape[0])
        x0 = _position(rng, width, self.output_shape[1])
        return k, y0, x0

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"tile index {index} out of range 0..{self.length - 1}")
        rng = np.random.default_rng([self.seed, index])
        k, y0, x0 = self._window(rng)
        sample = self.samples[k]
        (th, tw), (oh, ow), (dy, dx), m = self.tile_shape, self.output_shape, self.offset, self.margin
        iy, ix, h, w = y0 - dy - m, x0 - dx - m, th + 2 * m, tw + 2 * m
        image = extract_region(sample.image, iy, ix, h, w)
        target = extract_region(sample.target, iy, ix, h, w)
        weights = extract_region(sample.weights, iy, ix, h, w)
        if self.augmenter is not None:
            # extract_region may return views of the sample; the augmenter must not change the sample.
            arrays = image.copy(), target.copy(), weights.copy()
            if self.augment_window:
                image, target, weights = self.augmenter(*arrays, rng, out_shape=self.tile_shape)
                m = 0  # the augmenter returned the tile itself
            else:
                image, target, weights = self.augmenter(*arrays, rng)
        image = image[:, m : m + th, m : m + tw]
        target = target[m + dy : m + dy + oh, m + dx : m + dx + ow]
        weights = weights[m + dy : m + dy + oh, m + dx : m + dx + ow]
        return {
            "image": torch.from_numpy(np.array(image, dtype=np.float32)),
            "target": torch.from_numpy(np.array(target, dtype=np.int64)),
            "weights": torch.from_numpy(np.array(weights, dtype=np.float32)),
        }


def _position(rng: np.random.Generator, size: int, window: int) -> int:
    """Uniform window start; a window larger than the image covers all of it (mirrored around)."""
    low, high = min(0, size - window), max(0, size - window)
    return int(rng.integers(low, high + 1))


class RangeSampler(Sampler[int]):
    """Indices start, start+1, ..., stop-1, in order.

    Example:
        >>> list(RangeSampler(3, 6))
        [3, 4, 5]
    """

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = int(start), int(stop)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class BatchShardSampler(Sampler[int]):
    """Rank `rank`'s share of each global batch of `batch_size` indices in start..stop-1, in order.

    Global batch k holds indices start + k * batch_size onwards; rank r of `world_size` takes its
    consecutive ``batch_size // world_size`` of them, so the ranks together see what one process
    sees, batch by batch. With one process this is `RangeSampler`.

    Example:
        >>> list(BatchShardSampler(0, 8, batch_size=4, rank=1, world_size=2))
        [2, 3, 6, 7]
    """

    def __init__(self, start: int, stop: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.start, self.stop, self.batch_size = int(start), int(stop), int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise InputError(f"rank {rank} must be in 0..{world_size - 1}")
        if self.batch_size % self.world_size:
            raise InputError(f"batch size {batch_size} must be a multiple of the {world_size} processes")
        if (self.stop - self.start) % self.batch_size and self.world_size > 1:
            raise InputError(f"range {start}..{stop} must hold whole batches of {batch_size} to be shared")
        self.share = self.batch_size // self.world_size

    def __iter__(self) -> Iterator[int]:
        for first in range(self.start, self.stop, self.batch_size):
            begin = first + self.rank * self.share
            yield from range(begin, min(begin + self.share, self.stop))

    def __len__(self) -> int:
        whole, part = divmod(max(0, self.stop - self.start), self.batch_size)
        return whole * self.share + part


def get_tile_dataset(
    samples: Sequence[Sample] | str | os.PathLike,
    geometry: Geometry,
    tile_size: TileSize,
    augmenter: AugmentFn | None = None,
    length: int = 1000,
    seed: int = 0,
    *,
    normalization: Normalization | None = None,
) -> TileDataset:
    """A `TileDataset` from samples or from a dataset folder (loaded with `load_samples`).

    Example:
        >>> ds = get_tile_dataset("my_dataset", Geometry(), 572)  # doctest: +SKIP
    """
    if isinstance(samples, (str, os.PathLike)):
        samples = load_samples(samples, normalization)
    return TileDataset(samples, geometry, tile_size, augmenter, length, seed)


def get_tile_loader(
    dataset: Dataset,
    batch_size: int = 1,
    num_workers: int = 0,
    start: int = 0,
    stop: int | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """DataLoader over items start..stop-1 of `dataset`, in order (stop defaults to ``len(dataset)``).

    Resuming at iteration n is ``get_tile_loader(dataset, start=n * batch_size)``. Workers are
    persistent when ``num_workers > 0``. The last batch may be smaller. With `world_size`
    processes, `batch_size` is the global batch and this loader yields rank `rank`'s share of
    each (`BatchShardSampler`).

    Example:
        >>> from unetkit.data import make_sample
        >>> mask = np.zeros((60, 60), np.uint8); mask[20:40, 20:40] = 1
        >>> ds = TileDataset([make_sample(np.random.rand(60, 60), mask)], Geometry(depth=3), 44, length=10)
        >>> [tuple(b["target"].shape) for b in get_tile_loader(ds, batch_size=2, start=6)]
        [(2, 4, 4), (2, 4, 4)]
    """
    size = len(dataset)  # type: ignore[arg-type]
    stop = size if stop is None else int(stop)
    if not 0 <= start <= stop <= size:
        raise InputError(f"loader range {start}..{stop} must satisfy 0 <= start <= stop <= {size} (dataset length)")
    if batch_size < 1 or num_workers < 0:
        raise InputError(f"batch_size must be >= 1 and num_workers >= 0 (got {batch_size}, {num_workers})")
    sampler = BatchShardSampler(start, stop, batch_size, rank, world_size) if world_size > 1 else RangeSampler(start, stop)
    return DataLoader(
        dataset,
        batch_size=batch_size // world_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # The loader seeds its workers from this generator, not from torch's global one, so starting
        # a loader (as a resumed run does) leaves the global random stream (dropout) untouched.
        generator=torch.Generator().manual_seed(0),
    )
