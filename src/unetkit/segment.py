"""File-level segmentation: read images, segment each with the one core
(`unetkit.inference.Segmenter`) and write the results atomically.

This module is what ``unetkit predict`` runs on ordinary files; `unetkit.bigsegment` runs the
same core on images larger than memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from .bigimage import is_zarr_path
from .data.normalize import to_chw
from .data.readers import check_unique_frames, ctc_frame
from .errors import InputError, Interrupted
from .inference import Segmenter
from .segment_volume import VolumeSegmenter, is_volume_model, refuse_two_d_options, segment_volume_files
from .stacks import segment_stack
from .io import IMAGE_SUFFIXES, check_writable_folder, list_images, listing, read_header, read_image, remove_stale_temp_files, repeated, write_tiff


def segment_files(
    inputs: Sequence,
    model,
    out,
    *,
    ctc: bool = False,
    force: bool = False,
    progress: bool = False,
    skip_unreadable: bool = False,
    stitch: float | None = None,
    echo: Callable[[str], None] | None = None,
) -> list:
    """Segment image files; writes NAME_probabilities.tif and NAME_labels.tif.

    `model` is a `unetkit.inference.Segmenter` (the checkpoint with the user's options resolved),
    or a checkpoint path / packaged model name segmented as its checkpoint says. Probabilities are
    float32 (n_classes, H, W); labels are instance ids (uint16, uint32 above 65535 objects) or
    uint8 0/1, drawn as the segmenter's settings say. A packaged model (`unetkit models`) warns
    about images unlike its training data. With `ctc`, also ``ctc/maskNNN.tif`` numbered by each
    input's frame (t041.tif -> mask041.tif); inputs without a frame number are refused.

    A multi-page TIFF (a z-stack or time series of one-channel planes) is segmented plane by plane
    (`unetkit.stacks.segment_stack`) and written as one stack: probabilities (planes, n_classes,
    H, W) and labels (planes, H, W) whose ids are unique across the stack, or with `stitch` (an
    overlap in (0, 1]) linked across planes.

    Before anything is computed, the output folder (writable, not an input folder) and every
    input's header are checked; an unreadable input is an error, or is skipped with a note if
    `skip_unreadable` (also when its pixel data turns out damaged while segmenting). Existing
    files are never replaced unless `force`: an image whose outputs all exist is skipped (so a
    rerun finishes an interrupted batch), one with some of them gets only the missing ones. Ctrl-C
    raises `unetkit.errors.Interrupted` naming the images done. `echo` receives notes for the user.
    Returns the paths written.

    A 3D model (`UNet(dims=3)`, or a `unetkit.segment_volume.VolumeSegmenter`) segments each
    z-stack whole instead (`unetkit.segment_volume.segment_volume_files`): probabilities
    (n_classes, Z, Y, X), labels (Z, Y, X); `ctc` and `stitch` are refused there.

    Example:
        >>> segment_files(["cells.tif"], "run/best.pt", "predictions")  # doctest: +SKIP
    """
    note = echo or (lambda message: None)
    segmenter = _load_segmenter(model)
    out = Path(out)
    broken: list[Path] = []  # links to images that are gone, noted with --skip-unreadable
    if not isinstance(segmenter, Segmenter):  # a 3D model: each stack is one volume
        if ctc or stitch is not None:
            refuse_two_d_options(["--ctc" if ctc else "--stitch"], str(segmenter.source or "the model"))
        stores = [Path(p) for p in inputs if is_zarr_path(p)]
        files = collect_files([p for p in inputs if not is_zarr_path(p)], out, broken=broken if skip_unreadable else None)
        if broken:
            note(f"skipping {len(broken)} broken link(s) to images that are gone: {listing(broken)}")
        return segment_volume_files([*files, *stores], segmenter, out, force=force, progress=progress,
                                    skip_unreadable=skip_unreadable, echo=echo)
    files = collect_files(inputs, out, broken=broken if skip_unreadable else None)
    check_writable_folder(out, "--out")
    ctc_dir = out / "ctc"
    frames: dict[Path, str] = {}
    if ctc:
        check_writable_folder(ctc_dir, "--out (its ctc/ folder)")
        for f in files:
            frame = ctc_frame(f.stem)
            if frame is None:
                raise InputError(
                    f"{f}: --ctc numbers the masks by frame, but this name has no frame number; name the inputs "
                    "tNNN.tif like the Cell Tracking Challenge (t000.tif -> mask000.tif) or leave out --ctc"
                )
            frames[f] = frame
        check_unique_frames(frames)
    in_channels = segmenter.model.in_channels
    readable, unreadable = [], []
    stacks: set[Path] = set()
    for f in files:
        try:
            header = read_header(f, pages=True)
        except InputError as exc:
            unreadable.append((f, exc))
            continue
        if header.planes > 1:
            if in_channels != 1 or len(header.shape) != 3:
                raise InputError(f"{f}: a stack of {header.planes} planes of shape {header.shape[1:]}; unetkit segments "
                                 "stacks of one-channel planes, plane by plane, with one-channel models (this model takes "
                                 f"{in_channels}): save each plane as its own file")
            if ctc:
                raise InputError(f"{f}: --ctc numbers one mask per frame file; a stack holds {header.planes} planes: save each "
                                 "plane as tNNN.tif, or leave out --ctc")
            stacks.add(f)
            readable.append(f)
            continue
        channels = to_chw(np.broadcast_to(np.zeros((), header.dtype), header.shape), name=str(f)).shape[0]
        if channels != in_channels:
            raise InputError(f"{f}: has {channels} channel(s), the model was trained on {in_channels}")
        readable.append(f)
    if broken:
        note(f"skipping {len(broken)} broken link(s) to images that are gone: {listing(broken)}")
    if unreadable and not skip_unreadable:
        more = f" ({len(unreadable) - 1} more unreadable input(s))" if len(unreadable) > 1 else ""
        raise InputError(f"{unreadable[0][1]}{more}; nothing was segmented; add --skip-unreadable to segment the others")
    if unreadable:
        note(f"skipping {len(unreadable)} unreadable input(s): {listing([f for f, _ in unreadable])}")
        if not readable:
            raise InputError("none of the inputs is a readable image; nothing to segment")

    def targets(f: Path) -> list[Path]:
        paths = [out / f"{f.stem}_probabilities.tif", out / f"{f.stem}_labels.tif"]
        return paths + [ctc_dir / f"mask{frames[f]}.tif"] if ctc else paths

    jobs = [(f, targets(f)) for f in readable]
    if not force:
        complete = [f for f, paths in jobs if all(p.exists() for p in paths)]
        if complete:
            note(f"skipping {len(complete)} image(s) whose outputs already exist in {out}: {listing(complete)} "
                 "(add --force to segment them again)")
        jobs = [(f, paths) for f, paths in jobs if f not in complete]
    for folder in (out, ctc_dir) if ctc else (out,):
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(folder, older_than=600.0)  # left by a killed run, not by one still writing
    written: list[Path] = []
    done: list[Path] = []
    damaged: list[Path] = []
    try:
        for path, paths in tqdm(jobs, disable=not progress, desc="images", unit="image"):
            try:
                raw = read_image(path, pages=path in stacks)
            except InputError as exc:
                if not skip_unreadable:
                    raise InputError(f"{exc}; {len(done)} image(s) were segmented before it; add --skip-unreadable "
                                     "to segment the others") from None
                damaged.append(path)
                note(f"skipping {path}: {exc}")
                continue
            if path in stacks:
                stacked = segment_stack(segmenter, raw, name=str(path), stitch=stitch)
                for line in stacked.notes + segmenter.take_notes():
                    note(line)
                result, label_image = stacked.probabilities, stacked.labels
            else:
                for warning in segmenter.check_raw(raw, str(path)):
                    note(warning)
                result = segmenter.probabilities(segmenter.normalize(raw, str(path)))
                for line in segmenter.take_notes():
                    note(line)
                label_image = segmenter.labels(result)
            if ctc and label_image.max(initial=0) > np.iinfo(np.uint16).max:
                raise InputError(f"{path}: {int(label_image.max())} objects do not fit the Cell Tracking Challenge's 16-bit "
                                 "masks; leave out --ctc")
            arrays = [result, label_image, label_image.astype(np.uint16)]
            try:
                for target, array in zip(paths, arrays):
                    if force or not target.exists():
                        written.append(write_tiff(target, array, force=force, planes=path in stacks))
            except InputError as exc:  # disk full, read-only, file too large: say how far the batch got
                raise InputError(f"{exc}; {len(done)} of {len(jobs)} image(s) were segmented and written before it; "
                                 "run the same command again to segment the rest") from None
            done.append(path)
    except KeyboardInterrupt:
        left = [f for f, _ in jobs[len(done) + len(damaged):]]
        finished = f" ({listing(done)})" if done else ""
        raise Interrupted(
            f"{len(done)} of {len(jobs)} image(s) segmented{finished}; not done: {listing(left)}. Run the same "
            "command again to segment the rest (images whose outputs exist are skipped)"
        ) from None
    return written


def _load_segmenter(model):
    """A `Segmenter` for a 2D checkpoint path or name, a `VolumeSegmenter` for a 3D one."""
    from .checkpoint import LoadedModel, load_checkpoint

    if isinstance(model, VolumeSegmenter):
        return model
    if isinstance(model, Segmenter):
        return VolumeSegmenter(model.loaded, model.options, source=model.source) if is_volume_model(model.loaded) else model
    loaded = model if isinstance(model, LoadedModel) else load_checkpoint(model)
    source = None if isinstance(model, LoadedModel) else model
    if is_volume_model(loaded):
        return VolumeSegmenter(loaded, source=source)
    return Segmenter(loaded, source=source)


def collect_files(inputs: Sequence, out, *, broken: list[Path] | None = None) -> list[Path]:
    """The image files named by `inputs` (files, or folders of PNG/TIFF images), checked against
    the output folder `out` (not an input folder, no input inside it) and for names whose outputs
    would collide. Links to images that are gone raise, or are appended to `broken` when given.

    Example:
        >>> collect_files(["images/"], "predictions")  # doctest: +SKIP
        [PosixPath('images/cell0.tif'), PosixPath('images/cell1.tif')]
    """
    out = Path(out)
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            if item.resolve() == out.resolve():
                raise InputError(f"{out}: --out is the input folder; a rerun would segment its own outputs; choose another --out")
            found = list_images(item, broken_links=broken)
            if not found:
                raise InputError(f"{item}: no PNG or TIFF images in this folder")
            files.extend(found)
        elif item.is_file():
            if item.suffix.lower() not in IMAGE_SUFFIXES:
                raise InputError(f"{item}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
            if item.resolve().parent == out.resolve():
                raise InputError(f"{item}: lies in the --out folder, where its outputs would be written beside it; choose another --out")
            files.append(item)
        else:
            raise InputError(f"{item}: no such file or folder")
    stems = [f.stem for f in files]
    duplicates = sorted(repeated(stems))
    if duplicates:
        raise InputError(f"several inputs share the name(s) {duplicates}; their outputs would collide, predict them separately")
    return files
