"""zarr / OME-Zarr volumes with a 3D model, tile by tile into zarr (`unetkit.bigsegment.segment_large_volumes`):
equal to `VolumeSegmenter.segment` in memory, resumable, and the inputs it refuses."""

import json

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")
pytest.importorskip("ome_zarr")

from unetkit import bigsegment  # noqa: E402
from unetkit.bigimage import fit_normalization, open_volume  # noqa: E402
from unetkit.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from unetkit.cli import main  # noqa: E402
from unetkit.data.normalize import Normalization  # noqa: E402
from unetkit.data.volumes import normalize_volume  # noqa: E402
from unetkit.decision import DecisionRule  # noqa: E402
from unetkit.errors import InputError  # noqa: E402
from unetkit.inference import InferenceOptions  # noqa: E402
from unetkit.segment_volume import VolumeSegmenter  # noqa: E402
from unetkit.volume import plan_volume  # noqa: E402

SHAPE = (6, 40, 44)
CPU = ["--device", "cpu", "--no-progress", "--tile-size", "28", "--no-tta"]


@pytest.fixture(scope="module")
def volume(wavy_volume):
    return wavy_volume(SHAPE, periods=(3.0, 5.0, 6.0), seed=0)


@pytest.fixture(scope="module")
def model(tiny_3d_checkpoint, volume):
    return tiny_3d_checkpoint(volume)


def in_memory(model, volume, **options):
    segmenter = VolumeSegmenter(load_checkpoint(model), InferenceOptions(device="cpu", tile_size=28, tta=False, **options))
    return segmenter.segment(volume)


def labels_of(path):
    group = zarr.open_group(str(path), mode="r")
    return group["0"][:], [a["name"] for a in group.attrs["ome"]["multiscales"][0]["axes"]]


def test_streamed_normalisation_of_a_volume_equals_normalize_volume(tmp_path, volume):
    zarr.create_array(store=str(tmp_path / "v.zarr"), data=volume, chunks=(2, 16, 16))
    lazy = open_volume(tmp_path / "v.zarr")
    scale, offset = fit_normalization(Normalization(), lazy.as_rows())
    np.testing.assert_allclose(lazy.normalized(scale, offset)[...], normalize_volume(volume)[0], atol=1e-6)


def test_a_zarr_volume_tile_by_tile_equals_the_volume_in_memory(tmp_path, volume, model, capsys):
    zarr.create_array(store=str(tmp_path / "v.zarr"), data=volume, chunks=(3, 20, 22))
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "v.zarr"), "--model", str(model), "--out", str(out), "--out-format", "zarr", *CPU]) == 0
    assert "v.zarr: a volume of 6x40x44 voxels, predicted tile by tile into zarr; labels block by block" in capsys.readouterr().out
    expected = in_memory(model, volume)
    probs = zarr.open_array(str(out / "v_probabilities.zarr"), mode="r")
    assert probs.shape == (2, *SHAPE)
    np.testing.assert_allclose(probs[:], expected.probabilities, atol=1e-5)
    labels, axes = labels_of(out / "v_labels.ome.zarr")
    assert axes == ["z", "y", "x"] and labels.shape == SHAPE
    np.testing.assert_array_equal(labels, expected.labels)
    assert expected.labels.max() > 2
    assert sorted(p.name for p in out.iterdir()) == ["v_labels.ome.zarr", "v_probabilities.zarr"]


def test_an_ome_zarr_volume_with_binary_labels_as_tiff(tmp_path, volume, model):
    import tifffile
    from ome_zarr.writer import write_image

    write_image(volume[None, None], zarr.open_group(str(tmp_path / "e.ome.zarr"), mode="w"), axes="tczyx", scale_factors=[])
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "e.ome.zarr"), "--model", str(model), "--out", str(out), "--out-format", "tiff",
                 "--labels", "binary", *CPU]) == 0
    expected = in_memory(model, volume, labels="binary")
    np.testing.assert_allclose(tifffile.imread(out / "e_probabilities.tif"), expected.probabilities, atol=1e-5)
    np.testing.assert_array_equal(tifffile.imread(out / "e_labels.tif"), expected.labels)
    assert sorted(p.name for p in out.iterdir()) == ["e_labels.tif", "e_probabilities.tif"]


def test_large_zarr_volumes_go_tile_by_tile_and_a_killed_run_continues(tmp_path, volume, model, monkeypatch, capsys):
    from unetkit import bigimage

    zarr.create_array(store=str(tmp_path / "k.zarr"), data=volume, chunks=(3, 20, 22))
    monkeypatch.setattr(bigsegment, "LARGE_VOXELS", 1000)  # as if the volume were large: no --out-format needed
    command = ["predict", str(tmp_path / "k.zarr"), "--model", str(model), "--out", str(tmp_path / "out"), *CPU]
    add, seen = bigimage.Progress.add, []

    def dies_after_three(self, indices):
        seen.extend(indices)
        if len(seen) > 3:
            raise KeyboardInterrupt
        add(self, indices)

    monkeypatch.setattr(bigimage.Progress, "add", dies_after_three)
    assert main(command) == 130
    partial = tmp_path / "out" / "k_probabilities.zarr.partial"
    assert json.loads((partial / "unetkit-progress.json").read_text())["done"] == [0, 1, 2]
    monkeypatch.setattr(bigimage.Progress, "add", add)
    seen.clear()
    assert main(command) == 0
    n_tiles = len(plan_volume(SHAPE, load_checkpoint(model).model.geometry, (10, 28, 28)))
    assert f"continuing a previous run (3 of {n_tiles} tiles were done)" in capsys.readouterr().out
    expected = in_memory(model, volume)
    np.testing.assert_allclose(zarr.open_array(str(tmp_path / "out" / "k_probabilities.zarr"))[:], expected.probabilities,
                               atol=1e-5)
    np.testing.assert_array_equal(labels_of(tmp_path / "out" / "k_labels.ome.zarr")[0], expected.labels)
    assert main(command) == 0 and "skipping" in capsys.readouterr().out


def test_bad_zarr_volumes_are_refused_in_one_line_before_anything_is_written(tmp_path, volume, model, capsys, monkeypatch):
    zarr.create_array(store=str(tmp_path / "plane.zarr"), data=volume[0], chunks=(20, 22))
    zarr.create_array(store=str(tmp_path / "two.zarr"), data=np.stack([volume, volume]), chunks=(1, 3, 20, 22))
    zarr.create_array(store=str(tmp_path / "v.zarr"), data=volume, chunks=(3, 20, 22))
    out = tmp_path / "out"
    cases = [("plane.zarr", [], "plane.zarr: a zarr array of shape (40, 44); a 3D model needs one volume (Z, Y, X) of one channel"),
             ("two.zarr", [], "two.zarr: a zarr array of shape (2, 6, 40, 44); a 3D model needs one volume (Z, Y, X) of one channel"),
             ("v.zarr", ["--stitch", "0.3"], "--stitch links the planes of stacks segmented plane by plane, but")]
    for name, extra, message in cases:
        assert main(["predict", str(tmp_path / name), "--model", str(model), "--out", str(out), "--out-format", "zarr",
                     *extra, *CPU]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    monkeypatch.setattr(bigsegment, "VOLUME_LABEL_VOXELS", 1000)
    with pytest.raises(InputError, match=r"v.zarr: 10560 voxels; the 'watershed' labels rule \(distance-transform split\) "
                                         r"of a 3D model is drawn in memory, up to 1000 voxels: leave out --watershed"):
        bigsegment.segment_large_volumes([tmp_path / "v.zarr"], VolumeSegmenter(load_checkpoint(model),
                                         InferenceOptions(device="cpu", watershed=True)), out)
    assert not out.exists()
    written = bigsegment.segment_large_volumes(
        [tmp_path / "v.zarr"], VolumeSegmenter(load_checkpoint(model), InferenceOptions(device="cpu", labels="binary")), out)
    assert labels_of(written[1])[0].shape == SHAPE


@pytest.mark.parametrize("method", ["components", "seeded"])
def test_instance_labels_of_a_volume_above_the_in_memory_limit_are_drawn_block_by_block(tmp_path, volume, model, monkeypatch,
                                                                                        method):
    zarr.create_array(store=str(tmp_path / "v.zarr"), data=volume, chunks=(3, 20, 22))
    monkeypatch.setattr(bigsegment, "VOLUME_LABEL_VOXELS", 1000)  # only the 'watershed' rule is held to it
    monkeypatch.setattr(bigsegment, "VOLUME_LABEL_BLOCK", 16)  # 1x3x3 blocks
    segmenter = VolumeSegmenter(load_checkpoint(model), InferenceOptions(device="cpu", tile_size=28, tta=False))
    expected = segmenter.segment(volume)
    if method == "seeded":  # the halo (64 voxels) covers the volume: exact
        fg = expected.probabilities[1]
        segmenter.rule = DecisionRule("seeded", threshold=float(np.median(fg)), seed_threshold=float(np.quantile(fg, 0.9)))
    labels = segmenter.labels(expected.probabilities)
    assert labels.max() > 2
    written = bigsegment.segment_large_volumes([tmp_path / "v.zarr"], segmenter, tmp_path / "out")
    np.testing.assert_array_equal(labels_of(written[1])[0], labels)
    assert sorted(p.name for p in written[1].iterdir() if p.name.startswith("scratch")) == []


def _ome_volume(path, volume, scale, unit="micrometer"):
    """A minimal OME-Zarr (NGFF 0.4 metadata) holding `volume` at level 0 with voxel size `scale`."""
    group = zarr.open_group(str(path), mode="w")
    group.create_array("0", data=volume, chunks=(3, 20, 22))
    axes = [{"name": n, "type": "space", "unit": unit} for n in "zyx"]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(scale)}]}]}]


def test_an_ome_zarr_volume_records_its_voxel_size(tmp_path, volume):
    from unetkit.segment_volume import zarr_spacing

    _ome_volume(tmp_path / "v.ome.zarr", volume, (2.0, 0.5, 0.5))
    assert zarr_spacing(tmp_path / "v.ome.zarr") == (2.0, 0.5, 0.5)
    _ome_volume(tmp_path / "mixed.ome.zarr", volume, (2.0, 0.5, 0.5))
    group = zarr.open_group(str(tmp_path / "mixed.ome.zarr"), mode="r+")
    multiscales = group.attrs["multiscales"]
    multiscales[0]["axes"][0]["unit"] = "nanometer"
    group.attrs["multiscales"] = multiscales
    assert zarr_spacing(tmp_path / "mixed.ome.zarr") is None  # units that differ are not compared
    zarr.create_array(store=str(tmp_path / "plain.zarr"), data=volume)
    assert zarr_spacing(tmp_path / "plain.zarr") is None


def test_an_ome_zarr_volume_at_another_spacing_than_the_models_is_refused(tmp_path, volume, model, capsys):
    loaded = load_checkpoint(model)
    spaced = tmp_path / "spaced.pt"
    save_checkpoint(spaced, loaded.model, normalization=Normalization(), class_names=["background", "cell"],
                    train_config={"dims": 3, "spacing": [2.0, 0.5, 0.5]}, decision=loaded.decision)
    _ome_volume(tmp_path / "far.ome.zarr", volume, (1.0, 1.0, 1.0))
    _ome_volume(tmp_path / "near.ome.zarr", volume, (4.0, 1.0, 1.0))
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "far.ome.zarr"), "--model", str(spaced), "--out", str(out),
                 "--out-format", "zarr", *CPU]) == 2
    err = capsys.readouterr().err
    assert "far.ome.zarr: voxel spacing 1,1,1 (z/xy 1, from the OME-Zarr metadata) but the model was trained at" in err
    assert not (out / "far_probabilities.zarr").exists()
    assert main(["predict", str(tmp_path / "near.ome.zarr"), "--model", str(spaced), "--out", str(out),
                 "--out-format", "zarr", *CPU]) == 0
