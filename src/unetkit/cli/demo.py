"""`unetkit demo`: the main job on built-in synthetic data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the results (must be empty unless --force).")] = Path("demo-output"),
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty --out, replacing files.")] = False,
    seconds: Annotated[float, typer.Option(help="Training time budget in seconds.")] = 120.0,
    seed: Annotated[int, typer.Option(help="Random seed for data and training.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train a small U-Net on synthetic touching cells, segment a held-out image, score it, draw it."""
    from ..errors import InputError
    from ..io import check_output_dir
    from . import CommandInterrupted

    from ..config import SettingError, check_settings

    try:  # the training settings' limits (`unetkit.config.TRAIN_LIMITS`), named by their options
        check_settings({"max_seconds": seconds, "seed": seed})
    except SettingError as exc:
        raise InputError(exc.message({"max_seconds": "--seconds", "seed": "--seed"}[exc.setting])) from None
    check_output_dir(out, force=force)
    from ..demo import DemoSettings, run_demo

    try:
        run_demo(out, force=force, settings=DemoSettings(seconds=seconds, seed=seed), progress=progress)
    except KeyboardInterrupt:
        raise CommandInterrupted(f"the demo stopped; run it again with --force to replace {out}") from None
