"""One model, one result on every path: files, zarr (blockwise, small blocks), Dask, napari and
onnxruntime give what `unetkit predict` gives on the same real image, for the packaged models
whose labels rule uses TTA, each image's batch-norm statistics and a seeded watershed.

The images are crops of a real ISBI 2012 slice and a real DIC-HeLa frame, tiled with several
tiles so the tile plan, the statistics and the labels all cross tile and block borders.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from unetkit import pretrained
from unetkit.data.datasets import data_root
from unetkit.inference import InferenceOptions, Segmenter
from unetkit.io import read_image, write_tiff

pytestmark = pytest.mark.data

#: (packaged model, image inside its dataset folder, crop): a held-out image of each model.
CASES = {
    "em-membranes": ("train/images/20.png", (slice(0, 232), slice(40, 340))),
    "dic-hela": ("images/t050.tif", (slice(120, 392), slice(100, 372))),
}
#: A legal tile of the packaged models (depth 5: 188 + 16k) that needs 2 x 3 tiles on the crops.
TILE = 316
#: Probabilities of two paths agree to float rounding (tiles run in other batches and backends).
ATOL = 1e-4


def raw_crop(name: str) -> np.ndarray:
    info = pretrained.get_model(name)
    if not info.installed:
        pytest.skip(f"{name} is not installed")
    relative, window = CASES[name]
    path = data_root() / info.dataset / relative
    if not path.is_file():
        pytest.skip(f"{path} not found (set UNETKIT_DATA)")
    return np.ascontiguousarray(read_image(path)[window])


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(model name, raw crop, the crop as a TIFF, the reference result of `unetkit predict` on it)."""
    from unetkit.cli import main

    name = request.param
    raw = raw_crop(name)
    folder = tmp_path_factory.mktemp(name)
    source = write_tiff(folder / "in" / "crop.tif", raw)
    out = folder / "files"
    assert main(["predict", str(source), "--model", name, "--out", str(out), "--tile-size", str(TILE), "--backend", "torch",
                 "--no-progress"]) == 0
    reference = (tifffile.imread(out / "crop_probabilities.tif"), tifffile.imread(out / "crop_labels.tif"))
    assert int(reference[1].max()) > 1  # the real rule draws many objects, not one
    return name, raw, folder, reference


def assert_same(result: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray], path: str) -> None:
    probabilities, labels = result
    assert probabilities.shape == reference[0].shape
    difference = float(np.abs(np.asarray(probabilities, np.float32) - reference[0]).max())
    assert difference <= ATOL, f"{path}: probabilities differ by {difference:.2e}"
    np.testing.assert_array_equal(np.asarray(labels, np.int64), reference[1].astype(np.int64), err_msg=path)


def test_the_stored_rule_is_the_full_one(case):
    name = case[0]
    settings = Segmenter.load(name).settings
    assert settings.rule.method == "seeded" and settings.maps.tta and settings.maps.norm_statistics == "image"


def test_napari_gives_what_predict_gives(case):
    from unetkit.napari._segment import load_model, segment_image

    name, raw, _, reference = case
    result = segment_image(load_model(name), raw, source=name, tile_size=TILE, backend="torch", device="cpu")
    assert_same((result.probabilities, result.labels), reference, "napari")


def test_onnxruntime_gives_what_predict_gives(case):
    pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs the [export] extra")
    name, raw, _, reference = case
    result = Segmenter.load(name, InferenceOptions(tile_size=TILE, backend="onnxruntime", device="cpu")).segment(raw)
    assert_same((result.probabilities, result.labels), reference, "onnxruntime")


@pytest.mark.parametrize("dask", [None, "local:2"])
def test_zarr_blockwise_gives_what_predict_gives(case, dask, monkeypatch):
    """Zarr in and out, labels drawn in blocks of 64 pixels (so objects cross block borders), with
    each image's statistics gathered over the whole image first; with and without Dask."""
    zarr = pytest.importorskip("zarr", reason="the large-image path needs the [scale] extra")
    if dask:
        pytest.importorskip("distributed", reason="--dask needs the [scale] extra")
    import unetkit.bigsegment as bigsegment

    name, raw, folder, reference = case
    monkeypatch.setattr(bigsegment, "LABEL_BLOCK", 64)
    source = folder / f"crop-{bool(dask)}.zarr"
    if not source.exists():
        zarr.create_array(store=str(source), data=raw, chunks=(64, 64))
    out = folder / f"zarr-{bool(dask)}"
    segmenter = Segmenter.load(name, InferenceOptions(tile_size=TILE, backend="torch", device="cpu"))
    bigsegment.segment_large([source], segmenter, out, dask=dask, block_size=TILE if dask else None)
    probabilities = zarr.open_array(str(out / f"crop-{bool(dask)}_probabilities.zarr"), mode="r")[:]
    labels = zarr.open_group(str(out / f"crop-{bool(dask)}_labels.ome.zarr"), mode="r")["0"][:]
    assert_same((probabilities, labels), reference, f"zarr (dask {dask})")
