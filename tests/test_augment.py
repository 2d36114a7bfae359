"""Tests for unetkit.augment: elastic deformation and the joint augmentation of samples."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage as ndi

from unetkit.augment import AugmentConfig, Augmenter, displacement_field, elastic_deform
from unetkit.config import PAPER
from unetkit.errors import InputError

GEOMETRY_ONLY = replace(AugmentConfig(), gamma=False, contrast=False, brightness=False, noise=False)


def blocks(height: int = 64, width: int = 64) -> np.ndarray:
    """Label image of a few large rectangles with values 0, 1, 2, 5, drawn on a 64x64 layout."""
    labels = np.zeros((height, width), np.int64)
    rows, cols = height / 64, width / 64
    boxes = {1: (8, 30, 6, 40), 2: (34, 58, 20, 56), 5: (10, 26, 44, 60)}
    for value, (r0, r1, c0, c1) in boxes.items():
        labels[round(r0 * rows):round(r1 * rows), round(c0 * cols):round(c1 * cols)] = value
    return labels


def sample(height: int = 64, width: int = 64):
    labels = blocks(height, width)
    image = np.stack([labels, 10 - labels]).astype(np.float32)
    weights = (labels * 2.0 + 1.0).astype(np.float32)
    return image, labels, weights


def test_displacement_field_interpolates_grid_values():
    field = displacement_field((61, 91), rng=7, grid=4, sigma=3.0)
    drawn = np.random.default_rng(7).normal(0.0, 3.0, (2, 4, 4))
    assert field.shape == (2, 61, 91)
    np.testing.assert_allclose(field[:, ::20, ::30], drawn, atol=1e-9)


def test_displacement_statistics_match_paper_sigma():
    rng = np.random.default_rng(0)
    at_grid = np.stack(
        [displacement_field((21, 21), rng)[:, ::10, ::10] for _ in range(500)]
    )
    assert at_grid.std() == pytest.approx(PAPER.elastic_sigma, rel=0.03)
    assert abs(at_grid.mean()) < 0.3
    # Between grid points the field varies smoothly: neighbouring pixels barely differ.
    field = displacement_field((101, 101), rng)
    for axis in (1, 2):
        assert np.abs(np.diff(field, axis=axis)).max() < 0.1 * np.abs(field).max()


def test_elastic_deform_return_forms_and_shapes():
    image, labels, weights = sample(40, 52)
    single = elastic_deform(image[0], rng=0)
    assert isinstance(single, np.ndarray) and single.shape == (40, 52)
    out = elastic_deform(image, labels, weights, rng=0)
    assert isinstance(out, tuple) and len(out) == 3
    for before, after in zip((image, labels, weights), out):
        assert after.shape == before.shape and after.dtype == before.dtype
    np.testing.assert_array_equal(out[0][0], single)
    mask = elastic_deform(labels > 0, rng=0)
    assert mask.dtype == bool


def test_elastic_deform_keeps_label_values_and_alignment():
    # The grid spacing (64 pixels) keeps the paper's 10-pixel displacements free of folds.
    _, labels, _ = sample(128, 128)
    as_float = labels.astype(np.float64)
    warped_labels, warped_float = elastic_deform(labels, as_float, rng=3)
    assert set(np.unique(warped_labels)) <= set(np.unique(labels))
    assert not np.array_equal(warped_labels, labels)
    assert warped_float.min() >= as_float.min() and warped_float.max() <= as_float.max()
    interior = _interior(warped_labels)
    np.testing.assert_allclose(warped_float[interior], warped_labels[interior], atol=0.2)


def test_elastic_deform_with_zero_sigma_is_identity():
    image, labels, _ = sample()
    warped_image, warped_labels = elastic_deform(image, labels, rng=1, sigma=0.0)
    np.testing.assert_array_equal(warped_labels, labels)
    np.testing.assert_allclose(warped_image, image, atol=1e-4)


def test_elastic_deform_rejects_mismatched_shapes():
    with pytest.raises(InputError, match="height and width"):
        elastic_deform(np.zeros((10, 10)), np.zeros((10, 11), np.int64), rng=0)
    with pytest.raises(InputError):
        elastic_deform(np.zeros((10,)), rng=0)


def _interior(labels: np.ndarray) -> np.ndarray:
    """Pixels whose 5x5 neighbourhood lies in the image and has a single label value."""
    footprint = np.ones((5, 5), bool)
    same = ndi.maximum_filter(labels, footprint=footprint) == ndi.minimum_filter(
        labels, footprint=footprint
    )
    inside = np.zeros_like(same)
    inside[2:-2, 2:-2] = True
    return same & inside


def test_augmenter_is_deterministic_with_a_seed():
    image, labels, weights = sample()
    augment = Augmenter(AugmentConfig())
    a = augment(image, labels, weights, np.random.default_rng(11))
    b = augment(image, labels, weights, np.random.default_rng(11))
    c = augment(image, labels, weights, np.random.default_rng(12))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_augmenter_keeps_shapes_dtypes_and_label_values():
    image, labels, weights = sample(48, 70)
    image = image[:1]
    rng = np.random.default_rng(0)
    out_image, out_labels, out_weights = Augmenter()(image, labels, weights, rng)
    assert out_image.shape == (1, 48, 70) and out_image.dtype == np.float32
    assert out_labels.shape == (48, 70) and out_labels.dtype == np.int64
    assert out_weights.shape == (48, 70) and out_weights.dtype == np.float32
    assert set(np.unique(out_labels)) <= {0, 1, 2, 5}
    assert out_weights.min() >= weights.min() and out_weights.max() <= weights.max()
    none_weights = Augmenter()(image, labels, None, np.random.default_rng(0))[2]
    assert none_weights is None


def test_augmenter_everything_off_is_identity():
    image, labels, weights = sample()
    out = Augmenter(AugmentConfig.disabled())(image, labels, weights, np.random.default_rng(0))
    for before, after in zip((image, labels, weights), out):
        np.testing.assert_array_equal(after, before)
        assert after is not before


@pytest.mark.parametrize("seed", range(4))
def test_augmenter_keeps_image_labels_weights_aligned(seed):
    image, labels, weights = sample(128, 128)
    augment = Augmenter(GEOMETRY_ONLY)
    rng = np.random.default_rng(seed)
    out_image, out_labels, out_weights = augment(image, labels, weights, rng)
    interior = _interior(out_labels)
    assert interior.mean() > 0.5
    np.testing.assert_allclose(out_image[0][interior], out_labels[interior], atol=0.25)
    np.testing.assert_allclose(out_image[1][interior], 10 - out_labels[interior], atol=0.25)
    np.testing.assert_allclose(out_weights[interior], 2.0 * out_labels[interior] + 1, atol=0.5)


def _dihedral(array: np.ndarray) -> list[np.ndarray]:
    rotations = [np.rot90(array, k, axes=(-2, -1)) for k in range(4)]
    return rotations + [np.flip(r, axis=-1) for r in rotations]


def test_rotate90_and_flip_are_exact_dihedral_transforms():
    image, labels, _ = sample()
    only = replace(AugmentConfig.disabled(), rotate90=True, flip=True)
    seen = set()
    for seed in range(12):
        out_image, out_labels, _ = Augmenter(only)(image, labels, None, np.random.default_rng(seed))
        matches = [i for i, t in enumerate(_dihedral(labels)) if np.array_equal(t, out_labels)]
        assert len(matches) == 1
        np.testing.assert_allclose(out_image, _dihedral(image)[matches[0]], atol=1e-4)
        seen.add(matches[0])
    assert len(seen) > 2


def test_shift_moves_content():
    labels = np.zeros((40, 40), np.int64)
    labels[18:22, 18:22] = 1
    only = replace(AugmentConfig.disabled(), shift=True, shift_pixels=6.0)
    _, out, _ = Augmenter(only)(labels[None].astype(np.float32), labels, None,
                                np.random.default_rng(2))
    assert out.sum() == 16
    assert not np.array_equal(out, labels)


def test_gray_value_changes_image_only():
    image, labels, weights = sample()
    only = replace(AugmentConfig.disabled(), gamma=True, contrast=True, brightness=True,
                   noise=True)
    out_image, out_labels, out_weights = Augmenter(only)(image, labels, weights,
                                                        np.random.default_rng(4))
    np.testing.assert_array_equal(out_labels, labels)
    np.testing.assert_array_equal(out_weights, weights)
    assert out_image.dtype == np.float32 and not np.allclose(out_image, image)


def test_augmenter_pickles_and_config_round_trips():
    config = AugmentConfig(rotate=False, shift_pixels=4.0, gamma_range=(0.7, 1.4))
    augment = pickle.loads(pickle.dumps(Augmenter(config)))
    assert augment.config == config
    saved = json.loads(json.dumps(config.to_dict()))
    assert AugmentConfig.from_dict(saved) == config
    assert AugmentConfig().elastic_grid == PAPER.elastic_grid
    assert AugmentConfig().elastic_sigma == PAPER.elastic_sigma


def test_config_rejects_bad_values():
    with pytest.raises(InputError, match="unknown"):
        AugmentConfig.from_dict({"elastik": True})
    with pytest.raises(InputError, match="gamma_range"):
        AugmentConfig(gamma_range=(1.2, 0.8))
    with pytest.raises(InputError, match="elastic_grid"):
        AugmentConfig(elastic_grid=1)
    with pytest.raises(InputError, match="noise_std"):
        AugmentConfig(noise_std=-0.1)


def test_augmenter_rejects_bad_inputs():
    image, labels, weights = sample()
    augment = Augmenter()
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="C, H, W"):
        augment(image[0], labels, weights, rng)
    with pytest.raises(InputError, match="integer"):
        augment(image, labels.astype(np.float32), weights, rng)
    with pytest.raises(InputError, match="height and width"):
        augment(image, labels, weights[:-1], rng)


def test_out_shape_returns_the_window_shape():
    image, labels, weights = sample(90, 100)
    augment = Augmenter()
    out_image, out_labels, out_weights = augment(image, labels, weights, np.random.default_rng(0),
                                                 out_shape=(50, 61))
    assert out_image.shape == (2, 50, 61) and out_image.dtype == np.float32
    assert out_labels.shape == (50, 61) and out_labels.dtype == np.int64
    assert out_weights.shape == (50, 61) and out_weights.dtype == np.float32
    assert set(np.unique(out_labels)) <= {0, 1, 2, 5}
    assert out_weights.min() >= weights.min() and out_weights.max() <= weights.max()
    assert augment(image, labels, None, np.random.default_rng(0), out_shape=(50, 61))[2] is None


def test_out_shape_equal_to_the_input_changes_nothing():
    image, labels, weights = sample(48, 56)
    augment = Augmenter()
    a = augment(image, labels, weights, np.random.default_rng(5))
    b = augment(image, labels, weights, np.random.default_rng(5), out_shape=(48, 56))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_out_shape_without_geometry_is_the_centre_crop():
    image, labels, weights = sample(64, 71)
    crop = (slice(11, 53), slice(10, 60))  # (64 - 42) // 2 = 11, (71 - 50) // 2 = 10
    out = Augmenter(AugmentConfig.disabled())(image, labels, weights, np.random.default_rng(0),
                                              out_shape=(42, 50))
    for before, after in zip((image[:, crop[0], crop[1]], labels[crop], weights[crop]), out):
        np.testing.assert_array_equal(after, before)
    gray = replace(AugmentConfig.disabled(), gamma=True, contrast=True, noise=True)
    out_image, out_labels, out_weights = Augmenter(gray)(
        image, labels, weights, np.random.default_rng(0), out_shape=(42, 50))
    np.testing.assert_array_equal(out_labels, labels[crop])
    np.testing.assert_array_equal(out_weights, weights[crop])
    assert out_image.shape == (2, 42, 50) and not np.allclose(out_image, image[:, crop[0], crop[1]])


@pytest.mark.parametrize("seed", range(4))
def test_out_shape_keeps_image_labels_weights_aligned(seed):
    image, labels, weights = sample(200, 200)
    augment = Augmenter(GEOMETRY_ONLY)
    out_image, out_labels, out_weights = augment(image, labels, weights,
                                                 np.random.default_rng(seed), out_shape=(128, 120))
    interior = _interior(out_labels)
    assert interior.mean() > 0.5
    np.testing.assert_allclose(out_image[0][interior], out_labels[interior], atol=0.25)
    np.testing.assert_allclose(out_image[1][interior], 10 - out_labels[interior], atol=0.25)
    np.testing.assert_allclose(out_weights[interior], 2.0 * out_labels[interior] + 1, atol=0.5)


def test_out_shape_elastic_grid_spans_the_window():
    # Sampling the coordinate ramps returns the source coordinates (cubic splines reproduce linear
    # functions; the window lies far enough from the edges for the mirror boundary not to matter).
    shape, window, top = (140, 160), (61, 81), (39, 39)
    ramps = np.indices(shape).astype(np.float32)
    labels = np.zeros(shape, np.int64)
    only = replace(AugmentConfig.disabled(), elastic=True, elastic_sigma=5.0)
    out_image, _, _ = Augmenter(only)(ramps, labels, None, np.random.default_rng(9),
                                      out_shape=window)
    field = out_image - (np.indices(window) + np.array(top)[:, None, None])
    drawn = np.random.default_rng(9).normal(0.0, 5.0, (2, 3, 3))
    np.testing.assert_allclose(field[:, ::30, ::40], drawn, atol=1e-3)
    assert np.abs(field).max() > 1.0


def test_out_shape_rotations_and_flips_turn_about_the_window_centre():
    image, labels, _ = sample(65, 66)
    crop = (slice(12, 52), slice(13, 53))
    only = replace(AugmentConfig.disabled(), rotate90=True, flip=True)
    seen = set()
    for seed in range(12):
        out_image, out_labels, _ = Augmenter(only)(image, labels, None,
                                                   np.random.default_rng(seed), out_shape=(40, 40))
        candidates = _dihedral(labels[crop])
        matches = [i for i, t in enumerate(candidates) if np.array_equal(t, out_labels)]
        assert len(matches) == 1
        np.testing.assert_allclose(out_image, _dihedral(image[:, crop[0], crop[1]])[matches[0]],
                                   atol=1e-4)
        seen.add(matches[0])
    assert len(seen) > 2


@pytest.mark.parametrize("out_shape", [(65, 10), (10, 0), (10,), (10.5, 10), "ab"])
def test_out_shape_rejects_bad_values(out_shape):
    image, labels, _ = sample()
    with pytest.raises(InputError, match="out_shape"):
        Augmenter()(image, labels, None, np.random.default_rng(0), out_shape=out_shape)


ONLY_SCALE = replace(AugmentConfig.disabled(), scale=True)


@pytest.mark.parametrize("zoom", [0.5, 0.8, 1.6])
def test_scale_zooms_about_the_centre_by_the_drawn_factor(zoom):
    yy, xx = np.indices((81, 81))
    disk = ((yy - 40) ** 2 + (xx - 40) ** 2 <= 12 ** 2).astype(np.int64)
    image = disk[None].astype(np.float32)
    config = replace(ONLY_SCALE, scale_range=(zoom, zoom))
    _, out, _ = Augmenter(config)(image, disk, None, np.random.default_rng(0))
    components, _ = ndi.label(out)
    centre = components == components[40, 40]  # zooming out also shows the mirrored copies around it
    assert out[40, 40] == 1
    assert np.sqrt(centre.sum() / np.pi) == pytest.approx(12 * zoom, rel=0.05)
    assert ndi.center_of_mass(centre) == pytest.approx((40.0, 40.0), abs=0.5)


def test_scale_draws_log_uniform_factors_within_the_range():
    yy, xx = np.indices((101, 101))
    disk = ((yy - 50) ** 2 + (xx - 50) ** 2 <= 10 ** 2).astype(np.int64)
    config = replace(ONLY_SCALE, scale_range=(0.5, 2.0))
    rng = np.random.default_rng(1)
    radii = []
    for _ in range(60):
        out = Augmenter(config)(disk[None].astype(np.float32), disk, None, rng)[1]
        radii.append(np.sqrt((ndi.label(out)[0] == ndi.label(out)[0][50, 50]).sum() / np.pi) / 10)
    assert 0.45 < min(radii) and max(radii) < 2.1
    assert np.mean(np.log(radii)) == pytest.approx(0.0, abs=0.2)  # log-uniform about 1
    assert min(radii) < 0.7 and max(radii) > 1.4


def test_scale_is_off_by_default_and_round_trips():
    assert not AugmentConfig().scale and not AugmentConfig.disabled().scale
    config = AugmentConfig(scale=True, scale_range=(0.6, 1.5))
    assert AugmentConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert AugmentConfig.from_dict({}).scale_range == (0.75, 1.33)  # checkpoints saved before the option
    with pytest.raises(InputError, match="scale_range"):
        AugmentConfig(scale_range=(0.0, 1.5))


def test_margin_grows_when_zooming_out():
    from unetkit.data.tiles import augment_margin

    plain = replace(AugmentConfig.disabled(), elastic=True)
    zoom_out = replace(plain, scale=True, scale_range=(0.5, 1.5))
    assert augment_margin(Augmenter(plain), (100, 100)) == 30
    assert augment_margin(Augmenter(zoom_out), (100, 100)) == 110  # (50 + 30) / 0.5 - 50
    assert augment_margin(Augmenter(replace(zoom_out, scale_range=(1.2, 1.5))), (100, 100)) == 30
