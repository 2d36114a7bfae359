import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from unetkit.checkpoint import load_checkpoint
from unetkit.cli import main


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, write_cell_folder):
    return write_cell_folder(tmp_path_factory.mktemp("data"))


TINY = ["--depth", "2", "--width", "2", "--tile-size", "34", "--no-progress", "--workers", "0"]


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    code = main(["train", "--data", str(dataset), "--out", str(out), "--iterations", "2", "--val", "cell2",
                 "--val-every", "2", "--checkpoint-every", "1", *TINY])
    assert code == 0
    return out


def test_train_writes_a_run(run):
    for name in ("config.json", "data.json", "log.csv", "last.pt", "best.pt", "curves.png"):
        assert (run / name).is_file(), name
    split = json.loads((run / "data.json").read_text())
    assert split["validation"] == ["cell2"] and "cell2" not in split["train"]


def test_train_uses_the_default_recipe_with_explicit_options_on_top(run):
    from unetkit.recipes import RECIPES

    config = json.loads((run / "config.json").read_text())
    default = RECIPES["default"]
    assert (config["optimizer"], config["batch_norm"], config["lr_schedule"]) == (
        default["optimizer"], default["batch_norm"], default["lr_schedule"])
    assert (config["depth"], config["base_channels"], config["tile_size"]) == (2, 2, 34)  # given: TINY


def test_recipe_paper_and_overrides(dataset, tmp_path):
    out = tmp_path / "paper"
    assert main(["train", "--data", str(dataset), "--out", str(out), "--recipe", "paper", "--iterations", "1",
                 "--no-gray", "--zoom", "--lr-schedule", "poly", *TINY]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["optimizer"], config["momentum"], config["batch_norm"], config["targets"]["w0"], config["targets"]["sigma"]) == ("sgd", 0.99, False, 10.0, 5.0)
    assert config["lr_schedule"] == "poly" and config["augment"]["elastic"] and not config["augment"]["noise"]
    assert config["augment"]["scale"] and config["augment"]["scale_range"] == [0.75, 1.33]


def test_unknown_recipe_lists_the_known_ones(dataset, tmp_path, capsys):
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "r"), "--recipe", "fast", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "unetkit: error: unknown recipe 'fast'; known recipes: paper, default"
    assert not (tmp_path / "r").exists()


def test_resume_continues(run):
    assert main(["train", "--resume", str(run), "--iterations", "3", "--no-progress"]) == 0
    rows = (run / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3


def test_predict_writes_probabilities_and_labels(run, dataset, tmp_path, capsys):
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(run / "best.pt"), str(dataset / "images"), "--out", str(out), "--no-progress"]) == 0
    prob = tifffile.imread(out / "cell0_probabilities.tif")
    labels = tifffile.imread(out / "cell0_labels.tif")
    assert prob.shape == (2, 48, 56) and prob.dtype == np.float32
    np.testing.assert_allclose(prob.sum(0), 1.0, atol=1e-5)
    assert labels.shape == (48, 56) and labels.dtype == np.uint16
    # never overwrite without --force: a rerun skips complete images and writes only what is missing
    before = (out / "cell0_labels.tif").read_bytes()
    (out / "cell1_labels.tif").unlink()
    capsys.readouterr()
    assert main(["predict", "--model", str(run / "best.pt"), str(dataset / "images"), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "skipping 2 image(s) whose outputs already exist" in printed and "wrote 1 files" in printed
    assert (out / "cell0_labels.tif").read_bytes() == before and (out / "cell1_labels.tif").is_file()
    assert main(["predict", "--model", str(run / "best.pt"), str(dataset / "images" / "cell1.tif"), "--out", str(out),
                 "--tta", "--tile-size", "38", "--force", "--no-progress", "--labels", "binary"]) == 0
    assert set(np.unique(tifffile.imread(out / "cell1_labels.tif"))) <= {0, 1}


def test_bad_input_is_one_line_and_exit_2(run, dataset, tmp_path, capsys):
    cases = [
        (["train", "--data", str(dataset), "--out", str(run), *TINY], "not empty"),
        (["train", "--data", str(dataset), "--out", str(tmp_path / "r1"), "--depth", "2", "--tile-size", "35", "--no-progress"], "34 or 36"),
        (["train", "--data", str(tmp_path), "--out", str(tmp_path / "r2"), *TINY], str(tmp_path)),
        (["predict", "--model", str(dataset / "images" / "cell0.tif"), str(dataset / "images"), "--out", str(tmp_path / "p")], "not a unetkit checkpoint"),
        (["predict", "--model", str(run / "best.pt"), str(dataset / "images"), "--out", str(tmp_path / "p"), "--tile-size", "35"], "34 or 36"),
        (["train", "--resume", str(tmp_path)], "not a run folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err, (argv, err)
        assert len(err.splitlines()) == 1, err


def test_missing_mask_and_size_mismatch(dataset, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    (broken / "masks" / "cell1.tif").unlink()
    assert main(["train", "--data", str(broken), "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "cell1" in capsys.readouterr().err
    tifffile.imwrite(broken / "masks" / "cell1.tif", np.zeros((10, 10), np.uint16))
    assert main(["train", "--data", str(broken), "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "cell1" in capsys.readouterr().err


def test_python_dash_m_help():
    result = subprocess.run([sys.executable, "-m", "unetkit", "--help"], capture_output=True, text=True, check=True)
    for command in ("demo", "train", "predict", "evaluate"):
        assert command in result.stdout


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seconds", "4", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["test_foreground_iou"] <= 1.0
    assert tifffile.imread(out / "test_probabilities.tif").shape == (2, 520, 600)
    assert (out / "test_overlay.png").stat().st_size > 1000
    assert "foreground IoU" in capsys.readouterr().out
    assert main(["demo", "--out", str(out), "--seconds", "1", "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_evaluate_scores_what_predict_writes(run, dataset, tmp_path, capsys):
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(run / "best.pt"), str(dataset / "images"), "--out", str(out), "--no-progress"]) == 0
    for use in ("probabilities", "labels"):
        report = tmp_path / f"{use}.json"
        code = main(["evaluate", "--pred", str(out), "--gt", str(dataset / "masks"), "--use", use,
                     "--metrics", "pixel,iou,seg", "--json", str(report)])
        assert code == 0, capsys.readouterr().err
        scores = json.loads(report.read_text())
        text = json.dumps(scores)
        assert "cell0" in text and "cell2" in text


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("unetkit: error: ") and len(err.splitlines()) == 1, err
    return err


def test_command_line_imports_neither_torch_nor_scipy():
    code = ("import sys, unetkit.cli; unetkit.cli._register_commands(); "
            "print(sorted(m for m in ('torch', 'scipy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    code = "import unetkit.predict, unetkit; print(type(unetkit.predict).__name__, type(unetkit.UNet).__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["function", "type"]  # the submodule does not shadow the function
    result = subprocess.run([sys.executable, "-m", "unetkit", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "unetkit 0.1.0"


def test_ctrl_c_in_train_keeps_the_iteration_and_says_how_to_resume(dataset, tmp_path, monkeypatch, capsys):
    train_module = importlib.import_module("unetkit.train")
    real_loss, calls = train_module.SegmentationLoss, {"n": 0}

    def loss_interrupted_at_step_3(*args, **kwargs):
        loss = real_loss(*args, **kwargs)

        def call(*inputs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return loss(*inputs)

        return call

    monkeypatch.setattr(train_module, "SegmentationLoss", loss_interrupted_at_step_3)
    out = tmp_path / "run"
    argv = ["train", "--data", str(dataset), "--out", str(out), "--iterations", "4", "--checkpoint-every", "3", *TINY]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("unetkit: interrupted") and len(err.splitlines()) == 1
    assert "iteration 2" in err and f"unetkit train --resume {out}" in err
    assert load_checkpoint(out / "last.pt").iteration == 2
    monkeypatch.undo()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert load_checkpoint(out / "last.pt").iteration == 4


def test_ctrl_c_in_predict_says_which_images_are_done(run, dataset, tmp_path, monkeypatch, capsys):
    from unetkit.inference import Segmenter

    real_probabilities, calls = Segmenter.probabilities, {"n": 0}

    def interrupted_at_the_second_image(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_probabilities(self, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "probabilities", interrupted_at_the_second_image)
    out = tmp_path / "pred"
    argv = ["predict", "--model", str(run / "best.pt"), str(dataset / "images"), "--out", str(out), "--no-progress"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("unetkit: interrupted") and len(err.splitlines()) == 1
    assert "1 of 3 image(s) segmented (cell0.tif)" in err and "not done: cell1.tif, cell2.tif" in err
    assert sorted(p.name for p in out.iterdir()) == ["cell0_labels.tif", "cell0_probabilities.tif"]
    monkeypatch.undo()
    assert main(argv) == 0
    assert "skipping 1 image(s) whose outputs already exist" in capsys.readouterr().out
    assert len(list(out.glob("cell*_*.tif"))) == 6


def test_predict_ctc_masks_are_numbered_by_frame(run, dataset, tmp_path, capsys):
    frames = tmp_path / "01"
    frames.mkdir()
    for name, source in (("t041.tif", "cell0.tif"), ("t043.tif", "cell1.tif")):
        shutil.copy(dataset / "images" / source, frames / name)
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(run / "best.pt"), str(frames), "--out", str(out), "--ctc", "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "ctc").iterdir()) == ["mask041.tif", "mask043.tif"]
    np.testing.assert_array_equal(tifffile.imread(out / "ctc" / "mask043.tif"), tifffile.imread(out / "t043_labels.tif"))
    capsys.readouterr()
    other = tmp_path / "other"
    assert main(["predict", "--model", str(run / "best.pt"), str(dataset / "images"), "--out", str(other), "--ctc"]) == 2
    err = one_line_error(capsys)
    assert "cell0.tif" in err and "no frame number" in err
    assert not other.exists()


@pytest.mark.parametrize(
    "options, words",
    [
        (["--iterations", "0"], "--iterations must be >= 1"),
        (["--seconds", "0"], "--seconds must be > 0"),
        (["--seconds", "-5"], "--seconds must be > 0"),
        (["--epochs", "0"], "--epochs must be > 0"),
        (["--epochs", "-1"], "--epochs must be > 0"),
        (["--tile-size", "91"], "--tile-size 91 is not legal"),
        (["--depth", "0"], "--depth must be >= 2"),
        (["--padding", "foo"], "--padding must be 'valid'"),
        (["--device", "gpu"], "use one of auto, cpu, cuda, cuda:N, mps"),
        (["--val-split", "middle"], "--val-split must be last or random"),
    ],
)
def test_train_options_are_checked_before_the_run_folder_is_created(dataset, tmp_path, capsys, options, words):
    out = tmp_path / "run"
    assert main(["train", "--data", str(dataset), "--out", str(out), *TINY, *options]) == 2
    assert words in one_line_error(capsys)
    assert not out.exists()  # so the corrected command is not refused as "not empty"


def test_demo_and_predict_options_are_checked_first(run, dataset, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--seconds", "-1"]) == 2
    assert "--seconds must be > 0" in one_line_error(capsys)
    assert main(["predict", "--model", str(run / "best.pt"), str(dataset / "images"), "--out", str(tmp_path / "p"),
                 "--device", "gpu"]) == 2
    assert "'gpu' is not a device; use one of auto, cpu, cuda, cuda:N, mps" in one_line_error(capsys)
    assert not (tmp_path / "demo").exists() and not (tmp_path / "p").exists()


def test_unwritable_outputs_are_refused_before_any_work(run, dataset, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("computed before checking the output")

    monkeypatch.setattr(importlib.import_module("unetkit.inference").Segmenter, "probabilities", never)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access  # root may write anywhere: report the folder read-only as for a user
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    locked.chmod(0o555)
    model, images = str(run / "best.pt"), str(dataset / "images")
    cases = [
        (["predict", "--model", model, images, "--out", str(locked / "pred")], "permission denied"),
        (["train", "--data", str(dataset), "--out", str(locked / "run"), *TINY], "permission denied"),
        (["evaluate", "--pred", str(dataset / "masks"), "--gt", str(dataset / "masks"), "--json", str(locked / "s.json")],
         "permission denied"),
        (["predict", "--model", model, images, "--out", str(dataset / "images" / "cell0.tif")], "is a file, not a folder"),
        (["predict", "--model", model, images, "--out", images], "--out is the input folder"),
    ]
    try:
        for argv, words in cases:
            assert main(argv) == 2, argv
            assert words in one_line_error(capsys), argv
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def test_unreadable_input_stops_predict_before_anything_is_written(run, dataset, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(dataset / "images", images)
    (images / "broken.png").write_bytes(b"")
    (images / "._cell0.tif").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata: never an input
    out = tmp_path / "pred"
    argv = ["predict", "--model", str(run / "best.pt"), str(images), "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "broken.png: empty file" in err and "--skip-unreadable" in err and "pip" not in err
    assert not out.exists()
    assert main([*argv, "--skip-unreadable"]) == 0
    assert "skipping 1 unreadable input(s): broken.png" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [f"cell{k}_{kind}.tif" for k in range(3) for kind in ("labels", "probabilities")]


@pytest.mark.parametrize(
    "name, array, options, words",
    [
        ("stack.tif", np.zeros((5, 48, 56, 3), np.uint8), {"photometric": "rgb"}, "unetkit segments stacks of one-channel planes"),
        ("nan.tif", np.full((48, 56), np.nan, np.float32), {}, "NaN"),
    ],
)
def test_predict_messages_name_the_file(run, tmp_path, capsys, name, array, options, words):
    tifffile.imwrite(tmp_path / name, array, **options)
    argv = ["predict", "--model", str(run / "best.pt"), str(tmp_path / name), "--out", str(tmp_path / "pred"), "--no-progress"]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert f"{tmp_path / name}:" in err and words in err


def test_swapped_images_and_masks_are_refused(dataset, tmp_path, capsys):
    swapped = tmp_path / "swapped"
    shutil.copytree(dataset / "images", swapped / "masks")
    shutil.copytree(dataset / "masks", swapped / "images")
    out = tmp_path / "run"
    assert main(["train", "--data", str(swapped), "--out", str(out), *TINY]) == 2
    err = one_line_error(capsys)
    assert "does not look like a mask" in err and "swapped" in err and "--allow-intensity-masks" in err
    assert not out.exists()
    assert main(["train", "--data", str(swapped), "--out", str(out), "--iterations", "1", "--allow-intensity-masks", *TINY]) == 0


def test_warnings_are_one_line(dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    shutil.copy(data / "masks" / "cell0.tif", data / "masks" / "orphan.tif")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--val", "nope", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("unetkit: warning: masks without an image are ignored") and "orphan.tif" in err[0]
    assert len(err) == 2 and err[1].startswith("unetkit: error:")


def test_resume_refuses_changed_options_and_accepts_a_moved_dataset(dataset, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(dataset, data)
    assert main(["train", "--data", str(data), "--out", str(out), "--iterations", "2", "--val", "cell2", *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--iterations", "3", "--tile-size", "36", "--lr", "0.1", "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert "--tile-size, --lr cannot be changed" in err and "Fixed by the run" in err
    moved = tmp_path / "moved"
    data.rename(moved)
    assert main(["train", "--resume", str(out), "--iterations", "3", "--no-progress"]) == 2
    assert "if it moved, give its new place with --data" in one_line_error(capsys)
    from unetkit.io import _host

    dead = subprocess.Popen(["true"])
    dead.wait()  # a process that has ended: its temporary files are stale
    stale = out / f".curves.png.unetkit-tmp.{_host()}.{dead.pid}.k3j_9x2a.png"
    stale.write_bytes(b"")  # left by kill -9 during a write
    assert main(["train", "--resume", str(out), "--data", str(moved), "--iterations", "3", "--no-progress"]) == 0
    assert json.loads((out / "data.json").read_text())["data"] == str(moved.resolve())
    assert not stale.exists()
    assert load_checkpoint(out / "last.pt").iteration == 3


def test_resume_says_exactly_what_is_missing(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")  # kill -9 before the first checkpoint
    (out / "data.json").write_text("{}")
    assert main(["train", "--resume", str(out)]) == 2
    err = one_line_error(capsys)
    assert "last.pt is missing (config.json and data.json are there)" in err and "before its first checkpoint" in err


def test_predict_follows_the_labels_rule_stored_in_the_checkpoint(run, dataset, tmp_path):
    import unetkit
    from dataclasses import replace

    from unetkit.decision import DecisionRule

    loaded = load_checkpoint(run / "best.pt")
    rule = DecisionRule.from_dict(loaded.decision)
    assert rule.tta and rule.task in ("objects", "membranes")
    image = dataset / "images" / "cell2.tif"
    assert main(["predict", "--model", str(run / "best.pt"), str(image), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    probabilities = tifffile.imread(tmp_path / "a" / "cell2_probabilities.tif")
    expected = unetkit.predict(loaded.model, loaded.normalization(tifffile.imread(image)), tta=True)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)  # the rule's test-time augmentation
    assert np.array_equal(tifffile.imread(tmp_path / "a" / "cell2_labels.tif"), rule.apply(probabilities[1]))
    # an explicit threshold replaces the stored rule's, the rest of the rule stays
    assert main(["predict", "--model", str(run / "best.pt"), str(image), "--out", str(tmp_path / "b"), "--no-progress",
                 "--threshold", "0.7", "--no-tta"]) == 0
    probabilities = tifffile.imread(tmp_path / "b" / "cell2_probabilities.tif")
    assert np.array_equal(tifffile.imread(tmp_path / "b" / "cell2_labels.tif"), replace(rule, threshold=0.7).apply(probabilities[1]))


def test_a_bug_keeps_its_traceback(run, dataset, tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise ValueError("not a user mistake")

    monkeypatch.setattr(importlib.import_module("unetkit.inference").Segmenter, "probabilities", bug)
    with pytest.raises(ValueError, match="not a user mistake"):
        main(["predict", "--model", str(run / "best.pt"), str(dataset / "images"), "--out", str(tmp_path / "p"),
              "--no-progress"])


def test_every_command_declares_its_options_with_annotated():
    import inspect

    from unetkit.cli import _register_commands, app

    _register_commands()
    for command in app.registered_commands:
        for parameter in inspect.signature(command.callback).parameters.values():
            assert type(parameter.default).__name__ not in ("OptionInfo", "ArgumentInfo"), (command.name, parameter.name)


# -- train: every option and run file checked, one line each, before anything is written ---------------


def run_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize(
    "options, message",
    [
        (["--weight-decay", "-1"], "--weight-decay must be >= 0 (got -1.0)"),
        (["--momentum", "2"], "--momentum must be in [0, 1) (got 2.0); the paper uses 0.99"),
        (["--momentum", "1"], "--momentum must be in [0, 1) (got 1.0); the paper uses 0.99"),
        (["--lr", "inf"], "--lr must be finite and > 0 (got inf)"),
        (["--lr", "0"], "--lr must be > 0 (got 0.0)"),
        (["--seconds", "inf"], "--seconds must be finite and > 0 (got inf)"),
        (["--epochs", "inf"], "--epochs must be finite and > 0 (got inf)"),
        (["--seed", "-1"], "--seed must be >= 0 (got -1)"),
        (["--dice", "-1"], "--dice must be >= 0 (got -1.0)"),
        (["--val-every", "0"], "--val-every must be >= 1 (got 0)"),
        (["--width", "0"], "--width must be >= 1 (got 0); the paper uses 64"),
        (["--workers", "-1"], "--workers must be >= 0 (got -1)"),
        (["--val", "5"], "--val 5: a count of validation images must leave at least one for training, and the dataset "
                         "has 3 image(s); give a count below 3 or a fraction"),
        (["--val", "1", "--val-data", "."], "give --val (images of --data) or --val-data (a separate folder), not both"),
        (["--class-weights", "1,x"], "--class-weights must be 'balanced' or numbers like '1,1' (got '1,x')"),
    ],
)
def test_train_refuses_bad_options_in_one_line_before_creating_anything(dataset, tmp_path, capsys, options, message):
    out = tmp_path / "run"
    assert main(["train", "--data", str(dataset), "--out", str(out), *TINY, *options]) == 2
    assert one_line_error(capsys) == f"unetkit: error: {message}"
    assert not out.exists()


def test_train_val_names_every_name_not_in_the_dataset(dataset, tmp_path, capsys):
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "run"), "--val", "cell1,cell7,nope", *TINY]) == 2
    assert one_line_error(capsys) == ("unetkit: error: validation image(s) 'cell7', 'nope' not in the dataset (--val); "
                                      "known names: cell0, cell1, cell2")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "name, text, problem",
    [
        ("config.json", "{", "damaged, not JSON"),
        ("config.json", "[1, 2]", "holds a list, not a JSON object"),
        ("data.json", '"data"', "holds a str, not a JSON object"),
        ("config.json", None, "lacks depth"),  # the key removed from the run's own file
        ("config.json", {"lr": "fast"}, "lr must be a number > 0 (got 'fast')"),
        ("config.json", {"batch_norm": "yes"}, "batch_norm must be true or false (got 'yes')"),
        ("config.json", {"targets": 3}, "targets must be a TargetConfig or a mapping of its settings (got 3)"),
        ("data.json", None, "lacks data"),
        ("data.json", {"train": "cell0"}, "train must be a list of image names (got 'cell0')"),
        ("data.json", {"val_split": "middle"}, "val_split must be 'last' or 'random' (got 'middle')"),
    ],
)
def test_resume_names_a_malformed_run_file_and_the_fix(run, tmp_path, capsys, name, text, problem):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    path = copy / name
    if text is None or isinstance(text, dict):
        values = json.loads(path.read_text())
        if text is None:
            del values["depth" if name == "config.json" else "data"]
        else:
            values.update(text)
        text = json.dumps(values)
    path.write_text(text)
    before = run_files(copy)
    assert main(["train", "--resume", str(copy), "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"unetkit: error: {path}: {problem}"), err
    assert err.endswith("the run cannot be resumed from it: restore the file, or start a new run with --out")
    assert run_files(copy) == before


def test_resume_refuses_fewer_iterations_than_done_and_leaves_the_run_untouched(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    done = load_checkpoint(copy / "last.pt").iteration
    before = run_files(copy)
    for iterations in (1, done):
        assert main(["train", "--resume", str(copy), "--iterations", str(iterations), "--no-progress"]) == 2
        assert one_line_error(capsys) == (f"unetkit: error: {copy} has done {done} iterations; "
                                          f"--iterations must be more than {done}")
        assert run_files(copy) == before  # config.json byte-identical: a later resume still works
    assert main(["train", "--resume", str(copy), "--seconds", "inf", "--no-progress"]) == 2
    assert one_line_error(capsys) == "unetkit: error: --seconds must be finite and > 0 (got inf)"
    assert run_files(copy) == before
    assert main(["train", "--resume", str(copy), "--iterations", str(done + 1), "--no-progress"]) == 0
    assert load_checkpoint(copy / "last.pt").iteration == done + 1


def test_train_names_a_dangling_link_in_the_dataset(dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    (data / "images" / "cell3.tif").symlink_to(tmp_path / "elsewhere" / "cell3.tif")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *TINY]) == 2
    assert one_line_error(capsys) == (f"unetkit: error: {data / 'images' / 'cell3.tif'}: a link to "
                                      f"{tmp_path / 'elsewhere' / 'cell3.tif'}, which does not exist; restore the file "
                                      "or remove the link")
    assert not out.exists()


def test_a_run_folder_is_never_read_as_data(dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    images = sorted(p.name for p in (data / "images").iterdir())
    for folder in ("images", "masks"):
        assert main(["train", "--data", str(data), "--out", str(data / folder), "--force", *TINY]) == 2
        assert one_line_error(capsys) == (f"unetkit: error: {data / folder}: --out is a folder the dataset {data} is "
                                          "read from, so the run's files would be read as data; choose a run folder outside it")
    assert sorted(p.name for p in (data / "images").iterdir()) == images
    # a run folder elsewhere inside the dataset folder is not read: the next run sees the same images
    for out in ("run", "run2"):
        assert main(["train", "--data", str(data), "--out", str(data / out), "--iterations", "1", "--val", "1", *TINY]) == 0
        assert "2 training and 1 validation images" in capsys.readouterr().out


@pytest.mark.parametrize("options, message", [(["--seconds", "inf"], "--seconds must be finite and > 0 (got inf)"),
                                              (["--seed", "-1"], "--seed must be >= 0 (got -1)")])
def test_demo_refuses_what_training_would_refuse_before_creating_its_folder(tmp_path, capsys, options, message):
    assert main(["demo", "--out", str(tmp_path / "demo"), *options]) == 2
    assert one_line_error(capsys) == f"unetkit: error: {message}"
    assert not (tmp_path / "demo").exists()
