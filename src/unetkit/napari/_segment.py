"""What the napari widget does, as plain functions: pick a model, check a layer's image, segment
it as `unetkit predict` would, and score labels against ground truth. Neither napari nor Qt is
imported, so all of it is testable on its own.

Example:
    >>> loaded = load_model("dic-hela")  # doctest: +SKIP
    >>> image = layer_image(layer.data, rgb=layer.rgb, name=layer.name, in_channels=loaded.model.in_channels)  # doctest: +SKIP
    >>> result = segment_image(loaded, image, name=layer.name, progress=print)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError
from ..inference import Segmentation, labels_rule

#: What the widget's Evaluate button reports (warping error is left out: slow on large images).
WIDGET_METRICS = ("pixel", "rand", "dice", "iou", "seg", "ap")
#: The TTA choices of the widget: the one the model's labels rule was chosen with, on, off.
TTA_CHOICES = {"as the labels rule": None, "on (8-fold)": True, "off": False}


class Cancelled(Exception):
    """Raised inside the prediction when the user cancels it."""


def installed_models() -> list[str]:
    """Names of the packaged models whose weights are installed (`unetkit.pretrained`).

    Example:
        >>> set(installed_models()) <= {"em-membranes", "dic-hela", "fluo-nuclei"}
        True
    """
    from ..pretrained import list_models

    return [m.name for m in list_models() if m.installed]


def backends() -> tuple[str, ...]:
    """The inference backends the segmentation core offers (`unetkit.inference.BACKENDS`)."""
    from ..inference import BACKENDS

    return BACKENDS


_cache: dict[tuple[str, float], Any] = {}


def load_model(source: str | os.PathLike):
    """The `unetkit.checkpoint.LoadedModel` of a checkpoint file or packaged model name, cached
    until the file changes. Raises InputError with a message for the user."""
    from ..checkpoint import load_checkpoint
    from ..pretrained import resolve_checkpoint

    text = str(source).strip()
    if not text:
        raise InputError("choose a packaged model or a checkpoint file (RUN/best.pt written by `unetkit train`)")
    path = resolve_checkpoint(text)
    key = (str(path.resolve()), path.stat().st_mtime if path.is_file() else 0.0)
    if key not in _cache:
        _cache.clear()  # one model at a time: they can be large
        _cache[key] = load_checkpoint(text)
    return _cache[key]


def layer_image(data: Any, *, rgb: bool, name: str, in_channels: int) -> np.ndarray:
    """The 2D image of an image layer, (H, W) or (H, W, C), checked against the model's channels.

    A multiscale layer gives its full-resolution level. Raises InputError, naming the layer and
    the fix, for a 3D stack, an empty layer or a channel count the model was not trained on.

    Example:
        >>> layer_image(np.zeros((4, 5, 3), np.uint8), rgb=True, name="rgb", in_channels=1)
        Traceback (most recent call last):
        ...
        unetkit.errors.InputError: layer 'rgb' is a colour (RGB) image with 3 channels, but the model was trained on 1 channel; convert it to grayscale (Image > Mode in Fiji) or choose a model for colour images
    """
    if isinstance(data, (list, tuple)):  # multiscale: full resolution first
        data = data[0]
    array = np.asarray(data)
    spatial = array.ndim - (1 if rgb else 0)
    if spatial != 2:
        raise InputError(
            f"layer {name!r} has {spatial} spatial dimensions (shape {array.shape}); the model segments one 2D image: "
            "split the stack (Layers > Split stack) and choose one plane"
        )
    if array.size == 0:
        raise InputError(f"layer {name!r} is empty (shape {array.shape})")
    channels = 1 if not rgb else (1 if array.shape[-1] <= 2 else 3)  # alpha is dropped, as unetkit.data.to_chw does
    if channels != in_channels:
        kind = "a colour (RGB) image with 3 channels" if channels == 3 else "a grayscale image with 1 channel"
        fix = (
            "convert it to grayscale (Image > Mode in Fiji) or choose a model for colour images"
            if channels == 3 else f"choose a model for grayscale images or a layer with {in_channels} channels"
        )
        plural = "s" if in_channels != 1 else ""
        raise InputError(f"layer {name!r} is {kind}, but the model was trained on {in_channels} channel{plural}; {fix}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise InputError(f"layer {name!r} holds {array.dtype} values, not numbers")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(f"layer {name!r} contains NaN or infinite values; replace them before segmenting")
    return array


def check_tile_size(loaded, tile_size: int | None) -> int | None:
    """`tile_size` (None or 0 = automatic) if it is legal for the model and can tile an image, else
    InputError naming the nearest legal sizes or the smallest that tiles."""
    if not tile_size:
        return None
    from ..tiling import check_tile

    return check_tile(loaded.model.geometry, int(tile_size), "tile size")


def inference_options(
    *,
    tta: bool | None = None,
    tile_size: int | None = None,
    device: str = "auto",
    backend: str | None = None,
    threshold: float | None = None,
    min_size: int | None = None,
    diameter: float | str | None = None,
    precision: str = "fp32",
):
    """The `unetkit.inference.InferenceOptions` of the widget's controls, checked (InputError).

    Example:
        >>> inference_options(threshold=0.4, min_size=20).min_size
        20
    """
    from ..inference import InferenceOptions

    values: dict[str, Any] = {"tta": tta, "tile_size": tile_size, "device": device, "backend": backend or "auto",
                              "threshold": threshold, "min_size": min_size, "precision": precision}
    if diameter is not None:
        if diameter != "auto" and not (isinstance(diameter, (int, float)) and diameter > 0):
            raise InputError(f"object diameter must be 'auto' or a size in pixels above 0 (got {diameter!r})")
        values["diameter"] = diameter
    return InferenceOptions(**values).check()


def percentile_range(loaded) -> tuple[float, float] | None:
    """The (low, high) percentiles the checkpoint normalises images with; None when it does not
    normalise by percentiles (a fixed scale, or none), so there is nothing to adjust."""
    norm = loaded.normalization
    return (float(norm.low), float(norm.high)) if norm.mode == "percentile" else None


def with_percentiles(loaded, low: float, high: float):
    """A copy of the loaded model that normalises with the `low` and `high` percentiles (the
    network is shared, not copied). InputError when the checkpoint does not use percentiles or the
    values are out of order.

    Example:
        >>> from unetkit.checkpoint import LoadedModel
        >>> from unetkit.data.normalize import Normalization
        >>> with_percentiles(LoadedModel(None, Normalization(), []), 2, 99.5).normalization.low
        2.0
    """
    if percentile_range(loaded) is None:
        raise InputError(f"this model normalises images with a {loaded.normalization.mode} scale, not percentiles; "
                         "leave the normalisation percentiles as they are")
    if not 0.0 <= low < high <= 100.0:
        raise InputError(f"normalisation percentiles must satisfy 0 <= low < high <= 100 (got {low:g} and {high:g}); "
                         "raise 'high' or lower 'low'")
    norm = dataclasses.replace(loaded.normalization, low=float(low), high=float(high))
    return dataclasses.replace(loaded, normalization=norm)


def segment_image(
    loaded,
    image: np.ndarray,
    *,
    source: str | os.PathLike | None = None,
    name: str = "image",
    tile_size: int | None = None,
    tta: bool | None = None,
    backend: str | None = None,
    device: str = "auto",
    threshold: float | None = None,
    min_size: int | None = None,
    diameter: float | str | None = None,
    precision: str = "fp32",
    percentiles: tuple[float, float] | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Segmentation:
    """Segment a raw 2D image (a layer's data) with the core `unetkit predict` uses
    (`unetkit.inference.Segmenter`): the checkpoint's normalisation, maps made as its labels rule
    was chosen (TTA unless `tta` is given, batch-norm statistics) and labels drawn by that rule.

    `source` (the checkpoint path or packaged name) lets a packaged model warn about images unlike
    its training data; the warnings become `notes`. `progress(done, total)` is called after each
    batch of tiles; when `cancelled()` turns true the prediction stops with `Cancelled`.
    `threshold`, `min_size`, `diameter`, `precision` and `percentiles` are the widget's controls (None: as the
    checkpoint says; see `inference_options` and `with_percentiles`).
    """
    from ..inference import Segmenter

    options = inference_options(tta=tta, tile_size=check_tile_size(loaded, tile_size), device=device, backend=backend,
                                threshold=threshold, min_size=min_size, diameter=diameter, precision=precision)
    if percentiles is not None:
        loaded = with_percentiles(loaded, *percentiles)
    segmenter = Segmenter(loaded, options, source=source)

    def callback(done: int, total: int) -> None:
        if cancelled is not None and cancelled():
            raise Cancelled(f"cancelled after {done} of {total} tiles")
        if progress is not None:
            progress(done, total)

    return segmenter.segment(image, name=f"layer {name!r}", callback=callback)


def truth_choice(labels_layers: Sequence[str], prediction: str, current: str = "", avoid: Sequence[str] = ()) -> str:
    """The labels layer to offer as ground truth: the current choice, else the first layer not in
    `avoid` (the widget's own segmentations), but never the layer chosen as the prediction ("" when
    there is no such layer), so a layer is not scored against itself.

    Example:
        >>> truth_choice(["cells labels", "mask"], "cells labels"), truth_choice(["cells labels"], "cells labels")
        ('mask', '')
        >>> truth_choice(["cells labels", "cells labels 2"], "cells labels 2", avoid=["cells labels"])
        ''
    """
    for name in (current, *labels_layers):
        if name and name != prediction and name in labels_layers and (name == current or name not in avoid):
            return name
    return ""


def evaluate_labels(
    prediction: np.ndarray, truth: np.ndarray, metrics: Sequence[str] = WIDGET_METRICS, *, names: tuple[str, str] = ("prediction", "ground truth")
) -> tuple[dict[str, Any], list[str]]:
    """Scores of a labels layer against a ground-truth labels layer (`unetkit.evaluate.score_images`).

    Example:
        >>> truth = np.zeros((6, 6), np.uint16); truth[1:4, 1:4] = 1
        >>> evaluate_labels(truth, truth, ("dice", "seg"))[0]
        {'dice': 1.0, 'seg': 1.0}
    """
    from ..evaluate import score_images

    prediction, truth = np.asarray(prediction), np.asarray(truth)
    if prediction.shape != truth.shape:
        raise InputError(
            f"{names[0]} has shape {prediction.shape} but {names[1]} has {truth.shape}; choose layers of the same image"
        )
    if prediction.ndim != 2:
        raise InputError(f"{names[0]} has shape {prediction.shape}; evaluation needs 2D labels")
    return score_images(prediction, truth, metrics)


def format_scores(scores: dict[str, Any]) -> str:
    """The scores as aligned "name  value" lines, as `unetkit evaluate` formats numbers.

    Example:
        >>> print(format_scores({"dice": 0.91234, "seg": None}))
        dice  0.9123
        seg      n/a
    """
    from ..evaluate import _format

    width = max((len(k) for k in scores), default=0)
    cells = {k: _format(v) for k, v in scores.items()}
    value_width = max((len(v) for v in cells.values()), default=0)
    return "\n".join(f"{k.ljust(width)}  {v.rjust(value_width)}" for k, v in cells.items())


def describe_model(loaded, source: str | os.PathLike) -> str:
    """One line on a loaded model: its network, input channels and labels rule."""
    rule = labels_rule(loaded.decision)
    config = loaded.model.config
    label = Path(str(source)).name
    stored = "stored" if loaded.decision else "default"
    return (f"{label}: depth {config['depth']}, width {config['base_channels']}, {loaded.model.in_channels} channel(s); "
            f"{stored} labels rule {rule.method} at {rule.threshold:g}{', TTA' if rule.tta else ''}")
