"""Fine-tuning fluo-nuclei on 2 frames of an outside fluorescence-nuclei dataset (CTC Fluo-N2DL-HeLa), scored on the others.

Issue 21 target: fine-tuning from fluo-nuclei on 2 images of a public fluorescence nuclei dataset
that is not in the shared data, for 120 CPU-seconds, reaches SEG >= 0.8 on its other images. The
arms and their code are those of `finetune_dsb.py` (DSB2018 sample), applied to whole frames.

Data (read from ``--data``, default $UNETKIT_EXTDATA/hela2d_ctc, else /work/extdata/hela2d_ctc;
fetched for scoring only and never copied into this repository): Cell Tracking Challenge
Fluo-N2DL-HeLa (HeLa cells, H2B-GFP nuclei; Neumann et al., Nature 464:721, 2010), the four frames
with a manual segmentation (SEG ground truth) of the CTC training set: images/t13, t52, t75, t79.tif
(uint16, 700 x 1100, pixel 0.645 um) and labels/man_seg13 ... man_seg79.tif (instance labels; 59, 109,
349 and 342 nuclei; median diameter 25-27 px). Copied byte-identical from the GitHub repository
datascience-mobi-2022/2022-topic-01-team-04 at commit 0797bd79e1b6ca7ec05b5b12566ed3549407ffc6,
data/Otsu_data/N2DL-HeLa/img/ and .../gt/. Licence: that repository has no licence file; the data
are Cell Tracking Challenge data under the CTC terms (not verified here), so they are used for
scoring only and not redistributed.

Split (``--train``): a user annotates the easiest frames first, so by default the two sparse frames
t13 and t52 (59 and 109 nuclei) are the training images and the two dense ones t75 and t79 (349 and
342 nuclei, many touching, more mitoses) are scored; ``--train t75,t79`` runs the reverse direction.
Each scored frame is segmented as an image of its own (`Segmenter.segment`, torch backend, the
checkpoint's labels rule and TTA, what ``unetkit predict`` does); SEG and AP at IoU 0.5 pooled
over the scored frames (`unetkit.metrics`).

Arms:

* ``zero-shot``: fluo-nuclei as shipped, plain, with ``--diameter auto``, and with ``--diameter D``
  where D is the median diameter of the training frames' annotated nuclei (known to a user who
  annotated them; the scored masks are not looked at);
* ``finetuned``: `finetune_dsb.fine_tuned`, i.e. `unetkit.finetune.prepare_fine_tune(...).fit()`,
  what ``unetkit train --from fluo-nuclei`` runs: the frames' nuclei (about 25 px) are far from
  the model's 60.5 px, so frames and masks are enlarged by 60.5 / D (D: the training masks' median
  diameter) and the fine-tuned model enlarges the scored frames by the same factor; 2 images, so
  validation is the last quarter of each, never trained on (`unetkit.finetune.HELD_OUT_PARTS`);
  Adam 1e-3 (``--lr`` for another) with cosine decay for ``--seconds`` CPU-seconds
  (`unetkit.recipes.FINETUNE`);
* ``finetuned-running-bn``: the same with ``TrainConfig.precise_bn`` off: batch norm keeps its
  running statistics, and the labels rule may choose each image's own statistics instead (what
  fine-tuning did before precise statistics);
* ``scratch``: `finetune_dsb.from_scratch`, the default recipe for objects (width 16) from random
  weights on the same frames at their own scale, budget, clock and tile size, validation a
  cross-check on them (`unetkit.finetune.CROSS_CHECK`).

Budgets count this process's CPU time (one torch thread, workers 0), so arms can run at the same
time on a busy machine. Each arm run writes a part into ``--work``/parts; ``--merge`` gathers the
parts into benchmarks/results/finetune_external.json.

Run (two arms at a time, e.g. the two training arms side by side, then the rest, then the merge;
--train t75,t79 --arm ... for the reverse direction):
    .venv/bin/python benchmarks/finetune_external.py --arm finetuned --seed 0 &
    .venv/bin/python benchmarks/finetune_external.py --arm scratch --seed 0 &
    .venv/bin/python benchmarks/finetune_external.py --arm zero-shot
    .venv/bin/python benchmarks/finetune_external.py --merge
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, write_json  # noqa: E402
from finetune_dsb import fine_tuned, from_scratch, scores  # noqa: E402
from unetkit.data import read_mask  # noqa: E402
from unetkit.io import read_image  # noqa: E402
from unetkit.scale import median_diameter  # noqa: E402

FRAMES = ("t13", "t52", "t75", "t79")
DEFAULT_TRAIN = ("t13", "t52")
ARMS = ("zero-shot", "finetuned", "scratch", "finetuned-running-bn")
PROVENANCE = {
    "dataset": "Cell Tracking Challenge Fluo-N2DL-HeLa (HeLa, H2B-GFP nuclei), the 4 frames with a manual "
               "segmentation (SEG ground truth, training set; sequence 01 as far as known, unverified)",
    "files": "images/t13.tif t52.tif t75.tif t79.tif (uint16, 700 x 1100); labels/man_seg13.tif ... man_seg79.tif "
             "(uint16 instance labels: 59, 109, 349, 342 nuclei)",
    "pixel_size_um": 0.645,
    "source": "github.com/datascience-mobi-2022/2022-topic-01-team-04",
    "commit": "0797bd79e1b6ca7ec05b5b12566ed3549407ffc6",
    "paths": "data/Otsu_data/N2DL-HeLa/img/t{13,52,75,79}.tif and data/Otsu_data/N2DL-HeLa/gt/man_seg{13,52,75,79}.tif "
             "(copied byte-identical)",
    "licence": "no licence file in that repository (a student course project); the data are Cell Tracking Challenge "
               "data under the CTC terms (not verified): used for scoring only, never copied into this repository",
    "citation": "Neumann et al., Nature 464:721-727 (2010); Ulman et al., Nat. Methods 14:1141-1152 (2017); "
                "Maska et al., Nat. Methods 20:1010-1020 (2023)",
    "not_in_shared_data": "../shared/data holds CTC Fluo-N2DH-GOWT1 (fluo-nuclei's training data) and the DSB2018 "
                          "sample, not Fluo-N2DL-HeLa",
}


def default_data() -> Path:
    return Path(os.environ.get("UNETKIT_EXTDATA", "/work/extdata")) / "hela2d_ctc"


def load(data: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{frame: (image, instance mask)}; exits with where the data come from if they are missing."""
    paths = {f: (data / "images" / f"{f}.tif", data / "labels" / f"man_seg{f[1:]}.tif") for f in FRAMES}
    missing = [str(p) for pair in paths.values() for p in pair if not p.is_file()]
    if missing:
        raise SystemExit(
            f"{data}: the Fluo-N2DL-HeLa frames are missing ({missing[0]}{' ...' if len(missing) > 1 else ''}). They are "
            f"not in this repository: fetch {PROVENANCE['paths']} from {PROVENANCE['source']} at commit "
            f"{PROVENANCE['commit']} into {data}/images and {data}/labels (names t13.tif ..., man_seg13.tif ...), "
            "then give --data DIR or set UNETKIT_EXTDATA")
    return {f: (read_image(i), read_mask(m)) for f, (i, m) in paths.items()}


def start_diameter() -> float:
    """The object diameter fluo-nuclei was trained on (models.json; the packaged checkpoint holds none)."""
    from unetkit.pretrained import get_model

    return float(get_model("fluo-nuclei").scale["diameter"])


def run_arm(args, frames: dict) -> dict:
    train = [f for f in args.train.split(",")]
    held = [f for f in FRAMES if f not in train]
    train_images, train_masks = [frames[f][0] for f in train], [frames[f][1] for f in train]
    test_images, test_masks = [frames[f][0] for f in held], [frames[f][1] for f in held]
    d_train = median_diameter(train_masks)
    label = args.arm + (f"-lr{args.lr:g}" if args.lr is not None else "")
    part: dict = {"arm": label, "train": train, "scored": held, "seed": args.seed,
                  "train_diameter": d_train, "scored_diameter_reference": median_diameter(test_masks)}
    started = time.process_time()
    if args.arm == "zero-shot":
        part["plain"] = scores("fluo-nuclei", test_images, test_masks)
        print(part["plain"])
        part["diameter_auto"] = scores("fluo-nuclei", test_images, test_masks, diameter="auto")
        print(part["diameter_auto"])
        part["diameter_train"] = {"diameter": d_train, **scores("fluo-nuclei", test_images, test_masks, diameter=d_train)}
        print(part["diameter_train"])
    elif args.arm in ("finetuned", "finetuned-running-bn"):
        overrides = {"seed": args.seed, **({"precise_bn": False} if args.arm == "finetuned-running-bn" else {})}
        part.update(fine_tuned(args, train_images, train_masks, test_images, test_masks,
                               run=f"{label}_{'-'.join(train)}_seed{args.seed}", overrides=overrides))
    elif args.arm == "scratch":
        from unetkit.finetune import finetune_config, load_start

        loaded, label = load_start("fluo-nuclei")  # the tile size the fine-tuning picks for these frames
        tile = finetune_config(loaded, label, [min(i.shape) for i in train_images]).tile_size
        part.update(from_scratch(args.work, args.seconds, tile, train_images, train_masks, test_images, test_masks,
                                 run=f"scratch_{'-'.join(train)}_seed{args.seed}", seed=args.seed))
    part["arm_cpu_seconds"] = time.process_time() - started
    return part


def run_facts(run: Path) -> dict:
    """What a training arm's run folder says about its end: the validation IoU (training batch-norm
    statistics) at the best and at the last validation, the iteration best.pt holds (with a decaying
    schedule, the final weights) and the labels rule chosen for it."""
    import csv

    from unetkit.checkpoint import load_checkpoint

    if not (run / "best.pt").is_file():
        return {}
    with open(run / "log.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["val_iou"]]
    best = max(rows, key=lambda r: float(r["val_iou"])) if rows else None
    loaded = load_checkpoint(run / "best.pt")
    return {"best_pt_iteration": loaded.iteration, "labels_rule": loaded.decision,
            "val_iou_best": None if best is None else {"iteration": int(best["iteration"]), "val_iou": float(best["val_iou"])},
            "val_iou_last": None if not rows else {"iteration": int(rows[-1]["iteration"]), "val_iou": float(rows[-1]["val_iou"])}}


def merge(work: Path) -> dict:
    parts = [json.loads(p.read_text()) for p in sorted((work / "parts").glob("*.json"))]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    result: dict = {
        "target": "issue 21: fine-tuning from fluo-nuclei on 2 images of an outside fluorescence nuclei dataset for "
                  "120 CPU-seconds reaches SEG >= 0.8 on the others",
        "data": PROVENANCE,
        "split": "train on 2 frames, score the other 2 (whole frames, each segmented on its own); default train "
                 "t13,t52 (sparse, what a user would annotate first), scored t75,t79 (dense); the reverse if present",
        "budget": {"seconds": parts[0].get("seconds") if parts else None, "clock": "cpu", "workers": 0, "torch_threads": 1},
        "predict": "Segmenter.segment per scored frame, torch backend, the checkpoint's labels rule and TTA",
        "validation": "as unetkit.finetune does with 2 annotated images: the last quarter of each, never trained on "
                      "(HELD_OUT_PARTS; the from-scratch arm: a cross-check on its training frames)",
        "machine": {**machine(), "cpu": cpu, "cores": os.cpu_count(),
                    "load": "2 cores shared with up to 3 benchmark processes; budgets are CPU time"},
        "start_model_diameter": start_diameter(),
        "runs": {},
    }
    table = []
    for part in parts:
        key = f"train_{'-'.join(part['train'])}"
        arm = part["arm"] + ("" if part["arm"] == "zero-shot" else f"_seed{part['seed']}")
        if part["arm"] != "zero-shot":
            part["run"] = run_facts(work / f"{part['arm']}_{'-'.join(part['train'])}_seed{part['seed']}")
        result["runs"].setdefault(key, {})[arm] = part
        scored = ",".join(part["scored"])
        if part["arm"] == "zero-shot":
            for variant in ("plain", "diameter_auto", "diameter_train"):
                if variant in part:
                    table.append({"train": key, "scored": scored, "arm": f"zero-shot {variant}", "seed": None,
                                  "seg": part[variant]["seg"], "ap50": part[variant]["ap50"], "iterations": None,
                                  "cpu_seconds": None})
        else:
            table.append({"train": key, "scored": scored, "arm": part["arm"], "seed": part["seed"], "seg": part["seg"],
                          "ap50": part["ap50"], "iterations": part["iterations"], "cpu_seconds": part["cpu_seconds"]})
    result["table"] = table
    means: dict = {}
    for row in table:
        means.setdefault(f"{row['train']} {row['arm']}", []).append(row["seg"])
    result["mean_seg"] = {key: {"seg": float(np.mean(v)), "runs": len(v), "target_0.8_met": bool(np.mean(v) >= 0.8)}
                          for key, v in means.items()}
    result["cpu_seconds_note"] = ("cpu_seconds of a training arm: this process's CPU time from preparing the run to the "
                                  "end of fit (training within the budget, the last validation, choosing the labels rule "
                                  "and the precision scores), not the scoring")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data(), help="folder with images/ and labels/ (see the docstring)")
    parser.add_argument("--arm", choices=ARMS, help="the arm to run (writes a part into --work/parts)")
    parser.add_argument("--train", default=",".join(DEFAULT_TRAIN), help="the 2 training frames, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None, help="fine-tuning arms: this learning rate instead of the recipe's")
    parser.add_argument("--seconds", type=float, default=120.0, help="training budget, CPU-seconds")
    parser.add_argument("--work", type=Path, default=Path("runs") / "finetune_external", help="run folders and parts")
    parser.add_argument("--merge", action="store_true", help="gather the parts into benchmarks/results/finetune_external.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.merge:
        write_json(RESULTS / "finetune_external.json", merge(args.work))
        return
    if args.arm is None:
        parser.error("give --arm ARM or --merge")
    frames = load(args.data)
    train = args.train.split(",")
    if len(train) != 2 or any(f not in FRAMES for f in train):
        parser.error(f"--train: two of {', '.join(FRAMES)}")
    part = {"seconds": args.seconds, **run_arm(args, frames)}
    path = args.work / "parts" / f"{'-'.join(train)}_{part['arm']}_seed{args.seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(part, indent=2, default=float))
    print(json.dumps(part, indent=2, default=float))


if __name__ == "__main__":
    main()
