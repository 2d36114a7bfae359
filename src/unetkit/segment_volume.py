"""Volumes segmented whole by a 3D U-Net: probabilities by exact 3D overlap-tile prediction
(`unetkit.volume.predict_volume`), labels by the checkpoint's rule (6-connected objects).

A 3D model (`UNet(dims=3)`) sees a z-stack as one volume, not as a pile of planes: `segment_volume`
is the in-memory API, `segment_volume_files` what ``unetkit predict`` runs for a 3D checkpoint
(multi-page TIFF / OME-TIFF z-stacks, or (Z, Y, X) zarr arrays). Before anything is computed each
input is checked: a single 2D image, a stack too thin for the network's smallest tile and a voxel
spacing unlike the one the model was trained at (z/xy ratio off by more than `SPACING_TOLERANCE`)
are refused in one line naming the fix.

Example:
    >>> import numpy as np
    >>> from unetkit.network import UNet
    >>> net = UNet(dims=3, depth=2, base_channels=4, pool_kernels=[(1, 2, 2)], conv_kernels=[(1, 3, 3), (3, 3, 3)])
    >>> probabilities, labels = segment_volume(net, np.random.rand(6, 20, 22).astype("float32"), device="cpu")
    >>> probabilities.shape, labels.shape
    ((2, 6, 20, 22), (6, 20, 22))
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import InputError, Interrupted
from .postprocess import labels_from_probabilities

Shape3 = tuple[int, int, int]
Spacing = tuple[float, float, float]

#: Largest relative difference between the z/xy voxel-size ratio of a volume and the model's
#: training one that is accepted: 25 %.
SPACING_TOLERANCE = 0.25

#: Options of `unetkit predict` that only 2D models use, with why (for the one-line refusal).
TWO_D_ONLY = {
    "--diameter": "rescales 2D images to the model's object size",
    "--pixel-size": "rescales 2D images to the model's pixel size",
    "--stitch": "links the planes of stacks segmented plane by plane",
    "--ctc": "writes one 2D Cell Tracking Challenge mask per frame",
    "--out-format zarr": "writes large 2D images tile by tile",
    "--rows": "segments a stripe of a large 2D image",
    "--block-size": "sets the blocks of large 2D images",
    "--dtype float16": "stores the probabilities of large 2D images",
    "--backend onnxruntime": "runs 2D tiles in onnxruntime",
    "--norm-statistics image": "gathers each 2D image's batch-norm statistics",
}


def is_volume_model(model) -> bool:
    """Whether `model` (a UNet, a `LoadedModel` or a segmenter) is a 3D U-Net.

    Example:
        >>> from unetkit.network import UNet
        >>> is_volume_model(UNet(depth=2, base_channels=4))
        False
    """
    net = getattr(model, "model", model)
    return int(getattr(net, "dims", 2)) == 3


def refuse_two_d_options(given: Sequence[str], model_name: str) -> None:
    """InputError for the first of `given` (keys of `TWO_D_ONLY`) that a 3D model cannot honour.

    Example:
        >>> refuse_two_d_options(["--stitch"], "run/best.pt")
        Traceback (most recent call last):
        ...
        unetkit.errors.InputError: --stitch links the planes of stacks segmented plane by plane, but run/best.pt is a 3D model that segments each volume whole: leave out --stitch
    """
    for option in given:
        why = TWO_D_ONLY.get(option, "applies to 2D models")
        flag = option.split()[0]
        raise InputError(f"{option} {why}, but {model_name} is a 3D model that segments each volume whole: leave out {flag}")


# -- spacing -------------------------------------------------------------------------------------
def as_spacing(value) -> Spacing | None:
    """`value` as a voxel size (z, y, x) of positive floats, or None when it is not one.

    Example:
        >>> as_spacing([3, 1, 1]), as_spacing(None), as_spacing([0, 1, 1])
        ((3.0, 1.0, 1.0), None, None)
    """
    from .data.volumes import check_spacing

    try:
        return check_spacing(value)
    except InputError:
        return None


def model_spacing(loaded) -> Spacing | None:
    """The voxel size a 3D model was trained at: its checkpoint's ``train_config["spacing"]`` (else
    ``scale["spacing"]``), or None when it records none."""
    for record in (getattr(loaded, "train_config", None), getattr(loaded, "scale", None)):
        found = as_spacing(record.get("spacing")) if isinstance(record, dict) else None
        if found:
            return found
    return None


def z_ratio(spacing: Spacing) -> float:
    """How much longer a voxel is along z than in the xy plane: z / sqrt(y * x).

    Example:
        >>> z_ratio((2.0, 0.5, 0.5))
        4.0
    """
    z, y, x = spacing
    return z / math.sqrt(y * x)


def _spacing_text(spacing: Spacing) -> str:
    return ",".join(f"{v:g}" for v in spacing)


def check_spacing_matches(volume: Spacing | None, model: Spacing | None, name: str = "volume", source: str = "--spacing") -> None:
    """Refuse a volume whose z/xy ratio differs from the model's by more than `SPACING_TOLERANCE`
    (relative to the model's); nothing is checked when either spacing is unknown.

    Example:
        >>> check_spacing_matches((1.0, 0.5, 0.5), (2.0, 0.5, 0.5), "stack.tif")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        unetkit.errors.InputError: stack.tif: voxel spacing 1,0.5,0.5 (z/xy 2, from --spacing) but the model was trained at 2,0.5,0.5 (z/xy 4); ...
    """
    if volume is None or model is None:
        return
    ours, theirs = z_ratio(volume), z_ratio(model)
    if abs(ours - theirs) <= SPACING_TOLERANCE * theirs:
        return
    zoom = ours / theirs
    raise InputError(
        f"{name}: voxel spacing {_spacing_text(volume)} (z/xy {ours:.3g}, from {source}) but the model was trained at "
        f"{_spacing_text(model)} (z/xy {theirs:.3g}); resample the volume along z to the model's spacing "
        f"(scipy.ndimage.zoom(volume, ({zoom:.3g}, 1, 1)), order=1) or train a model at this spacing"
    )


def _ome_spacing(xml: str) -> Spacing | None:
    pixels = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", xml)
    if not pixels:
        return None
    sizes = {axis: re.search(rf'\bPhysicalSize{axis}="([^"]+)"', pixels.group(0)) for axis in "ZYX"}
    if not all(sizes.values()):
        return None
    return as_spacing([m.group(1) for m in sizes.values()])  # type: ignore[union-attr]


def zarr_spacing(path: str | os.PathLike) -> Spacing | None:
    """The voxel size (z, y, x) an OME-Zarr records: the "scale" transformation of its level 0
    (times the multiscale's own, if any) on its last three axes, when they are space axes of one
    unit; None for a plain zarr array or missing metadata.

    Example:
        >>> zarr_spacing("embryo.ome.zarr")  # doctest: +SKIP
        (2.0, 0.5, 0.5)
    """
    import zarr

    try:
        attrs = dict(zarr.open(str(path), mode="r").attrs)
        multiscale = (attrs.get("ome", {}).get("multiscales") or attrs.get("multiscales"))[0]
        axes = multiscale["axes"][-3:]
        scale = np.ones(len(multiscale["axes"]))
        for transforms in (multiscale["datasets"][0].get("coordinateTransformations"), multiscale.get("coordinateTransformations")):
            for transform in transforms or []:
                if transform.get("type") == "scale":
                    scale = scale * np.asarray(transform["scale"], dtype=float)
    except (TypeError, KeyError, IndexError, ValueError, AttributeError):
        return None
    if not all(isinstance(a, dict) and a.get("type", "space") == "space" for a in axes):
        return None
    if len({a.get("unit") for a in axes}) != 1:
        return None  # mixed units cannot be compared without converting them
    spacing = tuple(float(v) for v in scale[-3:])
    return spacing if all(np.isfinite(v) and v > 0 for v in spacing) else None  # type: ignore[return-value]


def tiff_spacing(path: str | os.PathLike) -> Spacing | None:
    """The voxel size (z, y, x) a TIFF z-stack records: ImageJ's 'spacing' with the XY resolution
    tags, or OME-XML PhysicalSizeZ/Y/X; None when it records none (or it is not a TIFF).

    Example:
        >>> tiff_spacing("stack.tif")  # doctest: +SKIP
        (2.0, 0.5, 0.5)
    """
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff") or not path.is_file():
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if tif.ome_metadata:
                found = _ome_spacing(tif.ome_metadata)
                if found:
                    return found
            imagej = tif.imagej_metadata or {}
            if "spacing" not in imagej:
                return None
            tags = tif.pages[0].tags
            xy = []
            for tag in ("YResolution", "XResolution"):
                value = tags.get(tag)
                if value is None:
                    return None
                numerator, denominator = value.value
                xy.append(denominator / numerator if numerator else 0.0)
            return as_spacing([imagej["spacing"], *xy])
    except Exception:  # noqa: BLE001 - unreadable metadata: spacing unknown, the pixels are checked elsewhere
        return None


# -- tiles and extent ----------------------------------------------------------------------------
def check_extent(shape: Sequence[int], geometry, name: str = "volume") -> None:
    """Refuse a volume thinner than the network's smallest tile along an axis, naming the minimum.

    Example:
        >>> from unetkit.geometry import VolumeGeometry
        >>> check_extent((4, 40, 44), VolumeGeometry(((1, 2, 2),), ((1, 3, 3), (3, 3, 3))), "thin.tif")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        unetkit.errors.InputError: thin.tif: 4 slices along z, but this 3D model needs at least 5 (its smallest tile); ...
    """
    from .volume import thin_axis

    thin = thin_axis(shape, geometry)
    if thin is not None:
        index, size, low = thin
        axis = "zyx"[index]
        what = "slices" if axis == "z" else "voxels"
        widths = [(0, 0)] * 3
        widths[index] = ((low - size) // 2, low - size - (low - size) // 2)
        pad = f"numpy.pad(volume, {tuple(widths)}, mode='reflect')" if size > 1 else "more slices"
        raise InputError(
            f"{name}: {size} {what} along {axis}, but this 3D model needs at least {low} (its smallest tile); "
            f"give a volume of at least {low} {what} along {axis} (e.g. mirror it out: {pad}), "
            "or segment its planes one by one with a 2D model"
        )


def tile_for_size(geometry, size: int, volume_shape: Sequence[int]) -> Shape3:
    """The tile (z, y, x) for ``--tile-size size`` with a 3D model: `size` along y and x (legal
    there), along z the tile that covers the volume in one pass, or the largest legal z tile up
    to `size` when that is smaller.

    Example:
        >>> from unetkit.geometry import VolumeGeometry
        >>> tile_for_size(VolumeGeometry(((1, 2, 2),), ((1, 3, 3), (3, 3, 3))), 28, (6, 40, 44))
        (10, 28, 28)
    """
    from .tiling import smallest_tile

    z_axis = geometry.axes[0]
    for axis_name, axis in zip("yx", geometry.axes[1:]):
        axis.check(int(size), f"--tile-size {size} ({axis_name})", geometry.describe())
        low = smallest_tile(axis)
        if size < low:
            raise InputError(f"--tile-size {size} is legal along {axis_name} but too small to tile a volume "
                             f"(its output would be narrower than the pooling step); use {low} or larger")
    low_z = smallest_tile(z_axis)
    whole = max(low_z, z_axis.input_size(int(volume_shape[0])))
    if whole <= size:
        return whole, int(size), int(size)
    fitting = [s for s in z_axis.legal_sizes(int(size)) if s >= low_z]
    return (fitting[-1] if fitting else low_z), int(size), int(size)


# -- the segmenter -------------------------------------------------------------------------------
@dataclass
class VolumeSegmentation:
    """A volume segmented in memory: what ``unetkit predict`` writes for it."""

    probabilities: np.ndarray  # float32 (n_classes, Z, Y, X)
    labels: np.ndarray  # (Z, Y, X): instance ids (uint16 / uint32) or binary uint8
    seconds: float
    notes: list[str] = field(default_factory=list)


class VolumeSegmenter:
    """A loaded 3D model with its resolved settings: maps by `predict_volume`, labels by the rule.

    Args:
        loaded: a `unetkit.checkpoint.LoadedModel` of a `UNet(dims=3)`.
        options: the user's `unetkit.inference.InferenceOptions` (None: as the checkpoint says);
            tta, tile_size, batch_size, device, threshold / watershed / min_size, labels and
            fill_holes apply.
        spacing: the volumes' voxel size (z, y, x), compared with the model's training spacing;
            None reads it from each TIFF where it is recorded.
        source: the checkpoint path or name, for messages.

    Example:
        >>> segmenter = VolumeSegmenter.load("run3d/best.pt")  # doctest: +SKIP
        >>> result = segmenter.segment(volume, name="stack.tif")  # doctest: +SKIP
    """

    def __init__(self, loaded, options=None, *, spacing: Spacing | None = None, source=None) -> None:
        from .decision import DecisionRule
        from .device import resolve_device
        from .inference import InferenceOptions, labels_rule

        if not is_volume_model(loaded):
            raise InputError(f"{source or 'the model'}: a 2D model; give a 3D model, or segment the volume plane by plane "
                             "with the 2D model (unetkit predict does this for z-stacks; unetkit.stacks.segment_stack)")
        self.loaded = loaded
        self.options = (options or InferenceOptions()).check()
        self.spacing = spacing
        self.source = source
        stored = dict(loaded.decision or {})
        chosen = DecisionRule.from_dict(stored) if stored else DecisionRule()
        o = self.options
        self.rule = labels_rule(stored, threshold=o.threshold, watershed=o.watershed, min_size=o.min_size)
        self.tta = chosen.tta if o.tta is None else bool(o.tta)
        self.device = str(resolve_device(o.device))
        self.model = loaded.model.to(self.device)
        self._notes: list[str] = []
        if chosen.norm_statistics == "image" and o.norm_statistics is None:
            self._notes.append("the labels rule was chosen with each image's batch-norm statistics; volumes are "
                               "predicted with the stored ones")

    @classmethod
    def load(cls, checkpoint, options=None, *, spacing: Spacing | None = None) -> "VolumeSegmenter":
        """A segmenter for a 3D checkpoint file."""
        from .checkpoint import load_checkpoint

        return cls(load_checkpoint(checkpoint), options, spacing=spacing, source=checkpoint)

    @property
    def geometry(self):
        return self.model.geometry

    @property
    def model_spacing(self) -> Spacing | None:
        return model_spacing(self.loaded)

    def describe(self) -> str:
        """One line for the user: how labels and maps are made."""
        spacing = self.model_spacing
        trained = f"trained at spacing {_spacing_text(spacing)}" if spacing else "training spacing not recorded"
        tile = f"{self.options.tile_size} (y, x)" if self.options.tile_size else "auto"
        return (f"3D model; labels: {self.rule.method} at {self.rule.threshold:g}; maps: "
                f"{'TTA' if self.tta else 'no TTA'}; tile {tile}, {self.device}; {trained}")

    def take_notes(self) -> list[str]:
        notes, self._notes = self._notes, []
        return notes

    def check_volume(self, shape: Sequence[int], name: str = "volume", spacing: Spacing | None = None,
                     source: str = "--spacing") -> None:
        """Refuse a volume of `shape` (Z, Y, X) that this model cannot segment faithfully."""
        check_extent(shape, self.geometry, name)
        if self.options.tile_size is not None:
            tile_for_size(self.geometry, int(self.options.tile_size), shape)
        check_spacing_matches(spacing if spacing is not None else self.spacing, self.model_spacing, name, source)

    def tile_shape(self, shape: Sequence[int]) -> Shape3 | None:
        if self.options.tile_size is None:
            return None
        return tile_for_size(self.geometry, int(self.options.tile_size), shape)

    def probabilities(self, volume: np.ndarray) -> np.ndarray:
        """(n_classes, Z, Y, X) float32 of a normalised (C, Z, Y, X) volume."""
        from .volume import predict_volume

        return predict_volume(self.model, volume, tile_shape=self.tile_shape(volume.shape[-3:]),
                              batch_size=int(self.options.batch_size), tta=self.tta, device=self.device)

    def labels(self, probabilities: np.ndarray) -> np.ndarray:
        """(Z, Y, X) labels drawn by the rule: instance ids, or uint8 0/1 for ``labels="binary"``."""
        return labels_from_probabilities(probabilities, self.rule, binary=self.options.labels == "binary",
                                         fill_holes=self.options.fill_holes)

    def segment(self, raw: np.ndarray, *, name: str = "volume", spacing: Spacing | None = None) -> VolumeSegmentation:
        """Segment a raw (Z, Y, X) volume (or a normalised (C, Z, Y, X) one when the model takes C channels)."""
        started = time.perf_counter()
        raw = np.asarray(raw)
        if raw.ndim == 2:
            raise InputError(f"{name}: is one 2D image {raw.shape}; a 3D model needs a volume (Z, Y, X): give a z-stack, "
                             "or use a 2D model for 2D images")
        if raw.ndim == 3:
            self.check_volume(raw.shape, name, spacing)
            from .data.volumes import normalize_volume

            volume = normalize_volume(raw, self.loaded.normalization, name)
        else:
            self.check_volume(raw.shape[-3:], name, spacing)
            volume = raw.astype(np.float32, copy=False)
        probabilities = self.probabilities(volume)
        labels = self.labels(probabilities)
        return VolumeSegmentation(probabilities, labels, time.perf_counter() - started, self.take_notes())


def volume_segmenter(model, options=None, *, spacing: Spacing | None = None) -> VolumeSegmenter:
    """`model` as a `VolumeSegmenter`: one already, a `LoadedModel`, a bare `UNet(dims=3)` (inputs
    already normalised, default rule), or a checkpoint path or name."""
    from .checkpoint import LoadedModel
    from .network import UNet

    if isinstance(model, VolumeSegmenter):
        return model
    if isinstance(model, UNet):
        from .data.normalize import Normalization

        names = ["background", *(f"class{i}" for i in range(1, model.n_classes))]
        model = LoadedModel(model, Normalization(mode="none"), names)
    if isinstance(model, LoadedModel):
        return VolumeSegmenter(model, options, spacing=spacing)
    return VolumeSegmenter.load(model, options, spacing=spacing)


def segment_volume(model, volume, *, tta: bool | None = None, tile_size: int | None = None, device: str = "auto",
                   spacing: Sequence[float] | None = None, labels: str = "instances",
                   name: str = "volume") -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (n_classes, Z, Y, X) float32 and labels (Z, Y, X) of a raw volume.

    `model` is a 3D checkpoint path, a `LoadedModel`, a `VolumeSegmenter` (its own options) or a
    bare `UNet(dims=3)` (then `volume` must be normalised already). The volume is normalised with
    the checkpoint's normalisation, predicted whole (`unetkit.volume.predict_volume`; TTA as the
    checkpoint's rule says unless `tta`) and labelled by the rule. `spacing` (z, y, x) is compared
    with the model's training spacing (`check_spacing_matches`).

    Example:
        >>> probabilities, labels = segment_volume("run3d/best.pt", volume, spacing=(2, 0.5, 0.5))  # doctest: +SKIP
    """
    from .inference import InferenceOptions

    options = InferenceOptions(tta=tta, tile_size=tile_size, device=device, labels=labels)
    segmenter = volume_segmenter(model, options)
    result = segmenter.segment(np.asarray(volume), name=name, spacing=as_spacing(spacing) if spacing is not None else None)
    return result.probabilities, result.labels


# -- files ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VolumeInput:
    """A volume file checked before segmenting: its output name, shape and recorded voxel size."""

    path: Path
    name: str
    shape: Shape3
    spacing: Spacing | None = None
    zarr: bool = False


def _zarr_volume(path: Path):
    """The level-0 array of a zarr / OME-Zarr store, with leading axes of size 1 dropped."""
    import zarr

    from .bigimage import _level0

    component, _ = _level0(path)
    node = zarr.open(str(path), mode="r")
    return node[component] if component else node


def volume_header(path: Path) -> tuple[tuple[int, ...], int, bool]:
    """(shape, planes, is zarr) of an input, reading no pixels; InputError for an unreadable file.

    A zarr array's leading axes of size 1 are dropped (an OME-Zarr (1, 1, Z, Y, X) is a volume).
    """
    from .bigimage import is_zarr_path
    from .io import read_header

    if is_zarr_path(path):
        shape = tuple(int(s) for s in _zarr_volume(path).shape)
        while len(shape) > 3 and shape[0] == 1:
            shape = shape[1:]
        return shape, (shape[0] if len(shape) == 3 else 1), True
    header = read_header(path, pages=True)
    return tuple(header.shape), int(header.planes), False


def inspect_volume(path: Path, in_channels: int, header: tuple[tuple[int, ...], int, bool] | None = None) -> VolumeInput:
    """Check that `path` holds one (Z, Y, X) volume of one channel (`header`: its `volume_header`).

    Example:
        >>> inspect_volume(Path("cells.png"), 1)  # doctest: +SKIP
        Traceback (most recent call last):
        ...
        unetkit.errors.InputError: cells.png: is one 2D image (48, 56); a 3D model needs a volume (multi-page TIFF z-stack ...
    """
    from .io import output_name

    shape, planes, zarr = header or volume_header(path)
    if in_channels != 1:
        raise InputError(f"{path}: this 3D model takes {in_channels} channels; unetkit predict reads one-channel volumes: "
                         "segment (C, Z, Y, X) arrays with unetkit.segment_volume.segment_volume")
    if planes == 1 and not zarr:
        raise InputError(
            f"{path}: is one 2D image {shape}; a 3D model needs a volume (multi-page TIFF z-stack of one-channel "
            "planes): give the z-stack, or use a 2D model for 2D images"
        )
    if len(shape) != 3:
        kind = "zarr array" if zarr else "stack"
        raise InputError(f"{path}: a {kind} of shape {shape}; a 3D model needs one volume (Z, Y, X) of one channel per "
                         "input: save each channel (or time point) as its own z-stack")
    return VolumeInput(path, output_name(path), shape, zarr_spacing(path) if zarr else tiff_spacing(path), zarr)  # type: ignore[arg-type]


def spacing_source(item: VolumeInput) -> str:
    """Where a volume's spacing in messages came from: its file's metadata, or --spacing."""
    if item.spacing is None:
        return "--spacing"
    return "the OME-Zarr metadata" if item.zarr else "the TIFF's metadata"


def read_volume(item: VolumeInput) -> np.ndarray:
    """The raw (Z, Y, X) voxels of a checked input."""
    from .io import read_image

    if item.zarr:
        return np.asarray(_zarr_volume(item.path)[...]).reshape(item.shape)
    return read_image(item.path, pages=True)


def segment_volume_files(
    files: Sequence,
    model,
    out,
    *,
    force: bool = False,
    progress: bool = False,
    skip_unreadable: bool = False,
    echo: Callable[[str], None] | None = None,
) -> list[Path]:
    """Segment volume files with a 3D model; writes OUT/NAME_probabilities.tif (n_classes, Z, Y, X)
    float32 and OUT/NAME_labels.tif (Z, Y, X), atomically.

    `files` are multi-page TIFF / OME-TIFF z-stacks or (Z, Y, X) zarr arrays (`unetkit.segment.segment_files`
    expands folders and calls this for a 3D model); `model` a `VolumeSegmenter`, a `LoadedModel`
    or a 3D checkpoint path. Every input is checked first (a 2D image, a stack too thin for the
    network, a voxel spacing unlike the model's are refused, naming the fix), so nothing is
    written for a bad batch. Outputs that exist are skipped (noted) unless `force`, as for 2D
    images. Returns the paths written.

    Example:
        >>> segment_volume_files(["stack.tif"], "run3d/best.pt", "predictions")  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from .bigimage import is_zarr_path
    from .io import check_writable_folder, listing, remove_stale_temp_files, repeated, write_tiff

    note = echo or (lambda message: None)
    segmenter = volume_segmenter(model)
    out = Path(out)
    paths = [Path(p) for p in files]
    for path in paths:
        if path.is_dir() and not is_zarr_path(path):
            raise InputError(f"{path}: a folder; give z-stack files here, or segment the folder with "
                             "unetkit.segment.segment_files (unetkit predict), which lists its images")
    checked: list[VolumeInput] = []
    unreadable: list[tuple[Path, InputError]] = []
    for path in paths:
        try:
            header = volume_header(path)
        except InputError as exc:
            if not skip_unreadable:
                raise
            unreadable.append((path, exc))
            continue
        checked.append(inspect_volume(path, segmenter.model.in_channels, header))
    duplicates = sorted(repeated(item.name for item in checked))
    if duplicates:
        raise InputError(f"several inputs share the name(s) {duplicates}; their outputs would collide, predict them separately")
    if segmenter.spacing is not None:  # --spacing replaces what the files record
        checked = [replace(item, spacing=None) for item in checked]
    for item in checked:
        segmenter.check_volume(item.shape, str(item.path), item.spacing, spacing_source(item))
    if unreadable:
        note(f"skipping {len(unreadable)} unreadable input(s): {listing([p for p, _ in unreadable])}")
        if not checked:
            raise InputError("none of the inputs is a readable volume; nothing to segment")
    check_writable_folder(out, "--out")
    jobs = [(item, [out / f"{item.name}_probabilities.tif", out / f"{item.name}_labels.tif"]) for item in checked]
    if not force:
        complete = [item for item, paths in jobs if all(p.exists() for p in paths)]
        if complete:
            note(f"skipping {len(complete)} volume(s) whose outputs already exist in {out}: "
                 f"{listing([item.path for item in complete])} (add --force to segment them again)")
        jobs = [(item, paths) for item, paths in jobs if item not in complete]
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out, older_than=600.0)
    written: list[Path] = []
    done: list[Path] = []
    try:
        for item, paths in tqdm(jobs, disable=not progress, desc="volumes", unit="volume"):
            result = segmenter.segment(read_volume(item), name=str(item.path), spacing=item.spacing)
            for line in result.notes:
                note(line)
            try:
                for target, array in zip(paths, (result.probabilities, result.labels)):
                    if force or not target.exists():
                        written.append(write_tiff(target, array, force=force, planes=True))
            except InputError as exc:
                raise InputError(f"{exc}; {len(done)} of {len(jobs)} volume(s) were segmented and written before it; "
                                 "run the same command again to segment the rest") from None
            done.append(item.path)
    except KeyboardInterrupt:
        left = [item.path for item, _ in jobs[len(done):]]
        raise Interrupted(f"{len(done)} of {len(jobs)} volume(s) segmented; not done: {listing(left)}. Run the same "
                          "command again to segment the rest (volumes whose outputs exist are skipped)") from None
    return written
