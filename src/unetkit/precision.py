"""Reduced-precision inference (bf16, int8) where the CPU has it, chosen only when the scores hold.

* "fp32": the network as trained.
* "bf16": torch autocast (bfloat16 on the CPU, float16 or bfloat16 on a GPU); the softmax and the
  sums of test-time augmentation stay float32. Only on CPUs with native bf16 (AVX512-BF16 or AMX),
  where oneDNN runs it without emulation.
* "int8": onnxruntime running a statically quantised copy of the network's ONNX graph (QDQ, int8
  per-channel weights, uint8 activations), calibrated once on tiles of representative images (a
  packaged model's training images, a run's training images from RUN/data.json) and cached beside
  the float graph (`unetkit.backends.int8_graph_path`). Each image's own batch-norm statistics work
  too: they stay float inputs of a second quantised graph, calibrated with each calibration
  image's own statistics.
* "auto": the fastest precision that the machine runs natively, whose stored validation score is
  within `SCORE_TOLERANCE` of fp32's, measured once per model, tile, threads and CPU and remembered
  with the backend choices (`unetkit.backends`). Without stored scores it stays fp32 and says why.

Stored scores (`score_precisions`) are a dict {"task", "score", "tta", "norm_statistics",
"scored_on", "rule_scores": {"fp32": ..., "bf16": ..., "int8": ...}}: packaged models keep it in
models.json ("precision_scores"), a run's checkpoint beside it (`scores_path`).

Example:
    >>> choice = choose("auto", device="cpu", backend="auto", scores=None)
    >>> choice.run, choice.reason
    ('fp32', 'no stored per-precision validation scores')
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import backends
from .backends import (  # noqa: F401 - what runs here is decided in backends; re-exported
    CALIBRATION_IMAGES, PRECISIONS, bf16_native, check_name, check_runnable, int8_available,
)
from .errors import InputError

#: How much worse than fp32's a precision's stored validation score may be for "auto" to choose it,
#: or for an explicit request to be accepted: on the labels rule's own score (Rand error for
#: membranes, lower is better; the mean of SEG and PQ@0.5 for objects, higher is better), both in [0, 1].
#: 0.005 is half a percentage point of SEG/PQ, and a fifth of em-membranes' fp32 Rand error (0.0255).
SCORE_TOLERANCE = 0.005


# -- stored scores ------------------------------------------------------------------------------


def worse_by(scores: dict[str, Any], precision: str) -> float | None:
    """How much worse `precision`'s stored rule score is than fp32's (negative: better); None if
    either is missing.

    Example:
        >>> round(worse_by({"task": "membranes", "rule_scores": {"fp32": 0.020, "int8": 0.023}}, "int8"), 3)
        0.003
    """
    values = (scores or {}).get("rule_scores") or {}
    if not isinstance(values.get("fp32"), (int, float)) or not isinstance(values.get(precision), (int, float)):
        return None
    difference = float(values[precision]) - float(values["fp32"])
    return difference if scores.get("task") == "membranes" else -difference


def scores_path(checkpoint: str | os.PathLike) -> Path:
    """Where a checkpoint's per-precision scores are kept: beside it (RUN/best.pt -> RUN/best.precision.json)."""
    path = Path(checkpoint)
    return path.with_name(path.stem + ".precision.json")


def record_run_scores(checkpoint: str | os.PathLike, scores: dict[str, Any]) -> Path:
    """Store `score_precisions`' result for `checkpoint` (atomically, beside it); returns the file."""
    from .io import atomic_write

    text = json.dumps(scores, indent=2, sort_keys=True, default=float)
    return atomic_write(scores_path(checkpoint), lambda tmp: Path(tmp).write_text(text + "\n"), force=True)


def stored_scores(source) -> dict[str, Any] | None:
    """The per-precision validation scores stored for a packaged model name or checkpoint path (None if none)."""
    from .pretrained import get_model, pretrained_name

    if source is None:
        return None
    name = pretrained_name(source)
    if name is not None:
        return get_model(name).precision_scores or None
    path = scores_path(source)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- the choice ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrecisionChoice:
    """What runs the network: `run` is "fp32", "bf16", "int8", or a tuple of them (the fastest,
    measured once); `reason` says why, `requested` what was asked."""

    run: str | tuple[str, ...] = "fp32"
    reason: str = "as asked"
    requested: str = "fp32"

    def describe(self) -> str:
        """E.g. "precision fp32 (auto: no stored per-precision validation scores)".

        Example:
            >>> PrecisionChoice(("fp32", "int8"), "scores within 0.005 of fp32's", "auto").describe()
            "precision the fastest of fp32, int8 (auto: scores within 0.005 of fp32's)"
        """
        if self.requested == "auto":
            return f"precision {self.auto_text()} (auto: {self.reason})"
        return f"precision {self.run}" + ("" if self.reason == "as asked" else f" ({self.reason})")

    def auto_text(self) -> str:
        return self.run if isinstance(self.run, str) else f"the fastest of {', '.join(self.run)}"


def choose(requested: str, *, device, backend: str, scores: dict[str, Any] | None,
           int8_ready: bool = True) -> PrecisionChoice:
    """Resolve `requested` for a model whose stored scores are `scores` (None: none stored).

    `int8_ready`: an int8 graph can be had (calibration images are known, or the graph is cached).
    An explicit precision that cannot run here, or that the stored scores rule out, raises
    InputError naming the fix and what "auto" would choose.

    Example:
        >>> stored = {"task": "objects", "rule_scores": {"fp32": 0.80, "bf16": 0.79}}
        >>> choose("bf16", device="cpu", backend="auto", scores=stored)
        Traceback (most recent call last):
        ...
        unetkit.errors.InputError: precision bf16 scored 0.0100 worse than fp32 in the stored scores (allowed 0.005); use --precision fp32 (auto would choose fp32)
    """
    check_name(requested)
    if requested == "auto":
        return _auto(device, backend, scores, int8_ready)
    if requested == "fp32":
        return PrecisionChoice("fp32", "as asked", "fp32")
    auto = _auto(device, backend, scores, int8_ready)
    hint = f" (auto would choose {auto.auto_text()})"
    try:
        check_runnable(requested, backend, device)
    except InputError as exc:
        raise InputError(f"{exc}{hint}") from None
    if requested == "int8" and not int8_ready:
        raise InputError("precision int8 needs calibration images to quantise the network once, and none are known for "
                         f"this checkpoint (a packaged model, or RUN/best.pt with RUN/data.json); use --precision fp32{hint}")
    worse = worse_by(scores or {}, requested)
    if worse is not None and worse > SCORE_TOLERANCE:
        raise InputError(f"precision {requested} scored {worse:.4f} worse than fp32 in the stored scores (allowed "
                         f"{SCORE_TOLERANCE:g}); use --precision fp32{hint}")
    reason = "as asked" if worse is not None else "no stored validation score for it"
    return PrecisionChoice(requested, reason, requested)


def for_model(model, requested: str, device, backend: str, norm_statistics: str, scores: dict[str, Any] | None,
              calibration=None) -> PrecisionChoice:
    """`choose` for `model`: an int8 graph can be had when `calibration` images are known or the
    graph (for `norm_statistics`) is cached already."""
    from .adapt import has_batch_norm
    from .backends import int8_graph_path

    ready = calibration is not None
    if not ready and requested in ("auto", "int8") and backends.int8_available():
        ready = int8_graph_path(model, fed=norm_statistics == "image" and has_batch_norm(model)).is_file()
    return choose(requested, device=device, backend=backend, scores=scores, int8_ready=ready)


def _auto(device, backend: str, scores: dict[str, Any] | None, int8_ready: bool) -> PrecisionChoice:
    if not scores or worse_by(scores, "fp32") is None:
        return PrecisionChoice("fp32", "no stored per-precision validation scores", "auto")
    allowed, notes = ["fp32"], []
    for precision in ("bf16", "int8"):
        worse = worse_by(scores, precision)
        try:
            check_runnable(precision, backend, device)
        except InputError as exc:
            notes.append(f"{precision}: {str(exc).split(';')[0].removeprefix(f'precision {precision} ')}")
            continue
        if worse is None:
            notes.append(f"{precision}: no stored score")
        elif worse > SCORE_TOLERANCE:
            notes.append(f"{precision}: {worse:.4f} worse than fp32")
        elif precision == "int8" and not int8_ready:
            notes.append("int8: no calibration images")
        else:
            allowed.append(precision)
    within = f"scores within {SCORE_TOLERANCE:g} of fp32's"
    notes_text = f"; ruled out {', '.join(notes)}" if notes else ""
    if len(allowed) == 1:
        return PrecisionChoice("fp32", f"no other precision has {within}{notes_text}", "auto")
    return PrecisionChoice(tuple(allowed), f"{within}, measured once per tile and remembered{notes_text}", "auto")


# -- int8 calibration ---------------------------------------------------------------------------


def calibration_source(source, normalization) -> Callable[[], list[np.ndarray]] | None:
    """A function giving the normalised calibration images of a packaged model (its training images)
    or of a run's checkpoint (the training images RUN/data.json names); None when none are known."""
    from .pretrained import REGISTRY, ids_text, pretrained_name

    if source is None:
        return None
    name = pretrained_name(source)
    if name is not None:
        from .data import data_root

        info = REGISTRY[name]
        folder = data_root() / info.dataset
        stems = [s.strip() for s in ids_text(info.dataset, info.train_ids).split(",")][:CALIBRATION_IMAGES]
        files = [_find_image(folder, stem) for stem in stems]
    else:
        setup = Path(source).parent / "data.json"
        try:
            data = json.loads(setup.read_text())
            folder, names = Path(data["data"]), list(data["train"])[:CALIBRATION_IMAGES]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        files = [_find_image(folder, Path(n).stem) for n in names]
    files = [f for f in files if f is not None]
    if not files:
        return None

    def load() -> list[np.ndarray]:
        from .io import read_image

        return [normalization(read_image(f)) for f in files]

    return load


def _find_image(folder: Path, stem: str) -> Path | None:
    """The image file named `stem` in `folder`'s images/ (or train/images/) subfolder or itself."""
    for sub in ("images", "train/images", "."):
        for found in sorted((folder / sub).glob(f"{stem}.*")):
            if found.suffix.lower() in (".png", ".tif", ".tiff", ".jpg", ".jpeg"):
                return found
    return None


# -- scoring each precision ---------------------------------------------------------------------


def score_precisions(model, normalization, images: Sequence, masks: Sequence[np.ndarray] | None, rule, *,
                     precisions: Sequence[str] | None = None, calibration: Sequence[np.ndarray] | None = None,
                     names: Sequence[str] | None = None, tile_size: int | None = None,
                     metrics: Callable[[list, list, list], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The labels rule's score on validation maps made in each precision, for "auto" to choose by.

    Args:
        model: the `UNet` (its int8 graph is built, calibrated on `calibration`, if not cached).
        normalization: the checkpoint's `Normalization`, applied to raw `images`.
        images: `unetkit.data.Sample`s (normalised, with their instance masks) or raw images.
        masks: instance masks of raw `images` (None for samples).
        rule: the `DecisionRule` (or its dict): maps are made with its TTA and batch-norm
            statistics, labels drawn by it, and scored by `unetkit.decision.score_labels` on its task.
        precisions: which to score (default: fp32 and whichever of bf16 and int8 run here).
        calibration: normalised images for the int8 graph (default: the validation images;
            give the training images to keep them apart).
        names: image names to record (default: the samples' names).
        tile_size: the tile to predict with (default: as `predict` chooses).
        metrics: more scores to record per precision, from (foreground maps, labels, masks).

    Returns:
        {"task", "score", "tta", "norm_statistics", "scored_on", "tolerance", "rule_scores": {precision: score}}
        (and "metrics": {precision: {...}} with `metrics`);
        store it with `record_run_scores` (a run) or `unetkit.pretrained.record_precision_scores`.

    Example:
        >>> from unetkit import UNet
        >>> from unetkit.data import Normalization
        >>> from unetkit.decision import DecisionRule
        >>> image = np.random.default_rng(0).random((40, 40)).astype(np.float32)
        >>> mask = np.zeros((40, 40), np.int32); mask[5:20, 5:20] = 1
        >>> result = score_precisions(UNet(depth=2, base_channels=4), Normalization(), [image], [mask],
        ...                           DecisionRule(task="objects"), precisions=["fp32"])
        >>> sorted(result["rule_scores"])
        ['fp32']
    """
    from .decision import DecisionRule, score_labels
    from .postprocess import foreground
    from .predict import predict

    rule = DecisionRule.from_dict(rule) if isinstance(rule, dict) else rule
    if masks is None:
        inputs = [s.image for s in images]
        truths = [s.instances for s in images]
        names = names or [getattr(s, "name", str(i)) for i, s in enumerate(images)]
    else:
        inputs = [normalization(np.asarray(raw)) for raw in images]
        truths = [np.asarray(m) for m in masks]
        names = names or [str(i) for i in range(len(inputs))]
    if len(inputs) != len(truths) or not inputs:
        raise InputError(f"score_precisions needs one mask per image (got {len(inputs)} images, {len(truths)} masks)")
    if precisions is None:
        precisions = ["fp32"] + (["bf16"] if backends.bf16_native("cpu") else []) + (["int8"] if backends.int8_available() else [])
    task = rule.task or "objects"
    result: dict[str, Any] = {
        "task": task, "score": "Rand error of labels (lower is better)" if task == "membranes" else "mean of SEG and PQ@0.5",
        "tta": bool(rule.tta), "norm_statistics": rule.norm_statistics, "scored_on": list(names),
        "tolerance": SCORE_TOLERANCE, "rule_scores": {},
    }
    for precision in precisions:
        maps = [foreground(predict(model, image, tta=rule.tta, norm_statistics=rule.norm_statistics, precision=precision,
                                   calibration=calibration if calibration is not None else inputs, tile_size=tile_size))
                for image in inputs]
        labels = [rule.apply(m) for m in maps]
        result["rule_scores"][precision] = float(score_labels(task, labels, truths))
        if metrics is not None:
            result.setdefault("metrics", {})[precision] = metrics(maps, labels, truths)
    return result
