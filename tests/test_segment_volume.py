"""`unetkit predict` with a 3D model: each z-stack segmented whole, and the inputs it refuses."""

import numpy as np
import pytest
import tifffile
import torch

from unetkit.checkpoint import load_checkpoint, save_checkpoint
from unetkit.cli import main
from unetkit.data.normalize import Normalization
from unetkit.data.volumes import normalize_volume
from unetkit.decision import DecisionRule
from unetkit.errors import InputError
from unetkit.network import UNet
from unetkit.postprocess import labels_from_probabilities
from unetkit.segment_volume import (
    check_spacing_matches,
    segment_volume,
    tiff_spacing,
    tile_for_size,
)
from unetkit.volume import predict_volume

SHAPE = (6, 40, 44)
RULE = DecisionRule(method="components", threshold=0.5)


def tiny_3d_net() -> UNet:
    torch.manual_seed(0)
    return UNet(dims=3, depth=2, base_channels=4, pool_kernels=[(1, 2, 2)], conv_kernels=[(1, 3, 3), (3, 3, 3)],
                batch_norm=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("volumes")
    save_checkpoint(root / "m3.pt", tiny_3d_net(), normalization=Normalization(), class_names=["background", "cell"],
                    train_config={"dims": 3, "spacing": [2.0, 0.5, 0.5]}, decision=RULE.to_dict())
    save_checkpoint(root / "nospacing.pt", tiny_3d_net(), normalization=Normalization(), class_names=["background", "cell"])
    torch.manual_seed(0)
    save_checkpoint(root / "m2.pt", UNet(depth=2, base_channels=4), normalization=Normalization(),
                    class_names=["background", "cell"], decision=RULE.to_dict())
    volume = (np.random.default_rng(0).random(SHAPE) * 255).astype(np.uint8)
    tifffile.imwrite(root / "vol.tif", volume, photometric="minisblack")
    tifffile.imwrite(root / "plane.tif", volume[0])
    tifffile.imwrite(root / "thin.tif", volume[:4], photometric="minisblack")
    tifffile.imwrite(root / "imagej.tif", volume, imagej=True, resolution=(2.0, 2.0), metadata={"spacing": 1.0, "axes": "ZYX"})
    return root


def expected(folder, **options):
    loaded = load_checkpoint(folder / "m3.pt")
    volume = normalize_volume(tifffile.imread(folder / "vol.tif"), loaded.normalization)
    return predict_volume(loaded.model, volume, device="cpu", **options)


CPU = ["--device", "cpu", "--no-progress"]


def test_a_3d_model_writes_probabilities_and_labels_of_the_whole_volume(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(folder / "vol.tif"), "--model", str(folder / "m3.pt"), "--out", str(out), *CPU]) == 0
    probabilities = tifffile.imread(out / "vol_probabilities.tif")
    labels = tifffile.imread(out / "vol_labels.tif")
    assert probabilities.shape == (2, *SHAPE) and probabilities.dtype == np.float32
    assert labels.shape == SHAPE and labels.dtype in (np.uint8, np.uint16)
    reference = expected(folder)
    np.testing.assert_allclose(probabilities, reference, atol=1e-6)
    np.testing.assert_array_equal(labels, labels_from_probabilities(reference, RULE))
    assert "3D model" in capsys.readouterr().out


def test_outputs_are_kept_without_force_and_replaced_with_it(folder, tmp_path, capsys):
    out = tmp_path / "out"
    command = ["predict", str(folder / "vol.tif"), "--model", str(folder / "m3.pt"), "--out", str(out), *CPU]
    assert main(command) == 0
    (out / "vol_labels.tif").write_bytes(b"kept")
    assert main(command) == 0
    assert "skipping 1 volume(s) whose outputs already exist" in capsys.readouterr().out
    assert (out / "vol_labels.tif").read_bytes() == b"kept"
    assert main([*command, "--force"]) == 0
    assert tifffile.imread(out / "vol_labels.tif").shape == SHAPE


def test_tile_size_gives_the_volume_prediction_with_that_tile(folder, tmp_path):
    out = tmp_path / "out"
    assert main(["predict", str(folder / "vol.tif"), "--model", str(folder / "m3.pt"), "--out", str(out), "--tile-size", "44",
                 *CPU]) == 0
    tile = tile_for_size(load_checkpoint(folder / "m3.pt").model.geometry, 44, SHAPE)
    assert tile == (10, 44, 44)
    np.testing.assert_allclose(tifffile.imread(out / "vol_probabilities.tif"), expected(folder, tile_shape=tile), atol=1e-6)


def test_tta_averages_the_volume_transforms(folder, tmp_path):
    small = tifffile.imread(folder / "vol.tif")[:, :20, :22]
    tifffile.imwrite(tmp_path / "small.tif", small, photometric="minisblack")
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "small.tif"), "--model", str(folder / "m3.pt"), "--out", str(out), "--tta", *CPU]) == 0
    loaded = load_checkpoint(folder / "m3.pt")
    reference = predict_volume(loaded.model, normalize_volume(small, loaded.normalization), tta=True, device="cpu")
    np.testing.assert_allclose(tifffile.imread(out / "small_probabilities.tif"), reference, atol=1e-6)


def test_a_zarr_volume_is_segmented_like_its_tiff(folder, tmp_path):
    zarr = pytest.importorskip("zarr")
    zarr.create_array(store=str(tmp_path / "vol.zarr"), data=tifffile.imread(folder / "vol.tif"), chunks=(3, 20, 22))
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "vol.zarr"), "--model", str(folder / "m3.pt"), "--out", str(out), *CPU]) == 0
    np.testing.assert_allclose(tifffile.imread(out / "vol_probabilities.tif"), expected(folder), atol=1e-6)


def test_segment_volume_api_matches_the_command_line(folder):
    probabilities, labels = segment_volume(folder / "m3.pt", tifffile.imread(folder / "vol.tif"), device="cpu",
                                           spacing=(2, 0.5, 0.5))
    reference = expected(folder)
    np.testing.assert_allclose(probabilities, reference, atol=1e-6)
    assert labels.shape == SHAPE
    bare, _ = segment_volume(load_checkpoint(folder / "m3.pt").model, normalize_volume(tifffile.imread(folder / "vol.tif"), Normalization()),
                             device="cpu")
    np.testing.assert_allclose(bare, reference, atol=1e-6)
    with pytest.raises(InputError, match="is one 2D image"):
        segment_volume(folder / "m3.pt", np.zeros((40, 44), np.uint8), device="cpu")


@pytest.mark.parametrize("name, extra, message", [
    ("plane.tif", [], "plane.tif: is one 2D image (40, 44); a 3D model needs a volume (multi-page TIFF z-stack of one-channel "
                      "planes): give the z-stack, or use a 2D model for 2D images"),
    ("thin.tif", [], "thin.tif: 4 slices along z, but this 3D model needs at least 5 (its smallest tile); give a volume of at "
                     "least 5 slices along z (e.g. mirror it out: numpy.pad(volume, ((0, 1), (0, 0), (0, 0)), mode='reflect'))"),
    ("vol.tif", ["--spacing", "1,1,1"], "vol.tif: voxel spacing 1,1,1 (z/xy 1, from --spacing) but the model was trained at "
                                        "2,0.5,0.5 (z/xy 4); resample the volume along z to the model's spacing "
                                        "(scipy.ndimage.zoom(volume, (0.25, 1, 1)), order=1) or train a model at this spacing"),
    ("imagej.tif", [], "imagej.tif: voxel spacing 1,0.5,0.5 (z/xy 2, from the TIFF's metadata) but the model was trained at"),
    ("vol.tif", ["--spacing", "2,1"], "--spacing must be three positive numbers z,y,x (e.g. 4,1,1 for sections 4 pixels apart), got '2,1'"),
    ("vol.tif", ["--stitch", "0.3"], "--stitch links the planes of stacks segmented plane by plane, but"),
    ("vol.tif", ["--diameter", "20"], "--diameter rescales 2D images to the model's object size, but"),
    ("vol.tif", ["--pixel-size", "0.5"], "--pixel-size rescales 2D images to the model's pixel size, but"),
    ("vol.tif", ["--out-format", "zarr"], "--out-format zarr: a 3D model writes zarr outputs tile by tile for zarr volumes "
                                          "only, and "),
    ("vol.tif", ["--dask", "local:1"], "--dask: a 3D model writes zarr outputs tile by tile for zarr volumes only, and "),
])
def test_bad_volume_inputs_are_refused_in_one_line_before_anything_is_written(folder, tmp_path, capsys, name, extra, message):
    out = tmp_path / "out"
    assert main(["predict", str(folder / name), "--model", str(folder / "m3.pt"), "--out", str(out), *extra, *CPU]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_ctc_with_a_3d_model_is_refused(folder, tmp_path, capsys):
    assert main(["predict", str(folder / "vol.tif"), "--model", str(folder / "m3.pt"), "--out", str(tmp_path / "out"),
                 "--ctc", *CPU]) == 2
    assert "--ctc writes one 2D Cell Tracking Challenge mask per frame, but" in capsys.readouterr().err


def test_a_model_without_recorded_spacing_accepts_any_spacing(folder, tmp_path):
    out = tmp_path / "out"
    assert main(["predict", str(folder / "imagej.tif"), "--model", str(folder / "nospacing.pt"), "--out", str(out),
                 "--spacing", "9,1,1", *CPU]) == 0
    assert tifffile.imread(out / "imagej_labels.tif").shape == SHAPE


def test_a_2d_model_keeps_segmenting_stacks_plane_by_plane_and_refuses_spacing(folder, tmp_path, capsys):
    out = tmp_path / "out"
    command = ["predict", str(folder / "vol.tif"), "--model", str(folder / "m2.pt"), "--out", str(out), "--tile-size", "44", *CPU]
    assert main(command) == 0
    assert tifffile.imread(out / "vol_probabilities.tif").shape == (SHAPE[0], 2, *SHAPE[1:])
    assert main([*command, "--spacing", "2,1,1", "--force"]) == 2
    assert "--spacing applies to 3D models, but" in capsys.readouterr().err


def test_spacing_helpers():
    assert tiff_spacing("missing.tif") is None
    check_spacing_matches((2.4, 0.5, 0.5), (2.0, 0.5, 0.5))  # 20 % off: accepted
    check_spacing_matches(None, (2.0, 0.5, 0.5))
    with pytest.raises(InputError, match=r"z/xy 5\.2"):
        check_spacing_matches((2.6, 0.5, 0.5), (2.0, 0.5, 0.5))


def test_imagej_spacing_is_read(folder):
    assert tiff_spacing(folder / "imagej.tif") == (1.0, 0.5, 0.5)
    assert tiff_spacing(folder / "vol.tif") is None
