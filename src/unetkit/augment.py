"""Data augmentation: the paper's elastic deformations plus rotations, flips, shifts, gray values.

All geometric transforms of one sample are composed into a single coordinate map, so every array
is resampled once. Conventions:

* Arrays are (H, W) or channels-first (C, H, W) and share H, W.
* Integer and bool arrays are labels: nearest-neighbour sampling, so no new values appear.
  Float arrays (images, weight maps) are sampled with cubic splines (order 3) and clipped to the
  array's original value range, so weight maps stay non-negative and intensities don't overshoot.
* Outside the image the content is mirrored (`scipy.ndimage` mode "mirror": d c b | a b c d).
* With `out_shape`, the transform is defined on an `out_shape` window centred in the input (the
  extra input around it is context): only the window's pixels are resampled and returned.
* Elastic deformation as in the paper: displacement vectors on a coarse `grid` x `grid` grid whose
  corners are the image's corner pixels, drawn from N(0, sigma^2) pixels per component, and
  interpolated to every pixel by bicubic spline interpolation (tensor-product cubic B-spline that
  passes through the grid values, with the grid mirrored at its edges, which a 3x3 grid needs to
  support a cubic). The displacement field is smooth and equals the drawn vectors at grid points.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> image = rng.random((1, 64, 64), dtype=np.float32)
    >>> labels = (image[0] > 0.5).astype(np.int64)
    >>> out_image, out_labels, out_weights = Augmenter(AugmentConfig())(image, labels, None, rng)
    >>> out_image.shape, out_labels.dtype.name, out_weights is None
    ((1, 64, 64), 'int64', True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import numpy as np
from scipy import ndimage as ndi

from .config import PAPER, from_dict_strict
from .errors import InputError

Seed = Union[np.random.Generator, int, None]
_MODE = "mirror"


def _generator(rng: Seed) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _grid_weights(length: int, grid: int) -> np.ndarray:
    """(length, grid) matrix: row i holds the spline weights of the grid values at pixel i."""
    positions = np.linspace(0.0, grid - 1.0, length)
    weights = np.empty((length, grid), np.float64)
    for k in range(grid):
        unit = np.zeros(grid)
        unit[k] = 1.0
        weights[:, k] = ndi.map_coordinates(unit, [positions], order=3, mode=_MODE)
    return weights


def displacement_field(
    shape: tuple[int, int],
    rng: Seed = None,
    grid: int = PAPER.elastic_grid,
    sigma: float = PAPER.elastic_sigma,
) -> np.ndarray:
    """Random smooth displacement field of the paper's elastic deformation, (2, H, W) float64.

    Draws `rng.normal(0, sigma, (2, grid, grid))` (row and column components on a grid whose
    outer points are the image corners) and interpolates it bicubically to every pixel; the
    field at grid points equals the drawn values.

    Example:
        >>> import numpy as np
        >>> field = displacement_field((41, 41), rng=0)
        >>> drawn = np.random.default_rng(0).normal(0, 10.0, (2, 3, 3))
        >>> bool(np.allclose(field[:, ::20, ::20], drawn))
        True
    """
    if int(grid) != grid or grid < 2:
        raise InputError(f"elastic grid must be an integer >= 2, got {grid}")
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise InputError(f"elastic sigma must be a non-negative number of pixels, got {sigma}")
    grid = int(grid)
    vectors = _generator(rng).normal(0.0, sigma, (2, grid, grid))
    rows = _grid_weights(shape[0], grid)
    cols = _grid_weights(shape[1], grid)
    # The tensor-product spline is linear in the grid values: rows @ G @ cols.T per component.
    return np.einsum("ik,ckl,jl->cij", rows, vectors, cols)


def _check_arrays(arrays: tuple[np.ndarray, ...]) -> tuple[int, int]:
    shape = None
    for i, arr in enumerate(arrays):
        if arr.ndim not in (2, 3):
            raise InputError(
                f"array {i} has shape {arr.shape}; augmentation takes (H, W) or (C, H, W) arrays"
            )
        if shape is None:
            shape = arr.shape[-2:]
        elif arr.shape[-2:] != shape:
            raise InputError(
                f"array {i} is {arr.shape[-2:]} in (H, W) but array 0 is {shape}; "
                "the image, labels and weights must have the same height and width"
            )
    assert shape is not None
    return int(shape[0]), int(shape[1])


def _resample_plane(plane: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
    out = ndi.map_coordinates(plane, coords, order=order, mode=_MODE)
    if order > 1:
        np.clip(out, plane.min(), plane.max(), out=out)
    return out


def _resample(arr: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Sample `arr` at `coords` (2, H, W) or (3, D, H, W): labels nearest, floats cubic and clipped;
    an array with one axis more than the coordinates is channels-first, resampled channel by channel."""
    if arr.dtype == bool:
        return _resample(arr.astype(np.uint8), coords).astype(bool)
    if np.issubdtype(arr.dtype, np.integer):
        order = 0
    elif np.issubdtype(arr.dtype, np.floating):
        order = 3
    else:
        raise InputError(f"cannot augment an array of dtype {arr.dtype}; use integers or floats")
    if arr.ndim == coords.shape[0]:
        return _resample_plane(arr, coords, order)
    return np.stack([_resample_plane(plane, coords, order) for plane in arr])


def elastic_deform(
    image: np.ndarray,
    *others: np.ndarray,
    rng: Seed = None,
    grid: int = PAPER.elastic_grid,
    sigma: float = PAPER.elastic_sigma,
) -> Union[np.ndarray, tuple[np.ndarray, ...]]:
    """Deform `image` and `others` with one random elastic deformation (paper, Section 3.1).

    Args:
        image, others: (H, W) or (C, H, W) arrays sharing H, W; integer/bool arrays are treated
            as labels (nearest neighbour), float arrays are resampled with cubic splines and
            clipped to their value range.
        rng: a `np.random.Generator`, a seed, or None for fresh randomness.
        grid: displacement grid size (grid x grid points spanning the image).
        sigma: standard deviation of the grid displacements, in pixels.

    Returns:
        The deformed `image` alone when no `others` are given, else a tuple
        (image, *others) in the same order; shapes and dtypes are kept.

    Example:
        >>> import numpy as np
        >>> image = np.random.default_rng(1).random((32, 32))
        >>> labels = (image > 0.5).astype(np.int64)
        >>> warped, warped_labels = elastic_deform(image, labels, rng=0)
        >>> warped.shape, set(np.unique(warped_labels)) <= {0, 1}
        ((32, 32), True)
    """
    arrays = (np.asarray(image),) + tuple(np.asarray(a) for a in others)
    height, width = _check_arrays(arrays)
    field = displacement_field((height, width), rng=rng, grid=grid, sigma=sigma)
    coords = np.indices((height, width), dtype=np.float64) + field
    out = tuple(_resample(a, coords) for a in arrays)
    return out if others else out[0]


@dataclass
class AugmentConfig:
    """Which augmentations to apply and their ranges; each is drawn afresh for every sample.

    Geometric (applied jointly to image, labels and weights, composed into one resampling):
        elastic, elastic_grid, elastic_sigma: the paper's elastic deformation (grid points,
            displacement std in pixels).
        rotate, rotate_degrees: rotation by an angle uniform in [-rotate_degrees, rotate_degrees].
        rotate90: rotation by a random multiple of 90 degrees.
        flip: independent random up-down and left-right flips, each with probability 1/2.
        shift, shift_pixels: translation uniform in [-shift_pixels, shift_pixels] per axis.
        scale, scale_range: zoom by a factor log-uniform in scale_range (> 1 enlarges the objects),
            so a model learns objects over a range of sizes (off by default: the paper keeps the
            scale, and `unetkit predict --diameter` rescales images to the model's).
    Gray values (image only; magnitudes relative to the image's own statistics):
        gamma, gamma_range: per channel, x -> lo + (hi - lo) * ((x - lo) / (hi - lo)) ** g with
            lo, hi the channel's min and max, g log-uniform in gamma_range.
        contrast, contrast_range: x -> mean + f * (x - mean), f uniform in contrast_range.
        brightness, brightness_range: x -> x + b * std, b uniform in [-range, range].
        noise, noise_std: additive Gaussian noise with std uniform in [0, noise_std] * std.

    Example:
        >>> config = AugmentConfig(rotate=False, noise_std=0.05)
        >>> AugmentConfig.from_dict(config.to_dict()) == config
        True
    """

    elastic: bool = True
    elastic_grid: int = PAPER.elastic_grid
    elastic_sigma: float = PAPER.elastic_sigma
    rotate: bool = True
    rotate_degrees: float = 180.0
    rotate90: bool = True
    flip: bool = True
    shift: bool = True
    shift_pixels: float = 10.0
    scale: bool = False
    scale_range: tuple[float, float] = (0.75, 1.33)
    gamma: bool = True
    gamma_range: tuple[float, float] = (0.8, 1.25)
    contrast: bool = True
    contrast_range: tuple[float, float] = (0.8, 1.2)
    brightness: bool = True
    brightness_range: float = 0.1
    noise: bool = True
    noise_std: float = 0.05

    def __post_init__(self) -> None:
        self.gamma_range = _pair("gamma_range", self.gamma_range, positive=True)
        self.scale_range = _pair("scale_range", self.scale_range, positive=True)
        self.contrast_range = _pair("contrast_range", self.contrast_range, positive=False)
        if int(self.elastic_grid) != self.elastic_grid or self.elastic_grid < 2:
            raise InputError(f"elastic_grid must be an integer >= 2, got {self.elastic_grid}")
        for name in ("elastic_sigma", "rotate_degrees", "shift_pixels", "brightness_range",
                     "noise_std"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise InputError(f"{name} must be a non-negative number, got {value!r}")

    @classmethod
    def disabled(cls) -> "AugmentConfig":
        """A configuration with every augmentation switched off (the identity)."""
        return cls(elastic=False, rotate=False, rotate90=False, flip=False, shift=False, scale=False,
                   gamma=False, contrast=False, brightness=False, noise=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-compatible) for saving in a checkpoint."""
        out = asdict(self)
        out["gamma_range"] = list(self.gamma_range)
        out["scale_range"] = list(self.scale_range)
        out["contrast_range"] = list(self.contrast_range)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AugmentConfig":
        """Inverse of `to_dict`; missing keys take their defaults, unknown keys are an error."""
        return from_dict_strict(cls, values, "augmentation")


def _pair(name: str, value: Any, positive: bool) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be two numbers (low, high), got {value!r}") from None
    if not (low <= high) or (positive and low <= 0) or low < 0:
        bound = "0 < low <= high" if positive else "0 <= low <= high"
        raise InputError(f"{name} must satisfy {bound}, got {value!r}")
    return low, high


def _window_start(shape: tuple[int, int], out_shape: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of the `out_shape` window centred in `shape`."""
    return (shape[0] - out_shape[0]) // 2, (shape[1] - out_shape[1]) // 2


def _out_shape(out_shape: Any, shape: tuple[int, int]) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in out_shape)
        valid = (height, width) == tuple(out_shape)
    except (TypeError, ValueError):
        valid = False
    if not valid or not (1 <= height <= shape[0] and 1 <= width <= shape[1]):
        raise InputError(
            f"out_shape must be two integers (h, w) with 1 <= h <= {shape[0]} and "
            f"1 <= w <= {shape[1]} (the input's height and width), got {out_shape!r}"
        )
    return height, width


class Augmenter:
    """Random augmentation of (image, labels, weights) samples, as configured.

    The geometric part (elastic deformation, rotation, 90-degree rotation, flips, shift) is one
    coordinate map, applied once per array: the image with cubic splines (clipped to its range),
    the labels with nearest neighbour, the weights with cubic splines (clipped, so non-negative).
    The map covers the output window: the whole array, or with ``out_shape`` a window of that
    shape centred in the input. The elastic grid spans that window (its corners are the window's
    corners) and rotations and flips turn about its centre; the source coordinates may reach
    into the surrounding input, with mirroring beyond the input's edges. The gray-value part
    changes the output image only, using its own statistics. Only the given `rng` is used, so a
    seeded generator reproduces the result; the object holds no state besides its config and
    pickles.

    Example:
        >>> import numpy as np
        >>> labels = np.zeros((48, 48), np.int64)
        >>> labels[10:30, 15:40] = 1
        >>> image = labels[None].astype(np.float32)
        >>> weights = np.ones((48, 48), np.float32)
        >>> augment = Augmenter(AugmentConfig(elastic_sigma=4.0))
        >>> a = augment(image, labels, weights, np.random.default_rng(3))
        >>> b = augment(image, labels, weights, np.random.default_rng(3))
        >>> all(np.array_equal(x, y) for x, y in zip(a, b))
        True
        >>> augment(image, labels, weights, np.random.default_rng(3), out_shape=(32, 40))[0].shape
        (1, 32, 40)
    """

    def __init__(self, config: Optional[AugmentConfig] = None) -> None:
        self.config = config if config is not None else AugmentConfig()

    def __repr__(self) -> str:
        return f"Augmenter({self.config!r})"

    def _geometric(
        self, shape: tuple[int, int], out_shape: tuple[int, int], rng: np.random.Generator
    ) -> Optional[np.ndarray]:
        """Source coordinates in the `shape` input (2, *out_shape) of every pixel of the centred
        `out_shape` window, or None for the identity."""
        c = self.config
        if not (c.elastic or c.rotate or c.rotate90 or c.flip or c.shift or c.scale):
            return None
        height, width = out_shape
        top = np.array(_window_start(shape, out_shape), np.float64)
        coords = np.indices(out_shape, dtype=np.float64)
        if c.elastic:
            coords += displacement_field(out_shape, rng, c.elastic_grid, c.elastic_sigma)
        matrix = np.eye(2)
        if c.flip:
            matrix = np.diag(np.where(rng.random(2) < 0.5, -1.0, 1.0)) @ matrix
        if c.rotate90:
            quarter = np.array([[0.0, 1.0], [-1.0, 0.0]])
            matrix = np.linalg.matrix_power(quarter, int(rng.integers(4))) @ matrix
        if c.rotate:
            angle = math.radians(rng.uniform(-c.rotate_degrees, c.rotate_degrees))
            cos, sin = math.cos(angle), math.sin(angle)
            matrix = np.array([[cos, sin], [-sin, cos]]) @ matrix
        if c.scale:
            low, high = np.log(c.scale_range[0]), np.log(c.scale_range[1])
            matrix = matrix / float(np.exp(rng.uniform(low, high)))  # zoom z samples the source at p / z
        offset = np.zeros(2)
        if c.shift:
            offset = rng.uniform(-c.shift_pixels, c.shift_pixels, 2)
        centre = np.array([(height - 1) / 2.0, (width - 1) / 2.0])
        # Source = M (p + u(p) - centre) + centre + top + shift, p in window coordinates.
        return (
            np.einsum("ab,bij->aij", matrix, coords - centre[:, None, None])
            + (centre + top)[:, None, None]
            + offset[:, None, None]
        )

    def _gray(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c = self.config
        image = image.astype(np.float32, copy=True)
        if c.gamma:
            low, high = np.log(c.gamma_range[0]), np.log(c.gamma_range[1])
            g = float(np.exp(rng.uniform(low, high)))
            lo = image.min(axis=(1, 2), keepdims=True)
            span = image.max(axis=(1, 2), keepdims=True) - lo
            safe = np.where(span > 0, span, 1.0)
            image = lo + span * ((image - lo) / safe) ** g
        if c.contrast:
            factor = rng.uniform(*c.contrast_range)
            mean = image.mean()
            image = mean + factor * (image - mean)
        std = float(image.std())
        if c.brightness:
            image = image + rng.uniform(-c.brightness_range, c.brightness_range) * std
        if c.noise:
            level = rng.uniform(0.0, c.noise_std) * std
            image = image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(level)
        return image.astype(np.float32, copy=False)

    def __call__(
        self,
        image: np.ndarray,
        labels: np.ndarray,
        weights: Optional[np.ndarray],
        rng: np.random.Generator,
        *,
        out_shape: Optional[tuple[int, int]] = None,
    ) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """Augment one sample.

        Args:
            image: (C, H, W) float32.
            labels: (H, W) int64 class targets.
            weights: (H, W) float32 weight map, or None.
            rng: the generator all random draws come from.
            out_shape: (h, w) <= (H, W): augment only the centred window of this shape (top-left
                corner ``((H - h) // 2, (W - w) // 2)``), using the rest as context; None for
                the whole array.

        Returns:
            (image float32 (C, h, w), labels int64 (h, w), weights float32 (h, w) or None), with
            (h, w) = out_shape, or (H, W) without it.
        """
        image = np.asarray(image, dtype=np.float32)
        labels = np.asarray(labels)
        if image.ndim != 3:
            raise InputError(f"image must be (C, H, W), got shape {image.shape}")
        if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(
                f"labels must be an (H, W) integer array, got {labels.dtype} {labels.shape}"
            )
        arrays = [image, labels]
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float32)
            arrays.append(weights)
        shape = _check_arrays(tuple(arrays))
        window = shape if out_shape is None else _out_shape(out_shape, shape)
        coords = self._geometric(shape, window, rng)
        if coords is not None:
            image, labels = _resample(image, coords), _resample(labels, coords)
            if weights is not None:
                weights = _resample(weights, coords)
        else:
            (y0, x0), (h, w) = _window_start(shape, window), window
            crop = (slice(y0, y0 + h), slice(x0, x0 + w))
            image, labels = image[(slice(None),) + crop].copy(), labels[crop].copy()
            weights = None if weights is None else weights[crop].copy()
        image = self._gray(image, rng)
        return image, labels.astype(np.int64, copy=False), weights


def displacement_field_3d(
    shape: tuple[int, int, int],
    rng: Seed = None,
    grid: int = PAPER.elastic_grid,
    sigma: float = PAPER.elastic_sigma,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Random smooth displacement field of a volume, (3, Z, Y, X) float64, in voxels of each axis.

    The paper's elastic deformation in 3D (as in the 3D U-Net, Cicek et al. 2016): vectors on a
    coarse `grid` x `grid` x `grid` grid whose outer points are the volume's corners, drawn from
    N(0, sigma^2) in units of the finest axis and interpolated by tricubic spline. The z component
    is divided by the anisotropy (z spacing / finest spacing), so a displacement is the same
    physical distance along every axis: 10 pixels in-plane is 2.5 slices of a (4, 1, 1) stack.

    Example:
        >>> import numpy as np
        >>> field = displacement_field_3d((9, 21, 21), rng=0, spacing=(4.0, 1.0, 1.0))
        >>> drawn = np.random.default_rng(0).normal(0, 10.0, (3, 3, 3, 3))
        >>> bool(np.allclose(field[0, ::4, ::10, ::10], drawn[0] / 4)), bool(np.allclose(field[1, ::4, ::10, ::10], drawn[1]))
        (True, True)
    """
    if int(grid) != grid or grid < 2:
        raise InputError(f"elastic grid must be an integer >= 2, got {grid}")
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise InputError(f"elastic sigma must be a non-negative number of pixels, got {sigma}")
    steps = np.asarray(spacing, dtype=np.float64)
    if steps.shape != (3,) or not np.all(np.isfinite(steps) & (steps > 0)):
        raise InputError(f"spacing must be three positive numbers (z, y, x), got {spacing!r}")
    grid = int(grid)
    vectors = _generator(rng).normal(0.0, sigma, (3, grid, grid, grid)) / (steps / steps.min())[:, None, None, None]
    dz, dy, dx = (_grid_weights(int(n), grid) for n in shape)
    return np.einsum("ia,jb,kc,nabc->nijk", dz, dy, dx, vectors)


def augment_volume(
    image: np.ndarray,
    *others: np.ndarray,
    rng: Seed = None,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    elastic: bool = True,
    grid: int = PAPER.elastic_grid,
    sigma: float = PAPER.elastic_sigma,
    flip: bool = True,
    rotate90: bool = True,
) -> tuple[np.ndarray, ...]:
    """One random geometric augmentation of a volume and its companions, resampled once.

    Composes the 3D elastic deformation (`displacement_field_3d`), independent flips of z, y and
    x (each with probability 1/2) and a rotation by a random multiple of 90 degrees in the xy
    plane only (rotations that tilt z would mix the coarse axis into the fine ones). The same
    coordinate map is applied to every array: floats (image, weight map) by cubic splines, clipped
    to their range; integers and bools (labels, an unlabelled mask) by nearest neighbour, so a
    sparse-annotation label -1 or mask stays exactly where its voxels go. Outside the volume the
    content is mirrored; xy rotations turn about the volume's centre.

    Args:
        image, others: (Z, Y, X) or channels-first (C, Z, Y, X) arrays sharing (Z, Y, X).
        rng: a `np.random.Generator`, a seed, or None.
        spacing: voxel size (z, y, x) (only ratios matter), for the z scaling of the displacements.
        elastic, grid, sigma: the elastic deformation (the paper's 3 points, 10 pixels by default).
        flip, rotate90: the flips and the xy rotations.

    Returns:
        (image, *others), shapes and dtypes kept.

    Example:
        >>> import numpy as np
        >>> image = np.random.default_rng(0).random((1, 6, 16, 16)).astype(np.float32)
        >>> labels = (image[0] > 0.5).astype(np.int64); labels[:2] = -1  # first slices unlabelled
        >>> out_image, out_labels = augment_volume(image, labels, rng=1, spacing=(3.0, 1.0, 1.0))
        >>> out_image.shape, set(np.unique(out_labels)) <= {-1, 0, 1}
        ((1, 6, 16, 16), True)
    """
    arrays = (np.asarray(image),) + tuple(np.asarray(a) for a in others)
    shape = arrays[0].shape[-3:]
    for i, arr in enumerate(arrays):
        if arr.ndim not in (3, 4) or arr.shape[-3:] != shape:
            raise InputError(
                f"array {i} has shape {arr.shape}; give (Z, Y, X) or (C, Z, Y, X) arrays sharing (Z, Y, X) = {shape}"
            )
    generator = _generator(rng)
    coords = np.indices(shape, dtype=np.float64)
    if elastic:
        coords += displacement_field_3d(shape, generator, grid, sigma, spacing)  # type: ignore[arg-type]
    matrix = np.eye(3)
    if flip:
        matrix = np.diag(np.where(generator.random(3) < 0.5, -1.0, 1.0)) @ matrix
    if rotate90:
        quarter = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
        matrix = np.linalg.matrix_power(quarter, int(generator.integers(4))) @ matrix
    centre = (np.array(shape, dtype=np.float64) - 1.0) / 2.0
    coords = np.einsum("ab,bijk->aijk", matrix, coords - centre[:, None, None, None]) + centre[:, None, None, None]
    return tuple(_resample(arr, coords) for arr in arrays)
