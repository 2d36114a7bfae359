"""Which weights of an EM membranes run segment unseen slices best?

A run of the default membranes recipe on ISBI 2012 slices 00-19 (its own validation share held
out, as `unetkit train` does) keeps snapshots of its weights every `--snapshot-every` iterations,
both the raw weights and an exponential moving average (EMA) of them. Each snapshot gets the labels
rule chosen on the run's validation slices (`unetkit.decision.choose_decision`, 8-fold TTA maps),
and is scored on the held-out slices 20-24 by the Rand error of its labels. The JSON lets one
compare ways of choosing the weights: the final ones (what a decaying schedule keeps today), the
final EMA, and the snapshot with the lowest validation Rand error.

    python benchmarks/em_weights_study.py --seed 0 --iterations 2500 --out results/seed0.json

Runs on CPU or GPU (`--device`); one process per seed, so seeds can run side by side.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_monai as pm  # noqa: E402  (the ISBI split and the training folder of links)

from unetkit import predict  # noqa: E402
from unetkit.decision import DecisionRule, choose_decision  # noqa: E402
from unetkit.metrics import rand_error  # noqa: E402
from unetkit.recipes import recipe_config  # noqa: E402
from unetkit.train import Trainer  # noqa: E402


class SnapshotTrainer(Trainer):
    """A `Trainer` that also keeps an EMA of the weights and in-memory snapshots of both."""

    def __init__(self, *args, ema_decay: float = 0.999, snapshot_every: int = 500, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ema_decay = ema_decay
        self.snapshot_every = snapshot_every
        self.ema_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.snapshots: list[dict] = []

    def _step(self, batch, budget):
        loss = super()._step(batch, budget)
        decay = min(self.ema_decay, (1 + self.iteration) / (10 + self.iteration))  # short warm-up
        with torch.no_grad():
            for key, value in self.model.state_dict().items():
                if value.is_floating_point():
                    self.ema_state[key].lerp_(value, 1 - decay)
                else:
                    self.ema_state[key].copy_(value)
        return loss

    def _checkpoint(self) -> None:
        super()._checkpoint()
        if self.iteration % self.snapshot_every == 0 or self._finished():
            raw = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            ema = {k: v.detach().cpu().clone() for k, v in self.ema_state.items()}
            self.snapshots.append({"iteration": self.iteration, "raw": raw, "ema": ema})


def score(model, val_samples, test_samples, device) -> tuple[dict, list, list]:
    """Rule chosen on validation maps; Rand error of the labels on validation and on each test slice
    (and the validation and test maps)."""
    model = model.to(device).eval()
    val_maps = [predict(model, s.image, tta=True, device=device, backend="torch")[1] for s in val_samples]
    rule = choose_decision(val_maps, [s.instances for s in val_samples], tta=True)
    test_maps = [predict(model, s.image, tta=True, device=device, backend="torch")[1] for s in test_samples]
    fixed = DecisionRule("components", threshold=0.5)
    return {
        "val_rand": float(rule.score),
        "rule": rule.to_dict(),
        "test_rand": [round(float(rand_error(rule.apply(p), s.instances)), 5) for p, s in zip(test_maps, test_samples)],
        "test_rand_components_0.5": [round(float(rand_error(fixed.apply(p), s.instances)), 5) for p, s in zip(test_maps, test_samples)],
    }, val_maps, test_maps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=2500)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--snapshot-every", type=int, default=500)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--save-maps", type=Path, help="an .npz for the final weights' validation and test maps (float16)")
    parser.add_argument("--val", help="validation slices, e.g. 16,17,18,19 (default: a fifth, drawn with --seed, as the published runs did)")
    parser.add_argument("--raw-only", action="store_true", help="score the raw weights only, not their EMA")
    parser.add_argument("--keep-best", type=Path, help="keep the run's best.pt (final weights, labels rule) packed in float16 here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    config = recipe_config("default", "membranes", base_channels=args.width, iterations=args.iterations,
                           seed=args.seed, workers=args.workers, checkpoint_every=args.snapshot_every,
                           val_every=args.snapshot_every, device=str(device))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = pm.training_folder("isbi", Path(tmp) / "data")
        val = args.val.split(",") if args.val else None
        trainer = Trainer.start(config, data, Path(tmp) / "run", val=val, val_split="random", progress=False)
        study = SnapshotTrainer(config, trainer.train_samples, trainer.val_samples, Path(tmp) / "run2",
                                normalization=trainer.normalization, progress=False,
                                ema_decay=args.ema_decay, snapshot_every=args.snapshot_every)
        study.fit()
        if args.keep_best:
            from unetkit.checkpoint import pack_checkpoint

            pack_checkpoint(Path(tmp) / "run2" / "best.pt", "em-membranes", args.keep_best)
    train_seconds = time.perf_counter() - started
    test_samples = pm.load_split("isbi", "test", trainer.normalization)
    rows = []
    for snap in study.snapshots:
        for kind in ("raw",) if args.raw_only else ("raw", "ema"):
            model = copy.deepcopy(study.model)
            model.load_state_dict(snap[kind])
            scores, val_maps, test_maps = score(model, study.val_samples, test_samples, device)
            rows.append({"iteration": snap["iteration"], "weights": kind, **scores})
            if args.save_maps and kind == "raw" and snap is study.snapshots[-1]:
                maps = {f"val_{s.name}": m for s, m in zip(study.val_samples, val_maps)}
                maps.update({f"test_{s.name}": m for s, m in zip(test_samples, test_maps)})
                np.savez_compressed(args.save_maps, **{k: v.astype(np.float16) for k, v in maps.items()})
    result = {
        "seed": args.seed, "iterations": args.iterations, "width": args.width, "ema_decay": args.ema_decay,
        "device": str(device), "train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - started, 1),
        "val_slices": [s.name for s in study.val_samples], "test_slices": [s.name for s in test_samples],
        "snapshots": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    final = [r for r in rows if r["iteration"] == rows[-1]["iteration"]]
    for r in final:
        print(args.seed, r["weights"], "final test Rand", round(float(np.mean(r["test_rand"])), 4), r["test_rand"], flush=True)


if __name__ == "__main__":
    main()
