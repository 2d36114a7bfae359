"""One segmentation core: the settings of a prediction, resolved once, and the object that applies them.

A checkpoint stores more than weights: how its probability maps are made (test-time
augmentation, batch norm with each image's own statistics) and how labels are drawn from them
(the rule chosen on validation images). Every way of segmenting (files, zarr / BigTIFF images
larger than memory, Dask blocks, the napari widget, the demo) goes through `Segmenter`, so a
model gives one result on every path:

* `InferenceOptions` is what the user asked for (None = as the checkpoint says). Its `check`
  needs no torch, so the command line refuses a bad option before anything is loaded or created.
* `InferenceSettings.resolve` combines it with the checkpoint once: `maps` (how maps are made),
  `rule` (how labels are drawn), tile, batch, device and backend.
* `Segmenter` makes maps (`probabilities`, `statistics` for blockwise paths) and labels (`labels`).

Example:
    >>> from unetkit.checkpoint import LoadedModel
    >>> from unetkit.data.normalize import Normalization
    >>> from unetkit.network import UNet
    >>> loaded = LoadedModel(UNet(depth=2, base_channels=4), Normalization(), ["background", "cell"],
    ...                      decision={"method": "seeded", "threshold": 0.2, "tta": True})
    >>> segmenter = Segmenter(loaded, InferenceOptions(tile_size=44, device="cpu"))
    >>> segmenter.settings.maps
    MapSettings(tta=True, norm_statistics='training')
    >>> result = segmenter.segment(np.random.rand(30, 50).astype("float32"))
    >>> result.probabilities.shape, result.labels.shape
    ((2, 30, 50), (30, 50))
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from .decision import DecisionRule
from .device import is_out_of_memory
from .errors import InputError
from .postprocess import foreground, labels_from_probabilities  # noqa: F401 - the core's labels step
from .precision import PrecisionChoice

LABEL_KINDS = ("instances", "binary")
BACKENDS = ("auto", "torch", "onnxruntime")
NORM_STATISTICS = ("training", "image")
#: Activation memory for one batch of tiles of an image above `unetkit.config.LARGE_PIXELS`:
#: small enough that the tile, the network, the zarr reads and writes and the labels pass stay
#: under 1.5 GB together on a 32768x32768 image (512 MiB there peaked at 1.76 GB).
LARGE_IMAGE_MEMORY_BUDGET = 256 << 20


def memory_budget(pixels: int) -> int | None:
    """Bytes of activations allowed for the tiles of an image of `pixels` pixels; None leaves the
    choice to `unetkit.predict.choose_tile_shape` (1 GiB, or a quarter of the memory available).

    It depends on the image's size only, never on the path that segments it, so files, zarr and
    Dask choose the same tiles (and so gather the same batch-norm statistics) for the same image.

    Example:
        >>> memory_budget(512 * 512) is None, memory_budget(20000 * 20000) == LARGE_IMAGE_MEMORY_BUDGET
        (True, True)
    """
    from .config import LARGE_PIXELS

    return LARGE_IMAGE_MEMORY_BUDGET if pixels > LARGE_PIXELS else None


@dataclass(frozen=True)
class InferenceOptions:
    """What the user asked for; None means "as the checkpoint's labels rule says".

    Args:
        tta: average the 8 dihedral transforms (None: as the rule was chosen).
        tile_size: legal input tile side (None: the cheapest tile within `memory_budget`).
        batch_size: tiles per forward pass.
        device: "auto", "cpu", "cuda[:N]" or "mps".
        backend: "auto", "torch" or "onnxruntime".
        norm_statistics: "training" or "image" batch-norm statistics (None: as the rule was chosen).
        threshold, watershed, min_size: each replaces that part of the stored rule (the mask
            threshold, the distance watershed instead of its method, the smallest object kept)
            and keeps the rest; without a stored rule, components at 0.5 with no minimum size.
        labels: "instances" or "binary".
        fill_holes: fill holes enclosed by one object.
        precision: "fp32", "bf16", "int8" or "auto" (the fastest whose stored validation score
            holds; fp32 without stored scores): see `unetkit.precision`.
        diameter: the objects' median diameter in pixels, or "auto" (estimated in a first pass):
            `Segmenter.segment` rescales the image so its objects take the size the model was
            trained on (`unetkit.scale`); labels and maps come back at the input's size. None:
            as the checkpoint says (a model fine-tuned at its start model's scale records its
            images' object diameter, ``scale["input_diameter"]``, and rescales by it).
        pixel_size: micrometres per pixel, for a model that records its training pixel size.

    Example:
        >>> InferenceOptions(threshold=1.5).check()
        Traceback (most recent call last):
        ...
        unetkit.errors.InputError: --threshold must be in [0, 1] (got 1.5)
    """

    tta: bool | None = None
    tile_size: int | None = None
    batch_size: int = 1
    device: str = "auto"
    backend: str = "auto"
    norm_statistics: str | None = None
    threshold: float | None = None
    watershed: bool | None = None
    min_size: int | None = None
    labels: str = "instances"
    fill_holes: bool = True
    precision: str = "fp32"
    diameter: float | str | None = None
    pixel_size: float | None = None

    def check(self) -> "InferenceOptions":
        """Refuse an option that no checkpoint could make valid (one line each); returns self."""
        from .device import check_device

        check_device(self.device)
        if self.backend not in BACKENDS:
            raise InputError(f"--backend must be auto, torch or onnxruntime (got {self.backend!r})")
        if self.norm_statistics not in (None, *NORM_STATISTICS):
            raise InputError(f"--norm-statistics must be training or image (got {self.norm_statistics!r})")
        if self.labels not in LABEL_KINDS:
            raise InputError(f"--labels must be 'instances' or 'binary' (got {self.labels!r})")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise InputError(f"--threshold must be in [0, 1] (got {self.threshold})")
        if self.min_size is not None and (int(self.min_size) != self.min_size or self.min_size < 0):
            raise InputError(f"--min-size must be a whole number of pixels >= 0 (got {self.min_size})")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise InputError(f"--batch-size must be an integer >= 1 (got {self.batch_size})")
        if self.tile_size is not None and (int(self.tile_size) != self.tile_size or self.tile_size < 1):
            raise InputError(f"--tile-size must be a positive whole number of pixels (got {self.tile_size})")
        from .precision import check_name

        check_name(self.precision)
        from .scale import check_diameter, check_pixel_size

        check_diameter(self.diameter)
        check_pixel_size(self.pixel_size)
        if self.diameter is not None and self.pixel_size is not None:
            raise InputError("give --diameter or --pixel-size, not both")
        return self


@dataclass(frozen=True)
class MapSettings:
    """How probability maps are made: test-time augmentation and batch-norm statistics."""

    tta: bool = False
    norm_statistics: str = "training"

    def describe(self) -> str:
        statistics = "each image's batch-norm statistics" if self.norm_statistics == "image" else "stored batch-norm statistics"
        return f"{'8-fold TTA' if self.tta else 'no TTA'}, {statistics}"


@dataclass(frozen=True)
class InferenceSettings:
    """Everything that decides a segmentation, resolved once from a checkpoint and the user's options.

    `maps` says how probability maps are made, `rule` how labels are drawn from them; `origin`
    says for each of the two whether it came from the checkpoint or from an option.
    """

    maps: MapSettings
    rule: DecisionRule
    tile_size: int | None
    batch_size: int
    device: str
    backend: str
    labels: str
    fill_holes: bool
    origin: dict[str, str] = field(default_factory=dict)
    precision: PrecisionChoice = field(default_factory=PrecisionChoice)

    @classmethod
    def resolve(cls, loaded, options: InferenceOptions | None = None, *, scores: dict | None = None,
                calibration=None) -> "InferenceSettings":
        """Settings for the model `loaded` (a `LoadedModel`) under `options` (checked here too).

        `scores`: its stored per-precision validation scores, `calibration`: its int8 calibration
        images (`unetkit.precision.stored_scores`, `calibration_source`), for the precision."""
        from .backends import check_backend
        from .device import resolve_device

        options = (options or InferenceOptions()).check()
        stored = dict(loaded.decision or {})
        rule = labels_rule(stored, threshold=options.threshold, watershed=options.watershed, min_size=options.min_size)
        replaced = options.threshold is not None or options.watershed is not None or options.min_size is not None
        # The maps follow how the stored rule was chosen even when its labels step is replaced.
        chosen = DecisionRule.from_dict(stored) if stored else DecisionRule()
        tta = chosen.tta if options.tta is None else bool(options.tta)
        statistics = options.norm_statistics or chosen.norm_statistics
        if options.tile_size is not None:
            from .tiling import check_tile

            check_tile(loaded.model.geometry, int(options.tile_size), "--tile-size")
        device = resolve_device(options.device)
        check_backend(options.backend, device)
        from .precision import for_model

        precision = for_model(loaded.model, options.precision, device, options.backend, statistics, scores, calibration)
        origin = {
            "maps": "options" if options.tta is not None or options.norm_statistics else ("checkpoint" if stored else "defaults"),
            "rule": "checkpoint" if stored and not replaced else ("options" if replaced else "defaults"),
        }
        return cls(MapSettings(tta, statistics), rule, None if options.tile_size is None else int(options.tile_size),
                   int(options.batch_size), str(device), options.backend, options.labels, bool(options.fill_holes), origin,
                   precision)

    def tile_shape(self, model, image_shape) -> tuple[int, int]:
        """The input tile (h, w) for an image of `image_shape` ((..., H, W)): the one rule every path uses."""
        if self.tile_size is not None:
            return (self.tile_size, self.tile_size)
        from .predict import choose_tile_shape

        height, width = int(image_shape[-2]), int(image_shape[-1])
        return choose_tile_shape(model, (height, width), memory_budget=memory_budget(height * width), batch_size=self.batch_size)

    def describe(self) -> str:
        """One line for the user: how labels are drawn and maps made, and from where.

        Example:
            >>> settings = InferenceSettings(MapSettings(True, "image"), DecisionRule("seeded", 0.0), None, 1, "cpu", "auto",
            ...                              "instances", True, {"rule": "checkpoint", "maps": "checkpoint"})
            >>> settings.describe()
            "labels (checkpoint): seeded watershed (mask > 0, cores > 0.9); maps (checkpoint): 8-fold TTA, each image's batch-norm statistics; tile auto, backend auto, cpu; precision fp32"
        """
        rule = self.rule
        if self.labels == "binary":
            drawn = f"binary foreground > {rule.threshold:g}"
        elif rule.method == "seeded":
            drawn = f"seeded watershed (mask > {rule.threshold:g}, cores > {rule.seed_threshold:g})"
        elif rule.method == "watershed":
            drawn = f"distance watershed at {rule.threshold:g} (h {rule.h:g})"
        else:
            drawn = f"connected components at {rule.threshold:g}"
        if rule.min_size and self.labels != "binary":
            drawn += f", objects >= {rule.min_size} px"
        tile = f"{self.tile_size}" if self.tile_size else "auto"
        return (f"labels ({self.origin.get('rule', 'defaults')}): {drawn}; maps ({self.origin.get('maps', 'defaults')}): "
                f"{self.maps.describe()}; tile {tile}, backend {self.backend}, {self.device}; {self.precision.describe()}")


@dataclass
class Segmentation:
    """An image segmented in memory: what `unetkit predict` writes for it."""

    probabilities: np.ndarray  # float32 (n_classes, H, W)
    labels: np.ndarray  # instances uint16 (uint32 above 65535 objects) or binary uint8
    settings: InferenceSettings
    seconds: float
    notes: list[str] = field(default_factory=list)  # what the user should know (an input unlike the training data)

    @property
    def rule(self) -> DecisionRule:
        return self.settings.rule

    @property
    def tta(self) -> bool:
        return self.settings.maps.tta

    def summary(self) -> str:
        """One line: objects found, the rule, the time.

        Example:
            >>> s = InferenceSettings(MapSettings(), DecisionRule(), None, 1, "cpu", "auto", "instances", True)
            >>> Segmentation(np.zeros((2, 2, 2)), np.array([[0, 1], [2, 2]]), s, 1.25).summary()
            '2 objects (components at 0.5, no TTA) in 1.2 s'
        """
        count = int(len(np.unique(self.labels[self.labels > 0])))
        return (f"{count} object{'s' if count != 1 else ''} ({self.rule.method} at {self.rule.threshold:g}, "
                f"{'8-fold TTA' if self.tta else 'no TTA'}) in {self.seconds:.1f} s")


def _recorded_input_diameter(loaded) -> float | None:
    """The object diameter of the images a model was fine-tuned on at its start model's scale, if
    it records one (`unetkit.checkpoint` keeps only a positive number)."""
    value = (getattr(loaded, "scale", None) or {}).get("input_diameter")
    return None if value is None else float(value)


def labels_rule(
    stored: dict | None, *, threshold: float | None = None, watershed: bool | None = None, min_size: int | None = None
) -> DecisionRule:
    """The rule that turns probabilities into labels: the checkpoint's `stored` one (chosen on
    validation; without one, components at 0.5) with each option given put in place of its part:
    `threshold` the mask threshold, `min_size` the smallest object kept, `watershed` the distance
    watershed (False: connected components) instead of its method. A rule changed by an option
    has no validation score.

    Example:
        >>> labels_rule({"method": "seeded", "threshold": 0.3, "tta": True}).method
        'seeded'
        >>> rule = labels_rule({"method": "seeded", "threshold": 0.3, "score": 0.8}, min_size=40)
        >>> rule.method, rule.threshold, rule.min_size, rule.score
        ('seeded', 0.3, 40, None)
        >>> labels_rule(None, threshold=0.6, watershed=True).method
        'watershed'
    """
    rule = DecisionRule.from_dict(stored) if stored else DecisionRule()
    changes: dict = {}
    if threshold is not None:
        changes["threshold"] = float(threshold)
    if min_size is not None:
        changes["min_size"] = int(min_size)
    if watershed is not None:
        changes["method"] = "watershed" if watershed else "components"
    return replace(rule, **changes, score=None) if changes else rule


class Segmenter:
    """A loaded model with its resolved settings: the one place maps and labels are made.

    Args:
        loaded: a `unetkit.checkpoint.LoadedModel` (`load_checkpoint(path_or_name)`).
        options: the user's `InferenceOptions` (default: everything as the checkpoint says).
        source: the checkpoint path or packaged model name, so a packaged model can warn about
            images unlike its training data.

    Example:
        >>> segmenter = Segmenter.load("em-membranes")  # doctest: +SKIP
        >>> result = segmenter.segment(raw_image, name="slice20.tif")  # doctest: +SKIP
    """

    def __init__(self, loaded, options: InferenceOptions | None = None, *, source=None) -> None:
        from .precision import calibration_source, stored_scores
        from .pretrained import get_model, pretrained_name

        self.loaded = loaded
        options = options or InferenceOptions()
        #: the objects' diameter the checkpoint rescales images by when no option says (see `InferenceOptions.diameter`)
        self.default_diameter = _recorded_input_diameter(loaded) if options.diameter is None and options.pixel_size is None else None
        if self.default_diameter is not None:
            options = replace(options, diameter=self.default_diameter)
        self.options = options
        self._scaled = None  # the last maps made at the model's object scale (`unetkit.scale.ScaledMaps`)
        self.calibration = calibration_source(source, loaded.normalization)
        self.settings = InferenceSettings.resolve(loaded, options, scores=stored_scores(source), calibration=self.calibration)
        self.source = source
        self.packaged = pretrained_name(source) if source is not None else None
        self.packaged_scale = get_model(self.packaged).scale if self.packaged else None  # object scale of its training data
        self.model = loaded.model.to(self.settings.device)
        self._notes: list[str] = []
        self._precisions_said: set = set()

    @classmethod
    def load(cls, checkpoint, options: InferenceOptions | None = None) -> "Segmenter":
        """A segmenter for a checkpoint file or packaged model name."""
        from .checkpoint import load_checkpoint

        return cls(load_checkpoint(checkpoint), options, source=checkpoint)

    # -- input ---------------------------------------------------------------------------------
    def check_raw(self, raw: np.ndarray, name: str = "image") -> list[str]:
        """Warnings (as notes) when `raw` is unlike a packaged model's training images."""
        if not self.packaged:
            return []
        from .pretrained import check_input

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return check_input(self.packaged, raw, source=name)

    def normalize(self, raw: np.ndarray, name: str = "image") -> np.ndarray:
        """The checkpoint's normalisation of a raw image; InputError naming `name` for NaN or infinity."""
        self.loaded.normalization.check(raw, source=name)
        image = self.loaded.normalization(raw)
        if not np.isfinite(image).all():
            raise InputError(f"{name}: image contains NaN or infinite values; replace them before predicting")
        return image

    # -- maps ----------------------------------------------------------------------------------
    def tile_shape(self, image_shape) -> tuple[int, int]:
        return self.settings.tile_shape(self.model, image_shape)

    def statistics(self, image, *, progress: bool = False):
        """Batch-norm statistics of a normalised (lazy) image for blockwise paths, gathered once over
        its tiles; None when the maps use the stored statistics or the network has no batch norm."""
        from .adapt import gather_statistics, has_batch_norm

        if self.settings.maps.norm_statistics != "image" or not has_batch_norm(self.model):
            return None
        return gather_statistics(self.model, image, self.tile_shape(image.shape), progress=progress)

    def probabilities(self, image, *, statistics=None, out=None, tiles=None, on_batch=None,
                      callback: Callable[[int, int], None] | None = None, progress: bool = False, native: bool = False):
        """(n_classes, H, W) probabilities of a normalised image, made as `settings.maps` says.

        `statistics` (from `statistics`) replaces gathering them from `image`; `out`, `tiles`,
        `on_batch` are `unetkit.predict`'s, for writing tile by tile into a zarr array. With the
        `diameter` or `pixel_size` option the maps are made at the model's object scale and
        returned at the image's size (`unetkit.scale.maps_at_model_scale`; `native`: as given).
        """
        if not native and (self.options.diameter is not None or self.options.pixel_size is not None):
            from .scale import maps_at_model_scale

            self._scaled = maps_at_model_scale(self, image, out=out, tiles=tiles, callback=callback, progress=progress)
            return self._scaled.maps
        from .predict import predict

        s = self.settings
        tile_shape = self.tile_shape(image.shape)
        precision, statistics = self.precision_for(image, tile_shape, statistics)
        try:
            return predict(self.model, image, tile_size=tile_shape, batch_size=s.batch_size, tta=s.maps.tta,
                           backend=s.backend, norm_statistics=statistics if statistics is not None else s.maps.norm_statistics,
                           precision=precision, calibration=self.calibration,
                           out=out, tiles=tiles, on_batch=on_batch, callback=callback, progress=progress)
        except (RuntimeError, MemoryError) as exc:
            if not (isinstance(exc, MemoryError) or is_out_of_memory(exc)):
                raise
            raise InputError(
                f"out of memory predicting tiles of {tile_shape[0]}x{tile_shape[1]} pixels in batches of {s.batch_size}; "
                "lower --tile-size (or leave it out: the tile is then chosen by the memory available) or --batch-size"
            ) from None

    def precision_for(self, image, tile_shape: tuple[int, int], statistics):
        """The precision `image` runs in, and its batch-norm statistics: the settings' precision,
        or for "auto" the fastest of its candidates on these tiles, measured once per machine
        (`unetkit.backends.fastest`) and said once in `take_notes` (the statistics are gathered
        first, for the measurement, and passed on so they are not gathered twice)."""
        run = self.settings.precision.run
        if isinstance(run, str):
            return run, statistics
        import torch

        from .backends import choice_key, fastest, read_choices

        if statistics is None:
            statistics = self.statistics(image)
        batch_shape = (self.settings.batch_size, *tile_shape)
        chosen = fastest(self.model, run, torch.device(self.settings.device), batch_shape, statistics=statistics,
                         calibration=self.calibration)
        if (chosen, batch_shape) not in self._precisions_said:
            self._precisions_said.add((chosen, batch_shape))
            seconds = read_choices().get(choice_key(self.model, batch_shape, statistics, precisions=run), {}).get("seconds_per_call", {})
            timed = ", ".join(f"{p} {seconds[p]:.3f} s" for p in run if p in seconds)
            self._notes.append(f"precision auto: {chosen} on {tile_shape[0]}x{tile_shape[1]} tiles, the fastest of "
                               f"{', '.join(run)} on this machine" + (f" ({timed} per call)" if timed else ""))
        return chosen, statistics

    def take_notes(self) -> list[str]:
        """What the user should be told since the last call (e.g. the precision "auto" measured)."""
        notes, self._notes = self._notes, []
        return notes

    # -- labels --------------------------------------------------------------------------------
    def labels(self, probabilities: np.ndarray) -> np.ndarray:
        """Labels drawn from in-memory probabilities by `settings.rule`: instance ids (uint16, or
        uint32 above 65535 objects) or, for `labels="binary"`, uint8 0/1.

        Maps that `probabilities` made at the model's object scale have their labels drawn at that
        scale and brought back to the image's exact size (ids kept). Objects far from the size the
        model was trained on are warned about (`unetkit.scale.size_note`)."""
        s = self.settings
        binary = s.labels == "binary"
        scaled = self._scaled
        if scaled is not None and scaled.maps is probabilities:
            from .scale import resize_labels

            for note in scaled.notes:
                warnings.warn(note, UserWarning, stacklevel=2)
            drawn = labels_from_probabilities(scaled.model_maps, s.rule, binary=binary, fill_holes=s.fill_holes)
            return resize_labels(drawn, probabilities.shape[-2:])
        labels = labels_from_probabilities(probabilities, s.rule, binary=binary, fill_holes=s.fill_holes)
        if not binary:
            from .scale import size_note

            note = size_note(self, labels)
            if note:
                warnings.warn(note, UserWarning, stacklevel=2)
        return labels

    # -- both ----------------------------------------------------------------------------------
    def segment(self, raw: np.ndarray, *, name: str = "image",
                callback: Callable[[int, int], None] | None = None, progress: bool = False) -> Segmentation:
        """Segment a raw in-memory image: normalise, make maps, draw labels."""
        started = time.perf_counter()
        notes = self.check_raw(raw, name)
        probabilities = self.probabilities(self.normalize(raw, name), callback=callback, progress=progress)
        with warnings.catch_warnings(record=True) as caught:  # notes on the object scale, for this image
            warnings.simplefilter("always")
            labels = self.labels(probabilities)
        notes += [f"{name}: {w.message}" for w in caught]
        return Segmentation(probabilities, labels, self.settings, time.perf_counter() - started, notes)
