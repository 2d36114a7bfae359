"""Images larger than memory: lazy zarr / OME-Zarr / BigTIFF input, resumable zarr output.

`open_lazy` reads `.zarr` / `.ome.zarr` (OME-NGFF 0.4 and 0.5, level 0) and TIFF (tifffile's
zarr view, level 0) one window at a time; the reader reopens its file in each process, so it can
travel to Dask workers. `predict_to_zarr` writes probabilities tile by tile (or block by block on a
Dask cluster) into ``NAME.zarr.partial`` and records each finished tile atomically in a progress
file, so a killed run continues where it stopped; the folder is renamed to ``NAME.zarr`` at the end.
A stack of planes (a z or t axis, `open_lazy(path, in_channels=C)`) is read one plane at a time
(`LazyImage.at`) and `predict_stack_to_zarr` writes its (Z, n_classes, H, W) probabilities plane by
plane, keeping finished planes and tiles when a run is resumed.

Example:
    >>> image = open_lazy("slide.ome.zarr")  # doctest: +SKIP
    >>> image.shape, image[..., :2, :3].shape  # doctest: +SKIP
    ((1, 40000, 60000), (1, 2, 3))
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from tqdm.auto import tqdm

from .data.normalize import Normalization
from .errors import InputError
from .io import _tiff_series, atomic_write

if TYPE_CHECKING:
    from .adapt import BatchNormStatistics

PROGRESS_FILE = "unetkit-progress.json"


def is_zarr_path(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.suffix.lower() == ".zarr" or (p.is_dir() and ((p / "zarr.json").exists() or (p / ".zarray").exists() or (p / ".zgroup").exists()))


def _level0(path: Path) -> tuple[str, list[str] | None]:
    """(array path inside the store, axis names or None) of an OME-Zarr's level 0 or a plain array."""
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - any unreadable store
        raise InputError(f"{path}: not a readable zarr store ({type(exc).__name__}: {exc})") from None
    if isinstance(node, zarr.Array):
        return "", None
    attrs = dict(node.attrs)
    multiscales = attrs.get("ome", {}).get("multiscales") or attrs.get("multiscales")  # NGFF 0.5 / 0.4
    if multiscales:
        try:
            level = str(multiscales[0]["datasets"][0]["path"])
            axes = multiscales[0].get("axes")
            names = [str(a["name"] if isinstance(a, dict) else a) for a in axes] if axes else None
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise InputError(
                f"{path}: malformed OME-Zarr multiscales metadata ({type(exc).__name__}: {exc}); each multiscale needs "
                "'datasets' with a 'path' and 'axes' with a 'name' each: write the image again"
            ) from None
    else:
        level, names = "0", None
    try:
        array = node[level]
    except KeyError:
        array = None
    if not isinstance(array, zarr.Array):
        raise InputError(
            f"{path}: no image array at level 0 (neither a zarr array nor an OME-Zarr group with multiscales "
            "metadata and a '0' array); give the array's own path or an OME-Zarr image"
        )
    return level, names


class _Reopens:
    """Opens its file on first read; pickles without the open file (each Dask worker reopens it)."""

    def __post_init__(self) -> None:
        self._array = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_array"] = None
        return state


@dataclass
class LazyImage(_Reopens):
    """A (C, H, W) view of an image file read window by window, optionally normalised (float32).

    `rows` limits it to the top rows. Picklable: the open file is not part of its state. For a
    stack, `stack_axis` names the axis of its planes (e.g. "z") and `plane` the one this view reads.
    """

    path: str
    kind: str  # "zarr" or "tiff"
    component: str
    layout: str  # axes of the stored array, e.g. "yx", "cyx", "yxc", "tczyx"
    stored_shape: tuple[int, ...]
    dtype: np.dtype
    rows: int | None = None
    scale: float | None = None
    offset: float = 0.0
    stack_axis: str | None = None
    plane: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        sizes = dict(zip(self.layout, self.stored_shape))
        height = sizes["y"] if self.rows is None else min(self.rows, sizes["y"])
        return int(sizes.get("c", 1)), int(height), int(sizes["x"])

    @property
    def ndim(self) -> int:
        return 3

    @property
    def pixels(self) -> int:
        return self.shape[1] * self.shape[2]

    @property
    def planes(self) -> int:
        """Number of planes along `stack_axis` (1 for a single image)."""
        return int(dict(zip(self.layout, self.stored_shape))[self.stack_axis]) if self.stack_axis else 1

    def at(self, plane: int) -> "LazyImage":
        """The view of one plane of a stack (not normalised).

        Example:
            >>> stack = LazyImage("s.zarr", "zarr", "", "zyx", (4, 30, 40), np.dtype("uint8"), stack_axis="z")
            >>> stack.planes, stack.at(3).plane, stack.at(3).shape
            (4, 3, (1, 30, 40))
        """
        if not 0 <= plane < self.planes:
            raise IndexError(f"plane {plane} of {self.planes}")
        return replace(self, plane=int(plane), scale=None, offset=0.0)

    def normalized(self, scale: float, offset: float) -> "LazyImage":
        return replace(self, scale=float(scale), offset=float(offset))

    def limited(self, rows: int | None) -> "LazyImage":
        return replace(self, rows=rows)

    def _open(self):
        if self._array is None:
            import zarr

            try:
                if self.kind == "zarr":
                    node = zarr.open(self.path, mode="r")
                    self._array = node[self.component] if self.component else node
                else:
                    import tifffile

                    node = zarr.open(tifffile.imread(self.path, aszarr=True), mode="r")
                    self._array = node if isinstance(node, zarr.Array) else node["0"]
            except Exception as exc:  # noqa: BLE001 - e.g. moved or deleted since it was opened on another machine
                raise InputError(f"{self.path}: cannot open it ({type(exc).__name__}: {str(exc)[:120]}); check that it "
                                 "exists and is readable here") from None
        return self._array

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if key[0] is Ellipsis:
            key = (slice(None),) * (4 - len(key)) + key[1:]
        cs, ys, xs = (tuple(key) + (slice(None),) * 3)[:3]
        _, height, width = self.shape
        ys = slice(*ys.indices(height))
        index = []
        for axis in self.layout:
            index.append({"c": cs, "y": ys, "x": xs}.get(axis, self.plane if axis == self.stack_axis else 0))  # others: size 1
        array = self._open()
        try:
            data = np.asarray(array[tuple(index)])
        except (InputError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged chunk fails in its codec with no word of where
            raise InputError(
                f"{self.path}: cannot read {_window(ys, xs, width)} ({type(exc).__name__}: {str(exc)[:100]}); a chunk "
                "there is damaged: write the image again (or copy it again)"
            ) from None
        if data.dtype.kind in "fc" and not np.isfinite(data).all():
            raise InputError(f"{self.path}: NaN or infinite values in {_window(ys, xs, width)}; replace them before predicting")
        kept = [a for a in self.layout if a in "cyx"]
        if "c" not in kept:
            data, kept = data[None], ["c", *kept]
        data = np.transpose(data, [kept.index(a) for a in "cyx"])
        if self.scale is None:
            return data
        return data.astype(np.float32) * np.float32(self.scale) + np.float32(self.offset)

    def chunk_shape(self) -> tuple[int, int]:
        """(rows, columns) of one stored chunk (a TIFF's tile or strip)."""
        chunks = dict(zip(self.layout, self._open().chunks))
        return int(chunks["y"]), int(chunks["x"])

    def to_dask(self, chunk: int = 2048):
        """This image as a Dask array (C, H, W) with `chunk`-pixel chunks; each task opens the file."""
        import dask.array as da

        dtype = np.float32 if self.scale is not None else self.dtype
        return da.from_array(self, chunks=(-1, chunk, chunk), asarray=False, lock=False,
                             meta=np.empty((0, 0, 0), dtype=dtype), name=f"unetkit-image-{abs(hash(str(self))):x}")


def _window(ys: slice, xs, width: int) -> str:
    """Rows and columns of a window, for messages."""
    x0, x1, _ = (xs if isinstance(xs, slice) else slice(xs, xs + 1)).indices(width)
    return f"rows {ys.start}..{ys.stop - 1}, columns {x0}..{x1 - 1}"


#: Stores with more chunks than this are not listed at open time (the listing would cost a read).
MAX_LISTED_CHUNKS = 1_000_000


def _missing_chunk(path: Path, component: str, array, names: list[str]) -> str | None:
    """Where `array` (in a folder store) lacks a stored chunk, e.g. "chunk c/0/1 (rows 0..63, columns 64..127)
    and 2 more"; None when every chunk is stored or the store is not a folder one can list cheaply."""
    folder = path / component if component else path
    grid_chunks = getattr(array, "shards", None) or array.chunks  # what is stored: shards, else chunks
    grid = [-(-int(n) // int(c)) for n, c in zip(array.shape, grid_chunks)]
    if not folder.is_dir() or int(np.prod(grid)) > MAX_LISTED_CHUNKS:
        return None
    stored = set()
    for root, _, files in os.walk(folder):
        inside = Path(root).relative_to(folder).as_posix()
        stored.update(f if inside == "." else f"{inside}/{f}" for f in files)
    missing = [c for c in np.ndindex(*grid) if array.metadata.encode_chunk_key(c) not in stored]
    if not missing:
        return None
    first = dict(zip(names, zip(missing[0], grid_chunks)))
    (iy, ch), (ix, cw) = first["y"], first["x"]
    where = f"rows {iy * ch}..{min((iy + 1) * ch, array.shape[names.index('y')]) - 1}, columns {ix * cw}.." \
            f"{min((ix + 1) * cw, array.shape[names.index('x')]) - 1}"
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    return f"chunk {array.metadata.encode_chunk_key(missing[0])} ({where}){more}"


#: Axis names of OME-Zarr images (NGFF): time, channel, z and the two image axes.
ZARR_AXES = ("t", "c", "z", "y", "x")


def open_lazy(path: str | os.PathLike, *, allow_missing_chunks: bool = False, in_channels: int | None = None) -> LazyImage:
    """Open a zarr / OME-Zarr (level 0) or TIFF image for window-by-window reading.

    With `in_channels` (a 2D model's channel count) a stack is accepted too: one axis other than
    c, y and x (z or t in OME-Zarr) with several entries becomes `LazyImage.stack_axis`, read plane
    by plane. An array without axis names is then read as (z, y, x) when it has 3 dimensions, the
    model one channel and the array more than one plane (else (c, y, x) as without `in_channels`),
    and as (z, c, y, x) when it has 4 and its second axis has `in_channels` entries.

    Zarr reads a chunk missing from the store as the fill value, without a word. In a folder store
    of zarr format 2 (whose writers store every chunk) missing chunks are refused here, naming the
    first; `allow_missing_chunks` accepts them. Format 3 stores are not checked: zarr 3 leaves out
    chunks that hold only the fill value, so there a missing chunk is an empty one.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if is_zarr_path(path):
        import zarr

        component, names = _level0(path)
        array = zarr.open(str(path), mode="r")
        array = array[component] if component else array
        shape = tuple(int(s) for s in array.shape)
        kind = "zarr"
        if names is not None:
            unknown = [n for n in names if str(n).lower() not in ZARR_AXES]
            if unknown or len(names) != len(shape):
                what = f"unknown axis name {unknown[0]!r}" if unknown else f"{len(names)} axis names for {len(shape)} axes"
                raise InputError(
                    f"{path}: {what} in its axes {list(names)}; OME-Zarr image axes are named t, c, z, y and x: "
                    "correct the 'axes' of the store's multiscales metadata"
                )
    else:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                shape, axes, dtype, _ = _tiff_series(path, tif, True)  # pages written one by one count as pages
                shape, names = tuple(int(s) for s in shape), list(axes.lower())
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
        names = ["c" if a == "s" else a for a in names]
        component, kind = "", "tiff"
    if names is None:
        names = {2: ["y", "x"], 3: ["c", "y", "x"]}.get(len(shape))
        if in_channels is not None and len(shape) == 3 and in_channels == 1 and shape[0] > 1:
            names = ["z", "y", "x"]
        elif in_channels is not None and len(shape) == 4:
            if shape[1] != in_channels:
                raise InputError(f"{path}: a 4D array {shape} without axis names is read as (z, c, y, x), but its {shape[1]} "
                                 f"channel(s) do not match the model's {in_channels}; store it as (z, y, x) planes or as "
                                 "OME-Zarr with axes metadata")
            names = ["z", "c", "y", "x"]
        if names is None:
            expected = "(y, x) or (c, y, x)" if in_channels is None else "(y, x), (c, y, x), (z, y, x) or (z, c, y, x)"
            raise InputError(f"{path}: a {len(shape)}D array without axis names; expected {expected}")
    names = [n.lower() for n in names]
    stack_axis = None
    for axis, size in zip(names, shape):
        if axis not in "cyx" and size != 1:
            if in_channels is None:
                raise InputError(f"{path}: axis {axis!r} has {size} entries; only 2D images (one t and z) are supported")
            if stack_axis is not None:
                raise InputError(f"{path}: axes {stack_axis!r} and {axis!r} both have several entries; a 2D model segments "
                                 "one stack axis plane by plane: store each time point (or z-stack) as its own image")
            stack_axis = axis
    if "y" not in names or "x" not in names:
        raise InputError(f"{path}: axes {''.join(names)} have no y and x")
    if kind == "zarr":
        dtype = array.dtype
        # Zarr 3 leaves out chunks that hold only the fill value, so only format 2 (whose writers
        # store every chunk) tells a lost chunk from an empty one.
        check = array.metadata.zarr_format == 2 and not allow_missing_chunks
        missing = _missing_chunk(path, component, array, names) if check else None
        if missing:
            raise InputError(
                f"{path}: {missing} missing from the store; zarr would read them as the fill value {array.fill_value} "
                "without a word. Write the image again (if those regions are truly empty, store their chunks too: "
                "zarr's write_empty_chunks=True)"
            )
    return LazyImage(str(path), kind, component, "".join(names), shape, np.dtype(dtype), stack_axis=stack_axis)


@dataclass
class LazyVolume(_Reopens):
    """A (Z, Y, X) zarr / OME-Zarr volume (level 0; leading axes of size 1 dropped) read window by
    window for a 3D model, optionally normalised (float32). Picklable, like `LazyImage`.

    Example:
        >>> volume = open_volume("stack.ome.zarr")  # doctest: +SKIP
        >>> volume.shape, volume[..., :2, :3, :4].shape  # doctest: +SKIP
        ((60, 2048, 2048), (2, 3, 4))
    """

    path: str
    component: str
    stored_shape: tuple[int, ...]
    dtype: np.dtype
    scale: float | None = None
    offset: float = 0.0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.stored_shape[-3:])  # type: ignore[return-value]

    @property
    def ndim(self) -> int:
        return 3

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape))

    def normalized(self, scale: float, offset: float) -> "LazyVolume":
        return replace(self, scale=float(scale), offset=float(offset))

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if key and key[0] is Ellipsis:
            key = key[1:]
        key = (tuple(key) + (slice(None),) * 3)[:3]
        if self._array is None:
            import zarr

            node = zarr.open(self.path, mode="r")
            self._array = node[self.component] if self.component else node
        try:
            data = np.asarray(self._array[(0,) * (len(self.stored_shape) - 3) + key])
        except Exception as exc:  # noqa: BLE001 - a damaged chunk fails in its codec with no word of where
            raise InputError(f"{self.path}: cannot read voxels {key} ({type(exc).__name__}: {str(exc)[:100]}); a chunk "
                             "there is damaged: write the volume again") from None
        if data.dtype.kind in "fc" and not np.isfinite(data).all():
            raise InputError(f"{self.path}: NaN or infinite values in voxels {key}; replace them before predicting")
        if self.scale is None:
            return data
        return data.astype(np.float32) * np.float32(self.scale) + np.float32(self.offset)

    def as_rows(self) -> "_VolumeRows":
        """The volume as one (1, Z*Y, X) image, as `unetkit.data.volumes.normalize_volume` normalises it."""
        return _VolumeRows(self)


class _VolumeRows:
    """A (Z, Y, X) volume seen as a (1, Z*Y, X) image, read in runs of rows (for `fit_normalization`)."""

    def __init__(self, volume: LazyVolume) -> None:
        z, y, x = volume.shape
        self.volume, self.path, self.dtype = volume, volume.path, volume.dtype
        self.shape, self.pixels = (1, z * y, x), z * y * x

    def __getitem__(self, key) -> np.ndarray:
        rows = key[-2]
        height = self.volume.shape[1]
        start, stop, _ = rows.indices(self.shape[1])
        z0, z1 = start // height, -(-stop // height)
        data = self.volume[z0:z1].reshape(-1, self.shape[2])
        return data[start - z0 * height : stop - z0 * height][None]


def open_volume(path: str | os.PathLike) -> LazyVolume:
    """A zarr / OME-Zarr volume for window-by-window reading; InputError unless it is (Z, Y, X)
    after dropping leading axes of size 1."""
    import zarr

    path = Path(path)
    component, _ = _level0(path)
    node = zarr.open(str(path), mode="r")
    array = node[component] if component else node
    shape = tuple(int(s) for s in array.shape)
    squeezed = shape
    while len(squeezed) > 3 and squeezed[0] == 1:
        squeezed = squeezed[1:]
    if len(squeezed) != 3:
        raise InputError(f"{path}: a zarr array of shape {shape}; a 3D model needs one volume (Z, Y, X) of one channel: "
                         "give a z-stack, or use a 2D model for 2D images")
    return LazyVolume(str(path), component, shape, np.dtype(array.dtype))


def _stripes(image: LazyImage, rows: int = 256):
    for y in range(0, image.shape[1], rows):
        yield image[..., y : min(y + rows, image.shape[1]), :]


def fit_normalization(norm: Normalization, image: LazyImage, progress: bool = False) -> tuple[float, float]:
    """(scale, offset) that `norm` applies to the whole image, from one streaming pass.

    Percentiles of 8- and 16-bit images come from their exact histogram (so the values equal
    normalising the image in memory); other types use all pixels of images up to 2^24 pixels and
    an even grid of 2^24 pixels of larger ones.
    """
    if norm.mode == "none":
        return 1.0, 0.0
    if norm.mode == "fixed":
        return float(norm.scale), float(norm.offset)
    if norm.per_channel and image.shape[0] > 1:
        raise InputError(f"{image.path}: the checkpoint normalises each channel on its own, which large images do not support")
    bar = tqdm(_stripes(image), total=-(-image.shape[1] // 256), disable=not progress, desc="intensity percentiles", unit="stripe")
    if image.dtype.kind in "ui" and image.dtype.itemsize <= 2:
        shift = -int(np.iinfo(image.dtype).min)
        counts = np.zeros(1 << (8 * image.dtype.itemsize), np.int64)
        for stripe in bar:
            values = stripe.ravel() if shift == 0 else stripe.astype(np.int32).ravel() + shift
            counts += np.bincount(values, minlength=counts.size)
        cumulative = np.cumsum(counts)
        n = int(cumulative[-1])

        def order_statistic(k: int) -> float:
            return float(np.searchsorted(cumulative, k, side="right") - shift)

        def percentile(q: float) -> float:
            rank = q / 100.0 * (n - 1)
            lo, hi = int(np.floor(rank)), int(np.ceil(rank))
            a, b = order_statistic(lo), order_statistic(hi)
            return a + (b - a) * (rank - lo)

        lo, hi = percentile(norm.low), percentile(norm.high)
        if not hi > lo:
            values = np.flatnonzero(counts) - shift
            lo, hi = float(values.min()), float(values.max())
    else:
        step = max(1, int(np.ceil(np.sqrt(image.pixels / 2**24))))
        sample = np.concatenate([s[..., ::step, ::step].ravel() for s in bar]).astype(np.float32)
        lo, hi = norm._limits(sample)
    if not hi > lo:
        hi = lo + 1.0
    scale = 1.0 / (hi - lo)
    return float(np.float32(scale)), float(-lo * scale)


class Progress:
    """Finished tile (or plane) indices of one output, saved atomically (temp file + rename) after
    each batch; `matched`: whether a saved file had the same key."""

    def __init__(self, folder: Path, key: dict[str, Any], name: str = PROGRESS_FILE) -> None:
        self.path, self.key = folder / name, key
        self.done: set[int] = set()
        self.matched = False
        if self.path.exists():
            with open(self.path) as f:
                saved = json.load(f)
            if saved.get("key") == key:
                self.done, self.matched = set(saved["done"]), True

    def add(self, indices) -> None:
        self.done.update(int(i) for i in indices)
        payload = json.dumps({"key": self.key, "done": sorted(self.done)})
        atomic_write(self.path, lambda tmp: tmp.write_text(payload), force=True)


def _stamp(path) -> list:
    """Size and modification time of a file (a retrained checkpoint at the same path starts over)."""
    try:
        info = os.stat(path)
    except OSError:
        return []
    return [info.st_size, info.st_mtime_ns]


def _store_block(block: np.ndarray, array, y: int, x: int) -> None:
    array[:, y : y + block.shape[1], x : x + block.shape[2]] = block


class _Cast:
    """Writes into a zarr array, casting each tile to its dtype."""

    def __init__(self, array) -> None:
        self.array, self.shape = array, array.shape

    def __setitem__(self, key, value) -> None:
        self.array[key] = np.asarray(value).astype(self.array.dtype, copy=False)


class Plane:
    """Plane `index` of a (Z, ...) array, read and written like an array of its own (picklable).

    Example:
        >>> stack = np.zeros((3, 2, 4), np.uint8)
        >>> plane = Plane(stack, 1)
        >>> plane[:, 1:3] = 7
        >>> plane.shape, stack[1].tolist()
        ((2, 4), [[0, 7, 7, 0], [0, 7, 7, 0]])
    """

    def __init__(self, array, index: int) -> None:
        self.array, self.index = array, int(index)
        self.shape, self.dtype = tuple(int(s) for s in array.shape[1:]), array.dtype

    def _key(self, key) -> tuple:
        return (self.index, *(key if isinstance(key, tuple) else (key,)))

    def __getitem__(self, key):
        return self.array[self._key(key)]

    def __setitem__(self, key, value) -> None:
        self.array[self._key(key)] = value


def _run_tiles(checkpoint, model, image: LazyImage, array, plan, done: Progress, *, tile_shape, batch_size, tta, dtype,
               backend, client, block_size, progress, norm_statistics, precision, calibration) -> None:
    """Predict the tiles of `plan` not in `done` into `array` (n_classes, H, W), here or on `client`."""
    from .distributed import DEFAULT_BLOCK_SIZE, block_tasks
    from .predict import predict

    if client is None:
        todo = [i for i in range(len(plan)) if i not in done.done]
        predict(model, image, tile_size=tile_shape, batch_size=batch_size, tta=tta, out=_Cast(array), tiles=todo,
                on_batch=done.add, progress=progress, backend=backend, precision=precision, calibration=calibration,
                norm_statistics="training" if norm_statistics is None else norm_statistics)
        return
    import dask
    from distributed import as_completed

    tasks = block_tasks(checkpoint, image.to_dask(), tile_size=tile_shape, block_size=block_size or DEFAULT_BLOCK_SIZE,
                        batch_size=batch_size, tta=tta, dtype=dtype, norm_statistics=norm_statistics, backend=backend,
                        precision=precision, calibration=calibration)
    store = dask.delayed(_store_block, pure=True)
    pending = {}
    for task_row, block_row in zip(tasks.tasks, tasks.blocks):
        for task, block in zip(task_row, block_row):
            if not set(block.tiles) <= done.done:
                pending[block.tiles] = store(task, array, block.out_y, block.out_x)
    futures = {client.compute(v): tiles for tiles, v in pending.items()}
    with tqdm(total=len(futures), disable=not progress, desc="blocks", unit="block") as bar:
        for future in as_completed(list(futures)):
            future.result()
            done.add(futures[future])
            bar.update(1)


def predict_to_zarr(
    checkpoint: str | os.PathLike,
    model,
    image: LazyImage,
    out: Path,
    *,
    tile_shape: tuple[int, int],
    batch_size: int = 1,
    tta: bool = False,
    dtype: str = "float32",
    backend: str = "auto",
    client=None,
    block_size: int | None = None,
    attributes: dict[str, Any] | None = None,
    progress: bool = False,
    echo: Callable[[str], None] = lambda message: None,
    norm_statistics: BatchNormStatistics | None = None,
    precision: str = "fp32",
    calibration=None,
) -> Path:
    """Write the probabilities of a normalised `image` to the zarr array `out`, resuming a killed run.

    Chunks are (n_classes, stride_h, stride_w) of the tile plan: each chunk is written by one
    tile only. Works in ``out.partial`` and renames it to `out` when every tile is done.
    `norm_statistics`: batch-norm statistics for every tile and block (None: the model's own);
    for the image's own, ``unetkit.adapt.gather_statistics(model, image, tile_shape)`` reads it
    window by window. A run resumes only with the same statistics. `precision` ("fp32", "bf16" or
    "int8") and `calibration` are `unetkit.predict`'s; a run resumes only in the same precision.
    """
    from .tiling import plan_tiles

    plan = plan_tiles(image.shape[1:], model.geometry, tile_shape)
    partial = out.with_name(out.name + ".partial")
    key = {
        "image": str(Path(image.path).resolve()), "shape": list(image.shape), "tile_shape": list(tile_shape),
        "checkpoint": [str(checkpoint), *_stamp(checkpoint)], "n_classes": model.n_classes, "tta": bool(tta), "dtype": dtype,
        "normalization": [image.scale, image.offset],
    }
    if norm_statistics is not None:
        key["norm_statistics"] = norm_statistics.fingerprint
    if precision != "fp32":
        key["precision"] = precision
    array, done = open_partial(partial, key, shape=(model.n_classes, *image.shape[1:]),
                               chunks=(model.n_classes, *plan.stride), dtype=dtype, attributes=attributes)
    if done.done:
        echo(f"{out}: continuing a previous run ({len(done.done)} of {len(plan)} tiles were done)")
    _run_tiles(checkpoint, model, image, array, plan, done, tile_shape=tile_shape, batch_size=batch_size, tta=tta,
               dtype=dtype, backend=backend, client=client, block_size=block_size, progress=progress,
               norm_statistics=norm_statistics, precision=precision, calibration=calibration)
    return finish_partial(partial, out, missing=len(plan) - len(done.done))


def open_partial(partial: Path, key: dict[str, Any], *, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str,
                 attributes: dict[str, Any] | None):
    """The ``NAME.zarr.partial`` array of an output and its `Progress`: the one a killed run left
    with the same `key` (its finished tiles kept), else a new empty one (anything there is removed)."""
    import zarr

    done = Progress(partial, key) if (partial / PROGRESS_FILE).exists() else None
    if done is None or not done.matched:
        if partial.exists():
            shutil.rmtree(partial)
        zarr.create_array(store=str(partial), shape=shape, dtype=dtype, chunks=chunks, fill_value=0,
                          attributes=attributes or {})
        done = Progress(partial, key)
        done.add([])
    return zarr.open_array(str(partial), mode="r+"), done


def finish_partial(partial: Path, out: Path, *, missing: int) -> Path:
    """Rename a finished ``NAME.zarr.partial`` to `out` (replacing it: callers skip existing outputs
    unless forced); RuntimeError when `missing` tiles were not written."""
    if missing:
        raise RuntimeError(f"{out}: {missing} tiles were not written")
    (partial / PROGRESS_FILE).unlink()
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return out


#: Made by the caller of `predict_stack_to_zarr` for each plane still to do: (the plane normalised,
#: its batch-norm statistics or None, its precision).
PreparePlane = Callable[[int], "tuple[LazyImage, BatchNormStatistics | None, str]"]


def predict_stack_to_zarr(
    checkpoint: str | os.PathLike,
    model,
    stack: LazyImage,
    out: Path,
    *,
    prepare: PreparePlane,
    tile_shape: tuple[int, int],
    batch_size: int = 1,
    tta: bool = False,
    dtype: str = "float32",
    backend: str = "auto",
    client=None,
    block_size: int | None = None,
    attributes: dict[str, Any] | None = None,
    progress: bool = False,
    echo: Callable[[str], None] = lambda message: None,
    calibration=None,
) -> Path:
    """`predict_to_zarr` for a stack of planes (`stack.stack_axis`): writes (Z, n_classes, H, W)
    probabilities, chunked (1, n_classes, stride_h, stride_w), one plane after the other.

    `prepare(z)` gives plane z normalised, its batch-norm statistics and its precision, so each
    plane is predicted as it would be as its own image; it is called only for planes still to do.
    Finished planes are recorded in the progress file and each plane's finished tiles in a file of
    its own, so a killed run continues with the tiles left (a plane resumes only with the same
    normalisation, statistics and precision).

    Example:
        >>> prepare = lambda z: (stack.at(z).normalized(*fit_normalization(norm, stack.at(z))), None, "fp32")  # doctest: +SKIP
        >>> predict_stack_to_zarr("best.pt", net, stack, Path("s_probabilities.zarr"), prepare=prepare, tile_shape=(60, 60))  # doctest: +SKIP
    """
    from .tiling import plan_tiles

    plan = plan_tiles(stack.shape[1:], model.geometry, tile_shape)
    planes = stack.planes
    partial = out.with_name(out.name + ".partial")
    key = {
        "image": str(Path(stack.path).resolve()), "planes": planes, "stack_axis": stack.stack_axis, "shape": list(stack.shape),
        "tile_shape": list(tile_shape), "checkpoint": [str(checkpoint), *_stamp(checkpoint)], "n_classes": model.n_classes,
        "tta": bool(tta), "dtype": dtype,
    }
    array, done = open_partial(partial, key, shape=(planes, model.n_classes, *stack.shape[1:]),
                               chunks=(1, model.n_classes, *plan.stride), dtype=dtype, attributes=attributes)
    if done.done:
        echo(f"{out}: continuing a previous run ({len(done.done)} of {planes} planes were done)")
    for z in tqdm(range(planes), disable=not progress, desc="planes", unit="plane"):
        if z in done.done:
            continue
        image, statistics, precision = prepare(z)
        plane_key = {"normalization": [image.scale, image.offset], "precision": precision,
                     "norm_statistics": None if statistics is None else statistics.fingerprint}
        tiles = Progress(partial, plane_key, name=f"unetkit-progress-plane{z}.json")
        _run_tiles(checkpoint, model, image, Plane(array, z), plan, tiles, tile_shape=tile_shape, batch_size=batch_size,
                   tta=tta, dtype=dtype, backend=backend, client=client, block_size=block_size, progress=progress,
                   norm_statistics=statistics, precision=precision, calibration=calibration)
        if len(tiles.done) != len(plan):
            raise RuntimeError(f"{out}: {len(plan) - len(tiles.done)} tiles of plane {z} were not written")
        done.add([z])
        tiles.path.unlink()
    (partial / PROGRESS_FILE).unlink()
    if out.exists():
        shutil.rmtree(out)  # only reached with --force (the caller skips existing outputs otherwise)
    os.replace(partial, out)
    return out


#: Label pyramids stop at the first level whose longer side is below this many pixels.
LABEL_PYRAMID_MIN_SIDE = 1024


def label_dtype(shape: tuple[int, ...]) -> str:
    """The smallest unsigned type that holds every object id an image of `shape` can have (4-connected
    objects: at most one pixel in two), so ids never wrap.

    Example:
        >>> label_dtype((256, 256)), label_dtype((512, 512)), label_dtype((100_000, 100_000))
        ('uint16', 'uint32', 'uint64')
    """
    from .labels import id_dtype

    return str(id_dtype((int(np.prod(shape)) + 1) // 2))


def create_ome_labels(path: Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str, name: str, *,
                      source: str | None = None, colors: list[dict[str, Any]] | None = None,
                      axes: list[str] | None = None):
    """An OME-Zarr (NGFF 0.5) label image (y, x) at `path`: a multiscales group with "image-label"
    metadata (`source`: the image it labels, relative to `path`; `colors`: optional
    {"label-value", "rgba"} entries) and level "0"; returns the level-0 array to fill. A 3D
    `shape` is a stack, (z, y, x) unless `axes` says otherwise (e.g. ["t", "y", "x"]).

    Place it at IMAGE.ome.zarr/labels/NAME with `create_image_labels`, or on its own. After level 0
    is written, `write_label_pyramid(path)` adds the lower levels block by block.
    """
    import zarr
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import add_metadata, write_multiscales_metadata

    fmt = FormatV05()
    axes = list(axes or ["z", "y", "x"][-len(shape):])
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    array = group.create_array("0", shape=shape, chunks=chunks, dtype=dtype, fill_value=0, dimension_names=axes)
    write_multiscales_metadata(group, _label_datasets(1, len(axes)), fmt=fmt, axes=axes, name=name)
    image_label: dict[str, Any] = {"version": fmt.version}
    if source is not None:
        image_label["source"] = {"image": source}
    if colors is not None:
        image_label["colors"] = colors
    add_metadata(group, {"image-label": image_label}, fmt=fmt)
    return array


def create_image_labels(image: Path, name: str, shape: tuple[int, int], chunks: tuple[int, int], dtype: str, *,
                        colors: list[dict[str, Any]] | None = None):
    """`create_ome_labels` at IMAGE/labels/NAME inside the OME-Zarr image `image`, listed in its
    "labels" group (other label images kept); returns the level-0 array."""
    import zarr
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import add_metadata, get_metadata

    fmt = FormatV05()
    labels = zarr.open_group(str(Path(image) / "labels"), mode="a", zarr_format=fmt.zarr_format)
    array = create_ome_labels(Path(image) / "labels" / name, shape, chunks, dtype, name, source="../../", colors=colors)
    listed = [n for n in get_metadata(labels).get("labels", []) if n != name]
    add_metadata(labels, {"labels": [*listed, name]}, fmt=fmt)
    return array


def _label_datasets(levels: int, ndim: int = 2) -> list[dict[str, Any]]:
    """Multiscales datasets "0".."levels-1", each halving y and x of the one before."""
    return [{"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [1.0] * (ndim - 2) + [2.0**k, 2.0**k]}]}
            for k in range(levels)]


def write_label_pyramid(path: Path, *, min_side: int = LABEL_PYRAMID_MIN_SIDE, block: int = 4096,
                        progress: bool = False) -> int:
    """Add the lower levels of the label image at `path` (from `create_ome_labels`, level 0 written):
    each level takes every second pixel of the one above (nearest neighbour, ids unchanged), read and
    written `block` pixels at a time, until the longer side is below `min_side`; the multiscales
    metadata then lists them all. Returns the number of levels.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "cells_labels.ome.zarr"
        >>> level0 = create_ome_labels(path, (5, 6), (4, 4), "uint32", "cells")
        >>> level0[:] = np.arange(30).reshape(5, 6)
        >>> write_label_pyramid(path, min_side=4)
        2
        >>> import zarr; zarr.open_group(str(path))["1"][:].tolist()
        [[0, 2, 4], [12, 14, 16], [24, 26, 28]]
    """
    import zarr
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import get_metadata, write_multiscales_metadata

    group = zarr.open_group(str(path), mode="r+")
    multiscale = get_metadata(group)["multiscales"][0]
    name = multiscale.get("name")
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in multiscale.get("axes", ["y", "x"])]
    level = group["0"]
    levels = 1
    step = block - block % 2 or 2
    while max(level.shape[-2:]) >= min_side and min(level.shape[-2:]) > 1:
        lead = tuple(level.shape[:-2])  # planes of a stack: kept, each halved on its own
        shape = lead + tuple((s + 1) // 2 for s in level.shape[-2:])
        chunks = tuple(min(c, s) for c, s in zip(level.chunks, shape))
        lower = group.create_array(str(levels), shape=shape, chunks=chunks, dtype=level.dtype, fill_value=0,
                                   dimension_names=axes, overwrite=True)
        windows = [(p, y, x) for p in np.ndindex(*lead)
                   for y in range(0, level.shape[-2], step) for x in range(0, level.shape[-1], step)]
        for p, y, x in tqdm(windows, disable=not progress, desc=f"labels level {levels}", unit="block"):
            lower[(*p, slice(y // 2, (y + step) // 2), slice(x // 2, (x + step) // 2))] = \
                level[(*p, slice(y, y + step, 2), slice(x, x + step, 2))]
        level, levels = lower, levels + 1
    write_multiscales_metadata(group, _label_datasets(levels, len(axes)), fmt=FormatV05(), axes=axes, name=name)
    return levels


def zarr_to_tiff(array, path: Path, *, force: bool = False, rows: int = 512) -> Path:
    """Stream a zarr array (H, W), (C, H, W) or (Z, C, H, W) into a tiled BigTIFF, `rows` image rows at a time."""
    import tifffile

    shape = tuple(array.shape)
    height, width = shape[-2:]
    tile = (256, 256)

    def tiles():
        for page in np.ndindex(*shape[:-2]):
            for y in range(0, height, tile[0] * (rows // tile[0])):
                stripe = np.asarray(array[(*page, slice(y, y + rows))])
                for ty in range(0, stripe.shape[0], tile[0]):
                    for tx in range(0, width, tile[1]):
                        out = np.zeros(tile, array.dtype)
                        part = stripe[ty : ty + tile[0], tx : tx + tile[1]]
                        out[: part.shape[0], : part.shape[1]] = part
                        yield out

    def write(tmp: Path) -> None:
        tifffile.imwrite(tmp, tiles(), shape=shape, dtype=array.dtype, tile=tile, bigtiff=True,
                         photometric="minisblack", compression="zlib")

    return atomic_write(path, write, force=force)
