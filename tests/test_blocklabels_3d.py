"""`label_blockwise` on volumes (Z, Y, X): equal to `DecisionRule.apply` on the whole volume, ids included."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from unetkit.blocklabels import label_blockwise
from unetkit.decision import DecisionRule
from unetkit.errors import InputError


def blobs(shape, seed, sigma):
    """Smooth random probabilities in [0, 1]: objects of many sizes crossing block borders and corners."""
    field = ndi.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    return ((field - field.min()) / np.ptp(field)).astype(np.float32)


def hollow_boxes(shape, seed, n):
    """Random hollow boxes, some overlapping, some with a dot inside: cavities filled and not, across blocks."""
    rng = np.random.default_rng(seed)
    prob = np.zeros(shape, np.float32)
    for _ in range(n):
        size = rng.integers(3, 8, 3)
        start = [int(rng.integers(0, max(s - k, 0) + 1)) for s, k in zip(shape, size)]
        box = tuple(slice(a, a + k) for a, k in zip(start, size))
        prob[box] = 0.9
        prob[tuple(slice(b.start + 1, b.stop - 1) for b in box)] = 0.1
        if rng.random() < 0.3:
            prob[tuple(a + k // 2 for a, k in zip(start, size))] = 0.8
    return prob


VOLUMES = {
    "blobs-7x23x31": lambda: blobs((7, 23, 31), 0, 1.2),
    "blobs-12x17x9": lambda: blobs((12, 17, 9), 1, 0.8),
    "boxes-13x21x19": lambda: hollow_boxes((13, 21, 19), 0, 9),
}


def shells():
    """A hollow cube whose cavity is centred on the corner (8, 8, 8) of blocks of 8, a hollow box with a
    dot in its cavity (a hole touching two objects), and an object along the volume's border."""
    prob = np.zeros((17, 20, 23), np.float32)
    prob[3:14, 3:14, 3:14] = 1
    prob[6:11, 6:11, 6:11] = 0  # the cavity, 5x5x5
    prob[2:9, 15:20, 15:22] = 0.9
    prob[3:8, 16:19, 16:21] = 0
    prob[5, 17, 18] = 0.9  # the dot inside the second cavity: the cavity is left empty
    prob[16, :, :5] = 0.8
    return prob


def check(prob, rule, *, block, fill_holes=True, halo=256, dtype=np.uint32):
    expected = rule.apply(prob, fill_holes=fill_holes)
    out = np.full(prob.shape, 99, dtype)
    n = label_blockwise(prob, out, rule=rule, fill_holes=fill_holes, block=block, halo=halo)
    np.testing.assert_array_equal(out, expected)
    assert n == expected.max()
    return out


@pytest.mark.parametrize("volume", list(VOLUMES))
@pytest.mark.parametrize("block", [4, 5, 8, 40])
@pytest.mark.parametrize("fill_holes,min_size", [(True, 0), (True, 5), (False, 3)])
def test_components_of_a_volume_blockwise_equal_the_whole_volume(volume, block, fill_holes, min_size):
    prob = VOLUMES[volume]()
    rule = DecisionRule("components", threshold=0.55, min_size=min_size)
    out = check(prob, rule, block=block, fill_holes=fill_holes)
    assert out.max() >= 3


@pytest.mark.parametrize("block", [4, 5, 8, 30])
def test_enclosed_cavities_are_filled_only_inside_a_single_object(block):
    prob = shells()
    rule = DecisionRule("components", threshold=0.5)
    out = check(prob, rule, block=block)
    assert (out[6:11, 6:11, 6:11] == out[3, 3, 3]).all()  # filled, across the block corner
    assert out[4, 17, 17] == 0 and out[5, 17, 18] > 0  # the cavity around the dot stays empty
    assert len(np.unique(out)) == 5  # background, cube, box, dot, border slab
    check(prob, rule, block=block, fill_holes=False)


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_cavity_open_only_diagonally_across_a_block_corner_is_not_a_hole(ndim):
    # the cavity ends at (7, 7), its way out starts at (8, 8): the two meet only across the corner of
    # four blocks of 8, yet they form one background region reaching the border
    plane = np.ones((16, 16), np.float32)
    plane[5:8, 5:8] = 0
    plane[8, 8:] = 0
    prob = plane if ndim == 2 else np.stack([np.ones_like(plane), plane, np.ones_like(plane)])
    out = check(prob, DecisionRule("components"), block=8)
    assert out.max() == 1 and (out == 0).sum() == 9 + 8


SEEDED_RULES = [
    DecisionRule("seeded", threshold=0.4, seed_threshold=0.7),
    DecisionRule("seeded", threshold=0.0, seed_threshold=0.75, min_seed_size=4),  # every voxel flooded
    DecisionRule("seeded", threshold=0.5, seed_threshold=0.65, min_seed_size=2, min_size=10),
    DecisionRule("seeded", threshold=0.6, seed_threshold=0.5),  # seeds wider than the mask
]


@pytest.mark.parametrize("rule", SEEDED_RULES)
@pytest.mark.parametrize("block", [4, 8])
@pytest.mark.parametrize("fill_holes", [True, False])
def test_seeded_volume_blockwise_equals_the_whole_volume_when_the_halo_covers_it(rule, block, fill_holes):
    prob = blobs((12, 17, 9), 3, 1.0)
    out = check(prob, rule, block=block, fill_holes=fill_holes, halo=17)
    assert out.max() >= 2


def test_seeded_shell_split_by_two_seeds_keeps_its_cavity_empty():
    prob = shells()
    prob[3:14, 3:14, 3:14] *= 0.6
    prob[6:11, 6:11, 6:11] = 0
    prob[4, 8, 8] = prob[12, 8, 8] = 0.95  # two cores on opposite walls: the cube becomes two objects
    rule = DecisionRule("seeded", threshold=0.5, seed_threshold=0.9)
    out = check(prob, rule, block=5, halo=23)
    assert out[4, 8, 8] != out[12, 8, 8] and (out[7:10, 7:10, 7:10] == 0).all()


def test_seeded_halo_doubles_until_a_far_seed_reaches_the_block():
    # a corridor 28 voxels long with its only core at one end: blocks of 4 with a halo of 1 see no
    # core, so each is flooded again with a larger halo rather than given an id of its own
    prob = np.zeros((6, 7, 31), np.float32)
    prob[2:4, 2:5, 1:29] = 0.6
    prob[2:4, 3, 1:3] = 0.99
    prob[5, 0, 20:23] = 0.6  # an unseeded object, numbered after the seeded one
    rule = DecisionRule("seeded", threshold=0.5, seed_threshold=0.9)
    out = check(prob, rule, block=4, halo=1, dtype=np.uint16)
    assert out.max() == 2 and (out[2:4, 2:5, 1:29] == 1).all() and (out[5, 0, 20:23] == 2).all()


@pytest.mark.parametrize("method", ["components", "seeded"])
def test_a_per_plane_rule_labels_each_plane_with_ids_unique_across_the_volume(method):
    prob = blobs((5, 23, 19), 4, 1.2)
    rule = DecisionRule(method, threshold=0.45, seed_threshold=0.7, min_size=3, per_plane=True)
    out = check(prob, rule, block=6, halo=23)
    three_d = DecisionRule(method, threshold=0.45, seed_threshold=0.7, min_size=3).apply(prob)
    assert out.max() > three_d.max()  # objects crossing planes are cut into one per plane


def test_ids_that_do_not_fit_the_output_type_are_refused_before_writing():
    prob = np.zeros((8, 12, 12), np.float32)
    prob[::2, ::2, ::2] = 1  # 144 single-voxel objects
    out = np.full(prob.shape, 5, np.int8)
    with pytest.raises(InputError, match="144 objects do not fit the output's int8 ids.*uint32"):
        label_blockwise(prob, out, block=5)
    assert (out == 5).all()


def test_watershed_rule_and_4d_inputs_are_refused():
    prob = blobs((6, 10, 10), 0, 1.0)
    out = np.full(prob.shape, 7, np.uint32)
    with pytest.raises(InputError, match="'watershed'.*not applied block by block.*'seeded' or 'components'"):
        label_blockwise(prob, out, rule=DecisionRule("watershed"), block=4)
    assert (out == 7).all()
    four_d = r"expected a 2D map \(H, W\) or a 3D volume \(Z, Y, X\), got shape \(2, 6, 10, 10\)"
    with pytest.raises(InputError, match=four_d):
        label_blockwise(np.stack([prob, prob]), np.zeros((2, 6, 10, 10), np.uint32), block=4)
    with pytest.raises(InputError, match=r"out: shape \(6, 10\) differs"):
        label_blockwise(prob, np.zeros((6, 10), np.uint32), block=4)
