"""zarr / OME-Zarr stacks (z or t, y, x) with a 2D model: plane by plane through the out-of-core path,
equal to `unetkit.stacks.segment_stack` in memory (ids unique across planes, or stitched)."""

import json

import numpy as np
import pytest
import torch

zarr = pytest.importorskip("zarr")
pytest.importorskip("ome_zarr")

from unetkit import InputError, UNet  # noqa: E402
from unetkit.bigimage import open_lazy  # noqa: E402
from unetkit.bigsegment import segment_large  # noqa: E402
from unetkit.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from unetkit.cli import main  # noqa: E402
from unetkit.data.normalize import Normalization  # noqa: E402
from unetkit.decision import DecisionRule  # noqa: E402
from unetkit.inference import InferenceOptions, Segmenter  # noqa: E402
from unetkit.stacks import segment_stack  # noqa: E402

PLANES, HEIGHT, WIDTH = 3, 70, 90
TILE = ["--tile-size", "60", "--device", "cpu", "--no-progress"]
RULE = DecisionRule(method="components", threshold=0.5, min_size=3)


def tiny_net(in_channels: int = 1) -> UNet:
    torch.manual_seed(4)
    return UNet(in_channels=in_channels, depth=2, base_channels=4)


@pytest.fixture(scope="module")
def stack():
    y, x = np.mgrid[:HEIGHT, :WIDTH]
    rng = np.random.default_rng(1)
    planes = []
    for z in range(PLANES):  # blobs drifting from plane to plane, each plane with its own contrast
        pattern = 128 + 60 * np.sin((y + 2 * z) / 6.0) * np.cos((x - z) / 9.0) + rng.normal(0, 10, (HEIGHT, WIDTH))
        planes.append(np.clip(pattern * (1 + 0.3 * z) - 40 * z, 0, 255))
    return np.stack(planes).astype(np.uint8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(root / "one.pt", tiny_net(), normalization=Normalization(), class_names=["background", "cell"],
                    decision=RULE.to_dict())
    save_checkpoint(root / "two.pt", tiny_net(2), normalization=Normalization(), class_names=["background", "cell"],
                    decision=RULE.to_dict())
    seeded = DecisionRule(method="seeded", threshold=0.45, seed_threshold=0.6, min_size=2)
    save_checkpoint(root / "seeded.pt", tiny_net(), normalization=Normalization(), class_names=["background", "cell"],
                    decision=seeded.to_dict())
    return root


def in_memory(model, stack, stitch=None):
    segmenter = Segmenter(load_checkpoint(model), InferenceOptions(device="cpu", tile_size=60))
    return segment_stack(segmenter, stack, stitch=stitch)


def write_ome(path, array, axes):
    from ome_zarr.writer import write_image

    write_image(array, zarr.open_group(str(path), mode="w"), axes=axes, scale_factors=[])
    return path


def read_labels(path):
    group = zarr.open_group(str(path), mode="r")
    return group["0"][:], group.attrs["ome"]["multiscales"][0]["axes"]


@pytest.mark.parametrize("stitch", [None, 0.25])
def test_a_plain_zarr_stack_equals_the_stack_in_memory(tmp_path, stack, models, capsys, stitch):
    zarr.create_array(store=str(tmp_path / "s.zarr"), data=stack, chunks=(1, 32, 32))
    extra = [] if stitch is None else ["--stitch", str(stitch)]
    assert main(["predict", str(tmp_path / "s.zarr"), "--model", str(models / "one.pt"), "--out", str(tmp_path / "out"),
                 *extra, *TILE]) == 0
    assert "s.zarr: 3 planes along z (no axes metadata: read as (z, y, x)), segmented plane by plane" in capsys.readouterr().out
    expected = in_memory(models / "one.pt", stack, stitch)
    probs = zarr.open_array(str(tmp_path / "out" / "s_probabilities.zarr"), mode="r")
    assert probs.shape == (PLANES, 2, HEIGHT, WIDTH)
    np.testing.assert_allclose(probs[:], expected.probabilities, atol=1e-5)
    labels, axes = read_labels(tmp_path / "out" / "s_labels.ome.zarr")
    assert labels.shape == (PLANES, HEIGHT, WIDTH) and [a["name"] for a in axes] == ["z", "y", "x"]
    np.testing.assert_array_equal(labels, expected.labels)
    assert len(np.unique(expected.labels[0])) > 4  # objects in every plane, linked or not
    if stitch is None:
        assert set(np.unique(labels[0])[1:]).isdisjoint(np.unique(labels[1]))
    else:
        assert set(np.unique(labels[0])[1:]) & set(np.unique(labels[1])[1:])


def test_an_ome_zarr_time_series_with_a_seeded_rule_is_stitched_as_in_memory(tmp_path, stack, models):
    source = write_ome(tmp_path / "movie.ome.zarr", stack[:, None], "tcyx")
    written = segment_large([source], Segmenter(load_checkpoint(models / "seeded.pt"), InferenceOptions(device="cpu", tile_size=60),
                                                source=models / "seeded.pt"), tmp_path / "out", stitch=0.3)
    assert [p.name for p in written] == ["movie_probabilities.zarr", "movie_labels.ome.zarr"]
    expected = in_memory(models / "seeded.pt", stack, 0.3)
    labels, axes = read_labels(tmp_path / "out" / "movie_labels.ome.zarr")
    assert [a["name"] for a in axes] == ["t", "y", "x"]
    np.testing.assert_array_equal(labels, expected.labels)


def test_a_4d_zcyx_zarr_with_the_models_channels(tmp_path, stack, models):
    data = np.stack([stack, 255 - stack], axis=1)
    zarr.create_array(store=str(tmp_path / "c.zarr"), data=data, chunks=(1, 2, 40, 40))
    assert main(["predict", str(tmp_path / "c.zarr"), "--model", str(models / "two.pt"), "--out", str(tmp_path / "out"),
                 *TILE]) == 0
    expected = in_memory(models / "two.pt", data)
    np.testing.assert_allclose(zarr.open_array(str(tmp_path / "out" / "c_probabilities.zarr"))[:], expected.probabilities, atol=1e-5)
    np.testing.assert_array_equal(read_labels(tmp_path / "out" / "c_labels.ome.zarr")[0], expected.labels)


def test_a_3d_zarr_without_axes_is_channels_when_the_model_takes_that_many(tmp_path, stack, models, capsys):
    zarr.create_array(store=str(tmp_path / "rgb.zarr"), data=stack[:2], chunks=(2, 40, 40))
    assert main(["predict", str(tmp_path / "rgb.zarr"), "--model", str(models / "two.pt"), "--out", str(tmp_path / "out"),
                 *TILE]) == 0
    assert "rgb.zarr: read as one image of 2 channels (no axes metadata; the model takes 2)" in capsys.readouterr().out
    assert zarr.open_array(str(tmp_path / "out" / "rgb_probabilities.zarr")).shape == (2, HEIGHT, WIDTH)
    assert open_lazy(tmp_path / "rgb.zarr", in_channels=1).stack_axis == "z"
    assert open_lazy(tmp_path / "rgb.zarr", in_channels=2).stack_axis is None
    out = tmp_path / "stitched"
    assert main(["predict", str(tmp_path / "rgb.zarr"), "--model", str(models / "two.pt"), "--out", str(out),
                 "--stitch", "0.25", *TILE]) == 2
    assert "rgb.zarr: one plane, not a stack; --stitch links the planes" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_unreadable_stacks_are_refused_in_one_line_naming_the_file(tmp_path, stack, models, capsys):
    data = np.stack([stack, stack, stack], axis=1)
    zarr.create_array(store=str(tmp_path / "three.zarr"), data=data, chunks=(1, 3, 40, 40))
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "three.zarr"), "--model", str(models / "one.pt"), "--out", str(out), *TILE]) == 2
    err = capsys.readouterr().err.strip()
    assert "three.zarr: a 4D array (3, 3, 70, 90) without axis names is read as (z, c, y, x), but its 3 channel(s) do " \
           "not match the model's 1" in err and len(err.splitlines()) == 1
    write_ome(tmp_path / "tz.ome.zarr", np.stack([stack, stack]), "tzyx")
    with pytest.raises(InputError, match=r"tz.ome.zarr: axes 't' and 'z' both have several entries"):
        open_lazy(tmp_path / "tz.ome.zarr", in_channels=1)
    write_ome(tmp_path / "zc.ome.zarr", data.transpose(1, 0, 2, 3), "czyx")
    with pytest.raises(InputError, match=r"zc.ome.zarr: has 3 channel\(s\), the model was trained on 2"):
        segment_large([tmp_path / "zc.ome.zarr"], Segmenter(load_checkpoint(models / "two.pt"), InferenceOptions(device="cpu")),
                      out)
    assert not any(out.glob("*.zarr"))


def test_a_killed_stack_continues_with_its_finished_planes_and_tiles(tmp_path, stack, models, monkeypatch, capsys):
    from unetkit import bigimage, bigsegment

    zarr.create_array(store=str(tmp_path / "k.zarr"), data=stack, chunks=(1, 32, 32))
    command = ["predict", str(tmp_path / "k.zarr"), "--model", str(models / "one.pt"), "--out", str(tmp_path / "out"),
               "--stitch", "0.25", *TILE]
    calls = []
    add = bigimage.Progress.add

    def dies_in_plane_one(self, indices):
        calls.append(self.path.name)
        if self.path.name == "unetkit-progress-plane1.json" and calls.count(self.path.name) == 3:
            raise KeyboardInterrupt
        add(self, indices)

    monkeypatch.setattr(bigimage.Progress, "add", dies_in_plane_one)
    assert main(command) == 130
    monkeypatch.setattr(bigimage.Progress, "add", add)
    partial = tmp_path / "out" / "k_probabilities.zarr.partial"
    assert json.loads((partial / "unetkit-progress.json").read_text())["done"] == [0]
    assert json.loads((partial / "unetkit-progress-plane1.json").read_text())["done"] == [0, 1]
    link = bigsegment._link_plane

    def dies_at_plane_two(previous, current, *args):
        if previous is not None and previous.index == 1:
            raise KeyboardInterrupt
        return link(previous, current, *args)

    resumed = []

    def records(self, indices):
        resumed.extend((self.path.name, i) for i in indices)
        add(self, indices)

    monkeypatch.setattr(bigimage.Progress, "add", records)
    monkeypatch.setattr(bigsegment, "_link_plane", dies_at_plane_two)
    assert main(command) == 130
    plane1 = [i for name, i in resumed if name == "unetkit-progress-plane1.json"]
    assert plane1 and 0 not in plane1 and 1 not in plane1  # finished tiles were kept, not predicted again
    assert not any(name == "unetkit-progress-plane0.json" for name, _ in resumed)  # nor the finished plane
    assert "continuing a previous run (1 of 3 planes were done)" in capsys.readouterr().out
    monkeypatch.setattr(bigsegment, "_link_plane", link)
    assert main(command) == 0
    assert "continuing a previous run (2 of 3 planes were labelled)" in capsys.readouterr().out
    expected = in_memory(models / "one.pt", stack, 0.25)
    np.testing.assert_allclose(zarr.open_array(str(tmp_path / "out" / "k_probabilities.zarr"))[:], expected.probabilities,
                               atol=1e-5)
    np.testing.assert_array_equal(read_labels(tmp_path / "out" / "k_labels.ome.zarr")[0], expected.labels)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["k_labels.ome.zarr", "k_probabilities.zarr"]
    assert main(command) == 0 and "skipping" in capsys.readouterr().out


def test_a_stack_as_tiff_outputs_and_binary_labels(tmp_path, stack, models):
    import tifffile

    zarr.create_array(store=str(tmp_path / "b.zarr"), data=stack, chunks=(1, 32, 32))
    assert main(["predict", str(tmp_path / "b.zarr"), "--model", str(models / "one.pt"), "--out", str(tmp_path / "out"),
                 "--out-format", "tiff", "--labels", "binary", *TILE]) == 0
    expected = Segmenter(load_checkpoint(models / "one.pt"), InferenceOptions(device="cpu", tile_size=60, labels="binary"))
    expected = segment_stack(expected, stack)
    np.testing.assert_allclose(tifffile.imread(tmp_path / "out" / "b_probabilities.tif"), expected.probabilities, atol=1e-5)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "b_labels.tif"), expected.labels)


def test_a_stack_on_a_dask_cluster_equals_the_stack_in_memory(tmp_path, stack, models):
    pytest.importorskip("distributed")
    zarr.create_array(store=str(tmp_path / "d.zarr"), data=stack[:2], chunks=(1, 64, 64))
    assert main(["predict", str(tmp_path / "d.zarr"), "--model", str(models / "one.pt"), "--out", str(tmp_path / "out"),
                 "--dask", "local:1", "--block-size", "96", *TILE]) == 0
    expected = in_memory(models / "one.pt", stack[:2])
    np.testing.assert_allclose(zarr.open_array(str(tmp_path / "out" / "d_probabilities.zarr"))[:], expected.probabilities,
                               atol=1e-5)
    np.testing.assert_array_equal(read_labels(tmp_path / "out" / "d_labels.ome.zarr")[0], expected.labels)


def stitched_by_blocks(planes, threshold, block):
    """`stitch_planes` as `segment_large` draws it: two planes at a time, block by block."""
    from unetkit.bigimage import Plane
    from unetkit.bigsegment import _link_plane

    out = np.zeros(planes.shape, np.int64)
    chain, offset = np.zeros(1, np.int64), 0
    for z, plane in enumerate(planes):
        out[z] = plane
        count = int(plane.max())
        previous = Plane(out, z - 1) if z else None
        chain = np.concatenate([chain, _link_plane(previous, Plane(out, z), count, chain, offset, threshold, block)])
        offset += count
    return out


@pytest.mark.parametrize("threshold", [0.1, 0.25, 0.6])
def test_stitching_two_planes_at_a_time_by_blocks_equals_stitch_planes(threshold):
    from scipy import ndimage as ndi

    from unetkit.stacks import stitch_planes

    rng = np.random.default_rng(3)
    planes = []
    for z in range(5):
        mask = ndi.binary_opening(rng.random((23, 31)) > 0.45)
        labels, n = ndi.label(mask)
        order = np.concatenate([[0], rng.permutation(n) + 1])  # ids not in raster order, as the seeded rule gives
        planes.append(order[labels])
    planes[3] = planes[2].copy()
    planes = np.stack(planes)
    np.testing.assert_array_equal(stitched_by_blocks(planes, threshold, 7), stitch_planes(planes, threshold))


def test_equal_overlaps_are_linked_as_in_memory():
    from unetkit.stacks import stitch_planes

    planes = np.zeros((2, 4, 9), np.int64)
    planes[0, 1:3, 1:3], planes[0, 1:3, 5:7] = 2, 1  # plane ids against raster order
    planes[1, 1:3, 1:7] = 1  # overlaps both equally; the in-memory rule takes the smaller id of plane 0: 1
    expected = stitch_planes(planes, 0.2)
    assert expected[1, 1, 1] == expected[0, 1, 5]
    np.testing.assert_array_equal(stitched_by_blocks(planes, 0.2, 3), expected)
