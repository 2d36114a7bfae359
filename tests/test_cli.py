import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from unetkit.cli import main
from unetkit.synthetic import synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i, (image, labels) in enumerate(synthetic_dataset(3, shape=(48, 56), seed=5)):
        tifffile.imwrite(root / "images" / f"cell{i}.tif", (image * 255).astype(np.uint8))
        tifffile.imwrite(root / "masks" / f"cell{i}.tif", labels)
    return root


TINY = ["--depth", "2", "--width", "2", "--tile-size", "34", "--no-progress", "--workers", "0"]


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    code = main(["train", "--data", str(dataset), "--out", str(out), "--iterations", "2", "--val", "cell2",
                 "--val-every", "2", "--checkpoint-every", "1", *TINY])
    assert code == 0
    return out


def test_train_writes_a_run(run):
    for name in ("config.json", "data.json", "log.csv", "last.pt", "best.pt", "curves.png"):
        assert (run / name).is_file(), name
    split = json.loads((run / "data.json").read_text())
    assert split["validation"] == ["cell2"] and "cell2" not in split["train"]


def test_resume_continues(run):
    assert main(["train", "--resume", str(run), "--iterations", "3", "--no-progress"]) == 0
    rows = (run / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3


def test_predict_writes_probabilities_and_labels(run, dataset, tmp_path):
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(run / "best.pt"), str(dataset / "images"), "--out", str(out), "--no-progress"]) == 0
    prob = tifffile.imread(out / "cell0_probabilities.tif")
    labels = tifffile.imread(out / "cell0_labels.tif")
    assert prob.shape == (2, 48, 56) and prob.dtype == np.float32
    np.testing.assert_allclose(prob.sum(0), 1.0, atol=1e-5)
    assert labels.shape == (48, 56) and labels.dtype == np.uint16
    # never overwrite without --force
    before = (out / "cell0_labels.tif").read_bytes()
    assert main(["predict", "--model", str(run / "best.pt"), str(dataset / "images"), "--out", str(out), "--no-progress"]) == 2
    assert (out / "cell0_labels.tif").read_bytes() == before
    assert main(["predict", "--model", str(run / "best.pt"), str(dataset / "images" / "cell1.tif"), "--out", str(out),
                 "--tta", "--tile-size", "38", "--force", "--no-progress", "--labels", "binary"]) == 0
    assert set(np.unique(tifffile.imread(out / "cell1_labels.tif"))) <= {0, 1}


def test_bad_input_is_one_line_and_exit_2(run, dataset, tmp_path, capsys):
    cases = [
        (["train", "--data", str(dataset), "--out", str(run), *TINY], "not empty"),
        (["train", "--data", str(dataset), "--out", str(tmp_path / "r1"), "--depth", "2", "--tile-size", "35", "--no-progress"], "34 or 36"),
        (["train", "--data", str(tmp_path), "--out", str(tmp_path / "r2"), *TINY], str(tmp_path)),
        (["predict", "--model", str(dataset / "images" / "cell0.tif"), str(dataset / "images"), "--out", str(tmp_path / "p")], "not a unetkit checkpoint"),
        (["predict", "--model", str(run / "best.pt"), str(dataset / "images"), "--out", str(tmp_path / "p"), "--tile-size", "35"], "34 or 36"),
        (["train", "--resume", str(tmp_path)], "not a run folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err, (argv, err)
        assert len(err.splitlines()) == 1, err


def test_missing_mask_and_size_mismatch(dataset, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    (broken / "masks" / "cell1.tif").unlink()
    assert main(["train", "--data", str(broken), "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "cell1" in capsys.readouterr().err
    tifffile.imwrite(broken / "masks" / "cell1.tif", np.zeros((10, 10), np.uint16))
    assert main(["train", "--data", str(broken), "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "cell1" in capsys.readouterr().err


def test_python_dash_m_help():
    result = subprocess.run([sys.executable, "-m", "unetkit", "--help"], capture_output=True, text=True, check=True)
    for command in ("demo", "train", "predict", "evaluate"):
        assert command in result.stdout


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seconds", "4", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["test_foreground_iou"] <= 1.0
    assert tifffile.imread(out / "test_probabilities.tif").shape == (2, 520, 600)
    assert (out / "test_overlay.png").stat().st_size > 1000
    assert "foreground IoU" in capsys.readouterr().out
    assert main(["demo", "--out", str(out), "--seconds", "1", "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_evaluate_scores_what_predict_writes(run, dataset, tmp_path, capsys):
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(run / "best.pt"), str(dataset / "images"), "--out", str(out), "--no-progress"]) == 0
    for use in ("probabilities", "labels"):
        report = tmp_path / f"{use}.json"
        code = main(["evaluate", "--pred", str(out), "--gt", str(dataset / "masks"), "--use", use,
                     "--metrics", "pixel,iou,seg", "--json", str(report)])
        assert code == 0, capsys.readouterr().err
        scores = json.loads(report.read_text())
        text = json.dumps(scores)
        assert "cell0" in text and "cell2" in text
