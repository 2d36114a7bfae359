"""The napari widget's human-in-the-loop controls against a headless `ViewerModel`: labels controls,
fine-tuning on corrected labels (a tiny network, a few seconds), Stop, Save model, the Evaluate
box's choices and File > Open Sample.

Qt runs on the "offscreen" platform, so no display is needed (the test with a real viewer is in
test_napari_viewer.py).
"""

import os
import sys
import threading
import types

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before Qt starts; a real display is not needed
pytest.importorskip("napari", reason="the napari plugin needs the [napari] extra: pip install -e '.[napari]'")

import torch  # noqa: E402
from napari.components import ViewerModel  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

import unetkit.inference  # noqa: E402
from unetkit.checkpoint import save_checkpoint  # noqa: E402
from unetkit.data import Normalization  # noqa: E402
from unetkit.errors import InputError  # noqa: E402
from unetkit.napari._sample_data import sample_layers  # noqa: E402
from unetkit.napari._widget import CHECKPOINT_FILE  # noqa: E402
from unetkit.network import UNet  # noqa: E402
from unetkit.synthetic import synthetic_cells  # noqa: E402
from test_napari import widget_for  # noqa: E402 - the same widget set-up as the other napari tests


@pytest.fixture(scope="module")
def app():
    return QApplication.instance() or QApplication([])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny untrained network (depth 2, width 4) without a stored labels rule."""
    torch.manual_seed(0)
    net = UNet(depth=2, base_channels=4)
    net.reset_parameters()
    path = tmp_path_factory.mktemp("tiny") / "best.pt"
    save_checkpoint(path, net, normalization=Normalization(), class_names=["background", "cell"])
    return path


@pytest.fixture(scope="module")
def cells():
    image, labels = synthetic_cells((96, 96), seed=1)
    return np.round(image * 255).clip(0, 255).astype(np.uint8), labels.astype(np.uint16)


def wait(app, widget, limit=20000):
    """Run the Qt event loop until the widget's worker (and any work it chains) has finished."""
    for _ in range(limit):
        if not widget.busy:
            break
        app.processEvents()
        threading.Event().wait(0.005)
    app.processEvents()
    assert not widget.busy, "the worker did not finish"


def segmented(app, cells, checkpoint):
    viewer = ViewerModel()
    viewer.add_image(cells[0], name="synth")
    widget = widget_for(viewer, checkpoint)
    widget.segment_button.click()
    wait(app, widget)
    assert "synth labels" in viewer.layers, widget.message.text()
    return viewer, widget


# -- labels controls -----------------------------------------------------------------------------------


def test_labels_controls_reach_the_segmentation_core(app, cells, checkpoint, monkeypatch):
    made = []

    class Recording(unetkit.inference.Segmenter):
        def __init__(self, loaded, options=None, **kwargs):
            made.append((loaded, options))
            super().__init__(loaded, options, **kwargs)

    monkeypatch.setattr(unetkit.inference, "Segmenter", Recording)
    viewer = ViewerModel()
    viewer.add_image(cells[0], name="synth")
    widget = widget_for(viewer, checkpoint)
    assert widget.inference_options() == unetkit.inference.InferenceOptions()  # untouched: as the checkpoint says
    widget.threshold.setValue(0.35)
    widget.min_size.setValue(12)
    widget.high.setValue(99.0)  # the dark end stays as trained
    widget.segment_button.click()
    wait(app, widget)
    loaded, options = made[-1]
    assert (options.threshold, options.min_size) == (0.35, 12)
    assert (loaded.normalization.low, loaded.normalization.high) == (1.0, 99.0)
    assert widget.result.rule.method == "components" and widget.result.rule.min_size == 12
    assert widget.result.rule.threshold == 0.35

    widget.diameter_mode.setCurrentText("pixels")
    widget.diameter.setValue(25.0)
    assert widget.inference_options().diameter == 25.0
    widget.diameter_mode.setCurrentText("auto")
    assert widget.inference_options().diameter == "auto"
    assert widget.inference_options().precision == "fp32"
    widget.precision.setCurrentText("auto")
    assert widget.inference_options().precision == "auto"


def test_percentiles_of_a_fixed_scale_model_are_refused_with_the_fix(app, cells, tmp_path):
    net = UNet(depth=2, base_channels=4)
    save_checkpoint(tmp_path / "fixed.pt", net, normalization=Normalization(mode="fixed", scale=1 / 255),
                    class_names=["background", "cell"])
    viewer = ViewerModel()
    viewer.add_image(cells[0], name="synth")
    widget = widget_for(viewer, tmp_path / "fixed.pt")
    widget.low.setValue(2.0)
    widget.segment_button.click()
    assert not widget.busy and "set both normalisation percentiles to 'as trained'" in widget.message.text()


# -- fine-tuning ---------------------------------------------------------------------------------------


def test_fine_tune_on_corrected_labels_then_segment_again(app, cells, checkpoint, tmp_path, monkeypatch):
    import unetkit.finetune

    real = unetkit.finetune.fine_tune
    threads = []

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(unetkit.finetune, "fine_tune", recording)
    viewer, widget = segmented(app, cells, checkpoint)
    assert widget.train_labels.currentText() == "synth labels"
    corrected = viewer.layers["synth labels"]
    corrected.data = cells[1].copy()  # the user's corrections (napari's paint tools edit this layer)
    widget.seconds.setValue(2)
    widget.train_button.click()
    assert widget.busy and widget.stop_button.isEnabled() and not widget.segment_button.isEnabled()
    wait(app, widget)

    assert threads and threads[0] is not threading.main_thread()  # the viewer's thread stays free
    assert widget.history and widget.loss_plot.points == [(r["iteration"], r["loss"]) for r in widget.history]
    assert widget.train_progress.value() == 1000
    best = widget.run_dir / "best.pt"
    assert best.is_file() and widget.path.text() == str(best) and widget.model.currentText() == CHECKPOINT_FILE
    # Segmented again with the new model into a new layer; the corrections are kept as they were.
    assert "synth labels 2" in viewer.layers and widget.result_name("labels") == "synth labels 2"
    np.testing.assert_array_equal(viewer.layers["synth labels"].data, cells[1])
    assert widget.prediction.currentText() == "synth labels 2" and widget.truth.currentText() == ""

    saved = widget.save_model(tmp_path / "kept")
    assert saved == tmp_path / "kept" / "best.pt" and saved.is_file() and widget.path.text() == str(saved)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert widget.save_model(tmp_path / "other") is None and "is not empty (1 entry)" in widget.message.text()
    assert widget.save_model(tmp_path / "other", force=True).is_file()
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_stop_ends_fine_tuning_and_keeps_the_best_model(app, cells, checkpoint):
    viewer, widget = segmented(app, cells, checkpoint)
    viewer.layers["synth labels"].data = cells[1].copy()
    widget.seconds.setValue(3600)
    widget.resegment.setChecked(False)
    widget._relay.trained.connect(lambda report: widget.stop_button.click())
    widget.train_button.click()
    wait(app, widget)
    assert widget.message.text().startswith("fine-tuned (stopped early)")
    assert 1 <= len(widget.history) < 100 and (widget.run_dir / "best.pt").is_file()  # of a 3600 s budget
    assert [layer.name for layer in viewer.layers] == ["synth", "synth cell probability", "synth labels"]
    assert widget.train_button.isEnabled() and not widget.stop_button.isEnabled()


def test_fine_tune_bad_input_gives_a_message(app, cells, checkpoint, monkeypatch):
    viewer = ViewerModel()
    viewer.add_image(cells[0], name="synth")
    widget = widget_for(viewer, checkpoint)
    widget.train_button.click()
    assert "no labels layer to learn from" in widget.message.text() and not widget.busy
    viewer.add_labels(np.zeros((96, 96), np.uint16), name="empty")
    widget.train_labels.setCurrentText("empty")
    widget.train_button.click()
    assert "'empty' has no object: paint the objects" in widget.message.text() and not widget.busy
    viewer.add_labels(np.ones((50, 50), np.uint16), name="elsewhere")
    widget.train_labels.setCurrentText("elsewhere")
    widget.train_button.click()
    assert "choose the labels drawn on that image" in widget.message.text() and not widget.busy

    def refusing(*args, **kwargs):  # what fine_tune says about masks unlike the model's
        raise InputError("the masks are membrane masks but the model was trained on object masks")

    monkeypatch.setitem(sys.modules, "unetkit.finetune", types.SimpleNamespace(fine_tune=refusing))
    viewer.layers["empty"].data[10:20, 10:20] = 3
    widget.train_labels.setCurrentText("empty")
    widget.train_button.click()
    wait(app, widget)
    assert widget.message.text() == "the masks are membrane masks but the model was trained on object masks"
    assert widget.run_dir is None and not widget.save_button.isEnabled() and widget.train_button.isEnabled()
    assert widget.save_model("anywhere") is None and "fine-tune a model first" in widget.message.text()


# -- evaluation ----------------------------------------------------------------------------------------


def test_evaluate_is_off_until_a_different_ground_truth_is_chosen(app, cells, checkpoint):
    viewer, widget = segmented(app, cells, checkpoint)
    assert widget.prediction.currentText() == "synth labels" and widget.truth.currentText() == ""
    assert not widget.evaluate_button.isEnabled() and "ground-truth mask (File > Open)" in widget.evaluate_hint.text()
    viewer.add_labels(cells[1], name="synth ground truth")
    assert widget.truth.currentText() == "synth ground truth" and widget.evaluate_button.isEnabled()
    assert widget.evaluate_hint.text() == ""
    widget.truth.setCurrentText("synth labels")
    assert not widget.evaluate_button.isEnabled() and "both the segmentation and the ground truth" in widget.evaluate_hint.text()
    widget.evaluate()
    assert "both the segmentation and the ground truth" in widget.message.text() and widget.scores is None
    widget.truth.setCurrentText("synth ground truth")
    widget.evaluate_button.click()
    wait(app, widget)
    assert widget.scores is not None and widget.scores["seg"] < 1.0  # an untrained network: not a perfect score


# -- sample data ---------------------------------------------------------------------------------------


def test_sample_data_without_the_data_folder_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("UNETKIT_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(InputError) as error:
        sample_layers("dic-hela")
    message = str(error.value)
    assert "UNETKIT_DATA" in message and "nowhere" in message and "\n" not in message


def test_open_sample_gives_the_image_and_its_ground_truth():
    from npe2 import PluginManager

    from unetkit.data.datasets import data_root

    if not (data_root() / "ctc-dic-c2dh-hela").is_dir():
        pytest.skip(f"{data_root() / 'ctc-dic-c2dh-hela'} not found (set UNETKIT_DATA)")
    PluginManager.instance().discover()
    viewer = ViewerModel()
    viewer.open_sample("unetkit", "dic-hela")  # File > Open Sample > unetkit
    assert [(layer.name, type(layer).__name__) for layer in viewer.layers] == [
        ("dic-hela t045", "Image"), ("dic-hela t045 ground truth", "Labels")]
    assert viewer.layers[0].data.shape == viewer.layers[1].data.shape == (512, 512)
    assert viewer.layers[1].data.max() > 5
