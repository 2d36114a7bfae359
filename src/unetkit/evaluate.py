"""Score a folder of predictions against a folder of ground truth, per image and overall.

Pairing: files are paired by name stem (img01.tif <-> img01.png), then by the names training pairs
(img_01 <-> mask_01, a <-> a_mask), then by trailing number (Cell Tracking Challenge:
mask000.tif or t000_labels.tif <-> man_seg000.tif). The outputs of `unetkit predict`
(IMAGE_probabilities.tif, IMAGE_labels.tif) pair under their image's name. Every ground-truth file
needs a prediction; predictions without ground truth (frames the challenge did not annotate) are
listed and skipped. Ground truth that looks like an intensity image (a raw image, a probability
map) is refused unless `allow_intensity_masks` (see `unetkit.data.readers.intensity_problem`).

A z-stack or time series (one multi-page file per stack, as `unetkit predict` writes for a
multi-page input) is scored plane by plane: each plane is one row (NAME:zNNN) and is pooled into
the overall scores like an image of its own; with `volumes`, each stack is scored as one volume.

Predictions: float TIFFs are probability maps in [0, 1], either (H, W) or (C, H, W) as written by
`unetkit predict` (foreground = channel `channel`, 1 by default); integer images are label images
(binary or instance). Ground truth: binary masks {0, 255} or {0, 1} (ISBI: 255 = cell interior)
or instance labels.

Metrics on binary maps (pixel, pixel_f, rand, warping, dice, iou) read probabilities directly.
Object metrics (seg, ap, adapted_rand, vi) need instances: a probability map becomes 4-connected
components of `probability > threshold`, a binary label image its 4-connected components, an
instance image stays as it is. "Overall" pools each metric over all images the way its
challenge aggregates (see `unetkit.metrics`), it is not a mean of the per-image rows.

Example:
    >>> result = evaluate_folders("pred/", "gt/", metrics=("pixel", "seg"))  # doctest: +SKIP
    >>> print(result.table())  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from .data.readers import intensity_problem, mask_stems
from .errors import InputError
from .io import list_images, listing, read_image, repeated
from .metric_info import DEFAULT_METRICS, METRIC_DESCRIPTIONS
from .labels import as_instances, label_components
from .labels3d import as_instances_3d
from .metrics import AP_THRESHOLDS, ISBI_THRESHOLDS, METRICS, CumulativeMetric
from .metrics.base import Score
from .metrics.inputs import as_labels, check_probability, check_threshold, is_probability
from .metrics.volume import AdaptedRandError3D, AveragePrecision3D, RandError3D, SEG3D, VariationOfInformation3D
from .postprocess import threshold_mask

PathLike = Union[str, os.PathLike]


_TRAILING_NUMBER = re.compile(r"(\d+)$")


def parse_metrics(metrics: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """Metric names from a comma-separated string or a sequence, checked and de-duplicated."""
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    chosen: list[str] = []
    for name in (n.strip().lower() for n in names):
        if not name:
            continue
        if name not in METRICS:
            raise InputError(f"--metrics: unknown metric {name!r}; choose from {', '.join(METRICS)}")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise InputError(f"--metrics: no metric given; choose from {', '.join(METRICS)}")
    return tuple(chosen)


def _trailing_number(stem: str) -> int | None:
    match = _TRAILING_NUMBER.search(stem)
    return int(match.group(1)) if match else None


#: Name endings of the files `unetkit predict` writes (IMAGE_probabilities.tif, IMAGE_labels.tif).
PREDICTION_KINDS = ("probabilities", "labels")


def _predict_outputs(preds: list[Path], use: str) -> dict[str, Path]:
    """Prediction files by the stem they pair under: `unetkit predict` outputs by their image's name.

    Where both IMAGE_probabilities and IMAGE_labels exist, the kind named by `use` is taken.
    """
    by_stem: dict[str, Path] = {}
    for path in preds:
        base, _, kind = path.stem.rpartition("_")
        if base and kind in PREDICTION_KINDS:
            other = by_stem.get(base)
            if other is None or kind == use:
                by_stem[base] = path
        else:
            by_stem.setdefault(path.stem, path)
    return by_stem


def pair_files(
    pred_dir: PathLike, gt_dir: PathLike, use: str = "probabilities"
) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """Pair prediction and ground-truth files; returns (pairs as (pred, gt), unpaired predictions).

    Pairs by name stem first, then by the mask names training accepts for an image (img_01 <->
    mask_01, a <-> a_mask), then the remaining files by trailing number when it is unambiguous
    (mask000 <-> man_seg000). The outputs of `unetkit predict` pair under their image's name:
    IMAGE_probabilities.tif (taken by default, `use="probabilities"`) or IMAGE_labels.tif
    (`use="labels"`), so t000_labels.tif pairs with man_seg000.tif.
    Raises InputError listing every ground-truth file left without a prediction.

    Example:
        >>> pairs, extra = pair_files("01_RES", "01_GT/SEG")  # doctest: +SKIP
    """
    preds, gts = list_images(pred_dir), list_images(gt_dir)
    if not gts:
        raise InputError(f"{gt_dir}: no ground-truth images (PNG/TIFF) found; check --gt")
    if not preds:
        raise InputError(f"{pred_dir}: no prediction images (PNG/TIFF) found; check --pred")
    for folder, files in ((pred_dir, preds), (gt_dir, gts)):
        stems = [p.stem for p in files]
        twins = sorted(repeated(stems))
        if twins:
            raise InputError(f"{folder}: several files share the name {twins[0]!r} (different extensions); keep one per image")
    if use not in PREDICTION_KINDS:
        raise InputError(f"use must be one of {PREDICTION_KINDS} (got {use!r})")
    pred_by_stem = _predict_outputs(preds, use)
    pairs: dict[Path, Path] = {}
    for g in gts:
        if g.stem in pred_by_stem:
            pairs[g] = pred_by_stem.pop(g.stem)
    gt_by_stem = {g.stem: g for g in gts if g not in pairs}
    for key in list(pred_by_stem):
        g = next((gt_by_stem.pop(c) for c in mask_stems(key) if c in gt_by_stem), None)
        if g is not None:
            pairs[g] = pred_by_stem.pop(key)
    pred_by_number: dict[int, list[str]] = {}
    for key in pred_by_stem:
        number = _trailing_number(key)
        if number is not None:
            pred_by_number.setdefault(number, []).append(key)
    gt_numbers = [_trailing_number(g.stem) for g in gts if g not in pairs]
    missing = []
    for g in gts:
        if g in pairs:
            continue
        number = _trailing_number(g.stem)
        candidates = pred_by_number.get(number, []) if number is not None else []
        if len(candidates) == 1 and candidates[0] in pred_by_stem and gt_numbers.count(number) == 1:
            pairs[g] = pred_by_stem.pop(candidates[0])
        else:
            missing.append(g)
    if missing:
        raise InputError(
            f"{gt_dir}: no prediction in {pred_dir} for {len(missing)} ground-truth file(s): {listing(missing, 10)}; "
            f"unmatched predictions: {listing(sorted(pred_by_stem.values()), 10) or 'none'}. Files pair by name "
            "(img01.tif <-> img01.png, img_01 <-> mask_01) or by trailing number (mask000.tif or t000_labels.tif <-> man_seg000.tif)"
        )
    return [(pairs[g], g) for g in gts], sorted(pred_by_stem.values())


def _single_channel(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 2:
        return array
    if np.all(array == array[..., :1]):
        return array[..., 0]
    raise InputError(
        f"{path}: image of shape {array.shape} has several channels or pages; give one single-channel 2D image per file"
    )


def load_prediction(path: PathLike, channel: int = 1) -> np.ndarray:
    """A prediction file as a checked 2D array: float probability of cell interior, or integer labels.

    A float (C, H, W) or (H, W, C) stack gives its channel `channel` (the predict command writes
    (n_classes, H, W) with the foreground probability at index 1).
    """
    path = Path(path)
    array = read_image(path, pages=True)
    if array.ndim == 3 and is_probability(array):
        first = array.shape[0] < array.shape[-1]
        n = array.shape[0] if first else array.shape[-1]
        if not 0 <= channel < n:
            raise InputError(f"{path}: has {n} channels (shape {array.shape}); --channel {channel} is out of range")
        array = array[channel] if first else array[..., channel]
    array = _single_channel(array, path)
    if is_probability(array):
        check_probability(array, str(path))
        return array
    return as_labels(array, str(path))


def load_ground_truth(path: PathLike, allow_intensity_masks: bool = False) -> np.ndarray:
    """A ground-truth file as a 2D label image (checked: whole numbers, never negative, and, unless
    `allow_intensity_masks`, piecewise constant like a label image: not a raw image or probability map)."""
    path = Path(path)
    return _checked_truth(as_labels(_single_channel(read_image(path), path), str(path)), str(path), allow_intensity_masks)


def _checked_truth(labels: np.ndarray, where: str, allow_intensity_masks: bool) -> np.ndarray:
    problem = None if allow_intensity_masks else intensity_problem(labels)
    if problem:
        raise InputError(
            f"{where}: does not look like ground truth: {problem}. This is what a raw image, a probability map or a "
            "resized (interpolated) or JPEG-compressed mask looks like; give label images (0 = background, "
            "objects > 0), or score against it as it is with --allow-intensity-masks"
        )
    return labels


def _stack_prediction(path: Path, planes: int, channel: int) -> np.ndarray:
    """A prediction stack for `planes` ground-truth planes: (N, H, W) labels or probabilities,
    from labels (N, H, W), the probabilities `unetkit predict` writes for a stack with a 2D model,
    (N, C, H, W), or for a volume with a 3D model, (C, N, H, W)."""
    array = read_image(path, pages=True)
    if array.ndim == 4 and is_probability(array):
        classes_first = array.shape[0] != planes and array.shape[1] == planes
        n = array.shape[0] if classes_first else array.shape[1]
        if not 0 <= channel < n:
            raise InputError(f"{path}: has {n} channels (shape {array.shape}); --channel {channel} is out of range")
        array = array[channel] if classes_first else array[:, channel]
    if array.ndim != 3 or len(array) != planes:
        raise InputError(f"{path}: expected a stack of {planes} planes like its ground truth, got shape {array.shape}")
    return array


def plane_pairs(
    pred_path: PathLike, gt_path: PathLike, channel: int = 1, allow_intensity_masks: bool = False
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, prediction, ground truth) of each 2D plane of a file pair: one for 2D images, one per
    plane (named NAME:zNNN) for a z-stack or time series stored as pages of one file.

    Example:
        >>> [name for name, _, _ in plane_pairs("pred/stack_labels.tif", "gt/stack.tif")]  # doctest: +SKIP
        ['stack:z000', 'stack:z001']
    """
    from .io import read_header

    pred_path, gt_path = Path(pred_path), Path(gt_path)
    planes = read_header(gt_path, pages=True).planes
    if planes == 1:
        return [(gt_path.stem, load_prediction(pred_path, channel), load_ground_truth(gt_path, allow_intensity_masks))]
    truth = read_image(gt_path, pages=True)
    predictions = _stack_prediction(pred_path, planes, channel)
    pairs = []
    for z in range(planes):
        where = f"{gt_path} (plane {z})"
        gt = _checked_truth(as_labels(truth[z], where), where, allow_intensity_masks)
        pred = predictions[z]
        pred = check_probability(pred, f"{pred_path} (plane {z})") if is_probability(pred) else as_labels(pred, f"{pred_path} (plane {z})")
        pairs.append((f"{gt_path.stem}:z{z:03d}", pred, gt))
    return pairs


def _instances(array: np.ndarray, threshold: float) -> np.ndarray:
    """Objects of a prediction: components of a probability map above `threshold` (4-connected,
    6 in a volume), components of a binary label image, or the instances of an instance image."""
    if is_probability(array):
        return label_components(threshold_mask(array, threshold))
    if array.ndim == 3:
        return as_instances_3d(as_labels(array, "pred"), "pred")
    return as_instances(as_labels(array, "pred"))


#: Metrics that `evaluate_folders(..., volumes=True)` scores on whole volumes, with 6-connected
#: objects (`unetkit.metrics.volume`). The pixel-wise ones count voxels and are the same either way;
#: the warping error is defined on 2D topology and is left out of volume scoring.
VOLUME_METRICS = {
    "rand": lambda t: RandError3D(ISBI_THRESHOLDS), "seg": lambda t: SEG3D(),
    "ap": lambda t: AveragePrecision3D(AP_THRESHOLDS), "adapted_rand": lambda t: AdaptedRandError3D(),
    "vi": lambda t: VariationOfInformation3D(),
}


@dataclass
class Evaluation:
    """Scores of a folder pair: one row per image, and the pooled overall scores."""

    metrics: tuple[str, ...]
    threshold: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    overall: dict[str, Score] = field(default_factory=dict)
    unpaired_predictions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def columns(self) -> list[str]:
        return [c for m in self.metrics for c in METRICS[m].columns]

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (undefined scores are null)."""
        return {
            "metrics": list(self.metrics),
            "threshold": self.threshold,
            "rand_thresholds": list(ISBI_THRESHOLDS),
            "ap_iou_thresholds": list(AP_THRESHOLDS),
            "images": self.rows,
            "overall": self.overall,
            "unpaired_predictions": self.unpaired_predictions,
            "notes": self.notes,
        }

    def table(self) -> str:
        """A plain-text table: one line per image, then the overall line."""
        columns = self.columns()
        lines = [["image", *columns]]
        for row in self.rows:
            lines.append([row["name"], *(_format(row["scores"].get(c)) for c in columns)])
        lines.append(["overall", *(_format(self.overall.get(c)) for c in columns)])
        widths = [max(len(line[k]) for line in lines) for k in range(len(columns) + 1)]
        text = [
            "  ".join(cell.ljust(w) if k == 0 else cell.rjust(w) for k, (cell, w) in enumerate(zip(line, widths)))
            for line in lines
        ]
        text.insert(1, "  ".join("-" * w for w in widths))
        text.insert(-1, text[1])
        return "\n".join(text)


def _format(value: Score) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) or value == 0:
        return str(int(value))
    return f"{value:.3e}" if abs(value) < 1e-3 else f"{value:.4f}"


def _unprefixed(exc: Exception) -> str:
    """A metric's message without its leading argument name (the caller names the file)."""
    return re.sub(r"^(gt|gt_labels|pred|pred_labels): ", "", str(exc))


def _scores_or_none(
    metric: CumulativeMetric, stats: np.ndarray, keys: Sequence[str]
) -> tuple[dict[str, Score], str | None]:
    try:
        return metric.scores(stats), None
    except InputError as exc:
        return {k: None for k in keys}, _unprefixed(exc)


def _update(
    accumulators: dict[str, CumulativeMetric], pred: np.ndarray, gt: np.ndarray, threshold: float
) -> tuple[dict[str, Score], list[str]]:
    """Add one image (or volume) pair to every accumulator; returns its scores and why any is undefined."""
    volume = gt.ndim == 3
    truth = (lambda g: as_instances_3d(g, "gt")) if volume else as_instances
    objects = (_instances(pred, threshold), truth(gt)) if any(METRICS[m].objects for m in accumulators) else None
    scores: dict[str, Score] = {}
    problems: list[str] = []
    for name, metric in accumulators.items():
        spec = METRICS[name]
        p, g = objects if spec.objects else (pred, gt)
        if volume and name not in VOLUME_METRICS:  # voxel counts: the volume as one tall image
            p, g = p.reshape(-1, p.shape[-1]), g.reshape(-1, g.shape[-1])
        values, problem = _scores_or_none(metric, metric.update(p, g), spec.columns)
        if problem:
            problems.append(f"{name}: {problem}")
        scores.update(values)
    return scores, problems


def score_images(
    pred: np.ndarray, gt: np.ndarray, metrics: Union[str, Sequence[str]] = DEFAULT_METRICS, threshold: float = 0.5
) -> tuple[dict[str, Score], list[str]]:
    """Scores of one 2D prediction (probability map or label image) against one ground-truth label
    image, as `evaluate_folders` scores each pair; returns (scores, notes on undefined scores).

    Example:
        >>> gt = np.zeros((8, 8), np.uint16); gt[2:6, 2:6] = 1
        >>> score_images(gt, gt, metrics="dice,seg")[0]
        {'dice': 1.0, 'seg': 1.0}
    """
    names = parse_metrics(metrics)
    threshold = check_threshold(threshold, "threshold")
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise InputError(f"prediction of shape {pred.shape} and ground truth of shape {gt.shape}: give two 2D images of one size")
    pred = check_probability(pred, "prediction") if is_probability(pred) else as_labels(pred, "prediction")
    return _update({name: METRICS[name].make(threshold) for name in names}, pred, as_labels(gt, "ground truth"), threshold)


def evaluate_folders(
    pred_dir: PathLike,
    gt_dir: PathLike,
    metrics: Union[str, Sequence[str]] = DEFAULT_METRICS,
    threshold: float = 0.5,
    channel: int = 1,
    use: str = "probabilities",
    allow_intensity_masks: bool = False,
    volumes: bool = False,
) -> Evaluation:
    """Score every prediction in `pred_dir` against its ground truth in `gt_dir`.

    With `volumes`, each multi-page ground truth is scored as one volume (one row per stack):
    objects are 6-connected, Rand error, SEG, AP, adapted Rand and VI are computed in 3D
    (`VOLUME_METRICS`), pixel-wise scores count voxels; "warping" is refused.

    A score undefined for one image (e.g. a Rand error on a ground truth without foreground) is
    None for that image and explained in `notes`; an overall score undefined for the whole
    dataset raises InputError.

    Example:
        >>> result = evaluate_folders("pred", "gt", metrics="pixel,rand,seg")  # doctest: +SKIP
        >>> result.overall["seg"]  # doctest: +SKIP
        0.9203
    """
    names = parse_metrics(metrics)
    threshold = check_threshold(threshold, "--threshold")
    if volumes and "warping" in names:
        raise InputError("the warping error is defined on 2D images; leave warping out of --metrics with --volumes")
    pairs, unpaired = pair_files(pred_dir, gt_dir, use)
    accumulators = {name: (VOLUME_METRICS[name] if volumes and name in VOLUME_METRICS else METRICS[name].make)(threshold)
                    for name in names}
    result = Evaluation(names, threshold, unpaired_predictions=[p.name for p in unpaired])
    for pred_path, gt_path in pairs:
        planes = plane_pairs(pred_path, gt_path, channel, allow_intensity_masks)
        if volumes:
            if len(planes) == 1:
                raise InputError(f"{gt_path}: one 2D image; --volumes scores z-stacks (multi-page TIFF ground truth), "
                                 "leave it out for images")
            planes = [(gt_path.stem, np.stack([p for _, p, _ in planes]), np.stack([g for _, _, g in planes]))]
        for name, pred, gt in planes:
            if pred.shape != gt.shape:
                raise InputError(
                    f"{pred_path.name} has shape {pred.shape} but its ground truth {gt_path.name} has {gt.shape}; "
                    "predictions must have the ground truth's size"
                )
            try:
                scores, problems = _update(accumulators, pred, gt, threshold)
            except InputError as exc:
                raise InputError(f"{pred_path.name} vs {gt_path.name}: {exc}") from exc
            result.notes.extend(f"{name if ':' in name else gt_path.name}: {problem}" for problem in problems)
            result.rows.append({"name": name, "pred": str(pred_path), "gt": str(gt_path), "scores": scores})
    for name, metric in accumulators.items():
        try:
            result.overall.update(metric.scores())
        except InputError as exc:
            where = f"{pairs[0][1]}: " if len(pairs) == 1 else f"{gt_dir}: in all {len(pairs)} images together, "
            raise InputError(where + _unprefixed(exc)) from exc
    return result
