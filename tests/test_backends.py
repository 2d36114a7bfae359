"""predict's backends: onnxruntime gives torch's probabilities; auto measures once, remembers, and
falls back to torch where onnxruntime is missing."""

import json
import time

import numpy as np
import pytest
import torch

from unetkit import InputError, UNet, backends, predict

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def cache(module_cache, monkeypatch):
    """One cache folder for the module (each network is exported once), without remembered choices."""
    monkeypatch.setenv("UNETKIT_CACHE_DIR", str(module_cache))
    (module_cache / backends.CHOICES_FILE).unlink(missing_ok=True)
    return module_cache


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return UNet(depth=3, base_channels=4)


@pytest.mark.parametrize(
    "shape,tile,batch,tta", [((97, 61), 64, 1, False), ((90, 130), (48, 100), 3, True), ((50, 50), 44, 2, True)]
)
def test_onnxruntime_equals_torch_tiled_and_with_tta(net, rng, shape, tile, batch, tta):
    image = rng.random(shape).astype(np.float32)
    reference = predict(net, image, tile_size=tile, batch_size=batch, tta=tta, backend="torch")
    got = predict(net, image, tile_size=tile, batch_size=batch, tta=tta, backend="onnxruntime")
    assert got.shape == reference.shape == (2, *shape)
    np.testing.assert_allclose(got, reference, atol=1e-4)
    assert np.abs(got - reference).max() > 0  # really another engine, not torch again


def test_onnxruntime_with_same_padding_batch_norm_and_colour(rng):
    torch.manual_seed(2)
    net = UNet(in_channels=3, n_classes=3, depth=2, base_channels=4, padding="same", batch_norm=True)
    image = rng.random((3, 70, 45)).astype(np.float32)
    np.testing.assert_allclose(predict(net, image, tile_size=40, tta=True, backend="onnxruntime"),
                               predict(net, image, tile_size=40, tta=True, backend="torch"), atol=1e-4)


def test_the_graph_is_exported_once_per_set_of_weights(net, rng, cache, monkeypatch):
    image = rng.random((40, 40)).astype(np.float32)
    predict(net, image, backend="onnxruntime")
    assert backends.graph_path(net).is_file() and backends.graph_path(net).parent == cache / "onnx"
    backends._SESSIONS.clear()

    def refuse(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr("unetkit.export.graphs.quick_onnx_bytes", refuse)
    predict(net, image, backend="onnxruntime")  # the cached graph, no new export
    changed = UNet(depth=3, base_channels=4)
    changed.load_state_dict(net.state_dict())
    with torch.no_grad():
        changed.head.bias.add_(1.0)
    assert backends.weights_hash(changed) != backends.weights_hash(net)
    with pytest.raises(AssertionError, match="exported again"):
        predict(changed, image, backend="onnxruntime")


def _slow(runner_class, monkeypatch, seconds=0.2):  # far above a tiny net's call, also on a busy machine
    original = runner_class.__call__

    def slow(self, x):
        time.sleep(seconds)
        return original(self, x)

    monkeypatch.setattr(runner_class, "__call__", slow)


@pytest.mark.parametrize("slower,expected", [(backends.TorchRunner, "onnxruntime"), (backends.OnnxRunner, "torch")])
def test_auto_measures_on_the_job_remembers_the_faster_and_reuses_it(net, rng, cache, monkeypatch, slower, expected):
    monkeypatch.setattr(backends, "MIN_MEASURED_SECONDS", 0.0)
    image = rng.random((100, 100)).astype(np.float32)
    reference = predict(net, image, tile_size=92, tta=True, backend="torch")
    _slow(slower, monkeypatch)
    got = predict(net, image, tile_size=92, tta=True, backend="auto")  # 2 x 2 tiles x 8 transforms
    np.testing.assert_allclose(got, reference, atol=1e-4)
    choices = json.loads((cache / backends.CHOICES_FILE).read_text())
    assert [c["backend"] for c in choices.values()] == [expected]
    assert set(next(iter(choices.values()))["seconds_per_call"]) == {"torch", "onnxruntime"}
    # The next job with the same model and tile uses the remembered choice without timing.
    calls = []
    monkeypatch.setattr(backends.AutoRunner, "_timed", lambda self, runner, x: calls.append(runner) or runner(x))
    runner = backends.make_runner(net, "auto", torch.device("cpu"), (1, 92, 92), calls=4)
    with runner as run:
        run(torch.rand(1, 1, 92, 92))
        assert run.choice == expected and not calls


def test_auto_runs_a_short_job_on_torch_without_exporting_and_counts_its_seconds(rng, cache, monkeypatch):
    monkeypatch.setattr(backends, "MIN_MEASURED_SECONDS", 1e9)  # "short", however busy the machine
    fresh = UNet(depth=3, base_channels=4)
    image = rng.random((100, 100)).astype(np.float32)
    predict(fresh, image, tile_size=92, tta=True, backend="auto")
    assert not backends.graph_path(fresh).exists()
    (entry,) = json.loads((cache / backends.CHOICES_FILE).read_text()).values()
    assert "backend" not in entry and 0 < entry["unmeasured_torch_seconds"] < backends.MIN_MEASURED_SECONDS
    predict(fresh, image, tile_size=92, tta=True, backend="auto")
    (again,) = json.loads((cache / backends.CHOICES_FILE).read_text()).values()
    assert again["unmeasured_torch_seconds"] > entry["unmeasured_torch_seconds"]  # the two jobs add up


def test_auto_measures_once_short_jobs_have_added_up(rng, cache, monkeypatch):
    fresh = UNet(depth=3, base_channels=4)
    image = rng.random((100, 100)).astype(np.float32)
    key = backends.choice_key(fresh, (1, 92, 92))
    backends.update_choice(key, {"unmeasured_torch_seconds": backends.MIN_MEASURED_SECONDS - 1e-3})
    _slow(backends.TorchRunner, monkeypatch)
    predict(fresh, image, tile_size=92, tta=True, backend="auto")  # this job tips the sum over
    entry = json.loads((cache / backends.CHOICES_FILE).read_text())[key]
    assert entry["backend"] == "onnxruntime" and "unmeasured_torch_seconds" not in entry
    assert backends.graph_path(fresh).is_file()


def test_the_quick_graph_equals_the_standard_export(net, rng):
    onnxruntime = pytest.importorskip("onnxruntime")
    from unetkit.export.graphs import INPUT_NAME, onnx_program, onnx_session, quick_onnx_bytes

    x = rng.random((2, 1, 60, 92)).astype(np.float32)  # not the size either graph was traced at
    quick = onnx_session(quick_onnx_bytes(net), threads=1).run(None, {INPUT_NAME: x})[0]
    standard = onnx_session(onnx_program(net)[0].SerializeToString(), threads=1).run(None, {INPUT_NAME: x})[0]
    assert isinstance(onnxruntime.__version__, str) and quick.shape == standard.shape == (2, 2, 20, 52)
    np.testing.assert_allclose(quick, standard, atol=1e-5)


def test_without_onnxruntime_auto_is_torch_and_onnxruntime_says_what_to_install(net, rng, monkeypatch, cache):
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: False)
    monkeypatch.setattr(backends, "MIN_MEASURED_SECONDS", 0.0)
    image = rng.random((100, 100)).astype(np.float32)
    np.testing.assert_array_equal(predict(net, image, tile_size=92, tta=True, backend="auto"),
                                  predict(net, image, tile_size=92, tta=True, backend="torch"))
    assert not (cache / backends.CHOICES_FILE).exists()  # nothing was measured
    with pytest.raises(InputError, match=r"pip install 'unetkit\[export\]'"):
        predict(net, image, backend="onnxruntime")


def test_unknown_backend_and_onnxruntime_on_a_gpu_are_refused(net):
    with pytest.raises(InputError, match="backend must be one of auto, torch, onnxruntime"):
        predict(net, np.zeros((20, 20), np.float32), backend="tensorrt")
    with pytest.raises(InputError, match="runs on the CPU"):
        backends.check_backend("onnxruntime", torch.device("cuda"))


def test_cache_dir_honours_unetkit_and_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("UNETKIT_CACHE_DIR", str(tmp_path / "a"))
    assert backends.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("UNETKIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert backends.cache_dir() == tmp_path / "xdg" / "unetkit"


def test_predict_command_checks_the_backend_first(tmp_path, capsys):
    from unetkit.cli import main

    assert main(["predict", "--model", str(tmp_path / "none.pt"), str(tmp_path), "--out", str(tmp_path / "p"),
                 "--backend", "tensorrt"]) == 2
    assert "--backend must be auto, torch or onnxruntime (got 'tensorrt')" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


@pytest.fixture(scope="module")
def bn_net():
    torch.manual_seed(5)
    model = UNet(depth=2, base_channels=4, batch_norm=True)
    from unetkit.adapt import batch_norm_layers

    with torch.no_grad():  # trained statistics far from any one image's
        for layer in batch_norm_layers(model):
            layer.running_mean.fill_(0.2)
            layer.running_var.fill_(3.0)
    return model.eval()


def test_onnxruntime_takes_image_statistics_and_a_statistics_value(bn_net, rng):
    from unetkit.adapt import gather_statistics

    image = rng.random((70, 83)).astype(np.float32)
    stats = gather_statistics(bn_net, rng.random((90, 60)).astype(np.float32), 44)  # another image's
    for statistics in ("image", stats):
        for tta in (False, True):
            reference = predict(bn_net, image, tile_size=44, tta=tta, norm_statistics=statistics, backend="torch")
            got = predict(bn_net, image, tile_size=44, tta=tta, norm_statistics=statistics, backend="onnxruntime")
            np.testing.assert_allclose(got, reference, atol=1e-4)
    training = predict(bn_net, image, tile_size=44, backend="onnxruntime")
    assert np.abs(training - predict(bn_net, image, tile_size=44, norm_statistics="image", backend="onnxruntime")).max() > 1e-3
    assert backends.graph_path(bn_net).is_file() and backends.fed_graph_path(bn_net).is_file()


def test_auto_measures_and_remembers_with_image_statistics_too(bn_net, rng, cache, monkeypatch):
    monkeypatch.setattr(backends, "MIN_MEASURED_SECONDS", 0.0)
    image = rng.random((100, 100)).astype(np.float32)
    reference = predict(bn_net, image, tile_size=92, tta=True, norm_statistics="image", backend="torch")
    _slow(backends.TorchRunner, monkeypatch)
    got = predict(bn_net, image, tile_size=92, tta=True, norm_statistics="image", backend="auto")
    np.testing.assert_allclose(got, reference, atol=1e-4)
    choices = json.loads((cache / backends.CHOICES_FILE).read_text())
    key = backends.choice_key(bn_net, (1, 92, 92), statistics=backends.BatchNormStatistics((), (), 92, 1, 1))
    assert choices[key]["backend"] == "onnxruntime" and key != backends.choice_key(bn_net, (1, 92, 92))


@pytest.mark.parametrize("damage", [lambda data: data[: len(data) // 2], lambda data: b"not a graph"])
@pytest.mark.parametrize("fed", [False, True])
def test_a_damaged_cached_graph_is_exported_again(bn_net, rng, damage, fed, capfd):
    from unetkit.export.graphs import onnx_session

    image = rng.random((50, 50)).astype(np.float32)
    statistics = "image" if fed else "training"
    expected = predict(bn_net, image, tile_size=44, norm_statistics=statistics, backend="onnxruntime")
    path = backends.fed_graph_path(bn_net) if fed else backends.graph_path(bn_net)
    path.write_bytes(damage(path.read_bytes()))
    backends._SESSIONS.clear()
    got = predict(bn_net, image, tile_size=44, norm_statistics=statistics, backend="onnxruntime")
    np.testing.assert_array_equal(got, expected)
    onnx_session(path)  # a readable graph again
    assert "Traceback" not in capfd.readouterr().err


def test_a_kept_runner_is_reused_for_the_next_part_of_a_job(net):
    cpu = torch.device("cpu")
    with backends.make_runner(net, "torch", cpu, (1, 44, 44), calls=10, keep=True) as first:
        pass
    with backends.make_runner(net, "torch", cpu, (1, 44, 44), calls=10, keep=True) as second:
        assert second is first
    with backends.make_runner(net, "torch", cpu, (1, 60, 60), calls=10, keep=True) as other:
        assert other is not first
    with backends.make_runner(net, "torch", cpu, (1, 44, 44), calls=10) as fresh:
        assert fresh is not first
