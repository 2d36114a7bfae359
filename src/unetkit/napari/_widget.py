"""The napari widget: segment the chosen image layer with a U-Net, fine-tune the model on corrected
labels, and score labels against ground truth.

A z-stack or time series layer (planes, Y, X) is segmented plane by plane by a 2D model (the
progress bar counts planes; objects can be linked across planes) and as one volume by a 3D model.

The loop it offers: Segment (a packaged model or a checkpoint), correct the labels layer with
napari's paint, fill and erase tools, Fine-tune on it for a minute or two, and the image is
segmented again with the new model into a new labels layer (corrections are never overwritten);
Save model keeps the run folder. Segmentation, fine-tuning and evaluation run in a worker thread
(superqt's `create_worker`) so the viewer stays responsive; progress (tiles, or training time and
loss) reaches the widget through Qt signals, and Cancel / Stop end the work at the next batch of
tiles or training iteration. Mistakes (no image layer, a layer with the wrong channel count, an
illegal tile size, an unreadable checkpoint, labels without objects) are shown in the widget. The
work itself is in `unetkit.napari._segment` and `unetkit.napari._train`.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
from qtpy.QtCore import QObject, QPointF, Signal
from qtpy.QtGui import QColor, QFont, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import create_worker

from ..errors import InputError
from ..stacks import STITCH_THRESHOLD
from ._layers import labels_layer, probability_layers
from ._segment import (
    TTA_CHOICES,
    WIDGET_METRICS,
    Cancelled,
    Segmentation,
    backends,
    check_tile_size,
    describe_model,
    evaluate_labels,
    format_scores,
    inference_options,
    installed_models,
    is_volume_model,
    layer_image,
    layer_kind,
    layer_stack,
    layer_volume,
    load_model,
    percentile_range,
    segment_image,
    segment_planes,
    segment_volume_layer,
    truth_choice,
)
from ._train import folder_entries, new_run_dir, run_fine_tune, save_run, training_pair

#: The model menu's entry that reads the path field instead of a packaged model.
CHECKPOINT_FILE = "checkpoint file"
#: The text of a control left at the checkpoint's own setting.
AS_TRAINED = "as trained"
#: The object diameter choices: the model's own scale, estimated from the image, or a size in pixels.
DIAMETER_CHOICES = (AS_TRAINED, "auto", "pixels")

THRESHOLD_TIP = (
    "How sure the model must be that a pixel belongs to an object (0 to 1). Lower it when objects come out too "
    "small or faint cells are missed; raise it when background is taken for objects. 'as trained' keeps the value "
    "chosen when the model was trained. Touching objects are still split the way the model's rule splits them.")
MIN_SIZE_TIP = ("Objects smaller than this many pixels are removed (debris, noise, fragments of cells). 'as trained' "
                "keeps the model's own minimum; 0 keeps every object. The rest of the model's rule stays as it is.")
LOW_TIP = ("Brightness scaling before the model sees the image: this percentage of the darkest pixels becomes black. "
           "Raise it for a hazy or uneven background. 'as trained' uses the model's own setting.")
HIGH_TIP = ("Brightness scaling before the model sees the image: pixels brighter than this percentile become white. "
            "Lower it when a few very bright spots make the cells look dim. 'as trained' uses the model's own setting.")
DIAMETER_TIP = ("Typical width of one object (cell or nucleus) in pixels. The image is rescaled so that objects look "
                "as large as those the model was trained on: set it when your cells are much larger or smaller than "
                "the model's. 'auto' estimates it from the image; 'as trained' does not rescale.")
#: What the precision control offers: the full precision first (what the model was trained in).
PRECISION_CHOICES = ("fp32", "auto", "bf16", "int8")
PRECISION_TIP = ("Arithmetic of the network. fp32 is what the model was trained in. bf16 is about twice as fast on "
                 "processors that have it (recent Intel Xeon, AMD Zen 4) and int8 uses onnxruntime; 'auto' picks the "
                 "fastest only where the model's stored scores show the result stays the same.")
SECONDS_TIP = ("How long to train on your corrected labels, in seconds of your time. A "
               "minute or two usually adapts a model to new images; "
               "Stop ends it early and keeps the best model so far.")
STITCH_TIP = ("For z-stacks and time series: a cell cut by several neighbouring planes (or followed from one time "
              "point to the next) keeps one label, so each cell becomes one object through the stack. Outlines in "
              "neighbouring planes are joined when they overlap by at least the fraction set here (0.25 by default): "
              "raise it when neighbouring cells get joined into one, lower it when one cell breaks into pieces. "
              "Off: every plane's objects get labels of their own.")
TRAIN_LABELS_TIP = ("The labels layer the model learns from: correct it with napari's paint, fill and erase tools "
                    "(by default the last segmentation's labels). Give every object its own label; 0 is background.")


class _Relay(QObject):
    """Carries progress from the worker thread to the widget (Qt queues it to the main thread)."""

    progress = Signal(int, int)  # tiles of one image
    planes = Signal(int, int)  # planes of a stack
    trained = Signal(object)  # fine_tune's callback dicts


class LossPlot(QWidget):
    """A minimal line plot of the training loss against the iteration; `points` holds the data."""

    def __init__(self) -> None:
        super().__init__()
        self.points: list[tuple[int, float]] = []
        self.setMinimumHeight(70)
        self.setToolTip("Training loss: it should fall and level off")

    def add(self, iteration: int, loss: float) -> None:
        if math.isfinite(loss):
            self.points.append((int(iteration), float(loss)))
            self.update()

    def clear(self) -> None:
        self.points.clear()
        self.update()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        width, height = self.width(), self.height()
        painter.setPen(QColor("#808080"))
        painter.drawRect(0, 0, width - 1, height - 1)
        if not self.points:
            painter.drawText(6, height // 2, "loss (while fine-tuning)")
            return
        xs = [p[0] for p in self.points]
        ys = [p[1] for p in self.points]
        x0, x1 = min(xs), max(max(xs), min(xs) + 1)
        y0, y1 = min(ys), max(max(ys), min(ys) + 1e-9)
        margin = 4
        polygon = QPolygonF([
            QPointF(margin + (x - x0) / (x1 - x0) * (width - 2 * margin),
                    height - margin - (y - y0) / (y1 - y0) * (height - 2 * margin))
            for x, y in self.points
        ])
        painter.setPen(QPen(QColor("#e0a040"), 1.5))
        painter.drawPolyline(polygon)
        painter.setPen(QColor("#c0c0c0"))
        painter.drawText(6, 14, f"loss {ys[-1]:.4g} (iteration {xs[-1]})")


class SegmentWidget(QWidget):
    """Segment the chosen image layer, fine-tune on corrected labels, evaluate against ground truth.

    Works with a `napari.Viewer` or a bare `napari.components.ViewerModel` (tests).

    Example:
        >>> widget = SegmentWidget(viewer)  # doctest: +SKIP
        >>> widget.model.setCurrentText("dic-hela"); widget.segment_button.click()  # doctest: +SKIP
        >>> widget.seconds.setValue(60); widget.train_button.click()  # doctest: +SKIP
    """

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.result: Segmentation | None = None  # the last segmentation
        self.scores: dict[str, Any] | None = None  # the last evaluation
        self.run_dir: Path | None = None  # the last fine-tuning's run folder
        self.history: list[dict] = []  # the last fine-tuning's progress reports
        self._worker = None
        self._succeeded = False
        self._then: Callable[[], None] | None = None  # what to do once the worker has finished
        self._adding = False  # the widget is adding its own result layers (they must not become the input)
        self._result_source = ""
        self._result_labels = ""  # the name of the labels layer the last segmentation wrote
        self._written: dict[str, tuple[np.ndarray, str]] = {}  # labels layer -> (data as written, model)
        self._cancel = threading.Event()
        self._stop = threading.Event()
        self._relay = _Relay()
        self._relay.progress.connect(self._on_progress)
        self._relay.planes.connect(self._on_planes)
        self._steps = 1  # what the progress bar counts to once the work is done (planes of a stack)
        self._relay.trained.connect(self._on_trained)

        self.model = QComboBox()
        self.model.addItems([*installed_models(), CHECKPOINT_FILE])
        self.path = QLineEdit()
        self.path.setPlaceholderText("RUN/best.pt")
        browse = QPushButton("Browse...")
        browse.clicked.connect(self._browse)
        path_row = QHBoxLayout()
        path_row.addWidget(self.path)
        path_row.addWidget(browse)
        self.image = QComboBox()
        self.tile_size = QSpinBox()
        self.tile_size.setRange(0, 8192)
        self.tile_size.setSpecialValueText("automatic")
        self.tile_size.setToolTip("Input tile size; automatic picks the cheapest legal tile that fits in memory")
        self.tta = QComboBox()
        self.tta.addItems(list(TTA_CHOICES))
        self.tta.setToolTip("Average the 8 rotated and mirrored versions; by default as the model's labels rule was chosen")
        self.backend = QComboBox()
        self.backend.addItems(list(backends()))
        self.precision = QComboBox()
        self.precision.addItems(list(PRECISION_CHOICES))
        self.precision.setToolTip(PRECISION_TIP)

        # Controls left at their minimum (shown as "as trained") keep the checkpoint's setting.
        self.threshold = self._spin(QDoubleSpinBox(), -0.05, 1.0, 0.05, THRESHOLD_TIP, decimals=2)
        self.min_size = self._spin(QSpinBox(), -1, 1_000_000, 10, MIN_SIZE_TIP, suffix=" px")
        self.low = self._spin(QDoubleSpinBox(), -0.5, 50.0, 0.5, LOW_TIP, decimals=1, suffix=" %")
        self.high = self._spin(QDoubleSpinBox(), 49.9, 100.0, 0.1, HIGH_TIP, decimals=1, suffix=" %")
        percentiles = QHBoxLayout()
        percentiles.addWidget(QLabel("dark"))
        percentiles.addWidget(self.low)
        percentiles.addWidget(QLabel("bright"))
        percentiles.addWidget(self.high)
        self.diameter_mode = QComboBox()
        self.diameter_mode.addItems(list(DIAMETER_CHOICES))
        self.diameter_mode.setToolTip(DIAMETER_TIP)
        self.diameter = self._spin(QDoubleSpinBox(), 1.0, 10_000.0, 1.0, DIAMETER_TIP, decimals=1, suffix=" px")
        self.diameter.setSpecialValueText("")
        self.diameter.setValue(30.0)
        self.diameter.setEnabled(False)
        self.diameter_mode.currentTextChanged.connect(lambda text: self.diameter.setEnabled(text == "pixels"))
        diameter = QHBoxLayout()
        diameter.addWidget(self.diameter_mode)
        diameter.addWidget(self.diameter)
        self.stitch = QCheckBox("link objects across planes")
        self.stitch.setToolTip(STITCH_TIP)
        self.stitch_overlap = QDoubleSpinBox()
        self.stitch_overlap.setDecimals(2)
        self.stitch_overlap.setRange(0.05, 1.0)
        self.stitch_overlap.setSingleStep(0.05)
        self.stitch_overlap.setValue(STITCH_THRESHOLD)
        self.stitch_overlap.setToolTip(STITCH_TIP)
        self.stitch_overlap.setEnabled(False)
        self.stitch.toggled.connect(self.stitch_overlap.setEnabled)
        stitch = QHBoxLayout()
        stitch.addWidget(self.stitch)
        stitch.addWidget(QLabel("overlap"))
        stitch.addWidget(self.stitch_overlap)

        form = QFormLayout()
        form.addRow("model", self.model)
        form.addRow("checkpoint", path_row)
        form.addRow("image layer", self.image)
        form.addRow("tile size", self.tile_size)
        form.addRow("TTA", self.tta)
        if self.backend.count():
            form.addRow("backend", self.backend)
        form.addRow("precision", self.precision)
        form.addRow("threshold", self.threshold)
        form.addRow("minimum object size", self.min_size)
        form.addRow("normalisation percentiles", percentiles)
        form.addRow("object diameter", diameter)
        form.addRow("z-stacks, time series", stitch)

        self.segment_button = QPushButton("Segment")
        self.segment_button.clicked.connect(self.segment)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.segment_button)
        buttons.addWidget(self.cancel_button)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.message = QLabel()
        self.message.setWordWrap(True)

        self.train_labels = QComboBox()
        self.train_labels.setToolTip(TRAIN_LABELS_TIP)
        self.seconds = QSpinBox()
        self.seconds.setRange(1, 24 * 3600)
        self.seconds.setValue(60)
        self.seconds.setSuffix(" s")
        self.seconds.setToolTip(SECONDS_TIP)
        self.resegment = QCheckBox("segment again with the new model")
        self.resegment.setChecked(True)
        self.train_button = QPushButton("Fine-tune")
        self.train_button.setToolTip("Train the model further on the image and its corrected labels")
        self.train_button.clicked.connect(self.fine_tune)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("End fine-tuning now; the best model so far is kept")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        self.save_button = QPushButton("Save model...")
        self.save_button.setToolTip("Keep the fine-tuned model: copy its run folder (best.pt and its records) to a folder")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self._save_dialog)
        self.train_progress = QProgressBar()
        self.train_progress.setRange(0, 1000)
        self.train_progress.setValue(0)
        self.loss_plot = LossPlot()
        train_buttons = QHBoxLayout()
        train_buttons.addWidget(self.train_button)
        train_buttons.addWidget(self.stop_button)
        train_buttons.addWidget(self.save_button)
        training = QFormLayout()
        training.addRow("corrected labels", self.train_labels)
        training.addRow("training time", self.seconds)
        training.addRow(self.resegment)
        training.addRow(train_buttons)
        training.addRow(self.train_progress)
        training.addRow(self.loss_plot)
        training_box = QGroupBox("Fine-tune on corrected labels")
        training_box.setLayout(training)

        self.prediction = QComboBox()
        self.truth = QComboBox()
        self.evaluate_button = QPushButton("Evaluate")
        self.evaluate_button.clicked.connect(self.evaluate)
        self.evaluate_hint = QLabel()
        self.evaluate_hint.setWordWrap(True)
        self.scores_text = QLabel()
        self.scores_text.setFont(QFont("monospace"))
        evaluation = QFormLayout()
        evaluation.addRow("labels", self.prediction)
        evaluation.addRow("ground truth", self.truth)
        evaluation.addRow(self.evaluate_button)
        evaluation.addRow(self.evaluate_hint)
        evaluation.addRow(self.scores_text)
        evaluation_box = QGroupBox("Evaluate")
        evaluation_box.setLayout(evaluation)

        layout = QVBoxLayout()
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.message)
        layout.addWidget(training_box)
        layout.addWidget(evaluation_box)
        layout.addStretch()
        self.setLayout(layout)

        self.model.currentTextChanged.connect(self._model_changed)
        self._model_changed(self.model.currentText())
        self.prediction.currentTextChanged.connect(self._check_evaluation)
        self.truth.currentTextChanged.connect(self._check_evaluation)
        events = self.viewer.layers.events
        for event in (events.inserted, events.removed, events.moved):
            event.connect(self._refresh_layers)
        self.viewer.layers.selection.events.active.connect(self._follow_selection)
        self._refresh_layers()

    @staticmethod
    def _spin(spin: Any, low: float, high: float, step: float, tip: str, *, decimals: int | None = None,
              suffix: str = "") -> Any:
        """A spin box whose minimum reads "as trained"."""
        if decimals is not None:
            spin.setDecimals(decimals)
        spin.setRange(low, high)
        spin.setSingleStep(step)
        spin.setSpecialValueText(AS_TRAINED)
        spin.setValue(low)
        spin.setSuffix(suffix)
        spin.setToolTip(tip)
        return spin

    @staticmethod
    def _value(spin: Any) -> Any:
        """The spin box's value, None when it is left "as trained"."""
        return None if spin.value() == spin.minimum() else spin.value()

    # -- choices -------------------------------------------------------------------------------
    def model_source(self) -> str:
        """The packaged model's name, or the checkpoint path typed or browsed."""
        chosen = self.model.currentText()
        return self.path.text().strip() if chosen == CHECKPOINT_FILE else chosen

    def diameter_choice(self) -> float | str | None:
        """The object diameter control: None ("as trained"), "auto" or pixels."""
        mode = self.diameter_mode.currentText()
        return None if mode == AS_TRAINED else ("auto" if mode == "auto" else float(self.diameter.value()))

    def percentiles(self, loaded: Any) -> tuple[float, float] | None:
        """The normalisation percentiles asked for (the checkpoint's where left "as trained"); None when
        both are left, so the checkpoint's normalisation is used unchanged."""
        low, high = self._value(self.low), self._value(self.high)
        if low is None and high is None:
            return None
        stored = percentile_range(loaded)
        if stored is None:
            raise InputError(f"this model normalises images with a {loaded.normalization.mode} scale, not percentiles; "
                             "set both normalisation percentiles to 'as trained'")
        return (stored[0] if low is None else low, stored[1] if high is None else high)

    def stitch_choice(self) -> float | None:
        """The overlap at which objects are linked across the planes of a stack; None when they are not."""
        return float(self.stitch_overlap.value()) if self.stitch.isChecked() else None

    def inference_options(self) -> Any:
        """The `unetkit.inference.InferenceOptions` the controls ask for (InputError for a bad choice)."""
        return inference_options(tta=TTA_CHOICES[self.tta.currentText()], tile_size=self.tile_size.value() or None,
                                 backend=self.backend.currentText() or None, threshold=self._value(self.threshold),
                                 min_size=self._value(self.min_size), diameter=self.diameter_choice(),
                                 precision=self.precision.currentText())

    def _model_changed(self, text: str) -> None:
        self.path.setEnabled(text == CHECKPOINT_FILE)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "unetkit checkpoint", "", "Checkpoints (*.pt);;All files (*)")
        if path:
            self.model.setCurrentText(CHECKPOINT_FILE)
            self.path.setText(path)

    def _refresh_layers(self, event: Any = None) -> None:
        from napari.layers import Image, Labels

        layers = list(self.viewer.layers)
        for layer in layers:  # renamed layers show under their new name
            layer.events.name.disconnect(self._refresh_layers)
            layer.events.name.connect(self._refresh_layers)
        images = [layer.name for layer in layers if isinstance(layer, Image)]
        labels = [layer.name for layer in layers if isinstance(layer, Labels)]
        active = self.viewer.layers.selection.active
        self._fill(self.image, images, active.name if isinstance(active, Image) and not self._adding else None)
        self._fill(self.prediction, labels, self.result_name("labels"))
        self._fill(self.truth, labels, truth_choice(labels, self.prediction.currentText(), self.truth.currentText(),
                                                    avoid=list(self._written)))
        self._fill(self.train_labels, labels, None)
        self._check_evaluation()

    def _follow_selection(self, event: Any = None) -> None:
        """The image layer selected in the layer list becomes the one to segment."""
        from napari.layers import Image

        active = self.viewer.layers.selection.active
        if isinstance(active, Image) and not self._adding and active.name in [self.image.itemText(i) for i in range(self.image.count())]:
            self.image.setCurrentText(active.name)

    @staticmethod
    def _fill(combo: QComboBox, names: list[str], prefer: str | None) -> None:
        """Offer `names`, choosing `prefer` if given ("" chooses none), else the current choice while it
        is there, else the first."""
        current = combo.currentText()
        combo.blockSignals(True)
        combo.clear()
        combo.addItems(names)
        if prefer == "":
            combo.setCurrentIndex(-1)
        for choice in (prefer, current) if prefer != "" else ():
            if choice in names:
                combo.setCurrentText(choice)
                break
        combo.blockSignals(False)

    def result_name(self, kind: str) -> str | None:
        """The name of the labels layer the last segmentation wrote (kind "labels")."""
        if self.result is None:
            return None
        return self._result_labels if kind == "labels" else f"{self._result_source} {kind}"

    def _say(self, text: str, error: bool = False) -> None:
        self.message.setStyleSheet("color: #e0604a;" if error else "")
        self.message.setText(text)

    # -- segmentation ----------------------------------------------------------------------------
    def segment(self) -> None:
        """Check the choices, then segment the chosen image layer in a worker thread: a 2D image at
        once, a stack plane by plane (2D model) or as one volume (3D model)."""
        if self._worker is not None:
            return
        try:
            job, name, layer, loaded, planes = self._segment_job()
        except InputError as exc:
            self._say(str(exc), error=True)
            return
        source = self.model_source()
        if is_volume_model(loaded):
            what = f"the z-stack {name!r} ({' x '.join(str(int(n)) for n in layer.level_shapes[0])}) as one volume"
        elif planes:
            what = f"{name!r} plane by plane ({planes} planes)"
        else:
            what = repr(name)
        self._say(f"segmenting {what} with {describe_model(loaded, source)}...")
        if planes:
            self.progress.setFormat("plane %v of %m")
            self.progress.setRange(0, planes)
            self.progress.setValue(0)
        else:
            self.progress.setFormat("%p%")
            self.progress.setRange(0, 0)  # busy until the first batch of tiles reports
        self._start(job, lambda done: self._segmented(*done, name, source), busy=True, steps=planes or 1)

    def _segment_job(self) -> tuple[Callable[[], tuple[Any, list]], str, Any, Any, int]:
        """The work of Segment for the chosen layer and model, checked here (InputError); with the
        layer's name, the layer, the model and the number of planes the progress bar counts (0: tiles)."""
        name = self.image.currentText()
        if not name or name not in self.viewer.layers:
            raise InputError("no image layer to segment: open an image (File > Open) or choose one in 'image layer'")
        layer = self.viewer.layers[name]
        source = self.model_source()
        loaded = load_model(source)
        rgb = bool(getattr(layer, "rgb", False))
        kind = layer_kind(layer.data, rgb=rgb, name=name)
        options = self.inference_options()
        tile_size = check_tile_size(loaded, options.tile_size) if not is_volume_model(loaded) else None
        percentiles = self.percentiles(loaded)
        diameter = options.diameter
        stitch = self.stitch_choice()
        axes = 2 if kind == "image" else 3
        common = {"scale": tuple(layer.scale)[-axes:], "translate": tuple(layer.translate)[-axes:]}  # drawn over the image
        cancelled = self._cancel.is_set

        def layers_of(result: Any, probabilities: np.ndarray) -> list:
            from napari.layers import Layer

            # Layers are built here, off the main thread: their first construction alone takes
            # about a second (napari imports pandas for the labels layer's features).
            data = [*probability_layers(probabilities, name, loaded.class_names, **common),
                    labels_layer(result.labels, name, **common)]
            return [Layer.create(*item) for item in data]

        if is_volume_model(loaded):
            volume = layer_volume(layer.data, rgb=rgb, name=name, in_channels=loaded.model.in_channels)
            ignored = self._ignored_for_volumes(options, tile_size=self.tile_size.value(), stitch=stitch)

            def volume_job() -> tuple[Any, list]:
                result = segment_volume_layer(loaded, volume, tta=options.tta, device=options.device,
                                              threshold=options.threshold, min_size=options.min_size,
                                              percentiles=percentiles, cancelled=cancelled)
                result.notes.extend(ignored)
                return result, layers_of(result, result.probabilities)

            return volume_job, name, layer, loaded, 0

        if kind == "stack":
            stack = layer_stack(layer.data, rgb=rgb, name=name, in_channels=loaded.model.in_channels)

            def stack_job() -> tuple[Any, list]:
                result = segment_planes(loaded, stack, source=source, name=name, stitch=stitch, tile_size=tile_size,
                                        tta=options.tta, backend=options.backend, threshold=options.threshold,
                                        min_size=options.min_size, diameter=diameter, precision=options.precision,
                                        percentiles=percentiles, progress=self._relay.planes.emit, cancelled=cancelled)
                return result, layers_of(result, np.moveaxis(result.probabilities, 1, 0))  # classes first

            return stack_job, name, layer, loaded, len(stack)

        image = layer_image(layer.data, rgb=rgb, name=name, in_channels=loaded.model.in_channels)

        def job() -> tuple[Segmentation, list]:
            result = segment_image(loaded, image, source=source, name=name, tile_size=tile_size, tta=options.tta,
                                   backend=options.backend, threshold=options.threshold, min_size=options.min_size,
                                   diameter=diameter, precision=options.precision, percentiles=percentiles,
                                   progress=self._relay.progress.emit, cancelled=cancelled)
            return result, layers_of(result, result.probabilities)

        return job, name, layer, loaded, 0

    @staticmethod
    def _ignored_for_volumes(options: Any, *, tile_size: int, stitch: float | None) -> list[str]:
        """Notes on the controls a 3D model does not use, when they are set."""
        ignored = [label for label, used in (
            ("tile size", bool(tile_size)), ("backend", options.backend not in (None, "auto")),
            ("precision", options.precision != "fp32"), ("object diameter", options.diameter is not None),
            ("link objects across planes", stitch is not None)) if used]
        if not ignored:
            return []
        return [f"{', '.join(ignored)}: not used by a 3D model (it predicts the whole volume at fp32 with "
                "automatic tiles, and its objects are 3D already)"]

    def _segmented(self, result: Any, layers: list, name: str, source: str) -> None:
        self.result = result
        self._result_source = name
        labels = layers[-1]
        labels.name = self._labels_name(labels.name, source)
        self._adding = True
        try:
            for layer in layers:
                self._show(layer)
        finally:
            self._adding = False
        self._result_labels = labels.name
        self._written[labels.name] = (np.array(result.labels), source)
        notes = "".join(f"\nnote: {note}" for note in result.notes)
        self._say(f"{name!r}: {result.summary()} in labels layer {labels.name!r}{notes}")
        self._refresh_layers()
        self.train_labels.setCurrentText(labels.name)  # what the user corrects next

    def _labels_name(self, name: str, source: str) -> str:
        """`name`, unless a labels layer of that name holds the user's corrections or another model's
        result: then the first free "name 2", "name 3", ... so nothing the user painted is replaced."""
        base, number = name, 1
        while name in self.viewer.layers:
            written = self._written.get(name)
            existing = self.viewer.layers[name]
            if written is not None and written[1] == source and np.array_equal(np.asarray(existing.data), written[0]):
                break  # the widget's own, unchanged result of the same model: replace it
            number += 1
            name = f"{base} {number}"
        return name

    def _show(self, layer: Any) -> None:
        """Add a layer, or replace the data of the layer of that name and type (a second run)."""
        existing = self.viewer.layers[layer.name] if layer.name in self.viewer.layers else None
        if existing is not None and type(existing) is type(layer) and existing.ndim == layer.ndim:
            existing.data = layer.data
            existing.scale, existing.translate = layer.scale, layer.translate
            return
        if existing is not None and type(existing) is type(layer):  # a 2D result where a stack's was, or back
            self.viewer.layers.remove(existing)
        self.viewer.add_layer(layer)

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.setRange(0, total)
        self.progress.setValue(done)

    def _on_planes(self, done: int, total: int) -> None:
        self.progress.setFormat("plane %v of %m")
        self.progress.setRange(0, total)
        self.progress.setValue(done)

    def cancel(self) -> None:
        """Stop the running segmentation at its next batch of tiles (of a plane, or of a volume)."""
        if self._worker is not None:
            self._cancel.set()
            self._say("cancelling...")

    # -- fine-tuning -----------------------------------------------------------------------------
    def fine_tune(self) -> None:
        """Fine-tune the model on the chosen image and its corrected labels in a worker thread; then
        segment the image again with the new model (if so chosen)."""
        if self._worker is not None:
            return
        try:
            job, name, labels_name, start = self._fine_tune_job()
        except InputError as exc:
            self._say(str(exc), error=True)
            return
        self.history = []
        self.loss_plot.clear()
        self.train_progress.setValue(0)
        self._stop.clear()
        self._say(f"fine-tuning {start} on {name!r} with labels {labels_name!r} for {self.seconds.value()} s...")
        self._start(job, lambda best: self._fine_tuned(best, name), busy=False)
        self.stop_button.setEnabled(True)

    def _fine_tune_job(self) -> tuple[Callable[[], Path], str, str, str]:
        name = self.image.currentText()
        if not name or name not in self.viewer.layers:
            raise InputError("no image layer to train on: open an image (File > Open) or choose one in 'image layer'")
        labels_name = self.train_labels.currentText()
        if not labels_name or labels_name not in self.viewer.layers:
            raise InputError("no labels layer to learn from: segment the image, correct its labels layer with the paint "
                             "and erase tools, and choose it under 'corrected labels'")
        layer = self.viewer.layers[name]
        start = self.model_source()
        loaded = load_model(start)
        if is_volume_model(loaded):
            raise InputError("this is a 3D model; the widget fine-tunes 2D models on one image and its corrected labels "
                             "(train 3D models with `unetkit train`)")
        image = layer_image(layer.data, rgb=bool(getattr(layer, "rgb", False)), name=name,
                            in_channels=loaded.model.in_channels,
                            task="fine-tuning learns from one 2D image and its corrected labels")
        image, labels = training_pair(image, self.viewer.layers[labels_name].data, image_name=name, labels_name=labels_name)
        run_dir = new_run_dir()
        seconds = float(self.seconds.value())

        def job() -> Path:
            return run_fine_tune(start, [image], [labels], run_dir, seconds=seconds, callback=self._relay.trained.emit,
                                 should_stop=self._stop.is_set)

        return job, name, labels_name, start

    def _on_trained(self, report: dict) -> None:
        self.history.append(report)
        if "loss" in report:
            self.loss_plot.add(report.get("iteration", len(self.history)), float(report["loss"]))
        budget = float(report.get("budget") or self.seconds.value() or 1)
        self.train_progress.setValue(int(min(1.0, float(report.get("seconds", 0.0)) / budget) * 1000))

    def _fine_tuned(self, best: Path, name: str) -> None:
        self.run_dir = Path(best).parent
        self.train_progress.setValue(1000)
        self.model.setCurrentText(CHECKPOINT_FILE)
        self.path.setText(str(best))
        self.save_button.setEnabled(True)
        stopped = " (stopped early)" if self._stop.is_set() else ""
        self._say(f"fine-tuned{stopped}: {best} (a temporary folder: Save model keeps it)")
        if self.resegment.isChecked() and name in self.viewer.layers:
            self.image.setCurrentText(name)
            self._then = self.segment

    def stop(self) -> None:
        """End fine-tuning at its next iteration (best.pt is still written)."""
        if self._worker is not None:
            self._stop.set()
            self._say("stopping: the best model so far is being written...")

    def save_model(self, folder: str | Path, *, force: bool = False) -> Path | None:
        """Copy the fine-tuned run folder into `folder`; a non-empty folder only with `force`.
        Returns the saved best.pt, or None (with the reason in the widget)."""
        if self.run_dir is None:
            self._say("nothing to save yet: fine-tune a model first", error=True)
            return None
        try:
            best = save_run(self.run_dir, folder, force=force)
        except (InputError, OSError) as exc:
            self._say(str(exc), error=True)
            return None
        self.run_dir = best.parent
        self.model.setCurrentText(CHECKPOINT_FILE)
        self.path.setText(str(best))
        self._say(f"model saved: {best}")
        return best

    def _save_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save the fine-tuned model (a run folder)")
        if not folder:
            return
        force = False
        entries = folder_entries(folder)
        if entries:
            answer = QMessageBox.question(
                self, "Folder not empty",
                f"{folder} already holds {entries} entries. Files of the same names (best.pt, ...) will be replaced. "
                "Save there anyway?")
            if answer != QMessageBox.Yes:
                self._say("not saved: choose an empty or new folder")
                return
            force = True
        self.save_model(folder, force=force)

    # -- evaluation ------------------------------------------------------------------------------
    def _check_evaluation(self, text: str = "") -> None:
        """Allow Evaluate only with two different labels layers; otherwise say what is missing."""
        prediction, truth = self.prediction.currentText(), self.truth.currentText()
        if not prediction or not truth:
            hint = ("open the ground-truth mask (File > Open) and choose it under 'ground truth' to score the "
                    "segmentation")
        elif prediction == truth:
            hint = f"{truth!r} is chosen as both the segmentation and the ground truth; choose another ground truth"
        else:
            hint = ""
        self.evaluate_hint.setText(hint)
        self.evaluate_button.setEnabled(not hint and self._worker is None)

    def evaluate(self) -> None:
        """Score the chosen labels layer against the ground-truth labels layer (in a worker thread)."""
        if self._worker is not None:
            return
        names = (self.prediction.currentText(), self.truth.currentText())
        if not all(names) or not all(n in self.viewer.layers for n in names):
            self._say("evaluation needs two labels layers: the segmentation and the ground truth (open the mask "
                      "with File > Open, then choose it under 'ground truth')", error=True)
            return
        if names[0] == names[1]:
            self._say(f"{names[0]!r} is chosen as both the segmentation and the ground truth; choose the ground-truth "
                      "labels layer (open the mask with File > Open)", error=True)
            return
        prediction, truth = (self.viewer.layers[n].data for n in names)
        self._say(f"scoring {names[0]!r} against {names[1]!r}...")
        self.progress.setRange(0, 0)

        def job() -> tuple[dict[str, Any], list[str]]:
            return evaluate_labels(prediction, truth, WIDGET_METRICS, names=(f"labels {names[0]!r}", f"ground truth {names[1]!r}"))

        self._start(job, lambda result: self._evaluated(result, names), busy=False)

    def _evaluated(self, result: tuple[dict[str, Any], list[str]], names: tuple[str, str]) -> None:
        self.scores, notes = result
        self.scores_text.setText(format_scores(self.scores))
        self._say(f"{names[0]!r} against {names[1]!r}" + "".join(f"\nnote: {n}" for n in notes))

    # -- the worker --------------------------------------------------------------------------------
    def _start(self, job: Callable[[], Any], done: Callable[[Any], None], busy: bool, steps: int = 1) -> None:
        self._cancel.clear()
        self._succeeded = False
        self._steps = steps
        if steps == 1:
            self.progress.setFormat("%p%")
        self._then = None
        worker = create_worker(job, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(done)
        worker.returned.connect(self._returned)
        worker.errored.connect(self._failed)
        worker.finished.connect(self._finished)
        self._worker = worker
        for button in (self.segment_button, self.evaluate_button, self.train_button, self.save_button):
            button.setEnabled(False)
        self.cancel_button.setEnabled(busy)
        worker.start()

    def _returned(self, result: Any) -> None:
        self._succeeded = True

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, Cancelled):
            self._say(f"cancelled ({exc}); nothing was added")
        elif isinstance(exc, InputError):
            self._say(str(exc), error=True)
        else:  # a message in the widget, not a traceback in the console
            self._say(f"failed: {type(exc).__name__}: {exc}", error=True)

    def _finished(self) -> None:
        self._worker = None
        if not self._succeeded:
            self.progress.setFormat("%p%")
        self.progress.setRange(0, self._steps if self._succeeded else 1)
        self.progress.setValue(self._steps if self._succeeded else 0)
        self.segment_button.setEnabled(True)
        self.train_button.setEnabled(True)
        self.save_button.setEnabled(self.run_dir is not None)
        self.cancel_button.setEnabled(False)
        self.stop_button.setEnabled(False)
        self._check_evaluation()
        then, self._then = self._then, None
        if then is not None:
            then()

    @property
    def busy(self) -> bool:
        """True while a segmentation, fine-tuning or evaluation runs."""
        return self._worker is not None
