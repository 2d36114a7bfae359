import json

import numpy as np
import pytest
import tifffile
import torch

zarr = pytest.importorskip("zarr")

from unetkit import InputError, UNet, predict  # noqa: E402
from unetkit.bigimage import PROGRESS_FILE, Progress, fit_normalization, open_lazy  # noqa: E402
from unetkit.checkpoint import save_checkpoint  # noqa: E402
from unetkit.cli import main  # noqa: E402
from unetkit.data.normalize import Normalization  # noqa: E402
from unetkit.postprocess import probabilities_to_instances  # noqa: E402

SHAPE = (141, 187)
TILE = ["--tile-size", "60", "--no-progress"]


def tiny_net() -> UNet:
    torch.manual_seed(4)
    return UNet(depth=2, base_channels=4)


@pytest.fixture(scope="module")
def raw():
    y, x = np.mgrid[: SHAPE[0], : SHAPE[1]]
    pattern = 128 + 60 * np.sin(y / 6.0) * np.cos(x / 9.0) + np.random.default_rng(1).normal(0, 20, SHAPE)
    return np.clip(pattern, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, tiny_net(), normalization=Normalization(), class_names=["background", "cell"])
    return path


@pytest.fixture(scope="module")
def expected(raw):
    return predict(tiny_net(), Normalization()(raw), tile_size=60)


def write_ome(path, array, version):
    if version == "0.5":
        write_image = pytest.importorskip("ome_zarr.writer").write_image

        write_image(array, zarr.open_group(str(path), mode="w"), axes="yx", scale_factors=[2])
    else:  # NGFF 0.4: zarr format 2, metadata at the top level of the attributes
        group = zarr.open_group(str(path), mode="w", zarr_format=2)
        group.create_array("0", data=array, chunks=(64, 64))
        group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                                       "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1]}]}]}]
    return path


def test_predict_writes_into_any_array_and_resumes_from_a_subset_of_tiles(tmp_path, raw, expected):
    image = Normalization()(raw)
    memmap = np.lib.format.open_memmap(tmp_path / "p.npy", mode="w+", dtype=np.float32, shape=(2, *SHAPE))
    assert predict(tiny_net(), image, tile_size=60, out=memmap) is memmap
    np.testing.assert_array_equal(memmap, expected)
    store = zarr.create_array(store=str(tmp_path / "p.zarr"), shape=(2, *SHAPE), chunks=(2, 48, 48), dtype="float32")
    seen = []
    predict(tiny_net(), image, tile_size=60, out=store, tiles=[0, 3, 5], on_batch=seen.extend, batch_size=2)
    assert seen == [0, 3, 5] and store[:, -1, -1].tolist() == [0.0, 0.0]
    predict(tiny_net(), image, tile_size=60, out=store, tiles=[i for i in range(20) if i not in seen])
    np.testing.assert_allclose(store[:], expected, atol=1e-6)
    with pytest.raises(InputError, match=r"\(2, 141, 187\)"):
        predict(tiny_net(), image, tile_size=60, out=np.zeros((2, 5, 5), np.float32))


@pytest.mark.parametrize("kind", ["zarr", "ome-0.4", "ome-0.5", "bigtiff", "cyx-zarr"])
def test_lazy_inputs_read_the_same_windows(tmp_path, raw, kind):
    if kind == "zarr":
        path = tmp_path / "a.zarr"
        zarr.create_array(store=str(path), data=raw, chunks=(50, 50))
    elif kind == "cyx-zarr":
        path = tmp_path / "c.zarr"
        zarr.create_array(store=str(path), data=np.stack([raw, raw // 2]), chunks=(1, 50, 50))
    elif kind == "bigtiff":
        path = tmp_path / "a.tif"
        tifffile.imwrite(path, raw, bigtiff=True, tile=(32, 32))
    else:
        path = write_ome(tmp_path / "a.ome.zarr", raw, kind.split("-")[1])
    image = open_lazy(path)
    full = np.stack([raw, raw // 2]) if kind == "cyx-zarr" else raw[None]
    assert image.shape == full.shape
    np.testing.assert_array_equal(image[..., 10:77, 150:187], full[:, 10:77, 150:187])
    np.testing.assert_array_equal(image.limited(30)[..., :, :], full[:, :30])
    pytest.importorskip("dask.array")
    np.testing.assert_array_equal(image.to_dask(chunk=64).compute(), full)  # what Dask workers read


def test_zarr_without_an_image_array_is_refused(tmp_path):
    zarr.open_group(str(tmp_path / "empty.zarr"), mode="w")
    with pytest.raises(InputError, match="empty.zarr: no image array at level 0"):
        open_lazy(tmp_path / "empty.zarr")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_streamed_percentiles_equal_the_in_memory_normalisation(tmp_path, raw, dtype):
    data = (raw.astype(np.float64) * (257 if dtype == np.uint16 else 1)).astype(dtype)
    path = tmp_path / "n.zarr"
    zarr.create_array(store=str(path), data=data, chunks=(40, 40))
    scale, offset = fit_normalization(Normalization(), open_lazy(path))
    normalized = open_lazy(path).normalized(scale, offset)[..., :, :]
    np.testing.assert_allclose(normalized, Normalization()(data), atol=1e-6)


def test_cli_zarr_in_zarr_out_equals_in_memory_prediction_and_labels(tmp_path, raw, checkpoint, expected):
    source = write_ome(tmp_path / "slide.ome.zarr", raw, "0.5")
    assert main(["predict", str(source), "--model", str(checkpoint), "--out", str(tmp_path / "out"), *TILE]) == 0
    probs = zarr.open_array(str(tmp_path / "out" / "slide_probabilities.zarr"), mode="r")
    assert probs.chunks == (2, 44, 44)  # one chunk per output tile (stride 44 for tile 60 at depth 2)
    np.testing.assert_allclose(probs[:], expected, atol=1e-5)
    parse_url = pytest.importorskip("ome_zarr.io").parse_url
    Reader = pytest.importorskip("ome_zarr.reader").Reader

    node = next(iter(Reader(parse_url(str(tmp_path / "out" / "slide_labels.ome.zarr")))()))
    labels = np.asarray(node.data[0])
    np.testing.assert_array_equal(labels, probabilities_to_instances(expected[1]))
    assert labels.max() > 3


def test_tiny_chunks_get_a_note(tmp_path, raw, checkpoint, capsys):
    zarr.create_array(store=str(tmp_path / "t.zarr"), data=raw, chunks=(8, 8))
    assert main(["predict", str(tmp_path / "t.zarr"), "--model", str(checkpoint), "--out", str(tmp_path / "o"),
                 "--rows", "40", *TILE]) == 0
    assert "t.zarr: its chunks of 8x8 pixels are tiny" in capsys.readouterr().out


def test_a_killed_run_continues_where_it_stopped(tmp_path, raw, checkpoint, expected, monkeypatch, capsys):
    source = tmp_path / "big.zarr"
    zarr.create_array(store=str(source), data=raw, chunks=(64, 64))
    original, calls = Progress.add, []

    def dies_after_four(self, indices):
        original(self, indices)
        calls.append(list(indices))
        if len(calls) == 5:  # the empty record at the start, then four tiles
            raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "add", dies_after_four)
    args = ["predict", str(source), "--model", str(checkpoint), "--out", str(tmp_path / "out"), *TILE]
    assert main(args) == 130
    partial = tmp_path / "out" / "big_probabilities.zarr.partial"
    assert json.loads((partial / PROGRESS_FILE).read_text())["done"] == [0, 1, 2, 3]
    monkeypatch.setattr(Progress, "add", lambda self, indices: (original(self, indices), calls.append(list(indices))))
    calls.clear()
    capsys.readouterr()
    assert main(args) == 0
    assert "continuing a previous run (4 of 20 tiles were done)" in capsys.readouterr().out
    assert sorted(i for c in calls for i in c) == list(range(4, 20))  # no finished tile was computed again
    np.testing.assert_allclose(zarr.open_array(str(tmp_path / "out" / "big_probabilities.zarr"))[:], expected, atol=1e-5)
    assert not partial.exists()


def test_cli_tiff_output_rows_and_float16(tmp_path, raw, checkpoint, expected):
    source = tmp_path / "huge.tif"
    tifffile.imwrite(source, raw, bigtiff=True, tile=(64, 64))
    out = tmp_path / "out"
    assert main(["predict", str(source), "--model", str(checkpoint), "--out", str(out), "--out-format", "tiff",
                 "--rows", "100", "--dtype", "float16", *TILE]) == 0
    probs = tifffile.imread(out / "huge_probabilities.tif")
    stripe = predict(tiny_net(), Normalization().fitted(raw[:100])(raw[:100]), tile_size=60)
    assert probs.dtype == np.float16 and probs.shape == (2, 100, SHAPE[1])
    np.testing.assert_allclose(probs.astype(np.float32), stripe, atol=1e-3)
    labels = tifffile.imread(out / "huge_labels.tif")
    # 4-connected objects fill at most every second pixel: 9350 ids fit 16 bits without wrapping
    assert labels.shape == (100, SHAPE[1]) and labels.dtype == np.uint16
    assert sorted(p.name for p in out.iterdir()) == ["huge_labels.tif", "huge_probabilities.tif"]


def test_cli_dask_local_cluster_equals_single_process(tmp_path, raw, checkpoint, expected):
    pytest.importorskip("distributed")
    source = tmp_path / "d.zarr"
    zarr.create_array(store=str(source), data=raw, chunks=(64, 64))
    out = tmp_path / "out"
    assert main(["predict", str(source), "--model", str(checkpoint), "--out", str(out), "--dask", "local:2",
                 "--block-size", "96", *TILE]) == 0
    np.testing.assert_allclose(zarr.open_array(str(out / "d_probabilities.zarr"))[:], expected, atol=1e-5)


def test_cli_bad_large_inputs_are_one_line_exit_2(tmp_path, checkpoint, capsys, monkeypatch):
    monkeypatch.setattr("unetkit.distributed.CONNECT_TIMEOUT", "1s")
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    assert main(["predict", str(tmp_path / "g.zarr"), "--model", str(checkpoint), "--out", str(tmp_path / "o")]) == 2
    assert "g.zarr: no image array at level 0" in capsys.readouterr().err
    pytest.importorskip("distributed")
    zarr.create_array(store=str(tmp_path / "a.zarr"), data=np.zeros((20, 20), np.uint8))
    assert main(["predict", str(tmp_path / "a.zarr"), "--model", str(checkpoint), "--out", str(tmp_path / "o"),
                 "--dask", "tcp://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "tcp://127.0.0.1:9" in err and len(err.splitlines()) == 1


def test_binary_labels_of_a_large_image(tmp_path, raw, checkpoint, expected):
    source = tmp_path / "b.zarr"
    zarr.create_array(store=str(source), data=raw, chunks=(64, 64))
    assert main(["predict", str(source), "--model", str(checkpoint), "--out", str(tmp_path / "o"), "--labels", "binary", *TILE]) == 0
    labels = zarr.open_group(str(tmp_path / "o" / "b_labels.ome.zarr"), mode="r")["0"][:]
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, (expected[1] > 0.5).astype(np.uint8))


def _ngff04(path, array, axes):
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", data=array, chunks=(1,) * (array.ndim - 2) + (64, 64))
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a} for a in axes], "datasets": [{"path": "0"}]}]
    return path


def test_unknown_axis_names_are_refused_naming_the_axis_and_the_store(tmp_path, raw):
    path = _ngff04(tmp_path / "q.ome.zarr", raw[None], ["q", "y", "x"])
    with pytest.raises(InputError, match=r"q\.ome\.zarr: unknown axis name 'q' in its axes \['q', 'y', 'x'\]"):
        open_lazy(path)
    path = _ngff04(tmp_path / "two.ome.zarr", raw, ["y"])
    with pytest.raises(InputError, match=r"two\.ome\.zarr: 1 axis names for 2 axes"):
        open_lazy(path)


def test_nan_in_a_zarr_image_names_the_store_and_the_window(tmp_path, raw):
    data = raw.astype(np.float32)
    data[100, 150] = np.nan
    zarr.create_array(store=str(tmp_path / "nan.zarr"), data=data, chunks=(64, 64))
    image = open_lazy(tmp_path / "nan.zarr")
    np.testing.assert_array_equal(image[..., :64, :], data[None, :64])  # windows without NaN read as they are
    with pytest.raises(InputError, match=r"nan\.zarr: NaN or infinite values in rows 64\.\.140, columns 0\.\.186"):
        image[..., 64:, :]
    with pytest.raises(InputError, match=r"nan\.zarr: NaN"):
        fit_normalization(Normalization(), image)


def test_missing_chunks_of_a_format_2_store_are_refused_at_open(tmp_path, raw):
    path = _ngff04(tmp_path / "m.ome.zarr", raw, ["y", "x"])
    (path / "0" / "1.2").unlink()  # rows 64..127, columns 128..186: lost in a copy
    with pytest.raises(InputError, match=r"m\.ome\.zarr: chunk 1\.2 \(rows 64\.\.127, columns 128\.\.186\) missing from "
                                         r"the store; zarr would read them as the fill value 0"):
        open_lazy(path)
    window = open_lazy(path, allow_missing_chunks=True)[..., 64:128, 128:]
    assert not window.any()  # what reading it anyway gives
    zarr.create_array(store=str(tmp_path / "empty.zarr"), data=np.zeros((20, 20), np.uint8))  # format 3: empty chunks
    assert open_lazy(tmp_path / "empty.zarr").shape == (1, 20, 20)  # are left out, not lost


def test_a_damaged_chunk_names_the_store_and_the_window(tmp_path, raw):
    zarr.create_array(store=str(tmp_path / "d.zarr"), data=raw, chunks=(64, 64))
    (tmp_path / "d.zarr" / "c" / "1" / "0").write_bytes(b"not zstd at all" * 10)
    image = open_lazy(tmp_path / "d.zarr")
    np.testing.assert_array_equal(image[..., :64, :], raw[None, :64])
    with pytest.raises(InputError) as info:
        image[..., 60:70, 10:20]
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'd.zarr'}: cannot read rows 60..69, columns 10..19 (")
    assert message.endswith("a chunk there is damaged: write the image again (or copy it again)")


def test_lazy_tiff_with_pages_written_one_by_one_is_refused(tmp_path, raw):
    with tifffile.TiffWriter(tmp_path / "p.tif") as writer:
        writer.write(raw)
        writer.write(raw)
    with pytest.raises(InputError, match=r"p\.tif: axis 'i' has 2 entries"):
        open_lazy(tmp_path / "p.tif")
