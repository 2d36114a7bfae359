"""The packaged pretrained models: registry, packing, loading by name, `unetkit models`, input checks."""

import json
import warnings

import numpy as np
import pytest
import tifffile
import torch

from unetkit import pretrained
from unetkit.checkpoint import load_checkpoint, load_pretrained, pack_checkpoint, save_checkpoint
from unetkit.cli import main
from unetkit.data import Normalization, data_root
from unetkit.errors import InputError
from unetkit.network import UNet
from unetkit.pretrained import check_input, list_models, model_path
from unetkit.targets import TargetConfig

NAMES = ["em-membranes", "dic-hela", "fluo-nuclei"]
KNOWN = "known models: em-membranes, dic-hela, fluo-nuclei"

# Held-out image each packaged model is checked on, and its score floor (em: Rand error at most;
# cells: SEG at least). ISBI slice 20 is the one with membranes fainter than any training slice's.
HELD_OUT = {"em-membranes": 20, "dic-hela": 50, "fluo-nuclei": 31}
FLOORS = {"em-membranes": 0.06, "dic-hela": 0.85, "fluo-nuclei": 0.75}  # measured 0.028, 0.930, 0.839 (no TTA)


# -- registry ------------------------------------------------------------------------------------


def test_registry_lists_the_three_models():
    models = list_models()
    assert [m.name for m in models] == NAMES
    for m in models:
        assert m.file == f"{m.name}.pt" and m.path == pretrained.MODELS_DIR / m.file
        assert m.input.channels == 1 and m.input.dtype == "uint8" and m.input.value_range == (0, 255)
        assert m.trained_on and m.license and m.recipe == "default" and m.task in ("membranes", "objects")
        assert not set(m.train_ids) & set(m.val_ids) and not set(m.train_ids + m.val_ids) & set(m.test_ids)
        assert isinstance(m.scores, dict) and isinstance(m.training, dict)
    em = pretrained.get_model("em-membranes")
    assert sorted(em.train_ids + em.val_ids) == list(range(20)) and em.test_ids == tuple(range(20, 25))
    dic = pretrained.get_model("dic-hela")
    assert sorted(dic.train_ids + dic.val_ids) == list(range(45)) and dic.test_ids == tuple(range(45, 60))
    fluo = pretrained.get_model("fluo-nuclei")
    assert sorted(fluo.train_ids + fluo.val_ids + fluo.test_ids) == [1, 21, 31, 39, 52, 72]


def test_unknown_name_lists_the_known_ones(tmp_path, capsys):
    with pytest.raises(InputError, match=f"^unknown model 'x'; {KNOWN}$"):
        model_path("x")
    with pytest.raises(InputError, match=KNOWN):
        pretrained.get_model("x")
    with pytest.raises(InputError, match=KNOWN):
        load_checkpoint("x")
    assert main(["models", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"unetkit: error: unknown model 'x'; {KNOWN}"
    # `unetkit predict --model NAME` resolves names through load_checkpoint
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((40, 40), np.uint8))
    assert main(["predict", "--model", "x", str(tmp_path / "a.tif"), "--out", str(tmp_path / "p"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert KNOWN in err and len(err.splitlines()) == 1, err


def test_shipped_models_fit_the_size_limit():
    assert pretrained.total_size() <= pretrained.SIZE_LIMIT == 10_000_000
    recorded = pretrained.read_metadata()
    assert set(recorded) <= set(NAMES)
    for m in list_models():
        if m.installed:  # every shipped weights file comes with its scores, and they describe this file
            assert m.name in recorded and m.scores, m.name
            assert recorded[m.name]["sha256"] == pretrained.file_sha256(m.path), f"{m.name}: models.json is stale"


# -- packing and loading by name -------------------------------------------------------------------


def _tiny_checkpoint(path, decision=None):
    torch.manual_seed(0)
    net = UNet(depth=2, base_channels=2, batch_norm=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.rand(1, 1, 36, 36)).sum().backward()  # an optimiser state, as a training run leaves
    optimizer.step()
    net.eval()
    save_checkpoint(
        path, net, normalization=Normalization(low=2.0), class_names=["background", "cell"],
        train_config={"base_channels": 2, "depth": 2}, iteration=7,
        state={"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "best_iou": 0.5},
        decision=decision or {"method": "components", "threshold": 0.4, "task": "objects"},
    )
    return net


def test_pack_checkpoint_round_trip(tmp_path):
    src = tmp_path / "best.pt"
    net = _tiny_checkpoint(src)
    dst = pack_checkpoint(src, "em-membranes", tmp_path / "packed.pt")
    assert dst == tmp_path / "packed.pt" and not list(tmp_path.glob(".*"))  # atomic: no temporary left
    assert dst.stat().st_size < src.stat().st_size
    payload = torch.load(dst, weights_only=True)
    floats = {k: v for k, v in payload["state_dict"].items() if v.is_floating_point()}
    assert floats and all(v.dtype == torch.float16 for v in floats.values())
    assert payload["state"] == {} and payload["pretrained"]["name"] == "em-membranes"

    loaded = load_checkpoint(dst)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.model.config == net.config and loaded.iteration == 7 and loaded.state == {}
    assert loaded.normalization == Normalization(low=2.0) and loaded.class_names == ["background", "cell"]
    assert loaded.decision["threshold"] == 0.4 and loaded.train_config == {"base_channels": 2, "depth": 2}
    x = torch.rand(1, 1, 52, 60)
    with torch.no_grad():
        want, got = net(x), loaded.model.eval()(x)
    assert got.dtype == torch.float32
    assert float((got - want).norm() / want.norm()) <= 1e-2
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))

    with pytest.raises(InputError, match=KNOWN):
        pack_checkpoint(src, "x", tmp_path / "y.pt")


@pytest.fixture
def package(tmp_path, monkeypatch):
    """The registry pointed at tmp_path/models, where only em-membranes is installed."""
    models = tmp_path / "models"
    monkeypatch.setattr(pretrained, "MODELS_DIR", models)
    _tiny_checkpoint(tmp_path / "best.pt")
    pack_checkpoint(tmp_path / "best.pt", "em-membranes")
    pretrained.record_model(
        "em-membranes", scores={"rand_error_labels": 0.0512, "pixel_error": 0.07, "warping_error": 0.0012},
        training={"width": 2, "iterations": 7, "cpu_minutes": 1.0, "recipe": "default"}, scored_on="20, 21",
    )
    monkeypatch.chdir(tmp_path)
    return models


def test_load_checkpoint_accepts_a_model_name(package):
    assert model_path("em-membranes") == package / "em-membranes.pt"
    loaded = load_checkpoint("em-membranes")
    assert loaded.model.config["base_channels"] == 2 and loaded.iteration == 7
    assert load_pretrained("em-membranes").iteration == 7
    assert pretrained.pretrained_name("em-membranes") == "em-membranes"
    assert pretrained.pretrained_name(package / "em-membranes.pt") == "em-membranes"
    assert pretrained.pretrained_name("best.pt") is None
    # a model that is not trained yet is listed as not installed and cannot be loaded
    assert [m.installed for m in list_models()] == [True, False, False]
    with pytest.raises(InputError, match="model 'dic-hela' is not installed"):
        load_checkpoint("dic-hela")
    # a file of that name in the current folder wins over the packaged model
    (package.parent / "dic-hela").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a unetkit checkpoint"):
        load_checkpoint("dic-hela")
    # a missing path is still reported as such
    with pytest.raises(InputError, match="checkpoint not found"):
        load_checkpoint("run/best.pt")


def test_metadata_is_recorded_and_forgotten(package):
    em = pretrained.get_model("em-membranes")
    assert em.scores["rand_error_labels"] == 0.0512 and em.training["width"] == 2
    entry = pretrained.read_metadata()["em-membranes"]
    assert entry["scored_on"] == "20, 21" and entry["size_bytes"] == em.size_bytes
    pretrained.forget_model("em-membranes", remove_weights=True)
    assert pretrained.read_metadata() == {} and not pretrained.get_model("em-membranes").installed


def test_models_command(package, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["name", "network", "trained", "on"]
    em = next(line for line in lines if line.startswith("em-membranes"))
    assert "Rand error 0.051" in em and "installed" in em and "not installed" not in em and "MB" in em
    for name in ("dic-hela", "fluo-nuclei"):
        row = next(line for line in lines if line.startswith(name))
        assert row.endswith("not installed")

    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == NAMES
    assert rows[0]["installed"] and rows[0]["scores"]["rand_error_labels"] == 0.0512 and rows[0]["size_bytes"] > 0
    assert not rows[1]["installed"] and rows[1]["size_bytes"] is None and rows[1]["input"]["channels"] == 1

    assert main(["models", "dic-hela"]) == 0
    out = capsys.readouterr().out
    assert "not installed" in out and "0.19 x 0.19 um" in out and "Cell Tracking Challenge" in out
    assert "2D U-Net" in out and "precisions" in out


def test_models_command_shows_scale_and_what_auto_may_choose(capsys):
    assert main(["models"]) == 0
    header, _, *rows = capsys.readouterr().out.splitlines()
    assert "objects" in header and all(" 2D " in row for row in rows[:3])
    assert main(["models", "dic-hela"]) == 0
    out = capsys.readouterr().out
    assert "median object diameter 112.51 px" in out
    line = next(line for line in out.splitlines() if line.startswith("precisions"))
    assert line.split()[1:3] == ["fp32", "0.9017,"] and line.endswith("--precision auto may choose fp32, bf16")  # int8 ruled out


# -- does an image fit a model? ---------------------------------------------------------------------


def test_check_input_warns_on_colour_and_16_bit_images():
    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning, match="model 'em-membranes' expects 1 channel") as record:
        messages = check_input("em-membranes", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), source="rgb.png")
    assert len(record) == 1 and messages[0].startswith("rgb.png: colour (RGB) image with 3 channels")
    with pytest.warns(UserWarning, match="16-bit image with values up to .*model 'fluo-nuclei'"):
        check_input("fluo-nuclei", rng.integers(0, 4000, (64, 64), dtype=np.uint16))
    with pytest.warns(UserWarning) as record:  # both problems at once
        check_input("dic-hela", rng.integers(0, 60000, (3, 64, 64), dtype=np.uint16))
    assert len(record) == 2


def test_check_input_accepts_images_like_the_training_data():
    rng = np.random.default_rng(0)

    def like(name, high=256, dtype=np.uint8):
        image = rng.integers(0, high, (64, 64), dtype=dtype)
        if name == "fluo-nuclei":  # a few bright nuclei on a dark background, as its training images
            image[:, 4:] //= 16
        return image

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in NAMES:
            assert check_input(name, like(name)) == []
        # a 16-bit file whose values stay in the 8-bit range, a float image, gray + alpha
        assert check_input("fluo-nuclei", like("fluo-nuclei", 236, np.uint16)) == []
        assert check_input("dic-hela", rng.random((64, 64), dtype=np.float32)) == []
        assert check_input("em-membranes", rng.integers(0, 256, (64, 64, 2), dtype=np.uint8)) == []


def _dataset(name):
    folder = data_root() / pretrained.REGISTRY[name].dataset
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (set UNETKIT_DATA)")
    return folder


def _samples(name, ids, normalization=None):
    from unetkit.data import get_ctc_samples, get_isbi2012_samples

    folder = _dataset(name)
    if name == "em-membranes":
        return get_isbi2012_samples(folder, slices=ids, normalization=normalization, targets=TargetConfig(use_weight_map=False))
    return get_ctc_samples(folder, frames=ids, normalization=normalization, targets=TargetConfig(use_weight_map=False))


@pytest.mark.data
@pytest.mark.parametrize("name", NAMES)
def test_check_input_is_quiet_on_the_training_images(name):
    from unetkit.data import find_pairs
    from unetkit.io import read_image

    info = pretrained.REGISTRY[name]
    pairs = find_pairs(_dataset(name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for pair in pairs:
            number = int("".join(ch for ch in pair.image.stem if ch.isdigit()))
            if number in info.train_ids + info.val_ids + info.test_ids:
                assert check_input(name, read_image(pair.image), source=pair.image.name) == []


# -- the packaged models themselves ------------------------------------------------------------------


@pytest.mark.data
@pytest.mark.parametrize("name", NAMES)
def test_packaged_model_scores_on_a_held_out_image(name):
    from unetkit.decision import DecisionRule
    from unetkit.metrics import rand_error, seg_score
    from unetkit.predict import predict

    info = pretrained.get_model(name)
    if not info.installed:
        pytest.skip(f"{name} is not installed (not trained yet)")
    assert HELD_OUT[name] in info.test_ids
    loaded = load_checkpoint(name)
    sample = _samples(name, [HELD_OUT[name]], loaded.normalization)[0]
    tile = loaded.model.geometry.input_size(max(sample.shape))  # one tile covers the image, no TTA: fast
    rule = DecisionRule.from_dict(loaded.decision)
    prob = predict(loaded.model, sample.image, tile_size=tile, norm_statistics=rule.norm_statistics)[1]
    labels = rule.apply(prob)
    if info.task == "membranes":
        error = rand_error(labels, sample.instances)
        assert error <= FLOORS[name], f"{name}: Rand error {error:.4f} on {sample.name}"
    else:
        seg = seg_score(labels, sample.instances)
        assert seg >= FLOORS[name], f"{name}: SEG {seg:.4f} on {sample.name}"
