"""Training as in the paper: one large tile per step, SGD with momentum 0.99, the weighted
cross-entropy over precomputed weight maps, elastic deformation; with validation, checkpoints,
an exact `resume`, a CSV log and a plot of the curves.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import ddp
from .adapt import NORM_STATISTICS, batch_norm_layers, gather_statistics, has_batch_norm, pooled_statistics, set_statistics
from .augment import AugmentConfig, Augmenter
from .checkpoint import load_checkpoint, save_checkpoint
from .config import DEFAULT_ITERATIONS, PAPER, check_settings, from_dict_strict, is_positive_number
from .data.normalize import Normalization
from .data.samples import Sample
from .data.tiles import TileDataset, get_tile_loader
from .decision import DecisionRule, choose_decision, choose_statistics
from .device import is_out_of_memory, resolve_device
from .errors import InputError
from .geometry import Geometry, VolumeGeometry
from .io import atomic_write
from .loss import IGNORE_INDEX, SegmentationLoss
from .network import UNet
from .predict import predict
from .targets import TargetConfig

#: Volumes: the output slices a default 3D training tile holds along z (`TrainConfig.tile_shape`).
MIN_OUTPUT_SLICES = 4
#: The loader's length when only `max_seconds` limits a run (`TrainConfig.iterations` None).
UNLIMITED_ITERATIONS = 10**12
LOG_COLUMNS = ("iteration", "loss", "seconds", "val_iou", "val_pixel_error")
#: `TargetConfig` fields, which configs written before `TrainConfig.targets` held at their top level.
TARGET_KEYS = tuple(f.name for f in fields(TargetConfig))


def precise_batch_norm(model: UNet, images: Sequence[np.ndarray], tile_size: int) -> None:
    """Set `model`'s batch-norm running statistics to their average over the input tiles of
    `images` (normalised (C, H, W) arrays), each tile weighted alike (`unetkit.adapt.pooled_statistics`).

    Example:
        >>> net = UNet(depth=2, base_channels=4, batch_norm=True)
        >>> image = np.random.default_rng(0).random((1, 40, 40), dtype=np.float32)
        >>> precise_batch_norm(net, [image, image], 44)
        >>> first = batch_norm_layers(net)[0].running_mean.numpy()
        >>> bool(np.allclose(first, gather_statistics(net, image, 44).means[0]))
        True
    """
    if not batch_norm_layers(model) or not images:
        return
    set_statistics(model, pooled_statistics([gather_statistics(model, image, tile_size) for image in images]))


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

    Volumes (`dims=3`, the 3D U-Net of Cicek et al. 2016): `spacing` is the voxel size (z, y, x)
    of the training volumes (only ratios matter), from which `unetkit.geometry.plan_kernels`
    plans anisotropic pooling as nnU-Net does; tiles are (`tile_depth`, `tile_size`,
    `tile_size`), `tile_depth` None choosing the smallest legal depth whose output holds at least
    `MIN_OUTPUT_SLICES` slices. Samples are `unetkit.data.VolumeSample`s. `ignore_label`: mask
    voxels of this value are unlabelled (sparse annotation): no loss there, and validation scores
    only the other voxels (`load_volume_samples`); None (the default, and that of runs written
    before it existed): every voxel is annotated.

    `precise_bn`: when training ends, replace each batch-norm layer's running statistics (an
    exponential average over the last few augmented tiles, noisy with batches of one) by their
    average over the tiles of all training images, as `predict` tiles them (`precise_batch_norm`;
    "precise BN", Wu & Johnson 2021). 2D only. The fine-tuning recipe uses it
    (`unetkit.recipes.FINETUNE`: on outside HeLa nuclei it lifted SEG from 0.62 to 0.78).

    Example:
        >>> TrainConfig(iterations=10).momentum
        0.99
        >>> TrainConfig(dims=3, spacing=(4, 1, 1), depth=3, tile_size=44).tile_shape
        (20, 44, 44)
    """

    # network
    dims: int = 2
    spacing: tuple[float, float, float] | None = None  # volumes: voxel size (z, y, x)
    depth: int = PAPER.depth
    base_channels: int = PAPER.base_channels
    padding: str = "valid"
    dropout: float = PAPER.dropout
    batch_norm: bool = False
    # tiles, targets, augmentation
    tile_size: int = PAPER.tile_size
    tile_depth: int | None = None  # volumes: the tiles' z size (None: see `tile_shape`)
    batch_size: int = PAPER.batch_size
    targets: TargetConfig = field(default_factory=TargetConfig)
    ignore_label: int | None = None  # volumes: the mask value of unlabelled voxels
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # optimisation
    optimizer: str = "sgd"
    lr: float = 0.001
    momentum: float = PAPER.momentum
    weight_decay: float = 0.0
    dice_weight: float = 0.0
    lr_schedule: str = "constant"
    iterations: int | None = DEFAULT_ITERATIONS  # None: `max_seconds` alone limits the run
    max_seconds: float | None = None
    budget_clock: str = "wall"
    precision: str = "fp32"  # "bf16": bfloat16 autocast for the forward pass, fp32 weights (`training_autocast`)
    precision_scores: bool = True  # score the labels rule in each precision this machine runs, for `--precision auto`
    choose_decision: bool = True
    precise_bn: bool = False  # batch-norm statistics of the training images at the end (see above)
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
        for name, kind in (("augment", AugmentConfig), ("targets", TargetConfig)):
            if not isinstance(getattr(self, name), kind):
                raise InputError(f"{name} must be a {kind.__name__} or a mapping of its settings (got {getattr(self, name)!r})")
        check_settings({f.name: getattr(self, f.name) for f in fields(self)})
        if self.optimizer not in ("sgd", "adam"):
            raise InputError(f"optimizer must be 'sgd' or 'adam' (got {self.optimizer!r})")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)} (got {self.lr_schedule!r})")
        if self.budget_clock not in ("wall", "cpu"):
            raise InputError(f"budget_clock must be 'wall' or 'cpu' (got {self.budget_clock!r})")
        if self.iterations is None and self.max_seconds is None:
            raise InputError("iterations None (no iteration limit) needs max_seconds (--seconds), the run's time budget")
        if self.dims not in (2, 3):
            raise InputError(f"dims must be 2 (images) or 3 (volumes), got {self.dims!r}")
        if self.dims == 2 and (self.spacing is not None or self.tile_depth is not None):
            raise InputError("spacing and tile_depth (--spacing, --tile-depth) are for volumes: add --dims 3")
        if self.ignore_label is not None:
            if isinstance(self.ignore_label, bool) or not isinstance(self.ignore_label, (int, np.integer)):
                raise InputError(f"ignore_label (--ignore-label) must be a whole number, the mask value of unlabelled "
                                 f"voxels (got {self.ignore_label!r})")
            if self.dims != 3:
                raise InputError("ignore_label (--ignore-label) is for volumes: add --dims 3")
            self.ignore_label = int(self.ignore_label)
        if self.spacing is not None:
            from .data.volumes import check_spacing

            self.spacing = check_spacing(self.spacing, "spacing (--spacing)")
        if self.dims == 3 and self.padding != "valid":
            raise InputError("3D training uses valid convolutions (padding 'valid'), the overlap-tile prediction is exact for them")

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
        options = dict(depth=self.depth, base_channels=self.base_channels, padding=self.padding,
                       dropout=self.dropout, batch_norm=self.batch_norm)
        if self.dims == 3:
            from .geometry import plan_kernels

            pools, convs = plan_kernels(self.spacing or (1.0, 1.0, 1.0), self.depth)
            options.update(dims=3, pool_kernels=pools, conv_kernels=convs)
        return options

    @property
    def geometry(self) -> Geometry | VolumeGeometry:
        """The network's `Geometry` (legal tile sizes; `VolumeGeometry` for volumes), without building the network."""
        if self.dims == 3:
            options = self.network_options()
            return VolumeGeometry(options["pool_kernels"], options["conv_kernels"], self.padding)  # type: ignore[arg-type]
        return Geometry(depth=self.depth, padding=self.padding)  # type: ignore[arg-type]

    @property
    def tile_shape(self) -> int | tuple[int, int, int]:
        """The training tile: `tile_size` for images; (z, y, x) for volumes, z = `tile_depth` or the
        smallest legal depth whose output holds `MIN_OUTPUT_SLICES` slices."""
        if self.dims == 2:
            return self.tile_size
        z_axis = self.geometry.axes[0]
        depth = self.tile_depth if self.tile_depth is not None else z_axis.input_size(MIN_OUTPUT_SLICES)
        return (depth, self.tile_size, self.tile_size)

    def check_tiles(self) -> None:
        """Raise an InputError naming the option when the training tile is not legal for the network."""
        if self.dims == 2:
            self.geometry.check(self.tile_size, "tile size (--tile-size)")
        else:
            self.geometry.check(self.tile_shape, "tile shape (--tile-depth, --tile-size)")

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


def training_autocast(precision: str, device: torch.device):
    """The context a training step's forward pass runs in: nothing for "fp32"; for "bf16",
    bfloat16 autocast (weights, optimiser state and the loss stay fp32).

    Example:
        >>> with training_autocast("fp32", torch.device("cpu")):
        ...     torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype
        torch.float32
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def training_scale(samples: Sequence[Sample], pixel_size: float | None = None) -> dict[str, Any]:
    """The object scale of training `samples` for checkpoints: the median equivalent-circle
    diameter of all their objects in pixels (`unetkit.scale.median_diameter`), with `pixel_size`
    (micrometres per pixel) when known; {} when the masks hold no objects.

    Example:
        >>> import numpy as np
        >>> from unetkit.data import make_sample
        >>> mask = np.zeros((40, 40), np.uint8); mask[5:15, 5:15] = 1
        >>> training_scale([make_sample(np.random.rand(40, 40), mask)])
        {'diameter': 11.28}
    """
    from .scale import median_diameter

    diameter = median_diameter([sample.instances for sample in samples])
    if diameter is None:
        return {}
    return {"diameter": round(diameter, 2), **({"pixel_size": float(pixel_size)} if pixel_size else {})}


class TrainingDiverged(InputError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def foreground_scores(model: UNet, samples: Sequence[Sample], device: torch.device) -> tuple[float, float]:
    """Foreground IoU and pixel error of `model` over whole `samples` (pixels pooled over images;
    volumes: voxels, leaving out the unlabelled ones)."""
    from .metrics.pixel import iou, pixel_error

    if getattr(model, "dims", 2) == 3:
        from .volume import predict_volume

        maps = [predict_volume(model, sample.image, device=device, pad_thin=True)[1] for sample in samples]
        labelled = [sample.target != IGNORE_INDEX for sample in samples]
        foreground = [np.concatenate([m[k] for m, k in zip(maps, labelled)])[None]]  # one (1, N) image of labelled voxels
        truth = [np.concatenate([s.target[k] for s, k in zip(samples, labelled)])[None]]
        return iou(foreground, truth), pixel_error(foreground, truth)
    foreground = [predict(model, sample.image, device=device)[1] for sample in samples]
    truth = [sample.target for sample in samples]
    return iou(foreground, truth), pixel_error(foreground, truth)


def _output_shape(config: TrainConfig) -> tuple[int, ...]:
    """The output window of one training tile: (o, o) for images, (d, h, w) for volumes."""
    if config.dims == 3:
        return config.geometry.output_shape(config.tile_shape)  # type: ignore[union-attr, arg-type]
    size = config.geometry.output_size(config.tile_size)  # type: ignore[union-attr]
    return (size, size)


def _check_sample_dims(config: TrainConfig, samples: Sequence) -> None:
    """Images for a 2D run, volumes for a 3D one, or one line naming the fix."""
    volumes = [s for s in samples if s.image.ndim == 4]
    if config.dims == 3 and len(volumes) != len(samples):
        raise InputError("--dims 3 trains on volumes (multi-page TIFF z-stacks, unetkit.data.VolumeSample) but "
                         "the samples are 2D images; leave out --dims 3 to train a 2D model")
    if config.dims == 2 and volumes:
        raise InputError(f"{volumes[0].name} is a volume; add --dims 3 (and --spacing z,y,x) to train a 3D model on volumes")


class _Budget:
    """Seconds of the run's time budget spent, across resumes, on the configured clock."""

    def __init__(self, clock: str, spent_before: float) -> None:
        self.clock = time.process_time if clock == "cpu" else time.perf_counter
        self.spent_before = spent_before
        self.started = self.clock()

    def spent(self) -> float:
        return self.spent_before + self.clock() - self.started


class _StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (kill, SLURM, docker stop) during `fit`, raised as KeyboardInterrupt
    only where the state is a whole iteration.

    Inside `interruptible()` (loading tiles, forward and backward, validation, the labels rule: work
    that is redone on resume) a signal interrupts at once; elsewhere (the optimiser step, log rows,
    checkpoints) it is remembered and raised at the next `check()` or `interruptible()`. So
    last.pt is never written from half an optimiser step. Installed in the main thread only.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._open = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        if self._open:
            self._open = False
            raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt if a signal came in since `fit` started."""
        if self.received is not None:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def interruptible(self):
        self.check()
        self._open = True
        try:
            yield
        finally:
            self._open = False


class RunLock:
    """An exclusive lock on a run folder, so two processes never train one run at once.

    RUN/.unetkit.lock holds the training process's id and is locked with `fcntl.flock`, which the
    system releases when the process ends, however it ends: a lock file left by a killed process
    does not block. `release` removes the file. Without fcntl (Windows) there is no lock.

    Example:
        >>> with RunLock("runs/a"):  # doctest: +SKIP
        ...     pass
    """

    NAME = ".unetkit.lock"

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / self.NAME
        self._file = None

    def acquire(self) -> "RunLock":
        """Take the lock (a no-op if this object holds it); InputError naming the holder if another process does."""
        try:
            import fcntl
        except ImportError:  # not POSIX
            return self
        if self._file is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip()
                handle.close()
                raise InputError(f"{self.run_dir} is being trained by process {holder or '(unknown)'}; "
                                 "wait for it or stop it") from None
            try:  # the holder may have removed the file between our open and our lock: lock the new one
                if os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle
        return self

    def check(self) -> None:
        """Raise as `acquire` would, without keeping the lock."""
        if self.run_dir.is_dir():
            self.acquire().release()

    def release(self) -> None:
        if self._file is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # before unlocking: a waiting process then locks a new file
        self._file.close()
        self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


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
        initial: UNet | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        validation_note: str | None = None,
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
        self.callback = callback
        self.should_stop = should_stop
        self.validation_note = validation_note
        self._stop_requested = False
        _check_sample_dims(config, self.train_samples + self.val_samples)
        # A volume model's scale is its voxel spacing, kept in its TrainConfig.
        self.scale = training_scale(self.train_samples, config.targets.pixel_size) if config.dims == 2 else {}
        self._world = ddp.world()  # one process, or this rank's place under torchrun (unetkit.ddp)
        ddp.check_batch_size(config.batch_size, self._world.world_size)
        self.device = ddp.rank_device(resolve_device(config.device), self._world)
        if config.precision == "bf16":
            from .backends import bf16_native

            if not bf16_native(str(self.device)):
                raise InputError(f"--precision bf16 needs native bf16 (a CPU with AVX512-BF16 or AMX, or a GPU), and "
                                 f"{self.device} has none; use --precision fp32")
        config.check_tiles()
        in_channels = self.train_samples[0].image.shape[0]
        self.model = config.network(in_channels, len(self.class_names))
        self.iteration = 0
        self.best_iou = -math.inf
        self.seconds_spent = 0.0  # budget used by earlier sessions of this run (see max_seconds)
        self.decision_scores: dict[str, float | None] = {}  # validation score of the labels rule per batch-norm statistics
        self.precision_scores: dict[str, float] = {}  # the chosen rule's validation score per precision (`score_precisions`)
        self.stopped_by: str | None = None  # what ended `fit`: "iterations", "seconds" or "interrupted"
        self._run_lock = RunLock(self.run_dir)
        self._saved_iteration: int | None = None  # what last.pt holds, as far as this trainer knows
        if resume:
            if self._world.is_main:
                self._run_lock.acquire()  # before _restore, which may shorten log.csv
            try:
                self._restore()
            except BaseException:
                self._run_lock.release()
                raise
        else:
            torch.manual_seed(config.seed)
            self.model.reset_parameters()
            if initial is not None:  # fine-tuning: the start model's weights (and batch-norm statistics)
                if dict(initial.config) != dict(self.model.config):
                    raise InputError(f"the start model is a {dict(initial.config)} network but the run builds "
                                     f"{dict(self.model.config)}; leave out the network options to fine-tune it")
                self.model.load_state_dict(initial.state_dict())
            self.model.to(self.device)
            self.optimizer = self._make_optimizer()
        self._net = ddp.wrap(self.model, self.device, self._world)  # what the steps call; self.model is saved
        self.loss_fn = SegmentationLoss(config.dice_weight)
        self.flops_per_step = 3.0 * self.model.flops(config.tile_shape) * config.batch_size

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
        if normalization.mode == "fixed":  # remember what the fixed map was made for, so other images are refused
            from .io import read_image

            normalization = normalization.made_for([read_image(pair.image, pages=config.dims == 3) for pair in train_pairs])
        train, validation = _load_split(train_pairs, val_pairs, normalization, config, allow_intensity_masks)
        _check_validation_masks(val_pairs, validation)
        if epochs is not None:
            out_pixels = math.prod(_output_shape(config)) * config.batch_size
            total = sum(math.prod(s.shape) for s in train)
            config.iterations = max(1, round(epochs * total / out_pixels))
        if ddp.world().is_main:
            RunLock(run_dir).check()
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
        device: str | None = None,
        progress: bool = True,
    ) -> "Trainer":
        """Continue the run in `run_dir` exactly where it stopped, from its folder alone.

        RUN/config.json gives the settings, RUN/data.json the dataset and the split, RUN/last.pt the
        state. `data` / `val_data` give a dataset that moved (recorded in data.json again);
        `iterations` and `max_seconds` extend the run's budget; `device` replaces the run's (a run
        trained on a GPU continues on the CPU). Messages say what is missing. Another process
        training the run (`RunLock`) is refused before anything is loaded.
        """
        from .checkpoint import load_checkpoint
        from .data import find_pairs, split_pairs
        from .io import check_writable_folder, remove_stale_temp_files

        run_dir = Path(run_dir)
        check_writable_folder(run_dir, "--resume")
        saved, setup = _read_run(run_dir)
        if ddp.world().is_main:
            RunLock(run_dir).check()
        overrides = {"iterations": iterations if iterations is not None else saved.get("iterations"),
                     "max_seconds": max_seconds if max_seconds is not None else saved.get("max_seconds")}
        if device is not None:
            overrides["device"] = device
        try:
            config = TrainConfig.from_dict({**saved, **overrides})
        except (ValueError, TypeError) as exc:
            raise _damaged(run_dir / "config.json", str(exc)) from None
        last = load_checkpoint(run_dir / "last.pt")
        try:
            TrainConfig.from_dict(last.train_config)
        except (ValueError, TypeError) as exc:
            raise InputError(f"{run_dir / 'last.pt'}: {exc}") from None
        if (iterations is not None and iterations <= last.iteration) or (config.iterations or math.inf) < last.iteration:
            raise InputError(f"{run_dir} has done {last.iteration} iterations; --iterations must be more than {last.iteration}")
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
        rescaled = setup.get("rescaled")
        if rescaled or setup.get("validation_part"):  # a fine-tuning: the images as it prepared them
            train, validation = _load_fine_tune_split(train_pairs, val_pairs, last.normalization, config,
                                                      allow_intensity_masks, setup)
        else:
            train, validation = _load_split(train_pairs, val_pairs, last.normalization, config, allow_intensity_masks)
        _check_validation_masks(val_pairs, validation)
        trainer = cls(config, train, validation, run_dir, normalization=last.normalization, resume=True, progress=progress)
        if setup.get("scale"):  # a fine-tuning's, measured on its whole masks
            trainer.scale = {**trainer.scale, **setup["scale"]}
        if ddp.world().is_main:  # under the trainer's lock: a write another process has in progress is not removed
            remove_stale_temp_files(run_dir)  # left in the run folder by a killed run (kill -9)
            if moved:
                _write_data_json(run_dir, data, val_data, val, val_split, train_pairs, val_pairs, allow_intensity_masks,
                                 setup)
        return trainer

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
        self._saved_iteration = self.iteration
        self._truncate_log(self.iteration)

    # -- bookkeeping -------------------------------------------------------------------------
    def _save(self, name: str, torch_rng: torch.Tensor | None = None) -> Path:
        """RUN/NAME with the weights and the resumable state (`torch_rng`: the generator state to resume with)."""
        if not self._world.is_main:
            return self.run_dir / name
        state = {
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state() if torch_rng is None else torch_rng,
            "best_iou": self.best_iou,
            "seconds_spent": self.seconds_spent,
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state()
        path = save_checkpoint(
            self.run_dir / name,
            self.model,
            normalization=self.normalization,
            class_names=self.class_names,
            train_config=self.config.to_dict(),
            iteration=self.iteration,
            state=state,
            scale=self.scale,
        )
        if name == "last.pt":
            self._saved_iteration = self.iteration
        return path

    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.csv"

    def _truncate_log(self, iteration: int) -> None:
        if not self.log_path.exists():
            return
        with open(self.log_path, newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if int(r["iteration"]) <= iteration]
        if len(kept) < len(rows):  # rewritten only when there is something to drop: a finished run stays untouched
            self._write_log(kept)

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

    def _validation_maps(self, model: UNet, tta: bool, statistics: str) -> list:
        """Foreground probability of each validation sample (image or volume), as `unetkit predict` makes it."""
        if self.config.dims == 3:
            from .volume import predict_volume

            return [predict_volume(model, s.image, tta=tta, device=self.device, pad_thin=True)[1] for s in self.val_samples]
        return [predict(model, s.image, tta=tta, device=self.device, norm_statistics=statistics)[1] for s in self.val_samples]

    def _set_learning_rate(self, seconds_spent: float) -> None:
        c = self.config
        progress = 0.0 if c.iterations is None else self.iteration / c.iterations
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
        per_plane = self.config.dims == 3 and any(getattr(s, "per_plane", False) for s in self.val_samples)
        # Sparse volumes: the rule is scored on the annotated voxels only (`unetkit.decision.cut_to_labelled`).
        labelled = [s.target != IGNORE_INDEX if self.config.dims == 3 and (s.target == IGNORE_INDEX).any() else None
                    for s in self.val_samples]
        # Maps with the training statistics of batch norm, and (with batch norm, in 2D) with each
        # image's own; the rule that scores best on either, with the way its maps were made.
        # Precise statistics measured on the very images validation scores (a cross-check) are
        # their own statistics, so the two cannot be told apart there: the stored ones are kept.
        rules = []
        cross_checked = self.config.precise_bn and {id(s) for s in self.val_samples} <= {id(s) for s in self.train_samples}
        image_statistics = has_batch_norm(model) and self.config.dims == 2 and not cross_checked
        for statistics in NORM_STATISTICS if image_statistics else NORM_STATISTICS[:1]:
            maps = self._validation_maps(model, tta, statistics)
            if per_plane:  # objects annotated section by section: the rule is chosen and applied per plane
                planes = [(p, t, None if k is None else k[z]) for m, v, k in zip(maps, truths, labelled)
                          for z, (p, t) in enumerate(zip(m, v)) if k is None or k[z].any()]
                rule = choose_decision([p for p, _, _ in planes], [t for _, t, _ in planes], tta=tta,
                                       labelled=[k for _, _, k in planes])
                rules.append(DecisionRule(**{**rule.to_dict(), "per_plane": True}))
            else:
                rules.append(choose_decision(maps, truths, tta=tta, image_statistics=statistics == "image", labelled=labelled))
        # Both scores go into the summary: the choice can be close, and a user should see how close.
        self.decision_scores = {r.norm_statistics: r.score for r in rules}
        rule = choose_statistics(rules)
        save_checkpoint(
            best_path, loaded.model, normalization=loaded.normalization, class_names=loaded.class_names,
            train_config=loaded.train_config, iteration=loaded.iteration, state=loaded.state, decision=rule.to_dict(),
            scale=loaded.scale,
        )
        if self.config.precision_scores and self.config.dims == 2:
            self.score_precisions(loaded.model, loaded.normalization, rule)
        return rule

    def score_precisions(self, model, normalization, rule: DecisionRule) -> dict[str, Any] | None:
        """Score the labels rule on validation maps made in each precision this machine runs
        (`unetkit.precision.score_precisions`; int8 calibrated on the training images) and keep
        the scores beside best.pt (RUN/best.precision.json), so `--precision auto` may choose a
        faster precision for this run's model. None (nothing stored) when only fp32 runs here."""
        from .backends import bf16_native, int8_available
        from .precision import record_run_scores, score_precisions

        precisions = ["fp32"] + (["bf16"] if bf16_native(str(self.device)) else []) + \
            (["int8"] if self.device.type == "cpu" and int8_available() else [])
        if len(precisions) == 1:
            return None
        scores = score_precisions(model.to(self.device).eval(), normalization, self.val_samples, None, rule,
                                  precisions=precisions, calibration=[s.image for s in self.train_samples])
        record_run_scores(self.run_dir / "best.pt", scores)
        self.precision_scores = scores["rule_scores"]
        return scores

    def fit(self) -> dict[str, Any]:
        """Train until `config.iterations` (or `max_seconds`); returns a summary dict.

        Ctrl-C or SIGTERM saves RUN/last.pt at the last whole iteration (so `from_run` continues
        from it exactly; `unetkit train` then exits with status 130) and raises KeyboardInterrupt
        again. A NaN loss raises `TrainingDiverged`; running out of memory, an InputError naming
        --tile-size and --batch-size; both keep the last checkpoint. A run whose budget is used
        only chooses its labels rule if that is missing, and otherwise changes nothing. The run
        folder is locked (`RunLock`) while `fit` runs.
        """
        try:
            if self._world.is_main:
                self._run_lock.acquire()
            with _StopSignals() as stops:
                return self._fit(stops)
        finally:
            self._run_lock.release()

    def _fit(self, stops: _StopSignals) -> dict[str, Any]:
        c = self.config
        start_iteration = self.iteration
        if self._finished() and not self._rule_missing():
            return self._nothing_to_do()
        self._write_run_files()
        loader = self._tile_loader()
        self.model.train()
        budget = ddp.shared_clock(_Budget(c.budget_clock, self.seconds_spent), self.device, self._world)
        started = time.perf_counter()
        compute_seconds = validation_seconds = decision_seconds = 0.0
        self._last_good = self.iteration
        bar = tqdm(total=c.iterations, initial=self.iteration, disable=not (self.progress and self._world.is_main), desc="train", unit="it")
        val_iou = val_error = float("nan")
        finished = self._finished()  # a resumed run whose labels rule is missing: that alone
        rng = torch.get_rng_state()
        pending: dict | None = None  # this iteration's log row until it is written
        phase = f"in training step {self.iteration + 1}"  # for an out-of-memory message
        try:
            batches = iter(loader)
            while not finished:
                rng = torch.get_rng_state()  # what a resume from this iteration starts with
                with stops.interruptible():
                    batch = next(batches, None)
                if batch is None:
                    break
                step_started = time.perf_counter()
                phase = f"in training step {self.iteration + 1}"
                loss = self._step(batch, budget, stops)
                compute_seconds += time.perf_counter() - step_started
                self.iteration += 1
                elapsed = time.perf_counter() - started
                self.seconds_spent = budget.spent()
                if not self._finished() and self.should_stop is not None and self.should_stop():
                    self._stop_requested = True  # ends like a spent budget: validation, best.pt, the labels rule
                finished = self._finished()
                if finished and c.precise_bn and c.dims == 2:
                    phase = "measuring the batch-norm statistics of the training images"
                    precise_batch_norm(self.model, [s.image for s in self.train_samples], c.tile_size)
                row = pending = {"iteration": self.iteration, "loss": f"{loss:.6g}", "seconds": f"{elapsed:.3f}", "val_iou": "", "val_pixel_error": ""}
                rng = torch.get_rng_state()
                if self.val_samples and self._world.is_main and (self.iteration % c.val_every == 0 or finished):
                    validation_started = time.perf_counter()
                    phase = f"validating iteration {self.iteration}"
                    val_iou, val_error = self._validate_and_keep_best(row, stops)
                    validation_seconds = time.perf_counter() - validation_started
                self._append_log(row)
                pending = None
                if self.callback is not None:
                    self.callback({"iteration": self.iteration, "loss": loss, "seconds": self.seconds_spent,
                                   "budget": c.max_seconds, "iterations": c.iterations,
                                   "val_iou": float(row["val_iou"]) if row["val_iou"] else None})
                if row["val_iou"]:  # RUN/report.html, refreshed at each validation
                    from .report import write_training_report

                    write_training_report(self)
                done_steps = self.iteration - start_iteration
                bar.set_postfix(loss=f"{loss:.4f}", gflops=f"{self.flops_per_step * done_steps / max(elapsed, 1e-9) / 1e9:.1f}")
                bar.update(1)
                if self.iteration % c.checkpoint_every == 0 or finished:
                    self._checkpoint()
                stops.check()
            decision = None
            if finished and self._rule_missing():
                decision_started = time.perf_counter()
                phase = "choosing the labels rule"
                with stops.interruptible():
                    decision = self.choose_decision()
                decision_seconds = time.perf_counter() - decision_started
        except KeyboardInterrupt:
            self._keep_interrupted(rng, pending)
            raise
        except RuntimeError as exc:
            if ddp.lost_peer(exc, self._world):
                if stops.received is not None:  # the other processes were stopped by the same signal
                    self._keep_interrupted(rng, pending)
                    raise KeyboardInterrupt from None
                raise ddp.peer_lost_error(self._resume_advice()) from None
            if is_out_of_memory(exc):
                raise self._out_of_memory_error(phase) from None
            raise
        finally:
            bar.close()
        self.stopped_by = self._limit_reached()
        seconds = time.perf_counter() - started
        steps = self.iteration - start_iteration
        return {
            "iterations": self.iteration,
            "steps_this_run": steps,
            "stopped_by": self.stopped_by,
            "seconds": seconds,
            "step_seconds": compute_seconds / max(steps, 1),
            "loop_seconds_per_step": seconds / max(steps, 1),
            "final_validation_seconds": validation_seconds if steps else 0.0,
            "decision_seconds": decision_seconds,
            "train_gflops": self.flops_per_step * steps / max(compute_seconds, 1e-9) / 1e9,
            "best_val_iou": None if self.best_iou == -math.inf else self.best_iou,
            "val_iou": None if math.isnan(val_iou) else val_iou,
            "val_pixel_error": None if math.isnan(val_error) else val_error,
            "decision": None if decision is None else decision.to_dict(),
            "decision_scores": None if decision is None else self.decision_scores,
            **({"precision_scores": self.precision_scores} if decision is not None and self.precision_scores else {}),
            **({"validation": self.validation_note} if self.validation_note else {}),
            **self.unlabelled_summary(),
            "run_dir": str(self.run_dir),
        }

    def unlabelled_summary(self) -> dict[str, Any]:
        """{"unlabelled_voxels": {"training": {"voxels", "of", "percent"}, "validation": ...}} for a
        run with sparsely annotated volumes (`TrainConfig.ignore_label`, or samples with unlabelled
        voxels); {} otherwise."""
        if self.config.dims != 3:
            return {}
        from .data.volumes import unlabelled_voxels

        counts = {"training": unlabelled_voxels(self.train_samples), "validation": unlabelled_voxels(self.val_samples)}
        if self.config.ignore_label is None and not any(n for n, _ in counts.values()):
            return {}
        return {"unlabelled_voxels": {part: {"voxels": n, "of": total, "percent": round(100.0 * n / total, 2) if total else 0.0}
                                      for part, (n, total) in counts.items()}}

    def _keep_interrupted(self, torch_rng: torch.Tensor, pending: dict | None) -> None:
        """Ctrl-C or SIGTERM: save the last whole iteration as last.pt, so `--resume` continues from it exactly."""
        self.stopped_by = "interrupted"
        if pending is not None:  # interrupted in the validation of an iteration that is done
            self._append_log(pending)
        if self._saved_iteration != self.iteration:
            self._save("last.pt", torch_rng=torch_rng)

    def _rule_missing(self) -> bool:
        """Whether this run should choose a labels rule and best.pt does not hold one yet."""
        c, best = self.config, self.run_dir / "best.pt"
        if not (self.val_samples and c.choose_decision and self._world.is_main and best.is_file()):
            return False
        return not load_checkpoint(best).decision

    def _nothing_to_do(self) -> dict[str, Any]:
        """The summary of a run whose budget is used and whose labels rule (if any) is stored; no file is touched."""
        self.stopped_by = self._limit_reached()
        rule = ""
        decision = None
        if self.val_samples and self.config.choose_decision and (self.run_dir / "best.pt").is_file():
            decision = load_checkpoint(self.run_dir / "best.pt").decision or None
            rule = ", labels rule stored" if decision else ""
        return {
            "iterations": self.iteration, "steps_this_run": 0, "stopped_by": self.stopped_by,
            "note": f"{self.run_dir} is finished ({self.iteration} iterations{rule}); nothing to do",
            "best_val_iou": None if self.best_iou == -math.inf else self.best_iou,
            "decision": decision, "run_dir": str(self.run_dir),
        }

    def _limit_reached(self) -> str | None:
        c = self.config
        if c.iterations is not None and self.iteration >= c.iterations:
            return "iterations"
        if c.max_seconds is not None and self.seconds_spent >= c.max_seconds:
            return "seconds"
        return "stopped" if self._stop_requested else None

    def _resume_advice(self) -> str:
        last = self.run_dir / "last.pt"
        kept = f"{last} keeps iteration {self._saved_iteration}" if self._saved_iteration is not None else "no checkpoint was written yet"
        return f"{kept}; continue with: unetkit train --resume {self.run_dir}"

    def _out_of_memory_error(self, phase: str) -> InputError:
        c = self.config
        smaller = c.geometry.legal_sizes(c.tile_size - 1)
        lower = f"--tile-size {smaller[-1]}" if smaller else "a smaller --tile-size"
        batch = f" or --batch-size {max(1, c.batch_size // 2)}" if c.batch_size > 1 else ""
        return InputError(
            f"out of memory {phase} on {self.device} with --tile-size {c.tile_size} and "
            f"--batch-size {c.batch_size} (network depth {c.depth}, width {c.base_channels}); "
            f"{self._resume_advice().split(';')[0]}. Start a new run (--out) with {lower}{batch}"
        )

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
        iterations = UNLIMITED_ITERATIONS if c.iterations is None else c.iterations  # a time budget alone
        if c.dims == 3:
            from .data.volumes import VolumeTileDataset

            dataset = VolumeTileDataset(self.train_samples, c.geometry, c.tile_shape, augment=c.augment,
                                        length=iterations * c.batch_size, seed=c.seed)
            return get_tile_loader(dataset, batch_size=c.batch_size, num_workers=c.workers,  # type: ignore[arg-type]
                                   start=self.iteration * c.batch_size, stop=iterations * c.batch_size,
                                   rank=self._world.rank, world_size=self._world.world_size)
        dataset = TileDataset(
            self.train_samples, c.geometry, c.tile_size, augmenter=Augmenter(c.augment),
            length=iterations * c.batch_size, seed=c.seed,
        )
        return get_tile_loader(
            dataset, batch_size=c.batch_size, num_workers=c.workers,
            start=self.iteration * c.batch_size, stop=iterations * c.batch_size,
            rank=self._world.rank, world_size=self._world.world_size,
        )

    def _step(self, batch: dict[str, torch.Tensor], budget: _Budget, stops: _StopSignals | None = None) -> float:
        """One optimisation step on `batch`; returns the loss. Until the weights change, `stops` may interrupt it."""
        with stops.interruptible() if stops is not None else contextlib.nullcontext():
            image = batch["image"].to(self.device, non_blocking=True)
            target = batch["target"].to(self.device, non_blocking=True)
            weights = batch["weights"].to(self.device, non_blocking=True)
            self._set_learning_rate(budget.spent())
            ddp.seed_step(self.config.seed, self.iteration, self._world)
            with training_autocast(self.config.precision, self.device):
                logits = self._net(image)
            loss = self.loss_fn(logits.float(), target, weights)
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
        return self._limit_reached() is not None

    def _validate_and_keep_best(self, row: dict[str, str], stops: _StopSignals | None = None) -> tuple[float, float]:
        """Score the validation images into `row`; a new best IoU is saved as best.pt."""
        with stops.interruptible() if stops is not None else contextlib.nullcontext():
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

    if config.dims == 3:
        from .data.volumes import load_volume_samples, unlabelled_voxels

        options3 = dict(targets=config.targets, spacing=config.spacing or (1.0, 1.0, 1.0), ignore_label=config.ignore_label)
        train3 = load_volume_samples(train_pairs, normalization, **options3)
        val3 = load_volume_samples(val_pairs, normalization, **options3) if val_pairs else []
        if config.ignore_label is not None and unlabelled_voxels(train3 + val3)[0] == 0:
            warnings.warn(f"--ignore-label {config.ignore_label}: no mask holds this value, so no voxel was ignored; "
                          "check the value your annotation tool writes for unlabelled voxels")
        return train3, val3  # type: ignore[return-value]
    options = dict(targets=config.targets, allow_intensity_masks=allow_intensity_masks)
    train = load_samples(train_pairs, normalization, **options)
    return train, (load_samples(val_pairs, normalization, **options) if val_pairs else [])


def _load_fine_tune_split(train_pairs, val_pairs, normalization: Normalization, config: TrainConfig,
                          allow_intensity_masks: bool, setup: dict) -> tuple[list[Sample], list[Sample]]:
    """The samples of a fine-tuning run as `unetkit.finetune.prepare_fine_tune` made them, from its
    data.json: rescaled by setup["rescaled"]["factor"], and with setup["validation_part"] the
    validation images' last parts held out (`unetkit.data.split.cut_validation_part`)."""
    from .data import make_sample, read_mask, to_chw
    from .data.split import cut_validation_part, validation_part_name
    from .io import read_image
    from .scale import rescale_pair

    factor = float((setup.get("rescaled") or {}).get("factor", 1.0))
    part = setup.get("validation_part")
    held = {pair.name for pair in val_pairs} if part else set()
    options = dict(targets=config.targets, allow_intensity_masks=allow_intensity_masks)
    read: dict[str, tuple[np.ndarray, ...]] = {}  # each image once, though a held one gives two samples

    def arrays(pair) -> tuple[np.ndarray, ...]:
        if pair.name not in read:
            image, mask = read_image(pair.image), read_mask(pair.mask, allow_intensity_masks=allow_intensity_masks)
            image, mask = rescale_pair(image, mask, factor) if factor != 1.0 else (image, mask)
            read[pair.name] = (cut_validation_part(to_chw(image, name=str(pair.image)), mask, part)
                               if pair.name in held else (image, mask))
        return read[pair.name]

    train = [make_sample(*arrays(pair)[:2], pair.name, normalization, **options) for pair in train_pairs]
    validation = [make_sample(*arrays(pair)[2:], validation_part_name(pair.name), normalization, **options) if part
                  else make_sample(*arrays(pair), pair.name, normalization, **options) for pair in val_pairs]
    return train, validation


def _check_validation_masks(val_pairs: Sequence, validation: Sequence[Sample]) -> None:
    """Refuse a validation mask without objects: the labels rule and the scores cannot be measured on it."""
    for pair, sample in zip(val_pairs, validation):
        if not sample.instances.any():
            raise InputError(
                f"{getattr(pair, 'mask', None) or sample.name}: this validation mask has no objects, so validation "
                "cannot score it; choose other validation images with --val NAMES, or remove this image"
            )


def _write_data_json(run_dir: Path, data: Path, val_data: Path | None, val, val_split: str, train_pairs, val_pairs,
                     allow_intensity_masks: bool, fine_tune: dict | None = None) -> None:
    """RUN/data.json: the dataset folders and the names of the training and validation images;
    `fine_tune`: how a fine-tuning prepared them (`unetkit.finetune`): "rescaled" ({"factor"}),
    "validation_part" (the share of each validation image held out) and "scale" (what the
    checkpoints record, `Trainer.scale`)."""
    if isinstance(val, (list, tuple)):
        val = ",".join(map(str, val))
    setup = {
        "data": str(Path(data).resolve()), "val_data": str(Path(val_data).resolve()) if val_data else None,
        "val": None if val is None else str(val), "val_split": val_split,
        "train": [p.name for p in train_pairs], "validation": [p.name for p in val_pairs],
        "allow_intensity_masks": allow_intensity_masks,
        **{key: value for key, value in (fine_tune or {}).items() if key in ("rescaled", "validation_part", "scale")},
    }
    text = json.dumps(setup, indent=2)
    atomic_write(run_dir / "data.json", lambda path: path.write_text(text), force=True)


#: Keys config.json has held since the first release: without one, a resume would guess the run.
_CONFIG_KEYS = ("depth", "base_channels", "padding", "dropout", "batch_norm", "tile_size", "batch_size", "optimizer",
                "lr", "iterations", "seed")
#: What each key of data.json must hold (for the message, and the test); "data" is required.
_SETUP_KEYS = {
    "data": ("a folder path", lambda v: isinstance(v, str) and v != ""),
    "val_data": ("a folder path or null", lambda v: v is None or isinstance(v, str)),
    "val": ("a text or null", lambda v: v is None or isinstance(v, str)),
    "val_split": ("'last' or 'random'", lambda v: v in ("last", "random")),
    "train": ("a list of image names", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)),
    "validation": ("a list of image names", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)),
    "allow_intensity_masks": ("true or false", lambda v: isinstance(v, bool)),
    "rescaled": ("{factor: a positive number}", lambda v: isinstance(v, dict) and is_positive_number(v.get("factor"))),
    "scale": ("{diameter: a positive number, ...}", lambda v: isinstance(v, dict) and is_positive_number(v.get("diameter"))),
    "validation_part": ("a number between 0 and 1", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1),
}


def _damaged(path: Path, problem: str) -> InputError:
    return InputError(f"{path}: {problem}; the run cannot be resumed from it: restore the file, or start a new run with --out")


def _read_json(path: Path) -> dict:
    """A run file's JSON object."""
    try:
        values = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _damaged(path, f"damaged, not JSON ({exc})") from None
    if not isinstance(values, dict):
        raise _damaged(path, f"holds a {type(values).__name__}, not a JSON object")
    return values


def _check_run_files(run_dir: Path, saved: dict, setup: dict) -> None:
    """The keys config.json and data.json must have, and the types of data.json's values."""
    for path, values, required in ((run_dir / "config.json", saved, _CONFIG_KEYS), (run_dir / "data.json", setup, ("data",))):
        missing = [key for key in required if key not in values]
        if missing:
            raise _damaged(path, f"lacks {', '.join(missing)}")
    for key, (what, valid) in _SETUP_KEYS.items():
        if key in setup and not valid(setup[key]):
            raise _damaged(run_dir / "data.json", f"{key} must be {what} (got {setup[key]!r})")


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
    saved, setup = _read_json(run_dir / "config.json"), _read_json(run_dir / "data.json")
    _check_run_files(run_dir, saved, setup)
    return saved, setup


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
