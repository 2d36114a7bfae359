"""Training on ISBI 2012 (slices 00-19 train, 20-24 validation) within a CPU time budget.

    python benchmarks/train_isbi.py --minutes 20 --width 16
    python benchmarks/train_isbi.py --ablation --minutes 5 --width 16   # elastic on/off x weight map on/off
    python benchmarks/train_isbi.py --throughput                        # paper net: raw step vs training loop

Writes benchmarks/results/train_isbi*.json and overlay PNGs (validation slices: predicted cell
contours, missed cell pixels cyan, false cell pixels magenta).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from common import RESULTS, add_training_arguments, machine, predict_all, save_overlays, train_within, write_json
from unetkit.augment import AugmentConfig
from unetkit.data import Normalization, get_isbi2012_samples
from unetkit.metrics import iou, pixel_error
from unetkit.targets import TargetConfig
from unetkit.train import TrainConfig, Trainer


def run_one(name: str, args, elastic: bool = True, weight_map: bool = True) -> dict:
    norm = Normalization()
    targets = TargetConfig(use_weight_map=weight_map)
    train = get_isbi2012_samples(args.data, slices=range(20), normalization=norm, targets=targets)
    val = get_isbi2012_samples(args.data, slices=range(20, 25), normalization=norm)
    config = TrainConfig(
        depth=args.depth, base_channels=args.width, tile_size=args.tile_size, lr=args.lr, iterations=1_000_000,
        max_seconds=args.minutes * 60, val_every=args.val_every, checkpoint_every=args.val_every,
        targets=targets, augment=AugmentConfig(elastic=elastic), workers=args.workers, seed=args.seed, optimizer=args.optimizer,
    )
    run_dir = args.runs / name
    model, summary = train_within(config, train, val, run_dir, norm)
    maps, _ = predict_all(model, val, tta=False)
    truth = [s.target for s in val]
    result = {
        "name": name, "elastic": elastic, "weight_map": weight_map, "width": args.width, "depth": args.depth,
        "tile_size": args.tile_size, "iterations": summary["iterations"], "seconds": round(summary["seconds"], 1),
        "val_foreground_iou": iou(maps, truth), "val_pixel_error": pixel_error(maps, truth), "run_dir": str(run_dir),
    }
    result["overlays"] = save_overlays(RESULTS / f"{name}_overlays", val, [(m > 0.5).astype(np.uint8) for m in maps], truth)
    return result


def throughput(args) -> dict:
    """Paper's full-width net on one 572 tile: a raw forward+backward+SGD step vs the training loop."""
    import unetkit

    torch.manual_seed(0)
    net = unetkit.UNet().train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99)
    x = torch.randn(1, 1, 572, 572)
    target = torch.randint(0, 2, (1, 388, 388))
    weights = torch.ones(1, 388, 388)
    from unetkit.loss import SegmentationLoss

    loss_fn = SegmentationLoss()
    times = []
    for _ in range(args.steps + 1):
        started = time.perf_counter()
        loss = loss_fn(net(x), target, weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - started)
    raw = float(np.median(times[1:]))
    flops = 3 * net.flops(572)
    norm = Normalization()
    train = get_isbi2012_samples(args.data, slices=range(20), normalization=norm)
    config = TrainConfig(iterations=args.steps + 2, val_every=10_000, checkpoint_every=10_000, workers=args.workers)
    trainer = Trainer(config, train, [], args.runs / "throughput", normalization=norm, progress=False)
    trainer.fit()
    # Steady state from the run's log: the first step (warm-up, worker start) and the last one
    # (final checkpoint) are left out; data loading, logging and the optimiser are in.
    import csv

    with open(trainer.log_path, newline="") as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    loop = (seconds[-2] - seconds[0]) / (len(seconds) - 2)
    return {
        "raw_step_seconds": round(raw, 3), "raw_step_gflops_per_second": round(flops / raw / 1e9, 1),
        "loop_seconds_per_step": round(loop, 3), "loop_gflops_per_second": round(flops / loop / 1e9, 1),
        "loop_overhead_fraction": round(loop / raw - 1, 4), "steps": args.steps, "workers": args.workers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="ISBI 2012 folder (default: $UNETKIT_DATA or ../shared/data)/isbi2012")
    add_training_arguments(parser, minutes=20.0, runs="isbi")
    parser.add_argument("--val-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="train_isbi", help="run and result name")
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if args.throughput:
        write_json(RESULTS / "train_isbi_throughput.json", {**throughput(args), "machine": machine()})
    elif args.ablation:
        results = [
            run_one(f"ablation_elastic{int(e)}_weights{int(w)}", args, elastic=e, weight_map=w)
            for e in (True, False) for w in (True, False)
        ]
        write_json(RESULTS / "train_isbi_ablation.json", {"minutes_each": args.minutes, "runs": results, "machine": machine()})
    else:
        result = run_one(args.name, args)
        write_json(RESULTS / f"{args.name}.json", {**result, "optimizer": args.optimizer, "lr": args.lr, "minutes": args.minutes, "machine": machine()})


if __name__ == "__main__":
    main()
