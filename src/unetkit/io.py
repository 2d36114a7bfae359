"""Reading and writing images, safely.

Readers accept PNG, TIFF (LZW-compressed too) and anything imageio reads. Writers are atomic:
they write to a temporary file in the destination folder and rename it, so an interrupted write
never leaves a half-written file, and they refuse to replace an existing file unless `force=True`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import InputError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D image (H, W) or (H, W, C) from PNG/TIFF/JPEG.

    Example:
        >>> img = read_image("cells.tif")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; check the path")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            array = tifffile.imread(path)
        else:
            import imageio.v3 as iio

            array = iio.imread(path)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a user-facing file problem
        raise InputError(f"{path}: cannot read image ({exc}); is it a valid PNG/TIFF file?") from exc
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim not in (2, 3):
        raise InputError(
            f"{path}: expected a 2D image (H, W) or (H, W, C), got shape {array.shape}; "
            "save one 2D slice per file"
        )
    return array


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; give a folder of PNG or TIFF images")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, force: bool = False) -> Path:
    """Call `write(tmp_path)` and rename the result to `path`.

    Raises `FileExistsError` if `path` exists and `force` is False.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path}: already exists; use --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def write_tiff(path: str | os.PathLike, array: np.ndarray, *, force: bool = False) -> Path:
    """Write `array` as a (zlib-compressed) TIFF, atomically."""
    import tifffile

    return atomic_write(path, lambda p: tifffile.imwrite(p, np.asarray(array), compression="zlib"), force=force)


def write_png(path: str | os.PathLike, array: np.ndarray, *, force: bool = False) -> Path:
    """Write a uint8/uint16 image as PNG, atomically."""
    import imageio.v3 as iio

    return atomic_write(path, lambda p: iio.imwrite(p, np.asarray(array), extension=".png"), force=force)


def prepare_output_dir(folder: str | os.PathLike, *, force: bool = False) -> Path:
    """Create `folder`, refusing a non-empty one unless `force` (files in it may then be replaced)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder; choose another --out")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise InputError(f"{folder}: folder is not empty; choose an empty --out or add --force")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
