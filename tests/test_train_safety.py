"""Training never loses work: signals, a full disk, out of memory, two resumes at once, the labels-rule
step, budgets, another device, finished runs."""

import csv
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

from unetkit.checkpoint import load_checkpoint
from unetkit.cli import main
from unetkit.data import Normalization, make_sample
from unetkit.decision import DecisionRule
from unetkit.errors import InputError
from unetkit.synthetic import synthetic_dataset
from unetkit.train import RunLock, TrainConfig, Trainer, lr_factor

NORM = Normalization()
TINY = ["--depth", "2", "--width", "2", "--tile-size", "34", "--no-progress", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def samples():
    return [make_sample(img, lab, f"s{i}", NORM) for i, (img, lab) in enumerate(synthetic_dataset(3, shape=(64, 64), seed=3))]


def tiny_config(**overrides) -> TrainConfig:
    values = dict(depth=2, base_channels=4, tile_size=34, iterations=4, val_every=2, checkpoint_every=2, lr=0.01, seed=0,
                  workers=0, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def log_iterations(run) -> list[int]:
    return [int(row["iteration"]) for row in csv.DictReader(open(run / "log.csv"))]


def snapshot(folder) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, write_cell_folder):
    """A finished run of 2 iterations on cell0, cell1 with cell2 to validate: its labels rule is stored."""
    root = tmp_path_factory.mktemp("finished")
    data = write_cell_folder(root / "data")
    run = root / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--iterations", "2", "--val", "cell2",
                 "--checkpoint-every", "1", *TINY]) == 0
    return run


# 1. SIGTERM ------------------------------------------------------------------------------------------


def test_sigterm_saves_last_pt_and_resume_continues(tmp_path, write_cell_folder):
    data = write_cell_folder(tmp_path / "data")
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "unetkit", "train", "--data", str(data), "--out", str(run), "--iterations", "100000",
            "--val", "cell2", "--val-every", "100000", "--checkpoint-every", "100000", *TINY]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300  # a guard against a hang, not a measurement
        while not ((run / "log.csv").is_file() and len(log_iterations(run)) >= 3):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.poll() is not None else "no progress"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unetkit: interrupted: training stopped at iteration"), err
    done = load_checkpoint(run / "last.pt").iteration
    assert done >= 3 and f"iteration {done}," in lines[0] and f"unetkit train --resume {run}" in lines[0]
    assert log_iterations(run) == list(range(1, done + 1))  # the log and last.pt agree
    assert not (run / RunLock.NAME).exists()
    assert main(["train", "--resume", str(run), "--iterations", str(done + 2), "--no-progress"]) == 0
    assert load_checkpoint(run / "last.pt").iteration == done + 2
    assert log_iterations(run) == list(range(1, done + 3))


def test_a_signal_inside_the_optimiser_step_waits_for_the_whole_iteration(samples, tmp_path):
    before = signal.getsignal(signal.SIGTERM)  # another library in this process may have set one
    trainer = Trainer(tiny_config(iterations=6, checkpoint_every=100, val_every=100), samples, [], tmp_path / "run",
                      normalization=NORM, progress=False)
    real_step, calls = trainer.optimizer.step, {"n": 0}

    def step_signalled(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the weights change: deferred to the iteration's end
        return real_step(*args, **kwargs)

    trainer.optimizer.step = step_signalled
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.stopped_by == "interrupted"
    assert load_checkpoint(tmp_path / "run" / "last.pt").iteration == 3 and log_iterations(tmp_path / "run") == [1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) == before  # fit's handler is gone, the previous one restored
    # exact: resuming gives the weights of an uninterrupted run
    Trainer(tiny_config(iterations=6, checkpoint_every=100, val_every=100), samples, [], tmp_path / "run",
            normalization=NORM, resume=True, progress=False).fit()
    Trainer(tiny_config(iterations=6, checkpoint_every=100, val_every=100), samples, [], tmp_path / "whole",
            normalization=NORM, progress=False).fit()
    whole, split = (load_checkpoint(tmp_path / name / "last.pt") for name in ("whole", "run"))
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, split.model.state_dict()[key]), key


# 2. the labels-rule step -----------------------------------------------------------------------------


def test_resume_of_a_run_interrupted_in_the_rule_choice_chooses_the_rule_only(samples, tmp_path, monkeypatch):
    from unetkit import decision as decision_module

    real, calls = decision_module.choose_decision, {"n": 0}

    def interrupted_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("unetkit.train.choose_decision", interrupted_once)
    config = tiny_config()
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, samples[:2], samples[2:], tmp_path / "run", normalization=NORM, progress=False).fit()
    assert load_checkpoint(tmp_path / "run" / "best.pt").decision == {}
    log = (tmp_path / "run" / "log.csv").read_bytes()
    summary = Trainer(config, samples[:2], samples[2:], tmp_path / "run", normalization=NORM, resume=True, progress=False).fit()
    stored = load_checkpoint(tmp_path / "run" / "best.pt").decision
    assert summary["steps_this_run"] == 0 and summary["iterations"] == 4 and summary["stopped_by"] == "iterations"
    assert summary["decision"] == stored and DecisionRule.from_dict(stored).tta
    assert (tmp_path / "run" / "log.csv").read_bytes() == log  # no iteration trained again


# 3. disk full during training ------------------------------------------------------------------------


def test_disk_full_at_a_checkpoint_is_one_line_and_keeps_the_previous_last_pt(samples, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(iterations=4, checkpoint_every=2, val_every=100), samples, [], tmp_path / "run",
                      normalization=NORM, progress=False)
    real_save, calls = torch.save, {"n": 0}

    def full_at_the_second(payload, target):
        calls["n"] += 1
        if calls["n"] == 3:  # last.pt and best.pt of iteration 2 are written, then last.pt of iteration 4 fails
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4366")
        return real_save(payload, target)

    monkeypatch.setattr(torch, "save", full_at_the_second)
    with pytest.raises(InputError) as info:
        trainer.fit()
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'run' / 'last.pt'}: cannot write the checkpoint of iteration 4: the write failed")
    assert f"the previous last.pt is unchanged" in message and f"--resume {tmp_path / 'run'}" in message
    assert "\n" not in message
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "run" / "last.pt").iteration == 2
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temporary or lock file


# 4. out of memory --------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 96468992000 bytes."),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
])
def test_out_of_memory_names_the_options_to_lower_and_keeps_last_pt(samples, tmp_path, error):
    trainer = Trainer(tiny_config(iterations=4, checkpoint_every=2, val_every=100, batch_size=2), samples, [],
                      tmp_path / "run", normalization=NORM, progress=False)
    real_loss, calls = trainer.loss_fn, {"n": 0}

    def out_of_memory_at_step_3(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise error
        return real_loss(*args)

    trainer.loss_fn = out_of_memory_at_step_3
    with pytest.raises(InputError) as info:
        trainer.fit()
    assert str(info.value) == (
        f"out of memory in training step 3 on cpu with --tile-size 34 and --batch-size 2 (network depth 2, width 4); "
        f"{tmp_path / 'run' / 'last.pt'} keeps iteration 2. Start a new run (--out) with --tile-size 32 or --batch-size 1"
    )
    assert load_checkpoint(tmp_path / "run" / "last.pt").iteration == 2


def test_out_of_memory_in_validation_is_one_line(samples, tmp_path):
    trainer = Trainer(tiny_config(iterations=2, val_every=2), samples[:2], samples[2:], tmp_path / "run",
                      normalization=NORM, progress=False)

    def validate():
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB")

    trainer.validate = validate
    with pytest.raises(InputError, match="out of memory validating iteration 2 on cpu .*no checkpoint was written yet.*--tile-size 32"):
        trainer.fit()


# 5. two trainings of one run ------------------------------------------------------------------------


def test_a_run_being_trained_is_refused_and_a_stale_lock_is_not(finished_run, samples, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with open(run / RunLock.NAME, "w") as held:  # another process training the run
        held.write("4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = snapshot(run)
        assert main(["train", "--resume", str(run), "--iterations", "3", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"unetkit: error: {run} is being trained by process 4242; wait for it or stop it"
        assert snapshot(run) == before
        with pytest.raises(InputError, match="being trained by process 4242"):
            Trainer(TrainConfig.from_dict(json.loads((run / "config.json").read_text())), samples, [], run,
                    normalization=NORM, resume=True)
    # the holder is gone (its lock went with it); the file it left does not block
    assert (run / RunLock.NAME).read_text() == "4242"
    assert main(["train", "--resume", str(run), "--iterations", "3", "--no-progress"]) == 0
    assert load_checkpoint(run / "last.pt").iteration == 3 and not (run / RunLock.NAME).exists()


# 7. empty validation masks ----------------------------------------------------------------------------


def test_an_empty_validation_mask_is_refused_at_start(tmp_path, write_cell_folder):
    import numpy as np
    import tifffile

    data = write_cell_folder(tmp_path / "data")
    mask = data / "masks" / "cell2.tif"
    tifffile.imwrite(mask, np.zeros_like(tifffile.imread(mask)))
    with pytest.raises(InputError) as info:
        Trainer.start(tiny_config(), data, tmp_path / "run", val=["cell2"], progress=False)
    assert str(info.value) == (f"{mask}: this validation mask has no objects, so validation cannot score it; choose "
                               "other validation images with --val NAMES, or remove this image")
    assert not (tmp_path / "run").exists()
    Trainer.start(tiny_config(iterations=1), data, tmp_path / "ok", val=["cell1"], progress=False)  # as training data it is fine


# 8. budgets -------------------------------------------------------------------------------------------


def test_a_time_budget_alone_trains_for_that_long_and_spreads_the_schedule(samples, tmp_path, monkeypatch):
    from unetkit import train as train_module

    now = [0.0]
    clock = types.SimpleNamespace(perf_counter=lambda: now[0], process_time=lambda: now[0])
    monkeypatch.setattr(train_module, "time", clock)
    config = tiny_config(iterations=None, max_seconds=3.5, lr_schedule="cosine", val_every=100, checkpoint_every=100)
    trainer = Trainer(config, samples[:2], samples[2:], tmp_path / "run", normalization=NORM, progress=False)
    real_loss = trainer.loss_fn

    def one_second_per_step(*args):
        now[0] += 1.0
        return real_loss(*args)

    def two_second_validation():
        now[0] += 2.0
        return 0.5, 0.1

    def three_second_rule():
        now[0] += 3.0
        return DecisionRule(score=0.4)

    trainer.loss_fn, trainer.validate, trainer.choose_decision = one_second_per_step, two_second_validation, three_second_rule
    summary = trainer.fit()
    # steps start at 0, 1, 2, 3 s; after the 4th, 4 s >= 3.5 s are spent
    assert summary["iterations"] == 4 and summary["stopped_by"] == "seconds"
    assert summary["final_validation_seconds"] == 2.0 and summary["decision_seconds"] == 3.0
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * lr_factor("cosine", 3 / 3.5))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["iterations"] is None
    with pytest.raises(InputError, match="needs max_seconds"):
        tiny_config(iterations=None)


def test_cli_seconds_alone_is_a_time_budget(tmp_path, write_cell_folder, capsys):
    data = write_cell_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--seconds", "1e-9", "--val", "cell2",
                 "--budget-clock", "cpu", "--val-every", "1000", *TINY]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert summary["stopped_by"] == "seconds" and summary["iterations"] == 1
    assert json.loads((run / "config.json").read_text())["iterations"] is None


# 9. another device --------------------------------------------------------------------------------------


def test_a_gpu_run_resumes_on_the_cpu(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "device": "cuda"}))
    trainer = Trainer.from_run(run, iterations=3, device="cpu", progress=False)
    assert trainer.device == torch.device("cpu") and trainer.config.device == "cpu" and trainer.iteration == 2
    trainer._run_lock.release()
    assert main(["train", "--resume", str(run), "--iterations", "3", "--device", "cpu", "--no-progress"]) == 0
    assert load_checkpoint(run / "last.pt").iteration == 3
    assert json.loads((run / "config.json").read_text())["device"] == "cpu"


# 10. a finished run ------------------------------------------------------------------------------------


def test_resuming_a_finished_run_changes_nothing(finished_run, capsys):
    before = snapshot(finished_run)
    capsys.readouterr()
    assert main(["train", "--resume", str(finished_run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert summary["note"] == f"{finished_run} is finished (2 iterations, labels rule stored); nothing to do"
    assert summary["decision"] == load_checkpoint(finished_run / "best.pt").decision != {}
    assert snapshot(finished_run) == before
