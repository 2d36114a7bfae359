"""Training data: readers for common layouts, normalisation, samples, validation splits, random tiles.

Example:
    >>> from unetkit import Geometry
    >>> from unetkit.data import find_pairs, split_pairs, load_samples, get_tile_dataset, get_tile_loader
    >>> pairs = find_pairs("my_dataset")  # doctest: +SKIP
    >>> train_pairs, val_pairs = split_pairs(pairs, val=0.2, seed=0)  # doctest: +SKIP
    >>> dataset = get_tile_dataset(load_samples(train_pairs), Geometry(), 572, length=1000)  # doctest: +SKIP
    >>> batch = next(iter(get_tile_loader(dataset)))  # doctest: +SKIP
"""

from .datasets import data_root, get_ctc_samples, get_isbi2012_samples
from .normalize import Normalization, to_chw
from .readers import ImagePair, check_mask, find_pairs, read_mask
from .samples import Sample, load_sample, load_samples, make_sample
from .split import split_pairs

# Tile sampling needs torch: imported on first use (PEP 562), so reading data stays light.
_TILES = ("BatchShardSampler", "RangeSampler", "TileDataset", "augment_margin", "get_tile_dataset", "get_tile_loader")
_VOLUMES = ("VolumeSample", "VolumeTileDataset", "get_isbi2012_volume", "load_volume_samples", "make_volume_sample")


def __getattr__(name: str):
    if name in _TILES:
        from . import tiles

        return getattr(tiles, name)
    if name in _VOLUMES:
        from . import volumes

        return getattr(volumes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BatchShardSampler",
    "ImagePair",
    "Normalization",
    "RangeSampler",
    "Sample",
    "TileDataset",
    "VolumeSample",
    "VolumeTileDataset",
    "augment_margin",
    "check_mask",
    "data_root",
    "find_pairs",
    "get_ctc_samples",
    "get_isbi2012_samples",
    "get_isbi2012_volume",
    "get_tile_dataset",
    "get_tile_loader",
    "load_sample",
    "load_samples",
    "load_volume_samples",
    "make_sample",
    "make_volume_sample",
    "read_mask",
    "split_pairs",
    "to_chw",
]
