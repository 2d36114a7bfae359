"""Training in bf16 and the per-precision scores a run keeps for `--precision auto`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unetkit import backends
from unetkit.cli import main
from unetkit.data import Normalization, make_sample
from unetkit.errors import InputError
from unetkit.synthetic import synthetic_dataset
from unetkit.train import TrainConfig, Trainer, training_autocast

NORM = Normalization()


@pytest.fixture(scope="module")
def samples():
    return [make_sample(img, lab, f"s{i}", NORM) for i, (img, lab) in enumerate(synthetic_dataset(3, shape=(64, 64), seed=3))]


def tiny_config(**overrides) -> TrainConfig:
    values = dict(depth=2, base_channels=4, tile_size=34, iterations=2, val_every=2, checkpoint_every=2, lr=0.01,
                  seed=0, workers=0, batch_norm=True)
    return TrainConfig(**{**values, **overrides})


def test_bf16_autocast_covers_the_forward_pass_only():
    layer = torch.nn.Linear(4, 4)
    with training_autocast("bf16", torch.device("cpu")):
        out = layer(torch.ones(2, 4))
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32  # fp32 master weights
    with training_autocast("fp32", torch.device("cpu")):
        assert layer(torch.ones(2, 4)).dtype == torch.float32


def test_a_bf16_step_changes_the_fp32_weights_differently(samples, tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "bf16_native", lambda device="cpu": True)  # autocast runs (emulated) on any CPU
    weights = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(tiny_config(precision=precision, iterations=1, choose_decision=False), samples[:2], [],
                          tmp_path / precision, normalization=NORM, progress=False)
        trainer.fit()
        weights[precision] = [p.detach().clone() for p in trainer.model.parameters()]
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    differences = [float((a - b).abs().max()) for a, b in zip(weights["fp32"], weights["bf16"])]
    assert max(differences) > 0  # the bf16 forward pass was used


def test_bf16_training_is_refused_without_native_bf16(samples, tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "bf16_native", lambda device="cpu": False)
    with pytest.raises(InputError, match=r"--precision bf16 needs native bf16 .* use --precision fp32"):
        Trainer(tiny_config(precision="bf16"), samples[:2], [], tmp_path / "run", normalization=NORM, progress=False)


def test_the_cli_refuses_an_unknown_training_precision(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--precision", "fp16"]) == 2
    assert "precision must be 'fp32' or 'bf16'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_finished_run_keeps_its_rule_score_per_precision(samples, tmp_path, monkeypatch):
    monkeypatch.setenv("UNETKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(backends, "bf16_native", lambda device="cpu": True)
    monkeypatch.setattr(backends, "int8_available", lambda: False)
    trainer = Trainer(tiny_config(), samples[:2], samples[2:], tmp_path / "run", normalization=NORM, progress=False)
    summary = trainer.fit()
    stored = json.loads((tmp_path / "run" / "best.precision.json").read_text())
    assert sorted(stored["rule_scores"]) == ["bf16", "fp32"] and summary["precision_scores"] == stored["rule_scores"]
    rule = summary["decision"]
    assert stored["tta"] == rule["tta"] and stored["scored_on"] == ["s2"]
    assert np.isclose(stored["rule_scores"]["fp32"], summary["decision_scores"][stored["norm_statistics"]])


def test_only_fp32_here_stores_nothing(samples, tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "bf16_native", lambda device="cpu": False)
    monkeypatch.setattr(backends, "int8_available", lambda: False)
    Trainer(tiny_config(), samples[:2], samples[2:], tmp_path / "run", normalization=NORM, progress=False).fit()
    assert (tmp_path / "run" / "best.pt").is_file() and not (tmp_path / "run" / "best.precision.json").exists()
