"""Tests for unetkit.targets: separation borders, binary target and the paper's weight map."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from unetkit.config import PAPER
from unetkit.errors import InputError
from unetkit.labels import as_instances, check_labels, instances_from_mask
from unetkit.targets import foreground_target, make_targets, separation_borders, weight_map


def border_term(d1: float, d2: float, w0: float = PAPER.w0, sigma: float = PAPER.sigma) -> float:
    return w0 * math.exp(-((d1 + d2) ** 2) / (2 * sigma**2))


@pytest.fixture
def two_squares() -> np.ndarray:
    """Two 10x10 squares with one background column (column 15) between them, 20x30 image."""
    labels = np.zeros((20, 30), np.int64)
    labels[5:15, 5:15] = 1
    labels[5:15, 16:26] = 2
    return labels


def test_balanced_class_weights_by_hand(two_squares):
    # 600 pixels, 200 foreground, 400 background: w_c = 600 / (2 * count).
    w_c = make_targets(two_squares, use_weight_map=False)[1]
    assert w_c[0, 0] == pytest.approx(0.75)
    assert w_c[10, 10] == pytest.approx(1.5)
    assert w_c.mean() == pytest.approx(1.0)


def test_weight_on_separating_pixel(two_squares):
    w = weight_map(two_squares)
    # The separating pixel is adjacent to both squares: d1 = d2 = 1.
    assert w[10, 15] == pytest.approx(0.75 + border_term(1, 1), abs=1e-4)


def test_distance_convention(two_squares):
    w = weight_map(two_squares)
    # (10, 3): two columns left of square 1 (column 5), 13 left of square 2 (column 16).
    assert w[10, 3] == pytest.approx(0.75 + border_term(2, 13), abs=1e-4)
    # (3, 3): diagonal to the corners (5, 5) and (5, 16): Euclidean distances between centres.
    assert w[3, 3] == pytest.approx(0.75 + border_term(math.sqrt(8), math.sqrt(173)), abs=1e-4)
    # Sigma and w0 are honoured.
    w = weight_map(two_squares, w0=3.0, sigma=2.0)
    assert w[10, 3] == pytest.approx(0.75 + border_term(2, 13, 3.0, 2.0), abs=1e-4)


def test_border_term_on_background_only(two_squares):
    w = weight_map(two_squares)
    w_c = make_targets(two_squares, use_weight_map=False)[1]
    objects = two_squares > 0
    np.testing.assert_array_equal(w[objects], w_c[objects])
    assert np.all(w[~objects] > w_c[~objects])


def test_border_term_negligible_far_from_objects():
    labels = np.zeros((300, 300), np.int64)
    labels[10:20, 10:20] = 1
    labels[10:20, 22:32] = 2
    w_c = make_targets(labels, use_weight_map=False)[1]
    w = weight_map(labels)
    assert w[21, 21] > w_c[21, 21] + 1  # near both objects
    far = ndi.distance_transform_edt(labels == 0) > 60
    assert np.max(np.abs(w - w_c)[far]) < 1e-6


@pytest.mark.parametrize("count", [0, 1])
def test_zero_or_one_object_gives_class_weights(count):
    labels = np.zeros((40, 40), np.int64)
    if count:
        labels[10:20, 10:30] = 4
    w = weight_map(labels)
    np.testing.assert_array_equal(w, make_targets(labels, use_weight_map=False)[1])
    if count == 0:
        np.testing.assert_array_equal(w, np.ones((40, 40), np.float32))


def test_explicit_class_weights(two_squares):
    w = weight_map(two_squares, class_weights=(0.2, 3.0))
    assert w[0, 0] == pytest.approx(0.2 + border_term(math.sqrt(50), math.sqrt(16**2 + 25)))
    assert w[10, 10] == pytest.approx(3.0)
    assert w[10, 15] == pytest.approx(0.2 + border_term(1, 1), abs=1e-4)
    _, w_c = make_targets(two_squares, class_weights=(1.0, 1.0), use_weight_map=False)
    np.testing.assert_array_equal(w_c, np.ones_like(w_c))


def test_pixel_size_converts_sigma_from_micrometres(two_squares):
    in_pixels = weight_map(two_squares, sigma=5.0)
    in_microns = weight_map(two_squares, sigma=2.5, pixel_size=0.5)
    np.testing.assert_allclose(in_microns, in_pixels, rtol=1e-6)
    assert not np.allclose(weight_map(two_squares, sigma=2.5), in_pixels)


def test_touching_objects_are_separated():
    labels = np.zeros((20, 30), np.int64)
    labels[5:15, 5:15] = 1
    labels[5:15, 15:25] = 2  # shares the edge between columns 14 and 15 with object 1
    labels[1:3, 27:29] = 3  # isolated
    borders = separation_borders(labels)
    assert np.array_equal(np.argwhere(borders.any(axis=0)).ravel(), [14, 15])
    assert not borders[labels == 3].any()
    target = foreground_target(labels)
    assert target.dtype == np.int64
    assert not target[borders].any()
    for structure in (ndi.generate_binary_structure(2, 1), np.ones((3, 3))):
        assert ndi.label(target, structure=structure)[1] == 3
    w = weight_map(labels)
    # On the two-pixel line, the remaining object pixels are 1 and 2 pixels away.
    w_bg = make_targets(labels, use_weight_map=False)[1][10, 14]
    assert w[10, 14] == pytest.approx(w_bg + border_term(1, 2), abs=1e-4)


def test_diagonal_contact_is_separated():
    labels = np.zeros((6, 6), np.int64)
    labels[1:3, 1:3] = 1
    labels[3:5, 3:5] = 2
    target = foreground_target(labels)
    assert ndi.label(target, structure=np.ones((3, 3)))[1] == 2
    assert target[2, 2] == 0 and target[3, 3] == 0 and target[1, 1] == 1


def test_one_pixel_gap_keeps_objects(two_squares):
    np.testing.assert_array_equal(foreground_target(two_squares), (two_squares > 0).astype(int))
    assert separation_borders(two_squares)[5:15, 15].all()


def test_binary_mask_four_connected_components():
    mask = np.zeros((8, 8), np.uint8)
    mask[1:4, 1:4] = 255
    mask[4:7, 4:7] = 255  # touches the first square only diagonally
    instances = instances_from_mask(mask)
    assert instances.max() == 2 and instances[1, 1] != instances[5, 5]
    np.testing.assert_array_equal(as_instances(mask), instances)
    np.testing.assert_array_equal(as_instances(mask > 0), instances)
    # A mask already draws its borders: the target is the mask itself.
    target, w = make_targets(mask)
    np.testing.assert_array_equal(target, (mask > 0).astype(np.int64))
    # Background next to both components gets the border term (d1 = d2 = 1).
    w_bg = make_targets(mask, use_weight_map=False)[1][3, 4]
    assert w[3, 4] == pytest.approx(w_bg + border_term(1, 1), abs=1e-4)


def test_instance_labels_kept_as_given():
    labels = np.array([[0, 3, 3], [7, 0, 0]])
    np.testing.assert_array_equal(as_instances(labels), labels)
    assert as_instances(labels.astype(np.float32)).dtype == np.int64


@pytest.mark.parametrize(
    "bad",
    [
        np.array([[0, -1], [1, 2]]),
        np.array([[0.0, 0.5], [1.0, 2.0]]),
        np.array([[0.0, np.nan], [1.0, 2.0]]),
        np.zeros((2, 3, 3), np.int64),
    ],
)
def test_bad_labels_are_rejected(bad):
    with pytest.raises(InputError):
        make_targets(bad)
    with pytest.raises(InputError):
        weight_map(bad)


def test_check_labels_accepts_and_converts():
    assert check_labels(np.array([[True, False]])).tolist() == [[1, 0]]
    converted = check_labels(np.array([[0.0, 3.0]], np.float32))
    assert converted.dtype == np.int64 and converted.tolist() == [[0, 3]]
    assert check_labels(np.array([[2**63 - 1]], np.uint64)).dtype == np.int64
    assert check_labels(np.zeros((2, 3, 4), np.uint8)).shape == (2, 3, 4)  # any ndim unless asked


@pytest.mark.parametrize(
    "bad, words",
    [
        (np.array([[0, -1]], np.int16), "negative"),
        (np.array([[0.0, -2.0]]), "negative"),
        (np.array([[0.0, 0.5]]), "non-integer"),
        (np.array([[0.0, np.nan]]), "NaN"),
        (np.array([[0.0, np.inf]]), "infinite"),
        (np.array([[2**63]], np.uint64), "2\\^63"),
        (np.array([["a"]]), "unsupported type"),
        (np.array([[1 + 0j]]), "unsupported type"),
        (np.zeros((2, 3, 3), np.uint8), "must be 2D"),
    ],
)
def test_check_labels_rejections_start_with_name(bad, words):
    with pytest.raises(InputError, match=words) as info:
        check_labels(bad, "gt.tif", ndim=2)
    assert str(info.value).startswith("gt.tif: ")


def test_check_labels_fractional_message_has_hint():
    with pytest.raises(InputError, match="threshold it$"):
        check_labels(np.array([[0.25]]), "pred", hint="threshold it")


def test_as_instances_does_not_return_its_input():
    labels = np.array([[0, 3, 3], [7, 0, 0]], np.int64)
    out = as_instances(labels)
    out[0, 0] = 9
    assert labels[0, 0] == 0


def test_bad_options_are_rejected(two_squares):
    with pytest.raises(InputError, match="class_weights"):
        weight_map(two_squares, class_weights="inverse")
    with pytest.raises(InputError, match="class_weights"):
        weight_map(two_squares, class_weights=(1.0, 2.0, 3.0))
    with pytest.raises(InputError, match="pixel_size"):
        weight_map(two_squares, pixel_size=0.0)
    with pytest.raises(InputError, match="sigma"):
        weight_map(two_squares, sigma=-1.0)


def test_many_touching_objects_match_brute_force():
    rng = np.random.default_rng(5)
    seeds = np.zeros((96, 96), np.int64)
    points = rng.integers(0, 96, (25, 2))
    seeds[points[:, 0], points[:, 1]] = np.arange(1, 26)
    dist, (rows, cols) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    labels = np.where(dist < 12, seeds[rows, cols], 0)
    target, w = make_targets(labels, class_weights=(1.0, 1.0))
    objects = np.where(target > 0, labels, 0)
    per_object = np.stack(
        [ndi.distance_transform_edt(objects != i) for i in np.unique(objects[objects > 0])]
    )
    d = np.sort(per_object, axis=0)
    expected = 1.0 + np.where(target == 0, border_term_array(d[0], d[1]), 0.0)
    np.testing.assert_allclose(w, expected, atol=1e-5)
    assert ndi.label(target)[1] >= np.unique(objects[objects > 0]).size


def border_term_array(d1: np.ndarray, d2: np.ndarray) -> np.ndarray:
    return PAPER.w0 * np.exp(-((d1 + d2) ** 2) / (2 * PAPER.sigma**2))
