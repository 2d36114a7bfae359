"""Intensity normalisation and channel layout of input images.

Every image enters the network as (C, H, W) float32. `Normalization` does both steps: it puts the
channels first (grayscale -> C=1, RGB/RGBA -> C=3 with alpha dropped) and maps intensities to a
common range. Its `to_dict()` is stored in checkpoints so that prediction normalises exactly as
training did.

Why percentiles by default: microscopy images are often 16-bit with all values in a narrow band
(e.g. 900..1400 of 0..65535); dividing by the dtype maximum would squash them to nearly constant
inputs. Mapping the 1st and 99.8th percentiles of each image to 0 and 1 gives comparable inputs for
uint8, uint16 and float images alike. Values outside the percentiles are kept (slightly below 0 or
above 1) unless `clip=True`, so bright details are not flattened.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np

from ..config import from_dict_strict
from ..errors import InputError

NormalizationMode = Literal["percentile", "fixed", "none"]


def to_chw(image: np.ndarray, *, name: str = "image") -> np.ndarray:
    """Put the channels of a 2D image first: (H, W) -> (1, H, W); (H, W, 3 or 4) -> (3, H, W).

    A 3D array whose last axis has at most 4 entries is read as (H, W, C): 1 or 2 channels
    (gray, gray + alpha) give C=1, 3 or 4 (RGB, RGBA) give C=3. Otherwise an array whose first axis
    has at most 4 entries is taken to be channels-first already and is returned unchanged.
    The dtype is kept.

    Example:
        >>> to_chw(np.zeros((5, 6, 4), np.uint8)).shape
        (3, 5, 6)
    """
    image = np.asarray(image)
    if image.ndim == 2:
        return image[None]
    if image.ndim == 3:
        channels = image.shape[-1]
        if channels <= 4:
            kept = 1 if channels <= 2 else 3  # drop the alpha channel
            return np.moveaxis(image[..., :kept], -1, 0)
        if image.shape[0] <= 4:
            return image
    raise InputError(
        f"{name}: expected a grayscale (H, W) or colour (H, W, 3/4) image, got shape {image.shape}; "
        "save one 2D image per file"
    )


@dataclass(frozen=True)
class Normalization:
    """How image intensities are mapped to network inputs; calling it returns (C, H, W) float32.

    Modes:
        "percentile" (default): per image, the `low` and `high` percentiles (1.0 and 99.8) of all
            pixels (of each channel if `per_channel`) are mapped to 0 and 1. Values beyond them are
            kept unless `clip`. If the two percentiles coincide (a nearly constant image) the
            minimum and maximum are used instead; a constant image becomes all zeros.
        "fixed": `image * scale + offset` (e.g. scale=1/255 for uint8 data), the same for every image.
            It suits only images like those it was made for: `check` refuses others (see `expected`).
        "none": the values unchanged, only cast to float32.

    Args:
        mode: "percentile", "fixed" or "none".
        low, high: percentiles (0..100) mapped to 0 and 1 in "percentile" mode.
        clip: clip the result to [0, 1] (default False: keep the full range).
        scale, offset: the linear map of "fixed" mode.
        per_channel: in "percentile" mode, normalise each channel on its own (default: jointly,
            which keeps the colour balance of RGB images).
        dtype, value_range: in "fixed" mode, the integer type (e.g. "uint8") and the (lowest,
            highest) value of the images it was made for (`made_for` records them); unrecorded
            (older checkpoints), the range is the one the map sends to [0, 1] and any type fits.

    Example:
        >>> norm = Normalization()
        >>> img = np.linspace(1000, 1200, 10000).reshape(100, 100).astype(np.uint16)
        >>> out = norm(img)
        >>> out.shape, out.dtype, bool(-0.05 < out.min() < 0.05 and 0.95 < out.max() < 1.05)
        ((1, 100, 100), dtype('float32'), True)
        >>> Normalization.from_dict(norm.to_dict()) == norm
        True
    """

    mode: NormalizationMode = "percentile"
    low: float = 1.0
    high: float = 99.8
    clip: bool = False
    scale: float = 1.0
    offset: float = 0.0
    per_channel: bool = False
    dtype: str | None = None
    value_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("percentile", "fixed", "none"):
            raise InputError(f"normalization mode must be 'percentile', 'fixed' or 'none' (got {self.mode!r})")
        if not 0.0 <= self.low < self.high <= 100.0:
            raise InputError(
                f"normalization percentiles must satisfy 0 <= low < high <= 100 (got low={self.low}, high={self.high})"
            )
        if not (np.isfinite(self.scale) and np.isfinite(self.offset)):
            raise InputError(f"normalization scale and offset must be finite (got {self.scale}, {self.offset})")
        if self.value_range is not None:  # JSON gives a list
            lo, hi = (float(v) for v in self.value_range)
            if not lo <= hi:
                raise InputError(f"normalization value_range must be (lowest, highest) (got {self.value_range})")
            object.__setattr__(self, "value_range", (lo, hi))
        if self.dtype is not None:
            object.__setattr__(self, "dtype", np.dtype(self.dtype).name)

    def expected(self) -> tuple[str | None, tuple[float, float] | None]:
        """(dtype, (lowest, highest) value) of the images a "fixed" normalisation suits (None: any).

        Unrecorded (older checkpoints), `--normalize fixed`'s x/255 is taken to be made for 0..255.

        Example:
            >>> Normalization(mode="fixed", scale=1 / 255).expected()
            (None, (0.0, 255.0))
        """
        if self.mode != "fixed":
            return None, None
        if self.value_range is None and self.offset == 0 and np.isclose(self.scale, 1 / 255, rtol=1e-9, atol=0):
            return self.dtype, (0.0, 255.0)
        return self.dtype, self.value_range

    def made_for(self, images) -> "Normalization":
        """This normalisation with the type and value range of `images` (the training images) recorded.

        Only "fixed" mode records them: the range is the one the map sends to [0, 1], widened to
        the values the images hold; the type is recorded when all images share one integer type.

        Example:
            >>> fixed = Normalization(mode="fixed", scale=1 / 255).made_for([np.array([[3, 300]], np.uint16)])
            >>> fixed.dtype, fixed.value_range
            ('uint16', (0.0, 300.0))
        """
        if self.mode != "fixed":
            return self
        lo, hi = sorted((-self.offset / self.scale, (1.0 - self.offset) / self.scale)) if self.scale else (np.inf, -np.inf)
        types = set()
        for image in images:
            data = np.asarray(image)
            types.add(data.dtype.name)
            if data.size and data.dtype.kind in "uif":
                finite = data[np.isfinite(data)] if data.dtype.kind == "f" else data
                if finite.size:
                    lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
        dtype = types.pop() if len(types) == 1 else None
        value_range = (float(np.round(lo, 6)) + 0.0, float(np.round(hi, 6)) + 0.0) if lo <= hi else None  # no -0.0
        return replace(self, dtype=dtype if dtype and np.dtype(dtype).kind in "ui" else None, value_range=value_range)

    def check(self, image: np.ndarray, *, source: str = "image") -> None:
        """Raise InputError naming `source` when `image` cannot be normalised honestly: complex pixels,
        or, in "fixed" mode, an integer type or values unlike those the normalisation was made for.

        Example:
            >>> Normalization(mode="fixed", scale=1 / 255).check(np.array([[0, 257]], np.uint16), source="a.tif")
            Traceback (most recent call last):
            ...
            unetkit.errors.InputError: a.tif: values 0..257, but the model's fixed normalisation (x * 0.00392157 + 0) was made for images with values 0..255; give images like the training images (e.g. convert 16-bit images to 8 bit the same way), or train a model with --normalize percentile
        """
        data = np.asarray(image)
        if data.dtype.kind == "c":
            raise InputError(f"{source}: complex-valued pixels ({data.dtype}); give real intensities (e.g. the magnitude)")
        dtype, value_range = self.expected()
        if self.mode != "fixed" or data.size == 0 or data.dtype.kind not in "uif":
            return
        made = f"the model's fixed normalisation (x * {self.scale:.6g} + {self.offset:.6g}) was made for"
        fix = ("give images like the training images (e.g. convert 16-bit images to 8 bit the same way), "
               "or train a model with --normalize percentile")
        if dtype is not None and data.dtype.kind in "ui" and data.dtype != np.dtype(dtype):
            raise InputError(f"{source}: {data.dtype} image, but {made} {dtype} images; {fix}")
        if value_range is None:
            return
        finite = data[np.isfinite(data)] if data.dtype.kind == "f" else data
        if finite.size == 0:
            return
        lo, hi = float(finite.min()), float(finite.max())
        slack = 1e-6 * max(1.0, value_range[1] - value_range[0])
        if lo < value_range[0] - slack or hi > value_range[1] + slack:
            raise InputError(
                f"{source}: values {lo:g}..{hi:g}, but {made} images with values {value_range[0]:g}..{value_range[1]:g}; {fix}"
            )

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Normalise one image: (H, W), (H, W, C) or (C, H, W) -> (C, H, W) float32 (after `check`)."""
        self.check(image)
        chw = to_chw(image)
        data = chw.astype(np.float32)
        if self.mode == "fixed":
            data = data * np.float32(self.scale) + np.float32(self.offset)
        elif self.mode == "percentile":
            if self.per_channel:
                data = np.stack([self._stretch(channel) for channel in data])
            else:
                data = self._stretch(data)
        if self.clip:
            np.clip(data, 0.0, 1.0, out=data)
        return np.ascontiguousarray(data, dtype=np.float32)

    def _stretch(self, data: np.ndarray) -> np.ndarray:
        lo, hi = self._limits(data)
        return (data - np.float32(lo)) * np.float32(1.0 / (hi - lo))

    def _limits(self, data: np.ndarray) -> tuple[float, float]:
        finite = data if np.isfinite(data).all() else data[np.isfinite(data)]
        if finite.size == 0:
            return 0.0, 1.0
        lo, hi = (float(v) for v in np.percentile(finite, [self.low, self.high]))
        if not hi > lo:
            lo, hi = float(finite.min()), float(finite.max())
        if not hi > lo:
            hi = lo + 1.0  # constant image: everything maps to 0
        return lo, hi

    def fitted(self, image: np.ndarray) -> "Normalization":
        """The "fixed" normalisation that this one applies to `image` (useful for huge or chunked images).

        Computing the percentiles once (e.g. on a downsampled copy) and applying the fixed map chunk
        by chunk gives the same values as normalising the whole image at once.

        Example:
            >>> img = np.arange(100, dtype=np.float32).reshape(10, 10)
            >>> fixed = Normalization().fitted(img)
            >>> fixed.mode, bool(np.allclose(fixed(img), Normalization()(img)))
            ('fixed', True)
        """
        if self.mode != "percentile":
            return self
        if self.per_channel:
            raise InputError("fitted() needs per_channel=False: a fixed normalisation has one scale for all channels")
        data = to_chw(image).astype(np.float32)
        lo, hi = self._limits(data)
        scale = 1.0 / (hi - lo)
        finite = data[np.isfinite(data)]
        seen = (float(finite.min()), float(finite.max())) if finite.size else (lo, hi)
        return replace(self, mode="fixed", scale=scale, offset=-lo * scale, value_range=(min(lo, seen[0]), max(hi, seen[1])))

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python description, for checkpoints and JSON."""
        data = asdict(self)
        if self.value_range is not None:
            data["value_range"] = list(self.value_range)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Normalization":
        """Inverse of `to_dict`; None gives the default."""
        if data is None:
            return cls()
        return from_dict_strict(cls, data, "normalization")
