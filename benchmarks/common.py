"""Shared pieces of the reproduction benchmarks: training within a time budget, prediction with
test-time augmentation, scoring and overlay pictures. Each benchmark script writes JSON."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import unetkit
from unetkit.data import Normalization, Sample
from unetkit.io import write_png
from unetkit.plots import overlay
from unetkit.train import TrainConfig, Trainer

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "processor": platform.machine(), "unetkit": unetkit.__version__}


def train_within(
    config: TrainConfig, train: Sequence[Sample], val: Sequence[Sample], run_dir: Path, normalization: Normalization
) -> tuple[unetkit.UNet, dict]:
    """Train (resuming if `run_dir` holds an unfinished run) and return the best model and the summary."""
    from unetkit.checkpoint import load_checkpoint

    resume = (run_dir / "last.pt").is_file()
    summary = Trainer(config, train, val, run_dir, normalization=normalization, resume=resume).fit()
    best = load_checkpoint(run_dir / "best.pt").model
    return best, summary


def predict_all(model: unetkit.UNet, samples: Sequence[Sample], tta: bool) -> tuple[list[np.ndarray], float]:
    """Foreground probability of every sample, and the seconds per image."""
    started = time.perf_counter()
    maps = [unetkit.predict(model, s.image, tta=tta)[1] for s in samples]
    return maps, (time.perf_counter() - started) / max(len(samples), 1)


def save_overlays(folder: Path, samples: Sequence[Sample], labels: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for sample, lab, gt in zip(samples, labels, truth):
        path = folder / f"{sample.name}_overlay.png"
        write_png(path, overlay(sample.image, lab, truth=gt), force=True)
        paths.append(str(path.relative_to(RESULTS)) if path.is_relative_to(RESULTS) else str(path))
    return paths


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps(result, indent=2, default=float))
