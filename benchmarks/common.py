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


def add_training_arguments(parser, *, minutes: float, runs: str) -> None:
    """Options of training within a time budget, shared by the benchmark scripts."""
    parser.add_argument("--minutes", type=float, default=minutes)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--tile-size", type=int, default=572)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--optimizer", default="adam", help="adam (default here: converges within a CPU budget) or sgd (the paper)")
    parser.add_argument("--runs", type=Path, default=Path("runs") / runs)


def add_budget_arguments(parser, *, minutes: float, runs: str) -> None:
    """Options shared by the reproduction scripts: load a checkpoint, or train within a budget."""
    parser.add_argument("--checkpoint", type=Path, default=None, help="skip training and evaluate this checkpoint")
    add_training_arguments(parser, minutes=minutes, runs=runs)
    parser.add_argument("--no-tta", action="store_true")


def checkpoint_or_train(args, load_train, load_val, run_name: str) -> tuple[unetkit.UNet, Normalization, dict]:
    """The model of --checkpoint, or one trained within --minutes; returns (model, normalisation, facts).

    `load_train(norm)` and `load_val(norm)` load the training and validation samples.
    """
    from unetkit.checkpoint import load_checkpoint

    if args.checkpoint is not None:
        loaded = load_checkpoint(args.checkpoint)
        facts = {"checkpoint": str(args.checkpoint), "iterations": loaded.iteration, "train_config": loaded.train_config}
        return loaded.model, loaded.normalization, facts
    norm = Normalization()
    config = TrainConfig(depth=args.depth, base_channels=args.width, tile_size=args.tile_size, iterations=1_000_000,
                         max_seconds=args.minutes * 60, val_every=200, checkpoint_every=200, workers=args.workers,
                         optimizer=args.optimizer, lr=args.lr)
    model, summary = train_within(config, load_train(norm), load_val(norm), args.runs / run_name, norm)
    facts = {"iterations": summary["iterations"], "seconds": round(summary["seconds"], 1), "train_config": config.to_dict()}
    return model, norm, facts
