"""The metrics `unetkit evaluate` knows, by name: how to make each accumulator and what it reports.

Example:
    >>> metric = METRICS["dice"].make(0.5)
    >>> import numpy as np
    >>> metric.compute(np.array([[1, 1, 0, 0]]), np.array([[1, 0, 0, 0]]))
    0.6666666666666666
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..metric_info import METRIC_DESCRIPTIONS
from .base import CumulativeMetric
from .inputs import ISBI_THRESHOLDS
from .objects import AP_THRESHOLDS, SEG, AveragePrecision
from .pixel import Dice, IoU, PixelError, PixelErrorFScore
from .rand import AdaptedRandError, RandError, VariationOfInformation
from .warping import WarpingError


@dataclass(frozen=True)
class MetricSpec:
    """A named metric: its description, whether it compares instances, and its accumulator."""

    description: str
    objects: bool  # True: needs instance labels on both sides
    make: Callable[[float], CumulativeMetric]  # the accumulator, given the binarisation threshold
    columns: tuple[str, ...]  # keys shown in a printed table (`scores` gives all keys)


def _spec(name: str, objects: bool, make: Callable[[float], CumulativeMetric], columns: tuple[str, ...]) -> MetricSpec:
    return MetricSpec(METRIC_DESCRIPTIONS[name], objects, make, columns)


METRICS: dict[str, MetricSpec] = {
    "pixel": _spec("pixel", False, PixelError, ("pixel_error",)),
    "pixel_f": _spec("pixel_f", False, lambda t: PixelErrorFScore(ISBI_THRESHOLDS), ("pixel_error_fscore",)),
    "rand": _spec("rand", False, lambda t: RandError(ISBI_THRESHOLDS), ("rand_error",)),
    "warping": _spec("warping", False, WarpingError, ("warping_error",)),
    "dice": _spec("dice", False, Dice, ("dice",)),
    "iou": _spec("iou", False, IoU, ("iou",)),
    "seg": _spec("seg", True, lambda t: SEG(), ("seg",)),
    "ap": _spec("ap", True, lambda t: AveragePrecision(AP_THRESHOLDS), tuple(f"ap@{t:g}" for t in AP_THRESHOLDS)),
    "adapted_rand": _spec("adapted_rand", True, lambda t: AdaptedRandError(), ("adapted_rand_error",)),
    "vi": _spec("vi", True, lambda t: VariationOfInformation(), ("vi_split", "vi_merge")),
}
