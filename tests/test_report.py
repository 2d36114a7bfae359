"""Run reports: RUN/report.html from training and `unetkit evaluate --html`, self-contained pages."""

import base64
import csv
import io
import re

import imageio.v3 as iio
import numpy as np
import pytest

from unetkit.cli import main
from unetkit.data import Normalization, make_sample
from unetkit.io import write_png, write_tiff
from unetkit.report import overlay_picture, table
from unetkit.synthetic import synthetic_dataset
from unetkit.train import TrainConfig, Trainer

NORM = Normalization()


def inline_images(text: str) -> list[np.ndarray]:
    """The PNG pictures embedded in a page, decoded."""
    return [iio.imread(io.BytesIO(base64.b64decode(data))) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', text)]


def assert_self_contained(text: str) -> None:
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    words = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert not re.search(r"https?:|ftp:|file:|//[a-z0-9]", words, re.IGNORECASE)  # no links, fonts or scripts from outside
    assert "<script" not in text and "<link" not in text
    sources = re.findall(r'src="([^"]*)"', text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)


def test_training_writes_a_report_at_each_validation(tmp_path, monkeypatch):
    samples = [make_sample(img, lab, f"s{i}", NORM) for i, (img, lab) in enumerate(synthetic_dataset(3, shape=(64, 64), seed=3))]
    config = TrainConfig(depth=2, base_channels=4, tile_size=34, iterations=4, val_every=2, checkpoint_every=2, lr=0.01,
                         seed=0, workers=0, choose_decision=False)
    run = tmp_path / "run"
    written = []
    import unetkit.report as report

    original = report.training_report

    def recording(trainer):
        text = original(trainer)
        written.append((trainer.iteration, text))
        return text

    monkeypatch.setattr(report, "training_report", recording)
    Trainer(config, samples[:2], samples[2:], run, normalization=NORM, progress=False).fit()
    assert [iteration for iteration, _ in written] == [2, 4]  # refreshed at each validation
    text = (run / "report.html").read_text()
    assert text == written[-1][1]
    assert_self_contained(text)
    for setting in ("<td>base_channels</td><td>4</td>", "<td>tile_size</td><td>34</td>", "<td>lr</td><td>0.01</td>",
                    "<td>augment.elastic_sigma</td><td>10.0</td>", "<td>iterations</td><td>4 of 4</td>"):
        assert setting in text, setting
    rows = list(csv.DictReader(open(run / "log.csv")))
    for r in rows[1::2]:  # the validation history, as logged
        assert f"<tr><td>{r['iteration']}</td><td>{float(r['val_iou']):.4f}</td>" in text
    assert "Validation at iteration 4" in text and "<td>s2</td>" in text
    pictures = inline_images(text)
    assert len(pictures) == 2  # the curves and the one validation image
    assert pictures[1].shape == (64, 64, 3)  # the overlay at the image's size
    assert not list(run.glob("*.tmp*")) and not list(run.glob(".*"))  # written through a temporary file, renamed


def test_overlay_colours_false_and_missed_foreground():
    image = np.zeros((1, 8, 8), np.float32)
    labels = np.zeros((8, 8), np.int32)
    labels[0:4, 0:4] = 1
    truth = np.zeros((8, 8), bool)
    truth[4:8, 4:8] = True
    picture, crop = overlay_picture(image, labels, truth)
    assert crop == ""
    assert picture[1, 1].tolist() == [128, 0, 128]  # false foreground: magenta over black
    assert picture[6, 6].tolist() == [0, 128, 128]  # missed foreground: cyan
    assert picture[3, 1].tolist() == picture[1, 3].tolist() == [255, 230, 0]  # the object's contour
    big, crop = overlay_picture(np.zeros((1, 600, 700), np.float32), np.zeros((600, 700), np.int32), None)
    assert big.shape == (512, 512, 3) and crop == " (central 512x512 of 600x700 pixels)"


def test_table_escapes_text():
    assert table(["a<b"], [["<script>"], [float("nan")]]) == (
        "<table><tr><th>a&lt;b</th></tr><tr><td>&lt;script&gt;</td></tr><tr><td>n/a</td></tr></table>")


@pytest.fixture
def scored(tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    for name in ("a", "b"):
        gt = np.zeros((20, 24), np.uint8)
        gt[4:12, 4:16] = 255
        write_png(tmp_path / "gt" / f"{name}.png", gt)
        fg = (gt / 255.0).astype(np.float32)
        fg[4:12, 14:16] = 0.2  # 16 missed pixels
        write_tiff(tmp_path / "pred" / f"{name}.tif", np.stack([1 - fg, fg]))
    return tmp_path


def test_evaluate_html_writes_scores_and_overlays(scored, capsys):
    page = scored / "scores.html"
    assert main(["evaluate", "--pred", str(scored / "pred"), "--gt", str(scored / "gt"), "--metrics", "pixel,dice",
                 "--html", str(page)]) == 0
    assert f"wrote {page}" in capsys.readouterr().out
    text = page.read_text()
    assert_self_contained(text)
    assert f"<tr><td>a</td><td>{16 / 480:.4f}</td><td>{2 * 80 / (80 + 96):.4f}</td></tr>" in text
    assert f"<tr><td>overall</td><td>{32 / 960:.4f}</td>" in text
    pictures = inline_images(text)
    assert len(pictures) == 2 and pictures[0].shape == (20, 24, 3)
    # background: the probability map (0.2 where the cell was missed, 1 inside, 0 outside)
    assert pictures[0][6, 15].tolist() == [26, 153, 153]  # missed: half cyan over gray 0.2
    assert pictures[0][6, 8].tolist() == [255, 255, 255] and pictures[0][0, 0].tolist() == [0, 0, 0]
    assert pictures[0][4, 4].tolist() == [255, 230, 0]  # the predicted object's contour


def test_evaluate_html_refuses_to_overwrite(scored, capsys):
    page = scored / "scores.html"
    page.write_text("mine")
    args = ["evaluate", "--pred", str(scored / "pred"), "--gt", str(scored / "gt"), "--metrics", "pixel", "--html", str(page)]
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err and page.read_text() == "mine"
    assert main([*args, "--force"]) == 0 and page.read_text().startswith("<!DOCTYPE html>")
    assert main([*args, "--force", "--json", str(page)]) == 2
    assert "--json and --html name the same file" in capsys.readouterr().err
