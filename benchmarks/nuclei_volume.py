"""3D nuclei: a 3D U-Net against a 2D U-Net applied plane by plane and stitched, on held-out volumes.

Data: simulated HL60 nuclei (MitoGen / Cell Tracking Challenge Fluo-N3DH-SIM, as BBBC035),
rescaled to about 1 x 1 x 1 um voxels by the laptrack authors and shipped in the PyPI sdist of
`laptrack` 0.17.1 (``laptrack-0.17.1/docs/examples/3D_tracking_data/HL60_3D_synthesized_data.npz``,
sdist sha256 883330e5cda46343fc6581434161950669cda0f2fce33aac06440ebd2444aa00, npz md5
3d6536400398464d9b0bdc88878115de): 75 time points of ONE sequence, each a (12, 44, 80) volume with
6-15 nuclei of ~105-140 voxels and exact (simulator) instance labels. Licence: the laptrack package
is BSD 3-Clause; the licence of the underlying BBBC035 images was not verified (check
https://bbbc.broadinstitute.org/BBBC035 before redistributing). The data is read from
`--data` (a folder with images/tNNN.tif and labels/tNNN.tif, see its PROVENANCE.md), is used for
scoring only and is never copied into the repository. Citations: Svoboda & Ulman, IEEE TMI
36(1):310-321, 2017 (MitoGen); Ljosa et al., Nat. Methods 9:637, 2012 (BBBC); Fukai & Kawaguchi,
Bioinformatics 39(1):btac799, 2023 (laptrack).

Split by time (consecutive time points are correlated): train t000-t039, validate t040-t049,
score t050-t074. Both arms use the "default" recipe (width 16, Adam 1e-3, batch norm, no
dropout, cosine decay, the paper's weight map) at depth 3, train for the same CPU time on one
thread (`budget_clock="cpu"`, so the arms can run side by side), keep the best checkpoint on the
validation volumes and choose their labels rule there, as `unetkit train` does:

- ``3d``: a 3D U-Net (`TrainConfig(dims=3, spacing=(1, 1, 1))`, isotropic 2x2x2 pooling),
  trained on the 40 training volumes with (52, 76, 76) tiles (output (12, 36, 36); depth 3 needs
  at least 44 voxels of input per axis, so a tile is mostly mirrored context in z), its labels
  rule (6-connected 3D objects) chosen on the validation volumes; test volumes are predicted
  whole (`predict_volume(..., pad_thin=True)`).
- ``2d``: a 2D U-Net on every plane of the training volumes (each volume normalised as a whole
  first, the planes then given unchanged), validated on the planes of t040-t049 that hold
  objects; its labels rule is chosen per plane, then each volume's planes are predicted,
  labelled and linked into 3D objects with `unetkit.stacks.stitch_planes`, whose
  overlap threshold (0.05, 0.1, 0.25 or 0.5) is chosen on the validation volumes by the score the
  labels rules are chosen by (mean of SEG and PQ@0.5 in 3D).
- ``3d-sparse``: the ``3d`` arm trained from sparse annotation, the 3D U-Net paper's setting: each
  training volume keeps its labels on ``--annotated-planes`` K evenly spaced z-planes (K=3: planes
  2, 6 and 10 of 12, a quarter of the training voxels) and holds 65535 elsewhere, read as
  ``unetkit train --ignore-label 65535`` reads it (no loss there; tiles drawn around labelled voxels);
  validation and test volumes stay dense. Every output tile spans all 12 planes, so each holds the
  K annotated planes; only its xy placement differs from the ``3d`` arm's uniform one: anchored at
  a labelled voxel, it slightly favours windows at the volume's borders.

Test-time augmentation is off unless `--tta` is given, for the labels rule, the stitch threshold
and the test maps alike (the rule is chosen on maps made as the test maps are). With it, the 3D
arm's 16 transforms cost ~11 CPU-s per volume here (35 validation and test volumes: ~6.5 CPU
minutes, more than a short training budget), because `predict_volume(pad_thin=True)` mirrors a
12-slice volume to 44 slices and then needs 84-slice input tiles (52 would do for 12 slices).

All arms are scored in 3D on t050-t074 (`unetkit.metrics.volume`: SEG and AP / PQ at IoU 0.5, objects
matched one to one by voxel IoU).

Sparse against dense (5 CPU-min, seeds 0 and 1, no TTA): ``3d-sparse`` with K=3 (25 % of the
training voxels annotated) reached AP@0.5 0.940 and 0.660 (mean 0.800) and SEG 0.648 and 0.544
(mean 0.596), the dense ``3d`` arm 0.964 and 0.892 (0.928) and 0.749 and 0.735 (0.742). With a
quarter of the labels per step it learns more slowly: its validation IoU was still rising when the
budget ran out (0.64 and 0.56; the dense arm reached its 0.77 and 0.76 by step 100-150 of ~200).

    python benchmarks/nuclei_volume.py --arm 3d --seed 0 --minutes 10
    python benchmarks/nuclei_volume.py --arm 2d --seed 0 --minutes 10
    python benchmarks/nuclei_volume.py --arm 3d-sparse --annotated-planes 3 --seed 0 --minutes 10
    python benchmarks/nuclei_volume.py --table     # benchmarks/results/nuclei_volume.json

Runs resume from runs/nuclei_volume/ARM_sSEED (3d-sparse-kK_sSEED) when interrupted (and a finished run is only
scored again).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

RUNS = Path("runs") / "nuclei_volume"
DATASET = "hl60sim3d_laptrack"
TRAIN, VALIDATION, TEST = range(0, 40), range(40, 50), range(50, 75)
SPACING = (1.0, 1.0, 1.0)
DEPTH = 3
#: 3D tile (z, y, x): output (12, 36, 36), a whole volume's depth. 0.93 CPU-s per step on one
#: thread here, against 0.49 s for (52, 60, 60) (output (12, 20, 20)): 70% more output voxels per second.
TILE_3D = (52, 76, 76)
#: 2D tile: output 44 x 44, the height of a 44 x 80 plane (larger tiles would train on mirrored rows).
TILE_2D = 84
#: Validation every this many steps: about 45 CPU-s of training between validations in both arms
#: (3D ~0.9 s per step, 2D ~0.03 s per step with augmentation).
VAL_EVERY = {"3d": 50, "3d-sparse": 50, "2d": 1000}
#: The mask value of the unannotated planes of the 3d-sparse arm's training volumes (`--ignore-label`).
IGNORE_LABEL = 65535
STITCH_THRESHOLDS = (0.05, 0.1, 0.25, 0.5)
PROVENANCE = {
    "name": "simulated HL60 nuclei, 3D time-lapse (MitoGen / CTC Fluo-N3DH-SIM, as BBBC035), rescaled to ~1 um isotropic voxels",
    "source": "PyPI sdist laptrack 0.17.1 (laptrack-0.17.1.tar.gz, sha256 883330e5cda46343fc6581434161950669cda0f2fce33aac06440ebd2444aa00), "
              "file laptrack-0.17.1/docs/examples/3D_tracking_data/HL60_3D_synthesized_data.npz (md5 3d6536400398464d9b0bdc88878115de)",
    "licence": "laptrack package: BSD 3-Clause; licence of the underlying BBBC035 images not verified "
               "(see https://bbbc.broadinstitute.org/BBBC035 before redistribution)",
    "citations": [
        "Svoboda D., Ulman V., MitoGen, IEEE Trans. Med. Imaging 36(1):310-321, 2017",
        "Ljosa V., Sokolnicki K.L., Carpenter A.E., Nat. Methods 9:637, 2012",
        "Fukai Y.T., Kawaguchi K., laptrack, Bioinformatics 39(1):btac799, 2023",
    ],
    "use": "scoring/benchmarking only; not copied into the repository",
    "volumes": "75 time points t000-t074 of one simulated sequence, each (12, 44, 80) ZYX float32, uint16 instance labels (exact)",
    "voxel_um_zyx": SPACING,
}


def data_folder(given: Path | None) -> Path:
    if given is not None:
        folder = given
    elif os.environ.get("UNETKIT_EXTDATA"):
        folder = Path(os.environ["UNETKIT_EXTDATA"]) / DATASET
    else:
        folder = Path("/work/extdata") / DATASET
    if not (folder / "images" / "t000.tif").is_file() or not (folder / "labels" / "t000.tif").is_file():
        sys.exit(
            f"{folder}: no images/tNNN.tif and labels/tNNN.tif. Get the data from the PyPI sdist laptrack 0.17.1 "
            "(pip download --no-deps --no-binary :all: laptrack==0.17.1), file "
            "laptrack-0.17.1/docs/examples/3D_tracking_data/HL60_3D_synthesized_data.npz (keys images, labels: (75, 12, 44, 80)); "
            "write images[t] as images/tNNN.tif (float32) and labels[t] as labels/tNNN.tif (uint16), t000..t074, "
            "and give the folder with --data (or $UNETKIT_EXTDATA/" + DATASET + ")."
        )
    return folder


def read(folder: Path, times) -> list[tuple[str, "object", "object"]]:
    import numpy as np
    import tifffile

    out = []
    for t in times:
        name = f"t{t:03d}"
        image = tifffile.imread(folder / "images" / f"{name}.tif").astype(np.float32)
        labels = tifffile.imread(folder / "labels" / f"{name}.tif")
        out.append((name, image, labels))
    return out


def annotated_planes(depth: int, k: int) -> list[int]:
    """`k` evenly spaced planes of `depth`: the middle plane of each of `k` equal slabs.

    Example:
        >>> annotated_planes(12, 3)
        [2, 6, 10]
    """
    if not 1 <= k <= depth:
        sys.exit(f"--annotated-planes must be 1..{depth} (the volumes have {depth} planes), got {k}")
    return sorted({int((i + 0.5) * depth / k) for i in range(k)})


def sparse_mask(labels, planes: list[int]):
    """`labels` on `planes`, `IGNORE_LABEL` elsewhere: a mask as a user annotating `planes` would save it."""
    import numpy as np

    if labels.max() >= IGNORE_LABEL:
        sys.exit(f"label {IGNORE_LABEL} is an object id here; it cannot mark unannotated voxels")
    mask = np.full(labels.shape, IGNORE_LABEL, np.uint16)
    mask[planes] = labels[planes]
    return mask


def plane_samples(volumes, normalization, targets, keep_empty: bool) -> list:
    """Each plane of each (whole-volume normalised) volume as a 2D sample."""
    import numpy as np

    from unetkit.data import Normalization, make_sample
    from unetkit.data.volumes import normalize_volume

    given = Normalization(mode="none")  # planes are normalised with their volume already
    samples = []
    for name, image, labels in volumes:
        volume = normalize_volume(image, normalization, name)[0]
        for z in range(len(volume)):
            if not keep_empty and not np.any(labels[z]):
                continue
            # allow_intensity_masks: the mask check (`check_mask`, `intensity_problem`) takes a plane whose
            # only objects are 1-2 pixel tips of nuclei for a raw image; these are exact instance labels
            samples.append(make_sample(volume[z], labels[z], f"{name}_z{z:02d}", given, targets=targets,
                                       allow_intensity_masks=True))
    return samples


def segment_2d(model, rule, volumes, normalization, tta: bool) -> list:
    """Per-plane labels (N, H, W) of each volume (ids not yet linked across planes)."""
    import numpy as np

    from unetkit.data.volumes import normalize_volume
    from unetkit.predict import predict

    out = []
    for name, image, _ in volumes:
        volume = normalize_volume(image, normalization, name)
        planes = [rule.apply(predict(model, volume[:, z], tta=tta, norm_statistics=rule.norm_statistics)[1])
                  for z in range(volume.shape[1])]
        out.append(np.stack(planes))
    return out


def segment_3d(model, rule, volumes, normalization, tta: bool) -> list:
    from unetkit.data.volumes import normalize_volume
    from unetkit.volume import predict_volume

    return [rule.apply(predict_volume(model, normalize_volume(image, normalization, name), tta=tta, pad_thin=True)[1])
            for name, image, _ in volumes]


def scores(labels, truths) -> dict:
    import numpy as np

    from unetkit.metrics.volume import average_precision_3d, seg_score_3d

    ap = average_precision_3d(labels, truths, thresholds=(0.5,))[0.5]
    found = int(sum(len(np.unique(p[p > 0])) for p in labels))
    true = int(sum(len(np.unique(t[t > 0])) for t in truths))
    return {"seg": float(seg_score_3d(labels, truths)), "ap50": float(ap["ap"]), "pq50": float(ap["pq"]),
            "ap50_details": {k: float(v) for k, v in ap.items()}, "objects_found": found, "objects_true": true}


def run_dir_name(arm: str, seed: int, planes: int) -> str:
    return f"{arm}-k{planes}_s{seed}" if arm == "3d-sparse" else f"{arm}_s{seed}"


def arm_label(row: dict) -> str:
    return f"{row['arm']} K={row['annotated_planes_per_volume']}" if row["arm"] == "3d-sparse" else row["arm"]


def run_arm(arm: str, seed: int, minutes: float, data: Path | None, tta: bool, planes: int = 3) -> dict:
    import torch

    torch.set_num_threads(1)
    from unetkit.checkpoint import load_checkpoint
    from unetkit.data import Normalization
    from unetkit.decision import DecisionRule, score_labels
    from unetkit.recipes import recipe_config
    from unetkit.stacks import stitch_planes
    from unetkit.train import Trainer

    folder = data_folder(data)
    train_v, val_v, test_v = read(folder, TRAIN), read(folder, VALIDATION), read(folder, TEST)
    common = dict(depth=DEPTH, iterations=1_000_000, max_seconds=minutes * 60, budget_clock="cpu", workers=0, seed=seed,
                  val_every=VAL_EVERY[arm], checkpoint_every=VAL_EVERY[arm], precision_scores=False,
                  choose_decision=False)  # chosen below, with or without TTA as the test maps are made
    norm = Normalization()
    run_dir = RUNS / run_dir_name(arm, seed, planes)
    resume = (run_dir / "last.pt").is_file()
    sparse = None
    if arm in ("3d", "3d-sparse"):
        from unetkit.data.volumes import make_volume_sample, unlabelled_voxels

        ignore = IGNORE_LABEL if arm == "3d-sparse" else None
        config = recipe_config("default", dims=3, spacing=SPACING, tile_depth=TILE_3D[0], tile_size=TILE_3D[1],
                               ignore_label=ignore, **common)
        config.check_tiles()
        make = lambda vols: [make_volume_sample(im, lab, name, norm, targets=config.targets, spacing=SPACING,  # noqa: E731
                                                unlabelled=None if ignore is None else lab == ignore)
                             for name, im, lab in vols]
        if arm == "3d-sparse":  # as `--ignore-label` reads such masks; validation and test volumes stay dense
            chosen = annotated_planes(train_v[0][2].shape[0], planes)
            train = make([(name, im, sparse_mask(lab, chosen)) for name, im, lab in train_v])
            unlabelled, total = unlabelled_voxels(train)
            sparse = {"annotated_planes_per_volume": planes, "annotated_planes": chosen,
                      "annotated_voxel_fraction": (total - unlabelled) / total}
        else:
            train = make(train_v)
        val = make(val_v)
        recorded = norm
    else:
        config = recipe_config("default", tile_size=TILE_2D, **common)
        config.check_tiles()
        train = plane_samples(train_v, norm, config.targets, keep_empty=True)
        val = plane_samples(val_v, norm, config.targets, keep_empty=False)
        recorded = Normalization(mode="none")  # what the planes are given (after whole-volume normalisation)
    started_cpu = time.process_time()
    trainer = Trainer(config, train, val, run_dir, normalization=recorded, resume=resume, progress=False)
    summary = trainer.fit()
    train_cpu = time.process_time() - started_cpu
    stored = load_checkpoint(run_dir / "best.pt").decision
    if not stored or bool(stored.get("tta")) != tta:
        trainer.choose_decision(tta=tta)
    loaded = load_checkpoint(run_dir / "best.pt")
    rule = DecisionRule.from_dict(loaded.decision)
    model = loaded.model.eval()
    truths_val = [lab for _, _, lab in val_v]
    truths_test = [lab for _, _, lab in test_v]
    started = time.perf_counter()
    stitch = None
    if arm != "2d":
        labels = segment_3d(model, rule, test_v, norm, tta)
    else:
        planes_val = segment_2d(model, rule, val_v, norm, tta)
        stitch_scores = {t: score_labels("objects", [stitch_planes(p, t) for p in planes_val], truths_val)
                         for t in STITCH_THRESHOLDS}
        threshold = max(STITCH_THRESHOLDS, key=lambda t: (stitch_scores[t], -abs(t - 0.25)))
        planes_test = segment_2d(model, rule, test_v, norm, tta)
        labels = [stitch_planes(p, threshold) for p in planes_test]
        stitch = {"threshold": threshold, "validation_scores_seg_pq_mean": {str(k): v for k, v in stitch_scores.items()},
                  # not used for any choice: how much the stitch threshold matters on the test volumes
                  "test_ap50_by_threshold_diagnostic": {
                      str(t): float(scores([stitch_planes(p, t) for p in planes_test], truths_test)["ap50"])
                      for t in STITCH_THRESHOLDS}}
    seconds = (time.perf_counter() - started) / len(test_v)
    result = {
        "arm": arm, "seed": seed, "cpu_minutes": minutes, "tta": tta, "iterations": summary["iterations"],
        "best_iteration": loaded.iteration, "best_val_iou": summary.get("best_val_iou"),
        **(sparse or {}),
        "tile": TILE_2D if arm == "2d" else list(TILE_3D), "val_every": VAL_EVERY[arm],
        "train_samples": len(train), "val_samples": len(val),
        "network": dict(loaded.model.config), "decision": rule.to_dict(), "stitch": stitch,
        **scores(labels, truths_test),
        "test_seconds_per_volume_tta": round(seconds, 2),
        "process_cpu_seconds_training_call": round(train_cpu, 1),
        "step_seconds": summary.get("step_seconds"),
    }
    (run_dir / "result.json").write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps({k: v for k, v in result.items() if k != "network"}, default=float))
    return result



def table(minutes: float | None) -> dict:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import RESULTS, machine, write_json
    from unetkit.backends import cpu_name

    rows = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*/result.json"))]
    if minutes is not None:
        rows = [r for r in rows if r["cpu_minutes"] == minutes]
    lines = ["| arm | seed | CPU min | TTA | iterations | best.pt iter | labels rule | stitch IoU | SEG | AP@0.5 | PQ@0.5 | objects found / true |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["cpu_minutes"], r["seed"], arm_label(r))):
        d = r["decision"]
        rule = f"{d['method']} t={d['threshold']}" + (f" seed={d['seed_threshold']}/{d['min_seed_size']}" if d["method"] == "seeded" else "") \
            + (f" h={d['h']}" if d["method"] == "watershed" else "") + (f" min={d['min_size']}" if d["min_size"] else "") \
            + (" img-stats" if d.get("image_statistics") else "")
        stitch = "-" if r["stitch"] is None else str(r["stitch"]["threshold"])
        lines.append(f"| {arm_label(r)} | {r['seed']} | {r['cpu_minutes']:g} | {'yes' if r.get('tta') else 'no'} | {r['iterations']} | {r['best_iteration']} | {rule} | {stitch} | "
                     f"{r['seg']:.3f} | {r['ap50']:.3f} | {r['pq50']:.3f} | {r['objects_found']} / {r['objects_true']} |")
    means: dict = {}
    for (budget, arm) in sorted({(r["cpu_minutes"], arm_label(r)) for r in rows}):
        group = [r for r in rows if arm_label(r) == arm and r["cpu_minutes"] == budget]
        means[f"{arm.replace(' ', '_')}_{budget:g}min"] = {k: sum(r[k] for r in group) / len(group) for k in ("seg", "ap50", "pq50")} | \
            {"seeds": sorted(r["seed"] for r in group)} | \
            ({"annotated_voxel_fraction": group[0]["annotated_voxel_fraction"]} if "annotated_voxel_fraction" in group[0] else {})
    paired = []
    for r3 in rows:
        if r3["arm"] != "3d":
            continue
        for r2 in rows:
            if r2["arm"] == "2d" and r2["seed"] == r3["seed"] and r2["cpu_minutes"] == r3["cpu_minutes"]:
                paired.append({"seed": r3["seed"], "cpu_minutes": r3["cpu_minutes"], "ap50_3d_minus_2d": r3["ap50"] - r2["ap50"],
                               "seg_3d_minus_2d": r3["seg"] - r2["seg"]})
    sparse_vs_dense = [{"seed": rs["seed"], "cpu_minutes": rs["cpu_minutes"], "annotated_planes_per_volume": rs["annotated_planes_per_volume"],
                        "annotated_voxel_fraction": rs["annotated_voxel_fraction"],
                        "ap50_sparse_minus_dense": rs["ap50"] - rd["ap50"], "seg_sparse_minus_dense": rs["seg"] - rd["seg"]}
                       for rs in rows if rs["arm"] == "3d-sparse"
                       for rd in rows if rd["arm"] == "3d" and rd["seed"] == rs["seed"] and rd["cpu_minutes"] == rs["cpu_minutes"]]
    print("\n".join(lines))
    result = {
        "experiment": __doc__.split("\n\n")[0],
        "question": "3D U-Net vs 2D U-Net plane by plane + stitching on 3D nuclei; does 3D win on AP@0.5? "
                    "And (3d-sparse) how close does a 3D U-Net trained on K annotated planes per volume come to dense annotation?",
        "data": PROVENANCE,
        "split": "train t000-t039, validate t040-t049 (best.pt, labels rule, stitch threshold), score t050-t074",
        "settings": {"recipe": "default", "depth": DEPTH, "tile_3d": TILE_3D, "tile_2d": TILE_2D, "val_every": VAL_EVERY,
                     "stitch_thresholds_tried": STITCH_THRESHOLDS, "budget_clock": "cpu",
                     "tta": "per run ('tta' in each row); with --tta 3D 16-fold, 2D 8-fold"},
        "runs": rows, "means": means, "paired_differences": paired, "sparse_minus_dense": sparse_vs_dense, "markdown": lines,
        "machine": {**machine(), "cpu": cpu_name(), "threads_per_process": 1,
                    "cores": os.cpu_count(), "load_average_at_table_time": os.getloadavg(),
                    "note": "2 cores shared with other jobs (load average 10-17 while these runs trained, each process "
                            "getting 0.1-0.3 of a core; they were also paused for a while): budgets are process CPU "
                            "time, one thread per process, the arms of a seed side by side; the 3d-sparse runs came "
                            "later, one process at a time"},
    }
    write_json(RESULTS / "nuclei_volume.json", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", choices=("2d", "3d", "3d-sparse"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=10.0, help="CPU minutes of training (one thread)")
    parser.add_argument("--annotated-planes", type=int, default=3,
                        help="3d-sparse: annotated z-planes per training volume, evenly spaced (default 3)")
    parser.add_argument("--data", type=Path, default=None,
                        help=f"folder with images/ and labels/ (default $UNETKIT_EXTDATA/{DATASET} or /work/extdata/{DATASET})")
    parser.add_argument("--runs", type=Path, default=None, help="run folder root (default runs/nuclei_volume)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation for the labels rule, the stitch threshold and the test maps "
                             "(3D 16-fold, 2D 8-fold); off by default, see the module docstring")
    parser.add_argument("--table", action="store_true", help="collect result.json files into benchmarks/results/nuclei_volume.json")
    parser.add_argument("--table-minutes", type=float, default=None, help="with --table: only runs of this budget")
    args = parser.parse_args()
    global RUNS
    if args.runs is not None:
        RUNS = args.runs
    if args.table:
        table(args.table_minutes)
    elif args.arm:
        run_arm(args.arm, args.seed, args.minutes, args.data, args.tta, args.annotated_planes)
    else:
        parser.error("give --arm 2d|3d|3d-sparse or --table")


if __name__ == "__main__":
    main()
