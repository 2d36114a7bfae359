import numpy as np
import pytest
from skimage.metrics import adapted_rand_error as skimage_are
from skimage.metrics import variation_of_information as skimage_vi

from unetkit.errors import InputError
from unetkit.metrics import adapted_rand_error, rand_error, variation_of_information


def one_cell():
    gt = np.zeros((5, 8), np.uint8)
    gt[1:4, 1:7] = 255  # one 3x6 cell = 18 pixels
    return gt


def two_cells():
    gt = np.zeros((5, 8), np.uint8)
    gt[1:4, 1:3] = 255  # 3x2 = 6 pixels
    gt[1:4, 4:6] = 255  # 3x2 = 6 pixels, separated by membrane column 3
    return gt


def test_identical_inputs_score_zero():
    gt = two_cells()
    assert rand_error(gt / 255.0, gt) == 0.0
    labels = np.array([[1, 1, 0, 2], [1, 0, 2, 2]])
    assert rand_error(labels, labels) == 0.0
    assert adapted_rand_error(labels, labels) == 0.0
    assert variation_of_information(labels, labels) == (0.0, 0.0)


def test_split_cell_by_hand():
    gt = one_cell()
    pred = (gt > 0).astype(float)
    pred[1:4, 3] = 0.0  # membrane cuts the cell: 6 px left, 9 px right, 3 px predicted background
    error, per = rand_error(pred, gt, return_thresholds=True)
    # n = 18, a = [18]: sum a^2 = 324. Pred: n_ij = 6, 9 plus 3 singletons:
    # sum n_ij^2 = 36 + 81 + 3 = 120 = sum b_j^2. V = 2*120 / (324 + 120) = 20/37
    assert error == pytest.approx(17 / 37)
    assert per[0.0] == per[0.5] == per[0.9] == pytest.approx(17 / 37)
    # t = 1.0: nothing predicted, 18 singletons: V = 2*18 / (324 + 18) = 2/19
    assert per[1.0] == pytest.approx(17 / 19)


def test_merge_by_hand():
    gt = two_cells()
    pred = np.zeros(gt.shape)
    pred[1:4, 1:6] = 1.0  # membrane column filled: one segment
    # a = [6, 6]: 72; n_ij = 6, 6 in one segment: 72; b = [12]: 144 -> V = 144/216
    assert rand_error(pred, gt) == pytest.approx(1 / 3)


def test_predicted_background_inside_cells_counts_as_singletons():
    gt = np.array([[1, 1, 1, 1]])
    low = np.full((1, 4), 0.3)
    # at t = 0.5 all 4 pixels are singletons: sum_ab = 4, sum_a = 16, sum_b = 4 -> V = 8/20
    assert rand_error(low, gt, thresholds=(0.5,)) == pytest.approx(0.6)
    # the best threshold (0.0, 0.1, 0.2) keeps the cell whole
    assert rand_error(low, gt) == 0.0
    # the adapted Rand error treats predicted 0 as one ordinary segment: a perfect match
    assert adapted_rand_error(np.zeros((1, 4), int), gt) == 0.0


def test_components_are_4_connected():
    gt = np.array([[1, 1], [1, 1]])
    pred = np.array([[0.9, 0.0], [0.0, 0.9]])
    # diagonal pixels are two segments (1 + 1) and 2 singletons: sum_ab = 4 = sum_b, sum_a = 16
    # -> V = 8/20 (8-connectivity would give one segment and V = 12/22)
    assert rand_error(pred, gt, thresholds=(0.5,)) == pytest.approx(0.6)


def test_ground_truth_background_is_ignored():
    gt = np.array([[1, 1, 0, 0]])
    assert rand_error(np.array([[1, 1, 1, 0]]), gt) == 0.0
    assert adapted_rand_error(np.array([[1, 1, 5, 6]]), gt) == 0.0


def test_instance_ground_truth_is_used_as_labelled():
    # touching cells 1 and 2 would be one 4-connected component if binarised
    gt = np.array([[1, 1, 2, 2]])
    pred = np.array([[1, 1, 2, 2]])
    assert rand_error(pred, gt) == 0.0
    assert rand_error(np.array([[1.0, 1.0, 1.0, 1.0]]), gt, thresholds=(0.5,)) == pytest.approx(1 - 16 / 24)


def test_stack_pools_pair_counts():
    gt = np.stack([one_cell(), one_cell()])
    split = (gt[0] > 0).astype(float)
    split[1:4, 3] = 0.0
    pred = np.stack([split, gt[1] / 255.0])
    # split image: (120, 324, 120); identical: (324, 324, 324); pooled V = 888 / 1092
    assert rand_error(pred, gt) == pytest.approx(1 - 888 / 1092)


def test_adapted_rand_error_by_hand_and_against_skimage(rng):
    gt = np.array([[1, 1, 2, 2]])
    # merge: n_ij 2, 2 -> 8 - 4 = 4; a 2, 2 -> 4; b 4 -> 12; F = 8 / 16
    assert adapted_rand_error(np.array([[1, 1, 1, 1]]), gt) == pytest.approx(0.5)
    # split: P = 1, R = 4/12 -> F = 0.5
    assert adapted_rand_error(np.array([[1, 1, 2, 2]]), np.array([[1, 1, 1, 1]])) == pytest.approx(0.5)
    for _ in range(3):
        a = rng.integers(0, 5, (20, 20))
        b = rng.integers(0, 7, (20, 20))
        assert adapted_rand_error(b, a) == pytest.approx(skimage_are(a, b)[0])


def test_variation_of_information_by_hand_and_against_skimage(rng):
    whole, halves = np.array([[1, 1, 1, 1]]), np.array([[1, 1, 2, 2]])
    assert variation_of_information(halves, whole) == (1.0, 0.0)  # split: one bit
    assert variation_of_information(whole, halves) == (0.0, 1.0)  # merge: one bit
    for _ in range(3):
        a = rng.integers(0, 5, (20, 20))
        b = rng.integers(0, 7, (20, 20))
        expected = skimage_vi(a, b, ignore_labels=(0,))
        assert variation_of_information(b, a) == pytest.approx(tuple(expected))


def test_sparse_label_values_are_handled():
    gt = np.array([[7, 7, 1_000_000_000, 1_000_000_000]])
    pred = np.array([[3, 3, 2**40, 2**40]])
    assert rand_error(pred, gt) == 0.0
    assert adapted_rand_error(pred, gt) == 0.0


@pytest.mark.parametrize("metric", [rand_error, adapted_rand_error, variation_of_information])
def test_empty_ground_truth_is_a_clear_error(metric):
    with pytest.raises(InputError, match="no foreground"):
        metric(np.zeros((3, 3), int), np.zeros((3, 3), np.uint8))
