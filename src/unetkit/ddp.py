"""Training on several processes with `torch.nn.parallel.DistributedDataParallel` (DDP).

Each process (a *rank*) holds a copy of the network and trains on its share of every global
batch of tiles; DDP averages the gradients, so the copies stay equal. The process group uses
gloo on the CPU and NCCL on CUDA GPUs (one GPU per process, ``cuda:LOCAL_RANK``). `Trainer`
reads its place from the initialised process group (`world`) and then:

- deals each global batch of `TrainConfig.batch_size` tiles (tile i = f(seed, i), as in one
  process) in equal, consecutive shares to the ranks, so N processes see the tiles one process
  sees, in the same order, and resume at any iteration with any number of processes;
- writes the run folder (config.json, log.csv, curves, best.pt, last.pt) and validates on rank 0
  only; the others wait at the next step's collective;
- takes the time budget from rank 0's clock (`RankZeroClock`), so the learning-rate schedule and
  the decision to stop are the same on every rank and no rank waits for one that stopped;
- logs the loss averaged over the ranks (the global batch's loss).

Batch norm stays per rank: each rank normalises over its own tiles, which with one tile per rank
is what the recipes' one-tile batches normalise over in a single process (`SyncBatchNorm` would
change the statistics with the number of processes, and torch runs it on GPUs only).

Launch with ``torchrun --nproc-per-node N -m unetkit train ...`` or ``unetkit train --nproc N``
(`launch`: torch's elastic launcher starting ``python -m unetkit train ...`` N times). From
Python, call `init_process_group` in each process before building the `Trainer`.

Example:
    >>> world()  # a single process: rank 0 of 1
    World(rank=0, world_size=1, local_rank=0)
"""

from __future__ import annotations

import datetime
import os
import sys
import uuid
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

from .errors import InputError

if TYPE_CHECKING:
    import torch

#: Environment variables torchrun sets in every process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: Set by `launch` in the processes it starts: it names a process that died, so the others stay quiet.
LAUNCHED_VARIABLE = "UNETKIT_LAUNCHED"
#: Exit status of a process that stopped because another one did (see `peer_lost_error`).
PEER_LOST_STATUS = 1


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that validates and writes the run folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world() -> World:
    """The current process's `World`: from the initialised default process group, else one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return World()
    rank = dist.get_rank()
    return World(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def environment_world() -> World | None:
    """The `World` torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK), or None.

    Reads no torch, so the command line can ask before anything heavy is imported.

    Example:
        >>> environment_world() is None or environment_world().world_size >= 1
        True
    """
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise InputError(f"RANK={os.environ['RANK']!r}, WORLD_SIZE={os.environ['WORLD_SIZE']!r}: not integers; "
                         "start the processes with torchrun") from None
    return World(rank, size, local)


def check_batch_size(batch_size: int, world_size: int) -> None:
    """The global batch must deal evenly to the processes; InputError naming the fix otherwise.

    Example:
        >>> check_batch_size(4, 2)
        >>> check_batch_size(1, 2)
        Traceback (most recent call last):
        ...
        unetkit.errors.InputError: --batch-size 1 is the batch of all 2 processes together and must be a multiple of 2; use --batch-size 2
    """
    if batch_size % world_size:
        fix = world_size * -(-batch_size // world_size)
        raise InputError(f"--batch-size {batch_size} is the batch of all {world_size} processes together and must be "
                         f"a multiple of {world_size}; use --batch-size {fix}")


def init_process_group(
    device: str = "auto",
    *,
    init_method: str = "env://",
    rank: int | None = None,
    world_size: int | None = None,
    timeout: float | None = None,
) -> World:
    """Join the training processes: gloo for the CPU, NCCL for CUDA; returns this process's `World`.

    Under torchrun the defaults read everything from the environment. Otherwise give
    `init_method` (``file:///tmp/x`` or ``tcp://host:port``), `rank` and `world_size`.
    `timeout` (seconds) bounds how long a rank waits for the others (torch's default: 10 minutes
    with NCCL, 30 with gloo); rank 0 validates while the others wait.

    Example:
        >>> init_process_group("cpu", init_method="file:///tmp/rdv", rank=0, world_size=2)  # doctest: +SKIP
    """
    import torch
    import torch.distributed as dist

    from .device import resolve_device

    backend = "nccl" if resolve_device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        local = environment_world()
        index = local.local_rank if local is not None else (rank or 0)
        torch.cuda.set_device(index)
    options: dict[str, Any] = {"init_method": init_method}
    if timeout is not None:
        options["timeout"] = datetime.timedelta(seconds=timeout)
    if rank is not None:
        options.update(rank=rank, world_size=world_size)
    dist.init_process_group(backend, **options)
    return world()


def finish() -> None:
    """Leave the process group, all ranks together (a no-op when there is none).

    The barrier matters: rank 0 chooses the labels rule after training while the others are done,
    and a rank that tears its gloo connections down while a peer still holds them can abort the
    process ("terminate called without an active exception"), which fails the whole run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def end_process() -> NoReturn:
    """End a training process of a distributed run once its work is done and saved: flush the
    streams and exit with status 0 without the interpreter's teardown, where gloo's threads can
    still abort a finished process ("terminate called without an active exception", seen on a
    loaded machine after `finish`), which would fail a run that succeeded."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rank_device(device: "torch.device", place: World) -> "torch.device":
    """The device of this rank: ``cuda:LOCAL_RANK`` for CUDA with several processes, else `device`."""
    import torch

    if device.type != "cuda" or not place.distributed:
        return device
    if place.local_rank >= torch.cuda.device_count():
        raise InputError(f"{place.world_size} processes need one GPU each, but this machine has "
                         f"{torch.cuda.device_count()}; use --nproc {torch.cuda.device_count()}")
    return torch.device("cuda", place.local_rank)


def wrap(model: "torch.nn.Module", device: "torch.device", place: World) -> "torch.nn.Module":
    """`model` in `DistributedDataParallel` when there are several processes, else `model` itself.

    The wrapper shares `model`'s parameters: optimise and save `model`, call the wrapper.
    """
    if not place.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=device if ids else None)


def seed_step(seed: int, iteration: int, place: World) -> None:
    """With several processes, seed torch's generator (dropout) from (seed, iteration, rank).

    Ranks then draw different dropout masks, and a resumed run draws the masks it would have
    drawn; one process keeps its own stream (saved in last.pt) untouched.
    """
    if not place.distributed:
        return
    import numpy as np
    import torch

    torch.manual_seed(int(np.random.SeedSequence([seed, iteration, place.rank]).generate_state(1)[0]))


def mean_over_ranks(value: "torch.Tensor", place: World) -> "torch.Tensor":
    """The mean of a scalar tensor over the ranks (the value itself with one process)."""
    if not place.distributed:
        return value
    import torch.distributed as dist

    total = value.detach().clone()
    dist.all_reduce(total)
    return total / place.world_size


class RankZeroClock:
    """A budget clock whose `spent()` is rank 0's on every rank (one broadcast per call).

    Every rank must call `spent()` at the same points, as the training loop does.
    """

    def __init__(self, clock: Any, device: "torch.device") -> None:
        self.clock = clock
        self.device = device

    def spent(self) -> float:
        import torch
        import torch.distributed as dist

        value = torch.tensor([self.clock.spent()], dtype=torch.float64, device=self.device)
        dist.broadcast(value, 0)
        return float(value.item())


def shared_clock(clock: Any, device: "torch.device", place: World) -> Any:
    """`clock` itself with one process, else a `RankZeroClock` around it."""
    return RankZeroClock(clock, device) if place.distributed else clock


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def warn_if_oversubscribed(nproc: int, cores: int | None = None) -> None:
    """Warn when more processes are asked for than there are CPU cores."""
    cores = available_cores() if cores is None else cores
    if nproc > cores:
        warnings.warn(f"--nproc {nproc} is more than the {cores} CPU core(s) available: the processes will share "
                      f"cores and each step will be slower; use --nproc {cores} or fewer", UserWarning, stacklevel=2)


def launch(nproc: int, arguments: Sequence[str]) -> int:
    """Run ``python -m unetkit ARGUMENTS`` in `nproc` processes on this machine; returns the exit status.

    Uses torch's elastic launcher (`torch.distributed.launcher.elastic_launch`, what torchrun
    runs) with a local rendezvous, as ``torchrun --standalone --nproc-per-node NPROC -m unetkit
    ARGUMENTS``. Unless OMP_NUM_THREADS is set, each process gets cores / nproc threads (at least
    one). The status is 0, or that of the first process that failed (2 for a user mistake, 128 + N
    for one killed by signal N).

    Example:
        >>> launch(2, ["train", "--data", "cells", "--out", "run", "--batch-size", "2"])  # doctest: +SKIP
        0
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise InputError(f"--nproc must be >= 1 (got {nproc})")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, available_cores() // nproc)))
    os.environ[LAUNCHED_VARIABLE] = "1"
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
        rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1, start_method="spawn",
    )
    # The processes print their own messages; the launcher's log would repeat a failure at length.
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "unetkit", *arguments)
    except ChildFailedError as exc:
        killed = killed_rank({rank: failure.exitcode for rank, failure in exc.failures.items()})
        if killed is not None:  # it could not say so itself
            print(f"unetkit: error: {killed_message(*killed, _run_folder(arguments))}", file=sys.stderr)
            return 128 + killed[1]
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -N: killed by signal N
    except SignalException as exc:  # Ctrl-C or SIGTERM: the processes got it too and rank 0 kept last.pt
        return 128 + int(exc.sigval)
    return 0


def killed_rank(exit_codes: dict[int, int]) -> tuple[int, int] | None:
    """(rank, signal) of the process that was killed (by other than SIGTERM or SIGINT, which the
    launcher itself sends to stop the others), from the processes' exit codes (-N: signal N).

    Example:
        >>> killed_rank({0: 1, 1: -9}), killed_rank({0: -15, 1: 2})
        ((1, 9), None)
    """
    import signal

    stops = (signal.SIGTERM, signal.SIGINT)
    killed = sorted((rank, -code) for rank, code in exit_codes.items() if code < 0 and -code not in stops)
    return killed[0] if killed else None


def killed_message(rank: int, signum: int, run: str | None) -> str:
    """One line on a training process killed by a signal, and how to continue.

    Example:
        >>> killed_message(1, 9, "runs/a")
        'training process rank 1 was killed by signal 9 (SIGKILL; out of memory?) and the others were stopped; runs/a/last.pt keeps the last checkpoint; continue with: unetkit train --resume runs/a'
    """
    import signal

    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = "unknown signal"
    hint = "; out of memory?" if signum == signal.SIGKILL else ""
    where = (f"{run}/last.pt keeps the last checkpoint; continue with: unetkit train --resume {run}" if run
             else "continue with unetkit train --resume RUN")
    return f"training process rank {rank} was killed by signal {signum} ({name}{hint}) and the others were stopped; {where}"


def _run_folder(arguments: Sequence[str]) -> str | None:
    """The run folder of ``unetkit train`` ARGUMENTS (--resume RUN or --out RUN)."""
    for option in ("--resume", "--out"):
        for i, argument in enumerate(arguments[:-1]):
            if argument == option:
                return str(arguments[i + 1]).rstrip("/")
            if argument.startswith(option + "="):
                return argument.split("=", 1)[1].rstrip("/")
    return None


def lost_peer(exc: BaseException, place: World) -> bool:
    """Whether `exc` is a collective failing because another process of the group is gone."""
    if not place.distributed:
        return False
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, getattr(dist, "DistError", ())) or any(
        words in text for words in ("closed by peer", "Connection reset", "Broken pipe", "NCCL")
    )


def peer_lost_error(advice: str) -> BaseException:
    """What a process raises when another one of the group stopped (`advice`: what was kept, how to continue).

    Under `launch`, which names the process that died, a quiet exit (status `PEER_LOST_STATUS`);
    otherwise (torchrun) one line.
    """
    if os.environ.get(LAUNCHED_VARIABLE):
        return SystemExit(PEER_LOST_STATUS)
    return InputError(f"another training process stopped (its own message, or torchrun's, says why); {advice}")


def interrupt_once() -> None:
    """Turn the first SIGINT or SIGTERM into KeyboardInterrupt and ignore later ones.

    Ctrl-C reaches every process, and the launcher then sends SIGTERM (as SLURM does before a
    time limit): rank 0 saves last.pt on the first signal and is not interrupted while saving.
    """
    import signal

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
