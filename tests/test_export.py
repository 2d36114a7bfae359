"""unetkit export: ONNX and TorchScript files that reproduce the checkpoint, bioimage.io packages
that validate and pass bioimageio.core's test for every weight format, and refusals."""

import time
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


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_torchscript_and_the_plain_architecture_reproduce_the_network(tmp_path, padding):
    from unetkit.export.graphs import export_torchscript

    torch.manual_seed(1)
    net = UNet(in_channels=2, n_classes=3, depth=3, base_channels=4, padding=padding).eval()
    x = torch.rand(2, 2, 60, 76)  # legal, and not the size the graph was traced at
    expected = probabilities(net, x)
    traced = torch.jit.load(str(export_torchscript(net, tmp_path / "net.pt")))
    np.testing.assert_allclose(traced(x).detach().numpy(), expected, atol=1e-4)
    plain = PlainUNet(**dict(net.config, dropout=0.0)).eval()
    plain.load_state_dict(net.state_dict())
    np.testing.assert_allclose(plain(x).detach().numpy(), expected, atol=1e-5)


def test_onnx_file_reproduces_the_checkpoint_at_any_legal_size(checkpoint, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "unet.onnx"
    assert main(["export", "--model", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [d for d in session.get_inputs()[0].shape] == ["batch", 1, "height", "width"]
    net = load_checkpoint(checkpoint).model
    for shape in [(1, 1, 44, 44), (3, 1, 92, 60)]:
        x = torch.rand(*shape)
        got = session.run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(got, probabilities(net, x), atol=1e-4)
    # The existing file is refused without --force, replaced with it.
    assert main(["export", "--model", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out}: already exists; use --force" in err and err.count("\n") == 1
    assert main(["export", "--model", str(checkpoint), "--format", "torchscript", "--out", str(out), "--force"]) == 0
    assert torch.jit.load(str(out))(torch.rand(1, 1, 44, 44)).shape == (1, 2, 4, 4)


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


def test_bioimageio_package_validates_and_passes_every_weight_format(checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    core = pytest.importorskip("bioimageio.core")
    spec = pytest.importorskip("bioimageio.spec")
    started = time.perf_counter()
    out = tmp_path / "unet.zip"
    assert main(["export", "--model", str(checkpoint), "--format", "bioimageio", "--out", str(out), "--no-test",
                 "--author", "A. Tester"]) == 0
    descr = spec.load_description(out, perform_io_checks=True)
    assert descr.validation_summary.status == "valid-format", descr.validation_summary.display()
    assert descr.format_version.startswith("0.5.")
    assert {w for w, entry in descr.weights if entry is not None} == {"pytorch_state_dict", "torchscript", "onnx"}
    y = descr.inputs[0].axes[2]
    assert (y.size.min, y.size.step) == (44, 4)  # depth 3: legal sizes 44 + 4k
    out_y = descr.outputs[0].axes[2]
    assert (out_y.size.tensor_id, out_y.size.offset) == ("input", -40)  # border 20 per side
    pre = [p.id for p in descr.inputs[0].preprocessing]
    assert "scale_range" in pre
    scale = next(p for p in descr.inputs[0].preprocessing if p.id == "scale_range").kwargs
    assert (scale.min_percentile, scale.max_percentile, list(scale.axes)) == (1.0, 99.8, ["channel", "y", "x"])
    assert [a.name for a in descr.authors] == ["A. Tester"] and str(descr.cite[0].doi) == "10.1007/978-3-319-24574-4_28"
    with zipfile.ZipFile(out) as z:
        readme = z.read("README.md").decode()
        test_input = np.load(z.open("test_input.npy"))
    assert "## Validation" in readme and "0.8125" in readme
    assert test_input.shape == (1, 1, 296, 296)  # a 256 output plus the border
    for weight_format in ("pytorch_state_dict", "torchscript", "onnx"):
        summary = core.test_model(out, weight_format=weight_format, devices=["cpu"])
        assert summary.status == "passed", summary.display()
    assert time.perf_counter() - started < 60


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
