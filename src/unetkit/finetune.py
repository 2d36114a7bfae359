"""Fine-tuning: train a few minutes on a few annotated images, starting from a trained model.

`fine_tune` (in memory: the napari annotate-and-retrain loop) and ``unetkit train --from MODEL``
(dataset folders) share one implementation, `prepare_fine_tune`: the start model fixes the
network (depth, width, padding, batch norm, dropout, channels, classes), the normalisation and
the loss and augmentation it was trained with; `unetkit.recipes.FINETUNE` gives the optimiser
and budget (Adam at 1e-3 with a cosine decay over 120 CPU-seconds;
the reasons are given there). The run folder is a normal one: RUN/best.pt holds the labels rule
chosen on validation and works with ``unetkit predict --model RUN/best.pt``; RUN/finetune.json
records the start model and how validation was done.

With fewer than `FEW_IMAGES` annotated images none can be held out: the rule and best.pt are then
chosen on the training images themselves (a cross-check, said in the summary and in
RUN/finetune.json), whose scores are optimistic.

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

#: With fewer annotated images than this, none is held out and validation is a cross-check on the training images.
FEW_IMAGES = 3
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
    record: Callable[[Path, list[str], list[str]], None] | None = None,
):
    """Check everything, then create the run folder and return the `unetkit.train.Trainer` whose
    network holds the start model's weights (call `.fit()`). The one implementation of
    `fine_tune` and ``unetkit train --from``.

    Validation: `val_images`/`val_masks` if given; else the last image when there are at least
    `FEW_IMAGES`; else a cross-check on the training images (`CROSS_CHECK`). `record(run_dir,
    train_names, val_names)` writes what the caller wants kept beside (the command line's
    data.json, so ``--resume`` works). Nothing is created when a check fails.
    """
    from .io import prepare_output_dir
    from .train import RunLock, Trainer

    loaded, label = load_start(start)
    images, masks = list(images), list(masks)
    if not images:
        raise InputError("no annotated images; give at least one image with its instance mask")
    names = list(names) if names is not None else [f"image{i}" for i in range(len(images))]
    sides = [min(_hw(image, name)) for image, name in zip(images, names)]
    config = finetune_config(loaded, label, sides, seconds=seconds, overrides=overrides)
    samples = _samples(loaded, label, images, masks, names, config.targets, allow_intensity_masks)
    if val_images is not None:
        val_list = list(val_images)
        val_names = list(val_names) if val_names is not None else [f"val{i}" for i in range(len(val_list))]
        train, validation = samples, _samples(loaded, label, val_list, list(val_masks or []), val_names, config.targets,
                                              allow_intensity_masks)
        note = None
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
    facts = {"start": label, "start_scale": dict(getattr(loaded, "scale", {}) or {}),
             "train": [s.name for s in train], "validation": [s.name for s in validation],
             "validation_mode": "cross-check" if note else "held-out", "note": note,
             "recipe": "unetkit.recipes.FINETUNE"}
    from .io import atomic_write

    text = json.dumps(facts, indent=2)
    atomic_write(run_dir / "finetune.json", lambda path: path.write_text(text), force=True)
    if record is not None:
        record(run_dir, [s.name for s in train], [s.name for s in validation])
    return Trainer(config, train, validation, run_dir, normalization=loaded.normalization,
                   class_names=loaded.class_names, progress=progress, initial=loaded.model,
                   callback=callback, should_stop=should_stop, validation_note=note)


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
) -> Path:
    """Fine-tune a model on a few annotated images in memory; returns RUN/best.pt.

    Signature:
        fine_tune(start, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], run_dir, *,
        seconds: float = 120.0, progress: bool = False, callback: Callable[[dict], None] | None = None,
        should_stop: Callable[[], bool] | None = None, force: bool = False, budget_clock: str = "cpu",
        precision_scores: bool = True) -> pathlib.Path

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

    With fewer than 3 images validation is a cross-check on the training images (RUN/finetune.json
    says so); with 3 or more the last image is held out. InputError (nothing created) for a start
    model of another channel count, masks of another kind than the model's, or a start that is not
    a checkpoint.

    Example:
        >>> best = fine_tune("fluo-nuclei", [image], [mask], "runs/tuned", seconds=60)  # doctest: +SKIP
        >>> from unetkit.inference import Segmenter  # doctest: +SKIP
        >>> Segmenter.load(best).segment(other_image).labels.max()  # doctest: +SKIP
    """
    trainer = prepare_fine_tune(start, images, masks, run_dir, seconds=seconds, progress=progress,
                                callback=callback, should_stop=should_stop, force=force,
                                overrides={"budget_clock": budget_clock, "precision_scores": precision_scores})
    trainer.fit()
    return Path(run_dir) / "best.pt"
