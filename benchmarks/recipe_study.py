"""Recipe study: which training choices win within a CPU budget, one change at a time.

Every arm trains the same width-16 U-Net on ISBI 2012 slices 00-17 for the same CPU time (one
thread, `budget_clock="cpu"`, so arms run two at a time without eating each other's budget),
keeps the best checkpoint on slices 18-19 and chooses its labels rule there, and is scored on
slices 20-24, which no arm sees before scoring. An arm is a set of `TrainConfig` overrides on top
of the baseline (the recipe `unetkit train` used before this study: the paper's loss and
augmentation with Adam 1e-3).

    python benchmarks/recipe_study.py --list
    python benchmarks/recipe_study.py --arm bn --seed 0 --minutes 6      # one arm, one seed
    python benchmarks/recipe_study.py --arm bn --final                    # score its final weights
    python benchmarks/recipe_study.py --arm bn --dataset dic             # the same arm on DIC-HeLa
    python benchmarks/recipe_study.py --table                            # collect results

Each arm writes runs/recipe/<arm>_s<seed>/result.json; `--table` writes
benchmarks/results/recipe_study.json and prints a Markdown table (docs/TRAINING.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RUNS = Path("runs") / "recipe"

BASELINE = dict(base_channels=16, optimizer="adam", lr=1e-3)

ARMS: dict[str, dict] = {
    "baseline": {},
    "bn": {"batch_norm": True},
    "no_dropout": {"dropout": 0.0},
    "unweighted": {"targets": {"class_weights": (1.0, 1.0), "use_weight_map": False}},
    "no_weight_map": {"targets": {"use_weight_map": False}},
    "w0_3": {"targets": {"w0": 3.0}},
    "cosine": {"lr_schedule": "cosine"},
    "poly": {"lr_schedule": "poly"},
    "onecycle": {"lr_schedule": "onecycle", "lr": 3e-3},
    "dice": {"dice_weight": 1.0},
    "tile_380_batch_2": {"tile_size": 380, "batch_size": 2},
    "sgd_paper": {"optimizer": "sgd", "lr": 1e-3},
    "elastic_off": {"augment": {"elastic": False}},
    "no_rotation": {"augment": {"rotate": False}},
    "no_gray": {"augment": {"gamma": False, "contrast": False, "brightness": False, "noise": False}},
    # combinations of the single changes that won
    "bn_unweighted": {"batch_norm": True, "targets": {"class_weights": (1.0, 1.0), "use_weight_map": False}},
    "bn_unweighted_cosine": {"batch_norm": True, "targets": {"class_weights": (1.0, 1.0), "use_weight_map": False}, "lr_schedule": "cosine"},
    "bn_no_dropout": {"batch_norm": True, "dropout": 0.0},
    "bn_unweighted_no_dropout": {"batch_norm": True, "targets": {"class_weights": (1.0, 1.0), "use_weight_map": False}, "dropout": 0.0},
    "bn_unweighted_no_dropout_cosine": {"batch_norm": True, "targets": {"class_weights": (1.0, 1.0), "use_weight_map": False},
                                        "dropout": 0.0, "lr_schedule": "cosine"},
}


def run_arm(name: str, seed: int, minutes: float, data: Path | None, dataset: str = "isbi") -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from unetkit.augment import AugmentConfig
    from unetkit.checkpoint import load_checkpoint
    from unetkit.data import Normalization, get_ctc_samples, get_isbi2012_samples
    from unetkit.decision import DecisionRule
    from unetkit.metrics import average_precision, pixel_error, rand_error, seg_score, warping_error
    from unetkit.predict import predict
    from unetkit.train import TrainConfig, Trainer

    overrides = dict(ARMS[name])
    augment = AugmentConfig(**overrides.pop("augment", {}))
    config = TrainConfig(**{**BASELINE, **overrides}, augment=augment, iterations=1_000_000, max_seconds=minutes * 60,
                         budget_clock="cpu", workers=0, seed=seed, val_every=100, checkpoint_every=100)
    norm = Normalization()
    if dataset == "isbi":
        train = get_isbi2012_samples(data, slices=range(18), normalization=norm, targets=config.targets)
        val = get_isbi2012_samples(data, slices=[18, 19], normalization=norm, targets=config.targets)
        test = get_isbi2012_samples(data, slices=range(20, 25), normalization=norm)
    else:
        train = get_ctc_samples(data, frames=range(40), normalization=norm, targets=config.targets)
        val = get_ctc_samples(data, frames=range(40, 45), normalization=norm, targets=config.targets)
        test = get_ctc_samples(data, frames=range(45, 60), normalization=norm)
    run_dir = RUNS / (f"{name}_s{seed}" if dataset == "isbi" else f"{dataset}_{name}_s{seed}")
    resume = (run_dir / "last.pt").is_file()
    summary = Trainer(config, train, val, run_dir, normalization=norm, resume=resume, progress=False).fit()
    loaded = load_checkpoint(run_dir / "best.pt")
    rule = DecisionRule.from_dict(loaded.decision)
    started = time.perf_counter()
    maps = [predict(loaded.model, s.image, tta=True)[1] for s in test]
    predict_seconds = (time.perf_counter() - started) / len(test)
    truth = [s.instances for s in test]
    labels = [rule.apply(m) for m in maps]
    result = {
        "dataset": dataset, "arm": name, "seed": seed, "overrides": ARMS[name], "cpu_minutes": minutes,
        "iterations": summary["iterations"], "best_iteration": loaded.iteration,
    }
    if dataset == "isbi":
        result.update({
            "rand_error_labels": rand_error(labels, truth),
            "rand_error_best_threshold": rand_error(maps, truth),
            "pixel_error": pixel_error(maps, truth),
            "warping_error": warping_error(maps, truth),
        })
    else:
        detection = average_precision(labels, truth, thresholds=(0.5,))[0.5]
        result.update({
            "seg": seg_score(labels, truth), "ap50": detection["ap"], "pq50": detection["pq"],
            "objects_predicted": int(sum(int(l.max()) for l in labels)),
            "objects_labelled": int(sum(len(np.unique(t)) - 1 for t in truth)),
        })
    result.update({
        "decision": rule.to_dict(),
        "predict_seconds_per_slice_tta": round(predict_seconds, 2),
    })
    (run_dir / "result.json").write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps(result, default=float))
    return result


def score_final_weights(name: str, seed: int, data: Path | None) -> dict:
    """Score an ISBI arm's final weights (last.pt) as the default recipe keeps them with a decaying
    schedule: its labels rule chosen on slices 18-19, Rand error of those labels on 20-24. Adds
    "final_iteration" and "rand_error_labels_final" to the arm's result.json."""
    import torch

    torch.set_num_threads(1)
    from unetkit.checkpoint import load_checkpoint
    from unetkit.data import Normalization, get_isbi2012_samples
    from unetkit.decision import choose_decision
    from unetkit.metrics import pixel_error, rand_error
    from unetkit.predict import predict

    run_dir = RUNS / f"{name}_s{seed}"
    result = json.loads((run_dir / "result.json").read_text())
    last = load_checkpoint(run_dir / "last.pt")
    norm = Normalization()
    val = get_isbi2012_samples(data, slices=[18, 19], normalization=norm)
    test = get_isbi2012_samples(data, slices=range(20, 25), normalization=norm)
    val_maps = [predict(last.model, s.image, tta=True)[1] for s in val]
    rule = choose_decision(val_maps, [s.instances for s in val], tta=True)
    maps = [predict(last.model, s.image, tta=True)[1] for s in test]
    truth = [s.instances for s in test]
    result.update({"final_iteration": last.iteration, "rand_error_labels_final": rand_error([rule.apply(m) for m in maps], truth),
                   "pixel_error_final": pixel_error(maps, truth), "decision_final": rule.to_dict()})
    (run_dir / "result.json").write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps(result, default=float))
    return result


def _fmt(group: list[dict], key: str, digits: int = 4) -> str:
    values = [r[key] for r in group if key in r]
    return f"{sum(values) / len(values):.{digits}f}" if values else "-"


#: The columns of each dataset's table: (heading, result key, digits).
COLUMNS = {
    "isbi": [("iterations", "iterations", 0), ("best.pt iteration", "best_iteration", 0),
             ("Rand error, labels (best.pt)", "rand_error_labels", 4), ("Rand error, labels (final weights)", "rand_error_labels_final", 4),
             ("Rand error, map (best threshold)", "rand_error_best_threshold", 4), ("pixel error", "pixel_error", 4),
             ("warping error", "warping_error", 5)],
    "dic": [("iterations", "iterations", 0), ("SEG", "seg", 4), ("AP@0.5", "ap50", 4), ("PQ@0.5", "pq50", 4),
            ("objects found", "objects_predicted", 0), ("objects labelled", "objects_labelled", 0)],
}
TITLES = {
    "isbi": "ISBI 2012 (train 00-17, validate 18-19, score 20-24; lower is better):",
    "dic": "DIC-HeLa (train t000-t039, validate t040-t044, score t045-t059; higher is better):",
}


def table() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import RESULTS, machine, write_json

    rows = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*/result.json"))]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row.get("dataset", "isbi"), row["arm"]), []).append(row)
    lines: list[str] = []
    for dataset, columns in COLUMNS.items():
        lines += [TITLES[dataset], "", "| arm | change from the baseline | seeds | " + " | ".join(c[0] for c in columns) + " |",
                  "| --- " * (len(columns) + 3) + "|"]
        for arm in (a for a in ARMS if (dataset, a) in groups):
            group = groups[(dataset, arm)]
            change = f"`{json.dumps(ARMS[arm])}`" if ARMS[arm] else "(baseline)"
            cells = [_fmt(group, key, digits) for _, key, digits in columns]
            lines.append(f"| {arm} | {change} | {len(group)} | " + " | ".join(cells) + " |")
        lines.append("")
    print("\n".join(lines))
    result = {"runs": rows, "markdown": lines, "machine": machine()}
    write_json(RESULTS / "recipe_study.json", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", choices=sorted(ARMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=6.0, help="CPU minutes of training per arm (one thread)")
    parser.add_argument("--dataset", choices=("isbi", "dic"), default="isbi",
                        help="isbi: train 00-17, validate 18-19, score 20-24; dic (DIC-HeLa): train t000-t039, validate t040-t044, score t045-t059")
    parser.add_argument("--data", type=Path, default=None, help="dataset folder (default: the one under $UNETKIT_DATA or ../shared/data)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--final", action="store_true", help="score the final weights (last.pt) of an ISBI --arm")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.list:
        print("\n".join(f"{k}: {v}" for k, v in ARMS.items()))
    elif args.table:
        table()
    elif args.arm and args.final:
        score_final_weights(args.arm, args.seed, args.data)
    elif args.arm:
        run_arm(args.arm, args.seed, args.minutes, args.data, args.dataset)
    else:
        parser.error("give --arm NAME, --table or --list")


if __name__ == "__main__":
    main()
