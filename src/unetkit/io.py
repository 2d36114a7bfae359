"""Reading and writing images, safely.

Readers accept PNG, TIFF (LZW-compressed too) and anything imageio reads. A file must hold one 2D
image: a multi-page TIFF (z-stack, time series) is refused with its page count, never read as
channels; a planar RGB TIFF (S, H, W) is returned as (H, W, S) like every colour image.

Pages written one by one (several TIFF series) count as pages too. Complex pixels, and damaged
pixel data behind a readable header, are refused naming the file; PNGs larger than Pillow's
decompression-bomb limit are read (the limit guards untrusted web uploads, not microscope images).

Writers are atomic: they write to a temporary file ``.NAME.unetkit-tmp.HOST.PID.XXXXXXXX.SUFFIX`` in
the destination folder, flush it to disk and rename it, so an interrupted write never leaves a
half-written file; new files get the usual permissions (0666 less the umask), and existing files
are not replaced unless `force=True`. A full disk, a file too large or a read-only file system is
one line naming the file. `remove_stale_temp_files` deletes what a killed process left behind.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Iterable, Iterator, Sequence

import numpy as np

from .errors import InputError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
_TIFF_SUFFIXES = (".tif", ".tiff")
_TEMP_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_"
_TEMP_MARK = "unetkit-tmp"
_TEMP_NAME = re.compile(
    rf"^\.(?P<name>.+)\.{_TEMP_MARK}\.(?P<host>[A-Za-z0-9-]*)\.(?P<pid>\d+)\.[a-z0-9_]{{8}}(?P<suffix>\.[^.]+)?$"
)
#: Write errors the user can fix, and how: errno -> (what it means, the fix).
_WRITE_ERRORS = {
    code: meaning
    for code, meaning in (
        (errno.ENOSPC, ("the disk is full", "free space on it or write somewhere else")),
        (getattr(errno, "EDQUOT", None), ("the disk quota is used up", "free space in your quota or write somewhere else")),
        (errno.EFBIG, ("the file is too large for this file system", "write to a file system that allows large files (not FAT32)")),
        (errno.EROFS, ("the file system is read-only", "write to a writable folder")),
    )
    if code is not None
}
#: tifffile log messages about metadata it could not parse; the pixels are read all the same.
_HARMLESS_TIFFFILE = (
    "coercing invalid ASCII",
    "series metadata invalid or corrupted",
    "series shape does not match",
    "series metadata does not match",
    "metadata> raised",
    "<get_resolution> raised",
    "GDAL_NODATA",
    "GeoKeyDirectoryTag",
    "_tags> raised",
)
_PILLOW_LOCK = threading.Lock()


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
    planes: int = 1  # pages of a z-stack or time series (read with pages=True); 1 for a 2D image


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


def _damaged_pixels(path: Path, exc: Exception) -> InputError:
    return InputError(
        f"{path}: the header is readable but the pixel data is damaged or incomplete ({type(exc).__name__}: "
        f"{str(exc)[:80]}); copy or export the file again, or remove it"
    )


class _HarmlessTifffileMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in _HARMLESS_TIFFFILE)


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """Drop tifffile's log lines about metadata it could not parse while we read (the pixels are fine)."""
    logger, quiet = logging.getLogger("tifffile"), _HarmlessTifffileMessages()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


@contextlib.contextmanager
def _no_pixel_limit(path: Path) -> Iterator[None]:
    """Lift Pillow's decompression-bomb limit for this read only (a 14000 x 14000 scan is no bomb)."""
    if path.suffix.lower() in _TIFF_SUFFIXES:
        yield
        return
    from PIL import Image

    with _PILLOW_LOCK:  # the limit is a module global: restore it before another thread reads
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _check_real(path: Path, dtype: np.dtype) -> None:
    if np.dtype(dtype).kind == "c":
        raise InputError(
            f"{path}: complex-valued pixels ({np.dtype(dtype)}); unetkit reads real intensities: save the magnitude "
            "(abs) or the real part as its own image"
        )


def _tiff_series(path: Path, tif, pages: bool) -> tuple[tuple[int, ...], str, np.dtype, list]:
    """(shape, tifffile axes, dtype, series to read) of a TIFF; pages written one by one (one series
    each) are one more axis, stacked with `pages`, else refused by `_layout`."""
    series = [s for s in tif.series if not getattr(s.keyframe, "is_reduced", False)]  # thumbnails are no pages
    series = series or list(tif.series[:1])
    first = series[0]
    shape, axes, dtype = tuple(first.shape), first.axes, first.dtype
    if len(series) == 1:
        return shape, axes, dtype, series
    alike = all(tuple(s.shape) == shape and s.dtype == dtype and s.axes == axes for s in series)
    if alike:
        return (len(series), *shape), "I" + axes, dtype, series
    planes = sum(int(np.prod([n for a, n in zip(s.axes, s.shape) if a not in "YXS"] or [1])) for s in series)
    raise InputError(
        f"{path}: has {planes} pages of different shapes or types ({', '.join(str(tuple(s.shape)) for s in series[:3])}"
        f"{' ...' if len(series) > 3 else ''}); unetkit segments 2D images: save each plane as its own file"
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
            "image; pages are never used as colour channels. unetkit segments 2D images: save each plane as its own file"
        )
    shape = tuple(n for a, n in zip(axes, shape) if a in "YXS" or n > 1)
    if len(shape) not in ((2, 3, 4) if pages and stacked else (2, 3)):
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
        with _quiet_tifffile(), _no_pixel_limit(path):
            if path.suffix.lower() in _TIFF_SUFFIXES:
                import tifffile

                with tifffile.TiffFile(path) as tif:
                    shape, axes, dtype, _ = _tiff_series(path, tif, pages)
            else:
                import imageio.v3 as iio

                props = iio.improps(path)
                shape, dtype = tuple(props.shape), props.dtype
                axes = _array_axes(len(shape), shape[-1] if shape else 0, props.is_batch)
    except (InputError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a user-facing file problem
        raise _unreadable(path, exc) from None
    _check_real(path, np.dtype(dtype))
    layout = _layout(path, shape, axes, pages)[0]
    planes = int(np.prod([n for a, n in zip(axes, shape) if a not in "YXS"] or [1]))
    return ImageHeader(layout, np.dtype(dtype), planes)


def read_image(path: str | os.PathLike, *, pages: bool = False) -> np.ndarray:
    """Read a 2D image (H, W) or (H, W, C) from PNG/TIFF/JPEG.

    Raises InputError naming the file for an empty or damaged file (header or pixel data), complex
    pixels and a multi-page TIFF (one series of pages, or pages written one by one); `pages=True`
    returns a stack (N, H, W) as it is (e.g. the probability maps `unetkit predict` writes).

    Example:
        >>> img = read_image("cells.tif")  # doctest: +SKIP
    """
    path = _existing_file(path)
    stage = "header"
    try:
        with _quiet_tifffile(), _no_pixel_limit(path):
            if path.suffix.lower() in _TIFF_SUFFIXES:
                import tifffile

                with tifffile.TiffFile(path) as tif:
                    shape, axes, dtype, series = _tiff_series(path, tif, pages)
                    _check_real(path, np.dtype(dtype))
                    shape, planar = _layout(path, shape, axes, pages)
                    stage = "pixels"
                    arrays = [s.asarray() for s in series]
                    array = arrays[0] if len(arrays) == 1 else np.stack(arrays)
            else:
                import imageio.v3 as iio

                array = np.asarray(iio.imread(path))
                _check_real(path, array.dtype)
                axes = _array_axes(array.ndim, array.shape[-1] if array.ndim else 0, False)
                shape, planar = _layout(path, tuple(array.shape), axes, pages)
    except (InputError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a user-facing file problem
        raise (_damaged_pixels(path, exc) if stage == "pixels" else _unreadable(path, exc)) from None
    array = np.asarray(array)
    if planar:
        array = np.moveaxis(array, 0, -1)
    return array.reshape(shape)


def list_images(folder: str | os.PathLike, *, broken_links: list[Path] | None = None) -> list[Path]:
    """Image files directly inside `folder`, sorted by name; hidden files (``.name``, macOS ``._name``) are skipped.

    A link with an image name whose target is gone raises InputError naming it, or, when a list is
    given as `broken_links`, is appended there (for callers that skip unreadable inputs with a note).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; give a folder of PNG or TIFF images")
    files, broken = [], []
    for p in folder.iterdir():
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if p.is_file():
            files.append(p)
        elif p.is_symlink() and not p.exists():
            broken.append(p)
    broken.sort()
    if broken and broken_links is None:
        raise InputError(
            f"{broken[0]}: a link to {os.readlink(broken[0])}, which does not exist"
            f"{f' ({len(broken) - 1} more broken links)' if len(broken) > 1 else ''}; restore the file or remove the link"
        )
    if broken_links is not None:
        broken_links.extend(broken)
    return sorted(files)


def _host() -> str:
    """This machine's name as it appears in temporary file names (letters, digits and dashes)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:24]


def _create_temp(path: Path) -> Path:
    """A new empty file ``.NAME.unetkit-tmp.HOST.PID.XXXXXXXX.SUFFIX`` beside `path`, mode 0666 less the umask."""
    for _ in range(100):
        token = "".join(secrets.choice(_TEMP_ALPHABET) for _ in range(8))
        tmp = path.parent / f".{path.name}.{_TEMP_MARK}.{_host()}.{os.getpid()}.{token}{path.suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{path.parent}: cannot create a temporary file for {path.name}")


def process_running(pid: int) -> bool:
    """Whether process `pid` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or a check this platform cannot make: assume it runs
    return True


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
    """Delete the temporary files (``.NAME.unetkit-tmp.HOST.PID.XXXXXXXX.SUFFIX``) interrupted writes left in `folder`.

    A killed process (kill -9) cannot remove them. A file is deleted when the process that wrote it
    (its HOST and PID) is no longer running, or when it is at least `older_than` seconds old (a
    process of another machine, or a reused PID), so a write another process has in progress
    survives. No other file is touched. Returns the deleted paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now, host, removed = time.time(), _host(), []
    for path in folder.iterdir():
        match = _TEMP_NAME.match(path.name)
        if match is None or (match.group("suffix") or "") != Path(match.group("name")).suffix:
            continue
        try:
            if not path.is_file() or path.is_symlink():
                continue
            dead = match.group("host") == host and not process_running(int(match.group("pid")))
            if not dead and now - path.stat().st_mtime < older_than:
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


def _write_failed(path: Path, exc: OSError) -> InputError | None:
    """One line for a write error the user can fix (disk full, file too large, read-only), else None."""
    if exc.errno not in _WRITE_ERRORS:
        return None
    meaning, fix = _WRITE_ERRORS[exc.errno]
    return InputError(f"{path}: cannot write it: {meaning} ([Errno {exc.errno}] {os.strerror(exc.errno)}); {fix}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, force: bool = False) -> Path:
    """Call `write(tmp_path)` and rename the result to `path`.

    The file is flushed to disk (fsync) before the rename; the temporary file is removed if
    anything fails. Raises `FileExistsError` if `path` exists and `force` is False, InputError if
    `path` is a folder, or if the disk is full, the file too large or the file system read-only.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name")
    if path.exists() and not force:
        raise FileExistsError(f"{path}: already exists; use --force to overwrite it")
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _create_temp(path)
        write(tmp_path)
        _fsync(tmp_path)
        os.replace(tmp_path, path)
    except OSError as exc:
        failed = _write_failed(path, exc)
        if failed is None:
            raise
        raise failed from None
    finally:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
    _fsync_folder(path.parent)
    return path


def write_tiff(path: str | os.PathLike, array: np.ndarray, *, force: bool = False, planes: bool = False) -> Path:
    """Write `array` as a (zlib-compressed) TIFF, atomically; with `planes`, as a stack of
    one-channel pages (so a 3- or 4-plane stack is never read back as one colour image)."""
    import tifffile

    extra = {"photometric": "minisblack"} if planes else {}
    return atomic_write(path, lambda p: tifffile.imwrite(p, np.asarray(array), compression="zlib", **extra), force=force)


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


def output_name(path: str | os.PathLike) -> str:
    """slide.ome.zarr -> slide; cells.tif -> cells."""
    path = Path(path)
    name = path.name
    for suffix in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
