"""Object scale: how large the objects of an image are, and rescaling images to a model's scale.

A network learns objects of the size it was trained on. Each checkpoint records the median object
diameter of its training masks (`LoadedModel.scale`; packaged models in models.json), and
prediction can rescale an image so its objects take that size (`unetkit predict --diameter D`,
``--diameter auto`` or ``--pixel-size``), then draw labels at the model's scale and bring them back
to the input's exact shape with their ids.

* `median_diameter`: the median equivalent-circle diameter (2 sqrt(area / pi)) of labelled objects.
* `rescale_image`: (C, H, W) images to a scale (anti-aliased when shrinking, linear when growing).
* `resize_labels`: label images to an exact shape, nearest neighbour, ids kept.
* `scale_factor`: the factor for a given diameter or pixel size and a model's recorded scale.

``--diameter auto`` segments at the model's scale, measures the median diameter of the objects
found, and segments again at the factor that implies (up to `AUTO_PASSES` passes). Measured by
benchmarks/finetune_dsb.py with fluo-nuclei (trained on 60.5 px nuclei) on images rescaled by
0.5, 0.75, 1, 1.5 and 2: on GOWT1 t31 (nuclei of 30-120 px) the estimate was within 1 % of the
true median diameter; on the DSB2018 sample (12-47 px) within 11 % from 0.75 on (18 px nuclei and
up), but 1.9 x too large at 0.5 (12 px nuclei, a fifth of the model's size, are merged at its
scale). It is reliable for objects down to about a third of the model's diameter; give
``--diameter D`` for smaller ones.

Example:
    >>> labels = np.zeros((40, 40), np.uint16); labels[5:15, 5:15] = 1; labels[20:30, 20:30] = 7
    >>> round(median_diameter(labels), 2)
    11.28
    >>> small = resize_labels(labels, (21, 19)); small.shape, sorted(np.unique(small).tolist())
    ((21, 19), [0, 1, 7])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import InputError

#: A factor closer to 1 than this leaves the image as it is (resampling would only blur it).
UNCHANGED = 0.02
#: ``--diameter auto`` stops when the next pass's factor would differ from the last one's by less than this.
AUTO_TOLERANCE = 0.1
#: Passes of ``--diameter auto`` at most: the first at the model's scale; each later one at the
#: factor the objects found in the one before imply, until it changes by less than `AUTO_TOLERANCE`.
#: Objects much smaller than the model's are merged at its scale, so the first estimate is too
#: large; measured again once rescaled, it comes closer (benchmarks/finetune_dsb.py).
AUTO_PASSES = 3
#: Objects whose median diameter is more than this factor off the model's are "far" from its training data.
FAR_FACTOR = 1.6
#: The factors ``--diameter auto`` may choose (beyond them the first pass found something else than objects).
AUTO_LIMITS = (0.2, 5.0)


def median_diameter(labels: np.ndarray | Sequence[np.ndarray]) -> float | None:
    """Median equivalent-circle diameter (pixels) of the objects of one label image or several
    (pooled); None when there are no objects. Every distinct non-zero value is one object, so
    give instance labels (a binary mask is one object).

    Example:
        >>> disc = np.hypot(*np.mgrid[-20:21, -20:21]) <= 10
        >>> round(median_diameter(disc.astype(np.uint8)), 1)
        20.1
    """
    images = [labels] if isinstance(labels, np.ndarray) else list(labels)
    areas: list[np.ndarray] = []
    for image in images:
        values = np.asarray(image).ravel()
        values = values[values != 0]
        if values.size:
            _, counts = np.unique(values, return_counts=True)
            areas.append(counts)
    if not areas:
        return None
    return float(np.median(2.0 * np.sqrt(np.concatenate(areas) / math.pi)))


def rescaled_shape(shape: Iterable[int], factor: float) -> tuple[int, int]:
    """(H, W) of an image of `shape` ((..., H, W)) rescaled by `factor`, at least 1 x 1.

    Example:
        >>> rescaled_shape((3, 101, 57), 0.5)
        (50, 28)
    """
    height, width = list(shape)[-2:]
    return max(1, int(round(height * factor))), max(1, int(round(width * factor)))


def rescale_image(image: np.ndarray, factor: float | None = None, *, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A (C, H, W) or (H, W) float image rescaled by `factor` (or to `shape`): anti-aliased (a
    Gaussian before linear interpolation) when shrinking, linear when growing; float32.

    Example:
        >>> rescale_image(np.ones((1, 30, 50), np.float32), 0.5).shape
        (1, 15, 25)
    """
    from skimage.transform import resize

    data = np.asarray(image, dtype=np.float32)
    target = shape if shape is not None else rescaled_shape(data.shape, float(factor))  # type: ignore[arg-type]
    if tuple(target) == data.shape[-2:]:
        return data
    shrinking = target[0] < data.shape[-2] or target[1] < data.shape[-1]
    out_shape = (*data.shape[:-2], *target)
    if data.ndim == 3:  # resize only the spatial axes: the anti-aliasing filter must not mix channels
        return np.stack([rescale_image(channel, shape=target) for channel in data])
    return resize(data, out_shape, order=1, mode="reflect", anti_aliasing=shrinking, preserve_range=True).astype(np.float32)


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """`labels` (H, W) at exactly `shape`, nearest neighbour (pixel centres): ids and dtype kept.

    Example:
        >>> resize_labels(np.array([[1, 2], [3, 4]], np.uint16), (3, 5)).tolist()
        [[1, 1, 2, 2, 2], [3, 3, 4, 4, 4], [3, 3, 4, 4, 4]]
    """
    labels = np.asarray(labels)
    if labels.shape == tuple(shape):
        return labels
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]).astype(np.intp), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]).astype(np.intp), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def rescale_pair(image: np.ndarray, mask: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """An image (float32; (H, W) stays (H, W), others become (C, H, W)) and its mask rescaled by `factor` (ids kept)."""
    from .config import LARGE_PIXELS
    from .data import to_chw

    planar = np.asarray(image).ndim == 2
    image = to_chw(np.asarray(image))
    target = rescaled_shape(image.shape[-2:], factor)
    if target[0] * target[1] > LARGE_PIXELS:
        raise InputError(f"rescaled by {factor:.2f} to the start model's object size, an image of "
                         f"{image.shape[-2]}x{image.shape[-1]} pixels would be {target[0]}x{target[1]}, too large "
                         "to train on in memory; crop it, or fine-tune at its own scale (--no-rescale)")
    scaled = rescale_image(image.astype(np.float32, copy=False), shape=target)
    return (scaled[0] if planar else scaled), resize_labels(np.asarray(mask), target)


def check_diameter(value: Any, option: str = "--diameter") -> float | str | None:
    """`value` as a diameter: None, "auto" or a number of pixels > 0 (text is parsed); InputError otherwise.

    Example:
        >>> check_diameter("12.5"), check_diameter("auto"), check_diameter(None)
        (12.5, 'auto', None)
        >>> check_diameter("0")
        Traceback (most recent call last):
        ...
        unetkit.errors.InputError: --diameter must be 'auto' or an object diameter in pixels > 0 (got '0')
    """
    if value is None or value == "auto":
        return value
    number = _positive(value)
    if number is None:
        raise InputError(f"{option} must be 'auto' or an object diameter in pixels > 0 (got {value!r})")
    return number


def check_pixel_size(value: Any) -> float | None:
    """`value` as micrometres per pixel (> 0), or None; InputError otherwise."""
    if value is None:
        return None
    number = _positive(value)
    if number is None:
        raise InputError(f"--pixel-size must be micrometres per pixel > 0 (got {value!r})")
    return number


def _positive(value: Any) -> float | None:
    """`value` (a number or its text, not a bool) as a finite float > 0, else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if not isinstance(value, bool) and math.isfinite(number) and number > 0 else None


def model_scale(loaded, packaged: dict[str, Any] | None = None) -> dict[str, Any]:
    """The object scale a model was trained at: its checkpoint's (`LoadedModel.scale`), else
    `packaged`, the packaged model's record in models.json (`PretrainedModel.scale`); {} when
    neither says."""
    if getattr(loaded, "scale", None):
        return dict(loaded.scale)
    return dict(packaged or {})


def scale_factor(scale: dict[str, Any], *, diameter: float | None = None, pixel_size: float | None = None,
                 model: str = "the model") -> float:
    """The factor that brings objects of `diameter` pixels (or pixels of `pixel_size` micrometres)
    to the model's `scale` (`model_scale`); 1 when neither is given. InputError when the model
    does not record what the option needs.

    Example:
        >>> scale_factor({"diameter": 30.0}, diameter=15.0), scale_factor({"diameter": 30.0, "pixel_size": 0.25}, pixel_size=0.5)
        (2.0, 2.0)
    """
    if diameter is not None and pixel_size is not None:
        raise InputError("give --diameter or --pixel-size, not both")
    if diameter is not None:
        if not scale.get("diameter"):
            raise InputError(f"{model} records no object diameter (trained before unetkit stored it); "
                             "leave out --diameter, or retrain it")
        return float(scale["diameter"]) / float(diameter)
    if pixel_size is not None:
        if not scale.get("pixel_size"):
            raise InputError(f"{model} records no pixel size; give --diameter (the objects' diameter in pixels) instead")
        return float(pixel_size) / float(scale["pixel_size"])
    return 1.0


def far_from(found: float | None, trained: float | None) -> bool:
    """Whether objects of median diameter `found` are far (`FAR_FACTOR`) from the `trained` one."""
    if not found or not trained:
        return False
    return max(found / trained, trained / found) > FAR_FACTOR


# -- prediction at the model's scale (used by `unetkit.inference.Segmenter`) --------------------------


@dataclass
class ScaledMaps:
    """Maps made at the model's object scale: `maps` at the input's size (what the caller gets),
    `model_maps` at the model's scale (what labels are drawn from), the `factor` between them;
    `estimated`: the objects' median diameter that ``diameter="auto"`` measured (input pixels)."""

    maps: np.ndarray
    model_maps: np.ndarray
    factor: float
    notes: list[str] = field(default_factory=list)
    estimated: float | None = None


def _model_label(segmenter) -> str:
    return f"model {segmenter.packaged!r}" if segmenter.packaged else f"{segmenter.source or 'the model'}"


def _instances(segmenter, maps: np.ndarray) -> np.ndarray:
    """Instance labels of `maps` by the segmenter's rule (also when it writes binary labels): what sizes are measured on."""
    from .postprocess import labels_from_probabilities

    return labels_from_probabilities(maps, segmenter.settings.rule, fill_holes=segmenter.settings.fill_holes)


def maps_at_model_scale(segmenter, image: np.ndarray, *, out=None, tiles=None,
                        callback=None, progress: bool = False) -> ScaledMaps:
    """(n_classes, H, W) maps of a normalised in-memory (C, H, W) `image` made at the model's scale
    as the segmenter's ``diameter`` / ``pixel_size`` options say; ``diameter="auto"`` measures the
    objects found at the model's scale first (`median_diameter`) and segments again at the factor
    that implies (`AUTO_PASSES`, `AUTO_TOLERANCE`)."""
    from .config import LARGE_PIXELS

    options = segmenter.options
    if out is not None or tiles is not None or not isinstance(image, np.ndarray):
        raise InputError("--diameter and --pixel-size rescale images in memory; for zarr or larger-than-memory images "
                         "rescale the image to the model's scale first (unetkit.scale.rescale_image), then predict without them")
    scale = model_scale(segmenter.loaded, segmenter.packaged_scale)
    label = _model_label(segmenter)
    shape = image.shape[-2:]

    def run(factor: float) -> tuple[np.ndarray, float]:
        if abs(factor - 1.0) < UNCHANGED:
            return segmenter.probabilities(image, callback=callback, progress=progress, native=True), 1.0
        target = rescaled_shape(shape, factor)
        if target[0] * target[1] > LARGE_PIXELS:
            raise InputError(f"rescaled by {factor:.2f} the image would be {target[0]}x{target[1]} pixels, "
                             "too large to segment in memory; check --diameter, or crop the image")
        return segmenter.probabilities(rescale_image(image, shape=target), callback=callback, progress=progress, native=True), factor

    notes: list[str] = []
    found = None
    diameter = check_diameter(options.diameter)
    if diameter == "auto":
        scale_factor(scale, diameter=1.0, model=label)  # InputError when the model records no diameter
        trained = float(scale["diameter"])
        model_maps, factor = run(1.0)
        for _ in range(AUTO_PASSES - 1):
            measured = median_diameter(_instances(segmenter, model_maps))
            if measured is None:
                break
            found = measured / factor  # in the input's pixels
            wanted = float(np.clip(trained / found, *AUTO_LIMITS))
            if abs(wanted / factor - 1.0) <= AUTO_TOLERANCE:
                break
            model_maps, factor = run(wanted)
        if found is None:
            notes.append("--diameter auto found no objects at the model's scale to measure; "
                         "give --diameter D (the objects' diameter in pixels)")
        else:
            notes.append(f"estimated object diameter {found:.1f} px ({label} was trained on "
                         f"{trained:.1f} px); segmented at {factor:.2f} x the image's size")
    else:
        model_maps, factor = run(scale_factor(scale, diameter=diameter, pixel_size=options.pixel_size, model=label))
        if getattr(segmenter, "default_diameter", None) is not None and factor != 1.0:
            notes.append(f"segmented at {factor:.2f} x the image's size: {label} was fine-tuned on objects of "
                         f"{diameter:g} px at that scale (give --diameter D, the objects' diameter in pixels, for others)")
    maps = model_maps if model_maps.shape[-2:] == shape else rescale_image(model_maps, shape=shape)
    return ScaledMaps(maps, model_maps, factor, notes, found)


def size_note(segmenter, labels: np.ndarray) -> str | None:
    """One line when the objects of `labels` (found without rescaling) are far (`FAR_FACTOR`) from
    the size the model was trained on, naming ``--diameter``; None otherwise or when the model does
    not record its scale."""
    trained = model_scale(segmenter.loaded, segmenter.packaged_scale).get("diameter")
    found = median_diameter(labels)
    if not far_from(found, trained):
        return None
    return (f"the objects found have a median diameter of {found:.0f} px but {_model_label(segmenter)} was "
            f"trained on objects of {trained:.0f} px, so it may miss or merge objects; add --diameter auto "
            "(or --diameter D, the objects' diameter in pixels)")


def pixel_size_um(text: str | None) -> float | None:
    """Micrometres per pixel from a pixel size written like "0.24 x 0.24 um" or "4 x 4 nm"; None if not parseable.

    Example:
        >>> pixel_size_um("0.24 x 0.24 um"), pixel_size_um("4 x 4 nm"), pixel_size_um(None)
        (0.24, 0.004, None)
    """
    import re

    match = re.match(r"\s*([0-9.]+)\s*(?:x\s*[0-9.]+\s*)?(um|µm|nm)\b", text or "")
    if not match:
        return None
    return round(float(match.group(1)) * (0.001 if match.group(2) == "nm" else 1.0), 9)
