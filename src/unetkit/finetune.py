"""Fine-tuning: train a few minutes on a few annotated images, starting from a trained model.

`fine_tune` (in memory: the napari annotate-and-retrain loop) and ``unetkit train --from MODEL``
(dataset folders) share one implementation, `prepare_fine_tune`: the start model fixes the
network (depth, width, padding, batch norm, dropout, channels, classes), the normalisation and
the loss and augmentation it was trained with; `unetkit.recipes.FINETUNE` gives the optimiser
and budget (Adam at 1e-3 with a cosine decay over 120 CPU-seconds;
the reasons are given there). The run folder is a normal one: RUN/best.pt holds the labels rule
chosen on validation and works with ``unetkit predict --model RUN/best.pt``; RUN/finetune.json
records the start model and how validation was done.

Objects far from the size the start model was trained on (`unetkit.scale.far_from`: the median
diameter of the masks against the start model's recorded one) are brought to its size first: the
images and masks are rescaled (`rescale_to_start`), as Cellpose trains at one object size, so the
start model's features apply from the first step. The new checkpoint records the objects'
diameter in the user's images (``scale["input_diameter"]``) and `unetkit.inference.Segmenter`
rescales new images the same way unless told another ``--diameter``.

With fewer than `FEW_IMAGES` annotated images no whole image can be held out: the last quarter of
each image (across its longer side) is then kept for validation and never trained on, so best.pt
and the labels rule, including whether each image's own batch-norm statistics beat the training
images', are chosen on pixels the network has not seen (two DSB2018 quarters fine-tuned at the
model's scale: held-out SEG 0.69 with a cross-check, 0.79-0.80 with held-out quarters; see
docs/TRAINING.md). Where no such part holds objects, they are chosen on the training images
themselves (a cross-check, said in the summary and in RUN/finetune.json), whose scores are
optimistic.

Example:
    >>> best = fine_tune("fluo-nuclei", [image], [mask], "runs/tuned", seconds=60)  # doctest: +SKIP
    >>> best.name  # doctest: +SKIP
    'best.pt'
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import InputError

#: With fewer annotated images than this, none is held out whole: validation is on the last part of
#: each image (`HELD_OUT_PARTS`), or a cross-check on the training images where no part holds objects.
FEW_IMAGES = 3
HELD_OUT_PARTS = ("the last quarter of each annotated image (across its longer side), never trained on: too few "
                  "annotated images to hold a whole one out")
CROSS_CHECK = ("cross-check on the training images (too few annotated images to hold one out; "
               "the validation scores and the labels rule are chosen on the images trained on, so they are optimistic)")
#: The network the start model fixes, as (TrainConfig field, command-line option).
NETWORK_OPTIONS = (("depth", "--depth"), ("base_channels", "--width"), ("padding", "--padding"),
                   ("batch_norm", "--batch-norm"), ("dropout", "--dropout"))


def load_start(start: Any) -> tuple[Any, str]:
    """The start model (`LoadedModel`) and how to name it: a packaged model's name, a checkpoint
    path, or a `LoadedModel` itself. InputError (naming the fix) for anything else."""
    from .checkpoint import LoadedModel, load_checkpoint

    if isinstance(start, LoadedModel):
        return start, "a model in memory"
    if not isinstance(start, (str, os.PathLike)):
        raise InputError(f"start must be a packaged model name, a checkpoint path or a LoadedModel (got {type(start).__name__})")
    label = os.fspath(start)
    loaded = load_checkpoint(start)
    n_classes = int(loaded.model.config.get("n_classes", 2))
    if n_classes != 2:
        raise InputError(f"{label}: a {n_classes}-class model; fine-tuning takes background/foreground models "
                         "(train a new model instead)")
    return loaded, label


def start_task(loaded) -> str | None:
    """"membranes" or "objects": what the start model's masks were (from its labels rule), if it says."""
    task = (loaded.decision or {}).get("task")
    return task if task in ("membranes", "objects") else None


def start_diameter(loaded, label: str) -> float | None:
    """The median object diameter (pixels) the start model was trained on: its checkpoint's record,
    else the packaged model's (models.json); None when neither says."""
    from .pretrained import get_model, pretrained_name
    from .scale import model_scale

    packaged = pretrained_name(label) if isinstance(label, str) else None
    diameter = model_scale(loaded, get_model(packaged).scale if packaged else None).get("diameter")
    return float(diameter) if diameter else None


def rescale_to_start(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], start: float | None,
                     diameter: float | None) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """Images and masks rescaled so objects of median `diameter` take the start model's `start`
    size, when the two are far apart (`unetkit.scale.far_from`); returns them and the factor (1.0
    when left as they are, or when either size is unknown).

    Example:
        >>> image, mask = np.zeros((40, 50), np.float32), np.zeros((40, 50), np.uint16)
        >>> images, masks, factor = rescale_to_start([image], [mask], start=60.0, diameter=20.0)
        >>> factor, images[0].shape, masks[0].shape
        (3.0, (120, 150), (120, 150))
        >>> rescale_to_start([image], [mask], start=60.0, diameter=50.0)[2]
        1.0
    """
    from .scale import far_from

    if not far_from(diameter, start):
        return list(images), list(masks), 1.0
    factor = float(start) / float(diameter)
    return *_rescaled(images, masks, factor), factor


def _rescaled(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], factor: float) -> tuple[list, list]:
    """Images and masks rescaled by `factor` (`unetkit.scale.rescale_pair`)."""
    from .scale import rescale_pair

    pairs = [rescale_pair(image, mask, factor) for image, mask in zip(images, masks)]
    return [image for image, _ in pairs], [mask for _, mask in pairs]


def choose_tile(geometry, largest: int, sides: Sequence[int]) -> int:
    """The largest legal tile up to `largest` whose output fits in the smallest image side
    (`sides`), so few tiles are mirrored copies; the smallest legal tile if none fits.

    Example:
        >>> from unetkit.geometry import Geometry
        >>> choose_tile(Geometry(depth=5), 572, [256, 300]), choose_tile(Geometry(depth=5), 572, [2000])
        (428, 572)
    """
    fitting = [size for size in geometry.legal_sizes(largest) if geometry.output_size(size) <= min(sides)]
    return fitting[-1] if fitting else geometry.min_size


def finetune_config(loaded, label: str, sides: Sequence[int], *, seconds: float | None = 120.0,
                    overrides: dict[str, Any] | None = None):
    """The `TrainConfig` of fine-tuning `loaded`: its network, its loss and augmentation (from its
    training config), `unetkit.recipes.FINETUNE`, then `overrides` (TrainConfig fields; "targets"
    and "augment" as dicts of their fields). An override of the network that differs from the start
    model's is refused: the weights fit that network only."""
    from .recipes import FINETUNE
    from .train import TrainConfig

    overrides = dict(overrides or {})
    network = {key: loaded.model.config[key] for key, _ in NETWORK_OPTIONS}
    for key, option in NETWORK_OPTIONS:
        if key in overrides and overrides[key] != network[key]:
            shown = ("--batch-norm" if network[key] else "--no-batch-norm") if key == "batch_norm" else f"{option} {network[key]}"
            raise InputError(f"{option} {overrides[key]}: {label} has {shown} and fine-tuning keeps its network; "
                             f"leave out {option} (or train from scratch without --from)")
    start = {}
    if loaded.train_config:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                start = TrainConfig.from_dict(loaded.train_config).to_dict()
            except (ValueError, TypeError):  # a config of another unetkit version: the loss and augmentation defaults
                start = {}
    values: dict[str, Any] = {key: start[key] for key in ("targets", "augment", "dice_weight", "batch_size") if key in start}
    values.update(network)
    values.update(FINETUNE)
    geometry = TrainConfig(**network, iterations=1).geometry
    values["tile_size"] = choose_tile(geometry, int(start.get("tile_size", 572)), sides)
    values.update(iterations=None, max_seconds=seconds)
    for key in ("targets", "augment"):
        if key in overrides:
            values[key] = {**dict(values.get(key) or {}), **dict(overrides.pop(key))}
    values.update(overrides)
    if values.get("iterations") is None and values.get("max_seconds") is None:
        values["max_seconds"] = FINETUNE_SECONDS
    return TrainConfig(**values)


#: The budget when neither seconds nor iterations are given.
FINETUNE_SECONDS = 120.0


def _samples(loaded, label: str, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], names: Sequence[str],
             targets, allow_intensity_masks: bool) -> list:
    """Samples normalised as the start model normalises, after the checks that need no training."""
    from .data import make_sample, to_chw

    if len(images) != len(masks):
        raise InputError(f"{len(images)} images but {len(masks)} masks; give one instance mask per image")
    channels = int(loaded.model.config.get("in_channels", 1))
    samples = []
    for image, mask, name in zip(images, masks, names):
        found = int(to_chw(np.asarray(image), name=name).shape[0])
        if found != channels:
            hint = "convert the images to grayscale" if channels == 1 else f"give {channels}-channel images"
            raise InputError(f"{name}: {found}-channel image, but {label} takes {channels} channel"
                             f"{'s' if channels != 1 else ''}; {hint}, or train from scratch without --from")
        samples.append(make_sample(np.asarray(image), np.asarray(mask), name, loaded.normalization, targets=targets,
                                   allow_intensity_masks=allow_intensity_masks))
    return samples


def _check_task(loaded, label: str, samples: Sequence) -> None:
    """Refuse masks of another kind than the start model's (membranes into an object model, or the reverse)."""
    from .decision import infer_task

    expected = start_task(loaded)
    found = infer_task([sample.instances for sample in samples])
    if expected and found != expected:
        kinds = {"membranes": "membrane masks (cell interiors between thin boundaries, EM)",
                 "objects": "object masks (cells or nuclei on background)"}
        raise InputError(f"the masks are {kinds[found]} but {label} was trained on {kinds[expected]}; "
                         f"start from a model trained on {found} (e.g. "
                         f"{'em-membranes' if found == 'membranes' else 'fluo-nuclei or dic-hela'}) or train from scratch")


def prepare_fine_tune(
    start: Any,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    run_dir: str | os.PathLike,
    *,
    names: Sequence[str] | None = None,
    val_images: Sequence[np.ndarray] | None = None,
    val_masks: Sequence[np.ndarray] | None = None,
    val_names: Sequence[str] | None = None,
    seconds: float | None = FINETUNE_SECONDS,
    overrides: dict[str, Any] | None = None,
    allow_intensity_masks: bool = False,
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    force: bool = False,
    record: Callable[[Path, list[str], list[str], dict], None] | None = None,
    rescale: bool = True,
):
    """Check everything, then create the run folder and return the `unetkit.train.Trainer` whose
    network holds the start model's weights (call `.fit()`). The one implementation of
    `fine_tune` and ``unetkit train --from``.

    Validation: `val_images`/`val_masks` if given; else the last image when there are at least
    `FEW_IMAGES`; else the last quarter of each image, never trained on (`HELD_OUT_PARTS`), or,
    where no such part holds objects, a cross-check on the training images (`CROSS_CHECK`). With
    `rescale`, objects far from the start model's size are brought to it (`rescale_to_start`;
    the validation images by the same factor). `record(run_dir, train_names, val_names, extra)`
    writes what the caller wants kept beside (the command line's data.json, so ``--resume``
    works; `extra` holds "rescaled", "validation_part" and the "scale" the checkpoints record).
    Nothing is created when a check fails.
    """
    from .data.split import VALIDATION_PART, validation_part_name
    from .io import prepare_output_dir
    from .train import RunLock, Trainer

    loaded, label = load_start(start)
    images, masks = list(images), list(masks)
    if not images:
        raise InputError("no annotated images; give at least one image with its instance mask")
    if len(images) != len(masks):
        raise InputError(f"{len(images)} images but {len(masks)} masks; give one instance mask per image")
    names = list(names) if names is not None else [f"image{i}" for i in range(len(images))]
    for image, name in zip(images, names):
        _hw(image, name)
    diameter = None if allow_intensity_masks else _masks_diameter(masks)
    start = start_diameter(loaded, label)
    images, masks, factor = rescale_to_start(images, masks, start, diameter) if rescale else (images, masks, 1.0)
    if factor != 1.0 and val_images is not None and len(val_images) == len(val_masks or []):
        val_images, val_masks = _rescaled(val_images, val_masks or [], factor)
    # the scale the checkpoints record, of the whole masks (held-out parts would cut objects in two)
    extra: dict[str, Any] = {}
    if factor != 1.0:  # new images are rescaled by the same factor: input_diameter -> diameter
        extra["rescaled"] = {"factor": factor}
        extra["scale"] = {"diameter": round(float(start), 2), "input_diameter": round(float(diameter), 2)}
    elif diameter is not None:
        extra["scale"] = {"diameter": round(diameter, 2)}
    held = []  # names of the images whose last part is held out for validation
    if val_images is None and len(images) < FEW_IMAGES:
        images, masks, val_images, val_masks, held = _validation_parts(images, masks, names)
        if held:
            val_names = [validation_part_name(name) for name in held]
            extra["validation_part"] = VALIDATION_PART
    sides = [min(_hw(image, name)) for image, name in zip(images, names)]
    config = finetune_config(loaded, label, sides, seconds=seconds, overrides=overrides)
    samples = _samples(loaded, label, images, masks, names, config.targets, allow_intensity_masks)
    if val_images is not None:
        val_list = list(val_images)
        val_names = list(val_names) if val_names is not None else [f"val{i}" for i in range(len(val_list))]
        train, validation = samples, _samples(loaded, label, val_list, list(val_masks or []), val_names, config.targets,
                                              allow_intensity_masks)
        note = HELD_OUT_PARTS if held else None
    elif len(samples) >= FEW_IMAGES:
        train, validation, note = samples[:-1], samples[-1:], None
    else:
        train, validation, note = samples, samples, CROSS_CHECK
    _check_task(loaded, label, samples + ([] if validation is samples else list(validation)))
    for sample in validation:
        if not sample.instances.any():
            raise InputError(f"{sample.name}: this validation mask has no objects, so validation cannot score it; "
                             "annotate at least one object in it")
    run_dir = Path(run_dir)
    RunLock(run_dir).check()
    prepare_output_dir(run_dir, force=force)
    facts = {"start": label, "start_scale": {"diameter": start} if start else {},
             "objects_diameter": diameter, "rescaled_by": factor,
             "train": [s.name for s in train], "validation": [s.name for s in validation],
             "validation_mode": "parts" if held else "cross-check" if note else "held-out", "note": note,
             "recipe": "unetkit.recipes.FINETUNE"}
    from .io import atomic_write

    text = json.dumps(facts, indent=2)
    atomic_write(run_dir / "finetune.json", lambda path: path.write_text(text), force=True)
    if record is not None:
        record(run_dir, [s.name for s in train], held or [s.name for s in validation], extra)
    trainer = Trainer(config, train, validation, run_dir, normalization=loaded.normalization,
                      class_names=loaded.class_names, progress=progress, initial=loaded.model,
                      callback=callback, should_stop=should_stop, validation_note=note)
    if "scale" in extra:
        trainer.scale = {**trainer.scale, **extra["scale"]}
    return trainer


def _validation_parts(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], names: Sequence[str]):
    """Training images and masks with their last part cut off where both parts hold objects, those
    parts, and the names of the images cut (`unetkit.data.split.cut_validation_part`)."""
    from .data import to_chw
    from .data.split import cut_validation_part

    train_images, train_masks, val_images, val_masks, held = [], [], [], [], []
    for image, mask, name in zip(images, masks, names):
        mask = np.asarray(mask)
        if mask.ndim == 2 and mask.shape == _hw(image, name):
            first, first_mask, last, last_mask = cut_validation_part(to_chw(np.asarray(image), name=name), mask)
            if (first_mask > 0).any() and (last_mask > 0).any():
                train_images.append(first)
                train_masks.append(first_mask)
                val_images.append(last)
                val_masks.append(last_mask)
                held.append(name)
                continue
        train_images.append(image)  # whole: cutting would leave a part without objects (or the mask is refused later)
        train_masks.append(mask)
    return train_images, train_masks, (val_images if held else None), (val_masks if held else None), held


def _masks_diameter(masks: Sequence[np.ndarray]) -> float | None:
    """Median object diameter of the masks (None when none holds objects); binary masks count their components."""
    from .labels import as_instances
    from .scale import median_diameter

    try:
        return median_diameter([as_instances(np.asarray(m)) for m in masks])
    except InputError:
        return None  # the mask checks that follow name the file and the fix


def _hw(image: np.ndarray, name: str) -> tuple[int, int]:
    from .data import to_chw

    shape = to_chw(np.asarray(image), name=name).shape
    return int(shape[1]), int(shape[2])


def fine_tune(
    start: Any,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    run_dir: str | os.PathLike,
    *,
    seconds: float = 120.0,
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    force: bool = False,
    budget_clock: str = "cpu",
    precision_scores: bool = True,
    rescale: bool = True,
) -> Path:
    """Fine-tune a model on a few annotated images in memory; returns RUN/best.pt.

    Signature:
        fine_tune(start, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], run_dir, *,
        seconds: float = 120.0, progress: bool = False, callback: Callable[[dict], None] | None = None,
        should_stop: Callable[[], bool] | None = None, force: bool = False, budget_clock: str = "cpu",
        precision_scores: bool = True, rescale: bool = True) -> pathlib.Path

    Args:
        start: a packaged model name ("fluo-nuclei"), a checkpoint path (RUN/best.pt) or a
            `unetkit.checkpoint.LoadedModel`; its network, normalisation, loss and augmentation are kept.
        images: raw 2D images, (H, W) or (C, H, W), any size and dtype.
        masks: instance label arrays (H, W), 0 background, one per image.
        run_dir: the run folder to create (must be empty unless `force`).
        seconds: the training budget, in CPU-seconds of this process (`budget_clock="cpu"`, the
            same work on a busy machine) or in elapsed seconds (`"wall"`, what a user waiting at
            a viewer counts).
        progress: show a progress bar.
        callback: called after every iteration with {"iteration": i, "loss": float, "seconds": s,
            "budget": seconds, "iterations": None, "val_iou": float or None}.
        should_stop: polled after every iteration; True ends training early, and best.pt is still
            written with a labels rule chosen on validation.
        force: reuse a non-empty `run_dir`.
        budget_clock: "cpu" or "wall", what `seconds` counts.
        precision_scores: score the labels rule in each precision the machine runs at the end
            (RUN/best.precision.json, for `--precision auto`); off saves those seconds.
        rescale: bring objects far from the start model's size to it (`rescale_to_start`); the
            new model then rescales the images it segments the same way.

    With fewer than 3 images validation is the last quarter of each image, never trained on (a
    cross-check on the training images where no such part holds objects; RUN/finetune.json says
    which); with 3 or more the last image is held out. InputError (nothing created) for a start
    model of another channel count, masks of another kind than the model's, or a start that is not
    a checkpoint.

    Example:
        >>> best = fine_tune("fluo-nuclei", [image], [mask], "runs/tuned", seconds=60)  # doctest: +SKIP
        >>> from unetkit.inference import Segmenter  # doctest: +SKIP
        >>> Segmenter.load(best).segment(other_image).labels.max()  # doctest: +SKIP
    """
    trainer = prepare_fine_tune(start, images, masks, run_dir, seconds=seconds, progress=progress,
                                callback=callback, should_stop=should_stop, force=force, rescale=rescale,
                                overrides={"budget_clock": budget_clock, "precision_scores": precision_scores})
    trainer.fit()
    return Path(run_dir) / "best.pt"
