"""Reading and writing images, safely.

Readers accept PNG, TIFF (LZW-compressed too) and anything imageio reads. A file must hold one 2D
image: a multi-page TIFF (z-stack, time series) is refused with its page count, never read as
channels; a planar RGB TIFF (S, H, W) is returned as (H, W, S) like every colour image.

Writers are atomic: they write to a temporary file ``.NAME.XXXXXXXX.SUFFIX`` in the destination
folder, flush it to disk and rename it, so an interrupted write never leaves a half-written file;
new files get the usual permissions (0666 less the umask), and existing files are not replaced
unless `force=True`. `remove_stale_temp_files` deletes what a killed process left behind.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Iterable, Sequence

import numpy as np

from .errors import InputError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
_TIFF_SUFFIXES = (".tif", ".tiff")
_TEMP_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_"
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}(?P<suffix>\.[^.]+)?$")


def listing(paths: Sequence[Path], limit: int = 5, *, full: bool = False) -> str:
    """The first `limit` file names (whole paths with `full`), then how many more, for messages.

    Example:
        >>> listing([Path(f"d/{i}.tif") for i in range(7)], limit=2)
        '0.tif, 1.tif and 5 more'
    """
    shown = ", ".join(str(p) if full else p.name for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def repeated(values: Iterable[Hashable]) -> list:
    """The values that occur more than once, each once, in the order of their first occurrence.

    Example:
        >>> repeated(["a", "b", "a", "c", "b", "a"])
        ['a', 'b']
    """
    seen: dict = {}
    for value in values:
        seen[value] = seen.get(value, 0) + 1
    return [value for value, count in seen.items() if count > 1]


@dataclass(frozen=True)
class ImageHeader:
    """Shape and type of an image file as `read_image` would return it, read without the pixels."""

    shape: tuple[int, ...]
    dtype: np.dtype


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; check the path")
    return path


def _unreadable(path: Path, exc: Exception) -> InputError:
    if path.stat().st_size == 0:
        return InputError(f"{path}: empty file (0 bytes), not an image; copy it again or remove it")
    return InputError(
        f"{path}: not a readable image ({type(exc).__name__}); the file is damaged, incomplete or not really "
        f"a {path.suffix.lstrip('.').upper() or 'image'} file; export it again or remove it"
    )


def _layout(path: Path, shape: tuple[int, ...], axes: str, pages: bool) -> tuple[tuple[int, ...], bool]:
    """The (H, W) or (H, W, C) shape `read_image` returns for a file of `shape` with tifffile's
    axis letters `axes`, and whether its samples come first (planar RGB, moved last)."""
    planar = len(shape) == 3 and axes.startswith("S")
    if planar:
        shape, axes = shape[1:] + shape[:1], axes[1:] + "S"
    stacked = [n for a, n in zip(axes, shape) if a not in "YXS" and n > 1]
    if stacked and not pages:
        count = int(np.prod(stacked))
        raise InputError(
            f"{path}: holds {count} pages (a z-stack, time series or channel stack of shape {shape}), not one 2D "
            "image; pages are never used as colour channels. Save each 2D image as its own file"
        )
    shape = tuple(n for a, n in zip(axes, shape) if a in "YXS" or n > 1)
    if len(shape) not in (2, 3):
        raise InputError(f"{path}: expected a 2D image (H, W) or (H, W, C), got shape {shape}; save one 2D image per file")
    return shape, planar


def _array_axes(ndim: int, last: int, batch: bool) -> str:
    """Axis letters of an array imageio returns (frames first, colour samples last)."""
    if ndim == 4 or (ndim == 3 and (batch or last > 4)):
        return "IYX" + "S" * (ndim - 3)
    return "YXS"[:ndim]


def read_header(path: str | os.PathLike, *, pages: bool = False) -> ImageHeader:
    """Shape and dtype of an image file without reading its pixels; the checks of `read_image`.

    Example:
        >>> read_header("cells.tif").shape  # doctest: +SKIP
        (512, 512)
    """
    path = _existing_file(path)
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, axes, dtype = tuple(series.shape), series.axes, series.dtype
        else:
            import imageio.v3 as iio

            props = iio.improps(path)
            shape, dtype = tuple(props.shape), props.dtype
            axes = _array_axes(len(shape), shape[-1] if shape else 0, props.is_batch)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a user-facing file problem
        raise _unreadable(path, exc) from None
    return ImageHeader(_layout(path, shape, axes, pages)[0], np.dtype(dtype))


def read_image(path: str | os.PathLike, *, pages: bool = False) -> np.ndarray:
    """Read a 2D image (H, W) or (H, W, C) from PNG/TIFF/JPEG.

    Raises InputError naming the file for an empty or damaged file and for a multi-page TIFF;
    `pages=True` returns a stack (N, H, W) as it is (e.g. the probability maps `unetkit predict` writes).

    Example:
        >>> img = read_image("cells.tif")  # doctest: +SKIP
    """
    path = _existing_file(path)
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, planar = _layout(path, tuple(series.shape), series.axes, pages)
                array = series.asarray()
        else:
            import imageio.v3 as iio

            array = np.asarray(iio.imread(path))
            axes = _array_axes(array.ndim, array.shape[-1] if array.ndim else 0, False)
            shape, planar = _layout(path, tuple(array.shape), axes, pages)
    except (InputError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a user-facing file problem
        raise _unreadable(path, exc) from None
    array = np.asarray(array)
    if planar:
        array = np.moveaxis(array, 0, -1)
    return array.reshape(shape)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside `folder`, sorted by name; hidden files (``.name``, macOS ``._name``) are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; give a folder of PNG or TIFF images")
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _create_temp(path: Path) -> Path:
    """A new empty file ``.NAME.XXXXXXXX.SUFFIX`` beside `path`, with mode 0666 less the umask."""
    for _ in range(100):
        token = "".join(secrets.choice(_TEMP_ALPHABET) for _ in range(8))
        tmp = path.parent / f".{path.name}.{token}{path.suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{path.parent}: cannot create a temporary file for {path.name}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: str | os.PathLike, *, older_than: float = 0.0) -> list[Path]:
    """Delete the temporary files (``.NAME.XXXXXXXX.SUFFIX``) that interrupted writes left in `folder`.

    A killed process (kill -9) cannot remove them. Only files at least `older_than` seconds old
    are deleted, so a write another process has in progress survives. Returns the deleted paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now, removed = time.time(), []
    for path in folder.iterdir():
        match = _TEMP_NAME.match(path.name)
        if match is None or (match.group("suffix") or "") != Path(match.group("name")).suffix:
            continue
        try:
            if not path.is_file() or now - path.stat().st_mtime < older_than:
                continue
            path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def check_writable_folder(folder: str | os.PathLike, option: str = "--out") -> Path:
    """Raise InputError unless `folder` is a folder this process can write into, or can be created as one."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is a file, not a folder; give a folder for {option}")
    base = folder.absolute()
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise InputError(f"{folder}: cannot create this folder because {base} is a file; choose another {option}")
    if not os.access(base, os.W_OK | os.X_OK):
        where = "" if base == folder.absolute() else f" (inside {base})"
        raise InputError(f"{folder}: cannot write here{where}: permission denied; choose another {option} or fix the permissions")
    return folder


def check_writable_file(path: str | os.PathLike, option: str, *, force: bool = False) -> Path:
    """Raise unless `path` can be written: not a folder, new unless `force`, in a writable folder."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name for {option} (e.g. {path / 'scores.json'})")
    if path.exists() and not force:
        raise FileExistsError(f"{path}: already exists; use --force to overwrite it")
    check_writable_folder(path.parent, option)
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, force: bool = False) -> Path:
    """Call `write(tmp_path)` and rename the result to `path`.

    The file is flushed to disk (fsync) before the rename. Raises `FileExistsError` if `path`
    exists and `force` is False, InputError if `path` is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name")
    if path.exists() and not force:
        raise FileExistsError(f"{path}: already exists; use --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_temp(path)
    try:
        write(tmp_path)
        _fsync(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    _fsync_folder(path.parent)
    return path


def write_tiff(path: str | os.PathLike, array: np.ndarray, *, force: bool = False) -> Path:
    """Write `array` as a (zlib-compressed) TIFF, atomically."""
    import tifffile

    return atomic_write(path, lambda p: tifffile.imwrite(p, np.asarray(array), compression="zlib"), force=force)


def write_png(path: str | os.PathLike, array: np.ndarray, *, force: bool = False) -> Path:
    """Write a uint8/uint16 image as PNG, atomically."""
    import imageio.v3 as iio

    return atomic_write(path, lambda p: iio.imwrite(p, np.asarray(array), extension=".png"), force=force)


def check_output_dir(folder: str | os.PathLike, *, force: bool = False, option: str = "--out") -> Path:
    """Raise unless `folder` can become an output folder: writable, and new or empty unless `force`."""
    folder = check_writable_folder(folder, option)
    if folder.is_dir() and not force and any(folder.iterdir()):
        raise InputError(f"{folder}: folder is not empty; choose an empty {option} or add --force")
    return folder


def prepare_output_dir(folder: str | os.PathLike, *, force: bool = False) -> Path:
    """Create `folder`, refusing a non-empty one unless `force` (files in it may then be replaced)."""
    folder = check_output_dir(folder, force=force)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
