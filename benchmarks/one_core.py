"""One model, one result on every path: the packaged models on large images, onnxruntime and bioimage.io.

Arms (each writes its part of benchmarks/results/one_core.json; run them one at a time):

  mosaic    em-membranes with its full stored rule (seeded watershed, 8-fold TTA, each image's
            batch-norm statistics) on a 4096x4096 OME-Zarr tiled from ISBI 2012 slices, through
            the large-image path; and on its top-left 2048x2048 crop both as a TIFF (the in-memory
            path) and as OME-Zarr. Reports the objects and how far the labels of each pair agree.
  rss       the same rule (without TTA, which changes the time, not the memory) on a 16384x16384
            OME-Zarr mosaic: peak resident memory of `unetkit predict` and everything it starts.
  backends  `unetkit predict --backend torch|onnxruntime|auto` for the three packaged models on one
            held-out image each: seconds per image, and which backend `auto` picked.

The exported bioimage.io package is measured by benchmarks/bioimageio_package.py.

    python benchmarks/one_core.py mosaic
    python benchmarks/one_core.py rss --size 16384

Data: ISBI 2012 from ../shared/data (or UNETKIT_DATA); mosaics and outputs go to --work
(default /tmp/unetkit-one-core), never into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_predict import run_cli  # noqa: E402 - the RSS-sampling runner of the scaling benchmark

RESULTS = Path(__file__).resolve().parent / "results" / "one_core.json"
SLICE = 512


def isbi_slices() -> list[np.ndarray]:
    from unetkit.data.datasets import data_root
    from unetkit.io import read_image

    folder = data_root() / "isbi2012" / "train" / "images"
    return [read_image(folder / f"{k:02d}.png") for k in range(25)]


def write_mosaic(path: Path, size: int) -> Path:
    """An OME-Zarr (NGFF 0.4 via ome-zarr) of `size` x `size` tiled from the 25 ISBI slices in order,
    written slice by slice (never whole in memory)."""
    import zarr

    if (path / ".done").exists():
        return path
    if path.exists():
        shutil.rmtree(path)
    slices = isbi_slices()
    group = zarr.open_group(str(path), mode="w")
    array = group.create_array("0", shape=(size, size), chunks=(1024, 1024), dtype="uint8", fill_value=0,
                               dimension_names=["y", "x"])
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "name": "isbi-mosaic", "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0]}]}]}]}
    n = size // SLICE
    for row in range(n):
        stripe = np.concatenate([slices[(row * n + col) % len(slices)] for col in range(n)], axis=1)
        array[row * SLICE : (row + 1) * SLICE] = stripe
    (path / ".done").write_text("")
    return path


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    from unetkit.blocklabels import compare_labels

    same = bool(np.array_equal(a, b))
    objects = [int(np.count_nonzero(np.unique(x))) for x in (a, b)]
    return {"identical": same, "objects": objects, **compare_labels(a, b)}


def labels_of(out: Path, name: str) -> np.ndarray:
    import tifffile
    import zarr

    zarr_path = out / f"{name}_labels.ome.zarr"
    if zarr_path.exists():
        return np.asarray(zarr.open_group(str(zarr_path), mode="r")["0"][:])
    return tifffile.imread(out / f"{name}_labels.tif")


def mosaic_arm(work: Path, threads: int) -> dict:
    import zarr

    from unetkit.io import write_tiff

    mosaic = write_mosaic(work / "mosaic4096.ome.zarr", 4096)
    crop = np.asarray(zarr.open_group(str(mosaic), mode="r")["0"][:2048, :2048])
    crop_tif = write_tiff(work / "crop" / "crop2048.tif", crop, force=True)
    crop_zarr = work / "crop2048.zarr"
    if not crop_zarr.exists():
        zarr.create_array(store=str(crop_zarr), data=crop, chunks=(512, 512))
    runs = {}
    for key, source, extra in (("crop_tiff", crop_tif, []), ("crop_zarr", crop_zarr, []),
                               ("mosaic_zarr", mosaic, ["--out-format", "zarr"])):
        out = work / f"out-{key}"
        runs[key] = run_cli([str(source), "--model", "em-membranes", "--out", str(out), "--force", "--no-progress", *extra], threads)
        print(key, runs[key], flush=True)
    tiff_labels = labels_of(work / "out-crop_tiff", "crop2048")
    zarr_labels = labels_of(work / "out-crop_zarr", "crop2048")
    mosaic_labels = labels_of(work / "out-mosaic_zarr", "mosaic4096")[:2048, :2048]
    return {
        "runs": runs,
        "crop_tiff_vs_crop_zarr": agreement(tiff_labels, zarr_labels),
        "crop_tiff_vs_mosaic_top_left": agreement(tiff_labels, mosaic_labels),
        "note": "the crop as TIFF and as OME-Zarr is one image on two paths; the 4096 mosaic is another image "
                "(its batch-norm statistics, tile plan and border context differ), so its top-left quarter is compared "
                "as agreement, not identity",
    }


def rss_arm(work: Path, size: int, threads: int) -> dict:
    mosaic = write_mosaic(work / f"mosaic{size}.ome.zarr", size)
    out = work / f"out-rss{size}"
    run = run_cli([str(mosaic), "--model", "em-membranes", "--out", str(out), "--force", "--no-tta", "--no-progress"], threads)
    labels = out / f"mosaic{size}_labels.ome.zarr"
    return {"size": size, "rule": "seeded watershed, each image's batch-norm statistics, no TTA", **run,
            "labels_written": labels.exists()}


def backends_arm(work: Path, threads: int, repeats: int = 2) -> dict:
    """Each packaged model with its stored rule on a 1024x1024 image (a held-out image tiled 2x2):
    torch and onnxruntime interleaved `repeats` times (seconds per image, in this process), then
    `auto` three times from an empty cache, and the backend it settled on."""
    import tempfile

    import torch

    from unetkit import backends, pretrained
    from unetkit.data.datasets import data_root
    from unetkit.inference import InferenceOptions, Segmenter
    from unetkit.io import read_image

    torch.set_num_threads(threads)
    images = {"em-membranes": "isbi2012/train/images/20.png", "dic-hela": "ctc-dic-c2dh-hela/images/t050.tif",
              "fluo-nuclei": "ctc-fluo-n2dh-gowt1/images/t01.tif"}
    result = {}
    for name, relative in images.items():
        source = data_root() / relative
        if not source.exists() or not pretrained.get_model(name).installed:
            continue
        raw = np.tile(read_image(source)[:512, :512], (2, 2))
        cache = Path(tempfile.mkdtemp(prefix="unetkit-cache-", dir=work))
        os.environ["UNETKIT_CACHE_DIR"] = str(cache)
        seconds: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        for _ in range(repeats):
            for backend in seconds:
                segmenter = Segmenter.load(name, InferenceOptions(backend=backend, device="cpu"))
                started = time.perf_counter()
                segmenter.segment(raw)
                seconds[backend].append(round(time.perf_counter() - started, 2))
        for path in cache.glob("*.json"):  # the timed runs leave no choice behind for auto
            path.unlink()
        auto = []
        for _ in range(3):
            segmenter = Segmenter.load(name, InferenceOptions(backend="auto", device="cpu"))
            started = time.perf_counter()
            segmenter.segment(raw)
            auto.append(round(time.perf_counter() - started, 2))
        chosen = [v.get("backend") for v in backends.read_choices().values() if v.get("backend")]
        result[name] = {"seconds": seconds, "auto_seconds": auto, "auto_chose": chosen,
                        "settings": segmenter.settings.describe()}
        print(name, result[name], flush=True)
        shutil.rmtree(cache, ignore_errors=True)
    os.environ.pop("UNETKIT_CACHE_DIR", None)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arm", choices=("mosaic", "rss", "backends"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/unetkit-one-core"))
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.arm == "mosaic":
        result = mosaic_arm(args.work, args.threads)
    elif args.arm == "rss":
        result = rss_arm(args.work, args.size, args.threads)
    else:
        result = backends_arm(args.work, args.threads)
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "cpu_name": _cpu_name(), "threads": args.threads}
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.arm] = result
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
