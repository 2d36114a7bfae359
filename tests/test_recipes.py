import pytest

from unetkit.augment import AugmentConfig
from unetkit.config import PAPER
from unetkit.errors import InputError
from unetkit.recipes import RECIPES, recipe_config, recipe_values
from unetkit.train import TrainConfig


def test_paper_recipe_is_pinned():
    """Nothing in --recipe paper may change silently: every setting the paper states, spelled out."""
    c = recipe_config("paper")
    assert c == TrainConfig()
    assert (c.depth, c.base_channels, c.padding, c.dropout, c.batch_norm) == (5, 64, "valid", 0.5, False)
    assert (c.tile_size, c.batch_size) == (572, 1)
    assert (c.optimizer, c.momentum, c.lr, c.weight_decay, c.lr_schedule) == ("sgd", 0.99, 0.001, 0.0, "constant")
    assert (c.targets.w0, c.targets.sigma, c.targets.class_weights, c.targets.use_weight_map, c.dice_weight) == (10.0, 5.0, "balanced", True, 0.0)
    assert (c.augment.elastic, c.augment.elastic_grid, c.augment.elastic_sigma) == (True, 3, 10.0)
    assert (PAPER.w0, PAPER.sigma, PAPER.momentum, PAPER.elastic_grid, PAPER.elastic_sigma) == (10.0, 5.0, 0.99, 3, 10.0)


def test_default_recipe_differs_from_the_paper_only_where_stated():
    paper, default = recipe_config("paper").to_dict(), recipe_config("default").to_dict()
    changed = {key for key in paper if paper[key] != default[key]}
    assert changed and changed <= set(RECIPES["default"])


def test_overrides_win_and_augment_dicts_become_configs():
    c = recipe_config("default", base_channels=8, augment={"elastic": False})
    assert c.base_channels == 8 and isinstance(c.augment, AugmentConfig) and not c.augment.elastic
    assert recipe_values("default") == RECIPES["default"] and recipe_values("default") is not RECIPES["default"]


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(InputError, match="unknown recipe 'fast'; known recipes: paper, default"):
        recipe_config("fast")


def test_config_json_of_older_runs_with_flat_target_keys_still_loads():
    from unetkit.targets import TargetConfig
    from unetkit.train import TrainConfig

    old = TrainConfig().to_dict()
    nested = old.pop("targets")
    old.update({**nested, "w0": 3.0, "class_weights": [1.0, 1.0]})  # the flat layout of earlier versions
    config = TrainConfig.from_dict(old)
    assert config.targets == TargetConfig(w0=3.0, class_weights=(1.0, 1.0))
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["targets"]["class_weights"] == [1.0, 1.0]


def test_default_recipe_trains_membranes_unweighted_and_cells_with_the_weight_map():
    from unetkit.recipes import depends_on_task

    cells, membranes = recipe_config("default", task="objects"), recipe_config("default", task="membranes")
    assert cells.targets.use_weight_map and cells.targets.class_weights == "balanced" and cells == recipe_config("default")
    assert not membranes.targets.use_weight_map and membranes.targets.class_weights == (1.0, 1.0)
    assert (membranes.dice_weight, cells.dice_weight) == (1.0, 0.0)
    assert membranes.augment == cells.augment and membranes.optimizer == cells.optimizer == "adam"
    assert depends_on_task("default") and not depends_on_task("paper")
    assert recipe_config("paper", task="membranes") == recipe_config("paper")
