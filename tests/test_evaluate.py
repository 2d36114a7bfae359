import json

import numpy as np
import pytest
import tifffile

from unetkit.cli import main
from unetkit.errors import InputError
from unetkit.evaluate import evaluate_folders, pair_files, parse_metrics
from unetkit.io import write_png, write_tiff


def one_cell():
    gt = np.zeros((5, 8), np.uint8)
    gt[1:4, 1:7] = 255  # one 3x6 cell
    return gt


def split_probabilities():
    """(2, H, W) float32 map as `unetkit predict` writes: the cell cut by a membrane column."""
    fg = one_cell() / 255.0
    fg[1:4, 3] = 0.0
    return np.stack([1 - fg, fg]).astype(np.float32)


@pytest.fixture
def isbi_like(tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    write_png(tmp_path / "gt" / "img00.png", one_cell())
    write_tiff(tmp_path / "pred" / "img00.tif", split_probabilities())
    return tmp_path


def run(*args: str) -> int:
    return main(["evaluate", *map(str, args)])


def test_cli_scores_by_hand_and_writes_json(isbi_like, capsys):
    out = isbi_like / "scores.json"
    metrics = "pixel,rand,warping,seg,ap,dice"
    assert run("--pred", isbi_like / "pred", "--gt", isbi_like / "gt", "--metrics", metrics, "--json", out) == 0
    report = json.loads(out.read_text())
    scores = report["images"][0]["scores"]
    assert report["images"][0]["name"] == "img00"
    assert scores["pixel_error"] == pytest.approx(3 / 40)  # the 3 cut pixels
    assert scores["rand_error"] == pytest.approx(17 / 37)  # 1 - 240/444, see test_metrics_rand
    assert scores["warping_error"] == pytest.approx(1 / 40)  # one pixel of the cut holds the halves
    assert scores["warping_split"] == 1
    # halves of 6 and 9 pixels: neither covers > 9 = half the cell -> SEG 0;
    # the 9-pixel half has IoU 9/18 = 0.5 >= 0.5 -> AP@0.5 = 1 TP / (1 + 1 FP + 0 FN)
    assert scores["seg"] == 0.0
    assert scores["ap@0.5"] == 0.5
    assert scores["dice"] == pytest.approx(2 * 15 / (15 + 18))
    assert report["overall"] == {k: v for k, v in scores.items()}
    table = capsys.readouterr().out
    assert "img00" in table and "overall" in table and "rand_error" in table


def test_cli_refuses_to_overwrite_json(isbi_like, capsys):
    out = isbi_like / "scores.json"
    out.write_text("{}")
    assert run("--pred", isbi_like / "pred", "--gt", isbi_like / "gt", "--json", out) == 2
    assert "already exists" in capsys.readouterr().err
    assert run("--pred", isbi_like / "pred", "--gt", isbi_like / "gt", "--json", out, "--metrics", "pixel", "--force") == 0
    assert json.loads(out.read_text())["metrics"] == ["pixel"]


def test_ctc_pairing_by_trailing_number_and_pooled_overall(tmp_path):
    res, gt = tmp_path / "01_RES", tmp_path / "01_GT" / "SEG"
    res.mkdir()
    gt.mkdir(parents=True)
    truth = [np.array([[1, 1, 0, 2, 2]], np.uint16), np.array([[1, 1, 1, 1, 0]], np.uint16)]
    masks = [np.array([[1, 1, 0, 0, 0]], np.uint16), np.array([[3, 3, 3, 0, 0]], np.uint16)]
    for k in range(2):
        write_tiff(gt / f"man_seg00{k}.tif", truth[k])
        write_tiff(res / f"mask00{k}.tif", masks[k])
    write_tiff(res / "mask002.tif", masks[0])  # a frame without ground truth
    result = evaluate_folders(res, gt, metrics="seg")
    assert [r["name"] for r in result.rows] == ["man_seg000", "man_seg001"]
    assert [r["scores"]["seg"] for r in result.rows] == [0.5, 0.75]
    # overall pools the 3 objects: (1 + 0 + 0.75) / 3, not the mean of rows (0.625)
    assert result.overall["seg"] == pytest.approx(1.75 / 3)
    assert result.unpaired_predictions == ["mask002.tif"]


def test_pair_files_by_stem_across_extensions(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    for name in ("a", "b"):
        write_tiff(tmp_path / "p" / f"{name}.tif", np.zeros((2, 2), np.uint8))
        write_png(tmp_path / "g" / f"{name}.png", np.zeros((2, 2), np.uint8))
    pairs, extra = pair_files(tmp_path / "p", tmp_path / "g")
    assert [(p.name, g.name) for p, g in pairs] == [("a.tif", "a.png"), ("b.tif", "b.png")]
    assert extra == []


def test_empty_ground_truth_in_one_image_is_reported_not_fatal(isbi_like, capsys):
    write_png(isbi_like / "gt" / "img01.png", np.zeros((5, 8), np.uint8))
    write_tiff(isbi_like / "pred" / "img01.tif", split_probabilities())
    assert run("--pred", isbi_like / "pred", "--gt", isbi_like / "gt", "--metrics", "pixel,rand") == 0
    out = capsys.readouterr().out
    assert "n/a" in out and "note: img01.png: rand: the ground truth has no foreground" in out


def test_parse_metrics():
    assert parse_metrics("pixel, rand,pixel") == ("pixel", "rand")
    with pytest.raises(InputError, match="unknown metric 'bogus'"):
        parse_metrics("pixel,bogus")


def write_pair(tmp_path, pred, gt, pred_name="x.tif", gt_name="x.tif"):
    (tmp_path / "pred").mkdir(parents=True, exist_ok=True)
    (tmp_path / "gt").mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(tmp_path / "pred" / pred_name, pred)
    tifffile.imwrite(tmp_path / "gt" / gt_name, gt)
    return tmp_path / "pred", tmp_path / "gt"


@pytest.mark.parametrize(
    "pred, gt, metrics, message",
    [
        (np.zeros((5, 9), np.float32), one_cell(), "pixel", "has shape (5, 9) but its ground truth x.tif has (5, 8)"),
        (one_cell() / 100.0, one_cell(), "pixel", "outside [0, 1]"),
        (one_cell(), -one_cell().astype(np.int16), "pixel", "negative"),
        (one_cell(), one_cell() / 510.0, "pixel", "non-integer"),
        (one_cell() / 255.0, np.zeros((5, 8), np.uint8), "rand", "no foreground"),
        (one_cell() / 255.0, np.zeros((5, 8), np.uint8), "seg", "no objects"),
        (one_cell() / 255.0, one_cell(), "pixel,warp", "unknown metric 'warp'"),
        (np.zeros((2, 5, 8), np.float32), one_cell(), "pixel", "--channel 3 is out of range"),
    ],
)
def test_cli_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, pred, gt, metrics, message):
    pred_dir, gt_dir = write_pair(tmp_path, pred, gt)
    extra = ["--channel", "3"] if "channel" in message else []
    assert run("--pred", pred_dir, "--gt", gt_dir, "--metrics", metrics, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("unetkit: error:") and message in err
    assert len(err.strip().splitlines()) == 1


def test_cli_folders_without_matching_names_exit_2(tmp_path, capsys):
    pred_dir, gt_dir = write_pair(tmp_path, one_cell(), one_cell(), pred_name="cells.tif", gt_name="truth.tif")
    assert run("--pred", pred_dir, "--gt", gt_dir) == 2
    err = capsys.readouterr().err
    assert "no prediction" in err and "truth.tif" in err and "unmatched predictions: cells.tif" in err


def test_cli_empty_or_missing_folder_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    pred_dir, gt_dir = write_pair(tmp_path, one_cell(), one_cell())
    assert run("--pred", tmp_path / "empty", "--gt", gt_dir) == 2
    assert "no prediction images" in capsys.readouterr().err
    assert run("--pred", pred_dir, "--gt", tmp_path / "missing") == 2
    assert "not a folder" in capsys.readouterr().err


def test_predict_outputs_pair_with_ctc_ground_truth(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for frame in ("000", "007"):
        write_tiff(pred / f"t{frame}_probabilities.tif", split_probabilities())
        write_tiff(pred / f"t{frame}_labels.tif", (one_cell() > 0).astype(np.uint16))
        write_tiff(gt / f"man_seg{frame}.tif", (one_cell() > 0).astype(np.uint16))
    for use in ("probabilities", "labels"):
        pairs, extra = pair_files(pred, gt, use)
        assert [(p.name, g.name) for p, g in pairs] == [
            (f"t000_{use}.tif", "man_seg000.tif"), (f"t007_{use}.tif", "man_seg007.tif")
        ]
        assert extra == []
    assert evaluate_folders(pred, gt, metrics="iou", use="labels").overall["iou"] == 1.0


def test_img_pairs_with_mask_as_in_training(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for k in (1, 2):
        write_tiff(pred / f"img_{k:02d}_labels.tif", (one_cell() > 0).astype(np.uint16))
        write_tiff(pred / f"img_{k:02d}_probabilities.tif", split_probabilities())
        write_png(gt / f"mask_{k:02d}.png", one_cell())
    write_png(gt / "mask_1.png", one_cell())  # trailing number 1 twice: only the name rule pairs it
    write_tiff(pred / "img_1.tif", split_probabilities())
    pairs, _ = pair_files(pred, gt)
    assert sorted((p.name, g.name) for p, g in pairs) == [
        ("img_01_probabilities.tif", "mask_01.png"), ("img_02_probabilities.tif", "mask_02.png"), ("img_1.tif", "mask_1.png")
    ]


def test_ground_truth_that_is_an_intensity_image_is_refused(tmp_path, capsys):
    from scipy import ndimage as ndi

    truth = np.zeros((40, 40), np.uint8)
    truth[8:30, 6:26] = 255
    probability16 = (ndi.gaussian_filter(truth / 255.0, 3) * 65535).astype(np.uint16)
    raw = (np.random.default_rng(1).random((40, 40)) * 200 + 30).astype(np.uint8)
    for name, gt in (("prob16.tif", probability16), ("raw.tif", raw)):
        pred_dir, gt_dir = write_pair(tmp_path / name, (truth > 0).astype(np.uint8), gt, gt_name=name, pred_name=name)
        assert run("--pred", pred_dir, "--gt", gt_dir, "--metrics", "pixel") == 2
        err = capsys.readouterr().err
        assert "does not look like ground truth" in err and name in err and len(err.strip().splitlines()) == 1
        assert run("--pred", pred_dir, "--gt", gt_dir, "--metrics", "pixel", "--allow-intensity-masks") == 0


def test_json_that_is_a_folder_is_refused_before_scoring(isbi_like, capsys):
    folder = isbi_like / "report"
    folder.mkdir()
    assert run("--pred", isbi_like / "pred", "--gt", isbi_like / "gt", "--json", folder, "--force") == 2
    err = capsys.readouterr().err
    assert "is a folder; give a file name for --json" in err and len(err.strip().splitlines()) == 1


def test_pages_written_one_by_one_are_scored_whole_or_refused(tmp_path):
    from unetkit.evaluate import load_ground_truth, load_prediction

    background, foreground = split_probabilities()
    with tifffile.TiffWriter(tmp_path / "probs.tif") as writer:  # another tool's maps: one page per class
        writer.write(background)
        writer.write(foreground)
    np.testing.assert_array_equal(load_prediction(tmp_path / "probs.tif"), foreground)  # channel 1, not page 0
    with tifffile.TiffWriter(tmp_path / "gt.tif") as writer:
        writer.write(one_cell())
        writer.write(np.zeros((5, 8), np.uint8))
    with pytest.raises(InputError, match=r"gt\.tif: holds 2 pages"):
        load_ground_truth(tmp_path / "gt.tif")
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    tifffile.imwrite(tmp_path / "truth" / "a.tif", one_cell())
    with tifffile.TiffWriter(tmp_path / "pred" / "a.tif") as writer:
        writer.write(one_cell())
        writer.write(np.zeros((5, 8), np.uint8))
    with pytest.raises(InputError, match=r"a\.tif: image of shape \(2, 5, 8\) has several channels or pages"):
        evaluate_folders(tmp_path / "pred", tmp_path / "truth", metrics="dice")


def test_evaluate_scores_100k_objects(tmp_path):
    ids = np.arange(1, 100_001, dtype=np.uint32).reshape(250, 400)
    square = np.ones((2, 2), np.uint32)
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    write_tiff(tmp_path / "gt" / "a.tif", np.kron(ids, square))  # 100,000 objects of 2 x 2 pixels
    write_tiff(tmp_path / "pred" / "a.tif", np.kron(100_001 - ids, square))  # the same objects, numbered otherwise
    result = evaluate_folders(tmp_path / "pred", tmp_path / "gt", metrics="seg,ap")
    assert result.overall["seg"] == 1.0 and result.overall["ap@0.9"] == 1.0 and result.overall["pq@0.5"] == 1.0


def test_volumes_are_scored_as_volumes_with_six_connected_objects(tmp_path, capsys):
    gt = np.zeros((2, 8, 8), np.uint16)
    gt[:, 2:6, 2:6] = 1  # one object through both planes: 32 voxels
    pred = np.zeros_like(gt)
    pred[0, 2:6, 2:6] = 1
    pred[1, 2:4, 2:6] = 1  # 24 of its voxels: IoU 0.75 in 3D; plane 1 alone 8 of 16, not a match
    for folder, array in (("gt", gt), ("pred", pred)):
        (tmp_path / folder).mkdir()
        tifffile.imwrite(tmp_path / folder / "stack.tif", array, photometric="minisblack")
    volume = evaluate_folders(tmp_path / "pred", tmp_path / "gt", metrics="seg,ap,pixel", volumes=True)
    planes = evaluate_folders(tmp_path / "pred", tmp_path / "gt", metrics="seg,ap,pixel")
    assert [row["name"] for row in volume.rows] == ["stack"] and len(planes.rows) == 2
    assert volume.overall["seg"] == pytest.approx(0.75) and planes.overall["seg"] == pytest.approx(0.5)
    assert volume.overall["ap@0.5"] == 1.0
    assert volume.overall["pixel_error"] == planes.overall["pixel_error"] == pytest.approx(8 / 128)
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--volumes"]) == 2
    assert "warping error is defined on 2D images" in capsys.readouterr().err
