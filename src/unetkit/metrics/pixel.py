"""Pixel-wise metrics: pixel error (ISBI 2012), its F-score form, Dice and IoU of binary masks.

Foreground is cell interior: a probability map counts as foreground where it is `> threshold`,
a label image (binary {0,1}/{0,255} or instances) where it is `> 0`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import CumulativeMetric, ThresholdSweep
from .inputs import (
    ISBI_THRESHOLDS,
    Images,
    as_labels,
    check_probability,
    check_threshold,
    foreground,
    is_probability,
    safe_ratio,
)


class _Masks(CumulativeMetric):
    """A metric of the foreground masks: prediction `> threshold` (labels `> 0`), ground truth `> 0`."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = check_threshold(threshold)
        super().__init__()

    def masks(self, pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return foreground(pred, self.threshold, "pred"), as_labels(gt, "gt") > 0


class PixelError(_Masks):
    """Accumulator of `pixel_error`: [disagreeing pixels, pixels] summed over images."""

    key = "pixel_error"

    def image_stats(self, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
        p, g = self.masks(pred, gt)
        return np.array([np.count_nonzero(p != g), p.size], dtype=np.float64)

    def finish(self, stats: np.ndarray) -> float:
        return float(stats[0] / stats[1])


def pixel_error(pred: Images, gt: Images, threshold: float = 0.5) -> float:
    """Fraction of pixels whose binarised prediction disagrees with the ground truth.

    The ISBI 2012 challenge's pixel error (its reference implementation, Fiji's
    `trainableSegmentation.metrics.PixelError`, binarises both maps and squares the difference).
    `pred` is a probability of cell interior (foreground where `> threshold`) or a label image
    (foreground where `> 0`); `gt` is a label image, foreground where `> 0`. A stack or list is
    scored as a whole: disagreeing pixels of all images / pixels of all images.

    Example:
        >>> import numpy as np
        >>> pixel_error(np.array([[0.9, 0.2], [0.7, 0.1]]), np.array([[1, 0], [0, 0]]))
        0.25
    """
    return PixelError(threshold).compute(pred, gt)


def _fscore(tp: float, fp: float, fn: float) -> float:
    # Both maps empty: nothing to find and nothing found, a perfect score.
    return safe_ratio(2 * tp, 2 * tp + fp + fn, empty=1.0)


class PixelErrorFScore(ThresholdSweep):
    """Accumulator of `pixel_error_fscore`: rows [TP, FP, FN], one per threshold, summed over images."""

    key = "pixel_error_fscore"

    def image_stats(self, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
        g = as_labels(gt, "gt") > 0
        if is_probability(pred):
            values = check_probability(pred, "pred")
            masks = [values > t for t in self.thresholds]
        else:
            masks = [as_labels(pred, "pred") > 0] * len(self.thresholds)
        rows = []
        for p in masks:
            tp = np.count_nonzero(p & g)
            rows.append((tp, np.count_nonzero(p) - tp, np.count_nonzero(g) - tp))
        return np.array(rows, dtype=np.float64)

    def threshold_errors(self, stats: np.ndarray) -> dict[float, float]:
        return {t: 1.0 - _fscore(*row) for t, row in zip(self.thresholds, stats)}


def pixel_error_fscore(
    pred: Images,
    gt: Images,
    thresholds: Sequence[float] = ISBI_THRESHOLDS,
    *,
    return_thresholds: bool = False,
) -> float | tuple[float, dict[float, float]]:
    """The ISBI 2012 form of the pixel error: 1 - the maximal F-score over thresholds.

    At each threshold t the prediction is binarised (`> t`; label images: `> 0`) and compared
    with the ground truth foreground (`> 0`); positives are cell-interior pixels, and
    F = 2 TP / (2 TP + FP + FN), as in Fiji's `PixelError.getPixelErrorMaximalFScore` over the
    thresholds 0.0, 0.1, ..., 1.0. Both maps empty counts as F = 1. A stack or list pools TP,
    FP and FN over all images before forming F.

    With `return_thresholds=True` returns `(error, {threshold: 1 - F at that threshold})`.

    Example:
        >>> import numpy as np
        >>> pred = np.array([[0.9, 0.4, 0.6, 0.05]])
        >>> round(pixel_error_fscore(pred, np.array([[1, 1, 0, 0]])), 6)  # best F = 0.8 at t = 0.1
        0.2
    """
    return PixelErrorFScore(thresholds).sweep(pred, gt, return_thresholds)


class _Overlap(_Masks):
    """[|P n G|, |P|, |G|] of binary foreground masks, summed over images."""

    def image_stats(self, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
        p, g = self.masks(pred, gt)
        return np.array([np.count_nonzero(p & g), np.count_nonzero(p), np.count_nonzero(g)], dtype=np.float64)


class Dice(_Overlap):
    """Accumulator of `dice`."""

    key = "dice"

    def finish(self, stats: np.ndarray) -> float:
        inter, p, g = stats
        return safe_ratio(2 * inter, p + g, empty=1.0)


class IoU(_Overlap):
    """Accumulator of `iou`."""

    key = "iou"

    def finish(self, stats: np.ndarray) -> float:
        inter, p, g = stats
        return safe_ratio(inter, p + g - inter, empty=1.0)


def dice(pred: Images, gt: Images, threshold: float = 0.5) -> float:
    """Dice coefficient 2|P n G| / (|P| + |G|) of the foreground masks (Dice 1945).

    Foreground as in `pixel_error`. Two empty masks score 1. A stack or list pools the pixel
    counts of all images (one mask spanning the dataset), not a mean of per-image scores.

    Example:
        >>> import numpy as np
        >>> dice(np.array([[1, 1, 0, 0]]), np.array([[1, 0, 0, 0]]))
        0.6666666666666666
    """
    return Dice(threshold).compute(pred, gt)


def iou(pred: Images, gt: Images, threshold: float = 0.5) -> float:
    """Intersection over union |P n G| / |P u G| of the foreground masks (Jaccard index).

    Foreground as in `pixel_error`. Two empty masks score 1. A stack or list pools the pixel
    counts of all images. For the per-object IoU of the cell tracking challenge see `seg_score`.

    Example:
        >>> import numpy as np
        >>> iou(np.array([[1, 1, 0, 0]]), np.array([[1, 0, 0, 0]]))
        0.5
    """
    return IoU(threshold).compute(pred, gt)
