"""Checking and normalising metric inputs: one 2D image, a stack (N, H, W) or a list of 2D images.

Two kinds of array reach the metrics:

- a *prediction map*: a float array is a probability of cell interior and must lie in [0, 1];
  a bool or integer array is a label image (binary or instance) whose foreground is `> 0`;
- a *label image*: bool, integer, or float holding whole numbers only, never negative; 0 is
  background (ISBI: membrane), any other value is cell interior ({0, 1}, {0, 255} or instance ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np

from ..errors import InputError
from ..labels import check_labels

Images = Union[np.ndarray, Sequence[np.ndarray]]

#: The thresholds at which the ISBI 2012 challenge binarised a submitted probability map.
ISBI_THRESHOLDS: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(11))

_FLOAT_LABELS_HINT = "turn a probability map into labels first (unetkit.postprocess.probabilities_to_instances)"


def as_slices(images: Images, name: str) -> list[np.ndarray]:
    """The 2D slices of a 2D image, an (N, H, W) stack or a list of 2D images."""
    if isinstance(images, (list, tuple)):
        slices = [np.asarray(a) for a in images]
    else:
        array = np.asarray(images)
        if array.ndim == 2:
            slices = [array]
        elif array.ndim == 3:
            slices = list(array)
        else:
            raise InputError(
                f"{name}: expected a 2D image (H, W), a stack (N, H, W) or a list of 2D images, "
                f"got shape {array.shape}; score volumes with unetkit.metrics.volume (seg_score_3d, ...)"
            )
    if not slices:
        raise InputError(f"{name}: no images given; pass at least one 2D image")
    for i, s in enumerate(slices):
        if s.ndim != 2:
            raise InputError(f"{name}: image {i} has shape {s.shape}; each image must be 2D (H, W)")
        if s.size == 0:
            raise InputError(f"{name}: image {i} is empty (shape {s.shape})")
    return slices


def paired_slices(pred: Images, gt: Images, pred_name: str = "pred", gt_name: str = "gt") -> list[tuple[np.ndarray, np.ndarray]]:
    """Slices of `pred` and `gt`, checked to pair up one to one with equal shapes."""
    p = as_slices(pred, pred_name)
    g = as_slices(gt, gt_name)
    if len(p) != len(g):
        raise InputError(f"{pred_name} has {len(p)} images but {gt_name} has {len(g)}; give one prediction per ground truth")
    for i, (a, b) in enumerate(zip(p, g)):
        if a.shape != b.shape:
            where = f" (image {i})" if len(p) > 1 else ""
            raise InputError(
                f"{pred_name} and {gt_name} differ in shape{where}: {a.shape} vs {b.shape}; "
                "the prediction must cover the ground truth pixel for pixel"
            )
    return list(zip(p, g))


def check_probability(array: np.ndarray, name: str) -> np.ndarray:
    """`array` as float64, after checking it is a probability map (finite, within [0, 1])."""
    values = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise InputError(f"{name}: probability map contains NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(
            f"{name}: probability map has values in [{lo:g}, {hi:g}], outside [0, 1]; give probabilities "
            "(e.g. the float TIFF written by `unetkit predict`) or an integer label image"
        )
    return values


def as_labels(array: np.ndarray, name: str) -> np.ndarray:
    """`array` as an int64 label image, after checking it holds whole numbers >= 0 (see `check_labels`)."""
    return check_labels(array, name, hint=_FLOAT_LABELS_HINT)


def foreground(array: np.ndarray, threshold: float, name: str) -> np.ndarray:
    """Binary cell-interior mask of a prediction map: probability > threshold, or label > 0."""
    a = np.asarray(array)
    if np.issubdtype(a.dtype, np.floating):
        return check_probability(a, name) > threshold
    return as_labels(a, name) > 0


def is_probability(array: np.ndarray) -> bool:
    """True for float arrays, which the metrics read as probability maps."""
    return np.issubdtype(np.asarray(array).dtype, np.floating)


def check_threshold(threshold: float, name: str = "threshold") -> float:
    t = float(threshold)
    if not 0.0 <= t <= 1.0:
        raise InputError(f"{name}={threshold!r} is outside [0, 1]; probabilities are thresholded in [0, 1]")
    return t


def check_thresholds(thresholds: Sequence[float], name: str = "thresholds") -> tuple[float, ...]:
    ts = tuple(check_threshold(t, name) for t in np.atleast_1d(np.asarray(thresholds, dtype=np.float64)).tolist())
    if not ts:
        raise InputError(f"{name}: give at least one threshold")
    return ts


def safe_ratio(numerator: float, denominator: float, empty: float) -> float:
    """numerator / denominator, or `empty` when the denominator is 0."""
    return float(numerator) / float(denominator) if denominator else float(empty)


def compact_labels(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels renumbered to 0..k-1 (0 stays 0) when they are sparse; returns (labels, k)."""
    if labels.size == 0:
        return labels, 1
    top = int(labels.max()) + 1
    if top <= 4 * labels.size + 16:
        return labels, top
    values, inverse = np.unique(np.concatenate([[0], labels.ravel()]), return_inverse=True)
    return inverse[1:].reshape(labels.shape), values.size


def pair_counts(a: np.ndarray, na: int, b: np.ndarray, nb: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-zero entries (i, j, n_ij) of the contingency table of two compact 1D label arrays."""
    key = a.astype(np.int64) * nb + b
    if na * nb <= max(4 * a.size, 1 << 20):
        table = np.bincount(key, minlength=na * nb)
        key = np.flatnonzero(table)
        counts = table[key]
    else:
        key, counts = np.unique(key, return_counts=True)
    return key // nb, key % nb, counts.astype(np.float64)
