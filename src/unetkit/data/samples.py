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

from ..errors import InputError
from ..io import read_image
from ..labels import as_instances
from ..targets import TargetConfig, make_targets
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
    targets: TargetConfig | None = None,
    allow_intensity_masks: bool = False,
) -> Sample:
    """A `Sample` from in-memory arrays: image (H, W) / (H, W, C), mask a binary mask or instance labels.

    `name` is used in error messages (pass the file names when the arrays come from files).
    `targets` says how the target and weight map are made (`unetkit.targets.TargetConfig`,
    default the paper's); `allow_intensity_masks` is that of `check_mask`.

    Example:
        >>> mask = np.zeros((16, 16), np.uint8); mask[4:12, 4:12] = 255
        >>> int(make_sample(np.random.rand(16, 16), mask).instances.max())
        1
    """
    mask = check_mask(mask, name, allow_intensity_masks=allow_intensity_masks)
    return _sample(np.asarray(image), mask, name, normalization, targets)


def load_sample(
    pair: ImagePair,
    normalization: Normalization | None = None,
    *,
    targets: TargetConfig | None = None,
    allow_intensity_masks: bool = False,
) -> Sample:
    """Read, check and prepare one image/mask pair (target and weight map as `make_sample`).

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
    return _sample(image, mask, pair.name, normalization, targets, files=(pair.image, pair.mask))


def _sample(
    image: np.ndarray,
    mask: np.ndarray,
    name: str,
    normalization: Normalization | None,
    targets: TargetConfig | None,
    files: tuple[Path, Path] | None = None,
) -> Sample:
    """The body of `make_sample` and `load_sample`: a checked mask and an image -> `Sample`.

    Messages name `files` (image, mask) when the arrays were read from them, else `name`.
    """
    where = str(files[0]) if files else name
    chw = to_chw(image, name=where)
    if chw.shape[1:] != mask.shape:
        image_is, its_mask = (f"{files[0]} is", f"its mask {files[1]}") if files else (f"{name}: image is", "its mask")
        raise InputError(
            f"{image_is} {chw.shape[1]}x{chw.shape[2]} pixels but {its_mask} is {mask.shape[0]}x{mask.shape[1]}; "
            "image and mask must have the same size"
        )
    data = (normalization or Normalization())(chw)
    if not np.all(np.isfinite(data)):
        raise InputError(f"{where}: image contains NaN or infinite values; replace them before training")
    target, weights = make_targets(mask, targets)
    instances = as_instances(mask).astype(np.int32)
    return Sample(data, instances, target.astype(np.int64), weights.astype(np.float32), name)


def load_samples(
    root_or_pairs: str | os.PathLike | Sequence[ImagePair],
    normalization: Normalization | None = None,
    *,
    targets: TargetConfig | None = None,
    allow_intensity_masks: bool = False,
) -> list[Sample]:
    """Load every pair of a dataset folder (see `find_pairs`) or of a list of pairs.

    Weight maps are computed here, once per image, as `targets` says (`TargetConfig`). All images must have the same number of channels.
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
    samples = [load_sample(pair, normalization, targets=targets, allow_intensity_masks=allow_intensity_masks)
               for pair in pairs]
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

