"""Batch norm with the image's own statistics: gathered over the image's tiles, then fixed, so
prediction stays seamless; the model itself is left alone."""

import numpy as np
import pytest
import torch

from unetkit import InputError, UNet, predict
from unetkit.adapt import adapt_batch_norm, batch_norm_layers, has_batch_norm
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
    with pytest.raises(InputError, match="norm_statistics must be one of training, image"):
        predict(net, image, norm_statistics="batch")
    with pytest.raises(InputError, match="use backend 'torch' or 'auto'"):
        predict(net, image, tile_size=44, norm_statistics="image", backend="onnxruntime")


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
