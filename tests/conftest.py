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
