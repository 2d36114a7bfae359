"""Pictures for people: training curves and segmentation overlays."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from .io import atomic_write


def plot_training_curves(log_csv: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Plot training loss and validation IoU / pixel error from a run's log.csv into a PNG."""
    fig = training_curves_figure(log_csv)  # selects the Agg backend before pyplot is imported
    import matplotlib.pyplot as plt

    try:
        return atomic_write(out_png, lambda p: fig.savefig(p, format="png", dpi=100), force=True)
    finally:
        plt.close(fig)


def training_curves_figure(log_csv: str | os.PathLike):
    """The matplotlib figure of `plot_training_curves` (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    it = np.array([int(r["iteration"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    val = [(int(r["iteration"]), float(r["val_iou"]), float(r["val_pixel_error"])) for r in rows if r["val_iou"]]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(it, loss, color="0.75", lw=0.8, label="loss")
    if len(loss) >= 10:
        k = max(len(loss) // 50, 5)
        ax_loss.plot(it[k - 1 :], np.convolve(loss, np.ones(k) / k, mode="valid"), color="C0", label=f"mean of {k}")
    ax_loss.set(xlabel="iteration", ylabel="weighted cross-entropy", title="training loss")
    ax_loss.legend()
    if val:
        v = np.array(val)
        ax_val.plot(v[:, 0], v[:, 1], "o-", color="C2", label="foreground IoU")
        ax_val.plot(v[:, 0], v[:, 2], "s-", color="C3", label="pixel error")
        ax_val.set_ylim(0, 1)
        ax_val.legend()
    ax_val.set(xlabel="iteration", title="validation")
    fig.tight_layout()
    return fig


def overlay(image: np.ndarray, labels: np.ndarray, truth: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 picture: the image in gray, predicted object contours in yellow and, if `truth`
    (a foreground mask) is given, false positives tinted magenta and false negatives cyan."""
    from skimage.segmentation import find_boundaries

    gray = np.asarray(image, dtype=np.float64)
    if gray.ndim == 3:
        gray = gray.mean(0)
    lo, hi = np.percentile(gray, (1, 99))
    gray = np.clip((gray - lo) / max(hi - lo, 1e-9), 0, 1)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if truth is not None:
        pred = labels > 0
        truth = np.asarray(truth) > 0
        rgb[pred & ~truth] = 0.5 * rgb[pred & ~truth] + 0.5 * np.array([1.0, 0.0, 1.0])
        rgb[~pred & truth] = 0.5 * rgb[~pred & truth] + 0.5 * np.array([0.0, 1.0, 1.0])
    rgb[find_boundaries(labels, mode="inner")] = (1.0, 0.9, 0.0)
    return (rgb * 255).round().astype(np.uint8)
