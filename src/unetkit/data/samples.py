"""Training samples: a normalised image with its instance labels, target and precomputed weight map.

The paper precomputes the weight map of every ground-truth segmentation once; `load_samples` does
the same, so tile sampling during training only crops arrays.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import PAPER
from ..errors import InputError
from ..io import read_image
from ..labels import as_instances
from ..targets import ClassWeights, make_targets
from .normalize import Normalization, to_chw
from .readers import ImagePair, check_mask, find_pairs, read_mask


@dataclass
class Sample:
    """One annotated image, ready for tile sampling.

    Attributes:
        image: (C, H, W) float32, normalised.
        instances: (H, W) int32 instance labels (0 = background).
        target: (H, W) int64 classes (1 = object interior, 0 = background and separation borders).
        weights: (H, W) float32 pixel weights (the paper's weight map).
        name: short name (the file stem), used in messages and for validation splits.

    Example:
        >>> s = make_sample(np.zeros((8, 8), np.uint8), np.eye(8, dtype=np.uint8), name="eye")
        >>> s.image.shape, s.target.dtype.name, s.weights.dtype.name
        ((1, 8, 8), 'int64', 'float32')
    """

    image: np.ndarray
    instances: np.ndarray
    target: np.ndarray
    weights: np.ndarray
    name: str

    def __post_init__(self) -> None:
        if self.image.ndim != 3:
            raise InputError(f"{self.name}: sample image must be (C, H, W), got shape {self.image.shape}")
        shape = self.image.shape[1:]
        for field in ("instances", "target", "weights"):
            if getattr(self, field).shape != shape:
                raise InputError(
                    f"{self.name}: {field} has shape {getattr(self, field).shape}, the image {shape}; they must match"
                )

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W)."""
        return tuple(self.image.shape[1:])  # type: ignore[return-value]


def make_sample(
    image: np.ndarray,
    mask: np.ndarray,
    name: str = "image",
    normalization: Normalization | None = None,
    *,
    w0: float = PAPER.w0,
    sigma: float = PAPER.sigma,
    class_weights: ClassWeights = "balanced",
    pixel_size: float | None = None,
    use_weight_map: bool = True,
    allow_intensity_masks: bool = False,
) -> Sample:
    """A `Sample` from in-memory arrays: image (H, W) / (H, W, C), mask a binary mask or instance labels.

    `name` is used in error messages (pass the file names when the arrays come from files).
    The target options are those of `unetkit.targets.make_targets`; `allow_intensity_masks` that
    of `check_mask`.

    Example:
        >>> mask = np.zeros((16, 16), np.uint8); mask[4:12, 4:12] = 255
        >>> int(make_sample(np.random.rand(16, 16), mask).instances.max())
        1
    """
    normalization = normalization or Normalization()
    mask = check_mask(mask, name, allow_intensity_masks=allow_intensity_masks)
    chw = to_chw(np.asarray(image), name=name)
    if chw.shape[1:] != mask.shape:
        raise InputError(
            f"{name}: image is {chw.shape[1]}x{chw.shape[2]} pixels but its mask is {mask.shape[0]}x{mask.shape[1]}; "
            "image and mask must have the same size"
        )
    data = normalization(chw)
    if not np.all(np.isfinite(data)):
        raise InputError(f"{name}: image contains NaN or infinite values; replace them before training")
    return _finish(data, mask, name, w0, sigma, class_weights, pixel_size, use_weight_map)


def _finish(data, mask, name, w0, sigma, class_weights, pixel_size, use_weight_map) -> Sample:
    target, weights = make_targets(
        mask, w0=w0, sigma=sigma, class_weights=class_weights, pixel_size=pixel_size, use_weight_map=use_weight_map
    )
    instances = as_instances(mask).astype(np.int32)
    return Sample(data, instances, target.astype(np.int64), weights.astype(np.float32), name)


def load_sample(
    pair: ImagePair,
    normalization: Normalization | None = None,
    *,
    w0: float = PAPER.w0,
    sigma: float = PAPER.sigma,
    class_weights: ClassWeights = "balanced",
    pixel_size: float | None = None,
    use_weight_map: bool = True,
    allow_intensity_masks: bool = False,
) -> Sample:
    """Read, check and prepare one image/mask pair (target and weight map via `make_targets`).

    Raises:
        InputError naming the files: no mask, image and mask sizes differ (both shapes are given),
        bad mask values or a mask that looks like an intensity image (see `check_mask`;
        `allow_intensity_masks` accepts the latter), unreadable or multi-page files.

    Example:
        >>> sample = load_sample(find_pairs("my_dataset")[0])  # doctest: +SKIP
    """
    if pair.mask is None:
        raise InputError(f"{pair.image}: image has no mask; training needs a mask for every image")
    image = read_image(pair.image)
    mask = read_mask(pair.mask, allow_intensity_masks=allow_intensity_masks)
    if image.shape[:2] != mask.shape:
        raise InputError(
            f"{pair.image} is {image.shape[0]}x{image.shape[1]} pixels but its mask {pair.mask} is "
            f"{mask.shape[0]}x{mask.shape[1]}; image and mask must have the same size"
        )
    chw = to_chw(image, name=str(pair.image))
    data = (normalization or Normalization())(chw)
    if not np.all(np.isfinite(data)):
        raise InputError(f"{pair.image}: image contains NaN or infinite values; replace them before training")
    return _finish(data, mask, pair.name, w0, sigma, class_weights, pixel_size, use_weight_map)


def load_samples(
    root_or_pairs: str | os.PathLike | Sequence[ImagePair],
    normalization: Normalization | None = None,
    *,
    w0: float = PAPER.w0,
    sigma: float = PAPER.sigma,
    class_weights: ClassWeights = "balanced",
    pixel_size: float | None = None,
    use_weight_map: bool = True,
    allow_intensity_masks: bool = False,
) -> list[Sample]:
    """Load every pair of a dataset folder (see `find_pairs`) or of a list of pairs.

    Weight maps are computed here, once per image. All images must have the same number of channels.
    Warns when every mask is empty or every mask is all foreground (nothing to tell apart).

    Example:
        >>> samples = load_samples("my_dataset")  # doctest: +SKIP
        >>> samples[0].image.shape  # doctest: +SKIP
        (1, 512, 512)
    """
    if isinstance(root_or_pairs, (str, os.PathLike)):
        pairs = find_pairs(Path(root_or_pairs))
    else:
        pairs = list(root_or_pairs)
    if not pairs:
        raise InputError("no image/mask pairs to load; check the dataset folder or the list of pairs")
    options = dict(w0=w0, sigma=sigma, class_weights=class_weights, pixel_size=pixel_size, use_weight_map=use_weight_map,
                   allow_intensity_masks=allow_intensity_masks)
    samples = [load_sample(pair, normalization, **options) for pair in pairs]
    first = samples[0].image.shape[0]
    for pair, sample in zip(pairs, samples):
        if sample.image.shape[0] != first:
            raise InputError(
                f"{pair.image} has {sample.image.shape[0]} channel(s) but {pairs[0].image} has {first}; "
                "save all images either as grayscale or as RGB"
            )
    for degenerate, what, learns in ((lambda s: not s.instances.any(), "empty (no object pixel)", "background"),
                                     (lambda s: s.instances.all(), "all foreground (no background pixel)", "foreground")):
        if all(degenerate(sample) for sample in samples):
            warnings.warn(f"all {len(samples)} mask(s) are {what}, e.g. {pairs[0].mask}: the network can only learn "
                          f"{learns}; check the masks (0 = background, objects > 0)", stacklevel=2)
    return samples


get_samples = load_samples
