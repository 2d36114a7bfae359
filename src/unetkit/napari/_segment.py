"""What the napari widget does, as plain functions: pick a model, check a layer's image, segment
it as `unetkit predict` would, and score labels against ground truth. Neither napari nor Qt is
imported, so all of it is testable on its own.

A layer is a 2D image (grayscale or colour), a stack of planes (a z-stack or a time series,
(planes, Y, X)) or something else (`layer_kind`). A 2D model segments a stack plane by plane with
the stack core of `unetkit predict` (`segment_planes`, `unetkit.stacks.segment_stack`), so each
plane gets what it would get as its own image; a 3D model predicts a z-stack as one volume
(`segment_volume_layer`).

Example:
    >>> loaded = load_model("dic-hela")  # doctest: +SKIP
    >>> image = layer_image(layer.data, rgb=layer.rgb, name=layer.name, in_channels=loaded.model.in_channels)  # doctest: +SKIP
    >>> result = segment_image(loaded, image, name=layer.name, progress=print)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError
from ..inference import Segmentation, labels_rule

#: What the widget's Evaluate button reports (warping error is left out: slow on large images).
WIDGET_METRICS = ("pixel", "rand", "dice", "iou", "seg", "ap")
#: The TTA choices of the widget: the one the model's labels rule was chosen with, on, off.
TTA_CHOICES = {"as the labels rule": None, "on (8-fold)": True, "off": False}
#: What the widget can segment, for messages about layers it cannot.
SUPPORTED_LAYERS = ("2D images (Y, X), colour (RGB) images, and z-stacks or time series of one channel "
                    "(planes, Y, X)")


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


def _full_resolution(data: Any) -> np.ndarray:
    """A layer's data as an array; a multiscale layer gives its full-resolution level."""
    if isinstance(data, (list, tuple)):  # multiscale: full resolution first
        data = data[0]
    return np.asarray(data)


def _check_values(array: np.ndarray, name: str) -> np.ndarray:
    """`array`, unless it is empty, not numbers, or holds NaN or infinity (InputError naming the layer)."""
    if array.size == 0:
        raise InputError(f"layer {name!r} is empty (shape {array.shape})")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise InputError(f"layer {name!r} holds {array.dtype} values, not numbers")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(f"layer {name!r} contains NaN or infinite values; replace them before segmenting")
    return array


def is_volume_model(loaded) -> bool:
    """True for a 3D model (`UNet(dims=3)`), which predicts volumes rather than images."""
    return int(getattr(loaded.model, "dims", 2)) == 3


def layer_kind(data: Any, *, rgb: bool, name: str) -> str:
    """"image" for a 2D layer (grayscale, or colour with `rgb`), "stack" for planes of one image
    (a z-stack or a time series, (planes, Y, X); with `rgb`, (planes, Y, X, 3 or 4)). Anything else
    (t, z, y, x; one spatial axis) raises InputError naming what the widget segments.

    Example:
        >>> layer_kind(np.zeros((5, 8, 9)), rgb=False, name="z"), layer_kind(np.zeros((8, 9, 3)), rgb=True, name="c")
        ('stack', 'image')
        >>> layer_kind(np.zeros((2, 5, 8, 9)), rgb=False, name="tz")
        Traceback (most recent call last):
        ...
        unetkit.errors.InputError: layer 'tz' has 4 dimensions (shape (2, 5, 8, 9)); the widget segments 2D images (Y, X), colour (RGB) images, and z-stacks or time series of one channel (planes, Y, X): split the layer along its first axis (right-click it > Split Stack) and segment one of the parts
    """
    array = _full_resolution(data)
    spatial = array.ndim - (1 if rgb else 0)
    if spatial == 2:
        return "image"
    if spatial == 3:
        return "stack"
    fix = ("split the layer along its first axis (right-click it > Split Stack) and segment one of the parts"
           if spatial > 3 else "choose an image layer")
    raise InputError(f"layer {name!r} has {spatial} dimensions (shape {array.shape}); the widget segments "
                     f"{SUPPORTED_LAYERS}: {fix}")


def layer_image(data: Any, *, rgb: bool, name: str, in_channels: int,
                task: str = "the model segments one 2D image") -> np.ndarray:
    """The 2D image of an image layer, (H, W) or (H, W, C), checked against the model's channels.

    A multiscale layer gives its full-resolution level. Raises InputError, naming the layer and
    the fix, for a stack (`task` says why one 2D image is needed), an empty layer or a channel
    count the model was not trained on.

    Example:
        >>> layer_image(np.zeros((4, 5, 3), np.uint8), rgb=True, name="rgb", in_channels=1)
        Traceback (most recent call last):
        ...
        unetkit.errors.InputError: layer 'rgb' is a colour (RGB) image with 3 channels, but the model was trained on 1 channel; convert it to grayscale (Image > Mode in Fiji) or choose a model for colour images
    """
    array = _full_resolution(data)
    spatial = array.ndim - (1 if rgb else 0)
    if spatial != 2:
        raise InputError(
            f"layer {name!r} has {spatial} spatial dimensions (shape {array.shape}); {task}: "
            "split the stack (right-click the layer > Split Stack) and choose one plane"
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
    return _check_values(array, name)


def layer_stack(data: Any, *, rgb: bool, name: str, in_channels: int) -> np.ndarray:
    """The planes of a stack layer for a 2D model: (planes, H, W), or (planes, H, W, 3) for a colour
    model (alpha dropped), checked against the model's channels (InputError naming the layer).

    Example:
        >>> layer_stack(np.zeros((3, 8, 9), np.uint8), rgb=False, name="z", in_channels=1).shape
        (3, 8, 9)
    """
    array = _full_resolution(data)
    if array.ndim - (1 if rgb else 0) != 3:
        raise InputError(f"layer {name!r} (shape {array.shape}) is not a stack of 2D planes (planes, Y, X)")
    channels = 3 if rgb and array.shape[-1] >= 3 else 1
    if channels != in_channels:
        plural = "s" if in_channels != 1 else ""
        if channels == 3:
            raise InputError(f"layer {name!r} is a stack of colour (RGB) images, but the model was trained on "
                             f"{in_channels} channel{plural}; convert it to grayscale or choose a model for colour images")
        raise InputError(f"layer {name!r} is a stack of grayscale images, but the model was trained on {in_channels} "
                         f"channel{plural}; choose a model for grayscale images")
    if rgb:
        array = array[..., :3] if channels == 3 else array[..., 0]
    return _check_values(array, name)


def layer_volume(data: Any, *, rgb: bool, name: str, in_channels: int) -> np.ndarray:
    """The (Z, Y, X) volume of a z-stack layer for a 3D model (InputError naming the layer and the fix
    for a 2D image, a colour stack or a model of several channels).

    Example:
        >>> layer_volume(np.zeros((40, 44)), rgb=False, name="flat", in_channels=1)
        Traceback (most recent call last):
        ...
        unetkit.errors.InputError: this is a 3D model; choose a z-stack layer (layer 'flat' is a 2D image, shape (40, 44))
    """
    array = _full_resolution(data)
    kind = layer_kind(array, rgb=rgb, name=name)
    if kind == "image":
        raise InputError(f"this is a 3D model; choose a z-stack layer (layer {name!r} is a 2D image, shape {array.shape})")
    if rgb:
        raise InputError(f"this is a 3D model of {in_channels} channel(s); layer {name!r} is a stack of colour (RGB) "
                         "images: convert it to a grayscale z-stack")
    if in_channels != 1:
        raise InputError(f"this 3D model was trained on {in_channels} channels; the widget gives 3D models one-channel "
                         f"z-stacks (Z, Y, X), so segment {name!r} with `unetkit predict` instead")
    return _check_values(array, name)


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


def _with_controls(loaded, percentiles: tuple[float, float] | None, *, tile_size: int | None, **controls: Any):
    """The checkpoint with the widget's normalisation percentiles, and the `InferenceOptions` of its other controls."""
    options = inference_options(tile_size=check_tile_size(loaded, tile_size), **controls)
    return (loaded if percentiles is None else with_percentiles(loaded, *percentiles)), options


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

    loaded, options = _with_controls(loaded, percentiles, tta=tta, tile_size=tile_size, device=device, backend=backend,
                                     threshold=threshold, min_size=min_size, diameter=diameter, precision=precision)
    segmenter = Segmenter(loaded, options, source=source)

    def callback(done: int, total: int) -> None:
        if cancelled is not None and cancelled():
            raise Cancelled(f"cancelled after {done} of {total} tiles")
        if progress is not None:
            progress(done, total)

    return segmenter.segment(image, name=f"layer {name!r}", callback=callback)


def segment_planes(
    loaded,
    stack: np.ndarray,
    *,
    source: str | os.PathLike | None = None,
    name: str = "stack",
    stitch: float | None = None,
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
):
    """Segment a stack layer's planes (a z-stack or a time series) with a 2D model, plane by plane,
    as `unetkit predict` segments a multi-page file (`unetkit.stacks.segment_stack`): every plane
    gets what it would get from `segment_image` alone; the labels are unique across planes or,
    with `stitch` (an overlap in (0, 1]), linked across them.

    `progress(planes done, planes)` is called after each plane; `cancelled()` is asked after each
    batch of tiles, and when it turns true the prediction stops with `Cancelled`. The other
    arguments are those of `segment_image`. Returns a `unetkit.stacks.StackSegmentation`.
    """
    from ..inference import Segmenter
    from ..stacks import segment_stack

    loaded, options = _with_controls(loaded, percentiles, tta=tta, tile_size=tile_size, device=device, backend=backend,
                                     threshold=threshold, min_size=min_size, diameter=diameter, precision=precision)
    done = [0, len(stack)]

    def check(*_: Any) -> None:
        if cancelled is not None and cancelled():
            raise Cancelled(f"cancelled after {done[0]} of {done[1]} planes")

    class PlaneSegmenter(Segmenter):
        """Stops between batches of tiles of a plane when asked to."""

        def segment(self, raw, *, name="image", callback=None, progress=False):
            check()
            return super().segment(raw, name=name, callback=check, progress=progress)

    def callback(planes_done: int, planes: int) -> None:
        done[:] = [planes_done, planes]
        if progress is not None:
            progress(planes_done, planes)

    segmenter = PlaneSegmenter(loaded, options, source=source)
    return segment_stack(segmenter, stack, name=f"layer {name!r}", stitch=stitch, callback=callback)


@dataclasses.dataclass
class VolumeResult:
    """A z-stack predicted as one volume by a 3D model."""

    probabilities: np.ndarray  # float32 (n_classes, Z, Y, X)
    labels: np.ndarray  # (Z, Y, X) instances
    rule: Any  # the `unetkit.decision.DecisionRule` that drew the labels
    tta: bool
    seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        """One line: objects found in the volume, the rule, the time."""
        count = int(len(np.unique(self.labels[self.labels > 0])))
        return (f"{count} 3D object{'s' if count != 1 else ''} ({self.rule.method} at {self.rule.threshold:g}, "
                f"{'16-fold TTA' if self.tta else 'no TTA'}) in {self.seconds:.1f} s")


class _CheckedOutput:
    """The array a volume prediction writes into tile by tile; before each write it asks whether to stop."""

    def __init__(self, shape: tuple[int, ...], cancelled: Callable[[], bool]) -> None:
        self.array = np.empty(shape, np.float32)
        self.shape = self.array.shape
        self.dtype = self.array.dtype
        self.tiles = 0
        self._cancelled = cancelled

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.array[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        if self._cancelled():
            raise Cancelled(f"cancelled after {self.tiles} tiles of the volume")
        self.array[key] = value
        self.tiles += 1


def segment_volume_layer(
    loaded,
    volume: np.ndarray,
    *,
    tta: bool | None = None,
    device: str = "auto",
    threshold: float | None = None,
    min_size: int | None = None,
    percentiles: tuple[float, float] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> VolumeResult:
    """Segment a (Z, Y, X) z-stack with a 3D model as one volume: the checkpoint's normalisation over
    the whole volume (`unetkit.data.volumes.normalize_volume`), one overlap-tile prediction
    (`unetkit.volume.predict_volume`, a stack thinner than the network's smallest tile mirrored out
    to it) and labels drawn in 3D by the checkpoint's rule (`threshold` or `min_size` replace
    those parts of it, as for 2D models). `tta` None follows the rule; `cancelled()` is asked
    before each tile is kept.
    """
    from ..data.volumes import normalize_volume
    from ..segment_volume import VolumeSegmenter
    from ..volume import predict_volume

    started = time.perf_counter()
    options = inference_options(tta=tta, device=device, threshold=threshold, min_size=min_size)
    if percentiles is not None:
        loaded = with_percentiles(loaded, *percentiles)
    segmenter = VolumeSegmenter(loaded, options)  # the rule and TTA as `unetkit predict` resolves them
    normalized = normalize_volume(volume, loaded.normalization, name="the z-stack")
    model = segmenter.model
    out = None if cancelled is None else _CheckedOutput((model.n_classes, *normalized.shape[-3:]), cancelled)
    # Unlike `unetkit predict`, a stack thinner than the smallest tile is mirrored out rather than refused.
    probabilities = predict_volume(model, normalized, tta=segmenter.tta, device=segmenter.device, out=out, pad_thin=True)
    if out is not None:
        probabilities = out.array
    labels = segmenter.labels(probabilities)
    return VolumeResult(probabilities, labels, segmenter.rule, segmenter.tta, time.perf_counter() - started)


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
    dims = "3D, " if is_volume_model(loaded) else ""
    return (f"{label}: {dims}depth {config['depth']}, width {config['base_channels']}, {loaded.model.in_channels} channel(s); "
            f"{stored} labels rule {rule.method} at {rule.threshold:g}{', TTA' if rule.tta else ''}")
