import numpy as np
import pytest
from scipy import ndimage as ndi

from unetkit.metrics import ERROR_CLASSES, pixel_error, rand_error, warping_error
from unetkit.metrics.warping import _classify, _simple_table, _warp, topological_numbers

NO_ERRORS = dict.fromkeys(ERROR_CLASSES, 0)


def box(shape, rows, cols):
    image = np.zeros(shape, np.uint8)
    image[rows, cols] = 1
    return image


def test_identical_inputs_score_zero():
    gt = box((6, 6), slice(1, 4), slice(1, 4))
    assert warping_error(gt.astype(float), gt, return_details=True) == (0.0, {**NO_ERRORS, "mismatched_pixels": 0})


def test_split_cell_gives_warping_error_and_known_rand_error():
    gt = box((5, 8), slice(1, 4), slice(1, 7)) * 255  # one 3x6 cell
    pred = (gt > 0).astype(float)
    pred[1:4, 3] = 0.0  # a membrane column cuts it in two
    # Warping removes the top and middle pixels of the cut from the ground truth (simple points);
    # the last one holds the two halves together: 1 pixel of 40.
    error, details = warping_error(pred, gt, return_details=True)
    assert error == 1 / 40
    assert details == {**NO_ERRORS, "split": 1, "mismatched_pixels": 1}
    # Rand: n = 18, sum a^2 = 18^2 = 324; pieces 6 and 9 plus 3 singletons:
    # sum n_ij^2 = sum b_j^2 = 36 + 81 + 3 = 120; V = 240 / 444 = 20/37; error 17/37 = 0.459459...
    assert rand_error(pred, gt) == pytest.approx(17 / 37)
    assert pixel_error(pred, gt) == 3 / 40


def test_thick_cut_is_one_split_of_two_pixels():
    gt = box((5, 10), slice(1, 4), slice(1, 9))
    pred = gt.astype(float)
    pred[1:4, 4:6] = 0.0  # a cut two pixels wide
    # a one-pixel-wide bridge across both columns of the cut remains
    error, details = warping_error(pred, gt, return_details=True)
    assert details == {**NO_ERRORS, "split": 1, "mismatched_pixels": 2}
    assert error == 2 / 50


def test_boundary_shifted_by_one_pixel_has_no_warping_error():
    gt = box((6, 6), slice(1, 4), slice(1, 4))
    pred = box((6, 6), slice(1, 4), slice(2, 5)).astype(float)
    assert warping_error(pred, gt) == 0.0
    assert pixel_error(pred, gt) == 6 / 36


def test_merge_of_two_cells_is_a_merge():
    gt = box((5, 8), slice(1, 4), slice(1, 3)) | box((5, 8), slice(1, 4), slice(4, 6))
    pred = box((5, 8), slice(1, 4), slice(1, 6)).astype(float)  # membrane column 3 filled
    # every pixel of the filled membrane would join the two cells: none can be flipped
    error, details = warping_error(pred, gt, return_details=True)
    assert details == {**NO_ERRORS, "merge": 1, "mismatched_pixels": 3}
    assert error == 3 / 40


def test_added_and_removed_objects():
    gt = box((7, 7), slice(1, 4), slice(1, 4))
    empty = np.zeros((7, 7))
    # the ground truth cell shrinks by simple deletions to a single pixel that cannot go
    assert warping_error(empty, gt, return_details=True) == (1 / 49, {**NO_ERRORS, "object_removed": 1, "mismatched_pixels": 1})
    # nothing can grow from an empty ground truth: all 9 predicted pixels stay
    error, details = warping_error(gt.astype(float), np.zeros((7, 7), np.uint8), return_details=True)
    assert details == {**NO_ERRORS, "object_added": 1, "mismatched_pixels": 9}
    assert error == 9 / 49


def test_added_and_removed_holes():
    solid = box((7, 7), slice(1, 6), slice(1, 6))
    holed = solid.copy()
    holed[3, 3] = 0
    assert warping_error(holed.astype(float), solid, return_details=True) == (1 / 49, {**NO_ERRORS, "hole_added": 1, "mismatched_pixels": 1})
    assert warping_error(solid.astype(float), holed, return_details=True) == (1 / 49, {**NO_ERRORS, "hole_removed": 1, "mismatched_pixels": 1})


def test_ring_opened_removes_a_hole_not_splits():
    ring = box((7, 7), slice(1, 6), slice(1, 6))
    ring[2:5, 2:5] = 0  # a cell with a 3x3 hole
    cut = ring.copy()
    cut[1, 3] = 0  # the prediction opens the ring: the hole joins the outside
    error, details = warping_error(cut.astype(float), ring, return_details=True)
    assert details == {**NO_ERRORS, "hole_removed": 1, "mismatched_pixels": 1}


def test_most_confident_pixels_are_flipped_first():
    # Either cut pixel could remain; the one the network is least sure about (0.45) is kept.
    gt = box((3, 6), slice(0, 3), slice(0, 6))
    prob = np.ones((3, 6))
    prob[:, 2] = [0.0, 0.45, 0.0]  # a full cut; its middle pixel is uncertain
    warped = _warp(np.pad(gt, 1), np.pad((prob > 0.5).astype(np.uint8), 1), np.pad(np.abs(prob - 0.5), 1))
    assert np.argwhere(warped[1:-1, 1:-1] != (prob > 0.5)).tolist() == [[1, 2]]


def test_topological_numbers_of_the_4_8_pair():
    t_fg, t_bg = topological_numbers()
    both = (t_fg > 0) & (t_bg > 0)
    assert np.array_equal(t_fg[both], t_bg[both])
    assert t_fg[0] == 0 and t_bg[0] == 1  # isolated pixel
    assert t_fg[255] == 1 and t_bg[255] == 0  # interior pixel
    # only the four diagonal neighbours: no 4-adjacent foreground
    assert t_fg[0b10100101] == 0


def test_simple_points_preserve_global_topology(rng):
    # Flipping a pixel the table calls simple never changes the number of 4-connected foreground
    # or 8-connected background components; flipping a non-simple one always does.
    cross, square = ndi.generate_binary_structure(2, 1), np.ones((3, 3), bool)

    def counts(image):
        padded = np.pad(image, 1)
        return ndi.label(padded, cross)[1], ndi.label(padded == 0, square)[1]

    simple = _simple_table()
    for _ in range(30):
        image = (rng.random((7, 7)) < 0.55).astype(np.uint8)
        before = counts(image)
        padded = np.pad(image, 1)
        for r in range(7):
            for c in range(7):
                ring = padded[r : r + 3, c : c + 3].ravel()
                code = sum(int(v) << k for k, v in enumerate(np.delete(ring, 4)))
                flipped = image.copy()
                flipped[r, c] ^= 1
                assert (counts(flipped) == before) == simple[code]


def test_remaining_pixels_each_get_exactly_one_class(rng):
    gt = (ndi.gaussian_filter(rng.standard_normal((64, 64)), 2) > 0).astype(np.uint8)
    pred = (ndi.gaussian_filter(rng.standard_normal((64, 64)), 2) > 0).astype(np.uint8)
    warped = _warp(np.pad(gt, 1), np.pad(pred, 1), np.zeros((66, 66)))
    masks = _classify(warped, np.pad(pred, 1))
    total = sum(m.astype(int) for m in masks.values())
    assert np.array_equal(total > 0, warped != np.pad(pred, 1))
    assert total.max() == 1


def test_stack_pools_remaining_pixels():
    gt = box((5, 8), slice(1, 4), slice(1, 7))
    split = gt.astype(float)
    split[1:4, 3] = 0.0
    error, details = warping_error(np.stack([split, gt.astype(float)]), np.stack([gt, gt]), return_details=True)
    assert error == 1 / 80
    assert details["split"] == 1


def test_512x512_blob_image_finishes(rng):
    # Independent random blobs disagree on about half the pixels: a hard case for the warping.
    gt = ndi.gaussian_filter(rng.standard_normal((512, 512)), 6) > 0
    prob = ndi.gaussian_filter(rng.standard_normal((512, 512)), 6)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    error, details = warping_error(prob, gt.astype(np.uint8), return_details=True)
    assert 0.0 < error < pixel_error(prob, gt.astype(np.uint8))
    assert details["mismatched_pixels"] == round(error * 512 * 512)
    assert details["split"] > 0 and details["merge"] > 0
