import numpy as np
import pytest

from unetkit.errors import InputError
from unetkit.metrics import average_precision, seg_score


def row(*values):
    return np.array([values])


def test_seg_identical_is_one():
    labels = row(1, 1, 0, 2, 2, 0, 3)
    assert seg_score(labels, labels) == 1.0
    # ids need not agree, only the objects
    assert seg_score(row(9, 9, 0, 4, 4, 0, 7), labels) == 1.0


def test_seg_half_overlap_edge_cases():
    gt = row(*[1] * 10, 0, 0, 0, 0)  # R = pixels 0..9, |R| = 10
    # S covers exactly 5 = 0.5 |R| pixels of R: not > 0.5 |R|, no match -> 0
    assert seg_score(row(*[1] * 5, *[0] * 9), gt) == 0.0
    # S = pixels 4..11: 6 of R (> 5) plus 2 outside: IoU = 6 / (10 + 8 - 6) = 0.5
    assert seg_score(row(0, 0, 0, 0, *[1] * 8, 0, 0), gt) == 0.5


def test_seg_ignores_extra_predictions_and_scores_misses_zero():
    gt = row(1, 1, 1, 1, 0, 2, 2)
    # object 1: 3 of 4 pixels -> IoU 0.75; object 2: 1 of 2 is not > 1 -> 0; object 9 is extra
    pred = row(5, 5, 5, 0, 9, 7, 0)
    assert seg_score(pred, gt) == pytest.approx(0.75 / 2)


def test_seg_pools_all_objects_of_a_dataset():
    gt_a, pred_a = row(1, 1, 0, 2, 2), row(1, 1, 0, 0, 0)  # IoU 1 and unmatched 0
    gt_b, pred_b = row(1, 1, 1, 1), row(3, 3, 3, 0)  # IoU 0.75
    # (1 + 0 + 0.75) / 3 objects, not the mean of per-image scores (0.5 + 0.75) / 2
    assert seg_score([pred_a, pred_b], [gt_a, gt_b]) == pytest.approx(1.75 / 3)
    stacked = seg_score(np.stack([pred_a[:, :4], pred_b]), np.stack([gt_a[:, :4], gt_b]))
    assert stacked == pytest.approx(1.75 / 3)


def test_seg_without_ground_truth_objects_is_a_clear_error():
    with pytest.raises(InputError, match="no objects"):
        seg_score(row(1, 1), row(0, 0))


def test_average_precision_with_a_known_matching():
    gt = row(1, 1, 0, 2, 2, 2, 2, 2, 0, 3, 3, 0, 0, 0)
    pred = row(4, 4, 0, 5, 5, 5, 0, 0, 0, 0, 0, 0, 6, 6)
    # 1 <-> 4: IoU 1; 2 <-> 5: IoU 3/5 = 0.6; ground truth 3 missed; prediction 6 spurious
    scores = average_precision(pred, gt)
    assert list(scores) == [0.5, 0.75, 0.9]
    # t = 0.5: TP 2, FP 1, FN 1
    assert scores[0.5] == pytest.approx({"ap": 2 / 4, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "pq": 1.6 / 3})
    # t = 0.75 and 0.9: only the perfect match: TP 1, FP 2, FN 2
    for t in (0.75, 0.9):
        assert scores[t] == pytest.approx({"ap": 1 / 5, "precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3, "pq": 1 / 3})


def test_average_precision_matching_is_optimal_not_greedy():
    gt = row(*[1] * 10, *[2] * 10)  # G1 = pixels 0..9, G2 = 10..19
    pred = row(5, 5, 5, 0, *[6] * 11, 0, 0, 0, 0, 0)  # P5 = 0..2, P6 = 4..14
    # IoU(G1, P6) = 6/15 = 0.4, IoU(G1, P5) = 3/10 = 0.3, IoU(G2, P6) = 5/16 = 0.3125.
    # Taking the best pair first (G1-P6) leaves one match; the optimum is G1-P5 and G2-P6.
    scores = average_precision(pred, gt, thresholds=(0.25,))[0.25]
    assert scores["ap"] == 1.0
    assert scores["pq"] == pytest.approx((0.3 + 5 / 16) / 2)


def test_average_precision_empty_cases():
    empty = np.zeros((3, 3), int)
    assert average_precision(empty, empty, thresholds=(0.5,))[0.5] == dict.fromkeys(("ap", "precision", "recall", "f1", "pq"), 1.0)
    missed = average_precision(empty, np.eye(3, dtype=int), thresholds=(0.5,))[0.5]
    assert missed == dict.fromkeys(("ap", "precision", "recall", "f1", "pq"), 0.0)


def test_average_precision_pools_images():
    gt_a, gt_b = row(1, 1, 0, 2), row(1, 1)
    pred_a, pred_b = row(1, 1, 0, 0), row(0, 0)
    # image a: TP 1, FN 1; image b: FN 1 -> TP 1, FN 2
    assert average_precision([pred_a, pred_b], [gt_a, gt_b], thresholds=(0.5,))[0.5]["ap"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("thresholds", [(0.0,), (1.5,), ()])
def test_average_precision_rejects_bad_thresholds(thresholds):
    with pytest.raises(InputError, match="IoU thresholds"):
        average_precision(row(1), row(1), thresholds=thresholds)


def test_object_scores_of_100k_objects_need_no_dense_object_table(monkeypatch):
    from unetkit.evaluate import score_images
    from unetkit.metrics import objects

    gt = np.arange(1, 100_001, dtype=np.int64).reshape(250, 400)  # every pixel its own object
    pred = gt + 7
    pred[0, 1] = pred[0, 0]  # one predicted object covers ground-truth objects 1 and 2 (IoU 0.5 each)
    shapes = []
    real = objects.linear_sum_assignment
    monkeypatch.setattr(objects, "linear_sum_assignment", lambda cost, **kw: (shapes.append(cost.shape), real(cost, **kw))[1])
    scores, notes = score_images(pred, gt, metrics="seg,ap")  # a dense table would take 80 GB
    assert notes == [] and shapes == [(2, 1)]  # only the one shared part is matched as a table
    assert scores["seg"] == pytest.approx((99_998 + 0.5 + 0.5) / 100_000, abs=1e-12)
    assert scores["ap@0.5"] == pytest.approx(99_999 / 100_000, abs=1e-12)  # TP 99,999, FP 0, FN 1
    assert scores["ap@0.75"] == pytest.approx(99_998 / 100_001, abs=1e-12)  # TP 99,998, FP 1, FN 2
    assert scores["pq@0.5"] == pytest.approx((99_998 + 0.5) / (99_999 + 0.5), abs=1e-12)


def test_matching_in_connected_parts_equals_one_table():
    gt = row(1, 1, 1, 1, 2, 2, 0, 3, 3)
    pred = row(1, 1, 2, 2, 2, 2, 0, 3, 3)
    # IoU: gt1-pred1 2/4, gt1-pred2 2/6, gt2-pred2 2/4 (one part of three pairs), gt3-pred3 1 (a part alone).
    # Two matches in the first part beat one: gt1-pred1 and gt2-pred2.
    result = average_precision(pred, gt, thresholds=(0.3,))[0.3]
    assert result["ap"] == 1.0 and result["pq"] == pytest.approx((0.5 + 0.5 + 1.0) / 3, abs=1e-15)
