"""Segmentation metrics as the challenges of the U-Net paper define them.

- ISBI 2012 EM segmentation: `pixel_error` (and `pixel_error_fscore`), `rand_error`, `warping_error`;
- ISBI cell tracking challenge: `seg_score` (SEG, mean IoU of ground-truth objects);
- object detection: `average_precision` (AP, precision, recall, F1, panoptic quality);
- connectomics: `adapted_rand_error`, `variation_of_information`;
- binary masks: `dice`, `iou`.

Every metric takes one 2D image, a stack (N, H, W) or a list of 2D images; a stack is scored as a
whole, the way each challenge aggregates (each docstring says how). A 3D array is read as a stack
of independent sections; to score it as one volume (objects across slices, 6-connected) use
`unetkit.metrics.volume` (`seg_score_3d`, `average_precision_3d`, `rand_error_3d`, ...). Foreground is cell interior:
probability maps (float, in [0, 1]) count where `> threshold`, label images where `> 0`.
Ground truth is a label image: binary {0, 1} or {0, 255} (ISBI: 255 = cell interior) or instance
labels. User mistakes raise `unetkit.errors.InputError`.

Each metric is also an accumulator (`PixelError`, `RandError`, `SEG`, ...; see
`unetkit.metrics.base`): `update(pred, gt)` image by image, `aggregate()` pools them the same way.
`METRICS` (`unetkit.metrics.registry`) names them for `unetkit evaluate`.

Example:
    >>> import numpy as np
    >>> from unetkit.metrics import pixel_error, seg_score
    >>> gt = np.zeros((4, 4), np.uint8); gt[1:3, 1:3] = 255
    >>> pixel_error(gt / 255.0, gt), seg_score(gt // 255, gt // 255)
    (0.0, 1.0)
"""

from .base import CumulativeMetric, ThresholdSweep, best_over_thresholds
from .inputs import ISBI_THRESHOLDS
from .objects import AP_THRESHOLDS, SEG, AveragePrecision, average_precision, seg_score
from .pixel import Dice, IoU, PixelError, PixelErrorFScore, dice, iou, pixel_error, pixel_error_fscore
from .rand import AdaptedRandError, RandError, VariationOfInformation, adapted_rand_error, rand_error, variation_of_information
from .registry import METRICS, MetricSpec
from .volume import (
    SEG3D,
    AdaptedRandError3D,
    AveragePrecision3D,
    RandError3D,
    VariationOfInformation3D,
    adapted_rand_error_3d,
    average_precision_3d,
    rand_error_3d,
    seg_score_3d,
    variation_of_information_3d,
)
from .warping import ERROR_CLASSES, WarpingError, warping_error

__all__ = [
    "AP_THRESHOLDS",
    "ERROR_CLASSES",
    "ISBI_THRESHOLDS",
    "METRICS",
    "AdaptedRandError",
    "AdaptedRandError3D",
    "AveragePrecision",
    "AveragePrecision3D",
    "CumulativeMetric",
    "Dice",
    "IoU",
    "MetricSpec",
    "PixelError",
    "PixelErrorFScore",
    "RandError",
    "RandError3D",
    "SEG",
    "SEG3D",
    "ThresholdSweep",
    "VariationOfInformation",
    "VariationOfInformation3D",
    "WarpingError",
    "best_over_thresholds",
    "adapted_rand_error",
    "adapted_rand_error_3d",
    "average_precision",
    "average_precision_3d",
    "dice",
    "iou",
    "pixel_error",
    "pixel_error_fscore",
    "rand_error",
    "rand_error_3d",
    "seg_score",
    "seg_score_3d",
    "variation_of_information",
    "variation_of_information_3d",
    "warping_error",
]
