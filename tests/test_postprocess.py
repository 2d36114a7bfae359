import numpy as np
import pytest
import tifffile

from unetkit.errors import InputError
from unetkit.metrics import seg_score
from unetkit.labels import label_components, relabel_consecutive, remove_small_objects
from unetkit.postprocess import (
    fill_label_holes,
    probabilities_to_instances,
    threshold_mask,
    watershed_split,
    write_ctc_masks,
)


def two_touching_discs(radius=8, gap=14):
    yy, xx = np.mgrid[: 2 * radius + 4, : 2 * radius + gap + 4]
    centre_y, left = radius + 2, radius + 2
    a = (yy - centre_y) ** 2 + (xx - left) ** 2 < radius**2
    b = (yy - centre_y) ** 2 + (xx - left - gap) ** 2 < radius**2
    return a, b


def test_threshold_is_strict_and_components_are_4_connected():
    prob = np.array([[0.9, 0.0, 0.5], [0.0, 0.8, 0.51]])
    assert threshold_mask(prob, 0.5).tolist() == [[True, False, False], [False, True, True]]
    # (0,0) and (1,1) touch diagonally only: two objects
    assert label_components(threshold_mask(prob)).tolist() == [[1, 0, 0], [0, 2, 2]]


def test_components_then_size_filter_and_consecutive_ids():
    prob = np.zeros((5, 9))
    prob[1:4, 1:4] = 0.9  # 9 pixels
    prob[1, 6] = 0.8  # 1 pixel
    prob[3, 6:8] = 0.7  # 2 pixels
    labels = probabilities_to_instances(prob, min_size=2)
    assert labels.dtype == np.int32
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2]
    assert np.count_nonzero(labels == 1) == 9 and np.count_nonzero(labels == 2) == 2
    assert labels[1, 6] == 0


def test_watershed_splits_touching_cells_that_components_merge():
    a, b = two_touching_discs()
    prob = (a | b) * 0.9
    assert probabilities_to_instances(prob).max() == 1
    labels = probabilities_to_instances(prob, method="watershed")
    assert labels.max() == 2
    # each disc is recovered almost whole: SEG against the true split is high
    truth = a.astype(np.int32) + 2 * (b & ~a)
    assert seg_score(labels, truth) > 0.9


def test_watershed_keeps_an_elongated_cell_whole_and_thin_objects():
    yy, xx = np.mgrid[:30, :60]
    ellipse = ((yy - 15) / 8.0) ** 2 + ((xx - 30) / 25.0) ** 2 < 1
    assert watershed_split(ellipse).max() == 1
    line = np.zeros((5, 20), bool)
    line[2, 2:18] = True  # too thin for any seed: kept as its own object
    assert watershed_split(line).tolist() == label_components(line).tolist()


def test_fill_label_holes_fills_single_object_holes_only():
    labels = np.zeros((7, 12), np.int32)
    labels[1:6, 1:6] = 1
    labels[3, 3] = 0  # hole inside object 1
    labels[1:6, 7:9] = 2
    labels[1:6, 10:12] = 3
    labels[1, 9] = labels[5, 9] = 2  # pixels (2..4, 9) are enclosed by objects 2 and 3 together
    filled = fill_label_holes(labels)
    assert filled[3, 3] == 1
    assert filled[2:5, 9].tolist() == [0, 0, 0]
    # a hole touching the outside diagonally is no hole for 4-connected cells
    ring = np.ones((4, 4), np.int32)
    ring[1, 1] = 0
    ring[0, 0] = 0
    assert fill_label_holes(ring)[1, 1] == 0


def test_fill_holes_option():
    prob = np.zeros((7, 7))
    prob[1:6, 1:6] = 0.9
    prob[3, 3] = 0.1
    assert probabilities_to_instances(prob)[3, 3] == 1
    assert probabilities_to_instances(prob, fill_holes=False)[3, 3] == 0


def test_small_pieces():
    labels = np.array([[0, 5, 5, 9, 0, 7]])
    assert relabel_consecutive(labels).tolist() == [[0, 1, 1, 3, 0, 2]]
    assert remove_small_objects(labels, 2).tolist() == [[0, 5, 5, 0, 0, 0]]
    assert remove_small_objects(labels, 0).tolist() == labels.tolist()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: probabilities_to_instances(np.full((3, 3), 1.2)), "outside"),
        (lambda: probabilities_to_instances(np.zeros((2, 2, 3, 3))), r"\(H, W\) or a volume \(Z, Y, X\)"),
        (lambda: probabilities_to_instances(np.zeros((3, 3)), method="blobs"), "method"),
        (lambda: probabilities_to_instances(np.zeros((3, 3)), threshold=2), "threshold"),
        (lambda: probabilities_to_instances(np.zeros((3, 3)), min_size=-1), "min_size"),
        (lambda: watershed_split(np.ones((3, 3), bool), h=0), "h="),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(InputError, match=message):
        call()


def test_write_ctc_masks(tmp_path):
    frames = [np.array([[0, 1], [2, 2]]), np.array([[3, 0], [0, 0]], np.int32)]
    paths = write_ctc_masks(frames, tmp_path / "01_RES")
    assert [p.name for p in paths] == ["mask000.tif", "mask001.tif"]
    for path, frame in zip(paths, frames):
        written = tifffile.imread(path)
        assert written.dtype == np.uint16
        assert written.tolist() == frame.tolist()
    with pytest.raises(InputError, match="not empty"):
        write_ctc_masks(frames, tmp_path / "01_RES")
    assert len(write_ctc_masks(np.stack(frames), tmp_path / "01_RES", force=True)) == 2


def test_write_ctc_masks_rejects_bad_labels(tmp_path):
    with pytest.raises(InputError, match="16-bit"):
        write_ctc_masks([np.array([[70000]])], tmp_path / "a")
    with pytest.raises(InputError, match="negative"):
        write_ctc_masks([np.array([[-1]])], tmp_path / "b")
    assert not (tmp_path / "a").exists()


def test_fill_label_holes_with_many_holes_between_two_objects():
    labels = np.ones((64, 64), np.uint16)
    labels[:, 32:] = 2
    labels[2::4, 2::4] = 0  # one-pixel holes, each inside one object (columns 2..30 and 34..62)
    labels[10:13, 30:35] = 0  # a hole that touches both objects stays empty
    filled = fill_label_holes(labels)
    expected = np.ones((64, 64), np.uint16)
    expected[:, 32:] = 2
    expected[10:13, 30:35] = 0
    np.testing.assert_array_equal(filled, expected)
    assert filled.dtype == np.uint16
