"""The paper's DIC-HeLa experiment (Sec. 4.2), scaled to a CPU budget.

Trains on frames t000-t044 of ../shared/data/ctc-dic-c2dh-hela with the weight map from the
instance labels (or loads --checkpoint), predicts frames t045-t059 with 8-fold test-time
augmentation, turns probabilities into instances (seeded watershed) and reports SEG next to the
paper's 0.7756. Ours is scored against the (likely silver) truth shipped with the data, theirs
against the challenge's gold truth on a hidden test sequence.

    python benchmarks/reproduce_dic_hela.py --minutes 20 --width 16
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from common import RESULTS, add_budget_arguments, checkpoint_or_train, machine, predict_all, save_overlays, write_json
from unetkit.data import get_ctc_samples
from unetkit.metrics import average_precision, iou, seg_score
from unetkit.postprocess import probabilities_to_instances

PAPER_SEG = 0.7756


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="dataset folder (default: $UNETKIT_DATA or ../shared/data)/ctc-dic-c2dh-hela")
    add_budget_arguments(parser, minutes=20.0, runs="dic_hela")
    parser.add_argument("--min-size", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS / "reproduce_dic_hela.json")
    args = parser.parse_args()

    model, norm, training = checkpoint_or_train(
        args,
        lambda norm: get_ctc_samples(args.data, frames=range(45), normalization=norm),
        lambda norm: get_ctc_samples(args.data, frames=range(45, 60, 3), normalization=norm),
        "reproduce_dic_hela",
    )
    samples = get_ctc_samples(args.data, frames=range(45, 60), normalization=norm)
    maps, seconds_per_image = predict_all(model, samples, tta=not args.no_tta)
    instances = [probabilities_to_instances(m, method="watershed", min_size=args.min_size) for m in maps]
    truth = [s.instances for s in samples]
    ap = average_precision(instances, truth)
    result = {
        "frames": "t045-t059",
        "tta": not args.no_tta,
        "ours": {"seg": seg_score(instances, truth), "foreground_iou": iou(maps, [t > 0 for t in truth]),
                 "ap50": ap[0.5]["ap"], "f1_50": ap[0.5]["f1"]},
        "paper_seg_gold_test_set": PAPER_SEG,
        "note": "paper: CTC gold truth on a hidden test sequence; ours: frames t045-t059 of sequence 01 against the shipped (likely silver) truth",
        "average_precision": {str(k): v for k, v in ap.items()},
        "predict_seconds_per_image": round(seconds_per_image, 2),
        "training": training,
        "machine": machine(),
    }
    result["overlays"] = save_overlays(RESULTS / "reproduce_dic_hela_overlays", samples[::5], instances[::5], truth[::5])
    write_json(args.out, result)


if __name__ == "__main__":
    main()
