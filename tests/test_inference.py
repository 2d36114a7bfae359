"""The one segmentation core: settings resolved once, the same maps and labels on every path."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from unetkit.checkpoint import LoadedModel, save_checkpoint
from unetkit.data import Normalization
from unetkit.decision import DecisionRule
from unetkit.errors import InputError
from unetkit.inference import (
    InferenceOptions,
    InferenceSettings,
    MapSettings,
    Segmenter,
    labels_from_probabilities,
    labels_rule,
    memory_budget,
)
from unetkit.labels import id_dtype
from unetkit.network import UNet
from unetkit.predict import choose_tile_shape, predict


def tiny_loaded(decision=None, batch_norm=False, seed=0):
    torch.manual_seed(seed)
    net = UNet(depth=2, base_channels=4, batch_norm=batch_norm)
    net.reset_parameters()
    return LoadedModel(net, Normalization(), ["background", "cell"], decision=dict(decision or {}))


SEEDED = DecisionRule(method="seeded", threshold=0.3, seed_threshold=0.5, min_size=2, tta=True, image_statistics=True)


@pytest.mark.parametrize("options, words", [
    (InferenceOptions(threshold=-0.1), "--threshold"),
    (InferenceOptions(min_size=2.5), "--min-size"),
    (InferenceOptions(batch_size=0), "--batch-size"),
    (InferenceOptions(backend="tensorrt"), "--backend"),
    (InferenceOptions(norm_statistics="batch"), "--norm-statistics"),
    (InferenceOptions(labels="semantic"), "--labels"),
    (InferenceOptions(tile_size=0), "--tile-size"),
    (InferenceOptions(device="gpu7"), "gpu7"),
])
def test_options_are_refused_before_anything_is_loaded(options, words):
    with pytest.raises(InputError, match=words):
        options.check()


def test_settings_follow_the_stored_rule_and_maps():
    settings = InferenceSettings.resolve(tiny_loaded(SEEDED.to_dict()), InferenceOptions(device="cpu"))
    assert settings.maps == MapSettings(tta=True, norm_statistics="image")
    assert settings.rule == SEEDED
    assert settings.origin == {"maps": "checkpoint", "rule": "checkpoint"}
    assert settings.describe().startswith("labels (checkpoint): seeded watershed (mask > 0.3, cores > 0.5), objects >= 2 px; "
                                          "maps (checkpoint): 8-fold TTA, each image's batch-norm statistics;")


def test_an_option_replaces_its_part_of_the_rule_and_the_maps_stay_as_the_rule_was_chosen():
    settings = InferenceSettings.resolve(tiny_loaded(SEEDED.to_dict()), InferenceOptions(threshold=0.6, device="cpu"))
    assert settings.rule == replace(SEEDED, threshold=0.6, score=None)
    assert settings.maps == MapSettings(tta=True, norm_statistics="image")
    assert settings.origin["rule"] == "options"
    plain = InferenceSettings.resolve(tiny_loaded(SEEDED.to_dict()), InferenceOptions(tta=False, norm_statistics="training"))
    assert plain.maps == MapSettings(tta=False, norm_statistics="training") and plain.origin["maps"] == "options"


@pytest.mark.parametrize("options, changed", [
    (dict(min_size=40), dict(min_size=40)),
    (dict(min_size=0), dict(min_size=0)),
    (dict(watershed=True), dict(method="watershed")),
    (dict(watershed=False, threshold=0.45), dict(method="components", threshold=0.45)),
])
def test_a_minimum_size_or_method_keeps_the_rest_of_the_stored_rule(options, changed):
    rule = InferenceSettings.resolve(tiny_loaded(SEEDED.to_dict()), InferenceOptions(device="cpu", **options)).rule
    assert rule == replace(SEEDED, score=None, **changed)


def test_a_larger_minimum_size_still_splits_touching_objects_as_the_stored_rule_does():
    prob = np.zeros((40, 60), np.float32)
    prob[10:30, 8:30] = 0.95
    prob[10:30, 30:52] = 0.95
    prob[10:30, 29:31] = 0.6  # the neck between two touching objects: inside the mask, outside the cores
    prob[2:5, 2:5] = 0.95  # debris
    stored = DecisionRule("seeded", threshold=0.5, seed_threshold=0.9).to_dict()
    assert int(labels_rule(stored).apply(prob).max()) == 3
    assert int(labels_rule(stored, min_size=20).apply(prob).max()) == 2


def test_without_a_stored_rule_labels_are_components_at_one_half_without_tta():
    settings = InferenceSettings.resolve(tiny_loaded(), InferenceOptions(device="cpu"))
    assert settings.rule == DecisionRule() and settings.maps == MapSettings()
    assert settings.origin == {"maps": "defaults", "rule": "defaults"}


def test_an_illegal_tile_is_refused_with_the_nearest_legal_ones():
    with pytest.raises(InputError, match="--tile-size 45 is not legal.*44 or 46"):
        InferenceSettings.resolve(tiny_loaded(), InferenceOptions(tile_size=45))


def test_segmenter_gives_what_predict_and_the_rule_give():
    loaded = tiny_loaded(SEEDED.to_dict(), batch_norm=True)
    raw = (np.random.default_rng(1).random((61, 83)) * 255).astype(np.uint8)
    result = Segmenter(loaded, InferenceOptions(tile_size=44, device="cpu", backend="torch")).segment(raw)
    image = loaded.normalization(raw)
    expected = predict(loaded.model, image, tile_size=44, tta=True, norm_statistics="image", backend="torch")
    np.testing.assert_array_equal(result.probabilities, expected)
    np.testing.assert_array_equal(result.labels, SEEDED.apply(expected[1]).astype(np.uint16))
    assert result.labels.dtype == np.uint16 and result.tta and result.rule == SEEDED


def test_the_tile_depends_on_the_image_size_only():
    loaded = tiny_loaded()
    settings = InferenceSettings.resolve(loaded, InferenceOptions(device="cpu"))
    assert settings.tile_shape(loaded.model, (1, 300, 500)) == choose_tile_shape(loaded.model, (300, 500))
    huge = (1, 20000, 20000)
    assert settings.tile_shape(loaded.model, huge) == choose_tile_shape(loaded.model, huge[1:], memory_budget=memory_budget(20000 * 20000))
    fixed = InferenceSettings.resolve(loaded, InferenceOptions(tile_size=60))
    assert fixed.tile_shape(loaded.model, huge) == (60, 60)


def test_label_ids_never_wrap():
    assert id_dtype(65535) == np.uint16 and id_dtype(65536) == np.uint32
    probabilities = np.zeros((2, 3, 2 * 65600), np.float32)
    probabilities[1, 1, ::2] = 1.0  # 65600 single-pixel objects
    labels = labels_from_probabilities(probabilities, DecisionRule())
    assert labels.dtype == np.uint32 and int(labels.max()) == 65600


def test_binary_labels_use_the_rule_threshold():
    probabilities = np.zeros((2, 2, 3), np.float32)
    probabilities[1] = [[0.2, 0.4, 0.6], [0.8, 0.35, 0.0]]
    labels = labels_from_probabilities(probabilities, DecisionRule(threshold=0.3), binary=True)
    assert labels.dtype == np.uint8 and labels.tolist() == [[0, 1, 1], [1, 1, 0]]


def test_out_of_memory_names_the_option_to_lower(monkeypatch):
    import sys

    def fail(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                           "allocate 68719476736 bytes")

    monkeypatch.setattr(sys.modules["unetkit.predict"], "predict", fail)
    segmenter = Segmenter(tiny_loaded(), InferenceOptions(tile_size=44, device="cpu"))
    with pytest.raises(InputError, match="out of memory predicting tiles of 44x44 pixels.*lower --tile-size"):
        segmenter.segment(np.zeros((50, 50), np.float32))


def test_predict_cli_prints_the_settings_once_and_refuses_options_the_path_cannot_honour(tmp_path, capsys):
    from unetkit.cli import main
    from unetkit.io import write_tiff

    loaded = tiny_loaded(SEEDED.to_dict(), batch_norm=True)
    checkpoint = save_checkpoint(tmp_path / "best.pt", loaded.model, normalization=loaded.normalization,
                                 class_names=loaded.class_names, decision=SEEDED.to_dict())
    write_tiff(tmp_path / "in" / "cells.tif", (np.random.default_rng(0).random((40, 52)) * 255).astype(np.uint8))
    common = ["predict", str(tmp_path / "in"), "--model", str(checkpoint), "--no-progress", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("labels (checkpoint): seeded watershed (mask > 0.3, cores > 0.5), objects >= 2 px; "
                         "maps (checkpoint): 8-fold TTA, each image's batch-norm statistics;") == 1
    for options, words in [(["--dtype", "float16"], "--dtype float16 applies"), (["--block-size", "512"], "--block-size"),
                           (["--out-format", "png"], "--out-format"), (["--rows", "0"], "--rows"),
                           (["--ctc", "--out-format", "zarr"], "--ctc")]:
        out = tmp_path / f"refused{len(options)}{options[0]}"
        assert main([*common, "--out", str(out), *options]) == 2
        error = capsys.readouterr().err
        assert words in error and error.count("\n") == 1, error
        assert not out.exists()


def test_predict_help_names_the_export_extra(capsys, monkeypatch):
    from unetkit.cli import main

    monkeypatch.setenv("COLUMNS", "400")
    main(["predict", "--help"])
    assert "unetkit[export]" in capsys.readouterr().out


def test_predict_ctc_refuses_two_names_for_one_frame(tmp_path, capsys):
    from unetkit.cli import main
    from unetkit.io import write_tiff

    loaded = tiny_loaded()
    checkpoint = save_checkpoint(tmp_path / "best.pt", loaded.model, normalization=loaded.normalization,
                                 class_names=loaded.class_names)
    for name in ("t41.tif", "t041.tif"):
        write_tiff(tmp_path / "in" / name, np.zeros((20, 24), np.uint8))
    assert main(["predict", str(tmp_path / "in"), "--model", str(checkpoint), "--out", str(tmp_path / "out"), "--ctc"]) == 2
    error = capsys.readouterr().err
    assert "t041.tif and " in error and "t41.tif are both frame 41" in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_the_smallest_legal_size_is_refused_for_prediction_with_the_smallest_that_tiles():
    net = UNet(depth=4, base_channels=2)  # legal sizes 92 + 8k; 92 gives 4 output pixels, fewer than the step 8
    loaded = LoadedModel(net, Normalization(), ["background", "cell"])
    with pytest.raises(InputError, match="--tile-size 92 is legal for the network but too small to tile an image.*use 100 or larger"):
        InferenceSettings.resolve(loaded, InferenceOptions(tile_size=92))
    segmenter = Segmenter(loaded, InferenceOptions(tile_size=100, device="cpu"))
    assert segmenter.segment(np.zeros((9, 11), np.float32)).labels.shape == (9, 11)


def _checkpoint(tmp_path):
    loaded = tiny_loaded()
    return save_checkpoint(tmp_path / "best.pt", loaded.model, normalization=loaded.normalization, class_names=loaded.class_names)


def test_skip_unreadable_skips_a_file_damaged_past_its_header_and_segments_the_rest(tmp_path, capsys):
    import tifffile

    from unetkit.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b", "c"):
        tifffile.imwrite(folder / f"{name}.tif", np.full((40, 48), 100, np.uint8))
    data = (folder / "b.tif").read_bytes()
    (folder / "b.tif").write_bytes(data[: len(data) - 1000])  # the header is whole, the pixels are cut short
    common = ["predict", str(folder), "--model", str(_checkpoint(tmp_path)), "--no-progress", "--tile-size", "44"]
    assert main([*common, "--out", str(tmp_path / "stop")]) == 2
    assert "b.tif" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "out"), "--skip-unreadable"]) == 0
    assert "skipping" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a_labels.tif", "a_probabilities.tif", "c_labels.tif", "c_probabilities.tif"]


def test_inputs_inside_the_out_folder_and_a_bad_dask_address_are_refused_before_anything(tmp_path, capsys):
    from unetkit.cli import main
    from unetkit.io import write_tiff

    image = write_tiff(tmp_path / "here" / "a.tif", np.zeros((30, 30), np.uint8))
    checkpoint = str(_checkpoint(tmp_path))
    assert main(["predict", str(image), "--model", checkpoint, "--out", str(tmp_path / "here")]) == 2
    assert "lies in the --out folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "here").iterdir()) == ["a.tif"]
    assert main(["predict", str(image), "--model", checkpoint, "--out", str(tmp_path / "new"), "--dask", "banana"]) == 2
    assert "banana" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_a_write_error_says_how_far_the_batch_got(tmp_path, capsys, monkeypatch):
    import errno

    import unetkit.segment
    from unetkit.cli import main
    from unetkit.io import write_tiff

    for name in ("a", "b"):
        write_tiff(tmp_path / "in" / f"{name}.tif", np.zeros((30, 30), np.uint8))
    real, calls = unetkit.segment.write_tiff, {"n": 0}

    def full_after_two(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise InputError(f"{path}: the disk is full (errno {errno.ENOSPC}); free some space")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(unetkit.segment, "write_tiff", full_after_two)
    argv = ["predict", str(tmp_path / "in"), "--model", str(_checkpoint(tmp_path)), "--out", str(tmp_path / "out"),
            "--no-progress", "--tile-size", "44"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "b_probabilities.tif: the disk is full" in error and "1 of 2 image(s) were segmented and written" in error
    assert error.count("\n") == 1
