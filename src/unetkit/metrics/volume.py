"""The metrics of `unetkit.metrics` on volumes: objects and segments are 3D, 6-connected.

The 2D metrics read a 3D array (N, H, W) as a stack of independent images, the way the
challenges of the paper score a series of sections: an object cut by a slice counts once per
slice. The functions here read a 3D array as one volume (Z, Y, X) instead: an object is a set of
voxels across slices, the contingency tables count voxels, and binary maps are split into
6-connected components (face neighbours). A list of volumes is scored as a dataset, pooled the
way the 2D counterparts pool images.

| volume | 2D counterpart |
| --- | --- |
| `seg_score_3d` | `seg_score` |
| `average_precision_3d` | `average_precision` |
| `rand_error_3d` | `rand_error` (ISBI 2012 convention, 6- instead of 4-connected components) |
| `adapted_rand_error_3d` | `adapted_rand_error` |
| `variation_of_information_3d` | `variation_of_information` |

Example:
    >>> import numpy as np
    >>> from unetkit.metrics import seg_score
    >>> gt = np.zeros((3, 4, 4), np.int64); gt[:, 1:3, 1:3] = 1  # one cell on 3 slices, 12 voxels
    >>> pred = gt.copy(); pred[0] = 2 * gt[0]                       # its top slice a separate object
    >>> round(seg_score_3d(pred, gt), 4), seg_score(pred, gt)       # 3D: split (8 of 12); 2D: 3 perfect slices
    (0.6667, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from ..labels3d import as_instances_3d, label_components_3d
from .inputs import ISBI_THRESHOLDS, Images, as_labels, check_probability, is_probability
from .objects import AP_THRESHOLDS, SEG, AveragePrecision
from .rand import AdaptedRandError, RandError, VariationOfInformation, _vrand_counts

__all__ = [
    "AdaptedRandError3D",
    "AveragePrecision3D",
    "RandError3D",
    "SEG3D",
    "VariationOfInformation3D",
    "adapted_rand_error_3d",
    "as_volumes",
    "average_precision_3d",
    "rand_error_3d",
    "seg_score_3d",
    "variation_of_information_3d",
]


def as_volumes(volumes: Images, name: str) -> list[np.ndarray]:
    """The volumes of one (Z, Y, X) array or a list of them."""
    items = [np.asarray(v) for v in volumes] if isinstance(volumes, (list, tuple)) else [np.asarray(volumes)]
    if not items:
        raise InputError(f"{name}: no volumes given; pass at least one (Z, Y, X) volume")
    for i, v in enumerate(items):
        if v.ndim != 3:
            hint = " (for 2D images use the functions of unetkit.metrics)" if v.ndim == 2 else ""
            raise InputError(f"{name}: volume {i} has shape {v.shape}; each volume must be 3D (Z, Y, X){hint}")
        if v.size == 0:
            raise InputError(f"{name}: volume {i} is empty (shape {v.shape})")
    return items


class _Volumes:
    """Mixin: `update` takes one volume or a list of volumes and scores each as a whole."""

    names: tuple[str, str]

    def update(self, pred: Images, gt: Images) -> np.ndarray:
        p, g = as_volumes(pred, self.names[0]), as_volumes(gt, self.names[1])
        if len(p) != len(g):
            raise InputError(f"{self.names[0]} has {len(p)} volumes but {self.names[1]} has {len(g)}; give one prediction per ground truth")
        for i, (a, b) in enumerate(zip(p, g)):
            if a.shape != b.shape:
                raise InputError(f"{self.names[0]} and {self.names[1]} differ in shape (volume {i}): {a.shape} vs {b.shape}")
        stats = sum(self.image_stats(a, b) for a, b in zip(p, g))  # type: ignore[attr-defined]
        self.total = stats if self.total is None else self.total + stats  # type: ignore[has-type]
        return stats


class SEG3D(_Volumes, SEG):
    """Accumulator of `seg_score_3d`."""


class AveragePrecision3D(_Volumes, AveragePrecision):
    """Accumulator of `average_precision_3d`."""


class AdaptedRandError3D(_Volumes, AdaptedRandError):
    """Accumulator of `adapted_rand_error_3d`."""


class VariationOfInformation3D(_Volumes, VariationOfInformation):
    """Accumulator of `variation_of_information_3d`."""


class RandError3D(_Volumes, RandError):
    """Accumulator of `rand_error_3d`: binary maps are split into 6-connected components."""

    def image_stats(self, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
        gt_seg = as_instances_3d(as_labels(gt, "gt"), "gt")
        if is_probability(pred):
            values = check_probability(pred, "pred")
            segmentations = [label_components_3d(values > t) for t in self.thresholds]
        else:
            segmentations = [as_instances_3d(as_labels(pred, "pred"), "pred")] * len(self.thresholds)
        return np.array([_vrand_counts(gt_seg, seg) for seg in segmentations], dtype=np.float64)


def seg_score_3d(pred_labels: Images, gt_labels: Images) -> float:
    """SEG (`seg_score`) of label volumes: mean IoU of the ground-truth objects, counted in voxels.

    Example:
        >>> import numpy as np
        >>> gt = np.zeros((2, 1, 4), np.int64); gt[:, 0, :] = 1
        >>> pred = gt.copy(); pred[1, 0, 3] = 0
        >>> seg_score_3d(pred, gt)
        0.875
    """
    return SEG3D().compute(pred_labels, gt_labels)


def average_precision_3d(
    pred_labels: Images, gt_labels: Images, thresholds: Sequence[float] = AP_THRESHOLDS
) -> dict[float, dict[str, float]]:
    """`average_precision` of label volumes: objects matched one to one by voxel IoU."""
    return AveragePrecision3D(thresholds).compute(pred_labels, gt_labels)


def rand_error_3d(
    pred: Images, gt: Images, thresholds: Sequence[float] = ISBI_THRESHOLDS, *, return_thresholds: bool = False
) -> float | tuple[float, dict[float, float]]:
    """`rand_error` of volumes: probability maps binarised at each threshold and split into
    6-connected components; binary ground truth split the same way; instance labels as they are."""
    return RandError3D(thresholds).sweep(pred, gt, return_thresholds)


def adapted_rand_error_3d(pred_labels: Images, gt_labels: Images) -> float:
    """`adapted_rand_error` of label volumes (the SNEMI3D / CREMI definition, over voxel pairs)."""
    return AdaptedRandError3D().compute(pred_labels, gt_labels)


def variation_of_information_3d(pred_labels: Images, gt_labels: Images) -> tuple[float, float]:
    """`variation_of_information` of label volumes: (split, merge) in bits, over voxels."""
    return VariationOfInformation3D().compute(pred_labels, gt_labels)
