"""End-to-end speed of `unetkit.predict` with each backend (torch, onnxruntime, auto), side by side.

For each network width, one image is segmented with 572x572 tiles by every backend in the same
process, next to the fp32 matrix-multiply speed measured just before it (so a busy machine shows
as a lower matmul figure in the same row). Reported per width:

* torch and onnxruntime: seconds and effective GFLOP/s (analytic FLOPs of the tiles run) of a
  whole `predict` call, the median of `--rounds` interleaved runs after a warm-up; the graph's
  export (the quick one the cache uses, and the standard one of `unetkit export`) and session
  set-up are timed separately (they happen once per checkpoint; the graph is cached).
* auto: `--jobs` jobs in a row from an empty cache, as `unetkit predict` on a folder of images or
  an analysis run again: each job's seconds and the choice remembered after it. A job too short
  to repay the export runs on torch and adds its seconds to the cache; the job that brings the
  sum to `backends.MIN_MEASURED_SECONDS` exports, measures both and keeps the faster.
* the largest difference between the backends' probabilities.

auto_last_job_vs_faster compares auto's last job with the faster backend; auto_series_vs_better_alone
compares the whole series with the better of torch alone and onnxruntime alone (with its export).

    python benchmarks/backend_speed.py                       # widths 16 and 64, image 1552 x 1552
    python benchmarks/backend_speed.py --widths 16 --size 776
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import unetkit
from unetkit import backends
from unetkit.predict import predict_plan


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of an n x n matrix product with torch (the machine's speed right now)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_width(width: int, size: int, tile: int, rounds: int = 3, jobs: int = 4, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = unetkit.UNet(base_channels=width).eval()
    image = np.random.default_rng(seed).random((size, size), dtype=np.float32)
    plan = predict_plan(model, image.shape, tile)
    flops = len(plan) * model.flops(tile)
    row: dict = {"width": width, "image_size": size, "tile_size": tile, "tiles": len(plan),
                 "gflop_per_image": round(flops / 1e9, 1)}

    def timed(backend: str) -> tuple[float, np.ndarray]:
        started = time.perf_counter()
        out = unetkit.predict(model, image, tile_size=tile, backend=backend)
        return time.perf_counter() - started, out

    def fresh_cache() -> None:
        os.environ["UNETKIT_CACHE_DIR"] = tempfile.mkdtemp()
        backends._SESSIONS.clear()

    fresh_cache()
    row["matmul_gflops_per_second"] = round(matmul_gflops(), 1)
    timed("torch")  # warm-up: torch's first call on a new shape builds its kernels
    from unetkit.export.graphs import onnx_program

    row["onnx_export_seconds_standard"] = round(_seconds(lambda: onnx_program(model)), 2)
    row["onnx_export_seconds_quick"] = round(_seconds(lambda: backends.cached_graph(model)), 2)
    row["onnx_session_seconds"] = round(_seconds(lambda: backends._session(model)), 2)
    # torch and onnxruntime (graph cached), interleaved rounds; the median of each
    seconds: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
    for _ in range(rounds):
        for backend in seconds:
            spent, out = timed(backend)
            seconds[backend].append(spent)
            if backend == "torch":
                reference = out
            else:
                row["max_abs_difference"] = float(np.abs(out - reference).max())
    for backend, values in seconds.items():
        median = float(np.median(values))
        row[backend] = {"seconds": round(median, 2), "seconds_each": [round(v, 2) for v in values],
                        "gflops_per_second": round(flops / median / 1e9, 1)}
    faster_name = min(seconds, key=lambda b: row[b]["seconds"])
    faster = row[faster_name]["seconds"]
    # auto from an empty cache: a series of jobs with the same model, as `unetkit predict` on a folder
    fresh_cache()
    auto = []
    for _ in range(jobs):
        spent, _ = timed("auto")
        entry = next(iter(backends.read_choices().values()), {})
        auto.append({"seconds": round(spent, 2), "choice_after": entry.get("backend", "torch (not measured yet)"),
                     "unmeasured_torch_seconds": entry.get("unmeasured_torch_seconds")})
    row["auto_jobs"] = auto
    row["faster_backend"] = faster_name
    row["auto_first_job_vs_torch"] = round(auto[0]["seconds"] / row["torch"]["seconds"], 3)
    row["auto_last_job_vs_faster"] = round(auto[-1]["seconds"] / faster, 3)
    # the whole series against each backend alone (onnxruntime alone pays one export and session)
    onnx_alone = jobs * row["onnxruntime"]["seconds"] + row["onnx_export_seconds_quick"] + row["onnx_session_seconds"]
    row["series_seconds"] = {"auto": round(sum(j["seconds"] for j in auto), 2),
                             "torch_alone": round(jobs * row["torch"]["seconds"], 2),
                             "onnxruntime_alone_with_export": round(onnx_alone, 2)}
    row["auto_series_vs_better_alone"] = round(row["series_seconds"]["auto"] / min(row["series_seconds"]["torch_alone"], onnx_alone), 3)
    row["matmul_gflops_per_second_after"] = round(matmul_gflops(), 1)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--size", type=int, default=1552, help="image side (1552: 4 x 4 tiles of 572 -> 388)")
    parser.add_argument("--tile-size", type=int, default=572)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs of torch and onnxruntime (median)")
    parser.add_argument("--jobs", type=int, default=4, help="auto: jobs in a row from an empty cache")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "backend_speed.json")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = [run_width(w, args.size, args.tile_size, args.rounds, args.jobs) for w in args.widths]
    import onnxruntime

    result = {
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpu": backends.cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__, "unetkit": unetkit.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
