import numpy as np
import pytest

from unetkit.metrics import ISBI_THRESHOLDS, dice, iou, pixel_error, pixel_error_fscore


def cell(shape=(6, 6), rows=slice(1, 4), cols=slice(1, 4), value=255):
    image = np.zeros(shape, np.uint8)
    image[rows, cols] = value
    return image


def test_identical_inputs_score_zero_error():
    gt = cell()
    assert pixel_error(gt / 255.0, gt) == 0.0
    assert pixel_error(gt, gt) == 0.0
    assert pixel_error_fscore(gt / 255.0, gt) == 0.0
    assert dice(gt, gt) == 1.0 and iou(gt, gt) == 1.0


def test_boundary_shifted_by_one_pixel():
    # 3x3 cell moved one column right in a 6x6 image: column 1 lost, column 4 gained -> 6 / 36
    gt = cell()
    pred = cell(cols=slice(2, 5)) / 255.0
    assert pixel_error(pred, gt) == pytest.approx(6 / 36)


def test_foreground_is_strictly_above_the_threshold_and_gt_255_equals_1():
    gt = np.array([[1, 1, 0, 0]])
    pred = np.array([[0.5, 0.6, 0.5, 0.0]])
    # 0.5 is not > 0.5: pixel 0 is missed, pixel 2 correctly background -> 1 / 4
    assert pixel_error(pred, gt, threshold=0.5) == 0.25
    assert pixel_error(pred, gt * 255, threshold=0.5) == 0.25
    # label-image prediction: foreground where > 0, whatever the threshold
    assert pixel_error(np.array([[3, 0, 0, 0]]), gt, threshold=0.9) == 0.25


def test_fscore_form_per_threshold_by_hand():
    gt = np.array([[1, 1, 0, 0]])
    pred = np.array([[0.9, 0.4, 0.6, 0.05]])
    error, per = pixel_error_fscore(pred, gt, return_thresholds=True)
    assert tuple(per) == ISBI_THRESHOLDS
    # t=0.0: all 4 positive: TP 2 FP 2 FN 0 -> F = 4/6
    assert per[0.0] == pytest.approx(1 - 4 / 6)
    # t=0.1..0.3: {0.9, 0.4, 0.6}: TP 2 FP 1 -> F = 4/5
    for t in (0.1, 0.2, 0.3):
        assert per[t] == pytest.approx(0.2)
    # t=0.4, 0.5: {0.9, 0.6}: TP 1 FP 1 FN 1 -> F = 2/4
    assert per[0.4] == pytest.approx(0.5) and per[0.5] == pytest.approx(0.5)
    # t=0.6..0.8: {0.9}: TP 1 FN 1 -> F = 2/3
    assert per[0.7] == pytest.approx(1 / 3)
    # t=0.9, 1.0: nothing predicted -> F = 0
    assert per[0.9] == 1.0 and per[1.0] == 1.0
    assert error == pytest.approx(0.2)


def test_fscore_both_empty_is_perfect():
    empty = np.zeros((3, 3))
    assert pixel_error_fscore(empty, empty.astype(np.uint8), thresholds=(0.5,)) == 0.0


def test_stack_and_list_pool_pixels_not_images():
    gt = np.zeros((2, 2, 2), np.uint8)
    pred = np.zeros((2, 2, 2))
    pred[0, 0, 0] = 1.0  # 1 wrong of 4
    pred[1, :, :] = 1.0
    pred[1, 0, 0] = 0.0  # 3 wrong of 4
    assert pixel_error(pred, gt) == 4 / 8
    # different sizes: 1 wrong of 2 and 0 wrong of 4 -> 1/6, not the mean 1/4
    assert pixel_error([np.array([[1.0, 0.0]]), np.zeros((2, 2))], [np.zeros((1, 2), int), np.zeros((2, 2), int)]) == pytest.approx(1 / 6)


def test_dice_and_iou_by_hand():
    pred = np.array([[1, 1, 1, 0]])
    gt = np.array([[0, 1, 1, 1]])
    # |P n G| = 2, |P| = |G| = 3: Dice 4/6, IoU 2/4
    assert dice(pred, gt) == pytest.approx(2 / 3)
    assert iou(pred, gt) == 0.5
    assert dice(np.zeros((2, 2)), np.zeros((2, 2), int)) == 1.0
    assert iou(np.zeros((2, 2)), np.array([[0, 1], [0, 0]])) == 0.0
    # pooled over a list: I = 2 + 1, |P| + |G| = 6 + 2
    assert dice([pred, np.array([[1]])], [gt, np.array([[1]])]) == pytest.approx(6 / 8)
