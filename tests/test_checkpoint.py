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
    "weights that do not fit the config": (lambda p: p["model_config"].update(base_channels=3), "size mismatch"),
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
