"""The paper's ISBI 2012 experiment (Sec. 4.1), scaled to a CPU budget.

Trains on slices 00-19 (or loads --checkpoint), predicts the evaluation slices (default 20-24)
with 8-fold test-time augmentation and reports pixel, Rand and warping error next to the paper's
0.0611 / 0.0382 / 0.000353. The paper's numbers are on the challenge's hidden test set with
30 training slices and 10 GPU hours; ours are on held-out training slices 20-24.

    python benchmarks/reproduce_isbi2012.py --minutes 30 --width 16
    python benchmarks/reproduce_isbi2012.py --checkpoint runs/isbi/train_isbi/best.pt --slices 20-24
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from common import RESULTS, add_budget_arguments, checkpoint_or_train, machine, predict_all, save_overlays, write_json
from unetkit.data import get_isbi2012_samples
from unetkit.metrics import pixel_error, rand_error, warping_error

PAPER_RESULTS = {"pixel_error": 0.0611, "rand_error": 0.0382, "warping_error": 0.000353}


def slice_range(text: str) -> list[int]:
    start, _, stop = text.partition("-")
    return list(range(int(start), int(stop or start) + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="ISBI 2012 folder (default: $UNETKIT_DATA or ../shared/data)/isbi2012")
    parser.add_argument("--slices", type=slice_range, default=slice_range("20-24"), help="slices to score, e.g. 20-24")
    add_budget_arguments(parser, minutes=30.0, runs="isbi")
    parser.add_argument("--out", type=Path, default=RESULTS / "reproduce_isbi2012.json")
    args = parser.parse_args()

    model, norm, training = checkpoint_or_train(
        args,
        lambda norm: get_isbi2012_samples(args.data, slices=range(20), normalization=norm),
        lambda norm: get_isbi2012_samples(args.data, slices=args.slices, normalization=norm),
        "reproduce_isbi2012",
    )
    samples = get_isbi2012_samples(args.data, slices=args.slices, normalization=norm)
    maps, seconds_per_image = predict_all(model, samples, tta=not args.no_tta)
    truth = [s.target for s in samples]
    rand, per_threshold = rand_error(maps, truth, return_thresholds=True)
    warping, details = warping_error(maps, truth, return_details=True)
    result = {
        "slices": args.slices,
        "tta": not args.no_tta,
        "ours": {"pixel_error": pixel_error(maps, truth), "rand_error": rand, "warping_error": warping},
        "paper_hidden_test_set": PAPER_RESULTS,
        "note": "paper: hidden ISBI 2012 test set, 30 training slices, ~10 h GPU; ours: held-out training slices, CPU budget",
        "rand_error_per_threshold": per_threshold,
        "warping_error_classes": details,
        "predict_seconds_per_image": round(seconds_per_image, 2),
        "training": training,
        "machine": machine(),
    }
    result["overlays"] = save_overlays(RESULTS / "reproduce_isbi2012_overlays", samples, [(m > 0.5).astype(np.uint8) for m in maps], truth)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
