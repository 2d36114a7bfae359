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

from .augment import AugmentConfig, Augmenter
from .checkpoint import load_checkpoint, save_checkpoint
from .config import PAPER, from_dict_strict
from .data.normalize import Normalization
from .data.samples import Sample
from .data.tiles import TileDataset, get_tile_loader
from .decision import DecisionRule, choose_decision
from .device import resolve_device
from .errors import InputError
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
    iterations: int = 10_000
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

    def network(self, in_channels: int, n_classes: int = 2) -> UNet:
        return UNet(
            in_channels=in_channels,
            n_classes=n_classes,
            depth=self.depth,
            base_channels=self.base_channels,
            padding=self.padding,  # type: ignore[arg-type]
            dropout=self.dropout,
            batch_norm=self.batch_norm,
        )


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


class Trainer:
    """Trains a U-Net on `samples` and writes a run folder.

    RUN/ receives config.json, log.csv (one row per iteration), curves.png, last.pt (every
    `checkpoint_every` iterations and at the end) and best.pt (best validation IoU; the last
    checkpoint when there is no validation set). `resume=True` continues a run from RUN/last.pt
    exactly: iteration count, weights, optimiser state and random number generator states, and
    tile i of the data stream is a pure function of (seed, i).

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
        self.device = resolve_device(config.device)
        in_channels = self.train_samples[0].image.shape[0]
        self.model = config.network(in_channels, len(self.class_names))
        geometry = self.model.geometry
        geometry.check(config.tile_size, "tile size (--tile-size)")
        self.iteration = 0
        self.best_iou = -math.inf
        self.seconds_spent = 0.0  # budget used by earlier sessions of this run (see max_seconds)
        if resume:
            self._restore()
        else:
            torch.manual_seed(config.seed)
            self.model.reset_parameters()
            self.model.to(self.device)
            self.optimizer = self._make_optimizer()
        self.loss_fn = SegmentationLoss(config.dice_weight)
        self.flops_per_step = 3.0 * self.model.flops(config.tile_size) * config.batch_size

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
        if saved.network(1).config != self.config.network(1).config:
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
        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, LOG_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.log_path, write, force=True)

    def _append_log(self, row: dict) -> None:
        new = not self.log_path.exists()
        with open(self.log_path, "a", newline="") as f:
            writer = csv.DictWriter(f, LOG_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)

    def _plot(self) -> None:
        from .plots import plot_training_curves

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
        maps = [predict(model, s.image, tta=tta, device=self.device)[1] for s in self.val_samples]
        rule = choose_decision(maps, [s.instances for s in self.val_samples], tta=tta)
        save_checkpoint(
            best_path, loaded.model, normalization=loaded.normalization, class_names=loaded.class_names,
            train_config=loaded.train_config, iteration=loaded.iteration, state=loaded.state, decision=rule.to_dict(),
        )
        return rule

    def fit(self) -> dict[str, Any]:
        """Train until `config.iterations` (or `max_seconds`); returns a summary dict."""
        c = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.iteration == 0 and self.log_path.exists():
            self._write_log([])  # a new run in a reused folder starts a new log
        atomic_write(self.run_dir / "config.json", lambda p: p.write_text(json.dumps(c.to_dict(), indent=2)), force=True)
        augmenter = Augmenter(c.augment)
        dataset = TileDataset(
            self.train_samples, self.model.geometry, c.tile_size, augmenter=augmenter,
            length=c.iterations * c.batch_size, seed=c.seed,
        )
        loader = get_tile_loader(
            dataset, batch_size=c.batch_size, num_workers=c.workers,
            start=self.iteration * c.batch_size, stop=c.iterations * c.batch_size,
        )
        self.model.train()
        start_iteration = self.iteration
        clock = time.process_time if c.budget_clock == "cpu" else time.perf_counter
        spent_before = self.seconds_spent
        budget_started = clock()
        started = time.perf_counter()
        compute_seconds = 0.0
        last_good = self.iteration
        bar = tqdm(total=c.iterations, initial=self.iteration, disable=not self.progress, desc="train", unit="it")
        val_iou = val_error = float("nan")
        finished = False
        try:
            for batch in loader:
                step_started = time.perf_counter()
                image = batch["image"].to(self.device, non_blocking=True)
                target = batch["target"].to(self.device, non_blocking=True)
                weights = batch["weights"].to(self.device, non_blocking=True)
                self._set_learning_rate(spent_before + clock() - budget_started)
                logits = self.model(image)
                loss = self.loss_fn(logits, target, weights)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at iteration {self.iteration + 1}; training stopped and "
                        f"{self.run_dir / 'last.pt'} keeps iteration {last_good}. Lower the learning rate "
                        f"(--lr {c.lr / 10:g}) or use --optimizer adam"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                compute_seconds += time.perf_counter() - step_started
                self.iteration += 1
                elapsed = time.perf_counter() - started
                self.seconds_spent = spent_before + clock() - budget_started
                row = {"iteration": self.iteration, "loss": f"{loss.item():.6g}", "seconds": f"{elapsed:.3f}", "val_iou": "", "val_pixel_error": ""}
                out_of_time = c.max_seconds is not None and self.seconds_spent >= c.max_seconds
                finished = self.iteration >= c.iterations or out_of_time
                if self.val_samples and (self.iteration % c.val_every == 0 or finished):
                    val_iou, val_error = self.validate()
                    self.model.train()
                    row["val_iou"], row["val_pixel_error"] = f"{val_iou:.6f}", f"{val_error:.6f}"
                    if val_iou > self.best_iou:
                        self.best_iou = val_iou
                        self._save("best.pt")
                self._append_log(row)
                done_steps = self.iteration - start_iteration
                bar.set_postfix(loss=f"{loss.item():.4f}", gflops=f"{self.flops_per_step * done_steps / max(elapsed, 1e-9) / 1e9:.1f}")
                bar.update(1)
                if self.iteration % c.checkpoint_every == 0 or finished:
                    self._save("last.pt")
                    last_good = self.iteration
                    if not self.val_samples:
                        self._save("best.pt")
                    self._plot()
                if finished:
                    break
        except KeyboardInterrupt:
            self._save("last.pt")  # Ctrl-C: keep the interrupted iteration so `--resume` continues from it
            raise
        finally:
            bar.close()
        decision = self.choose_decision() if finished and self.val_samples and c.choose_decision else None
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
            "run_dir": str(self.run_dir),
        }
