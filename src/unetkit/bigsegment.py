"""`unetkit predict` for images larger than memory: zarr / OME-Zarr / BigTIFF in, zarr or BigTIFF out.

Probabilities are computed tile by tile into a zarr array (on one machine, or block by block on a
Dask cluster with `--dask`) and labels block by block (`unetkit.blocklabels`), so memory is set by
the tile batch and the label block, never by the image. A killed run continues where it stopped.

Stacks (a z or t axis; a plain (Z, Y, X) zarr array given to a one-channel 2D model) are segmented
plane by plane the same way, each plane as its own image: NAME_probabilities.zarr is (Z, n_classes,
Y, X) and NAME_labels.ome.zarr (Z, Y, X), with ids unique across the stack
(`unetkit.stacks.unique_across_planes`) or linked across planes (`stitch`,
`unetkit.stacks.stitch_planes`), both settled block by block, two planes at a time.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from .bigimage import (
    Plane,
    _level0,
    create_ome_labels,
    fit_normalization,
    is_zarr_path,
    open_lazy,
    predict_stack_to_zarr,
    predict_to_zarr,
    zarr_to_tiff,
)
from .config import LARGE_PIXELS
from .errors import InputError
from .io import output_name

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
    stitch: float | None = None,
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

    A stack (`unetkit.bigimage.open_lazy` with the model's channels: a z or t axis, or a plain
    (Z, Y, X) array for a one-channel model) is segmented plane by plane, each plane normalised
    on its own as `unetkit.stacks.segment_stack` does: probabilities (Z, n_classes, H, W), labels
    (Z, H, W) unique across planes, or linked across planes at overlap `stitch`.

    Example:
        >>> segment_large(["slide.ome.zarr"], "run/best.pt", "out", dask="local:2")  # doctest: +SKIP
    """
    import zarr

    from .inference import Segmenter

    note = echo or (lambda message: None)
    check_large_options(out_format=out_format, dtype=dtype, rows=rows, block_size=block_size, dask=dask)
    if stitch is not None and not 0.0 < stitch <= 1.0:
        raise InputError(f"--stitch must be an overlap (intersection over union) in (0, 1] (got {stitch})")
    segmenter = model if isinstance(model, Segmenter) else Segmenter.load(model)
    if segmenter.default_diameter is not None:
        raise InputError(f"{segmenter.source or 'the model'} was fine-tuned on objects of {segmenter.default_diameter:g} px "
                         "and rescales each image to its start model's object size in memory, which zarr and "
                         "larger-than-memory images are not: fine-tune it again with --no-rescale for them, or rescale "
                         "the image to the model's scale first (unetkit.scale.rescale_image)")
    images = [open_lazy(p, in_channels=segmenter.model.in_channels).limited(rows) for p in inputs]
    names = [output_name(Path(p)) for p in inputs]
    if len(set(names)) != len(names):
        raise InputError(f"several inputs share a name ({', '.join(names)}); their outputs would collide")
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
    if stitch is not None:
        single = [str(image.path) for image in images if image.stack_axis is None]
        if single:
            raise InputError(f"{', '.join(single)}: one plane, not a stack; --stitch links the planes of z-stacks and "
                             "time series: leave it out")
    for image in images:
        how = read_as(image)
        if how:
            note(how)
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
            if image.stack_axis is not None:
                written.extend(_segment_stack(image, name, segmenter, checkpoint, out, fmt=fmt, dtype=dtype, client=client,
                                              block_size=block_size, rows=rows, stitch=stitch, force=force,
                                              progress=progress, note=note))
                continue
            targets = _targets(out, name, fmt)
            if not force and all(t.exists() for t in targets):
                note(f"skipping {image.path}: its outputs exist in {out} (add --force to segment it again)")
                continue
            tiles = segmenter.tile_shape(image.shape)
            probabilities = out / f"{name}_probabilities.zarr"
            if fmt == "zarr" and probabilities.exists() and not force:
                note(f"{probabilities}: exists, kept")
            else:
                normalized, statistics, precision = _prepare(segmenter, image, tiles, note, progress)
                attributes = {"unetkit": {"class_names": segmenter.loaded.class_names, "checkpoint": str(checkpoint),
                                          "tta": settings.maps.tta, "norm_statistics": settings.maps.norm_statistics,
                                          "precision": precision,
                                          "tile_shape": list(tiles), "source": str(image.path), "rows": rows}}
                predict_to_zarr(checkpoint if checkpoint is not None else "", net, normalized, probabilities, tile_shape=tiles,
                                batch_size=settings.batch_size, tta=settings.maps.tta, backend=settings.backend, dtype=dtype,
                                client=client, block_size=block_size, attributes=attributes, progress=progress, echo=note,
                                norm_statistics=statistics, precision=precision, calibration=segmenter.calibration)
            probs = zarr.open_array(str(probabilities), mode="r")
            label_path = out / f"{name}_labels.ome.zarr"
            if not label_path.exists() or force:
                _write_labels(probs, label_path, settings, name, progress)
            written.extend(_outputs(probs, probabilities, label_path, targets, force=force))
    finally:
        _close(client, dask)
    return written


def _close(client, dask: str | None) -> None:
    """Close a `--dask` client, and the local cluster it started."""
    if client is None:
        return
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None and dask and dask.startswith("local:"):
        cluster.close()


def _targets(out: Path, name: str, fmt: str) -> list[Path]:
    """The two outputs of input `name`: probabilities and labels, as zarr or as TIFF."""
    suffixes = ("_probabilities.zarr", "_labels.ome.zarr") if fmt == "zarr" else ("_probabilities.tif", "_labels.tif")
    return [out / f"{name}{s}" for s in suffixes]


def _prepare(segmenter, image, tiles: tuple[int, int], note: Callable[[str], None], progress: bool = False):
    """An image (or a stack's plane) normalised as the model was trained, with the batch-norm
    statistics and precision its maps are made with: (normalized, statistics, precision)."""
    scale, offset = fit_normalization(segmenter.loaded.normalization, image, progress=progress)
    normalized = image.normalized(scale, offset)
    statistics = segmenter.statistics(normalized, progress=progress)
    precision, statistics = segmenter.precision_for(normalized, tiles, statistics)
    for line in segmenter.take_notes():
        note(line)
    return normalized, statistics, precision


def _outputs(probs, probabilities: Path, label_path: Path, targets: list[Path], *, force: bool) -> list[Path]:
    """The finished outputs: the zarr `targets` as they are, or TIFF copies of the zarr arrays
    (which are then removed)."""
    import zarr

    if targets[0] == probabilities:
        return targets
    written = [zarr_to_tiff(probs, targets[0], force=force),
               zarr_to_tiff(zarr.open_group(str(label_path), mode="r")["0"], targets[1], force=force)]
    shutil.rmtree(probabilities)
    shutil.rmtree(label_path)
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

    from .bigimage import label_dtype, write_label_pyramid

    partial = path.with_name(path.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    shape = tuple(probs.shape[1:])
    chunks = tuple(min(c, 2048) for c in probs.chunks[1:])
    foreground = _Foreground(probs)
    rule = settings.rule
    if settings.labels == "binary":
        array = create_ome_labels(partial, shape, chunks, "uint8", name)
        _binary_blocks(foreground, array, shape, rule.threshold)
    else:
        array = create_ome_labels(partial, shape, chunks, label_dtype(shape), name)
        block = LABEL_BLOCK // chunks[0] * chunks[0] or chunks[0]
        _label_with_scratch(partial, foreground, array, rule, fill_holes=settings.fill_holes, block=block, chunk=block,
                            progress=progress)
    write_label_pyramid(partial, progress=progress)
    if path.exists():
        shutil.rmtree(path)
    os.replace(partial, path)


def _binary_blocks(foreground, out, shape: tuple[int, int], threshold: float) -> None:
    """uint8 0/1 labels (foreground above `threshold`) of an (H, W) map, `LABEL_BLOCK` pixels square at a time."""
    for y in range(0, shape[0], LABEL_BLOCK):
        for x in range(0, shape[1], LABEL_BLOCK):
            window = (slice(y, y + LABEL_BLOCK), slice(x, x + LABEL_BLOCK))
            out[window] = (foreground[window] > threshold).astype(np.uint8)


def _label_with_scratch(partial: Path, foreground, out, rule, *, fill_holes: bool, block: int, chunk: int,
                        halo: int | None = None, progress: bool = False) -> int:
    """`unetkit.blocklabels.label_blockwise` of `foreground` into `out`, the ids between its passes
    held in zarr arrays inside the output's `partial` folder (chunks of at most `chunk` per axis),
    removed once it is done; returns the number of objects."""
    import zarr

    from .blocklabels import DEFAULT_HALO, label_blockwise

    made: dict[str, Path] = {}

    def scratch(kind: str, shape: tuple[int, ...]):
        made[kind] = partial / f"scratch-{kind}"
        return zarr.create_array(store=str(made[kind]), shape=shape, chunks=tuple(min(chunk, n) for n in shape),
                                 dtype="int64", fill_value=0, overwrite=True)

    count = label_blockwise(foreground, out, rule=rule, fill_holes=fill_holes, block=block,
                            halo=DEFAULT_HALO if halo is None else halo, scratch=scratch, progress=progress)
    for folder in made.values():
        shutil.rmtree(folder)
    return count


class _Foreground:
    """The foreground probability (classes 1.. summed, or the last class) of a (n_classes, H, W) array."""

    def __init__(self, probs) -> None:
        self.probs = probs
        self.shape = tuple(probs.shape[1:])

    def __getitem__(self, key):
        from .inference import foreground

        return foreground(np.asarray(self.probs[(slice(None), *key)]).astype(np.float32, copy=False))


def read_as(image) -> str | None:
    """How an input is read, for the user: a stack's planes and where its axes come from, or the
    channels of a (C, Y, X) zarr array without axis names; None for a plain image."""
    named = image.kind != "zarr" or _level0(Path(image.path))[1] is not None
    if image.stack_axis is not None:
        why = "axes metadata" if named else f"no axes metadata: read as ({image.layout.replace('', ', ')[2:-2]})"
        return f"{image.path}: {image.planes} planes along {image.stack_axis} ({why}), segmented plane by plane"
    if not named and len(image.stored_shape) == 3 and image.shape[0] > 1:
        return (f"{image.path}: read as one image of {image.shape[0]} channels (no axes metadata; the model takes "
                f"{image.shape[0]}); store it as OME-Zarr with a z axis to segment it plane by plane")
    return None


def _segment_stack(image, name: str, segmenter, checkpoint, out: Path, *, fmt: str, dtype: str, client, block_size,
                   rows, stitch: float | None, force: bool, progress: bool, note) -> list[Path]:
    """`segment_large` for one stack: probabilities plane by plane, then labels plane by plane."""
    import zarr

    targets = _targets(out, name, fmt)
    if not force and all(t.exists() for t in targets):
        note(f"skipping {image.path}: its outputs exist in {out} (add --force to segment it again)")
        return []
    settings = segmenter.settings
    tiles = segmenter.tile_shape(image.shape)
    probabilities = out / f"{name}_probabilities.zarr"
    if fmt == "zarr" and probabilities.exists() and not force:
        note(f"{probabilities}: exists, kept")
    else:
        def prepare(z: int):
            return _prepare(segmenter, image.at(z), tiles, note)

        attributes = {"unetkit": {"class_names": segmenter.loaded.class_names, "checkpoint": str(checkpoint),
                                  "tta": settings.maps.tta, "norm_statistics": settings.maps.norm_statistics,
                                  "tile_shape": list(tiles), "source": str(image.path), "rows": rows,
                                  "axes": [image.stack_axis, "c", "y", "x"]}}
        predict_stack_to_zarr(checkpoint if checkpoint is not None else "", segmenter.model, image, probabilities,
                              prepare=prepare, tile_shape=tiles, batch_size=settings.batch_size, tta=settings.maps.tta,
                              backend=settings.backend, dtype=dtype, client=client, block_size=block_size,
                              attributes=attributes, progress=progress, echo=note, calibration=segmenter.calibration)
    probs = zarr.open_array(str(probabilities), mode="r")
    label_path = out / f"{name}_labels.ome.zarr"
    if not label_path.exists() or force:
        axis = "t" if image.stack_axis == "t" else "z"
        _write_stack_labels(probs, label_path, settings, name, axis=axis, stitch=stitch, progress=progress, echo=note,
                            source=probabilities)
    return _outputs(probs, probabilities, label_path, targets, force=force)


#: Labels of a stack in progress: the planes finished and what the next plane continues from.
LABELS_PROGRESS = "unetkit-labels-progress.json"


def _write_stack_labels(probs, path: Path, settings, name: str, *, axis: str, stitch: float | None, progress: bool,
                        echo: Callable[[str], None], source: Path) -> None:
    """Labels of (Z, n_classes, H, W) probabilities as a (Z, H, W) OME-Zarr label image, plane by
    plane (each by `unetkit.blocklabels.label_blockwise`), in ``PATH.partial``, then renamed.

    Ids continue from plane to plane (`unetkit.stacks.unique_across_planes`), or with `stitch`
    are linked to the plane before (`_link_plane`). After each plane the state is saved, so a
    killed run continues with the next plane (`source`, the probabilities' folder, must be the same)."""
    import zarr

    from .bigimage import _stamp, label_dtype, write_label_pyramid
    from .io import atomic_write

    partial = path.with_name(path.name + ".partial")
    planes, shape = int(probs.shape[0]), tuple(int(s) for s in probs.shape[2:])
    binary = settings.labels == "binary"
    key = {"probabilities": [str(Path(source).resolve()), *_stamp(Path(source) / "zarr.json")],
           "shape": [planes, *shape], "labels": settings.labels, "rule": settings.rule.to_dict(),
           "fill_holes": bool(settings.fill_holes), "stitch": None if binary else stitch}
    state_file, keys_file = partial / LABELS_PROGRESS, partial / "stitch-keys.npy"
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    chunks = (1, *(min(c, 2048) for c in probs.chunks[2:]))
    if state is not None and state.get("key") == key:
        array = zarr.open_group(str(partial), mode="r+")["0"]
        chain = np.load(keys_file)[: state["ids"] + 1] if stitch is not None and not binary else None
        echo(f"{path}: continuing a previous run ({state['planes']} of {planes} planes were labelled)")
    else:
        if partial.exists():
            shutil.rmtree(partial)
        dtype = "uint8" if binary else label_dtype((planes, *shape))
        array = create_ome_labels(partial, (planes, *shape), chunks, dtype, name, axes=[axis, "y", "x"])
        state = {"key": key, "planes": 0, "offset": 0, "ids": 0}
        chain = np.zeros(1, np.int64)  # chain[final id]: the id `stitch_planes` gives its first object
    rule = settings.rule
    block = LABEL_BLOCK // chunks[1] * chunks[1] or chunks[1]
    for z in tqdm(range(state["planes"], planes), disable=not progress, desc="label planes", unit="plane"):
        foreground = _Foreground(Plane(probs, z))
        target = Plane(array, z)
        if binary:
            _binary_blocks(foreground, target, shape, rule.threshold)
        else:
            count = _label_with_scratch(partial, foreground, target if stitch is not None else _Offset(target, state["offset"]),
                                        rule, fill_holes=settings.fill_holes, block=block, chunk=block, progress=progress)
            if stitch is not None:
                previous = Plane(array, z - 1) if z > 0 else None
                chain = np.concatenate([chain, _link_plane(previous, target, count, chain, state["offset"], stitch, block)])
                atomic_write(keys_file, lambda tmp: _save_npy(tmp, chain), force=True)
                state["ids"] = len(chain) - 1
            state["offset"] += count
        state["planes"] = z + 1
        payload = json.dumps(state)
        atomic_write(state_file, lambda tmp: tmp.write_text(payload), force=True)
    write_label_pyramid(partial, progress=progress)
    state_file.unlink()
    if keys_file.exists():
        keys_file.unlink()
    if path.exists():
        shutil.rmtree(path)
    os.replace(partial, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


class _Offset:
    """Writes labels 1..n into an array as offset+1..offset+n (0 stays background)."""

    def __init__(self, array, offset: int) -> None:
        self.array, self.offset = array, int(offset)
        self.shape, self.dtype = array.shape, array.dtype

    def __setitem__(self, key, value) -> None:
        ids = np.asarray(value).astype(np.int64)
        self.array[key] = np.where(ids > 0, ids + self.offset, 0).astype(self.dtype, copy=False)


def _link_plane(previous, current, count: int, chain: np.ndarray, offset: int, threshold: float, block: int) -> np.ndarray:
    """Link the objects of `current` (ids 1..count of one plane, rewritten in place) to those of
    `previous` (final ids; None for the first plane) as `unetkit.stacks.stitch_planes` does,
    reading two planes block by block.

    An object takes the id of the object of the plane before with which its intersection over
    union is largest, when it reaches `threshold`, pairs taken greedily from the largest overlap
    down (ties in the order of the in-memory ids, `chain`); the others get new ids, in raster
    order of their first pixel (the order `stitch_planes` numbers objects by). Returns the
    in-memory id of each new object (`offset` + its plane id), to extend `chain` with."""
    height, width = current.shape
    n_prev = len(chain) - 1
    windows = [(slice(y, y + block), slice(x, x + block)) for y in range(0, height, block) for x in range(0, width, block)]
    prev_area = np.zeros(n_prev + 1, np.int64)
    cur_area = np.zeros(count + 1, np.int64)
    first = np.full(count + 1, np.iinfo(np.int64).max)
    codes, counts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for window in windows:
        c = np.asarray(current[window]).astype(np.int64)
        p = np.zeros_like(c) if previous is None else np.asarray(previous[window]).astype(np.int64)
        prev_area += np.bincount(p.ravel(), minlength=n_prev + 1)
        cur_area += np.bincount(c.ravel(), minlength=count + 1)
        ids, where = np.unique(c.ravel(), return_index=True)
        rows, cols = np.divmod(where, c.shape[1])
        np.minimum.at(first, ids, (window[0].start + rows) * width + window[1].start + cols)
        both = (p > 0) & (c > 0)
        pair, n = np.unique(p[both] * (count + 1) + c[both], return_counts=True)
        codes.append(pair)
        counts.append(n)
    code, inverse = np.unique(np.concatenate(codes), return_inverse=True)
    intersection = np.bincount(inverse, weights=np.concatenate(counts)).astype(np.int64) if len(code) else np.zeros(0, np.int64)
    prev_ids, cur_ids = np.divmod(code, count + 1)
    order = np.lexsort((cur_ids, chain[prev_ids]))  # the pair order of `stitch_planes` (np.unique of its ids)
    prev_ids, cur_ids, intersection = prev_ids[order], cur_ids[order], intersection[order]
    iou = intersection / (prev_area[prev_ids] + cur_area[cur_ids] - intersection)
    lookup = np.zeros(count + 1, np.int64)
    taken = set()
    for k in np.argsort(-iou, kind="stable"):
        if iou[k] < threshold:
            break
        p, c = int(prev_ids[k]), int(cur_ids[k])
        if p in taken or lookup[c]:
            continue
        taken.add(p)
        lookup[c] = p
    fresh = np.flatnonzero(lookup == 0)
    fresh = fresh[(fresh > 0) & (cur_area[fresh] > 0)]
    fresh = fresh[np.argsort(first[fresh], kind="stable")]
    lookup[fresh] = np.arange(n_prev + 1, n_prev + 1 + len(fresh))
    for window in windows:
        current[window] = lookup[np.asarray(current[window]).astype(np.int64)].astype(current.dtype, copy=False)
    return offset + fresh


# -- volumes of a 3D model -----------------------------------------------------------------------
#: zarr volumes above this many voxels are segmented by a 3D model tile by tile (smaller ones too
#: with ``--out-format zarr``).
LARGE_VOXELS = LARGE_PIXELS

#: The "watershed" labels rule (distance-transform split) is drawn in memory (from the foreground
#: probability, 4 bytes a voxel, and the ids): its instance labels of volumes above this many voxels
#: are refused. The "components" and "seeded" rules are drawn block by block, binary labels slab by
#: slab, at any size.
VOLUME_LABEL_VOXELS = LARGE_PIXELS * 3

#: Block side and "seeded" flood halo of the 3D labelling passes, in voxels: a flood reads at most
#: (128 + 2 * 64)^3 = 16.8 M voxels of probabilities (a block whose halo holds no seed for a seeded
#: object reads more).
VOLUME_LABEL_BLOCK, VOLUME_LABEL_HALO = 128, 64


def wants_large_volume(path, out_format: str | None, dask: str | None = None) -> bool:
    """Whether `unetkit predict` with a 3D model segments this input tile by tile into zarr: a
    zarr / OME-Zarr volume given ``--out-format zarr`` (or tiff) or ``--dask``, or above `LARGE_VOXELS`."""
    from .segment_volume import volume_header

    if not is_zarr_path(path):
        return False
    if out_format is not None or dask:
        return True
    return int(np.prod(volume_header(Path(path))[0])) > LARGE_VOXELS


def segment_large_volumes(
    inputs: Sequence,
    model,
    out,
    *,
    out_format: str | None = None,
    dtype: str = "float32",
    dask: str | None = None,
    force: bool = False,
    progress: bool = False,
    echo: Callable[[str], None] | None = None,
) -> list[Path]:
    """Segment zarr / OME-Zarr volumes with a 3D model without holding them in memory; writes
    NAME_probabilities.zarr (n_classes, Z, Y, X) and NAME_labels.ome.zarr (Z, Y, X), or .tif with
    ``out_format="tiff"``.

    `model` is a `unetkit.segment_volume.VolumeSegmenter` (or what `volume_segmenter` accepts).
    The volume is normalised over all its voxels (one streaming pass, as
    `unetkit.data.volumes.normalize_volume` does in memory), then its probabilities are predicted
    tile by tile (`unetkit.volume.predict_volume` reading each 3D tile and its mirrored border
    from the zarr store) into ``NAME_probabilities.zarr.partial``, each finished tile recorded, so
    a killed run continues with the tiles left. Binary labels are drawn slab by slab; instance
    labels of the "components" and "seeded" rules block by block (`unetkit.blocklabels`, blocks
    of `VOLUME_LABEL_BLOCK` voxels, ids held in zarr scratch arrays) at any size; those of the
    "watershed" rule, which cannot be drawn blockwise, in memory from the foreground probability,
    for volumes up to `VOLUME_LABEL_VOXELS` voxels (larger ones are refused before anything is
    computed). All equal `VolumeSegmenter.segment` of the volume in memory ("seeded" where no
    seed beyond the `VOLUME_LABEL_HALO` voxels around a block would win one of its voxels).
    Existing outputs are skipped unless `force`.

    Example:
        >>> segment_large_volumes(["embryo.ome.zarr"], "run3d/best.pt", "out")  # doctest: +SKIP
    """
    import zarr

    from .segment_volume import inspect_volume, spacing_source, volume_header, volume_segmenter

    note = echo or (lambda message: None)
    check_large_options(out_format=out_format, dtype=dtype, rows=None, block_size=None, dask=dask)
    segmenter = volume_segmenter(model)
    if dask and _checkpoint_path(segmenter.source) is None:
        raise InputError("--dask needs the model as a checkpoint file or packaged model name, which every worker loads")
    checked = []
    for path in map(Path, inputs):
        if not is_zarr_path(path):
            raise InputError(f"{path}: not a zarr / OME-Zarr volume; volumes are segmented tile by tile from zarr stores: "
                             "convert it (e.g. zarr.create_array(store='vol.zarr', data=tifffile.imread(path))) or leave "
                             "out --out-format")
        checked.append(inspect_volume(path, segmenter.model.in_channels, volume_header(path)))
    names = [item.name for item in checked]
    if len(set(names)) != len(names):
        raise InputError(f"several inputs share a name ({', '.join(names)}); their outputs would collide")
    binary = segmenter.options.labels == "binary"
    for item in checked:
        segmenter.check_volume(item.shape, str(item.path), item.spacing, spacing_source(item))
        voxels = int(np.prod(item.shape))
        if not binary and segmenter.rule.method == "watershed" and voxels > VOLUME_LABEL_VOXELS:
            raise InputError(f"{item.path}: {voxels} voxels; the 'watershed' labels rule (distance-transform split) of a "
                             f"3D model is drawn in memory, up to {VOLUME_LABEL_VOXELS} voxels: leave out --watershed (or "
                             "give --threshold T: components, drawn block by block at any size), add --labels binary "
                             "(drawn slab by slab) or crop the volume")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fmt = out_format or "zarr"
    written: list[Path] = []
    client = None
    try:
        for item in checked:
            suffixes = ("_probabilities.zarr", "_labels.ome.zarr") if fmt == "zarr" else ("_probabilities.tif", "_labels.tif")
            targets = [out / f"{item.name}{s}" for s in suffixes]
            if not force and all(t.exists() for t in targets):
                note(f"skipping {item.path}: its outputs exist in {out} (add --force to segment it again)")
                continue
            z, y, x = item.shape
            note(f"{item.path}: a volume of {z}x{y}x{x} voxels, predicted tile by tile into zarr; labels "
                 + ("slab by slab" if binary else "in memory" if segmenter.rule.method == "watershed" else "block by block"))
            probabilities = out / f"{item.name}_probabilities.zarr"
            if probabilities.exists() and not force:
                note(f"{probabilities}: exists, kept")
            else:
                if dask and client is None:
                    from .distributed import connect

                    client = connect(dask)
                _volume_to_zarr(segmenter, item.path, probabilities, dtype=dtype, progress=progress, note=note, client=client)
            probs = zarr.open_array(str(probabilities), mode="r")
            label_path = targets[1] if fmt == "zarr" else out / f"{item.name}_labels.ome.zarr"
            if not label_path.exists() or force:
                _write_volume_labels(segmenter, probs, label_path, item.name, progress=progress)
            if fmt == "zarr":
                written.extend(targets)
                continue
            written.append(zarr_to_tiff(probs, targets[0], force=force))
            written.append(zarr_to_tiff(zarr.open_group(str(label_path), mode="r")["0"], targets[1], force=force))
            shutil.rmtree(probabilities)
            shutil.rmtree(label_path)
    finally:
        _close(client, dask)
    return written


def _volume_to_zarr(segmenter, path: Path, out: Path, *, dtype: str, progress: bool, note, client=None) -> Path:
    """Probabilities of one zarr volume, tile by tile into ``OUT.partial`` (resumable), renamed to `out`;
    with a Dask `client` its tiles run on the workers, a few per task (`unetkit.distributed.predict_volume_tiles`)."""
    from .bigimage import _Cast, _stamp, finish_partial, open_partial, open_volume
    from .volume import choose_volume_tile, plan_volume, predict_volume

    volume = open_volume(path)
    scale, offset = fit_normalization(segmenter.loaded.normalization, volume.as_rows(), progress=progress)
    normalized = volume.normalized(scale, offset)
    net, batch_size = segmenter.model, int(segmenter.options.batch_size)
    tile = segmenter.tile_shape(volume.shape) or choose_volume_tile(net, volume.shape, batch_size=batch_size)
    plan = plan_volume(volume.shape, segmenter.geometry, tile)
    checkpoint = _checkpoint_path(segmenter.source)
    partial = out.with_name(out.name + ".partial")
    key = {"image": str(Path(path).resolve()), "shape": list(volume.shape), "tile_shape": list(tile),
           "checkpoint": [str(checkpoint), *_stamp(checkpoint)] if checkpoint else None, "n_classes": net.n_classes,
           "tta": bool(segmenter.tta), "dtype": dtype, "normalization": [scale, offset]}
    attributes = {"unetkit": {"class_names": segmenter.loaded.class_names, "checkpoint": str(checkpoint),
                              "tta": segmenter.tta, "tile_shape": list(tile), "source": str(path),
                              "axes": ["c", "z", "y", "x"]}}
    array, done = open_partial(partial, key, shape=(net.n_classes, *volume.shape), chunks=(net.n_classes, *plan.stride),
                               dtype=dtype, attributes=attributes)
    if done.done:
        note(f"{out}: continuing a previous run ({len(done.done)} of {len(plan)} tiles were done)")
    for line in segmenter.take_notes():
        note(line)
    todo = [i for i in range(len(plan)) if i not in done.done]
    with tqdm(total=len(plan), initial=len(plan) - len(todo), disable=not progress, desc="tiles", unit="tile") as bar:
        def finished(indices) -> None:
            done.add(list(indices))
            bar.update(len(indices))

        if client is None:
            predict_volume(net, normalized, tile_shape=tile, batch_size=batch_size, tta=segmenter.tta,
                           device=segmenter.device, out=_Cast(array), tiles=todo, on_batch=finished)
        else:
            from distributed import as_completed

            from .distributed import predict_volume_tiles, volume_tile_groups

            futures = [client.submit(predict_volume_tiles, str(checkpoint), normalized, str(partial), group, tile_shape=tile,
                                     batch_size=batch_size, tta=segmenter.tta, device="cpu", pure=False)
                       for group in volume_tile_groups(todo)]
            for future in as_completed(futures):
                finished(future.result())
    return finish_partial(partial, out, missing=len(plan) - len(done.done))


def _write_volume_labels(segmenter, probs, path: Path, name: str, *, progress: bool) -> None:
    """(Z, Y, X) labels of (n_classes, Z, Y, X) probabilities as an OME-Zarr label image, as
    `VolumeSegmenter.labels` draws them from the foreground probability, computed slab by slab:
    binary slab by slab; instances by the "watershed" rule in memory, by the other rules block by
    block (`unetkit.blocklabels.label_blockwise`, the foreground and the ids held in zarr scratch
    arrays, removed afterwards); written in ``PATH.partial``, then renamed."""
    import zarr

    from .bigimage import label_dtype, write_label_pyramid
    from .inference import foreground

    partial = path.with_name(path.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    shape = tuple(int(s) for s in probs.shape[1:])
    chunks = tuple(min(c, 2048) for c in probs.chunks[1:])
    slab = chunks[0]
    binary = segmenter.options.labels == "binary"
    rule = segmenter.rule
    in_memory = not binary and rule.method == "watershed"
    array = create_ome_labels(partial, shape, chunks, "uint8" if binary else label_dtype(shape), name)
    if binary:
        fg = None
    elif in_memory:
        fg = np.empty(shape, np.float32)
    else:
        fg = zarr.create_array(store=str(partial / "scratch-foreground"), shape=shape, chunks=chunks, dtype="float32",
                               fill_value=0)
    for z in tqdm(range(0, shape[0], slab), disable=not progress, desc="foreground", unit="slab"):
        part = foreground(np.asarray(probs[:, z : z + slab]).astype(np.float32, copy=False))
        if fg is None:
            array[z : z + slab] = (part > rule.threshold).astype(np.uint8)
        else:
            fg[z : z + slab] = part
    if in_memory:
        array[...] = rule.apply(fg, fill_holes=segmenter.options.fill_holes)
    elif not binary:
        # small chunks: the planes on both sides of each block border are read back
        _label_with_scratch(partial, fg, array, rule, fill_holes=segmenter.options.fill_holes, block=VOLUME_LABEL_BLOCK,
                            chunk=64, halo=VOLUME_LABEL_HALO, progress=progress)
        shutil.rmtree(partial / "scratch-foreground")
    write_label_pyramid(partial, progress=progress)
    if path.exists():
        shutil.rmtree(path)
    os.replace(partial, path)
