"""The napari plugin: manifest, reader, and the widget against a headless `ViewerModel`.

Qt runs on the "offscreen" platform, so no display is needed. The test with a real viewer (which
needs OpenGL, so a display) is in test_napari_viewer.py.
"""

import os
import time

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before Qt starts; a real display is not needed
pytest.importorskip("napari", reason="the napari plugin needs the [napari] extra: pip install -e '.[napari]'")

import torch  # noqa: E402
from napari.components import ViewerModel  # noqa: E402
from qtpy.QtCore import QTimer  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from unetkit.checkpoint import save_checkpoint  # noqa: E402
from unetkit.data import Normalization  # noqa: E402
from unetkit.decision import DecisionRule  # noqa: E402
from unetkit.io import read_image, write_tiff  # noqa: E402
from unetkit.napari._reader import get_reader  # noqa: E402
from unetkit.napari._segment import layer_image  # noqa: E402
from unetkit.napari._widget import CHECKPOINT_FILE, SegmentWidget  # noqa: E402
from unetkit.network import UNet  # noqa: E402
from unetkit.segment import segment_files  # noqa: E402


@pytest.fixture(scope="module")
def app():
    return QApplication.instance() or QApplication([])


def tiny_checkpoint(folder, rule: DecisionRule):
    """A tiny untrained network with a stored labels rule, as training writes it."""
    torch.manual_seed(0)
    net = UNet(depth=2, base_channels=2)
    net.reset_parameters()
    path = folder / "best.pt"
    save_checkpoint(path, net, normalization=Normalization(), class_names=["background", "cell"], decision=rule.to_dict())
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    rule = DecisionRule(method="seeded", threshold=0.45, seed_threshold=0.48, min_size=3, tta=False)
    return tiny_checkpoint(tmp_path_factory.mktemp("seeded"), rule)


def blobs(shape=(90, 120), seed=0):
    """A smooth uint8 image: blurred noise, so the untrained network's map has a few large objects."""
    from scipy import ndimage as ndi

    noise = np.random.default_rng(seed).random(shape)
    smooth = ndi.gaussian_filter(noise, 4)
    return np.round(255 * (smooth - smooth.min()) / np.ptp(smooth)).astype(np.uint8)


def widget_for(viewer, checkpoint):
    widget = SegmentWidget(viewer)
    widget.model.setCurrentText(CHECKPOINT_FILE)
    widget.path.setText(str(checkpoint))
    return widget


def wait(app, widget, timeout=600.0):
    """Run the Qt event loop until the widget's worker has finished."""
    end = time.perf_counter() + timeout
    while widget.busy and time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.002)
    app.processEvents()
    assert not widget.busy, "the worker did not finish"


def test_manifest_is_valid_and_its_commands_import():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("unetkit")
    manifest.validate_imports()
    assert [w.display_name for w in manifest.contributions.widgets] == ["U-Net segmentation"]
    assert "*_probabilities.tif" in manifest.contributions.readers[0].filename_patterns
    assert [s.key for s in manifest.contributions.sample_data] == ["em-membranes", "dic-hela", "fluo-nuclei"]


def test_reader_opens_what_unetkit_predict_writes(checkpoint, tmp_path):
    write_tiff(tmp_path / "in" / "cells.tif", blobs())
    segment_files([tmp_path / "in" / "cells.tif"], checkpoint, tmp_path / "out")
    probabilities = read_image(tmp_path / "out" / "cells_probabilities.tif", pages=True)
    labels = read_image(tmp_path / "out" / "cells_labels.tif")
    assert get_reader(str(tmp_path / "in" / "cells.tif")) is None  # not an output: left to other readers

    from npe2 import PluginManager

    PluginManager.instance().discover()  # what napari does at start-up
    viewer = ViewerModel()
    viewer.open([str(tmp_path / "out" / "cells_probabilities.tif"), str(tmp_path / "out" / "cells_labels.tif")],
                plugin="unetkit")  # through the manifest, as File > Open does
    assert [(layer.name, type(layer).__name__) for layer in viewer.layers] == [
        ("cells foreground probability", "Image"), ("cells labels", "Labels")]
    np.testing.assert_array_equal(viewer.layers[0].data, probabilities[1])
    np.testing.assert_array_equal(viewer.layers[1].data, labels)
    assert tuple(viewer.layers[0].contrast_limits) == (0.0, 1.0)


def test_widget_segments_as_unetkit_predict_does(app, checkpoint, tmp_path):
    image = blobs()
    write_tiff(tmp_path / "in" / "cells.tif", image)
    segment_files([tmp_path / "in" / "cells.tif"], checkpoint, tmp_path / "out")
    viewer = ViewerModel()
    viewer.add_image(image, name="cells", scale=(0.5, 0.5))
    widget = widget_for(viewer, checkpoint)
    widget.segment_button.click()
    assert widget.busy and not widget.segment_button.isEnabled() and widget.cancel_button.isEnabled()
    wait(app, widget)
    assert [layer.name for layer in viewer.layers] == ["cells", "cells cell probability", "cells labels"]
    np.testing.assert_array_equal(viewer.layers["cells labels"].data, read_image(tmp_path / "out" / "cells_labels.tif"))
    np.testing.assert_array_equal(viewer.layers["cells cell probability"].data,
                                  read_image(tmp_path / "out" / "cells_probabilities.tif", pages=True)[1])
    assert tuple(viewer.layers["cells labels"].scale) == (0.5, 0.5)  # drawn over the image
    assert widget.result.rule.method == "seeded" and widget.result.tta is False
    assert widget.progress.value() == widget.progress.maximum() == 1
    objects = int(len(np.unique(widget.result.labels))) - 1
    assert objects > 0 and widget.message.text().startswith(f"'cells': {objects} object")
    assert widget.image.currentText() == "cells" and widget.prediction.currentText() == "cells labels"

    widget.segment_button.click()  # a second run replaces the result layers' data
    wait(app, widget)
    assert len(viewer.layers) == 3


def test_widget_bad_input_gives_a_message(app, checkpoint, capfd):
    viewer = ViewerModel()
    widget = widget_for(viewer, checkpoint)
    widget.segment_button.click()
    assert "no image layer" in widget.message.text() and not widget.busy
    viewer.add_image(np.zeros((40, 50, 3), np.uint8), name="rgb", rgb=True)
    widget.segment_button.click()
    assert widget.message.text() == (
        "layer 'rgb' is a colour (RGB) image with 3 channels, but the model was trained on 1 channel; "
        "convert it to grayscale (Image > Mode in Fiji) or choose a model for colour images")
    viewer.add_image(np.zeros((2, 3, 40, 50), np.uint8), name="tzyx")
    widget.segment_button.click()
    assert "'tzyx' has 4 dimensions" in widget.message.text() and "z-stacks or time series" in widget.message.text()
    viewer.add_image(np.zeros((40, 50), np.float32), name="flat")
    widget.tile_size.setValue(33)
    widget.segment_button.click()
    assert "tile size" in widget.message.text() and "33" in widget.message.text()
    widget.tile_size.setValue(0)
    widget.path.setText(str(checkpoint.parent / "missing.pt"))
    widget.segment_button.click()
    assert "missing.pt: checkpoint not found" in widget.message.text()
    assert not widget.evaluate_button.isEnabled() and "ground-truth mask" in widget.evaluate_hint.text()
    widget.evaluate()
    assert "evaluation needs two labels layers" in widget.message.text()
    assert not widget.busy and "Traceback" not in capfd.readouterr().err


def test_cancel_stops_the_segmentation(app, checkpoint):
    viewer = ViewerModel()
    viewer.add_image(blobs((600, 600)), name="big")
    widget = widget_for(viewer, checkpoint)
    widget.tile_size.setValue(132)  # 36 tiles
    widget._relay.progress.connect(lambda done, total: widget.cancel_button.click())
    widget.segment_button.click()
    wait(app, widget)
    assert widget.message.text().startswith("cancelled (cancelled after ")
    assert [layer.name for layer in viewer.layers] == ["big"] and widget.result is None
    assert widget.segment_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_evaluate_shows_the_metrics(app, checkpoint):
    truth = np.zeros((40, 50), np.uint16)
    truth[5:15, 5:15] = 1
    prediction = truth.copy()
    prediction[25:35, 30:40] = 2  # one false object of 100 pixels
    viewer = ViewerModel()
    viewer.add_labels(prediction, name="pred")
    viewer.add_labels(truth, name="truth")
    widget = widget_for(viewer, checkpoint)
    widget.prediction.setCurrentText("pred")
    widget.truth.setCurrentText("truth")
    widget.evaluate_button.click()
    wait(app, widget)
    scores = widget.scores
    assert scores["pixel_error"] == 100 / 2000
    assert scores["dice"] == pytest.approx(2 * 100 / (200 + 100))
    assert scores["iou"] == pytest.approx(0.5)
    assert scores["seg"] == 1.0  # the one true object is found exactly
    assert scores["ap@0.5"] == pytest.approx(0.5)  # 1 TP / (1 TP + 1 FP + 0 FN)
    text = widget.scores_text.text()
    assert "dice" in text and "0.6667" in text and "seg" in text


def test_evaluate_never_offers_the_prediction_as_its_own_ground_truth(app, checkpoint):
    viewer = ViewerModel()
    viewer.add_labels(np.zeros((20, 30), np.uint16), name="cells labels")
    widget = widget_for(viewer, checkpoint)
    assert widget.prediction.currentText() == "cells labels" and widget.truth.currentText() == ""
    assert not widget.evaluate_button.isEnabled()
    widget.evaluate()
    assert "evaluation needs two labels layers" in widget.message.text() and widget.scores is None
    viewer.add_labels(np.ones((20, 30), np.uint16), name="mask")
    assert widget.prediction.currentText() == "cells labels" and widget.truth.currentText() == "mask"
    widget.truth.setCurrentText("cells labels")
    assert not widget.evaluate_button.isEnabled() and "both the segmentation" in widget.evaluate_hint.text()
    widget.evaluate()
    assert "both the segmentation and the ground truth" in widget.message.text() and widget.scores is None


def test_viewer_keeps_running_while_a_2048_image_is_segmented(app, tmp_path):
    """The Qt event loop keeps running (a timer fires) while the worker predicts 25 tiles and reports
    each to the progress bar; how fast is a benchmark's question, not this test's."""
    viewer = ViewerModel()
    viewer.add_image(np.tile(blobs((256, 256)), (8, 8)), name="large")
    widget = widget_for(viewer, tiny_checkpoint(tmp_path, DecisionRule(method="components", threshold=0.45)))
    widget.tile_size.setValue(516)
    ticks, progress = [], []
    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(lambda: ticks.append(widget.busy))
    widget._relay.progress.connect(lambda done, total: progress.append((done, total, widget.busy)))
    timer.start()
    widget.segment_button.click()
    wait(app, widget, timeout=600)
    timer.stop()
    assert widget.result is not None and widget.result.labels.shape == (2048, 2048)
    assert [p[:2] for p in progress] == [(k, 25) for k in range(1, 26)]
    assert all(p[2] for p in progress)  # each report arrived while the worker was still running
    assert any(ticks)  # the main thread handled timer events while the worker was busy


def test_layer_image_accepts_what_the_model_takes():
    assert layer_image(np.zeros((4, 5, 3)), rgb=True, name="rgb", in_channels=3).shape == (4, 5, 3)
    assert layer_image([np.zeros((8, 6)), np.zeros((4, 3))], rgb=False, name="pyramid", in_channels=1).shape == (8, 6)
