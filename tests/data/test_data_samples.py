"""Samples: normalised image, instances, target and precomputed weights."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest

from unetkit.errors import InputError
from unetkit.data import Normalization, Sample, find_pairs, load_samples, make_sample
from unetkit.targets import TargetConfig, make_targets


def test_sample_fields_and_weight_map():
    labels = np.zeros((20, 20), np.uint16)
    labels[4:12, 2:10], labels[4:12, 10:18] = 1, 2  # two touching cells
    sample = make_sample(np.random.default_rng(0).random((20, 20)), labels, name="touch")
    assert sample.image.dtype == np.float32 and sample.image.shape == (1, 20, 20)
    assert sample.instances.dtype == np.int32 and sample.target.dtype == np.int64
    assert sample.weights.dtype == np.float32 and sample.name == "touch"
    target, weights = make_targets(labels)
    np.testing.assert_array_equal(sample.target, target)
    np.testing.assert_array_equal(sample.weights, weights)
    assert sample.weights[8, 10] > 5  # the border term between the cells


def test_binary_mask_becomes_instances():
    mask = np.zeros((12, 12), np.uint8)
    mask[1:4, 1:4] = 255
    mask[6:10, 6:10] = 255
    sample = make_sample(np.zeros((12, 12), np.uint8), mask, targets=TargetConfig(use_weight_map=False))
    assert sample.instances.max() == 2
    assert set(np.unique(sample.target)) == {0, 1}


def test_sample_rejects_mismatched_arrays():
    with pytest.raises(InputError, match="bad"):
        Sample(np.zeros((1, 4, 4), np.float32), np.zeros((4, 4), np.int32), np.zeros((4, 5), np.int64),
               np.zeros((4, 4), np.float32), "bad")


def test_nan_image(tmp_path):
    with pytest.raises(InputError, match="NaN"):
        make_sample(np.full((6, 6), np.nan), np.zeros((6, 6), np.uint8), name="nan.tif", normalization=Normalization("none"))


def test_load_samples_from_folder_and_channel_mismatch(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    iio.imwrite(tmp_path / "images" / "a.png", np.zeros((16, 16), np.uint8))
    iio.imwrite(tmp_path / "masks" / "a.png", mask)
    assert [s.name for s in load_samples(tmp_path)] == ["a"]
    iio.imwrite(tmp_path / "images" / "b.png", np.zeros((16, 16, 3), np.uint8))
    iio.imwrite(tmp_path / "masks" / "b.png", mask)
    with pytest.raises(InputError, match="b.png"):
        load_samples(find_pairs(tmp_path))


@pytest.mark.parametrize("fill, words", [(0, "are empty"), (3, "are all foreground")])
def test_warns_when_every_mask_is_empty_or_all_foreground(tmp_path, fill, words):
    for name in ("a", "b"):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "masks").mkdir(exist_ok=True)
        iio.imwrite(tmp_path / "images" / f"{name}.png", np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8))
        iio.imwrite(tmp_path / "masks" / f"{name}.png", np.full((16, 16), fill, np.uint8))
    with pytest.warns(UserWarning, match=f"all 2 mask\\(s\\) {words}"):
        load_samples(tmp_path)


def test_no_warning_for_ordinary_masks(tmp_path, recwarn):
    mask = np.zeros((16, 16), np.uint8)
    mask[4:9, 4:9] = 255
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    iio.imwrite(tmp_path / "images" / "a.png", np.zeros((16, 16), np.uint8))
    iio.imwrite(tmp_path / "masks" / "a.png", mask)
    load_samples(tmp_path)
    assert not [w for w in recwarn if "mask" in str(w.message)]
