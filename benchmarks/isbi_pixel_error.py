"""Where the ISBI 2012 pixel error comes from: boundary placement or structure, threshold or model.

Scores trained runs of `benchmarks/peer_monai.py` (either side, or unetkit runs made with
`peer_monai.py --side unetkit --unetkit-args=...`) on slices 20-24, and unetkit runs also on the
slices they trained on:

    .venv/bin/python benchmarks/isbi_pixel_error.py --unetkit runs/peer4/isbi/unetkit runs/peer5/isbi/unetkit \\
        --monai runs/peer4/isbi/monai runs/peer5/isbi/monai

For each probability map of a cell (P(cell), TTA for unetkit as `peer_monai` predicts it) it reports

- the pixel error at 0.5 (the figure `peer_monai` reports), at the best single threshold over 0.20-0.80, and
  with the best threshold chosen for each slice on its own truth (an oracle no method has);
- the wrong pixels split by their distance to the nearest edge of the annotation: on an edge pixel
  (a cell pixel touching membrane or a membrane pixel touching a cell), 1 px from one, 2 px, or
  farther. Errors within 1 px are where the membrane is drawn, not whether it is there;
- the membrane share of the truth and of the prediction, per slice;
- the Rand and warping errors of each tool's own labels (unetkit: its stored rule; MONAI: the
  components of P(cell) > 0.5, as `peer_monai` draws them); for the warping error a labels image
  is read as a training target reads it (`unetkit.targets.foreground_target`): the pixels where
  two cells touch become membrane.

Writes benchmarks/results/isbi_pixel_error.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage as ndi

from common import RESULTS, machine, write_json
from peer_monai import dataset_folder, load_monai, load_split, monai_predict, score, unetkit_decision, unetkit_instances

THRESHOLDS = np.round(np.arange(0.20, 0.801, 0.05), 2)
BANDS = ("edge", "1 px", "2 px", "farther")


def distance_to_edge(truth: np.ndarray) -> np.ndarray:
    """Distance (px) of each pixel to the nearest edge pixel of a binary annotation (the image's
    own border is not an edge)."""
    erode = lambda mask: ndi.binary_erosion(mask, border_value=1)  # noqa: E731
    edge = (truth & ~erode(truth)) | (~truth & ~erode(~truth))
    return ndi.distance_transform_edt(~edge)


def labels_warping(labels: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> dict:
    """Warping error of a tool's own labels, read as a training target reads them: cells, with the
    pixels where two cells touch taken out (`unetkit.targets.foreground_target`)."""
    from unetkit.metrics import warping_error
    from unetkit.targets import foreground_target

    error, details = warping_error([foreground_target(l) for l in labels], [t.astype(np.uint8) for t in truths],
                                   return_details=True)
    return {"warping_error_labels": round(error, 5), "warping_error_labels_classes": details}


def map_report(maps: Sequence[np.ndarray], truths: Sequence[np.ndarray], names: Sequence[str]) -> dict:
    """Pixel error of P(cell) maps against binary truths, its threshold dependence and where it lies."""
    errors = np.array([[np.mean((p > t) != g) for t in THRESHOLDS] for p, g in zip(maps, truths)])
    at_half = float(np.mean([np.mean((p > 0.5) != g) for p, g in zip(maps, truths)]))
    bands = np.zeros(len(BANDS))
    for p, g in zip(maps, truths):
        wrong, d = (p > 0.5) != g, distance_to_edge(g)
        bands += [np.sum(wrong & (d == 0)), np.sum(wrong & (d > 0) & (d <= 1)), np.sum(wrong & (d > 1) & (d <= 2)), np.sum(wrong & (d > 2))]
    bands /= sum(g.size for g in truths)
    mean = errors.mean(axis=0)
    return {
        "pixel_error": round(at_half, 5),
        "best_threshold": float(THRESHOLDS[mean.argmin()]),
        "pixel_error_best_threshold": round(float(mean.min()), 5),
        "pixel_error_per_slice_oracle_threshold": round(float(errors.min(axis=1).mean()), 5),
        "error_by_distance_to_edge": {band: round(float(v), 5) for band, v in zip(BANDS, bands)},
        "error_within_1px_share": round(float(bands[:2].sum() / max(bands.sum(), 1e-12)), 3),
        "membrane_share": {n: {"truth": round(float(1 - g.mean()), 3), "predicted": round(float(np.mean(p <= 0.5)), 3)}
                           for n, p, g in zip(names, maps, truths)},
    }


def scored_slices(maps: Sequence[np.ndarray], labels: Sequence[np.ndarray], test: Sequence) -> dict:
    """Everything reported on slices 20-24 for one tool's maps and labels, scored as `peer_monai` scores."""
    truths = [s.instances > 0 for s in test]
    metrics = score("isbi", maps, labels, test)["metrics"]
    return {**map_report(maps, truths, [s.name for s in test]),
            **{key: round(metrics[key], 5) for key in ("rand_error_labels", "warping_error")},
            **labels_warping(labels, truths)}


def unetkit_report(run: Path) -> dict:
    """`run`: a peer_monai side folder (holding run/) or a run folder of `unetkit train` itself."""
    from unetkit import predict
    from unetkit.checkpoint import load_checkpoint
    from unetkit.data import get_isbi2012_samples
    from unetkit.decision import DecisionRule

    run_dir = run / "run" if (run / "run" / "best.pt").is_file() else run
    loaded = load_checkpoint(run_dir / "best.pt")
    decision, _ = unetkit_decision(loaded)
    statistics = DecisionRule.from_dict(decision).norm_statistics if decision else "training"
    probability = lambda samples: [predict(loaded.model, s.image, tta=True, norm_statistics=statistics)[1] for s in samples]  # noqa: E731

    test = load_split("isbi", "test", loaded.normalization)
    maps = probability(test)
    labels = [unetkit_instances(loaded, p) for p in maps]
    trained_on = json.loads((run_dir / "data.json").read_text())["train"]
    seen = get_isbi2012_samples(dataset_folder("isbi"), slices=[int(n) for n in trained_on], normalization=loaded.normalization)
    config = loaded.train_config
    return {
        "run": str(run), "iterations": loaded.iteration,
        "recipe": {key: config.get(key) for key in ("base_channels", "padding", "tile_size", "lr", "max_seconds", "budget_clock")},
        "rule": decision,
        "scored_slices": scored_slices(maps, labels, test),
        "training_slices": {key: value for key, value in map_report(
            probability(seen), [s.instances > 0 for s in seen], [s.name for s in seen]).items() if key != "membrane_share"},
    }


def monai_report(run: Path) -> dict:
    from unetkit.labels import label_components

    model, iterations = load_monai(run)
    test = load_split("isbi", "test")
    maps = [monai_predict(model, s.image)[1] for s in test]
    labels = [label_components(p > 0.5) for p in maps]  # MONAI's labels, as peer_monai draws them
    return {"run": str(run), "iterations": iterations, "scored_slices": scored_slices(maps, labels, test)}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unetkit", nargs="*", type=Path, default=[], help="unetkit side folders of peer_monai runs, or unetkit run folders")
    parser.add_argument("--monai", nargs="*", type=Path, default=[], help="MONAI side folders of peer_monai runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="isbi_pixel_error", help="results file stem")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {
        "what": "ISBI 2012 pixel error of P(cell) on slices 20-24: threshold dependence and distance of the wrong pixels "
                "to the annotation's edges; unetkit runs also on their own training slices",
        "command": "python benchmarks/isbi_pixel_error.py " + " ".join(
            [*(["--unetkit", *map(str, args.unetkit)] if args.unetkit else []), *(["--monai", *map(str, args.monai)] if args.monai else [])]),
        "thresholds": THRESHOLDS.tolist(),
        "unetkit": [unetkit_report(run) for run in args.unetkit],
        "monai": [monai_report(run) for run in args.monai],
        "machine": machine(),
    }
    write_json(RESULTS / f"{args.name}.json", result)
    return result


if __name__ == "__main__":
    main()
