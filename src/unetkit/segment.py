"""File-level segmentation: read images, normalise them as the checkpoint says, predict with
`unetkit.predict`, turn probabilities into labels and write the results.

`unetkit.predict` is the array-in, array-out overlap-tile engine; this module is what
``unetkit predict`` runs on files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from .backends import check_backend
from .checkpoint import load_checkpoint
from .data.normalize import to_chw
from .data.readers import ctc_frame
from .decision import DecisionRule
from .device import resolve_device
from .errors import InputError, Interrupted
from .io import IMAGE_SUFFIXES, check_writable_folder, list_images, listing, read_header, read_image, remove_stale_temp_files, repeated, write_tiff
from .predict import predict
from .pretrained import check_input, pretrained_name


def labels_rule(
    stored: dict | None, *, threshold: float | None = None, watershed: bool | None = None, min_size: int | None = None
) -> DecisionRule:
    """The rule that turns probabilities into labels: the checkpoint's `stored` one (chosen on
    validation) unless an option is given, else components (or the distance watershed) at
    `threshold` (0.5) without test-time augmentation.

    Example:
        >>> labels_rule({"method": "seeded", "threshold": 0.3, "tta": True}).method
        'seeded'
        >>> labels_rule({"method": "seeded", "threshold": 0.3}, threshold=0.6).method
        'components'
    """
    if stored and threshold is None and watershed is None and min_size is None:
        return DecisionRule.from_dict(stored)
    return DecisionRule(method="watershed" if watershed else "components",
                        threshold=0.5 if threshold is None else threshold, min_size=min_size or 0)


def labels_from_probabilities(
    probabilities: np.ndarray, rule: DecisionRule, *, binary: bool = False, fill_holes: bool = True
) -> np.ndarray:
    """The label image `unetkit predict` writes for (n_classes, H, W) `probabilities`: uint16
    instances drawn by `rule` from the foreground (every class but the first), or with `binary`
    uint8 0/1 foreground above the rule's threshold.

    Example:
        >>> p = np.zeros((2, 4, 6), np.float32); p[1, :, :2] = p[1, :, 4:] = 0.9; p[0] = 1 - p[1]
        >>> labels_from_probabilities(p, DecisionRule())[0].tolist()
        [1, 1, 0, 0, 2, 2]
    """
    foreground = probabilities[1:].sum(0) if probabilities.shape[0] > 2 else probabilities[-1]
    if binary:
        return (foreground > rule.threshold).astype(np.uint8)
    return rule.apply(foreground, fill_holes=fill_holes).astype(np.uint16)


def segment_files(
    inputs: Sequence,
    checkpoint,
    out,
    *,
    tta: bool | None = None,
    tile_size: int | None = None,
    batch_size: int = 1,
    device: str = "auto",
    backend: str = "auto",
    threshold: float | None = None,
    labels: str = "instances",
    watershed: bool | None = None,
    min_size: int | None = None,
    fill_holes: bool = True,
    ctc: bool = False,
    force: bool = False,
    progress: bool = False,
    skip_unreadable: bool = False,
    echo: Callable[[str], None] | None = None,
    norm_statistics: str | None = None,
) -> list:
    """Segment image files with a checkpoint; writes NAME_probabilities.tif and NAME_labels.tif.

    Probabilities are float32 (n_classes, H, W); labels are uint16 instance ids (or uint8 0/1
    with `labels="binary"`). Labels follow the rule stored in the checkpoint when training chose
    one on its validation images (`unetkit.decision`), including its test-time augmentation,
    unless `threshold`, `watershed` or `min_size` is given; without a stored rule they are the
    4-connected components of foreground > 0.5 (`tta`, `threshold`, `min_size` default to off,
    0.5 and 0). `backend` is `unetkit.predict`'s ("auto", "torch" or "onnxruntime"), and so is
    `norm_statistics` ("training" or "image"; default: as the stored rule was chosen). A packaged model (`unetkit models`) warns about images unlike its training data. With `ctc`, also ``ctc/maskNNN.tif`` numbered by each input's frame
    (t041.tif -> mask041.tif); inputs without a frame number are refused.

    Before anything is computed, the options, the output folder (writable, not an input folder)
    and every input's header are checked; an unreadable input is an error, or is skipped with a
    note if `skip_unreadable`. Existing files are never replaced unless `force`: an image whose
    outputs all exist is skipped (so a rerun finishes an interrupted batch), one with some of them
    gets only the missing ones. Ctrl-C raises `unetkit.errors.Interrupted` naming the images done.
    `echo` receives notes for the user (skipped inputs). Returns the paths written.

    Example:
        >>> segment_files(["cells.tif"], "run/best.pt", "predictions")  # doctest: +SKIP
    """
    note = echo or (lambda message: None)
    if labels not in ("instances", "binary"):
        raise InputError(f"--labels must be 'instances' or 'binary' (got {labels!r})")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise InputError(f"--threshold must be in [0, 1] (got {threshold})")
    if min_size is not None and (int(min_size) != min_size or min_size < 0):
        raise InputError(f"--min-size must be a whole number of pixels >= 0 (got {min_size})")
    if int(batch_size) != batch_size or batch_size < 1:
        raise InputError(f"--batch-size must be an integer >= 1 (got {batch_size})")
    torch_device = resolve_device(device)
    check_backend(backend, torch_device)
    out = Path(out)
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            if item.resolve() == out.resolve():
                raise InputError(f"{out}: --out is the input folder; a rerun would segment its own outputs; choose another --out")
            found = list_images(item)
            if not found:
                raise InputError(f"{item}: no PNG or TIFF images in this folder")
            files.extend(found)
        elif item.is_file():
            if item.suffix.lower() not in IMAGE_SUFFIXES:
                raise InputError(f"{item}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
            files.append(item)
        else:
            raise InputError(f"{item}: no such file or folder")
    stems = [f.stem for f in files]
    duplicates = sorted(repeated(stems))
    if duplicates:
        raise InputError(f"several inputs share the name(s) {duplicates}; their outputs would collide, predict them separately")
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
    loaded = load_checkpoint(checkpoint)
    net = loaded.model
    rule = labels_rule(loaded.decision, threshold=threshold, watershed=watershed, min_size=min_size)
    tta = rule.tta if tta is None else bool(tta)
    packaged = pretrained_name(checkpoint)
    if tile_size is not None:
        net.geometry.check(tile_size, "--tile-size")
    readable, unreadable = [], []
    for f in files:
        try:
            header = read_header(f)
        except InputError as exc:
            unreadable.append((f, exc))
            continue
        channels = to_chw(np.broadcast_to(np.zeros((), header.dtype), header.shape), name=str(f)).shape[0]
        if channels != net.in_channels:
            raise InputError(f"{f}: has {channels} channel(s), the model was trained on {net.in_channels}")
        readable.append(f)
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
    try:
        for path, paths in tqdm(jobs, disable=not progress, desc="images", unit="image"):
            raw = read_image(path)
            if packaged:
                check_input(packaged, raw, source=str(path))
            image = loaded.normalization(raw)
            if not np.isfinite(image).all():
                raise InputError(f"{path}: image contains NaN or infinite values; replace them before predicting")
            probabilities = predict(net, image, tile_size=tile_size, batch_size=batch_size, tta=tta, device=torch_device, backend=backend,
                                    norm_statistics=norm_statistics or rule.norm_statistics)
            label_image = labels_from_probabilities(probabilities, rule, binary=labels == "binary", fill_holes=fill_holes)
            arrays = [probabilities, label_image, label_image.astype(np.uint16)]
            for target, array in zip(paths, arrays):
                if force or not target.exists():
                    written.append(write_tiff(target, array, force=force))
            done.append(path)
    except KeyboardInterrupt:
        left = [f for f, _ in jobs[len(done):]]
        finished = f" ({listing(done)})" if done else ""
        raise Interrupted(
            f"{len(done)} of {len(jobs)} image(s) segmented{finished}; not done: {listing(left)}. Run the same "
            "command again to segment the rest (images whose outputs exist are skipped)"
        ) from None
    return written
