"""Batch norm with the statistics of the image being segmented (test-time adaptation).

A network trained with batch norm normalises, at prediction, with the running statistics of its
training tiles. On EM those tiles went through strong gray-value augmentation, and one slice whose
membranes are fainter than the training slices' then loses them: two cells merge and the Rand
error jumps (ISBI 2012 slice 20). Normalising each layer with the statistics of the image itself
(AdaBN, Li et al. 2016, "Revisiting batch normalization for practical domain adaptation") adapts
the network to that image. The statistics are gathered over the image's own overlap tiles, then
fixed, so every tile of the image is normalised alike and overlap-tile prediction stays seamless.

The statistics are a value (`BatchNormStatistics`): gathered once (`gather_statistics`, reading
the image window by window, so it may be larger than memory), then applied to a copy of the
network (`with_statistics`), handed to `predict(..., norm_statistics=stats)` (any backend), or
shipped to Dask workers that predict the image block by block.

Whether a model predicts better this way is chosen on its validation images at the end of
training and stored in its labels rule (`DecisionRule.image_statistics`).

Example:
    >>> import numpy as np
    >>> from unetkit import UNet
    >>> net = UNet(depth=2, base_channels=4, batch_norm=True)
    >>> stats = gather_statistics(net, np.random.rand(40, 40).astype("float32"), 44)
    >>> len(stats), stats.tiles, stats.tile_shape
    (6, 4, (44, 44))
    >>> adapted = with_statistics(net, stats)
    >>> adapted is not net and has_batch_norm(adapted)
    True
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import InputError
from .network import UNet
from .tiling import TilePlan, as_pair, extract_region, plan_tiles, with_channel_axis

NORM_STATISTICS = ("training", "image")
#: At most this many tiles are gathered over. A larger plan (an image of more than about 64 tiles,
#: e.g. a 16384 x 16384 slide) uses this many, spread evenly over it (`statistics_tiles`): the
#: statistics of 64 tiles of a few hundred pixels each are already close to the whole image's, and
#: gathering stays a fixed, small cost. Below the cap every tile is used.
MAX_STATISTICS_TILES = 64


def batch_norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batch_norm(model: nn.Module) -> bool:
    """Whether `model` has batch-norm layers (whose statistics `with_statistics` can replace)."""
    return bool(batch_norm_layers(model))


@dataclass(frozen=True, eq=False)
class BatchNormStatistics:
    """Each batch-norm layer's mean and variance (float32, in `batch_norm_layers` order), and how
    they were gathered: input tile shape, tiles used, tiles in the image's plan.

    Picklable and immutable (the arrays are read-only), so one value can travel to Dask workers.
    Two values are equal when their arrays are equal bit for bit; `fingerprint` names them.
    """

    means: tuple[np.ndarray, ...]
    variances: tuple[np.ndarray, ...]
    tile_shape: tuple[int, int]
    tiles: int
    plan_size: int

    def __post_init__(self) -> None:
        if len(self.means) != len(self.variances):
            raise ValueError(f"{len(self.means)} means but {len(self.variances)} variances")
        for name in ("means", "variances"):
            arrays = tuple(np.array(a, dtype=np.float32) for a in getattr(self, name))
            for a in arrays:
                a.setflags(write=False)
            object.__setattr__(self, name, arrays)
        object.__setattr__(self, "tile_shape", as_pair(self.tile_shape))

    def __len__(self) -> int:
        return len(self.means)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the means and variances (a cache key for graphs, sessions, adapted copies)."""
        digest = hashlib.sha256()
        for a in (*self.means, *self.variances):
            digest.update(str(a.shape).encode())
            digest.update(np.ascontiguousarray(a).tobytes())
        return digest.hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BatchNormStatistics):
            return NotImplemented
        return (self.tile_shape, self.tiles, self.plan_size) == (other.tile_shape, other.tiles, other.plan_size) and (
            self.fingerprint == other.fingerprint
        )

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return (f"BatchNormStatistics({len(self)} layers, tile_shape={self.tile_shape}, "
                f"tiles={self.tiles} of {self.plan_size})")


def statistics_tiles(plan_size: int, cap: int | None = None) -> list[int]:
    """Indices of the plan's tiles to gather statistics over: all, or `cap` (default
    `MAX_STATISTICS_TILES`) spread evenly from the first to the last.

    Example:
        >>> statistics_tiles(5), statistics_tiles(10, cap=4)
        ([0, 1, 2, 3, 4], [0, 3, 6, 9])
    """
    cap = MAX_STATISTICS_TILES if cap is None else int(cap)
    if plan_size <= cap:
        return list(range(plan_size))
    return [int(i) for i in np.linspace(0, plan_size - 1, cap).round()]


def _chw(image):
    """`image` as something indexable as (C, H, W) that reads only the windows asked for."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if image.ndim not in (2, 3):
        raise InputError(f"image must be 2D (H, W) or (C, H, W), got shape {tuple(image.shape)}")
    return with_channel_axis(image)


def gather_statistics(
    model: UNet,
    image,
    tile_shape: int | tuple[int, int],
    *,
    progress: bool = False,
    callback: Callable[[int, int], None] | None = None,
) -> BatchNormStatistics:
    """Each batch-norm layer's mean and variance over `image`'s input tiles (the plan `predict` uses).

    Each layer's value is the average over the tiles of the per-tile statistics (variance
    unbiased), computed one tile at a time without gradients, on the model's device. The image
    is read window by window (`tiling.extract_region`), so it may be a lazy array (zarr, Dask,
    `bigimage.LazyImage`) larger than memory; a plan of more than `MAX_STATISTICS_TILES` tiles
    uses that many, spread evenly (`statistics_tiles`). `model` is not changed. A model without
    batch norm gives statistics of no layers.

    Args:
        model: a `UNet`.
        image: (C, H, W) or (H, W) array or lazy array-like, normalised as for `predict`.
        tile_shape: legal input tile size, the one `predict` will use (`predict_plan` shows it).
        progress: show a progress bar over the tiles.
        callback: called after each tile with (tiles done, tiles to do); raising from it cancels.
    """
    tile_shape = as_pair(tile_shape)
    image = _chw(image)
    plan = plan_tiles((int(image.shape[-2]), int(image.shape[-1])), model.geometry, tile_shape)
    chosen = statistics_tiles(len(plan))
    layers = batch_norm_layers(model)
    if not layers:
        return BatchNormStatistics((), (), tile_shape, len(chosen), len(plan))
    gathering = copy.deepcopy(model).eval()
    layers = batch_norm_layers(gathering)
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the tiles, not an exponential one
        layer.train()
    _run_tiles(gathering, image, plan, chosen, progress, callback)
    return BatchNormStatistics(
        tuple(layer.running_mean.detach().cpu().numpy() for layer in layers),
        tuple(layer.running_var.detach().cpu().numpy() for layer in layers),
        tile_shape, len(chosen), len(plan),
    )


def _run_tiles(model: UNet, image, plan: TilePlan, chosen: list[int], progress: bool,
               callback: Callable[[int, int], None] | None) -> None:
    device = next(model.parameters()).device
    with torch.no_grad(), tqdm(total=len(chosen), disable=not progress, desc="statistics", unit="tile") as bar:
        for done, index in enumerate(chosen, 1):
            tile = plan.tiles[index]
            window = extract_region(image, tile.in_y, tile.in_x, *plan.tile_shape)
            model(torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32))[None].to(device))
            bar.update(1)
            if callback is not None:
                callback(done, len(chosen))


def with_statistics(model: UNet, stats: BatchNormStatistics) -> UNet:
    """A copy of `model` in eval mode whose batch-norm layers normalise with `stats`.

    `model` is not changed; a model without batch norm is returned as is. Raises InputError if
    `stats` was gathered for a network with other batch-norm layers.
    """
    layers = batch_norm_layers(model)
    if not layers and not len(stats):
        return model
    check_statistics(model, stats)
    adapted = copy.deepcopy(model).eval()
    set_statistics(adapted, stats)
    return adapted


def set_statistics(model: UNet, stats: BatchNormStatistics) -> None:
    """Make `stats` the running statistics of `model`'s batch-norm layers, in place."""
    with torch.no_grad():
        for layer, mean, var in zip(batch_norm_layers(model), stats.means, stats.variances):
            layer.running_mean.copy_(torch.from_numpy(np.array(mean, dtype=np.float32)))
            layer.running_var.copy_(torch.from_numpy(np.array(var, dtype=np.float32)))


def pooled_statistics(stats: Sequence[BatchNormStatistics]) -> BatchNormStatistics:
    """Statistics of several images gathered alike (`gather_statistics`, one tile shape) as if of
    one: each layer's average over all their tiles, every tile weighted alike.

    Example:
        >>> a = BatchNormStatistics((np.zeros(2, np.float32),), (np.ones(2, np.float32),), (44, 44), 1, 1)
        >>> b = BatchNormStatistics((np.full(2, 3, np.float32),), (np.ones(2, np.float32),), (44, 44), 2, 2)
        >>> pooled_statistics([a, b]).means[0].tolist(), pooled_statistics([a, b]).tiles
        ([2.0, 2.0], 3)
    """
    total = sum(s.tiles for s in stats)
    layers = range(len(stats[0]))
    return BatchNormStatistics(
        tuple(sum(s.means[i] * s.tiles for s in stats) / total for i in layers),
        tuple(sum(s.variances[i] * s.tiles for s in stats) / total for i in layers),
        stats[0].tile_shape, total, sum(s.plan_size for s in stats),
    )


def check_statistics(model: UNet, stats: BatchNormStatistics) -> None:
    """Raise InputError unless `stats` has one mean and variance of the right size per batch-norm layer."""
    sizes = [layer.num_features for layer in batch_norm_layers(model)]
    given = [int(m.shape[0]) for m in stats.means]
    if sizes != given or any(v.shape != m.shape for m, v in zip(stats.means, stats.variances)):
        raise InputError(
            f"norm_statistics: the statistics are for batch-norm layers of sizes {given}, but the model's are "
            f"{sizes}; gather them with gather_statistics for this model"
        )


def adapt_batch_norm(model: UNet, image, tile_size: int | tuple[int, int]) -> UNet:
    """A copy of `model` whose batch-norm layers normalise with statistics of `image`:
    ``with_statistics(model, gather_statistics(model, image, tile_size))``.

    A model without batch norm is returned as is.
    """
    if not has_batch_norm(model):
        return model
    return with_statistics(model, gather_statistics(model, image, tile_size))
