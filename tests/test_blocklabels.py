import numpy as np
import pytest
from scipy import ndimage as ndi

from unetkit.blocklabels import SEEDED_TOLERANCE, compare_labels, label_blockwise
from unetkit.decision import DecisionRule
from unetkit.errors import InputError
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


# -- the "seeded" rule and the rule API -----------------------------------------------------------

def named_zarr_scratch(folder):
    """A scratch factory that makes zarr arrays, as the large-image path does; records the names."""
    import zarr

    names = []

    def scratch(name, shape):
        names.append(name)
        return zarr.create_array(store=str(folder / f"{name}.zarr"), shape=shape, chunks=(16, 16), dtype="int64", fill_value=0)

    scratch.names = names
    return scratch


SEEDED_RULES = [
    DecisionRule("seeded", threshold=0.4, seed_threshold=0.7),
    DecisionRule("seeded", threshold=0.0, seed_threshold=0.75, min_seed_size=5),  # EM: every pixel flooded
    DecisionRule("seeded", threshold=0.5, seed_threshold=0.65, min_seed_size=3, min_size=20),
    DecisionRule("seeded", threshold=0.6, seed_threshold=0.5),  # seeds wider than the mask
]


@pytest.mark.parametrize("rule", SEEDED_RULES)
@pytest.mark.parametrize("block", [7, 16, 40])
@pytest.mark.parametrize("fill_holes", [True, False])
def test_seeded_blockwise_equals_whole_image_when_the_halo_covers_the_image(rule, block, fill_holes):
    # with a halo as large as the image every flood sees the whole map: seeds, unseeded objects,
    # holes, minimum size and numbering must then match exactly
    prob = blobs((61, 47), 2, 1.2)
    expected = rule.apply(prob, fill_holes=fill_holes)
    assert expected.max() > 10
    out = np.full(prob.shape, 99, np.uint32)
    n = label_blockwise(prob, out, rule=rule, fill_holes=fill_holes, block=block, halo=61)
    np.testing.assert_array_equal(out, expected)
    assert n == expected.max()


@pytest.mark.parametrize("block,halo", [(8, 64), (16, 64), (13, 80)])
def test_seeded_blockwise_with_a_halo_wider_than_the_objects_equals_whole_image(block, halo):
    # objects here are about 30 px across: a halo of 64 px holds every seed that wins a block pixel
    # (smaller halos were measured to differ: 16 px of halo gave 4% of pixels another label)
    prob = blobs((100, 90), 1, 3.0)
    rule = DecisionRule("seeded", threshold=0.3, seed_threshold=0.7, min_seed_size=4, min_size=10)
    expected = rule.apply(prob)
    out = np.zeros(prob.shape, np.int32)
    assert label_blockwise(prob, out, rule=rule, block=block, halo=halo) == expected.max()
    np.testing.assert_array_equal(out, expected)


def test_seeded_halo_grows_until_a_far_seed_reaches_the_block():
    # one corridor 60 px long with its only seed at the left end: blocks of 10 with a halo of 1 see
    # no seed, so each is flooded again with a larger halo rather than given an unseeded id
    prob = np.zeros((12, 64), np.float32)
    prob[4:8, 2:62] = 0.6
    prob[5:7, 3:6] = 0.99
    prob[0, 40:44] = 0.6  # an unseeded object, numbered after the seeded one
    rule = DecisionRule("seeded", threshold=0.5, seed_threshold=0.9)
    out = np.zeros(prob.shape, np.uint16)
    assert label_blockwise(prob, out, rule=rule, block=10, halo=1) == 2
    assert (out[4:8, 2:62] == 1).all() and (out[0, 40:44] == 2).all() and (out > 0).sum() == 4 * 60 + 4
    np.testing.assert_array_equal(out, rule.apply(prob))


def test_seeded_numbering_puts_unseeded_objects_after_seeded_ones():
    prob = np.zeros((20, 20), np.float32)
    prob[1:3, 1:3] = 0.6  # first in raster order, but without a core
    prob[5:15, 2:9] = 0.7
    prob[9:11, 4:6] = 0.95  # core of the left object
    prob[5:15, 11:18] = 0.7
    prob[6:8, 13:15] = 0.95  # core of the right object (first seed in raster order)
    prob[10:13, 13:16] = 0.0  # a hole in the right object
    rule = DecisionRule("seeded", threshold=0.5, seed_threshold=0.9)
    out = np.zeros(prob.shape, np.uint32)
    assert label_blockwise(prob, out, rule=rule, block=6, halo=2) == 3
    assert out[6, 13] == 1 and out[9, 4] == 2 and out[1, 1] == 3
    assert (out[10:13, 13:16] == 1).all()  # filled
    np.testing.assert_array_equal(out, rule.apply(prob))


def test_seeded_with_named_zarr_scratch(tmp_path):
    prob = blobs((50, 40), 4, 2.0)
    rule = DecisionRule("seeded", threshold=0.0, seed_threshold=0.7, min_seed_size=3)
    scratch = named_zarr_scratch(tmp_path)
    out = np.zeros(prob.shape, np.uint32)
    label_blockwise(prob, out, rule=rule, block=16, halo=50, scratch=scratch)  # halo: whole image
    np.testing.assert_array_equal(out, rule.apply(prob))
    assert sorted(scratch.names) == ["objects", "provisional", "seeds"]


def test_components_rule_equals_the_older_keywords(tmp_path):
    prob = blobs((40, 30), 5, 1.5)
    rule = DecisionRule("components", threshold=0.45, min_size=3)
    by_rule, by_keywords = np.zeros(prob.shape, np.uint32), np.zeros(prob.shape, np.uint32)
    label_blockwise(prob, by_rule, rule=rule, block=9)
    label_blockwise(prob, by_keywords, threshold=0.45, min_size=3, block=9,
                    scratch=lambda shape: np.zeros(shape, np.int64))  # the one-argument scratch of old
    np.testing.assert_array_equal(by_rule, rule.apply(prob))
    np.testing.assert_array_equal(by_keywords, by_rule)
    with pytest.raises(TypeError, match="either rule= or threshold="):
        label_blockwise(prob, by_rule, rule=rule, threshold=0.5)


def test_watershed_rule_is_refused_before_anything_is_written():
    prob = blobs((20, 20), 0, 1.0)
    out = np.full(prob.shape, 7, np.uint32)
    with pytest.raises(InputError, match="'watershed'.*not applied block by block.*'seeded' or 'components'"):
        label_blockwise(prob, out, rule=DecisionRule("watershed", threshold=0.5), block=8)
    assert (out == 7).all()


def test_ids_that_do_not_fit_the_output_type_are_refused_not_wrapped():
    prob = np.zeros((24, 24), np.float32)
    prob[::2, ::2] = 1  # 144 single-pixel objects
    out = np.full(prob.shape, 5, np.int8)  # holds at most 127
    with pytest.raises(InputError, match="144 objects do not fit the output's int8 ids.*uint32"):
        label_blockwise(prob, out, block=8)
    assert (out == 5).all()
    wide = np.zeros(prob.shape, np.uint16)
    assert label_blockwise(prob, wide, block=8) == 144 and wide.max() == 144


def test_compare_labels_counts_unmatched_pixels_and_pair_agreement():
    a = np.array([[1, 1, 2, 2], [3, 3, 0, 0]])
    renamed = np.array([[7, 7, 5, 5], [9, 9, 0, 0]])
    assert compare_labels(a, renamed) == {"pixels_differing": 0.0, "rand_index": 1.0}
    merged = np.array([[1, 1, 1, 1], [3, 3, 0, 0]])  # objects 1 and 2 merged: 2 of 8 pixels unmatched
    result = compare_labels(a, merged)
    assert result["pixels_differing"] == 0.25
    assert result["rand_index"] == pytest.approx(1 - 4 / 28)  # the 4 pairs across objects 1 and 2 of 28


# -- real data ---------------------------------------------------------------------------------------


@pytest.mark.data
def test_seeded_blockwise_equals_whole_image_on_an_isbi_slice():
    from unetkit import pretrained
    from unetkit.checkpoint import load_checkpoint
    from unetkit.data import data_root, get_isbi2012_samples
    from unetkit.predict import predict
    from unetkit.targets import TargetConfig

    folder = data_root() / "isbi2012"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (set UNETKIT_DATA)")
    if not pretrained.get_model("em-membranes").installed:
        pytest.skip("em-membranes is not installed")
    loaded = load_checkpoint("em-membranes")
    rule = DecisionRule.from_dict(loaded.decision)
    assert rule.method == "seeded"
    sample = get_isbi2012_samples(folder, slices=[20], normalization=loaded.normalization,
                                  targets=TargetConfig(use_weight_map=False))[0]
    tile = loaded.model.geometry.input_size(max(sample.shape))  # one tile, no TTA: fast
    prob = predict(loaded.model, sample.image, tile_size=tile, norm_statistics=rule.norm_statistics)[1]
    expected = rule.apply(prob)
    out = np.zeros(prob.shape, np.uint32)
    assert label_blockwise(prob, out, rule=rule, block=128, halo=64) == expected.max() > 50
    assert compare_labels(expected, out) == SEEDED_TOLERANCE  # measured: identical from a 64 px halo
    np.testing.assert_array_equal(out, expected)
