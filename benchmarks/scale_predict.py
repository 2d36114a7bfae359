"""Out-of-core and Dask prediction on a 32768x32768 image: peak memory, throughput, distribution overhead.

Synthesises the image lazily (a pattern written chunk by chunk, never whole in memory) as zarr and as
tiled BigTIFF under --data (default /tmp/unetkit-scale, outside the repository), makes a width-16
paper-depth network (random weights: speed and memory do not depend on them), then times
`unetkit predict` as a subprocess, sampling the resident memory of it and all its children.

Arms (each runs the same command line the user runs; --rows limits it to a stripe when the whole
image cannot finish in the time at hand):
  zarr      single process, 2 threads, zarr in/out, peak RSS and throughput
  bigtiff   the same on the BigTIFF copy
  compare   single process x 2 threads vs --dask local:2 (2 worker processes x 1 thread),
            interleaved --repeats times (arms alternate order), medians; plus local:1 and 1 thread

    python benchmarks/scale_predict.py --rows 1476 --compare-rows 384 --repeats 2

Writes benchmarks/results/scale_predict.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 32768
CHUNK = 1024


def pattern(y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Cell-like blobs on a gradient with noise, deterministic per position."""
    y, x = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
    blobs = np.sin(y / 23.0) * np.cos(x / 29.0) + 0.5 * np.sin((x + y) / 71.0)
    noise = np.random.default_rng(y0 * 7919 + x0).normal(0, 0.15, (h, w)).astype(np.float32)
    return np.clip(120 + 60 * blobs + 40 * noise + 20 * (x / SIZE), 0, 255).astype(np.uint8)


def make_data(folder: Path) -> tuple[Path, Path, Path]:
    import tifffile
    import torch
    import zarr

    from unetkit import UNet
    from unetkit.checkpoint import save_checkpoint
    from unetkit.data.normalize import Normalization

    folder.mkdir(parents=True, exist_ok=True)
    image, tiff, ckpt = folder / "image.zarr", folder / "image.tif", folder / "w16.pt"
    if not (image / "zarr.json").exists() or not (folder / "image.done").exists():
        array = zarr.create_array(store=str(image), shape=(SIZE, SIZE), chunks=(CHUNK, CHUNK), dtype="uint8", overwrite=True)
        for y in range(0, SIZE, CHUNK):
            array[y : y + CHUNK] = np.concatenate([pattern(y, x, CHUNK, CHUNK) for x in range(0, SIZE, CHUNK)], axis=1)
        (folder / "image.done").write_text("ok")
    if not tiff.exists():
        source = zarr.open_array(str(image), mode="r")

        def tiles():
            for y in range(0, SIZE, 512):
                stripe = source[y : y + 512]
                for x in range(0, SIZE, 512):
                    yield stripe[:, x : x + 512]

        tmp = tiff.with_suffix(".tmp.tif")
        tifffile.imwrite(tmp, tiles(), shape=(SIZE, SIZE), dtype=np.uint8, tile=(512, 512), bigtiff=True, compression="zlib")
        os.replace(tmp, tiff)
    if not ckpt.exists():
        torch.manual_seed(0)
        save_checkpoint(ckpt, UNet(depth=5, base_channels=16), normalization=Normalization(), class_names=["background", "cell"])
    return image, tiff, ckpt


def tree_rss(pid: int) -> tuple[int, int]:
    """(RSS of the process, summed RSS of it and all its descendants) in bytes."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    total = 0
    own = 0
    for p in procs:
        try:
            rss = p.memory_info().rss
        except psutil.Error:
            continue
        total += rss
        own = rss if p.pid == pid else own
    return own, total


def run_cli(args: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "unetkit", "predict", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0, 0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            own, total = tree_rss(proc.pid)
            peak[0], peak[1] = max(peak[0], own), max(peak[1], total)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    stop.set()
    sampler.join()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"unetkit predict {' '.join(args)} failed:\n{output[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_main_mb": round(peak[0] / 2**20, 1),
            "peak_rss_all_processes_mb": round(peak[1] / 2**20, 1)}


def arm(name: str, source: Path, ckpt: Path, out: Path, rows: int, threads: int, extra: list[str], tile: int | None = None) -> dict:
    target = out / name
    if target.exists():
        shutil.rmtree(target)
    tile_option = ["--tile-size", str(tile)] if tile else []  # none: the tile unetkit chooses for a large image
    args = [str(source), "--model", str(ckpt), "--out", str(target), "--rows", str(rows), *tile_option,
            "--no-progress", "--force", *extra]
    result = run_cli(args, threads)
    pixels = rows * SIZE
    result.update(arm=name, rows=rows, pixels=pixels, megapixels_per_second=round(pixels / result["seconds"] / 1e6, 4),
                  command="unetkit predict " + " ".join(args), threads=threads)
    probabilities = target / "image_probabilities.zarr"
    if probabilities.exists():
        import zarr

        result["tile_shape"] = zarr.open_array(str(probabilities), mode="r").attrs["unetkit"]["tile_shape"]
    shutil.rmtree(target, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


LABELS_CODE = """
import sys, time, numpy as np, zarr
from unetkit.blocklabels import label_blockwise
folder, rows, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
probs = zarr.create_array(store=folder + '/blobs.zarr', shape=(rows, size), chunks=(1024, 1024), dtype='float32', overwrite=True)
for y in range(0, rows, 1024):
    yy, xx = np.mgrid[y:min(y + 1024, rows), 0:size].astype(np.float32)
    probs[y:y + 1024] = (np.sin(yy / 23.0) * np.cos(xx / 29.0) + 0.5 * np.sin((xx + yy) / 71.0) + 1.5) / 3.0
out = zarr.create_array(store=folder + '/labels.zarr', shape=(rows, size), chunks=(2048, 2048), dtype='uint32', overwrite=True)
scratch = lambda shape: zarr.create_array(store=folder + '/scratch.zarr', shape=shape, chunks=(2048, 2048), dtype='int64', overwrite=True)
start = time.perf_counter()
n = label_blockwise(probs, out, threshold=0.7, block=2048, scratch=scratch)
print(n, time.perf_counter() - start)
"""


def labels_arm(folder: Path, rows: int) -> dict:
    """Instance labels (`unetkit.blocklabels`) of a smooth blob map read from zarr: time and peak RSS."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    work = folder / "labels"
    work.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", LABELS_CODE, str(work), str(rows), str(SIZE)], env=env,
                            stdout=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid)[1])
        time.sleep(0.1)
    objects, seconds = proc.stdout.read().split()
    shutil.rmtree(work)
    result = {"rows": rows, "pixels": rows * SIZE, "objects": int(objects), "seconds": round(float(seconds), 2),
              "megapixels_per_second": round(rows * SIZE / float(seconds) / 1e6, 2), "peak_rss_mb": round(peak / 2**20, 1),
              "block": 2048, "note": "includes writing the blob map; labelling time excludes it"}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/tmp/unetkit-scale"))
    parser.add_argument("--rows", type=int, default=2048, help="stripe height of the zarr and BigTIFF runs")
    parser.add_argument("--compare-rows", type=int, default=384, help="stripe height of the single vs Dask runs")
    parser.add_argument("--compare-tile", type=int, default=572, help="tile size of the single vs Dask runs (the paper's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arms", default="zarr,bigtiff,labels,compare,curve")
    args = parser.parse_args()
    from unetkit.backends import cpu_name

    arms = args.arms.split(",")
    t0 = time.perf_counter()
    image, tiff, ckpt = make_data(args.data)
    print(f"data ready in {time.perf_counter() - t0:.0f} s", flush=True)
    out = args.data / "out"
    result: dict = {"image": [SIZE, SIZE], "dtype": "uint8", "chunks": [CHUNK, CHUNK], "network": "UNet(depth=5, base_channels=16)",
                    "machine": {"processor": platform.processor() or platform.machine(),
                                                    "cpu": cpu_name(), "cores": os.cpu_count()},
                    "note": "the 2 cores are shared with other jobs: timings are noisy; arms are interleaved and medians reported"}
    path = RESULTS / "scale_predict.json"
    if path.exists():
        result = {**json.loads(path.read_text()), **{k: v for k, v in result.items()}}

    def save() -> None:
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")

    # The random network's output is noise (about one object per 15 pixels), which would make the
    # instance labels, whose memory grows with the number of objects, the whole measurement; the
    # prediction arms write binary labels and the "labels" arm times instance labels on blobs.
    if "zarr" in arms:
        result["zarr"] = arm("zarr", image, ckpt, out, args.rows, 2, ["--labels", "binary"])
        save()
    if "bigtiff" in arms:
        result["bigtiff"] = arm("bigtiff", tiff, ckpt, out, args.rows, 2, ["--out-format", "zarr", "--labels", "binary"])
        save()
    if "labels" in arms:
        result["instance_labels"] = labels_arm(args.data, args.rows)
        save()
    if "compare" in arms:
        runs: dict[str, list[dict]] = {"single_2_threads": [], "dask_2_workers_x_1_thread": []}
        for repeat in range(args.repeats):
            order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
            for name in order:
                extra = ["--dask", "local:2", "--block-size", str(4 * (args.compare_tile - 188))] if name.startswith("dask") else []
                runs[name].append(arm(name, image, ckpt, out, args.compare_rows, 2 if name.startswith("single") else 1, extra,
                                      tile=args.compare_tile))
        med = {k: statistics.median(r["megapixels_per_second"] for r in v) for k, v in runs.items()}
        result["compare"] = {"runs": runs, "median_megapixels_per_second": med,
                             "dask_over_single_throughput": round(med["dask_2_workers_x_1_thread"] / med["single_2_threads"], 3)}
        save()
    if "curve" in arms:
        curve = {}
        block = ["--block-size", str(4 * (args.compare_tile - 188))]
        for name, threads, extra in [("single_1_thread", 1, []), ("dask_1_worker_x_1_thread", 1, ["--dask", "local:1", *block])]:
            curve[name] = arm(name, image, ckpt, out, args.compare_rows, threads, extra, tile=args.compare_tile)["megapixels_per_second"]
        if "compare" in result:
            curve.update(result["compare"]["median_megapixels_per_second"])
        result["scaling_curve_megapixels_per_second"] = curve
        save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
