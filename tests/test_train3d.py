"""3D training: volume samples, 3D tiles, the trainer with dims=3, labels rules on volumes, `unetkit train --dims 3`."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tifffile
import torch

from unetkit.checkpoint import load_checkpoint
from unetkit.cli import main
from unetkit.data import Normalization, make_sample
from unetkit.data.volumes import VolumeTileDataset, check_spacing, make_volume_sample, normalize_volume
from unetkit.decision import DecisionRule, choose_decision
from unetkit.errors import InputError
from unetkit.loss import IGNORE_INDEX, SegmentationLoss
from unetkit.postprocess import probabilities_to_instances
from unetkit.synthetic import synthetic_cells_3d
from unetkit.targets import make_targets
from unetkit.train import TrainConfig, Trainer
from unetkit.volume import predict_volume

NORM = Normalization()
SPACING = (4.0, 1.0, 1.0)  # depth 2: (1, 2, 2) pooling, 3x3x3 kernels only at the bottom


def tiny_config(**overrides) -> TrainConfig:
    values = dict(dims=3, spacing=SPACING, depth=2, base_channels=4, tile_size=28, tile_depth=8, optimizer="adam",
                  batch_norm=True, dropout=0.0, iterations=4, val_every=2, checkpoint_every=2, workers=0,
                  precision_scores=False)
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def volumes():
    return [make_volume_sample(*synthetic_cells_3d((8, 40, 40), seed=k), f"v{k}", NORM, spacing=SPACING) for k in range(3)]


# -- configuration ---------------------------------------------------------------------------------


def test_volume_config_plans_anisotropic_pooling_and_its_tiles():
    config = TrainConfig(dims=3, spacing=(4, 1, 1), depth=3, tile_size=44)
    options = config.network_options()
    assert options["pool_kernels"] == ((1, 2, 2), (2, 2, 2)) and options["conv_kernels"] == ((1, 3, 3), (3, 3, 3), (3, 3, 3))
    z_out = config.geometry.output_shape(config.tile_shape)[0]
    assert z_out >= 4 and config.geometry.axes[0].output_size(config.tile_shape[0] - config.geometry.step[0]) < 4
    assert TrainConfig(dims=3, tile_depth=12, depth=3, tile_size=44, spacing=(4, 1, 1)).tile_shape == (12, 44, 44)
    assert config.network(1).dims == 3


@pytest.mark.parametrize("values, message", [
    (dict(spacing=(2, 1, 1)), "are for volumes: add --dims 3"),
    (dict(tile_depth=8), "are for volumes"),
    (dict(dims=4), "dims must be 2"),
    (dict(dims=3, spacing=(0, 1, 1)), "three positive numbers"),
    (dict(dims=3, padding="same"), "valid convolutions"),
])
def test_bad_volume_settings_are_refused(values, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(**values)


def test_an_illegal_3d_tile_names_the_axis_and_the_options(volumes, tmp_path):
    with pytest.raises(InputError, match=r"--tile-depth, --tile-size.*y size 29 is not legal"):
        Trainer(tiny_config(tile_size=29), volumes[:1], [], tmp_path / "run", normalization=NORM)
    assert not (tmp_path / "run").exists()


def test_images_for_a_3d_run_and_volumes_for_a_2d_run_are_refused(volumes, tmp_path):
    image = make_sample(np.random.rand(40, 40), np.eye(40, dtype=np.uint8), "img", NORM)
    with pytest.raises(InputError, match="leave out --dims 3"):
        Trainer(tiny_config(), [image], [], tmp_path / "a", normalization=NORM)
    with pytest.raises(InputError, match="add --dims 3"):
        Trainer(TrainConfig(depth=2, base_channels=4, tile_size=28), volumes[:1], [], tmp_path / "b", normalization=NORM)


def test_spacing_is_read_from_numbers_or_text():
    assert check_spacing("12.5, 1, 1") == (12.5, 1.0, 1.0)
    for bad in ("1,1", "a,b,c", (1, -1, 1), (1, float("inf"), 1)):
        with pytest.raises(InputError, match="three positive numbers"):
            check_spacing(bad)


# -- samples and tiles --------------------------------------------------------------------------------


def test_a_volume_is_normalised_over_all_its_voxels():
    volume = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    out = normalize_volume(volume, Normalization(mode="fixed", scale=0.5))
    assert out.shape == (1, 2, 3, 4) and np.array_equal(out[0], volume * 0.5)
    percentile = normalize_volume(volume)
    assert percentile[0, 0, 0, 0] <= 0.0 + 1e-6 and percentile[0, -1, -1, -1] >= 1.0 - 1e-6  # one range for all planes


def test_per_plane_samples_take_each_planes_2d_targets_exactly():
    mask = np.zeros((3, 20, 20), np.uint8)
    mask[0, 2:8, 2:8] = mask[1, 4:12, 4:12] = mask[2, 10:18, 3:9] = 255
    sample = make_volume_sample(np.random.rand(3, 20, 20), mask, per_plane=True)
    for z in range(3):
        target, weights = make_targets(mask[z])
        assert np.array_equal(sample.target[z], target) and np.array_equal(sample.weights[z], weights)
    assert sample.instances.max() == 3  # ids unique across planes


def test_unlabelled_voxels_are_ignored_and_weigh_nothing():
    image, labels = synthetic_cells_3d((6, 24, 24), seed=1)
    unlabelled = np.zeros(labels.shape, bool)
    unlabelled[3:] = True
    sample = make_volume_sample(image, labels, unlabelled=unlabelled)
    assert (sample.target[3:] == IGNORE_INDEX).all() and (sample.weights[3:] == 0).all()
    assert (sample.target[:3] >= 0).all()


def test_3d_tiles_have_the_geometrys_shapes_and_repeat_exactly(volumes):
    config = tiny_config()
    dataset = VolumeTileDataset(volumes, config.geometry, config.tile_shape, augment=config.augment, length=5, seed=3)
    item = dataset[2]
    out = config.geometry.output_shape(config.tile_shape)
    assert tuple(item["image"].shape) == (1, *config.tile_shape)
    assert tuple(item["target"].shape) == tuple(item["weights"].shape) == out
    again = dataset[2]
    assert all(torch.equal(item[k], again[k]) for k in item)
    assert not torch.equal(dataset[3]["image"], item["image"])


def test_sparse_labels_survive_3d_augmentation():
    image, labels = synthetic_cells_3d((8, 40, 40), seed=2)
    unlabelled = np.zeros(labels.shape, bool)
    unlabelled[:, :, :20] = True
    sample = make_volume_sample(image, labels, unlabelled=unlabelled, spacing=SPACING)
    config = tiny_config()
    dataset = VolumeTileDataset([sample], config.geometry, config.tile_shape, augment=config.augment, length=8)
    for i in range(8):
        item = dataset[i]
        ignored = item["target"] == IGNORE_INDEX
        assert set(item["target"].unique().tolist()) <= {IGNORE_INDEX, 0, 1}
        assert (item["weights"][ignored] == 0).all()


def test_the_loss_gives_unlabelled_voxels_no_gradient_with_the_dice_term():
    logits = torch.randn(1, 2, 2, 3, 3, requires_grad=True)
    target = torch.randint(0, 2, (1, 2, 3, 3))
    target[0, 1] = IGNORE_INDEX
    SegmentationLoss(dice_weight=1.0)(logits, target, torch.ones(1, 2, 3, 3)).backward()
    assert logits.grad is not None
    assert torch.count_nonzero(logits.grad[:, :, 1]) == 0 and torch.count_nonzero(logits.grad[:, :, 0]) > 0


# -- labels rules on volumes ----------------------------------------------------------------------------


def test_volumes_form_six_connected_objects():
    prob = np.zeros((2, 4, 4), np.float32)
    prob[0, 0, 0] = prob[1, 1, 1] = 0.9  # corner contact only
    prob[0, 3, 2:4] = prob[1, 3, 2:4] = 0.9  # one object across two planes
    labels = probabilities_to_instances(prob)
    assert labels.max() == 3 and labels[0, 3, 2] == labels[1, 3, 3]


def test_a_per_plane_rule_labels_each_plane_alone_with_unique_ids():
    prob = np.zeros((2, 6, 6), np.float32)
    prob[:, 1:4, 1:4] = 0.9
    labels = DecisionRule(per_plane=True).apply(prob)
    assert labels[0, 2, 2] != labels[1, 2, 2] and set(np.unique(labels)) == {0, 1, 2}
    assert np.array_equal(DecisionRule().apply(prob), (prob > 0.5).astype(np.int32))


def test_a_rule_is_chosen_on_volumes_by_their_3d_scores():
    _, truth = synthetic_cells_3d((8, 40, 40), seed=4)
    prob = np.where(truth > 0, 0.9, 0.1).astype(np.float32)
    rule = choose_decision([prob], [truth])
    assert rule.task == "objects" and rule.score is not None and rule.score > 0.4
    assert rule.apply(prob).shape == truth.shape


# -- training ------------------------------------------------------------------------------------------


def test_a_3d_run_writes_a_volume_checkpoint_with_its_rule(volumes, tmp_path):
    summary = Trainer(tiny_config(), volumes[:2], volumes[2:], tmp_path / "run", normalization=NORM, progress=False).fit()
    assert summary["iterations"] == 4 and summary["decision"]["tta"] is True
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best.model.dims == 3 and tuple(best.train_config["spacing"]) == SPACING
    assert best.decision and not best.decision["per_plane"]
    probs = predict_volume(best.model, volumes[2].image)
    assert probs.shape == (2, 8, 40, 40)
    assert (tmp_path / "run" / "report.html").is_file()


def test_per_plane_validation_stores_a_per_plane_rule(tmp_path):
    mask = np.zeros((3, 40, 40), np.uint8)
    mask[:, 5:18, 5:18] = mask[:, 22:35, 20:36] = 255
    volume = make_volume_sample(np.random.default_rng(0).random((3, 40, 40)) + mask / 255, mask, NORM, per_plane=True, spacing=(8, 1, 1))
    summary = Trainer(tiny_config(spacing=(8, 1, 1), iterations=2), [volume], [volume], tmp_path / "run",
                      normalization=NORM, progress=False).fit()
    assert summary["decision"]["per_plane"] is True


def test_a_resumed_3d_run_reaches_the_same_weights(volumes, tmp_path):
    config = tiny_config(iterations=4, val_every=100)
    Trainer(config, volumes[:2], [], tmp_path / "full", normalization=NORM, progress=False).fit()
    Trainer(tiny_config(iterations=2, val_every=100), volumes[:2], [], tmp_path / "split", normalization=NORM, progress=False).fit()
    Trainer(config, volumes[:2], [], tmp_path / "split", normalization=NORM, resume=True, progress=False).fit()
    full, split = (load_checkpoint(tmp_path / name / "last.pt") for name in ("full", "split"))
    assert full.iteration == split.iteration == 4
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, split.model.state_dict()[key]), key


def test_a_thin_volume_is_mirrored_only_when_asked(volumes):
    net = tiny_config().network(1).eval()
    thin = volumes[0].image[:, :2]
    with pytest.raises(InputError, match="smallest tile"):
        predict_volume(net, thin)
    from unetkit.volume import extract_volume, smallest_volume_tile

    smallest_z = smallest_volume_tile(net.geometry)[0]
    assert smallest_z > 2
    before = (smallest_z - 2) // 2

    mirrored = extract_volume(thin, (-before, 0, 0), (smallest_z, 40, 40))
    expected = predict_volume(net, mirrored)[:, before : before + 2]
    assert np.allclose(predict_volume(net, thin, pad_thin=True), expected, atol=1e-6)


# -- the command ----------------------------------------------------------------------------------------


@pytest.fixture
def volume_folder(tmp_path):
    folder = tmp_path / "volumes"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for k in range(2):
        image, labels = synthetic_cells_3d((8, 40, 40), seed=k)
        tifffile.imwrite(folder / "images" / f"v{k}.tif", (image * 255).astype(np.uint8))
        tifffile.imwrite(folder / "masks" / f"v{k}.tif", labels.astype(np.uint16))
    return folder


def test_unetkit_train_dims_3_trains_on_a_folder_of_volumes(volume_folder, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", str(volume_folder), "--out", str(out), "--dims", "3", "--spacing", "4,1,1",
                 "--depth", "2", "--width", "4", "--tile-size", "28", "--tile-depth", "8", "--iterations", "2",
                 "--val", "1", "--val-every", "2", "--workers", "0", "--no-progress"])
    assert code == 0
    assert "1 training and 1 validation volumes" in capsys.readouterr().out
    best = load_checkpoint(out / "best.pt")
    assert best.model.dims == 3 and best.model.config["pool_kernels"] == [[1, 2, 2]]


@pytest.mark.parametrize("options, message", [
    ([], "are volumes.*add --dims 3"),
    (["--spacing", "2,1,1"], "add --dims 3"),
    (["--dims", "3", "--spacing", "0,1,1"], "three positive numbers"),
    (["--dims", "3", "--tile-size", "29", "--depth", "2"], "not legal"),
    (["--dims", "3", "--from", "fluo-nuclei"], "leave out --dims"),
])
def test_bad_volume_options_exit_2_and_create_nothing(volume_folder, tmp_path, capsys, options, message):
    out = tmp_path / "run"
    assert main(["train", "--data", str(volume_folder), "--out", str(out), *options]) == 2
    assert re.search(message, " ".join(capsys.readouterr().err.split()))
    assert not out.exists()
