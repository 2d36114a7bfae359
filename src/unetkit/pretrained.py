"""Packaged pretrained models: a registry, small float16 checkpoints, and an input check.

Three models ship with unetkit (once trained; see benchmarks/train_pretrained.py):

* "em-membranes": ISBI 2012 serial-section EM, cell interiors between neuronal membranes.
* "dic-hela": Cell Tracking Challenge DIC-C2DH-HeLa, HeLa cells in differential interference contrast.
* "fluo-nuclei": fluorescent nuclei: Cell Tracking Challenge Fluo-N2DH-GOWT1 (GFP-labelled mouse stem-cell
  nuclei) and a quadrant of the DSB2018 sample, with zoom and wide gray-value augmentation.

Their weights are ``unetkit/models/NAME.pt``: checkpoints written by `unetkit.checkpoint.pack_checkpoint` (float16
weights, no optimiser or training state; `unetkit.checkpoint.load_checkpoint` casts them back to
float32). Their held-out scores and training facts live in one JSON file beside them,
``unetkit/models/models.json``, which the training script writes (`record_model`). A model whose
weights file is absent is listed as not installed; loading it raises `InputError`.

A model name works wherever a checkpoint path is expected (`load_checkpoint("em-membranes")`,
``unetkit predict --model em-membranes``), unless a file of that name exists in the current folder.

Example:
    >>> [m.name for m in list_models()]
    ['em-membranes', 'dic-hela', 'fluo-nuclei']
    >>> get_model("dic-hela").input.channels
    1
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import InputError

#: Folder of the packaged weights and of `METADATA_FILE` (read at call time, so tests may patch it).
MODELS_DIR = Path(__file__).resolve().parent / "models"
METADATA_FILE = "models.json"
METADATA_FORMAT = "unetkit-models"
#: Most the packaged models may weigh together (weights files and metadata), in bytes.
SIZE_LIMIT = 10 * 1000 * 1000

_CTC_TERMS = (
    "Cell Tracking Challenge data, used under the CTC conditions of use (free for research; cite Maska et al., "
    "Bioinformatics 30:1609-1617, 2014; Ulman et al., Nat. Methods 14:1141-1152, 2017; Maska et al., Nat. Methods "
    "20:1010-1020, 2023). The weights derive from this data; use them under the same terms."
)


@dataclass(frozen=True)
class InputSpec:
    """What a model's training images looked like; `check_input` compares new images with it.

    Attributes:
        channels: image channels the network takes (1 = grayscale).
        dtype: NumPy dtype of the training image files.
        bits: bit depth of the training images.
        value_range: the range their pixel values can take (e.g. (0, 255) for 8-bit).
        pixel_size: physical pixel size as text, or None when unknown.
        pixel_size_source: where the pixel size comes from (the data's PROVENANCE.md does not say).
        modality: how the images were made and what they show.
    """

    channels: int
    dtype: str
    bits: int
    value_range: tuple[float, float]
    pixel_size: str | None
    pixel_size_source: str
    modality: str

    def describe(self, pixel_size: bool = True) -> str:
        """E.g. "grayscale uint8 (8-bit, 0-255), 0.19 x 0.19 um/px"."""
        channels = "grayscale" if self.channels == 1 else f"{self.channels} channels"
        size = f", {self.pixel_size}/px" if self.pixel_size and pixel_size else ""
        return f"{channels} {self.dtype} ({self.bits}-bit, {self.value_range[0]:g}-{self.value_range[1]:g}){size}"


@dataclass(frozen=True)
class ExtraData:
    """A second dataset a packaged model also trains on: quadrants of each of its images, rescaled
    so that their objects have the model's diameter (that of its main dataset's training masks).

    Attributes:
        dataset: its folder under the data root (`unetkit.data.data_root`).
        train, val, test: the quadrants (`unetkit.data.split.QUADRANTS`) trained on, validated on
            and held out.
        tile_share: about this fraction of the training tiles comes from it (its images are
            repeated in the training set; tiles are drawn in proportion to pixels).
    """

    dataset: str
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    tile_share: float = 0.3


@dataclass(frozen=True)
class PretrainedModel:
    """One packaged model: what it is, what it was trained on, and (from models.json) how well it did.

    Attributes:
        name: the name used in `load_checkpoint(name)` and ``unetkit predict --model NAME``.
        file: the weights file name inside `MODELS_DIR`.
        description: one line on what it segments.
        dataset: the folder of the shared data it was trained on (``../shared/data/DATASET``).
        train_ids, val_ids, test_ids: slice or frame numbers used for training, for choosing the
            best checkpoint and the labels rule (validation), and for the held-out scores.
        trained_on: the training data in words.
        input: what its training images looked like (`InputSpec`).
        recipe: the `unetkit.recipes` recipe it was trained with.
        license: terms of the training data (and so of the weights).
        citation: what to cite when using it.
        extra_data: further datasets trained on (`ExtraData`), rescaled to the main one's scale.
        augment: `unetkit.augment.AugmentConfig` values that differ from its recipe's.
        scores: held-out scores written by the training script ({} until trained).
        training: training facts (iterations, minutes, width, ...) written by the training script.
        package_scores: scores of the model's bioimage.io package alone (no unetkit), one record per
            batch-norm statistics measured: {"statistics": {"kind": "training"} or {"kind": "images",
            "images": [...], "image_sha256": [...]}, "scores": {...}, "scored_on", "runner",
            "weights_sha256", ...} (see `record_package_scores`; [] until measured).
        precision_scores: validation scores per inference precision (fp32, bf16, int8), which
            ``--precision auto`` chooses by (`unetkit.precision`; {} until measured).
        scale: the object scale of its training masks, {"diameter": median equivalent-circle
            diameter in pixels, "pixel_size": micrometres per pixel when known, ...} (see
            `record_training_statistics` and `unetkit.scale`; {} until measured).
        intensity: the range over its training images of their intensities normalised as the model
            normalises them (`intensity_statistics`); `check_input` warns outside it.
    """

    name: str
    file: str
    description: str
    dataset: str
    train_ids: tuple[int, ...]
    val_ids: tuple[int, ...]
    test_ids: tuple[int, ...]
    trained_on: str
    input: InputSpec
    recipe: str
    license: str
    citation: str
    task: str  # "membranes" (scored by Rand error) or "objects" (scored by SEG and AP)
    extra_data: tuple[ExtraData, ...] = ()
    augment: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    package_scores: tuple[dict[str, Any], ...] = ()
    precision_scores: dict[str, Any] = field(default_factory=dict)
    scale: dict[str, Any] = field(default_factory=dict)
    intensity: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """Where the weights file is (or would be)."""
        return MODELS_DIR / self.file

    @property
    def installed(self) -> bool:
        return self.path.is_file()

    @property
    def size_bytes(self) -> int | None:
        return self.path.stat().st_size if self.installed else None

    @property
    def budget(self) -> str:
        """The training budget in words, from the training facts ("not trained yet" without them)."""
        t = self.training
        if not t:
            return "not trained yet"
        parts = [f"width {t['width']}" if "width" in t else None,
                 f"{t['iterations']} iterations" if "iterations" in t else None,
                 f"{t['wall_minutes']:.0f} min wall" if "wall_minutes" in t else None,
                 f"{t['cpu_minutes']:.0f} CPU min" if "cpu_minutes" in t else None,
                 f"{t['threads']} threads" if "threads" in t else None]
        return ", ".join(p for p in parts if p)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values.update(path=str(self.path), installed=self.installed, size_bytes=self.size_bytes, budget=self.budget)
        return values


_MODELS: tuple[PretrainedModel, ...] = (
    PretrainedModel(
        name="em-membranes",
        file="em-membranes.pt",
        description="neuronal membranes in serial-section EM (ISBI 2012); labels are cell interiors",
        dataset="isbi2012",
        train_ids=tuple(range(16)),
        val_ids=(16, 17, 18, 19),
        test_ids=tuple(range(20, 25)),
        trained_on=(
            "ISBI 2012 EM training slices 00-19 (00-15 for training; 16-19, the end of the stack, for validation, as "
            "`unetkit train` split them; scored on 20-24)"
        ),
        input=InputSpec(
            channels=1, dtype="uint8", bits=8, value_range=(0, 255),
            pixel_size="4 x 4 nm", pixel_size_source="ISBI 2012 challenge description (sections 50 nm thick)",
            modality="serial-section TEM of the Drosophila first-instar larva ventral nerve cord, 512 x 512 slices",
        ),
        recipe="default",
        license=(
            "ISBI 2012 challenge data, copied from the MIT-licensed repository zhixuhao/unet, which states no separate "
            "terms for the data. The weights derive from this data."
        ),
        citation="Cardona et al., PLoS Biol. 8:e1000502, 2010; Arganda-Carreras et al., Front. Neuroanat. 9:142, 2015",
        task="membranes",
    ),
    PretrainedModel(
        name="dic-hela",
        file="dic-hela.pt",
        description="HeLa cells in DIC microscopy (Cell Tracking Challenge DIC-C2DH-HeLa); one label per cell",
        dataset="ctc-dic-c2dh-hela",
        train_ids=tuple(range(36)),
        val_ids=tuple(range(36, 45)),
        test_ids=tuple(range(45, 60)),
        trained_on=(
            "CTC DIC-C2DH-HeLa sequence 01 frames t000-t044 (t000-t035 for training; t036-t044, the end of the "
            "series, for validation, as `unetkit train` split them; scored on t045-t059); masks are likely the CTC "
            "silver truth"
        ),
        input=InputSpec(
            channels=1, dtype="uint8", bits=8, value_range=(0, 255),
            pixel_size="0.19 x 0.19 um", pixel_size_source="Cell Tracking Challenge dataset description",
            modality="differential interference contrast, HeLa cells on flat glass, 512 x 512 frames",
        ),
        recipe="default",
        license=_CTC_TERMS,
        citation="Maska et al. 2014; Ulman et al. 2017; Maska et al. 2023 (Cell Tracking Challenge)",
        task="objects",
    ),
    PretrainedModel(
        name="fluo-nuclei",
        file="fluo-nuclei.pt",
        description="fluorescent nuclei (Cell Tracking Challenge Fluo-N2DH-GOWT1 and the DSB2018 sample); one label "
                    "per nucleus",
        dataset="ctc-fluo-n2dh-gowt1",
        train_ids=(1, 21, 39, 72),
        val_ids=(52,),
        test_ids=(31,),
        trained_on=(
            "CTC Fluo-N2DH-GOWT1 gold-truth frames t01, t21, t39, t72 and a DSB2018 quadrant (the StarDist "
            "sample image's top-left, enlarged to the GOWT1 nuclei's size; validation GOWT1 t52 and the bottom-right "
            "quadrant; scored on GOWT1 t31 and the other two quadrants)"
        ),
        input=InputSpec(
            channels=1, dtype="uint8", bits=8, value_range=(0, 255),
            pixel_size="0.24 x 0.24 um", pixel_size_source="Cell Tracking Challenge dataset description",
            modality="GFP-labelled GOWT1 mouse embryonic stem cell nuclei, confocal, 1024 x 1024 frames, dim "
            "(brightest pixel 94-220)",
        ),
        recipe="default",
        license=_CTC_TERMS,
        citation="Maska et al. 2014; Ulman et al. 2017; Maska et al. 2023 (Cell Tracking Challenge); Caicedo et al. "
        "2019 (2018 Data Science Bowl)",
        task="objects",
        extra_data=(ExtraData("dsb2018-stardist-sample", train=("top-left",), val=("bottom-right",),
                              test=("top-right", "bottom-left")),),
        # Nuclei of other microscopes and stains: wider gray values and a range of sizes.
        augment={"scale": True, "scale_range": [0.67, 1.5], "gamma_range": [0.5, 2.0], "contrast_range": [0.6, 1.5],
                 "brightness_range": 0.2, "noise_std": 0.1},
    ),
)

#: The registry: name -> `PretrainedModel` without the recorded scores (see `get_model`).
REGISTRY: dict[str, PretrainedModel] = {m.name: m for m in _MODELS}


def _unknown(name: str) -> InputError:
    return InputError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")


def metadata_path() -> Path:
    return MODELS_DIR / METADATA_FILE


def read_metadata() -> dict[str, dict[str, Any]]:
    """The recorded entries of models.json, by model name ({} when the file is absent).

    Raises InputError when the file is not valid JSON.
    """
    path = metadata_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable model metadata ({exc}); reinstall unetkit or retrain the models") from None
    models = data.get("models", {}) if isinstance(data, dict) else {}
    return models if isinstance(models, dict) else {}


def get_model(name: str) -> PretrainedModel:
    """The registry entry of `name` with its recorded scores and training facts.

    Raises InputError naming the known models for an unknown name.
    """
    if name not in REGISTRY:
        raise _unknown(name)
    return _with_metadata(REGISTRY[name], read_metadata().get(name, {}))


def list_models() -> list[PretrainedModel]:
    """Every packaged model, installed or not, with its recorded scores."""
    metadata = read_metadata()
    return [_with_metadata(m, metadata.get(m.name, {})) for m in REGISTRY.values()]


def _with_metadata(model: PretrainedModel, entry: Any) -> PretrainedModel:
    entry = entry if isinstance(entry, dict) else {}
    return replace(model, scores=dict(entry.get("scores", {})), training=dict(entry.get("training", {})),
                   package_scores=_package_records(entry.get("package_scores")),
                   precision_scores=dict(entry.get("precision_scores") or {}),
                   scale=dict(entry.get("scale") or {}) if isinstance(entry.get("scale"), dict) else {},
                   intensity=dict(entry.get("intensity") or {}) if isinstance(entry.get("intensity"), dict) else {})


def _package_records(value: Any) -> tuple[dict[str, Any], ...]:
    """The well-formed ``package_scores`` records (a dict "statistics" and a dict "scores"); anything
    else, including metadata written before they existed, is left out rather than refused."""
    if not isinstance(value, list):
        return ()
    return tuple(dict(r) for r in value
                 if isinstance(r, dict) and isinstance(r.get("statistics"), dict) and isinstance(r.get("scores"), dict))


def package_scores_for(name: str, *, weights_sha256: str | None = None) -> list[dict[str, Any]]:
    """The ``package_scores`` records of model `name`; with `weights_sha256`, only those measured
    on those weights (a record that names other weights is stale; one that names none is kept)."""
    return [r for r in get_model(name).package_scores
            if weights_sha256 is None or r.get("weights_sha256") in (None, weights_sha256)]


def model_path(name: str, *, installed: bool = False) -> Path:
    """The weights file of model `name`; with `installed=True` it must exist.

    Raises InputError for an unknown name ("unknown model 'x'; known models: ...") and, with
    `installed`, for a model whose weights are not there (not trained yet).
    """
    if name not in REGISTRY:
        raise _unknown(name)
    path = MODELS_DIR / REGISTRY[name].file
    if installed and not path.is_file():
        raise InputError(
            f"model {name!r} is not installed ({path} does not exist: it has not been trained yet); train and pack it "
            f"with `python benchmarks/train_pretrained.py --model {name}`, or give a checkpoint file (RUN/best.pt)"
        )
    return path


def total_size() -> int:
    """Bytes of the packaged models' weights files and their metadata file together."""
    files = [MODELS_DIR / m.file for m in REGISTRY.values()] + [metadata_path()]
    return sum(p.stat().st_size for p in files if p.is_file())


_NAME_LIKE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The file `path` names: the path itself if it exists, else a packaged model's weights.

    A name that is neither an existing file nor a known model, and looks like a name (no folder,
    no suffix), gets an error that lists the known models.

    Example:
        >>> str(resolve_checkpoint("run/best.pt"))
        'run/best.pt'
    """
    text = os.fspath(path)
    candidate = Path(text)
    if candidate.exists():
        return candidate
    if text in REGISTRY:
        return model_path(text, installed=True)
    if _NAME_LIKE.match(text) and not candidate.suffix:
        raise InputError(
            f"{text}: checkpoint not found, and {_unknown(text)}; give RUN/best.pt written by `unetkit train` "
            "or one of those names"
        )
    return candidate


def pretrained_name(checkpoint: str | os.PathLike | None) -> str | None:
    """The packaged model `checkpoint` refers to (its name, or the path of its weights), else None.

    Useful to run `check_input` only for packaged models.

    Example:
        >>> pretrained_name("em-membranes"), pretrained_name("run/best.pt")
        ('em-membranes', None)
    """
    if checkpoint is None:
        return None
    text = os.fspath(checkpoint)
    if text in REGISTRY and not Path(text).exists():
        return text
    with contextlib.suppress(OSError):
        resolved = Path(text).resolve()
        for m in REGISTRY.values():
            if resolved == (MODELS_DIR / m.file).resolve():
                return m.name
    return None


# -- metadata written by the training script ---------------------------------------------------------


@contextlib.contextmanager
def _locked_folder(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (POSIX) so concurrent trainings do not lose each other's entries."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _write_metadata(models: dict[str, Any]) -> Path:
    from .io import atomic_write

    text = json.dumps({"format": METADATA_FORMAT, "version": 1, "models": models}, indent=2, sort_keys=True, default=float)
    return atomic_write(metadata_path(), lambda tmp: tmp.write_text(text + "\n"), force=True)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def record_model(name: str, *, scores: dict[str, Any], training: dict[str, Any], **extra: Any) -> Path:
    """Store the held-out `scores` and `training` facts of model `name` in models.json (atomically).

    The weights file's size and SHA-256 are recorded too when it exists. `extra` entries (e.g.
    "decision", "scored_on") are kept beside them. Returns the metadata file's path.
    """
    if name not in REGISTRY:
        raise _unknown(name)
    entry: dict[str, Any] = {"file": REGISTRY[name].file, "scores": dict(scores), "training": dict(training), **extra}
    weights = MODELS_DIR / REGISTRY[name].file
    if weights.is_file():
        entry.update(size_bytes=weights.stat().st_size, sha256=file_sha256(weights))
    with _locked_folder(MODELS_DIR):
        models = read_metadata()
        models[name] = entry
        return _write_metadata(models)


def _update_entry(name: str, **values: Any) -> Path:
    """Set `values` in model `name`'s models.json entry, keeping the rest of it (locked, atomically)."""
    if name not in REGISTRY:
        raise _unknown(name)
    with _locked_folder(MODELS_DIR):
        models = read_metadata()
        models[name] = {**models.get(name, {}), **values}
        return _write_metadata(models)


def record_package_scores(name: str, records: Sequence[dict[str, Any]]) -> Path:
    """Store the scores of model `name`'s bioimage.io package (``package_scores``: a list of records,
    see `PretrainedModel`) in its models.json entry, replacing the earlier ones and keeping the rest
    of the entry. Returns the metadata file's path."""
    if name not in REGISTRY:
        raise _unknown(name)
    return _update_entry(name, package_scores=list(_package_records(list(records))))


def record_precision_scores(name: str, scores: dict[str, Any]) -> Path:
    """Store the per-precision validation scores of model `name` (``precision_scores``, written by
    benchmarks/precision.py with `unetkit.precision.score_precisions`) in its models.json entry,
    keeping the rest of the entry. Returns the metadata file's path."""
    return _update_entry(name, precision_scores=dict(scores))


def record_training_statistics(name: str, *, scale: dict[str, Any], intensity: dict[str, Any]) -> Path:
    """Store what model `name`'s training data looked like (``scale`` of its masks' objects and
    ``intensity`` of its images: see `PretrainedModel`, `packaged_statistics`) in its
    models.json entry, keeping the rest of the entry. Returns the metadata file's path."""
    return _update_entry(name, scale=dict(scale), intensity=dict(intensity))


def forget_model(name: str, *, remove_weights: bool = False) -> None:
    """Remove the metadata entry of model `name` (and its weights file with `remove_weights`)."""
    if name not in REGISTRY:
        raise _unknown(name)
    with _locked_folder(MODELS_DIR):
        models = read_metadata()
        if name in models:
            del models[name]
            _write_metadata(models)
    if remove_weights:
        (MODELS_DIR / REGISTRY[name].file).unlink(missing_ok=True)


# -- does an image fit a model? ----------------------------------------------------------------------

#: An image whose bright end (99.8th percentile) exceeds this many times the top of the training
#: images' value range is "far" from them (for 8-bit models: above 510, which no 8-bit image reaches).
RANGE_FACTOR = 2.0
_SAMPLE_PIXELS = 1 << 20


def _subsample(chw: np.ndarray) -> np.ndarray:
    step = max(1, math.ceil(math.sqrt(chw.shape[1] * chw.shape[2] / _SAMPLE_PIXELS)))
    return np.asarray(chw[:, ::step, ::step])


def check_input(name: str | PretrainedModel, image: np.ndarray, *, source: str | None = None) -> list[str]:
    """Warn (`UserWarning`) when `image` does not look like the training images of model `name`.

    Checks, against the model's `InputSpec`:

    * the channel count, read as `unetkit.data.to_chw` reads it ((H, W) = 1 channel; (H, W, 3/4)
      = colour, 3 channels; (C, H, W) with C <= 4 = C channels);
    * the value range: an image whose 99.8th percentile is above `RANGE_FACTOR` times the top of the
      training range (above 510 for a model trained on 8-bit images, i.e. a 12- or 16-bit image
      using its range) is far from the training data. Images are normalised per image by
      percentiles, so the scale alone is undone, but such images come from other cameras and
      settings (noise, contrast, saturation) than the training data.

    A 16-bit file whose values stay within the 8-bit range, and float images, are not warned about.
    `source` (e.g. the file name) starts the messages. Returns the messages (also warned).

    Example:
        >>> check_input("em-membranes", np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
        []
    """
    from .data.normalize import to_chw

    model = name if isinstance(name, PretrainedModel) else get_model(name)
    spec = model.input
    what = source or "image"
    image = np.asarray(image)
    chw = to_chw(image, name=what)
    messages: list[str] = []
    channels = int(chw.shape[0])
    if channels != spec.channels:
        kind = {1: "grayscale", 3: "colour (RGB)"}.get(channels, f"{channels}-channel")
        hint = "; convert it to grayscale" if spec.channels == 1 and channels == 3 else ""
        messages.append(
            f"{what}: {kind} image with {channels} channels, but model {model.name!r} expects "
            f"{spec.channels} channel{'s' if spec.channels != 1 else ''} ({spec.describe()}){hint}"
        )
    dtype = image.dtype
    if dtype.kind in "ui":
        sample = _subsample(chw)
        if sample.size:
            high = float(np.percentile(sample, 99.8))
            top = float(spec.value_range[1])
            if high > RANGE_FACTOR * top:
                bits = dtype.itemsize * 8
                messages.append(
                    f"{what}: {bits}-bit image with values up to {high:.0f} (99.8th percentile), far above the "
                    f"{spec.bits}-bit range {spec.value_range[0]:g}-{top:g} of the images model {model.name!r} was "
                    f"trained on ({spec.modality}); its results on images of another bit depth and dynamic range are "
                    "untested: check them, or train on a few annotated images of your own"
                )
    if channels == spec.channels and model.intensity:

        note = intensity_note(model.name, model.intensity, chw)
        if note:
            messages.append(f"{what}: {note}")
    for message in messages:
        warnings.warn(message, UserWarning, stacklevel=2)
    return messages


def describe_scores(scores: dict[str, Any]) -> str:
    """A short text of the headline held-out scores ("-" when none are recorded).

    Example:
        >>> describe_scores({"seg": 0.81234, "ap50": 0.7, "pq50": 0.65})
        'SEG 0.812, AP50 0.700, PQ50 0.650'
    """
    names = (("rand_error_labels", "Rand error"), ("pixel_error", "pixel error"), ("warping_error", "warping error"),
             ("seg", "SEG"), ("ap50", "AP50"), ("pq50", "PQ50"))
    parts = [f"{label} {scores[key]:.3f}" if key != "warping_error" else f"{label} {scores[key]:.5f}"
             for key, label in names if isinstance(scores.get(key), (int, float))]
    return ", ".join(parts) if parts else "-"


def ids_text(dataset: str, ids: Sequence[int]) -> str:
    """How the slice or frame numbers are written in the dataset's file names."""
    width = {"isbi2012": 2, "ctc-fluo-n2dh-gowt1": 2}.get(dataset, 3)
    prefix = "" if dataset == "isbi2012" else "t"
    return ", ".join(f"{prefix}{i:0{width}d}" for i in ids)


# -- what a model's training images looked like --------------------------------------------------


#: How far an image's normalised background level may lie outside the training images' range.
BACKGROUND_MARGIN = 0.15
#: By what factor an image's fraction of bright pixels may lie outside the training images' range.
BRIGHT_FACTOR = 3.0
_SAMPLE_PIXELS = 1 << 20


def intensity_statistics(image: np.ndarray) -> dict[str, float]:
    """Intensities of a raw image normalised as the packaged models do (percentiles 1-99.8):
    "background", the median (where the bulk of the pixels lies), and "bright_fraction", the
    fraction above 0.5 (how much of the image is bright objects). Large images are subsampled.

    Example:
        >>> image = np.zeros((64, 64), np.uint8); image[:8] = 200
        >>> intensity_statistics(image)
        {'background': 0.0, 'bright_fraction': 0.125}
    """
    from .data.normalize import Normalization, to_chw

    chw = to_chw(np.asarray(image))
    step = max(1, math.ceil(math.sqrt(chw.shape[1] * chw.shape[2] / _SAMPLE_PIXELS)))
    data = Normalization()(np.ascontiguousarray(chw[:, ::step, ::step]))
    return {"background": round(float(np.median(data)), 4), "bright_fraction": round(float((data > 0.5).mean()), 4)}


def intensity_note(name: str, record: dict[str, Any], image: np.ndarray) -> str | None:
    """Why `image` is unlike the training images of model `name` whose `record` (min, max over
    them of `intensity_statistics`) is given, naming what may help; None when it is alike."""
    try:
        (low, high), (few, many) = record["background"], record["bright_fraction"]
    except (KeyError, TypeError, ValueError):
        return None
    found = intensity_statistics(image)
    background, bright = found["background"], found["bright_fraction"]
    if low - BACKGROUND_MARGIN <= background <= high + BACKGROUND_MARGIN and few / BRIGHT_FACTOR <= bright <= many * BRIGHT_FACTOR:
        return None
    return (f"normalised as model {name!r} does, its background level is {background:.2f} and {bright:.1%} of it is "
            f"bright, against {low:.2f}-{high:.2f} and {few:.1%}-{many:.1%} in its training images; its results may be "
            "poor: try --norm-statistics image, or fine-tune it on a few annotated images (unetkit train --from "
            f"{name})")


def packaged_statistics(name: str, root=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """What packaged model `name`'s training data looked like, measured on its training images
    and masks (`PretrainedModel.train_ids` of its dataset under `unetkit.data.data_root()` or
    `root`): the object `scale` (median diameter, pixel size) and the `intensity` ranges
    (`intensity_statistics`), which `unetkit.pretrained.record_training_statistics` stores.
    Binary masks (EM membranes) count each connected region as one object.

    Example:
        >>> packaged_statistics("fluo-nuclei")[0]["diameter"]  # doctest: +SKIP
        60.53
    """
    from .data import data_root, find_pairs, read_mask
    from .io import read_image
    from .labels import as_instances
    from .scale import median_diameter, pixel_size_um

    model = get_model(name)
    folder = Path(root) if root is not None else data_root() / model.dataset
    wanted = set(model.train_ids)
    pairs = [p for p in find_pairs(folder) if p.mask is not None
             and int(re.sub(r"\D", "", p.name) or -1) in wanted]
    if len(pairs) != len(wanted):
        raise InputError(f"{folder}: found {len(pairs)} of the {len(wanted)} training masks of {name}; give the dataset folder")
    measured_on = ids_text(model.dataset, model.train_ids)
    diameter = median_diameter([as_instances(read_mask(p.mask)) for p in pairs])
    scale: dict[str, Any] = {"diameter": round(float(diameter or 0.0), 2), "measured_on": measured_on,
                             "measure": "median equivalent-circle diameter of the training masks' objects (px)"}
    size = pixel_size_um(model.input.pixel_size)
    if size is not None:
        scale["pixel_size"] = size
    stats = [intensity_statistics(read_image(p.image)) for p in pairs]
    intensity = {key: [min(s[key] for s in stats), max(s[key] for s in stats)] for key in ("background", "bright_fraction")}
    intensity.update(measured_on=measured_on, measure="median and fraction above 0.5 of the percentile-normalised (1-99.8) "
                     "training images: [lowest, highest]")
    return scale, intensity
