"""Training as in the paper: one large tile per step, SGD with momentum 0.99, the weighted
cross-entropy over precomputed weight maps, elastic deformation; with validation, checkpoints,
an exact `resume`, a CSV log and a plot of the curves.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import ddp
from .adapt import NORM_STATISTICS, has_batch_norm
from .augment import AugmentConfig, Augmenter
from .checkpoint import load_checkpoint, save_checkpoint
from .config import DEFAULT_ITERATIONS, PAPER, from_dict_strict
from .data.normalize import Normalization
from .data.samples import Sample
from .data.tiles import TileDataset, get_tile_loader
from .decision import DecisionRule, best_rule, choose_decision
from .device import resolve_device
from .errors import InputError
from .geometry import Geometry
from .io import atomic_write
from .loss import SegmentationLoss
from .network import UNet
from .predict import predict
from .targets import TargetConfig

LOG_COLUMNS = ("iteration", "loss", "seconds", "val_iou", "val_pixel_error")
#: `TargetConfig` fields, which configs written before `TrainConfig.targets` held at their top level.
TARGET_KEYS = tuple(f.name for f in fields(TargetConfig))


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as RUN/config.json and inside checkpoints.

    Defaults follow the paper (`unetkit.config.PAPER`): the full-width network, 572x572 tiles,
    batch of one tile, SGD with momentum 0.99, weight map with w0=10 and sigma=5 px, elastic
    deformation on a 3x3 grid with 10 px standard deviation.

    `targets` (`unetkit.targets.TargetConfig`: w0, sigma, class_weights, pixel_size,
    use_weight_map) says how the samples' weight maps are made: pass it to
    `unetkit.data.load_samples` (as `Trainer.from_run` and `unetkit train` do); the trainer
    records it with the run. `from_dict` also reads the flat keys of older config.json files.

    With several processes (`unetkit.ddp`), `batch_size` is the batch of all of them together,
    dealt in equal shares; the run is otherwise the same.

    The learning rate is not given in the paper. With momentum 0.99 the effective step is
    lr / (1 - 0.99) = 100 * lr on a per-pixel mean loss. lr=0.01 (an effective step of 1) was not
    stable in our runs: on ISBI 2012 (width 16) the loss stopped falling and the validation IoU
    collapsed to 0 within 200 iterations, and the synthetic demo collapsed likewise. The default
    lr=0.001 (an effective step of 0.1) trains stably; see benchmarks/results/train_isbi_sgd.json.
    Training stops with a message if the loss becomes NaN.

    `max_seconds` is the run's whole time budget, counted across resumes, on `budget_clock`:
    "wall" (elapsed time) or "cpu" (this process's CPU time, which other jobs on the machine do
    not eat into; use it with `workers=0` so augmentation is counted). `lr_schedule` scales the
    learning rate by the fraction of the budget used (iterations or seconds, whichever is further
    along; see `lr_factor`). With validation images, the end of training chooses the rule that
    turns probabilities into labels (`unetkit.decision`) and stores it in best.pt. Adam (`optimizer="adam"`, lr 0.001)
    converges faster within short CPU budgets and is what the demo and benchmarks use.

    Example:
        >>> TrainConfig(iterations=10).momentum
        0.99
    """

    # network
    depth: int = PAPER.depth
    base_channels: int = PAPER.base_channels
    padding: str = "valid"
    dropout: float = PAPER.dropout
    batch_norm: bool = False
    # tiles, targets, augmentation
    tile_size: int = PAPER.tile_size
    batch_size: int = PAPER.batch_size
    targets: TargetConfig = field(default_factory=TargetConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # optimisation
    optimizer: str = "sgd"
    lr: float = 0.001
    momentum: float = PAPER.momentum
    weight_decay: float = 0.0
    dice_weight: float = 0.0
    lr_schedule: str = "constant"
    iterations: int = DEFAULT_ITERATIONS
    max_seconds: float | None = None
    budget_clock: str = "wall"
    choose_decision: bool = True
    # bookkeeping
    val_every: int = 200
    checkpoint_every: int = 200
    seed: int = 0
    workers: int = 1  # DataLoader processes that augment while the network trains
    device: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig.from_dict(self.augment)
        if isinstance(self.targets, dict):
            self.targets = TargetConfig.from_dict(self.targets)
        if self.optimizer not in ("sgd", "adam"):
            raise InputError(f"optimizer must be 'sgd' or 'adam' (got {self.optimizer!r})")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)} (got {self.lr_schedule!r})")
        if self.budget_clock not in ("wall", "cpu"):
            raise InputError(f"budget_clock must be 'wall' or 'cpu' (got {self.budget_clock!r})")
        for name in ("iterations", "batch_size", "val_every", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise InputError(f"lr must be > 0 (got {self.lr})")
        if self.workers < 0:
            raise InputError(f"workers must be >= 0 (got {self.workers})")

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["augment"] = self.augment.to_dict()
        values["targets"] = self.targets.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Inverse of `to_dict`; also reads the flat target keys (w0, sigma, ...) of older runs.

        Example:
            >>> TrainConfig.from_dict({"w0": 3.0, "iterations": 5}).targets.w0
            3.0
        """
        values = dict(values)
        flat = {key: values.pop(key) for key in TARGET_KEYS if key in values}
        if flat:
            values["targets"] = {**flat, **dict(values.get("targets") or {})}
        return from_dict_strict(cls, values, "training")

    def network_options(self) -> dict[str, Any]:
        """The `UNet` arguments this config fixes (all but the channel and class counts)."""
        return dict(depth=self.depth, base_channels=self.base_channels, padding=self.padding,
                    dropout=self.dropout, batch_norm=self.batch_norm)

    @property
    def geometry(self) -> Geometry:
        """The network's `Geometry` (legal tile sizes), without building the network."""
        return Geometry(depth=self.depth, padding=self.padding)  # type: ignore[arg-type]

    def network(self, in_channels: int, n_classes: int = 2) -> UNet:
        return UNet(in_channels=in_channels, n_classes=n_classes, **self.network_options())


def lr_factor(schedule: str, progress: float) -> float:
    """Learning-rate multiplier at `progress` in [0, 1] of the budget (iterations or seconds).

    "constant": 1. "poly": (1 - p)^0.9, as nnU-Net. "cosine": half a cosine from 1 to 0.
    "onecycle": linear warm-up from 0.04 to 1 over the first 30 %, then half a cosine to 0.

    Example:
        >>> [round(lr_factor(s, 0.5), 3) for s in LR_SCHEDULES]
        [1.0, 0.536, 0.5, 0.812]
    """
    p = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "poly":
        return (1.0 - p) ** 0.9
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "onecycle":
        if p < 0.3:
            return 0.04 + 0.96 * p / 0.3
        return 0.5 * (1.0 + math.cos(math.pi * (p - 0.3) / 0.7))
    raise InputError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")


LR_SCHEDULES = ("constant", "poly", "cosine", "onecycle")


class TrainingDiverged(InputError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def foreground_scores(model: UNet, samples: Sequence[Sample], device: torch.device) -> tuple[float, float]:
    """Foreground IoU and pixel error of `model` over whole `samples` (pixels pooled over images)."""
    from .metrics.pixel import iou, pixel_error

    foreground = [predict(model, sample.image, device=device)[1] for sample in samples]
    truth = [sample.target for sample in samples]
    return iou(foreground, truth), pixel_error(foreground, truth)


class _Budget:
    """Seconds of the run's time budget spent, across resumes, on the configured clock."""

    def __init__(self, clock: str, spent_before: float) -> None:
        self.clock = time.process_time if clock == "cpu" else time.perf_counter
        self.spent_before = spent_before
        self.started = self.clock()

    def spent(self) -> float:
        return self.spent_before + self.clock() - self.started


class Trainer:
    """Trains a U-Net on `samples` and writes a run folder.

    RUN/ receives config.json, log.csv (one row per iteration), curves.png, last.pt (every
    `checkpoint_every` iterations and at the end) and best.pt (best validation IoU with a constant
    learning rate; the final weights with a schedule that decays to zero, which scored better than
    the best-IoU checkpoint in docs/TRAINING.md; the last checkpoint when there is no validation
    set). `resume=True` continues a run from RUN/last.pt
    exactly: iteration count, weights, optimiser state and random number generator states, and
    tile i of the data stream is a pure function of (seed, i).

    `Trainer.start` sets up a new run from dataset folders (split, samples, RUN/data.json) and
    `Trainer.from_run` continues one from its folder alone; `unetkit train` is these two. In a
    process group (torchrun, `unetkit.ddp.init_process_group`) every rank builds the same trainer
    and trains with DistributedDataParallel on its share of each batch; rank 0 alone validates and
    writes the run folder.

    Args:
        config: the run's `TrainConfig`.
        train_samples: annotated samples tiles are drawn from.
        val_samples: samples scored every `val_every` iterations (never used for training).
        run_dir: the run folder.
        normalization: how the samples were normalised (stored for prediction).
        class_names: names of the output classes.
        resume: continue the run in `run_dir`.
        progress: show a progress bar.

    Example:
        >>> summary = Trainer(TrainConfig(iterations=100), samples, [], "runs/a").fit()  # doctest: +SKIP
    """

    def __init__(
        self,
        config: TrainConfig,
        train_samples: Sequence[Sample],
        val_samples: Sequence[Sample],
        run_dir: str | os.PathLike,
        *,
        normalization: Normalization,
        class_names: Sequence[str] = ("background", "foreground"),
        resume: bool = False,
        progress: bool = True,
    ) -> None:
        if not train_samples:
            raise InputError("no training samples; give a folder with annotated images")
        self.config = config
        self.train_samples = list(train_samples)
        self.val_samples = list(val_samples)
        self.run_dir = Path(run_dir)
        self.normalization = normalization
        self.class_names = list(class_names)
        self.progress = progress
        self._world = ddp.world()  # one process, or this rank's place under torchrun (unetkit.ddp)
        ddp.check_batch_size(config.batch_size, self._world.world_size)
        self.device = ddp.rank_device(resolve_device(config.device), self._world)
        config.geometry.check(config.tile_size, "tile size (--tile-size)")
        in_channels = self.train_samples[0].image.shape[0]
        self.model = config.network(in_channels, len(self.class_names))
        self.iteration = 0
        self.best_iou = -math.inf
        self.seconds_spent = 0.0  # budget used by earlier sessions of this run (see max_seconds)
        self.decision_scores: dict[str, float | None] = {}  # validation score of the labels rule per batch-norm statistics
        if resume:
            self._restore()
        else:
            torch.manual_seed(config.seed)
            self.model.reset_parameters()
            self.model.to(self.device)
            self.optimizer = self._make_optimizer()
        self._net = ddp.wrap(self.model, self.device, self._world)  # what the steps call; self.model is saved
        self.loss_fn = SegmentationLoss(config.dice_weight)
        self.flops_per_step = 3.0 * self.model.flops(config.tile_size) * config.batch_size

    # -- run folders -------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        config: TrainConfig,
        data: str | os.PathLike,
        run_dir: str | os.PathLike,
        *,
        val: float | int | Sequence[str] | None = None,
        val_data: str | os.PathLike | None = None,
        val_split: str = "last",
        normalization: Normalization | None = None,
        allow_intensity_masks: bool = False,
        epochs: float | None = None,
        force: bool = False,
        progress: bool = True,
    ) -> "Trainer":
        """A new run in `run_dir` on the dataset folder `data` (see `unetkit.data.find_pairs`).

        Validation images are `val_data` if given, else `val` of `data` (a fraction, a count or
        names, 0.2 if None), chosen by `unetkit.data.split_pairs`: with `val_split` "last" the last
        images in name order, with "random" drawn with the config's seed. `epochs`, if given, sets
        `config.iterations` to that many passes over the training pixels, counted in output tiles.
        The folder is prepared (`force` allows a non-empty one) and RUN/data.json records the
        dataset and the split, so `from_run` can continue the run.
        """
        from .data import find_pairs, split_pairs
        from .io import prepare_output_dir, remove_stale_temp_files

        resolve_device(config.device)  # an unavailable device fails before the images are loaded
        normalization = normalization or Normalization()
        data, run_dir = Path(data), Path(run_dir)
        pairs = find_pairs(data)
        if val_data is not None:
            train_pairs, val_pairs = pairs, find_pairs(val_data)
        else:
            train_pairs, val_pairs = split_pairs(pairs, 0.2 if val is None else val, seed=config.seed, split=val_split)
        train, validation = _load_split(train_pairs, val_pairs, normalization, config, allow_intensity_masks)
        if epochs is not None:
            out_pixels = config.geometry.output_size(config.tile_size) ** 2 * config.batch_size
            total = sum(s.shape[0] * s.shape[1] for s in train)
            config.iterations = max(1, round(epochs * total / out_pixels))
        if ddp.world().is_main:
            prepare_output_dir(run_dir, force=force)
            remove_stale_temp_files(run_dir)  # left in the run folder by a killed run (kill -9)
            _write_data_json(run_dir, data, val_data, val, val_split, train_pairs, val_pairs, allow_intensity_masks)
        return cls(config, train, validation, run_dir, normalization=normalization, progress=progress)

    @classmethod
    def from_run(
        cls,
        run_dir: str | os.PathLike,
        *,
        data: str | os.PathLike | None = None,
        val_data: str | os.PathLike | None = None,
        iterations: int | None = None,
        max_seconds: float | None = None,
        progress: bool = True,
    ) -> "Trainer":
        """Continue the run in `run_dir` exactly where it stopped, from its folder alone.

        RUN/config.json gives the settings, RUN/data.json the dataset and the split, RUN/last.pt the
        state. `data` / `val_data` give a dataset that moved (recorded in data.json again);
        `iterations` and `max_seconds` extend the run's budget. Messages say what is missing.
        """
        from .checkpoint import load_checkpoint
        from .data import find_pairs, split_pairs
        from .io import check_writable_folder, remove_stale_temp_files

        run_dir = Path(run_dir)
        check_writable_folder(run_dir, "--resume")
        saved, setup = _read_run(run_dir)
        overrides = {"iterations": iterations if iterations is not None else saved.get("iterations"),
                     "max_seconds": max_seconds if max_seconds is not None else saved.get("max_seconds")}
        try:
            config = TrainConfig.from_dict({**saved, **overrides})
        except (ValueError, TypeError) as exc:
            raise InputError(f"{run_dir / 'config.json'}: {exc}") from None
        last = load_checkpoint(run_dir / "last.pt")
        try:
            TrainConfig.from_dict(last.train_config)
        except (ValueError, TypeError) as exc:
            raise InputError(f"{run_dir / 'last.pt'}: {exc}") from None
        resolve_device(config.device)
        moved = data is not None or val_data is not None
        data = Path(data) if data is not None else Path(setup["data"])
        if val_data is None and setup.get("val_data"):
            val_data = setup["val_data"]
        val_data = Path(val_data) if val_data is not None else None
        for folder, option in ((data, "--data"), (val_data, "--val-data")):
            if folder is not None and not folder.is_dir():
                raise InputError(f"{folder}: the run's dataset folder is not there; if it moved, give its new place with {option}")
        val = setup.get("val")
        val_split = setup.get("val_split", "random")  # data.json of older runs: they split at random
        allow_intensity_masks = bool(setup.get("allow_intensity_masks", False))
        pairs = find_pairs(data)
        if "train" in setup and "validation" in setup:
            train_pairs = _recorded_pairs(pairs, setup["train"], data, run_dir)
            val_pairs = _recorded_pairs(find_pairs(val_data) if val_data is not None else pairs, setup["validation"],
                                        val_data or data, run_dir)
        elif val_data is not None:
            train_pairs, val_pairs = pairs, find_pairs(val_data)
        else:
            train_pairs, val_pairs = split_pairs(pairs, parse_validation(val), seed=config.seed, split=val_split)
        train, validation = _load_split(train_pairs, val_pairs, last.normalization, config, allow_intensity_masks)
        if ddp.world().is_main:
            remove_stale_temp_files(run_dir)  # left in the run folder by a killed run (kill -9)
            if moved:
                _write_data_json(run_dir, data, val_data, val, val_split, train_pairs, val_pairs, allow_intensity_masks)
        return cls(config, train, validation, run_dir, normalization=last.normalization, resume=True, progress=progress)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "adam":
            return torch.optim.Adam(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.SGD(self.model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def _restore(self) -> None:
        path = self.run_dir / "last.pt"
        if not path.is_file():
            raise InputError(f"{path}: nothing to resume (no last.pt); start a new run with --out")
        loaded = load_checkpoint(path)
        saved = TrainConfig.from_dict(loaded.train_config)
        if saved.network_options() != self.config.network_options():
            raise InputError(f"{path}: the run used a different network configuration; resume with the same options")
        self.model = loaded.model.to(self.device)
        self.optimizer = self._make_optimizer()
        self.optimizer.load_state_dict(loaded.state["optimizer"])
        torch.set_rng_state(loaded.state["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in loaded.state:
            torch.cuda.set_rng_state(loaded.state["cuda_rng"])
        self.iteration = loaded.iteration
        self.best_iou = float(loaded.state.get("best_iou", -math.inf))
        self.seconds_spent = float(loaded.state.get("seconds_spent", 0.0))
        self._truncate_log(self.iteration)

    # -- bookkeeping -------------------------------------------------------------------------
    def _save(self, name: str) -> Path:
        if not self._world.is_main:
            return self.run_dir / name
        state = {
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "best_iou": self.best_iou,
            "seconds_spent": self.seconds_spent,
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state()
        return save_checkpoint(
            self.run_dir / name,
            self.model,
            normalization=self.normalization,
            class_names=self.class_names,
            train_config=self.config.to_dict(),
            iteration=self.iteration,
            state=state,
        )

    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.csv"

    def _truncate_log(self, iteration: int) -> None:
        if not self.log_path.exists():
            return
        with open(self.log_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= iteration]
        self._write_log(rows)

    def _write_log(self, rows: list[dict]) -> None:
        if not self._world.is_main:
            return

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, LOG_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.log_path, write, force=True)

    def _append_log(self, row: dict) -> None:
        if not self._world.is_main:
            return
        new = not self.log_path.exists()
        with open(self.log_path, "a", newline="") as f:
            writer = csv.DictWriter(f, LOG_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)

    def _plot(self) -> None:
        from .plots import plot_training_curves

        if not self._world.is_main:
            return
        plot_training_curves(self.log_path, self.run_dir / "curves.png")

    # -- the loop ----------------------------------------------------------------------------
    def validate(self) -> tuple[float, float]:
        return foreground_scores(self.model, self.val_samples, self.device)

    def _set_learning_rate(self, seconds_spent: float) -> None:
        c = self.config
        progress = self.iteration / c.iterations
        if c.max_seconds:
            progress = max(progress, seconds_spent / c.max_seconds)
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr * lr_factor(c.lr_schedule, progress)

    def choose_decision(self, tta: bool = True) -> DecisionRule:
        """Pick the labels rule on the validation images with the best model and store it in best.pt.

        The maps are made as `unetkit predict --tta` makes them (8-fold test-time augmentation),
        and the rule records that, so prediction uses the same maps it was chosen on.
        """
        best_path = self.run_dir / "best.pt"
        loaded = load_checkpoint(best_path)
        model = loaded.model.to(self.device).eval()
        truths = [s.instances for s in self.val_samples]
        # Maps with the training statistics of batch norm, and (with batch norm) with each image's
        # own; the rule that scores best on either, with the way its maps were made.
        rules = []
        for statistics in NORM_STATISTICS if has_batch_norm(model) else NORM_STATISTICS[:1]:
            maps = [predict(model, s.image, tta=tta, device=self.device, norm_statistics=statistics)[1] for s in self.val_samples]
            rules.append(choose_decision(maps, truths, tta=tta, image_statistics=statistics == "image"))
        # Both scores go into the summary: the choice can be close, and a user should see how close.
        self.decision_scores = {r.norm_statistics: r.score for r in rules}
        rule = best_rule(rules)
        save_checkpoint(
            best_path, loaded.model, normalization=loaded.normalization, class_names=loaded.class_names,
            train_config=loaded.train_config, iteration=loaded.iteration, state=loaded.state, decision=rule.to_dict(),
        )
        return rule

    def fit(self) -> dict[str, Any]:
        """Train until `config.iterations` (or `max_seconds`); returns a summary dict.

        Ctrl-C saves RUN/last.pt at the interrupted iteration (so `from_run` continues from it)
        and raises KeyboardInterrupt again. A NaN loss raises `TrainingDiverged`.
        """
        c = self.config
        self._write_run_files()
        loader = self._tile_loader()
        self.model.train()
        start_iteration = self.iteration
        budget = ddp.shared_clock(_Budget(c.budget_clock, self.seconds_spent), self.device, self._world)
        started = time.perf_counter()
        compute_seconds = 0.0
        self._last_good = self.iteration
        bar = tqdm(total=c.iterations, initial=self.iteration, disable=not (self.progress and self._world.is_main), desc="train", unit="it")
        val_iou = val_error = float("nan")
        finished = False
        try:
            for batch in loader:
                step_started = time.perf_counter()
                loss = self._step(batch, budget)
                compute_seconds += time.perf_counter() - step_started
                self.iteration += 1
                elapsed = time.perf_counter() - started
                self.seconds_spent = budget.spent()
                finished = self._finished()
                row = {"iteration": self.iteration, "loss": f"{loss:.6g}", "seconds": f"{elapsed:.3f}", "val_iou": "", "val_pixel_error": ""}
                if self.val_samples and self._world.is_main and (self.iteration % c.val_every == 0 or finished):
                    val_iou, val_error = self._validate_and_keep_best(row)
                self._append_log(row)
                if row["val_iou"]:  # RUN/report.html, refreshed at each validation
                    from .report import write_training_report

                    write_training_report(self)
                done_steps = self.iteration - start_iteration
                bar.set_postfix(loss=f"{loss:.4f}", gflops=f"{self.flops_per_step * done_steps / max(elapsed, 1e-9) / 1e9:.1f}")
                bar.update(1)
                if self.iteration % c.checkpoint_every == 0 or finished:
                    self._checkpoint()
                if finished:
                    break
        except KeyboardInterrupt:
            self._save("last.pt")  # Ctrl-C: keep the interrupted iteration so `--resume` continues from it
            raise
        finally:
            bar.close()
        decision = self.choose_decision() if finished and self.val_samples and c.choose_decision and self._world.is_main else None
        seconds = time.perf_counter() - started
        steps = self.iteration - start_iteration
        return {
            "iterations": self.iteration,
            "steps_this_run": steps,
            "seconds": seconds,
            "step_seconds": compute_seconds / max(steps, 1),
            "loop_seconds_per_step": seconds / max(steps, 1),
            "train_gflops": self.flops_per_step * steps / max(compute_seconds, 1e-9) / 1e9,
            "best_val_iou": None if self.best_iou == -math.inf else self.best_iou,
            "val_iou": None if math.isnan(val_iou) else val_iou,
            "val_pixel_error": None if math.isnan(val_error) else val_error,
            "decision": None if decision is None else decision.to_dict(),
            "decision_scores": None if decision is None else self.decision_scores,
            "run_dir": str(self.run_dir),
        }

    # -- the steps of `fit` ----------------------------------------------------------------------
    def _write_run_files(self) -> None:
        """RUN/config.json, and a new log when a new run reuses a folder."""
        if not self._world.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.iteration == 0 and self.log_path.exists():
            self._write_log([])  # a new run in a reused folder starts a new log
        text = json.dumps(self.config.to_dict(), indent=2)
        atomic_write(self.run_dir / "config.json", lambda p: p.write_text(text), force=True)

    def _tile_loader(self):
        """Batches of augmented tiles from the current iteration to the last (item i = f(seed, i))."""
        c = self.config
        dataset = TileDataset(
            self.train_samples, c.geometry, c.tile_size, augmenter=Augmenter(c.augment),
            length=c.iterations * c.batch_size, seed=c.seed,
        )
        return get_tile_loader(
            dataset, batch_size=c.batch_size, num_workers=c.workers,
            start=self.iteration * c.batch_size, stop=c.iterations * c.batch_size,
            rank=self._world.rank, world_size=self._world.world_size,
        )

    def _step(self, batch: dict[str, torch.Tensor], budget: _Budget) -> float:
        """One optimisation step on `batch`; returns the loss."""
        image = batch["image"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        weights = batch["weights"].to(self.device, non_blocking=True)
        self._set_learning_rate(budget.spent())
        ddp.seed_step(self.config.seed, self.iteration, self._world)
        loss = self.loss_fn(self._net(image), target, weights)
        batch_loss = ddp.mean_over_ranks(loss, self._world)  # the global batch's loss, the same on every rank
        self._check_finite(batch_loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return batch_loss.item()

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Stop with `TrainingDiverged` on a NaN or infinite loss (last.pt keeps the last good state)."""
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss.item()} at iteration {self.iteration + 1}; training stopped and "
                f"{self.run_dir / 'last.pt'} keeps iteration {self._last_good}. Lower the learning rate "
                f"(--lr {self.config.lr / 10:g}) or use --optimizer adam"
            )

    def _finished(self) -> bool:
        c = self.config
        out_of_time = c.max_seconds is not None and self.seconds_spent >= c.max_seconds
        return self.iteration >= c.iterations or out_of_time

    def _validate_and_keep_best(self, row: dict[str, str]) -> tuple[float, float]:
        """Score the validation images into `row`; a new best IoU is saved as best.pt."""
        val_iou, val_error = self.validate()
        self.model.train()
        row["val_iou"], row["val_pixel_error"] = f"{val_iou:.6f}", f"{val_error:.6f}"
        if val_iou > self.best_iou:
            self.best_iou = val_iou
            self._save("best.pt")
        return val_iou, val_error

    def _checkpoint(self) -> None:
        """last.pt (and best.pt without validation images, or at the end of a decaying schedule),
        then the curves."""
        self._save("last.pt")
        self._last_good = self.iteration
        if not self.val_samples or (self.config.lr_schedule != "constant" and self._finished()):
            self._save("best.pt")
        self._plot()


# -- run folders: RUN/data.json and what `Trainer.from_run` reads ---------------------------------


def parse_validation(text: str | None) -> float | int | list[str]:
    """--val: a fraction ("0.2"), a count ("5") or comma-separated names ("t045,t046"); None: 0.2.

    Example:
        >>> parse_validation("0.25"), parse_validation("5"), parse_validation("t045, t046")
        (0.25, 5, ['t045', 't046'])
    """
    if text is None:
        return 0.2
    try:
        number = float(text)
    except ValueError:
        return [name.strip() for name in text.split(",") if name.strip()]
    return int(number) if number >= 1 and number == int(number) else number


def _load_split(train_pairs, val_pairs, normalization: Normalization, config: TrainConfig,
                allow_intensity_masks: bool) -> tuple[list[Sample], list[Sample]]:
    from .data import load_samples

    options = dict(targets=config.targets, allow_intensity_masks=allow_intensity_masks)
    train = load_samples(train_pairs, normalization, **options)
    return train, (load_samples(val_pairs, normalization, **options) if val_pairs else [])


def _write_data_json(run_dir: Path, data: Path, val_data: Path | None, val, val_split: str, train_pairs, val_pairs,
                     allow_intensity_masks: bool) -> None:
    """RUN/data.json: the dataset folders and the names of the training and validation images."""
    if isinstance(val, (list, tuple)):
        val = ",".join(map(str, val))
    setup = {
        "data": str(Path(data).resolve()), "val_data": str(Path(val_data).resolve()) if val_data else None,
        "val": None if val is None else str(val), "val_split": val_split,
        "train": [p.name for p in train_pairs], "validation": [p.name for p in val_pairs],
        "allow_intensity_masks": allow_intensity_masks,
    }
    text = json.dumps(setup, indent=2)
    atomic_write(run_dir / "data.json", lambda path: path.write_text(text), force=True)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: damaged ({exc}); the run cannot be resumed, start a new one") from None


def _read_run(run_dir: Path) -> tuple[dict, dict]:
    """config.json and data.json of a run folder to resume; the message says exactly what is missing."""
    names = ("config.json", "data.json", "last.pt")
    missing = [name for name in names if not (run_dir / name).is_file()]
    if len(missing) == len(names):
        raise InputError(
            f"{run_dir}: not a run folder (no config.json, data.json or last.pt); give the --out of an earlier `unetkit train`"
        )
    if missing == ["last.pt"]:
        raise InputError(
            f"{run_dir}: last.pt is missing (config.json and data.json are there): the run stopped before its first "
            f"checkpoint, so there is nothing to resume; start it again with `unetkit train --out {run_dir} --force` "
            "and its other options"
        )
    if missing:
        raise InputError(f"{run_dir}: cannot resume, {' and '.join(missing)} missing; start a new run with --out")
    return _read_json(run_dir / "config.json"), _read_json(run_dir / "data.json")


def _recorded_pairs(pairs: list, names: list, folder: Path, run_dir: Path) -> list:
    """The pairs the run used, by name, from a (possibly moved) dataset folder."""
    by_name = {pair.name: pair for pair in pairs}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise InputError(
            f"{folder}: {len(missing)} image(s) the run {run_dir} was trained on are not in this dataset "
            f"(e.g. {', '.join(missing[:3])}); give the run's dataset with --data"
        )
    return [by_name[name] for name in names]
