"""Intensity normalisation and channel layout."""

from __future__ import annotations

import numpy as np
import pytest

from unetkit.errors import InputError
from unetkit.data import Normalization, to_chw


def test_uint16_narrow_band_maps_to_unit_range():
    rng = np.random.default_rng(0)
    image = rng.integers(1000, 1200, (64, 64)).astype(np.uint16)
    out = Normalization()(image)
    assert out.dtype == np.float32 and out.shape == (1, 64, 64)
    assert np.percentile(out, 1) == pytest.approx(0, abs=1e-5)
    assert np.percentile(out, 99.8) == pytest.approx(1, abs=1e-5)
    assert -0.05 < out.min() and out.max() < 1.05


def test_float_image_and_no_clipping_by_default():
    image = np.linspace(-3.0, 5.0, 1000).reshape(20, 50)
    out = Normalization()(image)
    assert out.min() < 0 and out.max() > 1  # the tails beyond the percentiles are kept
    clipped = Normalization(clip=True)(image)
    assert clipped.min() == 0 and clipped.max() == 1


def test_rgb_and_rgba_give_three_channels():
    rgb = np.random.default_rng(1).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((10, 12, 1), 255, np.uint8)], -1)
    assert Normalization()(rgb).shape == (3, 10, 12)
    np.testing.assert_array_equal(Normalization()(rgba), Normalization()(rgb))
    assert to_chw(np.zeros((10, 12, 2))).shape == (1, 10, 12)
    assert to_chw(np.zeros((3, 10, 12))).shape == (3, 10, 12)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_constant_image_is_finite(dtype):
    out = Normalization()(np.full((9, 9), 7, dtype))
    assert np.all(np.isfinite(out)) and np.all(out == 0)


def test_sparse_image_falls_back_to_min_max():
    image = np.zeros((100, 100), np.uint8)
    image[0, 0] = 200  # the 1st and 99.8th percentiles are both 0
    out = Normalization()(image)
    assert np.isfinite(out).all() and out.max() == pytest.approx(1.0)


def test_fixed_and_none_modes():
    image = np.array([[0, 255]], np.uint8)
    np.testing.assert_allclose(Normalization("fixed", scale=1 / 255)(image), [[[0, 1]]])
    np.testing.assert_array_equal(Normalization("none")(image), [[[0, 255]]])


def test_per_channel():
    ramp = np.arange(100.0).reshape(10, 10)
    image = np.stack([ramp, 10 * ramp, 10 * ramp + 5], -1)
    out = Normalization(per_channel=True)(image)
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)
    np.testing.assert_allclose(out[1], out[2], atol=1e-5)
    joint = Normalization()(image)
    assert joint[0].max() < 0.2 < joint[1].max()  # jointly, the colour balance is kept


@pytest.mark.parametrize(
    "norm",
    [Normalization(), Normalization(low=2, high=98, clip=True), Normalization("fixed", scale=0.5, offset=-1)],
)
def test_round_trip(norm):
    import json

    again = Normalization.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert again == norm
    image = np.random.default_rng(2).random((8, 8)) * 300
    np.testing.assert_array_equal(again(image), norm(image))


def test_fitted_equals_percentile():
    image = np.random.default_rng(3).integers(0, 4000, (32, 32)).astype(np.uint16)
    np.testing.assert_allclose(Normalization().fitted(image)(image), Normalization()(image), atol=1e-5)


def test_bad_settings():
    with pytest.raises(InputError):
        Normalization(low=50, high=10)
    with pytest.raises(InputError):
        Normalization("zscore")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="unknown"):
        Normalization.from_dict({"mode": "percentile", "gain": 2})
