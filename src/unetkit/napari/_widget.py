"""The napari widget: segment the chosen image layer with a U-Net, and score labels against ground truth.

Segmentation runs in a worker thread (superqt's `create_worker`) so the viewer stays responsive;
the prediction reports each batch of tiles to a progress bar through a Qt signal, and Cancel stops
it at the next batch. The worker also builds the result layers (a probability layer per
foreground class and a labels layer drawn as `unetkit predict` draws them); the main thread only
adds them to the viewer. Mistakes (no image
layer, a layer with the wrong channel count, an illegal tile size, an unreadable checkpoint) are
shown in the widget. The work itself is in `unetkit.napari._segment`.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from qtpy.QtCore import QObject, Signal
from qtpy.QtGui import QFont
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import create_worker

from ..errors import InputError
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
    installed_models,
    layer_image,
    load_model,
    segment_image,
    truth_choice,
)

#: The model menu's entry that reads the path field instead of a packaged model.
CHECKPOINT_FILE = "checkpoint file"


class _Relay(QObject):
    """Carries progress from the worker thread to the widget (Qt queues it to the main thread)."""

    progress = Signal(int, int)


class SegmentWidget(QWidget):
    """Segment the chosen image layer; evaluate a labels layer against a ground-truth labels layer.

    Works with a `napari.Viewer` or a bare `napari.components.ViewerModel` (tests).

    Example:
        >>> widget = SegmentWidget(viewer)  # doctest: +SKIP
        >>> widget.model.setCurrentText("dic-hela"); widget.segment_button.click()  # doctest: +SKIP
    """

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.result: Segmentation | None = None  # the last segmentation
        self.scores: dict[str, Any] | None = None  # the last evaluation
        self._worker = None
        self._succeeded = False
        self._adding = False  # the widget is adding its own result layers (they must not become the input)
        self._result_source = ""
        self._cancel = threading.Event()
        self._relay = _Relay()
        self._relay.progress.connect(self._on_progress)

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

        form = QFormLayout()
        form.addRow("model", self.model)
        form.addRow("checkpoint", path_row)
        form.addRow("image layer", self.image)
        form.addRow("tile size", self.tile_size)
        form.addRow("TTA", self.tta)
        if self.backend.count():
            form.addRow("backend", self.backend)

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

        self.prediction = QComboBox()
        self.truth = QComboBox()
        self.evaluate_button = QPushButton("Evaluate")
        self.evaluate_button.clicked.connect(self.evaluate)
        self.scores_text = QLabel()
        self.scores_text.setFont(QFont("monospace"))
        evaluation = QFormLayout()
        evaluation.addRow("labels", self.prediction)
        evaluation.addRow("ground truth", self.truth)
        evaluation.addRow(self.evaluate_button)
        evaluation.addRow(self.scores_text)
        evaluation_box = QGroupBox("Evaluate")
        evaluation_box.setLayout(evaluation)

        layout = QVBoxLayout()
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.message)
        layout.addWidget(evaluation_box)
        layout.addStretch()
        self.setLayout(layout)

        self.model.currentTextChanged.connect(self._model_changed)
        self._model_changed(self.model.currentText())
        events = self.viewer.layers.events
        for event in (events.inserted, events.removed, events.moved):
            event.connect(self._refresh_layers)
        self.viewer.layers.selection.events.active.connect(self._follow_selection)
        self._refresh_layers()

    # -- choices -------------------------------------------------------------------------------
    def model_source(self) -> str:
        """The packaged model's name, or the checkpoint path typed or browsed."""
        chosen = self.model.currentText()
        return self.path.text().strip() if chosen == CHECKPOINT_FILE else chosen

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
        self._fill(self.truth, labels, truth_choice(labels, self.prediction.currentText(), self.truth.currentText()))

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
        """The name of the labels layer the last segmentation added (kind "labels")."""
        if self.result is None:
            return None
        return f"{self._result_source} {kind}"

    def _say(self, text: str, error: bool = False) -> None:
        self.message.setStyleSheet("color: #e0604a;" if error else "")
        self.message.setText(text)

    # -- segmentation ----------------------------------------------------------------------------
    def segment(self) -> None:
        """Check the choices, then segment the chosen image layer in a worker thread."""
        if self._worker is not None:
            return
        try:
            job, name, layer, loaded = self._segment_job()
        except InputError as exc:
            self._say(str(exc), error=True)
            return
        self._say(f"segmenting {name!r} with {describe_model(loaded, self.model_source())}...")
        self.progress.setRange(0, 0)  # busy until the first batch of tiles reports
        self._start(job, lambda done: self._segmented(*done, name), busy=True)

    def _segment_job(self) -> tuple[Callable[[], tuple[Segmentation, list]], str, Any, Any]:
        name = self.image.currentText()
        if not name or name not in self.viewer.layers:
            raise InputError("no image layer to segment: open an image (File > Open) or choose one in 'image layer'")
        layer = self.viewer.layers[name]
        source = self.model_source()
        loaded = load_model(source)
        image = layer_image(layer.data, rgb=bool(getattr(layer, "rgb", False)), name=name,
                            in_channels=loaded.model.in_channels)
        tile_size = check_tile_size(loaded, self.tile_size.value() or None)
        tta = TTA_CHOICES[self.tta.currentText()]
        backend = self.backend.currentText() or None

        common = {"scale": tuple(layer.scale)[-2:], "translate": tuple(layer.translate)[-2:]}  # drawn over the image

        def job() -> tuple[Segmentation, list]:
            from napari.layers import Layer

            result = segment_image(loaded, image, source=source, name=name, tile_size=tile_size, tta=tta, backend=backend,
                                   progress=self._relay.progress.emit, cancelled=self._cancel.is_set)
            # Layers are built here, off the main thread: their first construction alone takes
            # about a second (napari imports pandas for the labels layer's features).
            data = [*probability_layers(result.probabilities, name, loaded.class_names, **common),
                    labels_layer(result.labels, name, **common)]
            return result, [Layer.create(*item) for item in data]

        return job, name, layer, loaded

    def _segmented(self, result: Segmentation, layers: list, name: str) -> None:
        self.result = result
        self._result_source = name
        self._adding = True
        try:
            for layer in layers:
                self._show(layer)
        finally:
            self._adding = False
        notes = "".join(f"\nnote: {note}" for note in result.notes)
        self._say(f"{name!r}: {result.summary()}{notes}")
        self._refresh_layers()

    def _show(self, layer: Any) -> None:
        """Add a layer, or replace the data of the layer of that name and type (a second run)."""
        existing = self.viewer.layers[layer.name] if layer.name in self.viewer.layers else None
        if existing is not None and type(existing) is type(layer):
            existing.data = layer.data
        else:
            self.viewer.add_layer(layer)

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.setRange(0, total)
        self.progress.setValue(done)

    def cancel(self) -> None:
        """Stop the running segmentation at its next batch of tiles."""
        if self._worker is not None:
            self._cancel.set()
            self._say("cancelling...")

    # -- evaluation ------------------------------------------------------------------------------
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
    def _start(self, job: Callable[[], Any], done: Callable[[Any], None], busy: bool) -> None:
        self._cancel.clear()
        self._succeeded = False
        worker = create_worker(job, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(done)
        worker.returned.connect(self._returned)
        worker.errored.connect(self._failed)
        worker.finished.connect(self._finished)
        self._worker = worker
        self.segment_button.setEnabled(False)
        self.evaluate_button.setEnabled(False)
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
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if self._succeeded else 0)
        self.segment_button.setEnabled(True)
        self.evaluate_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    @property
    def busy(self) -> bool:
        """True while a segmentation or evaluation runs."""
        return self._worker is not None
