"""unetkit against MONAI, side by side: same machine, same data split, same wall-clock budget, run at
the same time (two subprocesses, one thread each).

    .venv/bin/pip install -e .[bench]          # MONAI, beside the CPU torch
    .venv/bin/python benchmarks/peer_monai.py --dataset both --seconds 1500 --width 16
    .venv/bin/python benchmarks/peer_monai.py --dataset isbi --score-only   # score the runs in runs/peer/
    .venv/bin/python benchmarks/peer_monai.py --dataset dic --unetkit-args="--optimizer adam"
    .venv/bin/python benchmarks/peer_monai.py --dataset isbi --seed 1 --runs runs/peer_seed1   # another pair of seeds

Datasets ($UNETKIT_DATA or ../shared/data beside the repository):

- isbi: isbi2012, train on slices 00-19, score 20-24 (pixel, Rand and warping error of the cell
  probability map);
- dic: ctc-dic-c2dh-hela, train on t000-t044, score t045-t059 (SEG, AP@0.5, PQ@0.5 and object
  counts after each tool's instance post-processing).

unetkit side: the `unetkit train` command with its own defaults, plus only --width, the time budget
and --workers 0, on a folder that holds the training images only (links to the originals; the
scored images are not in it), so unetkit holds out its default validation share of those for
choosing best.pt and its labels rule; anything else only through --unetkit-args. It predicts with
`unetkit.predict(..., tta=True)` and draws labels with the rule stored in best.pt.

MONAI side (written here in plain PyTorch): BasicUNet(features=(32, 32, 64, 128, 256, 32)),
DiceCELoss(to_onehot_y=True, softmax=True), Adam lr 1e-3, batches of 4 random 256x256 crops with
random flips, rot90 and Rand2DElasticd (prob 0.3, control-point spacing 64 px, displacement
standard deviation 2-5 px), sliding_window_inference(roi 256, overlap 0.25, gaussian).

MONAI keeps its last weights and trains on all training images; unetkit keeps the best.pt it picks
on its own validation images (taken from the training images, so it trains on fewer). Each side's
budget is CPU time of its training loop (one thread; `--budget-clock cpu` for unetkit,
`time.process_time` for MONAI), so other jobs on the machine slow both in wall time without
taking budget from either; data loading is excluded; anything a side does after the loop
(unetkit's choice of a labels rule) shows in "training process wall s". On ISBI, `rand_error` is
the Fiji convention on the probability map (best threshold over 0.0-0.9, chosen on the scored
images themselves, which favours neither tool), `rand_error_labels` the error of each tool's own
labels (unetkit: its stored rule; MONAI: components of P(cell) > 0.5). Runs go to runs/peer/<dataset>/{unetkit,monai}/ and are
replaced by every run; results to benchmarks/results/peer_monai_<dataset>.json and
peer_monai_<dataset>_overlays/ (unetkit left, MONAI right).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from common import RESULTS, machine, write_json

import unetkit
from unetkit.data import Normalization, Sample, data_root, get_ctc_samples, get_isbi2012_samples
from unetkit.decision import DecisionRule
from unetkit.targets import TargetConfig

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
RUNS = REPO / "runs" / "peer"

DATASETS: dict[str, dict[str, Any]] = {
    "isbi": {"folder": "isbi2012", "train": list(range(20)), "test": list(range(20, 25)), "names": "{:02d}", "classes": 2},
    "dic": {"folder": "ctc-dic-c2dh-hela", "train": list(range(45)), "test": list(range(45, 60)), "names": "t{:03d}", "classes": 3},
}

# The MONAI recipe (the values a user comparing the two would pick).
MONAI_FEATURES = (32, 32, 64, 128, 256, 32)
MONAI_CROP = 256
MONAI_BATCH = 4
MONAI_LR = 1e-3
MONAI_ELASTIC = {"prob": 0.3, "spacing": (64, 64), "magnitude_range": (2.0, 5.0)}
MONAI_OVERLAP = 0.25
MONAI_MIN_SEED = 30  # pixels: smallest interior component that seeds a cell (DIC)

THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


# -- data -----------------------------------------------------------------------------------------
def dataset_folder(dataset: str) -> Path:
    return data_root() / DATASETS[dataset]["folder"]


def load_split(dataset: str, part: str, normalization: Normalization | None = None, use_weight_map: bool = False) -> list[Sample]:
    """The training ("train") or scored ("test") samples, normalised by unetkit's loaders."""
    spec = DATASETS[dataset]
    norm = normalization or Normalization()
    loader = get_isbi2012_samples if dataset == "isbi" else get_ctc_samples
    key = "slices" if dataset == "isbi" else "frames"
    return loader(dataset_folder(dataset), **{key: spec[part]}, normalization=norm, targets=TargetConfig(use_weight_map=use_weight_map))


def test_names(dataset: str) -> list[str]:
    spec = DATASETS[dataset]
    return [spec["names"].format(i) for i in spec["test"]]


# -- unetkit side ---------------------------------------------------------------------------------
def training_folder(dataset: str, folder: Path) -> Path:
    """A dataset folder (images/ + masks/) of links to the training images only, as a user would
    prepare the images they annotated; the scored images are not in it."""
    from unetkit.data import find_pairs

    spec = DATASETS[dataset]
    wanted = {spec["names"].format(i) for i in spec["train"]}
    pairs = [p for p in find_pairs(dataset_folder(dataset)) if p.name in wanted]
    if len(pairs) != len(wanted):
        raise SystemExit(f"{dataset}: found {len(pairs)} of the {len(wanted)} training images in {dataset_folder(dataset)}")
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for pair in pairs:
        for sub, path in (("images", pair.image), ("masks", pair.mask)):
            link = folder / sub / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    return folder


def unetkit_command(dataset: str, seconds: float, run_dir: Path, width: int, extra_args: Sequence[str] = ()) -> list[str]:
    """The `unetkit train` command line a user would type; everything not named here is unetkit's default."""
    exe = Path(sys.executable).parent / "unetkit"
    prefix = [str(exe)] if exe.is_file() else [sys.executable, "-m", "unetkit"]
    data = training_folder(dataset, run_dir.parent / "training_images")
    return prefix + [
        "train", "--data", str(data), "--out", str(run_dir), "--seconds", f"{seconds:g}", "--budget-clock", "cpu",
        "--iterations", "1000000",
        "--workers", "0", "--no-progress", "--width", str(width), *extra_args,
    ]


def train_unetkit(dataset: str, seconds: float, out_dir: Path, width: int, extra_args: Sequence[str] = ()) -> dict:
    """Train with the unetkit CLI into out_dir/run (its log in out_dir/train.log); returns its summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = unetkit_command(dataset, seconds, out_dir / "run", width, extra_args)
    (out_dir / "command.json").write_text(json.dumps(command, indent=2))
    with open(out_dir / "train.log", "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **THREAD_ENV})
    text = (out_dir / "train.log").read_text()
    if code != 0:
        raise SystemExit(f"unetkit train failed ({code}):\n{text[-3000:]}")
    summary = json.loads(text[text.index("{"):]) if "{" in text else {}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def load_unetkit(out_dir: Path):
    from unetkit.checkpoint import load_checkpoint

    return load_checkpoint(Path(out_dir) / "run" / "best.pt")


def unetkit_decision(loaded) -> tuple[dict | None, str | None]:
    """The decision rule stored with a loaded checkpoint, and where: its `decision` entry, or one in
    its train_config or state; (None, None) if it has none."""
    for source, value in (("checkpoint", getattr(loaded, "decision", None)), ("train_config", loaded.train_config.get("decision")),
                          ("state", loaded.state.get("decision"))):
        if value:
            return dict(value), source
    return None, None


def unetkit_instances(loaded, prob: np.ndarray) -> np.ndarray:
    """unetkit's instances from its cell probability map: the checkpoint's stored decision rule if it
    has one, else `probabilities_to_instances(prob, method="watershed")`."""
    from unetkit.decision import DecisionRule
    from unetkit.postprocess import probabilities_to_instances

    decision, _ = unetkit_decision(loaded)
    if decision:
        return DecisionRule.from_dict(decision).apply(prob)
    return probabilities_to_instances(prob, method="watershed")


# -- MONAI side -----------------------------------------------------------------------------------
def monai_labels(dataset: str, sample: Sample) -> np.ndarray:
    """MONAI class map. isbi: 0 membrane, 1 cell. dic: 0 background, 1 cell interior, 2 cell border
    (pixels of an instance with another label or background within 2 px: a 5x5 neighbourhood)."""
    from scipy import ndimage as ndi

    inst = sample.instances
    if dataset == "isbi":
        return (inst > 0).astype(np.int64)
    size = (5, 5)
    border = (inst > 0) & ((ndi.maximum_filter(inst, size=size) != inst) | (ndi.minimum_filter(inst, size=size) != inst))
    labels = (inst > 0).astype(np.int64)
    labels[border] = 2
    return labels


def monai_network(classes: int):
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=classes, features=MONAI_FEATURES)


def monai_augment(seed: int):
    from monai.transforms import Compose, Rand2DElasticd, RandFlipd, RandRotate90d, RandSpatialCropd

    keys = ("image", "label")
    transform = Compose([
        RandSpatialCropd(keys, roi_size=(MONAI_CROP, MONAI_CROP), random_size=False),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandRotate90d(keys, prob=0.5, max_k=3),
        Rand2DElasticd(keys, mode=("bilinear", "nearest"), padding_mode="reflection", **MONAI_ELASTIC),
    ])
    transform.set_random_state(seed=seed)
    return transform


def train_monai(dataset: str, seconds: float, out_dir: Path, seed: int = 0) -> dict:
    """Train the MONAI recipe until `seconds` of training loop have passed; keep the last weights."""
    import monai
    from monai.data import set_track_meta
    from monai.losses import DiceCELoss

    set_track_meta(False)
    monai.utils.set_determinism(seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = load_split(dataset, "train")
    data = [(torch.from_numpy(s.image), torch.from_numpy(monai_labels(dataset, s)[None].astype(np.float32))) for s in samples]
    classes = DATASETS[dataset]["classes"]
    model = monai_network(classes)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=MONAI_LR)
    augment = monai_augment(seed)
    rng = np.random.default_rng(seed)
    model.train()
    losses, iteration, step_seconds = [], 0, 0.0
    started = time.perf_counter()
    cpu_started = time.process_time()
    while True:
        crops = [augment({"image": image, "label": label}) for image, label in (data[i] for i in rng.integers(len(data), size=MONAI_BATCH))]
        x = torch.stack([torch.as_tensor(c["image"]) for c in crops]).float()
        y = torch.stack([torch.as_tensor(c["label"]) for c in crops]).round().long()
        step_started = time.perf_counter()
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_seconds += time.perf_counter() - step_started
        iteration += 1
        losses.append(loss.item())
        elapsed = time.perf_counter() - started
        if time.process_time() - cpu_started >= seconds:
            break
    torch.save({"state_dict": model.state_dict(), "classes": classes, "iteration": iteration}, out_dir / "last.pt")
    summary = {
        "iterations": iteration, "seconds": elapsed, "cpu_seconds": time.process_time() - cpu_started, "step_seconds": step_seconds / iteration,
        "loop_seconds_per_step": elapsed / iteration, "final_loss_mean_last_50": float(np.mean(losses[-50:])),
        "monai": monai.__version__, "torch_threads": torch.get_num_threads(),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "losses.json").write_text(json.dumps(losses))
    return summary


def load_monai(out_dir: Path):
    payload = torch.load(Path(out_dir) / "last.pt", map_location="cpu", weights_only=True)
    model = monai_network(int(payload["classes"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval(), int(payload["iteration"])


def monai_predict(model, image: np.ndarray) -> np.ndarray:
    """(K, H, W) class probabilities by gaussian-blended sliding windows over the (C, H, W) image."""
    from monai.inferers import sliding_window_inference

    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(image)[None], roi_size=(MONAI_CROP, MONAI_CROP),
                                          sw_batch_size=MONAI_BATCH, predictor=model, overlap=MONAI_OVERLAP, mode="gaussian")
        return torch.softmax(torch.as_tensor(logits), dim=1)[0].numpy()


def monai_instances(prob: np.ndarray, min_seed: int = MONAI_MIN_SEED) -> np.ndarray:
    """Seeded watershed: seeds = 4-connected components of P(interior) > 0.5 with >= min_seed pixels,
    flooding 1 - P(interior) inside the cell mask 1 - P(background) > 0.5. Mask regions that no
    seed reaches stay background."""
    from skimage.measure import label
    from skimage.segmentation import watershed

    interior, cells = prob[1], 1.0 - prob[0] > 0.5
    seeds = label(interior > 0.5, connectivity=1)
    sizes = np.bincount(seeds.ravel())
    small = sizes < min_seed
    small[0] = False
    seeds[small[seeds]] = 0
    return watershed(1.0 - interior, markers=seeds, mask=cells | (seeds > 0), connectivity=1).astype(np.int32)


# -- scoring --------------------------------------------------------------------------------------
def count_objects(labels: np.ndarray) -> int:
    return int(np.count_nonzero(np.unique(labels)))


def score(dataset: str, fg_maps: list[np.ndarray], instances: list[np.ndarray] | None, samples: list[Sample]) -> dict:
    """The same scoring for both tools: foreground (cell) probability maps and, on DIC, instances."""
    from unetkit.metrics import average_precision, iou, pixel_error, rand_error, seg_score, warping_error

    truth = [s.instances for s in samples]
    if dataset == "isbi":
        truth_mask = [(t > 0).astype(np.uint8) for t in truth]
        warping, details = warping_error(fg_maps, truth_mask, return_details=True)
        return {"metrics": {"rand_error": rand_error(fg_maps, truth_mask), "rand_error_labels": rand_error(instances, truth_mask),
                            "pixel_error": pixel_error(fg_maps, truth_mask), "warping_error": warping},
                "rand_error_labels_per_slice": {s.name: round(rand_error(i, t), 4) for s, i, t in zip(samples, instances, truth_mask)},
                "warping_error_classes": details}
    ap = average_precision(instances, truth, thresholds=(0.5,))[0.5]
    predicted, labelled = [count_objects(p) for p in instances], [count_objects(t) for t in truth]
    return {"metrics": {"seg": seg_score(instances, truth), "ap50": ap["ap"], "pq50": ap["pq"], "f1_50": ap["f1"],
                        "foreground_iou": iou(fg_maps, [t > 0 for t in truth]),
                        "count_mean_abs_error": float(np.mean(np.abs(np.subtract(predicted, labelled)))),
                        "objects_predicted": int(sum(predicted)), "objects_labelled": int(sum(labelled))},
            "objects_per_frame": {s.name: {"predicted": p, "labelled": t} for s, p, t in zip(samples, predicted, labelled)}}


LOWER_IS_BETTER = {"rand_error", "rand_error_labels", "pixel_error", "warping_error", "count_mean_abs_error"}


def save_side_by_side(folder: Path, samples: list[Sample], left: list[np.ndarray], right: list[np.ndarray]) -> list[str]:
    """One PNG per image: unetkit's objects (left) and MONAI's (right) over the image, with
    unetkit.plots.overlay's colours (contours yellow, false cell pixels magenta, missed ones cyan)."""
    from unetkit.io import write_png
    from unetkit.plots import overlay

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    paths = []
    for sample, a, b in zip(samples, left, right):
        truth = sample.instances > 0
        pictures = [overlay(sample.image, a, truth=truth), overlay(sample.image, b, truth=truth)]
        gap = np.full((pictures[0].shape[0], 8, 3), 255, np.uint8)
        path = folder / f"{sample.name}_unetkit_left_monai_right.png"
        write_png(path, np.concatenate([pictures[0], gap, pictures[1]], axis=1), force=True)
        paths.append(str(path.relative_to(RESULTS)) if path.is_relative_to(RESULTS) else str(path))
    return paths


def matmul_gflops(size: int = 1024, repeats: int = 10) -> float:
    """Best single-thread float32 matmul rate of this machine, GFLOP/s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(repeats))
    finally:
        torch.set_num_threads(threads)
    return 2.0 * size**3 / best / 1e9


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def score_runs(dataset: str, run_root: Path, args, gflops: float, seconds: float | None) -> dict:
    """Load both runs, predict the scored images, score them the same way, print and write the results."""
    from unetkit import predict
    from unetkit.backends import cpu_name

    uk_dir, mo_dir = run_root / "unetkit", run_root / "monai"
    loaded = load_unetkit(uk_dir)
    decision, decision_source = unetkit_decision(loaded)
    monai_model, monai_iterations = load_monai(mo_dir)
    samples = load_split(dataset, "test")
    uk_samples = samples if loaded.normalization == Normalization() else load_split(dataset, "test", loaded.normalization)

    started = time.perf_counter()
    statistics = DecisionRule.from_dict(decision).norm_statistics if decision else "training"
    uk_probs = [predict(loaded.model, s.image, tta=True, norm_statistics=statistics) for s in uk_samples]
    uk_seconds = (time.perf_counter() - started) / len(samples)
    started = time.perf_counter()
    mo_probs = [monai_predict(monai_model, s.image) for s in samples]
    mo_seconds = (time.perf_counter() - started) / len(samples)

    uk_fg, mo_fg = [p[1] for p in uk_probs], [p[1] if dataset == "isbi" else 1.0 - p[0] for p in mo_probs]
    if dataset == "dic":
        uk_inst = [unetkit_instances(loaded, p) for p in uk_fg]
        mo_inst = [monai_instances(p) for p in mo_probs]
    else:
        from unetkit.labels import label_components

        uk_inst = [unetkit_instances(loaded, p) if decision else label_components(p > 0.5) for p in uk_fg]
        mo_inst = [label_components(p > 0.5) for p in mo_fg]
    uk_score = score(dataset, uk_fg, uk_inst, samples)
    mo_score = score(dataset, mo_fg, mo_inst, samples)
    if dataset == "isbi" and decision:
        # Where the difference lies: MONAI's map through unetkit's labels rule (map vs decision rule).
        from unetkit.metrics import rand_error

        rule = DecisionRule.from_dict(decision)
        mo_score["rand_error_labels_with_unetkit_rule_per_slice"] = {
            s.name: round(rand_error(rule.apply(p), (s.instances > 0).astype(np.uint8)), 4) for s, p in zip(samples, mo_fg)}
    ratios = {k: (uk_score["metrics"][k] / v if v else None) for k, v in mo_score["metrics"].items()}

    read = lambda p: json.loads(p.read_text()) if p.is_file() else {}  # noqa: E731
    uk_summary, mo_summary = read(uk_dir / "summary.json"), read(mo_dir / "summary.json")
    command = read(uk_dir / "command.json") or []
    spec = DATASETS[dataset]
    result = {
        "dataset": dataset,
        "data": str(dataset_folder(dataset)),
        "train": [spec["names"].format(i) for i in spec["train"]],
        "scored": test_names(dataset),
        "budget_seconds_per_side": seconds if seconds is not None else uk_summary.get("budget_seconds"),
        "weights": "unetkit: best.pt on its own validation share of the training images; MONAI: last",
        "run_folder": str(run_root),
        "unetkit": {
            "command": command or None,
            "extra_args": command[command.index("--width") + 2:] if "--width" in command else None,
            "parameters": parameter_count(loaded.model),
            "model_config": dict(loaded.model.config),
            "train_config": loaded.train_config,
            "iterations": loaded.iteration,
            "training": uk_summary,
            "inference": "unetkit.predict(model, image, tta=True): overlap-tile, 8 dihedral transforms",
            "instances": (f"stored decision rule ({decision_source}): {decision}" if decision
                          else "probabilities_to_instances(prob, method='watershed')"),
            "predict_seconds_per_image": uk_seconds,
            **uk_score,
        },
        "monai": {
            "recipe": {"network": f"BasicUNet(spatial_dims=2, in_channels=1, out_channels={spec['classes']}, features={MONAI_FEATURES})",
                       "loss": "DiceCELoss(to_onehot_y=True, softmax=True)", "optimizer": f"Adam(lr={MONAI_LR})",
                       "batch": f"{MONAI_BATCH} random {MONAI_CROP}x{MONAI_CROP} crops",
                       "augmentation": f"RandFlipd x2 (p=0.5 each axis), RandRotate90d (p=0.5), Rand2DElasticd({MONAI_ELASTIC}, bilinear/nearest, reflection)",
                       "classes": "membrane, cell" if dataset == "isbi" else "background, cell interior, cell border (2 px)"},
            "parameters": parameter_count(monai_model),
            "iterations": monai_iterations,
            "training": mo_summary,
            "inference": f"sliding_window_inference(roi_size={MONAI_CROP}, overlap={MONAI_OVERLAP}, mode='gaussian'), softmax; no TTA",
            "instances": (f"seeded watershed: seeds = components of P(interior) > 0.5 with >= {MONAI_MIN_SEED} px, "
                          "flooding 1 - P(interior) within 1 - P(background) > 0.5") if dataset == "dic" else "4-connected components of P(cell) > 0.5",
            "foreground": "P(cell)" if dataset == "isbi" else "1 - P(background)",
            "predict_seconds_per_image": mo_seconds,
            **mo_score,
        },
        "ratios_unetkit_over_monai": ratios,
        "machine": {**machine(), "cpu_model": cpu_name(), "logical_cpus": os.cpu_count(), "threads_per_side": 1,
                    "matmul_1024_float32_gflops_one_thread": round(gflops, 1), "monai": _monai_version(),
                    "python": platform.python_version()},
    }
    index = list(range(len(samples)))[:: 1 if dataset == "isbi" else 5]
    shown = [samples[i] for i in index]
    stem = f"peer_monai_{dataset}" + (f"_seed{args.seed}" if args.seed else "")
    result["seed"] = args.seed
    result["overlays"] = save_side_by_side(RESULTS / f"{stem}_overlays", shown,
                                           [uk_inst[i] for i in index], [mo_inst[i] for i in index])
    write_json(RESULTS / f"{stem}.json", result)
    print_table(result)
    return result


def _monai_version() -> str:
    import monai

    return monai.__version__


def print_table(result: dict) -> None:
    uk, mo = result["unetkit"], result["monai"]
    print(f"\n{result['dataset']}: scored {result['scored'][0]}..{result['scored'][-1]}, "
          f"budget {result['budget_seconds_per_side']} s per side")
    print(f"{'metric':<24}{'unetkit':>12}{'monai':>12}{'ratio u/m':>12}")
    for name, value in uk["metrics"].items():
        ratio = result["ratios_unetkit_over_monai"][name]
        arrow = " (lower better)" if name in LOWER_IS_BETTER else ""
        print(f"{name:<24}{value:>12.5g}{mo['metrics'][name]:>12.5g}{(f'{ratio:.3f}' if ratio is not None else '-'):>12}{arrow}")
    print(f"{'iterations':<24}{uk['iterations']:>12}{mo['iterations']:>12}")
    print(f"{'images per iteration':<24}{'1x' + str(uk['train_config'].get('tile_size')):>12}{f'{MONAI_BATCH}x{MONAI_CROP}':>12}")
    print(f"{'parameters':<24}{uk['parameters']:>12,}{mo['parameters']:>12,}")
    walls = [side["training"].get("side_wall_seconds") for side in (uk, mo)]
    print(f"{'training process wall s':<24}" + "".join(f"{w:>12.1f}" if w is not None else f"{'-':>12}" for w in walls))
    print(f"{'predict s/image':<24}{uk['predict_seconds_per_image']:>12.2f}{mo['predict_seconds_per_image']:>12.2f}")
    if "rand_error_labels_per_slice" in uk:
        print("Rand error of the labels per slice (unetkit / monai / monai's map with unetkit's rule): " + ", ".join(
            f"{n}: {v}/{mo['rand_error_labels_per_slice'][n]}/{mo.get('rand_error_labels_with_unetkit_rule_per_slice', {}).get(n, '-')}"
            for n, v in uk["rand_error_labels_per_slice"].items()))
    if result["dataset"] == "dic":
        print("objects per frame (predicted unetkit / monai / labelled): " + ", ".join(
            f"{n}: {uk['objects_per_frame'][n]['predicted']}/{mo['objects_per_frame'][n]['predicted']}/{uk['objects_per_frame'][n]['labelled']}"
            for n in uk["objects_per_frame"]))
    print(f"machine: {result['machine']['cpu_model']}, torch {result['machine']['torch']}, "
          f"1 thread per side, matmul {result['machine']['matmul_1024_float32_gflops_one_thread']} GFLOP/s (1 thread)")


# -- orchestration --------------------------------------------------------------------------------
def launch(dataset: str, seconds: float, width: int, run_root: Path, unetkit_args: str, seed: int) -> None:
    """Both sides at once, each a subprocess with one thread; waits for both."""
    for side in ("unetkit", "monai"):
        if (run_root / side).exists():
            shutil.rmtree(run_root / side)
    run_root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **THREAD_ENV}
    procs = {}
    try:
        for side in ("unetkit", "monai"):
            command = [sys.executable, str(SCRIPT), "--side", side, "--dataset", dataset, "--seconds", f"{seconds:g}",
                       "--width", str(width), "--out", str(run_root / side), f"--unetkit-args={unetkit_args}",
                       "--seed", str(seed)]
            log = open(run_root / f"{side}.log", "w")
            procs[side] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True), log)
        print(f"{dataset}: training unetkit (pid {procs['unetkit'][0].pid}) and MONAI (pid {procs['monai'][0].pid}) "
              f"for {seconds:g} s each; logs in {run_root}", flush=True)
        failed = []
        for side, (proc, log) in procs.items():
            if proc.wait() != 0:
                failed.append(side)
            log.close()
    except BaseException:
        for proc, _ in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        raise
    if failed:
        tails = "\n".join(f"--- {side}:\n" + (run_root / f"{side}.log").read_text()[-3000:] for side in failed)
        raise SystemExit(f"{dataset}: training failed for {', '.join(failed)}\n{tails}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("isbi", "dic", "both"), default="both")
    parser.add_argument("--seconds", type=float, default=1500.0, help="training budget of each side, CPU seconds of its one thread")
    parser.add_argument("--width", type=int, default=16, help="unetkit --width (16: about the size of the MONAI net)")
    parser.add_argument("--unetkit-args", default="", help='extra `unetkit train` options, e.g. --unetkit-args="--optimizer adam"')
    parser.add_argument("--runs", type=Path, default=RUNS, help="run folders: RUNS/<dataset>/{unetkit,monai}")
    parser.add_argument("--score-only", action="store_true", help="skip training; score the runs already in --runs")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of both sides (unetkit train --seed, MONAI's set_determinism); other than 0, the "
                             "results go to peer_monai_<dataset>_seed<N>.json and _overlays/")
    parser.add_argument("--side", choices=("unetkit", "monai"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.side is not None:  # one side, in its own subprocess
        if args.dataset == "both" or args.out is None:
            parser.error("--side needs --dataset isbi|dic and --out DIR")
        started = time.perf_counter()
        if args.side == "unetkit":
            seed_args = ["--seed", str(args.seed)] if args.seed else []
            summary = train_unetkit(args.dataset, args.seconds, args.out, args.width,
                                    [*seed_args, *shlex.split(args.unetkit_args)])
        else:
            summary = train_monai(args.dataset, args.seconds, args.out, seed=args.seed)
        summary["budget_seconds"] = args.seconds
        summary["side_wall_seconds"] = time.perf_counter() - started  # loading, training and anything after it
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
        return

    datasets = ["isbi", "dic"] if args.dataset == "both" else [args.dataset]
    for dataset in datasets if not args.score_only else []:  # (scoring counts the trained models' parameters)
        print(f"{dataset}: parameters unetkit (width {args.width}) {parameter_count(unetkit.UNet(base_channels=args.width)):,}, "
              f"MONAI BasicUNet {parameter_count(monai_network(DATASETS[dataset]['classes'])):,}", flush=True)
    gflops = matmul_gflops()
    print(f"matmul 1024x1024 float32, one thread: {gflops:.1f} GFLOP/s", flush=True)
    for dataset in datasets:
        run_root = args.runs / dataset
        if not args.score_only:
            launch(dataset, args.seconds, args.width, run_root, args.unetkit_args, args.seed)
        score_runs(dataset, run_root, args, gflops, None if args.score_only else args.seconds)


if __name__ == "__main__":
    main()
