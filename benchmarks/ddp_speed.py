"""Data-parallel training on one CPU machine: 2 processes x 1 thread against 1 process x 2 threads
(and 1 process x 1 thread for reference).

    python benchmarks/ddp_speed.py                       # ISBI 2012, default recipe, 3 runs of each arm
    python benchmarks/ddp_speed.py --iterations 10 --repeats 1

Both arms run `unetkit train` as a user would, on the same data with the same global batch
(`--batch-size 2`): `unetkit train --nproc 2` (OMP_NUM_THREADS=1, one tile per process) and
`unetkit train` with OMP_NUM_THREADS=2 (and =1). The arms alternate, in reversed order every
other round, so that other load on the machine falls on all of them; the figures are medians over the runs. Steps/s are taken from RUN/log.csv
between the end of the first step and the end of the last (start-up, the first step and the
final checkpoint left out). Writes benchmarks/results/ddp_speed.json and ddp_speed_loss.png.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine, write_json
from unetkit.data import data_root

ARMS = {"ddp_2x1": {"nproc": 2, "threads": 1}, "single_1x2": {"nproc": 1, "threads": 2},
        "single_1x1": {"nproc": 1, "threads": 1}}  # the last: one core's worth, for reference

LOAD_NOTE = (
    " On a machine that other jobs load (load_average_before above the core count), two processes get a"
    " larger share of the CPU from the scheduler than one, and a process with 2 OpenMP threads loses much"
    " of its time to threads waiting for each other: the speed-ups then measure the shared machine, not an"
    " idle one."
)


def run_arm(arm: str, args: argparse.Namespace, run_dir: Path) -> dict:
    spec = ARMS[arm]
    command = [
        sys.executable, "-m", "unetkit", "train", "--data", str(args.data), "--out", str(run_dir),
        "--iterations", str(args.iterations), "--batch-size", "2", "--tile-size", str(args.tile_size),
        "--width", str(args.width), "--workers", "0", "--val", "0", "--checkpoint-every", str(args.iterations),
        "--seed", str(args.seed), "--no-progress",
    ]
    if spec["nproc"] > 1:
        command += ["--nproc", str(spec["nproc"])]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    rows = list(csv.DictReader(open(run_dir / "log.csv")))
    seconds = [float(r["seconds"]) for r in rows]
    steady = (len(rows) - 1) / (seconds[-1] - seconds[0])
    return {"arm": arm, "steps_per_second": steady, "process_wall_seconds": wall,
            "losses": [float(r["loss"]) for r in rows]}


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for arm, color in zip(ARMS, ("tab:blue", "tab:orange", "tab:green")):
        for k, run in enumerate(r for r in result["runs"] if r["arm"] == arm):
            ax.plot(range(1, len(run["losses"]) + 1), run["losses"], color=color, alpha=0.8,
                    label=arm if k == 0 else None)
    ax.set_xlabel("iteration (global batch of 2 tiles)")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=data_root() / "isbi2012" / "train")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile-size", type=int, default=572)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    runs = []
    work = Path(tempfile.mkdtemp(prefix="ddp_speed_"))
    try:
        for repeat in range(args.repeats):
            for arm in (ARMS if repeat % 2 == 0 else reversed(list(ARMS))):
                load = load_average()
                run = run_arm(arm, args, work / f"{arm}_{repeat}")
                run.update(repeat=repeat, load_average_before=load)
                runs.append(run)
                print(f"{arm} run {repeat}: {run['steps_per_second']:.3f} steps/s (load {load})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {}
    for arm in ARMS:
        rates = [r["steps_per_second"] for r in runs if r["arm"] == arm]
        curves = [r["losses"] for r in runs if r["arm"] == arm]
        summary[arm] = {
            "median_steps_per_second": statistics.median(rates), "steps_per_second": rates,
            "median_loss_curve": [statistics.median(step) for step in zip(*curves)],
        }
    ddp, single = summary["ddp_2x1"], summary["single_1x2"]
    gaps = [abs(a - b) for a, b in zip(ddp["median_loss_curve"], summary["single_1x1"]["median_loss_curve"])]
    result = {
        "setup": {"data": str(args.data), "iterations": args.iterations, "repeats": args.repeats,
                  "tile_size": args.tile_size, "width": args.width, "global_batch": 2, "recipe": "default",
                  "workers": 0, "cpu_cores": os.cpu_count()},
        "speedup_ddp_over_single_1x2": ddp["median_steps_per_second"] / single["median_steps_per_second"],
        "speedup_ddp_over_single_1x1": ddp["median_steps_per_second"] / summary["single_1x1"]["median_steps_per_second"],
        "largest_loss_gap_ddp_vs_single_1x1": max(gaps),
        "arms": summary,
        "runs": runs,
        "machine": machine(),
        "note": ("Both arms see the same tiles in the same order (global batch 2). With the default recipe's batch "
                 "norm, the DDP arm normalises each tile on its own (one per process) and the single process "
                 "normalises over both, so the loss curves agree closely but not exactly; with batch norm off they "
                 "agree to rounding (tests/test_ddp.py). Other jobs shared the 2 cores: see load_average_before."
                 + LOAD_NOTE),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(result, RESULTS / "ddp_speed_loss.png")
    write_json(RESULTS / "ddp_speed.json", result)


if __name__ == "__main__":
    main()
