"""3D U-Net throughput: GFLOP/s of forward passes and training steps against the same run's matmul.

Networks measured (width 16, batch norm, as the default recipe; `UNet.flops` counts 2 FLOPs per
multiply-add), each against the paper's 2D network shape at the recipe's width on a 572 x 572 tile:

- ``anisotropic``: the ISBI 2012 volume's network (`benchmarks/isbi_volume.py`: spacing 12.5, 1, 1,
  4 levels, (1, 2, 2) pooling, 3x3x3 kernels only at the bottom) on (12, 252, 252) tiles;
- ``isotropic``: 2x2x2 pooling and 3x3x3 kernels at every level (Cicek et al. 2016), 3 levels,
  on (52, 76, 76) tiles (the network of `benchmarks/nuclei_volume.py`).

Rounds interleave the measurements (matmul, 2D forward, 3D forwards, 3D training steps), so a
slower moment of a shared machine shows in all of them; each figure is the best of its rounds.

    python benchmarks/volume_speed.py --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from common import RESULTS, machine, write_json
from unetkit.backends import cpu_name
from unetkit.network import UNet
from unetkit.train import TrainConfig

NETWORKS = {
    "anisotropic": (dict(spacing=(12.5, 1.0, 1.0), depth=4), (12, 252, 252)),
    "isotropic": (dict(spacing=(1.0, 1.0, 1.0), depth=3), (52, 76, 76)),
}


def matmul_gflops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    started = time.perf_counter()
    a @ b
    return 2 * n**3 / (time.perf_counter() - started) / 1e9


def forward_seconds(model: UNet, shape: tuple[int, ...]) -> float:
    x = torch.randn(1, model.in_channels, *shape)
    with torch.no_grad():
        model(x)
        started = time.perf_counter()
        model(x)
    return time.perf_counter() - started


def train_step_seconds(model: UNet, shape: tuple[int, ...]) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(1, model.in_channels, *shape)
    out_shape = model.geometry.output_shape(shape) if model.dims == 3 else (model.geometry.output_size(shape[0]),) * 2
    target = torch.randint(0, 2, (1, *out_shape))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def run(rounds: int) -> dict:
    nets = {"2d": (TrainConfig(base_channels=16, batch_norm=True, dropout=0.0).network(1).eval(), (572, 572))}
    for name, (options, tile) in NETWORKS.items():
        config = TrainConfig(dims=3, base_channels=16, batch_norm=True, dropout=0.0, tile_size=tile[1], tile_depth=tile[0], **options)
        config.check_tiles()
        nets[name] = (config.network(1).eval(), tile)
    best: dict[str, float] = {}
    for _ in range(rounds):
        best["matmul_gflops"] = max(best.get("matmul_gflops", 0.0), matmul_gflops())
        for name, (model, tile) in nets.items():
            key = f"{name}_forward_seconds"
            best[key] = min(best.get(key, math.inf), forward_seconds(model, tile))
            if name != "2d":
                key = f"{name}_train_step_seconds"
                best[key] = min(best.get(key, math.inf), train_step_seconds(model.train(), tile))
                model.eval()
    matmul = best["matmul_gflops"]
    rows = {}
    for name, (model, tile) in nets.items():
        flops = model.flops(tile)
        out = model.geometry.output_shape(tile) if model.dims == 3 else (model.geometry.output_size(tile[0]),) * 2
        forward = flops / best[f"{name}_forward_seconds"] / 1e9
        row = {
            "tile": list(tile), "output": list(out), "gflop_per_forward": round(flops / 1e9, 2),
            "flop_per_output_voxel": round(flops / math.prod(out)),
            "forward_seconds": round(best[f"{name}_forward_seconds"], 4), "forward_gflops": round(forward, 1),
            "forward_share_of_matmul": round(forward / matmul, 3),
            "output_voxels_per_second": round(math.prod(out) / best[f"{name}_forward_seconds"]),
        }
        if name != "2d":
            step = 3 * flops / best[f"{name}_train_step_seconds"] / 1e9
            row.update({"train_step_seconds": round(best[f"{name}_train_step_seconds"], 4),
                        "train_gflops": round(step, 1), "train_share_of_matmul": round(step / matmul, 3),
                        "network": {k: v for k, v in model.config.items() if k in ("pool_kernels", "conv_kernels", "depth")}})
        rows[name] = row
    return {"matmul_gflops": round(matmul, 1), "networks": rows, "rounds": rounds}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"experiment": __doc__.split("\n\n")[0], **run(args.rounds), "machine": {**machine(), "cpu": cpu_name()}}
    write_json(RESULTS / "volume_speed.json", result)


if __name__ == "__main__":
    main()
