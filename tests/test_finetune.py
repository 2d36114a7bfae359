"""Fine-tuning from a model: in memory (`fine_tune`) and on the command line (`unetkit train --from`)."""

import json

import numpy as np
import pytest
import tifffile
import torch

from unetkit.checkpoint import load_checkpoint, save_checkpoint
from unetkit.cli import main
from unetkit.data.normalize import Normalization
from unetkit.errors import InputError
from unetkit.finetune import CROSS_CHECK, HELD_OUT_PARTS, fine_tune, prepare_fine_tune
from unetkit.network import UNet
from unetkit.scale import median_diameter, rescaled_shape
from unetkit.synthetic import synthetic_dataset

TILE = 44  # legal for depth 2 (valid padding)


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """ONNX graphs and backend choices in a folder of this module's own, not the user's cache."""
    monkeypatch.setenv("UNETKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "unetkit-cache"))


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny trained-looking object model (width 4, depth 2) as a checkpoint file."""
    torch.manual_seed(3)
    net = UNet(depth=2, base_channels=4, batch_norm=True)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.01)  # weights no fresh initialisation would draw
    path = tmp_path_factory.mktemp("start") / "start.pt"
    save_checkpoint(path, net, normalization=Normalization(), class_names=["background", "cell"],
                    train_config={"depth": 2, "base_channels": 4, "batch_norm": True, "tile_size": TILE, "iterations": 10},
                    decision={"method": "components", "threshold": 0.5, "task": "objects"}, scale={"diameter": 9.0})
    return path


@pytest.fixture(scope="module")
def pairs():
    return synthetic_dataset(3, shape=(52, 60), seed=7)


def stop_after(n):
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) >= n

    return should_stop


def test_training_starts_from_the_start_models_weights(start, pairs, tmp_path):
    images, masks = [p[0] for p in pairs[:2]], [p[1] for p in pairs[:2]]
    trainer = prepare_fine_tune(start, images, masks, tmp_path / "run", seconds=60, should_stop=stop_after(2))
    expected = load_checkpoint(start).model.state_dict()
    for key, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor.cpu(), expected[key]), key
    assert trainer.config.lr == 1e-3 and trainer.config.budget_clock == "cpu" and trainer.config.workers == 0
    summary = trainer.fit()
    assert summary["stopped_by"] == "stopped" and summary["iterations"] == 2
    assert summary["validation"] == HELD_OUT_PARTS
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best.decision and best.model.config == load_checkpoint(start).model.config
    # the masks' objects (19.5 px) are far from the start model's (9 px): trained at its scale
    assert best.scale["input_diameter"] == pytest.approx(median_diameter(masks), abs=0.01)
    assert best.scale["diameter"] == pytest.approx(9.0, rel=0.1)  # measured on the rescaled training masks


def test_objects_far_from_the_start_models_size_are_trained_at_its_scale(start, pairs, tmp_path):
    from unetkit.inference import InferenceOptions, Segmenter

    images, masks = [p[0] for p in pairs], [p[1] for p in pairs]  # three: the last is held out whole
    diameter = median_diameter(masks)
    factor = 9.0 / diameter
    trainer = prepare_fine_tune(start, images, masks, tmp_path / "run", should_stop=stop_after(1))
    shapes = [tuple(s.image.shape[-2:]) for s in trainer.train_samples + trainer.val_samples]
    assert shapes == [(round(52 * factor), round(60 * factor))] * 3
    assert median_diameter([s.instances for s in trainer.train_samples]) == pytest.approx(9.0, rel=0.1)
    facts = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert facts["rescaled_by"] == pytest.approx(factor) and facts["objects_diameter"] == pytest.approx(diameter)
    trainer.fit()
    # the new model segments new images at the scale it was trained at, labels at the input's size
    segmenter = Segmenter.load(tmp_path / "run" / "best.pt", InferenceOptions(device="cpu", backend="torch", tta=False))
    assert segmenter.default_diameter == pytest.approx(diameter, abs=0.01)
    result = segmenter.segment(pairs[2][0])
    assert result.labels.shape == pairs[2][0].shape and segmenter._scaled.factor == pytest.approx(factor, rel=0.01)
    assert any("fine-tuned on objects of" in note for note in result.notes)
    explicit = Segmenter.load(tmp_path / "run" / "best.pt", InferenceOptions(device="cpu", diameter=9.0))
    assert explicit.default_diameter is None and explicit.options.diameter == 9.0  # an option wins
    # --no-rescale: at the images' own scale, nothing recorded
    kept = prepare_fine_tune(start, images, masks, tmp_path / "own", rescale=False, should_stop=stop_after(1))
    assert [tuple(s.image.shape[-2:]) for s in kept.train_samples] == [(52, 60)] * 2 and "input_diameter" not in kept.scale
    images, masks = images[:2], masks[:2]
    # objects near the start model's size (within unetkit.scale.FAR_FACTOR) are left as they are
    loaded = load_checkpoint(start)
    save_checkpoint(tmp_path / "near.pt", loaded.model, normalization=Normalization(), class_names=["background", "cell"],
                    train_config=loaded.train_config, decision=loaded.decision, scale={"diameter": 1.5 * diameter})
    near = prepare_fine_tune(tmp_path / "near.pt", images, masks, tmp_path / "near", should_stop=stop_after(1))
    assert [tuple(s.image.shape[-2:]) for s in near.train_samples] == [(52, 45), (52, 60)]  # image1: no object to hold out
    assert "input_diameter" not in near.scale


def test_two_images_keep_their_last_quarter_for_validation(start, pairs, tmp_path):
    images, masks = [p[0] for p in pairs[::2]], [p[1] for p in pairs[::2]]
    trainer = prepare_fine_tune(start, images, masks, tmp_path / "run", rescale=False, should_stop=stop_after(1))
    assert [tuple(s.image.shape[-2:]) for s in trainer.train_samples] == [(52, 45)] * 2  # cut across the longer side
    assert [tuple(s.image.shape[-2:]) for s in trainer.val_samples] == [(52, 15)] * 2
    np.testing.assert_array_equal(trainer.val_samples[1].instances > 0, masks[1][:, 45:] > 0)
    assert [s.name for s in trainer.val_samples] == ["image0 (held-out part)", "image1 (held-out part)"]
    assert trainer.validation_note == HELD_OUT_PARTS
    facts = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert facts["validation_mode"] == "parts" and facts["note"] == HELD_OUT_PARTS


@pytest.mark.parametrize("count", [1, 2])
def test_parts_without_objects_fall_back_to_a_cross_check(start, pairs, tmp_path, count):
    images, masks = [p[0] for p in pairs[:count]], [p[1].copy() for p in pairs[:count]]
    for mask in masks:
        mask[:, 40:] = 0  # no object in the last quarter
    trainer = prepare_fine_tune(start, images, masks, tmp_path / "run", rescale=False, should_stop=stop_after(3))
    assert trainer.validation_note == CROSS_CHECK and [tuple(s.image.shape[-2:]) for s in trainer.train_samples] == [(52, 60)] * count
    trainer.fit()
    # A cross-check cannot compare the precise statistics with each image's own (they were measured there).
    assert load_checkpoint(tmp_path / "run" / "best.pt").decision["image_statistics"] is False


def test_a_model_fine_tuned_at_its_start_scale_refuses_large_images_it_cannot_rescale(start, pairs, tmp_path):
    from unetkit.bigsegment import segment_large

    best = fine_tune(str(start), [pairs[0][0]], [pairs[0][1]], tmp_path / "run", seconds=60, should_stop=stop_after(1),
                     precision_scores=False)
    with pytest.raises(InputError, match=r"was fine-tuned on objects of [\d.]+ px and rescales each image"):
        segment_large([tmp_path / "never.zarr"], best, tmp_path / "out")


@pytest.mark.parametrize("precise", [True, False])
def test_fine_tuning_ends_with_the_training_images_batch_norm_statistics(start, pairs, tmp_path, precise):
    from unetkit.adapt import batch_norm_layers, gather_statistics

    images, masks = [p[0] for p in pairs[:2]], [p[1] for p in pairs[:2]]
    trainer = prepare_fine_tune(start, images, masks, tmp_path / "run", seconds=60, should_stop=stop_after(3),
                                overrides={"precise_bn": precise})
    assert trainer.config.precise_bn is precise  # the recipe's default is True
    trainer.fit()
    best = load_checkpoint(tmp_path / "run" / "best.pt").model
    gathered = [gather_statistics(best, s.image, trainer.config.tile_size) for s in trainer.train_samples]
    total = sum(g.tiles for g in gathered)
    for i, layer in enumerate(batch_norm_layers(best)):
        mean = sum(g.means[i] * g.tiles for g in gathered) / total
        variance = sum(g.variances[i] * g.tiles for g in gathered) / total
        matches = np.allclose(layer.running_mean.numpy(), mean, atol=1e-5) and \
            np.allclose(layer.running_var.numpy(), variance, rtol=1e-4, atol=1e-6)
        assert matches is precise, i


def test_fine_tune_in_memory_writes_a_loadable_run(start, pairs, tmp_path):
    from unetkit.inference import InferenceOptions, Segmenter

    seen = []
    best = fine_tune(str(start), [pairs[0][0]], [pairs[0][1]], tmp_path / "one", seconds=60,
                     callback=seen.append, should_stop=stop_after(3))
    assert best == tmp_path / "one" / "best.pt" and best.is_file()
    assert [s["iteration"] for s in seen] == [1, 2, 3]
    assert set(seen[0]) >= {"iteration", "loss", "seconds", "budget"} and seen[0]["budget"] == 60
    facts = json.loads((tmp_path / "one" / "finetune.json").read_text())
    assert facts["validation_mode"] == "parts" and facts["note"] == HELD_OUT_PARTS and facts["start"] == str(start)
    result = Segmenter.load(best, InferenceOptions(device="cpu", backend="torch")).segment(pairs[1][0])
    assert result.labels.shape == pairs[1][0].shape


def test_three_images_hold_one_out(start, pairs, tmp_path):
    trainer = prepare_fine_tune(start, [p[0] for p in pairs], [p[1] for p in pairs], tmp_path / "r")
    assert [s.name for s in trainer.val_samples] == ["image2"] and trainer.validation_note is None
    assert json.loads((tmp_path / "r" / "finetune.json").read_text())["validation_mode"] == "held-out"


def test_in_memory_refusals_create_nothing(start, pairs, tmp_path):
    image, mask = pairs[0]
    membranes = np.arange(1, 37).reshape(6, 6).repeat(9, 0).repeat(10, 1)
    membranes[::9, :] = 0
    membranes[:, ::10] = 0
    cases = [
        (dict(start=start, images=[np.stack([image] * 3, -1)], masks=[mask]), "3-channel image"),
        (dict(start=start, images=[image], masks=[membranes[:52, :60]]), "membrane masks"),
        (dict(start=tmp_path, images=[image], masks=[mask]), "checkpoint"),
        (dict(start=start, images=[image], masks=[]), "masks"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            fine_tune(run_dir=tmp_path / "never", **kwargs)
        assert not (tmp_path / "never").exists()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, pairs):
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i, (image, mask) in enumerate(pairs[:2]):
        tifffile.imwrite(root / "images" / f"c{i}.tif", (image * 255).astype(np.uint8))
        tifffile.imwrite(root / "masks" / f"c{i}.tif", mask.astype(np.uint16))
    return root


def test_cli_from_trains_and_resumes(start, folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--from", str(start), "--data", str(folder), "--out", str(out), "--iterations", "2",
                 "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert HELD_OUT_PARTS in said
    for name in ("best.pt", "last.pt", "finetune.json", "data.json", "config.json", "log.csv"):
        assert (out / name).is_file(), name
    assert load_checkpoint(out / "best.pt").decision
    setup = json.loads((out / "data.json").read_text())
    rescaled = {**setup["rescaled"], **setup["scale"]}  # objects of ~19 px, the start model's 9 px
    assert rescaled["factor"] == pytest.approx(9.0 / rescaled["input_diameter"], rel=1e-3)
    assert main(["train", "--resume", str(out), "--iterations", "3", "--no-progress"]) == 0
    last = load_checkpoint(out / "last.pt")
    assert last.iteration == 3  # and it went on at the start model's scale:
    assert last.scale["input_diameter"] == rescaled["input_diameter"] and last.scale["diameter"] == pytest.approx(9.0, rel=0.1)
    from unetkit.train import Trainer

    resumed = Trainer.from_run(out, iterations=4, progress=False)  # the same parts of the same rescaled images
    high, wide = rescaled_shape((52, 60), rescaled["factor"])
    cut = round(wide * 0.75)  # c1 has no object in its last quarter: it trains whole
    assert [tuple(s.image.shape[-2:]) for s in resumed.train_samples] == [(high, cut), (high, wide)]
    assert [tuple(s.image.shape[-2:]) for s in resumed.val_samples] == [(high, wide - cut)]
    assert resumed.scale == last.scale


def test_cli_rescale_option_needs_from(folder, tmp_path, capsys):
    assert main(["train", "--data", str(folder), "--out", str(tmp_path / "never"), "--no-rescale", "--iterations", "1"]) == 2
    assert "--rescale/--no-rescale applies to fine-tuning: add --from MODEL" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_cli_from_refusals_exit_2_and_create_nothing(start, folder, tmp_path, capsys):
    rgb = tmp_path / "rgb"
    (rgb / "images").mkdir(parents=True)
    (rgb / "masks").mkdir()
    for name in ("c0", "c1"):
        tifffile.imwrite(rgb / "images" / f"{name}.tif", np.zeros((40, 40, 3), np.uint8))
        tifffile.imwrite(rgb / "masks" / f"{name}.tif", np.pad(np.ones((10, 10), np.uint16), 15))
    image = folder / "images" / "c0.tif"
    cases = [
        (["--from", str(start), "--data", str(folder), "--width", "8"], "--width 8"),
        (["--from", str(start), "--data", str(folder), "--no-batch-norm"], "--batch-norm"),
        (["--from", str(start), "--data", str(rgb)], "3-channel image"),
        (["--from", str(image), "--data", str(folder)], "not a unetkit checkpoint"),
        (["--from", str(start), "--data", str(folder), "--recipe", "paper"], "--recipe"),
        (["--from", "em-membranes", "--data", str(folder)], "object masks"),
    ]
    for argv, message in cases:
        out = tmp_path / "never"
        assert main(["train", *argv, "--out", str(out), "--iterations", "1", "--no-progress"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
        assert not out.exists(), argv


@pytest.mark.parametrize("bad", ["24", 0, -3.0, True])
def test_a_checkpoint_whose_input_diameter_is_not_a_positive_number_rescales_nothing(start, tmp_path, bad):
    from unetkit.inference import Segmenter

    loaded = load_checkpoint(start)
    save_checkpoint(tmp_path / "m.pt", loaded.model, normalization=Normalization(), class_names=["background", "cell"],
                    scale={"diameter": 9.0, "input_diameter": bad})
    reloaded = load_checkpoint(tmp_path / "m.pt")
    assert reloaded.scale == {"diameter": 9.0} and Segmenter(reloaded).default_diameter is None
