"""Synthetic microscopy images of cells with instance labels, for demos and tests.

Each image shows irregular cells of varied size on an uneven background. Clusters of cells share
boundaries (touching: no background between them) and other neighbours are only 1-3 pixels apart,
so, as in the paper's HeLa and PhC-U373 data, the hard part of the task is the thin separation
between cells. Cells have a textured cytoplasm, a nucleus, a dark membrane line along every edge
(faint where two cells touch) and a bright halo outside; the whole image is blurred by a
point-spread function and corrupted with Poisson and Gaussian noise. Everything is drawn from one
seed, so the same seed always gives the same arrays.

Example:
    >>> import numpy as np
    >>> from unetkit.synthetic import synthetic_cells
    >>> image, labels = synthetic_cells((128, 128), seed=1)
    >>> image.shape, image.dtype, labels.dtype
    ((128, 128), dtype('float32'), dtype('uint16'))
    >>> bool(labels.max() == len(np.unique(labels)) - 1)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError
from .labels import label_components
from .labels3d import label_components_3d

__all__ = ["synthetic_cells", "synthetic_cells_3d", "synthetic_dataset"]

_HARMONICS = np.arange(2, 6)  # low-frequency outline wobble: 2..5 lobes


@dataclass
class _Cell:
    y: float
    x: float
    radius: float
    aspect: float
    angle: float
    wobble: np.ndarray  # amplitude per harmonic
    phase: np.ndarray  # phase per harmonic

    @property
    def reach(self) -> float:
        """Largest distance from the centre to the outline."""
        return self.radius * np.sqrt(self.aspect) * (1.0 + np.abs(self.wobble).sum()) + 1.0

    def window(self, shape: tuple[int, int]) -> tuple[slice, slice]:
        r = self.reach
        y0, y1 = max(int(self.y - r), 0), min(int(np.ceil(self.y + r)) + 1, shape[0])
        x0, x1 = max(int(self.x - r), 0), min(int(np.ceil(self.x + r)) + 1, shape[1])
        return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))

    def distance(self, window: tuple[slice, slice]) -> np.ndarray:
        """Normalised distance over `window`: < 1 inside the outline, 1 on it."""
        yy, xx = np.ogrid[window[0], window[1]]
        dy, dx = yy - self.y, xx - self.x
        theta = np.arctan2(dy, dx)
        t = theta - self.angle
        ellipse = 1.0 / np.sqrt(np.cos(t) ** 2 / self.aspect + self.aspect * np.sin(t) ** 2)
        wobble = 1.0 + np.tensordot(
            self.wobble, np.cos(_HARMONICS[:, None, None] * theta + self.phase[:, None, None]), 1
        )
        return np.hypot(dy, dx) / (self.radius * ellipse * wobble)


def _random_cell(rng: np.random.Generator, y: float, x: float, radius: float) -> _Cell:
    irregular = rng.uniform(0.2, 1.0)
    return _Cell(
        y=y,
        x=x,
        radius=radius,
        aspect=rng.uniform(1.0, 1.7),
        angle=rng.uniform(0, np.pi),
        wobble=irregular * rng.uniform(0.0, 0.12, len(_HARMONICS)) / np.sqrt(_HARMONICS - 1),
        phase=rng.uniform(0, 2 * np.pi, len(_HARMONICS)),
    )


def _place_cells(
    rng: np.random.Generator,
    shape: tuple[int, int],
    n_cells: int,
    cell_radius: tuple[float, float],
    clustering: float,
) -> list[_Cell]:
    """Scatter cells; most are put next to an existing one with overlapping outlines."""
    h, w = shape
    ys, xs, rs = np.empty(n_cells), np.empty(n_cells), np.empty(n_cells)
    cells: list[_Cell] = []
    for _ in range(20 * n_cells):
        if len(cells) == n_cells:
            break
        n = len(cells)
        r = rng.uniform(*cell_radius)
        if n and rng.random() < clustering:
            j = rng.integers(n)
            phi = rng.uniform(0, 2 * np.pi)
            dist = (rs[j] + r) * rng.uniform(0.75, 0.95)
            y, x = ys[j] + dist * np.sin(phi), xs[j] + dist * np.cos(phi)
            if not (-r < y < h + r and -r < x < w + r):
                continue
        else:
            y, x = rng.uniform(-0.5 * r, h + 0.5 * r), rng.uniform(-0.5 * r, w + 0.5 * r)
        # Centres too close would let one cell swallow the other.
        if n and np.any(np.hypot(ys[:n] - y, xs[:n] - x) < 0.72 * (rs[:n] + r)):
            continue
        ys[n], xs[n], rs[n] = y, x, r
        cells.append(_random_cell(rng, y, x, r))
    return cells


def _partition(shape: tuple[int, int], cells: list[_Cell]) -> np.ndarray:
    """Label each pixel with the cell it lies deepest inside (relative to that cell's size)."""
    best = np.full(shape, np.inf)
    labels = np.zeros(shape, np.int32)
    for i, cell in enumerate(cells, start=1):
        win = cell.window(shape)
        d = cell.distance(win)
        take = (d < 1.0) & (d < best[win])
        best[win][take] = d[take]
        labels[win][take] = i
    return labels


def _contact_pairs(labels: np.ndarray) -> np.ndarray:
    """Pairs (a, b), a < b, of labels that are 4-neighbours somewhere."""
    pairs = []
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        hit = (a != b) & (a > 0) & (b > 0)
        pairs.append(np.stack([np.minimum(a[hit], b[hit]), np.maximum(a[hit], b[hit])], 1))
    return np.unique(np.concatenate(pairs), axis=0)


def _carve_gaps(
    rng: np.random.Generator, labels: np.ndarray, touching: float, gap: tuple[int, int]
) -> None:
    """Separate a fraction (1 - touching) of touching pairs by a thin band of background."""
    objects = ndi.find_objects(labels)
    for a, b in _contact_pairs(labels):
        if rng.random() < touching:
            continue
        sa, sb = objects[a - 1], objects[b - 1]
        win = tuple(
            slice(max(min(p.start, q.start) - 3, 0), max(p.stop, q.stop) + 3)
            for p, q in zip(sa, sb)
        )
        crop = labels[win]
        in_a, in_b = crop == a, crop == b
        width = int(rng.integers(gap[0], gap[1] + 1))
        wa = int(rng.integers(0, width + 1))
        # +0.5 also removes diagonal neighbours, so the gap holds in 8-connectivity.
        if wa:
            crop[in_a & (ndi.distance_transform_edt(~in_b) < wa + 0.5)] = 0
        if width - wa:
            crop[in_b & (ndi.distance_transform_edt(~in_a) < width - wa + 0.5)] = 0


def _tidy(
    labels: np.ndarray, min_area: int, min_thickness: float
) -> tuple[np.ndarray, np.ndarray]:
    """Keep each cell's largest piece, drop tiny or sliver cells, renumber 1..N.

    Returns the new labels and, for each new id 1..N, the old id it had.
    """
    for i, win in enumerate(ndi.find_objects(labels), start=1):
        if win is None:
            continue
        crop = labels[win]
        pieces = label_components(crop == i)
        n = int(pieces.max())
        sizes = np.bincount(pieces.ravel())[1:]
        keep = pieces == 1 + sizes.argmax()
        thickness = ndi.distance_transform_edt(np.pad(keep, 1)).max()
        if sizes.max() < min_area or thickness < min_thickness:
            crop[crop == i] = 0
        elif n > 1:
            crop[(pieces > 0) & ~keep] = 0
    ids = np.unique(labels)
    lut = np.zeros(int(labels.max()) + 1, np.uint16)
    kept = ids[ids > 0]
    lut[kept] = np.arange(1, len(kept) + 1, dtype=np.uint16)
    return lut[labels], kept


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Unit-variance random field varying over about `scale` pixels (cheap at any scale)."""
    grid = [max(int(np.ceil(n / scale)), 1) + 3 for n in shape]
    coarse = rng.standard_normal(grid)
    # Cubic-spline upsampling is linear and separable: one small matrix per axis.
    rows, cols = (
        np.stack(
            [ndi.map_coordinates(e, [np.linspace(1, g - 2, n)], order=3) for e in np.eye(g)], 1
        )
        for g, n in zip(grid, shape)
    )
    field = rows @ coarse @ cols.T
    return (field - field.mean()) / (field.std() + 1e-8)


def _noise_texture(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    t = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    return t / (t.std() + 1e-8)


def _edges(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cell pixels with a 4-neighbour of another label: (any edge, contact with another cell)."""
    edge = np.zeros(labels.shape, bool)
    contact = np.zeros(labels.shape, bool)
    for axis in (0, 1):
        for step in (1, -1):
            other = np.roll(labels, step, axis)
            # np.roll wraps around; the wrapped row/column is no neighbour.
            idx = [slice(None)] * 2
            idx[axis] = 0 if step == 1 else -1
            other[tuple(idx)] = labels[tuple(idx)]
            differs = (other != labels) & (labels > 0)
            edge |= differs
            contact |= differs & (other > 0)
    return edge, contact


def _render(
    rng: np.random.Generator,
    labels: np.ndarray,
    cells: list[_Cell],
    noise: float,
    blur: float,
    contact_contrast: float,
    debris: int,
) -> np.ndarray:
    shape = labels.shape
    n = int(labels.max())
    inside = labels > 0

    # Uneven background: smooth additive field.
    image = 0.22 + 0.05 * _smooth_field(rng, shape, 90.0) + 0.015 * _smooth_field(rng, shape, 25.0)

    # Per-cell properties; index 0 is the background.
    bright = np.r_[0.0, rng.uniform(0.18, 0.42, n)]
    fine = np.r_[0.0, rng.uniform(0.06, 0.16, n)]
    coarse = np.r_[0.0, rng.uniform(0.05, 0.18, n)]
    membrane = np.r_[0.0, rng.uniform(0.35, 0.6, n)]

    # Cytoplasm thins towards the free edge (distance to background, not to neighbours, so
    # touching cells form one plateau and only the faint contact line separates them).
    depth = ndi.distance_transform_edt(inside)
    signal = bright[labels] * (1.0 - 0.45 * np.exp(-depth / 3.0))
    texture = fine[labels] * _noise_texture(rng, shape, 0.8) + coarse[labels] * _noise_texture(
        rng, shape, 2.5
    )
    signal *= 1.0 + texture

    # Nuclei (and nucleoli), each kept inside its own cell.
    for new_id, cell in enumerate(cells, start=1):
        win = cell.window(shape)
        own = labels[win] == new_id
        if not own.any():
            continue
        nr = cell.radius * rng.uniform(0.32, 0.5)
        off = rng.uniform(0, 0.25 * cell.radius)
        phi = rng.uniform(0, 2 * np.pi)
        nucleus = _random_cell(rng, cell.y + off * np.sin(phi), cell.x + off * np.cos(phi), nr)
        nucleus.wobble *= 0.5
        soft = np.clip((1.0 - nucleus.distance(win)) * nr / 1.5, 0.0, 1.0) * own
        contrast = rng.choice([-1.0, 1.0], p=[0.7, 0.3]) * rng.uniform(0.2, 0.45)
        signal[win] *= 1.0 + contrast * soft
        for _ in range(rng.integers(0, 4)):
            a, rr = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.5 * nr)
            spot = _random_cell(
                rng, nucleus.y + rr * np.sin(a), nucleus.x + rr * np.cos(a), rng.uniform(0.8, 1.8)
            )
            sw = spot.window(shape)
            dip = np.clip(1.0 - spot.distance(sw), 0, 1) * (labels[sw] == new_id)
            signal[sw] *= 1.0 - 0.3 * dip

    # Dark membrane line on every edge; weaker where two cells touch.
    edge, contact = _edges(labels)
    line = np.where(contact, contact_contrast, 1.0) * membrane[labels]
    signal[edge] *= 1.0 - line[edge]
    image += signal

    # Bright halo outside the cells (phase-contrast like); it fills the thin gaps.
    outside = ndi.distance_transform_edt(~inside)
    image += np.where(inside, 0.0, 0.12 * np.exp(-(outside - 1.0) / 1.5))

    # Unlabelled debris: small faint specks anywhere.
    for _ in range(debris):
        y, x = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        speck = _random_cell(rng, y, x, rng.uniform(1.0, 3.5))
        win = speck.window(shape)
        image[win] += rng.uniform(-0.08, 0.15) * np.clip(1.0 - speck.distance(win), 0, 1)

    image *= 1.0 + 0.08 * _smooth_field(rng, shape, 150.0)  # illumination fall-off
    if blur > 0:
        image = ndi.gaussian_filter(image, blur)
    if noise > 0:
        # Shot noise with std ~ noise at intensity 0.5, plus camera read noise.
        photons = 0.5 / noise**2
        image = rng.poisson(np.clip(image, 0, None) * photons) / photons
        image += rng.normal(0.0, 0.5 * noise, shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _check_cells(cell_radius: tuple[float, float], touching: float) -> tuple[float, float]:
    """(min, max) cell radius after checking it and the touching probability (InputError otherwise)."""
    lo, hi = cell_radius
    if not 1 <= lo <= hi:
        raise InputError(f"cell_radius must be (min, max) with 1 <= min <= max, got {cell_radius}")
    if not 0.0 <= touching <= 1.0:
        raise InputError(f"touching must be a probability in [0, 1], got {touching}")
    return lo, hi


def synthetic_cells(
    shape: tuple[int, int] = (256, 256),
    n_cells: int | None = None,
    seed: int | Sequence[int] = 0,
    *,
    cell_radius: tuple[float, float] = (8, 20),
    touching: float = 0.5,
    noise: float = 0.08,
    blur: float = 1.0,
    clustering: float = 0.75,
    coverage: float = 0.6,
    gap: tuple[int, int] = (1, 3),
    contact_contrast: float = 0.6,
    debris: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one microscopy-like image of cells and its instance labels.

    Args:
        shape: (height, width) in pixels.
        n_cells: cells to place; None picks enough to cover about `coverage` of the image.
            Fewer may fit, and cells squeezed to a sliver are dropped.
        seed: an int or a sequence of ints; the same seed gives identical arrays.
        cell_radius: (min, max) mean cell radius in pixels; shapes are elongated and wobbly.
        touching: probability that two cells in contact keep sharing their boundary; the other
            contacts are opened by a background gap of `gap` pixels.
        noise: noise standard deviation at intensity 0.5 (Poisson plus Gaussian).
        blur: standard deviation of the Gaussian point-spread function in pixels.
        clustering: probability that a new cell is placed against an existing one.
        coverage: fraction of the image to cover when `n_cells` is None.
        gap: (min, max) width of the opened gaps in pixels.
        contact_contrast: membrane darkness on contact lines relative to free edges.
        debris: number of small unlabelled specks; None gives about one per 8000 pixels.

    Returns:
        image: float32 (H, W) in [0, 1]; labels: uint16 (H, W), 0 = background and 1..N cells.

    Example:
        >>> image, labels = synthetic_cells((64, 96), seed=3, cell_radius=(6, 10))
        >>> image.shape == labels.shape == (64, 96), float(image.min()) >= 0.0
        (True, True)
    """
    if len(shape) != 2 or min(shape) < 8:
        raise InputError(f"shape must be (height, width) of at least 8x8 pixels, got {shape}")
    lo, hi = _check_cells(cell_radius, touching)
    if not 1 <= gap[0] <= gap[1]:
        raise InputError(f"gap must be (min, max) pixels with 1 <= min <= max, got {gap}")
    shape = (int(shape[0]), int(shape[1]))
    rng = np.random.default_rng(seed)
    if n_cells is None:
        mean_area = np.pi * (lo**2 + lo * hi + hi**2) / 3.0
        n_cells = max(1, round(coverage * shape[0] * shape[1] / mean_area))
    if debris is None:
        debris = round(shape[0] * shape[1] / 8000)

    cells = _place_cells(rng, shape, int(n_cells), (lo, hi), clustering)
    labels = _partition(shape, cells)
    _carve_gaps(rng, labels, touching, gap)
    labels, kept = _tidy(labels, max(6, int(0.25 * np.pi * lo**2)), max(1.5, 0.35 * lo))
    kept_cells = [cells[i - 1] for i in kept]
    image = _render(rng, labels, kept_cells, noise, blur, contact_contrast, debris)
    return image, labels


def synthetic_dataset(
    n_images: int, shape: tuple[int, int] = (256, 256), seed: int = 0, **kwargs: Any
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Draw `n_images` independent (image, labels) pairs; image i uses seed (seed, i).

    Keyword arguments are passed to `synthetic_cells`, so
    ``synthetic_dataset(n, shape, s)[i]`` equals ``synthetic_cells(shape, seed=(s, i))``.

    Example:
        >>> pairs = synthetic_dataset(2, (64, 64), seed=5)
        >>> len(pairs), pairs[0][0].shape
        (2, (64, 64))
    """
    if n_images < 0:
        raise InputError(f"n_images must be >= 0, got {n_images}")
    return [synthetic_cells(shape, seed=(seed, i), **kwargs) for i in range(n_images)]


def _face_contacts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of face-neighbouring voxels with different non-zero labels: (label a, label b, voxel of a)
    for each direction, both ways round."""
    a_all, b_all, where_all = [], [], []
    for axis in range(labels.ndim):
        for lo, hi in ((slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))):
            index_a = [slice(None)] * labels.ndim
            index_b = [slice(None)] * labels.ndim
            index_a[axis], index_b[axis] = lo, hi
            a, b = labels[tuple(index_a)], labels[tuple(index_b)]
            hit = (a != b) & (a > 0) & (b > 0)
            coords = np.nonzero(hit)
            shift = np.zeros(labels.ndim, np.intp)
            shift[axis] = 0 if lo.start is None else 1
            a_all.append(a[hit])
            b_all.append(b[hit])
            where_all.append(np.stack(coords, 1) + shift)
    return np.concatenate(a_all), np.concatenate(b_all), np.concatenate(where_all)


def synthetic_cells_3d(
    shape: tuple[int, int, int] = (12, 48, 48),
    n_cells: int | None = None,
    seed: int | Sequence[int] = 0,
    *,
    spacing: tuple[float, float, float] = (2.0, 1.0, 1.0),
    cell_radius: tuple[float, float] = (6, 10),
    touching: float = 0.5,
    noise: float = 0.05,
    blur: float = 1.0,
    clustering: float = 0.75,
    coverage: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one volume of touching cells and its instance labels: the 3D sibling of `synthetic_cells`.

    Cells are ellipsoids of random size and orientation in physical space (so a stack with
    `spacing` (2, 1, 1) shows each cell on fewer slices than pixels across), most placed against
    an existing cell so that they share a face. Each pair of touching cells keeps its contact with
    probability `touching`, else a one-voxel background gap is opened between them. Cells have a
    bright interior and a dark membrane on every face (fainter where two cells touch); the volume
    is blurred (in physical units) and noisy. Small volumes are fast: this is for tests and demos.

    Args:
        shape: (Z, Y, X) voxels, each at least 4.
        n_cells: cells to place; None covers about `coverage` of the volume.
        seed: an int or a sequence of ints; the same seed gives identical arrays.
        spacing: voxel size (z, y, x) in units of the in-plane pixel.
        cell_radius: (min, max) cell radius in in-plane pixels.
        touching: probability that two cells in contact keep sharing their face.
        noise: Gaussian noise standard deviation.
        blur: point-spread function standard deviation in in-plane pixels.
        clustering: probability that a new cell is placed against an existing one.
        coverage: fraction of the volume to cover when `n_cells` is None.

    Returns:
        image: float32 (Z, Y, X) in [0, 1]; labels: uint16 (Z, Y, X), 0 = background, 1..N cells
        (each one 6-connected piece).

    Example:
        >>> image, labels = synthetic_cells_3d((8, 32, 32), seed=1)
        >>> image.shape == labels.shape == (8, 32, 32), image.dtype.name, int(labels.max()) > 1
        (True, 'float32', True)
    """
    if len(shape) != 3 or min(shape) < 4:
        raise InputError(f"shape must be (Z, Y, X) with at least 4 voxels per axis, got {shape}")
    lo, hi = _check_cells(cell_radius, touching)
    steps = np.asarray(spacing, dtype=np.float64)
    if steps.shape != (3,) or not np.all(steps > 0):
        raise InputError(f"spacing must be three positive numbers (z, y, x), got {spacing!r}")
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    rng = np.random.default_rng(seed)
    extent = np.array(shape, dtype=np.float64) * steps
    if n_cells is None:
        mean_volume = 4.0 / 3.0 * np.pi * ((lo + hi) / 2.0) ** 3
        n_cells = max(2, round(coverage * float(np.prod(extent)) / mean_volume))

    centres: list[np.ndarray] = []
    radii: list[float] = []
    for _ in range(30 * int(n_cells)):
        if len(centres) == n_cells:
            break
        r = rng.uniform(lo, hi)
        if centres and rng.random() < clustering:
            j = int(rng.integers(len(centres)))
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction) + 1e-12
            centre = centres[j] + direction * (radii[j] + r) * rng.uniform(0.75, 0.95)
        else:
            centre = rng.uniform(0, 1, 3) * extent
        if centres and np.any(np.linalg.norm(np.array(centres) - centre, axis=1) < 0.72 * (np.array(radii) + r)):
            continue
        centres.append(centre)
        radii.append(r)

    grid = [(np.arange(n) + 0.5) * step for n, step in zip(shape, steps)]
    zz, yy, xx = np.meshgrid(*grid, indexing="ij")
    best = np.full(shape, np.inf)
    labels = np.zeros(shape, np.int32)
    for i, (centre, r) in enumerate(zip(centres, radii), start=1):
        axes = r * rng.uniform(0.8, 1.25, 3)
        rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        offset = np.stack([zz - centre[0], yy - centre[1], xx - centre[2]], -1) @ rotation
        d = np.sqrt(((offset / axes) ** 2).sum(-1))
        take = (d < 1.0) & (d < best)
        best[take] = d[take]
        labels[take] = i

    a, b, where = _face_contacts(labels)
    pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], 1), axis=0) if a.size else np.zeros((0, 2), int)
    for first, second in pairs:
        if rng.random() < touching:
            continue
        # Open a one-voxel gap: the voxels of the first cell that face the second become background.
        own = where[(a == first) & (b == second)]
        labels[tuple(own.T)] = 0

    min_voxels = max(8, int(0.2 * 4.0 / 3.0 * np.pi * lo**3 / float(np.prod(steps))))
    for i, win in enumerate(ndi.find_objects(labels), start=1):
        if win is None:
            continue
        crop = labels[win]
        pieces = label_components_3d(crop == i)
        sizes = np.bincount(pieces.ravel())[1:]
        if sizes.size == 0 or sizes.max() < min_voxels:
            crop[crop == i] = 0
        else:
            crop[(pieces > 0) & (pieces != 1 + sizes.argmax())] = 0
    kept = np.unique(labels)
    kept = kept[kept > 0]
    lut = np.zeros(int(labels.max()) + 1, np.uint16)
    lut[kept] = np.arange(1, kept.size + 1, dtype=np.uint16)
    labels = lut[labels]

    a, b, where = _face_contacts(labels)
    edge = np.zeros(shape, bool)
    contact = np.zeros(shape, bool)
    contact[tuple(where.T)] = True
    inside = labels > 0
    for axis in range(3):
        for step in (1, -1):
            neighbour = np.roll(labels, step, axis)
            border = [slice(None)] * 3
            border[axis] = 0 if step == 1 else -1
            neighbour[tuple(border)] = labels[tuple(border)]
            edge |= inside & (neighbour != labels)
    brightness = np.r_[0.0, rng.uniform(0.35, 0.6, kept.size)]
    image = 0.15 + brightness[labels]
    image[edge] -= np.where(contact[edge], 0.2, 0.35)
    if blur > 0:
        image = ndi.gaussian_filter(image, blur / steps)
    if noise > 0:
        image = image + rng.normal(0.0, noise, shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), labels
