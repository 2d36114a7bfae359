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


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("task", [None, "membranes", "objects"])
def test_every_recipe_keeps_the_training_limits(name, task):
    from unetkit.config import TRAIN_LIMITS, check_settings

    config = recipe_config(name, task).to_dict()
    check_settings(config)
    assert set(TRAIN_LIMITS) <= set(config)  # every limit names a real setting


@pytest.mark.parametrize(
    "values, message",
    [
        ({"momentum": 1.0}, "momentum must be in [0, 1) (got 1.0); the paper uses 0.99"),
        ({"weight_decay": -1e-4}, "weight_decay must be >= 0 (got -0.0001)"),
        ({"lr": float("inf")}, "lr must be finite and > 0 (got inf)"),
        ({"max_seconds": float("inf")}, "max_seconds must be finite and > 0 (got inf)"),
        ({"seed": -1}, "seed must be >= 0 (got -1)"),
        ({"dice_weight": -1.0}, "dice_weight must be >= 0 (got -1.0)"),
        ({"iterations": 2.5}, "iterations must be a whole number >= 1 (got 2.5)"),
        ({"depth": 1}, "depth must be >= 2 (got 1); the paper uses 5"),
    ],
)
def test_train_config_refuses_values_outside_the_limits(values, message):
    from unetkit.config import SettingError

    with pytest.raises(SettingError) as error:
        TrainConfig(**values)
    assert str(error.value) == message and error.value.setting == next(iter(values))


def test_settings_read_from_a_file_must_be_a_mapping():
    from unetkit.config import PaperDefaults, from_dict_strict

    with pytest.raises(InputError, match=r"^paper settings must be a mapping of names to values \(got list\)$"):
        from_dict_strict(PaperDefaults, [1], "paper")
