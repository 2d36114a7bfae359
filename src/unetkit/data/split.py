"""Deterministic training/validation splits of a dataset (validation images are never trained on)."""

from __future__ import annotations

import re
from typing import Sequence, TypeVar

import numpy as np

from ..errors import InputError
from ..io import repeated

T = TypeVar("T")

#: How a fraction or a count of validation images is chosen. "last": the last images in natural name
#: order (t9 before t10), a block at the end of a stack or a time series, so validation sees what
#: lies beyond the training range as new data will; "random": drawn with a seed.
VALIDATION_SPLITS = ("last", "random")


def _keys(item) -> set[str]:
    """Names an item can be referred to by: its name, and for pairs the image file name and stem."""
    keys = {str(item.name)}
    image = getattr(item, "image", None)
    if hasattr(image, "name") and hasattr(image, "stem"):
        keys |= {image.name, image.stem}
    return keys


def split_pairs(
    pairs: Sequence[T],
    val: float | int | str | Sequence[str] = 0.2,
    seed: int = 0,
    split: str = "last",
) -> tuple[list[T], list[T]]:
    """Split image pairs (or samples: anything with a `.name`) into training and validation lists.

    Args:
        pairs: the items to split; their order is kept in both outputs.
        val: a fraction in [0, 1) of the items (at least one when > 0), a count (int), or the names
            of the validation items (pair/sample names, image file names or stems).
        seed: for a fraction or count with split="random", the choice depends only on `seed` and the
            set of names (not on their order), so the same data gives the same split every time.
        split: how a fraction or count is chosen (`VALIDATION_SPLITS`): "last" (the default) takes
            the last names in natural order. Neighbouring slices of a stack or frames of a series
            look alike, so validation drawn among them at random cannot see how the model fares on
            data beyond the training range; a block at the end can (on ISBI 2012 it is what lets
            training choose each image's batch-norm statistics, see docs/TRAINING.md).

    Raises:
        InputError: unknown names, a fraction outside [0, 1), or an empty training set.

    Example:
        >>> from pathlib import Path
        >>> from unetkit.data import ImagePair
        >>> pairs = [ImagePair(Path(f"{i}.png"), Path(f"m/{i}.png"), str(i)) for i in range(10)]
        >>> train, val = split_pairs(pairs, val=["3", "7.png"])
        >>> [p.name for p in val], len(train)
        (['3', '7'], 8)
        >>> [p.name for p in split_pairs(pairs, val=0.2)[1]]
        ['8', '9']
    """
    items = list(pairs)
    names = [str(item.name) for item in items]
    twins = repeated(names)
    if twins:
        raise InputError(f"two images are both named {twins[0]!r}; image names must be unique to split them")
    if split not in VALIDATION_SPLITS:
        raise InputError(f"validation split must be one of {', '.join(VALIDATION_SPLITS)} (got {split!r})")
    if isinstance(val, str):
        val = [val]
    if isinstance(val, (bool, np.bool_)):
        raise InputError(f"val must be a fraction, a count or a list of image names (got {val!r})")
    if isinstance(val, (int, np.integer)):
        if val < 0:
            raise InputError(f"val count must be >= 0 (got {val})")
        if val >= len(items):
            raise InputError(
                f"--val {val}: a count of validation images must leave at least one for training, and the dataset has "
                f"{len(items)} image(s); give a count below {len(items)} or a fraction"
            )
        chosen = _choose(names, int(val), seed, split)
    elif isinstance(val, (float, np.floating)):
        if not 0.0 <= val < 1.0:
            raise InputError(f"val fraction must be in [0, 1) (got {val}); use an int for a number of images")
        count = 0 if val == 0 else max(1, int(round(val * len(items))))
        chosen = _choose(names, count, seed, split)
    else:
        wanted = [str(v) for v in val]
        keys = [_keys(item) for item in items]
        unknown = [name for name in wanted if not any(name in k for k in keys)]
        if unknown:
            raise InputError(
                f"validation image(s) {', '.join(map(repr, unknown))} not in the dataset (--val); known names: "
                f"{', '.join(sorted(names)[:10])}" + (" ..." if len(names) > 10 else "")
            )
        chosen = {i for i, k in enumerate(keys) if k & set(wanted)}
    train = [item for i, item in enumerate(items) if i not in chosen]
    validation = [item for i, item in enumerate(items) if i in chosen]
    if not train:
        raise InputError(
            f"the validation split takes all {len(items)} image(s), leaving none for training; "
            "use a smaller validation fraction or fewer validation images, or add images"
        )
    return train, validation


def _natural_key(name: str) -> list:
    """Sort key that orders the digits in a name by value: slice2 before slice10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def _choose(names: list[str], count: int, seed: int, split: str) -> set[int]:
    if split == "last":
        order = sorted(range(len(names)), key=lambda i: (_natural_key(names[i]), names[i]))
        return set(order[len(order) - count:]) if count else set()
    order = sorted(range(len(names)), key=lambda i: names[i])
    rng = np.random.default_rng(seed)
    picked = rng.permutation(len(names))[:count]
    return {order[int(k)] for k in picked}


#: The quadrants of an image by name: (row, column) of each half-size block.
QUADRANTS = {"top-left": (0, 0), "top-right": (0, 1), "bottom-left": (1, 0), "bottom-right": (1, 1)}


def image_quadrant(array: np.ndarray, part: str) -> np.ndarray:
    """Quadrant `part` (a `QUADRANTS` name) of an (H, W) or (..., H, W) array; odd sizes drop the last row/column.

    Example:
        >>> image_quadrant(np.arange(16).reshape(4, 4), "bottom-left").tolist()
        [[8, 9], [12, 13]]
    """
    if part not in QUADRANTS:
        raise InputError(f"unknown quadrant {part!r}; give one of {', '.join(QUADRANTS)}")
    row, col = QUADRANTS[part]
    h, w = array.shape[-2] // 2, array.shape[-1] // 2
    return array[..., row * h:(row + 1) * h, col * w:(col + 1) * w]


#: The share of each annotated image held out for validation when too few images are annotated to
#: hold a whole one out (`unetkit.finetune`).
VALIDATION_PART = 0.25


def validation_part_name(name: str) -> str:
    """The name of the held-out part of image `name` (`cut_validation_part`)."""
    return f"{name} (held-out part)"


def cut_validation_part(image: np.ndarray, mask: np.ndarray, fraction: float = VALIDATION_PART
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """An (..., H, W) image and its (H, W) mask cut across their longer side: (image, mask) of the
    first part, then of the last `fraction` of that side (at least one pixel each).

    Example:
        >>> image, mask = np.arange(24).reshape(4, 6), np.ones((4, 6), np.uint8)
        >>> train, _, val, val_mask = cut_validation_part(image, mask, 0.25)
        >>> train.shape, val.shape, val[:, 0].tolist()
        ((4, 4), (4, 2), [4, 10, 16, 22])
    """
    if not 0.0 < fraction < 1.0:
        raise InputError(f"fraction must be in (0, 1) (got {fraction})")
    height, width = image.shape[-2:]
    if tuple(mask.shape[-2:]) != (height, width):
        raise InputError(f"the mask is {mask.shape[-2]}x{mask.shape[-1]} but the image {height}x{width}; give masks of the images' size")
    along_rows = height >= width
    side = height if along_rows else width
    cut = min(max(int(round(side * (1.0 - fraction))), 1), side - 1)
    if along_rows:
        return image[..., :cut, :], mask[:cut], image[..., cut:, :], mask[cut:]
    return image[..., :cut], mask[:, :cut], image[..., cut:], mask[:, cut:]
