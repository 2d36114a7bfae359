"""`unetkit train`: train a U-Net on a folder of annotated images."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer

from ..config import DEFAULT_ITERATIONS, PAPER
from . import app


def _class_weights(text: str):
    from ..errors import InputError

    if text == "balanced":
        return text
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--class-weights must be 'balanced' or numbers like '1,1' (got {text!r})") from None


#: `TrainConfig` fields set by the command's options of the same meaning. Where the names differ
#: the option is an alias, named so in its help: --width = base_channels, --dice = dice_weight,
#: --seconds = max_seconds, --weight-map = TargetConfig.use_weight_map.
_CONFIG_OPTIONS = {
    "tile_size": "tile_size", "batch_size": "batch_size", "depth": "depth", "width": "base_channels",
    "padding": "padding", "dropout": "dropout", "batch_norm": "batch_norm", "optimizer": "optimizer", "lr": "lr",
    "lr_schedule": "lr_schedule", "momentum": "momentum", "weight_decay": "weight_decay", "dice": "dice_weight",
    "budget_clock": "budget_clock", "precision": "precision",
}
#: The options that set `TrainConfig` fields; those with a limit (`unetkit.config.TRAIN_LIMITS`) are checked by it.
_LIMITED_OPTIONS = {
    **_CONFIG_OPTIONS, "iterations": "iterations", "seconds": "max_seconds", "val_every": "val_every",
    "checkpoint_every": "checkpoint_every", "seed": "seed", "workers": "workers",
}
#: `TargetConfig` fields set by the target options (--class-weights is parsed first).
_TARGET_OPTIONS = {"w0": "w0", "sigma": "sigma", "pixel_size": "pixel_size", "weight_map": "use_weight_map"}
#: `AugmentConfig` fields set by each augmentation option.
_AUGMENT_OPTIONS = {
    "elastic": ("elastic",), "elastic_grid": ("elastic_grid",), "elastic_sigma": ("elastic_sigma",),
    "rotate": ("rotate", "rotate90"), "flip": ("flip",), "shift": ("shift",), "zoom": ("scale",),
    "gray": ("gamma", "contrast", "brightness", "noise"),
}


def _recipe_values(recipe: str, options: dict) -> dict:
    """`TrainConfig` values: the recipe's (for the kind of masks in --data, when the recipe depends
    on it and the loss options are not given), with every option the user gave on top (`augment`
    and `targets` as dicts)."""
    from ..recipes import depends_on_task, recipe_values

    task = None
    if options.get("task_from_masks", True) and depends_on_task(recipe) and \
            all(options[name] is None for name in ("class_weights", "weight_map", "dice")):
        task = _mask_task(options["data"])
        if task == "membranes":
            typer.echo("the masks look like membranes (EM): unweighted cross-entropy plus Dice, as the recipe does for "
                       "membranes (give --weight-map, --class-weights or --dice to choose yourself)")
    values = recipe_values(recipe, task)
    values.update({field: options[name] for name, field in _CONFIG_OPTIONS.items() if options[name] is not None})
    targets = dict(values.get("targets", {}))
    targets.update({field: options[name] for name, field in _TARGET_OPTIONS.items() if options[name] is not None})
    if options["class_weights"] is not None:
        targets["class_weights"] = _class_weights(options["class_weights"])
    values["targets"] = targets
    augment = dict(values.get("augment", {}))
    for name, fields in _AUGMENT_OPTIONS.items():
        if options[name] is not None:
            augment.update({field: options[name] for field in fields})
    values["augment"] = augment
    return values


def _mask_task(data: Path) -> str:
    """"membranes" or "objects" (`unetkit.decision.infer_task`) from the masks of the dataset folder."""
    from ..data import find_pairs
    from ..data.readers import read_mask
    from ..decision import infer_task

    import warnings

    with warnings.catch_warnings():  # the same folder is read again for training, which warns once
        warnings.simplefilter("ignore")
        masks = [read_mask(pair.mask, allow_intensity_masks=True) for pair in find_pairs(data) if pair.mask is not None]
    return infer_task(masks)


#: Options `--resume` accepts; everything else is fixed by the run.
_RESUME_OPTIONS = ("resume", "data", "val_data", "iterations", "seconds", "progress", "nproc", "device")


def _given_params(ctx: typer.Context, leave_out: tuple[str, ...]) -> Iterator[tuple[Any, Any]]:
    """The parameters given on the command line (not left at their defaults), other than `leave_out`."""
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name) if param.name else None
        if param.name not in leave_out and source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            yield param, ctx.params.get(param.name)


def _given_options(ctx: typer.Context, allowed: tuple[str, ...]) -> list[str]:
    """The options given on the command line, other than `allowed`, as their names."""
    return [param.secondary_opts[0] if value is False and getattr(param, "secondary_opts", None) else param.opts[0]
            for param, value in _given_params(ctx, allowed)]


def _command_line(ctx: typer.Context, leave_out: tuple[str, ...]) -> list[str]:
    """The options given on the command line as arguments again (for the processes of --nproc)."""
    arguments = []
    for param, value in _given_params(ctx, leave_out):
        if getattr(param, "is_flag", False):
            arguments.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            arguments += [param.opts[0], str(value)]
    return arguments


def _check_processes(nproc: int, batch_size: int, device: str) -> None:
    """--nproc: a global batch that deals evenly, one GPU per process; a warning for more processes than cores."""
    from ..ddp import check_batch_size, warn_if_oversubscribed
    from ..errors import InputError

    check_batch_size(batch_size, nproc)
    if device.startswith("cuda") or device == "auto":
        import torch

        if torch.cuda.is_available():
            if nproc > torch.cuda.device_count():
                raise InputError(f"--nproc {nproc}: each process needs its own GPU and there are "
                                 f"{torch.cuda.device_count()}; use --nproc {torch.cuda.device_count()}")
            return
    warn_if_oversubscribed(nproc)


def _run_batch_size(run: Path) -> tuple[int, str]:
    """The batch size and device of the run folder to resume (defaults where config.json cannot tell)."""
    try:
        config = json.loads((run / "config.json").read_text())
        return int(config.get("batch_size", PAPER.batch_size)), str(config.get("device", "auto"))
    except (OSError, ValueError, TypeError, AttributeError):  # from_run names what is wrong with the run
        return PAPER.batch_size, "auto"


def _quiet(*args, **kwargs) -> None:
    """`typer.echo` for the processes other than rank 0, which print nothing."""


def _check_options(options: dict) -> None:
    """The values of the `TrainConfig` options given, by the config's limits (`unetkit.config.TRAIN_LIMITS`),
    and --epochs; the message names the option."""
    from ..config import TRAIN_LIMITS, Limit, SettingError, check_settings
    from ..errors import InputError

    limits = {name: TRAIN_LIMITS[field] for name, field in _LIMITED_OPTIONS.items() if field in TRAIN_LIMITS}
    limits["epochs"] = Limit(0, above=True)
    try:
        check_settings({name: options[name] for name in limits if options[name] is not None}, limits)
    except SettingError as exc:
        raise InputError(exc.message("--" + exc.setting.replace("_", "-"))) from None
    if options["iterations"] is not None and options["epochs"] is not None:
        raise InputError("give --iterations or --epochs, not both")
    if options["val"] is not None and options["val_data"] is not None:
        raise InputError("give --val (images of --data) or --val-data (a separate folder), not both")


def _check_network(depth: int, padding: str, tile_size: int) -> None:
    """The tile size, legal for the network the recipe and the options give."""
    from ..geometry import Geometry

    Geometry(depth=depth, padding=padding).check(tile_size, "--tile-size")  # type: ignore[arg-type]


def _volume_options(dims: Optional[int], spacing: Optional[str], tile_depth: Optional[int], data: Optional[Path],
                    ignore_label: Optional[str] = None) -> dict:
    """`TrainConfig` values of --dims, --spacing, --tile-depth and --ignore-label; a 2D run on a
    folder of volumes is refused with the option that trains on them."""
    from ..errors import InputError

    if dims is not None and dims not in (2, 3):
        raise InputError(f"--dims must be 2 (images) or 3 (volumes), got {dims}")
    label = _ignore_label(ignore_label)
    if dims != 3:
        if spacing is not None or tile_depth is not None:
            raise InputError("--spacing and --tile-depth are for volumes: add --dims 3")
        if label is not None:
            raise InputError("--ignore-label marks unlabelled voxels of volumes: add --dims 3 (2D images must be fully annotated)")
        if data is not None and _holds_volumes(data):
            raise InputError(f"{data}: the images are volumes (multi-page TIFF z-stacks); add --dims 3 (and --spacing z,y,x, "
                             "the voxel size) to train a 3D U-Net on them, or save each plane as its own image for a 2D model")
        return {}
    from ..data.volumes import parse_spacing

    return {"dims": 3, "spacing": parse_spacing(spacing), "tile_depth": tile_depth, "ignore_label": label}


def _ignore_label(text: Optional[str]) -> Optional[int]:
    """--ignore-label as a whole number (e.g. 65535, or -1 for signed masks), or None when not given."""
    from ..errors import InputError

    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        raise InputError(f"--ignore-label must be a whole number, the mask value of unlabelled voxels "
                         f"(e.g. 65535, or -1 for signed masks); got {text!r}") from None


def _holds_volumes(data: Path) -> bool:
    """Whether the first image of the dataset folder is a multi-page stack."""
    from ..data import find_pairs
    from ..io import read_header

    with warnings.catch_warnings():  # the folder is read again for training, which warns once
        warnings.simplefilter("ignore")
        try:
            pairs = find_pairs(data)
            return bool(pairs) and read_header(pairs[0].image, pages=True).planes > 1
        except Exception:  # noqa: BLE001 - training reads the folder again and names what is wrong
            return False

def _check_run_folder(out: Path, folders: tuple[Optional[Path], ...]) -> None:
    """--out must not be a folder the dataset's files are read from: the run's files (curves.png)
    would be read as data by the next run. Run folders elsewhere, inside the dataset folder too, are
    never read (only the image and mask folders are)."""
    from ..data import find_pairs
    from ..errors import InputError

    target = out.resolve()
    for folder in folders:
        if folder is None:
            continue
        with warnings.catch_warnings():  # the folder is read again for training, which warns once
            warnings.simplefilter("ignore")
            pairs = find_pairs(folder)
        read = {path.parent.resolve() for pair in pairs for path in (pair.image, pair.mask) if path is not None}
        if target in read:
            raise InputError(f"{out}: --out is a folder the dataset {folder} is read from, so the run's files would be "
                             "read as data; choose a run folder outside it")


#: Options that do not apply with --from (the start model fixes them, or fine-tuning runs in one process).
_NOT_WITH_FROM = ("resume", "recipe", "normalize", "nproc", "epochs", "dims", "spacing", "tile_depth", "ignore_label")
#: Options with a non-None default that fine-tuning sets itself unless they are given.
_FINETUNE_DEFAULTED = {"val_every": "val_every", "checkpoint_every": "checkpoint_every", "workers": "workers"}


def _fine_tune(ctx: typer.Context, start: str, options: dict) -> None:
    """`unetkit train --from MODEL`: `unetkit.finetune.prepare_fine_tune` on the images of --data."""
    from ..data import find_pairs, read_mask, split_pairs
    from ..device import check_device
    from ..errors import InputError
    from ..finetune import prepare_fine_tune
    from ..io import check_output_dir, read_image
    from ..train import _write_data_json, parse_validation

    given = {param.name for param, _ in _given_params(ctx, ())}
    refused = [f"--{name.replace('_', '-')}" for name in _NOT_WITH_FROM if name in given]
    if refused:
        raise InputError(f"--from fine-tunes the start model with its own network and normalisation in one process; "
                         f"leave out {', '.join(refused)}")
    data, out, val, val_data = options["data"], options["out"], options["val"], options["val_data"]
    if data is None or out is None:
        raise InputError("give --data DIR and --out RUN with --from")
    check_device(options["device"])
    if options["class_weights"] is not None:
        _class_weights(options["class_weights"])
    overrides: dict[str, Any] = {field: options[name] for name, field in _CONFIG_OPTIONS.items() if options[name] is not None}
    overrides.update({field: options[name] for name, field in _FINETUNE_DEFAULTED.items() if name in given})
    overrides.update(seed=options["seed"], device=options["device"])
    if options["iterations"] is not None:
        overrides["iterations"] = options["iterations"]
    targets = {field: options[name] for name, field in _TARGET_OPTIONS.items() if options[name] is not None}
    if options["class_weights"] is not None:
        targets["class_weights"] = _class_weights(options["class_weights"])
    augment = {field: options[name] for name, fields in _AUGMENT_OPTIONS.items() if options[name] is not None for field in fields}
    overrides.update({key: value for key, value in (("targets", targets), ("augment", augment)) if value})
    _check_run_folder(out, (data, val_data))
    check_output_dir(out, force=options["force"])

    allow = options["allow_intensity_masks"]

    def arrays(pairs):
        for pair in pairs:
            if pair.mask is None:
                raise InputError(f"{pair.image}: image has no mask; training needs a mask for every image")
        return ([read_image(p.image) for p in pairs], [read_mask(p.mask, allow_intensity_masks=allow) for p in pairs],
                [p.name for p in pairs])

    pairs = find_pairs(data)
    val_pairs = find_pairs(val_data) if val_data is not None else None
    if val is not None:
        pairs, val_pairs = split_pairs(pairs, parse_validation(val), seed=options["seed"], split=options["val_split"])
    images, masks, names = arrays(pairs)
    val_arrays = arrays(val_pairs) if val_pairs is not None else (None, None, None)
    by_name = {p.name: p for p in pairs + list(val_pairs or [])}

    def record(run_dir: Path, train_names: list[str], validation_names: list[str], fine_tune: dict) -> None:
        # data.json as `Trainer.start` writes it, so `unetkit train --resume RUN` continues the run
        _write_data_json(run_dir, data, val_data, val, options["val_split"], [by_name[n] for n in train_names],
                         [by_name[n] for n in validation_names], allow, fine_tune)

    trainer = prepare_fine_tune(start, images, masks, out, names=names, val_images=val_arrays[0], val_masks=val_arrays[1],
                                val_names=val_arrays[2], seconds=options["seconds"], overrides=overrides,
                                allow_intensity_masks=allow, progress=options["progress"], force=options["force"],
                                record=record, rescale=options["rescale"])
    from . import CommandInterrupted

    config = trainer.config
    budget = f"{config.max_seconds:g} {config.budget_clock}-seconds" if config.max_seconds else f"{config.iterations} iterations"
    typer.echo(f"fine-tuning {start}: {len(trainer.train_samples)} training images, validation: "
               f"{trainer.validation_note or f'{len(trainer.val_samples)} held-out images'}; {budget} of "
               f"{config.tile_size}x{config.tile_size} tiles, {config.optimizer} lr {config.lr:g}; run folder {out}")
    try:
        summary = trainer.fit()
    except KeyboardInterrupt:
        raise CommandInterrupted(f"training stopped at iteration {trainer.iteration}, saved in {out / 'last.pt'}; "
                                 f"continue with: unetkit train --resume {out}") from None
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[Optional[Path], typer.Option("--data", help="Dataset folder: images/ + masks/, the ISBI 2012 layout or the Cell Tracking Challenge layout.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder to create (must be empty unless --force).")] = None,
    start: Annotated[Optional[str], typer.Option("--from", help="Fine-tune: start from this model's weights, a packaged model (em-membranes, dic-hela, fluo-nuclei) or a checkpoint (RUN/best.pt). Its network, normalisation, loss and augmentation are kept; Adam at lr 1e-3 with cosine decay for --seconds 120 on the CPU clock unless given (unetkit.recipes.FINETUNE). With fewer than 3 images validation is a cross-check on the training images.")] = None,
    rescale: Annotated[bool, typer.Option("--rescale/--no-rescale", help="With --from: when your objects are far from the size the start model was trained on (median diameter of your masks against the model's), rescale the images to its size for fine-tuning; the new model then rescales the images it segments the same way. --no-rescale fine-tunes at your images' own scale.")] = True,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this folder exactly where it stopped; only --data (a moved dataset), --val-data, --iterations, --seconds, --device, --nproc and --no-progress may be given with it.")] = None,
    val: Annotated[Optional[str], typer.Option("--val", help="Validation images: a fraction (0.2), a count (5) or names (t045,t046). Never trained on.")] = None,
    val_data: Annotated[Optional[Path], typer.Option("--val-data", help="A separate validation dataset folder (instead of --val).")] = None,
    val_split: Annotated[str, typer.Option("--val-split", help="How a fraction or count of --val is chosen: 'last' (the last images in name order, a block at the end of a stack or time series, which shows how the model fares beyond the training range) or 'random' (drawn with --seed).")] = "last",
    iterations: Annotated[Optional[int], typer.Option(help=f"Training iterations, one tile batch each (default {DEFAULT_ITERATIONS}; with --resume: the run's).")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Instead of --iterations: passes over the training pixels, counted in output tiles.")] = None,
    seconds: Annotated[Optional[float], typer.Option(help="Stop after this many seconds (a checkpoint is written); counted across resumes. TrainConfig.max_seconds.")] = None,
    recipe: Annotated[str, typer.Option("--recipe", help="Training recipe: 'default' (Adam, batch norm, no dropout, cosine decay, width 16, unweighted loss for EM membranes: the measured best within a CPU budget, docs/TRAINING.md) or 'paper' (the paper's exact settings: SGD momentum 0.99, dropout 0.5, width 64). The options below override it.")] = "default",
    tile_size: Annotated[Optional[int], typer.Option("--tile-size", help="Input tile size; must be legal for the network (the error names the nearest). Recipes: 572.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Tiles per step. Recipes: 1.")] = None,
    depth: Annotated[Optional[int], typer.Option(help="Resolution levels. Recipes: 5 (the paper's).")] = None,
    width: Annotated[Optional[int], typer.Option(help="Channels of the first level (TrainConfig.base_channels). default: 16, paper: 64.")] = None,
    padding: Annotated[Optional[str], typer.Option(help="'valid' (the paper, seamless tiles) or 'same'.")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout at the end of the contracting path. Recipes: 0.5.")] = None,
    batch_norm: Annotated[Optional[bool], typer.Option("--batch-norm/--no-batch-norm", help="default: on, paper: off.")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="'adam' (default recipe) or 'sgd' (paper).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate. Recipes: 0.001 (SGD with momentum 0.99: see TrainConfig).")] = None,
    lr_schedule: Annotated[Optional[str], typer.Option("--lr-schedule", help="constant (paper), cosine (default), poly or onecycle, over the iterations or --seconds.")] = None,
    momentum: Annotated[Optional[float], typer.Option(help="SGD momentum (the paper: 0.99).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay")] = None,
    dice: Annotated[Optional[float], typer.Option(help="Weight of an extra soft Dice loss term over all classes (TrainConfig.dice_weight; paper: 0; default recipe: 1 for membranes, 0 for cells).")] = None,
    w0: Annotated[Optional[float], typer.Option(help="Weight-map border amplitude (the paper: 10).")] = None,
    sigma: Annotated[Optional[float], typer.Option(help="Weight-map border width (the paper: 5 pixels, or micrometres with --pixel-size).")] = None,
    pixel_size: Annotated[Optional[float], typer.Option("--pixel-size", help="Micrometres per pixel; makes --sigma micrometres.")] = None,
    class_weights: Annotated[Optional[str], typer.Option("--class-weights", help="'balanced' (recipes) or one weight per class, e.g. '1,1'.")] = None,
    weight_map: Annotated[Optional[bool], typer.Option("--weight-map/--no-weight-map", help="Use the border term of the weight map (TargetConfig.use_weight_map; recipes: on).")] = None,
    elastic: Annotated[Optional[bool], typer.Option("--elastic/--no-elastic", help="The paper's elastic deformation (recipes: on).")] = None,
    elastic_grid: Annotated[Optional[int], typer.Option("--elastic-grid", help="Recipes: 3 (a 3x3 grid).")] = None,
    elastic_sigma: Annotated[Optional[float], typer.Option("--elastic-sigma", help="Recipes: 10 pixels.")] = None,
    rotate: Annotated[Optional[bool], typer.Option("--rotate/--no-rotate", help="Any-angle and 90-degree rotations (AugmentConfig.rotate and rotate90; recipes: on).")] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip")] = None,
    shift: Annotated[Optional[bool], typer.Option("--shift/--no-shift")] = None,
    zoom: Annotated[Optional[bool], typer.Option("--zoom/--no-zoom", help="Random zoom from 0.75x to 1.33x (AugmentConfig.scale), so the model learns objects of a range of sizes; useful when new images' objects will not all be as large as the annotated ones. Recipes: off (use --diameter when predicting instead).")] = None,
    gray: Annotated[Optional[bool], typer.Option("--gray/--no-gray", help="Gray-value variation (AugmentConfig.brightness, contrast, gamma, noise; recipes: on).")] = None,
    dims: Annotated[Optional[int], typer.Option("--dims", help="3: train a 3D U-Net (Cicek et al. 2016) on volumes, one multi-page TIFF z-stack per image and per mask; 2 (default): images.")] = None,
    spacing: Annotated[Optional[str], typer.Option("--spacing", help="With --dims 3: the voxel size z,y,x (e.g. 4,1,1 for sections four pixels apart; only ratios matter). Pooling and 3x3x3 kernels are planned from it: only in-plane until the spacing is about isotropic. Default 1,1,1.")] = None,
    tile_depth: Annotated[Optional[int], typer.Option("--tile-depth", help="With --dims 3: slices per training tile (default: the fewest whose output holds 4 slices); --tile-size gives y and x.")] = None,
    ignore_label: Annotated[Optional[str], typer.Option("--ignore-label", help="With --dims 3, for volumes only partly annotated (say a few planes): the mask value you gave the voxels nobody annotated, e.g. 65535, or -1 for signed masks. Those voxels teach the network nothing and are left out of the validation scores; everything else in the mask, background 0 included, counts as annotated. Default: every voxel is annotated.")] = None,
    budget_clock: Annotated[Optional[str], typer.Option("--budget-clock", help="What --seconds counts: 'wall' (default) or 'cpu' (this process's CPU time).")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="fp32 (default) or bf16: the forward pass in bfloat16 autocast, weights and loss in fp32; about 1.5-1.8x the steps per CPU-second where the CPU has AVX512-BF16 or AMX. Refused on CPUs without them.")] = None,
    normalize: Annotated[str, typer.Option(help="'percentile' (1-99.8 %), 'fixed' (x/255 for 8 bit) or 'none'.")] = "percentile",
    allow_intensity_masks: Annotated[bool, typer.Option("--allow-intensity-masks", help="Accept masks that look like intensity images (raw, resized or JPEG), every distinct value an object.")] = False,
    val_every: Annotated[int, typer.Option("--val-every")] = 200,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every")] = 200,
    seed: Annotated[int, typer.Option()] = 0,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes for augmentation.")] = 1,
    device: Annotated[str, typer.Option(help="cpu, cuda, mps or auto.")] = "auto",
    nproc: Annotated[Optional[int], typer.Option("--nproc", help="Train on this many processes (DistributedDataParallel; one GPU each on CUDA, gloo on the CPU), as `torchrun --nproc-per-node N -m unetkit train ...` does. --batch-size is their batch together: a multiple of N.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Use a non-empty --out folder.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Train a U-Net: the paper's network, weighted loss and elastic deformation, with the default
    recipe (Adam, batch norm, no dropout, cosine decay; measured best within a CPU budget) or
    `--recipe paper` (the paper's exact settings)."""
    from ..ddp import check_batch_size, environment_world
    from ..device import check_device
    from ..errors import InputError
    from ..io import check_output_dir

    if resume is not None:
        fixed = _given_options(ctx, _RESUME_OPTIONS)
        if fixed:
            raise InputError(
                f"{resume}: --resume continues the run with the settings it started with; {', '.join(fixed)} cannot be "
                "changed. Fixed by the run: network, tiles, loss and weight map, augmentation, optimiser, "
                f"normalisation, validation split, seed (see {resume / 'config.json'}). With --resume give only "
                "--data (a moved dataset), --val-data, --iterations, --seconds, --device, --nproc or --no-progress"
            )
    _check_options(locals())  # every option is checked before anything is read or created; the quick ones first
    if start is None and any(param.name == "rescale" for param, _ in _given_params(ctx, ())):
        raise InputError("--rescale/--no-rescale applies to fine-tuning: add --from MODEL, or leave it out")
    if start is not None:
        _fine_tune(ctx, start, locals())
        return
    if nproc is not None and nproc < 1:
        raise InputError(f"--nproc must be >= 1 (got {nproc})")
    if resume is None:
        if data is None or out is None:
            raise InputError("give --data DIR and --out RUN (or --resume RUN)")
        device = check_device(device)
        if normalize not in ("percentile", "fixed", "none"):
            raise InputError(f"--normalize must be percentile, fixed or none (got {normalize!r})")
        if val_split not in ("last", "random"):
            raise InputError(f"--val-split must be last or random (got {val_split!r})")
        if class_weights is not None:
            _class_weights(class_weights)
        volume_values = _volume_options(dims, spacing, tile_depth, data, ignore_label)
        values = _recipe_values(recipe, {**locals(), "task_from_masks": not volume_values})
        values.update(volume_values)
        if volume_values:
            from ..train import TrainConfig

            TrainConfig(**values).check_tiles()
        else:
            _check_network(values.get("depth", PAPER.depth), values.get("padding", "valid"), values.get("tile_size", PAPER.tile_size))
        _check_run_folder(out, (data, val_data))
        check_output_dir(out, force=force)

    place = environment_world()  # set when torchrun (or --nproc) started this process
    batch, run_device = (values.get("batch_size", PAPER.batch_size), device) if resume is None else _run_batch_size(resume)
    if resume is not None and ctx.get_parameter_source("device").name == "COMMANDLINE":
        run_device = device  # the run continues on the device given
    if place is not None:
        if nproc is not None and nproc != place.world_size:
            raise InputError(f"--nproc {nproc} under torchrun, which started {place.world_size} processes; leave --nproc out")
        check_batch_size(batch, place.world_size)
    elif nproc is not None and nproc > 1:
        from ..ddp import launch

        _check_processes(nproc, batch, run_device)
        # The processes print their own messages, so their status is passed on silently.
        raise SystemExit(launch(nproc, ["train", *_command_line(ctx, leave_out=("nproc",))]))
    main = True
    if place is not None and place.distributed:
        from ..ddp import init_process_group, interrupt_once

        interrupt_once()
        main = init_process_group(run_device).is_main
        if not main:
            warnings.simplefilter("ignore")  # rank 0 shows each warning once
    echo = typer.echo if main else _quiet

    from ..data import Normalization
    from ..train import TrainConfig, Trainer, parse_validation
    from . import CommandInterrupted

    if resume is not None:
        run_dir = resume
        new_device = check_device(device) if ctx.get_parameter_source("device").name == "COMMANDLINE" else None
        trainer = Trainer.from_run(resume, data=data, val_data=val_data, iterations=iterations, max_seconds=seconds,
                                   device=new_device, progress=progress)
    else:
        run_dir = out
        config = TrainConfig(
            **values, iterations=DEFAULT_ITERATIONS if iterations is None and seconds is None else iterations, max_seconds=seconds,
            val_every=val_every, checkpoint_every=checkpoint_every, seed=seed, workers=workers, device=device,
        )
        normalization = {"percentile": Normalization(), "fixed": Normalization(mode="fixed", scale=1 / 255),
                         "none": Normalization(mode="none")}[normalize]
        trainer = Trainer.start(
            config, data, out, val=None if val is None else parse_validation(val), val_data=val_data,
            val_split=val_split, normalization=normalization, allow_intensity_masks=allow_intensity_masks, epochs=epochs, force=force,
            progress=progress,
        )
    config = trainer.config
    tiles = "x".join(str(n) for n in config.tile_shape) if config.dims == 3 else f"{config.tile_size}x{config.tile_size}"
    kind = "volumes" if config.dims == 3 else "images"
    echo(f"{len(trainer.train_samples)} training and {len(trainer.val_samples)} validation {kind}; "
         f"{config.iterations} iterations of {tiles} tiles; run folder {run_dir}")
    unlabelled = trainer.unlabelled_summary().get("unlabelled_voxels")
    if unlabelled:
        parts = [f"{v['voxels']} of {v['of']} {part} voxels ({v['percent']:g}%)" for part, v in unlabelled.items() if v["of"]]
        echo(f"unlabelled (--ignore-label {config.ignore_label}), left out of the loss and the scores: {', '.join(parts)}")
    try:
        summary = trainer.fit()
    except KeyboardInterrupt:
        if not main:
            raise SystemExit(130) from None  # quietly: rank 0 says what was kept
        raise CommandInterrupted(
            f"training stopped at iteration {trainer.iteration}, saved in {run_dir / 'last.pt'}; "
            f"continue with: unetkit train --resume {run_dir}"
        ) from None
    echo(json.dumps(summary, indent=2))
    if place is not None and place.distributed:
        from ..ddp import end_process, finish

        finish()
        end_process()
