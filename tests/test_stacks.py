"""Stacks segmented plane by plane with a 2D model: numbering, stitching, equality with single images."""

from __future__ import annotations

import numpy as np
import pytest

from unetkit.checkpoint import LoadedModel
from unetkit.data.normalize import Normalization
from unetkit.decision import DecisionRule
from unetkit.errors import InputError
from unetkit.inference import InferenceOptions, Segmenter
from unetkit.network import UNet
from unetkit.stacks import check_stack, segment_stack, stitch_planes, unique_across_planes


def _segmenter(**options) -> Segmenter:
    import torch

    torch.manual_seed(0)
    model = UNet(depth=2, base_channels=4, batch_norm=True)
    rule = DecisionRule(method="components", threshold=0.5).to_dict()
    return Segmenter(LoadedModel(model, Normalization(), ["background", "cell"], decision=rule),
                     InferenceOptions(device="cpu", tile_size=44, **options))


def test_ids_continue_from_plane_to_plane():
    planes = np.array([[[0, 7, 7], [3, 0, 0]], [[0, 0, 0], [0, 0, 0]], [[5, 5, 0], [0, 0, 9]]], np.uint16)
    assert unique_across_planes(planes).tolist() == [[[0, 2, 2], [1, 0, 0]], [[0, 0, 0], [0, 0, 0]], [[3, 3, 0], [0, 0, 4]]]


def test_stitching_links_by_largest_overlap_and_never_gives_one_id_twice():
    planes = np.zeros((2, 4, 8), np.uint16)
    planes[0, :, 0:4] = 1  # one object of 16 pixels
    planes[1, :, 0:3] = 4  # overlaps it with IoU 12/16
    planes[1, :, 3:5] = 6  # overlaps it with IoU 4/20: the id is taken by the larger overlap
    out = stitch_planes(planes, 0.1)
    assert out[1, 0, :5].tolist() == [1, 1, 1, 2, 2]
    assert out[0, 0, :4].tolist() == [1, 1, 1, 1]


def test_stitching_threshold_keeps_weak_overlaps_apart():
    planes = np.zeros((2, 4, 8), np.uint16)
    planes[0, :, 0:4] = 1
    planes[1, :, 3:8] = 1  # IoU 4/32 = 0.125
    assert stitch_planes(planes, 0.125)[1, 0, 7] == 1
    assert stitch_planes(planes, 0.2)[1, 0, 7] == 2


def test_stitching_follows_an_object_through_many_planes():
    planes = np.zeros((5, 10, 10), np.uint16)
    for z in range(5):
        planes[z, 2:6, z:z + 4] = z + 10  # drifts one pixel per plane: IoU 12/20 each step
    out = stitch_planes(planes)
    assert np.unique(out[out > 0]).tolist() == [1]


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.5])
def test_stitching_refuses_an_overlap_outside_zero_to_one(threshold):
    with pytest.raises(InputError, match=r"--stitch must be an overlap"):
        stitch_planes(np.zeros((2, 3, 3), np.uint16), threshold)


def test_each_plane_gets_what_it_gets_as_its_own_image():
    segmenter = _segmenter(norm_statistics="image")
    stack = np.random.default_rng(1).random((3, 37, 41)).astype(np.float32)
    result = segment_stack(segmenter, stack, name="zstack.tif")
    assert result.probabilities.shape == (3, 2, 37, 41) and result.labels.shape == (3, 37, 41)
    for z in range(3):
        alone = segmenter.segment(stack[z])
        np.testing.assert_array_equal(result.probabilities[z], alone.probabilities)
        # the same partition of the plane, numbered on from the planes before
        assert len(np.unique(result.labels[z])) == len(np.unique(alone.labels))
        pairs = np.unique(np.stack([result.labels[z].ravel(), alone.labels.ravel()]), axis=1)
        assert pairs.shape[1] == len(np.unique(alone.labels))
    ids = [set(np.unique(plane[plane > 0]).tolist()) for plane in result.labels]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2])


def test_binary_labels_are_not_renumbered():
    result = segment_stack(_segmenter(labels="binary"), np.random.default_rng(2).random((2, 30, 30)), stitch=0.5)
    assert result.labels.dtype == np.uint8 and set(np.unique(result.labels)) <= {0, 1} and not result.stitched


@pytest.mark.parametrize("shape", [(30, 40), (2, 3, 30, 40), (2, 30, 40, 3)])
def test_a_one_channel_model_refuses_what_is_not_a_stack_of_planes(shape):
    with pytest.raises(InputError, match=r"cells.tif: a stack for this 1-channel model must have shape \(planes, H, W\)"):
        check_stack(np.zeros(shape), 1, "cells.tif")


def test_evaluate_scores_a_stack_plane_by_plane(tmp_path):
    import tifffile

    from unetkit.evaluate import evaluate_folders

    truth = np.zeros((3, 20, 20), np.uint16)
    truth[:, 2:8, 2:8] = 1
    truth[:, 10:18, 10:18] = 2
    prediction = truth.copy()
    prediction[2, 10:18, 10:18] = 0  # plane 2 misses one of its two objects
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    tifffile.imwrite(tmp_path / "pred" / "stack_labels.tif", prediction, photometric="minisblack")
    tifffile.imwrite(tmp_path / "gt" / "stack.tif", truth, photometric="minisblack")
    result = evaluate_folders(tmp_path / "pred", tmp_path / "gt", metrics="seg", use="labels")
    assert [row["name"] for row in result.rows] == ["stack:z000", "stack:z001", "stack:z002"]
    assert [row["scores"]["seg"] for row in result.rows] == [1.0, 1.0, 0.5]
    assert result.overall["seg"] == pytest.approx(5 / 6)  # SEG pools objects: 5 of 6 matched exactly


def test_evaluate_refuses_a_stack_of_another_depth(tmp_path):
    import tifffile

    from unetkit.evaluate import evaluate_folders

    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    truth = np.zeros((3, 20, 20), np.uint16)
    truth[:, 2:8, 2:8] = 1
    tifffile.imwrite(tmp_path / "pred" / "stack_labels.tif", truth[:2])
    tifffile.imwrite(tmp_path / "gt" / "stack.tif", truth, photometric="minisblack")
    with pytest.raises(InputError, match=r"stack_labels.tif: expected a stack of 3 planes like its ground truth, got shape \(2, 20, 20\)"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", metrics="seg", use="labels")


@pytest.fixture
def checkpoint(tmp_path):
    import torch

    from unetkit.checkpoint import save_checkpoint

    torch.manual_seed(0)
    rule = DecisionRule(method="components", threshold=0.5).to_dict()
    return save_checkpoint(tmp_path / "run" / "best.pt", UNet(depth=2, base_channels=4), normalization=Normalization(),
                           class_names=["background", "cell"], decision=rule)


def test_predict_writes_a_stack_for_a_stack_and_each_plane_as_its_own_file_would_get(checkpoint, tmp_path):
    import tifffile

    from unetkit.cli import main
    from unetkit.io import read_image

    stack = (np.random.default_rng(3).random((3, 40, 50)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "zstack.tif", stack, photometric="minisblack")
    tifffile.imwrite(tmp_path / "plane1.tif", stack[1])
    common = ["--model", str(checkpoint), "--tile-size", "44", "--device", "cpu", "--backend", "torch", "--no-progress"]
    assert main(["predict", str(tmp_path / "zstack.tif"), "--out", str(tmp_path / "out"), "--stitch", "0.25", *common]) == 0
    assert main(["predict", str(tmp_path / "plane1.tif"), "--out", str(tmp_path / "single"), *common]) == 0
    probabilities = read_image(tmp_path / "out" / "zstack_probabilities.tif", pages=True)
    labels = read_image(tmp_path / "out" / "zstack_labels.tif", pages=True)
    assert probabilities.shape == (3, 2, 40, 50) and labels.shape == (3, 40, 50)
    alone = read_image(tmp_path / "single" / "plane1_probabilities.tif", pages=True)
    np.testing.assert_array_equal(probabilities[1], alone)
    from unetkit.evaluate import evaluate_folders

    (tmp_path / "gt").mkdir()
    truth = np.zeros((3, 40, 50), np.uint16)
    truth[:, 5:20, 5:20] = 1
    tifffile.imwrite(tmp_path / "gt" / "zstack.tif", truth, photometric="minisblack")
    for use in ("probabilities", "labels"):
        scored = evaluate_folders(tmp_path / "out", tmp_path / "gt", metrics="iou", use=use)
        assert [row["name"] for row in scored.rows] == ["zstack:z000", "zstack:z001", "zstack:z002"]


def test_predict_refuses_stitch_outside_zero_to_one_before_creating_anything(checkpoint, tmp_path, capsys):
    from unetkit.cli import main

    assert main(["predict", str(tmp_path), "--model", str(checkpoint), "--out", str(tmp_path / "out"), "--stitch", "2"]) == 2
    assert "--stitch must be an overlap (intersection over union) in (0, 1] (got 2.0)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_predict_refuses_a_stack_with_ctc(checkpoint, tmp_path, capsys):
    import tifffile

    from unetkit.cli import main

    tifffile.imwrite(tmp_path / "t001.tif", np.zeros((4, 40, 50), np.uint8), photometric="minisblack")
    assert main(["predict", str(tmp_path / "t001.tif"), "--model", str(checkpoint), "--out", str(tmp_path / "out"),
                 "--ctc", "--device", "cpu"]) == 2
    assert "t001.tif: --ctc numbers one mask per frame file; a stack holds 4 planes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
