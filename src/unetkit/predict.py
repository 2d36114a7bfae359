"""Overlap-tile prediction on images of any size (paper Fig. 2): arrays in, probabilities out.

File-level segmentation (reading, normalising, labels, writing) is `unetkit.segment`.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .adapt import NORM_STATISTICS, BatchNormStatistics, check_statistics, gather_statistics, has_batch_norm
from .backends import check_backend, make_runner
from .errors import InputError
from .network import UNet
from .tiling import TilePlan, as_pair, axis_layout, extract_region, plan_tiles, same_margin, with_channel_axis

#: Default memory allowed for one batch of tiles' activations, in bytes.
DEFAULT_MEMORY_BUDGET = 1 << 30
#: Floats alive per input pixel and base channel during an inference forward pass (skip
#: connections, the concatenation and the convolution outputs of the last decoder level).
LIVE_FLOATS_PER_PIXEL_AND_CHANNEL = 6


def activation_bytes(model: UNet, tile_shape: tuple[int, int], batch_size: int = 1) -> int:
    """Estimated peak activation memory of an inference pass over `batch_size` tiles."""
    base = int(model.config["base_channels"])
    return 4 * LIVE_FLOATS_PER_PIXEL_AND_CHANNEL * base * tile_shape[0] * tile_shape[1] * batch_size


def choose_tile_shape(
    model: UNet, image_shape: Sequence[int], *, memory_budget: int | None = None, batch_size: int = 1
) -> tuple[int, int]:
    """The legal tile (h, w) that needs the least computation for `image_shape` within the budget.

    Larger tiles recompute less of their context (the 92-pixel border of the paper's net), so the
    cost of a plan is its number of tiles times the tile area; tiles never grow past what covers
    the image in one pass. `memory_budget` defaults to 1 GiB, or a quarter of the available
    memory if that is less.

    Example:
        >>> choose_tile_shape(UNet(depth=3, base_channels=4), (50, 1000))
        (92, 1040)
    """
    geometry = model.geometry
    if memory_budget is None:
        memory_budget = DEFAULT_MEMORY_BUDGET
        with contextlib.suppress(Exception):
            import psutil

            memory_budget = min(memory_budget, psutil.virtual_memory().available // 4)
    max_pixels = max(memory_budget // activation_bytes(model, (1, 1), batch_size), geometry.min_size**2)

    def options(size: int) -> tuple[np.ndarray, np.ndarray]:
        """Legal tile sizes up to the one covering `size` in one tile, and their tile counts."""
        margin = 0 if geometry.padding == "valid" else same_margin(geometry)
        sizes = [s for s in geometry.legal_sizes(geometry.input_size(size + 2 * margin)) if s > 2 * margin]
        counts = [axis_layout(size, s, geometry).count for s in sizes]
        counts = [c if c < 2**62 else np.inf for c in counts]  # tiles too small to tile this axis
        return np.array(sizes, dtype=np.float64), np.array(counts, dtype=np.float64)

    hs, ny = options(int(image_shape[-2]))
    ws, nx = options(int(image_shape[-1]))
    area = hs[:, None] * ws[None, :]
    cost = ny[:, None] * nx[None, :] * area
    cost[area > max_pixels] = np.inf
    if not np.isfinite(cost).any():
        cost = np.where(np.isfinite(ny[:, None] * nx[None, :]), area, np.inf)
    i, j = np.unravel_index(np.argmin(cost), cost.shape)
    return int(hs[i]), int(ws[j])


def _dihedral(x: torch.Tensor, index: int, inverse: bool = False) -> torch.Tensor:
    """The `index`-th of the 8 dihedral transforms (rot90^k, optionally after a horizontal flip)."""
    k, flip = index % 4, index >= 4
    if not inverse:
        x = torch.flip(x, dims=(-1,)) if flip else x
        return torch.rot90(x, k, dims=(-2, -1))
    x = torch.rot90(x, -k, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def _as_chw(image, in_channels: int):
    """Validate an image (H, W) or (C, H, W); returns something indexable as (C, H, W)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not hasattr(image, "shape") or not hasattr(image, "ndim"):
        if isinstance(image, (list, tuple)):
            image = np.asarray(image)
        else:
            raise TypeError(f"image must be a NumPy array or torch tensor, got {type(image).__name__}")
    if image.ndim not in (2, 3):
        raise InputError(f"image must be 2D (H, W) or (C, H, W), got shape {tuple(image.shape)}")
    if any(int(s) == 0 for s in image.shape):
        raise InputError(f"image is empty (shape {tuple(image.shape)})")
    if image.ndim == 2:
        image = with_channel_axis(image)
    channels = int(image.shape[0])
    if channels != in_channels:
        hint = ""
        if int(image.shape[-1]) == in_channels:
            hint = "; the image looks channels-last (H, W, C): move the channel axis first"
        raise InputError(f"image has {channels} channel(s) but the model expects {in_channels}{hint}")
    if isinstance(image, np.ndarray):
        if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
            raise TypeError(f"image must hold numbers, got dtype {image.dtype}")
        if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
            raise InputError("image contains NaN or infinite values; replace them before predicting")
    return image


def _warn_if_unnormalised(image) -> None:
    """Warn (once per place in the caller's code) when `image` holds raw integers, not the
    normalised floats the network was trained on."""
    dtype = getattr(image, "dtype", None)
    if getattr(image, "scale", None) is not None:  # a normalised `bigimage.LazyImage`: floats out, stored dtype kept
        return
    if dtype is not None and np.issubdtype(np.dtype(dtype), np.integer):
        warnings.warn(
            f"predict: the image is {np.dtype(dtype)}, which looks unnormalised; the network expects the "
            "normalised floats it was trained on: predict(model, loaded.normalization(image)) with the loaded checkpoint",
            UserWarning, stacklevel=3,
        )


def predict(
    model: UNet,
    image,
    *,
    tile_size: int | tuple[int, int] | None = None,
    batch_size: int = 1,
    tta: bool = False,
    device: str | torch.device | None = None,
    progress: bool = False,
    memory_budget: int | None = None,
    callback: Callable[[int, int], None] | None = None,
    backend: str = "auto",
    out=None,
    tiles: Iterable[int] | None = None,
    on_batch: Callable[[Sequence[int]], None] | None = None,
    norm_statistics: str | BatchNormStatistics = "training",
    job_calls: int | None = None,
    precision: str | Sequence[str] = "fp32",
    calibration=None,
) -> np.ndarray | Any:
    """Class probabilities for an image of any size, by seamless overlap-tile prediction.

    The image is extrapolated at its borders by mirroring and cut into input tiles whose output
    tiles cover it without gaps (`unetkit.tiling.plan_tiles`); tiles run in batches and their
    softmax outputs are stitched into one preallocated array. With `padding="valid"` (the paper)
    the result equals one pass of the network over the whole mirror-padded image, to float
    rounding. With `padding="same"` tiles overlap by the receptive-field margin and only their
    centres are kept; the result then matches a whole-image pass closely but not exactly, because
    zero padding inside the network still reaches the kept centre from far away.

    Args:
        model: a `UNet`. Its training/eval mode is restored afterwards.
        image: (H, W) or (C, H, W) array (NumPy, torch, or a lazily indexable array such as zarr),
            already normalised the way the model was trained.
        tile_size: legal input tile size (int or (h, w)); None picks the cheapest legal tile that
            fits `memory_budget` (see `choose_tile_shape`).
        batch_size: tiles per forward pass (>= 1).
        tta: average the 8 dihedral transforms (identity, 3 rotations, and their mirror images),
            each undone before averaging. The paper averaged 7 rotated versions.
        device: where to run; None uses the model's device. The model is moved there.
        progress: show a progress bar over tiles.
        memory_budget: bytes allowed for activations when `tile_size` is None.
        callback: called after each batch with (tiles done, tiles in all), e.g. to move a
            progress bar in a viewer; an exception it raises stops the prediction (a cancel).
        backend: what runs the network on each batch of tiles: "torch", "onnxruntime" (its ONNX
            graph, exported once per set of weights and cached; needs ``unetkit[export]``) or
            "auto" (torch on a GPU; on the CPU the faster of the two for this model and tile,
            measured once and remembered; see `unetkit.backends`). Outputs agree within 1e-4.
        out: writable array-like (n_classes, H, W) to write into instead of a new array (a zarr
            array, `np.memmap`, ...): each tile is written as its batch finishes, so memory is
            set by the tile batch, not the image. Values are cast to `out`'s dtype.
        tiles: indices into the tile plan (`predict_plan`) to compute, in order; default all.
            With `out`, this resumes a partial result or splits the work.
        on_batch: called with the plan indices of each batch once it is written to `out`.
        norm_statistics: "training" (batch norm uses the statistics stored in the model),
            "image" (statistics of this image, gathered over the tiles of this tile plan first:
            `unetkit.adapt.gather_statistics`), or a `BatchNormStatistics` value to use as they
            are (gathered once over a whole large image, then used for each block of it).
            Every backend takes each: onnxruntime feeds them to a graph exported once per weights.
        job_calls: when this call is one part of a larger job (a block of a large image on a Dask
            worker), the batches of the whole job: the runner, and "auto"'s measurement, are then
            kept for the next call in this thread with the same model, tile and statistics, so
            "auto" decides once per process instead of never for blocks of a few tiles.
        precision: "fp32", "bf16" (torch autocast, float32 softmax and sums; needs native bf16),
            "int8" (onnxruntime with the statically quantised graph, built once and cached; see
            `unetkit.precision`), or a sequence of them: the fastest, measured once per model, tile,
            threads and CPU. "auto" here is fp32: without a checkpoint there are no stored scores to
            allow another (`unetkit.inference.Segmenter` chooses with them).
        calibration: normalised images (or a function returning them) to calibrate the int8 graph
            on when it is not cached yet (`unetkit.backends.calibration_feeds`).

    Returns:
        float32 array (n_classes, H, W) of class probabilities, or `out` when given.

    Example:
        >>> net = UNet(depth=3, base_channels=4)
        >>> predict(net, np.random.rand(37, 101).astype("float32"), tile_size=60).shape
        (2, 37, 101)
    """
    if not isinstance(model, UNet):
        raise TypeError(f"model must be a unetkit.UNet, got {type(model).__name__}")
    if getattr(model, "dims", 2) != 2:
        raise InputError("this is a 3D U-Net; predict volumes with unetkit.volume.predict_volume")
    if int(batch_size) != batch_size or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1 (got {batch_size})")
    if not isinstance(norm_statistics, BatchNormStatistics) and norm_statistics not in NORM_STATISTICS:
        raise InputError(
            f"norm_statistics must be one of {', '.join(NORM_STATISTICS)} or a BatchNormStatistics (got {norm_statistics!r})"
        )
    if isinstance(norm_statistics, BatchNormStatistics):
        check_statistics(model, norm_statistics)
    check_backend(backend)
    precision = _check_precision(precision, backend, device if device is not None else next(model.parameters()).device)
    image = _as_chw(image, model.in_channels)
    _warn_if_unnormalised(image)
    height, width = int(image.shape[-2]), int(image.shape[-1])
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    tile_shape = (
        as_pair(tile_size)
        if tile_size is not None
        else choose_tile_shape(model, (height, width), memory_budget=memory_budget, batch_size=batch_size)
    )
    plan = plan_tiles((height, width), model.geometry, tile_shape)
    if out is not None and tuple(out.shape) != (model.n_classes, height, width):
        raise InputError(f"out has shape {tuple(out.shape)}; it must be (n_classes, H, W) = {(model.n_classes, height, width)}")
    statistics = None
    if has_batch_norm(model):
        if isinstance(norm_statistics, BatchNormStatistics):
            statistics = norm_statistics
        elif norm_statistics == "image":
            statistics = gather_statistics(model, image, plan.tile_shape, progress=progress)
    output = np.empty((model.n_classes, height, width), dtype=np.float32) if out is None else out
    todo = list(range(len(plan))) if tiles is None else [int(i) for i in tiles]
    transforms = range(8) if tta else range(1)
    done = 0
    calls = -(-len(todo) // int(batch_size)) * len(transforms)
    runner = make_runner(
        model, backend, device, (int(batch_size), *plan.tile_shape), calls=calls if job_calls is None else int(job_calls),
        statistics=statistics, keep=job_calls is not None, precision=precision, calibration=calibration,
    )
    with runner as run, tqdm(total=len(todo), disable=not progress, desc="tiles", unit="tile") as bar:
        for start in range(0, len(todo), int(batch_size)):
            indices = todo[start : start + int(batch_size)]
            batch = [plan.tiles[i] for i in indices]
            windows = np.stack(
                [extract_region(image, t.in_y, t.in_x, *plan.tile_shape) for t in batch]
            ).astype(np.float32, copy=False)
            if not np.isfinite(windows).all():
                raise InputError("image contains NaN or infinite values; replace them before predicting")
            x = torch.from_numpy(windows).to(device)
            probs = None
            for index in transforms:
                p = _dihedral(run(_dihedral(x, index)), index, inverse=True)
                probs = p if probs is None else probs + p
            probs = (probs / len(transforms)).float().cpu().numpy()
            for tile, p in zip(batch, probs):
                output[:, tile.out_y : tile.out_y + tile.out_h, tile.out_x : tile.out_x + tile.out_w] = p[
                    :, tile.crop_y : tile.crop_y + tile.out_h, tile.crop_x : tile.crop_x + tile.out_w
                ]
            if on_batch is not None:
                on_batch(indices)
            bar.update(len(batch))
            done += len(batch)
            if callback is not None:
                callback(done, len(todo))
    return output


def _check_precision(precision, backend: str, device) -> str | tuple[str, ...]:
    """`precision` as `make_runner` takes it ("auto" is fp32 here); InputError for one that cannot run."""
    from .backends import check_name, check_runnable

    if isinstance(precision, str):
        check_name(precision)
        precision = "fp32" if precision == "auto" else precision
        return check_runnable(precision, backend, torch.device(device))
    candidates = tuple(dict.fromkeys(precision))
    for p in candidates:
        check_runnable(p, backend, torch.device(device))
    if not candidates:
        raise InputError("precision must name at least one of fp32, bf16, int8")
    return candidates


def predict_plan(model: UNet, image_shape: Sequence[int], tile_size: int | tuple[int, int] | None = None) -> TilePlan:
    """The tile plan `predict` would use for an image of `image_shape` (for inspection and chunking)."""
    shape = (int(image_shape[-2]), int(image_shape[-1]))
    tile_shape = as_pair(tile_size) if tile_size is not None else choose_tile_shape(model, shape)
    return plan_tiles(shape, model.geometry, tile_shape)
