"""Training targets: the binary target and the paper's pixel-wise weight map.

From a ground-truth segmentation (an instance label image, or a binary mask such as ISBI 2012's
255 = cell / 0 = membrane) this module derives

* the *separation borders*, thin background lines between touching objects (paper Fig. 3c),
* the binary target, 1 = object interior and 0 = background including separation borders,
* the weight map of Eq. (2), w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2)),
  which makes the network learn those borders (paper Fig. 3d).

Conventions used throughout:

* Objects are the non-zero labels of an instance label image. A binary mask (at most one non-zero
  value) already draws its borders, so its binary target is the mask itself; its objects are its
  4-connected foreground components (the connectivity of the ISBI 2012 Rand error), see
  `unetkit.labels.as_instances`. Separation borders are taken out of instance labels only.
* Distances are Euclidean distances between pixel centres: d_i(x) is the distance from x to the
  nearest pixel of object i, so a pixel adjacent to an object (sharing an edge) has distance 1,
  and one diagonal to it has distance sqrt(2). Distances are measured to the objects as they are
  in the binary target, i.e. after the separation borders have been taken out.
* The border term is added on background pixels only (separation borders included), as in the
  paper's Fig. 3d; object pixels get w_c alone.
* w_c with `class_weights="balanced"` weights each class by the inverse of its pixel frequency,
  normalised so that the mean of w_c over the image is 1: w_c = N / (K * N_class), N pixels,
  K classes present in the image (background and foreground of the binary target).

Example:
    >>> import numpy as np
    >>> labels = np.zeros((8, 12), np.int64)
    >>> labels[2:6, 2:6], labels[2:6, 6:10] = 1, 2  # two touching squares
    >>> target, weights = make_targets(labels)
    >>> target[3].tolist()  # the contact line became background
    [0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0]
    >>> bool(weights[3, 5] > 5), weights.dtype.name
    (True, 'float32')
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence, Union

import numpy as np
from scipy import ndimage as ndi

from .config import PAPER, from_dict_strict
from .errors import InputError
from .labels import check_labels, instances_from_mask, is_binary
from .labels3d import label_components_3d

ClassWeights = Union[str, Sequence[float]]


@dataclass(frozen=True)
class TargetConfig:
    """How the binary target and the weight map are made from ground truth (paper Eq. 2).

    Attributes:
        w0: amplitude of the border term.
        sigma: width of the border term, in pixels, or in micrometres when `pixel_size` is given.
        class_weights: "balanced" (inverse class frequency, mean of w_c over the image = 1) or
            explicit (background, foreground) weights, e.g. (1.0, 1.0).
        pixel_size: micrometres per pixel; sigma in pixels is then sigma / pixel_size.
        use_weight_map: add the border term; if False, the weights are the class weights w_c alone.

    Example:
        >>> TargetConfig(w0=5.0).sigma
        5.0
        >>> TargetConfig.from_dict(TargetConfig(class_weights=(1.0, 1.0)).to_dict()).class_weights
        (1.0, 1.0)
    """

    w0: float = PAPER.w0
    sigma: float = PAPER.sigma
    class_weights: ClassWeights = "balanced"
    pixel_size: float | None = None
    use_weight_map: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.class_weights, list):
            object.__setattr__(self, "class_weights", tuple(self.class_weights))

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        if isinstance(self.class_weights, tuple):
            values["class_weights"] = list(self.class_weights)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TargetConfig":
        return from_dict_strict(cls, values, "target")


def _config(config: TargetConfig | None, overrides: dict[str, Any]) -> TargetConfig:
    config = config if config is not None else TargetConfig()
    return replace(config, **overrides) if overrides else config

# The border term is dropped where it is below this value (relative to w0); see `_two_nearest`.
_NEGLIGIBLE = 1e-9


def separation_borders(instance_labels: np.ndarray) -> np.ndarray:
    """Pixels separating different objects: those whose 3x3 neighbourhood has two object labels.

    This marks the background pixels of one-pixel gaps between objects and, where two objects
    touch with no background between them, the object pixels on both sides of the contact line.
    Those object pixels are taken out of the objects in the binary target (`foreground_target`),
    so touching objects end up separated by a two-pixel background line and are distinct
    components under 4- and 8-connectivity. Pixels of an isolated object are never marked.

    Args:
        instance_labels: 2D instance labels, 0 = background, used as given (a binary mask is one
            object and has no separation borders; its own background already separates cells).

    Returns:
        Boolean array, True on separation borders.

    Example:
        >>> import numpy as np
        >>> labels = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])
        >>> separation_borders(labels).astype(int).tolist()
        [[0, 1, 1, 0], [0, 1, 1, 0]]
    """
    return _separation_borders(check_labels(instance_labels, ndim=2))


def _separation_borders(labels: np.ndarray) -> np.ndarray:
    """`separation_borders` of checked labels of any dimension (3x3 or 3x3x3 neighbourhood)."""
    if labels.size == 0:
        return np.zeros(labels.shape, bool)
    footprint = np.ones((3,) * labels.ndim, bool)
    largest = ndi.maximum_filter(labels, footprint=footprint, mode="nearest")
    # Background is replaced by a value above every label so the minimum ignores it.
    above = np.int64(labels.max() + 1)
    smallest = ndi.minimum_filter(
        np.where(labels > 0, labels, above), footprint=footprint, mode="nearest"
    )
    return (smallest < above) & (smallest != largest)


def _objects_and_target(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Objects of the binary target (instance labels, borders removed) and the target itself.

    A binary mask already draws its borders: its target is the mask itself and its objects are
    its 4-connected components. Instance labels lose their separation borders.
    """
    arr = check_labels(labels, ndim=2)
    if is_binary(arr):
        objects = instances_from_mask(arr)
    else:
        objects = np.where(separation_borders(arr), 0, arr)
    return objects, (objects > 0).astype(np.int64)


def foreground_target(instance_labels: np.ndarray) -> np.ndarray:
    """Binary target: 1 = object interior, 0 = background including separation borders.

    Instance labels lose their separation borders (`separation_borders`); a binary mask (at most
    one non-zero value, e.g. ISBI 2012's 255 = cell) is returned as 0/1 unchanged.

    Example:
        >>> import numpy as np
        >>> foreground_target(np.array([[1, 1, 2, 2, 0]])).tolist()
        [[1, 0, 0, 1, 0]]
    """
    return _objects_and_target(instance_labels)[1]


def _class_weight_map(target: np.ndarray, class_weights: ClassWeights) -> np.ndarray:
    """w_c for a binary target (0 = background, 1 = foreground), float32."""
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise InputError(
                f"class_weights must be 'balanced' or one weight per class such as (1.0, 1.0), "
                f"got {class_weights!r}"
            )
        counts = np.bincount(target.ravel(), minlength=2).astype(np.float64)
        present = max(np.count_nonzero(counts), 1)
        per_class = target.size / (present * np.maximum(counts, 1.0))
    else:
        per_class = np.asarray(class_weights, dtype=np.float64)
        if per_class.shape != (2,) or not np.all(np.isfinite(per_class)) or np.any(per_class < 0):
            raise InputError(
                "class_weights must give two non-negative weights, (background, foreground), "
                f"e.g. (1.0, 1.0); got {class_weights!r}"
            )
    return per_class[target].astype(np.float32)


def _two_nearest(
    objects: np.ndarray, cutoff: float, sampling: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances to the nearest and second-nearest object, inf beyond `cutoff`.

    One Euclidean distance transform per object, each on the object's bounding box grown by
    `cutoff`: an object's pixels all lie in its box, so distances inside the grown box are exact,
    and outside it they exceed `cutoff`, where the border term is negligible. `sampling` is the
    distance between neighbours along each axis (default 1), e.g. (4, 1, 1) for a stack whose
    slices are 4 pixels apart.
    """
    d1 = np.full(objects.shape, np.inf, np.float64)
    d2 = np.full(objects.shape, np.inf, np.float64)
    steps = (1.0,) * objects.ndim if sampling is None else tuple(float(v) for v in sampling)
    margins = [int(math.ceil(cutoff / step)) for step in steps]
    for index, box in enumerate(ndi.find_objects(objects), start=1):
        if box is None:
            continue
        window = tuple(
            slice(max(b.start - m, 0), min(b.stop + m, n)) for b, m, n in zip(box, margins, objects.shape)
        )
        dist = ndi.distance_transform_edt(objects[window] != index, sampling=steps)
        near, second = d1[window], d2[window]
        second[...] = np.minimum(second, np.maximum(near, dist))
        near[...] = np.minimum(near, dist)
    return d1, d2


def _sigma_pixels(sigma: float, pixel_size: float | None) -> float:
    if pixel_size is not None:
        if not (pixel_size > 0 and math.isfinite(pixel_size)):
            raise InputError(
                f"pixel_size must be a positive number of micrometres per pixel, got {pixel_size}"
            )
        sigma = sigma / pixel_size
    if not (sigma > 0 and math.isfinite(sigma)):
        raise InputError(f"sigma must be a positive number, got {sigma}")
    return float(sigma)


def _weights(
    objects: np.ndarray,
    target: np.ndarray,
    w0: float,
    sigma: float,
    class_weights: ClassWeights,
    pixel_size: float | None,
    border_term: bool,
    sampling: Sequence[float] | None = None,
) -> np.ndarray:
    if not (w0 >= 0 and math.isfinite(w0)):
        raise InputError(f"w0 must be a non-negative number, got {w0}")
    sigma_px = _sigma_pixels(sigma, pixel_size)
    weights = _class_weight_map(target, class_weights)
    if not border_term or w0 == 0 or objects.max(initial=0) == 0:
        return weights
    # Beyond this distance to the second object, w0 * exp(-d2^2 / (2 sigma^2)) < w0 * _NEGLIGIBLE.
    cutoff = sigma_px * math.sqrt(2.0 * math.log(1.0 / _NEGLIGIBLE))
    d1, d2 = _two_nearest(objects, cutoff, sampling)
    where = (target == 0) & np.isfinite(d2)
    total = d1[where] + d2[where]
    weights[where] += (w0 * np.exp(-(total**2) / (2.0 * sigma_px**2))).astype(np.float32)
    return weights


def weight_map(instance_labels: np.ndarray, config: TargetConfig | None = None, **overrides: Any) -> np.ndarray:
    """The paper's weight map, w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2)).

    d1, d2 are the Euclidean distances from x to the nearest pixels of the nearest and the
    second-nearest object (a pixel adjacent to an object is at distance 1), measured to the
    objects of the binary target. The border term is added on background pixels (separation
    borders included) that have at least two objects around; with 0 or 1 object, w = w_c. It is
    left out where it is below w0 * 1e-9.

    Args:
        instance_labels: instance labels (0 = background) or a binary mask (see `unetkit.labels.as_instances`).
        config: w0, sigma, class_weights and pixel_size (`TargetConfig`; its `use_weight_map` is
            not read here: this is the weight map).
        overrides: `TargetConfig` fields replacing those of `config` (e.g. ``w0=5.0``).

    Returns:
        float32 array of the image's shape.

    Example:
        >>> import numpy as np
        >>> labels = np.zeros((10, 21), np.int64)
        >>> labels[:, :10], labels[:, 11:] = 1, 2  # one background column between two objects
        >>> w = weight_map(labels, class_weights=(1.0, 1.0))
        >>> round(float(w[5, 10]), 4), float(w[5, 0])  # 1 + 10 * exp(-(1 + 1)^2 / 50); object: 1
        (10.2312, 1.0)
    """
    c = _config(config, overrides)
    objects, target = _objects_and_target(instance_labels)
    return _weights(objects, target, c.w0, c.sigma, c.class_weights, c.pixel_size, True)


def make_targets(
    labels: np.ndarray, config: TargetConfig | None = None, **overrides: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Binary target and weights from a binary mask or instance labels.

    Args:
        labels: instance labels (0 = background) or a binary mask (see `unetkit.labels.as_instances`).
        config: the `TargetConfig` (default: the paper's).
        overrides: `TargetConfig` fields replacing those of `config` (e.g. ``use_weight_map=False``).

    Returns:
        (target, weights): int64 (H, W) with 1 = object interior, 0 = background incl.
        separation borders; float32 (H, W).

    Example:
        >>> import numpy as np
        >>> mask = np.zeros((6, 6), np.uint8)
        >>> mask[1:3, 1:3] = 255
        >>> target, weights = make_targets(mask, use_weight_map=False)
        >>> int(target.sum()), float(weights.mean())
        (4, 1.0)
    """
    c = _config(config, overrides)
    objects, target = _objects_and_target(labels)
    weights = _weights(objects, target, c.w0, c.sigma, c.class_weights, c.pixel_size, c.use_weight_map)
    return target, weights


def _sampling(spacing: Sequence[float]) -> tuple[float, float, float]:
    """Distances between neighbours along (z, y, x) in units of the finest axis."""
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"spacing must be three positive numbers (z, y, x), e.g. (4.0, 1.0, 1.0); got {spacing!r}")
    finest = min(values)
    return tuple(v / finest for v in values)  # type: ignore[return-value]


def _objects_and_target_3d(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """As `_objects_and_target`, for a volume: a binary mask's objects are its 6-connected components."""
    arr = check_labels(labels, ndim=3)
    if is_binary(arr):
        objects = label_components_3d(arr > 0).astype(np.int64)
    else:
        objects = np.where(_separation_borders(arr), 0, arr)
    return objects, (objects > 0).astype(np.int64)


def make_targets_3d(
    labels: np.ndarray,
    config: TargetConfig | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    **overrides: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Binary target and the paper's weight map (Eq. 2) of a label volume (Z, Y, X), anisotropy aware.

    As `make_targets`, in 3D: separation borders are the voxels whose 3x3x3 neighbourhood holds
    two objects; d1 and d2 are 3D Euclidean distances to the nearest and second-nearest object,
    measured with `spacing` (z, y, x) in units of the finest axis (`scipy.ndimage.
    distance_transform_edt` with `sampling`), so sigma counts in-plane pixels for a stack of
    slices 4 pixels apart, spacing (4, 1, 1). w0, sigma and the class balance come from `config`
    (the paper's by default: `TargetConfig`); with `pixel_size`, sigma is in micrometres and
    `pixel_size` is the finest axis's voxel size.

    Args:
        labels: instance labels (0 = background) or a binary mask (objects: 6-connected components).
        config: the `TargetConfig` (default: the paper's).
        spacing: voxel size along (z, y, x), any unit (only ratios matter).
        overrides: `TargetConfig` fields replacing those of `config`.

    Returns:
        (target, weights): int64 (Z, Y, X), 1 = object interior; float32 (Z, Y, X).

    Example:
        >>> import numpy as np
        >>> labels = np.zeros((3, 6, 11), np.int64)
        >>> labels[:, :, :5], labels[:, :, 6:] = 1, 2  # a one-voxel gap in x
        >>> target, weights = make_targets_3d(labels, class_weights=(1.0, 1.0))
        >>> round(float(weights[1, 3, 5]), 4), float(weights[1, 3, 0])  # 1 + 10 exp(-(1 + 1)^2 / 50)
        (10.2312, 1.0)
    """
    c = _config(config, overrides)
    sampling = _sampling(spacing)
    objects, target = _objects_and_target_3d(labels)
    weights = _weights(objects, target, c.w0, c.sigma, c.class_weights, c.pixel_size, c.use_weight_map, sampling)
    return target, weights
