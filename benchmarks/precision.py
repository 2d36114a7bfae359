"""Inference precision (fp32, bf16, int8): speed on this CPU and the packaged models' scores in each.

Per precision, in one process:

* speed: seconds per 572x572 tile of the packaged em-membranes network (width 16, depth 5) in a
  whole `predict` call (one tile, no TTA, stored batch-norm statistics), the best and the median of
  `--rounds` interleaved rounds after a warm-up (the best is the one least disturbed by other work
  on a shared machine), and its effective GFLOP/s (analytic FLOPs of the tile, at the best time),
  next to the fp32 and bf16 matrix-multiply GFLOP/s measured in each round (the machine is
  shared: compare ratios within one run). fp32 is timed on torch and on onnxruntime (int8 runs
  on onnxruntime).
* scores: each packaged model on its held-out `scored_on` images (models.json), with its stored
  labels rule, test-time augmentation and batch-norm statistics, in each precision
  (`unetkit.precision.score_precisions`; int8 calibrated on the model's first training images,
  `unetkit.precision.calibration_source`): ISBI 20-24 Rand error of labels and pixel error,
  DIC-HeLa t045-t059 and Fluo-N2DH-GOWT1 t31 SEG and AP@0.5. They are stored in models.json
  ("precision_scores", `unetkit.pretrained.record_precision_scores`) unless --no-record.

Writes benchmarks/results/precision.json (--speed-only: measures the speed again and replaces
that part of the file, keeping its scores).

    nice -n 5 python benchmarks/precision.py
    nice -n 5 python benchmarks/precision.py --speed-only --rounds 9
    python benchmarks/precision.py --models em-membranes --rounds 3 --no-record
"""

from __future__ import annotations

import argparse
import json
import statistics as stats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_json  # noqa: E402

from unetkit import pretrained  # noqa: E402
from unetkit.backends import cpu_name  # noqa: E402
from unetkit import backends  # noqa: E402
from unetkit.checkpoint import load_checkpoint  # noqa: E402
from unetkit.data import data_root, get_ctc_samples, get_isbi2012_samples  # noqa: E402
from unetkit.decision import DecisionRule  # noqa: E402
from unetkit.metrics import average_precision, pixel_error, rand_error, seg_score  # noqa: E402
from unetkit.precision import (  # noqa: E402
    SCORE_TOLERANCE, bf16_native, calibration_source, int8_available, score_precisions,
)
from unetkit.predict import predict  # noqa: E402

TILE = 572
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    """The CPU flags that decide bf16 and int8 speed, of those /proc/cpuinfo lists."""
    have = backends.cpu_flags()
    return [f for f in FLAGS if f in have]


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def speed(precisions: list[str], rounds: int) -> dict:
    """Seconds per 572 tile and GFLOP/s of each precision, interleaved, with matmul GFLOP/s per round."""
    loaded = load_checkpoint("em-membranes")
    model = loaded.model.eval()
    size = model.geometry.output_size(TILE)
    image = np.random.default_rng(0).random((size, size), dtype=np.float32)
    calibration = calibration_source("em-membranes", loaded.normalization)
    runs = [("fp32", "torch")] + ([("fp32", "onnxruntime")] if int8_available() else [])
    runs += [(p, "auto") for p in precisions if p != "fp32"]
    times: dict[str, list[float]] = {f"{p}_{b}" if p == "fp32" else p: [] for p, b in runs}
    matmul: dict[str, list[float]] = {"fp32": [], "bf16": []}

    def once(precision: str, backend: str) -> float:
        started = time.perf_counter()
        predict(model, image, tile_size=TILE, precision=precision, backend=backend, calibration=calibration)
        return time.perf_counter() - started

    for precision, backend in runs:  # warm-up: exports, quantises, plans memory
        once(precision, backend)
    for _ in range(rounds):
        matmul["fp32"].append(matmul_gflops(torch.float32))
        matmul["bf16"].append(matmul_gflops(torch.bfloat16))
        for precision, backend in runs:
            times[f"{precision}_{backend}" if precision == "fp32" else precision].append(once(precision, backend))
    flops = model.flops(TILE)
    rows = {}
    for name, seconds in times.items():
        best = min(seconds)
        rows[name] = {"seconds_per_tile": round(best, 4), "median_seconds_per_tile": round(stats.median(seconds), 4),
                      "gflops": round(flops / best / 1e9, 2), "seconds_all_rounds": [round(s, 4) for s in seconds]}
    reference = rows["fp32_torch"]["seconds_per_tile"]
    for row in rows.values():
        row["speedup_vs_fp32_torch"] = round(reference / row["seconds_per_tile"], 3)
    mm = {k: round(max(v), 1) for k, v in matmul.items()}
    for row in rows.values():
        row["fraction_of_fp32_matmul"] = round(row["gflops"] / mm["fp32"], 3)
    return {"tile": TILE, "network": "em-membranes (width 16, depth 5)", "flops_per_tile": flops, "rounds": rounds,
            "matmul_gflops": mm, "matmul_gflops_all_rounds": matmul, "bf16_over_fp32_matmul": round(mm["bf16"] / mm["fp32"], 3),
            "precisions": rows}


def load_samples(info, normalization):
    root = data_root() / info.dataset
    if info.dataset == "isbi2012":
        return get_isbi2012_samples(root, slices=list(info.test_ids), normalization=normalization)
    return get_ctc_samples(root, frames=list(info.test_ids), normalization=normalization)


def metrics_for(task: str):
    def membranes(maps, labels, truths) -> dict:
        return {"rand_error_labels": float(rand_error(labels, truths)), "pixel_error": float(pixel_error(maps, truths))}

    def objects(maps, labels, truths) -> dict:
        ap = average_precision(labels, truths, thresholds=(0.5,))[0.5]
        return {"seg": float(seg_score(labels, truths)), "ap50": float(ap["ap"]), "pq50": float(ap["pq"])}

    return membranes if task == "membranes" else objects


def scores(name: str, precisions: list[str], record: bool) -> dict:
    info = pretrained.get_model(name)
    loaded = load_checkpoint(name)
    rule = DecisionRule.from_dict(loaded.decision)
    samples = load_samples(info, loaded.normalization)
    calibration = calibration_source(name, loaded.normalization)
    started = time.perf_counter()
    result = score_precisions(loaded.model, loaded.normalization, samples, None, rule, precisions=precisions,
                              calibration=calibration() if calibration else None, metrics=metrics_for(rule.task))
    result.update(scored_on=pretrained.ids_text(info.dataset, info.test_ids), weights_sha256=pretrained.file_sha256(info.path),
                  calibrated_on=pretrained.ids_text(info.dataset, info.train_ids[:4]), measured_by="benchmarks/precision.py",
                  cpu=cpu_name(), date=time.strftime("%Y-%m-%d"))
    if record:
        pretrained.record_precision_scores(name, result)
    return {**result, "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(pretrained.REGISTRY))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-record", action="store_true", help="leave models.json as it is")
    parser.add_argument("--speed-only", action="store_true", help="measure the speed again; keep the file's scores")
    parser.add_argument("--out", type=Path, default=RESULTS / "precision.json")
    args = parser.parse_args()
    precisions = ["fp32"] + (["bf16"] if bf16_native() else []) + (["int8"] if int8_available() else [])
    result = {
        "machine": {**machine(), "cpu": cpu_name(), "cpu_flags": cpu_flags(), "bf16_native": bf16_native(),
                    "int8_available": int8_available(), "date": time.strftime("%Y-%m-%d %H:%M")},
        "tolerance": SCORE_TOLERANCE, "precisions": precisions,
    }
    with tempfile.TemporaryDirectory() as cache:  # exports and calibrations of this run only
        import os

        os.environ["UNETKIT_CACHE_DIR"] = cache
        result["speed"] = speed(precisions, args.rounds)
        print(result["speed"], flush=True)
        if args.speed_only:
            earlier = json.loads(args.out.read_text()) if args.out.is_file() else {}
            result["scores"] = earlier.get("scores", {})
            result["scores_machine"] = earlier.get("scores_machine", earlier.get("machine"))
            write_json(args.out, result)
            return
        result["scores"] = {}
        result["scores_machine"] = result["machine"]
        for name in args.models:
            if not pretrained.get_model(name).installed:
                continue
            result["scores"][name] = scores(name, precisions, not args.no_record)
            print(name, result["scores"][name]["rule_scores"], flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
