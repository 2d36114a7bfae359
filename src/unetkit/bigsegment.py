"""`unetkit predict` for images larger than memory: zarr / OME-Zarr / BigTIFF in, zarr or BigTIFF out.

Probabilities are computed tile by tile into a zarr array (on one machine, or block by block on a
Dask cluster with `--dask`) and labels block by block (`unetkit.blocklabels`), so memory is set by
the tile batch and the label block, never by the image. A killed run continues where it stopped.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .bigimage import LARGE_PIXELS, create_ome_labels, fit_normalization, is_zarr_path, open_lazy, predict_to_zarr, zarr_to_tiff
from .errors import InputError

#: Block side of the labelling passes.
LABEL_BLOCK = 2048
#: Activation memory allowed for the default tile of a large image: small enough that the tile,
#: the network, the zarr reads and writes and the labelling pass stay under 1.5 GB together on a
#: 32768x32768 image (512 MiB peaked at 1.76 GB there).
MEMORY_BUDGET = 256 << 20


def wants_large(inputs: Sequence[Path], *, out_format: str | None, dask: str | None, rows: int | None) -> bool:
    """Whether `unetkit predict` takes the out-of-core path for these inputs and options."""
    if out_format == "zarr" or dask or rows:
        return True
    for path in map(Path, inputs):
        if is_zarr_path(path):
            return True
        if out_format is None and path.is_file() and path.suffix.lower() in (".tif", ".tiff"):
            from .io import read_header

            shape = read_header(path).shape
            if int(np.prod(shape[-2:])) > LARGE_PIXELS or int(np.prod(shape)) > LARGE_PIXELS * 3:
                return True
    return False


def output_name(path: Path) -> str:
    """slide.ome.zarr -> slide; cells.tif -> cells."""
    name = path.name
    for suffix in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def segment_large(
    inputs: Sequence,
    checkpoint,
    out,
    *,
    tta: bool | None = None,
    backend: str = "auto",
    tile_size: int | None = None,
    batch_size: int = 1,
    device: str = "auto",
    threshold: float | None = None,
    labels: str = "instances",
    watershed: bool | None = None,
    min_size: int | None = None,
    fill_holes: bool = True,
    out_format: str | None = None,
    dtype: str = "float32",
    dask: str | None = None,
    rows: int | None = None,
    block_size: int | None = None,
    force: bool = False,
    progress: bool = False,
    echo: Callable[[str], None] | None = None,
) -> list[Path]:
    """Segment large images; writes NAME_probabilities.zarr and NAME_labels.ome.zarr (or .tif).

    Inputs are zarr / OME-Zarr (level 0) or TIFF files read window by window. Probabilities are a
    (n_classes, H, W) `dtype` zarr array chunked like the output tiles; labels an OME-Zarr image
    (uint32 instance ids, or uint8 0/1 with `labels="binary"`). `out_format="tiff"` streams both
    into tiled BigTIFFs instead. Labels are the 4-connected components of the checkpoint rule's
    threshold, holes filled and objects below its minimum size removed, computed over the whole
    image (objects crossing blocks keep one id); a watershed rule is not applied to large images
    (a note says so). `dask` is ``local:N`` or a scheduler address; `rows` limits each image to
    its top rows (for trials); `backend` is `unetkit.predict`'s (used without `dask`). Existing
    outputs are skipped unless `force`; an interrupted run continues from its finished tiles.

    Example:
        >>> segment_large(["slide.ome.zarr"], "run/best.pt", "out", dask="local:2")  # doctest: +SKIP
    """
    import zarr

    from .checkpoint import load_checkpoint
    from .device import resolve_device
    from .pretrained import resolve_checkpoint
    from .predict import choose_tile_shape
    from .segment import labels_rule

    note = echo or (lambda message: None)
    if out_format not in (None, "zarr", "tiff"):
        raise InputError(f"--out-format must be zarr or tiff (got {out_format!r})")
    if dtype not in ("float32", "float16"):
        raise InputError(f"--dtype must be float32 or float16 (got {dtype!r})")
    if labels not in ("instances", "binary"):
        raise InputError(f"--labels must be 'instances' or 'binary' (got {labels!r})")
    if rows is not None and rows < 1:
        raise InputError(f"--rows must be >= 1 (got {rows})")
    images = [open_lazy(p).limited(rows) for p in inputs]
    names = [output_name(Path(p)) for p in inputs]
    if len(set(names)) != len(names):
        raise InputError(f"several inputs share a name ({', '.join(names)}); their outputs would collide")
    path = resolve_checkpoint(checkpoint)
    path = path.resolve() if path.exists() else path
    loaded = load_checkpoint(path)
    net = loaded.model
    for image in images:
        if image.shape[0] != net.in_channels:
            raise InputError(f"{image.path}: has {image.shape[0]} channel(s), the model was trained on {net.in_channels}")
    if tile_size is not None:
        net.geometry.check(tile_size, "--tile-size")
    rule = labels_rule(loaded.decision, threshold=threshold, watershed=watershed, min_size=min_size)
    tta = rule.tta if tta is None else bool(tta)
    if labels == "instances" and rule.method != "components":
        note(f"labels: the {rule.method} split is not applied to large images; objects are the connected components "
             f"at threshold {rule.threshold}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fmt = out_format or "zarr"
    client = None
    from .distributed import connect

    if dask:
        client = connect(dask)
    else:
        net.to(resolve_device(device))
    written: list[Path] = []
    from .distributed import MIN_CHUNK_PIXELS

    for image in images:
        rows_per_chunk, cols_per_chunk = image.chunk_shape()
        if rows_per_chunk * cols_per_chunk < MIN_CHUNK_PIXELS and image.pixels > MIN_CHUNK_PIXELS:
            note(f"{image.path}: its chunks of {rows_per_chunk}x{cols_per_chunk} pixels are tiny; it is read in larger "
                 "blocks, but every read touches many chunks: store it with chunks of 512 pixels or more for speed")
    try:
        for image, name in zip(images, names):
            suffixes = ("_probabilities.zarr", "_labels.ome.zarr") if fmt == "zarr" else ("_probabilities.tif", "_labels.tif")
            targets = [out / f"{name}{s}" for s in suffixes]
            if not force and all(t.exists() for t in targets):
                note(f"skipping {image.path}: its outputs exist in {out} (add --force to segment it again)")
                continue
            scale, offset = fit_normalization(loaded.normalization, image, progress=progress)
            normalized = image.normalized(scale, offset)
            shape = image.shape[1:]
            tiles = (tile_size, tile_size) if tile_size else choose_tile_shape(net, shape, batch_size=batch_size, memory_budget=MEMORY_BUDGET)
            probabilities = out / f"{name}_probabilities.zarr"
            if fmt == "zarr" and probabilities.exists() and not force:
                note(f"{probabilities}: exists, kept")
            else:
                attributes = {"unetkit": {"class_names": loaded.class_names, "checkpoint": str(path), "tta": tta,
                                          "tile_shape": list(tiles), "source": str(image.path), "rows": rows}}
                predict_to_zarr(path, net, normalized, probabilities, tile_shape=tiles, batch_size=batch_size, tta=tta, backend=backend,
                                dtype=dtype, client=client, block_size=block_size, attributes=attributes,
                                progress=progress, echo=note)
            probs = zarr.open_array(str(probabilities), mode="r")
            label_path = targets[1] if fmt == "zarr" else out / f"{name}_labels.ome.zarr"
            if not label_path.exists() or force:
                _write_labels(probs, label_path, rule, labels, fill_holes, name, progress)
            if fmt == "tiff":
                written.append(zarr_to_tiff(probs, targets[0], force=force))
                written.append(zarr_to_tiff(zarr.open_group(str(label_path), mode="r")["0"], targets[1], force=force))
                shutil.rmtree(probabilities)
                shutil.rmtree(label_path)
            else:
                written.extend(targets)
    finally:
        if client is not None:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None and dask and dask.startswith("local:"):
                cluster.close()
    return written


def _write_labels(probs, path: Path, rule, labels: str, fill_holes: bool, name: str, progress: bool) -> None:
    import zarr

    from .blocklabels import label_blockwise

    partial = path.with_name(path.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    shape = tuple(probs.shape[1:])
    chunks = tuple(min(c, 2048) for c in probs.chunks[1:])
    foreground = _Foreground(probs)
    if labels == "binary":
        array = create_ome_labels(partial, shape, chunks, "uint8", name)
        for y in range(0, shape[0], LABEL_BLOCK):
            for x in range(0, shape[1], LABEL_BLOCK):
                window = (slice(y, y + LABEL_BLOCK), slice(x, x + LABEL_BLOCK))
                array[window] = (foreground[window] > rule.threshold).astype(np.uint8)
    else:
        array = create_ome_labels(partial, shape, chunks, "uint32", name)
        block = LABEL_BLOCK // chunks[0] * chunks[0] or chunks[0]

        def scratch(shape):
            return zarr.create_array(store=str(partial / "scratch"), shape=shape, chunks=(block, block), dtype="int64", fill_value=0)

        label_blockwise(foreground, array, threshold=rule.threshold, min_size=rule.min_size, fill_holes=fill_holes,
                        block=block, scratch=scratch, progress=progress)
        shutil.rmtree(partial / "scratch")
    if path.exists():
        shutil.rmtree(path)
    os.replace(partial, path)


class _Foreground:
    """The foreground probability (classes 1.. summed, or the last class) of a (n_classes, H, W) array."""

    def __init__(self, probs) -> None:
        self.probs = probs
        self.shape = tuple(probs.shape[1:])

    def __getitem__(self, key):
        data = np.asarray(self.probs[(slice(None), *key)]).astype(np.float32, copy=False)
        return data[1:].sum(0) if data.shape[0] > 2 else data[-1]
