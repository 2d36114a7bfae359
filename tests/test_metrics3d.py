"""Metrics on volumes: objects across slices, 6-connected components, cross-checked independently."""

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.metrics import adapted_rand_error as skimage_are
from skimage.metrics import variation_of_information as skimage_vi

from unetkit import InputError
from unetkit.metrics import (
    SEG3D,
    adapted_rand_error,
    adapted_rand_error_3d,
    average_precision_3d,
    rand_error,
    rand_error_3d,
    seg_score,
    seg_score_3d,
    variation_of_information_3d,
)
from unetkit.synthetic import synthetic_cells_3d


@pytest.fixture(scope="module")
def volumes():
    _, gt = synthetic_cells_3d((9, 37, 41), seed=0)
    rng = np.random.default_rng(0)
    pred = gt.astype(np.int64).copy()
    pred[rng.random(gt.shape) < 0.1] = 0
    pred[4:, :, 20:] = np.where(pred[4:, :, 20:] > 0, 100 + pred[4:, :, 20:], 0)  # split cells across z and x
    return pred, gt.astype(np.int64)


def test_seg_counts_objects_across_slices():
    gt = np.zeros((3, 4, 4), np.int64)
    gt[:, 1:3, 1:3] = 1  # one object, 12 voxels
    pred = gt.copy()
    pred[0] = 2 * gt[0]  # top slice predicted as another object
    assert seg_score_3d(pred, gt) == pytest.approx(8 / 12)
    assert seg_score(pred, gt) == 1.0  # 2D reads three perfect slices
    pred[0] = 0
    pred[1, 1, 1] = 3  # 7 of 12 voxels: still > half
    assert seg_score_3d(pred, gt) == pytest.approx(7 / 12)
    pred[2, 1, 1] = 3  # 6 of 12: no match
    assert seg_score_3d(pred, gt) == 0.0


def test_seg_against_a_direct_computation(volumes):
    pred, gt = volumes
    scores = []
    for r in np.unique(gt)[1:]:
        inside = gt == r
        ids, counts = np.unique(pred[inside], return_counts=True)
        best = 0.0
        for s, n in zip(ids, counts):
            if s > 0 and n > 0.5 * inside.sum():
                best = n / np.count_nonzero(inside | (pred == s))
        scores.append(best)
    assert seg_score_3d(pred, gt) == pytest.approx(np.mean(scores), abs=1e-12)
    assert 0 < seg_score_3d(pred, gt) < 1


def test_average_precision_by_hand():
    gt = np.zeros((2, 4, 8), np.int64)
    gt[:, :, :4], gt[:, :, 4:] = 1, 2  # two objects of 32 voxels
    pred = gt.copy()
    pred[1, :, 4:] = 3  # object 2 split across z: two halves of IoU 0.5
    result = average_precision_3d(pred, gt, thresholds=(0.5, 0.75))
    assert result[0.5] == {"ap": 2 / 3, "precision": 2 / 3, "recall": 1.0, "f1": 0.8, "pq": (1 + 0.5) / (2 + 0.5)}
    assert result[0.75]["ap"] == pytest.approx(1 / 4)  # 1 TP, 2 FP, 1 FN


def test_adapted_rand_and_vi_against_skimage(volumes):
    pred, gt = volumes
    assert adapted_rand_error_3d(pred, gt) == pytest.approx(skimage_are(gt.ravel(), pred.ravel())[0], abs=1e-12)
    assert variation_of_information_3d(pred, gt) == pytest.approx(
        tuple(skimage_vi(gt.ravel(), pred.ravel(), ignore_labels=(0,))), abs=1e-12
    )
    # pooling two volumes = the scores of their concatenation with ids kept apart
    both = adapted_rand_error_3d([pred, pred], [gt, gt + (gt > 0) * 1000])
    stacked_gt = np.concatenate([gt, gt + (gt > 0) * 1000])
    stacked_pred = np.concatenate([pred, pred + 1000])  # predicted 0 is an ordinary segment, of its own volume
    assert both == pytest.approx(skimage_are(stacked_gt.ravel(), stacked_pred.ravel())[0], abs=1e-12)


def test_rand_error_by_hand_with_6_connected_components():
    gt = np.zeros((3, 4, 4), np.uint8)
    gt[:, 1:3, 1:3] = 255  # one cell of 12 voxels
    pred = (gt > 0).astype(float)
    pred[1] = 0.0  # the middle slice predicted as membrane
    # two predicted segments of 4 voxels and 4 singletons: sum n_ij^2 = 16 + 16 + 4, sum a^2 = 144
    assert rand_error_3d(pred, gt, thresholds=(0.5,)) == pytest.approx(1 - 2 * 36 / (144 + 36))
    # the 2D reading scores three sections, one without any predicted cell
    assert rand_error(pred, gt, thresholds=(0.5,)) != pytest.approx(rand_error_3d(pred, gt, thresholds=(0.5,)))
    # voxels meeting at a corner only are two 6-connected cells
    corner = np.zeros((2, 2, 2), np.uint8)
    corner[0, 0, 0] = corner[1, 1, 1] = 255
    assert rand_error_3d((corner > 0).astype(float), corner) == 0.0
    merged = (corner > 0).astype(float)
    merged[0, 0, 1] = merged[0, 1, 1] = 1.0  # a 6-connected bridge merges them: 2 of 4 pairs
    assert rand_error_3d(merged, corner, thresholds=(0.5,)) == pytest.approx(1 - 2 * 2 / (2 + 4))


def test_rand_error_against_an_independent_computation(volumes):
    pred, gt = volumes
    rng = np.random.default_rng(1)
    prob = np.clip((pred > 0) * 0.8 + rng.normal(0, 0.15, pred.shape), 0, 1)
    six = ndi.generate_binary_structure(3, 1)
    gt_seg = ndi.label(gt > 0, structure=six)[0] if gt.max() == 1 else gt
    errors = {}
    for t in (0.3, 0.5, 0.7):
        seg = ndi.label(prob > t, structure=six)[0][gt_seg > 0]
        g = gt_seg[gt_seg > 0]
        pairs, n_ij = np.unique(np.stack([g, seg]), axis=1, return_counts=True)
        singletons = np.count_nonzero(seg == 0)
        objects = n_ij[pairs[1] > 0].astype(float)
        sum_ab = objects @ objects + singletons
        a = np.unique(g, return_counts=True)[1].astype(float)
        b = np.unique(seg[seg > 0], return_counts=True)[1].astype(float)
        sum_b = b @ b + singletons
        errors[t] = 1 - 2 * sum_ab / (a @ a + sum_b)
    best, per_threshold = rand_error_3d(prob, gt, thresholds=(0.3, 0.5, 0.7), return_thresholds=True)
    assert per_threshold == pytest.approx(errors, abs=1e-12)
    assert best == pytest.approx(min(errors.values()), abs=1e-12)


def test_2d_functions_read_a_3d_array_as_sections_and_refuse_4d(volumes):
    pred, gt = volumes
    assert adapted_rand_error(pred, gt) == pytest.approx(
        skimage_are(np.concatenate([gt[k] + 1000 * k * (gt[k] > 0) for k in range(len(gt))]).ravel(),
                    np.concatenate([pred[k] + 1000 * k for k in range(len(pred))]).ravel())[0], abs=1e-12
    )
    assert adapted_rand_error(pred, gt) != pytest.approx(adapted_rand_error_3d(pred, gt))
    with pytest.raises(InputError, match="unetkit.metrics.volume") as info:
        seg_score(pred[None], gt[None])
    assert "\n" not in str(info.value)


def test_volume_metrics_refuse_images_and_mismatches(volumes):
    pred, gt = volumes
    with pytest.raises(InputError, match=r"must be 3D \(Z, Y, X\) \(for 2D images use the functions of unetkit.metrics\)"):
        seg_score_3d(pred[0], gt[0])
    with pytest.raises(InputError, match="differ in shape"):
        seg_score_3d(pred[:, :-1], gt)
    with pytest.raises(InputError, match="1 volumes but gt_labels has 2"):
        seg_score_3d([pred], [gt, gt])
    metric = SEG3D()
    metric.update(pred, gt)
    metric.update(gt, gt)
    assert metric.aggregate() == pytest.approx(seg_score_3d([pred, gt], [gt, gt]))
