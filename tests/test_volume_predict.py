"""Exact 3D overlap-tile prediction: tiles stitch into one pass over the whole mirror-padded volume."""

import numpy as np
import pytest
import torch

from unetkit import InputError, UNet
from unetkit.geometry import VolumeGeometry
from unetkit.volume import (
    TTA_TRANSFORMS,
    choose_volume_tile,
    extract_volume,
    plan_volume,
    predict_volume,
    smallest_volume_tile,
    transform_volume,
    tta_transforms,
    volume_activation_bytes,
)

SHAPE = (9, 37, 41)  # odd on every axis


def tiny(seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(dims=3, depth=2, base_channels=4, dropout=0.0, pool_kernels=[(1, 2, 2)], conv_kernels=[(1, 3, 3), (3, 3, 3)])
    options.update(kwargs)
    return UNet(**options).eval()


@pytest.fixture(scope="module")
def volume():
    return np.random.default_rng(0).random(SHAPE, dtype=np.float32)


def whole_pass(model, volume, index=0):
    """Softmax of one pass over the mirror-padded volume, transformed by `index` and back."""
    g = model.geometry
    padded_shape = g.input_shape(volume.shape)
    pad = [(b, p - s - b) for b, p, s in zip(g.border, padded_shape, volume.shape)]
    padded = torch.from_numpy(np.pad(volume, pad, mode="reflect"))[None, None]
    with torch.no_grad():
        out = torch.softmax(model(transform_volume(padded, index)), dim=1)
    out = transform_volume(out, index, inverse=True)[0].numpy()
    return out[:, : volume.shape[0], : volume.shape[1], : volume.shape[2]]


def test_tiles_equal_one_pass_over_the_padded_volume(volume):
    net = tiny()
    plan = plan_volume(SHAPE, net.geometry, (6, 20, 22))
    assert plan.output_shape == (2, 4, 6) and len(plan) == 5 * 10 * 7  # many tiles on every axis
    tiled = predict_volume(net, volume, tile_shape=(6, 20, 22), batch_size=128)
    expected = whole_pass(net, volume)
    assert tiled.shape == (2, *SHAPE)
    np.testing.assert_allclose(tiled, expected, atol=1e-5)
    # the automatic tile covers the volume in one pass and agrees too
    np.testing.assert_allclose(predict_volume(net, volume), expected, atol=1e-5)


def test_isotropic_network_is_exact_too():
    net = tiny(seed=1, pool_kernels=None, conv_kernels=None)  # 2x2x2 pooling, 3x3x3 kernels
    vol = np.random.default_rng(1).random((19, 23, 21), dtype=np.float32)
    assert smallest_volume_tile(net.geometry) == (18, 18, 18) and net.geometry.border == (8, 8, 8)
    tiled = predict_volume(net, vol, tile_shape=(20, 22, 18), batch_size=64)
    np.testing.assert_allclose(tiled, whole_pass(net, vol), atol=1e-5)


def test_tta_is_the_mean_of_the_transformed_passes():
    net = tiny(seed=2)
    volume = np.random.default_rng(2).random((5, 19, 23), dtype=np.float32)
    assert tta_transforms(net.geometry) == list(range(TTA_TRANSFORMS))
    tiled = predict_volume(net, volume, tile_shape=(6, 22, 24), batch_size=64, tta=True)
    assert len(plan_volume(volume.shape, net.geometry, (6, 22, 24))) == 3 * 4 * 3
    expected = np.mean([whole_pass(net, volume, t) for t in range(TTA_TRANSFORMS)], axis=0)
    np.testing.assert_allclose(tiled, expected, atol=1e-5)
    # the transforms are not all the same network: TTA changes the result
    assert np.abs(tiled - whole_pass(net, volume)).max() > 1e-3


def test_transforms_are_the_anisotropic_symmetries():
    x = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3)
    images = {tuple(transform_volume(x, t).flatten().tolist()) for t in range(TTA_TRANSFORMS)}
    assert len(images) == 16  # all distinct
    for t in range(TTA_TRANSFORMS):
        y = transform_volume(x, t)
        # z stays the z axis: the slices are permuted as a whole, never mixed with y or x
        assert sorted(y.sum(dim=(1, 2)).tolist()) == sorted(x.sum(dim=(1, 2)).tolist())
        assert torch.equal(transform_volume(y, t, inverse=True), x)
    # y and x pooled differently: the xy rotations would swap them, so only the 8 flips
    g = VolumeGeometry(((1, 2, 1),), ((1, 3, 3), (3, 3, 3)))
    assert tta_transforms(g) == [0, 4, 8, 12]  # identity, x flip, z flip, both (y flip = x flip + 180 rotation)


class CountingArray:
    """A lazily indexable volume that records every read (like a zarr array)."""

    def __init__(self, array):
        self.array, self.shape, self.ndim, self.dtype = array, array.shape, array.ndim, array.dtype
        self.reads = []

    def __getitem__(self, key):
        window = self.array[key]
        self.reads.append(window.size)
        return window


def test_lazy_volume_is_read_tile_by_tile(volume):
    net = tiny()
    lazy = CountingArray(volume)
    tiled = predict_volume(net, lazy, tile_shape=(6, 24, 26), batch_size=64)
    np.testing.assert_allclose(tiled, whole_pass(net, volume), atol=1e-5)
    assert len(lazy.reads) == 5 * 5 * 5 and max(lazy.reads) <= 6 * 24 * 26


def test_zarr_in_and_out(volume, tmp_path):
    zarr = pytest.importorskip("zarr")
    net = tiny()
    source = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=SHAPE, chunks=(3, 16, 16), dtype="float32")
    source[:] = volume
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="w", shape=(2, *SHAPE), chunks=(2, 3, 16, 16), dtype="float32")
    assert predict_volume(net, source, tile_shape=(9, 26, 30), out=out) is out
    np.testing.assert_allclose(out[:], whole_pass(net, volume), atol=1e-5)


def test_extract_volume_mirrors_like_numpy():
    vol = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    padded = np.pad(vol, ((4, 4), (5, 5), (6, 6)), mode="reflect")
    window = extract_volume(vol, (-4, -2, 1), (9, 7, 10))
    np.testing.assert_array_equal(window, padded[0:9, 3:10, 7:17])
    np.testing.assert_array_equal(extract_volume(vol[None], (1, 1, 1), (2, 2, 2)), vol[None, 1:3, 1:3, 1:3])


def test_tile_choice_respects_the_memory_budget():
    net = tiny()
    budget = 2_000_000
    tile = choose_volume_tile(net, SHAPE, memory_budget=budget)
    assert net.geometry.is_legal(tile) and volume_activation_bytes(net, tile) <= budget
    assert choose_volume_tile(net, SHAPE, memory_budget=1) == smallest_volume_tile(net.geometry)
    # with room, one tile covers the volume
    big = choose_volume_tile(net, SHAPE, memory_budget=1 << 30)
    assert len(plan_volume(SHAPE, net.geometry, big)) == 1


def test_bad_inputs_raise_one_line_errors(volume):
    net = tiny()
    with pytest.raises(InputError, match="2D image .* use a 2D UNet"):
        predict_volume(net, volume[0])
    with pytest.raises(InputError, match="model is a 2D UNet"):
        predict_volume(UNet(depth=2, base_channels=4), volume)
    with pytest.raises(InputError, match="channel"):
        predict_volume(net, np.stack([volume, volume]))
    with pytest.raises(InputError, match=r"y size 21 is not legal .* use 20 or 22"):
        predict_volume(net, volume, tile_shape=(6, 21, 22))
    iso = tiny(pool_kernels=None, conv_kernels=None)
    with pytest.raises(InputError) as info:
        predict_volume(iso, volume)  # 9 slices, the isotropic net needs 18
    message = str(info.value)
    assert "\n" not in message and "9 voxels along z" in message and "plan_kernels" in message and "18" in message
