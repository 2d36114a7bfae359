"""Which device computes: "auto", "cpu", "cuda", "cuda:N" or "mps".

`check_device` validates the name without importing torch, so the command line can refuse a typo
before anything is loaded or created; `resolve_device` turns a name into a `torch.device`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .errors import InputError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(device: Any) -> str:
    """The device name, lower-cased, if it is one of `DEVICES`; else InputError listing them.

    Example:
        >>> check_device("CUDA:1")
        'cuda:1'
    """
    name = str(device).strip().lower()
    if not _DEVICE.match(name):
        raise InputError(f"--device {device!r} is not a device; use one of {', '.join(DEVICES)}")
    return name


def resolve_device(device: "str | torch.device" = "auto") -> "torch.device":
    """"auto" picks CUDA, then Apple MPS, then the CPU; a named device must be available.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    name = check_device(device)
    mps = getattr(torch.backends, "mps", None)
    mps_available = mps is not None and mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA GPU is available; use --device cpu or auto")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise InputError(
                f"--device {name}: there are {torch.cuda.device_count()} CUDA GPU(s), numbered from 0; use --device cuda:0"
            )
    if name == "mps" and not mps_available:
        raise InputError("--device mps: Apple MPS is not available; use --device cpu or auto")
    return torch.device(name)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is torch's (CUDA) `OutOfMemoryError` or the CPU allocator's failure.

    Example:
        >>> is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"))
        True
    """
    text = str(exc)
    return type(exc).__name__ == "OutOfMemoryError" or "can't allocate memory" in text or "out of memory" in text.lower()
