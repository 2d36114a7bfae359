"""Synthetic cell images: determinism, format, touching and nearly touching cells, contrast."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from unetkit.errors import InputError
from unetkit.synthetic import synthetic_cells, synthetic_dataset

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def samples() -> list[tuple[np.ndarray, np.ndarray]]:
    return [synthetic_cells(seed=s) for s in SEEDS]


def _touching_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    pairs = set()
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        hit = (a != b) & (a > 0) & (b > 0)
        pairs |= set(zip(np.minimum(a[hit], b[hit]).tolist(), np.maximum(a[hit], b[hit]).tolist()))
    return pairs


def _near_pairs(labels: np.ndarray, gap: int = 3) -> set[tuple[int, int]]:
    """Pairs of cells seen together in a (gap+2)-wide window centred on background."""
    size = gap + 2
    hi = ndi.maximum_filter(labels, size)
    lo = ndi.minimum_filter(np.where(labels > 0, labels, labels.max() + 1), size)
    hit = (labels == 0) & (lo < hi) & (hi > 0)
    return set(zip(lo[hit].tolist(), hi[hit].tolist()))


def _contact_and_edges(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    edge = np.zeros(labels.shape, bool)
    contact = np.zeros(labels.shape, bool)
    padded = np.pad(labels, 1, mode="edge")
    h, w = labels.shape
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        other = padded[dy : dy + h, dx : dx + w]
        differs = (other != labels) & (labels > 0)
        edge |= differs
        contact |= differs & (other > 0)
    return edge, contact


def test_same_seed_same_arrays_and_different_seed_differs() -> None:
    a = synthetic_cells((96, 128), seed=7)
    b = synthetic_cells((96, 128), seed=7)
    c = synthetic_cells((96, 128), seed=8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[1], c[1])


def test_dataset_image_i_uses_seed_pair() -> None:
    pairs = synthetic_dataset(3, (64, 80), seed=4, noise=0.05)
    assert len(pairs) == 3
    image, labels = synthetic_cells((64, 80), seed=(4, 2), noise=0.05)
    np.testing.assert_array_equal(pairs[2][0], image)
    np.testing.assert_array_equal(pairs[2][1], labels)
    assert not np.array_equal(pairs[0][0], pairs[1][0])
    assert synthetic_dataset(0) == []


def test_dtype_shape_range_and_consecutive_ids() -> None:
    image, labels = synthetic_cells((200, 300), seed=3)
    assert image.shape == labels.shape == (200, 300)
    assert image.dtype == np.float32 and labels.dtype == np.uint16
    assert 0.0 <= image.min() and image.max() <= 1.0
    n = int(labels.max())
    assert n >= 10
    np.testing.assert_array_equal(np.unique(labels), np.arange(n + 1))


def test_default_images_have_touching_and_nearly_touching_cells(samples) -> None:
    for _, labels in samples:
        touching = _touching_pairs(labels)
        near_only = _near_pairs(labels) - touching
        assert len(touching) >= 1
        assert len(near_only) >= 1


def test_touching_controls_shared_boundaries() -> None:
    _, separate = synthetic_cells(seed=0, touching=0.0)
    assert not _touching_pairs(separate)
    assert len(_near_pairs(separate)) >= 5
    _, packed = synthetic_cells(seed=0, touching=1.0)
    assert len(_touching_pairs(packed)) > 10


def test_cells_vary_in_size(samples) -> None:
    for _, labels in samples:
        areas = np.bincount(labels.ravel())[1:]
        assert areas.std() > 0
        assert areas.max() > 2 * areas.min()


def test_n_cells_bounds_the_count() -> None:
    _, labels = synthetic_cells((128, 128), n_cells=5, seed=1)
    assert 1 <= labels.max() <= 5


def test_cells_are_brighter_than_background(samples) -> None:
    noise = 0.08  # the default
    for image, labels in samples:
        inside = labels > 0
        background = ~ndi.binary_dilation(inside, iterations=4)
        assert image[inside].mean() - image[background].mean() > 2 * noise


def test_contact_lines_differ_from_nearby_cell_interior(samples) -> None:
    for image, labels in samples:
        edge, contact = _contact_and_edges(labels)
        to_contact = ndi.distance_transform_edt(~contact)
        nearby = (labels > 0) & ~edge & (to_contact >= 2) & (to_contact <= 4)
        assert contact.sum() > 50
        assert image[nearby].mean() - image[contact].mean() > 0.02


def test_bad_arguments_raise_input_error() -> None:
    with pytest.raises(InputError):
        synthetic_cells((4, 4))
    with pytest.raises(InputError):
        synthetic_cells(cell_radius=(10, 5))
    with pytest.raises(InputError):
        synthetic_cells(touching=1.5)
