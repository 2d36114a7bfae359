"""Malformed checkpoints end in one message that names the file."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from unetkit import UNet
from unetkit.checkpoint import load_checkpoint, save_checkpoint
from unetkit.cli import main
from unetkit.data import Normalization
from unetkit.errors import InputError


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.pt"
    save_checkpoint(path, UNet(depth=2, base_channels=2), normalization=Normalization(), class_names=["bg", "cell"])
    return path


def _edit(good, tmp_path, change) -> str:
    payload = torch.load(good, weights_only=True)
    change(payload)
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    return str(path)


CHANGES = {
    "weights that do not fit the config": (lambda p: p["model_config"].update(base_channels=3), "base_channels=3"),
    "a missing weight": (lambda p: p["state_dict"].pop("head.bias"), "Missing key"),
    "a missing entry": (lambda p: p.pop("state_dict"), "'state_dict' is missing"),
    "an unknown network setting": (lambda p: p["model_config"].update(bogus=1), "bogus"),
    "an unknown normalisation setting": (lambda p: p["normalization"].update(bogus=1), "bogus"),
}


@pytest.mark.parametrize("what", CHANGES)
def test_malformed_checkpoint_names_the_file(good, tmp_path, what):
    change, words = CHANGES[what]
    path = _edit(good, tmp_path, change)
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: damaged or incompatible unetkit checkpoint") and words in message
    assert "\n" not in message


def test_cli_predict_with_a_malformed_checkpoint_is_one_line(good, tmp_path, capsys):
    path = _edit(good, tmp_path, CHANGES["weights that do not fit the config"][0])
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((20, 20), np.uint8))
    assert main(["predict", "--model", path, str(tmp_path / "a.tif"), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"unetkit: error: {path}:") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


EDITED = {
    # An edited config would build a network of gigabytes before the weights were compared with it.
    "30 levels": (lambda p: p["model_config"].update(depth=30), "depth=30 but the weights have depth=2"),
    "width 4096": (lambda p: p["model_config"].update(base_channels=4096), "base_channels=4096 but the weights have base_channels=2"),
    "3 input channels": (lambda p: p["model_config"].update(in_channels=3), "in_channels=3 but the weights have in_channels=1"),
    "5 classes": (lambda p: p["model_config"].update(n_classes=5), "n_classes=5 but the weights have n_classes=2"),
    "NaN weights": (lambda p: p["state_dict"]["head.weight"].fill_(float("nan")), "weight head.weight holds NaN or infinite"),
    "infinite weights": (lambda p: p["state_dict"]["down.0.0.bias"].fill_(float("inf")), "weight down.0.0.bias holds NaN or infinite"),
    "an unknown rule setting": (lambda p: p.update(decision={"method": "components", "bogus": 1}), "bogus"),
    "an unknown rule method": (lambda p: p.update(decision={"method": "magic"}), "decision method 'magic'"),
}


@pytest.mark.parametrize("what", EDITED)
def test_edited_checkpoint_is_refused_before_the_network_is_built(good, tmp_path, what, monkeypatch):
    import unetkit.checkpoint as checkpoint_module

    change, words = EDITED[what]
    path = _edit(good, tmp_path, change)
    built = []
    monkeypatch.setattr(checkpoint_module, "UNet", lambda **config: built.append(config))
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: damaged or incompatible unetkit checkpoint") and words in message
    assert "\n" not in message and built == []


@pytest.fixture
def trained_last(tmp_path):
    """A run's last.pt of iteration 3 (train_config set, as `Trainer` writes it)."""
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(path, UNet(depth=2, base_channels=2), normalization=Normalization(), class_names=["bg", "cell"],
                    train_config={"depth": 2}, iteration=3)
    return path


WRITE_FAILURES = {
    "disk full": (OSError(28, "No space left on device"), "the disk is full (errno 28)", "Free disk space"),
    "read-only": (OSError(30, "Read-only file system"), "the file system is read-only (errno 30)", "Make the folder writable"),
    "too large": (OSError(27, "File too large"), "the file is too large for this file system (errno 27)", "Use a file system that allows larger files"),
    "zip writer": (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
                   "the write failed ([enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0)", "Check free disk space and permissions"),
}


@pytest.mark.parametrize("what", WRITE_FAILURES)
def test_a_failed_checkpoint_write_keeps_the_previous_file(trained_last, monkeypatch, what):
    error, reason, fix = WRITE_FAILURES[what]
    before = trained_last.read_bytes()
    real_save = torch.save

    def failing_save(payload, target):
        real_save(payload, target)  # a partly written temporary file
        raise error

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(InputError) as info:
        save_checkpoint(trained_last, UNet(depth=2, base_channels=2), normalization=Normalization(),
                        class_names=["bg", "cell"], train_config={"depth": 2}, iteration=5)
    message = str(info.value)
    assert message == (f"{trained_last}: cannot write the checkpoint of iteration 5: {reason}; the previous last.pt is "
                       f"unchanged. {fix}, then continue with `unetkit train --resume {trained_last.parent}`")
    assert trained_last.read_bytes() == before
    assert sorted(p.name for p in trained_last.parent.iterdir()) == ["last.pt"]  # no temporary file left
