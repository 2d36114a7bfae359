"""Fine-tuning from the napari widget, as plain functions: check the corrected labels, run
`unetkit.finetune.fine_tune` on them, keep the run folder. Neither napari nor Qt is imported.

Example:
    >>> image, labels = training_pair(layer.data, labels_layer.data, image_name="cells", labels_name="cells labels")  # doctest: +SKIP
    >>> best = run_fine_tune("dic-hela", [image], [labels], new_run_dir(), seconds=60)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError


def training_pair(image: np.ndarray, labels: Any, *, image_name: str, labels_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(image, instance labels) to fine-tune on: a copy of the labels layer's data, so the user can
    keep painting while the network trains. InputError, naming the fix, for labels that do not fit
    the image or hold no object.

    Example:
        >>> training_pair(np.zeros((4, 5)), np.zeros((4, 6), np.uint8), image_name="a", labels_name="b")
        Traceback (most recent call last):
        ...
        unetkit.errors.InputError: labels layer 'b' has shape (4, 6) but image layer 'a' has (4, 5); choose the labels drawn on that image
    """
    if isinstance(labels, (list, tuple)):  # multiscale labels: full resolution first
        labels = labels[0]
    labels = np.array(labels)
    spatial = tuple(np.shape(image)[:2])
    if labels.ndim != 2 or labels.shape != spatial:
        raise InputError(f"labels layer {labels_name!r} has shape {labels.shape} but image layer {image_name!r} has "
                         f"{spatial}; choose the labels drawn on that image")
    if labels.dtype.kind not in "uib":
        raise InputError(f"labels layer {labels_name!r} holds {labels.dtype} values, not object ids")
    if labels.dtype.kind == "i" and labels.min(initial=0) < 0:
        raise InputError(f"labels layer {labels_name!r} has negative ids; erase them (label 0) before fine-tuning")
    if not labels.any():
        raise InputError(f"labels layer {labels_name!r} has no object: paint the objects (or segment first and "
                         "correct the result) before fine-tuning")
    if labels.all():
        raise InputError(f"labels layer {labels_name!r} has no background pixel: erase the background (label 0) "
                         "before fine-tuning")
    return np.asarray(image), labels.astype(np.int32)


def new_run_dir() -> Path:
    """A fresh, not yet existing run folder in the temporary directory (kept until the user saves it)."""
    return Path(tempfile.mkdtemp(prefix="unetkit-finetune-")) / "run"


def run_fine_tune(
    start: str | os.PathLike,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    run_dir: str | os.PathLike,
    *,
    seconds: float,
    callback: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Path:
    """Fine-tune `start` (a packaged model name or checkpoint path) on the pairs for `seconds` of
    the user's time (elapsed, not processor, seconds); returns RUN/best.pt (`unetkit.finetune.fine_tune`)."""
    try:
        from ..finetune import fine_tune
    except ImportError as exc:
        raise InputError(f"fine-tuning is not available in this unetkit ({exc}); update unetkit") from None
    best = Path(fine_tune(start, list(images), list(masks), run_dir, seconds=float(seconds), progress=False,
                          callback=callback, should_stop=should_stop, budget_clock="wall",
                          precision_scores=False))  # the user waits: the widget segments in the precision chosen there
    if not best.is_file():
        raise InputError(f"fine-tuning ended without writing {best}")
    return best


def folder_entries(folder: str | os.PathLike) -> int:
    """How many entries `folder` holds (0 when it does not exist)."""
    path = Path(folder)
    return sum(1 for _ in path.iterdir()) if path.is_dir() else 0


def save_run(run_dir: str | os.PathLike, folder: str | os.PathLike, *, force: bool = False) -> Path:
    """Copy the run folder `run_dir` (best.pt and what fine-tuning wrote beside it) into `folder`;
    returns the saved best.pt. A non-empty `folder` is refused unless `force`, which replaces the
    files of the same names and leaves the others.

    Example:
        >>> save_run("/tmp/run", "/home/me")  # doctest: +SKIP
        Traceback (most recent call last):
        unetkit.errors.InputError: /home/me is not empty (12 entries); choose an empty or new folder, or confirm overwriting
    """
    source, target = Path(run_dir), Path(folder)
    if not (source / "best.pt").is_file():
        raise InputError(f"{source / 'best.pt'} not found: fine-tune a model before saving it")
    if target.exists() and not target.is_dir():
        raise InputError(f"{target} is a file; choose a folder to save the model in")
    if target.resolve() == source.resolve():
        return target / "best.pt"
    entries = folder_entries(target)
    if entries and not force:
        raise InputError(f"{target} is not empty ({entries} entr{'y' if entries == 1 else 'ies'}); choose an empty or new folder, or confirm "
                         "overwriting")
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target / "best.pt"
