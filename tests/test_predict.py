import numpy as np
import pytest
import torch

from unetkit import InputError, UNet, predict
from unetkit.predict import choose_tile_shape
from unetkit.tiling import extract_region


def whole_image_probabilities(model: UNet, image: np.ndarray) -> np.ndarray:
    """One pass over the whole mirror-padded image (the reference tiling must reproduce)."""
    g = model.geometry
    chw = image[None] if image.ndim == 2 else image
    h, w = chw.shape[-2:]
    padded = extract_region(chw, -g.border, -g.border, g.input_size(h), g.input_size(w))
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32))[None])
    return torch.softmax(logits, 1)[0, :, :h, :w].numpy()


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return UNet(depth=3, base_channels=4, dropout=0.5)


@pytest.mark.parametrize(
    "shape,tile",
    [((50, 50), 44), ((50, 50), 60), ((97, 61), 64), ((33, 120), (48, 100)), ((1, 37), 56), ((130, 1), 52), ((3, 3), 44)],
)
def test_tiled_prediction_equals_whole_image_prediction(net, rng, shape, tile):
    image = rng.random(shape).astype(np.float32)
    tiled = predict(net, image, tile_size=tile)
    assert tiled.shape == (2, *shape) and tiled.dtype == np.float32
    np.testing.assert_allclose(tiled, whole_image_probabilities(net, image), atol=1e-5)
    np.testing.assert_allclose(tiled.sum(0), 1.0, atol=1e-5)


def test_tiled_equals_whole_for_a_deeper_net_with_partial_last_tiles(rng):
    torch.manual_seed(1)
    image = rng.random((2, 150, 171)).astype(np.float32)
    net = UNet(in_channels=2, depth=4, base_channels=4)
    tiled = predict(net, image, tile_size=(108, 124), batch_size=3)
    assert net.training  # predict restores the training mode
    np.testing.assert_allclose(tiled, whole_image_probabilities(net, image), atol=1e-5)


def test_result_does_not_depend_on_tile_size_or_batch(net, rng):
    image = rng.random((90, 70)).astype(np.float32)
    a = predict(net, image, tile_size=44)
    b = predict(net, image, tile_size=(80, 52), batch_size=4)
    c = predict(net, image)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, c, atol=1e-5)


def test_model_mode_is_restored(net, rng):
    net.train()
    predict(net, rng.random((20, 20)).astype(np.float32))
    assert net.training
    net.eval()


class _LeftEdgeDetector(UNet):
    """A network that is not rotation invariant: class 1 where the pixel's left neighbour is brighter."""

    def forward(self, x):
        border = self.geometry.border
        centre = x[:, :, border:-border, border:-border]
        left = x[:, :, border:-border, border - 1 : -border - 1]
        score = 50.0 * (left - centre)
        return torch.cat([-score, score], dim=1)


def test_tta_undoes_each_transform_before_averaging():
    net = _LeftEdgeDetector(depth=3, base_channels=1)
    image = np.zeros((30, 40), np.float32)
    image[:, :20] = 1.0  # an edge: pixels at x=20 have a bright left neighbour
    plain = predict(net, image, tile_size=44)
    averaged = predict(net, image, tile_size=44, tta=True)
    assert plain[1, 10, 20] > 0.99
    # In 2 of the 8 transforms (identity and a vertical flip) the edge faces the detector.
    assert averaged[1, 10, 20] == pytest.approx(2 / 8 + 6 / 8 * 0.5, abs=0.01)
    # Pixels at x=19 see a dark neighbour on their left in the 2 horizontally flipped transforms.
    assert averaged[1, 10, 19] == pytest.approx(6 / 8 * 0.5, abs=0.01)
    # Flat regions are undecided, and every row agrees: the result is aligned with the input.
    assert averaged[1, 10, 5] == pytest.approx(0.5, abs=1e-6)
    np.testing.assert_allclose(averaged[:, :, 20], averaged[:, :, 20][:, :1].repeat(30, 1), atol=1e-6)


def test_tta_of_a_real_net_is_seamless(net, rng):
    image = rng.random((70, 70)).astype(np.float32)
    np.testing.assert_allclose(predict(net, image, tile_size=44, tta=True), predict(net, image, tile_size=80, tta=True), atol=1e-5)


def test_same_padding_prediction(rng):
    torch.manual_seed(0)
    net = UNet(depth=3, base_channels=4, padding="same")
    image = rng.random((45, 70)).astype(np.float32)
    out = predict(net, image, tile_size=48)
    assert out.shape == (2, 45, 70)
    # one tile large enough for the whole image plus its margin equals a single pass over it
    whole = predict(net, image, tile_size=128)
    assert np.abs(out - whole).max() < 0.5


def test_automatic_tile_choice():
    paper = UNet()
    assert choose_tile_shape(paper, (512, 512)) == (700, 700)  # one tile: 700 -> 516
    h, w = choose_tile_shape(paper, (2048, 2048), memory_budget=1 << 30)
    assert paper.geometry.is_legal(h) and paper.geometry.is_legal(w)
    small = choose_tile_shape(paper, (2048, 2048), memory_budget=300 << 20)
    assert small[0] * small[1] < h * w
    assert choose_tile_shape(paper, (1, 1)) == (188, 188)


def test_progress_bar(net, rng, capsys):
    predict(net, rng.random((60, 60)).astype(np.float32), tile_size=44, progress=True)
    assert "tiles" in capsys.readouterr().err


@pytest.mark.parametrize(
    "image,kwargs,error,match",
    [
        (np.zeros((2, 3, 4, 5), np.float32), {}, InputError, "2D"),
        (np.zeros((3, 20, 20), np.float32), {}, InputError, "3 channel"),
        (np.zeros((20, 20, 1), np.float32), {}, InputError, "channels-last"),
        (np.full((20, 20), np.nan, np.float32), {}, InputError, "NaN"),
        (np.zeros((0, 20), np.float32), {}, InputError, "empty"),
        (np.zeros((20, 20), np.float32), {"tile_size": 46}, InputError, "44 or 48"),
        (np.zeros((20, 20), np.float32), {"batch_size": 0}, InputError, "batch_size"),
        ("image.png", {}, TypeError, "NumPy"),
    ],
)
def test_bad_input(net, image, kwargs, error, match):
    with pytest.raises(error, match=match):
        predict(net, image, **kwargs)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_a_raw_integer_image_warns_once_with_the_fix(net, rng, dtype):
    import warnings

    image = (rng.random((97, 61)) * 200).astype(dtype)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        probs = predict(net, image, tile_size=44)  # several tiles, one warning
    unnormalised = [w for w in seen if "unnormalised" in str(w.message)]
    assert len(unnormalised) == 1 and probs.shape == (2, 97, 61)
    assert "loaded.normalization(image)" in str(unnormalised[0].message) and unnormalised[0].filename == __file__
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        predict(net, image.astype(np.float32) / 200, tile_size=44)
        predict(net, image > 100, tile_size=44)  # a mask is not a raw image
    assert not [w for w in seen if "unnormalised" in str(w.message)]
