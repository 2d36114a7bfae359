"""The napari widget on z-stacks and time series: plane by plane with a 2D model (as `unetkit
predict` segments a multi-page file), as one volume with a 3D model, and clear messages for layers
it does not segment. Headless, as test_napari.py."""

import os

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("napari", reason="the napari plugin needs the [napari] extra: pip install -e '.[napari]'")

import torch  # noqa: E402
from napari.components import ViewerModel  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from test_napari import blobs, tiny_checkpoint, wait, widget_for  # noqa: E402
from unetkit.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from unetkit.data import Normalization  # noqa: E402
from unetkit.data.volumes import normalize_volume  # noqa: E402
from unetkit.decision import DecisionRule  # noqa: E402
from unetkit.network import UNet  # noqa: E402
from unetkit.postprocess import labels_from_probabilities  # noqa: E402
from unetkit.stacks import stitch_planes  # noqa: E402
from unetkit.volume import predict_volume  # noqa: E402


@pytest.fixture(scope="module")
def app():
    return QApplication.instance() or QApplication([])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    rule = DecisionRule(method="components", threshold=0.45, min_size=3, tta=False)
    return tiny_checkpoint(tmp_path_factory.mktemp("planes"), rule)


@pytest.fixture(scope="module")
def checkpoint_3d(tmp_path_factory):
    torch.manual_seed(0)
    net = UNet(dims=3, depth=2, base_channels=4, pool_kernels=[(1, 2, 2)], conv_kernels=[(1, 3, 3), (3, 3, 3)])
    net.reset_parameters()
    path = tmp_path_factory.mktemp("volume") / "best.pt"
    rule = DecisionRule(method="components", threshold=0.7, min_size=2, tta=False)  # several objects in the test volume
    save_checkpoint(path, net, normalization=Normalization(), class_names=["background", "cell"], decision=rule.to_dict())
    return path


def stack_of(*seeds, shape=(40, 44)):
    return np.stack([blobs(shape, seed=seed) for seed in seeds])


def segment(app, widget):
    widget.segment_button.click()
    wait(app, widget)
    return widget.result


def test_a_stack_is_segmented_plane_by_plane_as_each_plane_alone(app, checkpoint):
    viewer = ViewerModel()
    viewer.add_image(stack_of(1, 2, 3), name="zstack", scale=(2.0, 0.5, 0.5), translate=(1.0, 0.0, 0.0))
    widget = widget_for(viewer, checkpoint)
    assert not widget.stitch.isChecked() and widget.stitch.toolTip()  # off by default, explained
    planes = []
    widget._relay.planes.connect(lambda done, total: planes.append((done, total, widget.busy)))
    result = segment(app, widget)
    assert [layer.name for layer in viewer.layers] == ["zstack", "zstack cell probability", "zstack labels"]
    labels = viewer.layers["zstack labels"].data
    probability = viewer.layers["zstack cell probability"].data
    assert labels.shape == probability.shape == (3, 40, 44)
    for layer in viewer.layers:
        assert tuple(layer.scale) == (2.0, 0.5, 0.5) and tuple(layer.translate) == (1.0, 0.0, 0.0)
    ids = [set(np.unique(plane[plane > 0]).tolist()) for plane in labels]
    assert all(ids) and not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])  # unique across planes
    assert [p[:2] for p in planes] == [(1, 3), (2, 3), (3, 3)] and all(p[2] for p in planes)
    assert widget.progress.value() == widget.progress.maximum() == 3 and widget.progress.text() == "plane 3 of 3"
    assert widget.message.text().startswith("'zstack': 3 planes,") and "unique across planes" in widget.message.text()
    assert result.labels.shape == (3, 40, 44)

    viewer.add_image(viewer.layers["zstack"].data[1], name="plane 1")  # the same plane as a 2D layer
    widget.image.setCurrentText("plane 1")
    alone = segment(app, widget)
    np.testing.assert_array_equal(probability[1], viewer.layers["plane 1 cell probability"].data)
    offset = len(ids[0])  # plane 1's ids continue plane 0's
    np.testing.assert_array_equal(labels[1], np.where(alone.labels > 0, alone.labels.astype(np.int64) + offset, 0))


def test_link_objects_across_planes(app, checkpoint):
    viewer = ViewerModel()
    viewer.add_image(stack_of(4, 4, 5), name="cells")  # planes 0 and 1 alike: their objects overlap fully
    widget = widget_for(viewer, checkpoint)
    apart = segment(app, widget).labels.copy()
    widget.stitch.setChecked(True)
    assert widget.stitch_overlap.isEnabled() and widget.stitch_choice() == 0.25
    linked = segment(app, widget).labels
    assert linked.shape == (3, 40, 44) and apart[0].max() > 0
    np.testing.assert_array_equal(linked, stitch_planes(apart, 0.25))
    np.testing.assert_array_equal(linked[0], linked[1])  # each object keeps its id in the next plane
    assert not set(np.unique(apart[0])[1:]) & set(np.unique(apart[1])[1:])
    assert "linked across planes" in widget.message.text()


def test_cancel_stops_a_stack_between_planes(app, checkpoint):
    viewer = ViewerModel()
    viewer.add_image(stack_of(1, 2, 3, 4), name="series")
    widget = widget_for(viewer, checkpoint)
    widget._relay.planes.connect(lambda done, total: widget.cancel_button.click())
    segment(app, widget)
    assert widget.message.text().startswith("cancelled (cancelled after 1 of 4 planes)")
    assert [layer.name for layer in viewer.layers] == ["series"] and widget.result is None


def test_a_3d_model_predicts_a_zstack_as_one_volume(app, checkpoint_3d):
    volume = stack_of(*range(6))
    viewer = ViewerModel()
    viewer.add_image(volume, name="vol", scale=(3.0, 1.0, 1.0))
    widget = widget_for(viewer, checkpoint_3d)
    result = segment(app, widget)
    assert [layer.name for layer in viewer.layers] == ["vol", "vol cell probability", "vol labels"]
    loaded = load_checkpoint(checkpoint_3d)
    expected = predict_volume(loaded.model, normalize_volume(volume, loaded.normalization), tta=False, pad_thin=True)
    np.testing.assert_array_equal(viewer.layers["vol cell probability"].data, expected[1])
    labels = viewer.layers["vol labels"].data
    assert labels.shape == (6, 40, 44) and labels.max() > 1
    assert any(len(np.unique(np.nonzero(labels == i)[0])) > 1 for i in range(1, labels.max() + 1))  # 3D objects
    np.testing.assert_array_equal(labels, labels_from_probabilities(expected, DecisionRule.from_dict(loaded.decision)))
    assert tuple(viewer.layers["vol labels"].scale) == (3.0, 1.0, 1.0)
    assert result.tta is False and widget.message.text().startswith("'vol': ")


def test_layers_the_widget_cannot_segment_get_a_message(app, checkpoint, checkpoint_3d, capfd):
    viewer = ViewerModel()
    viewer.add_image(blobs((40, 44)), name="flat")
    widget = widget_for(viewer, checkpoint_3d)
    widget.segment_button.click()
    assert not widget.busy and widget.message.text().startswith("this is a 3D model; choose a z-stack layer")
    viewer.add_image(np.zeros((40, 44, 3), np.uint8), name="rgb", rgb=True)  # colour: a 2D image, not a stack
    widget.segment_button.click()
    assert not widget.busy and widget.message.text().startswith("this is a 3D model; choose a z-stack layer")
    viewer.add_image(np.zeros((2, 3, 40, 44), np.uint8), name="tzyx")
    for model in (checkpoint, checkpoint_3d):
        widget.path.setText(str(model))
        widget.segment_button.click()
        text = widget.message.text()
        assert not widget.busy and "'tzyx' has 4 dimensions" in text and "z-stacks or time series" in text
    assert [layer.name for layer in viewer.layers] == ["flat", "rgb", "tzyx"]
    assert "Traceback" not in capfd.readouterr().err
