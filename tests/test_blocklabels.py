import numpy as np
import pytest
from scipy import ndimage as ndi

from unetkit.blocklabels import label_blockwise
from unetkit.postprocess import probabilities_to_instances


def blobs(shape, seed, sigma):
    """Smooth random probabilities: objects of many sizes, some with holes, many crossing block borders."""
    field = ndi.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    return ((field - field.min()) / np.ptp(field)).astype(np.float32)


def ring_image():
    """A ring crossing four blocks whose hole sits on a block corner, a ring around two objects, a frame."""
    prob = np.zeros((40, 40), np.float32)
    prob[5:25, 5:25] = 1
    prob[10:20, 10:20] = 0  # the hole, centred on the corner (16, 16) of blocks of 16
    prob[28:38, 2:14] = 1
    prob[30:36, 4:12] = 0
    prob[32, 6] = prob[32, 9] = 1  # two objects inside the second ring's hole: not filled
    prob[0, :] = 1  # an object along the image border
    return prob


@pytest.mark.parametrize("seed,sigma,shape", [(0, 1.5, (61, 47)), (1, 3.0, (100, 90)), (2, 0.7, (33, 71))])
@pytest.mark.parametrize("block", [7, 16, 40])
@pytest.mark.parametrize("fill_holes,min_size", [(True, 0), (True, 6), (False, 4)])
def test_blockwise_labels_equal_whole_image_labels(seed, sigma, shape, block, fill_holes, min_size):
    prob = blobs(shape, seed, sigma)
    expected = probabilities_to_instances(prob, 0.5, min_size=min_size, fill_holes=fill_holes)
    out = np.full(shape, 99, np.uint32)
    n = label_blockwise(prob, out, threshold=0.5, min_size=min_size, fill_holes=fill_holes, block=block)
    np.testing.assert_array_equal(out, expected)
    assert n == expected.max()


@pytest.mark.parametrize("block", [8, 16, 13])
def test_holes_across_block_corners_are_filled_like_in_memory(block):
    prob = ring_image()
    out = np.zeros(prob.shape, np.int32)
    label_blockwise(prob, out, block=block)
    expected = probabilities_to_instances(prob)
    np.testing.assert_array_equal(out, expected)
    assert (out[10:20, 10:20] == out[5, 5]).all() and out[33, 5] == 0  # filled; enclosing two objects: not
    assert len(np.unique(out)) == 6  # background, border line, two rings, two dots
