import os

import numpy as np
import pytest
import torch

torch.set_num_threads(int(os.environ.get("UNETKIT_TEST_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
