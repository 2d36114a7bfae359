"""unetkit export: ONNX and TorchScript files that reproduce the checkpoint, bioimage.io packages
that validate and pass bioimageio.core's test for every weight format, and refusals."""

import os
import zipfile

import numpy as np
import pytest
import torch

from unetkit import InputError, UNet
from unetkit.checkpoint import load_checkpoint, save_checkpoint
from unetkit.cli import main
from unetkit.data.normalize import Normalization
from unetkit.export.architecture import UNet as PlainUNet


def probabilities(model: UNet, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model.eval()(x), dim=1).numpy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = UNet(depth=3, base_channels=4, batch_norm=True)
    with torch.no_grad():  # batch-norm statistics other than the initial ones
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("run") / "best.pt"
    save_checkpoint(path, net, normalization=Normalization(), class_names=["background", "cell"],
                    state={"best_iou": 0.8125}, iteration=40,
                    decision={"method": "components", "threshold": 0.5, "task": "objects", "score": 0.75, "tta": False})
    return path


def one_tile_prediction(net: UNet, image: np.ndarray) -> np.ndarray:
    """What unetkit.predict gives for (C, H, W) `image` in one tile covering it."""
    from unetkit.export.graphs import covering_size
    from unetkit.predict import predict

    g = net.geometry
    tile = (covering_size(g, image.shape[-2]), covering_size(g, image.shape[-1]))
    return predict(net, image, tta=False, norm_statistics="training", tile_size=tile)


def test_covering_size_is_the_tile_that_predict_uses_for_one_tile():
    from unetkit.export.graphs import covering_size
    from unetkit.geometry import Geometry
    from unetkit.tiling import plan_tiles

    valid, same = Geometry(depth=3), Geometry(depth=3, padding="same")
    assert [covering_size(valid, n) for n in (1, 4, 5, 100, 101)] == [44, 44, 48, 140, 144]
    assert [covering_size(same, n) for n in (1, 100)] == [44, 140]
    for g in (valid, same, Geometry(depth=5)):
        for n in (1, 37, 100, 512):
            assert len(plan_tiles((n, n), g, covering_size(g, n))) == 1


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_exported_graphs_take_any_size_and_equal_one_tile_prediction(tmp_path, padding):
    from unetkit.export.graphs import export_onnx, export_torchscript

    torch.manual_seed(1)
    net = UNet(in_channels=2, n_classes=3, depth=3, base_channels=4, padding=padding).eval()
    traced = torch.jit.load(str(export_torchscript(net, tmp_path / "net.pt")))
    runs = {"torchscript": lambda x: traced(torch.from_numpy(x)).detach().numpy()}
    if padding == "valid":  # one ONNX export is enough: the padding code is shared
        ort = pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
        session = ort.InferenceSession(str(export_onnx(net, tmp_path / "net.onnx")), providers=["CPUExecutionProvider"])
        runs["onnx"] = lambda x: session.run(None, {"input": x})[0]
    rng = np.random.default_rng(0)
    # illegal sizes (45, 61), a legal one (60), smaller than the border (7, 3), a single pixel
    for shape in [(45, 61), (60, 60), (7, 3), (1, 1)]:
        image = rng.random((2, *shape), dtype=np.float32)
        expected = one_tile_prediction(net, image)
        for what, run in runs.items():
            got = run(image[None])[0]
            assert got.shape == (3, *shape), what
            np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=f"{what} at {shape}")


def test_the_graphs_mirror_like_extract_region():
    from unetkit.export.architecture import mirror_indices
    from unetkit.tiling import reflect_indices

    for start, length, size in [(-20, 60, 7), (-3, 9, 4), (-5, 12, 1), (-44, 140, 100)]:
        assert mirror_indices(start, length, size).tolist() == reflect_indices(start, length, size).tolist()


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_the_plain_architecture_reproduces_the_network(padding):
    from unetkit.export.graphs import any_size_layout

    torch.manual_seed(1)
    net = UNet(in_channels=2, n_classes=3, depth=3, base_channels=4, padding=padding).eval()
    x = torch.rand(2, 2, 60, 76)  # legal
    plain = PlainUNet(**dict(net.config, dropout=0.0)).eval()
    plain.load_state_dict(net.state_dict())
    np.testing.assert_allclose(plain(x).detach().numpy(), probabilities(net, x), atol=1e-5)
    anysize = PlainUNet(**dict(net.config, dropout=0.0, any_size=any_size_layout(net.geometry))).eval()
    anysize.load_state_dict(net.state_dict())
    image = torch.rand(2, 37, 50)
    np.testing.assert_allclose(anysize(image[None])[0].detach().numpy(), one_tile_prediction(net, image.numpy()), atol=1e-5)


def test_onnx_file_reproduces_the_checkpoint_at_any_size(checkpoint, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "unet.onnx"
    assert main(["export", "--model", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [d for d in session.get_inputs()[0].shape] == ["batch", 1, "height", "width"]
    net = load_checkpoint(checkpoint).model
    for shape in [(1, 1, 44, 44), (1, 1, 93, 61)]:  # legal, illegal
        x = torch.rand(*shape)
        got = session.run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(got, one_tile_prediction(net, x.numpy()[0])[None], atol=1e-4)
    # The existing file is refused without --force, replaced with it.
    assert main(["export", "--model", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out}: already exists; use --force" in err and err.count("\n") == 1
    assert main(["export", "--model", str(checkpoint), "--format", "torchscript", "--out", str(out), "--force"]) == 0
    assert torch.jit.load(str(out))(torch.rand(1, 1, 44, 45)).shape == (1, 2, 44, 45)


class _NumPyLayer(torch.nn.Module):
    def forward(self, x):
        return torch.from_numpy(x.detach().numpy().copy())


def test_a_layer_that_cannot_be_traced_is_named(tmp_path):
    from unetkit.export.graphs import export_onnx, export_torchscript

    pytest.importorskip("onnxscript")
    net = UNet(depth=2, base_channels=2)
    net.up_conv[0][1] = _NumPyLayer()
    with pytest.raises(InputError, match=r"cannot export to ONNX: tracing failed in layer up_conv\.0\.1 \(_NumPyLayer\)"):
        export_onnx(net, tmp_path / "a.onnx")
    with pytest.raises(InputError, match=r"cannot export to TorchScript: .* in layer up_conv\.0\.1 \(_NumPyLayer\)"):
        export_torchscript(net, tmp_path / "a.pt")
    assert not list(tmp_path.iterdir())


@pytest.fixture
def known_github_user(monkeypatch):
    """A maintainer name that bioimageio.spec accepts without asking GitHub (no network in tests)."""
    from bioimageio.spec._internal import field_validation

    monkeypatch.setattr(field_validation, "KNOWN_GITHUB_USERS", field_validation.KNOWN_GITHUB_USERS | {"a-tester"})
    return "a-tester"


def test_bioimageio_package_validates_and_passes_every_weight_format(checkpoint, tmp_path, known_github_user):
    pytest.importorskip("onnxruntime")
    core = pytest.importorskip("bioimageio.core")
    spec = pytest.importorskip("bioimageio.spec")
    out = tmp_path / "unet.zip"
    assert main(["export", "--model", str(checkpoint), "--format", "bioimageio", "--out", str(out), "--no-test",
                 "--author", "A. Tester", "--maintainer", known_github_user,
                 "--git-repo", "https://github.com/a-tester/cells"]) == 0
    descr = spec.load_description(out, perform_io_checks=True)
    assert descr.validation_summary.status == "valid-format", descr.validation_summary.display()
    assert descr.format_version.startswith("0.5.")
    assert {w for w, entry in descr.weights if entry is not None} == {"pytorch_state_dict", "torchscript", "onnx"}
    y = descr.inputs[0].axes[2]
    assert (y.size.min, y.size.step) == (44, 4)  # depth 3: a halo of 20 on both sides + one step
    assert descr.inputs[0].pad.mode == "reflect"
    out_y = descr.outputs[0].axes[2]
    assert (out_y.size.tensor_id, out_y.size.offset, out_y.halo) == ("input", 0, 20)  # same size, border 20
    pre = [p.id for p in descr.inputs[0].preprocessing]
    assert "scale_range" in pre
    scale = next(p for p in descr.inputs[0].preprocessing if p.id == "scale_range").kwargs
    assert (scale.min_percentile, scale.max_percentile, list(scale.axes)) == (1.0, 99.8, ["channel", "y", "x"])
    assert [a.name for a in descr.authors] == ["A. Tester"] and str(descr.cite[0].doi) == "10.1007/978-3-319-24574-4_28"
    assert [m.github_user for m in descr.maintainers] == ["a-tester"] and str(descr.license) == "MIT"
    assert str(descr.git_repo) == "https://github.com/a-tester/cells"
    with zipfile.ZipFile(out) as z:
        readme = z.read("README.md").decode()
        test_input = np.load(z.open("test_input.npy"))
        test_output = np.load(z.open("test_output.npy"))
    assert "## Validation" in readme and "0.8125" in readme
    assert "## What this package does not carry" in readme and "components at threshold 0.5" in readme
    assert "were not measured" in readme and "NOT MEASURED" not in readme and "batch-norm statistics" in readme
    assert test_input.shape == (1, 1, 256, 256) and test_output.shape == (1, 2, 256, 256)
    loaded = load_checkpoint(checkpoint)
    expected = one_tile_prediction(loaded.model, loaded.normalization(test_input[0]))
    np.testing.assert_allclose(test_output[0], expected, atol=1e-5)
    for weight_format in ("pytorch_state_dict", "torchscript", "onnx"):
        summary = core.test_model(out, weight_format=weight_format, devices=["cpu"])
        assert summary.status == "passed", summary.display()


def _run_package(core, package, image: np.ndarray, weight_format: str, blocksize=None) -> np.ndarray:
    """Probabilities of bioimage.io's runner for normalised (H, W) `image` (preprocessing skipped)."""
    pipeline = core.create_prediction_pipeline(core.load_description(package), weight_format=weight_format, devices=["cpu"])
    sample = core.predict(model=pipeline, inputs={"input": image[None, None]}, blocksize_parameter=blocksize,
                          skip_preprocessing=True)
    return sample.members["probabilities"].data.to_numpy()[0]


def test_bioimageio_runner_reproduces_unetkit_whole_and_blockwise(checkpoint, tmp_path):
    """bioimage.io's own runner, on the whole image and in blocks, gives unetkit's probabilities at
    sizes the package states (100x140 and 512 = 44 + n*4)."""
    pytest.importorskip("onnxruntime")
    core = pytest.importorskip("bioimageio.core")
    out = tmp_path / "unet"  # a folder package
    assert main(["export", "--model", str(checkpoint), "--format", "bioimageio", "--out", str(out), "--no-test"]) == 0
    net = load_checkpoint(checkpoint).model
    rng = np.random.default_rng(3)
    for shape, blocks in [((100, 140), 2), ((512, 512), None)]:
        image = rng.random(shape, dtype=np.float32)
        expected = one_tile_prediction(net, image)
        for weight_format in ("onnx", "torchscript", "pytorch_state_dict")[: 3 if shape == (100, 140) else 1]:
            got = _run_package(core, out, image, weight_format)
            assert got.shape == (2, *shape)
            np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=f"{weight_format} whole {shape}")
        if blocks is not None:  # blocks of 44 + 4 * 2 = 52 pixels: 12 x 12 inner pixels, many blocks
            got = _run_package(core, out, image, "onnx", blocksize=blocks)
            np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=f"blockwise {shape}")


def test_bioimageio_preprocessing_reproduces_the_checkpoints_normalisation_blockwise(checkpoint, tmp_path):
    """With the package's own preprocessing (scale_range on the raw image), blockwise runs equal
    unetkit.predict on the checkpoint's normalisation of the image."""
    pytest.importorskip("onnxruntime")
    core = pytest.importorskip("bioimageio.core")
    out = tmp_path / "unet"
    assert main(["export", "--model", str(checkpoint), "--format", "bioimageio", "--out", str(out), "--no-test"]) == 0
    loaded = load_checkpoint(checkpoint)
    raw = np.random.default_rng(4).integers(0, 256, (100, 140)).astype(np.float32)
    pipeline = core.create_prediction_pipeline(core.load_description(out), weight_format="onnx", devices=["cpu"])
    got = core.predict(model=pipeline, inputs={"input": raw[None, None]}, blocksize_parameter=4)
    expected = one_tile_prediction(loaded.model, loaded.normalization(raw))
    np.testing.assert_allclose(got.members["probabilities"].data.to_numpy()[0], expected, atol=1e-4)


def test_bioimageio_package_that_fails_validation_is_refused_with_the_validators_errors(checkpoint, tmp_path, capsys):
    pytest.importorskip("bioimageio.spec")
    pytest.importorskip("onnxscript")
    out = tmp_path / "bad.zip"
    assert main(["export", "--model", str(checkpoint), "--format", "bioimageio", "--out", str(out),
                 "--name", "a/b", "--no-test"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unetkit: error: the bioimage.io package failed validation: name:") and "nothing was written" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".unetkit-export")]


def test_export_options_are_checked(checkpoint, tmp_path, capsys):
    assert main(["export", "--model", str(checkpoint), "--format", "keras", "--out", str(tmp_path / "x")]) == 2
    assert "--format must be one of bioimageio, onnx, torchscript (got 'keras')" in capsys.readouterr().err
    assert main(["export", "--model", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "x"), "--name", "n"]) == 2
    assert "apply to --format bioimageio only" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "missing.pt"), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def _dead_pid() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_force_replaces_only_a_package_unetkit_wrote_and_never_deletes_a_run(checkpoint, tmp_path, capsys, monkeypatch):
    pytest.importorskip("bioimageio.spec")
    pytest.importorskip("onnxscript")
    from unetkit.export import bioimageio

    run = tmp_path / "run"
    run.mkdir()
    files = {"best.pt": b"best", "last.pt": b"last", "log.csv": b"step,loss\n", "notes.txt": b"mine"}
    for name, data in files.items():
        (run / name).write_bytes(data)
    # A run folder as --out: refused with one line naming it, before the checkpoint is even loaded.
    monkeypatch.setattr(bioimageio, "load_checkpoint", lambda *a, **k: pytest.fail("loaded before --out was checked"))
    assert main(["export", "--model", str(checkpoint), "--format", "bioimageio", "--out", str(run), "--force"]) == 2
    err = capsys.readouterr().err
    assert f"--out {run}: not replaced, the folder holds files unetkit did not write" in err and err.count("\n") == 1
    assert main(["export", "--model", str(checkpoint), "--format", "onnx", "--out", str(run), "--force"]) == 2
    assert f"--out {run}: is a folder; give a file name" in capsys.readouterr().err
    assert main(["export", "--model", str(checkpoint), "--format", "bioimageio", "--out", str(run / "notes.txt"),
                 "--force"]) == 2
    assert "is a file, not a package folder unetkit wrote" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files
    monkeypatch.undo()
    # Stale temporary folders of a killed export are removed by the next export; nothing else is.
    host = bioimageio._host()
    stale = tmp_path / f".unetkit-export-{host}-{_dead_pid()}-abcd1234"
    alive = tmp_path / f".unetkit-export-{host}-{os.getppid()}-abcd1234"
    mine = [tmp_path / ".unetkit-export-mine", tmp_path / f".unetkit-export-{host}-{_dead_pid()}-x"]
    for folder in [stale, alive, *mine]:
        (folder / "package").mkdir(parents=True)
    package = tmp_path / "package"
    assert main(["export", "--model", str(checkpoint), "--format", "bioimageio", "--out", str(package), "--no-test"]) == 0
    assert not stale.exists() and alive.exists() and all(m.exists() for m in mine)
    assert (package / bioimageio.MARKER).is_file() and (package / "rdf.yaml").is_file()
    # --force replaces a package folder unetkit wrote ...
    (package / "cover.png").unlink()
    assert main(["export", "--model", str(checkpoint), "--format", "bioimageio", "--out", str(package), "--no-test",
                 "--force"]) == 0
    assert (package / "cover.png").is_file()
    # ... but not once a user put a file of their own into it.
    (package / "my-results.csv").write_text("keep me")
    assert main(["export", "--model", str(checkpoint), "--format", "bioimageio", "--out", str(package), "--force"]) == 2
    assert "my-results.csv" in capsys.readouterr().err and (package / "my-results.csv").read_text() == "keep me"
    leftovers = {p.name for p in tmp_path.iterdir() if p.name.startswith(".unetkit-export")}
    assert leftovers == {alive.name, *(m.name for m in mine)}


def test_stale_temp_folders_of_other_machines_are_removed_only_when_old(tmp_path):
    from unetkit.export.bioimageio import STALE_SECONDS, remove_stale_temp_folders

    other = tmp_path / ".unetkit-export-otherhost-1-abcd1234"
    other.mkdir()
    assert remove_stale_temp_folders(tmp_path) == [] and other.exists()
    now = other.stat().st_mtime + STALE_SECONDS + 1
    assert remove_stale_temp_folders(tmp_path, now=now) == [other] and not other.exists()


@pytest.mark.data
def test_packaged_em_model_runs_in_bioimageio_on_a_512_isbi_slice(tmp_path):
    """The em-membranes package, in bioimage.io's runner (ONNX, its own preprocessing, blockwise so
    that the percentiles are the whole slice's), equals unetkit.predict on a 512x512 ISBI 2012 slice."""
    pytest.importorskip("onnxruntime")
    core = pytest.importorskip("bioimageio.core")
    from unetkit.data import data_root
    from unetkit.io import read_image
    from unetkit.predict import predict
    from unetkit.pretrained import get_model

    image_file = data_root() / "isbi2012" / "train" / "images" / "20.png"
    if not image_file.is_file():
        pytest.skip(f"{image_file} not found (set UNETKIT_DATA)")
    if not get_model("em-membranes").installed:
        pytest.skip("em-membranes is not installed")
    out = tmp_path / "em"
    assert main(["export", "--model", "em-membranes", "--format", "bioimageio", "--out", str(out), "--no-test"]) == 0
    raw = read_image(image_file).astype(np.float32)
    assert raw.shape == (512, 512)
    loaded = load_checkpoint("em-membranes")
    expected = predict(loaded.model, loaded.normalization(raw), tta=False, norm_statistics="training")
    pipeline = core.create_prediction_pipeline(core.load_description(out), weight_format="onnx", devices=["cpu"])
    got = core.predict(model=pipeline, inputs={"input": raw[None, None]}, blocksize_parameter=19)  # blocks of 208 + 19 * 16 = 512
    np.testing.assert_allclose(got.members["probabilities"].data.to_numpy()[0], expected, atol=1e-4)


# -- batch-norm statistics fixed on representative images (--statistics-from) -------------------------


@pytest.fixture(scope="module")
def bn_checkpoint(tmp_path_factory):
    """A tiny network with batch norm whose stored statistics are far from any image's, and whose
    rule was chosen with each image's own statistics."""
    from unetkit.adapt import batch_norm_layers

    torch.manual_seed(5)
    net = UNet(depth=3, base_channels=4, batch_norm=True)
    with torch.no_grad():
        for layer in batch_norm_layers(net):
            layer.running_mean.fill_(0.2)
            layer.running_var.fill_(3.0)
    path = tmp_path_factory.mktemp("bnrun") / "best.pt"
    save_checkpoint(path, net.eval(), normalization=Normalization(), class_names=["background", "cell"],
                    decision={"method": "components", "threshold": 0.5, "task": "objects", "tta": False,
                              "image_statistics": True})
    return path


@pytest.fixture(scope="module")
def representative(tmp_path_factory):
    """One image file and a folder of two more, of different sizes and contrasts."""
    from unetkit.io import write_png

    root = tmp_path_factory.mktemp("representative")
    rng = np.random.default_rng(11)
    (root / "folder").mkdir()
    paths = [root / "a.png", root / "folder" / "b.png", root / "folder" / "c.png"]
    for path, shape, (low, high) in zip(paths, [(80, 90), (120, 100), (64, 64)], [(0, 255), (40, 160), (90, 255)]):
        write_png(path, rng.integers(low, high, shape).astype(np.uint8))
    (root / "folder" / "notes.txt").write_text("not an image")
    return paths


def averaged_statistics(model: UNet, normalization, files):
    """The brief's recipe, written out: each image's statistics with predict's tile, averaged."""
    from unetkit.adapt import BatchNormStatistics, gather_statistics
    from unetkit.io import read_image
    from unetkit.predict import choose_tile_shape

    gathered = []
    for f in files:
        image = normalization(read_image(f))
        gathered.append(gather_statistics(model, image, choose_tile_shape(model, image.shape[-2:])))
    layers = range(len(gathered[0]))
    return BatchNormStatistics(tuple(np.mean([s.means[i] for s in gathered], 0) for i in layers),
                               tuple(np.mean([s.variances[i] for s in gathered], 0) for i in layers), 44, 1, 1)


def test_statistics_from_fixes_the_averaged_statistics_in_every_format(bn_checkpoint, representative, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    core = pytest.importorskip("bioimageio.core")
    from unetkit.adapt import with_statistics
    from unetkit.predict import predict

    loaded = load_checkpoint(bn_checkpoint)
    stats = averaged_statistics(loaded.model, loaded.normalization, representative)
    image = np.random.default_rng(12).random((100, 140), dtype=np.float32)  # normalised, a size the package states
    expected = predict(with_statistics(loaded.model, stats), image, tta=False)
    training = predict(loaded.model, image, tta=False, norm_statistics="training")
    assert np.abs(expected - training).max() > 1e-2  # the statistics matter for this network
    # PATH [PATH ...]: a file and a folder (its images; other files ignored)
    given = ["--statistics-from", str(representative[0]), str(representative[1].parent)]
    outs = {fmt: tmp_path / name for fmt, name in [("onnx", "n.onnx"), ("torchscript", "n.pt"), ("bioimageio", "pkg")]}
    for fmt, out in outs.items():
        extra = ["--no-test"] if fmt == "bioimageio" else []
        assert main(["export", "--model", str(bn_checkpoint), "--format", fmt, "--out", str(out), *given, *extra]) == 0
        printed = capsys.readouterr().out
        assert "statistics averaged over 3 representative images (a.png, b.png, c.png)" in printed
        assert "uses the training statistics" not in printed
    session = ort.InferenceSession(str(outs["onnx"]), providers=["CPUExecutionProvider"])
    got = {"onnx": session.run(None, {"input": image[None, None]})[0][0],
           "torchscript": torch.jit.load(str(outs["torchscript"]))(torch.from_numpy(image)[None, None])[0].detach().numpy(),
           "bioimageio": _run_package(core, outs["bioimageio"], image, "onnx")}
    for what, probabilities in got.items():
        np.testing.assert_allclose(probabilities, expected, atol=1e-4, err_msg=what)
    readme = (outs["bioimageio"] / "README.md").read_text()
    assert "Batch-norm statistics: statistics averaged over 3 representative images (a.png, b.png, c.png)" in readme
    assert "were not measured" in readme and "NOT MEASURED" not in readme
    import yaml

    rdf = yaml.safe_load((outs["bioimageio"] / "rdf.yaml").read_text())
    recorded = rdf["config"]["unetkit"]["batch_norm_statistics"]
    assert recorded["kind"] == "images" and recorded["images"] == ["a.png", "b.png", "c.png"]
    # The package's test output was made with the fixed statistics too.
    test_input, test_output = np.load(outs["bioimageio"] / "test_input.npy"), np.load(outs["bioimageio"] / "test_output.npy")
    np.testing.assert_allclose(
        test_output[0], one_tile_prediction(with_statistics(loaded.model, stats), loaded.normalization(test_input[0])),
        atol=1e-5)


def test_without_statistics_from_a_per_image_model_gets_one_note(bn_checkpoint, tmp_path, capsys):
    pytest.importorskip("bioimageio.core")
    out = tmp_path / "pkg"
    assert main(["export", "--model", str(bn_checkpoint), "--format", "bioimageio", "--out", str(out), "--no-test"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("note:") == 1 and "uses the training statistics" in printed and "--statistics-from" in printed
    readme = (out / "README.md").read_text()
    assert "Batch-norm statistics: the training statistics." in readme and "--statistics-from" in readme
    import yaml

    rdf = yaml.safe_load((out / "rdf.yaml").read_text())
    assert rdf["config"]["unetkit"]["batch_norm_statistics"]["kind"] == "training"


def test_statistics_from_is_refused_before_anything_is_written(bn_checkpoint, representative, tmp_path, capsys):
    pytest.importorskip("bioimageio.spec")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    plain = tmp_path / "plain.pt"
    save_checkpoint(plain, UNet(depth=2, base_channels=4), normalization=Normalization(), class_names=["bg", "cell"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    cases = [
        (plain, [str(representative[0])], "--statistics-from: this network has no batch norm"),
        (bn_checkpoint, [str(empty)], f"--statistics-from {empty}: no PNG or TIFF images in this folder"),
        (bn_checkpoint, [str(tmp_path / "gone.png")], "no such file or folder"),
        (bn_checkpoint, [str(empty / "notes.txt")], "not an image file"),
    ]
    for model, paths, message in cases:
        for fmt, out in [("onnx", tmp_path / "x.onnx"), ("torchscript", tmp_path / "x.pt"), ("bioimageio", tmp_path / "x.zip")]:
            assert main(["export", "--model", str(model), "--format", fmt, "--out", str(out),
                         "--statistics-from", *paths]) == 2, (fmt, message)
            err = capsys.readouterr().err
            assert message in err and err.count("\n") == 1, err
            assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "plain.pt"]
    # A stray argument without --statistics-from is refused too.
    assert main(["export", "--model", str(plain), "--format", "onnx", "--out", str(tmp_path / "x.onnx"), "extra"]) == 2
    assert "unexpected argument(s) extra" in capsys.readouterr().err


def test_package_scores_are_stated_only_for_the_statistics_they_were_measured_with(tmp_path, monkeypatch):
    import json

    from unetkit import pretrained
    from unetkit.export import bioimageio
    from unetkit.export.bioimageio import PackageStatistics, _package_scores_text

    monkeypatch.setattr(pretrained, "MODELS_DIR", tmp_path)
    images = PackageStatistics(("16.png", "17.png"), ("aa", "bb"))
    # Metadata written before package scores existed (and a malformed entry) still loads.
    (tmp_path / "models.json").write_text(json.dumps({"models": {"em-membranes": {"scores": {"pixel_error": 0.07}},
                                                                 "dic-hela": {"package_scores": "junk"}}}))
    assert pretrained.get_model("em-membranes").package_scores == () == pretrained.get_model("dic-hela").package_scores
    text = _package_scores_text("em-membranes", images)
    assert "were not measured" in text and "benchmarks/bioimageio_package.py" in text
    pretrained.record_package_scores("em-membranes", [
        {"statistics": {"kind": "images", "images": ["16.png", "17.png"], "image_sha256": ["bb", "aa"]},
         "scores": {"pixel_error": 0.0795}, "scored_on": "20, 21", "unetkit_scores": {"pixel_error": 0.0773}},
        {"statistics": {"kind": "training"}, "scores": {"pixel_error": 0.0959}},
    ])
    assert pretrained.get_model("em-membranes").scores == {"pixel_error": 0.07}  # the rest of the entry is kept
    text = _package_scores_text("em-membranes", images)
    assert "measured on 20, 21" in text and "pixel error 0.0795" in text and "0.0773" in text
    assert "pixel error 0.0959" in _package_scores_text("em-membranes", PackageStatistics())
    other = PackageStatistics(("16.png", "17.png"), ("aa", "cc"))  # same names, other pixels
    assert "were not measured" in _package_scores_text("em-membranes", other)
    assert "were not measured" in _package_scores_text(None, PackageStatistics())
    # Scores measured on other weights (a retrained model) are not stated.
    monkeypatch.setattr(bioimageio, "_weights_sha256", lambda name: "0123")
    pretrained.record_package_scores("em-membranes", [
        {"statistics": {"kind": "training"}, "scores": {"pixel_error": 0.1}, "weights_sha256": "4567"}])
    assert [r["scores"]["pixel_error"] for r in pretrained.get_model("em-membranes").package_scores] == [0.1]
    assert "were not measured" in _package_scores_text("em-membranes", PackageStatistics())


def test_a_model_fine_tuned_at_another_scale_says_how_to_rescale_images_for_the_export(tmp_path, capsys):
    net = UNet(depth=2, base_channels=4)
    path = tmp_path / "tuned.pt"
    save_checkpoint(path, net, normalization=Normalization(), class_names=["background", "cell"],
                    scale={"diameter": 60.0, "input_diameter": 24.0})
    assert main(["export", "--model", str(path), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    printed = capsys.readouterr().out
    assert "unetkit rescales each image by 2.50 before segmenting it" in printed
    assert "the torchscript file does not: rescale images by 2.50 first" in printed


def test_the_package_readme_and_config_carry_the_rescale_factor_of_a_fine_tuned_model(tmp_path):
    from unetkit.export.bioimageio import _readme

    net = UNet(depth=2, base_channels=4)
    path = tmp_path / "tuned.pt"
    save_checkpoint(path, net, normalization=Normalization(), class_names=["background", "cell"],
                    scale={"diameter": 60.0, "input_diameter": 24.0})
    tuned = load_checkpoint(path)
    readme = _readme(tuned, path, None, "an image", (1, 1, 92, 92))
    assert "unetkit rescales each image by 2.50 before segmenting it" in readme
    assert "rescale images by 2.50 before giving them to this package" in readme
    save_checkpoint(tmp_path / "plain.pt", net, normalization=Normalization(), class_names=["background", "cell"])
    plain = load_checkpoint(tmp_path / "plain.pt")
    assert "object scale" not in _readme(plain, tmp_path / "plain.pt", None, "an image", (1, 1, 92, 92))
