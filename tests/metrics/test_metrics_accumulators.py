"""Every metric's accumulator: image-by-image updates score as the whole stack does."""

import numpy as np
import pytest

from unetkit.errors import InputError
from unetkit.metrics import METRICS, PixelError, RandError, best_over_thresholds, rand_error
from unetkit.labels import as_instances


def _stack(rng):
    gt = np.zeros((3, 24, 24), np.int64)
    gt[:, 3:10, 3:10], gt[:, 12:20, 5:15], gt[:, 4:9, 14:21] = 1, 2, 3
    prob = np.clip((gt > 0) * 0.8 + rng.normal(0, 0.2, gt.shape), 0, 1)
    return prob, gt


@pytest.mark.parametrize("name", sorted(METRICS))
def test_updates_image_by_image_equal_one_update_of_the_stack(name, rng):
    prob, gt = _stack(rng)
    spec = METRICS[name]
    if spec.objects:
        pred = np.stack([as_instances((p > 0.5).astype(np.uint8)) for p in prob])
    else:
        pred = prob
    whole = spec.make(0.5)
    whole.update(pred, gt)
    pieces = spec.make(0.5)
    for p, g in zip(pred, gt):
        pieces.update(p, g)
    assert pieces.scores() == whole.scores()
    assert set(spec.columns) <= set(whole.scores())


def test_aggregate_needs_an_update_and_reset_forgets():
    metric = PixelError()
    with pytest.raises(InputError, match="update"):
        metric.aggregate()
    metric.update(np.array([[0.9, 0.1]]), np.array([[1, 1]]))
    assert metric.aggregate() == 0.5
    metric.reset()
    with pytest.raises(InputError):
        metric.aggregate()


def test_threshold_sweep_keeps_the_best_threshold(rng):
    prob, gt = _stack(rng)
    metric = RandError()
    metric.update(prob, gt)
    errors = metric.errors()
    assert metric.aggregate() == best_over_thresholds(errors) == min(errors.values())
    assert rand_error(prob, gt, return_thresholds=True) == (metric.aggregate(), errors)
