"""Device names: checked without torch, resolved with it."""

from __future__ import annotations

import pytest
import torch

from unetkit.device import DEVICES, check_device, resolve_device
from unetkit.errors import InputError


@pytest.mark.parametrize("name", ["gpu", "cuda0", "cpu:0", "tpu", ""])
def test_a_typo_lists_the_valid_devices(name):
    for check in (check_device, resolve_device):
        with pytest.raises(InputError) as info:
            check(name)
        assert all(device in str(info.value) for device in DEVICES)


def test_valid_devices():
    assert [check_device(n) for n in ("auto", "CPU", "cuda", "cuda:1", "mps")] == ["auto", "cpu", "cuda", "cuda:1", "mps"]
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            resolve_device("cuda")
