"""Sparse annotation of volumes: `--ignore-label` in files, samples, the loss, the labels rule and `unetkit train --dims 3`."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tifffile
import torch

from unetkit.checkpoint import load_checkpoint
from unetkit.cli import main
from unetkit.data import Normalization, find_pairs
from unetkit.augment import AugmentConfig
from unetkit.data.volumes import VolumeTileDataset, _covering, load_volume_samples, make_volume_sample, unlabelled_voxels
from unetkit.decision import choose_decision, cut_to_labelled
from unetkit.errors import InputError
from unetkit.loss import IGNORE_INDEX, SegmentationLoss
from unetkit.network import UNet
from unetkit.synthetic import synthetic_cells_3d
from unetkit.targets import make_targets_3d
from unetkit.train import TrainConfig, Trainer

IGNORE = 65535
SHAPE = (8, 40, 40)
ANNOTATED = (2, 5)  # the planes a user labelled; the other six hold IGNORE
SPACING = (4.0, 1.0, 1.0)
TINY = ["--dims", "3", "--spacing", "4,1,1", "--depth", "2", "--width", "4", "--tile-size", "28", "--tile-depth", "8",
        "--workers", "0", "--no-progress"]


def sparse_mask(labels: np.ndarray, fill: int = IGNORE, dtype=np.uint16) -> np.ndarray:
    """`labels` on the ANNOTATED planes, `fill` on the others."""
    mask = np.full(labels.shape, fill, dtype)
    for z in ANNOTATED:
        mask[z] = labels[z]
    return mask


def write_folder(root, masks: dict[str, np.ndarray] | None = None):
    """A dataset folder of two sparsely annotated volumes v0, v1 (masks replaced by `masks`)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(2):
        image, labels = synthetic_cells_3d(SHAPE, seed=k)
        tifffile.imwrite(root / "images" / f"v{k}.tif", (image * 255).astype(np.uint8))
        tifffile.imwrite(root / "masks" / f"v{k}.tif", (masks or {}).get(f"v{k}", sparse_mask(labels)))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("sparse") / "volumes")


# -- samples -------------------------------------------------------------------------------------------


def test_ignore_label_voxels_are_ignored_and_targets_are_made_as_if_they_were_background(folder):
    sample = load_volume_samples(find_pairs(folder)[:1], spacing=SPACING, ignore_label=IGNORE)[0]
    mask = tifffile.imread(folder / "masks" / "v0.tif")
    ignored = mask == IGNORE
    assert ignored.sum() == 6 * 40 * 40
    assert np.array_equal(sample.target == IGNORE_INDEX, ignored)
    assert (sample.weights[ignored] == 0).all() and (sample.weights[~ignored] > 0).all()
    assert (sample.instances[ignored] == 0).all()
    target, weights = make_targets_3d(np.where(ignored, 0, mask).astype(np.int64), None, SPACING)
    assert np.array_equal(sample.target[~ignored], target[~ignored])
    assert np.array_equal(sample.weights[~ignored], weights.astype(np.float32)[~ignored])
    assert unlabelled_voxels([sample]) == (9600, 12800)


def test_a_signed_mask_may_mark_unlabelled_voxels_with_minus_one(tmp_path):
    _, labels = synthetic_cells_3d(SHAPE, seed=0)
    mask = sparse_mask(labels, fill=-1, dtype=np.int16)
    data = write_folder(tmp_path / "volumes", masks={"v0": mask})
    sample = load_volume_samples(find_pairs(data)[:1], spacing=SPACING, ignore_label=-1)[0]
    assert np.array_equal(sample.target == IGNORE_INDEX, mask == -1)
    with pytest.raises(InputError, match="negative"):  # without the ignore label, -1 is a negative object id
        load_volume_samples(find_pairs(data)[:1], spacing=SPACING)


def test_per_plane_samples_take_the_ignore_label_too():
    image, labels = synthetic_cells_3d(SHAPE, seed=0)
    mask = sparse_mask(labels)
    sample = make_volume_sample(image, mask, unlabelled=mask == IGNORE, per_plane=True)
    assert np.array_equal(sample.target == IGNORE_INDEX, mask == IGNORE)
    assert sample.instances[mask == IGNORE].max() == 0


# -- training tiles ------------------------------------------------------------------------------------

DEEP = (24, 40, 40)
TILE = (8, 28, 28)  # output (4, 12, 12): uniform windows would hold neither annotated plane 13 times in 21


def tiny_geometry():
    return UNet(dims=3, depth=2, base_channels=4, pool_kernels=[(1, 2, 2)], conv_kernels=[(1, 3, 3), (3, 3, 3)]).geometry


def deep_samples(planes=(7, 16)) -> tuple:
    """A densely annotated (24, 40, 40) volume and the same volume with only `planes` annotated."""
    image, labels = synthetic_cells_3d(DEEP, seed=0)
    unlabelled = np.ones(DEEP, bool)
    unlabelled[list(planes)] = False
    return (make_volume_sample(image, labels, "dense", spacing=SPACING),
            make_volume_sample(image, labels, "sparse", spacing=SPACING, unlabelled=unlabelled))


def test_every_tile_of_a_sparse_volume_holds_labelled_voxels():
    _, sparse = deep_samples()
    dataset = VolumeTileDataset([sparse], tiny_geometry(), TILE, length=50, seed=1)
    assert dataset.output_shape == (4, 12, 12)
    seen = set()
    for i in range(50):
        target = dataset[i]["target"].numpy()
        labelled = target != IGNORE_INDEX
        assert labelled.any(), i
        assert (labelled.all(axis=(1, 2)) | ~labelled.any(axis=(1, 2))).all()  # whole annotated planes
        seen.add(tuple(labelled.any(axis=(1, 2))))
    assert len(seen) > 2  # the annotated plane falls at different depths of the window
    assert VolumeTileDataset([sparse], tiny_geometry(), TILE, length=3, seed=1)[2]["target"].equal(dataset[2]["target"])


def test_a_window_is_drawn_uniformly_among_those_holding_the_voxel():
    rng = np.random.default_rng(0)
    for voxel in range(10):
        starts = {_covering(rng, 10, 4, voxel) for _ in range(200)}
        assert starts == set(range(max(0, voxel - 3), min(voxel, 6) + 1))
    assert {_covering(rng, 3, 4, 1) for _ in range(50)} == {-1, 0}  # longer than the axis: mirrored, as for dense volumes


def test_dense_volumes_draw_the_same_tiles_as_before():
    dense, _ = deep_samples()
    dataset = VolumeTileDataset([dense], tiny_geometry(), TILE, length=10, seed=3)
    # the uniform windows of the sampler before sparse volumes were sampled differently
    assert [int(dataset[i]["target"].sum()) for i in range(10)] == [298, 103, 414, 105, 300, 203, 0, 14, 225, 235]


def test_a_sparse_volume_changes_only_its_own_tiles():
    dense, sparse = deep_samples()
    _, other = deep_samples(planes=(3,))
    augment = AugmentConfig()
    mixed = VolumeTileDataset([dense, other], tiny_geometry(), TILE, augment=augment, length=12, seed=5)
    plain = VolumeTileDataset([dense, dense], tiny_geometry(), TILE, augment=augment, length=12, seed=5)
    ks = [int(np.random.default_rng([5, i]).choice(2, p=mixed.probabilities)) for i in range(12)]
    assert 0 < sum(ks) < 12
    for i, k in enumerate(ks):
        a, b = mixed[i], plain[i]
        assert all(a[key].equal(b[key]) for key in a) == (k == 0), i


def test_a_volume_with_no_labelled_voxel_is_sampled_uniformly():
    image, labels = synthetic_cells_3d(DEEP, seed=0)
    nothing = make_volume_sample(image, labels, spacing=SPACING, unlabelled=np.ones(DEEP, bool))
    item = VolumeTileDataset([nothing], tiny_geometry(), TILE, length=1)[0]
    assert (item["target"] == IGNORE_INDEX).all() and (item["weights"] == 0).all()


# -- the loss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dice", [0.0, 1.0])
def test_the_loss_does_not_see_unlabelled_voxels(dice):
    generator = torch.Generator().manual_seed(0)
    target = torch.full((1, 3, 4, 4), IGNORE_INDEX)
    target[0, 1, 2, 3] = 1  # the one labelled voxel
    weights = torch.rand(1, 3, 4, 4, generator=generator) + 0.5
    logits = torch.randn(1, 2, 3, 4, 4, generator=generator, requires_grad=True)
    loss_fn = SegmentationLoss(dice_weight=dice)
    loss = loss_fn(logits, target, weights)
    loss.backward()
    unlabelled = (target == IGNORE_INDEX).unsqueeze(1).expand_as(logits)
    assert logits.grad is not None
    assert torch.count_nonzero(logits.grad[unlabelled]) == 0 and torch.count_nonzero(logits.grad[~unlabelled]) == 2
    changed = torch.where(unlabelled, torch.randn(logits.shape, generator=generator) * 10, logits.detach())
    assert torch.equal(loss_fn(changed, target, weights), loss.detach())


# -- the labels rule -----------------------------------------------------------------------------------


def test_the_labels_rule_is_scored_on_the_annotated_voxels_only():
    truth = np.zeros((6, 20, 20), np.int32)
    truth[:, 2:8, 2:8], truth[:, 10:18, 10:18] = 1, 2
    labelled = np.zeros(truth.shape, bool)
    labelled[[1, 4]] = True
    prob = np.where(truth > 0, 0.9, 0.1).astype(np.float32)
    prob[[0, 2, 3, 5]] = 0.9  # the unannotated planes hold one object joining both cells
    sparse_truth = np.where(labelled, truth, 0)
    assert choose_decision([prob], [sparse_truth], task="objects", labelled=[labelled]).score == 1.0
    assert choose_decision([prob], [sparse_truth], task="objects").score < 0.5


def test_cut_to_labelled_splits_objects_into_their_annotated_parts():
    labels = np.zeros((3, 1, 4), np.int32)
    labels[:, 0, :2], labels[:, 0, 2:] = 7, 8
    labelled = np.array([True, False, True])[:, None, None] & np.ones(labels.shape, bool)
    assert cut_to_labelled(labels, labelled)[:, 0].tolist() == [[1, 1, 2, 2], [0, 0, 0, 0], [3, 3, 4, 4]]
    assert cut_to_labelled(labels, None) is labels


def test_per_plane_validation_scores_only_the_annotated_planes(tmp_path, monkeypatch):
    import unetkit.train

    mask = np.zeros((4, 40, 40), np.uint8)
    mask[:, 5:18, 5:18] = mask[:, 22:35, 20:36] = 255
    mask[[0, 3]] = 7  # unlabelled planes
    image = np.random.default_rng(0).random(mask.shape) + (mask == 255)
    volume = make_volume_sample(image, mask, spacing=(8, 1, 1), per_plane=True, unlabelled=mask == 7)
    seen = []

    def recording(maps, truths, *, labelled=None, **kwargs):
        seen.append((len(maps), [None if k is None else int(k.sum()) for k in labelled]))
        return choose_decision(maps, truths, labelled=labelled, **kwargs)

    monkeypatch.setattr(unetkit.train, "choose_decision", recording)
    config = TrainConfig(dims=3, spacing=(8, 1, 1), depth=2, base_channels=4, tile_size=28, tile_depth=8, optimizer="adam",
                         iterations=1, workers=0, precision_scores=False)
    summary = Trainer(config, [volume], [volume], tmp_path / "run", normalization=Normalization(), progress=False).fit()
    assert summary["decision"]["per_plane"] is True
    assert seen == [(2, [1600, 1600])]  # planes 1 and 2, every pixel of each annotated


# -- the command ---------------------------------------------------------------------------------------


def test_unetkit_train_ignore_label_records_it_and_resume_keeps_it(folder, tmp_path, capsys, monkeypatch):
    import unetkit.train

    masks = []

    def recording(*args, labelled=None, **kwargs):
        masks.extend(labelled)
        return choose_decision(*args, labelled=labelled, **kwargs)

    monkeypatch.setattr(unetkit.train, "choose_decision", recording)
    out = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--out", str(out), *TINY, "--ignore-label", str(IGNORE),
                 "--iterations", "2", "--val", "1", "--val-every", "2"]) == 0
    printed = capsys.readouterr().out
    line = "left out of the loss and the scores: 9600 of 12800 training voxels (75%), 9600 of 12800 validation voxels (75%)"
    assert line in printed
    summary = json.loads(printed[printed.index("{"):])
    assert summary["unlabelled_voxels"]["training"] == {"voxels": 9600, "of": 12800, "percent": 75.0}
    assert summary["decision"] is not None
    assert len(masks) == 1 and np.array_equal(masks[0], tifffile.imread(folder / "masks" / "v1.tif") != IGNORE)
    assert json.loads((out / "config.json").read_text())["ignore_label"] == IGNORE
    assert load_checkpoint(out / "last.pt").train_config["ignore_label"] == IGNORE
    report = (out / "report.html").read_text()
    assert "Unlabelled voxels (--ignore-label 65535)" in report and "v1 plane 5" in report  # the annotated plane nearest the middle (4)

    assert main(["train", "--resume", str(out), "--iterations", "3", "--no-progress"]) == 0
    assert line in capsys.readouterr().out  # the volumes were read with the run's ignore label again
    last = load_checkpoint(out / "last.pt")
    assert last.iteration == 3 and last.train_config["ignore_label"] == IGNORE

    assert main(["train", "--resume", str(out), "--ignore-label", "7"]) == 2
    assert "--ignore-label cannot be changed" in " ".join(capsys.readouterr().err.split())


def test_a_config_without_ignore_label_loads_as_every_voxel_annotated():
    values = TrainConfig(dims=3, spacing=SPACING, depth=2, ignore_label=IGNORE).to_dict()
    del values["ignore_label"]  # a run written before the option existed
    assert TrainConfig.from_dict(values).ignore_label is None


@pytest.mark.parametrize("values, message", [
    (dict(ignore_label=IGNORE), "is for volumes: add --dims 3"),
    (dict(dims=3, ignore_label=1.5), "must be a whole number"),
    (dict(dims=3, ignore_label=True), "must be a whole number"),
])
def test_bad_ignore_label_settings_are_refused(values, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(**values)


@pytest.mark.parametrize("options, message", [
    (["--ignore-label", "65535"], "--ignore-label marks unlabelled voxels of volumes: add --dims 3"),
    (["--ignore-label", "-1"], "--ignore-label marks unlabelled voxels of volumes: add --dims 3"),
    ([*TINY, "--ignore-label", "abc"], "--ignore-label must be a whole number.*got 'abc'"),
    ([*TINY, "--ignore-label", "1.5"], "--ignore-label must be a whole number.*got '1.5'"),
    (["--from", "fluo-nuclei", "--ignore-label", "65535"], "leave out --ignore-label"),
])
def test_bad_ignore_label_options_exit_2_and_create_nothing(folder, tmp_path, capsys, options, message):
    out = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--out", str(out), *options]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()


def test_a_volume_with_every_voxel_ignored_is_named(tmp_path, capsys):
    empty = np.full(SHAPE, IGNORE, np.uint16)
    data = write_folder(tmp_path / "volumes", masks={"v1": empty})
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *TINY, "--ignore-label", str(IGNORE), "--val", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{data / 'masks' / 'v1.tif'}: every voxel has the ignore label 65535" in err
    assert not out.exists()


def test_an_ignore_label_in_no_mask_is_a_warning(folder, tmp_path):
    config = TrainConfig(dims=3, spacing=SPACING, depth=2, base_channels=4, tile_size=28, tile_depth=8, ignore_label=1000,
                         iterations=1, workers=0)
    with pytest.warns(UserWarning, match="--ignore-label 1000: no mask holds this value, so no voxel was ignored"):
        trainer = Trainer.start(config, folder, tmp_path / "run", val=1, progress=False)
    assert unlabelled_voxels(trainer.train_samples) == (0, 12800)
