"""Finding image/mask pairs on disk and reading masks safely.

Three layouts are recognised by `find_pairs` (first match wins):

1. ISBI 2012: ``root/train/images/NN.png`` with ``root/train/labels/NN.png``.
2. Cell Tracking Challenge: ``root/01/t000.tif`` with ``root/01_GT/SEG/man_seg000.tif`` (gold truth)
   or ``root/01_ST/SEG/man_seg000.tif`` (silver truth), for every sequence folder (01, 02, ...);
   or flat, ``root/images/t000.tif`` with ``root/masks/man_seg000.tif``. Frames pair by number.
3. Folder pair: ``root/images/`` with ``root/masks/`` (or ``root/labels/``), matched by file
   name stem (``a.png`` with ``a.tif``, ``a_mask.png``, ``a_label.png`` ...; ``img2d.tif`` with
   ``mask2d.tif``). PNG or TIFF, 8 or 16 bit, grayscale or RGB images; binary or instance masks.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
from scipy import ndimage as ndi

from ..errors import InputError
from ..io import list_images, listing, read_image
from ..labels import check_labels, relabel_consecutive

MASK_FOLDERS = ("masks", "labels")
MASK_SUFFIXES = ("", "_mask", "_masks", "_label", "_labels", "_seg")
_IMAGE_WORDS = ("image", "img", "raw")
_MASK_WORDS = ("mask", "label", "labels", "masks", "seg")
CtcTruth = Literal["auto", "gold", "silver"]

_CTC_IMAGE = re.compile(r"^t(\d+)$")  # the one pattern for Cell Tracking Challenge frame names
_CTC_MASK = re.compile(r"^man_seg(\d+)$")
_CTC_SEQUENCE = re.compile(r"^\d+$")

#: Masks with this share of object pixels in values that form no solid region are refused ...
INTENSITY_SHARE = 0.05
#: ... when at least this many distinct values do so (a trimap or a few specks are fine).
INTENSITY_VALUES = 5


def ctc_frame(stem: str) -> str | None:
    """The frame number of a Cell Tracking Challenge image name, digits as written; None otherwise.

    Example:
        >>> ctc_frame("t041"), ctc_frame("cell7")
        ('041', None)
    """
    match = _CTC_IMAGE.match(stem)
    return match.group(1) if match else None


def check_unique_frames(paths: Iterable[str | os.PathLike]) -> None:
    """Refuse two Cell Tracking Challenge names for one frame (t41.tif and t041.tif), naming both files.

    Names without a frame number (`ctc_frame`) are left alone.

    Example:
        >>> check_unique_frames([Path("t41.tif"), Path("t041.tif")])
        Traceback (most recent call last):
        ...
        unetkit.errors.InputError: t41.tif and t041.tif are both frame 41; keep one file per frame (rename or remove one)
    """
    _numbered(map(Path, paths), _CTC_IMAGE, "frame")


def _numbered(paths: Iterable[Path], pattern: re.Pattern, what: str) -> dict[int, Path]:
    """The files whose stem `pattern` numbers, by number; one number written two ways is refused."""
    table: dict[int, Path] = {}
    for path in paths:
        match = pattern.match(path.stem)
        if match is None:
            continue
        number = int(match.group(1))
        if number in table:
            raise InputError(f"{table[number]} and {path} are both {what} {number}; keep one file per {what} "
                             "(rename or remove one)")
        table[number] = path
    return table


@dataclass(frozen=True)
class ImagePair:
    """An image file, its mask file (None when unannotated) and a short unique name.

    Example:
        >>> ImagePair(Path("images/a.png"), Path("masks/a.png"), "a").name
        'a'
    """

    image: Path
    mask: Path | None
    name: str


def _nonempty_images(folder: Path) -> list[Path]:
    files = list_images(folder)
    if not files:
        raise InputError(f"{folder}: no images (PNG or TIFF) in this folder; put the image files there")
    return files


def _unique_by(files: list[Path], key) -> dict:
    table: dict = {}
    for path in files:
        k = key(path)
        if k is None:
            continue
        if k in table:
            raise InputError(
                f"{path}: same name as {table[k]}; keep one file per image (e.g. remove the copy in another format)"
            )
        table[k] = path
    return table


def _missing_masks_error(missing: list[tuple[Path, str]]) -> InputError:
    image, expected = missing[0]
    more = f" ({len(missing) - 1} more images have no mask)" if len(missing) > 1 else ""
    return InputError(
        f"{image}: no mask found; expected {expected}{more}. Add the masks, remove the unannotated images, "
        "or allow images without masks"
    )


def mask_stems(stem: str) -> list[str]:
    """Mask file stems accepted for an image stem: the same, with a suffix, or with img -> mask."""
    candidates = [stem + suffix for suffix in MASK_SUFFIXES]
    lower = stem.lower()
    for word in _IMAGE_WORDS:
        at = lower.find(word)
        if at >= 0:
            candidates += [stem[:at] + new + stem[at + len(word) :] for new in _MASK_WORDS]
            break
    return candidates


def _folder_pairs(image_dir: Path, mask_dir: Path, allow_missing_masks: bool, prefix: str = "") -> list[ImagePair]:
    images = _unique_by(_nonempty_images(image_dir), lambda p: p.stem)
    masks = _unique_by(_nonempty_images(mask_dir), lambda p: p.stem)
    pairs, missing, used = [], [], set()
    for stem, image in images.items():
        mask = next((masks[c] for c in mask_stems(stem) if c in masks), None)
        if mask is None:
            missing.append((image, f"{mask_dir / stem}.png or .tif"))
        else:
            used.add(mask)
        pairs.append(ImagePair(image, mask, prefix + stem))
    if missing and not allow_missing_masks:
        raise _missing_masks_error(missing)
    unused = sorted(set(masks.values()) - used)
    if unused:
        warnings.warn(f"masks without an image are ignored: {listing(unused, full=True)}", stacklevel=3)
    return pairs


def _ctc_pairs(
    image_dir: Path, mask_dir: Path | None, allow_missing_masks: bool, prefix: str = ""
) -> list[ImagePair]:
    images = _numbered(_nonempty_images(image_dir), _CTC_IMAGE, "frame")
    if not images:
        raise InputError(f"{image_dir}: no frames named tNNN.tif; Cell Tracking Challenge images are t000.tif, t001.tif, ...")
    masks = _numbered(_nonempty_images(mask_dir), _CTC_MASK, "frame") if mask_dir is not None else {}
    orphans = sorted(masks[k] for k in set(masks) - set(images))
    if orphans:
        raise InputError(f"{orphans[0]}: mask without an image (expected {image_dir}/t{orphans[0].stem[7:]}.tif)")
    pairs = []
    for index in sorted(images):
        mask = masks.get(index)
        if mask is None and not allow_missing_masks:
            continue  # CTC truth annotates only some frames; the others are simply not training data
        pairs.append(ImagePair(images[index], mask, prefix + images[index].stem))
    if not pairs:
        where = mask_dir if mask_dir is not None else image_dir
        raise InputError(f"{where}: no man_segNNN.tif masks match the frames in {image_dir}")
    return pairs


def _ctc_truth_dir(root: Path, sequence: str, truth: CtcTruth) -> Path | None:
    gold, silver = root / f"{sequence}_GT" / "SEG", root / f"{sequence}_ST" / "SEG"
    order = {"auto": (gold, silver), "gold": (gold,), "silver": (silver,)}[truth]
    return next((d for d in order if d.is_dir()), None)


def _ctc_release(root: Path, allow_missing_masks: bool, truth: CtcTruth) -> list[ImagePair] | None:
    sequences = sorted(
        d.name for d in root.iterdir() if d.is_dir() and _CTC_SEQUENCE.match(d.name)
        and ((root / f"{d.name}_GT").is_dir() or (root / f"{d.name}_ST").is_dir())
    )
    if not sequences:
        return None
    pairs = []
    for sequence in sequences:
        mask_dir = _ctc_truth_dir(root, sequence, truth)
        if mask_dir is None and not allow_missing_masks:
            continue
        pairs += _ctc_pairs(root / sequence, mask_dir, allow_missing_masks, prefix=f"{sequence}_")
    if not pairs:
        kind = {"auto": "_GT/SEG or _ST/SEG", "gold": "_GT/SEG", "silver": "_ST/SEG"}[truth]
        raise InputError(f"{root}: no segmentation truth found; expected folders such as {sequences[0]}{kind}")
    return pairs


def _mask_dir(root: Path) -> Path | None:
    return next((root / name for name in MASK_FOLDERS if (root / name).is_dir()), None)


def _is_ctc_flat(mask_dir: Path) -> bool:
    return any(_CTC_MASK.match(p.stem) for p in list_images(mask_dir))


def find_pairs(
    root: str | os.PathLike,
    *,
    allow_missing_masks: bool = False,
    ctc_truth: CtcTruth = "auto",
) -> list[ImagePair]:
    """Detect the dataset layout under `root` and list its image/mask pairs, sorted by name.

    Args:
        root: dataset folder (see the module docstring for the layouts).
        allow_missing_masks: keep images that have no mask (with ``mask=None``) instead of raising.
            In the Cell Tracking Challenge layout, frames without truth are skipped unless this is set.
        ctc_truth: for the CTC release layout, "gold" (``01_GT/SEG``), "silver" (``01_ST/SEG``) or
            "auto" (gold where the folder exists, else silver).

    Raises:
        InputError: no layout matches (the message lists what was looked for), an empty folder,
            an image without a mask, or two files with the same name.

    Example:
        >>> pairs = find_pairs(data_root() / "isbi2012")  # doctest: +SKIP
        >>> pairs[0].name, pairs[0].mask.name  # doctest: +SKIP
        ('00', '00.png')
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder; give the dataset folder (containing images/ and masks/)")
    if ctc_truth not in ("auto", "gold", "silver"):
        raise InputError(f"ctc_truth must be 'auto', 'gold' or 'silver' (got {ctc_truth!r})")
    train = root / "train"
    if (train / "images").is_dir() and (train / "labels").is_dir():
        return _sorted(_folder_pairs(train / "images", train / "labels", allow_missing_masks))
    ctc = _ctc_release(root, allow_missing_masks, ctc_truth)
    if ctc is not None:
        return _sorted(ctc)
    image_dir, mask_dir = root / "images", _mask_dir(root)
    if image_dir.is_dir() and mask_dir is not None:
        if _is_ctc_flat(mask_dir):
            return _sorted(_ctc_pairs(image_dir, mask_dir, allow_missing_masks))
        return _sorted(_folder_pairs(image_dir, mask_dir, allow_missing_masks))
    if image_dir.is_dir() and allow_missing_masks:
        return [ImagePair(p, None, p.stem) for p in _nonempty_images(image_dir)]
    raise InputError(
        f"{root}: no dataset layout found. Looked for: images/ with masks/ or labels/ (files matched by name); "
        "train/images/ with train/labels/ (ISBI 2012); 01/tNNN.tif with 01_GT/SEG/ or 01_ST/SEG/man_segNNN.tif "
        "(Cell Tracking Challenge). Arrange the files in one of these layouts"
    )


def _sorted(pairs: list[ImagePair]) -> list[ImagePair]:
    return sorted(pairs, key=lambda p: p.name)


def check_mask(
    mask: np.ndarray, path: str | os.PathLike = "mask", *, allow_intensity_masks: bool = False
) -> np.ndarray:
    """Validate a label image read from `path` and return it as 2D integer labels.

    Accepted: bool or integer (H, W) arrays with values >= 0: binary masks ({0, v}) or instance
    labels (0 = background); float arrays holding whole numbers; RGB(A) arrays whose colour channels
    are all equal (a grayscale mask saved as RGB).

    Raises:
        InputError naming `path` for colour (RGB) masks, values `unetkit.labels.check_labels`
        rejects (fractional, non-finite or negative ones), anti-aliased binary masks (two values
        cover almost all pixels; a few others sit only on the edges between them), and masks that
        are not piecewise constant (see `intensity_problem`): a raw image, a resized (interpolated)
        or JPEG-compressed mask, a probability map. `allow_intensity_masks=True` accepts the last
        kind as they are, every distinct value an object.

    Example:
        >>> check_mask(np.array([[0, 255], [255, 0]], np.uint8)).tolist()
        [[0, 255], [255, 0]]
    """
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        colour = arr[..., :3]
        opaque = arr.shape[-1] == 3 or np.all(arr[..., 3] == arr[..., 3].flat[0])
        if not (opaque and np.all(colour == colour[..., :1])):
            raise InputError(
                f"{path}: mask is a colour (RGB) image; save it as a single-channel label image "
                "(0 = background, 1, 2, ... = objects, or a binary 0/255 mask)"
            )
        arr = colour[..., 0]
    labels = check_labels(
        arr, str(path), ndim=2, hint="it looks like a probability map or a resized mask: threshold it, or save integer labels"
    )
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if _looks_antialiased(labels):
        raise InputError(
            f"{path}: looks like an anti-aliased binary mask (almost all pixels are 0 or {labels.max()}, "
            "with a few intermediate values on the edges); re-save it without anti-aliasing or threshold it"
        )
    problem = None if allow_intensity_masks else intensity_problem(labels)
    if problem:
        raise InputError(
            f"{path}: does not look like a mask: {problem}. This is what a raw image (are images/ and masks/ "
            "swapped?), a resized (interpolated) or JPEG-compressed mask or a probability map looks like. "
            "Give labels (0 = background, 1, 2, ... = objects, or a binary 0/255 mask) saved as PNG or TIFF "
            "without interpolation, or accept it as it is with --allow-intensity-masks"
        )
    if np.issubdtype(arr.dtype, np.integer):
        labels = arr  # keep the integer type the mask was saved with
    if labels.size and labels.max() > np.iinfo(np.int32).max:
        labels = relabel_consecutive(labels)  # compact huge IDs (0 stays 0)
    return labels


def _looks_antialiased(arr: np.ndarray) -> bool:
    """Binary mask plus a rim of intermediate values between its two levels."""
    if arr.size == 0:
        return False
    top = arr.max()
    between = (arr > 0) & (arr < top)
    count = int(np.count_nonzero(between))
    if count == 0 or count > 0.1 * arr.size:
        return False
    # An anti-aliased rim lies between the two levels, so nearly all its pixels are near both; in an
    # instance image, objects with intermediate labels have interiors away from label `top`.
    near = np.ones((5, 5), bool)
    near_zero = ndi.binary_dilation(arr == 0, structure=near)
    near_top = ndi.binary_dilation(arr == top, structure=near)
    rim = np.count_nonzero(between & near_zero & near_top)
    return rim >= 0.9 * count and np.count_nonzero(arr == top) > count


def intensity_problem(labels: np.ndarray) -> str | None:
    """Why `labels` is not piecewise constant like a label image, or None if it is.

    In a label image every object is a solid region: its pixels share their value with most of
    their four neighbours (on average 2 of 4 even in a 2x2 object, more in larger ones). Values
    whose pixels have fewer equal neighbours form no solid region: the one-pixel ramps of an
    interpolated mask, the ringing of a JPEG, the texture of a raw image or a probability map.
    A mask is refused when such values are many (>= `INTENSITY_VALUES`) and hold at least
    `INTENSITY_SHARE` of the object (non-zero) pixels. Binary masks always pass.

    Example:
        >>> gradient = np.add.outer(np.arange(40), np.arange(40)).astype(np.uint8)
        >>> intensity_problem(gradient) is not None, intensity_problem(np.eye(40, dtype=np.uint8))
        (True, None)
    """
    arr = np.asarray(labels)
    if arr.ndim != 2 or arr.size == 0:
        return None
    values, inverse = np.unique(arr, return_inverse=True)
    if values.size <= 2:
        return None
    padded = np.pad(arr, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    equal = np.zeros(arr.shape, np.uint8)
    for neighbour in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        equal += centre == neighbour
    inverse = inverse.reshape(-1)
    count = np.bincount(inverse, minlength=values.size)
    equal_neighbours = np.bincount(inverse, weights=equal.reshape(-1), minlength=values.size)
    objects = values != 0
    thin = objects & (equal_neighbours < 2 * count)
    share = count[thin].sum() / max(int(count[objects].sum()), 1)
    if int(thin.sum()) < INTENSITY_VALUES or share < INTENSITY_SHARE:
        return None
    return (
        f"{share:.0%} of its object pixels carry one of {int(thin.sum())} values (of {values.size} distinct values) "
        "that form no solid region, changing from pixel to pixel"
    )


def read_mask(path: str | os.PathLike, *, allow_intensity_masks: bool = False) -> np.ndarray:
    """Read and validate a mask file (see `check_mask`); returns 2D integer labels.

    Example:
        >>> mask = read_mask("masks/a.png")  # doctest: +SKIP
    """
    return check_mask(read_image(path), path, allow_intensity_masks=allow_intensity_masks)
