"""Export a network for use outside unetkit: ONNX, TorchScript and bioimage.io model packages.

`graphs` writes a network as an ONNX or TorchScript file (probabilities out, any legal size);
`bioimageio` builds a validated bioimage.io model package from a checkpoint. Names are imported
on first use, so that the prediction engine can use `graphs` without the packaging code.

Example:
    >>> from unetkit.export import export_checkpoint
    >>> export_checkpoint("run/best.pt", "onnx", "unet.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

FORMATS = ("bioimageio", "onnx", "torchscript")

_LAZY = {
    "export_onnx": "graphs",
    "export_torchscript": "graphs",
    "export_bioimageio": "bioimageio",
    "export_checkpoint": "bioimageio",
}

__all__ = ["FORMATS", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
