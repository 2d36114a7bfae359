"""Named training recipes: the paper's exact settings, and the default that wins within a CPU budget.

A recipe is a set of `TrainConfig` values (`augment` and `targets` nested as dicts); anything given
explicitly overrides it. A recipe may also change with the kind of annotation (`task`, see
`unetkit.decision.infer_task`): "membranes" (EM: the background is a thin network between cells)
or "objects" (cells, nuclei).

* "paper": Ronneberger et al. 2015 as written: the full-width network (64 channels), 572x572
  tiles, batch of one, SGD with momentum 0.99, the weighted cross-entropy with w0 = 10 and
  sigma = 5 px, elastic deformation on a 3x3 grid with 10 px standard deviation, dropout 0.5.
  (`TrainConfig()` with no arguments is this recipe.)
* "default": what `unetkit train` uses. It keeps the paper's network shape, tiles, loss,
  weight map and augmentation, and changes what a measured study (docs/TRAINING.md,
  benchmarks/recipe_study.py) found to matter within a CPU budget: width 16, Adam, batch norm,
  no dropout, a cosine learning-rate decay over the budget (whose final weights are kept). For
  membranes the cross-entropy is unweighted and a soft Dice term over both classes is added: the
  weight map and class balancing made membranes too thick on ISBI 2012, while the Dice term
  rewards drawing the thin membrane class without thickening every membrane. On DIC-HeLa cells
  the weight map is what keeps touching cells apart, so it stays.

Example:
    >>> from unetkit.recipes import recipe_config
    >>> recipe_config("paper").optimizer, recipe_config("paper").momentum
    ('sgd', 0.99)
    >>> recipe_config("default", base_channels=8).base_channels
    8
    >>> recipe_config("default", task="membranes").targets.use_weight_map
    False
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
        "dropout": 0.0,
        "lr_schedule": "cosine",
    },
}

#: What fine-tuning (`unetkit.finetune`, ``unetkit train --from``) sets on top of the start model's
#: network, normalisation, loss and augmentation: Adam with a cosine decay to zero over a short
#: budget, whose final weights are kept (as "default" does). The learning rate is the from-scratch
#: one, 1e-3: on two annotated 256 x 256 quarters of the DSB2018 sample, 120 CPU-seconds from
#: fluo-nuclei reached SEG 0.675 at 1e-3 and 0.632 at 1e-4 on the held-out quarters
#: (benchmarks/finetune_dsb.py --lr); the decay makes the last steps small anyway. Batch norm
#: trains as usual, and at the end its statistics are measured over the training images' tiles
#: (`TrainConfig.precise_bn`): the running averages of a few hundred single augmented tiles were
#: noisy enough that on outside HeLa nuclei a fine-tuned model scored SEG 0.62 with them, 0.58
#: with each image's own and 0.78 with the training images' (benchmarks/finetune_external.py,
#: seed 0, no TTA). The labels rule then chooses between those and each image's own statistics
#: on validation, which with one or two annotated images is the last quarter of each, never
#: trained on (`unetkit.finetune.HELD_OUT_PARTS`). The budget counts this
#: process's CPU time with augmentation in the training process (workers 0), so other jobs on the
#: machine do not shorten the run.
FINETUNE: dict[str, Any] = {
    "optimizer": "adam",
    "lr": 1e-3,
    "lr_schedule": "cosine",
    "weight_decay": 0.0,
    "budget_clock": "cpu",
    "workers": 0,
    "val_every": 50,
    "checkpoint_every": 50,
    "precise_bn": True,
}

#: What a recipe changes for one kind of annotation (`unetkit.decision.TASKS`).
TASK_VALUES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    "default": {"membranes": {"targets": {"class_weights": (1.0, 1.0), "use_weight_map": False}, "dice_weight": 1.0}},
}

RECIPE_NOTES: dict[str, str] = {
    "paper": "the paper's exact settings (SGD momentum 0.99, batch 1, w0 10, sigma 5, 3x3 elastic grid at 10 px, dropout 0.5, width 64)",
    "default": "measured best within a CPU budget: width 16, Adam, batch norm, no dropout, cosine decay; "
               "unweighted cross-entropy plus Dice for membranes (EM), the paper's weight map for cells",
}


def recipe_values(name: str, task: str | None = None) -> dict[str, Any]:
    """The `TrainConfig` values of recipe `name` for annotations of kind `task` (a copy)."""
    if name not in RECIPES:
        raise InputError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    values = {key: (dict(value) if isinstance(value, dict) else value) for key, value in RECIPES[name].items()}
    for key, value in TASK_VALUES[name].get(task or "", {}).items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return values


def depends_on_task(name: str) -> bool:
    """Whether recipe `name` changes with the kind of annotation."""
    return bool(TASK_VALUES.get(name))


def recipe_config(name: str, task: str | None = None, **overrides: Any):
    """A `TrainConfig` of recipe `name` (for annotations of kind `task`), with `overrides` on top."""
    from .train import TrainConfig

    return TrainConfig(**{**recipe_values(name, task), **overrides})  # `augment` and `targets` may be dicts
