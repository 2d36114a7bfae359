"""End-to-end speed of `unetkit.predict` with each backend (torch, onnxruntime, auto), side by side.

For each network width, one image is segmented with 572x572 tiles by every backend in the same
process, next to the fp32 matrix-multiply speed measured just before it (so a busy machine shows
as a lower matmul figure in the same row). Reported per width:

* torch and onnxruntime: seconds and effective GFLOP/s (analytic FLOPs of the tiles run) of a
  whole `predict` call; onnxruntime's graph export and session set-up are timed separately
  (they happen once per checkpoint; the graph is cached).
* auto, cold: an empty cache, so the call exports the graph (if the job is long enough to repay it),
  times both backends on its own tiles and remembers the choice; auto, warm: the next call,
  which uses the remembered choice. Each with its choice.
* the largest difference between the backends' probabilities.

auto_warm_vs_faster compares auto's warm time with the faster backend's; auto_cold_vs_faster_first_use
compares its cold time with the faster of torch and onnxruntime including the export.

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


def run_width(width: int, size: int, tile: int, seed: int = 0) -> dict:
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

    with tempfile.TemporaryDirectory() as cache:
        os.environ["UNETKIT_CACHE_DIR"] = cache
        row["matmul_gflops_per_second"] = round(matmul_gflops(), 1)
        seconds, reference = timed("torch")
        row["torch"] = {"seconds": round(seconds, 2), "gflops_per_second": round(flops / seconds / 1e9, 1)}
        row["onnx_export_seconds"] = round(_seconds(lambda: backends.cached_graph(model)), 2)
        row["onnx_session_seconds"] = round(_seconds(lambda: backends._session(model)), 2)
        seconds, onnx_out = timed("onnxruntime")
        row["onnxruntime"] = {"seconds": round(seconds, 2), "gflops_per_second": round(flops / seconds / 1e9, 1)}
        first_use = seconds + row["onnx_export_seconds"] + row["onnx_session_seconds"]
        row["onnxruntime_first_use_seconds"] = round(first_use, 2)  # with the one-off export
        row["max_abs_difference"] = float(np.abs(onnx_out - reference).max())
    for label in ("auto_cold", "auto_warm"):
        if label == "auto_cold":
            cache_dir = tempfile.mkdtemp()
            os.environ["UNETKIT_CACHE_DIR"] = cache_dir
            backends._SESSIONS.clear()
        seconds, _ = timed("auto")
        choice = backends.read_choices()
        chosen = next(iter(choice.values()))["backend"] if choice else "torch (job too short to measure)"
        row[label] = {"seconds": round(seconds, 2), "gflops_per_second": round(flops / seconds / 1e9, 1),
                      "choice": chosen, "measured_seconds_per_call": next(iter(choice.values()))["seconds_per_call"] if choice else None}
    row["matmul_gflops_per_second_after"] = round(matmul_gflops(), 1)
    faster = min(row["torch"]["seconds"], row["onnxruntime"]["seconds"])
    row["auto_warm_vs_faster"] = round(row["auto_warm"]["seconds"] / faster, 3)
    faster_first = min(row["torch"]["seconds"], row["onnxruntime_first_use_seconds"])
    row["auto_cold_vs_faster_first_use"] = round(row["auto_cold"]["seconds"] / faster_first, 3)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--size", type=int, default=1552, help="image side (1552: 4 x 4 tiles of 572 -> 388)")
    parser.add_argument("--tile-size", type=int, default=572)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "backend_speed.json")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = [run_width(w, args.size, args.tile_size) for w in args.widths]
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
