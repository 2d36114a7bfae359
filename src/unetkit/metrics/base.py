"""Metrics as accumulators: `update(pred, gt)` image by image, `aggregate()` over all of them.

Every metric reduces one 2D (prediction, ground truth) pair to a small array of sufficient
statistics (pixel counts, pair counts, matches); `update` adds them up and `aggregate` turns
the sum into the score. A dataset is thus scored the way its challenge pools it (not as a mean of
per-image scores), and scoring image by image gives the same value as scoring the stack at once.

Example:
    >>> import numpy as np
    >>> from unetkit.metrics import PixelError
    >>> metric = PixelError(threshold=0.5)
    >>> _ = metric.update(np.array([[0.9, 0.2]]), np.array([[1, 0]]))
    >>> _ = metric.update(np.array([[0.9, 0.2]]), np.array([[0, 0]]))
    >>> metric.aggregate()
    0.25
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np

from ..errors import InputError
from .inputs import ISBI_THRESHOLDS, Images, check_thresholds, paired_slices

Score = Union[float, int, None]


def best_over_thresholds(errors: Mapping[float, float]) -> float:
    """The smallest of the errors at several binarisation thresholds (ISBI 2012: the best one counts).

    Example:
        >>> best_over_thresholds({0.3: 0.2, 0.5: 0.1, 0.7: 0.4})
        0.1
    """
    return min(errors.values())


class CumulativeMetric:
    """Base of the metric accumulators.

    Subclasses define `image_stats(pred, gt)` (the statistics of one 2D pair, as a float array
    that adds up over images), `finish(stats)` (the score of summed statistics) and `key` or
    `named(score)` (the score as named values: the columns of `unetkit evaluate`).
    """

    #: Argument names used in messages (`pred`/`gt`, or `pred_labels`/`gt_labels`).
    names: tuple[str, str] = ("pred", "gt")
    #: The name of the score in reports (see `named`).
    key: str = ""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self.total: np.ndarray | None = None

    def update(self, pred: Images, gt: Images) -> np.ndarray:
        """Add one 2D image, a stack (N, H, W) or a list of 2D images; returns their statistics."""
        stats = sum(self.image_stats(p, g) for p, g in paired_slices(pred, gt, *self.names))
        self.total = stats if self.total is None else self.total + stats
        return stats

    def aggregate(self) -> Any:
        """The score of everything added since creation (or `reset`)."""
        return self.finish(self._total())

    def compute(self, pred: Images, gt: Images) -> Any:
        """The score of `pred` against `gt` alone (resets first)."""
        self.reset()
        self.update(pred, gt)
        return self.aggregate()

    def _total(self) -> np.ndarray:
        if self.total is None:
            raise InputError(f"{type(self).__name__}: nothing to aggregate; call update(pred, gt) first")
        return self.total

    # -- what each metric defines ----------------------------------------------------------------

    def image_stats(self, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def finish(self, stats: np.ndarray) -> Any:
        raise NotImplementedError

    def scores(self, stats: np.ndarray | None = None) -> dict[str, Score]:
        """The score of `stats` (default: of all updates) as named values, for reports."""
        return self.named(self.finish(self._total() if stats is None else stats))

    def named(self, value: Any) -> dict[str, Score]:
        return {self.key: value}


class ThresholdSweep(CumulativeMetric):
    """A metric computed at several binarisation thresholds, whose error is the best of them."""

    def __init__(self, thresholds: Sequence[float] = ISBI_THRESHOLDS) -> None:
        self.thresholds = check_thresholds(thresholds)
        super().__init__()

    def errors(self, stats: np.ndarray | None = None) -> dict[float, float]:
        """{threshold: error at that threshold} of `stats` (default: of all updates)."""
        return self.threshold_errors(self._total() if stats is None else stats)

    def finish(self, stats: np.ndarray) -> float:
        return best_over_thresholds(self.threshold_errors(stats))

    def sweep(self, pred: Images, gt: Images, return_thresholds: bool) -> float | tuple[float, dict[float, float]]:
        """The best error of `pred` against `gt`, with the error at each threshold if asked."""
        error = self.compute(pred, gt)
        return (error, self.errors()) if return_thresholds else error

    def threshold_errors(self, stats: np.ndarray) -> dict[float, float]:
        raise NotImplementedError
