"""The plugin in a real napari viewer: open the widget from the plugin menu, segment, take a screenshot.

A real viewer draws with OpenGL, which Qt's "offscreen" platform cannot give it (adding a layer
fails inside vispy), so this test starts a virtual X server (Xvfb) and runs the viewer in a
separate Python process on it; it is skipped where Xvfb is not installed. The widget's logic is
tested without a display in test_napari.py.
"""

import json
import os
import select
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

XVFB = shutil.which("Xvfb")
pytestmark = pytest.mark.skipif(
    XVFB is None, reason="needs Xvfb (apt-get install xvfb) to give the real napari viewer an OpenGL display"
)
pytest.importorskip("napari", reason="the napari plugin needs the [napari] extra: pip install -e '.[napari]'")


def missing_xcb_libraries() -> list[str]:
    """System libraries that Qt's X11 platform plugin needs and cannot find (by ldd)."""
    from qtpy.QtCore import QLibraryInfo

    try:
        plugins = QLibraryInfo.location(QLibraryInfo.PluginsPath)  # Qt 5
    except AttributeError:
        plugins = QLibraryInfo.path(QLibraryInfo.LibraryPath.PluginsPath)  # Qt 6
    plugin = os.path.join(plugins, "platforms", "libqxcb.so")
    if not (os.path.isfile(plugin) and shutil.which("ldd")):
        return []
    out = subprocess.run(["ldd", plugin], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


MISSING = missing_xcb_libraries() if XVFB else []

from unetkit.checkpoint import save_checkpoint  # noqa: E402
from unetkit.data import Normalization  # noqa: E402
from unetkit.decision import DecisionRule  # noqa: E402
from unetkit.io import read_image, write_tiff  # noqa: E402
from unetkit.network import UNet  # noqa: E402

VIEWER_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    import napari
    from qtpy.QtWidgets import QApplication
    from unetkit.io import read_image, write_png

    checkpoint, image_path, shot_path = sys.argv[1:4]
    viewer = napari.Viewer()  # shown on the virtual display: a hidden canvas is never drawn
    viewer.add_image(read_image(image_path), name="cells")
    dock, widget = viewer.window.add_plugin_dock_widget("unetkit", "U-Net segmentation")
    widget.model.setCurrentText("checkpoint file")
    widget.path.setText(checkpoint)
    widget.segment_button.click()
    end = time.perf_counter() + 60
    while widget.busy and time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.005)
    QApplication.processEvents()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    write_png(shot_path, np.ascontiguousarray(shot[..., :3]))
    viewer.layers["cells labels"].visible = False
    hidden = viewer.screenshot(canvas_only=True, flash=False)
    write_png(shot_path.replace(".png", "_without_labels.png"), np.ascontiguousarray(hidden[..., :3]))
    print(json.dumps({"layers": [layer.name for layer in viewer.layers], "message": widget.message.text(),
                      "labels": int(viewer.layers["cells labels"].data.max())}))
    viewer.close()
    """
)


@pytest.fixture
def display(tmp_path):
    """A fresh Xvfb server on a free display; yields its name (":N")."""
    read_end, write_end = os.pipe()
    log = open(tmp_path / "xvfb.log", "wb")  # a file, not a pipe: a full pipe would block the server
    server = subprocess.Popen(
        [XVFB, "-displayfd", str(write_end), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
        pass_fds=(write_end,), stdout=log, stderr=log,
    )
    os.close(write_end)
    number = b""
    while not number.endswith(b"\n") and select.select([read_end], [], [], 20)[0]:  # the server writes "N\n" when ready
        chunk = os.read(read_end, 64)
        if not chunk:
            break
        number += chunk
    os.close(read_end)  # only after the newline: closing earlier makes the server's write fail, and the server exit
    number = number.decode().strip()
    try:
        if not number:
            server.kill()
            pytest.fail(f"Xvfb did not start: {(tmp_path / 'xvfb.log').read_text(errors='replace')[-500:]}")
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


@pytest.mark.skipif(bool(MISSING), reason=f"Qt's X11 platform needs system libraries that are missing: {', '.join(MISSING)} "
                    "(apt-get install libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 ...)")
def test_widget_in_a_real_viewer_adds_layers_that_are_drawn(display, tmp_path):
    torch.manual_seed(0)
    net = UNet(depth=2, base_channels=2)
    net.reset_parameters()
    save_checkpoint(tmp_path / "best.pt", net, normalization=Normalization(), class_names=["background", "cell"],
                    decision=DecisionRule(method="components", threshold=0.0).to_dict())  # one object: the whole image
    yy, xx = np.mgrid[:160, :200]
    image = np.where((yy - 80) ** 2 + (xx - 100) ** 2 < 50**2, 200, 30).astype(np.uint8)
    write_tiff(tmp_path / "cells.tif", image)
    env = {**os.environ, "DISPLAY": display, "QT_QPA_PLATFORM": "xcb", "NAPARI_ASYNC": "0"}
    done = subprocess.run(
        [sys.executable, "-c", VIEWER_SCRIPT, str(tmp_path / "best.pt"), str(tmp_path / "cells.tif"), str(tmp_path / "shot.png")],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["layers"] == ["cells", "cells cell probability", "cells labels"], report
    assert report["message"].startswith("'cells': 1 object") and report["labels"] == 1
    shot = read_image(tmp_path / "shot.png")
    assert shot.ndim == 3 and shot.shape[0] > 100 and shot.shape[1] > 100
    assert np.unique(shot.reshape(-1, 3), axis=0).shape[0] > 10  # a picture, not a blank canvas
    without_labels = read_image(tmp_path / "shot_without_labels.png")
    assert without_labels.shape == shot.shape and (without_labels != shot).any(axis=2).mean() > 0.5  # the labels layer is drawn
