"""Batch norm with the image's own statistics: gathered over the image's tiles, then fixed, so
prediction stays seamless; the model itself is left alone."""

import dataclasses
import pickle

import numpy as np
import pytest
import torch

from unetkit import InputError, UNet, adapt, predict
from unetkit.adapt import (
    BatchNormStatistics,
    adapt_batch_norm,
    batch_norm_layers,
    gather_statistics,
    has_batch_norm,
    statistics_tiles,
    with_statistics,
)
from unetkit.predict import predict_plan
from unetkit.tiling import extract_region


@pytest.fixture
def net():
    torch.manual_seed(0)
    model = UNet(depth=2, base_channels=4, batch_norm=True)
    with torch.no_grad():  # training-like running statistics, far from any one image's
        for layer in batch_norm_layers(model):
            layer.running_mean.fill_(0.3)
            layer.running_var.fill_(2.0)
    return model.eval()


def test_statistics_are_the_average_of_the_tiles_statistics(net, rng):
    image = rng.random((1, 70, 83)).astype(np.float32)
    plan = predict_plan(net, image.shape, 44)
    assert len(plan) > 1
    first = batch_norm_layers(net)[0]
    inputs = []
    handle = first.register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    with torch.no_grad():
        for tile in plan.tiles:
            net(torch.from_numpy(extract_region(image, tile.in_y, tile.in_x, *plan.tile_shape))[None])
    handle.remove()
    expected_mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0)
    expected_var = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in inputs]).mean(0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    adapted = adapt_batch_norm(net, image, 44)
    got = batch_norm_layers(adapted)[0]
    torch.testing.assert_close(got.running_mean, expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.running_var, expected_var, rtol=1e-5, atol=1e-6)
    assert not adapted.training and got.momentum == first.momentum
    for key, value in net.state_dict().items():  # the model given is unchanged
        assert torch.equal(value, before[key]), key


def test_prediction_with_image_statistics_is_seamless(net, rng):
    image = rng.random((70, 83)).astype(np.float32)
    tiled = predict(net, image, tile_size=44, norm_statistics="image")
    # the same statistics (gathered over the 44-pixel tiles), applied in one large tile
    whole = predict(adapt_batch_norm(net, image, 44), image, tile_size=(132, 140))
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    assert np.abs(tiled - predict(net, image, tile_size=44)).max() > 1e-3  # really other statistics


def test_without_batch_norm_nothing_changes(rng):
    torch.manual_seed(1)
    plain = UNet(depth=2, base_channels=4, batch_norm=False)
    image = rng.random((50, 50)).astype(np.float32)
    assert not has_batch_norm(plain) and adapt_batch_norm(plain, image, 44) is plain
    np.testing.assert_array_equal(predict(plain, image, tile_size=44, norm_statistics="image"),
                                  predict(plain, image, tile_size=44))


def test_bad_choices_are_refused(net):
    image = np.zeros((50, 50), np.float32)
    with pytest.raises(InputError, match="norm_statistics must be one of training, image or a BatchNormStatistics"):
        predict(net, image, norm_statistics="batch")
    torch.manual_seed(4)
    other = gather_statistics(UNet(depth=2, base_channels=8, batch_norm=True), image, 44)
    with pytest.raises(InputError, match=r"batch-norm layers of sizes \[8, 8, 16, 16, 8, 8\].*gather_statistics"):
        predict(net, image, tile_size=44, norm_statistics=other)


def test_predict_command_takes_the_statistics_to_use(net, tmp_path, rng, capsys):
    import tifffile

    from unetkit.checkpoint import save_checkpoint
    from unetkit.cli import main
    from unetkit.data import Normalization

    model = tmp_path / "bn.pt"
    save_checkpoint(model, net, normalization=Normalization(), class_names=["background", "foreground"])
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", (rng.random((50, 60)) * 255).astype(np.uint8))
    common = ["predict", "--model", str(model), str(tmp_path / "in"), "--tile-size", "44", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "training")]) == 0
    assert main([*common, "--out", str(tmp_path / "image"), "--norm-statistics", "image"]) == 0
    training = tifffile.imread(tmp_path / "training" / "a_probabilities.tif")
    image = tifffile.imread(tmp_path / "image" / "a_probabilities.tif")
    assert training.shape == image.shape == (2, 50, 60) and np.abs(training - image).max() > 1e-3
    assert main([*common, "--out", str(tmp_path / "bad"), "--norm-statistics", "batch"]) == 2
    assert "--norm-statistics must be training or image (got 'batch')" in capsys.readouterr().err


class Reads:
    """A lazy (C, H, W) array-like that records the size of every window read from it."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.ndim, self.sizes = array, array.shape, array.ndim, []

    def __getitem__(self, key):
        window = self.array[key]
        self.sizes.append(window.shape[-2] * window.shape[-1])
        return window


def test_gathered_statistics_are_a_value_equal_on_every_path(net, rng):
    image = rng.random((1, 70, 83)).astype(np.float32)
    stats = gather_statistics(net, image, 44)
    assert (stats.tile_shape, stats.tiles, stats.plan_size, len(stats)) == ((44, 44), 9, 9, 6)
    assert all(m.dtype == np.float32 and not m.flags.writeable for m in stats.means + stats.variances)
    lazy = Reads(image)
    assert gather_statistics(net, lazy, (44, 44)) == stats == gather_statistics(net, image[0], 44)
    assert max(lazy.sizes) <= 44 * 44  # read window by window
    copied = pickle.loads(pickle.dumps(stats))
    assert copied == stats and hash(copied) == hash(stats) and copied.fingerprint == stats.fingerprint
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.tiles = 1
    # bit for bit what adapt_batch_norm (and predict's "image") applies
    adapted, applied = adapt_batch_norm(net, image, 44), with_statistics(net, stats)
    for a, b, mean, var in zip(batch_norm_layers(adapted), batch_norm_layers(applied), stats.means, stats.variances):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
        assert np.array_equal(a.running_mean.numpy(), mean) and np.array_equal(a.running_var.numpy(), var)
    assert not applied.training
    np.testing.assert_array_equal(predict(net, image, tile_size=44, norm_statistics="image", backend="torch"),
                                  predict(net, image, tile_size=44, norm_statistics=stats, backend="torch"))


def test_dask_and_zarr_images_give_the_same_statistics(net, rng, tmp_path):
    zarr = pytest.importorskip("zarr")
    da = pytest.importorskip("dask.array")
    image = rng.random((70, 83)).astype(np.float32)
    stored = zarr.create_array(store=str(tmp_path / "i.zarr"), shape=image.shape, dtype="float32", chunks=(32, 32))
    stored[:] = image
    stats = gather_statistics(net, image, 44)
    assert gather_statistics(net, stored, 44) == stats == gather_statistics(net, da.from_array(image, chunks=30), 44)


def test_a_large_plan_uses_the_capped_tiles_spread_evenly(net, monkeypatch, rng):
    assert statistics_tiles(5) == [0, 1, 2, 3, 4] and statistics_tiles(10, cap=4) == [0, 3, 6, 9]
    assert statistics_tiles(1000) == [round(i * 999 / 63) for i in range(64)]
    monkeypatch.setattr(adapt, "MAX_STATISTICS_TILES", 3)
    image = rng.random((1, 90, 120)).astype(np.float32)
    plan = predict_plan(net, image.shape, 44)
    assert len(plan) == 20
    stats = gather_statistics(net, image, 44)
    assert (stats.tiles, stats.plan_size) == (3, 20)
    first = batch_norm_layers(net)[0]
    inputs = []
    handle = first.register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    with torch.no_grad():
        for index in (0, 10, 19):  # linspace(0, 19, 3) rounded (half to even)
            tile = plan.tiles[index]
            net(torch.from_numpy(extract_region(image, tile.in_y, tile.in_x, *plan.tile_shape))[None])
    handle.remove()
    expected = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0).numpy()
    np.testing.assert_allclose(stats.means[0], expected, rtol=1e-5, atol=1e-6)


def test_a_huge_lazy_image_is_read_only_in_the_capped_tiles(net):
    class Huge:  # 16384 x 16384 pixels, computed per window, never held
        shape, ndim = (1, 16384, 16384), 3
        sizes: list[int] = []

        def __getitem__(self, key):
            _, ys, xs = key
            y, x = np.mgrid[ys, xs]
            self.sizes.append(y.size)
            return (np.sin(y * 0.01) * np.cos(x * 0.013)).astype(np.float32)[None]

    huge = Huge()
    stats = gather_statistics(net, huge, 252)
    assert stats.tiles == adapt.MAX_STATISTICS_TILES == 64 and stats.plan_size > 4000
    assert len(huge.sizes) == 64 and max(huge.sizes) <= 252 * 252
