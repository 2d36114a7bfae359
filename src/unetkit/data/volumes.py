"""Annotated volumes for 3D training: samples, readers and random 3D tiles.

A `VolumeSample` is the 3D counterpart of `unetkit.data.Sample`: a normalised volume with its
instance labels, the binary target and the paper's weight map computed with 3D (anisotropic)
distances (`unetkit.targets.make_targets_3d`). Two kinds of annotation are told apart:

* objects annotated in 3D (nuclei, cells): 6-connected objects, 3D weight maps;
* objects annotated plane by plane (serial-section EM such as ISBI 2012, where each section's
  cells were labelled on their own): `per_plane=True`, 2D targets and weight maps per plane, and
  validation scores each plane as the 2D challenge does.

Voxels nobody annotated (sparse annotation, Cicek et al. 2016) are given as an `unlabelled` mask,
or, in files, as one mask value (`load_volume_samples(..., ignore_label=V)`, `unetkit train --dims 3
--ignore-label V`): their target is `unetkit.loss.IGNORE_INDEX` and their weight 0, so they add
nothing to the loss. The mask's values there are not read: targets, weight maps and instances are
made as if those voxels were background, so an object's border weights stop where the annotation
stops, as nnU-Net's ignore label does.

Item i of a `VolumeTileDataset` is a pure function of (seed, i), as for 2D tiles, so training
resumes exactly.

Example:
    >>> from unetkit.synthetic import synthetic_cells_3d
    >>> image, labels = synthetic_cells_3d((8, 40, 40), seed=0)
    >>> sample = make_volume_sample(image, labels, spacing=(2.0, 1.0, 1.0))
    >>> sample.image.shape, sample.target.shape
    ((1, 8, 40, 40), (8, 40, 40))
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ..errors import InputError
from ..targets import TargetConfig, make_targets, make_targets_3d
from .normalize import Normalization

Spacing = tuple[float, float, float]
#: ISBI 2012: 4 x 4 nm pixels and 50 nm sections (the challenge's description of its data).
ISBI2012_SPACING: Spacing = (12.5, 1.0, 1.0)


@dataclass
class VolumeSample:
    """One annotated volume, ready for 3D tile sampling.

    Attributes:
        image: (C, Z, Y, X) float32, normalised.
        instances: (Z, Y, X) int32 instance labels (0 = background; ids unique across planes).
        target: (Z, Y, X) int64 classes (1 = object interior), `IGNORE_INDEX` where unlabelled.
        weights: (Z, Y, X) float32 voxel weights (0 where unlabelled).
        name: short name (the file stem), used in messages.
        spacing: voxel size (z, y, x); only ratios matter.
        per_plane: objects were annotated plane by plane (see the module docstring).
    """

    image: np.ndarray
    instances: np.ndarray
    target: np.ndarray
    weights: np.ndarray
    name: str
    spacing: Spacing = (1.0, 1.0, 1.0)
    per_plane: bool = False

    def __post_init__(self) -> None:
        if self.image.ndim != 4:
            raise InputError(f"{self.name}: volume sample image must be (C, Z, Y, X), got shape {self.image.shape}")
        shape = self.image.shape[1:]
        for field in ("instances", "target", "weights"):
            if getattr(self, field).shape != shape:
                raise InputError(f"{self.name}: {field} has shape {getattr(self, field).shape}, the volume {shape}; they must match")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X)."""
        return tuple(self.image.shape[1:])  # type: ignore[return-value]


def check_spacing(spacing: Sequence[float] | str, what: str = "spacing") -> Spacing:
    """Three positive finite numbers (z, y, x), given as numbers or as text "z,y,x", or an
    InputError naming the option.

    Example:
        >>> check_spacing([4, 1, 1]), check_spacing("12.5,1,1")
        ((4.0, 1.0, 1.0), (12.5, 1.0, 1.0))
    """
    try:
        values = tuple(float(s) for s in (spacing.split(",") if isinstance(spacing, str) else spacing))
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"{what} must be three positive numbers z,y,x (e.g. 4,1,1 for sections 4 pixels apart), got {spacing!r}")
    return values  # type: ignore[return-value]


def parse_spacing(text: str | None, option: str = "--spacing") -> Spacing | None:
    """The voxel size (z, y, x) an option gives as "z,y,x" (`check_spacing`), or None when not given.

    Example:
        >>> parse_spacing("2,0.5,0.5"), parse_spacing(None)
        ((2.0, 0.5, 0.5), None)
    """
    return None if text is None else check_spacing(str(text), option)


def normalize_volume(volume: np.ndarray, normalization: Normalization | None = None, name: str = "volume") -> np.ndarray:
    """(Z, Y, X) or (C, Z, Y, X) -> (C, Z, Y, X) float32, normalised over the whole volume at once
    (the percentiles of all its voxels), as 2D images are normalised over all their pixels.

    Example:
        >>> normalize_volume(np.arange(24).reshape(2, 3, 4)).shape
        (1, 2, 3, 4)
    """
    volume = np.asarray(volume)
    if volume.ndim == 3:
        volume = volume[None]
    if volume.ndim != 4:
        raise InputError(f"{name}: a volume must be (Z, Y, X) or (C, Z, Y, X), got shape {volume.shape}")
    c, z, y, x = volume.shape
    if c > 4:
        raise InputError(f"{name}: {c} channels; give a one-channel (Z, Y, X) volume or channels first (C, Z, Y, X) with C <= 4")
    norm = normalization or Normalization()
    norm.check(volume, source=name)
    flat = norm(np.moveaxis(volume.reshape(c, z * y, x), 0, -1) if c > 1 else volume.reshape(z * y, x))
    data = flat.reshape(c, z, y, x)
    if not np.all(np.isfinite(data)):
        raise InputError(f"{name}: the volume contains NaN or infinite values; replace them first")
    return np.ascontiguousarray(data, dtype=np.float32)


def make_volume_sample(
    image: np.ndarray,
    mask: np.ndarray,
    name: str = "volume",
    normalization: Normalization | None = None,
    *,
    targets: TargetConfig | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    per_plane: bool = False,
    unlabelled: np.ndarray | None = None,
) -> VolumeSample:
    """A `VolumeSample` from a volume (Z, Y, X) / (C, Z, Y, X) and its labels (Z, Y, X).

    Args:
        image: the raw volume.
        mask: instance labels or a binary mask (objects: 6-connected components; with
            `per_plane`, 4-connected components of each plane).
        name: used in messages.
        normalization: how to normalise the volume (default percentiles 1-99.8 of all voxels).
        targets: how targets and weight maps are made (the paper's by default).
        spacing: voxel size (z, y, x) for the 3D distances of the weight map.
        per_plane: objects are annotated plane by plane: 2D targets and weight maps per plane.
        unlabelled: bool (Z, Y, X), True where nobody annotated (ignored by the loss); the mask
            is taken as background there (see the module docstring).

    Example:
        >>> mask = np.zeros((4, 12, 12), np.uint8); mask[:, 3:9, 3:9] = 1
        >>> s = make_volume_sample(np.random.rand(4, 12, 12), mask, unlabelled=np.arange(4)[:, None, None] > 1 + 0 * mask)
        >>> int(s.target[3].min()), float(s.weights[3].max())
        (-1, 0.0)
    """
    from ..labels import as_instances
    from ..labels3d import as_instances_3d
    from ..loss import IGNORE_INDEX
    from ..stacks import unique_across_planes

    spacing = check_spacing(spacing)
    data = normalize_volume(image, normalization, name)
    mask = np.asarray(mask)
    if mask.shape != data.shape[1:]:
        raise InputError(f"{name}: the volume is {data.shape[1:]} (z, y, x) but its mask is {mask.shape}; they must have the same shape")
    if mask.dtype.kind not in "biu":
        raise InputError(f"{name}: the mask must hold integer labels (or a binary mask), got {mask.dtype}")
    if unlabelled is not None:
        unlabelled = np.asarray(unlabelled, dtype=bool)
        if unlabelled.shape != mask.shape:
            raise InputError(f"{name}: the unlabelled mask is {unlabelled.shape}, the volume {mask.shape}; they must match")
        mask = np.where(unlabelled, 0, mask)
    if per_plane:
        planes = [as_instances(plane) for plane in mask]
        pairs = [make_targets(plane, targets) for plane in planes]
        target = np.stack([t for t, _ in pairs])
        weights = np.stack([w for _, w in pairs])
        instances = unique_across_planes(np.stack(planes))
    else:
        instances = as_instances_3d(mask, name)
        target, weights = make_targets_3d(instances, targets, spacing)
    target, weights = target.astype(np.int64), weights.astype(np.float32)
    if unlabelled is not None:
        target[unlabelled] = IGNORE_INDEX
        weights[unlabelled] = 0.0
    return VolumeSample(data, instances.astype(np.int32), target, weights, name, spacing, per_plane)


def read_volume(path: str | os.PathLike) -> np.ndarray:
    """A volume (Z, Y, X) from a multi-page TIFF / OME-TIFF z-stack (one channel per page).

    Raises InputError naming the file for a single 2D image or pages of colour.
    """
    from ..io import read_image

    volume = np.asarray(read_image(path, pages=True))
    if volume.ndim == 2:
        raise InputError(f"{path}: one 2D image, not a volume; 3D training needs a multi-page TIFF z-stack per sample "
                         "(or train a 2D model without --dims 3)")
    if volume.ndim != 3:
        raise InputError(f"{path}: pages of shape {volume.shape[1:]}; a volume needs one-channel pages (Z, Y, X)")
    return volume


def load_volume_samples(
    pairs: Sequence,
    normalization: Normalization | None = None,
    *,
    targets: TargetConfig | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    per_plane: bool = False,
    ignore_label: int | None = None,
) -> list[VolumeSample]:
    """Read volume/label pairs (`unetkit.data.find_pairs` of a folder of 3D TIFFs) as samples.

    `ignore_label`: mask voxels of this value are unlabelled (`make_volume_sample(unlabelled=...)`);
    a mask in which every voxel has it is refused, naming the file.

    Example:
        >>> samples = load_volume_samples(find_pairs("my_volumes"), spacing=(4, 1, 1))  # doctest: +SKIP
    """
    from ..io import read_image

    samples = []
    for pair in pairs:
        if pair.mask is None:
            raise InputError(f"{pair.image}: volume has no mask; training needs a label volume for every volume")
        image = read_volume(pair.image)
        mask = np.asarray(read_image(pair.mask, pages=True))
        if mask.shape != image.shape:
            raise InputError(f"{pair.image} is {image.shape} (z, y, x) but its mask {pair.mask} is {mask.shape}; "
                             "they must have the same shape")
        unlabelled = None
        if ignore_label is not None:
            unlabelled = mask == ignore_label
            if unlabelled.all():
                raise InputError(f"{pair.mask}: every voxel has the ignore label {ignore_label}, so nothing in this volume "
                                 "is annotated; annotate some planes of it or move it out of the dataset folder")
        samples.append(make_volume_sample(image, mask, pair.name, normalization, targets=targets, spacing=spacing,
                                          per_plane=per_plane, unlabelled=unlabelled))
    return samples


def unlabelled_voxels(samples: Iterable[VolumeSample]) -> tuple[int, int]:
    """(unlabelled voxels, all voxels) of `samples`: those whose target is `IGNORE_INDEX`.

    Example:
        >>> mask = np.ones((4, 6, 6), np.uint8); mask[1:] = 9
        >>> unlabelled_voxels([make_volume_sample(np.random.rand(4, 6, 6), mask, unlabelled=mask == 9)])
        (108, 144)
    """
    from ..loss import IGNORE_INDEX

    counts = [(int(np.count_nonzero(s.target == IGNORE_INDEX)), int(s.target.size)) for s in samples]
    return sum(c for c, _ in counts), sum(n for _, n in counts)


def get_isbi2012_volume(
    root: str | os.PathLike | None = None,
    slices: Iterable[int] = range(20),
    normalization: Normalization | None = None,
    *,
    targets: TargetConfig | None = None,
) -> VolumeSample:
    """The ISBI 2012 training sections `slices` as one serial-section volume (consecutive slices).

    The cells were annotated section by section, so the sample is `per_plane`, with the
    challenge's spacing (`ISBI2012_SPACING`: 50 nm sections, 4 nm pixels). The volume is
    normalised as a whole.

    Example:
        >>> volume = get_isbi2012_volume(slices=range(18))  # doctest: +SKIP
        >>> volume.shape  # doctest: +SKIP
        (18, 512, 512)
    """
    from ..io import read_image
    from .datasets import ISBI2012, _dataset_folder, _select
    from .readers import check_mask, find_pairs

    folder = _dataset_folder(root, ISBI2012)
    pairs = find_pairs(folder)
    number = lambda p: int(p.image.stem) if p.image.stem.isdigit() else None  # noqa: E731
    chosen = _select(pairs, slices, number, "slices", folder)
    numbers = [number(p) for p in chosen]
    if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        raise InputError(f"ISBI 2012 slices {numbers} are not consecutive; a volume needs consecutive sections")
    image = np.stack([read_image(p.image) for p in chosen])
    mask = np.stack([check_mask(read_image(p.mask), str(p.mask)) for p in chosen])
    name = f"isbi2012_{numbers[0]:02d}-{numbers[-1]:02d}"
    return make_volume_sample(image, mask, name, normalization, targets=targets, spacing=ISBI2012_SPACING, per_plane=True)


class VolumeTileDataset:
    """Random 3D training tiles: {"image": (C, D, H, W), "target": (d, h, w), "weights": (d, h, w)}.

    Each item picks a sample with probability proportional to its voxel count and a uniformly
    random output window inside it (mirrored around a volume smaller than the window), reads the
    input window (the output window grown by the network's border) with mirroring, and, with
    `augment`, applies one 3D geometric augmentation to image, target and weights together
    (`unetkit.augment.augment_volume`: the elastic grid with z displacements scaled by the
    anisotropy, flips, xy rotations by 90 degrees) and the gray-value changes of `augment`.
    The geometric transform is computed on a window grown by `margin` voxels in y and x, so the
    tile's content comes from real data, not mirrored borders.

    A sparsely annotated sample (one with unlabelled voxels, `IGNORE_INDEX` targets) is sampled so
    that its tiles learn something: the item picks one of its labelled voxels uniformly at random
    and an output window uniformly among those that contain it and lie inside the volume (along an
    axis shorter than the window, the mirrored window as above), so with a few annotated planes in
    a deep volume no tile is wasted on unlabelled voxels only. Only per-plane counts of labelled
    voxels are kept (Z integers per sample); the voxel is found in its plane when drawn. A later
    geometric augmentation may still move the labelled voxels out of the window. Densely annotated
    samples draw exactly the uniform windows above, and a sample with no labelled voxel too.

    Args:
        samples: `VolumeSample`s, all with the same number of channels.
        geometry: the model's `VolumeGeometry` (or the model).
        tile_shape: legal input tile (z, y, x).
        augment: an `AugmentConfig` (its elastic, flip, rotate90 and gray-value settings), or None.
        length: number of items.
        seed: item i uses ``np.random.default_rng([seed, i])``.
        margin: extra voxels per side in y and x for the geometric augmentation.

    Example:
        >>> from unetkit.network import UNet
        >>> from unetkit.synthetic import synthetic_cells_3d
        >>> net = UNet(dims=3, depth=2, base_channels=4, pool_kernels=[(1, 2, 2)], conv_kernels=[(1, 3, 3), (3, 3, 3)])
        >>> sample = make_volume_sample(*synthetic_cells_3d((8, 40, 40), seed=0))
        >>> item = VolumeTileDataset([sample], net.geometry, (5, 20, 20), length=2)[1]
        >>> tuple(item["image"].shape), tuple(item["target"].shape)
        ((1, 5, 20, 20), (1, 4, 4))
    """

    def __init__(
        self,
        samples: Sequence[VolumeSample],
        geometry,
        tile_shape: Sequence[int],
        augment=None,
        length: int = 1000,
        seed: int = 0,
        *,
        margin: int = 16,
    ) -> None:
        from ..geometry import VolumeGeometry

        self.samples = list(samples)
        if not self.samples:
            raise InputError("no training volumes; check the dataset folder and the validation split")
        if len({s.image.shape[0] for s in self.samples}) > 1:
            raise InputError("volumes have different channel counts; use all one-channel volumes")
        self.geometry = geometry if isinstance(geometry, VolumeGeometry) else geometry.geometry
        self.tile_shape = self.geometry.check(tile_shape, "tile shape (--tile-depth, --tile-size)")
        self.output_shape = self.geometry.output_shape(self.tile_shape)
        self.offset = tuple((t - o) // 2 for t, o in zip(self.tile_shape, self.output_shape))
        if int(length) != length or length < 0 or int(seed) != seed or seed < 0:
            raise InputError(f"length and seed must be non-negative integers (got {length!r}, {seed!r})")
        self.length, self.seed = int(length), int(seed)
        self.augment = augment
        self.margin = int(margin) if augment is not None else 0
        if augment is not None:
            from ..augment import Augmenter

            self._gray = Augmenter(augment)._gray  # the 2D gray-value changes, over all voxels at once
        voxels = np.array([math.prod(s.shape) for s in self.samples], np.float64)
        self.probabilities = voxels / voxels.sum()
        self._labelled = [_labelled_per_plane(s) for s in self.samples]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        import torch

        from ..augment import augment_volume
        from ..loss import IGNORE_INDEX
        from ..volume import extract_volume
        from .tiles import _position

        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"tile index {index} out of range 0..{self.length - 1}")
        rng = np.random.default_rng([self.seed, index])
        k = int(rng.choice(len(self.samples), p=self.probabilities))
        sample = self.samples[k]
        counts = self._labelled[k]
        if counts is None:
            out_start = [_position(rng, size, window) for size, window in zip(sample.shape, self.output_shape)]
        else:
            voxel = _labelled_voxel(rng, sample.target, counts)
            out_start = [_covering(rng, size, window, v) for size, window, v in zip(sample.shape, self.output_shape, voxel)]
        grow = (0, self.margin, self.margin)
        start = [s - o - g for s, o, g in zip(out_start, self.offset, grow)]
        shape = [t + 2 * g for t, g in zip(self.tile_shape, grow)]
        image = extract_volume(sample.image, start, shape).astype(np.float32, copy=True)
        target = extract_volume(sample.target, start, shape).copy()
        weights = extract_volume(sample.weights, start, shape).astype(np.float32, copy=True)
        c = self.augment
        if c is not None:
            if c.elastic or c.flip or c.rotate90:
                image, target, weights = augment_volume(
                    image, target, weights, rng=rng, spacing=sample.spacing, elastic=c.elastic,
                    grid=c.elastic_grid, sigma=c.elastic_sigma, flip=c.flip, rotate90=c.rotate90,
                )
            channels = image.shape[0]
            flat = self._gray(image.reshape(channels, -1, image.shape[-1]), rng)
            image = flat.reshape(image.shape)
            weights[target == IGNORE_INDEX] = 0.0  # spline resampling may spread weight into unlabelled voxels
        m = self.margin
        (_, ty, tx), (oz, oy, ox), (dz, dy, dx) = self.tile_shape, self.output_shape, self.offset
        image = image[:, :, m : m + ty, m : m + tx]
        target = target[dz : dz + oz, m + dy : m + dy + oy, m + dx : m + dx + ox]
        weights = weights[dz : dz + oz, m + dy : m + dy + oy, m + dx : m + dx + ox]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "target": torch.from_numpy(np.ascontiguousarray(target, dtype=np.int64)),
            "weights": torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)),
        }



def _labelled_per_plane(sample: VolumeSample) -> np.ndarray | None:
    """Cumulative counts of labelled voxels over the z-planes of a sparsely annotated sample; None
    for a densely annotated one (or one with no labelled voxel), which is sampled uniformly."""
    from ..loss import IGNORE_INDEX

    counts = np.cumsum([np.count_nonzero(plane != IGNORE_INDEX) for plane in sample.target], dtype=np.int64)
    if counts[-1] in (0, sample.target.size):
        return None
    return counts


def _labelled_voxel(rng: np.random.Generator, target: np.ndarray, counts: np.ndarray) -> tuple[int, int, int]:
    """A labelled voxel (z, y, x) of `target`, uniformly at random; `counts` from `_labelled_per_plane`."""
    from ..loss import IGNORE_INDEX

    j = int(rng.integers(counts[-1]))
    z = int(np.searchsorted(counts, j, side="right"))
    j -= int(counts[z - 1]) if z else 0
    y, x = divmod(int(np.flatnonzero(target[z] != IGNORE_INDEX)[j]), target.shape[2])
    return z, y, x


def _covering(rng: np.random.Generator, size: int, window: int, voxel: int) -> int:
    """Uniform window start among those inside [0, size) whose window holds `voxel`; a window
    larger than the axis covers all of it, as `unetkit.data.tiles._position` places it."""
    from .tiles import _position

    if window >= size:
        return _position(rng, size, window)
    return int(rng.integers(max(0, voxel - window + 1), min(voxel, size - window) + 1))
