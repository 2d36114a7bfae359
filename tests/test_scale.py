"""Object scale: diameters, rescaling round trips, --diameter at prediction, the size warning."""

from types import SimpleNamespace

import numpy as np
import pytest
import tifffile

from unetkit.checkpoint import LoadedModel
from unetkit.cli import main
from unetkit.data.normalize import Normalization
from unetkit.errors import InputError
from unetkit.inference import InferenceOptions, Segmenter
from unetkit.network import UNet
from unetkit.scale import (
    check_diameter,
    median_diameter,
    pixel_size_um,
    rescale_image,
    resize_labels,
    scale_factor,
    size_note,
)


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """ONNX graphs and backend choices in a folder of this module's own, not the user's cache."""
    monkeypatch.setenv("UNETKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "unetkit-cache"))


def discs(radii, shape=(200, 200)):
    """Non-touching discs of the given radii, ids 1.. in a row."""
    labels = np.zeros(shape, np.uint16)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    x = 0
    for i, r in enumerate(radii, 1):
        x += r + 2
        labels[np.hypot(yy - shape[0] // 2, xx - x) <= r] = i
        x += r + 2
    return labels


def test_median_diameter_of_discs_is_twice_the_radius():
    assert median_diameter(discs([6, 10, 10, 14, 20], shape=(60, 200))) == pytest.approx(20.0, abs=0.5)
    assert median_diameter([discs([5]), discs([15, 15])]) == pytest.approx(30.0, abs=0.5)  # pooled over images
    assert median_diameter(np.zeros((5, 5), np.uint8)) is None


@pytest.mark.parametrize("shape", [(37, 53), (41, 29), (1, 7)])
def test_labels_round_trip_keeps_ids_and_the_exact_shape(shape, rng):
    labels = rng.integers(0, 5, shape).astype(np.uint32) * 1000  # sparse, large ids
    for factor in (0.5, 0.73, 1.5, 2.0):
        there = resize_labels(labels, (max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor))))
        back = resize_labels(there, shape)
        assert back.shape == shape and back.dtype == labels.dtype
        assert set(np.unique(back)) <= set(np.unique(labels))
    twice = resize_labels(labels, (shape[0] * 2, shape[1] * 2))
    assert np.array_equal(resize_labels(twice, shape), labels)  # an integer factor round trip is exact


def test_rescale_image_shapes_and_anti_aliasing():
    image = np.stack([np.indices((31, 45)).sum(0) % 2] * 2).astype(np.float32)  # a 1-px checkerboard, 2 channels
    small = rescale_image(image, 0.5)
    assert small.shape == (2, 16, 22) and small.dtype == np.float32
    assert np.abs(small[:, 2:-2, 2:-2] - 0.5).max() < 0.2  # averaged, not aliased into stripes
    assert np.array_equal(rescale_image(image, shape=(31, 45)), image)
    assert rescale_image(image[0], 2.0).shape == (62, 90)


@pytest.mark.parametrize("value", ["0", "-3", "abc", "nan", "inf", 0, -1.0, True])
def test_check_diameter_refuses_bad_values(value):
    with pytest.raises(InputError, match="--diameter must be 'auto' or an object diameter in pixels > 0"):
        check_diameter(value)


def test_scale_factor_from_diameter_or_pixel_size():
    assert scale_factor({"diameter": 30.0}, diameter=15.0) == pytest.approx(2.0)
    assert scale_factor({"diameter": 30.0, "pixel_size": 0.24}, pixel_size=0.12) == pytest.approx(0.5)
    with pytest.raises(InputError, match="records no pixel size"):
        scale_factor({"diameter": 30.0}, pixel_size=0.2)
    with pytest.raises(InputError, match="records no object diameter"):
        scale_factor({}, diameter=10.0)
    assert pixel_size_um("0.19 x 0.19 um") == 0.19 and pixel_size_um("4 x 4 nm") == 0.004


def test_packaged_models_record_their_scale():
    from unetkit.pretrained import get_model

    fluo = get_model("fluo-nuclei").scale
    assert 40 < fluo["diameter"] < 80 and fluo["pixel_size"] == 0.24
    assert get_model("dic-hela").scale["diameter"] > fluo["diameter"]  # HeLa cells are larger than GOWT1 nuclei


def tiny_segmenter(options, scale=None):
    import torch

    torch.manual_seed(0)
    loaded = LoadedModel(UNet(depth=2, base_channels=4), Normalization(), ["background", "cell"],
                         decision={"method": "components", "threshold": 0.5}, scale=scale or {"diameter": 20.0})
    return Segmenter(loaded, InferenceOptions(device="cpu", backend="torch", tile_size=44, **options))


def test_segment_at_the_models_scale_returns_the_inputs_shape(rng):
    raw = rng.random((45, 61)).astype(np.float32)
    segmenter = tiny_segmenter({"diameter": 10})
    result = segmenter.segment(raw)
    assert result.labels.shape == (45, 61) and result.probabilities.shape == (2, 45, 61)
    assert segmenter._scaled.model_maps.shape == (2, 90, 122)  # objects of 10 px brought to the model's 20 px
    auto = tiny_segmenter({"diameter": "auto"}).segment(raw, name="x.tif")
    assert auto.labels.shape == (45, 61)
    assert auto.notes and all(note.startswith("x.tif: ") and "diameter" in note for note in auto.notes)
    with pytest.raises(InputError, match="records no object diameter"):
        tiny_segmenter({"diameter": 10}, scale={"pixel_size": 0.2}).segment(raw)


def test_objects_far_from_the_trained_size_are_warned_about():
    fake = SimpleNamespace(loaded=SimpleNamespace(scale={"diameter": 60.0}), packaged=None, packaged_scale=None, source="m.pt")
    note = size_note(fake, discs([10, 10, 12], shape=(40, 100)))
    assert note is not None and "--diameter auto" in note and "60 px" in note
    assert size_note(fake, discs([28, 30, 31], shape=(70, 220))) is None


@pytest.mark.parametrize("value", ["0", "-2", "big"])
def test_cli_bad_diameter_exits_2_and_creates_nothing(value, tmp_path, capsys):
    image = tmp_path / "a.tif"
    tifffile.imwrite(image, np.zeros((20, 20), np.uint8))
    out = tmp_path / "out"
    assert main(["predict", str(image), "--model", "fluo-nuclei", "--out", str(out), f"--diameter={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--diameter" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_images_unlike_the_training_intensities_are_warned_about(rng):
    from unetkit.pretrained import check_input

    em_like = rng.integers(0, 256, (64, 64), dtype=np.uint8)  # half bright: unlike GOWT1's dark frames
    with pytest.warns(UserWarning):
        messages = check_input("fluo-nuclei", em_like)
    assert len(messages) == 1 and "--norm-statistics image" in messages[0] and "unetkit train --from fluo-nuclei" in messages[0]
    dark = em_like.copy()
    dark[:, 4:] //= 16
    assert check_input("fluo-nuclei", dark) == []


def test_cli_refuses_diameter_for_large_images(tmp_path, capsys):
    image = tmp_path / "a.tif"
    tifffile.imwrite(image, np.zeros((20, 20), np.uint8))
    out = tmp_path / "out"
    assert main(["predict", str(image), "--model", "fluo-nuclei", "--out", str(out), "--diameter", "12",
                 "--out-format", "zarr"]) == 2
    err = capsys.readouterr().err.strip()
    assert "rescale the image to the model's scale first" in err and len(err.splitlines()) == 1
    assert not out.exists()
