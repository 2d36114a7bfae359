"""`unetkit predict`: segment images with a trained checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import app


@app.command()
def predict(
    inputs: List[Path] = typer.Argument(..., help="Images or folders of images (PNG/TIFF)."),
    model: Path = typer.Option(..., "--model", help="Checkpoint written by `unetkit train` (RUN/best.pt)."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    tta: bool = typer.Option(False, "--tta", help="Average the 8 rotated/mirrored versions (the paper used 7 rotations)."),
    tile_size: Optional[int] = typer.Option(None, "--tile-size", help="Input tile size (default: the largest that fits in memory)."),
    batch_size: int = typer.Option(1, "--batch-size"),
    device: str = typer.Option("auto", help="cpu, cuda, mps or auto."),
    threshold: float = typer.Option(0.5, help="Foreground probability threshold."),
    labels: str = typer.Option("instances", help="'instances' (connected components, one id per object) or 'binary'."),
    watershed: bool = typer.Option(False, "--watershed", help="Split touching objects by a seeded watershed."),
    min_size: int = typer.Option(0, "--min-size", help="Remove objects smaller than this many pixels."),
    fill_holes: bool = typer.Option(True, "--fill-holes/--keep-holes"),
    ctc: bool = typer.Option(False, "--ctc", help="Also write the Cell Tracking Challenge result layout (maskNNN.tif)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Write class probabilities (float32 TIFF) and label images named after each input."""
    from ..predict import segment_files

    written = segment_files(
        inputs, model, out, tta=tta, tile_size=tile_size, batch_size=batch_size, device=device,
        threshold=threshold, labels=labels, watershed=watershed, min_size=min_size, fill_holes=fill_holes,
        ctc=ctc, force=force, progress=progress,
    )
    typer.echo(f"wrote {len(written)} files to {out}")
