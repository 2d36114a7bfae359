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

from .bigimage import create_ome_labels, fit_normalization, is_zarr_path, open_lazy, predict_to_zarr, zarr_to_tiff
from .config import LARGE_PIXELS
from .errors import InputError

#: Block side of the labelling passes. The seeded watershed floods each block grown by its halo
#: (256 px): with 2048-pixel blocks that pass alone took 1.16 GB on a 16384x16384 ISBI mosaic,
#: with 1024-pixel blocks 0.64 GB (benchmarks/one_core.py rss).
LABEL_BLOCK = 1024


def wants_large(inputs: Sequence[Path], *, out_format: str | None, dask: str | None, rows: int | None) -> bool:
    """Whether `unetkit predict` takes the out-of-core path for these inputs and options."""
    if out_format == "zarr" or dask or rows:
        return True
    for path in map(Path, inputs):
        if is_zarr_path(path):
            return True
        if out_format is None and path.is_file() and path.suffix.lower() in (".tif", ".tiff"):
            from .io import read_header

            header = read_header(path, pages=True)
            shape = header.shape if header.planes == 1 else header.shape[1:]  # a stack is segmented plane by plane
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


def check_large_options(*, out_format: str | None, dtype: str, rows: int | None, block_size: int | None, dask: str | None) -> None:
    """Refuse large-image options that no input could make valid (before anything is loaded or created)."""
    if out_format not in (None, "zarr", "tiff"):
        raise InputError(f"--out-format must be zarr or tiff (got {out_format!r})")
    if dtype not in ("float32", "float16"):
        raise InputError(f"--dtype must be float32 or float16 (got {dtype!r})")
    if rows is not None and rows < 1:
        raise InputError(f"--rows must be >= 1 (got {rows})")
    if block_size is not None and block_size < 1:
        raise InputError(f"--block-size must be >= 1 pixel (got {block_size})")
    if block_size is not None and not dask:
        raise InputError("--block-size sets the size of Dask blocks; add --dask local:N (or an address) or leave it out")


def segment_large(
    inputs: Sequence,
    model,
    out,
    *,
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

    `model` is a `unetkit.inference.Segmenter` (or a checkpoint path / packaged name): the same
    core as for files, so the maps are made and the labels drawn as there. Inputs are zarr /
    OME-Zarr (level 0) or TIFF files read window by window. Probabilities are a (n_classes, H, W)
    `dtype` zarr array chunked like the output tiles; labels an OME-Zarr label image (uint32 ids,
    or uint8 0/1 for binary labels). `out_format="tiff"` streams both into tiled BigTIFFs instead.

    When the maps use each image's own batch-norm statistics, they are gathered over the whole
    image first (a pass over its tiles without test-time augmentation and without output), then
    every tile, block and Dask worker uses them. Labels follow the model's rule (seeded watershed,
    components, ...) block by block, merged across block borders (`unetkit.blocklabels`).
    `dask` is ``local:N`` or a scheduler address; `rows` limits each image to its top rows (for
    trials). Existing outputs are skipped unless `force`; an interrupted run continues from its
    finished tiles.

    Example:
        >>> segment_large(["slide.ome.zarr"], "run/best.pt", "out", dask="local:2")  # doctest: +SKIP
    """
    import zarr

    from .inference import Segmenter

    note = echo or (lambda message: None)
    check_large_options(out_format=out_format, dtype=dtype, rows=rows, block_size=block_size, dask=dask)
    images = [open_lazy(p).limited(rows) for p in inputs]
    names = [output_name(Path(p)) for p in inputs]
    if len(set(names)) != len(names):
        raise InputError(f"several inputs share a name ({', '.join(names)}); their outputs would collide")
    segmenter = model if isinstance(model, Segmenter) else Segmenter.load(model)
    checkpoint = _checkpoint_path(segmenter.source)
    if dask and checkpoint is None:
        raise InputError("--dask needs the model as a checkpoint file or packaged model name, which every worker loads")
    net = segmenter.model
    settings = segmenter.settings
    if settings.labels == "instances" and settings.rule.method == "watershed":
        raise InputError("the distance watershed (--watershed) needs each whole object at once and is not drawn block by "
                         "block on large images; leave out --watershed, or give --labels binary")
    for image in images:
        if image.shape[0] != net.in_channels:
            raise InputError(f"{image.path}: has {image.shape[0]} channel(s), the model was trained on {net.in_channels}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fmt = out_format or "zarr"
    client = None
    from .distributed import MIN_CHUNK_PIXELS, connect

    if dask:
        client = connect(dask)
    written: list[Path] = []
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
            scale, offset = fit_normalization(segmenter.loaded.normalization, image, progress=progress)
            normalized = image.normalized(scale, offset)
            tiles = segmenter.tile_shape(normalized.shape)
            probabilities = out / f"{name}_probabilities.zarr"
            if fmt == "zarr" and probabilities.exists() and not force:
                note(f"{probabilities}: exists, kept")
            else:
                statistics = segmenter.statistics(normalized, progress=progress)
                precision, statistics = segmenter.precision_for(normalized, tiles, statistics)
                for line in segmenter.take_notes():
                    note(line)
                attributes = {"unetkit": {"class_names": segmenter.loaded.class_names, "checkpoint": str(checkpoint),
                                          "tta": settings.maps.tta, "norm_statistics": settings.maps.norm_statistics,
                                          "precision": precision,
                                          "tile_shape": list(tiles), "source": str(image.path), "rows": rows}}
                predict_to_zarr(checkpoint if checkpoint is not None else "", net, normalized, probabilities, tile_shape=tiles,
                                batch_size=settings.batch_size, tta=settings.maps.tta, backend=settings.backend, dtype=dtype,
                                client=client, block_size=block_size, attributes=attributes, progress=progress, echo=note,
                                norm_statistics=statistics, precision=precision, calibration=segmenter.calibration)
            probs = zarr.open_array(str(probabilities), mode="r")
            label_path = targets[1] if fmt == "zarr" else out / f"{name}_labels.ome.zarr"
            if not label_path.exists() or force:
                _write_labels(probs, label_path, settings, name, progress)
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


def _checkpoint_path(source) -> Path | None:
    """The checkpoint file a segmenter was loaded from (what Dask workers load), if any."""
    if source is None:
        return None
    from .pretrained import resolve_checkpoint

    path = resolve_checkpoint(source)
    return path.resolve() if path.exists() else None


def _write_labels(probs, path: Path, settings, name: str, progress: bool) -> None:
    """Labels of a probabilities zarr array as an OME-Zarr label image (image-label metadata, a
    pyramid), drawn by the settings' rule block by block; written in ``PATH.partial``, then renamed."""
    import zarr

    from .bigimage import label_dtype, write_label_pyramid
    from .blocklabels import label_blockwise

    partial = path.with_name(path.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    shape = tuple(probs.shape[1:])
    chunks = tuple(min(c, 2048) for c in probs.chunks[1:])
    foreground = _Foreground(probs)
    rule = settings.rule
    if settings.labels == "binary":
        array = create_ome_labels(partial, shape, chunks, "uint8", name)
        for y in range(0, shape[0], LABEL_BLOCK):
            for x in range(0, shape[1], LABEL_BLOCK):
                window = (slice(y, y + LABEL_BLOCK), slice(x, x + LABEL_BLOCK))
                array[window] = (foreground[window] > rule.threshold).astype(np.uint8)
    else:
        array = create_ome_labels(partial, shape, chunks, label_dtype(shape), name)
        block = LABEL_BLOCK // chunks[0] * chunks[0] or chunks[0]

        def scratch(kind: str, shape: tuple[int, int]):
            return zarr.create_array(store=str(partial / f"scratch-{kind}"), shape=shape, chunks=(block, block), dtype="int64",
                                     fill_value=0)

        label_blockwise(foreground, array, rule=rule, fill_holes=settings.fill_holes, block=block, scratch=scratch,
                        progress=progress)
        for folder in partial.glob("scratch-*"):
            shutil.rmtree(folder)
    write_label_pyramid(partial, progress=progress)
    if path.exists():
        shutil.rmtree(path)
    os.replace(partial, path)


class _Foreground:
    """The foreground probability (classes 1.. summed, or the last class) of a (n_classes, H, W) array."""

    def __init__(self, probs) -> None:
        self.probs = probs
        self.shape = tuple(probs.shape[1:])

    def __getitem__(self, key):
        from .inference import foreground

        return foreground(np.asarray(self.probs[(slice(None), *key)]).astype(np.float32, copy=False))
