import os
import signal
import time

import numpy as np
import pytest
import torch

da = pytest.importorskip("dask.array")
pytest.importorskip("distributed")

from unetkit import InputError, UNet, predict  # noqa: E402
from unetkit.checkpoint import save_checkpoint  # noqa: E402
from unetkit.data.normalize import Normalization  # noqa: E402
from unetkit.distributed import connect, plan_blocks, predict_dask  # noqa: E402
from unetkit.tiling import plan_tiles  # noqa: E402

SHAPE = (203, 157)  # a multiple of neither the pooling step, the tile, the block nor the chunk


def tiny_net(padding: str = "valid") -> UNet:
    torch.manual_seed(3)
    return UNet(depth=2, base_channels=4, padding=padding)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, tiny_net(), normalization=Normalization(mode="none"), class_names=["bg", "fg"])
    return path


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(7).random(SHAPE).astype(np.float32)


def test_blocks_start_on_the_pooling_grid_and_cover_the_image_once():
    net = tiny_net()
    plan = plan_tiles(SHAPE, net.geometry, 60)
    blocks = [b for row in plan_blocks(plan, 50) for b in row]
    covered = np.zeros(SHAPE, int)
    for b in blocks:
        assert b.out_y % net.geometry.step == 0 and b.out_x % net.geometry.step == 0
        covered[b.out_y : b.out_y + b.out_h, b.out_x : b.out_x + b.out_w] += 1
        # the halo is the geometry's border, folded into the image at its edges
        assert b.box[0] == max(0, b.out_y - net.geometry.border) or b.out_y == 0
    assert (covered == 1).all()
    assert sorted(i for b in blocks for i in b.tiles) == list(range(len(plan)))


def test_two_worker_processes_equal_single_process_predict(client, checkpoint, image):
    net = tiny_net()
    expected = predict(net, image, tile_size=60)
    source = da.from_array(image, chunks=(70, 90))
    probs = predict_dask(checkpoint, source, tile_size=60, block_size=50)
    assert probs.shape == (2, *SHAPE) and len(probs.chunks[1]) > 2 and len(probs.chunks[2]) > 2
    result = probs.compute()
    assert np.abs(result - expected).max() < 1e-5
    # the network was loaded on the workers from the path, once per worker process
    loaded = client.run(lambda: sorted(k[0] for k in __import__("unetkit.distributed").distributed._models))
    assert sum(len(v) for v in loaded.values()) <= 2 and all(v in ([], [str(checkpoint)]) for v in loaded.values())


@pytest.mark.parametrize("padding,tile", [("same", 64), ("valid", (44, 76))])
def test_in_process_scheduler_matches_for_both_paddings_and_a_model_object(image, padding, tile):
    net = tiny_net(padding)
    expected = predict(net, image, tile_size=tile)
    probs = predict_dask(net, da.from_array(image, chunks=100), tile_size=tile, block_size=40, dtype=np.float16)
    assert probs.dtype == np.float16
    np.testing.assert_allclose(probs.compute(scheduler="synchronous").astype(np.float32), expected, atol=1e-3)


def test_the_graph_never_calls_the_network(image):
    class Exploding(UNet):
        def forward(self, x):
            raise AssertionError("network called while building the graph")

    torch.manual_seed(0)
    probs = predict_dask(Exploding(depth=2, base_channels=4), da.from_array(image), tile_size=60, block_size=50)
    sliced = probs[:, :0, :5] + 1  # what Dask does with meta to infer types
    assert sliced.shape == (2, 0, 5) and probs.dtype == np.float32


def test_tiny_chunks_warn_and_are_rechunked(image):
    with pytest.warns(UserWarning, match="tiny.*rechunking"):
        probs = predict_dask(tiny_net(), da.from_array(image, chunks=16), tile_size=60, block_size=50)
    np.testing.assert_allclose(probs.compute(scheduler="synchronous"), predict(tiny_net(), image, tile_size=60), atol=1e-5)


def test_bad_inputs(image, checkpoint):
    with pytest.raises(InputError, match="3 channel"):
        predict_dask(checkpoint, da.zeros((3, 50, 50)))
    with pytest.raises(TypeError, match="dask array"):
        predict_dask(checkpoint, image)
    with pytest.raises(InputError, match=r"tcp://127\.0\.0\.1:9\b.*fix the address"):
        connect("tcp://127.0.0.1:9", timeout="1s")
    with pytest.raises(InputError, match="local:N"):
        connect("local:zero")


def test_a_worker_killed_mid_run_is_replaced_and_the_result_is_complete(client, checkpoint, image):
    expected = predict(tiny_net(), image, tile_size=44)
    probs = predict_dask(checkpoint, da.from_array(image), tile_size=44, block_size=20)
    future = client.compute(probs)
    deadline = time.time() + 30
    while not any(client.processing().values()) and time.time() < deadline:
        time.sleep(0.05)
    victim = next(w for w, tasks in client.processing().items() if tasks)
    pid = client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)
    result = future.result(timeout=120)
    assert np.abs(result - expected).max() < 1e-5


def bn_net() -> UNet:
    torch.manual_seed(4)
    model = UNet(depth=2, base_channels=4, batch_norm=True)
    from unetkit.adapt import batch_norm_layers

    with torch.no_grad():  # trained statistics far from the image's
        for layer in batch_norm_layers(model):
            layer.running_mean.fill_(0.2)
            layer.running_var.fill_(3.0)
    return model.eval()


@pytest.fixture(scope="module")
def bn_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "bn.pt"
    save_checkpoint(path, bn_net(), normalization=Normalization(mode="none"), class_names=["bg", "fg"])
    return path


def test_workers_and_the_large_image_path_use_the_image_statistics_given(client, bn_checkpoint, image, tmp_path):
    zarr = pytest.importorskip("zarr")
    from unetkit.adapt import gather_statistics
    from unetkit.bigimage import open_lazy, predict_to_zarr

    net = bn_net()
    expected = predict(net, image, tile_size=60, norm_statistics="image")
    assert np.abs(expected - predict(net, image, tile_size=60)).max() > 1e-3  # really other statistics
    stats = gather_statistics(net, da.from_array(image, chunks=(70, 90)), 60)  # once, over the whole image
    probs = predict_dask(bn_checkpoint, da.from_array(image, chunks=(70, 90)), tile_size=60, block_size=50,
                         norm_statistics=stats)
    assert len(probs.chunks[1]) > 2 and np.abs(probs.compute() - expected).max() <= 1e-5
    stored = zarr.create_array(store=str(tmp_path / "image.zarr"), shape=SHAPE, dtype="float32", chunks=(64, 64))
    stored[:] = image
    lazy = open_lazy(tmp_path / "image.zarr")
    assert gather_statistics(net, lazy, 60) == stats
    for name, options in {"single.zarr": {}, "blocks.zarr": {"client": client, "block_size": 50}}.items():
        out = predict_to_zarr(bn_checkpoint, net, lazy, tmp_path / name, tile_shape=(60, 60), norm_statistics=stats,
                              **options)
        assert np.abs(zarr.open_array(str(out))[:] - expected).max() <= 1e-5, name


def test_a_worker_measures_the_backend_once_over_many_small_blocks(image, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from collections import OrderedDict

    from unetkit import backends

    monkeypatch.setenv("UNETKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(backends, "MIN_MEASURED_SECONDS", 0.0)
    monkeypatch.setattr(backends, "_KEPT", OrderedDict())
    made, measured = [], []
    original_init, original_remember = backends.AutoRunner.__init__, backends.remember_choice
    monkeypatch.setattr(backends.AutoRunner, "__init__", lambda self, *a, **k: made.append(1) or original_init(self, *a, **k))
    monkeypatch.setattr(backends, "remember_choice", lambda *a, **k: measured.append(a[1]) or original_remember(*a, **k))
    net = bn_net()
    plan = plan_tiles(SHAPE, net.geometry, 44)
    blocks = [b for row in plan_blocks(plan, 40) for b in row]
    assert len(blocks) > 6 and all(len(b.tiles) <= 2 for b in blocks)  # each too short to measure alone
    probs = predict_dask(net, da.from_array(image), tile_size=44, block_size=40, backend="auto")
    result = probs.compute(scheduler="synchronous")
    assert made == [1] and len(measured) == 1  # one runner, one measurement, for all blocks of this worker thread
    np.testing.assert_allclose(result, predict(net, image, tile_size=44, backend="torch"), atol=1e-4)
