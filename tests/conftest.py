import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(int(os.environ.get("UNETKIT_TEST_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def data_dir() -> Path:
    """Real datasets: $UNETKIT_DATA or ../shared/data beside the repository."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return Path(os.environ.get("UNETKIT_DATA", default))
