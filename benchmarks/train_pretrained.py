"""Train, score and pack one of unetkit's packaged pretrained models (see `unetkit.pretrained`).

Trains the "default" recipe (`unetkit.recipes`) at width --width for --minutes on the model's
training images, keeps the best checkpoint on its validation images (which also choose the labels
rule), scores the held-out images with 8-fold test-time augmentation and the chosen rule, packs
best.pt into the package (float16, src/unetkit/models/NAME.pt) and records the scores and training
facts in src/unetkit/models/models.json and benchmarks/results/pretrained_NAME.json.

The splits come from the registry (`unetkit.pretrained.REGISTRY`):

* em-membranes: ISBI 2012 slices 00-19 (validation 16-19), 20-24 held out;
* dic-hela: DIC-C2DH-HeLa t000-t044 (validation t036-t044), t045-t059 held out;
* fluo-nuclei: Fluo-N2DH-GOWT1 t01, t21, t39, t72 train, t52 validation, t31 held out; and the DSB2018
  sample image's quadrants, enlarged so its nuclei have the GOWT1 nuclei's median diameter: top-left
  train, bottom-right validation, top-right and bottom-left held out (scored at their own size with
  ``--diameter auto``, as a user would run them). It trains with scale and wider gray-value
  augmentation (`PretrainedModel.augment`).

The run folder (--runs/NAME) is resumed when it holds last.pt; the budget counts across resumes.
The packaged models together must stay within 10 MB (`unetkit.pretrained.SIZE_LIMIT`): a width-16
model is about 3.9 MB, width 14 about 3.0 MB, width 12 about 2.2 MB.

    python benchmarks/train_pretrained.py --model em-membranes --minutes 60 --width 14
    python benchmarks/train_pretrained.py --model dic-hela --checkpoint runs/x/best.pt   # score and pack only

The shipped em-membranes and dic-hela are the unetkit runs of benchmarks/peer_monai.py (25 CPU
minutes, width 16, the splits above are the ones `unetkit train` drew there), packed with
--checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_json  # noqa: E402

from unetkit import pretrained  # noqa: E402
from unetkit.checkpoint import load_checkpoint, pack_checkpoint  # noqa: E402
from unetkit.data import Normalization, data_root, find_pairs, get_ctc_samples, get_isbi2012_samples, make_sample, read_mask  # noqa: E402
from unetkit.data.split import image_quadrant  # noqa: E402
from unetkit.inference import InferenceOptions, Segmenter  # noqa: E402
from unetkit.io import read_image  # noqa: E402
from unetkit.labels import as_instances  # noqa: E402
from unetkit.decision import DecisionRule  # noqa: E402
from unetkit.metrics import average_precision, pixel_error, rand_error, seg_score, warping_error  # noqa: E402
from unetkit.predict import predict  # noqa: E402
from unetkit.recipes import RECIPE_NOTES, recipe_config, recipe_values  # noqa: E402
from unetkit.scale import median_diameter, rescale_image, resize_labels  # noqa: E402
from unetkit.targets import TargetConfig  # noqa: E402
from unetkit.train import Trainer  # noqa: E402

RECIPE = "default"


def load(info: pretrained.PretrainedModel, root: Path, ids, norm: Normalization, config=None):
    """Samples `ids` of the model's dataset; with `config`, with the weight maps its recipe trains on."""
    targets = config.targets if config is not None else TargetConfig(use_weight_map=False)
    if info.dataset == "isbi2012":
        return get_isbi2012_samples(root, slices=list(ids), normalization=norm, targets=targets)
    return get_ctc_samples(root, frames=list(ids), normalization=norm, targets=targets)


def extra_parts(info: pretrained.PretrainedModel, data: Path, which: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, image, instance mask) of the `which` ("train", "val" or "test") quadrants of every image of the
    model's extra datasets, at their own scale."""
    parts = []
    for extra in info.extra_data:
        for pair in find_pairs(data / extra.dataset):
            image, mask = read_image(pair.image), as_instances(read_mask(pair.mask))
            parts += [(f"{extra.dataset}/{pair.name}/{part}", image_quadrant(image, part), image_quadrant(mask, part))
                      for part in getattr(extra, which)]
    return parts


def extra_factor(info: pretrained.PretrainedModel, data: Path, diameter: float) -> float:
    """The factor that brings the extra datasets' training objects to `diameter` (the main dataset's)."""
    return diameter / median_diameter([mask for _, _, mask in extra_parts(info, data, "train")])


def load_extra(info: pretrained.PretrainedModel, data: Path, which: str, factor: float, norm: Normalization, config):
    """Samples of the extra datasets' `which` quadrants, rescaled by `factor` (see `extra_factor`)."""
    samples = []
    for name, image, mask in extra_parts(info, data, which):
        scaled = rescale_image(image.astype(np.float32), factor)
        samples.append(make_sample(scaled, resize_labels(mask, scaled.shape[-2:]), name, norm, targets=config.targets))
    return samples


def score_extra(info: pretrained.PretrainedModel, data: Path, checkpoint: Path, tta: bool) -> dict[str, Any]:
    """Scores on the extra datasets' held-out quadrants at their own scale, as a user runs it: ``--diameter auto``."""
    parts = extra_parts(info, data, "test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        segmenter = Segmenter.load(checkpoint, InferenceOptions(device="cpu", backend="torch", tta=tta, diameter="auto"))
        results = [segmenter.segment(image, name=name) for name, image, _ in parts]
    labels, truth = [r.labels for r in results], [mask for _, _, mask in parts]
    ap = average_precision(labels, truth, thresholds=(0.5,))[0.5]
    return {"scored_on": [name for name, _, _ in parts], "diameter": "auto", "seg": seg_score(labels, truth), "ap50": ap["ap"],
            "precision50": ap["precision"], "recall50": ap["recall"],
            "objects_predicted": int(sum(len(np.unique(lab[lab > 0])) for lab in labels)),
            "objects_true": int(sum(len(np.unique(t[t > 0])) for t in truth)), "notes": [n for r in results for n in r.notes]}


def sessions_total(run_dir: Path) -> dict[str, float]:
    path = run_dir / "pretrained_sessions.json"
    sessions = json.loads(path.read_text()) if path.is_file() else []
    return {
        "sessions": len(sessions),
        "wall_minutes": round(sum(s["wall_seconds"] for s in sessions) / 60, 2),
        "cpu_minutes": round(sum(s["cpu_seconds"] for s in sessions) / 60, 2),
        "threads": max((s["threads"] for s in sessions), default=torch.get_num_threads()),
    }


def checkpoint_budget(run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The budget of a run this script did not train: its sessions if it has them, else the time
    budget its config gave (`unetkit train --seconds`, on the clock it names)."""
    if (run_dir / "pretrained_sessions.json").is_file():
        return sessions_total(run_dir)
    if not config.get("max_seconds"):
        return {}
    clock = config.get("budget_clock", "wall")
    return {f"{clock}_minutes": round(config["max_seconds"] / 60, 2), "budget_clock": clock}


def add_session(run_dir: Path, session: dict[str, Any]) -> None:
    path = run_dir / "pretrained_sessions.json"
    sessions = json.loads(path.read_text()) if path.is_file() else []
    sessions.append(session)
    path.write_text(json.dumps(sessions, indent=2))


def train(info, root: Path, args) -> tuple[Path, dict[str, Any]]:
    """Train (or resume) in --runs/NAME; returns best.pt and the training facts."""
    augment = {**recipe_values(RECIPE, info.task).get("augment", {}), **info.augment}
    config = recipe_config(
        RECIPE, task=info.task, base_channels=args.width, iterations=1_000_000, max_seconds=args.minutes * 60, workers=0,
        budget_clock=args.budget_clock, seed=args.seed, precision=args.precision, augment=augment,
    )
    norm = Normalization()
    train_samples = load(info, root, info.train_ids, norm, config)
    val_samples = load(info, root, info.val_ids, norm, config)
    extra = {}
    if info.extra_data:
        factor = extra_factor(info, root.parent, median_diameter([s.instances for s in train_samples]))
        main_pixels = sum(s.image[0].size for s in train_samples)
        for extra in info.extra_data:
            samples = load_extra(replace(info, extra_data=(extra,)), root.parent, "train", factor, norm, config)
            pixels = sum(s.image[0].size for s in samples)
            train_samples += samples * max(1, round(extra.tile_share / (1 - extra.tile_share) * main_pixels / pixels))
        val_samples += load_extra(info, root.parent, "val", factor, norm, config)
        extra = {"extra_rescaled_by": round(factor, 3)}
    run_dir = args.runs / info.name
    resume = (run_dir / "last.pt").is_file()
    print(f"{'resuming' if resume else 'training'} {info.name} in {run_dir}: width {args.width}, {args.minutes:g} min "
          f"({args.budget_clock} clock), {torch.get_num_threads()} threads", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    wall, cpu = time.perf_counter(), time.process_time()
    summary = Trainer(config, train_samples, val_samples, run_dir, normalization=norm, resume=resume,
                      progress=not args.quiet).fit()
    add_session(run_dir, {
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "resumed": resume,
        "wall_seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
        "threads": torch.get_num_threads(), "iterations": summary["iterations"],
    })
    facts = {
        "recipe": RECIPE, "recipe_note": RECIPE_NOTES[RECIPE], "width": args.width, "depth": config.depth,
        "tile_size": config.tile_size, "iterations": summary["iterations"], "budget_minutes": args.minutes,
        "budget_clock": args.budget_clock, "seed": args.seed, "precision": args.precision, "best_val_iou": summary["best_val_iou"],
        **sessions_total(run_dir), "run_dir": str(run_dir), **extra,
    }
    return run_dir / "best.pt", facts


def score(info, root: Path, checkpoint: Path, tta: bool) -> dict[str, Any]:
    """Held-out scores of `checkpoint` with its labels rule; per-image details too."""
    loaded = load_checkpoint(checkpoint)
    if loaded.decision:
        rule = DecisionRule.from_dict(loaded.decision)
    else:
        print(f"note: {checkpoint} has no labels rule (training did not finish); using the default rule", flush=True)
        rule = DecisionRule()
    samples = load(info, root, info.test_ids, loaded.normalization)
    started = time.perf_counter()
    maps = [predict(loaded.model, s.image, tta=tta, norm_statistics=rule.norm_statistics)[1] for s in samples]
    seconds = (time.perf_counter() - started) / len(samples)
    labels = [rule.apply(m) for m in maps]
    truth = [s.instances for s in samples]
    names = [s.name for s in samples]
    if info.task == "membranes":
        scores = {
            "rand_error_labels": rand_error(labels, truth),
            "rand_error_best_threshold": rand_error(maps, truth),
            "pixel_error": pixel_error(maps, truth),
            "warping_error": warping_error(maps, truth),
        }
        per_image = {n: {"rand_error_labels": rand_error(lab, t), "pixel_error": pixel_error(m, t)}
                     for n, lab, m, t in zip(names, labels, maps, truth)}
    else:
        ap = average_precision(labels, truth, thresholds=(0.5,))[0.5]
        scores = {
            "seg": seg_score(labels, truth), "ap50": ap["ap"], "pq50": ap["pq"], "f1_50": ap["f1"],
            "precision50": ap["precision"], "recall50": ap["recall"],
            "objects_predicted": int(sum(len(np.unique(lab[lab > 0])) for lab in labels)),
            "objects_true": int(sum(len(np.unique(t[t > 0])) for t in truth)),
        }
        per_image = {}
        for n, lab, t in zip(names, labels, truth):
            ap1 = average_precision(lab, t, thresholds=(0.5,))[0.5]
            per_image[n] = {"seg": seg_score(lab, t), "ap50": ap1["ap"], "pq50": ap1["pq"],
                            "objects_predicted": int(len(np.unique(lab[lab > 0]))), "objects_true": int(len(np.unique(t[t > 0])))}
    return {
        "scores": scores, "per_image": per_image, "decision": rule.to_dict(), "tta": tta,
        "best_iteration": loaded.iteration, "predict_seconds_per_image": round(seconds, 2),
        "scored_on": pretrained.ids_text(info.dataset, info.test_ids),
    }


def pack(info, best: Path, root: Path, run_dir: Path, force_size: bool) -> dict[str, Any]:
    """Pack best.pt into the package, after checking the size limit and that it predicts like best.pt."""
    trial = pack_checkpoint(best, info.name, run_dir / "packed.pt")
    size = trial.stat().st_size
    current = info.path.stat().st_size if info.installed else 0
    total = pretrained.total_size() - current + size
    if total > pretrained.SIZE_LIMIT and not force_size:
        raise SystemExit(
            f"packing {info.name} ({size / 1e6:.2f} MB) would bring the packaged models to {total / 1e6:.2f} MB, over the "
            f"{pretrained.SIZE_LIMIT / 1e6:.0f} MB limit; train a narrower model (--width) or pass --force-size. "
            f"The packed file is {trial}"
        )
    original = load_checkpoint(best)
    sample = load(info, root, info.test_ids[:1], original.normalization)[0]
    full = predict(original.model, sample.image)[1]
    half = predict(load_checkpoint(trial).model, sample.image)[1]
    path = pack_checkpoint(best, info.name)
    return {"file": str(path), "size_bytes": path.stat().st_size, "source": str(best),
            "max_probability_difference_float16": float(np.abs(full - half).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=list(pretrained.REGISTRY))
    parser.add_argument("--minutes", type=float, default=60.0, help="training budget in minutes (across resumes)")
    parser.add_argument("--width", type=int, default=14, help="base channels (the recipe's default is 16; see the size limit)")
    parser.add_argument("--budget-clock", choices=("wall", "cpu"), default="wall",
                        help="count --minutes in elapsed time (default) or in this process's CPU time")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="training precision (forward pass)")
    parser.add_argument("--data", type=Path, default=None, help="folder of the datasets (default: $UNETKIT_DATA or ../shared/data)")
    parser.add_argument("--runs", type=Path, default=Path("runs") / "pretrained", help="run folders go to RUNS/NAME")
    parser.add_argument("--checkpoint", type=Path, default=None, help="skip training: score and pack this best.pt")
    parser.add_argument("--no-tta", action="store_true", help="score without test-time augmentation")
    parser.add_argument("--no-pack", action="store_true", help="score only; leave the package and models.json alone")
    parser.add_argument("--force-size", action="store_true", help="pack even if the packaged models exceed 10 MB")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/pretrained_NAME.json)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    info = pretrained.get_model(args.model)
    root = (args.data or data_root()) / info.dataset
    if args.checkpoint is not None:
        best = args.checkpoint
        loaded = load_checkpoint(best)
        config = loaded.train_config
        run_dir = best.parent
        training = {"recipe": RECIPE, "width": config.get("base_channels"), "depth": config.get("depth"),
                    "iterations": loaded.iteration, "checkpoint": str(best), **checkpoint_budget(run_dir, config)}
    else:
        best, training = train(info, root, args)
        run_dir = Path(training["run_dir"])
    result = score(info, root, best, tta=not args.no_tta)
    if info.extra_data:
        result["extra_scores"] = score_extra(info, root.parent, best, tta=not args.no_tta)
    training["best_iteration"] = result["best_iteration"]
    training["trained_on"] = pretrained.ids_text(info.dataset, info.train_ids)
    training["validated_on"] = pretrained.ids_text(info.dataset, info.val_ids)
    for extra in info.extra_data:
        training["trained_on"] += f"; {extra.dataset} {', '.join(extra.train)}"
        training["validated_on"] += f"; {extra.dataset} {', '.join(extra.val)}"
    if info.extra_data:
        training["extra_data"] = [asdict(e) for e in info.extra_data]
    if info.augment:
        training["augment"] = dict(info.augment)
    training["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    training["torch"] = torch.__version__
    packed = None
    if not args.no_pack:
        packed = pack(info, best, root, run_dir, args.force_size)
        pretrained.record_model(info.name, scores=result["scores"], training=training, scored_on=result["scored_on"],
                                decision=result["decision"], tta=result["tta"],
                                **({"extra_scores": result["extra_scores"]} if "extra_scores" in result else {}))
    report = {"model": info.name, "dataset": info.dataset, **result, "training": training, "packed": packed,
              "total_packaged_bytes": pretrained.total_size(), "machine": machine()}
    write_json(args.out or RESULTS / f"pretrained_{info.name}.json", report)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
