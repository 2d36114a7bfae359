"""Reduced-precision inference: bf16 and int8 agree with fp32, the int8 graph is built once, "auto"
chooses only precisions whose stored scores hold, and bad requests are one-line errors."""

import json

import numpy as np
import pytest
import torch

from unetkit import InputError, UNet, backends, precision, predict
from unetkit.inference import InferenceOptions, Segmenter

native_bf16 = pytest.mark.skipif(not precision.bf16_native("cpu"),
                                 reason="this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 is refused here")
needs_int8 = pytest.mark.skipif(not precision.int8_available(), reason="int8 needs onnxruntime, onnx and onnxscript")

#: Largest probability difference from fp32. bf16 keeps 8 bits of mantissa (relative rounding 2^-9
#: per value, sums in float32); through the tiny network's 10 convolutions the probabilities moved by
#: at most 0.031 (each image's statistics, no TTA) and 0.008 on average over these cases: twice that.
BF16_TOLERANCE = 0.06
#: int8 rounds each activation to 1/255 of its calibrated range and each weight to 1/127 of its
#: channel's. Measured here: mean difference at most 0.015, largest 0.12 (each image's statistics,
#: no TTA, calibrated on other random images): a bound on the mean, and a loose one on the largest
#: that a graph without its softmax or with another network's weights still exceeds.
INT8_MEAN_TOLERANCE = 0.03
INT8_MAX_TOLERANCE = 0.25


def assert_int8_close(got, reference):
    difference = np.abs(got - reference)
    assert 0 < difference.mean() < INT8_MEAN_TOLERANCE and difference.max() < INT8_MAX_TOLERANCE


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNETKIT_CACHE_DIR", str(tmp_path / "cache"))
    backends._SESSIONS.clear()
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return UNet(depth=2, base_channels=8, batch_norm=True).eval()


@pytest.fixture
def image(rng):
    return rng.random((70, 90)).astype(np.float32)


def stored(task="membranes", **scores):
    return {"task": task, "rule_scores": scores}


# -- bf16 -------------------------------------------------------------------------------------------


@native_bf16
@pytest.mark.parametrize("tta", [False, True])
def test_bf16_is_close_to_fp32(net, image, tta):
    reference = predict(net, image, tile_size=60, tta=tta, backend="torch")
    got = predict(net, image, tile_size=60, tta=tta, precision="bf16")
    assert got.dtype == np.float32 and got.shape == reference.shape
    difference = np.abs(got - reference).max()
    assert 0 < difference < BF16_TOLERANCE  # really bfloat16, and close
    np.testing.assert_allclose(got.sum(0), 1, atol=1e-5)  # the softmax itself stays float32


@native_bf16
def test_bf16_with_each_images_statistics(net, image):
    reference = predict(net, image, tile_size=60, norm_statistics="image", backend="torch")
    got = predict(net, image, tile_size=60, norm_statistics="image", precision="bf16")
    assert np.abs(got - reference).max() < BF16_TOLERANCE


# -- int8 -------------------------------------------------------------------------------------------


@needs_int8
def test_int8_graph_is_built_once_cached_and_close_to_fp32(net, image, rng, cache):
    import onnx

    calibration = [rng.random((80, 80)).astype(np.float32) for _ in range(2)]
    reference = predict(net, image, tile_size=60, backend="torch")
    got = predict(net, image, tile_size=60, precision="int8", calibration=calibration)
    path = backends.int8_graph_path(net)
    assert path.is_file() and path.parent == cache / "onnx" and backends.weights_hash(net)[:32] in path.name
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert_int8_close(got, reference)

    backends._SESSIONS.clear()
    before = path.stat().st_mtime_ns

    def no_calibration():
        raise AssertionError("the cached int8 graph should be reused")

    again = predict(net, image, tile_size=60, precision="int8", calibration=no_calibration)
    np.testing.assert_array_equal(again, got)
    assert path.stat().st_mtime_ns == before


@needs_int8
def test_int8_with_each_images_statistics_and_tta(net, image, rng):
    calibration = [rng.random((80, 80)).astype(np.float32)]
    reference = predict(net, image, tile_size=60, tta=True, norm_statistics="image", backend="torch")
    got = predict(net, image, tile_size=60, tta=True, norm_statistics="image", precision="int8", calibration=calibration)
    assert backends.int8_graph_path(net, fed=True).is_file()
    assert_int8_close(got, reference)


@needs_int8
def test_int8_without_calibration_is_refused(net, image):
    with pytest.raises(InputError, match="calibration images") as info:
        predict(net, image, tile_size=60, precision="int8")
    assert "\n" not in str(info.value)


def test_fp32_tiles_still_equal_one_whole_pass(net, image):
    whole = predict(net, image, tile_size=(108, 124), precision="fp32", backend="torch")
    tiled = predict(net, image, tile_size=60, precision="fp32", backend="torch")
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


# -- auto -------------------------------------------------------------------------------------------


@pytest.fixture
def everything_native(monkeypatch):
    """A machine with native bf16 and onnxruntime, whatever this one has."""
    monkeypatch.setattr(backends, "bf16_native", lambda device="cpu": True)
    monkeypatch.setattr(backends, "int8_available", lambda: True)


def test_auto_stays_fp32_without_stored_scores(everything_native):
    choice = precision.choose("auto", device="cpu", backend="auto", scores=None)
    assert choice.run == "fp32" and "no stored" in choice.describe()


@pytest.mark.parametrize("scores,allowed", [
    (stored(fp32=0.020, bf16=0.030, int8=0.024), ("fp32", "int8")),            # bf16 0.010 worse
    (stored(fp32=0.020, int8=0.0251), "fp32"),                                 # no bf16 score; int8 beyond
    (stored("objects", fp32=0.80, bf16=0.797, int8=0.79), ("fp32", "bf16")),   # higher is better here
    (stored("objects", fp32=0.80, bf16=0.81, int8=0.805), ("fp32", "bf16", "int8")),
])
def test_auto_never_takes_a_precision_without_a_score_or_beyond_the_tolerance(everything_native, scores, allowed):
    assert precision.choose("auto", device="cpu", backend="auto", scores=scores).run == allowed


def test_auto_leaves_out_what_the_backend_or_calibration_cannot_run(everything_native):
    scores = stored(fp32=0.02, bf16=0.02, int8=0.02)
    assert precision.choose("auto", device="cpu", backend="torch", scores=scores).run == ("fp32", "bf16")
    assert precision.choose("auto", device="cpu", backend="onnxruntime", scores=scores).run == ("fp32", "int8")
    assert precision.choose("auto", device="cpu", backend="auto", scores=scores, int8_ready=False).run == ("fp32", "bf16")


def test_the_fastest_is_measured_once_and_remembered(net, monkeypatch, cache):
    measured = []

    def fake_seconds(model, name, device, batch_shape, **_):
        measured.append(name)
        return {"fp32": 2.0, "bf16": 1.0, "int8": 1.5}[name]

    monkeypatch.setattr(backends, "measure_seconds", fake_seconds)
    device = torch.device("cpu")
    assert backends.fastest(net, ("fp32", "bf16", "int8"), device, (1, 44, 44)) == "bf16"
    assert sorted(measured) == ["bf16", "fp32", "int8"]
    assert backends.fastest(net, ("fp32", "bf16", "int8"), device, (1, 44, 44)) == "bf16"
    assert len(measured) == 3  # remembered, not measured again
    entry = next(v for v in backends.read_choices().values() if "precision" in v)
    assert entry["precision"] == "bf16" and entry["seconds_per_call"]["fp32"] == 2.0
    assert backends.fastest(net, ("fp32", "int8"), device, (1, 44, 44)) == "int8"  # another choice, measured


@pytest.fixture
def checkpoint(tmp_path, net):
    from unetkit.checkpoint import save_checkpoint
    from unetkit.data import Normalization

    return save_checkpoint(tmp_path / "run" / "best.pt", net, normalization=Normalization(), class_names=["background", "cell"])


def test_segmenter_runs_auto_with_stored_scores(checkpoint, image, monkeypatch, cache):
    monkeypatch.setattr(backends, "bf16_native", lambda device="cpu": True)
    monkeypatch.setattr(backends, "measure_seconds", lambda model, name, *a, **k: {"fp32": 1.0, "bf16": 2.0}[name])
    precision.record_run_scores(checkpoint, stored("objects", fp32=0.8, bf16=0.8))
    segmenter = Segmenter.load(checkpoint, InferenceOptions(precision="auto", backend="torch", tile_size=60, device="cpu"))
    assert segmenter.settings.precision.run == ("fp32", "bf16")
    assert "precision the fastest of fp32, bf16 (auto:" in segmenter.settings.describe()
    np.testing.assert_array_equal(segmenter.probabilities(image), predict(segmenter.model, image, tile_size=60, backend="torch"))
    assert segmenter.take_notes() == ["precision auto: fp32 on 60x60 tiles, the fastest of fp32, bf16 on this machine "
                                      "(fp32 1.000 s, bf16 2.000 s per call)"]
    segmenter.probabilities(image)
    assert segmenter.take_notes() == []  # said once


def test_the_files_path_says_what_auto_chose(checkpoint, monkeypatch, cache, tmp_path):
    import tifffile

    from unetkit.segment import segment_files

    monkeypatch.setattr(backends, "bf16_native", lambda device="cpu": True)
    monkeypatch.setattr(backends, "measure_seconds", lambda model, name, *a, **k: {"fp32": 2.0, "bf16": 1.0}[name])
    precision.record_run_scores(checkpoint, stored("objects", fp32=0.8, bf16=0.8))
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / f"{name}.tif", (np.random.default_rng(1).random((50, 50)) * 255).astype(np.uint8))
    notes = []
    segmenter = Segmenter.load(checkpoint, InferenceOptions(precision="auto", backend="torch", tile_size=60, device="cpu"))
    segment_files([tmp_path / "a.tif", tmp_path / "b.tif"], segmenter, tmp_path / "out", echo=notes.append)
    assert [n for n in notes if n.startswith("precision auto")] == [
        "precision auto: bf16 on 60x60 tiles, the fastest of fp32, bf16 on this machine (fp32 2.000 s, bf16 1.000 s per call)"]


# -- bad input ------------------------------------------------------------------------------------


def test_an_unknown_precision_is_refused():
    with pytest.raises(InputError, match=r"--precision must be auto, fp32, bf16 or int8 \(got 'fp16'\)"):
        InferenceOptions(precision="fp16").check()


def test_bf16_without_native_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(backends, "bf16_native", lambda device="cpu": False)
    with pytest.raises(InputError, match="needs native bf16.*use precision fp32 \\(auto would choose fp32\\)"):
        precision.choose("bf16", device="cpu", backend="auto", scores=stored(fp32=0.02, bf16=0.02))


def test_int8_without_onnxruntime_is_refused(monkeypatch):
    monkeypatch.setattr(backends, "int8_available", lambda: False)
    with pytest.raises(InputError, match="pip install 'unetkit\\[export\\]'.*auto would choose"):
        precision.choose("int8", device="cpu", backend="auto", scores=None)


def test_a_precision_the_scores_rule_out_is_refused(everything_native):
    with pytest.raises(InputError, match="bf16 scored 0.0100 worse than fp32.*auto would choose the fastest of fp32, int8"):
        precision.choose("bf16", device="cpu", backend="auto", scores=stored(fp32=0.02, bf16=0.03, int8=0.02))


@pytest.mark.parametrize("case", ["unknown", "no-bf16", "no-onnxruntime", "scores"])
def test_cli_exits_2_with_one_line_and_creates_nothing(case, checkpoint, tmp_path, monkeypatch, capsys):
    import tifffile

    from unetkit.cli import main

    source = tmp_path / "a.tif"
    tifffile.imwrite(source, (np.random.default_rng(0).random((50, 60)) * 255).astype(np.uint8))
    asked = {"unknown": "fp16", "no-bf16": "bf16", "no-onnxruntime": "int8", "scores": "bf16"}[case]
    if case == "no-bf16":
        monkeypatch.setattr(backends, "bf16_native", lambda device="cpu": False)
    if case == "no-onnxruntime":
        monkeypatch.setattr(backends, "int8_available", lambda: False)
    if case == "scores":
        monkeypatch.setattr(backends, "bf16_native", lambda device="cpu": True)
        precision.scores_path(checkpoint).write_text(json.dumps(stored(fp32=0.02, bf16=0.04)))
    out = tmp_path / "out"
    assert main(["predict", str(source), "--model", str(checkpoint), "--out", str(out), "--precision", asked,
                 "--device", "cpu", "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "precision" in error
    assert case == "unknown" or "auto would choose" in error
    assert not out.exists()



# -- the other paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("asked", [pytest.param("bf16", marks=native_bf16), pytest.param("int8", marks=needs_int8)])
def test_dask_blocks_give_what_predict_gives_in_each_precision(net, image, rng, asked):
    da = pytest.importorskip("dask.array")
    from unetkit.distributed import predict_dask

    calibration = [rng.random((80, 80)).astype(np.float32)]
    whole = predict(net, image, tile_size=60, precision=asked, calibration=calibration)
    blocks = predict_dask(net, da.from_array(image, chunks=40), tile_size=60, block_size=32, precision=asked,
                          calibration=calibration).compute(scheduler="synchronous")
    np.testing.assert_allclose(blocks, whole, atol=1e-6)


def test_large_images_run_in_the_asked_precision_like_the_in_memory_path(checkpoint, tmp_path, monkeypatch):
    import tifffile
    import zarr

    from unetkit.bigsegment import segment_large

    monkeypatch.setattr(backends, "bf16_native", lambda device="cpu": True)  # autocast runs (emulated) on any CPU
    raw = (np.random.default_rng(0).random((60, 70)) * 255).astype(np.uint8)
    source = tmp_path / "big.tif"
    tifffile.imwrite(source, raw)
    segmenter = Segmenter.load(checkpoint, InferenceOptions(precision="bf16", device="cpu", tile_size=44))
    segment_large([source], segmenter, tmp_path / "out", out_format="zarr")
    written = zarr.open_array(str(tmp_path / "out" / "big_probabilities.zarr"), mode="r")
    assert written.attrs["unetkit"]["precision"] == "bf16"
    in_memory = segmenter.probabilities(segmenter.normalize(raw))
    np.testing.assert_allclose(written[:], in_memory, atol=1e-4)
    fp32 = Segmenter.load(checkpoint, InferenceOptions(device="cpu", tile_size=44))
    assert np.abs(fp32.probabilities(fp32.normalize(raw)) - in_memory).max() > 1e-4  # bf16 did run


