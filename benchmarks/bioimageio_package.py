"""The em-membranes bioimage.io package alone, run by bioimage.io's own runner, against unetkit.

Exports em-membranes twice as a bioimage.io package (the training batch-norm statistics, and
statistics averaged over ISBI 2012 slices 16-19, its validation slices: ``--statistics-from``),
runs each with bioimageio.core (ONNX weights, the package's own preprocessing, blocks of the whole
512 x 512 slice so that the percentiles are the slice's) on the held-out slices 20-24, and scores
the foreground probability by the pixel error at 0.5 (mean over the slices). unetkit itself
(`Segmenter`, no test-time augmentation, each image's own statistics as its rule says) is scored
on the same slices. Writes benchmarks/results/bioimageio_package.json; with ``--record`` also
stores the package scores in src/unetkit/models/models.json (``package_scores``), which the
package README quotes when the statistics match.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bioimageio_package.py --record
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from common import RESULTS, machine, write_json
from unetkit.data import data_root
from unetkit.export import export_bioimageio
from unetkit.export.bioimageio import PackageStatistics, statistics_files
from unetkit.inference import InferenceOptions, Segmenter
from unetkit.io import read_image
from unetkit.metrics import pixel_error
from unetkit.pretrained import file_sha256, get_model, model_path, record_package_scores

MODEL = "em-membranes"
RUNNER = "bioimageio.core with the ONNX weights and the package's preprocessing, each 512 x 512 slice in one block, blocksize_parameter=19"


def package_maps(package: Path, raws: list[np.ndarray]) -> list[np.ndarray]:
    from bioimageio import core

    pipeline = core.create_prediction_pipeline(core.load_description(package), weight_format="onnx", devices=["cpu"])
    maps = []
    for raw in raws:  # blocks of 208 + 19 * 16 = 512: the whole slice, so scale_range sees all of it
        sample = core.predict(model=pipeline, inputs={"input": raw[None, None]}, blocksize_parameter=19)
        maps.append(sample.members["probabilities"].data.to_numpy()[0][-1])
    return maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="store the package scores in models.json")
    args = parser.parse_args()

    info = get_model(MODEL)
    folder = data_root() / info.dataset / "train"
    representative = [folder / "images" / f"{i:02d}.png" for i in info.val_ids]
    test = [f"{i:02d}" for i in info.test_ids]
    raws = [read_image(folder / "images" / f"{name}.png").astype(np.float32) for name in test]
    truths = [read_image(folder / "labels" / f"{name}.png") > 127 for name in test]  # 255 = cell

    def score(maps: list[np.ndarray]) -> dict:
        errors = [pixel_error(m, t) for m, t in zip(maps, truths)]
        return {"pixel_error": float(np.mean(errors)), "pixel_error_per_slice": dict(zip(test, map(float, errors)))}

    arms = {}
    started = time.perf_counter()
    segmenter = Segmenter.load(MODEL, InferenceOptions(tta=False, backend="torch"))
    arms["unetkit"] = {"what": "unetkit predict --no-tta (each image's own batch-norm statistics, as the rule says)",
                       **score([segmenter.probabilities(segmenter.normalize(raw))[-1] for raw in raws])}
    with tempfile.TemporaryDirectory() as tmp:
        for arm, images in (("package_training_statistics", None), ("package_representative_statistics", representative)):
            package = Path(tmp) / arm
            export_bioimageio(MODEL, package, statistics_from=images, test=False)
            files = statistics_files(images)
            statistics = PackageStatistics(tuple(p.name for p in files), tuple(file_sha256(p) for p in files))
            arms[arm] = {"statistics": statistics.to_dict(), "describe": statistics.describe(),
                         **score(package_maps(package, raws))}
    result = {
        "model": MODEL, "scored_on": ", ".join(test), "threshold": 0.5, "runner": RUNNER,
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bioimageio_package.py --record",
        "arms": arms, "seconds": round(time.perf_counter() - started, 1), "machine": machine(),
    }
    write_json(RESULTS / "bioimageio_package.json", result)
    if args.record:
        weights = file_sha256(model_path(MODEL, installed=True))
        record_package_scores(MODEL, [
            {"statistics": arms[arm]["statistics"], "scores": {"pixel_error": arms[arm]["pixel_error"]},
             "scored_on": ", ".join(test), "runner": RUNNER, "weights_sha256": weights,
             "unetkit_scores": {"pixel_error": arms["unetkit"]["pixel_error"]},
             "measured_by": "benchmarks/bioimageio_package.py"}
            for arm in ("package_training_statistics", "package_representative_statistics")
        ])


if __name__ == "__main__":
    main()
