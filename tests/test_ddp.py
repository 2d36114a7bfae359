"""Training on two processes (gloo on the CPU, started with torch.multiprocessing and a file:// rendezvous)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from unetkit import ddp
from unetkit.checkpoint import load_checkpoint
from unetkit.data import BatchShardSampler, Normalization, TileDataset, get_tile_loader, make_sample
from unetkit.errors import InputError
from unetkit.geometry import Geometry
from unetkit.synthetic import synthetic_dataset
from unetkit.train import TrainConfig, Trainer

NORM = Normalization()
# SGD, no batch norm, no dropout: two processes with a batch of one tile each compute the same
# step as one process with a batch of two (batch norm would normalise per rank, see unetkit.ddp).
# The CPU (gloo) on every machine: on a machine with one GPU, "auto" would ask for a GPU per process.
CONFIG = dict(depth=2, base_channels=4, tile_size=34, batch_size=2, iterations=4, val_every=2, checkpoint_every=2,
              lr=0.01, seed=0, workers=0, dropout=0.0, batch_norm=False, choose_decision=False,
              max_seconds=1e6, budget_clock="cpu", device="cpu")


def make_samples():
    pairs = synthetic_dataset(3, shape=(64, 64), seed=3)
    return [make_sample(image, labels, f"s{i}", NORM) for i, (image, labels) in enumerate(pairs)]


def _worker(rank: int, world_size: int, folder: str, run: str, config: dict, resume: bool, rank1_clock: float | None):
    """One rank: train (or resume) the run and save its parameters and summary for the test to compare."""
    torch.set_num_threads(1)
    ddp.init_process_group("cpu", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size,
                           timeout=60)  # a rank left waiting fails the test within a minute
    try:
        if rank1_clock is not None and rank == 1:  # this rank's own clock says something else than rank 0's
            from unetkit import train

            train._Budget.spent = lambda self: rank1_clock
        samples = make_samples()
        trainer = Trainer(TrainConfig(**config), samples[:2], samples[2:], run, normalization=NORM, resume=resume,
                          progress=False)
        summary = trainer.fit()
        torch.save({"parameters": [p.detach().clone() for p in trainer.model.parameters()], "summary": summary},
                   f"{folder}/rank{rank}.pt")
    finally:
        ddp.finish()


def spawn(tmp_path: Path, run: Path, config: dict, *, resume: bool = False, rank1_clock: float | None = None) -> list[dict]:
    folder = tmp_path / f"ranks-{len(list(tmp_path.glob('ranks-*')))}"
    folder.mkdir()
    mp.spawn(_worker, args=(2, str(folder), str(run), config, resume, rank1_clock), nprocs=2, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]


def log_losses(run: Path) -> list[float]:
    return [float(row["loss"]) for row in csv.DictReader(open(run / "log.csv"))]


def test_two_processes_train_as_one_process_with_the_same_global_batch(tmp_path):
    half = dict(CONFIG, iterations=2)
    first = spawn(tmp_path, tmp_path / "ddp", half)
    # Resume works across launches. Rank 1's own clock says the budget is gone: both ranks follow
    # rank 0's (same last iteration, no rank left waiting for the other).
    resumed = spawn(tmp_path, tmp_path / "ddp", CONFIG, resume=True, rank1_clock=1e9)
    samples = make_samples()
    single = Trainer(TrainConfig(**CONFIG), samples[:2], samples[2:], tmp_path / "one", normalization=NORM, progress=False)
    single.fit()

    assert [r["summary"]["iterations"] for r in first + resumed] == [2, 2, 4, 4]
    for a, b in zip(*(r["parameters"] for r in resumed)):
        assert torch.equal(a, b)  # DDP keeps the copies identical
    for a, b in zip(resumed[0]["parameters"], single.model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-5)
    # the log holds the global batch's loss, step by step; validation ran on rank 0 only
    np.testing.assert_allclose(log_losses(tmp_path / "ddp"), log_losses(tmp_path / "one"), rtol=1e-4)
    assert resumed[0]["summary"]["val_iou"] is not None and resumed[1]["summary"]["val_iou"] is None
    rows = list(csv.DictReader(open(tmp_path / "ddp" / "log.csv")))
    assert [bool(r["val_iou"]) for r in rows] == [False, True, False, True]
    saved = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert saved.iteration == 4 and 0 < saved.state["seconds_spent"] < 1e6
    for a, b in zip(saved.model.parameters(), resumed[0]["parameters"]):
        assert torch.equal(a, b)
    assert {p.name for p in (tmp_path / "ddp").iterdir()} == {"config.json", "log.csv", "curves.png", "last.pt", "best.pt", "report.html"}


def test_each_rank_loads_its_share_of_every_global_batch():
    sample = make_samples()[0]
    dataset = TileDataset([sample], Geometry(depth=2), 34, length=12, seed=4)
    whole = list(get_tile_loader(dataset, batch_size=4, start=4))
    shares = [list(get_tile_loader(dataset, batch_size=4, start=4, rank=r, world_size=2)) for r in range(2)]
    assert len(whole) == len(shares[0]) == len(shares[1]) == 2
    for k, batch in enumerate(whole):
        assert tuple(shares[0][k]["image"].shape) == (2, 1, 34, 34)
        for key in ("image", "target", "weights"):
            assert torch.equal(torch.cat([shares[0][k][key], shares[1][k][key]]), batch[key])
    assert [list(BatchShardSampler(2, 11, 3, rank=r, world_size=3)) for r in range(3)] == [[2, 5, 8], [3, 6, 9], [4, 7, 10]]
    with pytest.raises(InputError, match="multiple of the 2 processes"):
        BatchShardSampler(0, 6, 3, rank=0, world_size=2)


def test_batch_size_and_process_count_checks(monkeypatch):
    with pytest.raises(InputError, match="--batch-size 3 is the batch of all 2 processes .* use --batch-size 4"):
        ddp.check_batch_size(3, 2)
    ddp.check_batch_size(4, 4)
    with pytest.warns(UserWarning, match="--nproc 3 is more than the 2 CPU core"):
        ddp.warn_if_oversubscribed(3, cores=2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ddp.environment_world() is None and ddp.world() == ddp.World(0, 1, 0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ddp.environment_world() == ddp.World(1, 2, 1)


def test_cli_nproc_launches_the_processes(tmp_path, capsys, write_cell_folder):
    from unetkit.cli import main

    data = write_cell_folder(tmp_path / "data")
    tiny = ["--depth", "2", "--width", "4", "--tile-size", "34", "--workers", "0", "--no-progress", "--val", "cell2", "--device", "cpu"]
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--nproc", "2", *tiny]) == 2
    assert "--batch-size 1 is the batch of all 2 processes together" in capsys.readouterr().err
    assert not out.exists()
    argv = ["train", "--data", str(data), "--out", str(out), "--nproc", "2", "--batch-size", "2", "--iterations", "2",
            "--checkpoint-every", "1", *tiny]
    assert main(argv) == 0
    assert load_checkpoint(out / "last.pt").iteration == 2 and json.loads((out / "config.json").read_text())["batch_size"] == 2
    assert [int(row["iteration"]) for row in csv.DictReader(open(out / "log.csv"))] == [1, 2]


def test_a_killed_rank_is_named_in_one_line_and_the_others_stay_quiet(monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    assert ddp.killed_rank({0: ddp.PEER_LOST_STATUS, 1: -9}) == (1, 9)
    assert ddp.killed_rank({0: -15, 1: 2}) is None  # SIGTERM is the launcher stopping the others
    assert ddp._run_folder(["train", "--data", "d", "--resume", "runs/a/"]) == "runs/a"
    gloo = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:41890")
    assert ddp.lost_peer(gloo, ddp.World(0, 2, 0)) and not ddp.lost_peer(gloo, ddp.World())
    monkeypatch.delenv(ddp.LAUNCHED_VARIABLE, raising=False)
    error = ddp.peer_lost_error("runs/a/last.pt keeps iteration 4; continue with: unetkit train --resume runs/a")
    assert isinstance(error, InputError) and "keeps iteration 4" in str(error)
    monkeypatch.setenv(ddp.LAUNCHED_VARIABLE, "1")
    assert isinstance(ddp.peer_lost_error("x"), SystemExit)  # the launcher speaks for it

    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    failures = {rank: ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="")
                for rank, code in ((0, ddp.PEER_LOST_STATUS), (1, -9))}

    def launcher(config, entrypoint):
        def run(*args):
            raise ChildFailedError("unetkit", failures)  # type: ignore[arg-type]
        return run

    monkeypatch.setattr("torch.distributed.launcher.api.elastic_launch", launcher)
    lines = []
    monkeypatch.setattr("builtins.print", lambda *args, **kwargs: lines.append(" ".join(map(str, args))))
    assert ddp.launch(2, ["train", "--resume", "runs/a"]) == 137
    assert lines == ["unetkit: error: training process rank 1 was killed by signal 9 (SIGKILL; out of memory?) and the "
                     "others were stopped; runs/a/last.pt keeps the last checkpoint; continue with: unetkit train --resume runs/a"]
