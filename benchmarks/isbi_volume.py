"""Does 3D context lower the Rand error? The ISBI 2012 sections as one serial-section TEM volume.

The 25 annotated sections are consecutive slices of one volume (pixel 4 x 4 nm, section 50 nm,
so z spacing 12.5 pixels). Two arms train for the same CPU time on one thread
(`budget_clock="cpu"`, so two arms run side by side without eating each other's budget):

- ``2d``: the default recipe for membranes (`unetkit.recipes`), slices 00-17 as 2D images;
- ``3d``: the same recipe as an anisotropic 3D U-Net (`TrainConfig(dims=3, spacing=...)`):
  pooling only in xy until the spacing is about isotropic (`unetkit.geometry.plan_kernels`),
  trained on the sub-volume 00-17 with (12, 252, 252) tiles (`DEPTH_3D`, `TILE_3D`).

Both keep the best checkpoint on slices 18-19 and choose their labels rule there, as `unetkit
train` does, and are scored on slices 20-24, which neither sees before scoring: the 3D arm
predicts the 5-slice volume 20-24 (mirrored in z at its ends, no context from the training
slices) with 16-fold TTA; the 2D arm each slice with 8-fold TTA. The labels rule is applied and
scored slice by slice, as the challenge scores.

    python benchmarks/isbi_volume.py --arm 2d --seed 0 --minutes 25
    python benchmarks/isbi_volume.py --arm 3d --seed 0 --minutes 25
    python benchmarks/isbi_volume.py --table     # benchmarks/results/isbi_volume.json

Runs resume from runs/isbi_volume/ARM_sSEED when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RUNS = Path("runs") / "isbi_volume"
#: ISBI 2012: 4 x 4 nm pixels, 50 nm sections (the challenge's description of the data).
SPACING = (12.5, 1.0, 1.0)
TRAIN, VALIDATION, TEST = range(18), [18, 19], range(20, 25)
#: The 3D arm's network: 4 levels, planned for SPACING: (1, 2, 2) pooling three times and 3x3x3
#: convolutions only at the bottom level (where the xy spacing has reached 8, within 2x of 12.5).
#: With the recipe's 5 levels z would be pooled once more and a tile would need 18 slices for 4
#: output slices: 2.2 million FLOPs per output voxel against 0.14 million for (12, 252, 252) tiles
#: at 4 levels and 0.13 million for the 2D arm's 572 x 572 tiles (`UNet.flops`).
DEPTH_3D, TILE_3D = 4, (12, 252, 252)


def run_arm(arm: str, seed: int, minutes: float, data: Path | None) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from unetkit.checkpoint import load_checkpoint
    from unetkit.data import Normalization, get_isbi2012_samples
    from unetkit.decision import DecisionRule
    from unetkit.metrics import pixel_error, rand_error
    from unetkit.predict import predict
    from unetkit.recipes import recipe_config
    from unetkit.train import Trainer

    common = dict(iterations=1_000_000, max_seconds=minutes * 60, budget_clock="cpu", workers=0, seed=seed,
                  val_every=100, checkpoint_every=100, precision_scores=False)
    norm = Normalization()
    run_dir = RUNS / f"{arm}_s{seed}"
    resume = (run_dir / "last.pt").is_file()
    if arm == "2d":
        config = recipe_config("default", task="membranes", **common)
        train = get_isbi2012_samples(data, slices=TRAIN, normalization=norm, targets=config.targets)
        val = get_isbi2012_samples(data, slices=VALIDATION, normalization=norm, targets=config.targets)
    else:
        from unetkit.data import get_isbi2012_volume

        config = recipe_config("default", task="membranes", dims=3, spacing=SPACING, depth=DEPTH_3D,
                               tile_size=TILE_3D[1], tile_depth=TILE_3D[0], **common)
        train = [get_isbi2012_volume(data, slices=TRAIN, normalization=norm, targets=config.targets)]
        val = [get_isbi2012_volume(data, slices=VALIDATION, normalization=norm, targets=config.targets)]
    summary = Trainer(config, train, val, run_dir, normalization=norm, resume=resume, progress=False).fit()
    loaded = load_checkpoint(run_dir / "best.pt")
    rule = DecisionRule.from_dict(loaded.decision)
    test = get_isbi2012_samples(data, slices=TEST, normalization=norm)
    started = time.perf_counter()
    if arm == "2d":
        maps = [predict(loaded.model, s.image, tta=True)[1] for s in test]
    else:
        from unetkit.volume import predict_volume

        volume = np.stack([s.image for s in test], axis=1)  # (C, Z, Y, X)
        maps = list(predict_volume(loaded.model, volume, tta=True)[1])
    predict_seconds = (time.perf_counter() - started) / len(test)
    truth = [s.instances for s in test]
    labels = [rule.apply(m) for m in maps]
    result = {
        "arm": arm, "seed": seed, "cpu_minutes": minutes, "iterations": summary["iterations"],
        "best_iteration": loaded.iteration, "network": dict(loaded.model.config),
        "rand_error_labels": rand_error(labels, truth), "rand_error_best_threshold": rand_error(maps, truth),
        "pixel_error": pixel_error(maps, truth), "decision": rule.to_dict(),
        "predict_seconds_per_slice_tta": round(predict_seconds, 2),
        "train_gflops": summary.get("train_gflops"),
    }
    (run_dir / "result.json").write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps(result, default=float))
    return result


def table() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import RESULTS, machine, write_json
    from unetkit.backends import cpu_name

    rows = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*/result.json"))]
    lines = ["| arm | seed | iterations | best.pt iteration | Rand error, labels | Rand error, map (best threshold) | pixel error |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['arm']} | {row['seed']} | {row['iterations']} | {row['best_iteration']} | "
                     f"{row['rand_error_labels']:.4f} | {row['rand_error_best_threshold']:.4f} | {row['pixel_error']:.4f} |")
    means = {}
    for arm in sorted({r["arm"] for r in rows}):
        group = [r["rand_error_labels"] for r in rows if r["arm"] == arm]
        means[arm] = sum(group) / len(group)
    print("\n".join(lines))
    result = {
        "experiment": __doc__.split("\n\n")[0],
        "split": "train 00-17, validate 18-19, score 20-24",
        "spacing_zyx": SPACING,
        "runs": rows, "mean_rand_error_labels": means, "markdown": lines,
        "machine": {**machine(), "cpu": cpu_name()},
    }
    write_json(RESULTS / "isbi_volume.json", result)
    return result



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", choices=("2d", "3d"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=25.0, help="CPU minutes of training (one thread)")
    parser.add_argument("--data", type=Path, default=None, help="ISBI 2012 folder's parent (default: $UNETKIT_DATA or ../shared/data)")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.table:
        table()
    elif args.arm:
        run_arm(args.arm, args.seed, args.minutes, args.data)
    else:
        parser.error("give --arm 2d|3d or --table")


if __name__ == "__main__":
    main()
