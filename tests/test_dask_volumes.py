"""zarr volumes with a 3D model on a Dask cluster (`unetkit predict --dask` for 3D models): the
tiles of the 3D plan run on worker processes and write the same probabilities and labels as one
process; a run killed part-way continues with the tiles left."""

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")
pytest.importorskip("ome_zarr")
pytest.importorskip("distributed", reason="--dask needs the [scale] extra")

from unetkit import bigsegment  # noqa: E402
from unetkit.bigimage import PROGRESS_FILE, fit_normalization, open_volume  # noqa: E402
from unetkit.checkpoint import load_checkpoint  # noqa: E402
from unetkit.cli import main  # noqa: E402
from unetkit.data.normalize import Normalization  # noqa: E402
from unetkit.data.volumes import normalize_volume  # noqa: E402
from unetkit.distributed import predict_volume_tiles, volume_tile_groups  # noqa: E402
from unetkit.errors import InputError  # noqa: E402
from unetkit.inference import InferenceOptions  # noqa: E402
from unetkit.network import UNet  # noqa: E402
from unetkit.segment_volume import VolumeSegmenter  # noqa: E402
from unetkit.volume import plan_volume, predict_volume  # noqa: E402

SHAPE = (7, 44, 50)
TILE = (5, 28, 28)
CPU = ["--device", "cpu", "--no-progress", "--tile-size", "28", "--no-tta"]


@pytest.fixture(scope="module")
def volume(wavy_volume):
    return wavy_volume(SHAPE, periods=(2.0, 4.0, 5.0), seed=1)


@pytest.fixture(scope="module")
def model(tiny_3d_checkpoint, volume):
    return tiny_3d_checkpoint(volume)


def test_tile_groups_keep_plan_order_and_refuse_empty_groups():
    assert volume_tile_groups(range(5), 2) == [(0, 1), (2, 3), (4,)]
    assert volume_tile_groups([], 4) == []
    with pytest.raises(InputError, match="per_task"):
        volume_tile_groups([1], 0)


def test_worker_processes_write_the_tiles_one_process_writes(tmp_path, volume, model, client):
    zarr.create_array(store=str(tmp_path / "v.zarr"), data=volume, chunks=(3, 20, 22))
    lazy = open_volume(tmp_path / "v.zarr")
    normalized = lazy.normalized(*fit_normalization(Normalization(), lazy.as_rows()))
    net = load_checkpoint(model).model
    plan = plan_volume(SHAPE, net.geometry, TILE)
    assert len(plan) > 4  # several tasks, on both workers
    out = tmp_path / "p.zarr"
    zarr.create_array(store=str(out), shape=(2, *SHAPE), chunks=(2, *plan.stride), dtype="float32", fill_value=-1)
    groups = volume_tile_groups(range(len(plan)), 2)
    futures = [client.submit(predict_volume_tiles, str(model), normalized, str(out), g, tile_shape=TILE, pure=False)
               for g in groups]
    assert sorted(t for f in futures for t in f.result()) == list(range(len(plan)))
    expected = predict_volume(net, normalize_volume(volume), tile_shape=TILE, device="cpu")
    np.testing.assert_allclose(zarr.open_array(str(out), mode="r")[:], expected, atol=1e-5)


def test_predict_dask_on_a_zarr_volume_equals_the_volume_in_memory(tmp_path, volume, model, capsys):
    zarr.create_array(store=str(tmp_path / "v.zarr"), data=volume, chunks=(4, 22, 25))
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "v.zarr"), "--model", str(model), "--out", str(out), "--dask", "local:2",
                 *CPU]) == 0
    assert "predicted tile by tile into zarr" in capsys.readouterr().out
    segmenter = VolumeSegmenter(load_checkpoint(model), InferenceOptions(device="cpu", tile_size=28, tta=False))
    expected = segmenter.segment(volume)
    np.testing.assert_allclose(zarr.open_array(str(out / "v_probabilities.zarr"), mode="r")[:], expected.probabilities,
                               atol=1e-5)
    labels = zarr.open_group(str(out / "v_labels.ome.zarr"), mode="r")["0"][:]
    np.testing.assert_array_equal(labels, expected.labels)
    assert expected.labels.max() > 1


def test_a_dask_run_stopped_part_way_continues_with_the_tiles_left(tmp_path, volume, model, client, monkeypatch):
    import unetkit.distributed as dist

    zarr.create_array(store=str(tmp_path / "v.zarr"), data=volume, chunks=(4, 22, 25))
    out = tmp_path / "out"
    segmenter = VolumeSegmenter.load(model, InferenceOptions(device="cpu", tile_size=28, tta=False))
    monkeypatch.setattr(dist, "connect", lambda address: client)
    monkeypatch.setattr(bigsegment, "_close", lambda c, dask: None)  # the fixture's client outlives each run
    asked: list[list[int]] = []
    real = dist.volume_tile_groups

    def first_two_groups(tiles, per_task=1):
        asked.append(list(tiles))
        return real(tiles, 1)[:2]  # as if the run were stopped after two tasks

    monkeypatch.setattr(dist, "volume_tile_groups", first_two_groups)
    with pytest.raises(RuntimeError, match="tiles were not written"):
        bigsegment.segment_large_volumes([tmp_path / "v.zarr"], segmenter, out, dask="local:2")
    partial = out / "v_probabilities.zarr.partial"
    assert (partial / PROGRESS_FILE).exists()
    monkeypatch.setattr(dist, "volume_tile_groups", lambda tiles, per_task=1: asked.append(list(tiles)) or real(tiles, 1))
    bigsegment.segment_large_volumes([tmp_path / "v.zarr"], segmenter, out, dask="local:2")
    n_tiles = len(asked[0])
    assert asked[1] == asked[0][2:] and n_tiles > 2  # the second run asked only for the tiles left
    expected = segmenter.segment(volume)
    np.testing.assert_allclose(zarr.open_array(str(out / "v_probabilities.zarr"), mode="r")[:], expected.probabilities,
                               atol=1e-5)
    assert not partial.exists()


def test_dask_needs_a_checkpoint_file(tmp_path, volume):
    zarr.create_array(store=str(tmp_path / "v.zarr"), data=volume)
    net = UNet(dims=3, depth=2, base_channels=4, pool_kernels=[(1, 2, 2)], conv_kernels=[(1, 3, 3), (3, 3, 3)])
    with pytest.raises(InputError, match="--dask needs the model as a checkpoint file"):
        bigsegment.segment_large_volumes([tmp_path / "v.zarr"], net, tmp_path / "out", dask="local:1")
    assert not (tmp_path / "out").exists()
