"""The real datasets under ../shared/data (or $UNETKIT_DATA); skipped where absent."""

from __future__ import annotations

import numpy as np
import pytest

from unetkit.geometry import Geometry
from unetkit.data import TileDataset, data_root, find_pairs, get_ctc_samples, get_isbi2012_samples, load_samples

pytestmark = pytest.mark.data


def _need(name: str):
    folder = data_root() / name
    if not folder.is_dir():
        pytest.skip(f"{folder} not available")
    return folder


def test_isbi2012():
    folder = _need("isbi2012")
    pairs = find_pairs(folder)
    assert len(pairs) == 25 and pairs[0].mask.name == "00.png"
    (sample,) = get_isbi2012_samples(slices=[3])
    assert sample.image.shape == (1, 512, 512) and sample.name == "03"
    assert 0.6 < sample.target.mean() < 0.9  # cells (255) are the target class
    item = TileDataset([sample], Geometry(), 572, length=1)[0]
    assert item["image"].shape == (1, 572, 572) and item["target"].shape == (388, 388)


def test_ctc_dic_hela():
    folder = _need("ctc-dic-c2dh-hela")
    assert len(find_pairs(folder)) == 60
    samples = get_ctc_samples(frames=[0, 59])
    assert [s.name for s in samples] == ["t000", "t059"]
    assert samples[0].instances.max() > 10 and samples[0].instances.dtype == np.int32


@pytest.mark.parametrize("name, count", [("ctc-fluo-n2dh-gowt1", 6), ("dsb2018-stardist-sample", 1)])
def test_other_folders(name, count):
    pairs = find_pairs(_need(name))
    assert len(pairs) == count
    (sample,) = load_samples(pairs[:1])
    assert np.isfinite(sample.image).all() and sample.instances.max() > 20


@pytest.mark.parametrize("name", ["isbi2012", "ctc-dic-c2dh-hela", "ctc-fluo-n2dh-gowt1", "dsb2018-stardist-sample"])
def test_real_annotations_are_not_taken_for_intensity_images(name):
    from unetkit.data.readers import intensity_problem, read_mask
    from unetkit.io import read_image

    pairs = find_pairs(_need(name))
    for pair in pairs:
        read_mask(pair.mask)  # every check of the reader, the intensity check included
        assert intensity_problem(read_image(pair.mask)) is None, pair.mask
    # the other way round (images/ and masks/ swapped), the images are refused as masks
    assert intensity_problem(read_image(pairs[0].image)) is not None, pairs[0].image
