"""`unetkit models`: the packaged pretrained models, their training data, scores and whether they are installed."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from . import app


def _size(size_bytes: Optional[int]) -> str:
    return "-" if size_bytes is None else f"{size_bytes / 1e6:.1f} MB"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


@app.command("models")
def models_command(
    name: Annotated[Optional[str], typer.Argument(help="Show everything about this model (default: list them all).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")] = False,
) -> None:
    """List the packaged pretrained models; use one with `unetkit predict --model NAME`."""
    from ..pretrained import describe_scores, get_model, list_models, total_size

    models = [get_model(name)] if name is not None else list_models()
    if as_json:
        typer.echo(json.dumps([m.to_dict() for m in models], indent=2, default=float))
        return
    if name is not None:
        m = models[0]
        facts = [
            ("name", m.name),
            ("segments", m.description),
            ("installed", f"yes, {m.path} ({_size(m.size_bytes)})" if m.installed else f"not installed ({m.path} is absent)"),
            ("trained on", m.trained_on),
            ("input", m.input.describe() + (f" (pixel size: {m.input.pixel_size_source})" if m.input.pixel_size else "")),
            ("images", m.input.modality),
            ("recipe", f"{m.recipe}; budget: {m.budget}"),
            ("held-out scores", describe_scores(m.scores)),
            ("data terms", m.license),
            ("cite", m.citation),
        ]
        width = max(len(k) for k, _ in facts)
        typer.echo("\n".join(f"{k.ljust(width)}  {v}" for k, v in facts))
        return
    rows = [
        [m.name, m.trained_on.split(" (")[0], m.input.describe(pixel_size=False),
         describe_scores(m.scores), _size(m.size_bytes), "installed" if m.installed else "not installed"]
        for m in models
    ]
    typer.echo(_table(rows, ["name", "trained on", "input", "held-out scores", "size", "status"]))
    typer.echo(f"total {_size(total_size())}; details: unetkit models NAME; use: unetkit predict --model NAME IMAGES --out DIR")
