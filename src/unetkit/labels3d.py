"""Label volumes: 6-connected components, the 3D counterpart of `unetkit.labels`.

Objects of a binary volume are its 6-connected foreground components (face neighbours only), the
3D analogue of the 4-connectivity of 2D label images: two cells that meet only along an edge or a
corner stay apart.

Example:
    >>> import numpy as np
    >>> mask = np.zeros((2, 2, 2), bool); mask[0, 0, 0] = mask[1, 1, 1] = True  # corner contact
    >>> int(label_components_3d(mask).max())
    2
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .labels import check_labels, is_binary

#: 6-connectivity (face neighbours): the structuring element of objects in volumes.
SIX_CONNECTED = ndi.generate_binary_structure(3, 1)


def label_components_3d(mask: np.ndarray) -> np.ndarray:
    """6-connected components of a binary volume, labelled 1..n (int32)."""
    labels, _ = ndi.label(np.asarray(mask, dtype=bool), structure=SIX_CONNECTED, output=np.int32)
    return labels


def as_instances_3d(mask_or_labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Instance labels (int64) of a label volume: a binary mask (at most one non-zero value)
    becomes its 6-connected components, instance labels are returned as they are.

    Example:
        >>> import numpy as np
        >>> as_instances_3d(np.array([[[9, 0, 9]]])).tolist()
        [[[1, 0, 2]]]
    """
    arr = check_labels(mask_or_labels, name, ndim=3)
    if is_binary(arr):
        return label_components_3d(arr > 0).astype(np.int64)
    return arr
