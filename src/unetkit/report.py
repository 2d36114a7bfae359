"""Run reports: one self-contained HTML page per training run (RUN/report.html) or evaluation.

A page holds everything in one file, pictures included as base64 PNG, with no scripts, fonts or
links to anything outside it, so it opens offline in any browser and can be mailed as it is.
Training refreshes RUN/report.html at each validation (`write_training_report`): the config,
loss and validation curves, the validation images' overlays (predicted contours in yellow, false
foreground magenta, missed foreground cyan), their scores and the timings. ``unetkit evaluate
--html PAGE`` writes the same kind of page for a scored folder (`write_evaluation_report`).
Pages are written atomically (a temporary file renamed), so a browser never sees half a page.

Example:
    >>> print(table(["metric", "value"], [["dice", 0.5]]))
    <table><tr><th>metric</th><th>value</th></tr><tr><td>dice</td><td>0.5000</td></tr></table>
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .io import atomic_write

#: Validation or evaluation images shown as overlays (the first ones, by name).
MAX_OVERLAYS = 6
#: Overlays larger than this (pixels per side) show their central crop at full resolution.
OVERLAY_SIZE = 512
#: Metrics of the per-image validation table (pixel metrics against the training target).
VALIDATION_METRICS = ("pixel", "iou", "dice")

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; max-width: 520px; }
img { max-width: 100%; image-rendering: pixelated; }
.meta { color: #555; }
.key span { display: inline-block; width: 0.9em; height: 0.9em; margin: 0 0.3em 0 1em; vertical-align: middle; }
"""

_LEGEND = (
    '<p class="key">Overlays:<span style="background:#ffe600"></span>predicted object contours'
    '<span style="background:#ff00ff"></span>false foreground (predicted, not in the ground truth)'
    '<span style="background:#00ffff"></span>missed foreground (in the ground truth, not predicted)</p>'
)


def png_data_uri(picture) -> str:
    """A `data:` URI of a PNG: from an RGB/gray uint8 array or a matplotlib figure.

    Example:
        >>> png_data_uri(np.zeros((2, 2, 3), np.uint8))[:22]
        'data:image/png;base64,'
    """
    buffer = io.BytesIO()
    if hasattr(picture, "savefig"):
        picture.savefig(buffer, format="png", dpi=90)
    else:
        import imageio.v3 as iio

        iio.imwrite(buffer, np.ascontiguousarray(picture), extension=".png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return html.escape(str(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    return "0" if value == 0 else (f"{value:.3e}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4f}")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table; numbers formatted as `unetkit evaluate` prints them, text escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str]]) -> str:
    """A whole HTML page: `sections` are (heading, HTML body) pairs."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class=\"meta\">{subtitle}</p>",
    ]
    parts += [f"<h2>{html.escape(heading)}</h2>\n{body}" for heading, body in sections]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def figure(picture, caption: str) -> str:
    """An inline picture with its caption."""
    return f'<figure><img alt="{html.escape(caption)}" src="{png_data_uri(picture)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def overlay_picture(image: np.ndarray, labels: np.ndarray, truth: np.ndarray | None) -> tuple[np.ndarray, str]:
    """`unetkit.plots.overlay`, cropped to its central `OVERLAY_SIZE` square when larger; returns
    the picture and a note on the crop ("" when whole)."""
    from .plots import overlay

    picture = overlay(image, labels, truth)
    height, width = picture.shape[:2]
    if max(height, width) <= OVERLAY_SIZE:
        return picture, ""
    top, left = max((height - OVERLAY_SIZE) // 2, 0), max((width - OVERLAY_SIZE) // 2, 0)
    crop = picture[top : top + OVERLAY_SIZE, left : left + OVERLAY_SIZE]
    return crop, f" (central {crop.shape[0]}x{crop.shape[1]} of {height}x{width} pixels)"


def _flatten(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in values.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)))
    return rows


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _write(path: str | os.PathLike, text: str, force: bool) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), force=force)


# -- training ---------------------------------------------------------------------------------


def _log_rows(log_csv: Path) -> list[dict[str, str]]:
    import csv

    if not log_csv.is_file():
        return []
    with open(log_csv, newline="") as f:
        return list(csv.DictReader(f))


def training_report(trainer) -> str:
    """The HTML page of a `unetkit.train.Trainer`'s run as it stands: config, curves, validation
    overlays and scores (predicted now, without test-time augmentation), timings."""
    import matplotlib.pyplot as plt

    from .evaluate import score_images
    from .labels import label_components
    from .plots import training_curves_figure
    from .predict import predict

    started = time.perf_counter()
    config = trainer.config
    rows = _log_rows(trainer.log_path)
    sections: list[tuple[str, str]] = []

    validated = [r for r in rows if r.get("val_iou")]
    history = table(["iteration", "validation IoU", "validation pixel error"],
                    [[int(r["iteration"]), float(r["val_iou"]), float(r["val_pixel_error"])] for r in validated])
    curves = ""
    if rows:
        fig = training_curves_figure(trainer.log_path)
        try:
            curves = figure(fig, "training loss (left) and validation scores (right)")
        finally:
            plt.close(fig)
    sections.append(("Curves", curves + history))

    shown = sorted(trainer.val_samples, key=lambda s: s.name)[:MAX_OVERLAYS]
    predict_started = time.perf_counter()
    pictures, per_image = [], []
    for sample in shown:
        image, target, instances, name = sample.image, sample.target, sample.instances, sample.name
        if image.ndim == 4:  # a volume: its middle plane, or the most annotated plane nearest it (sparse annotation)
            from .loss import IGNORE_INDEX
            from .volume import predict_volume

            counts = (target != IGNORE_INDEX).sum(axis=(1, 2))
            planes = np.flatnonzero(counts == counts.max())
            z = int(planes[np.argmin(np.abs(planes - image.shape[1] // 2))])
            foreground = predict_volume(trainer.model, image, device=trainer.device, pad_thin=True)[1, z]
            image, target, instances, name = image[:, z], target[z], instances[z], f"{name} plane {z}"
            unlabelled = target == IGNORE_INDEX  # a partly annotated plane: scored as agreed background there
            foreground, target = np.where(unlabelled, 0, foreground), np.where(unlabelled, 0, target)
        else:
            foreground = predict(trainer.model, image, device=trainer.device)[1]
        labels = label_components(foreground > 0.5)
        scores, _ = score_images(foreground, target, VALIDATION_METRICS)
        objects, _ = score_images(foreground, instances, ("seg",))
        per_image.append([name, *scores.values(), objects["seg"], int(labels.max()), int(len(np.unique(instances)) - 1)])
        picture, crop = overlay_picture(image, labels, target)
        pictures.append(figure(picture, f"{name}: foreground > 0.5 at iteration {trainer.iteration}{crop}"))
    predict_seconds = time.perf_counter() - predict_started
    if shown:
        more = len(trainer.val_samples) - len(shown)
        note = f"<p>The first {len(shown)} of {len(trainer.val_samples)} validation images.</p>" if more else ""
        header = ["image", "pixel error", "IoU", "Dice", "SEG", "objects", "true objects"]
        sections.append((f"Validation at iteration {trainer.iteration}", note + table(header, per_image) + _LEGEND + "".join(pictures)))

    seconds = [float(r["seconds"]) for r in rows if r.get("seconds")]
    steps = 0  # rows of this session: the clock restarts when a run is resumed
    while steps < len(seconds) and (steps == 0 or seconds[-steps - 1] < seconds[-steps]):
        steps += 1
    budget = f"{trainer.seconds_spent:.1f} s of {config.max_seconds:g} s ({config.budget_clock} clock)" if config.max_seconds else "none (iterations only)"
    timing_rows = [
        ["iterations", f"{trainer.iteration} of {config.iterations}"],
        ["time budget used", budget],
        ["elapsed in this session", f"{seconds[-1]:.1f} s" if seconds else "n/a"],
        ["seconds per iteration (this session, with validation)", seconds[-1] / steps if steps else None],
        ["best validation IoU", None if trainer.best_iou == -math.inf else trainer.best_iou],
        ["prediction of the overlays above", f"{predict_seconds:.2f} s"],
        ["this report", f"{time.perf_counter() - started:.2f} s"],
    ]
    sections.append(("Timings", table(["measure", "value"], timing_rows)))
    sparse = trainer.unlabelled_summary().get("unlabelled_voxels")
    if sparse:
        sections.append((f"Unlabelled voxels (--ignore-label {config.ignore_label}): no loss, not scored",
                         table(["volumes", "unlabelled voxels", "of", "%"],
                               [[part, v["voxels"], v["of"], v["percent"]] for part, v in sparse.items()])))
    sections.append(("Config", table(["setting", "value"], _flatten(config.to_dict()))))
    subtitle = (f"{html.escape(str(trainer.run_dir))}: iteration {trainer.iteration} of {config.iterations}; "
                f"written {_now()}; refreshed at each validation")
    return page(f"unetkit training run {Path(trainer.run_dir).name}", subtitle, sections)


def write_training_report(trainer, path: str | os.PathLike | None = None) -> Path | None:
    """Write RUN/report.html (or `path`) for a trainer, replacing the previous one atomically.

    A failure to draw the page warns and returns None: the report never stops training.

    Example:
        >>> write_training_report(trainer)  # doctest: +SKIP
        PosixPath('runs/a/report.html')
    """
    target = Path(path) if path is not None else Path(trainer.run_dir) / "report.html"
    try:
        return _write(target, training_report(trainer), force=True)
    except Exception as exc:  # noqa: BLE001 - an auxiliary page must not end a training run
        warnings.warn(f"{target}: run report not written ({type(exc).__name__}: {exc})", stacklevel=2)
        return None


# -- evaluation -------------------------------------------------------------------------------


def evaluation_report(result, pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, *, channel: int = 1,
                      allow_intensity_masks: bool = False) -> str:
    """The HTML page of an `unetkit.evaluate.Evaluation`: settings, overall and per-image scores,
    notes, and overlays of the first images (the probability map, or black for label images, as
    background; predicted contours; false and missed foreground against the ground truth)."""
    from .evaluate import _instances, load_ground_truth, load_prediction
    from .metrics.inputs import is_probability

    columns = result.columns()
    overall = table(["", *columns], [["overall", *(result.overall.get(c) for c in columns)]])
    per_image = table(["image", *columns], [[row["name"], *(row["scores"].get(c) for c in columns)] for row in result.rows])
    settings = table(["setting", "value"], [
        ["predictions", str(pred_dir)], ["ground truth", str(gt_dir)], ["images scored", len(result.rows)],
        ["metrics", ", ".join(result.metrics)], ["threshold", result.threshold],
        ["predictions without ground truth (skipped)", len(result.unpaired_predictions)],
    ])
    sections = [("Overall", overall), ("Per image", per_image), ("Settings", settings)]
    if result.notes:
        sections.append(("Notes", "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in result.notes) + "</ul>"))
    pictures = []
    for row in result.rows[:MAX_OVERLAYS]:
        pred = load_prediction(row["pred"], channel)
        truth = load_ground_truth(row["gt"], allow_intensity_masks)
        background = pred if is_probability(pred) else np.zeros(pred.shape, np.float32)
        picture, crop = overlay_picture(background, _instances(pred, result.threshold), truth)
        pictures.append(figure(picture, f"{row['name']}: {Path(row['pred']).name} against {Path(row['gt']).name}{crop}"))
    if pictures:
        more = f"<p>The first {len(pictures)} of {len(result.rows)} images.</p>" if len(result.rows) > len(pictures) else ""
        sections.append(("Overlays", more + _LEGEND + "".join(pictures)))
    subtitle = f"{html.escape(str(pred_dir))} against {html.escape(str(gt_dir))}; written {_now()}"
    return page("unetkit evaluation", subtitle, sections)


def write_evaluation_report(result, path: str | os.PathLike, pred_dir: str | os.PathLike, gt_dir: str | os.PathLike,
                            *, channel: int = 1, allow_intensity_masks: bool = False, force: bool = False) -> Path:
    """Write the page of `evaluation_report` to `path` atomically (an existing file only with `force`).

    Example:
        >>> result = evaluate_folders("pred", "gt")  # doctest: +SKIP
        >>> write_evaluation_report(result, "scores.html", "pred", "gt")  # doctest: +SKIP
    """
    text = evaluation_report(result, pred_dir, gt_dir, channel=channel, allow_intensity_masks=allow_intensity_masks)
    return _write(path, text, force=force)
