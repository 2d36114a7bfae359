"""Label images: checking them, 4-connected components, instances from a mask, renumbering.

One home for the conventions every module shares: 0 is background; objects are the non-zero
labels; a binary mask (at most one non-zero value, e.g. ISBI 2012's 255 = cell) stands for its
4-connected foreground components, the connectivity of the ISBI 2012 Rand error, which keeps
cells that touch only diagonally through a membrane apart.

Example:
    >>> import numpy as np
    >>> as_instances(np.array([[255, 0, 255], [255, 0, 0]], np.uint8)).tolist()
    [[1, 0, 2], [1, 0, 0]]
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential

from .errors import InputError

#: 4-connectivity (edge neighbours): the structuring element of object components.
FOUR_CONNECTED = ndi.generate_binary_structure(2, 1)
#: 8-connectivity (edge and corner neighbours), for background regions and seeds.
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def face_connected(ndim: int) -> np.ndarray:
    """The structuring element of objects: 4-connected in 2D, 6-connected in 3D (face neighbours)."""
    return FOUR_CONNECTED if ndim == 2 else ndi.generate_binary_structure(ndim, 1)


def fully_connected(ndim: int) -> np.ndarray:
    """The structuring element of background regions and seeds: 8-connected in 2D, 26 in 3D."""
    return np.ones((3,) * ndim, dtype=bool)


def check_labels(
    array: np.ndarray,
    name: str = "labels",
    *,
    ndim: int | None = None,
    hint: str = "save the labels as an integer image",
) -> np.ndarray:
    """Validate a label image or binary mask and return it as non-negative int64 labels.

    Accepted: bool (True -> 1), integer types with values >= 0 (uint64 up to 2^63 - 1), and
    float types holding finite whole numbers >= 0. 0 is background. An int64 input may be
    returned as it is, without a copy.

    Args:
        array: the label image.
        name: what the array is (an argument name or a file path); every message starts with it.
        ndim: the number of dimensions required (e.g. 2 for one (H, W) image); None accepts any.
        hint: how to fix fractional values, appended to that message.

    Raises:
        InputError: for a wrong number of dimensions, NaN or infinite values, fractional values,
            negative values, integers too large for int64, or a non-numeric type.

    Example:
        >>> import numpy as np
        >>> check_labels(np.array([[0.0, 2.0], [1.0, 0.0]])).tolist()
        [[0, 2], [1, 0]]
        >>> check_labels(np.array([[0, -1]]), "gt")
        Traceback (most recent call last):
        ...
        unetkit.errors.InputError: gt: label image has negative values (min -1); use 0 for background and positive integers for objects
    """
    arr = np.asarray(array)
    if ndim is not None and arr.ndim != ndim:
        raise InputError(
            f"{name}: label image must be {ndim}D, got shape {arr.shape}; "
            "give one image at a time, without a channel axis"
        )
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise InputError(
                f"{name}: label image contains NaN or infinite values; labels must be whole numbers >= 0 "
                "(0 = background)"
            )
        if np.any(arr != np.floor(arr)):
            raise InputError(
                f"{name}: label image has non-integer values (fractional, {arr.dtype}); labels must be whole "
                f"numbers >= 0 (0 = background, 1, 2, ... = objects); {hint}"
            )
    elif not np.issubdtype(arr.dtype, np.integer):
        raise InputError(
            f"{name}: label image has unsupported type {arr.dtype}; use an integer (e.g. 8- or 16-bit) label image"
        )
    if arr.size and arr.min() < 0:
        raise InputError(
            f"{name}: label image has negative values (min {arr.min()}); "
            "use 0 for background and positive integers for objects"
        )
    if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise InputError(f"{name}: label values of 2^63 or more are not supported; renumber the objects 1, 2, ...")
    return arr.astype(np.int64, copy=False)


def label_components(mask: np.ndarray) -> np.ndarray:
    """Face-connected components of a binary mask (4-connected in 2D, 6 in 3D), labelled 1..n (int32)."""
    mask = np.asarray(mask, dtype=bool)
    labels, _ = ndi.label(mask, structure=face_connected(mask.ndim), output=np.int32)
    return labels


def instances_from_mask(mask: np.ndarray) -> np.ndarray:
    """Label the 4-connected components of a binary mask's foreground (any non-zero pixel).

    4-connectivity keeps cells that touch only diagonally through a membrane apart, and matches
    the component labelling of the ISBI 2012 Rand error.

    Example:
        >>> import numpy as np
        >>> m = np.array([[255, 0, 0], [0, 255, 255], [0, 0, 0]], np.uint8)
        >>> instances_from_mask(m).tolist()
        [[1, 0, 0], [0, 2, 2], [0, 0, 0]]
    """
    return label_components(check_labels(mask, ndim=2) > 0).astype(np.int64)


def is_binary(labels: np.ndarray) -> bool:
    """Whether a label image holds at most one non-zero value (a binary mask such as {0, 255})."""
    arr = np.asarray(labels)
    return np.unique(arr[arr > 0]).size <= 1


def as_instances(mask_or_labels: np.ndarray) -> np.ndarray:
    """Return instance labels from either a binary mask or an instance label image.

    An array with at most two values, 0 and one other value v (e.g. {0, 255} or a bool mask),
    is a binary mask and becomes its 4-connected components (`instances_from_mask`); any other
    array is taken as instance labels (0 = background) and returned as int64 unchanged.

    Raises:
        InputError: for a non-2D array, negative or non-integer labels.

    Example:
        >>> import numpy as np
        >>> as_instances(np.array([[0, 3, 3], [7, 0, 0]])).tolist()  # three values: instances
        [[0, 3, 3], [7, 0, 0]]
        >>> as_instances(np.array([[0, 9, 0, 9]])).tolist()  # {0, 9}: binary mask
        [[0, 1, 0, 2]]
    """
    arr = check_labels(mask_or_labels, ndim=2)
    if is_binary(arr):
        return label_components(arr > 0).astype(np.int64)
    return arr.copy() if np.may_share_memory(arr, mask_or_labels) else arr


def remove_small_objects(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Labels with every object of fewer than `min_size` pixels set to background.

    (`skimage.morphology.remove_small_objects` does this too, but its size argument changed
    meaning in scikit-image 0.26, from `min_size` (strictly smaller) to `max_size` (smaller or
    equal); this keeps one meaning on every supported version.)
    """
    if int(min_size) != min_size or min_size < 0:
        raise InputError(f"min_size={min_size!r}: give a whole number of pixels >= 0")
    labels = np.asarray(labels)
    if min_size <= 1 or not labels.any():
        return labels.copy()
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    out = labels.copy()
    out[small[labels]] = 0
    return out


def relabel_consecutive(labels: np.ndarray) -> np.ndarray:
    """Object ids renumbered 1..n in order of their old ids, as int32; 0 stays background."""
    return relabel_sequential(np.asarray(labels))[0].astype(np.int32)


def id_dtype(count: int) -> np.dtype:
    """The smallest of uint16, uint32 and uint64 that holds object ids up to `count`, so ids never wrap.

    Example:
        >>> str(id_dtype(65535)), str(id_dtype(65536)), str(id_dtype(2**40))
        ('uint16', 'uint32', 'uint64')
    """
    return next(np.dtype(t) for t in ("uint16", "uint32", "uint64") if count <= np.iinfo(t).max)
