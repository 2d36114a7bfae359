"""The paper's defaults, in one place.

Every number here is taken from Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for
Biomedical Image Segmentation", MICCAI 2015 (arXiv:1505.04597). The section of the paper is named
beside each field. Code elsewhere reads these values instead of repeating them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from .errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class PaperDefaults:
    """Hyper-parameters stated in the U-Net paper.

    Example:
        >>> from unetkit.config import PAPER
        >>> PAPER.w0, PAPER.sigma, PAPER.momentum
        (10.0, 5.0, 0.99)
    """

    # Section 2 / Fig. 1: network architecture.
    depth: int = 5  # five resolution levels, four 2x2 max-poolings
    base_channels: int = 64  # 64-128-256-512-1024 feature channels
    dropout: float = 0.5  # "drop-out layers at the end of the contracting path"
    tile_size: int = 572  # example input tile, giving a 388x388 output tile
    # Section 3: training.
    momentum: float = 0.99  # "a high momentum (0.99)"
    batch_size: int = 1  # "we favor large input tiles over a large batch size"
    w0: float = 10.0  # weight-map border term amplitude, Eq. (2)
    sigma: float = 5.0  # weight-map border term width in pixels, Eq. (2) ("sigma ~ 5 pixels")
    # Section 3.1: data augmentation.
    elastic_grid: int = 3  # "random displacement vectors on a coarse 3 by 3 grid"
    elastic_sigma: float = 10.0  # "Gaussian distribution with 10 pixels standard deviation"


PAPER = PaperDefaults()

#: Training iterations when none are given (`TrainConfig`, `unetkit train`); not from the paper,
#: which does not state its number of iterations.
DEFAULT_ITERATIONS = 2000


def from_dict_strict(cls: type[T], values: Mapping[str, Any], what: str) -> T:
    """Build the dataclass `cls` from `values`; missing keys take their defaults, unknown keys are an error.

    `what` names the settings in the error message (e.g. "training").

    Example:
        >>> from_dict_strict(PaperDefaults, {"w0": 5.0}, "paper").w0
        5.0
    """
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown {what} setting(s) {unknown}; known settings: {sorted(known)}")
    return cls(**values)
