"""Speed of overlap-tile prediction with the paper's full-width network on this machine.

Writes JSON with: seconds for a SIZE x SIZE image, output megapixels/s, effective GFLOP/s (analytic
FLOPs of the tiles actually run), the chosen tile size, peak RSS, and the raw forward time of one
tile of the same size measured in the same run, so the tiling overhead (padding, copying,
stitching) is visible. With --rss-size N, a separate process also predicts an N x N image and
reports its peak RSS.

    python benchmarks/predict_speed.py --size 2048 --out benchmarks/results/predict_speed.json
    python benchmarks/predict_speed.py --size 2048 --rss-size 8192
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import unetkit
from unetkit.predict import choose_tile_shape, predict_plan


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def raw_forward_seconds(model: unetkit.UNet, tile: tuple[int, int], repeats: int = 2) -> float:
    """Best time of a bare forward pass (channels_last, inference mode) over one tile."""
    x = torch.randn(1, 1, *tile).contiguous(memory_format=torch.channels_last)
    model.eval().to(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        model(x)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - started)
    model.to(memory_format=torch.contiguous_format)
    return min(times)


def run(size: int, tile_size: int | None, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = unetkit.UNet().eval()
    image = np.random.default_rng(seed).random((size, size), dtype=np.float32)
    tile = (tile_size, tile_size) if tile_size else choose_tile_shape(model, image.shape)
    plan = predict_plan(model, image.shape, tile)
    flops = len(plan) * model.flops(tile)
    started = time.perf_counter()
    unetkit.predict(model, image, tile_size=tile, progress=True)
    seconds = time.perf_counter() - started
    return {
        "image_size": size,
        "tile_shape": list(tile),
        "output_tile_shape": list(plan.output_shape),
        "tiles": len(plan),
        "seconds": round(seconds, 2),
        "output_megapixels_per_second": round(size * size / seconds / 1e6, 4),
        "effective_gflops_per_second": round(flops / seconds / 1e9, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "_model": model,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile-size", type=int, default=None)
    parser.add_argument("--rss-size", type=int, default=None, help="also measure peak RSS for this image size (own process)")
    parser.add_argument("--rss-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "predict_speed.json")
    args = parser.parse_args()
    result = run(args.size, args.tile_size)
    model = result.pop("_model")
    if args.rss_only:
        print(json.dumps(result))
        return
    raw = raw_forward_seconds(model, tuple(result["tile_shape"]))
    result["raw_forward_seconds_per_tile"] = round(raw, 3)
    result["raw_forward_gflops_per_second"] = round(model.flops(tuple(result["tile_shape"])) / raw / 1e9, 1)
    result["tiling_overhead_fraction"] = round(1 - result["tiles"] * raw / result["seconds"], 4)
    if args.rss_size:
        child = subprocess.run(
            [sys.executable, __file__, "--size", str(args.rss_size), "--rss-only"],
            check=True, capture_output=True, text=True,
        )
        result["large_image"] = json.loads(child.stdout.strip().splitlines()[-1])
    result["machine"] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
