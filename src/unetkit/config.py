"""The paper's defaults, in one place.

Every number here is taken from Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for
Biomedical Image Segmentation", MICCAI 2015 (arXiv:1505.04597). The section of the paper is named
beside each field. Code elsewhere reads these values instead of repeating them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from numbers import Integral, Real
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


def is_positive_number(value: Any) -> bool:
    """Whether `value` is an int or float (not a bool) above 0, as stored in a run's JSON or checkpoint.

    Example:
        >>> is_positive_number(2.5), is_positive_number(True), is_positive_number("3"), is_positive_number(0)
        (True, False, False, False)
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def from_dict_strict(cls: type[T], values: Mapping[str, Any], what: str) -> T:
    """Build the dataclass `cls` from `values`; missing keys take their defaults, unknown keys are an error.

    `what` names the settings in the error message (e.g. "training").

    Example:
        >>> from_dict_strict(PaperDefaults, {"w0": 5.0}, "paper").w0
        5.0
    """
    if not isinstance(values, Mapping):
        raise InputError(f"{what} settings must be a mapping of names to values (got {type(values).__name__})")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown {what} setting(s) {unknown}; known settings: {sorted(known)}")
    return cls(**values)


@dataclass(frozen=True)
class Limit:
    """What a setting must be: a number (`integer`: a whole one) from `low` up to below `high`, a
    choice among `choices`, or a bool (`flag`); `optional`: None is allowed too; `hint` follows the
    message."""

    low: float | None = None
    high: float | None = None
    integer: bool = False
    above: bool = False  # low itself is not allowed
    optional: bool = False
    choices: tuple[str, ...] = ()
    flag: bool = False
    hint: str = ""

    def requirement(self) -> str:
        if self.flag:
            return "true or false"
        if self.choices:
            return " or ".join(repr(choice) for choice in self.choices)
        if self.high is not None:
            return f"in [{self.low:g}, {self.high:g})"
        return f"{'>' if self.above else '>='} {self.low:g}"

    def problem(self, value: Any) -> str | None:
        """Why `value` breaks this limit (the end of "NAME must be ..."), or None if it keeps it."""
        if value is None and self.optional:
            return None
        if self.flag:
            return None if isinstance(value, bool) else self.requirement()
        if self.choices:
            return None if value in self.choices else self.requirement()
        kind = "a whole number" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, Integral if self.integer else Real):
            return f"{kind} {self.requirement()}"
        if not math.isfinite(value):
            return f"finite and {self.requirement()}"
        too_low = self.low is not None and (value <= self.low if self.above else value < self.low)
        too_high = self.high is not None and value >= self.high
        return self.requirement() if too_low or too_high else None


#: What each training setting (`unetkit.train.TrainConfig`) must be; `check_settings` applies it.
TRAIN_LIMITS: dict[str, Limit] = {
    "depth": Limit(2, integer=True, hint=f"the paper uses {PAPER.depth}"),
    "base_channels": Limit(1, integer=True, hint=f"the paper uses {PAPER.base_channels}"),
    "padding": Limit(choices=("valid", "same")),
    "dropout": Limit(0, 1),
    "batch_norm": Limit(flag=True),
    "tile_size": Limit(1, integer=True),
    "batch_size": Limit(1, integer=True),
    "lr": Limit(0, above=True),
    "momentum": Limit(0, 1, hint=f"the paper uses {PAPER.momentum}"),
    "weight_decay": Limit(0),
    "dice_weight": Limit(0),
    "iterations": Limit(1, integer=True, optional=True),  # None: max_seconds alone limits the run
    "max_seconds": Limit(0, above=True, optional=True),
    "choose_decision": Limit(flag=True),
    "val_every": Limit(1, integer=True),
    "checkpoint_every": Limit(1, integer=True),
    "seed": Limit(0, integer=True),
    "workers": Limit(0, integer=True),
    "precision": Limit(choices=("fp32", "bf16")),
    "precision_scores": Limit(flag=True),
}


class SettingError(InputError):
    """A setting outside its `Limit`; `setting` names it, so a command line can name its option instead."""

    def __init__(self, setting: str, requirement: str, value: Any, hint: str = "") -> None:
        self.setting, self.requirement, self.value, self.hint = setting, requirement, value, hint
        super().__init__(self.message(setting))

    def message(self, name: str) -> str:
        """The message with the setting called `name` (e.g. its command-line option)."""
        return f"{name} must be {self.requirement} (got {self.value!r})" + (f"; {self.hint}" if self.hint else "")


def check_settings(values: Mapping[str, Any], limits: Mapping[str, Limit] = TRAIN_LIMITS) -> None:
    """Raise `SettingError` for the first of `values` that breaks its limit (names without one pass).

    Example:
        >>> check_settings({"momentum": 2.0})
        Traceback (most recent call last):
        ...
        unetkit.config.SettingError: momentum must be in [0, 1) (got 2.0); the paper uses 0.99
    """
    for name, value in values.items():
        limit = limits.get(name)
        problem = limit.problem(value) if limit is not None else None
        if problem:
            raise SettingError(name, problem, value, limit.hint if limit is not None else "")


#: Images with more pixels than this are large: written as zarr unless --out-format says otherwise,
#: and tiled within `unetkit.inference.LARGE_IMAGE_MEMORY_BUDGET`.
LARGE_PIXELS = 8192 * 8192
