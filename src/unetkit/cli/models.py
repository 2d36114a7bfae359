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


def _dims(m) -> str:
    return "3D" if (m.training or {}).get("dims") == 3 else "2D"


def _objects(m) -> str:
    diameter = (m.scale or {}).get("diameter")
    return f"{diameter:g} px" if diameter else "-"


def _precisions(m) -> str:
    """The stored rule score per precision and what `--precision auto` may choose from them."""
    from ..precision import SCORE_TOLERANCE, worse_by

    scores = m.precision_scores or {}
    values = scores.get("rule_scores") or {}
    if not values:
        return "fp32 only (no per-precision scores stored)"
    names = [p for p in ("fp32", "bf16", "int8") if p in values]
    allowed = [p for p in names if p == "fp32" or (worse_by(scores, p) is not None and worse_by(scores, p) <= SCORE_TOLERANCE)]
    listed = ", ".join(f"{p} {values[p]:.4f}" for p in names)
    return f"{listed} ({scores.get('score', 'rule score')}); --precision auto may choose {', '.join(allowed)}"


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
            ("network", f"{_dims(m)} U-Net"),
            ("object scale", f"median object diameter {_objects(m)} in its training masks" if m.scale else "not recorded"),
            ("precisions", _precisions(m)),
            ("data terms", m.license),
            ("cite", m.citation),
        ]
        width = max(len(k) for k, _ in facts)
        typer.echo("\n".join(f"{k.ljust(width)}  {v}" for k, v in facts))
        return
    rows = [
        [m.name, _dims(m), m.trained_on.split(" (")[0], m.input.describe(pixel_size=False), _objects(m),
         describe_scores(m.scores), _size(m.size_bytes), "installed" if m.installed else "not installed"]
        for m in models
    ]
    typer.echo(_table(rows, ["name", "network", "trained on", "input", "objects", "held-out scores", "size", "status"]))
    typer.echo(f"total {_size(total_size())}; details: unetkit models NAME; use: unetkit predict --model NAME IMAGES --out DIR")
