"""Clustering metrics: the ISBI 2012 Rand error, the adapted Rand error and the variation of information.

All three compare two partitions of the ground-truth foreground through the contingency table
n_ij = number of ground-truth-foreground pixels in ground-truth segment i and predicted segment j.
The table is built with one `np.bincount` (or `np.unique`) over combined labels, never a loop over
pixels. Ground-truth background (label 0; ISBI: membrane) is left out by every metric here.
A stack or list is scored as a whole: each image is its own partition (segments never span two
images), and the pair counts of all images are pooled before the score is formed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from ..labels import as_instances, label_components
from .base import CumulativeMetric, ThresholdSweep
from .inputs import (
    ISBI_THRESHOLDS,
    Images,
    as_labels,
    check_probability,
    compact_labels,
    is_probability,
    pair_counts,
    safe_ratio,
)


def _table(gt_labels: np.ndarray, pred_labels: np.ndarray):
    """Contingency table restricted to ground-truth foreground.

    Returns (i, j, n_ij, a, b): a = ground-truth segment sizes, b = predicted segment sizes
    (index 0 of b counts the ground-truth-foreground pixels predicted as background).
    """
    inside = gt_labels > 0
    g, ng = compact_labels(gt_labels[inside])
    p, npred = compact_labels(pred_labels[inside])
    i, j, nij = pair_counts(g, ng, p, npred)
    a = np.bincount(g, minlength=ng).astype(np.float64)
    b = np.bincount(p, minlength=npred).astype(np.float64)
    return i, j, nij, a, b


def _pred_segmentations(pred: np.ndarray, thresholds: Sequence[float]) -> list[np.ndarray]:
    """One predicted segmentation per threshold (label 0 = predicted background)."""
    if is_probability(pred):
        values = check_probability(pred, "pred")
        return [label_components(values > t) for t in thresholds]
    return [as_instances(as_labels(pred, "pred"))] * len(thresholds)


def _vrand_counts(gt_seg: np.ndarray, pred_seg: np.ndarray) -> tuple[float, float, float]:
    """(sum n_ij^2, sum a_i^2, sum b_j^2) in pixel-pair units, predicted background as singletons."""
    _, j, nij, a, b = _table(gt_seg, pred_seg)
    singletons = b[0] if b.size else 0.0
    objects = nij[j > 0]
    return (
        float(objects @ objects) + singletons,
        float(a @ a),
        float(b[1:] @ b[1:]) + singletons,
    )


def _no_foreground(metric: str) -> InputError:
    return InputError(
        f"gt: the ground truth has no foreground (cell interior) pixels, so the {metric} is undefined; "
        "leave this image out or score it with the pixel error"
    )


class RandError(ThresholdSweep):
    """Accumulator of `rand_error`: rows (sum n_ij^2, sum a_i^2, sum b_j^2), one per threshold."""

    key = "rand_error"

    def image_stats(self, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
        gt_seg = as_instances(as_labels(gt, "gt"))
        segmentations = _pred_segmentations(pred, self.thresholds)
        return np.array([_vrand_counts(gt_seg, seg) for seg in segmentations], dtype=np.float64)

    def threshold_errors(self, stats: np.ndarray) -> dict[float, float]:
        if stats[0, 1] == 0:
            raise _no_foreground("Rand error")
        # V_rand = 2PR / (P + R) with P = sum_ab / sum_b and R = sum_ab / sum_a
        return {t: float(1.0 - 2.0 * ab / (a + b)) for t, (ab, a, b) in zip(self.thresholds, stats)}


def rand_error(
    pred: Images,
    gt: Images,
    thresholds: Sequence[float] = ISBI_THRESHOLDS,
    *,
    return_thresholds: bool = False,
) -> float | tuple[float, dict[float, float]]:
    """ISBI 2012 Rand error: 1 - the maximal foreground-restricted Rand F-score V_rand.

    Convention of the challenge's reference implementation (Fiji,
    `trainableSegmentation.metrics.RandError`, `foregroundRestrictedStatsN2`; Arganda-Carreras
    et al., Front. Neuroanat. 2015): at each threshold t the prediction is binarised (value > t is
    cell interior) and labelled by 4-connected components; a binary ground truth ({0,1} or
    {0,255}, non-zero = cell interior) is labelled the same way, an instance label image is used
    as it is. With n_ij the number of ground-truth-foreground pixels in ground-truth segment i and
    predicted segment j (ground-truth background left out; predicted-background pixels inside a
    ground-truth cell each count as a singleton segment)::

        P = sum n_ij^2 / sum_j b_j^2,   R = sum n_ij^2 / sum_i a_i^2,   V_rand = 2PR / (P + R)

    The error is 1 - max over thresholds of V_rand (thresholds 0.0, 0.1, ..., 1.0 by default; a
    label-image prediction gives the same value at every threshold). The challenge's later variant
    that first thins predicted borders to one pixel is not applied. A stack or list pools the pair
    counts of all images per threshold. With `return_thresholds=True` returns
    `(error, {threshold: 1 - V_rand at that threshold})`.

    Raises InputError when the ground truth has no foreground pixel at all.

    Example:
        >>> import numpy as np
        >>> gt = np.zeros((5, 8), np.uint8); gt[1:4, 1:7] = 255    # one 3x6 cell
        >>> pred = (gt > 0).astype(float); pred[1:4, 3] = 0        # cut in two by a membrane
        >>> round(rand_error(pred, gt), 6)                         # 1 - 240/444 = 17/37
        0.459459
    """
    return RandError(thresholds).sweep(pred, gt, return_thresholds)


def _label_table(pred_labels: np.ndarray, gt_labels: np.ndarray):
    return _table(as_labels(gt_labels, "gt_labels"), as_labels(pred_labels, "pred_labels"))


class AdaptedRandError(CumulativeMetric):
    """Accumulator of `adapted_rand_error`: (sum n_ij^2, sum a_i^2, sum b_j^2, n) over images."""

    names = ("pred_labels", "gt_labels")
    key = "adapted_rand_error"

    def image_stats(self, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
        _, _, nij, a, b = _label_table(pred, gt)  # predicted 0 is an ordinary segment
        return np.array([nij @ nij, a @ a, b @ b, a.sum()], dtype=np.float64)

    def finish(self, stats: np.ndarray) -> float:
        sum_ab, sum_a, sum_b, n = stats
        if n == 0:
            raise _no_foreground("adapted Rand error")
        # pairs of distinct pixels: remove the n self-pairs from every sum
        sum_ab, sum_a, sum_b = sum_ab - n, sum_a - n, sum_b - n
        # no pixel pair shares a segment in either labelling: the two partitions agree
        return float(1.0 - safe_ratio(2.0 * sum_ab, sum_a + sum_b, empty=1.0))


def adapted_rand_error(pred_labels: Images, gt_labels: Images) -> float:
    """Adapted Rand error of the SNEMI3D / CREMI connectomics challenges: 1 - Rand F-score.

    Label images are compared as they are (a binary mask is one segment). Pixels with ground-truth
    label 0 are left out; predicted label 0 is an ordinary segment (no singletons, unlike
    `rand_error`). Over pairs of distinct pixels: P = (sum n_ij^2 - n) / (sum b_j^2 - n),
    R = (sum n_ij^2 - n) / (sum a_i^2 - n), error = 1 - 2PR / (P + R), the definition of
    Arganda-Carreras et al. (2015) as implemented by `skimage.metrics.adapted_rand_error`.
    A stack or list pools pair counts over images (segments never span two images).

    Raises InputError when the ground truth has no foreground pixel at all.

    Example:
        >>> import numpy as np
        >>> gt = np.array([[1, 1, 1, 1]])
        >>> round(adapted_rand_error(np.array([[1, 1, 2, 2]]), gt), 6)  # P = 1, R = 4/12
        0.5
    """
    return AdaptedRandError().compute(pred_labels, gt_labels)


class VariationOfInformation(CumulativeMetric):
    """Accumulator of `variation_of_information`: (n, n H(pred | gt), n H(gt | pred)) in bits."""

    names = ("pred_labels", "gt_labels")

    def image_stats(self, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
        i, j, nij, a, b = _label_table(pred, gt)
        split = -float(nij @ np.log2(nij / a[i])) if nij.size else 0.0
        merge = -float(nij @ np.log2(nij / b[j])) if nij.size else 0.0
        return np.array([a.sum(), split, merge], dtype=np.float64)

    def finish(self, stats: np.ndarray) -> tuple[float, float]:
        n, split, merge = stats
        if n == 0:
            raise _no_foreground("variation of information")
        # -0.0 from a perfect match reads badly in a report
        return float(abs(split / n)), float(abs(merge / n))

    def named(self, value: tuple[float, float]) -> dict[str, float]:
        return dict(zip(("vi_split", "vi_merge"), value))


def variation_of_information(pred_labels: Images, gt_labels: Images) -> tuple[float, float]:
    """Variation of information (Meila 2007) split into its two conditional entropies, in bits.

    Returns `(split, merge)`: split = H(pred | gt), large when ground-truth segments are cut into
    pieces (over-segmentation); merge = H(gt | pred), large when predicted segments span several
    ground-truth segments. VI = split + merge. Convention of connectomics (CREMI,
    `skimage.metrics.variation_of_information` with `ignore_labels=(0,)`): pixels with ground-truth
    label 0 are left out, predicted label 0 is an ordinary segment, label images are used as they
    are. A stack or list pools over images, i.e. the entropies are pixel-weighted means of the
    per-image entropies.

    Raises InputError when the ground truth has no foreground pixel at all.

    Example:
        >>> import numpy as np
        >>> variation_of_information(np.array([[1, 1, 2, 2]]), np.array([[1, 1, 1, 1]]))
        (1.0, 0.0)
    """
    return VariationOfInformation().compute(pred_labels, gt_labels)
