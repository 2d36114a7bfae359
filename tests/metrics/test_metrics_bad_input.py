import numpy as np
import pytest

from unetkit.errors import InputError
from unetkit.metrics import (
    adapted_rand_error,
    average_precision,
    dice,
    iou,
    pixel_error,
    pixel_error_fscore,
    rand_error,
    seg_score,
    variation_of_information,
    warping_error,
)

BINARY = [pixel_error, pixel_error_fscore, rand_error, warping_error, dice, iou]
LABELS = [seg_score, average_precision, adapted_rand_error, variation_of_information]
GT = np.array([[0, 255, 255], [0, 255, 0]], np.uint8)


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


@pytest.mark.parametrize("metric", BINARY + LABELS)
def test_shapes_must_match(metric):
    with pytest.raises(InputError, match=r"differ in shape: \(2, 4\) vs \(2, 3\)"):
        metric(np.zeros((2, 4), np.uint8), GT)


@pytest.mark.parametrize("metric", BINARY + LABELS)
def test_stack_lengths_must_match(metric):
    with pytest.raises(InputError, match="has 2 images but"):
        metric(np.zeros((2, 2, 3), np.uint8), GT)


@pytest.mark.parametrize("metric", BINARY)
@pytest.mark.parametrize("bad", [1.5, -0.1, np.nan])
def test_probability_must_lie_in_0_1(metric, bad):
    pred = GT / 255.0
    pred[0, 0] = bad
    with pytest.raises(InputError, match="probability map"):
        metric(pred, GT)


@pytest.mark.parametrize("metric", BINARY + LABELS)
def test_ground_truth_must_not_be_negative(metric):
    gt = GT.astype(np.int16)
    gt[0, 0] = -1
    with pytest.raises(InputError, match="negative"):
        metric(np.zeros(gt.shape, np.uint8), gt)


@pytest.mark.parametrize("metric", BINARY + LABELS)
def test_ground_truth_must_hold_whole_numbers(metric):
    with pytest.raises(InputError, match="non-integer"):
        metric(np.zeros(GT.shape, np.uint8), GT / 510.0)


@pytest.mark.parametrize("metric", LABELS)
def test_label_predictions_must_hold_whole_numbers(metric):
    with pytest.raises(InputError, match="pred_labels: label image has non-integer"):
        metric(GT / 510.0, GT)


def test_float_labels_with_whole_values_are_accepted():
    assert pixel_error(GT / 255.0, GT.astype(np.float32)) == 0.0
    assert seg_score(GT.astype(np.float64), GT) == 1.0


@pytest.mark.parametrize("metric", [pixel_error, warping_error, dice, iou])
def test_threshold_must_lie_in_0_1(metric):
    with pytest.raises(InputError, match="outside"):
        metric(GT / 255.0, GT, threshold=2.0)


def test_images_must_be_2d():
    with pytest.raises(InputError, match="expected a 2D image"):
        pixel_error(np.zeros((1, 2, 2, 3)), np.zeros((1, 2, 2, 3), int))
    with pytest.raises(InputError, match="no images"):
        pixel_error([], [])


def test_empty_ground_truth_gives_values_or_a_clear_message():
    empty = np.zeros((3, 3), np.uint8)
    assert pixel_error(np.zeros((3, 3)), empty) == 0.0
    assert warping_error(np.zeros((3, 3)), empty) == 0.0
    assert dice(np.zeros((3, 3)), empty) == 1.0
    for metric in (rand_error, seg_score, adapted_rand_error, variation_of_information):
        with pytest.raises(InputError, match="no (foreground|objects)"):
            metric(empty, empty)
