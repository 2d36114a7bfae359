"""`unetkit train`: train a U-Net on a folder of annotated images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..config import PAPER
from . import app


def _class_weights(text: str):
    if text == "balanced":
        return text
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--class-weights must be 'balanced' or numbers like '1,1' (got {text!r})") from None


def _validation(val: Optional[str]):
    """--val: a fraction (0.2), a count (5) or comma-separated names (t045,t046)."""
    if val is None:
        return 0.2
    try:
        number = float(val)
    except ValueError:
        return [name.strip() for name in val.split(",") if name.strip()]
    return int(number) if number >= 1 and number == int(number) else number


@app.command()
def train(
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset folder: images/ + masks/, the ISBI 2012 layout or the Cell Tracking Challenge layout."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder to create (must be empty unless --force)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder exactly where it stopped."),
    val: Optional[str] = typer.Option(None, "--val", help="Validation images: a fraction (0.2), a count (5) or names (t045,t046). Never trained on."),
    val_data: Optional[Path] = typer.Option(None, "--val-data", help="A separate validation dataset folder (instead of --val)."),
    iterations: Optional[int] = typer.Option(None, help="Training iterations, one tile batch each (default 2000; with --resume: the run's)."),
    epochs: Optional[float] = typer.Option(None, help="Instead of --iterations: passes over the training pixels, counted in output tiles."),
    seconds: Optional[float] = typer.Option(None, help="Stop after this many seconds (a checkpoint is written)."),
    tile_size: int = typer.Option(PAPER.tile_size, "--tile-size", help="Input tile size; must be legal for the network (the error names the nearest)."),
    batch_size: int = typer.Option(PAPER.batch_size, "--batch-size"),
    depth: int = typer.Option(PAPER.depth, help="Resolution levels (the paper: 5)."),
    width: int = typer.Option(PAPER.base_channels, help="Channels of the first level (the paper: 64)."),
    padding: str = typer.Option("valid", help="'valid' (the paper) or 'same'."),
    dropout: float = typer.Option(PAPER.dropout),
    batch_norm: bool = typer.Option(False, "--batch-norm/--no-batch-norm"),
    optimizer: str = typer.Option("sgd", help="'sgd' (the paper) or 'adam'."),
    lr: float = typer.Option(0.001, help="Learning rate (SGD with momentum 0.99: see TrainConfig; Adam: 0.001)."),
    momentum: float = typer.Option(PAPER.momentum),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    dice: float = typer.Option(0.0, help="Weight of an extra soft Dice loss term (0: the paper's loss only)."),
    w0: float = typer.Option(PAPER.w0, help="Weight-map border amplitude."),
    sigma: float = typer.Option(PAPER.sigma, help="Weight-map border width (pixels, or micrometres with --pixel-size)."),
    pixel_size: Optional[float] = typer.Option(None, "--pixel-size", help="Micrometres per pixel; makes --sigma micrometres."),
    class_weights: str = typer.Option("balanced", "--class-weights", help="'balanced' or one weight per class, e.g. '1,1'."),
    weight_map: bool = typer.Option(True, "--weight-map/--no-weight-map", help="Use the border term of the weight map."),
    elastic: bool = typer.Option(True, "--elastic/--no-elastic", help="The paper's elastic deformation."),
    elastic_grid: int = typer.Option(PAPER.elastic_grid, "--elastic-grid"),
    elastic_sigma: float = typer.Option(PAPER.elastic_sigma, "--elastic-sigma"),
    rotate: bool = typer.Option(True, "--rotate/--no-rotate"),
    flip: bool = typer.Option(True, "--flip/--no-flip"),
    shift: bool = typer.Option(True, "--shift/--no-shift"),
    gray: bool = typer.Option(True, "--gray/--no-gray", help="Gray-value variation (brightness, contrast, gamma, noise)."),
    normalize: str = typer.Option("percentile", help="'percentile' (1-99.8 %), 'fixed' (x/255 for 8 bit) or 'none'."),
    val_every: int = typer.Option(200, "--val-every"),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every"),
    seed: int = typer.Option(0),
    workers: int = typer.Option(1, help="DataLoader worker processes for augmentation."),
    device: str = typer.Option("auto", help="cpu, cuda, mps or auto."),
    force: bool = typer.Option(False, "--force", help="Use a non-empty --out folder."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train a U-Net as in the paper: weighted loss, elastic deformation, SGD with momentum 0.99."""
    from ..augment import AugmentConfig
    from ..checkpoint import load_checkpoint
    from ..data import Normalization, find_pairs, load_samples, split_pairs
    from ..errors import InputError
    from ..io import prepare_output_dir
    from ..train import TrainConfig, Trainer

    if resume is not None:
        run_dir = resume
        last = run_dir / "last.pt"
        if not (run_dir / "config.json").is_file() or not last.is_file():
            raise InputError(f"{run_dir}: not a run folder (config.json and last.pt missing); give the --out of an earlier `unetkit train`")
        saved = json.loads((run_dir / "config.json").read_text())
        setup = json.loads((run_dir / "data.json").read_text())
        overrides = {"iterations": iterations or saved["iterations"], "max_seconds": seconds or saved["max_seconds"]}
        config = TrainConfig.from_dict({**saved, **overrides})
        normalization = load_checkpoint(last).normalization
        data, val_data, val = Path(setup["data"]), setup["val_data"] and Path(setup["val_data"]), setup["val"]
    else:
        if data is None or out is None:
            raise InputError("give --data DIR and --out RUN (or --resume RUN)")
        augment = AugmentConfig(elastic=elastic, elastic_grid=elastic_grid, elastic_sigma=elastic_sigma, rotate=rotate,
                                rotate90=rotate, flip=flip, shift=shift, gamma=gray, contrast=gray, brightness=gray, noise=gray)
        config = TrainConfig(
            depth=depth, base_channels=width, padding=padding, dropout=dropout, batch_norm=batch_norm,
            tile_size=tile_size, batch_size=batch_size, w0=w0, sigma=sigma, class_weights=_class_weights(class_weights),
            use_weight_map=weight_map, pixel_size=pixel_size, augment=augment, optimizer=optimizer, lr=lr,
            momentum=momentum, weight_decay=weight_decay, dice_weight=dice, iterations=iterations or 2000, max_seconds=seconds,
            val_every=val_every, checkpoint_every=checkpoint_every, seed=seed, workers=workers, device=device,
        )
        normalization = {"percentile": Normalization(), "fixed": Normalization(mode="fixed", scale=1 / 255), "none": Normalization(mode="none")}.get(normalize)
        if normalization is None:
            raise InputError(f"--normalize must be percentile, fixed or none (got {normalize!r})")
        run_dir = out
        val = str(val) if val is not None else None

    pairs = find_pairs(data)
    if val_data is not None:
        train_pairs, val_pairs = pairs, find_pairs(val_data)
    else:
        train_pairs, val_pairs = split_pairs(pairs, _validation(val), seed=config.seed)
    target_options = dict(w0=config.w0, sigma=config.sigma, class_weights=config.class_weights,
                          pixel_size=config.pixel_size, use_weight_map=config.use_weight_map)
    train_samples = load_samples(train_pairs, normalization, **target_options)
    val_samples = load_samples(val_pairs, normalization, **target_options) if val_pairs else []
    if epochs is not None and resume is None:
        geometry = config.network(1).geometry
        out_pixels = geometry.output_size(config.tile_size) ** 2 * config.batch_size
        total = sum(s.shape[0] * s.shape[1] for s in train_samples)
        config.iterations = max(1, round(epochs * total / out_pixels))
    if resume is None:
        prepare_output_dir(run_dir, force=force)
        (run_dir / "data.json").write_text(json.dumps({
            "data": str(data.resolve()), "val_data": str(val_data.resolve()) if val_data else None, "val": val,
            "train": [p.name for p in train_pairs], "validation": [p.name for p in val_pairs],
        }, indent=2))
    typer.echo(f"{len(train_samples)} training and {len(val_samples)} validation images; {config.iterations} iterations "
               f"of {config.tile_size}x{config.tile_size} tiles; run folder {run_dir}")
    trainer = Trainer(config, train_samples, val_samples, run_dir, normalization=normalization,
                      resume=resume is not None, progress=progress)
    summary = trainer.fit()
    typer.echo(json.dumps(summary, indent=2))
