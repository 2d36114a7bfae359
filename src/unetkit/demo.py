"""The main job on a built-in default: synthetic touching cells -> train -> segment -> score -> picture."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data.normalize import Normalization
from .data.samples import make_sample
from .io import atomic_write, prepare_output_dir, write_png, write_tiff
from .plots import overlay
from .synthetic import synthetic_cells, synthetic_dataset
from .train import Trainer


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo: small enough for a couple of minutes on two CPU cores."""

    n_train: int = 8
    n_val: int = 2
    train_shape: tuple[int, int] = (256, 256)
    test_shape: tuple[int, int] = (520, 600)  # larger than one tile
    depth: int = 4
    base_channels: int = 16
    tile_size: int = 188  # 188 -> 100 output pixels for depth 4
    predict_tile: int = 252  # 252 -> 164: the test image needs 4x4 tiles
    recipe: str = "default"  # Adam, batch norm, cosine decay: converges within the demo's two minutes
    seconds: float = 120.0
    workers: int = 0  # small tiles augment faster in-process than a worker can on two cores
    seed: int = 0


def run_demo(out: str | Path, *, force: bool = False, settings: DemoSettings = DemoSettings(), progress: bool = True) -> dict:
    """Run the demo into folder `out`; returns the summary that is also written to out/summary.json.

    Example:
        >>> summary = run_demo("demo-output", settings=DemoSettings(seconds=20))  # doctest: +SKIP
    """
    from .inference import InferenceOptions, Segmenter
    from .metrics import average_precision, iou, seg_score
    from .recipes import recipe_config

    out = prepare_output_dir(out, force=force)
    s = settings
    normalization = Normalization()
    pairs = synthetic_dataset(s.n_train + s.n_val, shape=s.train_shape, seed=s.seed)
    samples = [make_sample(img, lab, f"synthetic{i:02d}", normalization) for i, (img, lab) in enumerate(pairs)]
    config = recipe_config(
        s.recipe,
        depth=s.depth,
        base_channels=s.base_channels,
        tile_size=s.tile_size,
        iterations=100_000,
        max_seconds=s.seconds,
        val_every=100,
        checkpoint_every=100,
        seed=s.seed,
        workers=s.workers,
    )
    print(f"training a depth-{s.depth}, width-{s.base_channels} U-Net on {s.n_train} synthetic images for {s.seconds:g} s "
          "(weighted loss, elastic deformation)")
    trainer = Trainer(config, samples[: s.n_train], samples[s.n_train :], out / "run", normalization=normalization, progress=progress)
    summary = trainer.fit()

    image, labels = synthetic_cells(s.test_shape, seed=s.seed + 10_000)
    started = time.perf_counter()
    # the core `unetkit predict` uses: the labels rule and maps chosen on the validation images
    segmenter = Segmenter.load(out / "run" / "best.pt", InferenceOptions(tile_size=s.predict_tile))
    segmented = segmenter.segment(image, name="held-out image")
    probabilities, instances, rule = segmented.probabilities, segmented.labels, segmented.rule
    predict_seconds = time.perf_counter() - started
    foreground_iou = float(iou(probabilities[1] > 0.5, labels > 0))
    seg = float(seg_score(instances, labels))
    detection = average_precision(instances, labels, thresholds=(0.5,))[0.5]
    write_tiff(out / "test_image.tif", image.astype(np.float32), force=force)
    write_tiff(out / "test_probabilities.tif", probabilities, force=force)
    write_tiff(out / "test_labels.tif", instances.astype(np.uint16), force=force)
    write_png(out / "test_overlay.png", overlay(image, instances, truth=labels > 0), force=force)
    result = {
        "iterations": summary["iterations"],
        "train_seconds": round(summary["seconds"], 1),
        "best_val_iou": summary["best_val_iou"],
        "test_shape": list(s.test_shape),
        "test_foreground_iou": foreground_iou,
        "test_seg": seg,
        "test_ap50": detection["ap"],
        "test_pq50": detection["pq"],
        "labels_rule": rule.to_dict(),
        "test_objects": int(instances.max()),
        "true_objects": int(labels.max()),
        "predict_seconds": round(predict_seconds, 2),
    }
    atomic_write(out / "summary.json", lambda p: p.write_text(json.dumps(result, indent=2)), force=True)
    print(f"held-out {s.test_shape[0]}x{s.test_shape[1]} image: foreground IoU {foreground_iou:.3f}, SEG {seg:.3f}, "
          f"AP@0.5 {detection['ap']:.3f}, "
          f"{result['test_objects']} objects found ({result['true_objects']} true)")
    print(f"wrote {out / 'test_overlay.png'}, {out / 'test_probabilities.tif'}, {out / 'test_labels.tif'}, run in {out / 'run'}")
    return result
