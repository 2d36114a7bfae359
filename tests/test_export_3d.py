"""`unetkit export` of a 3D U-Net: ONNX and TorchScript graphs of any volume size, and a
bioimage.io package with a z axis."""

import numpy as np
import pytest
import torch

from unetkit.checkpoint import load_checkpoint, save_checkpoint
from unetkit.cli import main
from unetkit.data.normalize import Normalization
from unetkit.network import UNet
from unetkit.volume import predict_volume

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = UNet(dims=3, depth=2, base_channels=4, pool_kernels=[(1, 2, 2)], conv_kernels=[(1, 3, 3), (3, 3, 3)],
               batch_norm=True)
    return save_checkpoint(tmp_path_factory.mktemp("model3d") / "best.pt", net, normalization=Normalization(),
                           class_names=["background", "cell"], train_config={"dims": 3, "spacing": [2.0, 0.5, 0.5]})


@pytest.fixture(scope="module")
def package(checkpoint, tmp_path_factory):
    pytest.importorskip("bioimageio.core")
    out = tmp_path_factory.mktemp("export3d") / "package"
    assert main(["export", "--model", str(checkpoint), "--format", "bioimageio", "--out", str(out)]) == 0
    return out


def volumes(shapes):
    rng = np.random.default_rng(1)
    return [rng.random(shape).astype(np.float32) for shape in shapes]


def test_onnx_of_a_3d_model_takes_any_volume_and_equals_torch(package, checkpoint):
    from unetkit.export.graphs import onnx_session

    session = onnx_session(package / "weights.onnx", threads=1)  # written by export_onnx, as --format onnx writes it
    assert session.get_inputs()[0].shape == ["batch", 1, "depth", "height", "width"]
    model = load_checkpoint(checkpoint).model.eval()
    legal = model.geometry.check((7, 36, 38))  # a legal tile: the graph equals one pass of the network
    for volume in volumes([legal, (6, 40, 44)]):
        got = session.run(None, {"input": volume[None, None]})[0][0]
        np.testing.assert_allclose(got, predict_volume(model, volume), atol=1e-4)
    with torch.no_grad():
        x = torch.from_numpy(volumes([legal])[0])[None, None]
        raw = torch.softmax(model(x), dim=1)[0].numpy()
    (bz, by, bx) = model.geometry.border
    inner = session.run(None, {"input": x.numpy()})[0][0][:, bz:-bz, by:-by, bx:-bx]
    np.testing.assert_allclose(inner, raw, atol=1e-4)  # the inside of a legal volume is the network's own output


def test_torchscript_of_a_3d_model_equals_the_volume_prediction(checkpoint, tmp_path):
    path = tmp_path / "unet3d.pt"
    assert main(["export", "--model", str(checkpoint), "--format", "torchscript", "--out", str(path)]) == 0
    traced = torch.jit.load(str(path))
    model = load_checkpoint(checkpoint).model.eval()
    volume = volumes([(6, 40, 44)])[0]
    with torch.no_grad():
        got = traced(torch.from_numpy(volume)[None, None])[0].numpy()
    np.testing.assert_allclose(got, predict_volume(model, volume), atol=1e-4)


def test_bioimageio_package_of_a_3d_model_has_a_z_axis_and_5d_test_tensors(package, checkpoint):
    import yaml

    rdf = yaml.safe_load((package / "rdf.yaml").read_text())
    geometry = load_checkpoint(checkpoint).model.geometry
    (tensor,), (output,) = rdf["inputs"], rdf["outputs"]
    assert [a.get("id", a["type"]) for a in tensor["axes"]] == ["batch", "channel", "z", "y", "x"]
    space = tensor["axes"][2:]
    assert [a["size"]["step"] for a in space] == list(geometry.step)
    assert all(a["size"]["min"] >= m for a, m in zip(space, geometry.min_shape))
    halos = [a["halo"] for a in output["axes"][2:]]
    assert all(h >= b and h % s == 0 for h, b, s in zip(halos, geometry.border, geometry.step))
    assert set(rdf["weights"]) == {"torchscript", "onnx"}
    test_input = np.load(package / "test_input.npy")
    test_output = np.load(package / "test_output.npy")
    assert test_input.ndim == 5 and test_output.shape == (1, 2, *test_input.shape[2:])
    assert "3D U-Net" in (package / "README.md").read_text()
    assert rdf["config"]["unetkit"]["border"] == list(geometry.border)


def test_statistics_from_images_is_refused_for_a_3d_model(checkpoint, tmp_path, capsys):
    import tifffile

    tifffile.imwrite(tmp_path / "plane.tif", np.zeros((40, 44), np.uint8))
    out = tmp_path / "unet3d.onnx"
    assert main(["export", "--model", str(checkpoint), "--format", "onnx", "--out", str(out),
                 "--statistics-from", str(tmp_path / "plane.tif")]) == 2
    assert "--statistics-from gathers the batch-norm statistics of 2D images, but this is a 3D model" in capsys.readouterr().err
    assert not out.exists()
