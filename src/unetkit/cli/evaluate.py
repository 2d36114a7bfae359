"""`unetkit evaluate`: score a folder of predictions against a folder of ground truth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..metric_info import DEFAULT_METRICS, METRIC_DESCRIPTIONS
from . import app

_METRICS_HELP = "comma-separated, from: " + "; ".join(f"{name} = {text}" for name, text in METRIC_DESCRIPTIONS.items())


@app.command("evaluate")
def evaluate_command(
    pred: Annotated[
        Path,
        typer.Option(
            "--pred",
            help="folder of predictions: float probability TIFFs (H, W) or (C, H, W) as `unetkit predict` writes, "
            "or label images (binary or instance)",
        ),
    ],
    gt: Annotated[
        Path,
        typer.Option(
            "--gt",
            help="folder of ground truth: binary masks {0,255} or {0,1} (255 = cell interior) or instance labels; "
            "paired by name, else by trailing number (mask000 <-> man_seg000)",
        ),
    ],
    metrics: Annotated[str, typer.Option("--metrics", help=_METRICS_HELP)] = ",".join(DEFAULT_METRICS),
    json_path: Annotated[Optional[Path], typer.Option("--json", help="also write every score to this JSON file")] = None,
    html_path: Annotated[
        Optional[Path],
        typer.Option("--html", help="also write a self-contained HTML page: the scores and overlays of the first images"),
    ] = None,
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold",
            help="probability above which a pixel is cell interior (pixel, warping, dice, iou, objects); "
            "rand and pixel_f always take the best of 0.0, 0.1, ..., 1.0",
        ),
    ] = 0.5,
    channel: Annotated[int, typer.Option("--channel", help="foreground channel of (C, H, W) probability maps")] = 1,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing --json or --html file")] = False,
    use: Annotated[
        str, typer.Option("--use", help="with `unetkit predict` outputs: score IMAGE_probabilities or IMAGE_labels")
    ] = "probabilities",
    allow_intensity_masks: Annotated[
        bool,
        typer.Option("--allow-intensity-masks", help="score against ground truth that looks like an intensity image (raw image, probability map) as it is"),
    ] = False,
    volumes: Annotated[
        bool,
        typer.Option("--volumes", help="score each z-stack as one volume (6-connected objects; Rand, SEG, AP, VI in 3D) instead of plane by plane"),
    ] = False,
) -> None:
    """Score predictions with the challenges' metrics; print a table per image and overall."""
    from ..evaluate import evaluate_folders
    from ..errors import InputError
    from ..io import atomic_write, check_writable_file

    if json_path is not None:
        check_writable_file(json_path, "--json", force=force)
    if html_path is not None:
        check_writable_file(html_path, "--html", force=force)
        if json_path is not None and html_path.resolve() == json_path.resolve():
            raise InputError(f"{html_path}: --json and --html name the same file; give two names")
    result = evaluate_folders(pred, gt, metrics=metrics, threshold=threshold, channel=channel, use=use,
                              allow_intensity_masks=allow_intensity_masks, volumes=volumes)
    typer.echo(result.table())
    for note in result.notes:
        typer.echo(f"note: {note}")
    if result.unpaired_predictions:
        typer.echo(f"note: {len(result.unpaired_predictions)} prediction(s) without ground truth were skipped")
    if json_path is not None:
        text = json.dumps(result.to_dict(), indent=2)
        atomic_write(json_path, lambda p: p.write_text(text + "\n"), force=force)
        typer.echo(f"wrote {json_path}")
    if html_path is not None:
        from ..report import write_evaluation_report

        write_evaluation_report(result, html_path, pred, gt, channel=channel, allow_intensity_masks=allow_intensity_masks,
                                force=force)
        typer.echo(f"wrote {html_path}")
