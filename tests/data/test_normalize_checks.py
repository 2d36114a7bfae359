"""A fixed normalisation refuses images unlike those it was made for; complex pixels are refused."""

import json

import numpy as np
import pytest

from unetkit.data.normalize import Normalization
from unetkit.errors import InputError

OLD_CHECKPOINT = {"mode": "fixed", "low": 1.0, "high": 99.8, "clip": False, "scale": 1 / 255, "offset": 0.0, "per_channel": False}


def test_old_fixed_checkpoint_loads_and_refuses_16_bit_values_beyond_255():
    norm = Normalization.from_dict(OLD_CHECKPOINT)  # saved before the type and range were recorded
    assert norm.expected() == (None, (0.0, 255.0))
    sixteen = np.array([[0, 100], [257, 3]], np.uint16)
    with pytest.raises(InputError) as info:
        norm.check(sixteen, source="cells.tif")
    message = str(info.value)
    assert message.startswith("cells.tif: values 0..257, but the model's fixed normalisation (x * 0.00392157 + 0) was made for "
                              "images with values 0..255;") and "--normalize percentile" in message
    with pytest.raises(InputError, match=r"^image: values 0\.\.257"):  # where no name is known
        norm(sixteen)
    np.testing.assert_allclose(norm(np.array([[0, 255]], np.uint16)), [[[0.0, 1.0]]])  # values that fit pass


def test_recorded_type_and_range_travel_with_the_checkpoint():
    training = [np.array([[0, 200]], np.uint8), np.array([[10, 255]], np.uint8)]
    norm = Normalization(mode="fixed", scale=1 / 255).made_for(training)
    assert (norm.dtype, norm.value_range) == ("uint8", (0.0, 255.0))
    again = Normalization.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert again == norm
    with pytest.raises(InputError, match=r"^b\.png: uint16 image, but the model's fixed normalisation .* made for uint8 images"):
        again.check(np.array([[0, 200]], np.uint16), source="b.png")
    again.check(np.array([[0, 255]], np.uint8), source="c.png")
    wide = Normalization(mode="fixed", scale=1 / 4095).made_for([np.array([[0, 5000]], np.uint16)])
    assert (wide.dtype, wide.value_range) == ("uint16", (0.0, 5000.0))  # widened to what training saw
    with pytest.raises(InputError, match=r"values 0\.\.65535, .* values 0\.\.5000"):
        wide.check(np.array([[0, 65535]], np.uint16))


def test_other_modes_and_unrecorded_maps_accept_any_values():
    values = np.array([[-5.0, 70000.0]], np.float32)
    for norm in (Normalization(), Normalization(mode="none"), Normalization(mode="fixed", scale=0.5, offset=-1)):
        norm.check(values, source="x.tif")
        assert norm.made_for([values]).dtype is None
    assert Normalization().made_for([values]) == Normalization()


@pytest.mark.parametrize("norm", [Normalization(), Normalization(mode="none"), Normalization(mode="fixed", scale=1 / 255)])
def test_complex_pixels_are_refused_in_every_mode(norm):
    with pytest.raises(InputError, match=r"^fft\.tif: complex-valued pixels \(complex64\)"):
        norm.check(np.ones((3, 3), np.complex64), source="fft.tif")
