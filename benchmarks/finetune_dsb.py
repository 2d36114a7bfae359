"""Fine-tuning fluo-nuclei on two annotated parts of the DSB2018 sample, and the accuracy of --diameter auto.

Data: /work/shared/data/dsb2018-stardist-sample (one 512 x 512 fluorescence image, 125 nuclei;
see its PROVENANCE.md). Split: the image and its mask are cut into four 256 x 256 quadrants; the
top-left and bottom-right quadrants are the two annotated training parts, the top-right and
bottom-left ones are held out and scored (SEG and AP at IoU 0.5, pooled over the two). Nuclei cut
by the quadrant edges keep their part inside each quadrant. The packaged fluo-nuclei itself trains
on the top-left quadrant and validates on the bottom-right one (`unetkit.pretrained`), so the
held-out quadrants are new to it, but their image is not: its "zero-shot" scores here are those of
a model that has seen this kind of nuclei (benchmarks/finetune_external.py scores data it has not).

Arms (each held-out quadrant is segmented as an image of its own, `Segmenter.segment`, torch backend):

* (a) zero-shot: fluo-nuclei as shipped, without and with ``--diameter auto`` (and, for reference,
  with the true median diameter of the held-out nuclei);
* (b) fine-tuned from fluo-nuclei on the two training quadrants (`unetkit.finetune.fine_tune`,
  `unetkit.recipes.FINETUNE`) for `--seconds` CPU-seconds: their nuclei (23.5 px) are far from
  the model's 60.5 px, so they are enlarged 2.57 x and the fine-tuned model enlarges the held-out
  quadrants alike; validation is the last quarter of each training quadrant, never trained on;
* (c) trained from scratch on the same quadrants with the same budget, clock and tile size, with
  the default recipe for objects (Adam lr 1e-3, width 16, cosine decay) and the same cross-check
  validation on the training quadrants.

Budgets count this process's CPU time (`budget_clock="cpu"`, workers 0, one torch thread), so other
jobs on the machine do not change the number of iterations much.

--diameter auto accuracy: CTC GOWT1 t31 (the frame fluo-nuclei is scored on, not trained on) and
the whole DSB image, each rescaled by 0.5, 0.75, 1, 1.5 and 2 (mask with `resize_labels`): the
diameter estimated in the first pass against the true median diameter of the rescaled mask.
Without test-time augmentation, to keep the run short.

Run: nice -n 5 .venv/bin/python benchmarks/finetune_dsb.py  (about 10 minutes on 2 cores)
Writes benchmarks/results/finetune_dsb.json; run folders go to --work (outside the repository).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from common import RESULTS, machine, write_json
from unetkit.data import Normalization, data_root, make_sample, read_mask
from unetkit.data.split import image_quadrant
from unetkit.finetune import CROSS_CHECK, choose_tile, prepare_fine_tune
from unetkit.inference import InferenceOptions, Segmenter
from unetkit.io import read_image
from unetkit.metrics.objects import average_precision, seg_score
from unetkit.recipes import recipe_config
from unetkit.scale import median_diameter, rescale_image, resize_labels
from unetkit.train import Trainer

DSB = "dsb2018-stardist-sample"
TRAIN_PARTS = ("top-left", "bottom-right")
HELD_OUT = ("top-right", "bottom-left")
FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)
#: Where the outside fluorescence-nuclei data for scoring came from.
PUBLIC_SEARCH = {
    "found": "CTC Fluo-N2DL-HeLa, 4 annotated frames (benchmarks/finetune_external.py, results/finetune_external.json)",
    "not_usable": ["stardist (only the DSB image already in the shared data)", "csbdeep (downloads from elsewhere)",
                   "scikit-image data (no nuclei with labels in the wheel)"],
}


def scores(model, images, truths, **options) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        segmenter = Segmenter.load(model, InferenceOptions(device="cpu", backend="torch", **options))
        results = [segmenter.segment(image, name=f"part{i}") for i, image in enumerate(images)]
    labels = [r.labels for r in results]
    ap = average_precision(labels, truths)[0.5]
    return {"seg": seg_score(labels, truths), "ap50": ap["ap"], "precision50": ap["precision"], "recall50": ap["recall"],
            "objects_predicted": int(sum(len(np.unique(l)) - 1 for l in labels)),
            "objects_true": int(sum(len(np.unique(t)) - 1 for t in truths)),
            "notes": [n for r in results for n in r.notes]}


def auto_accuracy(image: np.ndarray, truth: np.ndarray, name: str) -> list[dict]:
    rows = []
    segmenter = Segmenter.load("fluo-nuclei", InferenceOptions(device="cpu", backend="torch", tta=False, diameter="auto"))
    for factor in FACTORS:
        scaled = rescale_image(image.astype(np.float32), factor)
        mask = resize_labels(truth, scaled.shape)
        started = time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            segmenter.probabilities(segmenter.normalize(scaled))
        estimated, true = segmenter._scaled.estimated, median_diameter(mask)
        rows.append({"image": name, "factor": factor, "true_diameter": true, "estimated_diameter": estimated,
                     "relative_error": None if estimated is None else estimated / true - 1.0,
                     "cpu_seconds": time.process_time() - started})
        print(rows[-1])
    return rows


def fine_tuned(args, train_images, train_masks, test_images, test_masks, *, run: str = "finetuned",
               overrides: dict | None = None, score_options: dict | None = None) -> dict:
    """Arm (b): `prepare_fine_tune(...).fit()`, what `unetkit.finetune.fine_tune` runs, with `--lr` if given
    and `overrides` (TrainConfig fields, e.g. the seed); held-out parts segmented with `score_options`."""
    args.work.mkdir(parents=True, exist_ok=True)
    overrides = {**({} if getattr(args, "lr", None) is None else {"lr": args.lr}), **(overrides or {})}
    started = time.process_time()
    trainer = prepare_fine_tune("fluo-nuclei", train_images, train_masks, args.work / run, seconds=args.seconds,
                                overrides=overrides or None, force=True)
    summary = trainer.fit()
    arm = {"iterations": summary["iterations"], "cpu_seconds": time.process_time() - started, "lr": trainer.config.lr,
           "tile_size": trainer.config.tile_size, "validation": trainer.validation_note or "held-out images",
           "rescaled_by": json.loads((args.work / run / "finetune.json").read_text())["rescaled_by"],
           **scores(args.work / run / "best.pt", test_images, test_masks, **(score_options or {}))}
    print(arm)
    return arm


def from_scratch(work: Path, seconds: float, tile_size: int, train_images, train_masks, test_images, test_masks, *,
                 run: str = "scratch", seed: int = 0) -> dict:
    """Arm (c): the default recipe for objects (width 16) from random weights on the training parts, `seconds`
    CPU-seconds, the same tile size and the same cross-check validation as the fine-tuning."""
    config = recipe_config("default", task="objects", tile_size=tile_size, iterations=None, max_seconds=seconds,
                           budget_clock="cpu", workers=0, val_every=50, checkpoint_every=50, device="cpu", seed=seed)
    normalization = Normalization()
    samples = [make_sample(i, m, f"part{k}", normalization, targets=config.targets)
               for k, (i, m) in enumerate(zip(train_images, train_masks))]
    started = time.process_time()
    summary = Trainer(config, samples, samples, work / run, normalization=normalization, progress=False).fit()
    arm = {"iterations": summary["iterations"], "cpu_seconds": time.process_time() - started,
           "recipe": "default (objects), width 16", "validation": CROSS_CHECK,
           **scores(work / run / "best.pt", test_images, test_masks)}
    print(arm)
    return arm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="training budget of (b) and (c), CPU-seconds")
    parser.add_argument("--work", type=Path, default=Path("/tmp/unetkit-bench/finetune_dsb"), help="run folders")
    parser.add_argument("--skip-auto", action="store_true", help="leave out the --diameter auto accuracy table (the last one measured is kept)")
    parser.add_argument("--seed", type=int, default=None, help="arm (b) alone with this seed; writes finetune_dsb_seed<S>[...].json")
    parser.add_argument("--no-precise-bn", action="store_true",
                        help="arm (b) alone with the running batch-norm statistics (TrainConfig.precise_bn off)")
    parser.add_argument("--lr", type=float, default=None,
                        help="fine-tune at this learning rate instead of the recipe's, arm (b) alone; writes finetune_dsb_lr<LR>.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = data_root() / DSB
    image = read_image(root / "images" / "img2d.tif")
    mask = read_mask(root / "masks" / "mask2d.tif")
    train_images = [image_quadrant(image, p) for p in TRAIN_PARTS]
    train_masks = [image_quadrant(mask, p) for p in TRAIN_PARTS]
    test_images = [image_quadrant(image, p) for p in HELD_OUT]
    test_masks = [image_quadrant(mask, p) for p in HELD_OUT]
    result: dict = {
        "data": f"{DSB}: img2d.tif / mask2d.tif, 512 x 512, 125 nuclei",
        "split": {"quadrants": "256 x 256", "train": list(TRAIN_PARTS), "held_out": list(HELD_OUT),
                  "how": "image and mask cut into four quadrants; nuclei cut by the edges keep their part in each"},
        "budget": {"seconds": args.seconds, "clock": "cpu", "workers": 0, "torch_threads": 1},
        "predict": "Segmenter.segment per held-out quadrant, torch backend, the checkpoint's labels rule and TTA",
        "machine": machine(),
    }
    true_diameter = median_diameter(test_masks)
    if args.lr is not None or args.seed is not None or args.no_precise_bn:
        overrides = {"seed": args.seed or 0, **({"precise_bn": False} if args.no_precise_bn else {})}
        result["fine_tuned"] = fine_tuned(args, train_images, train_masks, test_images, test_masks, overrides=overrides,
                                          run=f"finetuned_seed{args.seed or 0}{'_running_bn' if args.no_precise_bn else ''}")
        tag = "".join([f"_lr{args.lr:g}" if args.lr is not None else "", f"_seed{args.seed}" if args.seed is not None else "",
                       "_running_bn" if args.no_precise_bn else ""])
        write_json(RESULTS / f"finetune_dsb{tag}.json", result)
        return
    result["zero_shot"] = {
        "plain": scores("fluo-nuclei", test_images, test_masks),
        "diameter_auto": scores("fluo-nuclei", test_images, test_masks, diameter="auto"),
        "diameter_true": {"diameter": true_diameter, **scores("fluo-nuclei", test_images, test_masks, diameter=true_diameter)},
    }
    print(result["zero_shot"])

    result["fine_tuned"] = fine_tuned(args, train_images, train_masks, test_images, test_masks)
    best = args.work / "finetuned" / "best.pt"

    from unetkit.checkpoint import load_checkpoint

    tuned = load_checkpoint(best).train_config
    # from scratch at the quadrants' own scale: the tile fine-tuning would pick for 256 x 256 images
    scratch_tile = choose_tile(recipe_config("default", task="objects").geometry, 572, [256])
    result["from_scratch"] = from_scratch(args.work, args.seconds, scratch_tile, train_images, train_masks,
                                          test_images, test_masks)
    result["tile_size"] = {"fine_tuned": tuned["tile_size"], "from_scratch": scratch_tile}

    previous = RESULTS / "finetune_dsb.json"
    if args.skip_auto and previous.exists():  # its zero-shot code is unchanged by fine-tuning: keep the measured table
        kept = json.loads(previous.read_text()).get("diameter_auto_accuracy")
        if kept:
            result["diameter_auto_accuracy"] = kept
    if not args.skip_auto:
        gowt1 = data_root() / "ctc-fluo-n2dh-gowt1"
        result["diameter_auto_accuracy"] = {
            "how": "first pass at the model's scale without TTA; true = median equivalent-circle diameter of the rescaled mask",
            "rows": auto_accuracy(read_image(gowt1 / "images" / "t31.tif"), read_mask(gowt1 / "masks" / "man_seg31.tif"), "GOWT1 t31")
                    + auto_accuracy(image, mask, "DSB img2d"),
        }
    result["public_dataset"] = PUBLIC_SEARCH
    write_json(RESULTS / "finetune_dsb.json", result)


if __name__ == "__main__":
    main()
