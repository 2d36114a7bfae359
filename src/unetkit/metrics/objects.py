"""Object metrics on instance label images (0 = background, every other value one object).

Overlaps of all (ground-truth, predicted) object pairs come from one sparse contingency table over
the combined labels (only the pairs that overlap); matching works on that table, never on pixels,
and never builds a dense (objects x objects) array, so images with 100,000 objects fit in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..errors import InputError
from .base import CumulativeMetric
from .inputs import Images, as_labels, compact_labels, pair_counts, safe_ratio

AP_THRESHOLDS: tuple[float, ...] = (0.5, 0.75, 0.9)


def _overlaps(pred_labels: np.ndarray, gt_labels: np.ndarray):
    """(i, j, |R_i n S_j|, |R|, |S|) for every overlapping pair of objects; |R|, |S| indexed by id."""
    g, ng = compact_labels(as_labels(gt_labels, "gt_labels"))
    p, npred = compact_labels(as_labels(pred_labels, "pred_labels"))
    i, j, nij = pair_counts(g.ravel(), ng, p.ravel(), npred)
    gt_area = np.bincount(g.ravel(), minlength=ng).astype(np.float64)
    pred_area = np.bincount(p.ravel(), minlength=npred).astype(np.float64)
    gt_area[0] = pred_area[0] = 0.0
    both = (i > 0) & (j > 0)
    return i[both], j[both], nij[both], gt_area, pred_area


class SEG(CumulativeMetric):
    """Accumulator of `seg_score`: [sum of IoU over matched ground-truth objects, their number]."""

    names = ("pred_labels", "gt_labels")
    key = "seg"

    def image_stats(self, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
        i, j, nij, gt_area, pred_area = _overlaps(pred, gt)
        matched = nij > 0.5 * gt_area[i]
        ious = nij[matched] / (gt_area[i[matched]] + pred_area[j[matched]] - nij[matched])
        return np.array([ious.sum(), np.count_nonzero(gt_area)], dtype=np.float64)

    def finish(self, stats: np.ndarray) -> float:
        total, count = stats
        if count == 0:
            raise InputError("gt_labels: the ground truth has no objects, so SEG is undefined; leave these images out")
        return float(total / count)


def seg_score(pred_labels: Images, gt_labels: Images) -> float:
    """SEG of the ISBI Cell Tracking Challenge: mean IoU of the ground-truth objects.

    A predicted object S matches ground-truth object R when |R n S| > 0.5 |R| (so at most one S
    matches each R); the score of R is |R n S| / |R u S| if matched, else 0 (Maska et al.,
    Bioinformatics 2014; Ulman et al., Nat. Methods 2017). Unmatched predicted objects cost
    nothing. Given several images (a stack or a list) the mean runs over all ground-truth objects
    of the dataset, not over per-image means, as the challenge's SEG measure does.

    Raises InputError when the ground truth holds no object at all.

    Example:
        >>> import numpy as np
        >>> gt = np.array([[1, 1, 1, 1, 0, 2, 2]])
        >>> pred = np.array([[5, 5, 5, 0, 0, 7, 0]])  # 3 of 4 pixels: IoU 0.75; 1 of 2: no match
        >>> seg_score(pred, gt)
        0.375
    """
    return SEG().compute(pred_labels, gt_labels)


def _check_ap_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    ts = tuple(float(t) for t in np.atleast_1d(np.asarray(thresholds, dtype=np.float64)).tolist())
    if not ts or any(not 0.0 < t <= 1.0 for t in ts):
        raise InputError(f"thresholds={tuple(thresholds)!r}: IoU thresholds must lie in (0, 1], e.g. (0.5, 0.75, 0.9)")
    return ts


def _match(i: np.ndarray, j: np.ndarray, ious: np.ndarray) -> tuple[int, float]:
    """(matches, their summed IoU) of a one-to-one matching of the pairs (i, j) with most matches,
    then most IoU.

    The pairs form a sparse bipartite graph; each connected part is matched on its own (the optimum
    of the whole is the union of the parts' optima), so no (objects x objects) table is ever built.
    A pair alone in its part (every pair when IoU > 0.5) is a match as it is.
    """
    if i.size == 0:
        return 0, 0.0
    rows, row = np.unique(i, return_inverse=True)
    cols, col = np.unique(j, return_inverse=True)
    graph = coo_matrix((np.ones(i.size), (row, rows.size + col)), shape=(rows.size + cols.size,) * 2)
    _, part = connected_components(graph, directed=False)
    edge_part = part[row]
    sizes = np.bincount(edge_part, minlength=part.max() + 1)
    single = sizes[edge_part] == 1
    tp, total = int(np.count_nonzero(single)), float(ious[single].sum())
    shared = np.flatnonzero(~single)
    shared = shared[np.argsort(edge_part[shared], kind="stable")]
    for edges in np.split(shared, np.flatnonzero(np.diff(edge_part[shared])) + 1) if shared.size else ():
        r, rr = np.unique(row[edges], return_inverse=True)
        c, cc = np.unique(col[edges], return_inverse=True)
        # Most matches first, then most IoU: the IoU bonus of all matches together stays < 1.
        weight = np.zeros((r.size, c.size))
        weight[rr, cc] = 1.0 + ious[edges] / (2.0 * min(r.size, c.size))
        iou = np.zeros((r.size, c.size))
        iou[rr, cc] = ious[edges]
        a, b = linear_sum_assignment(weight, maximize=True)
        chosen = weight[a, b] > 0
        tp += int(np.count_nonzero(chosen))
        total += float(iou[a[chosen], b[chosen]].sum())
    return tp, total


class AveragePrecision(CumulativeMetric):
    """Accumulator of `average_precision`: rows [TP, FP, FN, sum of IoU over TP], one per IoU threshold."""

    names = ("pred_labels", "gt_labels")

    def __init__(self, thresholds: Sequence[float] = AP_THRESHOLDS) -> None:
        self.thresholds = _check_ap_thresholds(thresholds)
        super().__init__()

    def image_stats(self, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
        i, j, nij, gt_area, pred_area = _overlaps(pred, gt)
        n_gt, n_pred = np.count_nonzero(gt_area), np.count_nonzero(pred_area)
        ious = nij / (gt_area[i] + pred_area[j] - nij)
        rows = []
        for t in self.thresholds:
            ok = ious >= t
            tp, total = _match(i[ok], j[ok], ious[ok])
            rows.append((tp, n_pred - tp, n_gt - tp, total))
        return np.array(rows, dtype=np.float64)

    def finish(self, stats: np.ndarray) -> dict[float, dict[str, float]]:
        result = {}
        for t, (tp, fp, fn, total) in zip(self.thresholds, stats):
            empty = 1.0 if tp + fp + fn == 0 else 0.0
            result[t] = {
                "ap": safe_ratio(tp, tp + fp + fn, empty),
                "precision": safe_ratio(tp, tp + fp, empty),
                "recall": safe_ratio(tp, tp + fn, empty),
                "f1": safe_ratio(2 * tp, 2 * tp + fp + fn, empty),
                "pq": safe_ratio(total, tp + 0.5 * fp + 0.5 * fn, empty),
            }
        return result

    def named(self, value: dict[float, dict[str, float]]) -> dict[str, float]:
        return {f"{name}@{t:g}": v for t, scores in value.items() for name, v in scores.items()}


def average_precision(
    pred_labels: Images,
    gt_labels: Images,
    thresholds: Sequence[float] = AP_THRESHOLDS,
) -> dict[float, dict[str, float]]:
    """Object detection scores at IoU thresholds, after optimal one-to-one matching.

    At each threshold t, predicted and ground-truth objects are matched one to one by the
    Hungarian algorithm (`scipy.optimize.linear_sum_assignment`) over pairs with IoU >= t,
    maximising the number of matches (then their total IoU). With TP matches, FP unmatched
    predictions and FN unmatched ground-truth objects:

    - `ap` = TP / (TP + FP + FN) (the "average precision" of the 2018 Data Science Bowl,
      StarDist and Cellpose),
    - `precision` = TP / (TP + FP), `recall` = TP / (TP + FN), `f1` = 2TP / (2TP + FP + FN),
    - `pq` = panoptic quality (Kirillov et al., CVPR 2019): sum of matched IoU / (TP + FP/2 + FN/2).

    A ratio 0/0 is 1.0 when neither side has any object, else 0.0. Several images (a stack or a
    list) pool TP, FP, FN and matched IoU over the dataset. Returns `{t: {"ap", "precision",
    "recall", "f1", "pq"}}` for each threshold t.

    Example:
        >>> import numpy as np
        >>> gt = np.array([[1, 1, 0, 2, 2, 2, 2, 2]])
        >>> pred = np.array([[3, 3, 0, 4, 4, 4, 0, 0]])  # IoU 1 and 0.6
        >>> average_precision(pred, gt, thresholds=(0.5, 0.75))[0.75]["ap"]  # 1 TP, 1 FP, 1 FN
        0.3333333333333333
    """
    return AveragePrecision(thresholds).compute(pred_labels, gt_labels)
