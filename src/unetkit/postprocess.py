"""From a foreground probability map to labelled objects, and the Cell Tracking Challenge writer.

The pipeline of `probabilities_to_instances`: threshold -> objects (4-connected components, or a
seeded watershed on the distance transform that splits touching cells) -> fill holes of each
object -> drop objects smaller than `min_size` -> renumber 1..n. Each step is also a function.

Example:
    >>> import numpy as np
    >>> prob = np.zeros((6, 9)); prob[1:5, 1:4] = 0.9; prob[1:5, 5:8] = 0.8
    >>> labels = probabilities_to_instances(prob)
    >>> labels.dtype, int(labels.max())
    (dtype('int32'), 2)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Union

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError
from .io import prepare_output_dir, write_tiff
from .labels import fully_connected, id_dtype, label_components, relabel_consecutive, remove_small_objects
from .metrics.inputs import as_labels, as_slices, check_probability, check_threshold

Method = Literal["components", "watershed", "seeded"]
METHODS: tuple[str, ...] = ("components", "watershed", "seeded")



def threshold_mask(prob_foreground: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Binary mask `prob_foreground > threshold` of a probability map in [0, 1]: an image (H, W)
    or a volume (Z, Y, X)."""
    prob = np.asarray(prob_foreground)
    if prob.ndim not in (2, 3):
        raise InputError(f"prob_foreground: expected a map (H, W) or a volume (Z, Y, X), got shape {prob.shape}; "
                         "pass the foreground channel")
    if prob.dtype == bool:
        return prob.copy()
    return check_probability(prob, "prob_foreground") > check_threshold(threshold)


def _flood(landscape: np.ndarray, seeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Seeded watershed of `landscape` within `mask` (face-connected); mask components that no
    seed reaches keep a label of their own."""
    from skimage.segmentation import watershed

    labels = watershed(landscape, seeds, mask=mask, connectivity=1).astype(np.int32)
    unseeded = mask & (labels == 0)
    if unseeded.any():
        extra = label_components(unseeded)
        labels[unseeded] = extra[unseeded] + labels.max()
    return labels


def watershed_split(mask: np.ndarray, h: float = 2.0) -> np.ndarray:
    """Split touching objects of a binary mask by a seeded watershed on its distance transform.

    Seeds are the h-maxima of the Euclidean distance to the background: a maximum seeds its own
    object only if it stands at least `h` pixels above the saddle joining it to a higher one, so
    two touching round cells separate at their neck while one elongated cell stays whole.
    The landscape -distance is flooded from the seeds inside the mask
    (`skimage.segmentation.watershed`). Components without a seed (thinner than about 2h) keep
    their connected-component label.

    Example:
        >>> import numpy as np
        >>> yy, xx = np.mgrid[:20, :34]
        >>> mask = ((yy - 10) ** 2 + (xx - 9) ** 2 < 64) | ((yy - 10) ** 2 + (xx - 23) ** 2 < 64)
        >>> int(label_components(mask).max()), int(watershed_split(mask).max())
        (1, 2)
    """
    from skimage.morphology import h_maxima

    if h <= 0:
        raise InputError(f"h={h!r}: the seed depth must be > 0 pixels (e.g. 2)")
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32)
    distance = ndi.distance_transform_edt(mask)
    seeds, _ = ndi.label(h_maxima(distance, h).astype(bool) & mask, structure=fully_connected(mask.ndim))
    return _flood(-distance, seeds, mask)


def seeded_watershed(
    prob_foreground: np.ndarray, threshold: float = 0.5, seed_threshold: float = 0.9, min_seed_size: int = 0
) -> np.ndarray:
    """Objects grown from confident cores: a seeded watershed on the probability map itself.

    Seeds are the 4-connected components of `prob > seed_threshold` with at least `min_seed_size`
    pixels; each floods the landscape `1 - prob` within the mask `prob > threshold`
    (`skimage.segmentation.watershed`). Two cells joined by a one-pixel gap in the thresholded map
    (a faint membrane) stay apart when each has its own core, and a cell whose shape is not round
    keeps one label, because seeds come from the network's certainty rather than from the mask's
    shape (compare `watershed_split`). Mask components without a seed keep their own label.

    Example:
        >>> import numpy as np
        >>> prob = np.full((5, 9), 0.95); prob[:, 4] = 0.6   # a faint membrane the mask misses
        >>> int(label_components(prob > 0.5).max()), int(seeded_watershed(prob).max())
        (1, 2)
    """
    prob = np.asarray(prob_foreground, dtype=np.float32)
    mask = threshold_mask(prob, threshold)
    if not 0.0 <= seed_threshold < 1.0:
        raise InputError(f"seed_threshold={seed_threshold!r}: give a probability in [0, 1)")
    seeds = remove_small_objects(label_components(prob > seed_threshold), min_seed_size) * mask
    return _flood(1.0 - prob, seeds, mask)


def fill_label_holes(labels: np.ndarray) -> np.ndarray:
    """Fill every hole that lies inside a single object with that object's label.

    A hole is a background region (8-connected, as the background of 4-connected objects; 26- and
    6-connected in a volume) that does not reach the border; a region enclosed by several objects
    together is left empty.
    """
    labels = np.asarray(labels)
    foreground = labels > 0
    full = fully_connected(labels.ndim)
    holes = ndi.binary_fill_holes(foreground, structure=full) & ~foreground
    if not holes.any():
        return labels.copy()
    hole_ids, n_holes = ndi.label(holes, structure=full)
    # Every 8-neighbour of a hole outside it is an object pixel, so the hole lies inside a single
    # object exactly when the smallest and largest object id around it agree.
    ids = labels.astype(np.int64)
    top = int(ids.max()) + 1  # stands for "no object" in the minimum
    around_max = ndi.maximum_filter(ids, footprint=full, mode="constant", cval=0)
    around_min = ndi.minimum_filter(np.where(ids > 0, ids, top), footprint=full, mode="constant", cval=top)
    in_hole = hole_ids[holes]
    largest = np.zeros(n_holes + 1, dtype=np.int64)
    smallest = np.full(n_holes + 1, top, dtype=np.int64)
    np.maximum.at(largest, in_hole, around_max[holes])
    np.minimum.at(smallest, in_hole, around_min[holes])
    fill = np.where(largest == smallest, largest, 0).astype(labels.dtype)
    out = labels.copy()
    out[holes] = fill[in_hole]
    return out


def probabilities_to_instances(
    prob_foreground: np.ndarray,
    threshold: float = 0.5,
    method: Method = "components",
    min_size: int = 0,
    fill_holes: bool = True,
    h: float = 2.0,
    seed_threshold: float = 0.9,
    min_seed_size: int = 0,
) -> np.ndarray:
    """Instance labels (int32, 0 = background, objects 1..n) from a foreground probability map.

    Args:
        prob_foreground: probability of cell interior in [0, 1], an image (H, W) or a volume
            (Z, Y, X) (e.g. channel 1 of the (n_classes, ...) map that `unetkit predict`
            writes), or a bool mask. Volumes form 6-connected objects.
        threshold: foreground is `prob_foreground > threshold`.
        method: "components" (4-connected components; 6 in a volume), "watershed" (seeded watershed on the
            distance transform, which splits touching cells; see `watershed_split`) or "seeded"
            (watershed on the probability from confident cores; see `seeded_watershed`).
        min_size: objects with fewer pixels are removed (0 keeps all).
        fill_holes: fill holes enclosed by a single object.
        h: watershed only: seed depth in pixels (see `watershed_split`).
        seed_threshold, min_seed_size: "seeded" only: cores that seed the watershed on the
            probability (see `seeded_watershed`).

    Example:
        >>> import numpy as np
        >>> prob = np.zeros((5, 7)); prob[1:4, 1:3] = 0.9; prob[2, 5] = 0.7
        >>> probabilities_to_instances(prob, min_size=2)[2]
        array([0, 1, 1, 0, 0, 0, 0], dtype=int32)
    """
    if method not in METHODS:
        raise InputError(f"method={method!r}: choose one of {', '.join(METHODS)}")
    mask = threshold_mask(prob_foreground, threshold)
    if method == "components":
        labels = label_components(mask)
    elif method == "watershed":
        labels = watershed_split(mask, h)
    else:
        labels = seeded_watershed(prob_foreground, threshold, seed_threshold, min_seed_size)
    if fill_holes:
        labels = fill_label_holes(labels)
    labels = remove_small_objects(labels, min_size)
    return relabel_consecutive(labels)


def write_ctc_masks(
    labels_list: Union[np.ndarray, Sequence[np.ndarray]],
    folder: Union[str, os.PathLike],
    force: bool = False,
) -> list[Path]:
    """Write label images in the Cell Tracking Challenge result layout: mask000.tif, mask001.tif, ...

    Each image is written as a uint16 TIFF (0 = background, objects 1..65535), atomically, into
    `folder` (e.g. `01_RES`), which must be empty or new unless `force`. Numbers have three digits,
    or four when there are more than 1000 frames, as the challenge names them.

    Example:
        >>> import numpy as np, tempfile
        >>> paths = write_ctc_masks([np.eye(4, dtype=np.int32)], tempfile.mkdtemp() + "/01_RES")
        >>> [p.name for p in paths]
        ['mask000.tif']
    """
    images = as_slices(labels_list, "labels_list")
    checked = []
    for k, image in enumerate(images):
        labels = as_labels(image, f"labels_list[{k}]")
        if labels.size and labels.max() > np.iinfo(np.uint16).max:
            raise InputError(
                f"labels_list[{k}]: label {labels.max()} does not fit the challenge's 16-bit masks; "
                "relabel to consecutive ids (relabel_consecutive)"
            )
        checked.append(labels.astype(np.uint16))
    out = prepare_output_dir(folder, force=force)
    digits = 4 if len(checked) > 1000 else 3
    return [write_tiff(out / f"mask{k:0{digits}d}.tif", labels, force=force) for k, labels in enumerate(checked)]


def foreground(probabilities: np.ndarray) -> np.ndarray:
    """The foreground probability of (n_classes, H, W) maps: every class but the first summed (the
    last class itself for two classes)."""
    return probabilities[1:].sum(0) if probabilities.shape[0] > 2 else probabilities[-1]


def labels_from_probabilities(
    probabilities: np.ndarray, rule, *, binary: bool = False, fill_holes: bool = True
) -> np.ndarray:
    """The label image `unetkit predict` writes for (n_classes, H, W) `probabilities`: instances
    (uint16; uint32 above 65535 objects) drawn by `rule` (a `unetkit.decision.DecisionRule`) from
    the foreground, or with `binary` uint8 0/1 foreground above the rule's threshold.

    Example:
        >>> p = np.zeros((2, 4, 6), np.float32); p[1, :, :2] = p[1, :, 4:] = 0.9; p[0] = 1 - p[1]
        >>> from unetkit.decision import DecisionRule
        >>> labels_from_probabilities(p, DecisionRule())[0].tolist()
        [1, 1, 0, 0, 2, 2]
    """
    fg = foreground(probabilities)
    if binary:
        return (fg > rule.threshold).astype(np.uint8)
    instances = rule.apply(fg, fill_holes=fill_holes)
    return instances.astype(id_dtype(int(instances.max(initial=0))))
