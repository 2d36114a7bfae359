"""unetkit: the U-Net of Ronneberger, Fischer & Brox (2015) as a toolkit.

Train a U-Net from a handful of annotated images, segment images of any size seamlessly with
overlap-tile prediction, and score results with the challenges' own metrics.

Example:
    >>> import numpy as np, unetkit
    >>> net = unetkit.UNet(depth=3, base_channels=4).eval()
    >>> unetkit.predict(net, np.zeros((50, 70), np.float32)).shape
    (2, 50, 70)
"""

import sys
import types
from typing import Any

from .config import PAPER, PaperDefaults
from .errors import InputError
from .geometry import Geometry

__all__ = ["PAPER", "PaperDefaults", "InputError", "Geometry", "UNet", "predict"]
__version__ = "0.1.0"

# Names that need torch, imported on first use (PEP 562) so that `import unetkit` and the command
# line's help stay quick: name -> submodule.
_LAZY = {"UNet": "network", "predict": "predict"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps `unetkit.predict` the function: importing the submodule `unetkit.predict` would
    otherwise rebind the package attribute to the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
