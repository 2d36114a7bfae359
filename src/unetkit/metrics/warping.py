"""Warping error (Jain et al., CVPR 2010), as used by the ISBI 2012 EM segmentation challenge.

The binary ground truth is warped toward the binarised prediction by flipping, one at a time,
disagreeing pixels that are *simple*: pixels whose flip changes no topology (no object or hole
appears, disappears, splits or merges). What still disagrees afterwards are topological errors.

Digital topology: cell interior (foreground, value > 0) is 4-connected and membrane/background
8-connected, the pair of Fiji's `trainableSegmentation.metrics.WarpingError` (it tests simple points
with `simple2DBertrand(patch, 4)`) and of the 4-connected cell labelling of the Rand error. Outside
the image counts as background. A pixel is simple iff, in its 3x3 neighbourhood without itself,
the foreground has exactly one 4-connected component 4-adjacent to it and the background exactly
one 8-connected component (Bertrand & Malandain 1994, topological numbers T4 and T8-bar); both
numbers are tabulated once for the 256 neighbourhood configurations.
"""

from __future__ import annotations

import heapq
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

from ..labels import EIGHT_CONNECTED, label_components
from .base import CumulativeMetric
from .inputs import Images, as_labels, check_probability, check_threshold, is_probability

#: Error classes reported by `warping_error(..., return_details=True)`, from the prediction's view.
ERROR_CLASSES = ("split", "merge", "object_added", "object_removed", "hole_added", "hole_removed")

# neighbour k of the 3x3 neighbourhood sets bit k of the configuration code
_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
_FOUR_BITS = (1, 3, 4, 6)


@lru_cache(maxsize=1)
def topological_numbers() -> tuple[np.ndarray, np.ndarray]:
    """(T4 of the foreground, T8 of the background) for each of the 256 neighbourhood codes."""
    t_fg = np.zeros(256, dtype=np.int64)
    t_bg = np.zeros(256, dtype=np.int64)
    for code in range(256):
        patch = np.zeros((3, 3), dtype=bool)
        for k, (dr, dc) in enumerate(_OFFSETS):
            patch[1 + dr, 1 + dc] = bool(code >> k & 1)
        fg_labels = label_components(patch)
        four = {fg_labels[1 + _OFFSETS[k][0], 1 + _OFFSETS[k][1]] for k in _FOUR_BITS}
        t_fg[code] = len(four - {0})
        background = ~patch
        background[1, 1] = False
        _, t_bg[code] = ndi.label(background, structure=EIGHT_CONNECTED)
    return t_fg, t_bg


@lru_cache(maxsize=1)
def _simple_table() -> list[bool]:
    t_fg, t_bg = topological_numbers()
    return ((t_fg == 1) & (t_bg == 1)).tolist()


def _codes(flat: np.ndarray, index: np.ndarray, width: int) -> np.ndarray:
    """Neighbourhood codes of the pixels `index` of a padded, flattened binary image."""
    code = np.zeros(index.shape, dtype=np.int64)
    for k, (dr, dc) in enumerate(_OFFSETS):
        code |= flat[index + dr * width + dc].astype(np.int64) << k
    return code


def _warp(source: np.ndarray, target: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Flip simple disagreeing pixels of padded binary `source` toward `target`, most confident first.

    Candidates wait in a heap keyed by -priority (then raster order); a pixel that is not simple
    when popped is dropped and queued again only when one of its neighbours flips, so the loop
    visits only the disagreement set and its surroundings.
    """
    height, width = source.shape
    start = np.flatnonzero(source != target)
    if start.size == 0:
        return source
    warped = source.ravel().tolist()
    goal = target.ravel().tolist()
    key = (-priority).ravel().tolist()
    simple = _simple_table()
    up, down = -width, width
    neighbours = (up - 1, up, up + 1, -1, 1, down - 1, down, down + 1)
    heap = [(key[i], i) for i in start.tolist()]
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    while heap:
        _, i = pop(heap)
        w = warped
        if w[i] == goal[i]:
            continue
        code = (
            w[i + up - 1]
            | w[i + up] << 1
            | w[i + up + 1] << 2
            | w[i - 1] << 3
            | w[i + 1] << 4
            | w[i + down - 1] << 5
            | w[i + down] << 6
            | w[i + down + 1] << 7
        )
        if simple[code]:
            w[i] = goal[i]
            for offset in neighbours:
                j = i + offset
                if w[j] != goal[j]:
                    push(heap, (key[j], j))
    return np.array(warped, dtype=np.uint8).reshape(height, width)


def _distinct_nonzero(rows: np.ndarray) -> np.ndarray:
    """Number of distinct non-zero values in each row."""
    s = np.sort(rows, axis=1)
    new = np.concatenate([s[:, :1] != 0, (s[:, 1:] != s[:, :-1]) & (s[:, 1:] != 0)], axis=1)
    return new.sum(axis=1)


def _classify(warped: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """Masks of the remaining (non-simple) disagreeing pixels, by error class.

    Each pixel is classified by what flipping it in the warped ground truth would do. Where the
    neighbourhood has several components (T >= 2), one global labelling of the warped image
    decides between a split/merge and a hole: adding a pixel joins the T local foreground pieces,
    which either belong to different objects (merge) or to one (a loop closes: hole added);
    removing one joins T local background pieces, and by the Euler relation the T - 1 changes
    not absorbed by merging distinct background regions (hole removed) split the object.
    """
    height, width = warped.shape
    index = np.flatnonzero(warped != target)
    masks = {name: np.zeros(warped.shape, dtype=bool) for name in ERROR_CLASSES}
    if index.size == 0:
        return masks
    flat = warped.ravel()
    t_fg, t_bg = topological_numbers()
    code = _codes(flat, index, width)
    tf, tb = t_fg[code], t_bg[code]
    value = flat[index].astype(bool)

    fg_labels = label_components(warped).ravel()
    bg_labels = ndi.label(warped == 0, structure=EIGHT_CONNECTED)[0].ravel()
    fg_pieces = _distinct_nonzero(np.stack([fg_labels[index + o] for o in (-width, -1, 1, width)], axis=1))
    bg_pieces = _distinct_nonzero(
        np.stack([bg_labels[index + dr * width + dc] for dr, dc in _OFFSETS], axis=1)
    )
    several = (tf >= 2) & (tb >= 2)
    splits = (tb - 1) - (bg_pieces - 1)
    classes = {
        "object_removed": value & (tf == 0),
        "object_added": ~value & (tf == 0),
        "hole_added": (value & (tb == 0)) | (~value & several & (fg_pieces < 2)),
        "hole_removed": (~value & (tb == 0)) | (value & several & (splits <= 0)),
        "merge": ~value & several & (fg_pieces >= 2),
        "split": value & several & (splits > 0),
    }
    for name, chosen in classes.items():
        masks[name].ravel()[index[chosen]] = True
    return masks


class WarpingError(CumulativeMetric):
    """Accumulator of `warping_error`: [disagreeing pixels after warping, pixels, errors of each
    class in ERROR_CLASSES order] summed over images."""

    key = "warping_error"

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = check_threshold(threshold)
        super().__init__()

    def image_stats(self, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
        if is_probability(pred):
            values = check_probability(pred, "pred")
            target, priority = values > self.threshold, np.abs(values - self.threshold)
        else:
            target, priority = as_labels(pred, "pred") > 0, np.zeros(pred.shape)
        source = np.pad(as_labels(gt, "gt") > 0, 1).astype(np.uint8)
        target = np.pad(target, 1).astype(np.uint8)
        warped = _warp(source, target, np.pad(priority, 1))
        masks = _classify(warped, target)
        counts = [ndi.label(masks[name], structure=EIGHT_CONNECTED)[1] for name in ERROR_CLASSES]
        return np.array([np.count_nonzero(warped != target), pred.size, *counts], dtype=np.float64)

    def finish(self, stats: np.ndarray) -> float:
        return float(stats[0] / stats[1])

    def details(self, stats: np.ndarray | None = None) -> dict[str, int]:
        """Errors of each class and `mismatched_pixels` of `stats` (default: of all updates)."""
        stats = self._total() if stats is None else stats
        details = {name: int(v) for name, v in zip(ERROR_CLASSES, stats[2:])}
        details["mismatched_pixels"] = int(stats[0])
        return details

    def scores(self, stats: np.ndarray | None = None) -> dict[str, float | int]:
        stats = self._total() if stats is None else stats
        return {"warping_error": self.finish(stats), **{f"warping_{k}": v for k, v in self.details(stats).items()}}


def warping_error(
    pred: Images,
    gt: Images,
    threshold: float = 0.5,
    *,
    return_details: bool = False,
) -> float | tuple[float, dict[str, int]]:
    """Warping error (Jain et al. 2010; ISBI 2012): topological disagreements per pixel.

    The ground truth (foreground = label > 0) is warped toward the prediction (probability
    > `threshold`, or label > 0) by flipping simple points only, most confident prediction pixels
    (largest |probability - threshold|) first, until no disagreeing pixel is simple; the error is
    the number of pixels still disagreeing divided by the number of pixels. Connectivity:
    4-connected cell interior, 8-connected membrane (see the module docstring). A stack or list
    is warped image by image and scored as a whole (remaining pixels / pixels of all images).

    With `return_details=True` returns `(error, details)`: `details` counts the errors of each
    class in `ERROR_CLASSES` (split, merge, object_added, object_removed, hole_added,
    hole_removed; an error is an 8-connected group of remaining pixels of one class, named from
    the prediction's side: "split" = the prediction cuts a ground-truth cell) and
    `mismatched_pixels`, the number of pixels behind the error.

    Example:
        >>> import numpy as np
        >>> gt = np.zeros((5, 8), np.uint8); gt[1:4, 1:7] = 1     # one 3x6 cell
        >>> pred = gt.astype(float); pred[1:4, 3] = 0            # cut in two
        >>> warping_error(pred, gt, return_details=True)         # one pixel of the cut remains
        (0.025, {'split': 1, 'merge': 0, 'object_added': 0, 'object_removed': 0, 'hole_added': 0, 'hole_removed': 0, 'mismatched_pixels': 1})
    """
    metric = WarpingError(threshold)
    error = metric.compute(pred, gt)
    return (error, metric.details()) if return_details else error
