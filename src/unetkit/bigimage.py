"""Images larger than memory: lazy zarr / OME-Zarr / BigTIFF input, resumable zarr output.

`open_lazy` reads `.zarr` / `.ome.zarr` (OME-NGFF 0.4 and 0.5, level 0) and TIFF (tifffile's
zarr view, level 0) one window at a time; the reader reopens its file in each process, so it can
travel to Dask workers. `predict_to_zarr` writes probabilities tile by tile (or block by block on a
Dask cluster) into ``NAME.zarr.partial`` and records each finished tile atomically in a progress
file, so a killed run continues where it stopped; the folder is renamed to ``NAME.zarr`` at the end.

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
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from .data.normalize import Normalization
from .errors import InputError
from .io import atomic_write

#: Inputs with more pixels than this are written as zarr unless --out-format says otherwise.
LARGE_PIXELS = 8192 * 8192
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
        level = multiscales[0]["datasets"][0]["path"]
        axes = multiscales[0].get("axes")
        names = [a["name"] if isinstance(a, dict) else a for a in axes] if axes else None
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


@dataclass
class LazyImage:
    """A (C, H, W) view of an image file read window by window, optionally normalised (float32).

    `rows` limits it to the top rows. Picklable: the open file is not part of its state.
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

    def __post_init__(self) -> None:
        self._array = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_array"] = None
        return state

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

    def normalized(self, scale: float, offset: float) -> "LazyImage":
        return replace(self, scale=float(scale), offset=float(offset))

    def limited(self, rows: int | None) -> "LazyImage":
        return replace(self, rows=rows)

    def _open(self):
        if self._array is None:
            import zarr

            if self.kind == "zarr":
                node = zarr.open(self.path, mode="r")
                self._array = node[self.component] if self.component else node
            else:
                import tifffile

                node = zarr.open(tifffile.imread(self.path, aszarr=True), mode="r")
                self._array = node if isinstance(node, zarr.Array) else node["0"]
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
            index.append({"c": cs, "y": ys, "x": xs}.get(axis, 0))  # other axes (t, z) have size 1
        data = np.asarray(self._open()[tuple(index)])
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


def open_lazy(path: str | os.PathLike) -> LazyImage:
    """Open a zarr / OME-Zarr (level 0) or TIFF image for window-by-window reading."""
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
    else:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, names = tuple(int(s) for s in series.shape), list(series.axes.lower())
                dtype = series.dtype
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
        names = ["c" if a == "s" else a for a in names]
        component, kind = "", "tiff"
    if names is None:
        names = {2: ["y", "x"], 3: ["c", "y", "x"]}.get(len(shape))
        if names is None:
            raise InputError(f"{path}: a {len(shape)}D array without axis names; expected (y, x) or (c, y, x)")
    names = [n.lower() for n in names]
    for axis, size in zip(names, shape):
        if axis not in "cyx" and size != 1:
            raise InputError(f"{path}: axis {axis!r} has {size} entries; only 2D images (one t and z) are supported")
    if "y" not in names or "x" not in names:
        raise InputError(f"{path}: axes {''.join(names)} have no y and x")
    if kind == "zarr":
        dtype = array.dtype
    return LazyImage(str(path), kind, component, "".join(names), shape, np.dtype(dtype))


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
    """Finished tile indices of one output, saved atomically (temp file + rename) after each batch."""

    def __init__(self, folder: Path, key: dict[str, Any]) -> None:
        self.path, self.key = folder / PROGRESS_FILE, key
        self.done: set[int] = set()
        if self.path.exists():
            with open(self.path) as f:
                saved = json.load(f)
            if saved.get("key") == key:
                self.done = set(saved["done"])

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
) -> Path:
    """Write the probabilities of a normalised `image` to the zarr array `out`, resuming a killed run.

    Chunks are (n_classes, stride_h, stride_w) of the tile plan: each chunk is written by one
    tile only. Works in ``out.partial`` and renames it to `out` when every tile is done.
    """
    import zarr

    from .distributed import DEFAULT_BLOCK_SIZE, block_tasks
    from .predict import predict
    from .tiling import plan_tiles

    plan = plan_tiles(image.shape[1:], model.geometry, tile_shape)
    partial = out.with_name(out.name + ".partial")
    key = {
        "image": str(Path(image.path).resolve()), "shape": list(image.shape), "tile_shape": list(tile_shape),
        "checkpoint": [str(checkpoint), *_stamp(checkpoint)], "n_classes": model.n_classes, "tta": bool(tta), "dtype": dtype,
        "normalization": [image.scale, image.offset],
    }
    done = Progress(partial, key) if (partial / PROGRESS_FILE).exists() else None
    if done is not None and done.done:
        echo(f"{out}: continuing a previous run ({len(done.done)} of {len(plan)} tiles were done)")
    else:
        if partial.exists():
            shutil.rmtree(partial)
        zarr.create_array(
            store=str(partial), shape=(model.n_classes, *image.shape[1:]), dtype=dtype,
            chunks=(model.n_classes, *plan.stride), fill_value=0, attributes=attributes or {},
        )
        done = Progress(partial, key)
        done.add([])
    array = zarr.open_array(str(partial), mode="r+")
    if client is None:
        todo = [i for i in range(len(plan)) if i not in done.done]
        predict(model, image, tile_size=tile_shape, batch_size=batch_size, tta=tta, out=_Cast(array), tiles=todo,
                on_batch=done.add, progress=progress, backend=backend)
    else:
        import dask
        from distributed import as_completed

        tasks = block_tasks(checkpoint, image.to_dask(), tile_size=tile_shape, block_size=block_size or DEFAULT_BLOCK_SIZE,
                            batch_size=batch_size, tta=tta, dtype=dtype)
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
    if len(done.done) != len(plan):
        raise RuntimeError(f"{out}: {len(plan) - len(done.done)} tiles were not written")
    (partial / PROGRESS_FILE).unlink()
    if out.exists():
        shutil.rmtree(out)  # only reached with --force (the caller skips existing outputs otherwise)
    os.replace(partial, out)
    return out


def create_ome_labels(path: Path, shape: tuple[int, int], chunks: tuple[int, int], dtype: str, name: str):
    """An OME-Zarr (NGFF 0.5) image group at `path` with one level, array "0" (y, x); returns the array."""
    import zarr

    group = zarr.open_group(str(path), mode="w")
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{
            "name": name,
            "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0]}]}],
        }],
    }
    return group.create_array("0", shape=shape, chunks=chunks, dtype=dtype, fill_value=0, dimension_names=["y", "x"])


def zarr_to_tiff(array, path: Path, *, force: bool = False, rows: int = 512) -> Path:
    """Stream a zarr array (H, W) or (C, H, W) into a tiled BigTIFF, `rows` image rows at a time."""
    import tifffile

    shape = tuple(array.shape)
    pages = shape[0] if len(shape) == 3 else 1
    height, width = shape[-2:]
    tile = (256, 256)

    def tiles():
        for page in range(pages):
            for y in range(0, height, tile[0] * (rows // tile[0])):
                stripe = np.asarray(array[page, y : y + rows] if len(shape) == 3 else array[y : y + rows])
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
