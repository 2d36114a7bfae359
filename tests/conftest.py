import os

import numpy as np
import pytest
import torch

torch.set_num_threads(int(os.environ.get("UNETKIT_TEST_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def write_cell_folder():
    """A function that writes a dataset folder a user would give `unetkit train` (images/ and
    masks/, three synthetic 48x56 cell images cell0..cell2 as TIFF) under `root` and returns it."""

    def write(root):
        import tifffile

        from unetkit.synthetic import synthetic_dataset

        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
        for i, (image, labels) in enumerate(synthetic_dataset(3, shape=(48, 56), seed=5)):
            tifffile.imwrite(root / "images" / f"cell{i}.tif", (image * 255).astype(np.uint8))
            tifffile.imwrite(root / "masks" / f"cell{i}.tif", labels)
        return root

    return write


@pytest.fixture(scope="module")
def client():
    """A Dask client on a local cluster of two single-threaded worker processes (the [scale] extra)."""
    distributed = pytest.importorskip("distributed", reason="Dask needs the [scale] extra")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="session")
def wavy_volume():
    """A function that makes a uint8 (Z, Y, X) test volume of `shape`: soft waves of periods
    (z, y, x) plus Gaussian noise of generator `seed`, clipped to 0-255."""

    def make(shape, periods, seed):
        z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
        waves = 90 * np.sin(y / periods[1] + z / periods[0]) * np.cos(x / periods[2])
        pattern = 128 + waves + np.random.default_rng(seed).normal(0, 15, shape)
        return np.clip(pattern, 0, 255).astype(np.uint8)

    return make


@pytest.fixture(scope="session")
def tiny_3d_checkpoint(tmp_path_factory):
    """A function that saves a tiny anisotropic 3D U-Net (batch norm, torch seed 0) whose labels rule
    draws components at the median foreground probability it gives `volume`, so any random net
    finds objects there, and returns the checkpoint's path."""

    def make(volume):
        from unetkit.checkpoint import save_checkpoint
        from unetkit.data.normalize import Normalization
        from unetkit.data.volumes import normalize_volume
        from unetkit.decision import DecisionRule
        from unetkit.network import UNet
        from unetkit.volume import predict_volume

        torch.manual_seed(0)
        net = UNet(dims=3, depth=2, base_channels=4, pool_kernels=[(1, 2, 2)], conv_kernels=[(1, 3, 3), (3, 3, 3)],
                   batch_norm=True)
        threshold = float(np.median(predict_volume(net, normalize_volume(volume), device="cpu")[1]))
        path = tmp_path_factory.mktemp("ckpt") / "m3.pt"
        save_checkpoint(path, net, normalization=Normalization(), class_names=["background", "cell"],
                        decision=DecisionRule(method="components", threshold=threshold, min_size=2).to_dict())
        return path

    return make
