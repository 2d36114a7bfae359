"""Named training recipes: the paper's exact settings, and the default that wins within a CPU budget.

A recipe is a set of `TrainConfig` values (`augment` and `targets` nested as dicts); anything given
explicitly overrides it.

* "paper": Ronneberger et al. 2015 as written: the full-width network (64 channels), 572x572
  tiles, batch of one, SGD with momentum 0.99, the weighted cross-entropy with w0 = 10 and
  sigma = 5 px, elastic deformation on a 3x3 grid with 10 px standard deviation, dropout 0.5.
  (`TrainConfig()` with no arguments is this recipe.)
* "default": what `unetkit train` uses. It keeps the paper's network shape, tiles, loss family
  and augmentation and changes what a measured study on ISBI 2012 found to matter within a CPU
  budget (docs/TRAINING.md, benchmarks/recipe_study.py).

Example:
    >>> from unetkit.recipes import recipe_config
    >>> recipe_config("paper").optimizer, recipe_config("paper").momentum
    ('sgd', 0.99)
    >>> recipe_config("default", base_channels=8).base_channels
    8
"""

from __future__ import annotations

from typing import Any

from .errors import InputError

RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "default": {
        "base_channels": 16,
        "optimizer": "adam",
        "lr": 1e-3,
        "batch_norm": True,
        "lr_schedule": "cosine",
    },
}

RECIPE_NOTES: dict[str, str] = {
    "paper": "the paper's exact settings (SGD momentum 0.99, batch 1, w0 10, sigma 5, 3x3 elastic grid at 10 px, width 64)",
    "default": "measured best within a CPU budget: width 16, Adam, batch norm, cosine learning-rate decay over the budget",
}


def recipe_values(name: str) -> dict[str, Any]:
    """The `TrainConfig` values of recipe `name` (a copy)."""
    if name not in RECIPES:
        raise InputError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    return {key: (dict(value) if isinstance(value, dict) else value) for key, value in RECIPES[name].items()}


def recipe_config(name: str, **overrides: Any):
    """A `TrainConfig` of recipe `name`, with `overrides` applied on top."""
    from .train import TrainConfig

    return TrainConfig(**{**recipe_values(name), **overrides})  # `augment` and `targets` may be dicts
