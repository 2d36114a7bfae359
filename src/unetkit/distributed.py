"""Overlap-tile prediction spread over a Dask cluster: blocks of whole tiles, each with its halo.

The image is cut into blocks made of whole tiles of the single-process tile plan
(`unetkit.predict.predict_plan`), so block starts lie on the pooling grid (`geometry.step`) and
every tile sees exactly the window it sees in `unetkit.predict`: the result equals the
single-process result to float rounding. Each block reads its own input window (the block grown
by the geometry's border, mirrored at the image edges the way `unetkit.tiling.extract_region`
mirrors) from the source array, so Dask's own boundary handling (`symmetric` padding) is not used.

Workers load the network once, keyed by its checkpoint path; it never travels through the graph.
Batch-norm statistics (`unetkit.adapt.BatchNormStatistics`, e.g. gathered once over the whole
image with `gather_statistics`) travel as one small value and every block uses them, so the blocks
equal `predict(..., norm_statistics=stats)` on the whole image. Each worker thread keeps its
runner across blocks (`backends.make_runner(..., keep=True)`): the "auto" backend measures once
per worker over the whole job, not per block (a block of a few tiles is too short to measure).

Volumes (3D models, ``unetkit predict VOLUME.zarr --dask``) go tile by tile instead: each task
holds a few tiles of the single-process 3D plan (`volume_tile_groups`), reads their mirrored
windows straight from the zarr store and writes their output chunks into the shared zarr array
(`predict_volume_tiles`), so finished tasks are recorded and a stopped run continues.

Example:
    >>> import dask.array as da  # doctest: +SKIP
    >>> probs = predict_dask("run/best.pt", da.from_zarr("image.zarr"))  # doctest: +SKIP
    >>> probs.to_zarr("probabilities.zarr")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import re
import threading
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .adapt import BatchNormStatistics, check_statistics
from .errors import InputError
from .network import UNet
from .predict import choose_tile_shape, predict
from .tiling import TilePlan, as_pair, plan_tiles, reflect_indices

#: Target block side in pixels (rounded to whole tiles): large enough that the halo and the task
#: overhead are small, small enough that a block's input and output fit a worker's memory.
DEFAULT_BLOCK_SIZE = 4096
#: Input chunks with fewer pixels than this are rechunked (a warning says so).
MIN_CHUNK_PIXELS = 64 * 64
#: How long to try reaching a scheduler before giving up.
CONNECT_TIMEOUT = "10s"

_models: dict[tuple[str, int], UNet] = {}
_models_lock = threading.Lock()


def worker_model(source: str | UNet, device: str = "cpu") -> UNet:
    """The network for this process and thread: loaded from a checkpoint path once, then reused."""
    key = (str(source) if not isinstance(source, UNet) else f"object-{id(source)}", threading.get_ident())
    with _models_lock:
        model = _models.get(key)
        if model is None:
            if isinstance(source, UNet):
                model = copy.deepcopy(source)
            else:
                from .checkpoint import load_checkpoint

                model = load_checkpoint(source).model
            model.to(device)
            _models[key] = model
    return model


class _Window:
    """A (C, H, W) view of the whole image backed by one window of it (what a block task holds)."""

    def __init__(self, window: np.ndarray, y0: int, x0: int, shape: tuple[int, int, int]) -> None:
        self.window, self.y0, self.x0 = window, y0, x0
        self.shape, self.ndim = shape, 3

    def __getitem__(self, key):
        _, ys, xs = key
        return self.window[:, ys.start - self.y0 : ys.stop - self.y0, xs.start - self.x0 : xs.stop - self.x0]


class _BlockOut:
    """A writable (n_classes, H, W) view onto one block's output array."""

    def __init__(self, block: np.ndarray, y0: int, x0: int, shape: tuple[int, int, int]) -> None:
        self.block, self.y0, self.x0, self.shape = block, y0, x0, shape

    def __setitem__(self, key, value) -> None:
        _, ys, xs = key
        self.block[:, ys.start - self.y0 : ys.stop - self.y0, xs.start - self.x0 : xs.stop - self.x0] = value


@dataclass(frozen=True)
class Block:
    """One block: the plan's tiles it holds, its output region and its (mirror-folded) input box."""

    index: tuple[int, int]
    tiles: tuple[int, ...]
    out_y: int
    out_x: int
    out_h: int
    out_w: int
    box: tuple[int, int, int, int]  # y_lo, y_hi, x_lo, x_hi of the source pixels it reads


def plan_blocks(plan: TilePlan, block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE) -> list[list[Block]]:
    """Group the tiles of `plan` into blocks of about `block_size` pixels per side (whole tiles).

    Example:
        >>> from unetkit.geometry import Geometry
        >>> plan = plan_tiles((1000, 700), Geometry(depth=3), 124)
        >>> blocks = plan_blocks(plan, 300)
        >>> len(blocks), len(blocks[0]), blocks[0][0].out_h, blocks[-1][-1].box
        (3, 3, 336, (652, 1000, 623, 700))
    """
    height, width = plan.image_shape
    rows = sorted({t.out_y for t in plan.tiles})
    cols = sorted({t.out_x for t in plan.tiles})
    per_y, per_x = (max(1, round(b / s)) for b, s in zip(as_pair(block_size, "block_size"), plan.stride))
    grid = {(t.out_y, t.out_x): i for i, t in enumerate(plan.tiles)}
    blocks = []
    for bi, r0 in enumerate(range(0, len(rows), per_y)):
        block_row = []
        for bj, c0 in enumerate(range(0, len(cols), per_x)):
            ys, xs = rows[r0 : r0 + per_y], cols[c0 : c0 + per_x]
            indices = tuple(grid[(y, x)] for y in ys for x in xs)
            first, last = plan.tiles[indices[0]], plan.tiles[indices[-1]]
            in_ys = reflect_indices(first.in_y, last.in_y + plan.tile_shape[0] - first.in_y, height)
            in_xs = reflect_indices(first.in_x, last.in_x + plan.tile_shape[1] - first.in_x, width)
            block_row.append(Block(
                index=(bi, bj), tiles=indices, out_y=first.out_y, out_x=first.out_x,
                out_h=last.out_y + last.out_h - first.out_y, out_w=last.out_x + last.out_w - first.out_x,
                box=(int(in_ys.min()), int(in_ys.max()) + 1, int(in_xs.min()), int(in_xs.max()) + 1),
            ))
        blocks.append(block_row)
    return blocks


def predict_block(
    model: str | UNet, window: np.ndarray, block: Block, image_shape: tuple[int, int, int], tile_shape: tuple[int, int],
    n_classes: int, *, batch_size: int = 1, tta: bool = False, dtype: Any = np.float32, device: str = "cpu",
    norm_statistics: BatchNormStatistics | None = None, backend: str = "auto", job_calls: int | None = None,
    precision: str | tuple[str, ...] = "fp32", calibration=None,
) -> np.ndarray:
    """Probabilities of one block from its input window (runs on a worker).

    `job_calls` (batches of the whole job) keeps this thread's runner for the next block;
    `precision` and `calibration` are `unetkit.predict`'s.
    """
    net = worker_model(model, device)
    window = np.asarray(window)
    if window.ndim == 2:
        window = window[None]
    out = np.empty((n_classes, block.out_h, block.out_w), dtype=np.float32)
    predict(
        net, _Window(window, block.box[0], block.box[2], image_shape), tile_size=tile_shape, batch_size=batch_size,
        tta=tta, out=_BlockOut(out, block.out_y, block.out_x, (n_classes, *image_shape[1:])), tiles=block.tiles,
        norm_statistics="training" if norm_statistics is None else norm_statistics, backend=backend,
        job_calls=len(block.tiles) if job_calls is None else job_calls, precision=precision, calibration=calibration,
    )
    return out.astype(dtype, copy=False)


@dataclass
class BlockTasks:
    """The per-block Dask tasks of a prediction (see `block_tasks`), before they are assembled."""

    plan: TilePlan
    blocks: list[list[Block]]
    tasks: list[list[Any]]  # dask.delayed, one per block
    n_classes: int
    dtype: np.dtype


def _model_info(model: str | os.PathLike | UNet) -> tuple[str | UNet, UNet]:
    """(what workers receive, a local copy for the geometry and class count)."""
    if isinstance(model, UNet):
        return model, model
    from .checkpoint import load_checkpoint

    path = str(Path(model).resolve()) if Path(model).exists() else str(model)
    return path, load_checkpoint(path).model


def block_tasks(
    model: str | os.PathLike | UNet, image, *, tile_size: int | tuple[int, int] | None = None,
    block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE, batch_size: int = 1, tta: bool = False,
    dtype: Any = np.float32, device: str = "cpu", memory_budget: int | None = None,
    norm_statistics: BatchNormStatistics | None = None, backend: str = "auto",
    precision: str | tuple[str, ...] = "fp32", calibration=None,
) -> BlockTasks:
    """One delayed task per block computing its probabilities (for callers that store each block).

    `norm_statistics`, `backend`, `precision` and `calibration` are as for `predict_dask`.
    """
    import dask
    import dask.array as da

    if not isinstance(image, da.Array):
        raise TypeError(f"image must be a dask array, got {type(image).__name__}; wrap it with dask.array.from_array")
    if image.ndim not in (2, 3) or 0 in image.shape:
        raise InputError(f"image must be a non-empty (H, W) or (C, H, W) array, got shape {image.shape}")
    if norm_statistics is not None and not isinstance(norm_statistics, BatchNormStatistics):
        raise InputError(
            f"norm_statistics must be None or a BatchNormStatistics (got {norm_statistics!r}); for the image's own "
            "statistics pass unetkit.adapt.gather_statistics(model, image, tile_size)"
        )
    from .backends import check_backend
    from .predict import _check_precision

    check_backend(backend)
    precision = _check_precision(precision, backend, device)
    if calibration is not None and "int8" in ((precision,) if isinstance(precision, str) else precision):
        # one node of the graph holding the arrays, for the workers that have no cached int8 graph yet
        calibration = dask.delayed(list(calibration() if callable(calibration) else calibration), traverse=False,
                                   name=f"unetkit-calibration-{uuid.uuid4().hex}")
    ref, net = _model_info(model)
    if norm_statistics is not None:
        check_statistics(net, norm_statistics)
    channels = 1 if image.ndim == 2 else int(image.shape[0])
    if channels != net.in_channels:
        raise InputError(f"image has {channels} channel(s) but the model expects {net.in_channels}")
    height, width = int(image.shape[-2]), int(image.shape[-1])
    tile_shape = (
        as_pair(tile_size) if tile_size is not None
        else choose_tile_shape(net, (height, width), memory_budget=memory_budget, batch_size=batch_size)
    )
    plan = plan_tiles((height, width), net.geometry, tile_shape)
    blocks = plan_blocks(plan, block_size)
    chunk_h, chunk_w = max(image.chunks[-2]), max(image.chunks[-1])
    if chunk_h * chunk_w < MIN_CHUNK_PIXELS and image.numblocks[-1] * image.numblocks[-2] > 1:
        target = max(256, min(as_pair(block_size, "block_size")))
        warnings.warn(
            f"input chunks of {chunk_h}x{chunk_w} pixels are tiny (many small reads, a large "
            f"task graph); rechunking to {target}x{target}. Store the image with larger chunks to avoid this",
            stacklevel=2,
        )
        image = image.rechunk({image.ndim - 2: target, image.ndim - 1: target})
    if isinstance(ref, UNet):
        ref = dask.delayed(ref, name=f"unetkit-model-{uuid.uuid4().hex}")
    stats = None
    if norm_statistics is not None:  # one node of the graph, however many blocks use it
        stats = dask.delayed(norm_statistics, name=f"unetkit-statistics-{norm_statistics.fingerprint[:32]}")
    image_shape = (channels, height, width)
    job_calls = -(-len(plan) // int(batch_size)) * (8 if tta else 1)
    run = dask.delayed(predict_block, pure=True)
    tasks = [
        [
            run(ref, image[..., b.box[0] : b.box[1], b.box[2] : b.box[3]], b, image_shape, tile_shape, net.n_classes,
                batch_size=batch_size, tta=tta, dtype=dtype, device=device, norm_statistics=stats, backend=backend,
                job_calls=job_calls, precision=precision, calibration=calibration)
            for b in row
        ]
        for row in blocks
    ]
    return BlockTasks(plan=plan, blocks=blocks, tasks=tasks, n_classes=net.n_classes, dtype=np.dtype(dtype))


def predict_dask(
    model: str | os.PathLike | UNet, image, *, tile_size: int | tuple[int, int] | None = None,
    block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE, batch_size: int = 1, tta: bool = False,
    dtype: Any = np.float32, device: str = "cpu", memory_budget: int | None = None,
    norm_statistics: BatchNormStatistics | None = None, backend: str = "auto",
    precision: str | tuple[str, ...] = "fp32", calibration=None,
):
    """Class probabilities of a Dask image as a lazy Dask array (n_classes, H, W), one chunk per block.

    Equals `unetkit.predict(model, image.compute(), tile_size=...)` to float rounding for the same
    tile size (the default tile is chosen the same way). Pass a checkpoint path rather than a
    `UNet`: workers then load it once each; a `UNet` object is shipped to each worker once.

    Args:
        model: checkpoint path (readable by the workers) or a `UNet`.
        image: Dask array (H, W) or (C, H, W), normalised as the model expects.
        tile_size: input tile size; None chooses as `unetkit.predict` does.
        block_size: about this many pixels per block side, rounded to whole tiles.
        batch_size, tta, device: as for `unetkit.predict`, per worker.
        dtype: output dtype (float32, or float16 to halve storage).
        norm_statistics: batch-norm statistics every block uses (None: the model's own). For the
            image's own, gather them once over the whole image:
            ``gather_statistics(net, image, tile_size)``; the result then equals
            ``predict(net, image, tile_size=..., norm_statistics="image")``.
        backend: as for `unetkit.predict`; "auto" measures once per worker, not per block.
        precision, calibration: as for `unetkit.predict` (int8's calibration images travel to the
            workers that have no cached int8 graph yet).

    Example:
        >>> import dask.array as da
        >>> net = UNet(depth=2, base_channels=4)
        >>> image = da.random.random((50, 70)).astype("float32")
        >>> probs = predict_dask(net, image, tile_size=44, block_size=32)
        >>> probs.shape, probs.chunks[1], bool(np.allclose(probs.compute(), predict(net, image.compute(), tile_size=44)))
        ((2, 50, 70), (28, 22), True)
    """
    import dask.array as da

    tasks = block_tasks(model, image, tile_size=tile_size, block_size=block_size, batch_size=batch_size, tta=tta,
                        dtype=dtype, device=device, memory_budget=memory_budget, norm_statistics=norm_statistics,
                        backend=backend, precision=precision, calibration=calibration)
    meta = np.empty((0, 0, 0), dtype=tasks.dtype)
    return da.block([
        [
            da.from_delayed(task, shape=(tasks.n_classes, b.out_h, b.out_w), dtype=tasks.dtype, meta=meta)
            for task, b in zip(task_row, block_row)
        ]
        for task_row, block_row in zip(tasks.tasks, tasks.blocks)
    ])


#: Tiles of a 3D plan per Dask task: a few, so tasks balance over workers and a killed run loses little.
VOLUME_TILES_PER_TASK = 4


def volume_tile_groups(tiles: Sequence[int], per_task: int = VOLUME_TILES_PER_TASK) -> list[tuple[int, ...]]:
    """`tiles` (indices into a 3D tile plan) in groups of `per_task`, in plan order.

    Example:
        >>> volume_tile_groups([0, 1, 2, 5, 6], 2)
        [(0, 1), (2, 5), (6,)]
    """
    if per_task < 1:
        raise InputError(f"per_task must be >= 1 (got {per_task})")
    tiles = [int(t) for t in tiles]
    return [tuple(tiles[i : i + per_task]) for i in range(0, len(tiles), per_task)]


def predict_volume_tiles(
    model: str | UNet, volume, out: str, tiles: Sequence[int], *, tile_shape: Sequence[int], batch_size: int = 1,
    tta: bool = False, device: str = "cpu",
) -> tuple[int, ...]:
    """Predict some tiles of a volume's 3D tile plan into the zarr array at `out` (runs on a worker).

    `volume` is a picklable, window-readable normalised volume (`unetkit.bigimage.LazyVolume`):
    each tile reads its own mirrored window from the store, as `unetkit.volume.predict_volume`
    does in one process, so any split of the plan's tiles over workers writes the same values.
    Each output chunk belongs to one tile, so workers never write the same chunk. Returns `tiles`.
    """
    import zarr

    from .volume import predict_volume

    net = worker_model(model, device)
    array = zarr.open_array(str(out), mode="r+")
    predict_volume(net, volume, tile_shape=tuple(tile_shape), batch_size=batch_size, tta=tta, device=device,
                   out=array, tiles=list(tiles))  # zarr casts to the array's dtype
    return tuple(int(t) for t in tiles)


#: What --dask accepts: local:N, or a scheduler at tcp:// or tls:// HOST:PORT (HOST a name, IPv4 or [IPv6]).
_DASK_ADDRESS = re.compile(r"^(?:local:(?P<workers>\d+)|(?:tcp|tls)://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>\d{1,5}))$")


def check_dask_address(address: str) -> str:
    """`address` if it is a --dask value: ``local:N`` (N >= 1 worker processes) or ``tcp://HOST:PORT``
    (``tls://HOST:PORT``); InputError otherwise. Syntax only: nothing is imported or contacted.

    Example:
        >>> check_dask_address("tcp://10.0.0.5:8786")
        'tcp://10.0.0.5:8786'
    """
    match = _DASK_ADDRESS.match(str(address).strip())
    if match and match["workers"] is not None and int(match["workers"]) >= 1:
        return match.string
    if match and match["port"] is not None and 1 <= int(match["port"]) <= 65535:
        return match.string
    raise InputError(
        f"--dask {address!r}: not a Dask address; give local:N (N >= 1 worker processes, e.g. local:2) or a "
        "scheduler address tcp://HOST:PORT (e.g. tcp://10.0.0.5:8786, tls://HOST:PORT with TLS)"
    )


def _handshake(address: str, seconds: float) -> None:
    """Connect to `address` and complete Dask's handshake, all within `seconds`.

    `Client(timeout=...)` bounds only the TCP connection: it then waits for the scheduler's
    handshake without a limit, so a service that accepts connections but is no Dask scheduler (a
    web server) would hang it. Runs in its own thread, so a caller's running event loop is no matter.
    """
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from distributed.comm import connect as open_comm
    from distributed.security import Security

    async def shake() -> None:
        comm = await asyncio.wait_for(open_comm(address, timeout=seconds, **Security().get_connection_args("client")), seconds)
        await comm.close()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, shake()).result()


def connect(address: str, timeout: str | None = None) -> Any:
    """A `distributed.Client` for ``local:N`` (N worker processes, 1 thread each) or a scheduler address.

    A malformed address, or one where no Dask scheduler answers within `timeout` (default
    `CONNECT_TIMEOUT`), raises `InputError` naming the address.
    """
    address = check_dask_address(address)
    try:
        from dask.utils import parse_timedelta
        from distributed import Client, LocalCluster
    except ImportError:
        raise InputError("--dask needs the optional dependencies: pip install 'unetkit[scale]'") from None
    if address.startswith("local:"):
        count = int(address.split(":", 1)[1])
        if count > (os.cpu_count() or 1):
            warnings.warn(f"--dask {address}: more worker processes than the {os.cpu_count()} CPU cores", stacklevel=2)
        cluster = LocalCluster(n_workers=count, threads_per_worker=1, processes=True, dashboard_address=None)
        return Client(cluster)
    seconds = parse_timedelta(timeout or CONNECT_TIMEOUT, default="seconds")
    try:
        _handshake(address, seconds)
        return Client(address, timeout=seconds)
    except Exception as exc:  # noqa: BLE001 - refused, timed out, or a reply that is not Dask's
        raise InputError(
            f"--dask {address}: no Dask scheduler answered there within {seconds:g} s ({type(exc).__name__}); "
            "start one (dask scheduler) or fix the address"
        ) from None


__all__ = ["predict_dask", "block_tasks", "plan_blocks", "predict_block", "connect", "Block", "BlockTasks",
           "predict_volume_tiles", "volume_tile_groups"]
