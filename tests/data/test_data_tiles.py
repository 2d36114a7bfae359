"""Random training tiles, their geometry and determinism, and the loader."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from unetkit.errors import InputError
from unetkit.geometry import Geometry
from unetkit.data import Sample, TileDataset, get_tile_loader, make_sample


def _sample(shape=(70, 90), seed=0, name="s") -> Sample:
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    for k in range(1, 6):
        y, x = rng.integers(0, shape[0] - 8), rng.integers(0, shape[1] - 8)
        labels[y : y + 8, x : x + 8] = k
    return make_sample(rng.random(shape), labels, name=name)


def _aligned_sample(shape=(50, 60)) -> Sample:
    """A sample whose image is its target (as float) and whose weights are the pixel index."""
    rng = np.random.default_rng(1)
    target = rng.integers(0, 7, shape).astype(np.int64)
    weights = np.arange(shape[0] * shape[1], dtype=np.float32).reshape(shape)
    return Sample(target[None].astype(np.float32), target.astype(np.int32), target, weights, "aligned")


@pytest.mark.parametrize("depth, tile, out", [(3, 44, 4), (3, 60, 20), (5, 188, 4)])
def test_shapes_for_legal_tiles(depth, tile, out):
    ds = TileDataset([_sample()], Geometry(depth=depth), tile, length=3)
    item = ds[2]
    assert item["image"].shape == (1, tile, tile) and item["image"].dtype == torch.float32
    assert item["target"].shape == (out, out) and item["target"].dtype == torch.int64
    assert item["weights"].shape == (out, out) and item["weights"].dtype == torch.float32


def test_rectangular_and_same_padding():
    item = TileDataset([_sample()], Geometry(depth=3), (44, 60), length=1)[0]
    assert item["image"].shape == (1, 44, 60) and item["target"].shape == (4, 20)
    item = TileDataset([_sample()], Geometry(depth=3, padding="same"), 32, length=1)[0]
    assert item["image"].shape == (1, 32, 32) and item["target"].shape == (32, 32)


def test_illegal_tile_size():
    with pytest.raises(InputError, match="not legal"):
        TileDataset([_sample()], Geometry(depth=3), 45)


def test_item_is_a_pure_function_of_seed_and_index():
    samples = [_sample(seed=0, name="a"), _sample((40, 40), seed=1, name="b")]
    ds = TileDataset(samples, Geometry(depth=3), 44, length=20, seed=5)
    again = TileDataset(samples, Geometry(depth=3), 44, length=20, seed=5)
    for i in (0, 7, 19, 7):
        a, b = ds[i], again[i]
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = TileDataset(samples, Geometry(depth=3), 44, length=20, seed=6)
    assert not torch.equal(ds[3]["image"], other[3]["image"])
    with pytest.raises(IndexError):
        ds[20]


def test_target_crop_is_aligned_with_image_centre():
    for padding, tile in (("valid", 44), ("valid", 60), ("same", 32)):
        geometry = Geometry(depth=3, padding=padding)
        ds = TileDataset([_aligned_sample()], geometry, tile, length=30)
        out = geometry.output_size(tile)
        border = (tile - out) // 2
        for i in range(len(ds)):
            item = ds[i]
            centre = item["image"][0, border : border + out, border : border + out]
            assert torch.equal(centre, item["target"].float())


def test_windows_cover_the_image_uniformly():
    ds = TileDataset([_aligned_sample((30, 30))], Geometry(depth=3), 60, length=300)  # output 20
    starts = np.array([ds.window(i)[1:] for i in range(len(ds))])
    assert starts.min() == 0 and starts.max() == 10


def test_images_smaller_than_the_tile_are_mirrored_with_a_warning():
    small = _aligned_sample((9, 7))
    with pytest.warns(UserWarning, match="aligned"):
        ds = TileDataset([small], Geometry(depth=3), 60, length=10)  # output 20 > 9
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (1, 60, 60) and item["target"].shape == (20, 20)
        assert torch.equal(item["image"][0, 20:40, 20:40], item["target"].float())
        assert set(item["weights"].unique().tolist()) == set(range(63))  # the whole image is inside
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TileDataset([_sample()], Geometry(depth=3), 44)


def test_sampling_is_proportional_to_pixel_count():
    big, small = _aligned_sample((60, 60)), _aligned_sample((20, 15))
    ds = TileDataset([big, small], Geometry(depth=3), 44, length=2000)
    assert ds.probabilities[0] == pytest.approx(3600 / 3900)
    picked = np.array([ds.window(i)[0] for i in range(len(ds))])
    assert 0.88 < np.mean(picked == 0) < 0.96


def test_augmented_tiles_are_deterministic_and_keep_labels():
    from unetkit.augment import AugmentConfig, Augmenter

    augmenter = Augmenter(AugmentConfig(elastic_sigma=3.0))
    ds = TileDataset([_sample()], Geometry(depth=3), 44, augmenter=augmenter, length=4, seed=1)
    assert ds.margin == int(np.ceil((np.sqrt(2) - 1) / 2 * 44 + 9 + 10))
    a, b = ds[1], ds[1]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["image"].shape == (1, 44, 44) and a["target"].shape == (4, 4)
    assert set(a["target"].unique().tolist()) <= {0, 1}
    assert (a["weights"] >= 0).all()


@pytest.mark.parametrize("padding, tile", [("valid", (44, 60)), ("same", 32)])
def test_augmenter_is_given_the_tile_shape(padding, tile):
    from unetkit.augment import AugmentConfig, Augmenter

    geometry = Geometry(depth=3, padding=padding)
    augmenter = Augmenter(AugmentConfig(elastic_sigma=3.0))
    ds = TileDataset([_sample()], geometry, tile, augmenter=augmenter, length=3, seed=2)
    plain = TileDataset([_sample()], geometry, tile, length=3, seed=2)
    assert ds.augment_window
    for i in range(3):
        a, b = ds[i], ds[i]
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert all(a[k].shape == plain[i][k].shape for k in a)


def test_geometry_free_augmenters_return_the_unaugmented_tile():
    # With no geometric transform the tile must be exactly the one cut without augmentation, both
    # when the augmenter resamples only the tile (out_shape) and when it gets the whole grown window.
    from unetkit.augment import AugmentConfig, Augmenter

    received = []

    def identity(image, target, weights, rng):
        received.append(image.shape)
        return image, target, weights

    def identity_kwargs(image, target, weights, rng, **options):
        received.append(options["out_shape"])
        return image, target, weights

    geometry = Geometry(depth=3)
    plain = TileDataset([_aligned_sample()], geometry, (44, 60), length=6, seed=4)
    window = Augmenter(AugmentConfig.disabled())
    for augmenter, uses_window in ((window, True), (identity, False)):
        ds = TileDataset([_aligned_sample()], geometry, (44, 60), augmenter=augmenter, length=6,
                         seed=4, margin=7)
        assert ds.augment_window is uses_window
        for i in range(len(ds)):
            a, b = ds[i], plain[i]
            assert all(torch.equal(a[k], b[k]) for k in a)
    assert received[0] == (1, 58, 74)  # the tile grown by the margin
    ds = TileDataset([_sample()], geometry, (44, 60), augmenter=identity_kwargs, length=1)
    assert ds.augment_window
    ds[0]
    assert received[-1] == (44, 60)


def test_loader_yields_the_requested_range_in_order():
    ds = TileDataset([_aligned_sample()], Geometry(depth=3), 44, length=10, seed=2)
    batches = list(get_tile_loader(ds, batch_size=2, start=3, stop=8))
    assert [b["image"].shape[0] for b in batches] == [2, 2, 1]
    images = torch.cat([b["image"] for b in batches])
    expected = torch.stack([ds[i]["image"] for i in range(3, 8)])
    assert torch.equal(images, expected)
    with pytest.raises(InputError):
        get_tile_loader(ds, start=5, stop=11)


def test_loader_with_a_worker_matches_in_process():
    ds = TileDataset([_aligned_sample()], Geometry(depth=3), 44, length=4, seed=3)
    loader = get_tile_loader(ds, batch_size=2, num_workers=1)
    assert loader.persistent_workers
    with_worker = torch.cat([b["target"] for b in loader])
    in_process = torch.cat([b["target"] for b in get_tile_loader(ds, batch_size=2)])
    assert torch.equal(with_worker, in_process)
