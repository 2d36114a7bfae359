"""`unetkit predict`: segment images with a trained checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import app


@app.command()
def predict(
    inputs: List[Path] = typer.Argument(..., help="Images or folders of images (PNG/TIFF)."),
    model: Path = typer.Option(..., "--model", help="Checkpoint written by `unetkit train` (RUN/best.pt), or a packaged model's name (`unetkit models`: em-membranes, dic-hela, fluo-nuclei)."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Average the 8 rotated/mirrored versions (the paper used 7 rotations). Default: as the checkpoint's labels rule was chosen (on for models trained by unetkit train with validation images), else off."),
    tile_size: Optional[int] = typer.Option(None, "--tile-size", help="Input tile size (default: the largest that fits in memory)."),
    batch_size: int = typer.Option(1, "--batch-size"),
    device: str = typer.Option("auto", help="cpu, cuda, mps or auto."),
    threshold: Optional[float] = typer.Option(None, help="Foreground probability threshold (default: the checkpoint's labels rule, chosen on validation images; else 0.5). Giving it, --watershed or --min-size replaces the stored rule."),
    labels: str = typer.Option("instances", help="'instances' (one id per object) or 'binary'."),
    watershed: Optional[bool] = typer.Option(None, "--watershed", help="Split touching objects by a seeded watershed on the distance transform (instead of the stored rule)."),
    min_size: Optional[int] = typer.Option(None, "--min-size", help="Remove objects smaller than this many pixels (instead of the stored rule's)."),
    fill_holes: bool = typer.Option(True, "--fill-holes/--keep-holes"),
    ctc: bool = typer.Option(False, "--ctc", help="Also write the Cell Tracking Challenge result layout: OUT/ctc/maskNNN.tif, numbered by the input frame (t041.tif -> mask041.tif)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files (without it, images whose outputs exist are skipped)."),
    skip_unreadable: bool = typer.Option(False, "--skip-unreadable", help="Skip inputs that are not readable images instead of stopping before the first image."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Write class probabilities (float32 TIFF) and label images named after each input."""
    from ..device import check_device
    from ..io import check_writable_folder

    check_device(device)  # the quick checks first, before torch is imported
    check_writable_folder(out, "--out")
    from ..segment import segment_files
    from . import CommandInterrupted

    try:
        written = segment_files(
            inputs, model, out, tta=tta, tile_size=tile_size, batch_size=batch_size, device=device,
            threshold=threshold, labels=labels, watershed=watershed, min_size=min_size, fill_holes=fill_holes,
            ctc=ctc, force=force, progress=progress, skip_unreadable=skip_unreadable, echo=typer.echo,
        )
    except KeyboardInterrupt as exc:
        raise CommandInterrupted(str(exc) or f"nothing was written to {out}") from None
    typer.echo(f"wrote {len(written)} files to {out}")
